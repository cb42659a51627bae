"""The demo's segmentation row over several model seeds, for the shipped encoders and one of your own.

A single run of `cifl demo` trains each UNet from one seed; how much its Dice moves with that seed alone is
what a difference between two encoders has to exceed before it says anything (cifl_tf.demo.segmentation_seeds).

    python experiments/downstream.py                          # seeds 0-4, the demo's methods
    python experiments/downstream.py --encoder runs/enc --seeds 0,1,2 --epochs 50 --out results
    python experiments/downstream.py --train-contrast pd --seeds 0,1,2   # PD-like's in-contrast reference
"""
import os
import sys

from cifl_tf import machine
from cifl_tf.demo import seeds_main

if __name__ == "__main__":
    # With oneDNN on where TensorFlow leaves it off, as `cifl demo` runs, so that the rows compare with the demo's.
    machine.relaunch_with_onednn(os.path.basename(sys.argv[0]), sys.argv)
    seeds_main()
