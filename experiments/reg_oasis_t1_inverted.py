"""Table 1, row 2: registration of OASIS T1 to inverted T1 slices by VxmDense trained on T1 pairs.

    python experiments/reg_oasis_t1_inverted.py                       # demo data (no download)
    python experiments/reg_oasis_t1_inverted.py --data OASIS_2D_DIR   # the paper's data and settings
    python experiments/reg_oasis_t1_inverted.py --quick               # smoke run

Writes results/reg_oasis_t1_inverted.md (the row beside the paper's), .json and .csv (per-image Dice).
"""
from cifl_tf.experiments import main

if __name__ == "__main__":
    main(["reg_oasis_t1_inverted"])
