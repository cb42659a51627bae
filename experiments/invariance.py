"""Contrast invariance of intensities, MIND and the encoders on every pair of contrasts (cifl_tf.benchmark).

    python experiments/invariance.py                                   # demo, OASIS sample and hard pairs
    python experiments/invariance.py --data ../shared/data/oasis-sample --encoder runs/enc
    python experiments/invariance.py --offset-ablation 1000            # + encoders with/without offset
"""
from cifl_tf.benchmark import main

if __name__ == "__main__":
    main()
