"""Training runs that a kill (even SIGKILL) sets back by at most the unfinished epoch.

* ``EpochCheckpoint``: a Keras callback that saves the weights, the optimizer state and the number of
  finished epochs at every epoch end, and restores them before ``fit`` resumes.
* ``epoch_batches``: batches of arrays in an order that is a pure function of (seed, epoch, step), so
  that a resumed run sees the same batches as one that ran through (``models.pair_batches`` does the
  same for registration pairs).
* ``prepare_run``: the settings.json of a run folder, written for a new run and checked on resume;
  ``write_json`` writes it (and any JSON file) atomically.
"""
import json
import os

import numpy as np
import tensorflow as tf

from .data import write_atomically

SETTINGS_FILE = "settings.json"


class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Saves model weights, optimizer state and finished epochs at each epoch end (tf.train.CheckpointManager).

    A save writes new files and then atomically points the folder's ``checkpoint`` index at them, so
    a kill during a save leaves the previous checkpoint in force. Use::

        checkpoint = EpochCheckpoint(folder)
        first_epoch = checkpoint.restore(model)  # 0 when the folder holds no checkpoint yet
        model.fit(..., initial_epoch=first_epoch, callbacks=[checkpoint])

    Args:
        directory: folder of the checkpoint files.
        max_to_keep: checkpoints kept; older ones are deleted once a newer one is in force.
    """

    def __init__(self, directory, max_to_keep=2):
        super().__init__()
        self.directory, self.max_to_keep = os.fspath(directory), max_to_keep
        self._epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="finished_epochs")
        self._manager = None

    def set_model(self, model):
        if model is not self.model:
            self._manager = None
        super().set_model(model)

    def _checkpoint_manager(self):
        if self._manager is None:
            optimizer = self.model.optimizer
            # Its moments exist only after the first step; made now, they are restored with the rest.
            optimizer.build(self.model.trainable_variables)
            checkpoint = tf.train.Checkpoint(model=self.model, optimizer=optimizer, epochs=self._epochs)
            self._manager = tf.train.CheckpointManager(checkpoint, self.directory, self.max_to_keep)
        return self._manager

    def restore(self, model):
        """Reads the latest checkpoint into `model` (compiled); returns its finished epochs (0: none yet)."""
        if getattr(model, "optimizer", None) is None:
            raise ValueError(f"EpochCheckpoint.restore: compile {getattr(model, 'name', model)!r} first: "
                             f"its optimizer state is part of the checkpoint")
        self.set_model(model)
        manager = self._checkpoint_manager()
        if manager.latest_checkpoint:
            manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        return int(self._epochs.numpy())

    def on_epoch_end(self, epoch, logs=None):
        self._epochs.assign(epoch + 1)
        self._checkpoint_manager().save(checkpoint_number=epoch + 1)


def epoch_batches(arrays, batch_size, seed, first_epoch=0):
    """Endless batches of `arrays`: epoch e is a permutation drawn from (seed, e) alone, cut into batches.

    Args:
        arrays: a tuple of arrays with the same first size N, e.g. (images (N, *shape, 1), labels).
        batch_size: items per batch; an epoch's last batch holds the remainder.
        seed: integer seed of the permutations.
        first_epoch: the epoch the stream starts at (a resumed run's ``initial_epoch``).

    Returns: tf.data.Dataset of tuples of (<= batch_size, ...) batches, ceil(N / batch_size) of them
    per epoch: ``fit(dataset, steps_per_epoch=ceil(N / batch_size))``.
    """
    if not isinstance(arrays, tuple) or not arrays or len({len(a) for a in arrays}) != 1 or not len(arrays[0]):
        raise ValueError(f"epoch_batches: arrays must be a tuple of non-empty arrays of one length, got "
                         f"lengths {[len(a) for a in arrays] if isinstance(arrays, tuple) else arrays!r}")
    for name, value, least in (("batch_size", batch_size, 1), ("first_epoch", first_epoch, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"epoch_batches: {name} must be an integer >= {least}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"epoch_batches: seed must be an integer, got {seed!r}")
    count = len(arrays[0])
    tensors = tuple(tf.constant(a) for a in arrays)

    def epoch_order(epoch):
        keys = tf.random.stateless_uniform([count], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(tf.argsort(keys)).batch(batch_size)

    dataset = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_order)
    dataset = dataset.map(lambda indices: tuple(tf.gather(t, indices) for t in tensors))
    return dataset.prefetch(tf.data.AUTOTUNE)


def prepare_run(out_dir, settings, resume, finished_file):
    """Makes `out_dir` for a new run (writing its settings.json), or checks it on resume.

    Args:
        settings: JSON-able dict of the run's settings.
        resume: continue the run in `out_dir`, whose settings.json must hold the same settings.
        finished_file: the file a finished run has written (name inside `out_dir`).

    Raises: FileExistsError for a new run in a folder that holds one; FileNotFoundError on resume
    without a run; ValueError on resume of a finished run or of one with other settings.
    """
    settings_path = os.path.join(out_dir, SETTINGS_FILE)
    finished = os.path.join(out_dir, finished_file)
    if os.path.exists(finished):
        raise FileExistsError(f"{finished}: already exists, the run in {out_dir} has finished; "
                              f"choose another output folder")
    if not resume:
        if os.path.exists(settings_path):
            raise FileExistsError(f"{out_dir}: already holds a training run: pass --resume (resume=True) to "
                                  f"continue it, or choose another output folder")
        os.makedirs(out_dir, exist_ok=True)
        write_json(settings_path, settings)
        return
    if not os.path.exists(settings_path):
        raise FileNotFoundError(f"{settings_path}: not found, so there is no run to resume")
    with open(settings_path) as f:
        saved = json.load(f)
    changed = sorted(key for key in {*settings, *saved} if saved.get(key) != settings.get(key))
    if changed:
        raise ValueError(f"{settings_path}: settings {changed} differ from those given; resume with the same ones")


def write_json(path, content):
    """Writes `content` as JSON, atomically (``data.write_atomically``): a kill leaves the old file intact."""
    def write(temporary):
        with open(temporary, "w") as f:
            json.dump(content, f, indent=2)

    write_atomically(path, write)
