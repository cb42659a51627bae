"""`cifl train-encoder`: trains, resumes, and reports user errors as one line with exit status 2."""
import contextlib
import csv
import io
import json
import os
import pathlib
import random
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cifl_tf import CIFLEncoder, cli, load_encoder, save_encoder

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGE = np.random.default_rng(0).uniform(size=(1, 32, 32, 1)).astype(np.float32)


def epochs(run):
    with open(run / "log.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_trains_an_encoder(uninterrupted):
    run, printed, _ = uninterrupted
    assert str(run / "encoder.weights.h5") in printed
    config = load_encoder(str(run)).get_config()
    assert (config["channels"], config["features"], config["ndim"]) == (4, 8, 2)
    assert epochs(run) == [0, 1, 2]
    assert json.loads((run / "settings.json").read_text())["shape"] == [32, 32]


def test_resume_continues_an_unfinished_run_and_logs_an_epoch_logged_but_not_checkpointed_once(interrupted_run):
    run = interrupted_run()  # stopped after epoch 0 of 3; --resume takes the run's own settings
    with open(run / "log.csv", "a") as log:
        log.write("1,9.0\n")  # epoch 1 logged, then the run killed before its checkpoint was saved
    assert cli.main(["train-encoder", "--resume", "--out", str(run)]) == 0
    assert epochs(run) == [0, 1, 2] and (run / "result.json").is_file()


# INTERRUPTED_RUN's settings as options, with --steps-per-epoch as a user may give it (train_encoder stores at
# most --steps) and settings given at their defaults
SAME_SETTINGS = ["--dim", "2", "--shape", "32x32", "--steps", "3", "--steps-per-epoch", "1", "--batch-size", "2",
                 "--channels", "4", "--features", "8", "--max-offset", "0", "--seed", "1",
                 "--synth", '{"label_scales": [2, 4, 8]}', "--architecture", "paper", "--tau-gamma", "0.1"]


@pytest.mark.parametrize("repeated, saved_changes", [
    (SAME_SETTINGS, {}),
    (["--dim", "2"], {}),
    (["--steps", "3", "--steps-per-epoch", "5"], {"steps_per_epoch": 3}),  # a run of one epoch, as started
])
def test_resume_takes_options_that_repeat_the_runs_settings(interrupted_run, monkeypatch, repeated, saved_changes):
    run, trained = interrupted_run(), []
    settings = json.loads((run / "settings.json").read_text())
    (run / "settings.json").write_text(json.dumps(dict(settings, **saved_changes)))
    monkeypatch.setattr(cli, "train_encoder", lambda **settings: trained.append(settings))
    assert cli.main(["train-encoder", *repeated, "--resume", "--out", str(run)]) == 0
    saved = json.loads((run / "settings.json").read_text())
    assert trained == [dict(saved, out_dir=str(run), resume=True, strategy="default")]


@pytest.mark.parametrize("argv, named", [
    (["--steps", "9"], "--steps 9 differs from its steps 3"),
    (["--max-offset", "16"], "--max-offset 16 differs from its max_offset 0"),       # given at its default
    (["--seed", "1", "--channels", "5", "--no-bias"],
     "--channels 5 differs from its channels 4; --no-bias differs from its use_bias True"),
    (["--synth", '{"label_scales": [2, 4]}'], "--synth {'label_scales': [2, 4]} differs from its synth_kwargs"),
    (["--steps-per-epoch", "2"], "--steps-per-epoch 2 differs from its steps_per_epoch 1"),
    (["--steps-per-epoch", "5"], "--steps-per-epoch 5 differs from its steps_per_epoch 1"),  # above steps: as typed
    (["--dim", "3"], "--dim 3 differs from its shape [32, 32]"),
])
def test_resume_refuses_options_that_differ_from_the_runs_settings(interrupted_run, capsys, argv, named):
    run = interrupted_run()
    before = (run / "log.csv").read_text()
    assert cli.main(["train-encoder", *argv, "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"with its settings.json: {named}" in err and "leave those options out" in err
    assert (run / "log.csv").read_text() == before and not (run / "result.json").exists()


@pytest.mark.parametrize("shape", ["32x", "32", "32x32x32x32", "0x32", "axb"])
def test_bad_shape_is_an_argparse_error(shape, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-encoder", "--shape", shape, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--shape" in capsys.readouterr().err


@pytest.mark.parametrize("argv, shape", [(["--shape", "16x16x16"], [16, 16, 16]), (["--dim", "3"], [96, 96, 96]),
                                         ([], [96, 96])])
def test_the_dimension_is_that_of_the_shape(tmp_path, monkeypatch, argv, shape):
    trained = {}
    monkeypatch.setattr(cli, "train_encoder", lambda **settings: trained.update(settings))
    assert cli.main(["train-encoder", *argv, "--out", str(tmp_path / "run")]) == 0
    assert trained["shape"] == shape


def test_an_init_path_is_kept_absolute(tmp_path, monkeypatch):
    """As train-seg keeps --data and --encoder: a --resume from another folder finds the same encoder."""
    trained = {}
    monkeypatch.setattr(cli, "train_encoder", lambda **settings: trained.update(settings))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "first.weights.h5").touch()
    assert cli.main(["train-encoder", "--init", "first.weights.h5", "--out", "run"]) == 0
    assert trained["init"] == str(tmp_path / "first.weights.h5")
    # and once it is gone, as a run that has checkpointed needs it no more: --resume may still repeat the option
    assert cli.main(["train-encoder", "--init", "gone.weights.h5", "--out", "run3"]) == 0
    assert trained["init"] == str(tmp_path / "gone.weights.h5")
    (tmp_path / "tau_gamma_1").mkdir()  # a folder named as a shipped encoder: the name still means the shipped one
    assert cli.main(["train-encoder", "--init", "tau_gamma_1", "--out", "run2"]) == 0
    assert trained["init"] == "tau_gamma_1"


@pytest.mark.parametrize("argv, message", [
    (["--out", "{run}"], "already holds a training run"),                      # existing --out, no --resume
    (["--resume", "--out", "{empty}"], "settings.json"),                        # nothing to resume
    (["--shape", "32x32x32", "--dim", "2", "--out", "{empty}"], "does not have --dim 2 sizes"),
    (["--steps", "0", "--out", "{empty}"], "steps must be a positive integer, got 0"),
    (["--strategy", "multiworker", "--out", "{empty}"], "strategy 'multiworker' needs a cluster"),
    (["--synth", '{{"tie_prob": 2}}', "--out", "{empty}"], "tie_prob must be a number in [0, 1], got 2"),
    (["--synth", '{{"one_hot": true}}', "--out", "{empty}"], "ShapesSynth does not take ['one_hot']"),
    (["--synth", '{{"bias_std": "big"}}', "--out", "{empty}"], "bias_std must be a non-negative number, got 'big'"),
    (["--architecture", "paper", "--features", "0", "--out", "{empty}"], "features must be a positive integer"),
    (["--dilations", "2,4", "--out", "{empty}"], "architecture 'paper' takes none, got [2, 4]"),
    (["--local-normalization", "-1", "--out", "{empty}"], "local_normalization must be None or a positive sigma"),
    (["--pixel-contrast", "-1", "--out", "{empty}"], "pixel_contrast must be a non-negative number, got -1.0"),
    (["--tau-gamma", "0", "--out", "{empty}"], "tau_gamma must be a positive number, got 0.0"),
    (["--init", "nowhere", "--out", "{empty}"], "nowhere' is none of the shipped encoders (tau_gamma_1, "),
    (["--init", "tau_gamma_1", "--features", "8", "--out", "{empty}"],
     "init 'tau_gamma_1': its encoder differs from the run's in features 32 (the run's 8)"),
    (["--out", "{run}/settings.json"], "is not a folder"),
])
def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    for name in ("TF_CONFIG", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "settings.json").write_text("{}")
    argv = [a.format(run=tmp_path / "run", empty=tmp_path / "empty") for a in argv]
    assert cli.main(["train-encoder", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cifl train-encoder: error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "empty").exists()  # checked before anything is written


@pytest.mark.parametrize("synth", ["[1]", "{tie_prob: 1}"])
def test_synth_must_be_a_json_object(synth, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-encoder", "--synth", synth, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and "--synth" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--dilations", "--loss-scales"])
@pytest.mark.parametrize("values", ["2,x", "2,0", ""])
def test_integer_lists_must_be_positive_integers(option, values, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-encoder", "--architecture", "context", option, values, "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and option in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:precision mixed_bfloat16 on a CPU")  # the suite runs oneDNN off
def test_synth_arguments_reach_the_run_settings(tmp_path):
    argv = ["--shape", "32x32", "--steps", "1", "--batch-size", "1", "--channels", "2", "--features", "4",  # tiny
            "--max-offset", "4", "--architecture", "context", "--dilations", "2,4",
            "--inversion-invariant", "--local-normalization", "1.5", "--no-bias", "--learning-rate-decay", "cosine",
            "--loss-scales", "1,2", "--pixel-contrast", "0.3", "--precision", "mixed_bfloat16",
            "--synth", '{"tie_prob": 0.5, "label_scales": [4, 8]}',
            "--out", str(tmp_path / "run")]
    first = CIFLEncoder(channels=2, features=4, architecture="context", dilations=(2, 4),
                        inversion_invariant=True, local_normalization=1.5, use_bias=False)
    first(IMAGE)
    save_encoder(first, str(tmp_path / "first.weights.h5"))
    argv += ["--init", str(tmp_path / "first.weights.h5")]
    assert cli.main(["train-encoder", *argv]) == 0
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["synth_kwargs"] == {"tie_prob": 0.5, "label_scales": [4, 8]}
    assert settings["architecture"] == "context" and settings["dilations"] == [2, 4]
    assert settings["inversion_invariant"] is True and load_encoder(tmp_path / "run").inversion_invariant
    assert settings["init"] == str(tmp_path / "first.weights.h5")
    assert settings["local_normalization"] == 1.5 and load_encoder(tmp_path / "run").local_normalization == 1.5
    assert settings["use_bias"] is False and not load_encoder(tmp_path / "run").use_bias
    assert settings["learning_rate_decay"] == "cosine" and settings["loss_scales"] == [1, 2]
    assert settings["pixel_contrast"] == 0.3
    assert settings["precision"] == "mixed_bfloat16"


# ---- SIGKILL anywhere, then --resume: the same weights as a run that went through ----

KILLABLE = ["train-encoder", "--dim", "2", "--shape", "32x32", "--steps", "6", "--steps-per-epoch", "2",
            "--batch-size", "2", "--channels", "4", "--features", "8", "--max-offset", "4", "--seed", "3"]


def start_cifl(*argv):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "cifl_tf.cli", *argv], env=environ, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(process, ready, delay=0.0):
    """SIGKILLs `process` `delay` s after `ready()` holds (polled), unless it ended first."""
    while process.poll() is None and not ready():
        time.sleep(0.05)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()


def finish(run):
    """--resume until the run has its result.json; returns how many resumes it took."""
    for resumes in range(1, 4):
        process = start_cifl("train-encoder", "--resume", "--out", str(run))
        assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
        if (run / "result.json").is_file():
            return resumes
    raise AssertionError("the run did not finish")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A KILLABLE run that went through, in this process: (run folder, what it printed, its features of IMAGE)."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli.main([*KILLABLE, "--out", str(run)]) == 0
    return run, printed.getvalue(), load_encoder(str(run))(IMAGE).numpy()


@pytest.mark.integration
def test_killed_after_an_epoch_resumes_exactly(tmp_path, uninterrupted):
    run = tmp_path / "run"
    kill_when(start_cifl(*KILLABLE, "--out", str(run)), lambda: (run / "backup" / "checkpoint").is_file())
    # resumed in this process, which has imported TensorFlow already: one resume finishes the run
    assert cli.main(["train-encoder", "--resume", "--out", str(run)]) == 0 and (run / "result.json").is_file()
    assert set(epochs(run)) == {0, 1, 2}
    np.testing.assert_allclose(load_encoder(str(run))(IMAGE), uninterrupted[2], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(4))
def test_killed_at_random_points_resumes_exactly(tmp_path, uninterrupted, trial):
    """Up to three kills at random delays (also before anything is written, or while writing)."""
    rng, run = random.Random(trial), tmp_path / "run"
    for _ in range(3):
        argv = ["train-encoder", "--resume", "--out", str(run)] if (run / "settings.json").is_file() else \
            [*KILLABLE, "--out", str(run)]
        kill_when(start_cifl(*argv), lambda: True, delay=rng.uniform(0, 25))
        if (run / "result.json").is_file():
            break
    if not (run / "settings.json").is_file():
        assert cli.main([*KILLABLE, "--out", str(run)]) == 0
    elif not (run / "result.json").is_file():
        finish(run)
    np.testing.assert_allclose(load_encoder(str(run))(IMAGE), uninterrupted[2], atol=1e-5)


def documented_commands():
    """(file, line, arguments) of each whole `cifl train-encoder ...` command in README.md and docs/ (not a
    mention of the command or of one option), `--seed S` as `--seed 0`."""
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for found in re.finditer(r"`cifl train-encoder\s([^`]*)`", text):
            arguments = shlex.split(found.group(1).replace("--seed S", "--seed 0"))
            if len(arguments) > 2:
                yield path.relative_to(REPO).as_posix(), text.count("\n", 0, found.start()) + 1, arguments


@pytest.mark.parametrize("where, line, arguments", documented_commands())
def test_documented_commands_parse(where, line, arguments):
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            cli._parser().parse_args(["train-encoder", *arguments])
        except SystemExit:  # e.g. without the required --out
            pytest.fail(f"{where}:{line}: {err.getvalue().strip()}")
