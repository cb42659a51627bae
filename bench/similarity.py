"""Benchmark: register_pair's similarities on real slices across contrasts (not a test).

The OASIS sample's subject 1 T1 slice is registered to subject 2's slice in three contrasts: T1, inverted
T1, and a render of its seg4 labels in which cortical grey and white matter are nearly equal, as in PD
(``benchmark.near_equal_render``, the invariance benchmark's hard contrast). Each describer (the recommended shipped encoder, the paper's
tau_gamma=1 encoder, MIND, the intensities) is fitted with each similarity it takes (features: MSE and NCC;
intensities: NCC and MI). Prints a Markdown table of seg4 Dice (folded-voxel share) and the same-run
tf.matmul GFLOP/s. register_pair runs with its defaults otherwise (levels 4, 2, 1 of 100 steps).

    python bench/similarity.py
"""
import cifl_tf
from cifl_tf import benchmark, metrics
from cifl_tf.cli import _OneLineParser
from cifl_tf.descriptors import MIND
from cifl_tf.machine import describe, matmul_gflops


def main():
    parser = _OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=benchmark.oasis_sample(),
                        help="neurite-oasis folder with two subjects' slices")
    args = parser.parse_args()
    try:
        slices = benchmark.oasis_slice_pair(args.data)
    except (ValueError, OSError) as error:  # data.DataError: no such folder, no subjects, unreadable file
        parser.error(str(error))
    moving, fixed, fixed_labels = slices.images[0], slices.images[1], slices.labels[1]
    targets = benchmark.slice_contrasts(fixed, fixed_labels)
    describers = {"recommended": (cifl_tf.pretrained(), ("mse", "ncc")),
                  "tau_gamma=1": (cifl_tf.pretrained(tau_gamma=1), ("mse", "ncc")),
                  "MIND": (MIND(ndim=2), ("mse", "ncc")), "intensities": (None, ("ncc", "mi"))}
    print(f"| describer | similarity | {' | '.join(targets)} |\n|---|---|" + "---|" * len(targets))
    for name, (encoder, similarities) in describers.items():
        for similarity in similarities:
            cells = []
            for target in targets.values():
                displacement = cifl_tf.register_pair(moving, target, encoder=encoder, similarity=similarity,
                                                     verbose=0)
                dice = benchmark.registered_dice(displacement, slices.labels[0], fixed_labels)
                cells.append(f"{dice:.3f} ({100 * metrics.folding_fraction(displacement):.2f}%)")
            print(f"| {name} | {similarity} | {' | '.join(cells)} |", flush=True)
    print(f"\nseg4 Dice (folded %); unregistered {metrics.mean_dice(slices.labels[0], fixed_labels):.3f}; "
          f"tf.matmul 2048^2 float32: {matmul_gflops():.1f} GFLOP/s; {describe()}")


if __name__ == "__main__":
    main()
