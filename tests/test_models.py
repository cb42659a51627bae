"""Downstream models (paper Sec. 2-3): segmentation_model and registration_model, on tiny shapes."""
import re

import numpy as np
import pytest

import cifl_tf
import tensorflow as tf
import voxelmorph as vxm
from cifl_tf import models
from cifl_tf.descriptors import MIND

SHAPE = (32, 32)
TINY_UNET = dict(nb_features=4, nb_levels=2)
TINY_VXM = dict(nb_unet_features=[[8, 8], [8, 8, 8]], int_steps=0)


def blobs(count, seed=0, shape=SHAPE):
    """Images (count, *shape, 1) of two bright squares on a dark background, and their label maps."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((count, *shape), np.int32)
    for n in range(count):
        r, c = rng.integers(2, shape[0] // 2 - 6, 2)
        labels[n, r:r + 8, c:c + 8] = 1
        labels[n, r + 12:r + 20, c + 12:c + 20] = 2
    images = np.array([0.1, 0.9, 0.5], np.float32)[labels] + rng.normal(0, 0.02, labels.shape).astype(np.float32)
    return images[..., np.newaxis], labels


@pytest.fixture(scope="module")
def encoder():
    return cifl_tf.CIFLEncoder(channels=4, features=8, name="cifl_encoder")


def _tiny_model(kind, encoder):
    if kind == "segmentation":
        return cifl_tf.segmentation_model(SHAPE, 3, encoder, **TINY_UNET)
    return cifl_tf.registration_model(SHAPE, encoder, **TINY_VXM)


@pytest.fixture(scope="module")
def tiny(encoder):
    """tiny(kind, with_encoder): one shared tiny model of each kind, for tests that do not change its weights."""
    built = {}

    def get(kind, with_encoder):
        if (kind, with_encoder) not in built:
            built[kind, with_encoder] = _tiny_model(kind, encoder if with_encoder else None)
        return built[kind, with_encoder]

    return get


def _fit(model, images, labels, epochs=1):
    if isinstance(model, models.SegmentationModel):
        model.fit(images, tf.keras.utils.to_categorical(labels, 3), epochs=epochs, batch_size=2, verbose=0)
    else:  # unsupervised: the pairs and no targets
        model.fit([images, images[::-1]], epochs=epochs, batch_size=2, verbose=0)


def _outputs(model, images):
    """Segmentation probabilities, or the displacement registering images onto themselves reversed."""
    if isinstance(model, models.SegmentationModel):
        return model.predict(images, verbose=0)
    return model.register(images, images[::-1])


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, tf.keras.Model):
            yield from _all_layers(layer)


def _randomize_flow(model, seed=0):
    """Gives the flow convolution a large random kernel, so that the displacement is far from 0."""
    layer = model.get_layer(f"{model.name}_flow")
    kernel, bias = layer.get_weights()
    layer.set_weights([np.random.default_rng(seed).normal(0, 0.5, kernel.shape).astype(np.float32), bias])


@pytest.mark.parametrize("with_encoder", [False, True])
def test_segmentation_model_outputs_softmax_over_labels(encoder, tiny, with_encoder):
    model = tiny("segmentation", with_encoder)
    images, _ = blobs(2)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (2, *SHAPE, 3)
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(-1), 1, atol=1e-5)
    assert (encoder in model.layers) == with_encoder


def test_soft_dice_takes_one_hot_labels_of_any_type_and_computes_in_float32():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (2, 256, 256))
    probabilities = tf.nn.softmax(rng.normal(0, 2, (2, 256, 256, 3)).astype(np.float32))

    def one_hot(dtype):  # a tensor, as fit passes it
        return tf.constant(np.eye(3, dtype=dtype)[labels])

    y, p = np.eye(3)[labels].reshape(2, -1, 3), probabilities.numpy().astype(np.float64).reshape(2, -1, 3)
    dice = 2 * (y * p).sum(1) / ((y ** 2).sum(1) + (p ** 2).sum(1))  # (B, L), background included
    expected = np.mean(1 - dice.mean(-1))  # the Keras loss's call averages the samples' losses
    for dtype in (np.float32, np.uint8, np.int64, bool):  # float32 sums over the 2 x 256^2 pixels: rtol 1e-5
        np.testing.assert_allclose(models.SoftDiceLoss()(one_hot(dtype), probabilities), expected, rtol=1e-5)
    # a float16 softmax, as mixed_float16 makes it: its sums over the image overflowed in 16 bits (0.0 here, not 0.597)
    np.testing.assert_allclose(models.SoftDiceLoss()(one_hot(np.float16), tf.cast(probabilities, tf.float16)),
                               expected, rtol=1e-3)
    for not_one_hot in (labels, labels[..., np.newaxis].astype(np.float32)):
        with pytest.raises(ValueError, match=r"labels must be one-hot like the predictions \(2, 256, 256, 3\), got "
                                             r"shape \(2, 256, 256(, 1)?\)"):
            models.SoftDiceLoss()(tf.constant(not_one_hot), probabilities)


def test_soft_dice_averages_the_background_label_with_the_others():
    # one sample of 4 pixels: background predicted right everywhere, label 1 half right
    truth = np.eye(2, dtype=np.float32)[[[0, 0, 1, 1]]]
    predicted = np.eye(2, dtype=np.float32)[[[0, 0, 0, 1]]]
    background, foreground = 2 * 2 / (2 + 3), 2 * 1 / (2 + 1)
    np.testing.assert_allclose(models.SoftDiceLoss()(truth, predicted), [1 - (background + foreground) / 2], rtol=1e-6)


def test_crossentropy_is_computed_in_float32_under_a_mixed_policy():
    images, labels = blobs(2)
    one_hot = tf.one_hot(labels, 3)
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = cifl_tf.segmentation_model(SHAPE, 3, loss="crossentropy", **TINY_UNET)
        probabilities = model(images)
        loss = model.loss(one_hot, probabilities)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert probabilities.dtype == tf.bfloat16 and loss.dtype == tf.float32
    probabilities = np.float32(probabilities)  # Keras makes them sum to 1 first
    expected = -np.mean(np.sum(one_hot * np.log(probabilities / probabilities.sum(-1, keepdims=True)), axis=-1))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("shape, unet_kwargs", [((27, 27), dict(nb_features=4, nb_levels=2, pool_size=3)),
                                                ((32, 24), dict(nb_features=4, nb_levels=3, pool_size=(4, 2))),
                                                (SHAPE, dict(nb_features=[[4], [8]], nb_levels=None)),
                                                (SHAPE, dict(nb_features=4, nb_levels=2, conv_size=(3, 5)))])
def test_unet_pool_sizes_and_feature_lists_that_neurite_builds(shape, unet_kwargs):
    model = cifl_tf.segmentation_model(shape, 3, **unet_kwargs)
    assert model(np.zeros((1, *shape, 1), np.float32)).shape == (1, *shape, 3)


def test_a_registration_model_of_a_one_voxel_field_still_builds_as_saved_ones_did(tmp_path):
    """registration_model refuses such a field now; models saved before it did must still load."""
    model = models.RegistrationModel(SHAPE, svf_resolution=32, int_resolution=32, nb_unet_features=[[4], [4, 4]])
    model.compile(optimizer="adam")
    models.save_model(model, str(tmp_path / "model.keras"))
    assert models.load_model(str(tmp_path / "model.keras")).get_config()["svf_resolution"] == 32


@pytest.mark.parametrize("vxm_kwargs", [dict(unet_half_res=False, nb_unet_features=[[4, 4], [4, 4, 4]], int_steps=0),
                                        dict(nb_unet_features=[[], [4, 4]], int_steps=0),  # no encoder level
                                        # int_resolution 2 (the default) is ignored without integration
                                        dict(inshape=(3, 3), nb_unet_features=[[], [4, 4]], int_steps=0)])
def test_vxm_arguments_that_voxelmorph_builds(vxm_kwargs):
    shape, vxm_kwargs = vxm_kwargs.get("inshape", SHAPE), {k: v for k, v in vxm_kwargs.items() if k != "inshape"}
    model = cifl_tf.registration_model(shape, **vxm_kwargs)
    assert model.register(np.zeros((1, *shape, 1)), np.zeros((1, *shape, 1))).shape == (1, *shape, 2)


def test_segmentation_baseline_learns_labels_with_the_default_dice_loss():
    images, labels = blobs(4)
    tf.keras.utils.set_random_seed(0)  # unseeded, the initialisation made it fail now and then
    model = cifl_tf.segmentation_model(SHAPE, 3, learning_rate=1e-2, **TINY_UNET)
    assert isinstance(model.loss, models.SoftDiceLoss)
    before = cifl_tf.evaluate.evaluate_segmentation(model, images, labels).summary()["dice"][0]
    _fit(model, images, labels, epochs=30)
    after = cifl_tf.evaluate.evaluate_segmentation(model, images, labels).summary()["dice"][0]
    assert after > 0.9 > before


@pytest.mark.parametrize("kind", ["segmentation", "registration"])
def test_fitting_the_head_on_encoded_features_trains_the_model_as_fitting_it_on_images(encoder, kind):
    """Also: fitting the model on images leaves its stacked encoder's weights unchanged (one fit for both)."""
    images, labels = blobs(4)
    features = encoder(images).numpy()
    frozen = [w.numpy().copy() for w in encoder.weights]
    trained = []
    for fitted, inputs in (("model", images), ("head", features)):
        tf.keras.utils.set_random_seed(0)
        model = _tiny_model(kind, encoder)
        assert not encoder.trainable and len(model.weights) == len(model.trainable_weights) + len(frozen)
        initial = [w.numpy().copy() for w in model.trainable_weights]
        target = model if fitted == "model" else model.head()
        if kind == "segmentation":
            target.fit(inputs, tf.keras.utils.to_categorical(labels, 3), batch_size=2, epochs=2, shuffle=False, verbose=0)
        else:
            target.fit([inputs, inputs[::-1]], batch_size=2, epochs=2, shuffle=False, verbose=0)
        assert any(not np.array_equal(a, b.numpy()) for a, b in zip(initial, model.trainable_weights))
        for before, after in zip(frozen, encoder.weights, strict=True):
            np.testing.assert_array_equal(before, after.numpy())
        trained.append(model)
    for by_model, by_head in zip(*(m.trainable_weights for m in trained)):
        np.testing.assert_allclose(by_head.numpy(), by_model.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_outputs(trained[1], images), _outputs(trained[0], images), rtol=1e-4, atol=1e-5)


def test_encoder_from_a_saved_file_is_frozen_and_keeps_its_weights(encoder, tmp_path):
    cifl_tf.save_encoder(encoder, str(tmp_path / "encoder.weights.h5"))
    loaded = cifl_tf.load_encoder(str(tmp_path / "encoder.weights.h5"))
    model = cifl_tf.segmentation_model(SHAPE, 3, loaded, **TINY_UNET)
    images, labels = blobs(2)
    _fit(model, images, labels)
    np.testing.assert_array_equal(loaded(images).numpy(), encoder(images).numpy())


@pytest.mark.parametrize("kind", ["segmentation", "registration"])
@pytest.mark.parametrize("with_encoder", [False, True])
def test_model_round_trips_through_a_keras_file_in_safe_mode(tiny, kind, with_encoder, tmp_path):
    model = tiny(kind, with_encoder)
    images, _ = blobs(2)
    path = models.save_model(model, str(tmp_path))
    assert path == str(tmp_path / models.MODEL_FILE)
    assert [p.name for p in tmp_path.iterdir()] == [models.MODEL_FILE]  # no temporary file left behind
    loaded = tf.keras.models.load_model(path, safe_mode=True)
    assert type(loaded) is type(model) and loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(_outputs(loaded, images), _outputs(model, images))
    assert [layer.trainable for layer in _all_layers(loaded) if isinstance(layer, cifl_tf.CIFLEncoder)] == \
        ([False] if with_encoder else [])
    if kind == "segmentation":
        assert isinstance(loaded.encoder, cifl_tf.CIFLEncoder) if with_encoder else loaded.encoder is None
    assert type(loaded.loss) is type(model.loss)  # compiled as it was saved: loss and optimiser
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert models.load_model(str(tmp_path), kind).get_config() == model.get_config()
    # Keras's own JSON gave the bare class name, and model_from_json returned that string
    from_json = tf.keras.models.model_from_json(model.to_json())
    assert type(from_json) is type(model) and from_json.get_config() == model.get_config()


def _compute_dtypes(model):
    return {layer.compute_dtype for layer in _all_layers(model) if isinstance(layer, tf.keras.layers.Conv2D)}


@pytest.mark.parametrize("kind", ["segmentation", "registration"])
@pytest.mark.parametrize("built_under, loaded_under", [("mixed_float16", "float32"), ("float32", "mixed_bfloat16")])
def test_a_model_loads_under_the_dtype_policy_it_was_built_under(kind, built_under, loaded_under, tmp_path):
    """Not under the policy of the process that loads it: its outputs would change."""
    images, _ = blobs(2)
    tf.keras.mixed_precision.set_global_policy(built_under)
    try:
        model = _tiny_model(kind, None)
    finally:
        tf.keras.mixed_precision.set_global_policy(loaded_under)
    try:
        loaded = models.load_model(models.save_model(model, str(tmp_path)), kind)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    built_dtype = tf.keras.mixed_precision.Policy(built_under).compute_dtype
    assert _compute_dtypes(loaded) == _compute_dtypes(model) == {built_dtype}
    np.testing.assert_array_equal(_outputs(loaded, images), _outputs(model, images))


@pytest.mark.parametrize("kind", ["segmentation", "registration"])
@pytest.mark.parametrize("name, save_format", [("model.h5", None), ("savedmodel", None), ("model.keras", "tf")])
def test_model_saves_to_a_keras_file_only(tiny, kind, name, save_format, tmp_path):
    """The other formats wrote files that did not load (an unknown layer, or Functional missing its arguments)."""
    with pytest.raises(ValueError, match=f"Model saves to a .keras file only \\(save_model\\), got '.*{name}'"):
        tiny(kind, False).save(str(tmp_path / name), save_format=save_format)
    assert not list(tmp_path.iterdir())


def test_model_refuses_a_save_format_given_by_position(tiny, tmp_path):
    with pytest.raises(ValueError, match="with save_format 'h5'"):  # written as HDF5 into model.keras before
        tiny("segmentation", False).save(str(tmp_path / "model.keras"), True, "h5")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["segmentation", "registration"])
def test_mind_stands_where_an_encoder_does_and_round_trips(kind, tmp_path):
    descriptor = MIND(variant="ssc", name="mind")
    model = _tiny_model(kind, descriptor)
    images, labels = blobs(2)
    _fit(model, images, labels)
    if kind == "registration":  # VxmDense registers the descriptor images: moved = warped MIND(moving)
        moved = model([images, images[::-1]])[0].numpy()
        assert moved.shape[-1] == descriptor.channels == 4
        np.testing.assert_allclose(moved, models.warp(descriptor(images).numpy(), _outputs(model, images)),
                                   atol=1e-5)
    loaded = models.load_model(models.save_model(model, str(tmp_path)), kind)
    assert loaded.get_config() == model.get_config()
    assert [layer.get_config() for layer in _all_layers(loaded) if isinstance(layer, MIND)] == \
        [descriptor.get_config()]
    np.testing.assert_array_equal(_outputs(loaded, images), _outputs(model, images))


@pytest.mark.parametrize("kind", ["segmentation", "registration"])
def test_models_have_no_lambda_layers(tiny, kind):
    model = tiny(kind, True)
    assert not [layer.name for layer in _all_layers(model) if isinstance(layer, tf.keras.layers.Lambda)]


def test_registration_loss_compares_moved_features_with_fixed_features(encoder):
    model = cifl_tf.registration_model(SHAPE, encoder, reg_weight=0.5, **TINY_VXM)
    _randomize_flow(model)
    images, _ = blobs(2)
    moving, fixed = images, images[::-1]
    moved, field = model([moving, fixed])
    assert moved.shape == (2, *SHAPE, encoder.channels)
    displacement = model.register(moving, fixed)
    assert np.abs(displacement).max() > 1  # a real deformation, not the near-identity of a fresh model
    np.testing.assert_allclose(moved, models.warp(encoder(moving).numpy(), displacement), atol=1e-5)
    expected = (np.mean((encoder(fixed).numpy() - moved.numpy()) ** 2)
                + 0.5 * np.mean(vxm.losses.Grad("l2").loss(None, field).numpy()))
    np.testing.assert_allclose(float(model.losses[0]), expected, rtol=1e-5)


@pytest.mark.parametrize("similarity", ["mse", "ncc"])
def test_registration_loss_layer_is_voxelmorph_similarity_plus_weighted_grad(similarity):
    rng = np.random.default_rng(0)
    fixed, moved = (tf.constant(rng.random((2, *SHAPE, 3)), tf.float32) for _ in range(2))
    field = tf.constant(rng.normal(0, 1, (2, 16, 16, 2)), tf.float32)
    loss = models.RegistrationLoss(similarity, reg_weight=0.3, loss_mult=2)([fixed, moved, field])
    similar = (vxm.losses.MSE().loss(fixed, moved) if similarity == "mse"
               else tf.reduce_mean(vxm.losses.NCC().loss(fixed, moved)))
    smooth = tf.reduce_mean(vxm.losses.Grad("l2", loss_mult=2).loss(None, field))
    np.testing.assert_allclose(float(loss), float(similar + 0.3 * smooth), rtol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_a_mixed_policy_leaves_the_loss_and_the_deformation_in_float32(policy):
    """The UNet may compute in 16 bits; the NCC's local variances, the integration and the warps do not: in bfloat16
    NCC came to -218 for a loss of -0.72, and in float16 the model could not be built."""
    rng = np.random.default_rng(0)
    fixed = tf.constant(rng.random((1, 64, 64, 1)), tf.float32)
    moved = tf.clip_by_value(fixed + rng.normal(0, 0.05, fixed.shape), 0, 1)
    field = tf.constant(rng.normal(0, 0.3, (1, 32, 32, 2)), tf.float32)
    images, _ = blobs(2)
    expected = float(models.RegistrationLoss("ncc")([fixed, moved, field]))
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        np.testing.assert_allclose(float(models.RegistrationLoss("ncc")([fixed, moved, field])), expected, rtol=1e-6)
        model = cifl_tf.registration_model(SHAPE, similarity="ncc", nb_unet_features=[[4, 4], [4, 4]], int_steps=1)
        displacement = model.register(images, images[::-1])
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert displacement.dtype == np.float32
    exact = [layer for layer in model.layers if isinstance(layer, (models.RegistrationLoss,
                                                                   *models.BATCHED_LAYERS.values()))]
    assert {"RegistrationLoss", "VecInt", "RescaleTransform", "SpatialTransformer"} <= {type(layer).__name__
                                                                                         for layer in exact}
    assert all(layer.compute_dtype == "float32" for layer in exact)


def test_register_returns_full_resolution_displacement_with_half_resolution_integration():
    model = cifl_tf.registration_model(SHAPE, nb_unet_features=[[8, 8], [8, 8, 8]], int_steps=2, int_resolution=2)
    _randomize_flow(model)
    images, _ = blobs(2)
    moved, field = model([images, images[::-1]])
    assert field.shape == (2, 16, 16, 2)  # the regularised velocity field is at half resolution
    displacement = model.register(images, images[::-1])
    assert displacement.shape == (2, *SHAPE, 2) and np.abs(displacement).max() > 1
    np.testing.assert_allclose(moved, models.warp(images, displacement), atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(int_resolution=3), dict(int_steps=0, int_resolution=3),
                                    dict(int_resolution=1, int_downsize=2, svf_resolution=2)])  # voxelmorph's old name
def test_resolutions_whose_field_vxmdense_brings_back_to_full_size_build(kwargs):
    model = cifl_tf.registration_model(SHAPE, nb_unet_features=[[8, 8], [8, 8]], **kwargs)
    assert model.register(*blobs(2)[:1] * 2).shape == (2, *SHAPE, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_warp_refuses_a_displacement_that_is_not_finite(bad):
    displacement = np.zeros((1, 6, 7, 2), np.float32)
    displacement[0, 2, 3, 1] = bad
    with pytest.raises(ValueError, match="warp: the displacement holds 1 NaN or infinite values"):
        models.warp(np.ones((1, 6, 7, 1), np.float32), displacement)


@pytest.mark.parametrize("dtype, values", [
    (np.int64, [2 ** 24, 2 ** 24 + 1, 614454277, 2 ** 33 + 5]),  # beyond float32's exact integers
    (np.int32, [0, -3, 7, 2 ** 31 - 1]),
    (np.uint8, [0, 1, 2, 255]),
    (bool, [False, True, True, False]),
    (np.float32, [0, 1, 2, 3]),  # whole floats, as a float NIfTI file stores labels
])
def test_warp_labels_moves_each_label_value_exactly(dtype, values):
    labels = np.zeros((1, 4, 6), dtype)
    for row, value in enumerate(values):
        labels[0, row] = value
    displacement = np.zeros((1, 4, 6, 2), np.float32)
    displacement[..., 0] = 1.4  # moved(x) = labels(x + 1.4 rows), nearest: one row up, the last row kept
    moved = models.warp_labels(labels, displacement)
    assert moved.dtype == labels.dtype
    np.testing.assert_array_equal(moved[0], labels[0, [1, 2, 3, 3]])


def test_warp_labels_refuses_images_and_maps_of_another_shape():
    displacement = np.zeros((1, 4, 6, 2), np.float32)
    with pytest.raises(ValueError, match=r"warp_labels: labels must be an integer label map, got 24 float32 values "
                                         r"that are not whole, such as \[0.5, 0.5, 0.5\]"):
        models.warp_labels(np.full((1, 4, 6), 0.5, np.float32), displacement)
    with pytest.raises(ValueError, match=r"warp_labels: labels \(4, 6\) must be \(B, \*spatial\) of the "
                                         r"displacement \(1, 4, 6, 2\)"):
        models.warp_labels(np.zeros((4, 6), np.int32), displacement)


def test_the_velocity_field_is_predicted_where_it_is_integrated_unless_asked_otherwise(tmp_path):
    """By default at int_resolution, without the UNet's full-resolution level; svf_resolution=1 is VxmDense's
    default, a full-resolution field halved before integration. A model round-trips as it was built, and a config
    saved before registration_model set svf_resolution builds voxelmorph's, the architecture its weights fit."""
    def svf_shape(model):
        return model.get_layer(f"{model.name}_flow").output.shape[1:-1]

    tiny = dict(nb_unet_features=[[8, 8], [8, 8, 8]], int_steps=2)
    model = cifl_tf.registration_model(SHAPE, **tiny)
    voxelmorphs = cifl_tf.registration_model(SHAPE, svf_resolution=1, **tiny)
    assert svf_shape(model) == (16, 16) and svf_shape(voxelmorphs) == SHAPE
    assert model.outputs[-1].shape[1:-1] == voxelmorphs.outputs[-1].shape[1:-1] == (16, 16)  # regularised field
    loaded = models.load_model(models.save_model(model, str(tmp_path)), "registration")
    assert svf_shape(loaded) == (16, 16) and loaded.get_config() == model.get_config()
    config = model.get_config()
    assert config.pop("svf_resolution") == 2
    assert svf_shape(models.RegistrationModel.from_config(config)) == SHAPE


def test_registration_default_weight_follows_the_similarity():
    assert models.RegistrationLoss("ncc").reg_weight == 1.0
    assert models.RegistrationLoss("mse").reg_weight == 0.01
    assert models.RegistrationLoss("mse", reg_weight=np.float32(0.5)).reg_weight == 0.5  # NumPy scalars are numbers


def test_registration_model_trains_with_its_default_loss_optimizer_and_integration():
    """A cheap check (a smaller UNet); the slow test in test_experiments.py checks the Dice gain on real slices."""
    images, _ = blobs(8, seed=3)
    tf.keras.utils.set_random_seed(0)
    model = cifl_tf.registration_model(SHAPE, nb_unet_features=TINY_VXM["nb_unet_features"])
    history = model.fit(models.pair_batches(images, 4, seed=0), steps_per_epoch=5, epochs=3, verbose=0)
    assert history.history["similarity"][-1] < 0.9 * history.history["similarity"][0]


def test_pair_batches_pair_different_images_and_cover_all_pairs():
    images = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1) * np.ones((3, 4, 4, 1), np.float32)
    seen = set()
    for ((moving, fixed),) in models.pair_batches(images, batch_size=4, seed=0).take(10):
        assert moving.shape == fixed.shape == (4, 4, 4, 1)
        seen |= {(int(m[0, 0, 0]), int(f[0, 0, 0])) for m, f in zip(moving.numpy(), fixed.numpy())}
    assert seen == {(m, f) for m in range(3) for f in range(3) if m != f}
    with pytest.raises(ValueError, match="at least 2 images"):
        models.pair_batches(images[:1])


@pytest.mark.parametrize("build, error, message", [
    (lambda e: cifl_tf.segmentation_model((32,), 3), ValueError, r"inshape must be 2 or 3.*\(32,\)"),
    (lambda e: cifl_tf.segmentation_model((32, 0), 3), ValueError, r"\(32, 0\)"),
    (lambda e: cifl_tf.segmentation_model(32, 3), TypeError, "inshape must be a sequence"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 1), ValueError, "nb_labels must be an integer >= 2.*1"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, loss="mae"), ValueError, "loss must be one of.*'mae'"),
    (lambda e: cifl_tf.segmentation_model((36, 36), 3, nb_levels=4), ValueError,
     r"\(36, 36\) must be divisible by 8 .* fewer nb_levels"),
    (lambda e: cifl_tf.segmentation_model((36, 36), 3, nb_features=np.int64(4), nb_levels=np.int64(4)), ValueError,
     r"\(36, 36\) must be divisible by 8 .* fewer nb_levels"),
    (lambda e: cifl_tf.segmentation_model((33, 32), 3, nb_features=[[4], [8]]), ValueError,  # neurite: 2 levels
     r"\(33, 32\) must be divisible by 2 for a UNet of nb_levels=2"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, final_pred_activation="linear"), TypeError, "softmax"),
    (lambda e: cifl_tf.segmentation_model((16, 16, 16), 3, e), ValueError, r"encoder is 2D but inshape \(16, 16, 16\)"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, "encoder"), TypeError,
     "CIFLEncoder, a cifl_tf.descriptors.MIND or None, got str"),
    (lambda e: cifl_tf.registration_model((16, 16, 16), cifl_tf.Triplanar(e), **TINY_VXM), ValueError,
     r"a Triplanar encoder .* gives features for register_pair and `cifl features` only"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, cifl_tf.FeatureStack([e, MIND()])), ValueError,
     r"or a FeatureStack gives features for register_pair and `cifl features` only"),
    (lambda e: cifl_tf.registration_model(SHAPE, MIND(ndim=3), **TINY_VXM), ValueError,
     r"encoder is 3D but inshape \(32, 32\) is 2D"),
    (lambda e: cifl_tf.registration_model(SHAPE, similarity="mi"), ValueError, "similarity must be.*'mi'"),
    (lambda e: cifl_tf.registration_model(SHAPE, reg_weight=-1, **TINY_VXM), ValueError, "reg_weight.*-1"),
    (lambda e: cifl_tf.registration_model(SHAPE, bidir=True), TypeError, "may not set 'bidir'"),
    (lambda e: cifl_tf.registration_model(SHAPE, e, src_feats=2), TypeError, "may not set 'src_feats'"),
    (lambda e: cifl_tf.registration_model((24, 24)), ValueError,
     r"\(24, 24\) must be divisible by 16 .* fewer levels \(shorter nb_unet_features lists, or nb_unet_levels; "
     r"in cifl train-reg, --nb-features with --nb-levels\)"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_levels=0), ValueError,
     "nb_levels must be a positive integer, got 0"),
    (lambda e: cifl_tf.registration_model(SHAPE, nb_unet_features=8, nb_unet_levels=0), ValueError,
     "nb_unet_levels must be an integer >= 1, got 0"),
    (lambda e: cifl_tf.registration_model(SHAPE, **{**TINY_VXM, "int_steps": -1}), ValueError,
     "int_steps must be an integer >= 0, got -1"),
    (lambda e: cifl_tf.registration_model(SHAPE, svf_resolution=0), ValueError,
     "svf_resolution must be an integer >= 1, got 0"),
    (lambda e: cifl_tf.registration_model(SHAPE, int_resolution=1.5), ValueError,
     "int_resolution must be an integer >= 1, got 1.5"),
    (lambda e: cifl_tf.registration_model(SHAPE, svf_resolution=2, **TINY_VXM), ValueError,
     "svf_resolution 2 needs an integrated field"),
    (lambda e: cifl_tf.registration_model(SHAPE, svf_resolution=64), ValueError,
     r"svf_resolution 64 is too coarse for the \(32, 32\) images: the field would have fewer than 2 voxels"),
    (lambda e: cifl_tf.registration_model(SHAPE, svf_resolution=32), ValueError,
     r"svf_resolution 32 is too coarse for the \(32, 32\) images"),
    (lambda e: cifl_tf.registration_model((64, 64), svf_resolution=64, int_steps=0), ValueError,
     r"svf_resolution 64 needs an integrated field"),  # the reason, not its coarseness
    (lambda e: cifl_tf.registration_model(SHAPE, int_resolution=33), ValueError,
     r"int_resolution 33 is too coarse for the \(32, 32\) images"),
    # resolutions whose rescaled field falls short of the images (VxmDense builds the others, such as 3 on 32x32)
    (lambda e: cifl_tf.registration_model((48, 64), int_resolution=3, nb_unet_features=[[8, 8], [8, 8]]), ValueError,
     r"with int_resolution 3, svf_resolution 3, VxmDense's field comes back at \(48, 63\), not at the \(48, 64\) of "
     r"the images: pad or crop them, or give resolutions that divide them"),
    *[(lambda e, svf=svf: cifl_tf.registration_model(SHAPE, int_resolution=1, svf_resolution=svf), ValueError,
       rf"svf_resolution {svf} needs an int_resolution above 1: VxmDense brings the field back to full size only "
       r"from a coarser integration") for svf in (2, 3)],
    (lambda e: models.RegistrationModel(SHAPE, svf_resolution=2, int_resolution=1), ValueError,  # the class itself
     r"field comes back at \(16, 16\), not at the \(32, 32\) of the images: it brings the field back to full size "
     r"only from an int_resolution above 1"),
    (lambda e: models.RegistrationModel(SHAPE, svf_resolution=2, int_steps=0, int_resolution=3), ValueError,
     r"without integration \(int_steps 0\) it stays at svf_resolution"),  # not blamed on the 3 that does not divide
    (lambda e: cifl_tf.registration_model(SHAPE, int_downsize=0), ValueError, "int_downsize must be an integer >= 1"),
    (lambda e: cifl_tf.registration_model(SHAPE, int_downsize=64, svf_resolution=1), ValueError,
     r"int_resolution 64 is too coarse for the \(32, 32\) images"),  # voxelmorph's old name, which overrides it
    (lambda e: models.RegistrationModel(SHAPE, svf_resolution=2, int_steps=0), ValueError,
     r"with int_resolution 2, svf_resolution 2, VxmDense's field comes back at \(16, 16\), not at the \(32, 32\) of "
     r"the images: without integration \(int_steps 0\) it stays at svf_resolution"),
    *[(lambda e, key=key: cifl_tf.registration_model(SHAPE, **{key: None}), ValueError,
       f"{key} must be an integer >= ., got None") for key in ("int_resolution", "int_steps")],
    (lambda e: models.RegistrationModel(SHAPE, svf_resolution=None), ValueError,
     "svf_resolution must be an integer >= 1, got None"),
    (lambda e: models.pair_batches(np.zeros((2, 8, 8, 1)), batch_size=0), ValueError,
     "batch_size must be a positive integer, got 0"),
    # images without their channel axis gave batches that fit refused later; NaN trained NaN weights
    *[(lambda e, images=images: models.pair_batches(images), ValueError,
       rf"pair_batches: images must be \(N, \*inshape, C\) with 2 or 3 spatial axes, got {re.escape(str(shape))}")
      for images, shape in ((np.zeros((3, 8, 8)), (3, 8, 8)), (np.float32(1), ()))],
    (lambda e: models.pair_batches(np.full((2, 8, 8, 1), np.nan)), ValueError, "hold 128 NaN/Inf values"),
    # UNet arguments that neurite took wrongly or failed on deep inside
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_features=4, nb_levels=2, pool_size=3), ValueError,
     r"\(32, 32\) must be divisible by 3 for a UNet of nb_levels=2"),
    (lambda e: cifl_tf.segmentation_model((32, 36), 3, nb_features=4, nb_levels=3, pool_size=(2, 4)), ValueError,
     r"\(32, 36\) must be divisible by \(4, 16\) for a UNet of nb_levels=3"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_features=4, nb_levels=2, pool_size=[2]), ValueError,
     r"pool_size must be a positive integer or 2 of them, got \[2\]"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_features=4.5, nb_levels=2), ValueError,
     r"nb_features must be a positive integer or a list of lists of them \(each level's\), got 4.5"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_features=[4, 8]), ValueError,
     r"nb_features must be .* got \[4, 8\]"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_features=4, nb_levels=2, nb_conv_per_level=0), ValueError,
     "nb_conv_per_level must be a positive integer, got 0"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_features=4, nb_levels=2, conv_size=0), ValueError,
     "conv_size must be a positive integer or 2 of them, got 0"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_features=4, nb_levels=64), ValueError,
     rf"must be divisible by {2 ** 63} for a UNet of nb_levels=64"),  # NumPy's int64 had overflowed
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_features=4, nb_levels=2, feat_mult=0), ValueError,
     "feat_mult must be a positive number, got 0"),  # Keras's "Received filters=0" named no argument
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_features=4, nb_levels=2, layer_nb_feats=[1]), ValueError,
     r"layer_nb_feats must be 6 or more positive integers \(one per convolution of the 2-level UNet\), got \[1\]"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, nb_features=4, nb_levels=2, use_residuals="yes"), TypeError,
     "use_residuals must be True or False, got 'yes'"),
    (lambda e: cifl_tf.segmentation_model(SHAPE, 3, loss=["dice"]), ValueError,
     r"loss must be one of \['crossentropy', 'dice'\], got \['dice'\]"),
    # VxmDense arguments that failed with a ZeroDivisionError or TypeError
    (lambda e: cifl_tf.registration_model(SHAPE, nb_unet_conv_per_level=0, **TINY_VXM), ValueError,
     "nb_unet_conv_per_level must be an integer >= 1, got 0"),
    (lambda e: cifl_tf.registration_model(SHAPE, nb_unet_features=[8, 16]), ValueError,
     r"nb_unet_features must be a positive integer or \[encoder features, decoder features\] \(two lists of "
     r"positive integers\), got \[8, 16\]"),
    (lambda e: cifl_tf.registration_model(SHAPE, nb_unet_features=[[4, 4], [4]]), ValueError,  # an IndexError
     r"decoder list needs at least as many entries as its encoder list \(2; more are final convolutions\)"),
    (lambda e: cifl_tf.registration_model(SHAPE, unet_half_res=True, **TINY_VXM), TypeError,
     r"unet_half_res is voxelmorph's deprecated name: give svf_resolution=2"),
    *[(lambda e, cls=cls, args=args: cls(SHAPE, *args).head(), ValueError,
       rf"{cls.__name__}.head: compile the model first") for cls, args in ((models.SegmentationModel, (3,)),
                                                                          (models.RegistrationModel, ()))],
    # Adam takes these, and trains NaN weights or ascends the loss
    *[(lambda e, rate=rate: cifl_tf.segmentation_model(SHAPE, 3, learning_rate=rate, **TINY_UNET), ValueError,
       rf"segmentation_model: learning_rate must be a positive number, got {rate!r}")
      for rate in (float("nan"), float("inf"), 0, -1.0, "0.1")],
    *[(lambda e, rate=rate: cifl_tf.registration_model(SHAPE, learning_rate=rate, **TINY_VXM), ValueError,
       rf"registration_model: learning_rate must be a positive number, got {rate!r}")
      for rate in (float("nan"), -float("inf"), 0.0, -1)],
])
def test_bad_arguments_are_rejected_naming_the_value(encoder, build, error, message):
    with pytest.raises(error, match=message):
        build(encoder)


@pytest.mark.parametrize("kind", ["segmentation", "registration"])
def test_numpy_arguments_build_the_model_of_python_ones_and_round_trip(kind, tmp_path):
    """NumPy numbers and arrays (a sweep's np.arange, a config array) are the Python values in the model's config:
    a registration model saved with an array of features had not loaded."""
    build = {"segmentation": lambda **k: cifl_tf.segmentation_model(SHAPE, 3, **k),
             "registration": lambda **k: cifl_tf.registration_model(SHAPE, **k)}[kind]
    python = {"segmentation": dict(nb_features=4, nb_levels=2),
              "registration": dict(nb_unet_features=[[8, 8], [8, 8]], int_steps=0)}[kind]
    numpy = {key: np.asarray(value)[()] for key, value in python.items()}  # np.int64 scalars, 2D arrays
    model = build(**numpy)
    assert model.get_config() == build(**python).get_config()
    assert models.load_model(models.save_model(model, str(tmp_path)), kind).get_config() == model.get_config()


@pytest.mark.parametrize("learning_rate", [np.float32(1e-3),
                                           tf.keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.5)])
def test_models_take_a_numpy_or_scheduled_learning_rate(learning_rate):
    model = cifl_tf.segmentation_model(SHAPE, 3, learning_rate=learning_rate, **TINY_UNET)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)


def test_register_rejects_images_of_the_wrong_shape(tiny):
    model = tiny("registration", False)
    images, _ = blobs(2)
    with pytest.raises(ValueError, match=r"moving images must be \(B, 32, 32, 1\), got \(2, 32, 32\)"):
        model.register(images[..., 0], images)
    with pytest.raises(ValueError, match="2 moving but 1 fixed"):
        model.register(images, images[:1])
    with pytest.raises(ValueError, match="the fixed images hold 1 NaN/Inf values"):
        model.register(images, np.where(np.arange(images.size).reshape(images.shape) == 5, np.inf, images))


def test_load_model_rejects_files_that_hold_no_model_of_ours(tiny, tmp_path):
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="notes.keras: not a cifl_tf model file"):
        models.load_model(str(text))
    image = tf.keras.Input((4,))
    tf.keras.Model(image, tf.keras.layers.Dense(2)(image)).save(str(tmp_path / "plain.keras"))
    with pytest.raises(ValueError, match="plain.keras: not a cifl_tf model file.*'Functional'"):
        models.load_model(str(tmp_path / "plain.keras"))
    with pytest.raises(FileNotFoundError, match="missing.keras: no such model file"):
        models.load_model(str(tmp_path / "missing.keras"))
    models.save_model(tiny("registration", False), str(tmp_path / "reg.keras"))
    with pytest.raises(ValueError, match="reg.keras: holds a registration model, not a segmentation model"):
        models.load_model(str(tmp_path / "reg.keras"), "segmentation")


def test_save_model_leaves_no_file_when_writing_fails(tmp_path, monkeypatch):
    model = cifl_tf.segmentation_model(SHAPE, 3, **TINY_UNET)  # not shared: its save is broken here

    def broken_save(path, *args, **kwargs):
        with open(path, "w") as f:
            f.write("half a model")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        models.save_model(model, str(tmp_path / "seg.keras"))
    assert list(tmp_path.iterdir()) == []


def test_a_unet_of_each_levels_features_takes_no_feat_mult():
    # neurite ignores feat_mult then, and warns unless it is None
    model = cifl_tf.segmentation_model(SHAPE, 3, nb_features=[[4, 4], [8, 8]], nb_levels=None, feat_mult=None)
    assert model.output_shape == (None, *SHAPE, 3)


@pytest.mark.parametrize("nb_conv_per_level, per_layer", [(2, [4, 5, 6, 7, 8, 9]), (1, [4, 5, 6]), (1, [4, 5, 6, 7])])
def test_a_unet_takes_one_feature_count_per_convolution(nb_conv_per_level, per_layer):
    model = cifl_tf.segmentation_model(SHAPE, 3, nb_features=4, nb_levels=2, nb_conv_per_level=nb_conv_per_level,
                                       layer_nb_feats=per_layer)
    filters = [layer.filters for layer in model.get_layer(f"{model.name}_unet").layers
               if isinstance(layer, tf.keras.layers.Conv2D)]
    used = 3 * nb_conv_per_level  # one per convolution of the 2-level UNet; neurite ignores more
    assert filters[:used] == per_layer[:used] and filters[used] == 3  # then the softmax's
