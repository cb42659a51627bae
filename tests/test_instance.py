"""register_pair: instance optimisation recovers known smooth warps, in 2D and 3D, with every kind of features."""
import gc
import itertools

import numpy as np
import pytest
import tensorflow as tf

import cifl_tf
import voxelmorph as vxm
from cifl_tf import data, instance, metrics, models, tiling
from cifl_tf.encoder import CIFLEncoder
from cifl_tf.triplanar import Triplanar
from conftest import phantom_image, phantom_labels

T2_MEANS = (0.0, 0.5, 0.45, 0.3, 0.9)  # CSF bright, as in the IXI fixture


@tf.keras.utils.register_keras_serializable(package="cifl_tf_tests")
class EdgeDescriptor(tf.keras.layers.Layer):
    """A weightless descriptor like MIND: |forward differences| along each axis, l2-normalised (K = ndim)."""

    def __init__(self, ndim=2, **kwargs):
        super().__init__(**kwargs)
        self.ndim, self.channels = ndim, ndim

    def call(self, images):
        padded = tf.pad(images, [[0, 0]] + [[1, 1]] * self.ndim + [[0, 0]], mode="SYMMETRIC")

        def shifted(axis, offset):  # the image moved by offset pixels along axis (sizes may be unknown in a graph)
            return padded[(slice(None),) + tuple(slice(1 + offset, offset - 1 or None) if a == axis else slice(1, -1)
                                                 for a in range(self.ndim))]

        edges = [tf.abs(shifted(axis, 1) - shifted(axis, -1)) for axis in range(self.ndim)]
        return tf.math.l2_normalize(tf.concat(edges, -1) + 1e-3, axis=-1)

    def get_config(self):
        return {**super().get_config(), "ndim": self.ndim}


def warped_pair(shape, seed=0, std=1.5):
    """(moving image, fixed T1, fixed T2-like, moving labels, fixed labels): the moving anatomy is the
    fixed one under a smooth random deformation of about `std` pixels."""
    rng = np.random.default_rng(seed)
    labels = phantom_labels(shape, rng)
    t1 = np.clip(phantom_image(labels, rng) / 0.4, 0, 1)
    t2 = phantom_image(labels, rng, means=T2_MEANS)
    ndim, factor = len(shape), -(-shape[0] // 3)  # a 3^ndim grid of random vectors, upsampled
    coarse = rng.normal(0, std / factor, (3,) * ndim + (ndim,)).astype(np.float32)
    field = instance.resample_field(coarse, factor, 1, shape)
    moving = models.warp(t1[None, ..., None], field[None])[0, ..., 0]
    moving_labels = models.warp(labels[None, ..., None].astype(np.float32), field[None], "nearest")[0, ..., 0]
    return moving, t1, t2, np.rint(moving_labels).astype(int), labels


def dice_after(displacement, moving_labels, fixed_labels):
    moved = models.warp(moving_labels[None, ..., None].astype(np.float32), displacement[None], "nearest")
    return metrics.mean_dice(np.rint(moved[0, ..., 0]).astype(int), fixed_labels)


FAST = dict(steps=40, verbose=0)
# For tests whose assertions do not depend on the levels or the integration: a model of one level with one
# squaring step traces in half the time (tracing, not the steps, is most of a small registration).
SMALL_GRAPH = dict(levels=(1,), int_steps=1, verbose=0)
CASES = {  # shape, fixed contrast, encoder, similarity, levels, Dice gain over the identity at least, other options
    "2d-intensity-ncc": ((32, 32), "t1", None, None, (2, 1), 0.15, {}),
    "2d-intensity-mi": ((32, 32), "t2", None, "mi", (1,), 0.03, {}),
    "2d-pretrained-t2": ((64, 64), "t2", "pretrained", None, (1,), 0.05, {}),  # the moved image encoded
    "2d-pretrained-t2-warped": ((64, 64), "t2", "pretrained", None, (1,), 0.05, dict(moved_features="warped")),
    "2d-descriptor-t2-mse": ((32, 32), "t2", EdgeDescriptor(2), "mse", (1,), 0.01, {}),
    "3d-pretrained-t2": ((32, 32, 32), "t2", "pretrained", None, (1,), 0.02, {}),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_register_pair_recovers_a_smooth_warp_without_folding(case):
    shape, contrast, encoder, similarity, levels, gain, options = CASES[case]
    moving, t1, t2, moving_labels, fixed_labels = warped_pair(shape)
    displacement = cifl_tf.register_pair(moving, t1 if contrast == "t1" else t2, encoder, similarity,
                                         levels=levels, **options, **FAST)
    assert displacement.shape == (*shape, len(shape)) and displacement.dtype == np.float32
    before = dice_after(np.zeros_like(displacement), moving_labels, fixed_labels)
    assert dice_after(displacement, moving_labels, fixed_labels) > before + gain
    assert metrics.folding_fraction(displacement) == 0


def test_features_are_compared_by_ncc_unless_told_otherwise():
    moving, _, t2, _, _ = warped_pair((16, 16))
    kwargs = dict(encoder=EdgeDescriptor(2), steps=5, **SMALL_GRAPH)
    default = cifl_tf.register_pair(moving, t2, **kwargs)
    np.testing.assert_allclose(default, cifl_tf.register_pair(moving, t2, similarity="ncc", **kwargs), atol=1e-6)
    assert np.abs(default - cifl_tf.register_pair(moving, t2, similarity="mse", **kwargs)).max() > 1e-3


def test_mutual_information_is_smoothed_as_ncc_is():
    """MI's default weight is NCC's: the 0.01 it had before folded MI's fields (docs/registration.md)."""
    moving, _, t2, _, _ = warped_pair((16, 16))
    kwargs = dict(encoder=None, similarity="mi", steps=5, **SMALL_GRAPH)
    np.testing.assert_allclose(cifl_tf.register_pair(moving, t2, **kwargs),
                               cifl_tf.register_pair(moving, t2, reg_weight=1.0, **kwargs), atol=1e-6)


def test_moved_features_encoded_and_a_cifl_encoder():
    moving, t1, _, moving_labels, fixed_labels = warped_pair((32, 32))
    encoder = cifl_tf.pretrained(0.01, trainable=True)  # the caller's layer: register_pair leaves it as it was
    weights = encoder.get_weights()
    displacement = cifl_tf.register_pair(moving, t1, encoder, moved_features="encoded", levels=(1,), **FAST)
    before = dice_after(np.zeros_like(displacement), moving_labels, fixed_labels)
    assert dice_after(displacement, moving_labels, fixed_labels) > before + 0.05
    assert encoder.trainable
    for before, after in zip(weights, encoder.get_weights(), strict=True):
        np.testing.assert_array_equal(after, before)


def test_the_trainable_flags_inside_the_callers_encoder_stay_as_they_were():
    inner = cifl_tf.CIFLEncoder(4, 8)  # 2D, applied to the three planes
    inner.trainable = False
    triplanar = cifl_tf.Triplanar(inner)  # trainable itself, its encoder frozen
    volume = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    cifl_tf.register_pair(volume, volume, triplanar, steps=1, **SMALL_GRAPH)
    assert triplanar.trainable and not inner.trainable and not triplanar.trainable_weights


@pytest.mark.parametrize("shape, feature_scale, default", [
    ((24, 24), 1, "encoded"),
    ((24, 24), 2, "warped"),  # features of upsampled images are described once
    ((12, 12, 12), 1, "warped"),
])
def test_moved_features_default_to_encoded_in_2d_and_warped_in_3d(shape, feature_scale, default):
    moving, t1, _, _, _ = warped_pair(shape)
    kwargs = dict(encoder=EdgeDescriptor(len(shape)), steps=5, feature_scale=feature_scale, **SMALL_GRAPH)
    fields = {mode: cifl_tf.register_pair(moving, t1, moved_features=mode, **kwargs)
              for mode in instance.MOVED_FEATURES if not (mode == "encoded" and feature_scale > 1)}
    np.testing.assert_allclose(cifl_tf.register_pair(moving, t1, **kwargs), fields[default], atol=1e-5)
    assert len(fields) == 1 or np.abs(fields["encoded"] - fields["warped"]).max() > 1e-3


def test_a_registration_that_reuses_the_compiled_models_of_earlier_ones_gives_the_same_result():
    moving, t1, t2, _, _ = warped_pair((24, 24))
    encoder = cifl_tf.pretrained(0.01)
    weights = encoder.get_weights()
    kwargs = dict(encoder=encoder, moved_features="encoded", affine=True, levels=(2, 1), steps=5, int_steps=1,
                  verbose=0)
    first = cifl_tf.register_pair(moving, t1, **kwargs)
    cifl_tf.register_pair(t2, moving, **kwargs)  # leaves other weights and optimizer state in the kept models
    hits = instance._compiled.cache_info().hits
    np.testing.assert_allclose(cifl_tf.register_pair(moving, t1, **kwargs), first, atol=1e-5)
    assert instance._compiled.cache_info().hits == hits + 3  # the affine stage and both levels
    for before, after in zip(weights, encoder.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_an_xla_compiled_registration_gives_the_same_result(monkeypatch):
    compiled_with = []
    compile_for_fit = instance.compile_for_fit

    def recording(model, **kwargs):
        compiled_with.append(kwargs["jit_compile"])
        compile_for_fit(model, **kwargs)

    monkeypatch.setattr(instance, "compile_for_fit", recording)
    instance._compiled.cache_clear()  # so that both models are compiled here
    moving, t1, _, _, _ = warped_pair((24, 24))
    kwargs = dict(encoder=None, steps=5, **SMALL_GRAPH)  # XLA compiles it fast
    fields = {jit: cifl_tf.register_pair(moving, t1, jit_compile=jit, **kwargs) for jit in (False, True)}
    assert compiled_with == [False, True]
    assert np.abs(fields[False]).max() > 0.1  # it moved
    np.testing.assert_allclose(fields[True], fields[False], atol=1e-3)  # voxels; XLA rounds differently


def test_each_stage_traces_its_train_step_once(monkeypatch):
    # The deformable levels' two losses make loss metrics: made in the first trace, they would make fit trace again.
    tracings, fit = [], instance._fit

    def recording(model, *args):
        fit(model, *args)
        tracings.append(model.train_function.experimental_get_tracing_count())

    monkeypatch.setattr(instance, "_fit", recording)
    instance._compiled.cache_clear()
    moving, t1, _, _, _ = warped_pair((24, 24))
    cifl_tf.register_pair(moving, t1, encoder=None, affine=True, steps=2, **SMALL_GRAPH)
    assert tracings == [1, 1]  # the affine stage, the level


@pytest.mark.parametrize("grid, steps, jit_compile, expected", [
    ((40, 48, 56), 100, None, True),  # level 4 of a 160x192x224 volume: 10.8M voxel steps
    ((20, 24, 28), 100, None, False),  # its level 8: 1.3M
    ((128, 128), 128, None, True),  # exactly XLA_MIN_VOXEL_STEPS
    ((128, 128), 127, None, False),
    ((8, 8), 10, True, True),
    ((64, 64, 64), 100, False, False),
])
def test_xla_is_used_where_its_compile_time_is_repaid_unless_told(grid, steps, jit_compile, expected):
    assert instance.uses_xla(grid, steps, jit_compile) is expected


@pytest.mark.parametrize("shape, expected", [
    ((160, 192), (4, 2, 1)),  # the demo's slices
    ((512, 512), (4, 2, 1)),  # exactly MAX_FINE_VOXELS
    ((513, 512), (8, 4, 2)),
    ((53, 65, 54), (4, 2, 1)),  # the 3D demo's 3 mm volumes
    ((160, 192, 224), (16, 8, 4)),  # a 1 mm head: level 2 would have 860k voxels
    ((256, 256, 256), (16, 8, 4)),
    ((257, 256, 256), (32, 16, 8)),  # pooled 'SAME': 65 x 64 x 64 voxels by 4
    ((512, 512, 16), (8, 4)),  # thick slices: by 16, one voxel across them
    ((1024, 1024, 3), (2,)),  # over MAX_FINE_VOXELS rather than one voxel across the slices
])
def test_default_levels_bound_the_finest_grid(shape, expected):
    assert instance.default_levels(shape) == expected


def test_register_pair_without_levels_uses_the_default_levels(monkeypatch):
    grids = []
    monkeypatch.setattr(instance, "MAX_FINE_VOXELS", 64)  # 24x24 pixels: the finest level pooled by 4 (6x6)
    monkeypatch.setattr(instance, "_fit", lambda model, inputs, *_: grids.append(inputs[0].shape))
    moving, t1, _, _, _ = warped_pair((24, 24))
    cifl_tf.register_pair(moving, t1, encoder=None, steps=1, verbose=0)
    assert grids == [(2, 2, 1), (3, 3, 1), (6, 6, 1)]  # levels 16, 8, 4


def centres(size, factor):
    """Full-resolution coordinates of the voxel centres of a grid pooled by factor ('SAME' padding)."""
    count = -(-size // factor)
    return factor * np.arange(count) + (factor - 1) / 2 - (count * factor - size) // 2


@pytest.mark.parametrize("factor, to_factor, size", [(2, 1, 8), (4, 1, 10), (4, 2, 9), (3, 1, 7), (2, 2, 8)])
def test_resample_field_is_exact_for_linear_fields_away_from_the_border(factor, to_factor, size):
    # A displacement linear in full-resolution coordinates, u(x) = 0.3 x + 1 pixels along axis 0 and
    # -0.2 x along axis 1, expressed in voxels of each pooled grid ('SAME' pooling: centres as below).
    def field(f):
        x, y = np.meshgrid(centres(size, f), centres(size, f), indexing="ij")
        return np.stack([0.3 * x + 1, -0.2 * y], -1) / f

    resampled = instance.resample_field(field(factor).astype(np.float32), factor, to_factor, (size, size))
    expected = field(to_factor)
    new, old = centres(size, to_factor), centres(size, factor)
    inside = (new >= old[0]) & (new <= old[-1])
    assert resampled.shape == expected.shape
    np.testing.assert_allclose(resampled[inside][:, inside], expected[inside][:, inside], atol=1e-5)


def multilinear(field, points):
    """NumPy reference: field (*grid, K) at points (*out, ndim) in grid voxels, clamped to the grid, as the
    sum over the 2^ndim corners of the cell of each point, each weighted by the product of its 1D weights."""
    grid = np.array(field.shape[:-1])
    points = np.clip(points, 0, grid - 1)
    below = np.floor(points).astype(int)
    result = 0
    for corner in itertools.product((0, 1), repeat=len(grid)):
        index = np.minimum(below + corner, grid - 1)
        weight = np.prod(np.where(corner, points - below, 1 - (points - below)), axis=-1, keepdims=True)
        result = result + weight * field[tuple(np.moveaxis(index, -1, 0))]
    return result


@pytest.mark.parametrize("factor, to_factor, shape", [
    (4, 1, (10, 7)), (2, 1, (9, 8)), (3, 2, (11, 6)), (4, 1, (9, 6, 7)), (2, 1, (5, 8, 6)), (8, 4, (20, 13, 9)),
])
def test_resample_field_interpolates_multilinearly(factor, to_factor, shape):
    """Random fields, so the border and every cell count: the value at each new centre (in voxels of the old
    grid), clamped to the old grid, interpolated multilinearly and rescaled to voxels of the new grid."""
    grid = [-(-n // factor) for n in shape]
    field = np.random.default_rng(0).normal(0, 2, (*grid, len(shape))).astype(np.float32)

    axes = [(centres(n, to_factor) - centres(n, factor)[0]) / factor for n in shape]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    expected = multilinear(field.astype(np.float64), points) * factor / to_factor
    np.testing.assert_allclose(instance.resample_field(field, factor, to_factor, shape), expected, atol=1e-5)


@pytest.mark.parametrize("factor", [0, -2, 2.5, True])
def test_pool_and_upsample_refuse_factors_that_are_not_positive_integers(factor):
    for function in (instance.pool, instance.upsample):
        with pytest.raises(ValueError, match=f"{function.__name__}: factor must be a positive integer, got {factor}"):
            function(np.zeros((4, 4, 1), np.float32), factor)


@pytest.mark.parametrize("shape, factor", [((10, 7), 4), ((9, 8), 2), ((8, 8), 8), ((3, 10), 8), ((7, 5), 8),
                                            ((5, 6, 7), 3), ((6, 4, 9), 2), ((4, 5), 1)])
def test_pool_means_centred_blocks_as_tf_same_padding(shape, factor):
    """Output voxel i averages the input voxels in [i f - p, (i + 1) f - p) that lie inside the image,
    with p = (ceil(n / f) f - n) // 2 per axis; and equals tf.nn.avg_pool's 'SAME'."""
    image = np.random.default_rng(0).normal(size=(*shape, 3)).astype(np.float32)
    counts = [-(-n // factor) for n in shape]
    expected = np.empty((*counts, 3))
    for index in itertools.product(*map(range, counts)):
        block = tuple(slice(max(i * factor - (c * factor - n) // 2, 0), (i + 1) * factor - (c * factor - n) // 2)
                      for i, c, n in zip(index, counts, shape))
        expected[index] = image[block].reshape(-1, 3).mean(axis=0)
    original = image.copy()
    pooled = instance.pool(image, factor)
    assert pooled.dtype == np.float32
    np.testing.assert_array_equal(image, original)
    np.testing.assert_allclose(pooled, expected, atol=1e-6)
    np.testing.assert_allclose(pooled, tf.nn.avg_pool(image[np.newaxis], factor, factor, "SAME")[0], atol=1e-6)


@pytest.mark.parametrize("shape, factor", [((5, 7), 2), ((4, 6), 3), ((3, 4, 5), 2), ((6, 3), 4)])
def test_upsample_interpolates_between_pixel_centres_and_pool_takes_ramps_back(shape, factor):
    """Fine pixel k lies at (k + 1/2) / f - 1/2 pixels of the image (clamped to it), linear along each axis."""
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    expected = image.astype(np.float64)
    for axis, n in enumerate(shape):
        at = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
        expected = np.apply_along_axis(lambda line: np.interp(at, np.arange(n), line), axis, expected)
    upsampled = instance.upsample(image, factor)
    assert upsampled.shape == tuple(n * factor for n in shape) and upsampled.dtype == np.float32
    np.testing.assert_allclose(upsampled, expected, atol=1e-6)
    ramp = sum((axis + 1.0) * index for axis, index in enumerate(np.indices(shape, np.float32)))
    inside = tuple(slice(1, -1) for _ in shape)  # the border pixels' blocks hold clamped values
    np.testing.assert_allclose(instance.pool(instance.upsample(ramp, factor)[..., None], factor)[..., 0][inside],
                               ramp[inside], atol=1e-5)


def fitted_levels(monkeypatch, moving, fixed, encoder, **kwargs):
    """register_pair's (source, target[, affine matrix]) of each level, without fitting; the shapes described; its
    result. Of an encoder's moving features warped (2D images' default is to encode the moved image), unless told."""
    kwargs = {"moved_features": None if encoder is None else "warped", **kwargs}
    fitted, described, tiled = [], [], tiling.tiled_features
    monkeypatch.setattr(instance, "_fit", lambda model, inputs, targets, *_: fitted.append(
        (inputs[0], targets[0], *inputs[1:])))
    monkeypatch.setattr(tiling, "tiled_features", lambda layer, image, max_memory: described.append(
        image.shape) or tiled(layer, image, max_memory))
    field = cifl_tf.register_pair(moving, fixed, encoder, steps=1, verbose=0, **kwargs)
    monkeypatch.undo()
    return fitted, described, field


def test_feature_scale_encodes_upsampled_images_and_pools_their_features_back(monkeypatch):
    moving, t1, _, _, _ = warped_pair((24, 24))
    descriptor = EdgeDescriptor(2)
    fitted, _, field = fitted_levels(monkeypatch, moving, t1, descriptor, levels=(2, 1), feature_scale=2)
    assert field.shape == (24, 24, 2)
    (coarse_source, coarse_target), (source, target) = fitted
    for image, features, coarse in ((moving, source, coarse_source), (t1, target, coarse_target)):
        upsampled = descriptor(instance.upsample(image, 2)[None, ..., None])[0].numpy()
        np.testing.assert_allclose(features, instance.pool(upsampled, 2), atol=1e-5)
        assert not np.allclose(features, descriptor(image[None, ..., None])[0], atol=1e-2)  # not the unscaled ones
        np.testing.assert_allclose(coarse, instance.pool(features, 2), atol=1e-5)  # the levels pool them further


@pytest.mark.parametrize("shape, make_encoder, feature_scale, max_memory, slabs", [
    # Sizes 102, 42 and 26 pool by 4 to blocks that start one row before the image: slabs cut blocks anywhere.
    ((102, 64), lambda: CIFLEncoder(channels=4, features=4), 1, 40_000, 3),  # 34-row slabs, 8-row halos
    ((42, 24), lambda: CIFLEncoder(channels=4, features=4), 2, 60_000, 2),  # 21 rows, 5-row halos (4, 1 to upsample)
    ((26, 8, 8), lambda: Triplanar(EdgeDescriptor(2)), 1, 6_000, 7),  # 4-row slabs, 1-row halos
])
def test_features_pooled_slab_by_slab_equal_the_whole_images(monkeypatch, shape, make_encoder, feature_scale,
                                                              max_memory, slabs):
    """Where one image's features exceed max_memory, they are made and pooled in slabs along the first
    axis, each with a halo of the encoder's reach, and the levels get the same features."""
    rng = np.random.default_rng(0)
    moving, fixed = rng.random((2, *shape)).astype(np.float32)
    encoder = make_encoder()
    levels = dict(levels=(4, 2), feature_scale=feature_scale)
    whole, described, _ = fitted_levels(monkeypatch, moving, fixed, encoder, **levels)
    assert len(described) == 2  # one call per image
    sliced, described, _ = fitted_levels(monkeypatch, moving, fixed, encoder, max_memory=max_memory, **levels)
    assert len([s for s in described if len(s) == len(shape)]) == 2 * slabs
    for level, level_sliced in zip(whole, sliced):
        for features, features_sliced in zip(level, level_sliced):
            np.testing.assert_allclose(features_sliced, features, atol=1e-5)


@pytest.mark.parametrize("max_memory", [1, 5 * 17 * 4])  # slabs of 1 and 5 rows
def test_intensities_pooled_in_slabs_equal_pooled_whole(monkeypatch, max_memory):
    """Blocks that straddle slabs (sizes 22 and 17 pool to partial blocks at both ends) sum across them."""
    rng = np.random.default_rng(0)
    moving, fixed = rng.random((2, 22, 17)).astype(np.float32)
    fitted, _, _ = fitted_levels(monkeypatch, moving, fixed, None, levels=(4, 3), max_memory=max_memory)
    for (source, target), factor in zip(fitted, (4, 3)):
        np.testing.assert_allclose(source, instance.pool(moving[..., None], factor), atol=1e-6)
        np.testing.assert_allclose(target, instance.pool(fixed[..., None], factor), atol=1e-6)


@pytest.mark.parametrize("encoder", [None, "mind"])
def test_instance_model_saves_and_loads(tmp_path, encoder):
    encoder = None if encoder is None else cifl_tf.descriptors.MIND(ndim=2)  # "encoded": the layer Encode holds it
    model = instance.instance_model((8, 10), 1, int_steps=3, encoder=encoder)
    velocity = np.random.default_rng(0).normal(0, 1, (8, 10, 2)).astype(np.float32)
    model.get_layer("velocity").set_weights([velocity])
    model.save(tmp_path / "instance.keras")
    loaded = tf.keras.models.load_model(tmp_path / "instance.keras", safe_mode=True)
    image = np.random.default_rng(1).random((1, 8, 10, 1)).astype(np.float32)
    for a, b in zip(model(image), loaded(image)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(instance.displacement(loaded), instance.displacement(model), atol=1e-6)


@pytest.mark.parametrize("similarity", ["ncc", "mi"])
def test_a_diverging_fit_is_refused_not_returned_as_a_nan_field(similarity):
    moving, fixed = (phantom_image(phantom_labels((16, 20), np.random.default_rng(seed)), np.random.default_rng(seed))
                     for seed in (0, 1))
    with pytest.raises(ValueError, match=r"the fit diverged within \d+ steps of the level on 8x10 voxels .* lower "
                                         r"learning_rate"):
        instance.register_pair(moving, fixed, encoder=None, similarity=similarity, levels=(2, 1), steps=3,
                               learning_rate=1e38, verbose=0)


@pytest.mark.parametrize("similarity, learning_rate", [("ncc", 1e38), ("ncc", 1e30), ("mi", 1e38)])
def test_a_diverging_affine_stage_is_refused_though_its_weights_stay_finite(similarity, learning_rate):
    """Its matrix overflowed while its weights did not: an infinite field, or one sending every voxel far away."""
    moving, fixed = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=r"the fit diverged within 3 steps of a level \(its transform is NaN or "
                                         r"infinite, or moves the whole image out of view\): lower learning_rate"):
        instance.register_pair(moving, fixed, encoder=None, similarity=similarity, levels=(1,), steps=3,
                               learning_rate=learning_rate, affine=True, verbose=0)


def test_level_models_built_on_a_shared_encoder_are_freed_with_the_cache():
    """Called on the models' symbolic tensors, the shared encoder kept a node of each model, and through it the
    model's layers and velocity field, after the cache let the model go."""
    def velocity_fields():
        gc.collect()
        return sum(isinstance(o, instance.VelocityField) for o in gc.get_objects())

    instance._compiled.cache_clear()
    before, encoder = velocity_fields(), cifl_tf.descriptors.MIND(ndim=2)
    for shape in ((16, 20), (20, 16)):
        moving, fixed = (phantom_image(phantom_labels(shape, np.random.default_rng(seed)), np.random.default_rng(seed))
                         for seed in (0, 1))
        instance.register_pair(moving, fixed, encoder=encoder, moved_features="encoded", levels=(2, 1), steps=1,
                               verbose=0)
    assert velocity_fields() > before  # in the cache
    instance._compiled.cache_clear()
    assert velocity_fields() == before


GOOD = np.full((16, 16), 0.5, np.float32)


@pytest.mark.parametrize("moving, fixed, kwargs, error, message", [
    (GOOD, np.full((16, 18), 0.5), {}, ValueError, r"moving \(16, 16\) and fixed \(16, 18\) differ in shape"),
    (np.zeros(16), np.zeros(16), {}, ValueError, r"moving must be a 2D or 3D array"),
    (GOOD, np.where(np.eye(16) > 0, np.nan, 0.5), {}, ValueError, r"fixed holds 16 NaN/Inf values"),
    (GOOD * 4, GOOD, {}, ValueError, r"moving intensities must lie in \[0, 1\].*got \[2, 2\]"),
    (GOOD, np.full((16, 16), 1e300), {}, ValueError, r"fixed intensities must lie in \[0, 1\].*got \[1e\+300"),
    (GOOD + 0j, GOOD, {}, TypeError, r"moving must hold real numbers, got dtype complex64"),
    (GOOD, np.full((16, 16), "a"), {}, TypeError, r"fixed must hold real numbers, got dtype <U1"),
    (np.ma.masked_less(GOOD, 0.6), GOOD, {}, TypeError, r"moving is a masked array, .* pass moving.filled\(0\)"),
    (GOOD, GOOD, dict(encoder=EdgeDescriptor(3)), ValueError, r"is 3D but the images are 2D"),
    (GOOD, GOOD, dict(encoder="pretrain"), ValueError, r"encoder must be 'pretrained', None .*, got 'pretrain'"),
    (GOOD, GOOD, dict(encoder=3), TypeError, r"expected a Keras layer with ndim"),
    (GOOD, GOOD, dict(similarity="cc"), ValueError, r"similarity must be one of \('mse', 'ncc', 'mi'\)"),
    (GOOD, GOOD, dict(similarity="mi"), ValueError, r"'mi' compares intensities; use it with encoder=None"),
    (GOOD, GOOD, dict(levels=(1, 2)), ValueError, r"levels must be decreasing .* got \(1, 2\)"),
    (GOOD, GOOD, dict(levels=2.5), ValueError, r"levels must be decreasing .* got 2.5$"),  # as given
    (GOOD, GOOD, dict(levels=np.array(2.5)), ValueError, r"levels must be decreasing .* got 2.5$"),  # not a bare
    # TypeError "iteration over a 0-d array"
    (GOOD, GOOD, dict(steps=0), ValueError, r"steps must be a positive integer, got 0"),
    (GOOD, GOOD, dict(reg_weight=-1.0), ValueError, r"reg_weight must be a non-negative number, got -1.0"),
    (GOOD, GOOD, dict(moved_features="both"), ValueError, r"moved_features must be one of"),
    (GOOD, GOOD, dict(learning_rate=0), ValueError, r"learning_rate must be a positive number, got 0"),
    (GOOD, GOOD, dict(learning_rate=np.inf), ValueError, r"learning_rate must be a positive number, got inf"),
    (GOOD, GOOD, dict(max_memory=0), ValueError, r"max_memory must be a positive integer number of bytes, got 0"),
    (GOOD, GOOD, dict(max_memory="lots"), ValueError, r"max_memory must be .* got 'lots'"),
    (np.zeros((0, 0)), np.zeros((0, 0)), {}, ValueError, r"moving is empty, shape \(0, 0\)"),
    (GOOD, GOOD, dict(affine="yes"), TypeError, r"affine must be True or False, got 'yes'"),
    (GOOD, GOOD, dict(jit_compile=1), TypeError, r"jit_compile must be True, False or None, got 1"),
    (GOOD, GOOD, dict(feature_scale=0), ValueError, r"feature_scale must be a positive integer, got 0"),
    (GOOD, GOOD, dict(feature_scale=2.0), ValueError, r"feature_scale must be a positive integer, got 2.0"),
    (GOOD, GOOD, dict(encoder=None, feature_scale=2), ValueError, r"feature_scale 2 scales an encoder's features"),
    (GOOD, GOOD, dict(encoder=EdgeDescriptor(2), moved_features="encoded", feature_scale=3), ValueError,
     r"feature_scale 3 .* needs moved_features='warped'"),
    (GOOD, GOOD, dict(levels=(16, 8)), ValueError, r"level 16 pools the \(16, 16\) images to a \(1, 1\) grid"),
    (GOOD[..., None], GOOD[..., None], {}, ValueError, r"moving has an axis of one voxel, shape \(16, 16, 1\): a "
                                                       r"slice stored as 3D registers as 2D .*np\.squeeze"),
    (GOOD, GOOD, dict(verbose="quiet"), ValueError, r"verbose must be 1 or 0, got 'quiet'"),
    (GOOD, GOOD, dict(verbose=[1]), ValueError, r"verbose must be 1 or 0, got \[1\]"),
])
def test_register_pair_rejects_bad_inputs(moving, fixed, kwargs, error, message):
    with pytest.raises(error, match=message):
        cifl_tf.register_pair(moving, fixed, **{"verbose": 0, **kwargs})


def centre_points(factor, shape):
    """(*grid, ndim): the full-resolution coordinates of each voxel centre of the grid pooled by factor."""
    return np.stack(np.meshgrid(*[centres(n, factor) for n in shape], indexing="ij"), -1)


@pytest.mark.parametrize("factor, shape", [(1, (9, 12)), (2, (16, 20)), (4, (18, 13))])
def test_affine_displacement_maps_coarse_points_as_the_coarse_transform_does(factor, shape):
    matrix = np.array([[1.05, 0.1, 0.7], [-0.08, 0.95, -1.2]], np.float32)
    grid = [-(-n // factor) for n in shape]
    coarse = vxm.utils.affine_to_dense_shift(matrix, grid, shift_center=True).numpy()
    full = instance.affine_displacement(matrix, factor, shape)
    # Coarse voxel centres in full-resolution coordinates, where both must agree:
    # a coarse displacement of d coarse voxels is factor * d full-resolution voxels.
    points = centre_points(factor, shape)
    expected = factor * coarse
    for index in np.ndindex(*grid):
        point = points[index]
        if np.all(point == np.round(point)) and np.all(point >= 0) and np.all(point < shape):
            np.testing.assert_allclose(full[tuple(point.astype(int))], expected[index], atol=1e-4)


@pytest.mark.parametrize("factor, to_factor, shape", [(4, 2, (18, 13)), (2, 4, (16, 21)), (8, 2, (30, 27)),
                                                      (2, 2, (11, 9)), (4, 2, (18, 13, 10))])
def test_level_matrix_gives_the_full_resolution_displacement_at_the_level_voxel_centres(factor, to_factor, shape):
    ndim = len(shape)
    matrix = np.eye(ndim, ndim + 1, dtype=np.float32) + np.random.default_rng(ndim).normal(0, 0.05, (ndim, ndim + 1))
    matrix[:, -1] *= 20  # shifts of about a voxel of the coarse grid
    full = instance.affine_displacement(matrix, factor, shape)
    grid = [-(-n // to_factor) for n in shape]
    level = vxm.utils.affine_to_dense_shift(instance.level_matrix(matrix, factor, shape, to_factor), grid,
                                            shift_center=True).numpy()
    # An affine displacement is an affine function of the point: at a level's voxel centre p (full-resolution
    # coordinates, maybe between voxels), the full-resolution field's linear extension, in that level's voxels.
    points = centre_points(to_factor, shape)
    linear = np.linalg.lstsq(np.c_[np.indices(shape).reshape(ndim, -1).T, np.ones(full[..., 0].size)],
                             full.reshape(-1, ndim), rcond=None)[0]
    expected = (np.c_[points.reshape(-1, ndim), np.ones(points[..., 0].size)] @ linear) / to_factor
    np.testing.assert_allclose(level.reshape(-1, ndim), expected, atol=1e-4)


def test_affine_stage_recovers_a_shift_and_scaling():
    rng = np.random.default_rng(3)
    labels = phantom_labels((48, 48), rng)
    image = np.clip(phantom_image(labels, rng) / 0.4, 0, 1)
    truth = instance.affine_displacement(np.array([[1.08, 0, 2.5], [0, 0.95, -2]], np.float32), 1, (48, 48))
    moving = models.warp(image[None, ..., None], -truth[None])[0, ..., 0]
    moving_labels = np.rint(models.warp(labels[None, ..., None].astype(np.float32), -truth[None], "nearest")[0, ..., 0])
    displacement = cifl_tf.register_pair(moving, image, None, affine=True, levels=(2,), steps=60, verbose=0)
    before = dice_after(np.zeros_like(displacement), moving_labels.astype(int), labels)
    assert dice_after(displacement, moving_labels.astype(int), labels) > before + 0.15
    assert metrics.folding_fraction(displacement) == 0


def test_the_levels_after_the_affine_stage_warp_the_moving_features_once_by_both_transforms(monkeypatch):
    """Each level gets the moving image's own features and the affine matrix on its grid, not the affinely
    moved image described anew (a third encoder pass) nor its features warped twice (Dice 0.883 instead of 0.911
    on the bench volume under an affine misalignment and a deformation, intensity NCC; docs/registration.md)."""
    converted = []

    def shifting(matrix, factor, shape, to_factor=1):  # what the affine stage found: a shift along axis 0
        converted.append((factor, to_factor))
        return np.array([[1, 0, 1.5 / to_factor], [0, 1, 0]], np.float32)

    monkeypatch.setattr(instance, "level_matrix", shifting)
    moving, t1, _, _, _ = warped_pair((24, 24))
    descriptor = EdgeDescriptor(2)
    fitted, described, field = fitted_levels(monkeypatch, moving, t1, descriptor, affine=True, levels=(2, 1))
    assert len(described) == 2  # the moving and the fixed image, once each
    assert converted == [(2, 2), (2, 1), (2, 1)]  # fitted on the coarsest grid: to each level's, and to full size
    features = descriptor(moving[None, ..., None])[0].numpy()
    (affine_source, _), (coarse, _, coarse_matrix), (fine, _, fine_matrix) = fitted  # the affine stage, the levels
    for source in (affine_source, coarse):
        np.testing.assert_allclose(source, instance.pool(features, 2), atol=1e-5)
    np.testing.assert_allclose(fine, features, atol=1e-5)
    np.testing.assert_array_equal(coarse_matrix, shifting(None, 2, (24, 24), 2))
    np.testing.assert_array_equal(fine_matrix, shifting(None, 2, (24, 24)))
    expected = np.zeros((24, 24, 2), np.float32)
    expected[..., 0] = 1.5
    np.testing.assert_allclose(field, expected, atol=1e-5)  # no deformation fitted: the affine displacement


@pytest.mark.parametrize("grid", [(12, 10), (7, 8, 6)])
def test_compose_affine_is_the_deformation_followed_by_the_affine_transform(grid):
    rng = np.random.default_rng(len(grid))
    ndim = len(grid)
    deformation = rng.normal(0, 2, (2, *grid, ndim)).astype(np.float32)
    matrices = (np.eye(ndim, ndim + 1) + rng.normal(0, 0.1, (2, ndim, ndim + 1))).astype(np.float32)
    centre = (np.array(grid) - 1) / 2
    points = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1)
    for item in range(2):  # x + u(x) = y, then a(y) = (A - I)(y - m) + t: straight from the definition
        linear, shift = matrices[item, :, :-1], matrices[item, :, -1]
        y = points + deformation[item]
        expected = deformation[item] + (y - centre) @ (linear - np.eye(ndim)).T + shift
        np.testing.assert_allclose(instance.ComposeAffine()([deformation, matrices])[item], expected, atol=1e-4)


@pytest.mark.parametrize("grid", [(12, 10), (7, 8, 6)])
def test_compose_affine_without_a_deformation_is_voxelmorphs_affine_displacement(grid):
    ndim = len(grid)
    matrix = (np.eye(ndim, ndim + 1) + np.random.default_rng(ndim).normal(0, 0.1, (ndim, ndim + 1))).astype(np.float32)
    composed = instance.ComposeAffine()([np.zeros((1, *grid, ndim), np.float32), matrix[None]])[0]
    np.testing.assert_allclose(composed, vxm.utils.affine_to_dense_shift(matrix, grid, shift_center=True), atol=1e-5)


def test_compose_affine_computes_in_float32_under_a_global_mixed_policy():
    deformation = np.random.default_rng(0).normal(0, 2, (1, 9, 8, 2)).astype(np.float32)
    matrix = np.array([[[1.1, 0.05, 1.5], [-0.05, 0.9, -1]]], np.float32)
    expected = instance.ComposeAffine()([deformation, matrix])
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        composed = instance.ComposeAffine()([deformation, matrix])
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert composed.dtype == tf.float32
    np.testing.assert_array_equal(composed, expected)


def test_a_level_after_the_affine_stage_warps_by_the_deformation_then_the_affine_transform(tmp_path):
    rng = np.random.default_rng(5)
    grid = (12, 10)
    model = instance.instance_model(grid, 3, int_steps=2, initial=True)
    velocity = rng.normal(0, 0.8, (*grid, 2)).astype(np.float32)
    model.get_layer("velocity").set_weights([velocity])
    matrix = np.array([[[1.1, 0.05, 1.5], [-0.05, 0.9, -1]]], np.float32)
    image = rng.random((1, *grid, 3)).astype(np.float32)
    moved, returned_velocity = model([image, matrix])
    composed = instance.ComposeAffine()([instance.displacement(model)[None], matrix])
    np.testing.assert_allclose(moved, models.warp(image, composed), atol=1e-5)
    np.testing.assert_allclose(returned_velocity[0], velocity)
    assert np.abs(instance.displacement(model)).max() > 0.5  # the deformation moves
    model.save(tmp_path / "instance.keras")
    loaded = tf.keras.models.load_model(tmp_path / "instance.keras", safe_mode=True)
    np.testing.assert_allclose(loaded([image, matrix])[0], moved, atol=1e-6)


def test_affine_model_saves_and_loads(tmp_path):
    model = instance.affine_model((8, 10), 1)
    model.get_layer("affine").set_weights([np.array([[0.5, -0.2, 1.0], [0.1, 0.3, -0.5]], np.float32)])
    model.save(tmp_path / "affine.keras")
    loaded = tf.keras.models.load_model(tmp_path / "affine.keras", safe_mode=True,
                                        custom_objects={"SpatialTransformer": vxm.layers.SpatialTransformer})
    image = np.random.default_rng(1).random((1, 8, 10, 1)).astype(np.float32)
    assert np.abs(model(image) - image).max() > 0.01  # not the identity
    np.testing.assert_allclose(loaded(image), model(image), atol=1e-6)


def test_each_level_is_fitted_on_a_stream_without_the_autotuning_thread():
    """Which kept the CPU idle for seconds when fit's iterator was freed (synth.stream_options)."""
    class Recording:
        name, trainable_weights = "recording", []

        def fit(self, dataset, **kwargs):
            self.autotune, self.steps = dataset.options().autotune.enabled, kwargs["steps_per_epoch"]

    model = Recording()
    instance._fit(model, [np.zeros((4, 4, 1), np.float32)], [np.zeros((4, 4, 1), np.float32)], 7, verbose=0,
                  similarity="ncc")
    assert model.autotune is False and model.steps == 7


def test_numpy_numbers_and_arrays_are_numbers():
    moving, _, t2, _, _ = warped_pair((16, 16))
    kwargs = dict(encoder=None, steps=2, int_steps=1, verbose=0)
    np.testing.assert_allclose(
        cifl_tf.register_pair(moving, t2, learning_rate=np.float32(0.1), reg_weight=np.float64(0.5),
                              levels=np.array([2, 1]), **kwargs),
        cifl_tf.register_pair(moving, t2, learning_rate=0.1, reg_weight=0.5, levels=(2, 1), **kwargs), atol=1e-6)


def test_a_global_mixed_policy_does_not_reach_the_fitted_field():
    """In bfloat16, the coordinate 299 of a 300-pixel axis would round to 300, outside the image. The models are
    built anew under the policy; with the affine stage they hold every layer a registration without it builds."""
    rng = np.random.default_rng(0)
    moving, fixed = rng.random((2, 24, 300)).astype(np.float32)
    kwargs = dict(encoder=None, similarity="mse", steps=2, affine=True, **SMALL_GRAPH)
    expected = cifl_tf.register_pair(moving, fixed, **kwargs)
    instance._compiled.cache_clear()  # else the models built above, in float32, would be reused under the policy
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        np.testing.assert_allclose(cifl_tf.register_pair(moving, fixed, **kwargs), expected, atol=1e-6)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_equalize_registers_the_histogram_equalised_images():
    moving, t1, _, _, _ = warped_pair((16, 16))
    kwargs = dict(encoder=EdgeDescriptor(2), steps=3, **SMALL_GRAPH)
    np.testing.assert_allclose(cifl_tf.register_pair(moving, t1, equalize=True, **kwargs),
                               cifl_tf.register_pair(data.equalize(moving), data.equalize(t1), **kwargs), atol=1e-6)
    with pytest.raises(TypeError, match="register_pair: equalize must be True or False, got 1"):
        cifl_tf.register_pair(moving, t1, equalize=1, **kwargs)


def test_register_pair_takes_numpy_bools_as_python_ones():
    image = np.zeros((16, 16), np.float32)
    image[4:12, 5:11] = 1
    given = dict(equalize=np.False_, affine=np.False_, jit_compile=np.False_)
    python = {name: bool(value) for name, value in given.items()}
    fields = [instance.register_pair(image, np.roll(image, 1, 0), encoder=None, levels=(1,), steps=2, verbose=0,
                                     **flags) for flags in (given, python)]
    np.testing.assert_array_equal(*fields)
