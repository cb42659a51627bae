"""Table 1, row 3: registration of IXI T1 to T2 slices by VxmDense trained on T1 pairs.

    python experiments/reg_ixi_t1_t2.py                     # demo data: T1 to the T2-like render
    python experiments/reg_ixi_t1_t2.py --data IXI_2D_DIR   # <subject>/{t1,t2,labels}.nii.gz 2D slices
    python experiments/reg_ixi_t1_t2.py --quick             # smoke run

Writes results/reg_ixi_t1_t2.md (the row beside the paper's), .json and .csv (per-image Dice).
"""
from cifl_tf.experiments import main

if __name__ == "__main__":
    main(["reg_ixi_t1_t2"])
