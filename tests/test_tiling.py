"""Tiled inference: equal to untiled inference, tile sizes from a memory budget, receptive fields."""
import numpy as np
import pytest
import tensorflow as tf

import cifl_tf
from cifl_tf import Triplanar, evaluate, tiling


@pytest.fixture(scope="module")
def encoder_3d():
    return cifl_tf.CIFLEncoder(channels=3, features=4, ndim=3)


@pytest.mark.parametrize("ndim", [2, 3])
def test_receptive_radius_of_eight_3x3_convolutions_is_8(ndim, encoder_3d):
    encoder = cifl_tf.pretrained(0.1) if ndim == 2 else encoder_3d
    assert tiling.receptive_radius(encoder) == 8


@pytest.mark.parametrize("ndim, architecture, dilations, local_normalization, radius", [
    (2, "paper", None, None, 8), (2, "context", None, None, 8 + 2 + 4 + 8 + 16),
    (2, "context", (2, 4), None, 8 + 2 + 4), (2, "paper", None, 1.2, 8 + 4),  # the window's ceil(3 sigma)
    (2, "context", (2, 4), 2.0, 8 + 2 + 4 + 6),
    (3, "context", (2, 4), 2.0, 8 + 2 + 4 + 6)])  # every term once in 3D: a 3D probe (83^3 voxels) takes seconds
def test_the_encoders_stated_radius_is_the_measured_one(ndim, architecture, dilations, local_normalization, radius):
    tf.keras.utils.set_random_seed(0)  # a ReLU off at every probed path would hide pixels from the probe
    encoder = cifl_tf.CIFLEncoder(channels=4, features=8, ndim=ndim, architecture=architecture, dilations=dilations,
                                  local_normalization=local_normalization)
    assert encoder.receptive_radius == radius
    assert tiling.measured_radius(encoder) == radius


def test_receptive_radius_counts_kernel_size_and_dilation():
    class Dilated(cifl_tf.CIFLEncoder):  # eight 3x3 convolutions with dilation 2: 16 pixels
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            for conv in self.convs:
                conv.dilation_rate = (2, 2)

    tf.keras.utils.set_random_seed(0)
    encoder = Dilated(channels=2, features=4)
    assert tiling.receptive_radius(encoder) == tiling.measured_radius(encoder) == 16


class MinusImageMean(tf.keras.layers.Layer):
    """Each pixel minus the image's mean: every output looks at the whole image, which tiles cannot do."""
    ndim, channels = 2, 1

    def call(self, images):
        return images - tf.reduce_mean(images, axis=(1, 2), keepdims=True)


def test_a_layer_that_looks_at_the_whole_image_cannot_be_tiled():
    with pytest.raises(ValueError, match="reaches more than 40 pixels; it cannot be tiled"):
        tiling.measured_radius(MinusImageMean())


@pytest.mark.parametrize("shape, radius, core", [((37, 53), 8, (10, 9)), ((21, 23, 27), 4, (8, 8, 27)),
                                                 ((30, 5), 3, (7, 5))])
def test_every_tile_has_one_shape_and_its_context_covers_the_radius(shape, radius, core):
    """Extended tiles are core + 2 radius (or the whole axis), moved inside the image at its border; each output
    pixel's tile holds every pixel within `radius` of it, so a box sum of that radius equals the whole image's."""
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    shapes = []

    def box_sum(tile):  # zero padding, as the whole image's: a box at the image border sees zeros beyond it
        shapes.append(tuple(tile.shape[1:-1]))
        size = (2 * radius + 1,) * len(shape)
        return tf.nn.convolution(tile, tf.ones(size + (1, 1)), padding="SAME")

    tiled = tiling.map_tiles(box_sum, image, radius, core, np.empty(shape + (1,), np.float32))
    whole = box_sum(tf.constant(image[np.newaxis, ..., np.newaxis])).numpy()[0]
    np.testing.assert_allclose(tiled, whole, rtol=1e-5)
    assert set(shapes[:-1]) == {tuple(min(c + 2 * radius, n) for c, n in zip(core, shape))}


@pytest.mark.parametrize("describer, expected", [
    (lambda: cifl_tf.CIFLEncoder(channels=16, features=32), 4 * 4 * 32),
    (lambda: cifl_tf.CIFLEncoder(channels=16, features=32, architecture="context"), 4 * 6 * 32),
    (lambda: cifl_tf.CIFLEncoder(channels=48, features=32, ndim=3), 4 * 4 * 48),  # the output is the widest
    (lambda: cifl_tf.descriptors.MIND(ndim=3), 4 * 6 * 6), (lambda: cifl_tf.descriptors.MIND(ndim=2), 4 * 6 * 4),
    (lambda: Triplanar(cifl_tf.CIFLEncoder(channels=16, features=32, architecture="context")), 4 * 6 * 48),
    (lambda: MinusImageMean(), 4 * tiling.LIVE_ACTIVATIONS * 1)])  # a layer that states nothing
def test_bytes_per_pixel_counts_each_describers_live_activations(describer, expected):
    assert tiling.bytes_per_pixel(describer()) == expected


@pytest.mark.parametrize("shape, budget_side", [((37, 53), 30), ((21, 23, 27), 20)])
def test_tiled_equals_untiled_on_odd_shapes(shape, budget_side, encoder_3d):
    encoder = cifl_tf.pretrained(0.1) if len(shape) == 2 else encoder_3d
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    budget = tiling.bytes_per_pixel(encoder) * budget_side ** len(shape)
    core = tiling.tile_shape(shape, 8, tiling.bytes_per_pixel(encoder), budget)
    assert all(size % c for size, c in zip(shape, core))  # tiles do not divide the shape
    tiled = tiling.tiled_features(encoder, image, max_memory=budget)
    np.testing.assert_allclose(tiled, encoder(image[np.newaxis, ..., np.newaxis]).numpy()[0], atol=1e-5)


def test_a_thin_volume_is_tiled_whole_across_its_slices(encoder_3d):
    image = np.random.default_rng(0).random((40, 36, 5)).astype(np.float32)
    budget = tiling.bytes_per_pixel(encoder_3d) * 25 * 25 * 5  # cores of 9, their halos within the 5 slices
    assert tiling.tile_shape(image.shape, 8, tiling.bytes_per_pixel(encoder_3d), budget) == (8, 9, 5)
    tiled = tiling.tiled_features(encoder_3d, image, max_memory=budget)
    np.testing.assert_allclose(tiled, encoder_3d(image[np.newaxis, ..., np.newaxis]).numpy()[0], atol=1e-5)


@pytest.mark.parametrize("shape, tile_side, variant", [((48, 48), 16, "mind"), ((24, 24, 24), 12, "ssc")])
def test_tiled_mind_takes_its_variance_clip_over_the_whole_image(shape, tile_side, variant):
    # A faint noisy background beside an object: each tile's own mean of V clipped other pixels than the
    # image's (up to 0.97 apart), and the tiles described the noise that the whole image suppresses.
    layer = cifl_tf.descriptors.MIND(len(shape), variant)
    rng = np.random.default_rng(0)
    image = rng.normal(0.1, 1e-3, shape).astype(np.float32)
    image[(slice(0, 8),) * len(shape)] = 1
    budget = tiling.bytes_per_pixel(layer) * tile_side ** len(shape)
    assert max(tiling.tile_shape(shape, layer.receptive_radius, tiling.bytes_per_pixel(layer), budget)) < shape[0]
    for describer in (layer, cifl_tf.FeatureStack([layer, cifl_tf.descriptors.MIND(len(shape), dilation=2)])):
        whole = describer(image[np.newaxis, ..., np.newaxis]).numpy()[0]
        np.testing.assert_allclose(tiling.tiled_features(describer, image, max_memory=budget), whole, atol=1e-5)


def test_a_locally_normalized_encoder_tiles_with_its_window_in_the_halo():
    tf.keras.utils.set_random_seed(0)
    encoder = cifl_tf.CIFLEncoder(channels=3, features=4, local_normalization=2.0)  # radius 8 + 6
    image = np.random.default_rng(2).random((45, 38)).astype(np.float32)
    budget = tiling.bytes_per_pixel(encoder) * 40 ** 2
    assert tiling.tile_shape(image.shape, 14, tiling.bytes_per_pixel(encoder), budget) != image.shape
    tiled = tiling.tiled_features(encoder, image, max_memory=budget)
    np.testing.assert_allclose(tiled, encoder(image[np.newaxis, ..., np.newaxis]).numpy()[0], atol=1e-5)


def test_the_recommended_encoder_tiles_with_its_38_pixel_halo():
    encoder = cifl_tf.pretrained()
    image = np.random.default_rng(1).random((107, 110)).astype(np.float32)  # more pixels than the budget's
    budget = tiling.bytes_per_pixel(encoder) * 100 ** 2  # extended tiles of 100 pixels: cores of 24
    assert tiling.tile_shape(image.shape, 38, tiling.bytes_per_pixel(encoder), budget) == (22, 22)
    tiled = tiling.tiled_features(encoder, image, max_memory=budget)
    np.testing.assert_allclose(tiled, encoder(image[np.newaxis, ..., np.newaxis]).numpy()[0], atol=1e-5)


@pytest.mark.parametrize("shape, radius, budget, expected", [
    ((100, 100), 8, 4 * 40 ** 2, (20, 20)),        # extended side 40 -> core 24 -> 5 equal tiles of 20
    ((50, 30), 2, 4 * 12 ** 2, (8, 8)),            # core 8: 7 tiles of 8 (50), 4 of 8 (30)
    ((50, 30), 2, 4 * 12 ** 2 - 1, (7, 6)),        # a byte less: extended side 11, core 7: 8 tiles of 7, 5 of 6
    ((37, 53), 8, 4 * 30 ** 2, (13, 14)),          # core 14: 3 tiles of 13, 4 of 14
    ((64, 64, 64), 8, 4 * 48 ** 3, (32, 32, 32)),  # extended side 48 -> core 32
    ((10, 10, 10), 1, 4 * 1000 ** 3, (10, 10, 10)),  # the whole image fits
    ((61, 67), 38, 4 * 61 * 67, (61, 67)),         # it fits just, with no halo beyond its border
    ((64, 64, 4), 8, 4 * 2604, (8, 8, 4)),         # a thin volume: its 4 slices whole, extended 25 x 25 x 4
    ((512, 512, 24), 8, 4 * 24 * 341 ** 2, (256, 256, 24)),  # not cubes of 103, which would fill 12% of it
    ((70, 83), 38, 4 * 70 * 80, (70, 4)),          # an extended tile spans the first axis whole
])
def test_tile_shape_from_budget(shape, radius, budget, expected):
    assert tiling.tile_shape(shape, radius, 4, budget) == expected


def test_budget_too_small_names_the_bytes():
    with pytest.raises(ValueError, match=r"max_memory \(--max-memory\) 100 bytes is too small"):
        tiling.tile_shape((64, 64), 8, 4, 100)
    # the least budget: one-pixel cores with their halo, within the image (4 slices, not 17)
    with pytest.raises(ValueError, match=f"halo needs at least {4 * 17 * 17 * 4} bytes"):
        tiling.tile_shape((64, 64, 4), 8, 4, 4 * 17 * 17 * 4 - 1)
    assert tiling.tile_shape((64, 64, 4), 8, 4, 4 * 17 * 17 * 4) == (1, 1, 4)
    with pytest.raises(ValueError, match="max_memory must be a positive integer"):
        tiling.tile_shape((64, 64), 8, 4, 0.5)


@pytest.mark.parametrize("triplanar, budget_pixels, dtype", [(False, 19 ** 3, "<f4"), (True, 10 ** 3, "<f4"),
                                                             (True, 250, ">f4")],
                         ids=["3d-tiles", "triplanar", "triplanar-2d-tiles-big-endian"])
def test_tiled_features_fill_an_array_in_fortran_order_as_a_file_maps_it(triplanar, budget_pixels, dtype, encoder_3d):
    """`out` laid out as data.save_nifti_channels maps a NIfTI file (in the byte order of the input's header):
    what the CLI writes features into. Budgets of several 3D tiles (19^3 pixels, less than the image's 7429); of 2-3 slices; of less than a slice across two of
    the axes (2D tiles: 3 x 3-pixel cores and their halo, the largest that still cut those slices; 2 x 2 took twice
    the time)."""
    encoder = Triplanar(cifl_tf.pretrained(0.1)) if triplanar else encoder_3d
    image = np.random.default_rng(3).random((19, 23, 17)).astype(np.float32)
    out = np.zeros((19, 23, 17, encoder.channels), dtype, order="F")
    budget = tiling.bytes_per_pixel(encoder) * budget_pixels
    assert tiling.tiled_features(encoder, image, budget, out) is out
    np.testing.assert_allclose(out, encoder(image[np.newaxis, ..., np.newaxis]).numpy()[0], atol=1e-5)


@pytest.mark.parametrize("out, problem", [
    (np.zeros((8, 8, 16), np.float64), "float64 \\(8, 8, 16\\)"),
    (np.zeros((8, 9, 16), np.float32), "float32 \\(8, 9, 16\\)"),
    ([[0.0]], "list"),
    (tf.zeros((8, 8, 16)), "EagerTensor"),  # not writable; its dtype once failed np.dtype with a TypeError
])
def test_tiled_features_refuse_an_out_array_of_another_shape_or_type(out, problem):
    with pytest.raises(ValueError, match=f"out must be a float32 array of shape \\(8, 8, 16\\), got {problem}"):
        tiling.tiled_features(cifl_tf.pretrained(0.1), np.zeros((8, 8), np.float32), out=out)


def test_tiled_features_rejects_wrong_dimensions_and_non_layers():
    with pytest.raises(ValueError, match="is 2D but the image has shape"):
        tiling.tiled_features(cifl_tf.pretrained(), np.zeros((8, 8, 8)))
    with pytest.raises(TypeError, match="expected a Keras layer with ndim"):
        tiling.tiled_features(lambda x: x, np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"the image is empty, shape \(0, 16\)"):
        tiling.tiled_features(cifl_tf.pretrained(), np.zeros((0, 16)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_tiled_features_refuse_non_finite_images_but_for_mind(bad):
    """As a graph with oneDNN, the fused convolution and ReLU turned NaN into numbers that layer(image) keeps NaN."""
    image = np.random.default_rng(0).random((20, 17)).astype(np.float32)
    image[10, 5] = bad
    triplanar = Triplanar(cifl_tf.pretrained(0.1))
    for layer, spoilt in ((cifl_tf.pretrained(0.1), image), (triplanar, np.stack([image] * 3))):
        count = np.count_nonzero(~np.isfinite(spoilt))
        with pytest.raises(ValueError, match=f"tiled_features: the image has {count} NaN or infinite values"):
            tiling.tiled_features(layer, spoilt)
    mind = cifl_tf.descriptors.MIND(2)  # keeps them to their neighbourhoods, as when called
    np.testing.assert_allclose(tiling.tiled_features(mind, image, max_memory=20000), mind(image[None, ..., None])[0],
                               atol=1e-6)


def test_tiled_features_give_an_integer_image_to_the_layer_as_it_is():
    image = np.random.default_rng(0).integers(0, 256, (20, 17)).astype(np.uint8)
    with pytest.raises(TypeError, match="images must be floating-point intensities in \\[0, 1\\], got uint8"):
        tiling.tiled_features(cifl_tf.pretrained(0.1), image)
    with pytest.raises(TypeError, match="got uint8"):
        tiling.tiled_features(Triplanar(cifl_tf.pretrained(0.1)), np.stack([image] * 4, -1))
    mind = cifl_tf.descriptors.MIND(2)  # MIND takes any intensities, as when called
    np.testing.assert_allclose(tiling.tiled_features(mind, image, max_memory=20000),
                               mind(image[None, ..., None].astype(np.float32))[0], atol=1e-6)


def test_segment_with_a_tiled_encoder_equals_the_whole_model():
    encoder = cifl_tf.CIFLEncoder(channels=3, features=4)
    model = cifl_tf.segmentation_model((32, 32), 3, encoder, nb_features=4, nb_levels=2)
    assert model.encoder is encoder
    images = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    budget = tiling.bytes_per_pixel(encoder) * 20 ** 2  # tiles of 4 x 4 pixels and their halo
    probabilities = model.predict(images[..., np.newaxis], verbose=0)
    confident = np.sort(probabilities, axis=-1)[..., -1] - np.sort(probabilities, axis=-1)[..., -2] > 1e-4
    assert confident.mean() > 0.9  # pixels whose label float rounding cannot flip
    tiled = evaluate.segment(model, images, max_memory=budget)
    np.testing.assert_array_equal(tiled[confident], evaluate.segment(model, images)[confident])


def test_segment_refuses_a_memory_budget_for_a_model_without_an_encoder():
    model = cifl_tf.segmentation_model((16, 16), 3, nb_features=4, nb_levels=2)
    assert model.encoder is None
    with pytest.raises(ValueError, match=r"max_memory bounds the features of the model's encoder, and "
                                         r"cifl_segmentation has none"):
        evaluate.segment(model, np.zeros((1, 16, 16), np.float32), max_memory=2 ** 20)


RANK_CHANGE = """
import numpy as np, cifl_tf, tensorflow as tf
tf.keras.utils.set_random_seed(0)
x = np.random.default_rng(0).random((2, 8, 8, 8, 1)).astype(np.float32)
for describer in (cifl_tf.CIFLEncoder(2, 2, ndim=3), cifl_tf.MIND(ndim=3), cifl_tf.Triplanar(cifl_tf.CIFLEncoder(2, 2))):
    model = cifl_tf.encoder_model(describer)
    model.predict(x, verbose=0)
    try:  # retraced with an unknown rank, which oneDNN's kernels took and aborted on
        model.predict(x[..., 0], verbose=0)
    except tf.errors.InvalidArgumentError as error:
        print("refused:", "is not compatible with expected shape" in str(error))
"""


def test_a_describer_refuses_another_rank_after_a_retrace_instead_of_aborting():
    import subprocess
    import sys
    process = subprocess.run([sys.executable, "-c", RANK_CHANGE], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.split("\n").count("refused: True") == 3, process.stdout


@pytest.mark.parametrize("describer", [lambda: cifl_tf.CIFLEncoder(2, 2), lambda: cifl_tf.descriptors.MIND(ndim=2)])
def test_a_describer_refuses_an_empty_batch(describer):
    with pytest.raises(ValueError, match=r"the batch is empty, shape \(0, 8, 8, 1\)"):
        describer()(np.zeros((0, 8, 8, 1), np.float32))
