"""Benchmark of a RegistrationModel's (VxmDense's) first training step, mostly tracing, and of the next ones.

Prints wall and process CPU seconds of the first ``train_on_batch`` (tracing and graph optimisation) and the
median of the next ones, beside the GFLOP/s of a float32 tf.matmul measured in the same run.

    python bench/registration_step.py [--shape 160 192] [--batch-size 2] [--steps 5]
"""
import time

import numpy as np

import cifl_tf
from cifl_tf.cli import _OneLineParser, _positive_int
from cifl_tf.machine import describe
from train_step import matmul


def seconds(function):
    """Wall and CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = _OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=(160, 192),
                        help="2 or 3 sizes, each divisible by 16 (VxmDense's UNet downsampling)")
    parser.add_argument("--batch-size", type=_positive_int, default=2)
    parser.add_argument("--steps", type=_positive_int, default=5)
    args = parser.parse_args()
    shape = tuple(args.shape)

    try:  # the model checks its shape before it builds anything
        model = cifl_tf.registration_model(shape)
    except ValueError as error:
        parser.error(f"--shape: {error}")
    reference, reference_flops = matmul()
    reference()  # warm-up
    pair = [np.random.default_rng(seed).random((args.batch_size, *shape, 1), np.float32) for seed in (0, 1)]
    first = seconds(lambda: model.train_on_batch(pair))
    step = np.median([seconds(lambda: model.train_on_batch(pair)) for _ in range(args.steps)], axis=0)
    peak = reference_flops / np.array(seconds(reference)) / 1e9

    print(describe())
    print(f"registration_model{shape}, batch {args.batch_size} pairs")
    print(f"first train step (tracing):  {first[0]:.2f} s wall, {first[1]:.2f} s CPU")
    print(f"next train steps (median):   {step[0]:.3f} s wall, {step[1]:.3f} s CPU")
    print(f"tf.matmul 2048^2 float32:    {peak[0]:.1f} GFLOP/s wall, {peak[1]:.1f} GFLOP per CPU-second")


if __name__ == "__main__":
    main()
