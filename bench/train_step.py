"""Benchmark of one CIFL encoder training step (not a test).

Measures, at the shipped encoders' crop shape (96x96; --shape for others) with a batch of 4 pairs and the default
encoder (--architecture context --inversion-invariant for the recommended one's layers), each step run by
``model.fit``, as training runs it (``train_on_batch``, timed until an earlier version, took 0.52 s per float32 step
against 0.35 s in ``fit`` on the same batch at 160x192, in one run on 2 AVX-512 cores):
  * seconds per training step on fixed data, and the GFLOP/s that achieves (convolution FLOPs,
    forward + backward = 3x forward, both views);
  * GFLOP/s of a plain float32 tf.matmul, timed in rounds alternating with epochs of the step, and
    the ratio of the two per round (median, min-max), by wall time and by process CPU time. The
    CPU-time ratio holds on a shared machine (other processes slow both wall times unevenly); on an
    idle machine the two agree;
  * seconds per batch of synthesis (contrast pairs + random-offset crops) alone, as the throughput of its
    parallel pipeline, and its share of a step fed by the live synthetic stream, whose batches are made
    while the previous steps run: (live step - fixed-data step) / live step, a difference of two timings
    that moved by several points between runs, and synthesis CPU seconds per batch / live step CPU seconds,
    which holds steadier on cores that the step keeps busy.

  Under a mixed precision policy (--precision mixed_bfloat16), the step is also compared with a tf.matmul
  in the convolutions' 16-bit type.

    python bench/train_step.py [--shape 96 96] [--steps 40] [--features 32] [--channels 16] [--architecture A]
                               [--inversion-invariant] [--jit-compile] [--precision P] [--no-bias]
"""
import inspect
import os
import time

import numpy as np

import cifl_tf
import tensorflow as tf
from cifl_tf.cli import _OneLineParser, _positive_int
from cifl_tf.encoder import ARCHITECTURES
from cifl_tf.machine import describe
from cifl_tf.training import PRECISIONS, SiameseCIFL, adam, check_max_offset, offset_views

DEFAULTS = {k: p.default for k, p in inspect.signature(cifl_tf.train_encoder).parameters.items()}


def conv_flops(encoder, shape):
    """Multiply-adds x2 of a built encoder's convolutions on one image of `shape`: with "same" padding every
    kernel weight meets every pixel once, whatever the convolution's dilation."""
    return 2 * int(np.prod(shape)) * sum(int(np.prod(conv.kernel.shape)) for conv in encoder.convs + encoder.context)


def seconds_per_call(function, repeats):
    """Wall and process CPU seconds per call of `function`, after one warm-up call (tracing, allocation)."""
    function()
    start = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start[0]) / repeats, (time.process_time() - start[1]) / repeats


def matmul(n=2048, dtype=tf.float32):
    """An n x n tf.matmul in `dtype` to call, and its FLOPs."""
    a, b = tf.random.normal((n, n), dtype=dtype), tf.random.normal((n, n), dtype=dtype)
    function = tf.function(lambda: tf.linalg.matmul(a, b)[0, 0])
    return lambda: function().numpy(), 2 * n ** 3


class RoundTimer(tf.keras.callbacks.Callback):
    """Times each epoch of a ``fit`` after the first (which traces the step): wall and process CPU seconds
    per step, then `references` (name -> function) called `repeats` times each, so that round r of the step
    ran right beside round r of the references.

    `times`: {"step" and each reference's name: (2, rounds) array, the wall and CPU seconds per call of each round}.
    """

    def __init__(self, steps_per_epoch, references=None, repeats=1):
        super().__init__()
        self.steps, self.references, self.repeats = steps_per_epoch, references or {}, repeats
        self.rounds = {name: [] for name in ("step", *self.references)}

    @property
    def times(self):
        return {name: np.array(pairs).T for name, pairs in self.rounds.items()}

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):  # Keras has waited for the epoch's steps to give its logs
        if epoch == 0:
            return
        self.rounds["step"].append(self._since(self.start, self.steps))
        for name, function in self.references.items():
            start = time.perf_counter(), time.process_time()
            for _ in range(self.repeats):
                function()
            self.rounds[name].append(self._since(start, self.repeats))

    @staticmethod
    def _since(start, calls):
        return (time.perf_counter() - start[0]) / calls, (time.process_time() - start[1]) / calls


def fit_rounds(model, dataset, rounds, steps, references=None, repeats=1):
    """RoundTimer.times of `rounds` epochs of `steps` steps of ``model.fit`` on `dataset`, after one warm-up epoch."""
    for function in (references or {}).values():
        function()  # warm-up: tracing, allocation
    timer = RoundTimer(steps, references, repeats)
    model.fit(dataset, steps_per_epoch=steps, epochs=rounds + 1, callbacks=[timer], verbose=0)
    return timer.times


def spread(values):
    return f"{np.median(values):.2f} (min {np.min(values):.2f}, max {np.max(values):.2f})"


def main():
    parser = _OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_positive_int, default=40)
    parser.add_argument("--batch-size", type=_positive_int, default=4)
    parser.add_argument("--shape", type=_positive_int, nargs=2, default=tuple(DEFAULTS["shape"]),
                        help="crop shape (default: train_encoder's, the shipped encoders' 96 96)")
    parser.add_argument("--features", type=_positive_int, default=DEFAULTS["features"])
    parser.add_argument("--channels", type=_positive_int, default=DEFAULTS["channels"])
    parser.add_argument("--max-offset", type=int, default=DEFAULTS["max_offset"])
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=DEFAULTS["architecture"])
    parser.add_argument("--inversion-invariant", action="store_true", help="CIFLEncoder inversion_invariant")
    parser.add_argument("--rounds", type=_positive_int, default=5, help="alternating rounds of step and matmul timing")
    parser.add_argument("--jit-compile", action="store_true", help="compile the step with XLA")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS["precision"],
                        help="the encoder's Keras dtype policy (train_encoder's precision)")
    parser.add_argument("--no-bias", action="store_true", help="convolutions without bias (CIFLEncoder use_bias)")
    args = parser.parse_args()
    shape, offset = tuple(args.shape), args.max_offset
    try:
        check_max_offset(offset, shape)  # train_encoder's own check: the two views must overlap
    except ValueError as error:
        parser.error(f"--max-offset: {error}")

    big = tuple(s + offset for s in shape)
    views = offset_views(cifl_tf.synth.contrast_pairs(big, args.batch_size, seed=0), shape, offset)
    stream = iter(views)
    synth_s, synth_cpu = seconds_per_call(lambda: next(stream), args.steps)

    encoder = cifl_tf.CIFLEncoder(channels=args.channels, features=args.features, ndim=len(shape),
                                  architecture=args.architecture, inversion_invariant=args.inversion_invariant,
                                  use_bias=not args.no_bias, dtype=args.precision)
    encoder.build((1, *shape, 1))  # its kernels, which conv_flops counts
    model = SiameseCIFL(encoder)
    model.compile(optimizer=adam(1e-3, args.precision), jit_compile=args.jit_compile)
    fixed = tf.data.Dataset.from_tensors(next(stream)).repeat()
    flops = 3 * 2 * args.batch_size * conv_flops(encoder, shape)
    references = {"matmul": matmul()}
    compute_dtype = tf.dtypes.as_dtype(encoder.compute_dtype)
    if compute_dtype != tf.float32:
        references["matmul16"] = matmul(dtype=compute_dtype)
    steps = max(1, args.steps // args.rounds)
    times = fit_rounds(model, fixed, args.rounds, steps, {name: function for name, (function, _) in references.items()},
                       repeats=steps)
    step_s = np.median(times["step"][0])
    live_s, live_cpu = np.median(fit_rounds(model, views, args.rounds, steps)["step"], axis=1)

    works = {"step": flops, **{name: work for name, (_, work) in references.items()}}
    rate = {name: work / times[name] / 1e9 for name, work in works.items()}
    ratio = rate["step"] / rate["matmul"]  # per round, wall and CPU
    print(f"CPU: {describe()}")
    print(f"TF {tf.__version__}, TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}, "
          f"threads: intra {tf.config.threading.get_intra_op_parallelism_threads() or 'all'}, "
          f"inter {tf.config.threading.get_inter_op_parallelism_threads() or 'all'}, XLA {args.jit_compile}, "
          f"precision {args.precision}")
    print(f"shape {shape}, batch {args.batch_size} pairs, features {args.features}, C {args.channels}, "
          f"architecture {args.architecture}, inversion invariant {args.inversion_invariant}, "
          f"max_offset {offset}, biases {not args.no_bias}")
    print(f"train step (fixed data):     {step_s:.3f} s  -> {np.median(rate['step'][0]):.1f} GFLOP/s "
          f"({flops / 1e9:.1f} GFLOP per step)")
    print(f"tf.matmul 2048^2 float32:    {np.median(rate['matmul'][0]):.1f} GFLOP/s in the same rounds")
    print(f"step/matmul ratio, wall:     {spread(ratio[0])}")
    print(f"step/matmul ratio, CPU time: {spread(ratio[1])}")
    if "matmul16" in rate:
        ratio16 = rate["step"] / rate["matmul16"]
        print(f"tf.matmul 2048^2 {compute_dtype.name}:   {np.median(rate['matmul16'][0]):.1f} GFLOP/s "
              f"in the same rounds")
        print(f"step/{compute_dtype.name} matmul, wall:  {spread(ratio16[0])}")
    print(f"synthesis alone:             {synth_s:.3f} s per batch (pipeline throughput), {synth_cpu:.3f} CPU s")
    print(f"train step (live stream):    {live_s:.3f} s  -> synthesis {max(live_s - step_s, 0) / live_s:.0%} "
          f"of a step by wall time, {synth_cpu / live_cpu:.1%} of its CPU time")


if __name__ == "__main__":
    main()
