"""`cifl demo`: CIFL against the intensity baseline on demo brains, offline, in minutes on a CPU.

It trains a UNet and a VxmDense per method on T1 slices of the MNI-based demo dataset (``demo_data``): on raw
intensities (the baseline), on the MIND descriptor, on the paper's encoder (tau_gamma=0.1) and on the
recommended encoder (``pretrained()``, or one of your own: ``run_demo(encoder=...)``); it scores them on T1
and on the contrasts they never saw (inverted T1, T2-like, PD-like), prints the tables and writes results and
figures.
"""
import os
import pathlib
import time

import numpy as np

from . import demo_data, experiments, figures, machine
from .checkpoint import SETTINGS_FILE
from .data import write_atomically, write_json
from .encoder import PRETRAINED_RECOMMENDED, pretrained, pretrained_info, pretrained_log
from .evaluate import segment
from .models import warp, warp_labels
from .training import SEED, read_settings

PAPER_CIFL, CIFL = "CIFL (paper, tau_gamma=0.1)", "CIFL"


def methods(encoder=None):
    """The compared methods, {name: frozen encoder or None}: the baseline, MIND, the paper's architecture
    (`pretrained(0.1)`) and CIFL: `encoder`, by default the recommended shipped one (`pretrained()`)."""
    return {**experiments.methods(tau_gammas=()), PAPER_CIFL: pretrained(tau_gamma=0.1),
            CIFL: pretrained() if encoder is None else encoder}


def training_logs(encoder=None, encoder_log=None):
    """{legend: CSV training log} of the compared encoders that have one, for encoder_training.png. Each legend
    names the loss its log holds: the recipes differ in it (the recommended one adds the pixel InfoNCE term)."""
    shipped = pretrained_info()
    logs = {PAPER_CIFL: (pretrained_log(0.1), shipped["0.1"]["settings"])}
    if encoder is None:
        logs[CIFL] = (pretrained_log(), shipped[PRETRAINED_RECOMMENDED[2]]["settings"])
    elif encoder_log is not None:
        run = os.path.dirname(encoder_log)  # a train-encoder run keeps its settings beside its log
        logs[CIFL] = (encoder_log, read_settings(run) if os.path.isfile(os.path.join(run, SETTINGS_FILE)) else None)
    return {f"{name}, {_logged_loss(settings)}": log for name, (log, settings) in logs.items()}


def _logged_loss(settings):
    """What a train_encoder run with these settings logged as its loss (None: settings unknown)."""
    if settings is None:
        return "its loss"
    pixel, scales = settings.get("pixel_contrast") or 0, list(settings.get("loss_scales") or [1])
    return ("Eq. 1" + (f" averaged over scales {','.join(map(str, scales))}" if scales != [1] else "")
            + (f" + {pixel:g} x pixel InfoNCE" if pixel else ""))


def _task_table(title, results, tests):
    width = max(map(len, results)) + 2
    lines = [title, " " * width + "".join(f"{t:>16}" for t in tests)]
    for name, scores in results.items():
        lines.append(f"{name:<{width}}" + "".join(f"{experiments.dice_cell(scores[t]):>16}" for t in tests))
    return "\n".join(lines)


def _check_ndim(encoder, ndim, what):
    """ValueError unless `encoder` is None or describes ndim-D images; `what` names the caller (and the file)."""
    if encoder is not None and getattr(encoder, "ndim", None) != ndim:
        raise ValueError(f"{what} needs a {ndim}D encoder, got a {getattr(encoder, 'ndim', None)}D "
                         f"{type(encoder).__name__}")


def _sizes(quick):
    return experiments.SIZES["quick" if quick else "demo"]


def _demo_subjects(quick, seed):
    """The demo's sizes, its dataset drawn from `seed`, and the indices of its training and test halves."""
    sizes = _sizes(quick)
    n_subjects = sizes["subjects"]
    data = demo_data.demo_dataset(n_subjects=n_subjects, seed=seed)
    return sizes, data, np.arange(n_subjects // 2), np.arange(n_subjects // 2, n_subjects)


def _segmentation_row(data, train, test, compared, epochs, seed, verbose, train_contrast="t1"):
    """UNets trained `epochs` on `train_contrast` of `train` from `seed`, scored on every contrast of `test`."""
    return experiments.segmentation_row(
        (data.inputs(train_contrast)[train], data.labels[train]),
        {c: (data.inputs(c)[test], data.labels[test]) for c in demo_data.CONTRASTS},
        nb_labels=len(demo_data.LABEL_NAMES), methods=compared, epochs=epochs, seed=seed, verbose=verbose)


def segmentation_seeds(seeds, encoder=None, quick=False, epochs=None, data_seed=0, verbose=0, train_contrast="t1"):
    """The demo's segmentation row trained from each model seed of `seeds` (the UNets' initialisation and batch
    order) on the same subjects, drawn from `data_seed`: how much of a difference between two encoders' Dice
    the model seed alone makes. `epochs` (default: the demo's) sets how long each UNet trains.

    `train_contrast` (one of ``demo_data.CONTRASTS``) is what the UNets train on, T1 in the demo; trained on
    the contrast they are tested on, they give that contrast's in-contrast reference: what a model of
    that contrast's own images reaches, against which a gap left by training on T1 is measured.

    Returns: {method: {contrast: (len(seeds),) each seed's mean test Dice}}, methods as in `methods(encoder)`.
    """
    if not isinstance(seeds, (list, tuple, np.ndarray)) or len(seeds) == 0 or not all(map(SEED[0], seeds)):
        raise ValueError(f"seeds must be one or more integers in [0, 2**32), got {seeds!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if train_contrast not in demo_data.CONTRASTS:
        raise ValueError(f"train_contrast must be one of {', '.join(demo_data.CONTRASTS)}, got {train_contrast!r}")
    _check_ndim(encoder, 2, "the 2D demo")
    _, data, train, test = _demo_subjects(quick, data_seed)
    epochs = _sizes(quick)["seg_epochs"] if epochs is None else epochs
    compared = methods(encoder)
    spread = {name: {c: [] for c in demo_data.CONTRASTS} for name in compared}
    for seed in seeds:
        results, _ = _segmentation_row(data, train, test, compared, epochs, int(seed), verbose, train_contrast)
        for name, tests in results.items():
            for contrast, scores in tests.items():
                spread[name][contrast].append(scores.summary()["dice"][0])
    return {name: {c: np.array(v) for c, v in tests.items()} for name, tests in spread.items()}


def seeds_table(spread, seeds, train_contrast="t1"):
    """Markdown table of `segmentation_seeds`: mean ± SD over the seeds, and the lowest Dice of any seed."""
    lines = [f"Segmentation Dice (trained on {demo_data.CONTRAST_NAMES[train_contrast]}), mean ± SD over model seeds "
             f"{', '.join(map(str, seeds))} [lowest over the seeds]", "",
             "| method | " + " | ".join(demo_data.CONTRAST_NAMES[c] for c in demo_data.CONTRASTS) + " |",
             "|---" * (len(demo_data.CONTRASTS) + 1) + "|"]
    for name, tests in spread.items():
        lines.append(f"| {name} | " + " | ".join(f"{v.mean():.3f} ± {v.std():.3f} [{v.min():.3f}]"
                                                 for v in tests.values()) + " |")
    return "\n".join(lines)


def seeds_main(argv=None):
    """Command line of experiments/downstream.py: `segmentation_seeds`, printed and written as
    downstream_seeds.md and downstream_seeds.json."""
    from .cli import _check_options, _OneLineParser, _output_folder
    from .encoder import load_encoder
    from .training import POSITIVE_INTEGER

    parser = _OneLineParser(description="The demo's segmentation row over several model seeds, for the "
                                        "shipped encoders and one of your own")
    parser.add_argument("--encoder", default=None, help="a train-encoder run folder or weights file for the CIFL "
                                                        "column (default: the recommended shipped encoder)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="model seeds, e.g. 0,1,2 (default 0,1,2,3,4)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of each UNet (default: the demo's, 25, or 1 with --quick)")
    parser.add_argument("--train-contrast", default="t1", choices=demo_data.CONTRASTS,
                        help="the contrast the UNets train on (default t1, as in the demo); the column of the same "
                             "contrast is then its in-contrast reference")
    parser.add_argument("--out", default="results", help="folder for downstream_seeds.md and .json")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data and single epochs")
    args = parser.parse_args(argv)
    try:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds must be integers separated by commas, got {args.seeds!r}") from None
        if not all(map(SEED[0], seeds)):  # checked here too, so that the error names the option
            raise ValueError(f"--seeds must each be {SEED[1]}, got {args.seeds!r}")
        _check_options(args, {"epochs": POSITIVE_INTEGER})
        _output_folder(args.out)
        encoder = None if args.encoder is None else load_encoder(args.encoder)
        _check_ndim(encoder, 2, f"--encoder {args.encoder}: the demo's segmentation row")
        epochs = _sizes(args.quick)["seg_epochs"] if args.epochs is None else args.epochs
        spread = segmentation_seeds(seeds, encoder=encoder, quick=args.quick, epochs=epochs, verbose=1,
                                    train_contrast=args.train_contrast)
    except (ValueError, OSError, ImportError) as error:  # bad arguments, a missing encoder, no nilearn: one line
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    table = seeds_table(spread, seeds, args.train_contrast)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "downstream_seeds.md"), "w") as f:
        f.write(table + "\n")
    write_json(os.path.join(args.out, "downstream_seeds.json"),
               {"seeds": seeds, "encoder": args.encoder, "epochs": epochs, "quick": args.quick, "data_seed": 0,
                "train_contrast": args.train_contrast,
                "dice": {name: {c: v.tolist() for c, v in tests.items()} for name, tests in spread.items()}})
    return spread


def run_demo(out_dir="cifl-demo", quick=False, seed=0, encoder=None, encoder_log=None, verbose=1):
    """Runs the demo; returns {"segmentation": {method: {contrast: Scores}}, "registration": ...}.

    Args:
        out_dir: folder for results.json, table.md, and the figures figure2.png, segmentations.png,
            registrations.png and encoder_training.png.
        quick: a smoke run (8 subjects, single epochs).
        seed: of the demo subjects and of the models' initialisation.
        encoder: a frozen 2D encoder for the CIFL column (such as `load_encoder(RUN)`, to measure an
            encoder of your own downstream); None: the recommended shipped one.
        encoder_log: the training log (CSV with epoch, loss) of `encoder`, drawn in encoder_training.png
            beside the paper encoder's; None leaves it out. Only with `encoder`.
    """
    _check_ndim(encoder, 2, "the 2D demo")
    if encoder_log is not None and encoder is None:
        raise ValueError(f"encoder_log {encoder_log!r} is the log of a given encoder, but no encoder was given")
    if encoder_log is not None and not os.path.isfile(encoder_log):  # else found missing after all the training
        raise ValueError(f"encoder_log {encoder_log!r}: no such file")
    if seed is None:  # the models' initialisation would fail after the data is made
        raise ValueError("the demo needs an integer seed, got None")
    logs = training_logs(encoder, encoder_log)  # a run's settings read before the training, not after it
    for log in logs.values():  # read now, not after all the training
        figures.read_training_log(log)
    from .cli import _output_folder  # the CLI's check, imported here as seeds_main does
    _output_folder(out_dir)  # an unusable folder fails now, not after the training
    start = time.time()
    sizes, data, train, test = _demo_subjects(quick, seed)
    n_subjects = len(data.labels)
    labels = data.labels
    compared = methods(encoder)

    seg, seg_models = _segmentation_row(data, train, test, compared, sizes["seg_epochs"], seed, verbose)
    reg_tests = {f"t1->{c}": experiments.cross_subject_pairs(data.inputs("t1")[test], data.inputs(c)[test],
                                                             labels[test], labels[test])
                 for c in demo_data.CONTRASTS}
    reg, reg_models = experiments.registration_row(
        data.inputs("t1")[train], reg_tests, compared, epochs=sizes["reg_epochs"], steps_per_epoch=sizes["reg_steps"],
        learning_rate=sizes["reg_learning_rate"],
        seed=seed, verbose=verbose)

    tables = [_task_table("Segmentation Dice (trained on T1)", seg, demo_data.CONTRASTS),
              _task_table("Registration Dice (trained on T1 pairs)", reg, list(reg_tests))]
    seconds = time.time() - start
    gflops = machine.matmul_gflops()  # the machine's speed in this run, to compare wall times by
    text = "\n\n".join(tables) + f"\n\n{n_subjects} demo subjects ({len(train)} train, {len(test)} test), " \
                                 f"wall time {seconds:.0f} s; tf.matmul 2048^2 float32 " \
                                 f"in this run: {gflops:.1f} GFLOP/s; {machine.describe()}"
    print("\n" + text)
    summary = {task: {name: {t: s.summary() for t, s in tests.items()} for name, tests in results.items()}
               for task, results in (("segmentation", seg), ("registration", reg))}
    write_results(out_dir, text, {"seconds": seconds, "matmul_gflops": gflops, "seed": seed, "quick": quick,
                                  "subjects": n_subjects, "shipped_encoder": encoder is None, **summary})

    _figures(out_dir, data, test, seg_models, reg_models, compared[CIFL], logs)
    print(f"results and figures written to {out_dir}/, {time.time() - start:.0f} s in all")
    return {"segmentation": seg, "registration": reg}


def write_results(out_dir, text, results):
    """Makes `out_dir` (only now: a demo that fails leaves no folder) and writes table.md (`text`) and results.json
    (`results`), each atomically."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "results.json"), results)
    write_atomically(os.path.join(out_dir, "table.md"), lambda temporary: pathlib.Path(temporary).write_text(
        "```\n" + text + "\n```\n"))


def _figures(out_dir, data, test, seg_models, reg_models, encoder, training_logs):
    """Figure 2 (the features of `encoder`), one example test subject segmented and registered by each
    method, the training curves of the compared encoders ({name: CSV log})."""
    first, second = test[0], test[1]
    figures.feature_channels(encoder, {c: data.images[c][first] for c in demo_data.CONTRASTS},
                             os.path.join(out_dir, "figure2.png"),
                             title="CIFL features of one slice in four contrasts")
    predictions = {name: {c: segment(model, data.inputs(c)[first:first + 1])[0] for c in demo_data.CONTRASTS}
                   for name, model in seg_models.items()}
    figures.segmentations({c: data.images[c][first] for c in demo_data.CONTRASTS}, data.labels[first],
                          predictions, os.path.join(out_dir, "segmentations.png"),
                          label_names=demo_data.LABEL_NAMES)
    moving, fixed = data.inputs("t1")[second:second + 1], data.inputs("t2")[first:first + 1]
    fields = {name: model.register(moving, fixed) for name, model in reg_models.items()}
    figures.registrations(moving[0, ..., 0], fixed[0, ..., 0],
                          {name: warp(moving, field)[0, ..., 0] for name, field in fields.items()},
                          os.path.join(out_dir, "registrations.png"), fixed_labels=data.labels[first],
                          title="T1 moving onto T2 fixed, trained on T1 pairs only",
                          moved_labels={name: warp_labels(data.labels[second:second + 1], field)[0]
                                        for name, field in fields.items()})
    figures.training_curves(training_logs, os.path.join(out_dir, "encoder_training.png"))
