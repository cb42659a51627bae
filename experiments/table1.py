"""Paper Table 1, every row: writes results/table1.md, ours beside the paper's numbers.

    python experiments/table1.py           # demo data (no download)
    python experiments/table1.py --quick   # smoke run

It takes no --data: its rows read different folders. With real data run the row scripts, each with its folder
(OASIS rows: neurite-oasis; IXI row: IXI-style); each writes results/<row>.md, .json and .csv.
"""
from cifl_tf.experiments import ROWS, main

if __name__ == "__main__":
    main(list(ROWS))
