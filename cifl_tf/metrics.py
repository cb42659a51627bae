"""Evaluation: Dice overlap, mean ± std over test images, folding of deformations, feature agreement."""
import numpy as np

import voxelmorph as vxm

from .checks import is_integer


def check_label_map(label_map, name):
    """`label_map` as an array; ValueError naming it (`name`, e.g. "dice: labels_a") unless its values are labels:
    integers, booleans, or whole finite floats (as a float NIfTI file stores them)."""
    label_map = np.asarray(label_map)
    if np.issubdtype(label_map.dtype, np.integer) or label_map.dtype == bool:
        return label_map
    if not np.issubdtype(label_map.dtype, np.floating):
        raise ValueError(f"{name} must be an integer label map, got {label_map.dtype}")
    # a linear resampling's fractions and NaN would be scored, or warped, by their rounded or cast values
    fractional = label_map[~np.isfinite(label_map) | (label_map != np.round(label_map))]
    if fractional.size:
        raise ValueError(f"{name} must be an integer label map, got {fractional.size} {label_map.dtype} values that "
                         f"are not whole, such as {fractional[:3].tolist()}")
    return label_map


def dice(labels_a, labels_b, labels=None):
    """Per-label Dice overlap 2 |A ∩ B| / (|A| + |B|) of two label maps.

    Args:
        labels_a, labels_b: integer label maps of the same shape (any number of dimensions).
        labels: the labels to score; None: every label present in either map except background 0.

    Returns: dict label -> Dice in [0, 1]; nan for a requested label absent from both maps.
    """
    labels_a, labels_b = check_label_map(labels_a, "dice: labels_a"), check_label_map(labels_b, "dice: labels_b")
    if labels_a.shape != labels_b.shape:
        raise ValueError(f"dice: label maps differ in shape, {labels_a.shape} vs {labels_b.shape}")
    present = np.union1d(labels_a, labels_b)
    if labels is None:
        labels = present[present != 0]
    else:
        given = labels
        try:
            labels = np.asarray(list(labels))
        except TypeError:  # not iterable, such as a single label
            labels = None
        if labels is None or labels.ndim != 1 or labels.dtype.kind not in "biuf" \
                or np.any(labels != np.round(labels)):  # int() below would score 2.5 as label 2
            raise ValueError(f"dice: labels must be a sequence of integer labels, got {given!r}")
    scores = vxm.py.utils.dice(labels_a, labels_b, labels=labels, include_zero=True)
    return {int(label): float(score) if label in present else np.nan
            for label, score in zip(labels, scores)}


def mean_dice(labels_a, labels_b, labels=None):
    """Mean of ``dice`` over its labels, skipping labels absent from both maps (nan if none is left)."""
    scores = [score for score in dice(labels_a, labels_b, labels).values() if not np.isnan(score)]
    return float(np.mean(scores)) if scores else np.nan


def summarize(values):
    """(mean, standard deviation) of per-image scores, e.g. Dice over the test images."""
    values = np.asarray(values, np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"summarize: needs one or more finite values, got {values.tolist()}")
    return float(values.mean()), float(values.std())


FOLDING_SLAB_VOXELS = 2 ** 18


def folding_fraction(displacement):
    """Share of pixels where a deformation folds, i.e. its Jacobian determinant is <= 0.

    Args:
        displacement: (*spatial, ndim) displacement field in pixels, ndim 2 or 3, or a batch
            (B, *spatial, ndim) of them.

    Returns: float in [0, 1], or a (B,) array for a batch.
    """
    displacement = _floating(displacement)  # integers would wrap in the determinant's products
    ndim = displacement.shape[-1] if displacement.ndim else 0
    if ndim not in (2, 3) or displacement.ndim not in (ndim + 1, ndim + 2):
        raise ValueError(f"folding_fraction: expected (*spatial, ndim) or (B, *spatial, ndim) with "
                         f"ndim 2 or 3 spatial axes, got shape {displacement.shape}")
    if displacement.ndim == ndim + 2:
        return np.array([folding_fraction(field) for field in displacement])
    if min(displacement.shape[:-1]) < 2:  # no finite difference along it
        hint = " (a 2D field stored as 3D? Drop the one-pixel axis and its component)" if ndim == 3 else ""
        raise ValueError(f"folding_fraction: every spatial axis needs 2 or more pixels, got shape "
                         f"{displacement.shape}{hint}")
    if not np.isfinite(displacement).all():  # NaN determinants would count as not folded
        raise ValueError(f"folding_fraction: the displacement holds "
                         f"{np.count_nonzero(~np.isfinite(displacement))} NaN/Inf values")
    # voxelmorph's determinant, of slabs of about FOLDING_SLAB_VOXELS with a row more on each side, so that their
    # central differences are those of the whole field (to float64 rounding: each slab's grid starts at 0, so a
    # determinant within rounding of 0 may count otherwise): of a whole 160x192x224 field it held 1.3 GB at once
    size, rows = len(displacement), max(1, FOLDING_SLAB_VOXELS // displacement[0, ..., 0].size)
    folded = 0
    for start in range(0, size, rows):
        stop = min(start + rows, size)
        below, above = max(start - 1, 0), min(stop + 1, size)
        determinant = vxm.py.utils.jacobian_determinant(displacement[below:above])
        folded += np.count_nonzero(determinant[start - below:stop - below] <= 0)
    return folded / displacement[..., 0].size


def _floating(features):
    """Features as an array whose products do not wrap: integers as float64."""
    features = np.asarray(features)
    return features if np.issubdtype(features.dtype, np.floating) else features.astype(np.float64)


def feature_agreement(features_a, features_b, mask=None):
    """Mean over (masked) pixels of the dot product of the two per-pixel feature vectors.

    For l2-normalised features (the CIFL encoder's output) this is the mean cosine similarity:
    1 when the two images get the same features, as for a contrast invariant encoder.

    Args:
        features_a, features_b: (*spatial, C) or (B, *spatial, C) feature images.
        mask: boolean array of shape features.shape[:-1], e.g. the brain; None: every pixel.

    Returns: float.
    """
    features_a, features_b = _floating(features_a), _floating(features_b)
    if features_a.shape != features_b.shape or features_a.ndim < 2:
        raise ValueError(f"feature_agreement: expected two (..., C) feature images of one shape, "
                         f"got {features_a.shape} and {features_b.shape}")
    dots = np.sum(features_a * features_b, axis=-1, dtype=np.float64)
    mask = np.ones(dots.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != dots.shape or not mask.any():
        raise ValueError(f"feature_agreement: mask must be a non-empty boolean array of shape "
                         f"{dots.shape}, got shape {mask.shape} with {np.count_nonzero(mask)} pixels")
    bad = np.count_nonzero(~np.isfinite(dots[mask]))
    if bad:  # the mean would be NaN, as if the features disagreed, without saying where it came from
        raise ValueError(f"feature_agreement: the features are NaN or infinite at {bad} pixels of the mask")
    return float(dots[mask].mean())


def match_fraction(features_a, features_b, mask, radius=2, samples=1500, seed=0):
    """Dense cross-contrast matching: how often a pixel's nearest feature in the other image is nearby.

    For pixels p sampled in `mask`, the match in image b is the masked pixel q maximising the dot product
    <f_a(p), f_b(q)>; p counts as matched when q lies within `radius` pixels of p (Chebyshev distance).
    A contrast invariant and distinctive encoder scores near 1; features that ignore the image, or do
    not agree across contrasts, score near chance (about (2 radius + 1)^ndim / mask pixels).

    Args:
        features_a, features_b: (*spatial, C) feature images of the same anatomy in two contrasts.
        mask: boolean array of shape spatial, e.g. the brain.
        radius: pixels of tolerance.
        samples: pixels drawn from the mask (all of them when the mask has fewer).
        seed: seed of the draw.

    Returns: float in [0, 1].
    """
    features_a, features_b = _floating(features_a), _floating(features_b)
    mask = np.asarray(mask, bool)
    if features_a.shape != features_b.shape or mask.shape != features_a.shape[:-1] or not mask.any():
        raise ValueError(f"match_fraction: expected two (*spatial, C) feature images of one shape and a "
                         f"non-empty boolean mask of their spatial shape, got {features_a.shape}, "
                         f"{features_b.shape} and mask {mask.shape} with {np.count_nonzero(mask)} pixels")
    if not is_integer(radius, 0):
        raise ValueError(f"match_fraction: radius must be a non-negative integer, got {radius!r}")
    if not is_integer(samples, 1):
        raise ValueError(f"match_fraction: samples must be a positive integer, got {samples!r}")
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        bad = np.count_nonzero(~np.isfinite(features[mask]).all(axis=-1))
        if bad:  # argmax would take a NaN's pixel for the match
            raise ValueError(f"match_fraction: {name} is NaN or infinite at {bad} pixels of the mask")
    inside = np.argwhere(mask)
    picked = np.random.default_rng(seed).permutation(len(inside))[:samples]
    queries = features_a[tuple(inside[picked].T)]
    matches = inside[np.argmax(queries @ features_b[mask].T, axis=1)]
    return float(np.mean(np.abs(matches - inside[picked]).max(axis=1) <= radius))
