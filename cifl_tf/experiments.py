"""Paper Table 1 (Sec. 3), row by row: the intensity baseline against CIFL features per tau_gamma.

Every row trains one downstream network per method on T1 only, and scores it on a contrast it never
saw (and on T1, for reference). The scripts in ``experiments/`` and ``cifl demo`` are thin wrappers.

    methods = experiments.methods()                       # {"baseline": None, "tau_gamma=1": encoder, ...}
    results = experiments.segmentation_row(train, tests, nb_labels=5, methods=methods)
    print(experiments.markdown_table({"seg_inverted_oasis": results}))
"""
import csv
import json
import os

import numpy as np
import tensorflow as tf

from .encoder import PRETRAINED_TAU_GAMMAS, pretrained
from .evaluate import evaluate_registration, evaluate_segmentation
from .models import pair_batches, registration_model, segmentation_model
from .training import train_encoder

BASELINE = "baseline"

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
    """The compared feature extractors: {"baseline": None, "tau_gamma=T": CIFLEncoder, ...}.

    With train_steps None the shipped encoders (`pretrained`); otherwise encoders trained here with
    `train_encoder` for that many steps (into out_dir/encoder_tau_gamma=T when out_dir is given).
    """
    encoders = {BASELINE: None}
    for tau in tau_gammas:
        if train_steps is None:
            encoders[method_name(tau)] = pretrained(tau)
        else:
            run = None if out_dir is None else os.path.join(out_dir, f"encoder_{method_name(tau)}")
            encoder = train_encoder(steps=train_steps, tau_gamma=tau, seed=0, out_dir=run, verbose=verbose)
            encoder.trainable = False
            encoders[method_name(tau)] = encoder
    return encoders


def segmentation_row(train, tests, nb_labels, methods, epochs=30, batch_size=8, seed=0, verbose=1,
                     **unet_kwargs):
    """Trains ``segmentation_model`` per method on `train` and scores it on each test contrast.

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
        tf.keras.utils.set_random_seed(seed)
        model = segmentation_model(images.shape[1:-1], nb_labels, encoder, **unet_kwargs)
        model.fit(images, onehot, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=verbose)
        results[name] = {contrast: evaluate_segmentation(model, _channel_last(x), y)
                         for contrast, (x, y) in tests.items()}
        trained[name] = model
    return results, trained


def registration_row(train_images, tests, methods, epochs=10, steps_per_epoch=100, batch_size=4, seed=0,
                     verbose=1, **vxm_kwargs):
    """Trains ``registration_model`` per method on T1 pairs and scores each test pairing.

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
        tf.keras.utils.set_random_seed(seed)
        model = registration_model(images.shape[1:-1], encoder, **vxm_kwargs)
        model.fit(pair_batches(images, batch_size, seed), epochs=epochs, steps_per_epoch=steps_per_epoch,
                  verbose=verbose)
        results[name] = {test: evaluate_registration(model, *(_channel_last(a) for a in pairs[:2]), *pairs[2:])
                         for test, pairs in tests.items()}
        trained[name] = model
    return results, trained


def cross_subject_pairs(moving, fixed, moving_labels, fixed_labels):
    """Test pairs of different subjects: moving image n onto fixed image n + 1 (cyclically)."""
    return moving, np.roll(fixed, -1, axis=0), moving_labels, np.roll(fixed_labels, -1, axis=0)


def save_row(out_dir, row, results):
    """Writes out_dir/row.json (mean ± std and per-image Dice) and out_dir/row.csv (one line per image)."""
    os.makedirs(out_dir, exist_ok=True)
    summary = {name: {test: {**scores.summary(), "per_image_dice": scores.mean_dice.tolist()}
                      for test, scores in tests.items()} for name, tests in results.items()}
    with open(os.path.join(out_dir, f"{row}.json"), "w") as f:
        json.dump({"row": row, "results": summary}, f, indent=2, default=float)
    with open(os.path.join(out_dir, f"{row}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "test", "image", "dice"])
        for name, tests in results.items():
            for test, scores in tests.items():
                writer.writerows([name, test, i, f"{d:.4f}"] for i, d in enumerate(scores.mean_dice))


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
        lines.append("| | | *paper* | " + " | ".join(f"*{PAPER_DICE[row].get(name, '')}*" for name in names) + " |")
    return "\n".join(lines)


def _channel_last(images):
    images = np.asarray(images, np.float32)
    return images if images.shape[-1] == 1 and images.ndim >= 4 else images[..., np.newaxis]


def _announce(what, verbose):
    if verbose:
        print(f"== {what}", flush=True)
