"""cifl_tf.metrics against hand-computed values and NumPy references written from the formulas."""
import re

import numpy as np
import pytest

from cifl_tf import metrics

A = np.array([[0, 1, 1], [2, 2, 0]])
B = np.array([[0, 1, 0], [2, 2, 2]])


def reference_dice(a, b, label):
    """2 |A ∩ B| / (|A| + |B|) for one label."""
    in_a, in_b = a == label, b == label
    return 2 * np.sum(in_a & in_b) / (np.sum(in_a) + np.sum(in_b))


@pytest.mark.parametrize("labels, expected", [
    (None, {1: 2 / 3, 2: 4 / 5}),               # background 0 left out
    ([0], {0: 2 / 4}),                          # asked for explicitly
    ([2, 1, 3], {2: 4 / 5, 1: 2 / 3, 3: np.nan}),  # 3 is in neither map
])
def test_dice_by_hand(labels, expected):
    result = metrics.dice(A, B, labels)
    assert list(result) == list(expected)
    np.testing.assert_allclose(list(result.values()), list(expected.values()))


@pytest.mark.parametrize("seed", range(3))
def test_dice_matches_the_formula_on_random_3d_maps(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 6, (5, 6, 7)), rng.integers(0, 4, (5, 6, 7))
    result = metrics.dice(a, b)
    assert list(result) == [1, 2, 3, 4, 5]
    expected = [reference_dice(a, b, label) for label in range(1, 6)]
    np.testing.assert_allclose(list(result.values()), expected)


@pytest.mark.parametrize("a, b, expected", [
    (A, A, 1.0),
    (A, np.where(A > 0, 3 - A, 0), 0.0),  # labels 1 and 2 swapped: no overlap
    (A, B, (2 / 3 + 4 / 5) / 2),
])
def test_mean_dice(a, b, expected):
    assert metrics.mean_dice(a, b) == pytest.approx(expected)


def test_mean_dice_skips_labels_absent_from_both_maps():
    assert metrics.mean_dice(A, B, labels=[1, 2, 7]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert np.isnan(metrics.mean_dice(A, B, labels=[7]))


def test_dice_rejects_maps_of_different_shapes_and_labels_that_are_not_integers():
    with pytest.raises(ValueError, match=r"\(2, 3\) vs \(3, 2\)"):
        metrics.dice(A, B.T)


@pytest.mark.parametrize("labels, shown", [([1.0, 2.5], r"\[1.0, 2.5\]"), (1, "1"), (["a"], r"\['a'\]"),
                                           ([[1, 2]], r"\[\[1, 2\]\]")])
def test_dice_refuses_labels_that_are_not_a_sequence_of_integers(labels, shown):
    # a single label, strings and nested lists failed inside Python, NumPy or voxelmorph
    with pytest.raises(ValueError, match=rf"dice: labels must be a sequence of integer labels, got {shown}$"):
        metrics.dice(A, B, labels)


@pytest.mark.parametrize("labels", [None, [1]])
@pytest.mark.parametrize("bad, shown", [(0.99, r"\[0.99\]"), (np.nan, r"\[nan\]"), (np.inf, r"\[inf\]")])
def test_dice_refuses_maps_whose_values_are_not_whole(labels, bad, shown):
    """A linearly resampled map or NaN was scored by its rounded values when labels were given, and blamed on
    the labels argument when not."""
    with pytest.raises(ValueError, match=rf"dice: labels_b must be an integer label map, got 1 float64 values that "
                                         rf"are not whole, such as {shown}"):
        metrics.dice(np.array([0, 1, 1]), np.array([0, bad, 1.0]), labels)
    with pytest.raises(ValueError, match="dice: labels_a must be an integer label map, got <U1"):
        metrics.dice(np.array(["a", "b", "c"]), np.array([0, 1, 1]), labels)


@pytest.mark.parametrize("a, b", [(A.astype(np.float32), B), (A, B.astype(np.float64)), (A > 0, B > 0)])
def test_dice_takes_whole_floats_and_booleans_as_labels(a, b):
    expected = {label: reference_dice(np.asarray(a, int), np.asarray(b, int), label) for label in (1, 2)
                if label in np.asarray(a, int) or label in np.asarray(b, int)}
    result = metrics.dice(a, b)
    assert list(result) == list(expected)
    np.testing.assert_allclose(list(result.values()), list(expected.values()))


@pytest.mark.parametrize("values, mean, std", [
    ([0.8, 0.9], 0.85, 0.05),
    ([0.84], 0.84, 0.0),
    ([0.1, 0.2, 0.6], 0.3, np.sqrt(((0.2 ** 2) + (0.1 ** 2) + (0.3 ** 2)) / 3)),
])
def test_summarize(values, mean, std):
    np.testing.assert_allclose(metrics.summarize(values), (mean, std))


@pytest.mark.parametrize("values", [[], [0.5, np.nan], [0.5, np.inf]])
def test_summarize_rejects_empty_or_values_that_are_not_finite(values):
    with pytest.raises(ValueError, match="needs one or more finite values"):
        metrics.summarize(values)


def flip_rows(shape, columns):
    """2D displacement moving row i to -i in some columns: Jacobian determinant -1 there, else +1."""
    rows = np.arange(shape[0])[:, None] * np.ones(shape)
    field = np.zeros((*shape, 2))
    field[:, columns, 0] = -2 * rows[:, columns]
    return field


@pytest.mark.parametrize("displacement, expected", [
    (np.zeros((6, 8, 2)), 0.0),                                # identity
    (np.random.default_rng(0).normal(0, 0.05, (6, 8, 2)), 0.0),  # small smooth-ish jitter
    (flip_rows((6, 8), slice(None)), 1.0),                     # mirror: folds everywhere
    (flip_rows((6, 8), slice(0, 2)), 0.25),                    # 2 of 8 columns mirrored
    (-2 * np.stack(np.indices((4, 5, 6)), -1), 1.0),  # 3D point reflection
    (np.stack([-np.indices((6, 8))[0], np.zeros((6, 8))], -1), 1.0),  # rows collapsed onto one: determinant 0
    # shear u = (2 col, row): J = [[1, 2], [1, 1]], determinant -1 though each diagonal entry is 1
    (np.stack([2 * np.indices((6, 8))[1], np.indices((6, 8))[0]], -1), 1.0),
])
def test_folding_fraction(displacement, expected):
    assert metrics.folding_fraction(displacement) == pytest.approx(expected)


def folding_reference(displacement):
    """Share of pixels with det(I + grad u) <= 0, the displacement's central-difference Jacobian."""
    ndim = displacement.shape[-1]
    gradients = np.stack([np.stack(np.gradient(displacement[..., d]), -1) for d in range(ndim)], -2)
    return np.mean(np.linalg.det(np.eye(ndim) + gradients) <= 0)


# whole; a row a slab; 5 rows a slab, the last of 4 (2D) or 2 (3D)
@pytest.mark.parametrize("slab_voxels", [metrics.FOLDING_SLAB_VOXELS, 1, 100, 700])
@pytest.mark.parametrize("shape", [(24, 20), (12, 10, 14)])
def test_folding_fraction_equals_the_jacobian_formula(shape, slab_voxels, monkeypatch):
    monkeypatch.setattr(metrics, "FOLDING_SLAB_VOXELS", slab_voxels)
    rng = np.random.default_rng(3)
    coarse = rng.normal(0, 1.5, (*(s // 4 for s in shape), len(shape)))  # smooth, with a share of folds
    displacement = np.kron(coarse, np.ones((*(4,) * len(shape), 1)))
    displacement += rng.normal(0, 0.3, displacement.shape)
    expected = folding_reference(displacement)
    assert 0.05 < expected < 0.95  # some pixels fold and some do not, so the case can tell
    assert metrics.folding_fraction(displacement) == pytest.approx(expected)


def test_folding_fraction_of_a_batch_is_per_field():
    batch = np.stack([np.zeros((6, 8, 2)), flip_rows((6, 8), slice(0, 4))])
    np.testing.assert_allclose(metrics.folding_fraction(batch), [0.0, 0.5])


@pytest.mark.parametrize("shape", [(6, 8), (6, 8, 3), (2, 2, 6, 8, 2)])
def test_folding_fraction_rejects_fields_that_are_not_displacements(shape):
    with pytest.raises(ValueError, match=rf"got shape \({', '.join(map(str, shape))}\)"):
        metrics.folding_fraction(np.zeros(shape))


@pytest.mark.parametrize("shape, field", [((6, 8, 1, 3), "(6, 8, 1, 3)"), ((1, 8, 2), "(1, 8, 2)"),
                                          ((2, 6, 1, 2), "(6, 1, 2)")])  # numpy's gradient failed on them
def test_folding_fraction_refuses_an_axis_of_one_pixel(shape, field):
    with pytest.raises(ValueError, match=re.escape(f"every spatial axis needs 2 or more pixels, got shape {field}")):
        metrics.folding_fraction(np.zeros(shape))


def test_folding_fraction_refuses_non_finite_fields():
    with pytest.raises(ValueError, match="the displacement holds 96 NaN/Inf values"):
        metrics.folding_fraction(np.full((6, 8, 2), np.nan))


def unit(vectors):
    vectors = np.asarray(vectors, float)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


@pytest.mark.parametrize("f1, f2, mask, expected", [
    (unit([[1, 2, 2], [0, 3, 4]]), unit([[1, 2, 2], [0, 3, 4]]), None, 1.0),
    (unit([[1, 0], [0, 1]]), -unit([[1, 0], [0, 1]]), None, -1.0),
    (unit([[1, 0], [0, 1]]), unit([[0, 1], [1, 1]]), None, (0 + np.sqrt(0.5)) / 2),
    (unit([[1, 0], [0, 1]]), unit([[1, 0], [1, 0]]), [True, False], 1.0),
])
def test_feature_agreement_is_the_mean_cosine(f1, f2, mask, expected):
    assert metrics.feature_agreement(f1, f2, mask) == pytest.approx(expected)


def test_feature_agreement_matches_the_formula_on_a_batch():
    rng = np.random.default_rng(0)
    f1, f2 = unit(rng.normal(size=(2, 5, 6, 4))), unit(rng.normal(size=(2, 5, 6, 4)))
    mask = rng.random((2, 5, 6)) > 0.5
    expected = np.mean([f1[index] @ f2[index] for index in zip(*np.nonzero(mask))])
    assert metrics.feature_agreement(f1, f2, mask) == pytest.approx(expected)


@pytest.mark.parametrize("f2_shape, mask, message", [
    ((3, 4), None, r"got \(3, 5\) and \(3, 4\)"),
    ((3, 5), np.zeros(3, bool), "with 0 pixels"),
    ((3, 5), np.ones(4, bool), r"of shape \(3,\), got shape \(4,\)"),
])
def test_feature_agreement_rejects(f2_shape, mask, message):
    with pytest.raises(ValueError, match=message):
        metrics.feature_agreement(np.ones((3, 5)), np.ones(f2_shape), mask)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_feature_agreement_refuses_features_that_are_not_finite_in_the_mask(bad):
    features = np.ones((3, 5))
    features[1, 2] = bad
    mask = np.array([True, True, False])
    with pytest.raises(ValueError, match="feature_agreement: the features are NaN or infinite at 1 pixels of the mask"):
        metrics.feature_agreement(np.ones((3, 5)), features, mask)
    assert metrics.feature_agreement(np.ones((3, 5)), features, ~mask) == 5  # outside the mask: not read


def reference_match_fraction(fa, fb, mask, radius):
    """Every masked pixel, by loops: argmax of the dot product over masked pixels of b, then distance."""
    pixels = [tuple(p) for p in np.argwhere(mask)]
    hits = [max(abs(np.subtract(max(pixels, key=lambda q: fa[p] @ fb[q]), p))) <= radius for p in pixels]
    return np.mean(hits)


def one_hot_positions(shape):
    """Each pixel's feature is the one-hot code of its own position: perfectly distinctive."""
    return np.eye(np.prod(shape)).reshape(*shape, -1)


@pytest.mark.parametrize("fb_of, radius, expected", [
    (lambda f: f, 0, 1.0),                                 # identical features: every pixel finds itself
    (lambda f: np.roll(f, 3, axis=1), 2, 0.0),             # matches 3 px away: outside radius 2
    (lambda f: np.roll(f, 3, axis=1), 3, 1.0),             # ... inside radius 3
    (lambda f: np.ones_like(f), 0, 1 / 36),                # constant features: argmax is the first pixel
])
def test_match_fraction_by_hand(fb_of, radius, expected):
    fa = one_hot_positions((6, 6))
    # np.roll wraps around; on a 6-wide axis a roll by 3 is 3 px either way, so every match is 3 px off
    assert metrics.match_fraction(fa, fb_of(fa), np.ones((6, 6), bool), radius) == pytest.approx(expected)


@pytest.mark.parametrize("seed, radius", [(0, 0), (1, 1), (2, 2)])
def test_match_fraction_matches_the_formula_on_random_features(seed, radius):
    rng = np.random.default_rng(seed)
    fa, fb = unit(rng.normal(size=(7, 8, 3))), unit(rng.normal(size=(7, 8, 3)))
    mask = rng.random((7, 8)) > 0.3
    expected = reference_match_fraction(fa, fb, mask, radius)
    assert metrics.match_fraction(fa, fb, mask, radius, samples=10 ** 6) == pytest.approx(expected)


def test_integer_features_score_as_their_float_values():
    """Their products wrapped around in the integer type: 16 * 16 was 0 in uint8."""
    rng = np.random.default_rng(0)
    fa, fb = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8), rng.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    mask = np.ones((6, 7), bool)
    assert metrics.feature_agreement(fa, fb) == pytest.approx(np.mean(np.sum(fa * 1.0 * fb, -1)))
    for radius in (0, 1):
        assert metrics.match_fraction(fa, fb, mask, radius) == metrics.match_fraction(
            fa.astype(np.float64), fb.astype(np.float64), mask, radius)
    assert metrics.match_fraction(np.array([[[16], [1]]], np.uint8), np.array([[[16], [1]]], np.uint8),
                                  np.ones((1, 2), bool), radius=0) == 0.5


@pytest.mark.parametrize("fb_shape, mask, radius, message", [
    ((4, 5, 2), np.ones((4, 5), bool), 2, r"got \(4, 5, 3\), \(4, 5, 2\)"),
    ((4, 5, 3), np.zeros((4, 5), bool), 2, "with 0 pixels"),
    ((4, 5, 3), np.ones((4, 5), bool), -1, "radius must be a non-negative integer, got -1"),
    ((4, 5, 3), np.ones((4, 5), bool), dict(samples=0), "samples must be a positive integer, got 0"),
])
def test_match_fraction_rejects(fb_shape, mask, radius, message):
    kwargs = radius if isinstance(radius, dict) else dict(radius=radius)
    with pytest.raises(ValueError, match=message):
        metrics.match_fraction(np.ones((4, 5, 3)), np.ones(fb_shape), mask, **kwargs)


@pytest.mark.parametrize("nan_in", ["features_a", "features_b"])
def test_match_fraction_refuses_features_not_finite_in_the_mask(nan_in):
    # b's features shifted by 3 columns: each pixel in columns 3-4 has its match 3 pixels away, outside radius 2
    finite = {"features_a": one_hot_positions((4, 5)), "features_b": np.roll(one_hot_positions((4, 5)), 3, axis=1)}
    features = {name: value.copy() for name, value in finite.items()}
    features[nan_in][1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=f"{nan_in} is NaN or infinite at 1 pixels of the mask"):
        metrics.match_fraction(**features, mask=np.ones((4, 5), bool))
    outside = np.ones((4, 5), bool)
    outside[1, 2] = False  # NaN outside the mask is not looked at: the score of the finite features
    expected = metrics.match_fraction(**finite, mask=outside)
    assert 0 < expected < 1 and metrics.match_fraction(**features, mask=outside) == expected
