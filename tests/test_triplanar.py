"""cifl_tf.triplanar: a 2D encoder applied to the slices along each axis of a volume."""
import numpy as np
import pytest

import cifl_tf
import tensorflow as tf
from cifl_tf import CIFLEncoder, Triplanar, load_encoder, save_encoder, tiling
from cifl_tf.descriptors import MIND


@pytest.fixture(scope="module")
def encoder():
    tf.keras.utils.set_random_seed(0)  # whatever ran before in this process
    encoder = CIFLEncoder(channels=3, features=4)
    encoder.build((None, None, None, 1))
    return encoder


def slice_features(encoder, volume, axis):
    """The 2D encoder's features of each slice of `volume` (X, Y, Z) across `axis`, stacked back: (X, Y, Z, C)."""
    slices = np.moveaxis(volume, axis, 0)[..., np.newaxis]
    return np.moveaxis(encoder(slices).numpy(), 0, axis)


def test_channels_are_the_l2_normalised_features_of_the_slices_across_each_axis(encoder):
    volume = np.random.default_rng(0).random((5, 6, 7), np.float32)
    stacked = np.concatenate([slice_features(encoder, volume, axis) for axis in range(3)], axis=-1)
    # tf.math.l2_normalize's formula: a voxel whose ReLU features are all zero stays zero, not 0 / 0
    expected = stacked / np.sqrt(np.maximum(np.sum(stacked ** 2, axis=-1, keepdims=True), 1e-12))
    triplanar = Triplanar(encoder)
    np.testing.assert_allclose(triplanar(volume[None, ..., None])[0], expected, atol=1e-5)
    assert (triplanar.ndim, triplanar.channels, triplanar.receptive_radius) == (3, 9, encoder.receptive_radius)


def test_a_descriptor_without_weights_works_too():
    mind = MIND(ndim=2)
    features = Triplanar(mind)(np.random.default_rng(1).random((1, 6, 5, 4, 1), np.float32)).numpy()
    assert features.shape == (1, 6, 5, 4, 3 * mind.channels)
    np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1, atol=1e-5)


def test_saves_and_loads_with_the_same_outputs(encoder, tmp_path):
    triplanar = Triplanar(encoder)
    volume = np.random.default_rng(2).random((1, 6, 7, 8, 1), np.float32)
    save_encoder(triplanar, str(tmp_path / "tri.weights.h5"))
    loaded = load_encoder(str(tmp_path / "tri.weights.h5"))
    assert isinstance(loaded, Triplanar) and not loaded.trainable
    assert loaded.encoder.get_config() == {**encoder.get_config(), "trainable": False}
    np.testing.assert_allclose(loaded(volume), triplanar(volume), atol=1e-6)


@pytest.mark.parametrize("slices_per_batch", [100, 3, 1, 0.5], ids=["all", "3", "1", "tiled-slices"])
def test_tiled_features_equal_untiled(encoder, slices_per_batch):
    """In batches of whole slices (any number, also not dividing the axis), or, the slices larger than
    the budget, each in 2D tiles."""
    volume = np.random.default_rng(3).random((40, 38, 6), np.float32)
    triplanar = Triplanar(encoder)
    largest_slice = 40 * 38 * tiling.bytes_per_pixel(triplanar)  # the per-pixel estimate its batches use
    np.testing.assert_allclose(tiling.tiled_features(triplanar, volume, int(slices_per_batch * largest_slice)),
                               triplanar(volume[None, ..., None])[0], atol=1e-5)


@pytest.mark.parametrize("max_memory", [0, 1.5e9, True])
def test_tiled_features_refuse_a_bad_budget(encoder, max_memory):
    with pytest.raises(ValueError, match=f"max_memory must be a positive integer number of bytes, got {max_memory}"):
        tiling.tiled_features(Triplanar(encoder), np.zeros((4, 4, 4), np.float32), max_memory)


@pytest.mark.parametrize("bad, message", [
    (CIFLEncoder(channels=2, features=4, ndim=3), r"must be a 2D encoder layer .*\(ndim 3\)"),
    ("encoder", r"must be a 2D encoder layer .*got 'encoder' \(ndim None\)"),
])
def test_rejects_what_is_not_a_2d_encoder(bad, message):
    with pytest.raises(ValueError, match=message):
        Triplanar(bad)


@pytest.mark.parametrize("tau_gamma", cifl_tf.encoder.PRETRAINED_TAU_GAMMAS)
def test_pretrained_3d_of_a_tau_gamma_is_the_triplanar_of_that_shipped_2d_encoder(tau_gamma):
    frozen, trainable = cifl_tf.pretrained(tau_gamma, ndim=3), cifl_tf.pretrained(tau_gamma, ndim=3, trainable=True)
    assert isinstance(frozen, Triplanar) and not frozen.trainable and trainable.trainable
    for ours, shipped in zip(frozen.encoder.get_weights(), cifl_tf.pretrained(tau_gamma).get_weights(), strict=True):
        np.testing.assert_array_equal(ours, shipped)


@pytest.mark.parametrize("shape", [(1, 8, 8, 1), (1, 4, 4, 4, 2), (4, 4, 4, 1)])
@pytest.mark.parametrize("built", [False, True], ids=["first-input", "built"])
def test_inputs_must_be_single_channel_volumes(encoder, shape, built):
    triplanar = Triplanar(encoder)
    if built:  # build() checked the first input only
        triplanar(np.zeros((1, 4, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match=r"Triplanar\(.*\) expects single-channel inputs of rank 5"):
        triplanar(np.zeros(shape, np.float32))


def test_a_global_mixed_policy_does_not_cast_the_volumes(encoder):
    volume = np.random.default_rng(0).random((1, 5, 6, 7, 1)).astype(np.float32)
    expected = Triplanar(encoder)(volume).numpy()
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = Triplanar(encoder)(volume).numpy()  # the float32 encoder must see the float32 volume
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    np.testing.assert_allclose(mixed, expected, atol=1e-6)
