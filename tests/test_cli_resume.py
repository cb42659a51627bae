"""`cifl train-seg` / `train-reg --resume`: an interrupted or SIGKILLed run, resumed, ends as one that ran through."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tensorflow as tf
from cifl_tf import cli, models
from conftest import REPO

TINY = {
    "train-seg": ["--nb-features", "4", "--nb-levels", "2", "--batch-size", "1", "--epochs", "4",
                  "--split", "2,1,1"],
    "train-reg": ["--nb-features", "4", "--nb-levels", "2", "--batch-size", "2", "--epochs", "4",
                  "--steps-per-epoch", "2", "--int-steps", "0", "--split", "3,0,1"],
}


class Interrupted(Exception):
    pass


class InterruptAtThirdEpoch(tf.keras.callbacks.Callback):
    """Stands in for the run's first callback and crashes the run once two epochs are checkpointed."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise Interrupted


def train(command, data, out, *extra):
    return cli.main([command, "--data", str(data), "--out", str(out), "--seed", "3", *TINY[command], *extra])


def assert_same_weights(run_a, run_b):
    a, b = models.load_model(str(run_a)).get_weights(), models.load_model(str(run_b)).get_weights()
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("command", sorted(TINY))
def test_a_crashed_run_resumes_to_the_weights_of_an_uninterrupted_one(command, oasis_tiny, tmp_path, monkeypatch,
                                                                     capsys):
    assert train(command, oasis_tiny, tmp_path / "through") == 0
    with monkeypatch.context() as patch:
        patch.setattr(cli, "StopOnNonFinite", InterruptAtThirdEpoch)
        with pytest.raises(Interrupted):
            train(command, oasis_tiny, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "model.keras").exists()
    monkeypatch.chdir(tmp_path)  # a job script resumes from elsewhere, the same folders spelt otherwise
    assert train(command, f"{oasis_tiny}/", "resumed", "--resume") == 0
    assert_same_weights(tmp_path / "through", tmp_path / "resumed")
    log = (tmp_path / "resumed" / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["0", "1", "2", "3"]  # each epoch logged once


def test_resume_refuses_other_settings_a_finished_run_and_a_missing_run(oasis_tiny, tmp_path, capsys):
    assert train("train-seg", oasis_tiny, tmp_path / "run") == 0
    capsys.readouterr()
    assert train("train-seg", oasis_tiny, tmp_path / "run", "--resume") == 2
    assert "model.keras: already exists, the run" in capsys.readouterr().err
    (tmp_path / "run" / "model.keras").unlink()
    assert train("train-seg", oasis_tiny, tmp_path / "run", "--resume", "--learning-rate", "0.5") == 2
    assert "settings ['learning_rate'] differ" in capsys.readouterr().err
    assert train("train-seg", oasis_tiny, tmp_path / "run") == 2
    assert "already holds a training run: pass --resume" in capsys.readouterr().err
    assert train("train-seg", oasis_tiny, tmp_path / "new", "--resume") == 2
    err = capsys.readouterr().err
    assert "settings.json: not found, so there is no run to resume" in err and len(err.splitlines()) == 1


class InterruptAtFirstEpoch(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        raise Interrupted


def test_resume_refuses_data_whose_subjects_have_changed(oasis_tiny, tmp_path, monkeypatch, capsys):
    """A subject added before the resume changed the split: the run went on training on subjects of its test part,
    and its subjects.json, kept from the start, hid that from evaluate."""
    with monkeypatch.context() as patch:
        patch.setattr(cli, "StopOnNonFinite", InterruptAtFirstEpoch)
        with pytest.raises(Interrupted):
            train("train-seg", oasis_tiny, tmp_path / "run")
    first = sorted(oasis_tiny.iterdir())[0]
    shutil.copytree(first, first.with_name(first.name.replace("MR1", "MR2")))
    capsys.readouterr()
    assert train("train-seg", oasis_tiny, tmp_path / "run", "--resume") == 2
    err = capsys.readouterr().err
    assert f"{oasis_tiny}: its subjects have changed since {tmp_path / 'run'} split them" in err and \
        len(err.splitlines()) == 1, err
    assert train("train-seg", oasis_tiny, tmp_path / "run", "--resume", "--learning-rate", "0.5") == 2
    assert "settings ['learning_rate'] differ" in capsys.readouterr().err  # the settings are checked first


@pytest.mark.parametrize("stored, same", [
    ({"train": ["/d/a", "/d/b"], "val": [], "test": ["/d/c"]}, True),
    ({"train": ["/d/b", "/d/a"], "val": [], "test": ["/d/c"]}, False),  # another order: other batches
    ({"train": ["/d/a"], "val": ["/d/b"], "test": ["/d/c"]}, False),
    ({"train": ["/d/./a", "/d/b"], "val": [], "test": ["/d/c"]}, True),  # the same files spelt otherwise
    ({"train": ["d/a", "d/b"], "val": [], "test": ["d/c"]}, True),  # relative paths of earlier versions
    ({"train": ["../d/a", "b"], "val": [], "test": ["c"]}, True),  # relative to a working folder now unknown
    ({"train": ["d/b", "d/a"], "val": [], "test": ["d/c"]}, False),
    ({"train": ["d/a", "d/b"], "val": [], "test": ["e/c"]}, False),
    ({"train": ["/d/a", "/d/b"], "test": ["/d/c"]}, False),  # a part missing
    ({"train": ["..", "/d/b"], "val": [], "test": ["/d/c"]}, False),
])
def test_a_split_is_compared_by_subject_and_by_real_path(stored, same):
    assert cli._same_split(stored, {"train": ["/d/a", "/d/b"], "val": [], "test": ["/d/c"]}) is same


def test_a_relative_subject_of_an_earlier_version_matches_a_linked_file_by_its_listed_path(tmp_path):
    """git-annex and DataLad files are links into .git/annex: their real path does not end in the listed one."""
    (tmp_path / "annex").mkdir()
    (tmp_path / "annex" / "KEY").write_text("")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.nii.gz").symlink_to(tmp_path / "annex" / "KEY")
    matches = cli._subject_matcher(["d/a.nii.gz"])
    assert matches(str(tmp_path / "d" / "a.nii.gz")) and not matches(str(tmp_path / "annex" / "b.nii.gz"))
    assert not cli._subject_matcher(["IXI002"])("IXI012")  # folder subjects are names, matched as they are


def test_a_relative_subject_through_a_linked_folder_matches_the_file_read(tmp_path):
    """Stored as given, `data/lists/../img/a.nii.gz` where data/lists links elsewhere named the file beside the
    link's target, which normpath's `data/img/a.nii.gz` misses."""
    (tmp_path / "proj" / "meta" / "lists").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lists").symlink_to(tmp_path / "proj" / "meta" / "lists")
    matches = cli._subject_matcher(["data/lists/../img/a.nii.gz"])
    assert matches(str(tmp_path / "proj" / "meta" / "img" / "a.nii.gz"))


def test_a_registration_run_of_an_earlier_version_resumes_only_with_the_velocity_field_it_was_built_with(
        oasis_tiny, tmp_path, monkeypatch, capsys):
    """Runs from before --svf-resolution built VxmDense's full-resolution field and wrote no svf_resolution; the
    default now is the integration's resolution, which their checkpoints do not fit."""
    integrated = ["--int-steps", "1", "--epochs", "1"]
    with monkeypatch.context() as patch:
        patch.setattr(cli, "StopOnNonFinite", InterruptAtFirstEpoch)
        with pytest.raises(Interrupted):
            train("train-reg", oasis_tiny, tmp_path / "run", *integrated)
    settings_file = tmp_path / "run" / "settings.json"
    settings = json.loads(settings_file.read_text())
    assert settings["svf_resolution"] == 2  # recorded as built, though not given
    del settings["svf_resolution"]
    settings_file.write_text(json.dumps(settings))
    capsys.readouterr()
    assert train("train-reg", oasis_tiny, tmp_path / "run", *integrated, "--resume") == 2
    assert "settings ['svf_resolution'] differ from those given (svf_resolution: 1 in the run, 2 given)" in \
        capsys.readouterr().err
    assert train("train-reg", oasis_tiny, tmp_path / "run", *integrated, "--svf-resolution", "1", "--resume") == 0
    model = models.load_model(str(tmp_path / "run"))
    assert model.get_layer(f"{model.name}_flow").output.shape[1:-1] == model.inshape  # the full-resolution field


# Longer runs for the kill test: EPOCHS epochs, so that there are many moments to kill, each epoch longer than the
# 0.3 s a kill may wait (train-reg's epochs of 20 steps took less once its field was predicted at half resolution).
EPOCHS = {"train-seg": 12, "train-reg": 6}
LONGER = {"train-seg": ["--epochs", "12"], "train-reg": ["--epochs", "6", "--steps-per-epoch", "60"]}


def cifl_process(command, data, out, resume=False):
    """A LONGER `cifl` training subprocess on the checkout's cifl_tf (Popen)."""
    argv = [sys.executable, "-m", "cifl_tf.cli", command, "--data", str(data), "--out", str(out), "--seed", "3",
            *TINY[command], *LONGER[command], *(["--resume"] if resume else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def checkpointed_epochs(out):
    """The finished epochs of the latest checkpoint in out/checkpoints (0: none)."""
    index = out / "checkpoints" / "checkpoint"
    return int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', index.read_text())[1]) if index.exists() else 0


def killed_and_resumed(command, data, out, kills, rng):
    """Runs `command` and SIGKILLs it `kills` times, each at a random moment after a random epoch end
    (mid-epoch or during a checkpoint save), resuming it each time; then lets it finish.

    Returns: (kills that hit a running process, restarts that resumed from an epoch checkpoint).
    """
    hits = from_checkpoint = 0
    for attempt in range(kills + 1):
        done = checkpointed_epochs(out)
        from_checkpoint += done > 0
        process = cifl_process(command, data, out, resume=(out / "settings.json").exists())
        if attempt < kills and done < EPOCHS[command] - 1:
            target = rng.randint(done + 1, EPOCHS[command] - 1)
            while checkpointed_epochs(out) < target and process.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                hits += 1
        _, err = process.communicate()
        if (out / "model.keras").exists():
            break
        assert attempt < kills, err.decode()
    return hits, from_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(TINY))
def test_a_run_killed_at_random_moments_resumes_to_the_weights_of_an_uninterrupted_one(command, oasis_tiny,
                                                                                      tmp_path):
    """Figures for the report: python -m pytest -m slow tests/test_cli_resume.py -s"""
    through = cifl_process(command, oasis_tiny, tmp_path / "through")
    assert through.wait() == 0, through.communicate()[1].decode()
    hits, from_checkpoint = killed_and_resumed(command, oasis_tiny, tmp_path / "killed", kills=3,
                                               rng=random.Random(command))
    print(f"{command}: {hits} SIGKILLs hit the run, {from_checkpoint} restarts resumed from a checkpoint")
    assert hits >= 2 and from_checkpoint >= 1  # a kill may also land after model.keras is written
    assert_same_weights(tmp_path / "through", tmp_path / "killed")


def test_a_diverging_run_stops_with_one_line_and_writes_no_model(oasis_tiny, tmp_path, capsys):
    status = train("train-seg", oasis_tiny, tmp_path / "run", "--learning-rate", "1e30")
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.match(r"cifl train-seg: error: training stopped: the loss is nan at step \d+ of epoch 1 ", err), err
    assert not (tmp_path / "run" / "model.keras").exists() and not (tmp_path / "run" / "checkpoints").exists()
