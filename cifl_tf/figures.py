"""Figures (matplotlib, PNG): paper Figure 2, example segmentations and registrations (2D and 3D), training curves.

Slices are (H, W) arrays in the OASIS layout (axis 0 right -> left, axis 1 superior -> inferior), shown
transposed so that the brain stands upright.
"""
import csv
import os
import textwrap

import matplotlib
import matplotlib.patches
import matplotlib.ticker
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checks import is_integer

LABEL_CMAP = "tab10"


def _show(axis, image, title=None, cmap="gray", **kwargs):
    # np.ma.asarray keeps the mask that leaves a label map's background unpainted
    axis.imshow(np.ma.asarray(image).T, cmap=cmap, interpolation="nearest", **kwargs)
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=9)


def _labels(axis, labels, title=None, nb_labels=None):
    nb_labels = nb_labels or int(np.max(labels)) + 1
    _show(axis, np.ma.masked_equal(labels, 0), title, cmap=LABEL_CMAP, vmin=0, vmax=max(nb_labels - 1, 1))


def _save(figure, path, layout=True):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if layout:
        figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _subplots(*grid, figsize, **kwargs):
    """A figure and its axes, as pyplot's ``subplots`` gives them, but without pyplot: PNG files only, drawn on no
    display, and the user's matplotlib backend is left as it was."""
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)  # this figure's canvas, whatever the backend
    return figure, figure.subplots(*grid, **kwargs)


def feature_channels(encoder, images, path, channels=6, title="CIFL features"):
    """Paper Figure 2: the same slice in several contrasts (rows) and its first CIFL feature channels.

    Args:
        encoder: a CIFLEncoder (2D).
        images: {contrast name: (H, W) image in [0, 1]}, the same anatomy in each contrast.
        channels: how many feature channels to show (at most the encoder's).

    Returns: the PNG path. Each channel has one colour scale shared by all rows, so that agreement
    across contrasts is visible as identical pictures down a column.
    """
    if not is_integer(channels, 1):
        raise ValueError(f"feature_channels: channels must be a positive integer, got {channels!r}")
    names = list(images)
    stack = np.stack([images[n] for n in names])[..., np.newaxis].astype(np.float32)
    features = np.asarray(encoder(stack))[..., :channels]
    channels = features.shape[-1]  # no empty panels for an encoder of fewer
    figure, axes = _subplots(len(names), channels + 1, figsize=(1.6 * (channels + 1), 2.0 * len(names)),
                             squeeze=False)
    for row, name in enumerate(names):
        _show(axes[row, 0], stack[row, ..., 0], name)
        for c in range(features.shape[-1]):
            low, high = features[..., c].min(), features[..., c].max()
            _show(axes[row, c + 1], features[row, ..., c], f"channel {c + 1}" if row == 0 else None,
                  cmap="viridis", vmin=low, vmax=high)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def segmentations(images, truth, predictions, path, label_names=None):
    """Example segmentations: one test slice per contrast (columns), true labels, each method's labels
    (rows, named at the left).

    Args:
        images: {contrast: (H, W) image}.
        truth: (H, W) true label map.
        predictions: {method: {contrast: (H, W) label map}}.
        label_names: names of labels 0, 1, ... for the legend (default: their numbers).
    """
    contrasts, methods = list(images), list(predictions)
    # the colours span every label drawn: from the true map's alone, a wrongly predicted label above them
    # would take the top label's colour
    nb_labels = 1 + int(max(np.max(m) for m in [truth, *(p for rows in predictions.values() for p in rows.values())]))
    if label_names and nb_labels > len(label_names):
        raise ValueError(f"segmentations: the label maps hold label {nb_labels - 1}, but label_names names "
                         f"{len(label_names)} labels")
    nb_labels = len(label_names) if label_names else nb_labels
    figure, axes = _subplots(2 + len(methods), len(contrasts), squeeze=False,
                             figsize=(1.8 * len(contrasts), 2.1 * (2 + len(methods)) + 0.4))
    for col, contrast in enumerate(contrasts):
        _show(axes[0, col], images[contrast], contrast)
        _labels(axes[1, col], truth, nb_labels=nb_labels)
        for row, method in enumerate(methods):
            _labels(axes[2 + row, col], predictions[method][contrast], nb_labels=nb_labels)
    # Row names at the left, wrapped: as panel titles, long method names ran into each other.
    for row, name in enumerate(["true labels", *methods], start=1):
        axes[row, 0].set_ylabel(textwrap.fill(name, 16), fontsize=9)
    colours = matplotlib.colormaps[LABEL_CMAP](np.linspace(0, 1, max(nb_labels, 2)))
    names = label_names or [str(label) for label in range(nb_labels)]
    if nb_labels > 1:  # a legend of the labels besides the background
        figure.legend(handles=[matplotlib.patches.Patch(color=colours[label], label=names[label])
                               for label in range(1, nb_labels)], loc="lower center", ncol=nb_labels - 1, fontsize=8)
    figure.suptitle("Trained on T1 only: segmentations of one test slice in each contrast", fontsize=10)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(figure, path, layout=False)


def registrations(moving, fixed, moved, path, fixed_labels=None, moved_labels=None, title=None):
    """Example registrations: moving, fixed and each method's moved image, label contours on top.

    Args:
        moving, fixed: (H, W) images.
        moved: {method: (H, W) moved image}; moved_labels: {method: (H, W) moved label map}.
        fixed_labels: (H, W); drawn as contours on the fixed and moved images.
        title: figure title; the contour colours are named after it.
    """
    panels = [("moving", moving, None), ("fixed", fixed, None)]
    panels += [(method, image, (moved_labels or {}).get(method)) for method, image in moved.items()]
    figure, axes = _subplots(1, len(panels), figsize=(2.0 * len(panels), 2.6), squeeze=False)
    for axis, (name, image, labels) in zip(axes[0], panels):
        _show(axis, image, name)
        if fixed_labels is not None and name != "moving":
            _contours(axis, fixed_labels, "yellow")
        if labels is not None:
            _contours(axis, labels, "red")
    figure.suptitle(f"{title + ': ' if title else ''}yellow, fixed labels; red, moved labels", fontsize=10)
    return _save(figure, path)


def _contours(axis, labels, colour):
    """The borders between the labels of an (H, W) label map, over a slice that _show drew."""
    axis.contour(np.asarray(labels).T, levels=np.unique(labels)[:-1] + 0.5, colors=colour, linewidths=0.5)


def orthogonal_registrations(fixed, fixed_labels, moved, moved_labels, path, title=None):
    """3D registrations: the central sagittal, coronal and axial slices of the fixed and each moved volume.

    Args:
        fixed, fixed_labels: (X, Y, Z) volume and label map on a RAS grid (axis 0 left -> right,
            1 posterior -> anterior, 2 inferior -> superior).
        moved, moved_labels: {method: (X, Y, Z) moved volume}, {method: (X, Y, Z) moved label map} (or None:
            the fixed contours alone, as `registrations` draws them).
        title: figure title; the contour colours are named after it.

    Returns: the PNG path. Rows: fixed, then each method; yellow contours: fixed labels, red: moved labels.
    """
    centre = [n // 2 for n in np.shape(fixed)]
    cuts = {"sagittal": (centre[0], slice(None), slice(None)), "coronal": (slice(None), centre[1], slice(None)),
            "axial": (slice(None), slice(None), centre[2])}
    rows = [("fixed", fixed, None)] + [(name, volume, (moved_labels or {}).get(name)) for name, volume in moved.items()]
    figure, axes = _subplots(len(rows), len(cuts), figsize=(2.2 * len(cuts), 2.2 * len(rows)), squeeze=False)
    for row, (name, volume, labels) in enumerate(rows):
        for axis, (view, cut) in zip(axes[row], cuts.items()):
            _show(axis, np.asarray(volume)[cut], f"{name}, {view}", origin="lower")  # superior / anterior up
            _contours(axis, np.asarray(fixed_labels)[cut], "yellow")
            if labels is not None:
                _contours(axis, np.asarray(labels)[cut], "red")
    figure.suptitle(f"{title + ': ' if title else ''}yellow, fixed labels; red, moved labels", fontsize=10)
    return _save(figure, path)


def read_training_log(path):
    """(epochs counted from 1, losses) of a Keras CSVLogger log; ValueError naming the file if it lacks the
    columns epoch and loss or holds a row that is not numbers."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return [int(r["epoch"]) + 1 for r in rows], [float(r["loss"]) for r in rows]
    except (KeyError, TypeError, ValueError) as error:  # a column missing, a short row, or not a number
        raise ValueError(f"{path}: not a training log with numeric columns epoch and loss "
                         f"({type(error).__name__}: {error})") from None


def training_curves(logs, path, title="CIFL encoder training"):
    """The loss per epoch of several training runs: {name: path of a Keras CSVLogger log}."""
    figure, axis = _subplots(figsize=(5, 3.2))
    losses = []
    for name, log in logs.items():
        epochs, loss = read_training_log(log)
        axis.plot(epochs, loss, label=name)
        losses += loss
    # the first epochs at low temperature can be far above the rest; a symlog axis of less than a decade
    # would label no tick
    wide = bool(losses) and max(losses) > 10 * max(min(losses), 1)
    if wide:
        axis.set_yscale("symlog", linthresh=1)
        axis.yaxis.set_major_locator(matplotlib.ticker.SymmetricalLogLocator(linthresh=1, base=10, subs=(1, 2, 5)))
        axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss (symlog)" if wide else "loss")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    return _save(figure, path)
