"""Benchmark of instance registration of a 160x192x224 pair (not a test).

The fixed image is the OASIS sample's 3D T1 (aligned_norm, 160x192x224, with its seg4 label map); the
moving image is the same volume under a known smooth random deformation (about --warp-std voxels), with
--affine also under an affine misalignment (MISALIGNMENT: 3-6% scalings, a 1.7-degree rotation, a shift of 3-5
voxels) that register_pair's affine stage then fits; the fixed image is optionally contrast-inverted.
Prints, in one run:
  * seconds of tiled feature extraction with the shipped 3D encoder (pretrained(ndim=3)) under --max-memory;
  * seconds of register_pair with intensity NCC (or --method mi, the shipped CIFL features, MIND, or both as a
    FeatureStack; features compared by --similarity), its Dice on seg4 before and after, the folded-voxel share;
  * peak RSS of the process after each phase (the last includes the Dice evaluation's full-size warps),
    and the GFLOP/s of a plain tf.matmul measured in the same run.

    python bench/register_3d.py [--levels 16,8,4] [--steps 100] [--method ncc|mi|cifl|mind|cifl+mind]
                                [--similarity ncc|mse] [--invert] [--affine] [--max-memory BYTES]
"""
import math
import resource
import time

import numpy as np

import cifl_tf
from cifl_tf import benchmark, data, instance, metrics, models, tiling
from cifl_tf.cli import _bytes, _levels, _OneLineParser, _positive_int
from cifl_tf.descriptors import MIND
from cifl_tf.machine import describe, matmul_gflops


# moving(x) = fixed(A x + t), in voxels about the volume's centre (instance.affine_displacement's convention)
MISALIGNMENT = np.array([[1.06, 0, 0, -5], [0, 0.97, 0.03, 3], [0, -0.03, 1.04, -4]], np.float32)


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB on Linux


def smooth_deformation(shape, std, seed):
    """(*shape, 3) displacement: random vectors on a 4^3 grid (about `std` voxels), upsampled linearly."""
    factor = -(-max(shape) // 4)
    coarse = np.random.default_rng(seed).normal(0, std / factor, (4, 4, 4, 3)).astype(np.float32)
    return instance.resample_field(coarse, factor, 1, (4 * factor,) * 3)[tuple(slice(0, n) for n in shape)]


def main():
    parser = _OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=benchmark.oasis_sample(),
                        help="neurite-oasis folder with a subject's aligned_norm")
    parser.add_argument("--subject", default="OASIS_OAS1_0001_MR1",
                        help="the subject folder in --data whose aligned_norm is registered (default: %(default)s)")
    parser.add_argument("--levels", type=_levels, default=None,
                        help="pooling factors, coarse to fine (default: register_pair's, instance.default_levels)")
    parser.add_argument("--steps", type=_positive_int, default=100, help="steps per level")
    parser.add_argument("--method", choices=("ncc", "mi", "cifl", "mind", "cifl+mind"), default="ncc",
                        help="intensity NCC or MI, the shipped 3D CIFL features, MIND, or the two stacked")
    parser.add_argument("--similarity", choices=("ncc", "mse"), default=None,
                        help="how cifl and mind features are compared (default: register_pair's, ncc)")
    parser.add_argument("--invert", action="store_true", help="register T1 to inverted T1 (not with ncc)")
    parser.add_argument("--affine", action="store_true",
                        help="misalign the moving image affinely too (MISALIGNMENT), and fit an affine stage first")
    parser.add_argument("--warp-std", type=float, default=3.0, help="voxels, at least 0 (default 3)")
    parser.add_argument("--max-memory", type=_bytes, default=tiling.DEFAULT_MAX_MEMORY, metavar="BYTES",
                        help="e.g. 512M (default 1G)")
    args = parser.parse_args()
    if args.method == "ncc" and args.invert:
        parser.error("--invert with --method ncc: intensity NCC cannot compare T1 with inverted T1; "
                     "choose --method mi, cifl, mind or cifl+mind")
    if args.similarity is not None and args.method in ("ncc", "mi"):  # else dropped without a word
        parser.error(f"--similarity compares features: --method {args.method} compares the intensities by itself")
    if not 0 <= args.warp_std < math.inf:
        parser.error(f"--warp-std must be a finite number of voxels, at least 0, got {args.warp_std}")
    if args.levels is not None:
        try:  # register_pair's own check, here before the volume is loaded and warped
            instance._check_levels(args.levels)
        except ValueError as error:
            parser.error(f"--levels: {error}")
    try:
        volume = data.load_oasis(args.data, dim=3, subjects=[args.subject])
        if args.levels is not None:  # and against the volume's grid, before it is warped and described
            instance._check_levels(args.levels, volume.images[0].shape)
    except (ValueError, OSError) as error:  # data.DataError: no such folder, no such subject, unreadable file
        parser.error(str(error))
    fixed, fixed_labels = volume.images[0], volume.labels[0]
    truth = smooth_deformation(fixed.shape, args.warp_std, seed=0)
    if args.affine:  # the affine misalignment, then the deformation
        truth = truth + models.warp(instance.affine_displacement(MISALIGNMENT, 1, fixed.shape)[None], truth[None])[0]
    moving = models.warp(fixed[None, ..., None], truth[None])[0, ..., 0]
    moving_labels = models.warp_labels(fixed_labels[None], truth[None])[0]
    if args.invert:
        fixed = data.invert(fixed)
    levels = instance.default_levels(fixed.shape) if args.levels is None else args.levels

    encoder = cifl_tf.pretrained(ndim=3)
    start = time.perf_counter()
    features = tiling.tiled_features(encoder, fixed, args.max_memory)
    features_s = time.perf_counter() - start
    del features
    features_gb = peak_rss_gb()

    start = time.perf_counter()
    mind = MIND(ndim=3)
    method_encoder = {"cifl": encoder, "mind": mind,
                      "cifl+mind": cifl_tf.FeatureStack([encoder, mind])}.get(args.method)
    similarity = args.method if method_encoder is None else args.similarity or "ncc"
    displacement = cifl_tf.register_pair(moving, fixed, encoder=method_encoder, similarity=similarity, levels=levels,
                                         steps=args.steps, affine=args.affine, max_memory=args.max_memory)
    register_s = time.perf_counter() - start
    register_gb = peak_rss_gb()

    def dice(field):
        return benchmark.registered_dice(field, moving_labels, fixed_labels)

    compared = args.method if method_encoder is None else f"{args.method} ({similarity})"
    print(f"shape {fixed.shape}, levels {levels}, {args.steps} steps per level, {compared}"
          f"{', T1 -> inverted T1' if args.invert else ''}{', affine stage' if args.affine else ''}, "
          f"max_memory {args.max_memory} bytes")
    print(f"features (pretrained(ndim=3), tiled): {features_s:.1f} s, peak RSS so far {features_gb:.2f} GB")
    print(f"register_pair:                        {register_s:.1f} s, peak RSS so far {register_gb:.2f} GB")
    print(f"seg4 Dice: identity {dice(np.zeros_like(displacement)):.3f} -> registered {dice(displacement):.3f}; "
          f"folded voxels {100 * metrics.folding_fraction(displacement):.4f}%")
    print(f"peak RSS {peak_rss_gb():.2f} GB; tf.matmul 2048^2 float32: {matmul_gflops():.1f} GFLOP/s; {describe()}")


if __name__ == "__main__":
    main()
