"""Numerics: training stays finite at low temperatures and on flat images; a NaN loss stops it cleanly."""
import numpy as np
import pytest

import cifl_tf
import tensorflow as tf
from cifl_tf.callbacks import NonFiniteLossError, StopOnNonFinite
from cifl_tf.training import SiameseCIFL

TINY = dict(channels=4, features=8)


class NaNLossFromStep(tf.keras.losses.Loss):
    """MSE, NaN from optimisation step `step` (counted from 1) on."""

    def __init__(self, model, step):
        super().__init__()
        self.model, self.step = model, step

    def call(self, y_true, y_pred):
        broken = self.model.optimizer.iterations + 1 >= self.step
        return tf.reduce_mean(tf.square(y_true - y_pred), -1) + tf.where(broken, np.nan, 0.0)


class PoisonLastStep(tf.keras.callbacks.Callback):
    """Makes the weights NaN after the loss of an epoch's last step (of 2) was computed."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])


def tiny_model():
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])


def tiny_data():
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    return x, x[:, :2] * 3


def test_a_nan_loss_stops_fit_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()
    model.compile(tf.keras.optimizers.SGD(0.01), NaNLossFromStep(model, step=6))  # epoch 3, its 2nd step
    weights = str(tmp_path / "model.weights.h5")
    saved = []
    remember = tf.keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: saved.append(model.get_weights()))
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 2 of epoch 3"):
        model.fit(*tiny_data(), batch_size=4, epochs=5, verbose=0, shuffle=False,
                  callbacks=[StopOnNonFinite(), tf.keras.callbacks.ModelCheckpoint(weights, save_weights_only=True),
                             remember])
    assert len(saved) == 2  # epochs 1 and 2 ended; epoch 3 never reached its end
    on_disk = tiny_model()
    on_disk.load_weights(weights)
    for a, b in zip(on_disk.get_weights(), saved[-1]):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


def test_nan_weights_after_a_finite_last_loss_are_caught_before_the_checkpoint(tmp_path):
    model = tiny_model()
    model.compile(tf.keras.optimizers.SGD(0.01), "mse")
    poison = PoisonLastStep()
    weights = str(tmp_path / "model.weights.h5")
    with pytest.raises(NonFiniteLossError, match=r"the weights are NaN/Inf after epoch 1 \(not saved\)"):
        model.fit(*tiny_data(), batch_size=4, epochs=2, verbose=0,
                  callbacks=[poison, StopOnNonFinite(), tf.keras.callbacks.ModelCheckpoint(weights,
                                                                                           save_weights_only=True)])
    assert not (tmp_path / "model.weights.h5").exists()


def test_finite_training_is_left_alone():
    model = tiny_model()
    model.compile(tf.keras.optimizers.SGD(0.01), "mse")
    history = model.fit(*tiny_data(), batch_size=4, epochs=3, verbose=0, callbacks=[StopOnNonFinite()])
    assert len(history.history["loss"]) == 3


def test_encoder_training_at_tau_gamma_001_stays_finite():
    encoder = cifl_tf.train_encoder(shape=(32, 32), steps=3, batch_size=2, tau_alpha=0.01, tau_beta=0.01,
                                    tau_gamma=0.01, max_offset=4, seed=0, verbose=0, **TINY)
    assert all(np.isfinite(w).all() for w in encoder.get_weights())


@pytest.mark.parametrize("image", [np.zeros, lambda shape: np.full(shape, 0.7, np.float32)],
                         ids=["all_zero", "constant"])
def test_encoder_training_on_flat_images_stays_finite(image):
    tf.keras.utils.set_random_seed(0)
    views = image((2, 32, 32, 1)).astype(np.float32)
    shift = np.zeros((2, 2), np.int32)
    model = SiameseCIFL(cifl_tf.CIFLEncoder(ndim=2, **TINY), tau_alpha=0.01, tau_beta=0.01, tau_gamma=0.01)
    model.compile(tf.keras.optimizers.Adam(1e-3))
    dataset = tf.data.Dataset.from_tensors(((views, views, shift),)).repeat()
    history = model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0, callbacks=[StopOnNonFinite()])
    assert np.isfinite(history.history["loss"]).all()
    assert all(np.isfinite(w).all() for w in model.get_weights())
