"""Benchmark of one CIFL encoder training step (not a test).

Measures, at 160x192 with a batch of 4 pairs and the default encoder:
  * seconds per training step on fixed data, and the GFLOP/s that achieves (convolution FLOPs,
    forward + backward = 3x forward, both views);
  * GFLOP/s of a plain float32 tf.matmul measured in the same run, and the ratio of the two;
  * seconds per batch of synthesis (contrast pairs + random-offset crops), and its share of a
    training step fed by the live synthetic stream.

    python bench/train_step.py [--steps 20] [--features 32] [--channels 16]
"""
import argparse
import inspect
import time

import numpy as np

import cifl_tf
import tensorflow as tf
from cifl_tf.encoder import NUM_CONVS
from cifl_tf.training import SiameseCIFL, offset_views

DEFAULTS = {k: p.default for k, p in inspect.signature(cifl_tf.train_encoder).parameters.items()}


def conv_flops(shape, features, channels):
    """Multiply-adds x2 of the encoder's convolutions on one image of `shape`."""
    widths = [1] + [features] * (NUM_CONVS - 1) + [channels]
    kernel = 3 ** len(shape)
    return 2 * np.prod(shape) * kernel * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def seconds_per_call(function, repeats):
    function()  # warm-up: tracing, allocation
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def matmul_gflops(n=2048, repeats=20):
    a, b = tf.random.normal((n, n)), tf.random.normal((n, n))
    matmul = tf.function(lambda: tf.linalg.matmul(a, b)[0, 0])
    return 2 * n ** 3 / seconds_per_call(lambda: matmul().numpy(), repeats) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=2, default=(160, 192))
    parser.add_argument("--features", type=int, default=DEFAULTS["features"])
    parser.add_argument("--channels", type=int, default=DEFAULTS["channels"])
    parser.add_argument("--max-offset", type=int, default=DEFAULTS["max_offset"])
    args = parser.parse_args()
    shape, offset = tuple(args.shape), args.max_offset

    big = tuple(s + offset for s in shape)
    views = offset_views(cifl_tf.synth.contrast_pairs(big, args.batch_size, seed=0), shape, offset)
    stream = iter(views)
    synth_s = seconds_per_call(lambda: next(stream), args.steps)

    encoder = cifl_tf.CIFLEncoder(channels=args.channels, features=args.features, ndim=len(shape))
    model = SiameseCIFL(encoder)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    batch = next(stream)[0]
    step_s = seconds_per_call(lambda: model.train_on_batch(batch), args.steps)
    live_s = seconds_per_call(lambda: model.train_on_batch(next(stream)[0]), args.steps)

    flops = 3 * 2 * args.batch_size * conv_flops(shape, args.features, args.channels)
    achieved, peak = flops / step_s / 1e9, matmul_gflops()
    print(f"shape {shape}, batch {args.batch_size} pairs, features {args.features}, C {args.channels}, "
          f"max_offset {offset}, threads: {tf.config.threading.get_intra_op_parallelism_threads() or 'all'}")
    print(f"train step (fixed data):     {step_s:.3f} s  -> {achieved:.1f} GFLOP/s "
          f"({flops / 1e9:.1f} GFLOP per step)")
    print(f"tf.matmul 2048^2 float32:    {peak:.1f} GFLOP/s  -> step/matmul ratio {achieved / peak:.2f}")
    print(f"synthesis alone:             {synth_s:.3f} s per batch")
    print(f"train step (live stream):    {live_s:.3f} s  -> synthesis share "
          f"{synth_s / (synth_s + step_s):.0%} of a step")


if __name__ == "__main__":
    main()
