"""Scoring the downstream networks on test images, as in the paper's Table 1 (Sec. 3).

* ``evaluate_segmentation``: per-image, per-label Dice of the predicted label maps.
* ``evaluate_registration``: the moving label map is warped with the predicted displacement
  (nearest neighbour) and scored against the fixed label map; also the share of folding pixels
  (Jacobian determinant <= 0) of each displacement.

Background (label 0) is left out of the Dice by default. ``Scores`` holds the per-image values and
their mean ± std over the test images.
"""
import dataclasses

import numpy as np

from . import metrics, tiling
from .models import RegistrationModel, SegmentationModel, check_batching, warp_labels


def _mean_std(values):
    """(mean, std) over the non-nan values; (nan, nan) when none is left."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    return metrics.summarize(values) if values.size else (np.nan, np.nan)


@dataclasses.dataclass
class Scores:
    """Dice of N test images (segmentation) or image pairs (registration) on L labels.

    Attributes:
        labels: the L scored label values.
        dice: (N, L) Dice per image and label; nan where a label is in neither map.
        mean_dice: (N,) each image's mean over its labels that are not nan.
        folding: (N,) share of folding pixels of each displacement (registration), else None.
        unit: what N counts, as printed: "images", or "pairs" (registration and label_overlap).
    """

    labels: list
    dice: np.ndarray
    mean_dice: np.ndarray
    folding: np.ndarray = None
    unit: str = "images"

    def summary(self):
        """Mean ± std over the images, as a plain dict (for JSON): images, scored (the images in the mean: those
        with a scored label in either map), dice, per_label, folding."""
        out = {"images": len(self.dice), "scored": int(np.count_nonzero(~np.isnan(self.mean_dice))),
               "dice": _mean_std(self.mean_dice),
               "per_label": {int(label): _mean_std(self.dice[:, i]) for i, label in enumerate(self.labels)}}
        if self.folding is not None:
            out["folding"] = _mean_std(self.folding)
        return out

    def __str__(self):
        summary = self.summary()
        unscored = summary["images"] - summary["scored"]
        lines = [f"Dice {summary['dice'][0]:.3f} ± {summary['dice'][1]:.3f} over {summary['scored']} {self.unit}"
                 + (f" ({unscored} more with none of the labels in either map)" if unscored else "")]
        lines += [f"  label {label}: {mean:.3f} ± {std:.3f}" for label, (mean, std) in summary["per_label"].items()]
        if self.folding is not None:
            lines.append(f"folding pixels (Jacobian determinant <= 0): {100 * summary['folding'][0]:.3f}% "
                         f"± {100 * summary['folding'][1]:.3f}%")
        return "\n".join(lines)


def _score(predicted, truth, labels, unit):
    """Scores of label maps `predicted` against `truth`, (N, *shape) each, N counted in `unit` ("images" or
    "pairs")."""
    labels = list(labels)  # read once per image: an iterator would be spent after the first
    rows = [metrics.dice(a, b, labels) for a, b in zip(predicted, truth)]
    dice = np.array([[row[label] for label in labels] for row in rows], np.float64).reshape(len(rows), len(labels))
    means = np.array([np.nan if np.all(np.isnan(row)) else np.nanmean(row) for row in dice])
    return Scores(list(labels), dice, means, unit=unit)


def _images(model, images, what, where):
    """(N, *inshape, 1) float32 from (N, *inshape) or (N, *inshape, 1), as the model takes them
    (``check_intensities``)."""
    images = model.check_intensities(images, what, where)
    inshape = model.inshape
    if images.shape[1:] == inshape:
        images = images[..., np.newaxis]
    if images.shape[1:] != (*inshape, 1) or not len(images):
        raise ValueError(f"{where}: {what} must be (N, {', '.join(map(str, inshape))}[, 1]) with N >= 1, "
                         f"got {images.shape}")
    if not np.isfinite(images).all():  # a NaN pixel would spread through the network and be scored as labels
        raise ValueError(f"{where}: {what} holds {np.count_nonzero(~np.isfinite(images))} NaN or infinite values")
    return images


def _label_maps(labels, count, inshape, what):
    labels = metrics.check_label_map(labels, what)  # whole floats too, as a float NIfTI stores them
    if labels.shape != (count, *inshape):
        raise ValueError(f"{what} must be label maps of shape ({count}, {', '.join(map(str, inshape))}), "
                         f"got {labels.shape}")
    return labels


def segment(model, images, batch_size=8, verbose=0, max_memory=None):
    """Label maps predicted by a SegmentationModel: argmax of its softmax.

    Args:
        images: (N, *inshape) or (N, *inshape, 1), normalised as in training (``data.normalize``).
        max_memory: None runs the whole model on whole images; a number of bytes runs its encoder
            tile by tile within that budget (``tiling.tiled_features``, the same features), then the UNet.
            A model without an encoder (the intensity baseline) takes None.

    Returns: (N, *inshape) int32.
    """
    return _predict_labels(model, _segmentation_images(model, images, batch_size, verbose, "segment"), batch_size,
                           verbose, max_memory, "segment")


def _segmentation_images(model, images, batch_size, verbose, where):
    if not isinstance(model, SegmentationModel):
        raise TypeError(f"{where}: expected a SegmentationModel, got {type(model).__name__}")
    check_batching(batch_size, verbose, where)
    return _images(model, images, "images", where)


def _predict_labels(model, images, batch_size, verbose, max_memory, where):
    if max_memory is not None and model.encoder is None:
        raise ValueError(f"{where}: max_memory bounds the features of the model's encoder, and {model.name} has "
                         f"none (it takes the intensities); give max_memory=None")
    if max_memory is None:
        probabilities = model.predict(images, batch_size=batch_size, verbose=verbose)
    else:
        features = np.stack([tiling.tiled_features(model.encoder, image[..., 0], max_memory) for image in images])
        probabilities = model.get_layer(f"{model.name}_unet").predict(features, batch_size=batch_size,
                                                                       verbose=verbose)
    return np.argmax(probabilities, axis=-1).astype(np.int32)


def evaluate_segmentation(model, images, labels, label_values=None, batch_size=8, verbose=0):
    """Dice of a SegmentationModel's label maps against the true ones (paper Table 1, segmentation).

    Args:
        model: SegmentationModel.
        images: (N, *inshape) or (N, *inshape, 1) test images, normalised as in training.
        labels: (N, *inshape) integer true label maps.
        label_values: the labels to score; default 1 .. nb_labels - 1 (background excluded).

    Returns: Scores.
    """
    images = _segmentation_images(model, images, batch_size, verbose, "evaluate_segmentation")
    labels = _label_maps(labels, len(images), model.inshape,
                         "evaluate_segmentation: labels")  # before the network's work, not after it
    predicted = _predict_labels(model, images, batch_size, verbose, None, "evaluate_segmentation")
    return _score(predicted, labels, range(1, model.nb_labels) if label_values is None else label_values, "images")


def label_overlap(moving_labels, fixed_labels, label_values=None):
    """Dice of label maps as they are, unregistered: the identity baseline of ``evaluate_registration``.

    Args:
        moving_labels, fixed_labels: (N, *shape) integer label maps; pair n is scored as n against n.
        label_values: the labels to score; default every nonzero label in the fixed label maps.

    Returns: Scores (no folding).
    """
    shape = np.shape(fixed_labels)
    if len(shape) not in (3, 4):  # one (H, W) map would be scored as H one-row maps
        raise ValueError(f"label_overlap: expected a batch of label maps (N, *shape) with 2 or 3 spatial axes, "
                         f"got shape {shape}")
    fixed_labels = _label_maps(fixed_labels, shape[0], shape[1:], "label_overlap: fixed_labels")
    moving_labels = _label_maps(moving_labels, shape[0], shape[1:], "label_overlap: moving_labels")
    if label_values is None:
        label_values = [label for label in np.unique(fixed_labels).tolist() if label != 0]
    return _score(moving_labels, fixed_labels, label_values, "pairs")


def evaluate_registration(model, moving, fixed, moving_labels, fixed_labels, label_values=None,
                          batch_size=8, verbose=0):
    """Dice after registration and folding of the displacements (paper Table 1, registration).

    Pair n registers moving[n] to fixed[n]; moving_labels[n] is warped with the predicted
    displacement (nearest neighbour) and scored against fixed_labels[n].

    Args:
        model: RegistrationModel.
        moving, fixed: (N, *inshape) or (N, *inshape, 1) images, normalised as in training.
        moving_labels, fixed_labels: (N, *inshape) integer label maps.
        label_values: the labels to score; default every nonzero label in the fixed label maps.

    Returns: Scores with folding.
    """
    if not isinstance(model, RegistrationModel):
        raise TypeError(f"evaluate_registration: expected a RegistrationModel, got {type(model).__name__}")
    check_batching(batch_size, verbose, "evaluate_registration")
    moving, fixed = (_images(model, images, what, "evaluate_registration") for images, what in ((moving, "moving"),
                                                                                                (fixed, "fixed")))
    if len(moving) != len(fixed):
        raise ValueError(f"evaluate_registration: {len(moving)} moving but {len(fixed)} fixed images")
    moving_labels = _label_maps(moving_labels, len(moving), model.inshape, "evaluate_registration: moving_labels")
    fixed_labels = _label_maps(fixed_labels, len(moving), model.inshape, "evaluate_registration: fixed_labels")
    displacement = model.register(moving, fixed, batch_size, verbose)
    broken = np.flatnonzero(~np.isfinite(displacement).reshape(len(displacement), -1).all(axis=1))
    if broken.size:  # else warp and folding_fraction would refuse it without saying whose
        raise ValueError(f"evaluate_registration: {model.name} gave a NaN or infinite displacement for pairs "
                         f"{broken.tolist()} (of {len(displacement)})")
    return dataclasses.replace(label_overlap(warp_labels(moving_labels, displacement), fixed_labels, label_values),
                               folding=metrics.folding_fraction(displacement))
