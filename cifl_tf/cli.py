"""The `cifl` console command.

Each sub-command is a function `_name(args)` registered in `_parser()`. Errors that a user can fix
(bad files, bad arguments) surface as one line on stderr and exit status 2, with no traceback.
"""
import argparse
import inspect
import json
import os
import sys

from .training import train_encoder

DEFAULTS = {name: p.default for name, p in inspect.signature(train_encoder).parameters.items()}


def _shape(text):
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 96x96 or 64x64x64, got {text!r}")
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape must be 2 or 3 positive sizes, got {text!r}")
    return shape


def _train_encoder(args):
    if args.resume:  # the run goes on with the settings it was started with
        with open(os.path.join(args.out, "settings.json")) as f:
            settings = json.load(f)
    else:
        shape = args.shape or (96,) * args.dim
        if len(shape) != args.dim:
            raise ValueError(f"--shape {'x'.join(map(str, shape))} does not have --dim {args.dim} sizes")
        settings = dict(shape=shape, steps=args.steps, batch_size=args.batch_size,
                        channels=args.channels, features=args.features, tau_alpha=args.tau_alpha,
                        tau_beta=args.tau_beta, tau_gamma=args.tau_gamma, max_offset=args.max_offset,
                        learning_rate=args.learning_rate, seed=args.seed,
                        steps_per_epoch=min(args.steps_per_epoch, args.steps))
    train_encoder(out_dir=args.out, resume=args.resume, strategy=args.strategy, **settings)
    print(f"encoder written to {os.path.join(args.out, 'encoder.weights.h5')}")


def _parser():
    parser = argparse.ArgumentParser(prog="cifl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train-encoder", help="train a CIFL encoder on synthetic shapes")
    p.add_argument("--dim", type=int, choices=(2, 3), default=2)
    p.add_argument("--shape", type=_shape, default=None, help="crop size, e.g. 96x96 (default 96^dim)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--steps-per-epoch", type=int, default=DEFAULTS["steps_per_epoch"],
                   help="steps between checkpoints")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--channels", type=int, default=DEFAULTS["channels"], help="output channels C")
    p.add_argument("--features", type=int, default=DEFAULTS["features"], help="hidden width")
    p.add_argument("--tau-alpha", type=float, default=DEFAULTS["tau_alpha"])
    p.add_argument("--tau-beta", type=float, default=DEFAULTS["tau_beta"])
    p.add_argument("--tau-gamma", type=float, default=DEFAULTS["tau_gamma"])
    p.add_argument("--max-offset", type=int, default=DEFAULTS["max_offset"],
                   help="random offset between the two views (0: voxel-aligned, the paper's ablation)")
    p.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--strategy", choices=("default", "mirrored"), default="default")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    p.set_defaults(run=_train_encoder)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        print(f"cifl {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
