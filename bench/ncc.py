"""Benchmark of local NCC's value and gradient, voxelmorph's against cifl_tf's, on one volume (not a test).

voxelmorph's window sums are a ones-kernel convolution, cifl_tf's cumulative sums in float64.

Prints seconds per loss-and-gradient evaluation of each and their ratio, how far each one's window sums
are from a float64 convolution and how far apart their NCC maps are, and the same-run tf.matmul GFLOP/s.

    python bench/ncc.py [--shape 53,65,54] [--repeats 3]
"""
import time

import numpy as np

import cifl_tf  # noqa: F401  (first: it makes tf.keras the Keras 2 that voxelmorph needs)
import tensorflow as tf
import voxelmorph as vxm
from cifl_tf.cli import _OneLineParser, _positive_int, _positive_integers
from cifl_tf.losses import NCC, window_sums
from cifl_tf.machine import describe, matmul_gflops


def seconds_per_gradient(loss, fixed, moved, repeats):
    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(moved)
            value = loss(fixed, moved)
        return tape.gradient(value, moved)

    gradient()  # traced outside the timing
    start = time.perf_counter()
    for _ in range(repeats):
        gradient()
    return (time.perf_counter() - start) / repeats


def main():
    parser = _OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=_positive_integers("shape", "53,65,54"), default=(53, 65, 54),
                        help="spatial shape, 2D or 3D (the 3D demo's volumes by default)")
    parser.add_argument("--repeats", type=_positive_int, default=3)
    args = parser.parse_args()
    shape = tuple(args.shape)
    if len(shape) not in (2, 3):  # the convolutions are tf.nn.conv2d or conv3d
        parser.error(f"--shape must have 2 or 3 sizes, got {','.join(map(str, shape))}")
    rng = np.random.default_rng(0)
    fixed = tf.constant(rng.uniform(size=(1, *shape, 1)), tf.float32)
    moved = tf.constant(0.5 * fixed + rng.uniform(size=(1, *shape, 1)), tf.float32)
    conv = getattr(tf.nn, f"conv{len(shape)}d")
    window, strides = [9] * len(shape), [1] * (len(shape) + 2)
    exact = conv(tf.cast(moved, tf.float64), tf.ones([*window, 1, 1], tf.float64), strides, "SAME")
    sums = {"voxelmorph": conv(moved, tf.ones([*window, 1, 1]), strides, "SAME"), "cifl_tf": window_sums(moved, window)}
    timings = {}
    for name, ncc in (("voxelmorph", vxm.losses.NCC()), ("cifl_tf", NCC())):
        timings[name] = seconds_per_gradient(ncc.loss, fixed, moved, args.repeats)
        error = np.abs(tf.cast(sums[name], tf.float64) - exact).max()
        print(f"{name:10s} {timings[name]:.3f} s per loss and gradient; window sums off by at most {error:.1e}")
    difference = np.abs(vxm.losses.NCC().ncc(fixed, moved) - NCC().ncc(fixed, moved)).max()
    print(f"largest difference between the two NCC maps: {difference:.1e}")
    print(f"voxelmorph / cifl_tf: {timings['voxelmorph'] / timings['cifl_tf']:.1f}x on {'x'.join(map(str, shape))}; "
          f"tf.matmul 2048^2 float32: {matmul_gflops():.1f} GFLOP/s; {describe()}")


if __name__ == "__main__":
    main()
