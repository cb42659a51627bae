"""Contrast invariance of the encoders: the same slices in T1 and other contrasts (method page 3b).

    python experiments/invariance.py                                   # demo data
    python experiments/invariance.py --data ../shared/data/oasis-sample
    python experiments/invariance.py --offset-ablation 1000            # + encoders with/without offset
"""
from cifl_tf.experiments import invariance_main

if __name__ == "__main__":
    invariance_main()
