"""Benchmark: the two ways register_pair can compare features (not a test).

"warped": the moving image's features are computed once and warped in every step; "encoded": the
moving image is warped and encoded again in every step (exact, but an encoder pass per step). Both
register the OASIS sample's subject 1 T1 slice to subject 2's inverted T1 slice with the shipped
encoder; prints seg4 Dice, folded-voxel share and seconds of each, and the same-run tf.matmul GFLOP/s.

    python bench/moved_features.py [--steps 100]
"""
import argparse
import time

import numpy as np

import cifl_tf
from cifl_tf import benchmark, data, metrics, models
from cifl_tf.machine import describe, matmul_gflops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=benchmark.oasis_sample(), help="neurite-oasis folder with two subjects' slices")
    parser.add_argument("--steps", type=int, default=100, help="steps per level")
    args = parser.parse_args()
    slices = data.load_oasis(args.data, dim=2)
    moving, fixed = slices.images[0], data.invert(slices.images[1])
    for mode in ("warped", "encoded"):
        start = time.perf_counter()
        displacement = cifl_tf.register_pair(moving, fixed, moved_features=mode, steps=args.steps, verbose=0)
        seconds = time.perf_counter() - start
        moved = models.warp(slices.labels[:1, ..., None].astype(np.float32), displacement[None], "nearest")
        dice = metrics.mean_dice(np.rint(moved[0, ..., 0]).astype(np.int32), slices.labels[1])
        print(f"{mode:8s} seg4 Dice {dice:.3f}, folded {100 * metrics.folding_fraction(displacement):.3f}%, "
              f"{seconds:.1f} s")
    print(f"identity seg4 Dice {metrics.mean_dice(slices.labels[0], slices.labels[1]):.3f}; "
          f"tf.matmul 2048^2 float32: {matmul_gflops():.1f} GFLOP/s; {describe()}")


if __name__ == "__main__":
    main()
