"""cifl_tf.encoder: the CIFL encoder layer, its serialisation and save_encoder / load_encoder."""
import json
import math
import re

import numpy as np
import pytest

import tensorflow as tf
from cifl_tf import CIFLEncoder, FeatureStack, L2Normalize, Triplanar, load_encoder, save_encoder
from cifl_tf.descriptors import MIND
from cifl_tf.encoder import ARCHITECTURES, CONTEXT_DILATIONS, LocalNormalize, dilated, encoder_model, inflate


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=(*shape, 1)).astype(np.float32)


@pytest.fixture(params=[(2, (2, 16, 12), "paper", False, None, True),
                        (3, (1, 8, 10, 6), "paper", False, None, True),
                        (2, (2, 16, 12), "context", False, None, True),
                        (3, (1, 8, 10, 6), "context", False, None, True),
                        (2, (2, 16, 12), "context", True, None, True),
                        (3, (1, 8, 10, 6), "paper", True, 1.5, True),
                        (2, (2, 16, 12), "context", True, None, False)],
                ids=["2d", "3d", "2d-context", "3d-context", "2d-context-inversion-invariant",
                     "3d-inversion-invariant-local-normalization", "2d-context-inversion-invariant-no-bias"])
def encoder_and_images(request):
    ndim, shape, architecture, inversion_invariant, local_normalization, use_bias = request.param
    return CIFLEncoder(channels=5, features=8, ndim=ndim, architecture=architecture,
                       inversion_invariant=inversion_invariant, local_normalization=local_normalization,
                       use_bias=use_bias), images(shape)


def test_features_are_unit_vectors_per_pixel(encoder_and_images):
    encoder, x = encoder_and_images
    features = encoder(x).numpy()
    assert features.shape == (*x.shape[:-1], 5)
    np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1.0, rtol=1e-5)
    assert np.ptp(features, axis=tuple(range(1, x.ndim - 1))).min() > 0  # each channel varies over space


@pytest.mark.parametrize("policy, compute_dtype", [("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")])
def test_mixed_precision_convolves_in_16_bits_and_gives_the_float32_features(encoder_and_images, policy,
                                                                            compute_dtype, tmp_path):
    exact, x = encoder_and_images
    tf.keras.utils.set_random_seed(0)  # some random weights leave a pixel's features near 0, their direction unstable
    reference = exact(x).numpy()
    mixed = CIFLEncoder.from_config({**exact.get_config(), "dtype": policy})
    mixed(x)
    mixed.set_weights(exact.get_weights())
    assert {layer.compute_dtype for layer in mixed.convs + mixed.context} == {compute_dtype}
    assert {weight.dtype for weight in mixed.weights} == {tf.float32}
    features = mixed(x).numpy()
    assert features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1, atol=1e-5)
    assert np.mean(np.sum(features * reference, axis=-1)) > 0.999  # cosine to the float32 features
    save_encoder(mixed, str(tmp_path / "mixed.weights.h5"))  # saved for float32 inference
    np.testing.assert_array_equal(load_encoder(tmp_path / "mixed.weights.h5")(x), reference)


@pytest.mark.parametrize("wrap", [lambda e: Triplanar(e), lambda e: FeatureStack([e, MIND()])],
                         ids=["triplanar", "feature-stack"])
def test_an_encoder_trained_in_mixed_precision_loads_for_float32_inference_inside_another_layer(wrap, tmp_path):
    mixed = CIFLEncoder(channels=5, features=8, dtype="mixed_bfloat16")
    mixed(images((1, 24, 24)))
    save_encoder(wrap(mixed), str(tmp_path / "wrapped.weights.h5"))
    loaded = load_encoder(tmp_path / "wrapped.weights.h5")
    layers = [loaded] + [module for module in loaded.submodules if isinstance(module, tf.keras.layers.Layer)]
    assert sum(isinstance(layer, CIFLEncoder) for layer in layers) == 1
    assert {layer.compute_dtype for layer in layers} == {"float32"}


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-6), ("mixed_bfloat16", 4e-3), ("mixed_float16", 1e-3)])
def test_l2_normalize_keeps_zero_vectors_zero(dtype, rtol):
    vectors = np.array([[[0.0, 0.0], [3.0, 4.0], [3e-3, 4e-3], [300.0, 400.0]]], np.float32)  # float16 squares: inf
    layer = L2Normalize(dtype=dtype)
    out = layer(vectors)
    assert out.dtype == layer.compute_dtype
    np.testing.assert_allclose(out.numpy().astype(np.float32), [[[0.0, 0.0], *[[0.6, 0.8]] * 3]], rtol=rtol)


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_l2_normalize_is_tensorflows_where_epsilon_does_not_underflow(dtype):
    vectors = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
    layer = L2Normalize(dtype=dtype)
    np.testing.assert_array_equal(layer(vectors), tf.math.l2_normalize(tf.cast(vectors, layer.compute_dtype), -1))


@pytest.mark.parametrize("make", [lambda: CIFLEncoder(3, 4, ndim=3, local_normalization=1.0), lambda: MIND(3),
                                  lambda: LocalNormalize(1.0)], ids=["local-normalization", "mind", "layer"])
def test_3d_layers_give_eager_gradients_for_their_input(make):
    # A registration that warps the moving image, then describes it, differentiates through the input;
    # eagerly, TF 2.21's 3D convolution gradient failed when the convolution named no data format.
    layer = make()
    volume = tf.constant(np.random.default_rng(0).random((1, 12, 12, 12, 1)), tf.float32)

    def gradient(image):
        with tf.GradientTape() as tape:
            tape.watch(image)
            loss = tf.reduce_sum(layer(image)[..., 0])
        return tape.gradient(loss, image)

    eager = gradient(volume).numpy()
    assert np.all(np.isfinite(eager)) and np.abs(eager).max() > 0
    np.testing.assert_allclose(eager, tf.function(gradient)(volume).numpy(), rtol=1e-4, atol=1e-6)


def test_mind_traces_for_images_of_unknown_rank():  # as tiling.check_images lets them pass
    layer, images = MIND(2), np.random.default_rng(0).random((1, 12, 12, 1), np.float32)
    traced = tf.function(layer, input_signature=[tf.TensorSpec(None, tf.float32)])
    np.testing.assert_allclose(traced(images), layer(images), atol=1e-6)


def test_config_round_trip_gives_same_outputs(encoder_and_images):
    encoder, x = encoder_and_images
    encoder = CIFLEncoder(**{**encoder.get_config(), "activation": "elu"})
    clone = CIFLEncoder.from_config(encoder.get_config())
    assert clone.get_config() == encoder.get_config()
    clone(x), encoder(x)  # built by a call, not by tracing an encoder_model
    clone.set_weights(encoder.get_weights())
    np.testing.assert_array_equal(clone(x), encoder(x))


def test_registered_for_serialisation():
    assert tf.keras.utils.get_registered_object("cifl_tf>CIFLEncoder") is CIFLEncoder
    assert tf.keras.utils.get_registered_object("cifl_tf>L2Normalize") is L2Normalize
    assert tf.keras.utils.get_registered_object("cifl_tf>LocalNormalize") is LocalNormalize


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
@pytest.mark.parametrize("filename", ["model.h5", "savedmodel", "model.keras"])
def test_model_saves_and_loads_without_custom_objects(encoder_and_images, tmp_path, filename):
    encoder, x = encoder_and_images
    inputs = tf.keras.Input(x.shape[1:])
    model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(2, 1)(encoder(inputs)) if encoder.ndim == 2
                           else tf.keras.layers.Conv3D(2, 1)(encoder(inputs)))
    model.save(tmp_path / filename)
    loaded = tf.keras.models.load_model(tmp_path / filename, safe_mode=True)
    assert isinstance(loaded.layers[1], CIFLEncoder) and loaded.layers[1].get_config() == encoder.get_config()
    np.testing.assert_array_equal(loaded(x), model(x))


def test_save_and_load_encoder(encoder_and_images, tmp_path):
    encoder, x = encoder_and_images
    save_encoder(encoder, str(tmp_path / "encoder.weights.h5"))  # once for both loads' trainable
    for trainable in (False, True):
        for path in (tmp_path / "encoder.weights.h5", tmp_path):  # the file, or a run folder holding it
            loaded = load_encoder(str(path), trainable=trainable)
            assert loaded.trainable is trainable and loaded.get_config()["channels"] == 5
            np.testing.assert_array_equal(loaded(x), encoder(x))
    assert json.loads((tmp_path / "encoder.json").read_text())["registered_name"] == "cifl_tf>CIFLEncoder"


@pytest.mark.parametrize("name", ["encoder.json", "model.keras"])
def test_load_encoder_names_a_file_that_is_not_a_weights_file(tmp_path, name):
    """It looked for the file's .json: "no such file 'encoder.json.json'"."""
    save_encoder(CIFLEncoder(channels=2, features=4), str(tmp_path / "encoder.weights.h5"))
    (tmp_path / "model.keras").write_text("")
    with pytest.raises(ValueError, match=f"load_encoder: '.*{name}' is neither an encoder's weights file"):
        load_encoder(str(tmp_path / name))


@pytest.mark.parametrize("remove, config, error, message", [
    ("encoder.weights.h5", None, FileNotFoundError, r"encoder\.json' but no 'encoder\.weights\.h5' yet"),
    ("encoder.json", None, FileNotFoundError, "no such file .*encoder.json"),
    (None, tf.keras.utils.serialize_keras_object(tf.keras.layers.Dense(3)), ValueError, "not describe a CIFLEncoder"),
    (None, {"config": {}}, ValueError, "not describe a CIFLEncoder"),
    (None, {"registered_name": "cifl_tf>CIFLEncoder"}, ValueError, r"encoder\.json: not a valid CIFLEncoder config"),
    # the cause, not only Keras's "Error when deserializing"
    (None, {"registered_name": "cifl_tf>CIFLEncoder", "class_name": "CIFLEncoder", "config": {"channels": 4.5}},
     ValueError, r"encoder\.json: not a valid CIFLEncoder config \(CIFLEncoder: channels must be a positive integer, "
                 r"got 4\.5\)"),
    # another encoder's weights, more of them: Keras loaded those it found
    ("CONTEXT", None, ValueError, r"encoder\.weights\.h5: weights do not load into the encoder of .*encoder\.json "
                                  r"\(the file holds 20 weights, the encoder has 16: another encoder's weights\?\)"),
    ("HEAP", None, ValueError, r"encoder\.weights\.h5: weights do not load"),  # h5py's RuntimeError
])
def test_load_encoder_errors(tmp_path, remove, config, error, message):
    save_encoder(CIFLEncoder(channels=2, features=4), str(tmp_path / "encoder.weights.h5"))
    weights = tmp_path / "encoder.weights.h5"
    if remove == "HEAP":  # a damaged local heap: zeros over its signature
        raw = weights.read_bytes()
        weights.write_bytes(raw.replace(b"HEAP", b"\0\0\0\0", 1))
    elif remove == "CONTEXT":
        save_encoder(CIFLEncoder(channels=2, features=4, architecture="context", dilations=(2, 4)),
                     str(tmp_path / "context.weights.h5"))
        weights.write_bytes((tmp_path / "context.weights.h5").read_bytes())
    elif remove:
        (tmp_path / remove).unlink()
    if config is not None:
        (tmp_path / "encoder.json").write_text(json.dumps(config))
    with pytest.raises(error, match=message):
        load_encoder(str(tmp_path))


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=0), "channels must be a positive integer, got 0"),
    (dict(channels=2.0), "channels must be a positive integer, got 2.0"),
    (dict(features=True), "features must be a positive integer, got True"),
    (dict(features=-8), "features must be a positive integer, got -8"),
    (dict(ndim=1), "ndim must be 2 or 3, got 1"),
    (dict(ndim=4), "ndim must be 2 or 3, got 4"),
    (dict(ndim=2.0), "ndim must be 2 or 3, got 2.0"),
    (dict(channels=np.float32(8)), r"channels must be a positive integer, got np.float32\(8.0\)"),
    (dict(features=np.bool_(True)), "features must be a positive integer, got np.True_"),
    (dict(architecture="unet"), r"architecture must be one of \('paper', 'context'\), got 'unet'"),
    (dict(dilations=(2, 4)), r"architecture 'paper' takes none, got \(2, 4\)"),
    (dict(architecture="context", dilations=()), r"dilations must be positive integers such as \(2, 4\), got \(\)"),
    (dict(architecture="context", dilations=(2, 0)), r"dilations must be positive integers .*got \(2, 0\)"),
    (dict(architecture="context", dilations=4), r"dilations must be positive integers .*got 4"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CIFLEncoder(**kwargs)


@pytest.mark.parametrize("ndim, shapes", [(2, [(12, 16), (9, 7)]), (3, [(6, 8, 5), (4, 4, 4)])])
def test_encoder_model_is_the_encoder_on_images_of_any_size(ndim, shapes):
    tf.keras.utils.set_random_seed(0)
    encoder = CIFLEncoder(channels=3, features=4, ndim=ndim)
    model = encoder_model(encoder)
    for shape in shapes:
        images = np.random.default_rng(0).random((2, *shape, 1)).astype(np.float32)
        np.testing.assert_allclose(model.predict(images, verbose=0), encoder(images), atol=1e-6)
    assert model.layers[-1] is encoder and len(model.weights) == len(encoder.weights)


@pytest.mark.parametrize("layer", ["x", tf.keras.layers.Conv2D(4, 3)])
def test_encoder_model_refuses_what_is_not_an_encoder(layer):
    with pytest.raises(TypeError, match=rf"expected a Keras layer with ndim .*got {type(layer).__name__}"):
        encoder_model(layer)


@pytest.mark.parametrize("name", ["inversion_invariant", "use_bias"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_switches_must_be_bools(name, value):
    with pytest.raises(TypeError, match=f"{name} must be True or False, got {value!r}"):
        CIFLEncoder(**{name: value})


def test_switches_take_numpy_bools_as_python_ones(tmp_path):
    # read from arrays or configs, refused before where the losses took them
    encoder = CIFLEncoder(2, 2, inversion_invariant=np.True_, use_bias=np.False_)
    assert encoder.get_config()["inversion_invariant"] is True and encoder.get_config()["use_bias"] is False
    save_encoder(encoder, str(tmp_path / "e.weights.h5"))
    assert load_encoder(str(tmp_path / "e.weights.h5"), trainable=np.True_).trainable is True


@pytest.mark.parametrize("ndim, shape", [(2, (1, 8, 8, 8, 1)), (2, (8, 8, 1)), (3, (1, 8, 8, 1)), (2, (1, 8, 8, 3))])
@pytest.mark.parametrize("built", [False, True], ids=["first-input", "built"])
def test_inputs_must_be_single_channel_images_of_its_rank(ndim, shape, built):
    encoder = CIFLEncoder(channels=2, features=4, ndim=ndim)
    if built:  # build() checked the first input only
        encoder(images((1,) + (6,) * ndim))
    with pytest.raises(ValueError, match=rf"ndim={ndim}\) expects single-channel inputs of rank {ndim + 2}"):
        encoder(np.zeros(shape, np.float32))


@pytest.mark.parametrize("layer", [CIFLEncoder(channels=2, features=4), MIND(2)], ids=["encoder", "mind"])
@pytest.mark.parametrize("shape", [(1, 0, 8, 1), (1, 8, 0, 1)])
def test_an_empty_image_is_refused_as_empty(layer, shape):
    with pytest.raises(ValueError, match=r"ndim=2\): the image is empty, shape \(1, [08], [08], 1\)"):
        layer(np.zeros(shape, np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_integer_images_are_refused_as_not_yet_intensities_in_0_1(dtype):
    with pytest.raises(TypeError, match=rf"must be floating-point intensities in \[0, 1\], got {dtype.__name__}"):
        CIFLEncoder(channels=2, features=4)(np.zeros((1, 8, 8, 1), dtype))


@pytest.mark.parametrize("dilations, expected", [(None, CONTEXT_DILATIONS), ((2, 4), (2, 4)), ([3], (3,))])
def test_context_dilations_set_the_context_convolutions_and_survive_the_config(dilations, expected):
    encoder = CIFLEncoder(channels=3, features=4, ndim=3, architecture="context", dilations=dilations)
    encoder(images((1, 6, 6, 6)))
    assert encoder.dilations == expected and len(encoder.context) == len(expected)
    assert encoder.receptive_radius == 8 + sum(expected)
    config = encoder.get_config()
    assert config["dilations"] == list(expected)
    assert CIFLEncoder.from_config(config).dilations == expected
    assert CIFLEncoder(architecture="paper").get_config()["dilations"] is None


@pytest.mark.parametrize("shape, rate", [
    ((2, 37, 50, 3), 2), ((2, 37, 50, 3), 3), ((1, 96, 96, 3), 16), ((1, 5, 7, 3), 8),  # 2D, some not multiples
    ((1, 11, 17, 9, 2), 2), ((1, 11, 17, 9, 2), 4), ((1, 8, 8, 8, 2), 1),  # 3D
])
def test_dilated_equals_the_convolution_built_with_that_dilation(shape, rate):
    x = images(shape[:-1]) * np.linspace(1, 2, shape[-1], dtype=np.float32)
    conv_class = tf.keras.layers.Conv2D if len(shape) == 4 else tf.keras.layers.Conv3D
    undilated, reference = conv_class(4, 3, padding="same"), conv_class(4, 3, padding="same", dilation_rate=rate)
    undilated.build(x.shape)
    reference.build(x.shape)
    weights = [np.random.default_rng(1).standard_normal(w.shape).astype(np.float32) for w in reference.weights]
    undilated.set_weights(weights)
    reference.set_weights(weights)
    expected = reference(x).numpy()
    np.testing.assert_allclose(dilated(undilated, x, rate), expected, atol=1e-5)
    traced = tf.function(lambda t: dilated(undilated, t, rate),  # with unknown sizes, as in a functional model
                         input_signature=[tf.TensorSpec((None,) * (len(shape) - 1) + (shape[-1],))])
    np.testing.assert_allclose(traced(x), expected, atol=1e-5)


def test_context_encoder_equals_its_layers_chained_with_dilated_convolutions():
    encoder = CIFLEncoder(channels=3, features=4, architecture="context", dilations=(2, 5))
    x = images((2, 23, 30))
    encoder(x)
    chain = x
    for conv in encoder.convs[:-1]:
        chain = tf.nn.relu(conv(chain))
    for conv, rate in zip(encoder.context, (2, 5)):
        reference = tf.keras.layers.Conv2D(4, 3, padding="same", dilation_rate=rate)
        reference.build(chain.shape)
        reference.set_weights(conv.get_weights())
        chain = chain + tf.nn.relu(reference(chain))
    np.testing.assert_allclose(encoder(x), tf.math.l2_normalize(encoder.convs[-1](chain), axis=-1), atol=1e-5)


def test_a_config_from_before_dilations_gets_the_default_ones():
    config = CIFLEncoder(architecture="context").get_config()
    del config["dilations"]
    assert CIFLEncoder.from_config(config).dilations == CONTEXT_DILATIONS


def test_a_config_from_before_use_bias_gets_biases_and_their_weights_load(tmp_path):
    biased = CIFLEncoder(channels=3, features=4)
    x = images((1, 12, 12))
    reference = biased(x).numpy()
    save_encoder(biased, str(tmp_path / "old.weights.h5"))
    config_path = tmp_path / "old.json"
    config = json.loads(config_path.read_text())
    del config["config"]["use_bias"]
    config_path.write_text(json.dumps(config))
    loaded = load_encoder(tmp_path / "old.weights.h5")
    assert loaded.use_bias and all(layer.use_bias for layer in loaded.convs)
    np.testing.assert_array_equal(loaded(x), reference)


def test_context_architecture_is_the_paper_path_plus_residual_dilated_convolutions():
    paper = CIFLEncoder(channels=3, features=4, architecture="paper")
    context = CIFLEncoder(channels=3, features=4, architecture="context")
    x = images((1, 40, 40))
    paper(x), context(x)
    assert context.dilations == CONTEXT_DILATIONS and len(context.context) == len(CONTEXT_DILATIONS)
    for mine, theirs in zip(context.convs, paper.convs):
        mine.set_weights(theirs.get_weights())
    assert not np.allclose(context(x), paper(x), atol=1e-3)
    # With the context convolutions at zero, the residual block passes the local features on unchanged.
    for conv in context.context:
        conv.set_weights([np.zeros_like(w) for w in conv.get_weights()])
    np.testing.assert_allclose(context(x), paper(x), atol=1e-6)


@pytest.mark.parametrize("ndim, shape", [(2, (2, 16, 12)), (3, (1, 8, 10, 6))])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("local_normalization", [None, 1.5])
@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])  # bfloat16 inputs would round x and 1 - x unequally
def test_inversion_invariant_features_of_an_image_and_of_its_inversion_are_equal(ndim, shape, architecture,
                                                                                  local_normalization, dtype):
    x = images(shape)
    tf.keras.utils.set_random_seed(0)
    invariant = CIFLEncoder(channels=5, features=8, ndim=ndim, architecture=architecture, inversion_invariant=True,
                            local_normalization=local_normalization, dtype=dtype)
    np.testing.assert_allclose(invariant(1 - x), invariant(x), atol=1e-5)
    assert not invariant.convs[0].use_bias  # a bias inside the absolute value would break the symmetry
    plain = CIFLEncoder(channels=5, features=8, ndim=ndim, architecture=architecture,
                        local_normalization=local_normalization)
    assert not np.allclose(plain(1 - x), plain(x), atol=1e-2)  # the plain encoder's features are not


@pytest.mark.parametrize("ndim, shape", [(2, (2, 16, 12)), (3, (1, 8, 10, 6))])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("inversion_invariant, centre, gains", [
    (False, 0.0, [0.1, 3.0]),            # k * x
    (True, 0.5, [0.1, 3.0, -0.4, -2.0]),  # 1/2 + k (x - 1/2): a negative k also inverts
])
def test_without_bias_the_features_ignore_the_contrast_of_the_image(ndim, shape, architecture, inversion_invariant,
                                                                   centre, gains):
    x = images(shape)
    tf.keras.utils.set_random_seed(0)
    unbiased = CIFLEncoder(channels=5, features=8, ndim=ndim, architecture=architecture,
                           inversion_invariant=inversion_invariant, use_bias=False)
    for gain in gains:
        np.testing.assert_allclose(unbiased(centre + gain * (x - centre)), unbiased(x), atol=1e-5)
    assert not any(layer.use_bias for layer in unbiased.convs + unbiased.context)
    tf.keras.utils.set_random_seed(0)
    biased = CIFLEncoder(channels=5, features=8, ndim=ndim, architecture=architecture,
                         inversion_invariant=inversion_invariant)
    for layer in biased.convs + biased.context:  # Keras starts biases at 0, where the two would agree
        layer.bias_initializer = tf.keras.initializers.RandomUniform(-0.5, 0.5)
    # Biases set thresholds on contrast: a faint image's features are mostly theirs, a bright one's its own.
    assert np.abs(biased(centre + 0.1 * (x - centre)) - biased(centre + 10 * (x - centre))).max() > 0.1


def local_normalize_reference(image, sigma, epsilon):
    """LocalNormalize of one (*spatial) image, straight from its formula: Gaussian weights over the window's
    offsets that stay inside the image, normalised to sum 1 at every pixel."""
    radius = math.ceil(3 * sigma)
    out = np.empty_like(image, dtype=np.float64)
    for p in np.ndindex(image.shape):
        lows = [max(0, c - radius) for c in p]
        window = image[tuple(slice(low, c + radius + 1) for low, c in zip(lows, p))].astype(np.float64)
        offsets = np.meshgrid(*[np.arange(low, low + n) - c for low, n, c in zip(lows, window.shape, p)],
                              indexing="ij")
        weights = np.exp(-sum(o ** 2 for o in offsets) / (2 * sigma ** 2))
        weights /= weights.sum()
        mean = (weights * window).sum()
        variance = (weights * window ** 2).sum() - mean ** 2
        out[p] = (image[p] - mean) / np.sqrt(variance + epsilon ** 2)
    return out


@pytest.mark.parametrize("shape, sigma, epsilon", [
    ((12, 9), 1.0, 0.01),      # 2D, window of 7 inside the image and cut by its borders
    ((12, 9), 2.0, 0.01),      # window of 13, wider than the image
    ((10, 11), 0.7, 0.1),      # ceil(2.1) = 3: a fractional sigma; a large epsilon
    ((6, 7, 5), 1.5, 0.01),    # 3D
])
def test_local_normalize_matches_its_formula(shape, sigma, epsilon):
    image = np.random.default_rng(3).uniform(size=(2, *shape)).astype(np.float32)
    image[1] *= 0.05  # a faint image: epsilon matters
    out = LocalNormalize(sigma, epsilon)(image[..., np.newaxis]).numpy()[..., 0]
    expected = np.stack([local_normalize_reference(i, sigma, epsilon) for i in image])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gain, offset", [(0.1, 0.3), (3.0, -1.0), (-1.0, 1.0), (-0.2, 0.5)])
def test_local_normalize_follows_the_sign_of_the_contrast_but_not_its_size(gain, offset):
    x = images((1, 20, 17))
    normalize = LocalNormalize(sigma=1.5, epsilon=1e-5)
    np.testing.assert_allclose(normalize(gain * x + offset), np.sign(gain) * normalize(x), atol=2e-3)


def test_local_normalization_gives_the_encoder_a_faint_edge_as_a_strong_one():
    edge = np.zeros((1, 24, 24, 1), np.float32)
    edge[:, :, 12:] = 1
    faint = 0.4 + 0.1 * edge  # a contrast 10 times smaller (10 times the epsilon), on another level
    tf.keras.utils.set_random_seed(0)
    normalized = CIFLEncoder(channels=5, features=8, local_normalization=2.0)
    plain = CIFLEncoder(channels=5, features=8)
    change = {name: np.abs(encoder(faint) - encoder(edge)).mean() for name, encoder in
              (("normalized", normalized), ("plain", plain))}
    assert change["normalized"] < 0.2 * change["plain"], change


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma=0), "sigma must be a positive number, got 0"),
    (dict(sigma=-1.0), "sigma must be a positive number, got -1.0"),
    (dict(sigma="2"), "sigma must be a positive number, got '2'"),
    (dict(sigma=True), "sigma must be a positive number, got True"),
    (dict(sigma=float("inf")), "sigma must be a positive number, got inf"),
    (dict(epsilon=0.0), "epsilon must be a positive number, got 0.0"),
    (dict(epsilon=np.float32("nan")), r"epsilon must be a positive number, got np.float32\(nan\)"),
])
def test_local_normalize_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=f"LocalNormalize: {message}"):
        LocalNormalize(**kwargs)


@pytest.mark.parametrize("value", [0, -2.0, "2", True])
def test_encoder_local_normalization_must_be_none_or_positive(value):
    message = f"local_normalization must be None or a positive sigma in pixels, got {value!r}"
    with pytest.raises(ValueError, match=message):
        CIFLEncoder(local_normalization=value)


@pytest.mark.parametrize("built", [False, True], ids=["first-input", "built"])
@pytest.mark.parametrize("shape", [(1, 8, 8, 2), (8, 8, 1)])
def test_local_normalize_takes_single_channel_images(shape, built):
    normalize = LocalNormalize()
    if built:
        normalize(images((1, 6, 6)))
    with pytest.raises(ValueError, match=rf"single-channel 2D or 3D inputs .* got shape {re.escape(str(shape))}"):
        normalize(np.zeros(shape, np.float32))


def test_save_encoder_writes_h5_files_only_and_load_encoder_checks_trainable(tmp_path):
    encoder = CIFLEncoder(channels=2, features=4)
    with pytest.raises(ValueError, match=r"must be an \.h5 file \(encoder\.weights\.h5\), got '.*encoder'"):
        save_encoder(encoder, str(tmp_path / "encoder"))
    assert list(tmp_path.iterdir()) == []  # no TF checkpoint files left behind
    save_encoder(encoder, str(tmp_path / "encoder.weights.h5"))
    with pytest.raises(TypeError, match="trainable must be True or False, got 'no'"):
        load_encoder(str(tmp_path), trainable="no")


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
@pytest.mark.parametrize("activation", [tf.nn.relu6, tf.nn.leaky_relu, tf.keras.activations.elu, "relu", "swish"])
def test_an_activation_function_survives_save_and_load(activation, tmp_path):
    encoder = CIFLEncoder(channels=4, features=8, activation=activation)
    x = images((1, 12, 10))
    expected = encoder(x).numpy()
    save_encoder(encoder, tmp_path / "encoder.weights.h5")
    np.testing.assert_array_equal(load_encoder(tmp_path / "encoder.weights.h5")(x), expected)
    inputs = tf.keras.Input((None, None, 1))
    for filename in ("model.keras", "model.h5"):
        tf.keras.Model(inputs, encoder(inputs)).save(tmp_path / filename)
        np.testing.assert_array_equal(tf.keras.models.load_model(tmp_path / filename)(x), expected)


@pytest.mark.parametrize("layer", [MIND(2), LocalNormalize(), L2Normalize(), tf.keras.layers.Dense(3)],
                         ids=lambda layer: type(layer).__name__)
def test_save_encoder_refuses_what_load_encoder_does_not_load(layer, tmp_path):
    message = rf"save_encoder: saves a CIFLEncoder, Triplanar or FeatureStack .*, got {type(layer).__name__}"
    with pytest.raises(TypeError, match=message):
        save_encoder(layer, tmp_path / "layer.weights.h5")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layer_class, numpy_kwargs, python_kwargs", [
    (CIFLEncoder, dict(channels=np.int64(8), features=np.int32(4), ndim=np.int64(3)),
     dict(channels=8, features=4, ndim=3)),
    (CIFLEncoder, dict(local_normalization=np.float32(2)), dict(local_normalization=2.0)),
    (CIFLEncoder, dict(architecture="context", dilations=[np.int64(2), np.uint8(3)]),
     dict(architecture="context", dilations=[2, 3])),
    (LocalNormalize, dict(sigma=np.float32(2), epsilon=np.float64(0.5)), dict(sigma=2.0, epsilon=0.5)),
    (MIND, dict(ndim=np.int64(2), sigma=np.float32(0.5), dilation=np.int16(2)), dict(ndim=2, sigma=0.5, dilation=2)),
], ids=["encoder-sizes", "encoder-local-normalization", "encoder-dilations", "local-normalize", "mind"])
def test_numpy_numbers_are_taken_as_python_numbers(layer_class, numpy_kwargs, python_kwargs):
    config = layer_class(**numpy_kwargs, name="layer").get_config()
    assert json.loads(json.dumps(config)) == config == layer_class(**python_kwargs, name="layer").get_config()


@pytest.mark.parametrize("kwargs", [dict(), dict(architecture="context", dilations=(2, 3)),
                                    dict(inversion_invariant=True, use_bias=False)],
                         ids=["paper", "context", "inversion-invariant-no-bias"])
def test_inflate_gives_the_2d_features_of_each_slice_across_the_last_axis(kwargs):
    flat = CIFLEncoder(channels=5, features=8, **kwargs)
    volumes = images((2, 9, 11, 6), seed=1)
    slices = np.moveaxis(volumes, 3, 1).reshape(-1, 9, 11, 1)
    expected = np.moveaxis(flat(slices).numpy().reshape(2, 6, 9, 11, 5), 1, 3)
    deep = inflate(flat)
    assert deep.ndim == 3 and {**deep.get_config(), "ndim": 2, "name": flat.name} == flat.get_config()
    np.testing.assert_allclose(deep(volumes), expected, atol=1e-5)


@pytest.mark.parametrize("layer, error, message", [
    (CIFLEncoder(ndim=3), TypeError, r"takes a 2D CIFLEncoder, got .* \(CIFLEncoder, ndim 3\)"),
    (MIND(ndim=2), TypeError, r"takes a 2D CIFLEncoder, got .* \(MIND, ndim 2\)"),
    (CIFLEncoder(local_normalization=1.5), ValueError, "has local_normalization 1.5, whose window would reach"),
])
def test_inflate_refuses_what_it_cannot_inflate_exactly(layer, error, message):
    with pytest.raises(error, match=message):
        inflate(layer)
