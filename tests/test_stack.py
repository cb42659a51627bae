"""cifl_tf.stack: the features of several describers side by side, l2-normalised together."""
import numpy as np
import pytest

import cifl_tf
import tensorflow as tf
from cifl_tf import CIFLEncoder, FeatureStack, Triplanar, load_encoder, save_encoder, tiling
from cifl_tf.descriptors import MIND
from test_instance import dice_after, warped_pair


@pytest.fixture(scope="module")
def encoder():
    encoder = CIFLEncoder(channels=3, features=4)
    encoder.build((None, None, None, 1))
    return encoder


@pytest.fixture(scope="module")
def describers(encoder):
    """By ndim: the encoder (receptive radius 8) and a wider MIND (radius 1 + 9 in 2D), or both made 3D."""
    return {2: [encoder, MIND(ndim=2, sigma=3)], 3: [Triplanar(encoder), MIND(ndim=3, variant="ssc")]}


@pytest.mark.parametrize("ndim", [2, 3])
def test_channels_are_the_describers_features_concatenated_and_l2_normalised(describers, ndim):
    parts = describers[ndim]
    image = np.random.default_rng(ndim).random((2, *((24, 22) if ndim == 2 else (9, 8, 7)), 1), np.float32)
    concatenated = np.concatenate([part(image).numpy() for part in parts], axis=-1)
    expected = concatenated / np.linalg.norm(concatenated, axis=-1, keepdims=True)
    stack = FeatureStack(parts)
    np.testing.assert_allclose(stack(image), expected, atol=1e-6)
    assert (stack.ndim, stack.channels) == (ndim, sum(part.channels for part in parts))
    assert stack.receptive_radius == max(tiling.receptive_radius(part) for part in parts) == (10 if ndim == 2 else 8)


@pytest.mark.parametrize("ndim, max_memory, encoder_tiled", [(2, 10 ** 9, False), (2, 100_000, True),
                                                              (3, 10 ** 9, False), (3, 300_000, False),
                                                              (3, 90_000, True)],
                         ids=["2d-whole", "2d-tiles", "3d-whole", "3d-tiles", "3d-slice-tiles"])
def test_tiled_features_equal_untiled(encoder, describers, ndim, max_memory, encoder_tiled, monkeypatch):
    """Each describer tiled its own way (a Triplanar by whole slices, or by tiles of a slice where one does not
    fit), then normalised together; `encoder_tiled`: whether the encoder's part runs in tiles smaller than its
    image (2D) or slice (Triplanar)."""
    tiled_channels = []

    def spy(call, image, radius, core, out):
        if tuple(core) != image.shape:
            tiled_channels.append(out.shape[-1])
        return map_tiles(call, image, radius, core, out)

    map_tiles = tiling.map_tiles
    stack = FeatureStack(describers[ndim])
    image = np.random.default_rng(5).random((40, 36, 6)[:ndim] if ndim == 3 else (60, 52), np.float32)
    untiled = stack(image[None, ..., None])[0]
    monkeypatch.setattr(tiling, "map_tiles", spy)
    np.testing.assert_allclose(tiling.tiled_features(stack, image, max_memory), untiled, atol=1e-5)
    assert describers[ndim][1].channels != encoder.channels  # the calls are told apart by their channels
    assert (encoder.channels in tiled_channels) == encoder_tiled


def test_saves_and_loads_with_the_same_outputs(encoder, tmp_path):
    stack = FeatureStack([encoder, MIND(ndim=2, variant="ssc")])
    image = np.random.default_rng(2).random((1, 12, 10, 1), np.float32)
    path = str(tmp_path / "stack.weights.h5")
    save_encoder(stack, path)
    loaded = load_encoder(path)
    assert isinstance(loaded, FeatureStack) and not loaded.trainable and loaded.trainable_weights == []
    assert load_encoder(path, trainable=True).trainable_weights != []
    assert [type(d) for d in loaded.describers] == [CIFLEncoder, MIND] and loaded.describers[1].variant == "ssc"
    np.testing.assert_allclose(loaded(image), stack(image), atol=1e-6)
    assert FeatureStack.from_config(stack.get_config()).get_config() == stack.get_config()


def two_pretrained(wrap=lambda encoder: encoder):
    """Two shipped encoders: both named cifl_encoder, their weights conv_0/kernel:0, ... as load_encoder built them."""
    return FeatureStack([wrap(cifl_tf.pretrained(1.0)), wrap(cifl_tf.pretrained(0.1))])


def without_build_configs(config):
    """A layer's config without the input shapes its nested layers were built for (after loading, the model's)."""
    if isinstance(config, (list, dict)):
        items = enumerate(config) if isinstance(config, list) else config.items()
        kept = [(key, without_build_configs(value)) for key, value in items if key != "build_config"]
        return [value for _, value in kept] if isinstance(config, list) else dict(kept)
    return config


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
@pytest.mark.parametrize("filename", ["model.h5", "model.keras"])
@pytest.mark.parametrize("ndim, make", [
    (3, lambda encoder: Triplanar(encoder)),
    (2, lambda encoder: FeatureStack([encoder, MIND(ndim=2)])),
    (3, lambda encoder: FeatureStack([Triplanar(encoder), MIND(ndim=3, variant="ssc")])),
    (2, lambda encoder: two_pretrained()),
    (3, lambda encoder: two_pretrained(Triplanar)),
], ids=["triplanar", "stack", "stack-of-triplanar", "two-pretrained", "two-pretrained-triplanars"])
def test_a_model_holding_it_saves_and_loads(encoder, ndim, make, filename, tmp_path):
    layer = make(encoder)
    inputs = tf.keras.Input((None,) * ndim + (1,))
    model = tf.keras.Model(inputs, layer(inputs))
    image = np.random.default_rng(ndim).random((1, *(9, 8, 7)[:ndim], 1), np.float32)
    expected = model(image).numpy()
    model.save(tmp_path / filename)
    loaded = tf.keras.models.load_model(tmp_path / filename)
    assert type(loaded.layers[1]) is type(layer)
    assert without_build_configs(loaded.layers[1].get_config()) == without_build_configs(layer.get_config())
    np.testing.assert_array_equal(loaded(image), expected)


def test_describers_of_the_same_names_are_copies_with_names_of_their_own():
    first, second = cifl_tf.pretrained(1.0), cifl_tf.pretrained(0.1)
    stack = FeatureStack([first, second])
    copy = stack.describers[1]
    assert stack.describers[0] is first and copy is not second and copy.name != first.name
    assert not copy.trainable and copy.get_config() == {**second.get_config(), "name": copy.name}
    assert not {weight.name for weight in first.weights} & {weight.name for weight in copy.weights}
    for ours, theirs in zip(copy.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    image = np.random.default_rng(0).random((1, 20, 18, 1), np.float32)
    both = np.concatenate([first(image), second(image)], axis=-1)
    np.testing.assert_allclose(stack(image), both / np.linalg.norm(both, axis=-1, keepdims=True), atol=1e-6)


def test_an_encoder_built_inside_two_describers_is_copied_into_the_second(encoder):
    encoder(np.zeros((1, 8, 8, 1), np.float32))  # its convolutions built, whatever ran before
    stack = FeatureStack([Triplanar(encoder), Triplanar(encoder, name="other")])
    assert stack.describers[1].encoder is not encoder


@pytest.mark.parametrize("bad, error, message", [
    ("MIND", ValueError, r"describers must be a list of two or more describer layers, got 'MIND'"),
    (["ONE"], ValueError, r"describers must be a list of two or more describer layers"),
    (["ENCODER", "a string"], TypeError, r"expected a Keras layer with ndim .* got str"),
    (["ENCODER", "MIND3"], ValueError, r"describers must all be 2D or all 3D, got ndims \[2, 3\]"),
    (["ENCODER", "ONE"], ValueError, r"a describer, or a layer inside one, appears twice"),  # saved once, it would
    # not load; nor would an encoder inside two describers, unbuilt (built, its weights' names once made a copy)
    (["TRIPLANAR", "TRIPLANAR2"], ValueError, r"a describer, or a layer inside one, appears twice in \['triplanar"),
    (["ENCODER3", "STACK"], ValueError, r"a describer, or a layer inside one, appears twice"),
])
def test_rejects_what_is_not_two_describers_of_one_ndim(encoder, bad, error, message):
    flat, solid = CIFLEncoder(channels=3, features=4), CIFLEncoder(channels=3, features=4, ndim=3)  # unbuilt
    names = {"ONE": encoder, "ENCODER": encoder, "MIND3": MIND(ndim=3), "ENCODER3": solid,
             "TRIPLANAR": Triplanar(flat), "TRIPLANAR2": Triplanar(flat, name="other"),
             "STACK": FeatureStack([solid, MIND(ndim=3)])}
    bad = [names.get(item, item) for item in bad] if isinstance(bad, list) else bad
    with pytest.raises(error, match=message):
        FeatureStack(bad)


@pytest.mark.parametrize("moved_features", ["encoded", "warped"])
def test_register_pair_takes_a_stack(moved_features):
    """The moved image encoded by both describers in every step (the 2D default), or their features of the
    moving image warped (the 3D default: the stack's own tiled_features)."""
    # Small images and one squaring step: the stack is under test, not the size or the integration.
    moving, _, t2, moving_labels, fixed_labels = warped_pair((32, 32))
    stack = FeatureStack([cifl_tf.pretrained(), MIND(ndim=2)])
    displacement = cifl_tf.register_pair(moving, t2, stack, levels=(1,), steps=40, int_steps=1,
                                         moved_features=moved_features, verbose=0)
    before = dice_after(np.zeros_like(displacement), moving_labels, fixed_labels)
    assert dice_after(displacement, moving_labels, fixed_labels) > before + 0.05
