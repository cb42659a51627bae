"""`cifl demo`: the whole job end to end at smoke size, its outputs, and its one-line errors."""
import inspect
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import cifl_tf
from cifl_tf import cli, demo, demo_data, figures, machine
from cifl_tf.descriptors import MIND
from cifl_tf.encoder import load_encoder, pretrained_info, pretrained_log, save_encoder
from cifl_tf.evaluate import Scores
from conftest import config_without_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ["encoder_training.png", "figure2.png", "registrations.png", "segmentations.png"]
COLUMNS = ["baseline", "MIND", "CIFL (paper, tau_gamma=0.1)", "CIFL"]


@pytest.fixture
def baseline_and_cifl(monkeypatch):
    """The demo's methods cut to the baseline and the CIFL column (figure 2 shows its features): smoke runs
    stay short."""
    methods = demo.methods
    monkeypatch.setattr(demo, "methods", lambda encoder: {name: method for name, method in methods(encoder).items()
                                                          if name in ("baseline", "CIFL")})


def test_demo_compares_the_baseline_mind_the_papers_and_the_recommended_encoder():
    compared = demo.methods()
    assert list(compared) == COLUMNS
    assert compared["baseline"] is None and isinstance(compared["MIND"], MIND)
    for name, which in (("CIFL (paper, tau_gamma=0.1)", dict(tau_gamma=0.1)), ("CIFL", {})):
        shipped = cifl_tf.pretrained(**which)
        assert config_without_name(compared[name]) == config_without_name(shipped) and not compared[name].trainable
        for a, b in zip(compared[name].get_weights(), shipped.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_a_given_encoder_takes_the_cifl_column():
    encoder = cifl_tf.CIFLEncoder(channels=4, features=4)
    compared = demo.methods(encoder)
    assert list(compared) == COLUMNS and compared["CIFL"] is encoder


PAPER_LOG = {"CIFL (paper, tau_gamma=0.1), Eq. 1": pretrained_log(0.1)}


@pytest.mark.parametrize("given, folder, legend", [
    (False, None, "CIFL, Eq. 1 + 0.3 x pixel InfoNCE"),  # the shipped recommended encoder's log
    (True, "run", "CIFL, Eq. 1 + 0.5 x pixel InfoNCE"),
    (True, "alone", "CIFL, its loss"),  # a log without settings beside it
    (True, None, None),
], ids=["shipped", "given-with-log", "given-with-a-log-alone", "given-without-log"])
def test_training_curves_show_the_compared_encoders_that_have_a_log_naming_its_loss(tmp_path, given, folder,
                                                                                   legend):
    (tmp_path / "run").mkdir()
    settings = {**pretrained_info()["recommended_2d"]["settings"], "pixel_contrast": 0.5}
    (tmp_path / "run" / "settings.json").write_text(json.dumps(settings))
    encoder = cifl_tf.CIFLEncoder(channels=4, features=4) if given else None
    log = None if folder is None else str(tmp_path / folder / "log.csv")
    expected = {**PAPER_LOG, **({legend: log if given else pretrained_log()} if legend else {})}
    assert demo.training_logs(encoder, log) == expected


@pytest.mark.parametrize("settings, legend", [
    ({"loss_scales": [1, 2, 4], "pixel_contrast": 0}, "Eq. 1 averaged over scales 1,2,4"),
    ({"loss_scales": [1], "pixel_contrast": 0.3}, "Eq. 1 + 0.3 x pixel InfoNCE"),
    ({"loss_scales": [1, 2], "pixel_contrast": 0.5}, "Eq. 1 averaged over scales 1,2 + 0.5 x pixel InfoNCE"),
    ({}, "Eq. 1"),  # settings written before these options
])
def test_the_training_curves_legend_names_the_logged_loss(settings, legend):
    assert demo._logged_loss(settings) == legend


@pytest.mark.parametrize("log, message", [
    ("epoch,total_loss\n0,3\n", "not a training log with numeric columns epoch and loss (KeyError: 'loss')"),
    ("epoch,loss\n0,3\n1\n", "not a training log with numeric columns epoch and loss (TypeError"),  # truncated
    ("epoch,loss\n0,nan?\n", "not a training log with numeric columns epoch and loss (ValueError"),
])
def test_demo_refuses_a_bad_encoder_log_before_training(tmp_path, monkeypatch, log, message):
    (tmp_path / "log.csv").write_text(log)
    monkeypatch.setattr(demo, "_demo_subjects", lambda *a: pytest.fail("the demo started before reading the log"))
    with pytest.raises(ValueError, match=re.escape(message)):
        demo.run_demo(str(tmp_path / "out"), quick=True, encoder=cifl_tf.CIFLEncoder(channels=4, features=4),
                      encoder_log=str(tmp_path / "log.csv"))
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_seed_of_none_before_working(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "_demo_subjects", lambda *a: pytest.fail("the demo started before checking the seed"))
    with pytest.raises(ValueError, match="the demo needs an integer seed, got None"):
        demo.run_demo(str(tmp_path / "out"), quick=True, seed=None)
    assert not (tmp_path / "out").exists()


def test_a_demo_that_fails_while_training_leaves_no_folder(tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("stopped while training")

    subjects = (demo._sizes(True), types.SimpleNamespace(labels=[0, 0]), [0], [1])
    monkeypatch.setattr(demo, "_demo_subjects", lambda *a: subjects)
    monkeypatch.setattr(demo, "_segmentation_row", fail)
    with pytest.raises(RuntimeError, match="stopped while training"):
        demo.run_demo(str(tmp_path / "out"), quick=True)
    assert not (tmp_path / "out").exists()


def test_demo_results_are_written_with_numpy_values_and_only_then_the_folder_made(tmp_path):
    out = tmp_path / "new" / "out"
    demo.write_results(str(out), "a table", {"seed": np.int64(3), "dice": np.float32(0.5), "missing": float("nan"),
                                             "ok": np.bool_(True)})
    assert json.loads((out / "results.json").read_text()) == {"seed": 3, "dice": 0.5, "missing": None, "ok": True}
    assert (out / "table.md").read_text() == "```\na table\n```\n"


@pytest.mark.parametrize("encoder, log, message", [
    (cifl_tf.CIFLEncoder(channels=4, features=4, ndim=3), None, "needs a 2D encoder, got a 3D"),
    (MIND(ndim=3), None, "needs a 2D encoder, got a 3D"),
    (None, "run/log.csv", "but no encoder was given"),
    (cifl_tf.CIFLEncoder(channels=4, features=4), "missing/log.csv", "encoder_log 'missing/log.csv': no such file"),
], ids=["3d-encoder", "3d-descriptor", "log-without-encoder", "missing-log"])
def test_demo_refuses_a_3d_encoder_and_a_log_without_one(tmp_path, encoder, log, message):
    with pytest.raises(ValueError, match=message):
        demo.run_demo(str(tmp_path), quick=True, encoder=encoder, encoder_log=log)
    assert not any(tmp_path.iterdir())


@pytest.mark.integration
def test_quick_demo_with_an_encoder_run_writes_tables_results_and_figures(tmp_path, monkeypatch, capsys,
                                                                         tiny_networks, baseline_and_cifl):
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    save_encoder(cifl_tf.CIFLEncoder(channels=4, features=4), str(run / "encoder.weights.h5"))
    (run / "log.csv").write_text("epoch,loss\n0,3.0\n1,2.5\n")
    drawn = {}  # the first argument of each figure function below

    def recorded(draw):
        def record(first, *args, **kwargs):
            drawn[draw.__name__] = first
            return draw(first, *args, **kwargs)
        return record

    for name in ("feature_channels", "training_curves"):
        monkeypatch.setattr(figures, name, recorded(getattr(figures, name)))
    monkeypatch.setattr(machine, "matmul_gflops", lambda: 1.0)  # ~1 s of matmuls; the 3D demo's test reads the rate
    assert cli.main(["demo", "--quick", "--encoder", str(run), "--out", str(out)]) == 0
    assert config_without_name(drawn["feature_channels"]) == config_without_name(load_encoder(str(run)))
    assert drawn["training_curves"] == {**PAPER_LOG, "CIFL, its loss": str(run / "log.csv")}  # no settings.json
    printed = capsys.readouterr().out
    assert "Segmentation Dice (trained on T1)" in printed and "Registration Dice (trained on T1 pairs)" in printed
    assert "8 demo subjects (4 train, 4 test)" in printed
    assert re.fullmatch(rf"results and figures written to {re.escape(str(out))}/, \d+ s in all",
                        printed.splitlines()[-1])  # the wall time of the tables above, and of the figures
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES + ["results.json", "table.md"])
    results = json.loads((out / "results.json").read_text())
    assert (results["seed"], results["quick"], results["shipped_encoder"]) == (0, True, False)  # what was run
    assert list(results["segmentation"]) == list(results["registration"]) == ["baseline", "CIFL"]
    assert list(results["segmentation"]["baseline"]) == ["t1", "t1_inverted", "t2", "pd"]
    assert list(results["registration"]["baseline"]) == ["t1->t1", "t1->t1_inverted", "t1->t2", "t1->pd"]


def test_demo_without_nilearn_is_one_line_saying_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # as if nilearn were not installed
    demo_data._template.cache_clear()  # an earlier test may have read the template already
    monkeypatch.setattr(demo, "methods", lambda encoder: {"baseline": None})
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install nilearn" in err


@pytest.mark.parametrize("argv, restarts", [
    (["demo", "--quick"], True),
    (["register", "--moving", "a.nii", "--fixed", "b.nii", "--moved", "c.nii"], True),
    (["train-encoder", "--out", "run"], False),  # a trainer keeps TensorFlow's choice (machine.onednn_enabled)
])
def test_only_the_console_commands_that_resume_nothing_restart(monkeypatch, argv, restarts):
    class Restarted(Exception):
        pass

    def restart(name, arguments):
        # -P: the restarted process imports the cifl_tf this one did, not one in the working folder
        assert name == f"cifl {argv[0]}" and arguments == ["-P", "-m", "cifl_tf.cli", *argv]
        raise Restarted

    monkeypatch.setattr(sys, "argv", ["cifl", *argv])
    monkeypatch.setattr(machine, "relaunch_with_onednn", restart)
    monkeypatch.setattr(cli, "_train_encoder", lambda args: None)
    if restarts:
        with pytest.raises(Restarted):
            cli.main()
    else:
        assert cli.main() == 0


@pytest.mark.skipif(shutil.which("cifl") is None, reason="the cifl console script is not installed")
def test_the_cifl_command_restarts_the_demo_where_tensorflow_leaves_onednn_off(tmp_path):
    """Also the test of the `cifl` console script itself, as a user runs it: without TF_ENABLE_ONEDNN_OPTS (which
    conftest sets for the tests' own process)."""
    save_encoder(cifl_tf.CIFLEncoder(channels=3, features=4, ndim=3), str(tmp_path / "enc.weights.h5"))
    environ = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    # TensorFlow's own choice on this CPU, in a process that has not set the variable either
    tensorflow_choice = subprocess.run([sys.executable, "-c", "from cifl_tf import machine; "
                                        "print(machine.onednn_enabled())"], env=environ, capture_output=True,
                                       text=True, check=True).stdout.split()[-1]
    # a 3D encoder stops the 2D demo with a one-line error at once (in the restarted process, if it restarts)
    result = subprocess.run(["cifl", "demo", "--quick", "--encoder", str(tmp_path / "enc.weights.h5"),
                             "--out", str(tmp_path / "out")], env=environ, capture_output=True, text=True)
    assert result.returncode == 2 and "the 2D demo needs a 2D encoder" in result.stderr
    restarts = tensorflow_choice == "False"
    assert ("restarting with TensorFlow's oneDNN kernels on" in result.stderr) == restarts


@pytest.mark.integration
def test_segmentation_seeds_trains_one_row_per_seed_on_the_same_subjects(tiny_networks, monkeypatch):
    # The CIFL column alone: a baseline column's rows would go through the same seeding in segmentation_row, which
    # CIFL's can also break through their encoder. The next test keeps several methods' rows apart.
    methods = demo.methods
    monkeypatch.setattr(demo, "methods", lambda encoder: {"CIFL": methods(encoder)["CIFL"]})
    drawn, dataset = [], demo_data.demo_dataset
    monkeypatch.setattr(demo_data, "demo_dataset", lambda **kwargs: drawn.append(kwargs) or dataset(**kwargs))
    encoder = cifl_tf.CIFLEncoder(channels=4, features=4)  # built in the first row, before its seed is set
    spread = demo.segmentation_seeds(np.array([0, 1, 0]), encoder=encoder, quick=True, data_seed=2)
    assert drawn == [dict(n_subjects=8, seed=2)]  # one dataset, of the data seed, for every model seed
    assert list(spread) == ["CIFL"] and list(spread["CIFL"]) == list(demo_data.CONTRASTS)
    for dice in spread["CIFL"].values():
        assert dice.shape == (3,) and np.all((dice >= 0) & (dice <= 1))
        assert dice[0] == dice[2]  # a seed trains the same UNet in the same batch order
    # Seeds 0 and 1 initialise differently: some Dice differ.
    assert any(dice[0] != dice[1] for dice in spread["CIFL"].values())


def test_segmentation_seeds_keeps_each_methods_dice_per_seed_and_contrast(monkeypatch):
    def dice(name, seed, contrast):
        return ["baseline", "MIND"].index(name) + seed / 10 + demo_data.CONTRASTS.index(contrast) / 100

    def row(train, tests, methods, seed, **kwargs):  # a Dice of the method, seed and contrast instead of training
        return {name: {c: Scores([1], np.full((1, 1), dice(name, seed, c)), np.full(1, dice(name, seed, c)))
                       for c in tests} for name in methods}, {}

    monkeypatch.setattr(demo.experiments, "segmentation_row", row)
    monkeypatch.setattr(demo, "methods", lambda encoder: {"baseline": None, "MIND": None})
    spread = demo.segmentation_seeds([3, 5], quick=True)
    assert list(spread) == ["baseline", "MIND"]
    for name, tests in spread.items():
        assert list(tests) == list(demo_data.CONTRASTS)
        for contrast, values in tests.items():
            assert values.tolist() == [dice(name, seed, contrast) for seed in (3, 5)]


def test_segmentation_seeds_trains_on_the_given_contrast(monkeypatch):
    calls = []

    def row(train, tests, **kwargs):  # records the data instead of training
        calls.append((train, tests))
        scores = {c: Scores([1, 2, 3], np.full((len(x), 3), 0.5), np.full(len(x), 0.5)) for c, (x, _) in tests.items()}
        return {name: scores for name in kwargs["methods"]}, {}

    monkeypatch.setattr(demo.experiments, "segmentation_row", row)
    monkeypatch.setattr(demo, "methods", lambda encoder: {"baseline": None})
    demo.segmentation_seeds([0], quick=True, train_contrast="pd")
    data = demo_data.demo_dataset(n_subjects=8, seed=0)
    (images, labels), tests = calls[0]
    np.testing.assert_array_equal(images, data.inputs("pd")[:4])  # the training half, in PD
    np.testing.assert_array_equal(labels, data.labels[:4])
    assert list(tests) == list(demo_data.CONTRASTS)  # the test half, in every contrast
    for contrast, (test_images, test_labels) in tests.items():
        np.testing.assert_array_equal(test_images, data.inputs(contrast)[4:])
        np.testing.assert_array_equal(test_labels, data.labels[4:])


@pytest.mark.parametrize("seeds, encoder, message, epochs", [
    ([], None, "seeds must be one or more integers in [0, 2**32), got []", None),
    ([0, 1.5], None, "seeds must be one or more integers in [0, 2**32), got [0, 1.5]", None),
    ([0, -1], None, "seeds must be one or more integers in [0, 2**32), got [0, -1]", None),
    (3, None, "seeds must be one or more integers in [0, 2**32), got 3", None),
    ("0,1", None, "seeds must be one or more integers in [0, 2**32), got '0,1'", None),
    ([0], cifl_tf.CIFLEncoder(channels=4, features=4, ndim=3), "needs a 2D encoder, got a 3D", None),
    ([0], None, "epochs must be an integer >= 1, got 0", 0),
    ([0], None, "epochs must be an integer >= 1, got 2.0", 2.0),
])
def test_segmentation_seeds_refuses(seeds, encoder, message, epochs):
    with pytest.raises(ValueError, match=re.escape(message)):
        demo.segmentation_seeds(seeds, encoder=encoder, quick=True, epochs=epochs)


@pytest.mark.parametrize("contrast", ["T1", "t3", None])
def test_segmentation_seeds_refuses_an_unknown_training_contrast(contrast):
    message = f"train_contrast must be one of t1, t1_inverted, t2, pd, got {contrast!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        demo.segmentation_seeds([0], quick=True, train_contrast=contrast)


def test_seeds_table_gives_mean_sd_and_the_lowest_dice():
    spread = {"baseline": {c: np.array([0.7, 0.8, 0.9]) for c in demo_data.CONTRASTS},
              "CIFL": {c: np.array([0.5, 0.5, 0.2]) for c in demo_data.CONTRASTS}}
    lines = demo.seeds_table(spread, [0, 1, 2]).splitlines()
    assert lines[0].startswith("Segmentation Dice (trained on T1), mean ± SD over model seeds 0, 1, 2")
    assert lines[2] == "| method | T1 | inverted T1 | T2-like | PD-like |"
    assert lines[4] == "| baseline |" + " 0.800 ± 0.082 [0.700] |" * 4
    assert lines[5] == "| CIFL |" + " 0.400 ± 0.141 [0.200] |" * 4
    assert demo.seeds_table(spread, [0], "pd").startswith("Segmentation Dice (trained on PD-like), mean ± SD")


def test_seeds_command_writes_the_table_and_each_seeds_dice(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_encoder(cifl_tf.CIFLEncoder(channels=4, features=4), str(run / "encoder.weights.h5"))
    # segmentation_seeds trains for real in the test above; here, what the command asks of it and writes
    calls, seeds = [], demo.segmentation_seeds
    rng = np.random.default_rng(0)
    spread = {name: {c: rng.uniform(0, 1, 2) for c in demo_data.CONTRASTS} for name in ("baseline", "CIFL")}

    def recorded(*args, **kwargs):  # every argument by name, as segmentation_seeds must take them
        call = inspect.signature(seeds).bind(*args, **kwargs)
        call.apply_defaults()
        calls.append(call.arguments)
        return spread

    monkeypatch.setattr(demo, "segmentation_seeds", recorded)
    assert demo.seeds_main(["--quick", "--seeds", "3,4", "--encoder", str(run), "--train-contrast", "t2",
                            "--out", str(tmp_path / "out")]) is spread
    (call,) = calls
    assert {k: call[k] for k in ("seeds", "quick", "epochs", "data_seed", "train_contrast")} == dict(
        seeds=[3, 4], quick=True, epochs=1, data_seed=0, train_contrast="t2")
    assert config_without_name(call["encoder"]) == config_without_name(load_encoder(str(run)))
    table = (tmp_path / "out" / "downstream_seeds.md").read_text()
    assert table == demo.seeds_table(spread, [3, 4], "t2") + "\n" and table in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "downstream_seeds.json").read_text())
    assert {k: saved[k] for k in ("seeds", "encoder", "epochs", "quick", "data_seed", "train_contrast")} == dict(
        seeds=[3, 4], encoder=str(run), epochs=1, quick=True, data_seed=0, train_contrast="t2")  # quick: 1 epoch
    assert saved["dice"] == {name: {c: v.tolist() for c, v in tests.items()} for name, tests in spread.items()}


def test_the_downstream_script_restarts_as_the_demo_does(monkeypatch):
    script = os.path.join(ROOT, "experiments", "downstream.py")
    monkeypatch.setattr(sys, "argv", [script, "--seeds", "1"])
    monkeypatch.setattr(machine, "relaunch_with_onednn", lambda *args: calls.append(args) or sys.exit(0))
    calls = []
    with pytest.raises(SystemExit):
        runpy.run_path(script, run_name="__main__")
    assert calls == [("downstream.py", [script, "--seeds", "1"])]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,a"], "--seeds must be integers separated by commas, got '0,a'"),
    (["--seeds", "0,-1"], "--seeds must each be an integer in [0, 2**32), got '0,-1'"),  # the option's name
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--encoder", "{tmp}/none"], "{tmp}/none"),
    (["--encoder", "{tmp}"], "{tmp}/encoder.weights.h5"),  # a folder without an encoder
    (["--encoder", "{tmp}/3d.weights.h5"], "--encoder {tmp}/3d.weights.h5: the demo's segmentation row needs a 2D "
                                           "encoder, got a 3D CIFLEncoder"),
    (["--out", "{tmp}/3d.weights.h5"], "is not a folder"),
])
def test_downstream_script_reports_bad_arguments_in_one_line(tmp_path, monkeypatch, capsys, argv, message):
    save_encoder(cifl_tf.CIFLEncoder(channels=4, features=4, ndim=3), str(tmp_path / "3d.weights.h5"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = ["--out", str(tmp_path / "out")] if "--out" not in argv else []
    script = os.path.join(ROOT, "experiments", "downstream.py")
    monkeypatch.setattr(sys, "argv", [script, *argv, *out])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(script, run_name="__main__")
    error = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(error) == 1
    assert error[0].startswith("downstream.py: error: ") and message.format(tmp=tmp_path) in error[0]
    assert not (tmp_path / "out").exists()
