"""The demo's segmentation row over several model seeds, for the shipped encoders and one of your own.

A single run of `cifl demo` trains each UNet from one seed; how much its Dice moves with that seed alone is
what a difference between two encoders has to exceed before it says anything (cifl_tf.demo.segmentation_seeds).

    python experiments/downstream.py                          # seeds 0-4, the demo's methods
    python experiments/downstream.py --encoder runs/enc --seeds 0,1,2 --epochs 50 --out results
"""
import argparse
import json
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__), description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None, help="a train-encoder run folder or weights file for the CIFL "
                                                        "column (default: the recommended shipped encoder)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="model seeds, e.g. 0,1,2 (default 0,1,2,3,4)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each UNet (default: the demo's 25)")
    parser.add_argument("--out", default="results", help="folder for downstream_seeds.md and .json")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data and single epochs")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be integers separated by commas, got {args.seeds!r}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.encoder is not None and not os.path.exists(args.encoder):
        parser.error(f"--encoder {args.encoder}: no such file or folder")

    from cifl_tf import demo
    from cifl_tf.encoder import load_encoder
    encoder = None if args.encoder is None else load_encoder(args.encoder)
    spread = demo.segmentation_seeds(seeds, encoder=encoder, quick=args.quick, epochs=args.epochs, verbose=1)
    table = demo.seeds_table(spread, seeds)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "downstream_seeds.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "downstream_seeds.json"), "w") as f:
        json.dump({"seeds": seeds, "encoder": args.encoder, "epochs": args.epochs,
                   "dice": {name: {c: v.tolist() for c, v in tests.items()} for name, tests in spread.items()}},
                  f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
