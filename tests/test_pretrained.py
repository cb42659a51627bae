"""The shipped encoders: pretrained() per ndim and tau_gamma, its errors, and their provenance (encoders.json)."""
import csv
import os
import re

import numpy as np
import pytest
import tensorflow as tf

import cifl_tf
from cifl_tf.encoder import (PRETRAINED_DIR, PRETRAINED_RECOMMENDED, PRETRAINED_TAU_GAMMAS, pretrained_info,
                             pretrained_log)
from conftest import config_without_name

SWEEP_KEYS = ("1", "0.1", "0.01")
RECOMMENDED_FIELDS = {"command", "steps", "seed", "final_loss", "wall_seconds", "settings", "machine", "commit"}


@pytest.mark.parametrize("kwargs, key, shape", [
    ({}, "recommended_2d", (1, 24, 20, 1)),
    (dict(tau_gamma=0.1), "0.1", (1, 24, 20, 1)),
    (dict(tau_gamma=1.0, ndim=2), "1", (1, 24, 20, 1)),
    (dict(ndim=3), "recommended_3d", (1, 12, 10, 14, 1)),
])
def test_pretrained_is_the_frozen_encoder_that_encoders_json_describes(kwargs, key, shape):
    encoder = cifl_tf.pretrained(**kwargs)
    settings = pretrained_info()[key]["settings"]
    assert isinstance(encoder, cifl_tf.CIFLEncoder) and not encoder.trainable
    assert (encoder.ndim, encoder.channels, encoder.features, encoder.architecture, encoder.inversion_invariant,
            encoder.local_normalization, encoder.use_bias) == (
        len(settings["shape"]), settings["channels"], settings["features"], settings["architecture"],
        settings["inversion_invariant"], settings["local_normalization"], settings.get("use_bias", True))
    features = encoder(np.random.default_rng(0).random(shape, np.float32)).numpy()
    assert features.shape == (*shape[:-1], settings["channels"])
    np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1, atol=1e-5)


@pytest.mark.parametrize("ndim, shape", [(2, (1, 16, 16, 16, 1)), (2, (16, 16, 1)), (3, (1, 16, 16, 1)),
                                         (3, (1, 8, 8, 8, 2))])
def test_pretrained_encoders_check_each_input(ndim, shape):
    """pretrained() gives built layers: their build() has seen an input already."""
    with pytest.raises(ValueError, match=f"expects single-channel inputs of rank {ndim + 2}"):
        cifl_tf.pretrained(ndim=ndim)(np.zeros(shape, np.float32))


def test_the_recommended_encoder_gives_an_image_and_its_inversion_the_same_features():
    image = np.random.default_rng(0).random((1, 40, 36, 1), np.float32)
    encoder = cifl_tf.pretrained()
    np.testing.assert_allclose(encoder(1 - image), encoder(image), atol=1e-5)


def test_pretrained_positional_tau_gamma_and_trainable():
    by_position, by_name = cifl_tf.pretrained(0.01), cifl_tf.pretrained(tau_gamma=0.01, trainable=True)
    assert by_name.trainable and not by_position.trainable
    assert config_without_name(by_position) == {**config_without_name(by_name), "trainable": False}
    for a, b in zip(by_position.get_weights(), by_name.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_two_shipped_encoders_fit_in_one_model_that_saves_and_loads(tmp_path):
    """Every shipped encoder was saved under one name; a model's layers need their own."""
    encoders = cifl_tf.pretrained(), cifl_tf.pretrained(1.0)
    assert encoders[0].name != encoders[1].name
    image = tf.keras.Input((16, 16, 1))
    model = tf.keras.Model(image, tf.keras.layers.Concatenate()([encoder(image) for encoder in encoders]))
    model.save(tmp_path / "two.keras")
    x = np.random.default_rng(0).random((1, 16, 16, 1), np.float32)
    expected = np.concatenate([encoder(x) for encoder in encoders], axis=-1)
    np.testing.assert_allclose(tf.keras.models.load_model(tmp_path / "two.keras")(x), expected, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ndim=1), r"ndim must be 2 or 3, got 1"),
    (dict(ndim="3"), r"ndim must be 2 or 3, got '3'"),
    (dict(ndim=3.0), r"ndim must be 2 or 3, got 3.0"),  # as CIFLEncoder refuses it
    (dict(ndim=True), r"ndim must be 2 or 3, got True"),
    (dict(tau_gamma=0.1, ndim=4), r"ndim must be 2 or 3, got 4"),
    (dict(tau_gamma=0.5), r"tau_gamma must be None or one of \(1.0, 0.1, 0.01\), got 0.5"),
    (dict(tau_gamma=0.5, ndim=3), r"tau_gamma must be None or one of"),
    (dict(tau_gamma=True), r"tau_gamma must be None or one of \(1.0, 0.1, 0.01\), got True"),  # True == 1.0
])
@pytest.mark.parametrize("function", [cifl_tf.pretrained, pretrained_log])
def test_pretrained_rejects_bad_arguments(function, kwargs, message):
    with pytest.raises(ValueError, match=message):
        function(**kwargs)


@pytest.mark.parametrize("kwargs, stem", [({}, "recommended_2d"), (dict(tau_gamma=0.1), "tau_gamma_0.1"),
                                          (dict(tau_gamma=1.0), "tau_gamma_1"), (dict(ndim=3), "recommended_3d"),
                                          (dict(tau_gamma=0.01, ndim=3), "tau_gamma_0.01")])
def test_pretrained_log_is_the_training_log_beside_the_weights(kwargs, stem):
    assert pretrained_log(**kwargs) == os.path.join(PRETRAINED_DIR, stem + ".log.csv")


def test_encoders_json_has_the_sweep_and_the_recommended_encoders():
    info = pretrained_info()
    assert sorted(info) == sorted((*SWEEP_KEYS, *PRETRAINED_RECOMMENDED.values()))
    assert [float(key) for key in SWEEP_KEYS] == list(PRETRAINED_TAU_GAMMAS)
    for name in PRETRAINED_RECOMMENDED.values():
        entry = info[name]
        assert set(entry) == RECOMMENDED_FIELDS, name
        assert re.fullmatch(r"[0-9a-f]{7,40}", entry["commit"]), name
        assert entry["steps"] == entry["settings"]["steps"] and entry["seed"] == entry["settings"]["seed"], name


@pytest.mark.parametrize("key", [*SWEEP_KEYS, *PRETRAINED_RECOMMENDED.values()])
def test_each_entry_has_its_files_and_the_final_loss_of_its_log(key):
    recommended = key in PRETRAINED_RECOMMENDED.values()
    stem = os.path.join(PRETRAINED_DIR, key if recommended else f"tau_gamma_{key}")
    for suffix in (".weights.h5", ".json"):
        assert os.path.isfile(stem + suffix), stem + suffix
    with open(stem + ".log.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert float(last["loss"]) == pytest.approx(pretrained_info()[key]["final_loss"], rel=1e-6)


def test_pretrained_trainable_must_be_a_bool():
    with pytest.raises(TypeError, match="trainable must be True or False, got 'no'"):
        cifl_tf.pretrained(trainable="no")


def test_the_recommended_3d_encoder_was_trained_from_the_inflated_tau_gamma_1_encoder():
    """Its provenance: `init` names the shipped encoder it started from, with the architecture of both."""
    settings = pretrained_info()["recommended_3d"]["settings"]
    assert settings["init"] == "tau_gamma_1" and len(settings["shape"]) == 3
    assert config_without_name(cifl_tf.pretrained(ndim=3)) == {
        **config_without_name(cifl_tf.encoder.inflate(cifl_tf.pretrained(1.0))), "trainable": False}


def test_the_recommended_3d_encoder_feeds_3d_unet_and_vxmdense_models():
    """Unlike the tri-planar features (a Triplanar, which the models refuse), it is a CIFLEncoder."""
    encoder = cifl_tf.pretrained(ndim=3)
    volumes = np.random.default_rng(0).random((2, 16, 16, 16, 1), np.float32)
    segmenter = cifl_tf.segmentation_model((16, 16, 16), nb_labels=3, encoder=encoder, nb_features=4, nb_levels=2)
    assert segmenter.predict(volumes[:1], verbose=0).shape == (1, 16, 16, 16, 3)
    registrar = cifl_tf.registration_model((16, 16, 16), encoder, nb_unet_features=[[8, 8], [8, 8, 8]], int_steps=0)
    assert registrar.register(volumes[:1], volumes[1:]).shape == (1, 16, 16, 16, 3)
