"""`cifl train-seg` / `train-reg --resume`: an interrupted or SIGKILLed run, resumed, ends as one that ran through."""
import os
import random
import re
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


@pytest.mark.parametrize("command", sorted(TINY))
def test_a_crashed_run_resumes_to_the_weights_of_an_uninterrupted_one(command, oasis_tiny, tmp_path, monkeypatch,
                                                                     capsys):
    assert train(command, oasis_tiny, tmp_path / "through") == 0
    with monkeypatch.context() as patch:
        patch.setattr(cli, "StopOnNonFinite", InterruptAtThirdEpoch)
        with pytest.raises(Interrupted):
            train(command, oasis_tiny, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "model.keras").exists()
    assert train(command, oasis_tiny, tmp_path / "resumed", "--resume") == 0
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


def killed_and_resumed(command, data, out, kills, rng):
    """Runs `command` in a subprocess, SIGKILLs it `kills` times at random moments, resumes it to the end.

    Returns the number of kills that hit a running process.
    """
    argv = [sys.executable, "-m", "cifl_tf.cli", command, "--data", str(data), "--out", str(out), "--seed", "3",
            *TINY[command]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    hits = 0
    for attempt in range(kills + 1):
        resume = ["--resume"] if (out / "settings.json").exists() else []
        process = subprocess.Popen(argv + resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < kills:
            try:
                process.wait(timeout=rng.uniform(4, 25))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                hits += 1
        _, err = process.communicate()
        if (out / "model.keras").exists():
            break
        assert attempt < kills, err.decode()
    return hits


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(TINY))
def test_a_run_killed_at_random_moments_resumes_to_the_weights_of_an_uninterrupted_one(command, oasis_tiny,
                                                                                      tmp_path):
    """Figures for the report: python -m pytest -m slow tests/test_cli_resume.py -s"""
    assert train(command, oasis_tiny, tmp_path / "through") == 0
    start = time.time()
    hits = killed_and_resumed(command, oasis_tiny, tmp_path / "killed", kills=4, rng=random.Random(command))
    print(f"{command}: {hits} SIGKILLs hit the run; killed and resumed in {time.time() - start:.0f} s")
    assert hits >= 2
    assert_same_weights(tmp_path / "through", tmp_path / "killed")


def test_a_diverging_run_stops_with_one_line_and_writes_no_model(oasis_tiny, tmp_path, capsys):
    status = train("train-seg", oasis_tiny, tmp_path / "run", "--learning-rate", "1e30")
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.match(r"cifl train-seg: error: training stopped: the loss is nan at step \d+ of epoch 1 ", err), err
    assert not (tmp_path / "run" / "model.keras").exists() and not (tmp_path / "run" / "checkpoints").exists()
