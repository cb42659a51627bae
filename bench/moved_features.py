"""Benchmark: the two ways register_pair can compare features, on real and demo slices (not a test).

"warped": the moving image's features are computed once and warped in every step (the 3D default);
"encoded": the moved image is encoded again in every step, at each level's resolution (the 2D default).
Each is run with the recommended shipped encoder, with MIND and with both (``FeatureStack``), register_pair's
defaults otherwise, on
  * the OASIS sample's slices, subject 1 -> 2 and 2 -> 1, the fixed slice in T1, inverted T1 and a render of
    its seg4 labels in which cortical grey and white matter are nearly equal (``benchmark.near_equal_render``);
  * with --demo, four pairs of 2D demo subjects, T1 of one to another's T1, T2-like and PD-like render.
Prints a Markdown table of mean Dice, warped -> encoded, the seconds of each mode, and the same-run tf.matmul
GFLOP/s.

    python bench/moved_features.py [--demo] [--steps 100]
"""
import time

import numpy as np

import cifl_tf
from cifl_tf import benchmark, demo_data
from cifl_tf.cli import _OneLineParser, _positive_int
from cifl_tf.descriptors import MIND
from cifl_tf.instance import MOVED_FEATURES
from cifl_tf.machine import describe, matmul_gflops

DEMO_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7))


def oasis_cases(folder):
    """{case: [(moving, fixed, moving labels, fixed labels)]}: both directions of the sample's two slices."""
    slices = benchmark.oasis_slice_pair(folder)
    cases = {}
    for a, b in ((0, 1), (1, 0)):
        for contrast, target in benchmark.slice_contrasts(slices.images[b], slices.labels[b]).items():
            cases[f"OASIS {a + 1} -> {b + 1}, {contrast}"] = [(slices.images[a], target, slices.labels[a],
                                                                slices.labels[b])]
    return cases


def demo_cases():
    """{case: [(moving, fixed, moving labels, fixed labels)] over DEMO_PAIRS}, one case per fixed contrast."""
    subjects = demo_data.demo_dataset(n_subjects=2 * len(DEMO_PAIRS), seed=0)
    return {f"2D demo, T1 -> {contrast}": [(subjects.images["t1"][i], subjects.images[contrast][j],
                                            subjects.labels[i], subjects.labels[j]) for i, j in DEMO_PAIRS]
            for contrast in ("t1", "t2", "pd")}


def registered_dice(pairs, encoder, moved_features, steps):
    """Mean Dice of the moving labels warped onto the fixed ones over the pairs, and the seconds it took."""
    dice, start = [], time.perf_counter()
    for moving, fixed, moving_labels, fixed_labels in pairs:
        field = cifl_tf.register_pair(moving, fixed, encoder, moved_features=moved_features, steps=steps, verbose=0)
        dice.append(benchmark.registered_dice(field, moving_labels, fixed_labels))
    return float(np.mean(dice)), time.perf_counter() - start


def main():
    parser = _OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=benchmark.oasis_sample(),
                        help="neurite-oasis folder with two subjects' slices")
    parser.add_argument("--demo", action="store_true", help="also four pairs of 2D demo subjects (needs nilearn)")
    parser.add_argument("--steps", type=_positive_int, default=100, help="steps per level")
    args = parser.parse_args()
    try:
        cases = {**oasis_cases(args.data), **(demo_cases() if args.demo else {})}
    except (ValueError, OSError, ImportError) as error:  # data.DataError; the demo without nilearn
        parser.error(str(error))
    describers = {"recommended": cifl_tf.pretrained(), "MIND": MIND(ndim=2),
                  "recommended + MIND": cifl_tf.FeatureStack([cifl_tf.pretrained(), MIND(ndim=2)])}
    # One describer and mode over all cases, so that the cases reuse its compiled level models (register_pair
    # keeps 8): the first case's seconds include tracing them.
    results = {}
    for name, encoder in describers.items():
        for mode in MOVED_FEATURES:
            print(f"{name}, {mode}: {len(cases)} cases", flush=True)
            results[name, mode] = {case: registered_dice(pairs, encoder, mode, args.steps)
                                   for case, pairs in cases.items()}
    print("| case | describer | " + " | ".join(f"{mode} Dice | s" for mode in MOVED_FEATURES) + " |\n|---|---|"
          + "---|---|" * len(MOVED_FEATURES))
    for case in cases:
        for name in describers:
            print(f"| {case} | {name} | " + " | ".join("{:.3f} | {:.1f}".format(*results[name, mode][case])
                                                       for mode in MOVED_FEATURES) + " |")
    print("\n" + (f"mean Dice over {len(DEMO_PAIRS)} pairs for the demo; " if args.demo else "")
          + f"the first case's seconds include tracing; tf.matmul 2048^2 float32: {matmul_gflops():.1f} GFLOP/s; "
            f"{describe()}")


if __name__ == "__main__":
    main()
