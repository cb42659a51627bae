"""Paper Table 1 (Sec. 3), row by row: the intensity baseline against CIFL features per tau_gamma.

Every row trains one downstream network per method on T1 only, and scores it on a contrast it never
saw (and on T1, for reference). The scripts in ``experiments/`` and ``cifl demo`` are thin wrappers.

    methods = experiments.methods()         # {"baseline": None, "MIND": MIND(), "tau_gamma=1": encoder, ...}
    results, trained = experiments.segmentation_row(train, tests, nb_labels=5, methods=methods)  # and the models
    print(experiments.markdown_table({"seg_inverted_oasis": results}))
"""
import argparse
import csv
import math
import os

import numpy as np
import tensorflow as tf

from . import data
from .checks import is_integer
from .data import read_json, write_json
from .descriptors import MIND
from .checkpoint import SETTINGS_FILE, epoch_batches
from .encoder import PRETRAINED_TAU_GAMMAS, encoder_model, load_encoder, pretrained, pretrained_info
from .evaluate import evaluate_registration, evaluate_segmentation, label_overlap
from .models import SIMILARITIES, pair_batches, registration_model, segmentation_model
from .training import (NON_NEGATIVE_INTEGER, NON_NEGATIVE_NUMBER, POSITIVE_INTEGER, POSITIVE_NUMBER, SEED,
                       SETTING_DEFAULTS, as_json_holds, read_settings, train_encoder)

BASELINE = "baseline"
MIND_METHOD = "MIND"  # the hand-made modality independent descriptor, beside the learned encoders

# Table 1 of the paper: (task, dimension, data, the unseen test contrast).
ROWS = {
    "seg_inverted_oasis": ("Segmentation", "2D", "Inverted OASIS T1", "t1_inverted"),
    "reg_oasis_t1_inverted": ("Registration", "2D", "OASIS T1-Inverted T1", "t1_inverted"),
    "reg_ixi_t1_t2": ("Registration", "2D", "IXI T1-T2", "t2"),
}


def method_name(tau_gamma):
    return f"tau_gamma={tau_gamma:g}"


_PAPER_COLUMNS = (BASELINE, *map(method_name, PRETRAINED_TAU_GAMMAS))
PAPER_DICE = {
    "seg_inverted_oasis": dict(zip(_PAPER_COLUMNS, ("0.18 ± 0.01", "0.84 ± 0.04", "0.83 ± 0.04", "0.79 ± 0.04"))),
    "reg_oasis_t1_inverted": dict(zip(_PAPER_COLUMNS, ("0.45 ± 0.02", "0.69 ± 0.05", "0.69 ± 0.05", "0.66 ± 0.06"))),
    "reg_ixi_t1_t2": dict(zip(_PAPER_COLUMNS, ("0.36 ± 0.03", "0.59 ± 0.13", "0.59 ± 0.12", "0.61 ± 0.13"))),
}


def methods(tau_gammas=PRETRAINED_TAU_GAMMAS, train_steps=None, out_dir=None, verbose=1):
    """The compared feature extractors: {"baseline": None, "MIND": descriptors.MIND(), "tau_gamma=T": frozen
    CIFLEncoder, ...}.

    With train_steps None the shipped encoders (`pretrained`); otherwise encoders trained here for that
    many steps with the settings the shipped ones were made with (`pretrained_info`), into
    out_dir/encoder_tau_gamma=T when out_dir is given. Their epochs (checkpoints and log rows) are the
    recipe's when its steps_per_epoch divides train_steps, else one epoch of train_steps.
    """
    encoders = {BASELINE: None, MIND_METHOD: MIND()}
    recipes = pretrained_info()
    for tau in tau_gammas:
        if train_steps is None:
            encoders[method_name(tau)] = pretrained(tau)
            continue
        recipe = recipes[f"{tau:g}"]["settings"]
        # train_encoder trains whole epochs; their length changes no batch (each is drawn from its step alone)
        per_epoch = recipe["steps_per_epoch"] if train_steps % recipe["steps_per_epoch"] == 0 else train_steps
        settings = {**recipe, "steps": train_steps, "steps_per_epoch": per_epoch, "tau_gamma": tau}
        run = None if out_dir is None else os.path.join(out_dir, f"encoder_{method_name(tau)}")
        encoder = _trained_encoder(run, settings, f"the encoder {method_name(tau)}", verbose)
        encoder.trainable = False
        encoders[method_name(tau)] = encoder
    return encoders


def _trained_encoder(run, settings, name, verbose):
    """train_encoder(**settings) into `run`; where `run` holds a finished run of those settings (an earlier row's
    script with the same --out), its encoder, and an unfinished one is resumed."""
    if run is not None and os.path.exists(os.path.join(run, "result.json")):
        saved, wanted = read_settings(run), {**SETTING_DEFAULTS, **as_json_holds(settings)}
        differ = sorted(key for key in {*saved, *wanted} if saved.get(key) != wanted.get(key))
        if differ:
            raise ValueError(f"{run}: holds {name} trained with other {', '.join(differ)}; choose another --out")
        _announce(f"{name}: trained before, read from {run}", verbose)
        return load_encoder(run)
    _announce(f"training {name} for {settings['steps']} steps", verbose)
    resume = run is not None and os.path.exists(os.path.join(run, SETTINGS_FILE))
    return train_encoder(out_dir=run, resume=resume, verbose=verbose, **settings)


def segmentation_row(train, tests, nb_labels, methods, epochs=30, batch_size=8, seed=0, verbose=1,
                     **unet_kwargs):
    """Trains ``segmentation_model`` per method on `train` and scores it on each test contrast.

    The frozen encoder encodes the training images once; the model's ``head`` trains on those features.

    Args:
        train: (images (N, H, W[, 1]) in [0, 1], labels (N, H, W) int) of the training contrast.
        tests: {contrast: (images, labels)} of the test subjects.
        nb_labels: labels, background included.
        methods: {name: encoder or None}, see `methods`.

    Returns: ({name: {contrast: Scores}}, {name: trained model}).
    """
    images, labels = _channel_last(train[0]), np.asarray(train[1])
    onehot = tf.keras.utils.to_categorical(labels, nb_labels)
    results, trained = {}, {}
    for name, encoder in methods.items():
        _announce(f"segmentation, {name}", verbose)
        features = _encoded(encoder, images)  # before seeding: an encoder built here draws no model seed's numbers
        tf.keras.utils.set_random_seed(seed)
        model = segmentation_model(images.shape[1:-1], nb_labels, encoder, **unet_kwargs)
        model.head().fit(epoch_batches((features, onehot), batch_size, seed), epochs=epochs,
                         steps_per_epoch=math.ceil(len(features) / batch_size), verbose=verbose)
        results[name] = {contrast: evaluate_segmentation(model, _channel_last(x), y)
                         for contrast, (x, y) in tests.items()}
        trained[name] = model
    return results, trained


def registration_row(train_images, tests, methods, epochs=10, steps_per_epoch=100, batch_size=4, seed=0,
                     verbose=1, **vxm_kwargs):
    """Trains ``registration_model`` per method on T1 pairs and scores each test pairing.

    The frozen encoder encodes the training images once; the model's ``head`` trains on pairs of those features.

    Args:
        train_images: (N, H, W[, 1]) T1 images in [0, 1]; random pairs of them train the model.
        tests: {name: (moving, fixed, moving_labels, fixed_labels)}: image n of `moving` is
            registered to image n of `fixed`, in whatever contrasts they are.
        methods: {name: encoder or None}, see `methods`.

    Returns: ({name: {test name: Scores}}, {name: trained model}).
    """
    images = _channel_last(train_images)
    results, trained = {}, {}
    for name, encoder in methods.items():
        _announce(f"registration, {name}", verbose)
        features = _encoded(encoder, images)  # before seeding, as in segmentation_row
        tf.keras.utils.set_random_seed(seed)
        model = registration_model(images.shape[1:-1], encoder, **vxm_kwargs)
        model.head().fit(pair_batches(features, batch_size, seed), epochs=epochs, steps_per_epoch=steps_per_epoch,
                         verbose=verbose)
        results[name] = {test: evaluate_registration(model, *(_channel_last(a) for a in pairs[:2]), *pairs[2:])
                         for test, pairs in tests.items()}
        trained[name] = model
    return results, trained


def cross_subject_pairs(moving, fixed, moving_labels, fixed_labels):
    """Test pairs of different subjects: moving image n onto fixed image n + 1 (cyclically)."""
    return moving, _next_subject(fixed), moving_labels, _next_subject(fixed_labels)


def _next_subject(stack):
    return np.roll(stack, -1, axis=0)


# Sizes of a run: subjects of demo data, segmentation epochs, registration epochs x steps and learning rate,
# encoder steps with --train-encoders. "paper" applies to a data folder, "demo" without one (`cifl demo`'s
# budget: 6 minutes on 2 CPU cores), "quick" is a smoke run.
SIZES = {
    "paper": dict(subjects=None, seg_epochs=50, reg_epochs=20, reg_steps=100, reg_learning_rate=1e-4,
                  encoder_steps=3000),
    "demo": dict(subjects=40, seg_epochs=25, reg_epochs=3, reg_steps=50, reg_learning_rate=1e-3,
                 encoder_steps=3000),
    "quick": dict(subjects=8, seg_epochs=1, reg_epochs=1, reg_steps=4, reg_learning_rate=1e-3, encoder_steps=20),
}


def row_data(row, data_dir=None, split=None, seed=0, subjects=SIZES["demo"]["subjects"]):
    """The training and test data of a Table 1 row, as `segmentation_row` / `registration_row` take them.

    Args:
        row: a key of ROWS.
        data_dir: None for the demo data (`demo_data`, half the subjects train, half test); a neurite-oasis
            folder for the OASIS rows (2D mid-coronal slices; the unseen contrast is ``data.invert``); an
            IXI-style folder of 2D ``t1``/``t2`` slices and labels for the IXI row.
        split: train, validation, test subject counts or fractions (default: the paper's 232/58/100,
            ``data.PAPER_SPLIT``), or "all" to train and test on every subject (only to smoke-test tiny
            samples: the scores are then not held out). Demo data has its own half/half split: giving
            a split without data_dir is an error.
        seed: seed of the split and of the demo subjects.
        subjects: the number of demo subjects.

    Returns: (train, tests, names). Segmentation: train (T1 images, labels), tests {contrast: (images, labels)};
    registration: train T1 images, tests {fixed contrast: (moving, fixed, moving labels, fixed labels)}
    with T1 moving images of one subject onto fixed images of another (`cross_subject_pairs`).
    Both score T1 and the row's unseen contrast. `names`: each test image's subject ("moving -> fixed" for a
    pair), the same in every test, for `save_row`.
    """
    if row not in ROWS:
        raise ValueError(f"row must be one of {sorted(ROWS)}, got {row!r}")
    task, _, _, unseen = ROWS[row]
    if data_dir is None and split is not None:
        raise ValueError(f"split {split!r} needs a data folder: the demo data is always split half/half")
    if data_dir is None:
        least = 2 if task == "Segmentation" else 4  # registration pairs two training and two test subjects
        if not is_integer(subjects, least):
            raise ValueError(f"subjects must be an integer >= {least} for the {task.lower()} row {row} (half train, "
                             f"half test), got {subjects!r}")
        from . import demo_data  # needs nilearn: imported only for demo data
        demo = demo_data.demo_dataset(n_subjects=subjects, seed=seed)
        train, test = np.arange(subjects // 2), np.arange(subjects // 2, subjects)
        names = [demo.subjects[i] for i in test]
        train = (demo.images["t1"][train], demo.labels[train])
        tests = {c: (demo.images[c][test], demo.labels[test]) for c in ("t1", unseen)}
    else:
        train, tests, names = _folder_row_data(row, data_dir, split, seed)
    names = [str(name) for name in names]
    if task == "Segmentation":
        return train, tests, names
    moving = tests["t1"]
    pairs = [f"{name} -> {onto}" for name, onto in zip(names, _next_subject(names))]
    return train[0], {c: cross_subject_pairs(moving[0], fixed[0], moving[1], fixed[1])
                      for c, fixed in tests.items()}, pairs


# The data folders of the rows: see row_data.
FOLDERS = {"neurite-oasis": "neurite-oasis (2D slices)", "IXI-style": "IXI-style (2D t1/t2 slices and labels)"}


def folder_kind(row):
    """The key of FOLDERS that a row's data folder must be."""
    return "IXI-style" if ROWS[row][3] == "t2" else "neurite-oasis"


def _folder_row_data(row, data_dir, split, seed):
    unseen = ROWS[row][3]
    if folder_kind(row) == "IXI-style":
        contrasts = data.load_ixi(data_dir, contrasts=("t1", "t2"), dim=2)
    else:
        t1 = data.load_oasis(data_dir, dim=2)
        contrasts = {"t1": t1, unseen: t1.map_images(data.invert)}
    if not np.any(contrasts["t1"].labels):  # else every Dice is NaN, and the table says so only as nan ± nan
        raise ValueError(f"{data_dir}: every label map is background (0) only: there is nothing to score")
    parts = {c: _train_test(dataset, split, seed, data_dir) for c, dataset in contrasts.items()}
    train = parts["t1"][0]
    for part, name in ((1, "test"), (0, "training")):
        if row.startswith("reg") and len(parts["t1"][part]) < 2:  # checked before any encoder trains
            raise ValueError(f"{data_dir}: registration needs at least 2 {name} subjects to pair, the split {split} "
                             f"leaves {len(parts['t1'][part])}")
    return ((train.images, train.labels), {c: (test.images, test.labels) for c, (_, test) in parts.items()},
            parts["t1"][1].subjects)


def _train_test(dataset, split, seed, folder):
    if split == "all":
        return dataset, dataset
    if split is None and len(dataset) < sum(data.PAPER_SPLIT):
        raise ValueError(f"the paper's subject split {data.PAPER_SPLIT} needs {sum(data.PAPER_SPLIT)} subjects, the "
                         f"data hold {len(dataset)}: give a split (--split), such as fractions 0.6,0.15,0.25, or "
                         f"'all' for a tiny sample")
    data.check_split_counts(split, dataset, folder)
    train, _, test = dataset.split(data.PAPER_SPLIT if split is None else split, seed)
    if not len(train) or not len(test):
        raise ValueError(f"the subject split {split} of {len(dataset)} subjects leaves {len(train)} for "
                         f"training and {len(test)} for testing; give --split all (split='all') for a tiny sample")
    return train, test


def run_row(row, methods, inputs, size="demo", seed=0, epochs=None, verbose=1):
    """Trains and scores every method on a row's data (`row_data`'s (train, tests, names)); returns ({method:
    {contrast: Scores}}, {method: model}). `epochs` overrides the size's epochs of the row's task."""
    sizes = SIZES[size]
    train, tests, _ = inputs
    if ROWS[row][0] == "Segmentation":
        # labels of the test maps too: one absent from the training maps would not be scored
        nb_labels = 1 + int(max(np.max(labels) for _, labels in [train, *tests.values()]))
        return segmentation_row(train, tests, nb_labels=nb_labels, methods=methods,
                                epochs=sizes["seg_epochs"] if epochs is None else epochs, seed=seed, verbose=verbose)
    return registration_row(train, tests, methods, epochs=sizes["reg_epochs"] if epochs is None else epochs,
                            steps_per_epoch=sizes["reg_steps"], seed=seed, verbose=verbose,
                            learning_rate=sizes["reg_learning_rate"])


def save_row(out_dir, row, results, names, settings=None):
    """Writes out_dir/row.json (mean ± std and per-image Dice, the images' `names` (row_data's: their subjects),
    and `settings`, {name: value}: what the row was run on and with) and out_dir/row.csv (one line per image and
    its subjects, for paired comparisons of the methods)."""
    for name, tests in results.items():
        for test, scores in tests.items():
            if len(scores.mean_dice) != len(names):
                raise ValueError(f"save_row: {len(names)} names for the {len(scores.mean_dice)} images of "
                                 f"{name} on {test}")
    os.makedirs(out_dir, exist_ok=True)
    summary = {name: {test: {**scores.summary(), "per_image_dice": scores.mean_dice.tolist()}
                      for test, scores in tests.items()} for name, tests in results.items()}
    write_json(os.path.join(out_dir, f"{row}.json"),
               {"row": row, "settings": settings or {}, "images": list(names), "results": summary})
    with open(os.path.join(out_dir, f"{row}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "test", "image", "subjects", "dice"])
        for name, tests in results.items():
            for test, scores in tests.items():
                writer.writerows([name, test, i, names[i], f"{d:.4f}"] for i, d in enumerate(scores.mean_dice))


def dice_cell(scores):
    """Mean ± std of the per-image mean Dice, e.g. "0.84 ± 0.04"."""
    mean, std = scores.summary()["dice"]
    return f"{mean:.2f} ± {std:.2f}"


def row_text(row, results, test=None):
    """One line: the row's Dice on its unseen contrast (or `test`) for each method, mean ± std."""
    test = test or ROWS[row][3]
    return f"{ROWS[row][2]} ({test}): " + ", ".join(f"{name} {dice_cell(tests[test])}"
                                                    for name, tests in results.items())


def markdown_table(rows, note=""):
    """Table 1 in the paper's layout, ours above the paper's numbers, for {row: results}."""
    names = list(next(iter(rows.values())))
    lines = ["| Task | Dimension | Dataset | " + " | ".join(names) + " |",
             "|---" * (3 + len(names)) + "|"]
    for row, results in rows.items():
        task, dim, dataset, test = ROWS[row]
        lines.append(f"| {task} | {dim} | {dataset}{note} | "
                     + " | ".join(dice_cell(results[name][test]) for name in names) + " |")
        lines.append("| | | *paper* | " + " | ".join(f"*{PAPER_DICE[row][name]}*" if name in PAPER_DICE[row] else ""
                                                     for name in names) + " |")
    return "\n".join(lines)


# ---- the experiments/ scripts: one row, all rows ----

def main(rows, argv=None):
    """Command line of the experiments/ scripts: runs `rows` and writes each row's JSON and CSV, and their Markdown
    table: table1.md for every row (experiments/table1.py), <row>.md for one row (its own script)."""
    read_by = {}  # {folder kind: the rows that read one}
    for row in rows:
        read_by.setdefault(folder_kind(row), []).append(row)
    folders = ", ".join(FOLDERS[kind] for kind in read_by)
    from .cli import _OneLineParser  # one-line errors, as the CLI gives

    parser = _OneLineParser(description=f"Paper Table 1: {', '.join(rows)}")
    parser.add_argument("--data", default=None, help=(
        f"data folder with the paper's data: {folders} (default: the demo data)" if len(read_by) == 1 else
        f"not taken here: these rows read different folders ({folders}); with real data run each row's script "
        f"with its folder, experiments/ROW.py --data DIR, which writes ROW.md (default: the demo data)"))
    parser.set_defaults(split=None)
    if len(read_by) == 1:  # a split needs --data, which rows of several folders do not take
        parser.add_argument("--split", type=_split_arg,
                            help="train,val,test subject counts or fractions of --data's subjects (default "
                                 "232,58,100), or 'all'")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data and single epochs")
    parser.add_argument("--train-encoders", action="store_true",
                        help="train the encoders here (with the shipped encoders' settings) instead of "
                             "using the shipped ones")
    parser.add_argument("--encoder-steps", type=int, default=None,
                        help=f"steps of --train-encoders, a positive integer (default: "
                             f"{SIZES['paper']['encoder_steps']}, {SIZES['quick']['encoder_steps']} with --quick); "
                             f"each encoder checkpointed every steps_per_epoch of its shipped recipe when that "
                             f"divides the steps, else at the end only")
    parser.add_argument("--epochs", type=int, default=None, help="override the downstream training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "demo" if args.data is None else "paper"
    source = "demo data" if args.data is None else os.path.abspath(args.data)
    steps = None if not args.train_encoders else (
        SIZES[size]["encoder_steps"] if args.encoder_steps is None else args.encoder_steps)
    table = {}
    try:
        from .cli import _check_options, _output_folder  # the CLI's checks, imported here as the demo does

        _output_folder(args.out)  # before hours of training, not after them
        _check_options(args, {**dict.fromkeys(("epochs", "encoder_steps"), POSITIVE_INTEGER),
                              "seed": SEED})
        if args.encoder_steps is not None and not args.train_encoders:  # else the shipped encoders run unsaid
            raise ValueError(f"--encoder-steps {args.encoder_steps} is an option of --train-encoders, which was "
                             f"not given")
        if args.data is not None and len(read_by) > 1:  # else the rows of one kind fail after the others trained
            which = "; ".join(f"{FOLDERS[kind]}: {', '.join(kind_rows)}" for kind, kind_rows in read_by.items())
            raise ValueError(f"--data {args.data}: one folder for rows that read different ones ({which}); run "
                             f"each row's script with its folder (experiments/ROW.py --data DIR)")
        settings = dict(data=source, size=size, split=args.split, seed=args.seed, epochs=args.epochs,
                        encoders="shipped" if steps is None else f"trained here, {steps} steps")
        for row in rows:
            _check_replaces_its_own(args.out, row, source)
        # every row's data read before the encoders train: a mistyped folder fails in seconds, not after hours
        row_inputs = {row: row_data(row, args.data, args.split, args.seed, SIZES[size]["subjects"]) for row in rows}
        compared = methods(train_steps=steps, out_dir=args.out)
        for row in rows:
            table[row], _ = run_row(row, compared, row_inputs[row], size, args.seed, args.epochs)
            save_row(args.out, row, table[row], row_inputs[row][2], settings)
            print(row_text(row, table[row]), "\n" + row_text(row, table[row], "t1"), flush=True)
    except (ValueError, OSError, ImportError) as error:  # bad data or arguments, or no nilearn: one line
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    ours = [source, f"{size} settings", f"{settings['encoders']} encoders"]
    if args.epochs is not None:
        ours.append(f"{args.epochs} epochs")
    if args.split is not None:
        ours.append(f"split {args.split}")
    text = (markdown_table(table, " (demo data)" if args.data is None else "")
            + f"\n\nOurs: {', '.join(ours)}; *paper* rows: the paper's Table 1.\n")
    name = "table1" if set(rows) == set(ROWS) else "+".join(rows)  # a row's script leaves the whole table alone
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text)
    print("\n" + text + f"results written to {args.out}/")
    return table


def _check_replaces_its_own(out_dir, row, source):
    """ValueError when out_dir holds the row's results on other data: the demo's rows of table1.py would
    otherwise replace those of a row's script run on real data in the same folder."""
    path = os.path.join(out_dir, f"{row}.json")
    if not os.path.isfile(path):
        return
    earlier = read_json(path)
    earlier = earlier.get("settings", {}).get("data") if isinstance(earlier, dict) else None  # None: kept no settings
    if earlier not in (None, source):
        raise ValueError(f"{path} holds the row's results on {earlier}, which this run on {source} would replace: "
                         f"choose another --out")


def defaults_data(folder, indices=range(60, 161), gap=8):
    """Real 2D data to check the downstream defaults: coronal slices of the 3D volumes of a neurite-oasis folder.

    Args:
        folder: neurite-oasis folder; every subject with ``aligned_norm`` (3D) files is used.
        indices: consecutive slice indices along the last (coronal) axis; even ones train, odd ones test.
        gap: even; registration test pairs are held-out slice n moving onto held-out slice n + gap.

    Returns: (train, test, pairs): train and test Datasets of (N, H, W) slices, and the registration
    test pairs (moving, fixed, moving labels, fixed labels) of the test slices, each (M, H, W).
    """
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 2 or gap % 2:
        raise ValueError(f"gap must be an even integer >= 2 (test slices are the odd ones), got {gap!r}")
    folder = data.existing_folder(folder)
    subjects = [name for name in sorted(os.listdir(folder))
                if os.path.isfile(os.path.join(folder, name, "aligned_norm.nii.gz"))]
    if not subjects:
        raise data.DataError(f"{folder}: no subject folder holds aligned_norm.nii.gz (3D) files")
    volumes = data.load_oasis(folder, dim=3, subjects=subjects)
    indices = np.asarray(indices)
    train, test = (volumes.slices(-1, indices[indices % 2 == parity]) for parity in (0, 1))
    step = gap // 2  # test slices are 2 apart
    same_subject = [i for i in range(len(test) - step) if test.subjects[i] == test.subjects[i + step]]
    if not same_subject:
        raise ValueError(f"gap {gap} leaves no pair of test slices {step * 2} apart")
    moving, fixed = np.asarray(same_subject), np.asarray(same_subject) + step
    return train, test, (test.images[moving], test.images[fixed], test.labels[moving], test.labels[fixed])


# The numbers of experiments/defaults.py, checked before the data are read: the models would refuse some only
# after that, and Keras others never (steps_per_epoch=-1 trains forever, a negative learning rate ascends).
DEFAULTS_CHECKS = {**dict.fromkeys(("steps", "batch_size", "int_resolution", "svf_resolution"), POSITIVE_INTEGER),
                   **dict.fromkeys(("seg_epochs", "int_steps"), NON_NEGATIVE_INTEGER), "seed": SEED,
                   "learning_rate": POSITIVE_NUMBER, "reg_weight": NON_NEGATIVE_NUMBER}


def defaults_main(argv=None):
    """Command line of experiments/defaults.py: do ``registration_model`` and ``segmentation_model`` with
    their default arguments improve on real slices within a CPU budget? Registration options given on
    the command line override the defaults (e.g. voxelmorph's own, to compare)."""
    from .cli import _OneLineParser  # one-line errors, as the CLI gives

    parser = _OneLineParser(description="Downstream models with default arguments on real slices")
    parser.add_argument("--data", required=True, help="neurite-oasis folder with 3D aligned_* files")
    parser.add_argument("--steps", type=int, default=150, help="registration training steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seg-epochs", type=int, default=10, help="segmentation epochs (0: skip it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, help="override registration_model's default")
    parser.add_argument("--similarity", choices=SIMILARITIES, help="override registration_model's default")
    parser.add_argument("--reg-weight", type=float, help="override registration_model's default")
    parser.add_argument("--int-steps", type=int, help="override VxmDense's default")
    parser.add_argument("--int-resolution", type=int, help="override VxmDense's default")
    parser.add_argument("--svf-resolution", type=int, help="override registration_model's default")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in vars(args).items()
                 if key in ("learning_rate", "similarity", "reg_weight", "int_steps", "int_resolution",
                            "svf_resolution")
                 and value is not None}
    try:
        from .cli import _start_run  # the CLI's checks, imported here as the demo does

        _start_run(args, DEFAULTS_CHECKS)  # before the data are read and the models trained, not after; seeds them
        train, test, pairs = defaults_data(args.data)
        model = registration_model(train.images.shape[1:], **overrides)  # the overrides checked against the data
    except (ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    identity = label_overlap(pairs[2], pairs[3])
    model.fit(pair_batches(_channel_last(train.images), args.batch_size, args.seed), epochs=1,
              steps_per_epoch=args.steps, verbose=2)
    registered = evaluate_registration(model, pairs[0], pairs[1], pairs[2], pairs[3])
    results = {"registration": {"overrides": overrides, "steps": args.steps, "batch_size": args.batch_size,
                                "pairs": len(pairs[0]), "identity_dice": identity.summary()["dice"],
                                "registered_dice": registered.summary()["dice"],
                                "folding": registered.summary()["folding"]}}
    print(f"registration ({overrides or 'defaults'}), {len(pairs[0])} held-out pairs: identity Dice "
          f"{dice_cell(identity)}, after {args.steps} steps {dice_cell(registered)} "
          f"({100 * registered.summary()['folding'][0]:.2f}% folding pixels)", flush=True)
    if args.seg_epochs:
        nb_labels = int(train.labels.max()) + 1
        model = segmentation_model(train.images.shape[1:], nb_labels)
        untrained = evaluate_segmentation(model, test.images, test.labels)
        onehot = tf.keras.utils.to_categorical(train.labels, nb_labels)
        model.fit(epoch_batches((_channel_last(train.images), onehot), 8, args.seed), epochs=args.seg_epochs,
                  steps_per_epoch=math.ceil(len(onehot) / 8), verbose=2)
        segmented = evaluate_segmentation(model, test.images, test.labels)
        results["segmentation"] = {"epochs": args.seg_epochs, "test_images": len(test),
                                   "untrained_dice": untrained.summary()["dice"], "dice": segmented.summary()["dice"]}
        print(f"segmentation (defaults), {len(test)} held-out slices: Dice {dice_cell(untrained)} untrained, "
              f"{dice_cell(segmented)} after {args.seg_epochs} epochs of batch 8", flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "defaults.json"), results)
    return results


def _split_arg(text):
    try:
        return text if text == "all" else data.parse_split(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--{error}, or 'all'")


def _channel_last(images):
    images = np.asarray(images, np.float32)
    return images if images.shape[-1] == 1 and images.ndim >= 4 else images[..., np.newaxis]


def _encoded(encoder, images, batch_size=8):
    """The frozen encoder's features of images (N, *shape, 1) -> (N, *shape, C), computed once, so that the
    models train on them (``head``) instead of encoding every image again in every epoch; the images
    themselves without an encoder."""
    if encoder is None:
        return images
    return encoder_model(encoder).predict(images, batch_size=batch_size, verbose=0)


def _announce(what, verbose):
    if verbose:
        print(f"== {what}", flush=True)
