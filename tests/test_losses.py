"""cifl_tf.losses: paper Eq. 1 (method page, section 3) against a NumPy reference written from the formula."""
import re

import numpy as np
import pytest

import cifl_tf
import tensorflow as tf
import voxelmorph as vxm
from cifl_tf import ContrastiveLoss, contrastive_loss
from cifl_tf.losses import multiscale_contrastive_loss, pixel_contrastive_loss


def eq1_reference(f1, f2, tau_a, tau_b, tau_g):
    """Eq. 1 per sample, straight from the formula: plain loops, np.exp, float64 (no log-sum-exp)."""
    losses = []
    for x1, x2 in zip(np.asarray(f1, np.float64), np.asarray(f2, np.float64)):
        channels = x1.shape[-1]
        u, v = x1.reshape(-1, channels), x2.reshape(-1, channels)
        s = lambda a, b: np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
        numerator = sum(np.exp(s(u[:, c], v[:, c]) / tau_a) for c in range(channels))
        denominator = sum(np.exp(s(u[:, c], v[:, c]) / tau_b) for c in range(channels))
        denominator += sum(np.exp(s(u[:, c], u[:, k]) / tau_g)
                           for c in range(channels) for k in range(channels) if k != c)
        losses.append(-np.log(numerator / denominator))
    return np.array(losses)


def features(shape, seed, offset=0.0, agreement=0.5):
    """Random feature pair (B, *spatial, C): view 2 = agreement * view 1 + noise; `offset` spreads the cosines."""
    rng = np.random.default_rng(seed)
    f1 = rng.normal(size=shape) + offset * rng.uniform(size=shape[-1])
    f2 = agreement * f1 + rng.normal(size=shape)
    return f1.astype(np.float32), f2.astype(np.float32)


# (batch + spatial + C, temperatures (alpha, beta, gamma), offset, seed); cos / tau stays <= 100 here.
CASES = [
    ((2, 8, 8, 4), (1.0, 1.0, 1.0), 0.0, 0),
    ((3, 6, 7, 3), (1.0, 1.0, 0.1), 1.0, 1),
    ((2, 5, 5, 5, 4), (0.5, 2.0, 0.01), 2.0, 2),
    ((2, 4, 6, 5, 2), (1.0, 1.0, 0.01), 0.5, 3),
    ((2, 9, 9, 6), (0.1, 0.1, 0.1), 3.0, 4),
    ((1, 3, 4, 5, 5), (2.0, 0.5, 1.0), 1.0, 5),
    ((2, 8, 8, 1), (1.0, 1.0, 0.1), 0.0, 6),  # C = 1: no c' != c terms
]


@pytest.mark.parametrize("shape, taus, offset, seed", CASES)
def test_matches_reference(shape, taus, offset, seed):
    f1, f2 = features(shape, seed, offset)
    expected = eq1_reference(f1, f2, *taus)
    per_sample = contrastive_loss(f1, f2, *taus, per_sample=True)
    np.testing.assert_allclose(per_sample, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(contrastive_loss(f1, f2, *taus), expected.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ContrastiveLoss(*taus)(f1, f2), expected.mean(), rtol=1e-5, atol=1e-5)


def block_means(f, scale):
    """f (B, *spatial, C) averaged over scale^ndim blocks, the incomplete ones at the far ends dropped."""
    spatial = [n // scale for n in f.shape[1:-1]]
    f = f[(slice(None), *(slice(0, n * scale) for n in spatial))]
    blocks = f.reshape([f.shape[0]] + [x for n in spatial for x in (n, scale)] + [f.shape[-1]])
    return blocks.mean(axis=tuple(range(2, 2 * len(spatial) + 1, 2)))


@pytest.mark.parametrize("shape, scales, taus, seed", [
    ((2, 8, 8, 4), (1,), (1.0, 1.0, 0.1), 0),
    ((2, 8, 8, 4), (1, 2, 4), (1.0, 1.0, 0.1), 1),
    ((3, 9, 7, 3), (2, 3), (1.0, 1.0, 1.0), 2),   # blocks that do not tile the image
    ((2, 6, 8, 4, 2), (1, 2), (0.5, 2.0, 0.1), 3),
    ((1, 12, 10, 5), (4,), (1.0, 1.0, 0.01), 4),
])
def test_multiscale_loss_is_the_mean_of_eq1_on_pooled_features(shape, scales, taus, seed):
    f1, f2 = features(shape, seed, offset=1.0)
    expected = np.mean([eq1_reference(block_means(f1, s), block_means(f2, s), *taus).mean() for s in scales])
    np.testing.assert_allclose(multiscale_contrastive_loss(f1, f2, scales, *taus), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scales", [(), (0, 1), (1, 1), (1.5,), (True,), "12", 2])
def test_multiscale_loss_refuses_bad_scales(scales):
    f1, f2 = features((1, 8, 8, 2), seed=0)
    with pytest.raises(ValueError, match=r"scales must be .*positive integers such as \(1, 2, 4\), got"):
        multiscale_contrastive_loss(f1, f2, scales)


def pixel_nce_reference(f1, f2, stride, temperature, max_pixels=1024):
    """InfoNCE over the grid pixels, straight from the formula: loops over samples, pixels and directions, float64."""
    losses = []
    for x1, x2 in zip(np.asarray(f1, np.float64), np.asarray(f2, np.float64)):
        grid = tuple(slice(None, None, stride) for _ in range(x1.ndim - 1))
        a, b = x1[grid].reshape(-1, x1.shape[-1]), x2[grid].reshape(-1, x2.shape[-1])
        every = int(np.ceil(len(a) / max_pixels))
        a, b = a[::every], b[::every]
        for query, keys in ((a, b), (b, a)):
            for p in range(len(query)):
                scores = np.exp(keys @ query[p] / temperature)
                losses.append(-np.log(scores[p] / scores.sum()))
    return np.mean(losses)


@pytest.mark.parametrize("shape, stride, temperature, max_pixels, seed", [
    ((2, 8, 8, 4), 1, 1.0, 1024, 0),
    ((2, 9, 7, 3), 2, 0.5, 1024, 1),     # grids that do not tile the image
    ((3, 10, 10, 5), 3, 0.1, 1024, 2),
    ((2, 6, 5, 4, 2), 2, 0.8, 1024, 3),  # 3D
    ((1, 4, 4, 3), 5, 1.0, 1024, 4),     # one grid pixel: its own positive only, loss 0
    ((2, 9, 9, 4), 1, 0.01, 1024, 5),
    ((2, 7, 6, 5, 3), 1, 0.5, 50, 6),    # 210 grid pixels, every 5th kept
])
def test_pixel_contrastive_loss_matches_reference(shape, stride, temperature, max_pixels, seed):
    f1, f2 = features(shape, seed)
    f1 /= np.linalg.norm(f1, axis=-1, keepdims=True)  # the encoder's unit vectors
    f2 /= np.linalg.norm(f2, axis=-1, keepdims=True)
    np.testing.assert_allclose(pixel_contrastive_loss(f1, f2, stride, temperature, max_pixels),
                               pixel_nce_reference(f1, f2, stride, temperature, max_pixels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stride=0), "stride must be a positive integer, got 0"),
    (dict(stride=1.5), "stride must be a positive integer, got 1.5"),
    (dict(temperature=0), "temperature must be a positive number, got 0"),
    (dict(max_pixels=0), "max_pixels must be a positive integer, got 0"),
])
def test_pixel_contrastive_loss_refuses_bad_arguments(kwargs, message):
    f1, f2 = features((1, 8, 8, 2), seed=0)
    with pytest.raises(ValueError, match=message):
        pixel_contrastive_loss(f1, f2, **kwargs)


def test_pixel_contrastive_loss_refuses_features_of_other_shapes():
    f1, _ = features((1, 8, 8, 2), seed=0)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_contrastive_loss(f1, f1[:, :4])


def test_matching_pixels_lower_the_pixel_contrastive_loss():
    f1, f2 = features((2, 10, 10, 8), seed=7)
    f1 /= np.linalg.norm(f1, axis=-1, keepdims=True)
    shuffled = np.random.default_rng(0).permutation(f1.reshape(2, -1, 8), axis=1).reshape(f1.shape)
    assert pixel_contrastive_loss(f1, f1, 1) < pixel_contrastive_loss(f1, shuffled, 1)


@pytest.mark.parametrize("taus", [(1.0, 1.0, 0.1), (1.0, 1.0, 1.0), (0.5, 2.0, 0.01)])
def test_agreeing_views_lower_the_loss(taus):
    f1, f2 = features((2, 8, 8, 6), seed=7)
    assert contrastive_loss(f1, f1, *taus) < contrastive_loss(f1, f2, *taus)


@pytest.mark.parametrize("taus", [(1.0, 1.0, 0.1), (1.0, 1.0, 1.0), (0.5, 2.0, 0.01)])
def test_identical_channels_raise_the_loss(taus):
    f1, _ = features((2, 8, 8, 6), seed=8)
    collapsed = np.repeat(f1[..., :1], 6, axis=-1)
    assert contrastive_loss(collapsed, collapsed, *taus) > contrastive_loss(f1, f1, *taus)


def constant(shape):
    return np.ones(shape, np.float32) * np.arange(1, shape[-1] + 1, dtype=np.float32)


@pytest.mark.parametrize("kind, make", [
    ("random", lambda shape: features(shape, seed=9)),
    ("constant", lambda shape: (constant(shape), 2 * constant(shape))),
    ("zeros", lambda shape: (np.zeros(shape, np.float32),) * 2),
])
@pytest.mark.parametrize("taus", [(1.0, 1.0, 0.01), (0.01, 0.01, 0.01), (0.01, 1.0, 0.01)])
def test_value_and_gradient_finite(kind, make, taus):
    f1, f2 = (tf.Variable(f) for f in make((2, 6, 6, 4)))
    with tf.GradientTape() as tape:
        loss = contrastive_loss(f1, f2, *taus)
    gradients = tape.gradient(loss, [f1, f2])
    assert np.isfinite(loss.numpy()) and all(np.isfinite(g.numpy()).all() for g in gradients)
    if kind == "zeros":  # every cosine is 0: -log(C / (C + C(C-1))) = log C
        np.testing.assert_allclose(loss, np.log(4), rtol=1e-6)
    else:  # float32 cosines are off by ~1e-7, and 1 / tau = 100 amplifies that
        np.testing.assert_allclose(loss, eq1_reference(f1.numpy(), f2.numpy(), *taus).mean(), atol=1e-4)


@pytest.mark.parametrize("taus, message", [
    ((0.0, 1.0, 0.1), "tau_alpha must be a positive number, got 0.0"),
    ((1.0, -1.0, 0.1), "tau_beta must be a positive number, got -1.0"),
    ((1.0, 1.0, "0.1"), "tau_gamma must be a positive number, got '0.1'"),
    ((1.0, float("inf"), 0.1), "tau_beta must be a positive number, got inf"),
])
def test_non_positive_temperatures_raise(taus, message):
    f1, f2 = features((1, 4, 4, 2), seed=0)
    for make_loss in (lambda: contrastive_loss(f1, f2, *taus), lambda: ContrastiveLoss(*taus)):
        with pytest.raises(ValueError, match=message):
            make_loss()


@pytest.mark.parametrize("shape1, shape2", [((2, 8, 8, 4), (2, 8, 8, 3)), ((2, 8, 8, 4), (2, 8, 6, 4)),
                                            ((2, 8, 4), (2, 8, 4, 1))])
def test_mismatched_shapes_raise(shape1, shape2):
    with pytest.raises(ValueError, match="differ in shape"):
        contrastive_loss(np.ones(shape1, np.float32), np.ones(shape2, np.float32))


def test_contrastive_loss_config_round_trip():
    loss = ContrastiveLoss(0.5, 2.0, 0.01, name="eq1")
    restored = tf.keras.losses.deserialize(tf.keras.losses.serialize(loss))  # via the registered name
    assert isinstance(restored, ContrastiveLoss) and restored.get_config() == loss.get_config()
    assert ContrastiveLoss.from_config(loss.get_config()).get_config() == loss.get_config()
    f1, f2 = features((2, 6, 6, 3), seed=10)
    assert restored(f1, f2).numpy() == loss(f1, f2).numpy() == cifl_tf.contrastive_loss(f1, f2, 0.5, 2.0, 0.01)


def local_ncc_reference(fixed, moved, window, eps=1e-5, signed=False):
    """voxelmorph's local NCC map straight from its formula: explicit zero-padded windows, float64."""
    fixed, moved = np.asarray(fixed, np.float64), np.asarray(moved, np.float64)
    spatial = fixed.shape[1:-1]
    before = [(w - 1) // 2 for w in window]
    pad = [(0, 0)] + [(b, w - 1 - b) for b, w in zip(before, window)] + [(0, 0)]
    padded = {name: np.pad(image, pad) for name, image in
              (("I", fixed), ("J", moved), ("I2", fixed ** 2), ("J2", moved ** 2), ("IJ", fixed * moved))}
    n = np.prod(window) * fixed.shape[-1]
    cc = np.zeros(fixed.shape[:-1])
    for b in range(fixed.shape[0]):
        for voxel in np.ndindex(*spatial):
            box = (b, *(slice(v, v + w) for v, w in zip(voxel, window)))
            s = {name: image[box].sum() for name, image in padded.items()}
            mean_i, mean_j = s["I"] / n, s["J"] / n
            cross = max(s["IJ"] - mean_j * s["I"] - mean_i * s["J"] + mean_i * mean_j * n, eps)
            var_i = max(s["I2"] - 2 * mean_i * s["I"] + mean_i ** 2 * n, eps)
            var_j = max(s["J2"] - 2 * mean_j * s["J"] + mean_j ** 2 * n, eps)
            cc[(b, *voxel)] = cross / np.sqrt(var_i * var_j + eps) if signed else cross ** 2 / (var_i * var_j)
    return cc[..., np.newaxis]


# (shape (B, *spatial, F), win, signed): voxelmorph's default 9^ndim window, odd and even windows, channels.
NCC_CASES = [
    ((2, 12, 11, 1), None, False),
    ((1, 10, 9, 8, 1), None, False),
    ((2, 9, 10, 3), 5, False),
    ((1, 7, 8, 6, 2), [3, 4, 5], True),
    ((1, 13, 2), 4, False),
]


@pytest.mark.parametrize("shape, win, signed", NCC_CASES)
def test_ncc_matches_the_formula_and_voxelmorph(shape, win, signed):
    rng = np.random.default_rng(len(shape))
    fixed = rng.uniform(size=shape).astype(np.float32)
    moved = (0.5 * fixed + rng.uniform(size=shape)).astype(np.float32)  # correlated, with noise
    window = [9] * (len(shape) - 2) if win is None else win if isinstance(win, list) else [win] * (len(shape) - 2)
    ours = cifl_tf.losses.NCC(win=win, signed=signed)
    np.testing.assert_allclose(ours.ncc(tf.constant(fixed), tf.constant(moved)),
                               local_ncc_reference(fixed, moved, window, signed=signed), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.loss(fixed, moved),
                               vxm.losses.NCC(win=win, signed=signed).loss(tf.constant(fixed), tf.constant(moved)),
                               rtol=1e-4, atol=1e-5)


def test_ncc_gradient_matches_voxelmorph():
    rng = np.random.default_rng(0)
    fixed = tf.constant(rng.uniform(size=(1, 10, 11, 9, 1)).astype(np.float32))
    moved = tf.Variable(rng.uniform(size=(1, 10, 11, 9, 1)).astype(np.float32))
    gradients = []
    for loss in (cifl_tf.losses.NCC().loss, vxm.losses.NCC().loss):
        with tf.GradientTape() as tape:
            value = loss(fixed, moved)
        gradients.append(tape.gradient(value, moved).numpy())
    np.testing.assert_allclose(gradients[0], gradients[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("win, shape, message", [
    (None, (2, 3), r"NCC: images need shape \(B, \*spatial, F\)"),
    ([9, 9], (1, 6, 6, 6, 1), r"one per spatial axis \(3\), got \[9, 9\]"),
    (0, (1, 6, 6, 1), r"got 0"),
    (True, (1, 6, 6, 1), r"got True"),
    ((3, 2.5), (1, 6, 6, 1), r"got \(3, 2.5\)"),
])
def test_ncc_rejects_bad_images_and_windows(win, shape, message):
    with pytest.raises(ValueError, match=message):
        cifl_tf.losses.NCC(win=win).loss(np.ones(shape, np.float32), np.ones(shape, np.float32))


@pytest.mark.parametrize("true_shape", [(1, 12, 12, 1), (1, 12, 10, 3), (2, 12, 12, 3)])
def test_ncc_rejects_images_of_other_shapes(true_shape):
    with pytest.raises(ValueError, match=rf"NCC: y_true \({', '.join(map(str, true_shape))}\) and y_pred "
                                         r"\(1, 12, 12, 3\) differ"):
        cifl_tf.losses.NCC().loss(np.ones(true_shape, np.float32), np.ones((1, 12, 12, 3), np.float32))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"eps": 0}, ValueError, r"NCC: eps must be a positive number .*got 0$"),
    ({"eps": -1e-5}, ValueError, r"got -1e-05$"),
    ({"eps": "1e-5"}, ValueError, r"got '1e-5'$"),
    ({"signed": "yes"}, TypeError, r"NCC: signed must be True or False, got 'yes'"),
])
def test_ncc_rejects_bad_eps_and_signed(kwargs, error, message):
    with pytest.raises(error, match=message):
        cifl_tf.losses.NCC(**kwargs)


def test_contrastive_loss_refuses_a_per_sample_that_is_not_a_bool():
    f1, f2 = features((2, 4, 4, 2), seed=0)
    with pytest.raises(TypeError, match="per_sample must be True or False, got 'no'"):
        contrastive_loss(f1, f2, per_sample="no")


@pytest.mark.parametrize("dtype, given, rtol", [
    (np.float16, np.float16, 1e-2),  # the squared sums of images in [0, 100] overflowed 16 bits: NaN
    (np.int16, np.float32, 1e-5),  # computed in int16 before: 0
])
def test_ncc_of_16_bit_and_integer_images_is_computed_in_float32(dtype, given, rtol):
    fixed, moved = (np.random.default_rng(seed).uniform(0, 100, (1, 16, 16, 1)).astype(dtype) for seed in (0, 1))
    moved = ((fixed.astype(np.float64) + moved) / 2).astype(dtype)
    loss = cifl_tf.losses.NCC().loss(fixed, moved)
    assert loss.dtype == given
    expected = -local_ncc_reference(fixed, moved, [9, 9]).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(np.float32(loss), expected, rtol=rtol)


def test_pixel_contrastive_loss_takes_any_max_pixels():
    f1, f2 = features((1, 8, 8, 4), seed=0)  # every = ceil(64 / max_pixels) overflowed int32 from 2^31 on
    for max_pixels in (2 ** 31 - 1, 2 ** 31, 10 ** 12):
        np.testing.assert_allclose(pixel_contrastive_loss(f1, f2, 1, 0.1, max_pixels),
                                   pixel_contrastive_loss(f1, f2, 1, 0.1, 64), rtol=1e-6)


def test_numpy_bools_are_bools():
    f1, f2 = features((2, 4, 4, 2), seed=0)
    np.testing.assert_array_equal(contrastive_loss(f1, f2, per_sample=np.True_),
                                  contrastive_loss(f1, f2, per_sample=True))
    assert cifl_tf.losses.NCC(signed=np.True_).signed is True


def test_ncc_takes_a_tuple_window_as_a_list():
    fixed, moved = (np.random.default_rng(seed).uniform(size=(1, 8, 7, 1)).astype(np.float32) for seed in (0, 1))
    np.testing.assert_allclose(cifl_tf.losses.NCC(win=(3, 5)).loss(fixed, moved),
                               cifl_tf.losses.NCC(win=[3, 5]).loss(fixed, moved))


def test_numpy_temperatures_are_numbers_and_16_bit_zero_features_give_a_finite_loss():
    f1, f2 = features((1, 4, 4, 3), seed=0)
    np.testing.assert_allclose(contrastive_loss(f1, f2, np.float32(1), np.int64(1), np.float32(0.1)),
                               contrastive_loss(f1, f2, 1.0, 1.0, 0.1), rtol=1e-6)
    zeros = np.zeros((1, 4, 4, 3), np.float16)  # l2_normalize's epsilon underflows in 16 bits
    np.testing.assert_allclose(contrastive_loss(zeros, zeros), contrastive_loss(zeros.astype(np.float32),
                                                                                  zeros.astype(np.float32)))
    assert np.isfinite(contrastive_loss(zeros, zeros))


def test_multiscale_loss_refuses_a_scale_larger_than_the_features():
    f1, f2 = features((1, 4, 5, 2), seed=0)
    with pytest.raises(ValueError, match="scale 8 is larger than the features' spatial size 4"):
        multiscale_contrastive_loss(f1, f2, (1, 8))


@pytest.mark.parametrize("shape1, shape2, message", [
    ((1, 8, 8, 3), (1, 9, 9, 3), r"f1 \(1, 8, 8, 3\) and f2 \(1, 9, 9, 3\) differ in shape"),  # both pool to 4x4
    ((8, 3), (8, 3), r"features need shape \(B, \*spatial, C\)"),
])
def test_multiscale_loss_refuses_features_that_are_no_aligned_pair_before_pooling(shape1, shape2, message):
    f1, f2 = features(shape1, seed=0)[0], features(shape2, seed=1)[1]
    with pytest.raises(ValueError, match=f"multiscale_contrastive_loss: {message}"):
        multiscale_contrastive_loss(f1, f2, (2,))


@pytest.mark.parametrize("loss", [contrastive_loss, cifl_tf.losses.pixel_contrastive_loss,
                                  cifl_tf.losses.multiscale_contrastive_loss])
@pytest.mark.parametrize("shape", [(0, 8, 8, 4), (2, 0, 8, 4)])
def test_contrastive_losses_refuse_empty_features(loss, shape):
    # an empty batch gave NaN, and images of no pixels the constant log C
    f = tf.zeros(shape)
    with pytest.raises(ValueError, match=re.escape(f"the features are empty, shapes {tf.TensorShape(shape)}")):
        loss(f, f)


def test_contrastive_loss_refuses_features_that_are_not_numbers():
    with pytest.raises(TypeError, match="contrastive_loss: features must be real numbers, got string and string"):
        contrastive_loss(tf.constant([[["a"]]]), tf.constant([[["b"]]]))
