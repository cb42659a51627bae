"""Resumable training: the stateless data order, the epoch checkpoint, the run folder's settings."""
import json
import math

import numpy as np
import pytest

import cifl_tf  # noqa: F401  (selects the Keras 2 API)
import tensorflow as tf
from cifl_tf import checkpoint, models

ITEMS = 7


def batches(first_epoch=0, count=6, batch_size=3, seed=0):
    """The first `count` index batches of epoch_batches over ITEMS items, as lists."""
    dataset = checkpoint.epoch_batches((np.arange(ITEMS), np.arange(ITEMS) * 10.0), batch_size, seed, first_epoch)
    out = []
    for indices, tens in dataset.take(count):
        np.testing.assert_array_equal(tens.numpy(), indices.numpy() * 10.0)  # the arrays stay paired
        out.append(indices.numpy().tolist())
    return out


def test_epoch_batches_cover_every_item_once_per_epoch_in_a_new_order():
    steps = math.ceil(ITEMS / 3)
    stream = batches(count=3 * steps)
    epochs = [sum(stream[e * steps:(e + 1) * steps], []) for e in range(3)]
    assert [len(batch) for batch in stream[:steps]] == [3, 3, 1]  # the remainder ends the epoch
    assert all(sorted(order) == list(range(ITEMS)) for order in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_epoch_batches_are_a_function_of_seed_and_epoch_only():
    steps = math.ceil(ITEMS / 3)
    assert batches(first_epoch=2, count=steps) == batches(count=3 * steps)[2 * steps:]
    assert batches(seed=1) != batches(seed=0) and batches(seed=1) == batches(seed=1)


def test_pair_batches_resume_at_a_step_with_the_same_pairs():
    images = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)

    def pairs(first_step, count):
        return [(m.numpy().ravel().tolist(), f.numpy().ravel().tolist())
                for ((m, f),) in models.pair_batches(images, 3, seed=4, first_step=first_step).take(count)]

    assert pairs(3, 2) == pairs(0, 5)[3:]
    with pytest.raises(ValueError, match="first_step must be a non-negative integer, got -1"):
        models.pair_batches(images, first_step=-1)


@pytest.mark.parametrize("arrays, batch_size, seed, first_epoch, error, message", [
    ((np.arange(3), np.arange(4)), 2, 0, 0, ValueError, r"one length, got lengths \[3, 4\]"),
    ((np.arange(0),), 2, 0, 0, ValueError, "non-empty"),
    ([np.arange(3)], 2, 0, 0, ValueError, "must be a tuple"),
    ((np.arange(3),), 0, 0, 0, ValueError, "batch_size must be an integer >= 1, got 0"),
    ((np.arange(3),), 2, 0, -1, ValueError, "first_epoch must be an integer >= 0, got -1"),
    ((np.arange(3),), 2, None, 0, TypeError, "seed must be an integer, got None"),
    ((np.arange(3),), 2, 2 ** 63, 0, ValueError, r"seed must be within \[-2\*\*63, 2\*\*63\), got 9223372036854775808"),
])
def test_epoch_batches_reject_bad_arguments(arrays, batch_size, seed, first_epoch, error, message):
    with pytest.raises(error, match=message):
        checkpoint.epoch_batches(arrays, batch_size, seed, first_epoch)


class Interrupt(Exception):
    pass


class InterruptAt(tf.keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupt


def tiny_run(folder, epochs, interrupt_at=None):
    """Fits a tiny regression model with EpochCheckpoint in `folder`, resuming what is there; its weights."""
    tf.keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    y = x @ np.array([[1.0], [-2.0], [0.5]], np.float32)
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(4, "relu"), tf.keras.layers.Dense(1)])
    model.compile(tf.keras.optimizers.Adam(0.05), "mse")
    saver = checkpoint.EpochCheckpoint(folder, model)
    first = saver.restore()
    callbacks = [saver] + ([] if interrupt_at is None else [InterruptAt(interrupt_at)])
    model.fit(checkpoint.epoch_batches((x, y), 4, seed=0, first_epoch=first), steps_per_epoch=3,
              initial_epoch=first, epochs=epochs, callbacks=callbacks, verbose=0)
    return first, model


def test_a_run_resumed_from_the_epoch_checkpoint_ends_as_one_that_ran_through(tmp_path):
    _, through = tiny_run(tmp_path / "through", epochs=4)
    with pytest.raises(Interrupt):
        tiny_run(tmp_path / "resumed", epochs=4, interrupt_at=2)
    first, resumed = tiny_run(tmp_path / "resumed", epochs=4)
    assert first == 2
    assert int(resumed.optimizer.iterations) == int(through.optimizer.iterations) == 12
    for a, b in zip(resumed.get_weights(), through.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    again, _ = tiny_run(tmp_path / "resumed", epochs=4)
    assert again == 4  # a finished run resumes with nothing left to do


def test_restore_without_a_checkpoint_starts_at_epoch_zero_and_needs_a_compiled_model(tmp_path):
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)], name="tiny")
    with pytest.raises(ValueError, match="compile 'tiny' first"):
        checkpoint.EpochCheckpoint(tmp_path / "none", model)
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match="max_to_keep must be a positive integer, got 0"):
        checkpoint.EpochCheckpoint(tmp_path / "none", model, max_to_keep=0)
    assert checkpoint.EpochCheckpoint(tmp_path / "none", model).restore() == 0
    assert checkpoint.EpochCheckpoint(tmp_path / "none", model, max_to_keep=np.int64(1)).restore() == 0


@pytest.mark.parametrize("widths", [(8, 1), (4, 1, 1)])  # weights of another shape, or a layer more
def test_restore_refuses_in_one_line_a_checkpoint_of_another_model(tmp_path, widths):
    tiny_run(tmp_path, epochs=1)
    model = tf.keras.Sequential([tf.keras.Input((3,))] + [tf.keras.layers.Dense(width) for width in widths])
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match=r"ckpt-1: holds another model than this run's, so it cannot resume \(was a "
                                         r"file it was built from, such as its encoder, replaced since\?\)") as error:
        checkpoint.EpochCheckpoint(tmp_path, model).restore()
    assert "\n" not in str(error.value) and len(str(error.value)) < 400


def prepare(run, settings, resume):
    checkpoint.prepare_run(run, settings, resume, finished_file="model.keras", checkpoint_dir="checkpoints")


def test_prepare_run_writes_settings_and_checks_them_on_resume(tmp_path):
    run = tmp_path / "run"
    prepare(run, {"seed": 0, "split": [2, 1, 1]}, resume=False)
    assert json.loads((run / "settings.json").read_text()) == {"seed": 0, "split": [2, 1, 1]}
    prepare(run, {"seed": 0, "split": [2, 1, 1]}, resume=True)
    with pytest.raises(FileExistsError, match="already holds a training run: pass --resume"):
        prepare(run, {"seed": 0}, resume=False)
    with pytest.raises(ValueError, match=r"settings \['seed', 'split'\] differ"):
        prepare(run, {"seed": 1}, resume=True)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        prepare(tmp_path / "other", {}, resume=True)
    (run / "model.keras").write_text("finished")
    with pytest.raises(FileExistsError, match="model.keras: already exists, the run .* has finished"):
        prepare(run, {"seed": 0, "split": [2, 1, 1]}, resume=True)


def test_a_new_run_refuses_a_folder_with_checkpoints_left_without_settings(tmp_path):
    # A user "starting over" by deleting settings.json and the log: the new run restored the old weights.
    run = tmp_path / "run"
    prepare(run, {}, resume=False)
    tf.train.CheckpointManager(tf.train.Checkpoint(step=tf.Variable(3)), str(run / "checkpoints"), 1).save()
    (run / "settings.json").unlink()
    with pytest.raises(FileExistsError, match=f"without its settings.json, .*: delete {run / 'checkpoints'}"):
        prepare(run, {}, resume=False)


FIELDS = {"seed": (lambda v: isinstance(v, int), "an integer")}


@pytest.mark.parametrize("content, fields, message", [
    ('[{"seed": 0}]', None, r"expected an object, got list"),
    ('{"seed": 0, "x": 1}', FIELDS, r"expected an object with the fields \['seed'\], got \['seed', 'x'\]"),
    ('{"seed": "0"}', FIELDS, r"seed must be an integer, got '0'"),
    ('{"seed": 0', None, "not valid JSON"),
])
def test_read_settings_names_the_file_and_the_problem(tmp_path, content, fields, message):
    (tmp_path / "settings.json").write_text(content)
    with pytest.raises(ValueError, match=r"settings\.json: " + message):
        checkpoint.read_settings(tmp_path, fields)


def test_read_settings_checks_the_fields(tmp_path):
    (tmp_path / "settings.json").write_text('{"seed": 3}')
    assert checkpoint.read_settings(tmp_path, FIELDS) == {"seed": 3} == checkpoint.read_settings(tmp_path)
