"""Exact resume of a ``model.fit`` run: weights, optimizer state and finished epochs, saved together.

Keras's ``BackupAndRestore`` saves the same state, but tells the restored epoch only to ``fit``
itself (through private attributes, once fit has started with the input pipeline already built),
while a run on a synthetic stream must know it before: the stream restarts at that epoch's first
batch. ``EpochCheckpoint`` restores before ``fit`` and passes the epoch as ``initial_epoch``.
"""
import tempfile

import tensorflow as tf


class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Saves the model, its optimizer and the number of finished epochs at the end of each epoch.

    The saves go through ``tf.train.CheckpointManager``, which records a new checkpoint only once it
    is fully written: a run killed at any point leaves the previous one intact. Under a multi-worker
    strategy every worker saves (TF's multi-worker pattern), but only the chief into `directory`;
    the others write to a temporary folder, removed when training ends. All workers restore
    from `directory`, which must therefore be on a file system they share.

    Args:
        directory: folder of the checkpoints.
        model: a compiled, built model (call it once on a batch first).
    """

    def __init__(self, directory, model):
        super().__init__()
        self.directory = directory
        strategy = model.distribute_strategy  # the one the model was made under
        self.is_chief = strategy.extended.should_checkpoint
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)  # so that its state restores at once
            self.epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="finished_epochs")
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epochs=self.epochs)
        write_to = directory if self.is_chief else tempfile.mkdtemp(prefix="cifl-worker-checkpoint-")
        self._manager = tf.train.CheckpointManager(self._checkpoint, write_to, max_to_keep=1)

    def restore(self):
        """Loads the last checkpoint in `directory`, if any; returns the number of finished epochs."""
        latest = tf.train.latest_checkpoint(self.directory)
        if latest is not None:
            self._checkpoint.restore(latest).assert_existing_objects_matched()
        return int(self.epochs.numpy())

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.assign(epoch + 1)
        self._manager.save()

    def on_train_end(self, logs=None):
        if not self.is_chief:
            tf.io.gfile.rmtree(self._manager.directory)
