"""cifl_tf.synth: synthetic contrast pairs (method page, section 1)."""
import functools
import re

import numpy as np
import pytest

import cifl_tf  # noqa: F401  (Keras 2 before tensorflow)
import tensorflow as tf
from cifl_tf import checkpoint, experiments, models
from cifl_tf.synth import FWHM_SD, ShapesSynth, _resolution_matrix, batch_key, contrast_pairs
from cifl_tf.training import train_encoder

FINE = dict(label_scales=(2, 4, 8))  # shapes small enough for 32x32 / 16^3 images


def first_batches(shape, seed, batch_size=2, count=2, start=0):
    """The first `count` batches of a freshly built contrast_pairs dataset, as (count, 2, B, *shape, 1)."""
    return np.array([[x.numpy() for x in pair]
                     for pair in contrast_pairs(shape, batch_size, seed=seed, start=start).take(count)])


cached_batches = functools.lru_cache(first_batches)


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)], ids=["2d", "3d"])
def test_contrast_pairs_are_varied_image_pairs(shape):
    batches = cached_batches(shape, seed=0)
    assert batches.shape == (2, 2, 2, *shape, 1) and batches.dtype == np.float32
    assert np.isfinite(batches).all()
    # min-max normalised per image (all 0 if the background fills it and is zeroed); gamma keeps 0 and 1
    spatial = tuple(range(3, batches.ndim))
    np.testing.assert_allclose(batches.min(axis=spatial), 0, atol=1e-6)
    assert set(np.round(batches.max(axis=spatial), 5).ravel()) <= {0, 1}
    first = batches[0]
    assert not np.array_equal(first[0], first[1])            # the two views differ
    assert not np.array_equal(first[:, 0], first[:, 1])      # so do the samples of a batch
    assert not np.array_equal(batches[0], batches[1])        # and successive batches


def test_same_seed_same_batches():
    batches = cached_batches((32, 32), seed=0)
    np.testing.assert_array_equal(first_batches((32, 32), seed=0), batches)
    assert np.abs(first_batches((32, 32), seed=1) - batches).mean() > 0.05


def test_no_seed_differs_every_time():
    assert np.abs(first_batches((32, 32), seed=None, count=1) - first_batches((32, 32), seed=None, count=1)).mean() > 0.05


@pytest.fixture(scope="module")
def made_one_by_one():
    """The first 3 batches of the seed-0 stream's views, each made alone by ShapesSynth from its batch index."""
    synth = tf.function(ShapesSynth((32, 32), seed=0))
    return [[view.numpy() for view in synth(tf.constant(index, tf.int64), 2)[1:]] for index in range(3)]


@pytest.mark.parametrize("threads", [1, 4])
def test_batches_do_not_depend_on_parallelism(made_one_by_one, threads):
    """The stream (parallel map) equals batches made one by one, however many threads make them."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    stream = contrast_pairs((32, 32), 2, seed=0).with_options(options).take(3)
    for pair, alone in zip(stream, made_one_by_one, strict=True):
        for streamed, view in zip(pair, alone, strict=True):
            np.testing.assert_allclose(streamed.numpy(), view, atol=1e-6)


def test_stream_starts_at_any_batch():
    batches = cached_batches((32, 32), seed=0)
    np.testing.assert_array_equal(first_batches((32, 32), seed=0, count=1, start=1), batches[1:2])


def r_squared(image, labels):
    """Fraction of the image's variance that one mean per label explains."""
    image, labels = image.ravel().astype(np.float64), labels.ravel()
    fitted = np.zeros_like(image)
    for label in np.unique(labels):
        fitted[labels == label] = image[labels == label].mean()
    return 1 - ((image - fitted) ** 2).sum() / ((image - image.mean()) ** 2).sum()


def reversed_orders(x1, x2, labels):
    """Fraction of label pairs whose mean intensities are ordered oppositely in x1 and x2."""
    means = [np.array([x[labels == label].mean() for label in np.unique(labels)]) for x in (x1, x2)]
    signs = [np.sign(m[:, None] - m[None, :]) for m in means]
    return (signs[0] * signs[1] < 0).sum() / (signs[0] != 0).sum()


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)], ids=["2d", "3d"])
def test_views_share_anatomy_in_different_contrasts(shape):
    labels, x1, x2 = (x.numpy() for x in ShapesSynth(shape, seed=0, **FINE)(0, 3))
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 16
    for b in range(3):
        other = labels[(b + 1) % 3]
        assert len(np.unique(labels[b])) >= 6
        for x in (x1[b], x2[b]):  # the label map explains both renders, another map does not
            explained = r_squared(x, labels[b])
            assert explained > 0.3 and explained > r_squared(x, other) + 0.1
        assert reversed_orders(x1[b], x2[b], labels[b]) > 0.15   # intensities are drawn independently
        assert np.abs(x1[b] - x2[b]).mean() > 0.05


def test_warp_deforms_the_label_map():
    def label_map(warp_std):
        return ShapesSynth((32, 32), seed=0, warp_std=warp_std, **FINE).label_map(batch_key(0, 0, 0), 2).numpy()

    straight = label_map(0)
    np.testing.assert_array_equal(label_map(0), straight)
    warped = label_map(3.0)
    assert np.mean(warped != straight) > 0.05
    assert set(np.unique(warped)) <= set(np.unique(straight))


@pytest.mark.parametrize("shape", [(24, 20), (10, 12, 8)], ids=["2d", "3d"])
def test_label_map_is_the_argmax_of_the_noise_warped_by_nearest_interpolation(shape):
    """Method page section 1: J noise channels warped by a random smooth field, then argmax."""
    from cifl_tf.synth import _perlin, _split

    synth = ShapesSynth(shape, num_labels=5, label_scales=(2, 4), warp_std=3.0, warp_scales=(4,), seed=0)
    key = batch_key(0, 2, 0)
    keys = _split(key, ("labels", "warp"))
    noise = _perlin(keys["labels"], 2, (*shape, 5), synth.label_scales, 0, synth.label_std).numpy()
    displacement = synth.displacement(keys["warp"], 2).numpy()
    assert np.abs(displacement).max() > 1
    # float32 sums, as the warp's, so that no point rounds the other way at .5.
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    points = np.stack(grid, axis=-1) + displacement
    nearest = np.clip(np.round(points), 0, np.array(shape) - 1).astype(int)
    warped = np.stack([noise[b][tuple(np.moveaxis(nearest[b], -1, 0))] for b in range(2)])
    np.testing.assert_array_equal(synth.label_map(key, 2).numpy()[..., 0], np.argmax(warped, axis=-1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(shape=(32,)), "shape must be 2D or 3D, got (32,)"),
    (dict(shape=(4, 4, 4, 4)), "shape must be 2D or 3D, got (4, 4, 4, 4)"),
    (dict(shape=(32, 0)), "shape must be positive integers, got (32, 0)"),
    (dict(shape=(32, 32), num_labels=1), "num_labels must be an integer >= 2, got 1"),
    (dict(shape=(32, 32), label_scales=()), "label_scales must be positive integers, got ()"),
    (dict(shape=(32, 32), warp_scales=(8, 2.5)), "warp_scales must be positive integers, got (8, 2.5)"),
    (dict(shape=(32, 32), label_std=-1), "label_std must be a positive number, got -1"),
    (dict(shape=(32, 32), label_std=0), "label_std must be a positive number, got 0"),  # one label everywhere
    (dict(shape=(32, 32), num_labels=np.float32(4)), "num_labels must be an integer >= 2, got np.float32(4.0)"),
    (dict(shape=(32, 32), warp_std="2"), "warp_std must be a non-negative number, got '2'"),
    (dict(shape=(32, 32), one_hot=True), "ShapesSynth does not take ['one_hot']"),
    (dict(shape=(32, 32), seeds={}, in_shape=(8, 8)), "ShapesSynth does not take ['in_shape', 'seeds']"),
    (dict(shape=(32, 32), seed=1.5), "seed must be an integer or None, got 1.5"),
    (dict(shape=(32, 32), seed=2 ** 64), "seed must be within [-2**63, 2**63), got 18446744073709551616"),
    (dict(shape=(32, 32), tie_prob=1.5), "tie_prob must be a number in [0, 1], got 1.5"),
    (dict(shape=(32, 32), tie_jitter=-2), "tie_jitter must be a non-negative number, got -2"),
    (dict(shape=(32, 32), low_contrast_prob=-0.1), "low_contrast_prob must be a number in [0, 1], got -0.1"),
    (dict(shape=(32, 32), low_contrast_min=0), "low_contrast_min must be a number in (0, 1], got 0"),
    (dict(shape=(32, 32), low_contrast_min=True), "low_contrast_min must be a number in (0, 1], got True"),
    (dict(shape=(32, 32), low_contrast_min=2), "low_contrast_min must be a number in (0, 1], got 2"),
    (dict(shape=(32, 32), resolution_max=0.5), "resolution_max must be a number >= 1, got 0.5"),
    (dict(shape=(32, 32), resolution_max="3"), "resolution_max must be a number >= 1, got '3'"),
    # labels_to_image's intensity arguments: a list where a number goes failed as a traceback deep in the render
    (dict(shape=(32, 32), bias_std="big"), "bias_std must be a non-negative number, got 'big'"),
    (dict(shape=(32, 32), blur_std=[1, 2]), "blur_std must be a non-negative number, got [1, 2]"),
    # numbers as strings passed np.asarray(..., float64) and failed inside the render
    (dict(shape=(32, 32), blur_std="1"), "blur_std must be a non-negative number, got '1'"),
    (dict(shape=(32, 32), mean_min="3"), "mean_min must be a finite number or 16 of them (one per label), got '3'"),
    # finite in float64 but not in the float32 of the draws: every voxel NaN
    (dict(shape=(32, 32), std_max=1e39),
     "std_max must be a non-negative number or 16 of them (one per label), got 1e+39"),
    (dict(shape=(32, 32), gamma_std=True), "gamma_std must be a non-negative number, got True"),
    (dict(shape=(32, 32), dc_offset=float("nan")), "dc_offset must be a non-negative number, got nan"),
    (dict(shape=(32, 32), mean_min=[10, 20]), "mean_min must be a finite number or 16 of them (one per label), got"),
    (dict(shape=(32, 32), mean_max=-np.inf),
     "mean_max must be a finite number or 16 of them (one per label), got -inf"),
    (dict(shape=(32, 32), num_labels=2, std_max=[5, -1]),
     "std_max must be a non-negative number or 2 of them (one per label), got [5, -1]"),
    (dict(shape=(32, 32), mean_min=200, mean_max=10), "mean_min 200 is above mean_max 10"),
    (dict(shape=(32, 32), num_labels=2, std_min=[0, 6], std_max=[5, 5]), "std_min [0, 6] is above std_max [5, 5]"),
    # one bound given: the other is neurite's per label (means 25-225, SDs 5-25 but the background's)
    (dict(shape=(32, 32), mean_min=230),
     "mean_min 230 is above mean_max (neurite's default per label, mean_max unset)"),
    # the render clips to [0, 255]: all means below 0 gave blank images
    (dict(shape=(32, 32), mean_min=-100, mean_max=-50),
     "mean_min -100 and mean_max -50: each label's range of means must reach into [0, 255], to which the render clips"),
    (dict(shape=(32, 32), mean_min=[0] * 15 + [300], mean_max=400), "each label's range of means must reach into"),
    (dict(shape=(32, 32), mean_max=10), "mean_min (neurite's default per label, mean_min unset) is above mean_max 10"),
    (dict(shape=(32, 32), std_min=30), "std_min 30 is above std_max (neurite's default per label, std_max unset)"),
    (dict(shape=(32, 32), zero_background=1.5), "zero_background must be a number in [0, 1], got 1.5"),
    (dict(shape=(32, 32), bias_res=[40, 0]), "bias_res must be a positive number or a list of them, got [40, 0]"),
    (dict(shape=(32, 32), normalize=1), "normalize must be True or False, got 1"),
])
def test_bad_synth_arguments_raise(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        ShapesSynth(**kwargs)


def test_shape_and_scales_may_be_a_tensor_shape_or_a_range():
    synth = ShapesSynth(tf.zeros((2, 16, 16, 1)).shape[1:3], label_scales=range(4, 9, 4), seed=0)
    assert synth.shape == (16, 16) and synth.label_scales == (4, 8)
    assert synth(0, 1)[1].shape == (1, 16, 16, 1)


def render_reference(synth, key, labels, args):
    """synth.render(key, labels) from its draws, stage by stage as labels_to_image renders (NumPy): each
    label's N(mean, std^2) noise, the background zeroed, the Gaussian blur (zero padding), the bias field
    exp(perlin), the clip to [0, 255] and the min-max normalisation (gamma and dc offset: other tests)."""
    import scipy.ndimage as ndi
    from cifl_tf.synth import _RENDER_DRAWS, _perlin, _split

    keys = _split(key, _RENDER_DRAWS)
    labels = labels.numpy()[..., 0]
    batch, ndim, num = labels.shape[0], labels.ndim - 1, synth.num_labels
    per_image = (batch, *[1] * ndim)
    bounds = {name: np.broadcast_to(np.float64(args[name]), num) for name in ("mean_min", "mean_max", "std_min", "std_max")}
    uniform = {name: tf.random.stateless_uniform((batch, num), keys[name]).numpy() for name in ("mean", "std")}
    mean = bounds["mean_min"] + (bounds["mean_max"] - bounds["mean_min"]) * uniform["mean"]
    std = bounds["std_min"] + (bounds["std_max"] - bounds["std_min"]) * uniform["std"]
    noise = tf.random.stateless_normal((*labels.shape, 1), keys["noise"]).numpy()[..., 0]
    image = np.stack([noise[b] * std[b][labels[b]] + mean[b][labels[b]] for b in range(batch)])
    if args["zero_background"]:
        flip = tf.random.stateless_uniform((*per_image, 1), keys["background"]).numpy()[..., 0] < args["zero_background"]
        image[(labels == 0) & flip] = 0
    if args["blur_std"]:
        sigma = args["blur_std"]
        width = int(np.round(sigma * 3) * 2 + 1)
        taps = np.arange(width) - (width - 1) / 2
        kernel = np.exp(-taps ** 2 / (2 * sigma ** 2))
        for axis in range(1, ndim + 1):
            image = ndi.convolve1d(image, kernel / kernel.sum(), axis, mode="constant")
    if args["bias_std"]:
        image *= np.exp(_perlin(keys["bias"], batch, (*synth.shape, 1), [args["bias_res"]], args["bias_std"],
                                args["bias_std"]).numpy()[..., 0])
    image = image.clip(0, 255)
    if args["normalize"]:
        axes = tuple(range(1, ndim + 1))
        image = (image - image.min(axes, keepdims=True)) / (image.max(axes, keepdims=True) - image.min(axes, keepdims=True))
    return image[..., np.newaxis]


PLAIN = dict(mean_min=[0, 60, 100, 200], mean_max=[10, 80, 150, 210], std_min=[0, 1, 2, 3], std_max=[1, 2, 4, 9],
             zero_background=0.0, blur_std=0, bias_std=0, normalize=False, gamma_std=0, dc_offset=0)


@pytest.mark.parametrize("stage", [{}, dict(zero_background=1.0), dict(blur_std=1.2), dict(blur_std=0.6),
                                   dict(bias_std=0.3, bias_res=4, bias_modulate=False), dict(normalize=True)],
                         ids=["means and SDs per label", "background zeroed", "blur", "narrow blur", "bias", "normalised"])
@pytest.mark.parametrize("shape", [(20, 24), (8, 10, 6)], ids=["2d", "3d"])
def test_render_follows_each_stage_of_its_formula(stage, shape):
    args = {**PLAIN, "blur_modulate": False, **stage}
    synth = ShapesSynth(shape, num_labels=4, seed=0, **FINE, **args)
    stripes = np.indices(shape).sum(0) // 3 % 4  # every label, the background included
    labels = tf.constant(np.stack([stripes, np.flip(stripes), 3 - stripes])[..., np.newaxis], tf.int32)
    key = batch_key(2, 1, 0)
    np.testing.assert_allclose(synth.render(key, labels), render_reference(synth, key, labels, args),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(mean_min=10, mean_max=200), dict(num_labels=2, std_min=[0, 1], std_max=[5, 9]),
                                    dict(bias_res=[20, 40], blur_std=0, normalize=False)])
def test_intensity_arguments_of_numbers_per_label_or_lists_render(kwargs):
    _, x1, x2 = ShapesSynth((16, 16), seed=0, **kwargs)(0, 1)
    assert x1.shape == x2.shape == (1, 16, 16, 1) and np.all(np.isfinite(x1)) and np.all(np.isfinite(x2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(batch_size=2.0), "batch_size must be an integer >= 1, got 2.0"),
    (dict(batch_size=True), "batch_size must be an integer >= 1, got True"),
    (dict(batch_size=2, start=-1), "start must be an integer >= 0, got -1"),
])
def test_bad_stream_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        contrast_pairs((32, 32), **kwargs)


def test_numpy_numbers_give_the_batches_of_python_ones():
    # values read from arrays or configs: refused as "not an integer" before
    python = dict(num_labels=4, tie_prob=0.5, label_std=1, low_contrast_prob=0.5, resolution_max=2)
    given = {name: (np.int64 if isinstance(value, int) else np.float32)(value) for name, value in python.items()}
    batches = [next(iter(contrast_pairs((16, 16), batch_size=size, seed=0, start=start, **kwargs)))
               for size, start, kwargs in ((2, 1, python), (np.int64(2), np.int64(1), given))]
    for python_view, numpy_view in zip(*batches, strict=True):
        np.testing.assert_array_equal(numpy_view, python_view)


@pytest.mark.parametrize("tie_prob, tie_jitter", [(0.0, 5.0), (0.5, 5.0), (1.0, 0.0), (1.0, 20.0)])
def test_tied_labels_take_a_partners_mean_within_the_jitter(tie_prob, tie_jitter):
    synth = ShapesSynth((8, 8), num_labels=6, tie_prob=tie_prob, tie_jitter=tie_jitter, seed=0)
    keys = {name: tf.constant([3, i], tf.int64) for i, name in enumerate(("tie", "partner", "jitter"))}
    drawn = np.random.default_rng(0).uniform(25, 225, (500, 6)).astype(np.float32)
    tied = synth._tie(keys, tf.constant(drawn)).numpy()
    np.testing.assert_array_equal(tied[:, 0], drawn[:, 0])  # the background keeps its own mean
    moved = tied[:, 1:] != drawn[:, 1:]  # all tied ones: a partner's draw is never exactly one's own
    assert abs(moved.mean() - tie_prob) < 0.06
    # A moved mean lies within tie_jitter of another label's draw.
    others = np.abs(tied[:, 1:, None] - drawn[:, None, :])
    others[:, np.arange(5), np.arange(1, 6)] = np.inf
    assert np.all(others.min(axis=-1)[moved] <= tie_jitter + 1e-4)


@pytest.mark.parametrize("prob, smallest", [(0.0, 0.1), (0.5, 0.1), (1.0, 1.0), (1.0, 0.02)])
def test_low_contrast_draws_the_foreground_means_together(prob, smallest):
    synth = ShapesSynth((8, 8), num_labels=6, low_contrast_prob=prob, low_contrast_min=smallest, seed=0)
    keys = {name: tf.constant([5, i], tf.int64) for i, name in enumerate(("low_contrast", "contrast_factor"))}
    drawn = np.random.default_rng(0).uniform(25, 225, (500, 6)).astype(np.float32)
    squeezed = synth._low_contrast(keys, tf.constant(drawn)).numpy()
    np.testing.assert_array_equal(squeezed[:, 0], drawn[:, 0])  # the background keeps its own mean
    # Written from the formula: m_j -> c + s (m_j - c), with c the foreground average, which stays.
    centre = drawn[:, 1:].mean(axis=1, keepdims=True)
    np.testing.assert_allclose(squeezed[:, 1:].mean(axis=1, keepdims=True), centre, rtol=1e-5)
    farthest = np.abs(drawn[:, 1:] - centre).argmax(axis=1)[:, None]
    factor = (np.take_along_axis(squeezed[:, 1:] - centre, farthest, 1)
              / np.take_along_axis(drawn[:, 1:] - centre, farthest, 1))
    # One factor per image, for all its foreground labels.
    np.testing.assert_allclose(squeezed[:, 1:], centre + factor * (drawn[:, 1:] - centre), atol=1e-3)
    factor = factor[:, 0]
    moved = ~np.isclose(factor, 1.0, rtol=1e-5)
    assert abs(moved.mean() - prob * (smallest < 1)) < 0.06
    assert np.all((factor >= smallest * (1 - 1e-4)) & (factor <= 1 + 1e-4))
    if prob == 1.0 and smallest < 1:  # log-uniform: the median factor is the geometric mean
        np.testing.assert_allclose(np.median(factor), np.sqrt(smallest), rtol=0.15)


def test_renders_draw_the_foreground_together_at_low_contrast():
    plain = dict(normalize=False, blur_std=0, bias_std=0, gamma_std=0, dc_offset=0, std_min=[0] * 6, std_max=[0] * 6)
    labels = np.repeat(np.arange(6), 24).reshape(1, 12, 12, 1)
    key = tf.constant([7, 1], tf.int64)
    spread = {}
    for prob in (0.0, 1.0):
        image = ShapesSynth((12, 12), num_labels=6, low_contrast_prob=prob, low_contrast_min=0.02, seed=0,
                            **plain).render(key, tf.constant(labels, tf.int32)).numpy()
        means = np.array([image[labels == j].mean() for j in range(1, 6)])
        spread[prob] = means.max() - means.min()
    # The same draws but for the factor: the foreground's spread shrinks by it, at most to 0.02 of itself.
    assert 0.02 * spread[0.0] * (1 - 1e-4) <= spread[1.0] < 0.99 * spread[0.0]


def test_adding_a_draw_keeps_the_keys_of_the_earlier_ones():
    from cifl_tf.synth import _RENDER_DRAWS, _split
    key = tf.constant([3, 9], tf.int64)
    before, after = _split(key, _RENDER_DRAWS[:-2]), _split(key, _RENDER_DRAWS)
    for name, value in before.items():  # seeded streams from before the low-contrast draws stay the same
        np.testing.assert_array_equal(value, after[name])


@pytest.mark.parametrize("sigmas, width", [((0.7, 1.3), 7), ((2.0, 0.5, 1.0), 13), ((1e-3, 1.0), 7)])
def test_gaussian_kernels_match_the_formula_and_neurite(sigmas, width):
    import neurite as ne
    from cifl_tf.synth import _gaussian_kernels

    kernels = _gaussian_kernels(tf.constant(sigmas), width)
    taps = np.arange(width) - (width - 1) / 2
    theirs = ne.utils.gaussian_kernel(list(sigmas), [width] * len(sigmas), separate=True)
    for kernel, their, sigma in zip(kernels, theirs, sigmas):
        expected = np.exp(-taps ** 2 / (2 * sigma ** 2))
        np.testing.assert_allclose(kernel, expected / expected.sum(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(kernel, their, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(24, 20), (8, 10, 6)], ids=["2d", "3d"])
def test_gamma_raises_each_render_to_the_power_exp_of_gamma_std_times_a_normal_draw(shape):
    from cifl_tf.synth import _RENDER_DRAWS, _split

    labels = ShapesSynth(shape, seed=0, **FINE).label_map(batch_key(0, 0, 0), 3)
    key = batch_key(1, 5, 0)
    plain = ShapesSynth(shape, seed=0, gamma_std=0, **FINE).render(key, labels).numpy()
    assert plain.min() == 0 and plain.max() == 1  # normalised: 0 stays 0
    draw = tf.random.stateless_normal((3, *[1] * len(shape), 1), _split(key, _RENDER_DRAWS)["gamma"]).numpy()
    gamma = ShapesSynth(shape, seed=0, gamma_std=0.4, **FINE).render(key, labels).numpy()
    np.testing.assert_allclose(gamma, plain ** np.exp(0.4 * draw), rtol=1e-5, atol=1e-6)


def test_perlin_noise_scales_and_sds():
    from cifl_tf.synth import _perlin

    key = batch_key(0, 0, 0)
    fine = _perlin(key, 3, (64, 64, 2), (1,), 0.5, 0.5).numpy()  # full resolution, SD fixed at 0.5
    assert fine.shape == (3, 64, 64, 2)
    np.testing.assert_allclose(fine.std(axis=(1, 2)), 0.5, rtol=0.05)
    coarse = _perlin(key, 3, (32, 32, 2), (32,), 0, 1).numpy()  # one draw per sample and channel, upsampled
    np.testing.assert_allclose(coarse, np.broadcast_to(coarse[:, :1, :1], coarse.shape), atol=1e-6)
    modulated = _perlin(key, 64, (16, 16, 1), (1,), 0, 2).numpy().std(axis=(1, 2, 3))  # per-sample SD ~ U(0, 2)
    assert modulated.min() < 0.3 and 1.7 < modulated.max() < 2.2


@pytest.mark.parametrize("shape, scales, grid", [((20, 24), (1, 4, 8, 64), None), ((12, 9, 10), (2, 5), None),
                                                  ((112, 96), (16, 32), (28, 24))])
def test_perlin_noise_is_each_scales_draw_linearly_upsampled_and_summed(shape, scales, grid):
    from cifl_tf.synth import _perlin

    key, batch_size, channels = batch_key(4, 2, 0), 3, 2
    noise = _perlin(key, batch_size, (*shape, channels), scales, 0.5, 2.0, grid=grid).numpy()
    keys = tf.random.experimental.stateless_split(key, 2 * len(scales))
    expected = 0
    for i, scale in enumerate(scales):  # per sample SD ~ U(0.5, 2), N(0, SD^2) at ceil(shape / scale) voxels
        std = 0.5 + 1.5 * tf.random.stateless_uniform((batch_size, *[1] * len(shape), 1), keys[2 * i]).numpy()
        small = [int(np.ceil(size / scale)) for size in shape]
        draw = tf.random.stateless_normal((batch_size, *small, channels), keys[2 * i + 1]).numpy() * std
        expected = expected + upsampled(draw, shape if grid is None else grid)
    np.testing.assert_allclose(noise, expected, rtol=1e-5, atol=1e-5)


def upsampled(images, big):
    """(B, *small, C) -> (B, *big, C): 1D linear interpolation along each axis at x_new = linspace(0, n - 1, m)."""
    for axis, m in enumerate(big, start=1):
        n = images.shape[axis]
        images = np.apply_along_axis(lambda v: np.interp(np.linspace(0, n - 1, m), np.arange(n), v), axis, images)
    return images


@pytest.mark.parametrize("small, big", [((3, 4), (32, 30)), ((2, 3, 4), (9, 16, 7)), ((1, 5), (4, 9)), ((6, 6), (6, 6)),
                                        ((9, 12), (4, 5))])
def test_resize_is_linear_interpolation_with_aligned_corners(small, big):
    import neurite as ne
    from cifl_tf.synth import _resize

    images = np.random.default_rng(0).standard_normal((2, *small, 3)).astype(np.float32)
    resized = _resize(tf.constant(images), big).numpy()
    np.testing.assert_allclose(resized, upsampled(images, big), rtol=1e-5, atol=1e-5)
    neurites = [ne.utils.resize(tf.constant(image), [m / n for m, n in zip(big, small)]).numpy() for image in images]
    np.testing.assert_allclose(resized, neurites, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 20), (12, 10, 8)])
def test_a_traced_synthesis_takes_its_interpolation_matrices_as_constants(shape):
    """Built inside the graph, they were half of its operations, traced and run for every batch."""
    synth = ShapesSynth(shape, seed=0, **FINE)
    graph = tf.function(lambda index: synth(index, 2)).get_concrete_function(tf.TensorSpec((), tf.int64)).graph
    assert not {"LinSpace", "OneHot"} & {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("shape, scales, grid", [
    ((112, 112), (16, 32), (28, 28)),             # 4 voxels per grid voxel
    ((40, 41, 40), (8, 64), (20, 21, 20)),        # 2: corners aligned, (41 - 1) / 2 + 1
    ((32, 32), (2, 4), (32, 32)),                 # under CELL_VOXELS per cell: full resolution
    ((1, 9), (16,), (1, 3)),
])
def test_coarse_grid_keeps_cell_voxels_per_finest_cell(shape, scales, grid):
    from cifl_tf.synth import _coarse_grid, _spacing

    assert _coarse_grid(shape, scales) == grid
    np.testing.assert_allclose(_spacing(shape, grid), [max(s - 1, 1) / max(g - 1, 1) for s, g in zip(shape, grid)])


@pytest.mark.parametrize("shape", [(64, 64), (24, 24, 24)], ids=["2d", "3d"])
def test_coarse_grids_draw_what_full_resolution_draws(shape, monkeypatch):
    """The warp integrated on a coarse grid and upsampled agrees with the same draws integrated at full
    resolution (CELL_VOXELS so large that the grid is the full one), and so do the label maps it warps."""
    from cifl_tf import synth

    synthesiser = ShapesSynth(shape, seed=0)
    key = batch_key(0, 0, 0)
    coarse = synthesiser.displacement(key, 4).numpy(), synthesiser.label_map(key, 4).numpy()
    monkeypatch.setattr(synth, "CELL_VOXELS", 10 ** 6)
    displacement, labels = synthesiser.displacement(key, 4).numpy(), synthesiser.label_map(key, 4).numpy()
    size = np.sqrt(np.mean(displacement ** 2))
    assert size > 0.5
    assert np.sqrt(np.mean((coarse[0] - displacement) ** 2)) < 0.06 * size
    assert np.mean(coarse[1] == labels) > 0.97


@pytest.mark.parametrize("make_stream", [
    lambda: contrast_pairs((16, 16), 2, seed=0),
    lambda: models.pair_batches(np.zeros((3, 8, 8, 1), np.float32), seed=0),
    lambda: checkpoint.epoch_batches((np.zeros((3, 4)),), 2, seed=0),
], ids=["contrast_pairs", "pair_batches", "epoch_batches"])
def test_endless_streams_run_without_the_autotuning_thread(make_stream):
    """Whose rounds, seconds apart late in a fit, kept the CPU idle for 11-14 s when fit's iterator was freed."""
    assert make_stream().options().autotune.enabled is False


def test_the_encoder_training_stream_keeps_the_synthesis_stream_options(monkeypatch):
    streams = []
    monkeypatch.setattr(tf.keras.Model, "fit", lambda self, data, **kwargs: streams.append(data))
    train_encoder(shape=(16, 16), steps=1, batch_size=1, channels=2, features=2, max_offset=2, seed=0, verbose=0)
    assert streams[0].options().autotune.enabled is False


def test_the_downstream_rows_fit_streams_without_the_autotuning_thread(monkeypatch):
    """The UNet heads read arrays that Keras made into a stream of its own: freeing it kept the CPU idle 6-7 s
    after about half of the demo's segmentation fits."""
    fitted = []
    monkeypatch.setattr(tf.keras.Model, "fit", lambda self, data, **kwargs: fitted.append((data, kwargs)))
    monkeypatch.setattr(experiments, "evaluate_segmentation", lambda *args: None)
    monkeypatch.setattr(experiments, "evaluate_registration", lambda *args: None)
    images, labels = np.zeros((5, 8, 8, 1), np.float32), np.zeros((5, 8, 8), np.int32)
    experiments.segmentation_row((images, labels), {}, 2, {"baseline": None}, epochs=3, batch_size=2, verbose=0,
                                 nb_features=2, nb_levels=2)
    experiments.registration_row(images, {}, {"baseline": None}, epochs=1, steps_per_epoch=2, verbose=0,
                                 nb_unet_features=[[2, 2], [2, 2]])
    assert [kwargs.get("steps_per_epoch") for _, kwargs in fitted] == [3, 2]  # ceil(5 / 2) batches an epoch
    assert all(isinstance(data, tf.data.Dataset) and data.options().autotune.enabled is False for data, _ in fitted)


def resolution_reference(size, factor):
    """_resolution_matrix written from its definition, column by column: the unit impulse at each voxel blurred
    by a normalised Gaussian of SD FWHM_SD sqrt(factor^2 - 1), read at 0, factor, 2 factor, ... and at the last
    voxel (np.interp), and those samples interpolated linearly at every voxel."""
    positions = np.arange(size, dtype=np.float64)
    sigma = FWHM_SD * np.sqrt(factor ** 2 - 1)
    columns = []
    for voxel in range(size):
        if sigma > 0:
            weights = np.exp(-0.5 * (positions[:, None] - positions[None, :]) ** 2 / sigma ** 2)
            blurred = (weights / weights.sum(axis=1, keepdims=True))[:, voxel]
        else:
            blurred = np.eye(size)[voxel]
        samples = np.unique(np.minimum(np.arange(0, size + factor, factor), size - 1))
        columns.append(np.interp(positions, samples, np.interp(samples, positions, blurred)))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("size, factor", [(7, 1.0), (9, 2.0), (10, 2.5), (5, 3.0), (12, 1.3), (6, 8.0)])
def test_resolution_matrix_matches_its_definition(size, factor):
    matrix = _resolution_matrix(size, tf.constant(factor)).numpy()
    np.testing.assert_allclose(matrix, resolution_reference(size, factor), atol=1e-5)
    np.testing.assert_allclose(matrix.sum(axis=1), 1, rtol=1e-5)  # intensities keep their level


def test_coarser_renders_are_smoother_and_keep_their_labels():
    fine = ShapesSynth((32, 32), seed=0, **FINE)
    coarse = ShapesSynth((32, 32), resolution_max=4, seed=0, **FINE)
    for index in range(3):
        labels, *views = fine(index, 2)
        coarse_labels, *coarse_views = coarse(index, 2)
        np.testing.assert_array_equal(coarse_labels, labels)
        for view, coarse_view in zip(views, coarse_views):
            roughness = [np.mean(np.abs(np.diff(v.numpy(), axis=axis))) for v in (view, coarse_view)
                         for axis in (1, 2)]
            assert roughness[2] < roughness[0] and roughness[3] < roughness[1]


@pytest.mark.parametrize("index, batch_size, message", [
    (0, -1, "batch_size must be an integer >= 1, got -1"), (0, 0, "batch_size must be an integer >= 1, got 0"),
    (0, 2.5, "batch_size must be an integer >= 1, got 2.5"), ("a", 1, "index must be an integer >= 0, got 'a'"),
    (-1, 1, "index must be an integer >= 0, got -1"),
])
def test_a_batch_of_bad_index_or_size_is_refused_by_name(index, batch_size, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ShapesSynth((16, 16), seed=0)(index, batch_size)
