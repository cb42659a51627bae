"""Keras callbacks shared by the trainers.

``StopOnNonFinite`` ends ``fit`` at the first NaN/Inf loss, before any later callback of the epoch
can write the broken weights. Keras' ``TerminateOnNaN`` only sets ``stop_training``: the epoch then
still ends, and a checkpoint callback's ``on_epoch_end`` saves the NaN weights over the last good ones.
"""
import numpy as np
import tensorflow as tf


class NonFiniteLossError(ValueError):
    """Training produced a NaN or Inf loss (or weights); the checkpoints on disk hold the last good epoch."""


# --resume keeps a run's settings: a lower learning rate is a new run.
_REMEDY = ("lower the learning rate in a new run (another output folder) or check the data for NaN/Inf values")


class StopOnNonFinite(tf.keras.callbacks.Callback):
    """Raises NonFiniteLossError when the batch loss is NaN/Inf, or the weights are at an epoch end.

    The error propagates out of ``fit`` at once, so no ``on_epoch_end`` or ``on_train_end`` runs
    after it: ModelCheckpoint, BackupAndRestore and ``checkpoint.EpochCheckpoint`` keep the last
    good epoch. Put it first in the callbacks list, so that it also checks the weights of the
    finishing epoch before the checkpoint callbacks save them (a finite last loss can still be
    followed by an update that makes the weights NaN).
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise NonFiniteLossError(f"training stopped: the loss is {float(loss)} at step {batch + 1} of epoch "
                                     f"{self._epoch + 1} (nothing of this epoch saved); {_REMEDY}")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if not all(np.all(np.isfinite(w)) for w in self.model.get_weights()):
            raise NonFiniteLossError(f"training stopped: the weights are NaN/Inf after epoch {epoch + 1} (not "
                                     f"saved); {_REMEDY}")
