"""cifl_tf.descriptors: MIND and MIND-SSC against a NumPy reference written from the papers' formulas."""
import functools
import itertools

import numpy as np
import pytest
import scipy.ndimage as ndi

import tensorflow as tf
from cifl_tf import tiling
from cifl_tf.descriptors import MIND, mirror_pad

# The compared offset pairs (a, b), channel by channel, as the module doc orders them.
PAIRS = {
    (2, "mind"): [((0, 0), (-1, 0)), ((0, 0), (1, 0)), ((0, 0), (0, -1)), ((0, 0), (0, 1))],
    (2, "ssc"): [((-1, 0), (0, -1)), ((-1, 0), (0, 1)), ((1, 0), (0, -1)), ((1, 0), (0, 1))],
    (3, "mind"): [((0, 0, 0), (-1, 0, 0)), ((0, 0, 0), (1, 0, 0)), ((0, 0, 0), (0, -1, 0)),
                  ((0, 0, 0), (0, 1, 0)), ((0, 0, 0), (0, 0, -1)), ((0, 0, 0), (0, 0, 1))],
    (3, "ssc"): [((-1, 0, 0), (0, -1, 0)), ((-1, 0, 0), (0, 1, 0)), ((-1, 0, 0), (0, 0, -1)),
                 ((-1, 0, 0), (0, 0, 1)), ((1, 0, 0), (0, -1, 0)), ((1, 0, 0), (0, 1, 0)),
                 ((1, 0, 0), (0, 0, -1)), ((1, 0, 0), (0, 0, 1)), ((0, -1, 0), (0, 0, -1)),
                 ((0, -1, 0), (0, 0, 1)), ((0, 1, 0), (0, 0, -1)), ((0, 1, 0), (0, 0, 1))],
}


def reference(image, variant, sigma, dilation, clip=True):
    """MIND of one image (*spatial) -> (*spatial, K), pixel by pixel from the formula, unnormalised by l2.

    D(x, k) = sum_p G(p) (I(x + a_k + p) - I(x + b_k + p))^2 with G a Gaussian of SD sigma truncated at
    ceil(3 sigma) and summing to 1, I mirrored beyond its border; V(x) = mean_k D(x, k), clipped to
    [1e-3, 1e3] times its image mean; MIND = exp(-D / V) divided by its max over k.
    """
    radius = int(np.ceil(3 * sigma))
    margin = radius + dilation
    padded = np.pad(image.astype(np.float64), margin, mode="symmetric")
    patch = list(itertools.product(range(-radius, radius + 1), repeat=image.ndim))
    weights = np.array([np.exp(-np.sum(np.square(p)) / (2 * sigma ** 2)) for p in patch])
    weights /= weights.sum()
    pairs = [(np.multiply(a, dilation), np.multiply(b, dilation)) for a, b in PAIRS[image.ndim, variant]]
    distances = np.zeros((*image.shape, len(pairs)))
    for x in np.ndindex(image.shape):
        for k, (a, b) in enumerate(pairs):
            for p, w in zip(patch, weights):
                here = np.add(x, margin) + p
                distances[x + (k,)] += w * (padded[tuple(here + a)] - padded[tuple(here + b)]) ** 2
    variance = distances.mean(-1, keepdims=True)
    if clip:
        variance = variance.clip(variance.mean() * 1e-3, variance.mean() * 1e3)
    mind = np.exp(-distances / variance)
    return mind / mind.max(-1, keepdims=True)


def smooth_image(shape, seed=0):
    """A random image with structure at a few pixels' scale, (*shape) float32 in about [0, 1]."""
    noise = np.random.default_rng(seed).uniform(size=shape)
    return ndi.gaussian_filter(noise, 1.0).astype(np.float32) * 3


@functools.lru_cache
def smooth_reference(shape, variant, sigma, dilation):
    """reference() of smooth_image(shape), read-only, computed once per case: its loops take seconds in 3D."""
    expected = reference(smooth_image(shape), variant, sigma, dilation)
    expected.setflags(write=False)
    return expected


def describe(layer, image):
    return layer(image[np.newaxis, ..., np.newaxis]).numpy()[0]


CASES = [  # ndim, variant, sigma, dilation, shape
    (2, "mind", 0.5, 1, (12, 14)),
    (2, "ssc", 0.8, 2, (12, 11)),
    (3, "mind", 0.5, 1, (7, 8, 6)),
    (3, "ssc", 0.5, 2, (7, 6, 8)),
    (2, "mind", 0.8, 2, (2, 5)),  # the mirrored margin (5) is longer than an axis: mirrored again
    (3, "ssc", 0.5, 1, (2, 3, 1)),
]


@pytest.mark.parametrize("ndim, variant, sigma, dilation, shape", CASES)
def test_matches_the_numpy_reference(ndim, variant, sigma, dilation, shape):
    image = smooth_image(shape)
    layer = MIND(ndim, variant, sigma, dilation, l2_normalize=False)
    expected = smooth_reference(shape, variant, sigma, dilation)
    assert layer.channels == len(PAIRS[ndim, variant]) == expected.shape[-1]
    np.testing.assert_allclose(describe(layer, image), expected, rtol=1e-4, atol=1e-5)
    normalized = describe(MIND(ndim, variant, sigma, dilation), image)
    np.testing.assert_allclose(normalized, expected / np.linalg.norm(expected, axis=-1, keepdims=True),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["mind", "ssc"])
def test_matches_the_numpy_reference_where_the_variance_is_clipped(variant):
    # faint noise beside a bright block: the flat region's V falls below 1e-3 of the image's mean V
    image = np.random.default_rng(1).normal(0.1, 1e-3, (12, 14)).astype(np.float32)
    image[4:9, 5:10] = 1
    expected = reference(image, variant, 0.5, 1)
    assert np.abs(expected - reference(image, variant, 0.5, 1, clip=False)).max() > 0.1  # the clip acts here
    np.testing.assert_allclose(describe(MIND(2, variant, 0.5, 1, l2_normalize=False), image), expected,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ndim, variant, channels", [(2, "mind", 4), (2, "ssc", 4), (3, "mind", 6), (3, "ssc", 12)])
def test_channels_and_their_normalisations(ndim, variant, channels):
    images = np.stack([smooth_image((10,) * ndim, seed) for seed in range(2)])[..., np.newaxis]
    raw = MIND(ndim, variant, l2_normalize=False)(images).numpy()
    assert raw.shape == (2, *(10,) * ndim, channels) and MIND(ndim, variant).channels == channels
    assert raw.min() > 0
    np.testing.assert_allclose(raw.max(-1), 1, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(MIND(ndim, variant)(images), axis=-1), 1, rtol=1e-5)


@pytest.mark.parametrize("gain, offset", [(2.5, 0.3), (-0.7, 1.0), (1e-3, 0.0)])
@pytest.mark.parametrize("variant", ["mind", "ssc"])
def test_invariant_to_affine_intensity_changes_and_inversion(variant, gain, offset):
    image = smooth_image((16, 18))
    layer = MIND(2, variant)
    np.testing.assert_allclose(describe(layer, gain * image + offset), describe(layer, image), atol=2e-4)


@pytest.mark.parametrize("remap", [np.sqrt, lambda x: 1 - x ** 3, lambda x: np.exp(4 * x)])
def test_a_monotone_remap_of_two_tissues_keeps_the_descriptor(remap):
    # On two intensity levels every monotone remap acts as an affine map, which MIND ignores; a
    # descriptor of the intensities themselves would not.
    labels = np.zeros((20, 20), np.float32)
    labels[4:12, 5:15] = 1
    labels[13:17, 2:9] = 1
    image = 0.2 + 0.6 * labels
    layer = MIND(2, "ssc")
    np.testing.assert_allclose(describe(layer, remap(image)), describe(layer, image), atol=1e-4)
    assert np.ptp(describe(layer, image), axis=(0, 1)).min() > 0.1  # and it does describe the shapes


def test_complex_images_are_refused_not_cut_to_their_real_part():
    images = np.ones((1, 8, 9, 1)) + 1j
    with pytest.raises(TypeError, match="MIND\\(ndim=2\\): images must be real intensities, got complex128"):
        MIND(2)(images)
    with pytest.raises(TypeError, match="images must be real intensities"):
        tiling.tiled_features(MIND(2), images[0, ..., 0])
    assert MIND(2).distances(images.real.astype(np.float32)).shape == (1, 8, 9, 4)  # NumPy input, as before


def test_constant_and_zero_images_give_equal_channels():
    layer = MIND(3, "ssc")
    for value in (0.0, 0.6):
        out = describe(layer, np.full((6, 6, 6), value, np.float32))
        np.testing.assert_allclose(out, 1 / np.sqrt(12), rtol=1e-6)


@pytest.mark.parametrize("ndim, variant, bad", [(2, "mind", np.nan), (3, "ssc", np.nan), (2, "ssc", np.inf)])
def test_a_non_finite_pixel_spoils_only_its_receptive_field(ndim, variant, bad):
    layer = MIND(ndim, variant)
    image = np.random.default_rng(0).random((20,) * ndim).astype(np.float32)
    spoilt = image.copy()
    spoilt[(10,) * ndim] = bad  # a masked background: the variance clip's image mean was NaN everywhere
    far = np.ones(image.shape, bool)
    far[(slice(10 - 2 * layer.receptive_radius, 11 + 2 * layer.receptive_radius),) * ndim] = False
    clean, out = describe(layer, image), describe(layer, spoilt)
    assert not np.all(np.isfinite(out))
    np.testing.assert_allclose(out[far], clean[far], rtol=1e-5)


def test_config_round_trip_and_registration():
    layer = MIND(3, "ssc", sigma=0.8, dilation=2, l2_normalize=False, name="descriptor")
    clone = MIND.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.get_config()["variant"] == "ssc" and clone.channels == 12
    assert tf.keras.utils.get_registered_object("cifl_tf>MIND") is MIND
    assert not layer.weights


def test_model_saves_and_loads_in_safe_mode(tmp_path):
    inputs = tf.keras.Input((None, None, 1))
    model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(2, 1)(MIND(variant="ssc", dilation=2)(inputs)))
    model.save(tmp_path / "model.keras")
    loaded = tf.keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert isinstance(loaded.layers[1], MIND) and loaded.layers[1].get_config() == model.layers[1].get_config()
    x = smooth_image((16, 12))[np.newaxis, ..., np.newaxis]
    np.testing.assert_array_equal(loaded(x), model(x))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(ndim=4), ValueError, "ndim must be 2 or 3, got 4"),
    (dict(variant="mind-ssc"), ValueError, "variant must be one of ('mind', 'ssc'), got 'mind-ssc'"),
    (dict(sigma=0), ValueError, "sigma must be a positive number, got 0"),
    (dict(sigma=float("inf")), ValueError, "sigma must be a positive number, got inf"),
    (dict(ndim=2.0), ValueError, "ndim must be 2 or 3, got 2.0"),
    (dict(dilation=1.5), ValueError, "dilation must be a positive integer, got 1.5"),
    (dict(dilation=np.float64(2)), ValueError, "dilation must be a positive integer, got np.float64(2.0)"),
    (dict(sigma=np.float32(-0.5)), ValueError, "sigma must be a positive number, got np.float32(-0.5)"),
    (dict(l2_normalize="yes"), TypeError, "l2_normalize must be True or False, got 'yes'"),
])
def test_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        MIND(**kwargs)


@pytest.mark.parametrize("ndim, variant, sigma, dilation", [(2, "mind", 0.5, 1), (2, "ssc", 0.8, 2),
                                                             (2, "mind", 3.0, 1), (3, "ssc", 0.5, 2)])
def test_the_stated_receptive_radius_is_the_measured_one(ndim, variant, sigma, dilation):
    layer = MIND(ndim, variant, sigma, dilation)
    assert layer.receptive_radius == tiling.measured_radius(layer) == dilation + np.ceil(3 * sigma)


@pytest.mark.parametrize("shape", [(1, 8, 8, 8, 1), (1, 8, 8, 2), (24, 24, 1)])  # unbatched: oneDNN aborted
@pytest.mark.parametrize("built", [False, True], ids=["first-input", "built"])
def test_inputs_must_be_single_channel_images_of_its_rank(shape, built):
    layer = MIND(2)
    if built:  # build() checked the first input only
        layer(np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match=r"MIND\(ndim=2\) expects single-channel inputs of rank 4"):
        layer(np.zeros(shape, np.float32))


@pytest.fixture
def global_policy():
    """tf.keras.mixed_precision.set_global_policy, the policy float32 again after the test."""
    yield tf.keras.mixed_precision.set_global_policy
    tf.keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy, kwargs", [("mixed_bfloat16", {}), ("mixed_float16", {}),
                                            ("float32", dict(dtype="mixed_bfloat16"))],
                         ids=["global-bfloat16", "global-float16", "own-bfloat16"])
@pytest.mark.parametrize("l2_normalize", [True, False])
@pytest.mark.parametrize("ndim, variant, sigma, dilation, shape", [CASES[0], CASES[3]])  # 2D MIND, 3D SSC
def test_computes_in_float32_whatever_the_dtype_policy(global_policy, policy, kwargs, l2_normalize, ndim, variant,
                                                      sigma, dilation, shape):
    image = smooth_image(shape)
    expected = smooth_reference(shape, variant, sigma, dilation)
    if l2_normalize:
        expected = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
    global_policy(policy)
    out = MIND(ndim, variant, sigma, dilation, l2_normalize, **kwargs)(image[np.newaxis, ..., np.newaxis])[0]
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size, margin", [(6, 2), (6, 6), (2, 5), (1, 3)])
def test_mirror_pad_is_numpys_symmetric_pad_for_any_margin(size, margin):
    images = np.random.default_rng(size).uniform(size=(2, size, 3, 1)).astype(np.float32)
    expected = np.pad(images, [(0, 0), (margin, margin), (0, 0), (0, 0)], mode="symmetric")
    np.testing.assert_array_equal(mirror_pad(images, margin, 1), expected)
    unknown = tf.function(lambda x: mirror_pad(x, margin, 1), input_signature=[tf.TensorSpec((2, None, 3, 1))])
    np.testing.assert_array_equal(unknown(images), expected)
