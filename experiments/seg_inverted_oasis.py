"""Table 1, row 1: segmentation of inverted OASIS T1 slices by UNets trained on T1 (baseline vs CIFL).

    python experiments/seg_inverted_oasis.py                       # demo data (no download)
    python experiments/seg_inverted_oasis.py --data OASIS_2D_DIR   # the paper's data and settings
    python experiments/seg_inverted_oasis.py --quick               # smoke run

Writes results/seg_inverted_oasis.md (the row beside the paper's), .json and .csv (per-image Dice).
"""
from cifl_tf.experiments import main

if __name__ == "__main__":
    main(["seg_inverted_oasis"])
