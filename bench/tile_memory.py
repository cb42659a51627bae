"""Benchmark of tiled inference's memory against its budget (not a test).

For each shipped describer (the recommended 2D encoder, the 2D tau_gamma = 1 encoder, the 3D encoder, 2D and 3D
MIND) and each budget, a process of its own describes a random image (2048x2048, or 160x192x224 in 3D) with
``tiling.tiled_features(..., max_memory=BUDGET)``, after describing two small images so that the layer is traced
and loaded. It prints the tile that the budget gave, the estimate (tiling.bytes_per_pixel times the extended tile's
pixels), the growth of the process's peak resident memory during the call (Linux's VmHWM, reset before it; the
image and the output array are allocated before), that growth against the budget, and the seconds of the call.

    python bench/tile_memory.py [--describers NAME,...] [--budgets MIB,...]
"""
import math
import subprocess
import sys
import time

import numpy as np

DESCRIBERS = ("recommended_2d", "tau_gamma_1_2d", "shipped_3d", "mind_2d", "mind_3d")
SHAPES = {2: (2048, 2048), 3: (160, 192, 224)}


def describer(name):
    import cifl_tf
    return {"recommended_2d": lambda: cifl_tf.pretrained(), "tau_gamma_1_2d": lambda: cifl_tf.pretrained(1.0),
            "shipped_3d": lambda: cifl_tf.pretrained(ndim=3), "mind_2d": lambda: cifl_tf.descriptors.MIND(ndim=2),
            "mind_3d": lambda: cifl_tf.descriptors.MIND(ndim=3)}[name]()


def memory(key):
    """Bytes of /proc/self/status's `key` (VmRSS: resident now; VmHWM: its peak)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))


def measure(name, budget_mib):
    """One line of the table, in this process."""
    from cifl_tf import tiling
    layer = describer(name)
    shape, budget = SHAPES[layer.ndim], budget_mib * 2 ** 20
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = np.ones(shape + (layer.channels,), np.float32)  # resident before the call
    for side in (24, 28):  # traced (reduce_retracing) and loaded on small images
        tiling.tiled_features(layer, image[(slice(0, side),) * layer.ndim])
    radius = tiling.receptive_radius(layer)
    core = tiling.tile_shape(shape, radius, tiling.bytes_per_pixel(layer), budget)
    extended = math.prod(min(c + 2 * radius, n) for c, n in zip(core, shape))
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    before, start = memory("VmRSS"), time.perf_counter()
    tiling.tiled_features(layer, image, budget, out)
    seconds, grown = time.perf_counter() - start, memory("VmHWM") - before
    tile = "whole image" if core == shape else "x".join(map(str, core))
    print(f"{name:15s} {budget_mib:7d} {tile:>13s} {tiling.bytes_per_pixel(layer) * extended / 2 ** 20:11.0f} "
          f"{grown / 2 ** 20:9.0f} {grown / budget:7.2f} {seconds:8.1f}", flush=True)


def main():
    from cifl_tf.cli import _OneLineParser
    from cifl_tf.machine import describe, matmul_gflops
    parser = _OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--describers", default=",".join(DESCRIBERS),
                        help=f"comma-separated, of {', '.join(DESCRIBERS)} (default: all)")
    parser.add_argument("--budgets", default="128,512,2048", help="MiB, comma-separated (default: %(default)s)")
    args = parser.parse_args()
    names = args.describers.split(",")
    if set(names) - set(DESCRIBERS):
        parser.error(f"--describers: unknown {sorted(set(names) - set(DESCRIBERS))}; known: {', '.join(DESCRIBERS)}")
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        parser.error(f"--budgets must be whole MiB, comma-separated, got {args.budgets!r}")
    if min(budgets) < 1:
        parser.error(f"--budgets must be positive, got {args.budgets!r}")
    print(f"tiled inference's memory; {describe()}; tf.matmul 2048^2 float32 in this run: {matmul_gflops():.1f} "
          f"GFLOP/s (beside the seconds)")
    print(f"{'describer':15s} {'budget':>7s} {'core tile':>13s} {'estimate':>11s} {'measured':>9s} "
          f"{'/budget':>7s} {'seconds':>8s}  (MiB)")
    for name in names:
        for budget in budgets:  # a process each: the peak and the allocator's free lists are its own
            subprocess.run([sys.executable, __file__, "--one", name, str(budget)], check=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        measure(sys.argv[2], int(sys.argv[3]))
    else:
        main()
