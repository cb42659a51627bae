"""Training runs that a kill (even SIGKILL) sets back by at most the unfinished epoch.

* ``EpochCheckpoint``: a Keras callback that saves the weights, the optimizer state and the number of
  finished epochs at every epoch end, and restores them before ``fit`` resumes.
* ``epoch_batches``: batches of arrays in an order that is a pure function of (seed, epoch, step), so
  that a resumed run sees the same batches as one that ran through (``models.pair_batches`` does the
  same for registration pairs, ``synth.contrast_pairs(start=)`` for train_encoder).
* ``prepare_run`` / ``read_settings``: the settings.json of a run folder, written for a new run and
  checked on resume, with the checkpoint the resumed run will read.

Keras's ``BackupAndRestore`` saves the same state, but tells the restored epoch only to ``fit``
itself (through private attributes, once fit has started with the input pipeline already built),
while a run on a seeded stream must know it before: the stream restarts at that epoch's first
batch. ``EpochCheckpoint`` restores before ``fit`` and passes the epoch as ``initial_epoch``.
"""
import os
import pathlib

import numpy as np
import tensorflow as tf

from .checks import is_integer
from .data import first_line, read_json, write_atomically, write_json
from .synth import stream_options, stream_seed

SETTINGS_FILE = "settings.json"


class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Saves the model, its optimizer and the number of finished epochs at the end of each epoch.

    The saves go through ``tf.train.CheckpointManager``, which records a new checkpoint only once it
    is fully written: a run killed at any point, even during a save, leaves the previous one in force.
    Checkpoint ``ckpt-N`` holds N finished epochs. Under a multi-worker strategy every worker saves
    (TF's multi-worker pattern), but only the chief into `directory`; the others into a folder of their
    own inside it, ``workertemp_<task index>``, removed when training ends and at the task's next start.
    All workers restore from `directory`, which must therefore be on a file system they share. Use::

        checkpoint = EpochCheckpoint(folder, model)
        first_epoch = checkpoint.restore()  # 0 when the folder holds no checkpoint yet
        model.fit(..., initial_epoch=first_epoch, callbacks=[..., checkpoint])

    Args:
        directory: folder of the checkpoints.
        model: a compiled, built model (called once, or made from an Input).
        max_to_keep: checkpoints kept; older ones are deleted once a newer one is in force.
    """

    def __init__(self, directory, model, max_to_keep=2):
        super().__init__()
        if getattr(model, "optimizer", None) is None:
            raise ValueError(f"EpochCheckpoint: compile {getattr(model, 'name', model)!r} first: "
                             f"its optimizer state is part of the checkpoint")
        if not is_integer(max_to_keep, 1):
            raise ValueError(f"EpochCheckpoint: max_to_keep must be a positive integer, got {max_to_keep!r}")
        self.directory = os.fspath(directory)
        strategy = model.distribute_strategy  # the one the model was made under
        self.is_chief = strategy.extended.should_checkpoint
        with strategy.scope():
            # Its moments exist only after the first step; made now, they are restored with the rest.
            model.optimizer.build(model.trainable_variables)
            self.epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="finished_epochs")
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epochs=self.epochs)
        write_to = self.directory
        if not self.is_chief:
            # TF's own pattern (BackupAndRestore): a folder of the task's own beside the chief's checkpoints, made
            # anew at each start, so that a worker killed before its end leaves one folder there, not one per run
            write_to = os.path.join(self.directory, f"workertemp_{strategy.cluster_resolver.task_id}")
            if tf.io.gfile.exists(write_to):
                tf.io.gfile.rmtree(write_to)
        self._manager = tf.train.CheckpointManager(self._checkpoint, write_to, int(max_to_keep))

    def restore(self):
        """Loads the last checkpoint in `directory`, if any; returns the number of finished epochs.

        Raises: ValueError naming the checkpoint when the model is not the one it holds (other layers or shapes,
            as when a file the run was built from, such as its encoder, has been replaced since).
        """
        latest = tf.train.latest_checkpoint(self.directory)
        if latest is not None:
            try:
                self._checkpoint.restore(latest).assert_existing_objects_matched()
            except (AssertionError, ValueError) as error:  # TF's message goes on to list whole weight arrays
                raise ValueError(f"{latest}: holds another model than this run's, so it cannot resume (was a file "
                                 f"it was built from, such as its encoder, replaced since?): "
                                 f"{first_line(error).split('. ')[0]}") from None
        return int(self.epochs.numpy())

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.assign(epoch + 1)
        self._manager.save(checkpoint_number=epoch + 1)

    def on_train_end(self, logs=None):
        if not self.is_chief:
            tf.io.gfile.rmtree(self._manager.directory)


def epoch_log(path, finished_epochs, resume):
    """Keras's CSVLogger writing `path`; on resume appending after the first `finished_epochs` rows, the rest
    cut: a run killed after an epoch was logged but before it was checkpointed trains that epoch again."""
    if resume and os.path.exists(path):
        with open(path) as f:
            rows = f.readlines()[:1 + finished_epochs]  # the header and the checkpointed epochs
        write_atomically(path, lambda temporary: pathlib.Path(temporary).write_text("".join(rows)))
    return tf.keras.callbacks.CSVLogger(path, append=resume)


def check_checkpoint(directory):
    """ValueError naming the checkpoint when the latest one in `directory` is unreadable (none: fine)."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory}: not a folder, so it holds no checkpoint to resume from")
    checkpoint = tf.train.latest_checkpoint(directory)
    if checkpoint is None:
        if os.path.exists(os.path.join(directory, "checkpoint")):  # the state file names checkpoints now gone
            raise ValueError(f"{directory}: damaged checkpoint, cannot resume (its 'checkpoint' file names none "
                             f"that can be read)")
        return
    try:
        reader = tf.train.load_checkpoint(checkpoint)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)  # reading checks each tensor's checksum
    except (tf.errors.OpError, IndexError) as error:  # IndexError: a data file cut short
        raise ValueError(f"{checkpoint}: damaged checkpoint, cannot resume ({first_line(error)})") from None


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
        if not is_integer(value, least):
            raise ValueError(f"epoch_batches: {name} must be an integer >= {least}, got {value!r}")
    if not is_integer(seed):
        raise TypeError(f"epoch_batches: seed must be an integer, got {seed!r}")
    seed = stream_seed(seed)  # within int64
    count = len(arrays[0])
    tensors = tuple(tf.constant(a) for a in arrays)

    def epoch_order(epoch):
        keys = tf.random.stateless_uniform([count], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(tf.argsort(keys)).batch(batch_size)

    dataset = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_order)
    dataset = dataset.map(lambda indices: tuple(tf.gather(t, indices) for t in tensors))
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(stream_options())


def read_settings(out_dir, fields=None, defaults=None):
    """The settings.json of the run in `out_dir`, a dict.

    Args:
        fields: optional {name: (check(value) -> bool, what it must be)}: the file must hold exactly
            these fields, each passing its check.
        defaults: optional {name: value} for fields that runs of earlier versions did not write.

    Raises: FileNotFoundError when there is no settings.json; ValueError naming it when it is not
    JSON or not an object, lacks or adds fields, or holds a value that fails its check.
    """
    path = os.path.join(out_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found, so there is no run to resume")
    settings = read_json(path)
    if isinstance(settings, dict):
        settings = {**(defaults or {}), **settings}
    if not isinstance(settings, dict) or (fields is not None and set(settings) != set(fields)):
        keys = sorted(settings) if isinstance(settings, dict) else type(settings).__name__
        expected = "an object" if fields is None else f"an object with the fields {sorted(fields)}"
        raise ValueError(f"{path}: expected {expected}, got {keys}")
    check_settings(settings, fields or {}, f"{path}: ")
    return settings


def check_settings(settings, fields, source=""):
    """ValueError, after `source`, naming the first of `fields` ({name: (check(value) -> bool, what it must
    be)}) whose value in `settings` fails its check."""
    for name, (valid, what) in fields.items():
        if not valid(settings[name]):
            raise ValueError(f"{source}{name} must be {what}, got {settings[name]!r}")


def prepare_run(out_dir, settings, resume, finished_file, checkpoint_dir, fields=None, defaults=None, outputs=()):
    """Makes `out_dir` for a new run (writing its settings.json), or checks it on resume.

    Args:
        settings: JSON-able dict of the run's settings, as settings.json holds them (lists, not tuples).
        resume: continue the run in `out_dir`: its settings.json (checked by ``read_settings(out_dir,
            fields, defaults)``) must hold the same settings, and the latest checkpoint in `checkpoint_dir`
            (a folder inside `out_dir`) must be readable.
        finished_file: the file a finished run has written (name inside `out_dir`).
        outputs: other files a run writes there (names), which a new run refuses to write over.

    Raises: FileExistsError for a run that has finished, or a new run in a folder that holds one (or its
    checkpoints, or `outputs`);
    FileNotFoundError on resume without a run; ValueError on resume of a run with other settings,
    a broken settings.json or a damaged checkpoint.
    """
    settings_path = os.path.join(out_dir, SETTINGS_FILE)
    finished = os.path.join(out_dir, finished_file)
    if os.path.exists(finished):
        raise FileExistsError(f"{finished}: already exists, the run in {out_dir} has finished; "
                              f"choose another output folder")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir}: is not a folder")
    if not resume:
        if os.path.exists(settings_path):
            raise FileExistsError(f"{out_dir}: already holds a training run: pass --resume (resume=True) to "
                                  f"continue it, or choose another output folder")
        checkpoints = os.path.join(out_dir, checkpoint_dir)
        if tf.train.latest_checkpoint(checkpoints):  # else restored into the new run
            raise FileExistsError(f"{out_dir}: holds the checkpoints of an earlier run without its settings.json, "
                                  f"which cannot be resumed: delete {checkpoints} to start a new run there, or choose "
                                  f"another output folder")
        present = [name for name in outputs if os.path.lexists(os.path.join(out_dir, name))]
        if present:  # a saved encoder, or a run's without its settings.json: not ours to replace
            raise FileExistsError(f"{out_dir}: holds {', '.join(present)}, which a new run would write over; move "
                                  f"them, or choose another output folder")
        os.makedirs(out_dir, exist_ok=True)
        write_json(settings_path, settings)
        return
    saved = read_settings(out_dir, fields, defaults)
    changed = sorted(key for key in {*settings, *saved} if saved.get(key) != settings.get(key))
    if changed:
        values = ", ".join(f"{key}: {saved.get(key)!r} in the run, {settings.get(key)!r} given" for key in changed)
        raise ValueError(f"{settings_path}: settings {changed} differ from those given ({values}); "
                         f"resume with the same ones")
    check_checkpoint(os.path.join(out_dir, checkpoint_dir))
