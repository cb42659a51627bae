"""Table 1 experiments: the compared methods, each row's data, the row runners, outputs and scripts."""
import csv
import json
import os
import runpy
import sys
import types

import numpy as np
import pytest

import cifl_tf
from cifl_tf import experiments
from cifl_tf.descriptors import MIND
from conftest import make_ixi, make_oasis, write_nifti

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(channels=4, features=4)


def test_methods_are_the_baseline_mind_and_the_frozen_shipped_encoders():
    compared = experiments.methods()
    assert list(compared) == ["baseline", "MIND", "tau_gamma=1", "tau_gamma=0.1", "tau_gamma=0.01"]
    assert compared["baseline"] is None
    assert isinstance(compared["MIND"], MIND) and compared["MIND"].variant == "mind"
    for tau in cifl_tf.encoder.PRETRAINED_TAU_GAMMAS:
        encoder = compared[experiments.method_name(tau)]
        assert not encoder.trainable
        expected = cifl_tf.pretrained(tau).get_weights()
        for got, want in zip(encoder.get_weights(), expected):
            np.testing.assert_array_equal(got, want)


def test_methods_trained_here_use_the_shipped_recipe(tmp_path):
    compared = experiments.methods(tau_gammas=(1.0,), train_steps=1, out_dir=tmp_path, verbose=0)
    assert list(compared) == ["baseline", "MIND", "tau_gamma=1"] and not compared["tau_gamma=1"].trainable
    with open(tmp_path / "encoder_tau_gamma=1" / "settings.json") as f:
        settings = json.load(f)
    recipe = cifl_tf.encoder.pretrained_info()["1"]["settings"]
    # fields that train_encoder gained after the recipe was trained take the values the recipe used
    assert settings == {**cifl_tf.training.SETTING_DEFAULTS, **recipe, "steps": 1, "steps_per_epoch": 1}


def test_methods_read_the_encoders_an_earlier_row_trained_into_the_same_folder(tmp_path, monkeypatch):
    recipe = cifl_tf.encoder.pretrained_info()["1"]
    tiny = {**recipe["settings"], "shape": [32, 32], "batch_size": 1, **TINY, "steps_per_epoch": 2}
    monkeypatch.setattr(experiments, "pretrained_info", lambda: {"1": {**recipe, "settings": tiny}})
    first = experiments.methods(tau_gammas=(1.0,), train_steps=2, out_dir=tmp_path, verbose=0)["tau_gamma=1"]
    result = tmp_path / "encoder_tau_gamma=1" / "result.json"
    written = result.stat().st_mtime_ns
    again = experiments.methods(tau_gammas=(1.0,), train_steps=2, out_dir=tmp_path, verbose=0)["tau_gamma=1"]
    assert result.stat().st_mtime_ns == written and not again.trainable  # read, not trained again
    for a, b in zip(first.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="holds the encoder tau_gamma=1 trained with other steps; choose another"):
        experiments.methods(tau_gammas=(1.0,), train_steps=4, out_dir=tmp_path, verbose=0)
    settings = tmp_path / "encoder_tau_gamma=1" / "settings.json"  # a setting the recipe leaves at its default
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "pixel_contrast": 0.3}))
    with pytest.raises(ValueError, match="trained with other pixel_contrast; choose another"):
        experiments.methods(tau_gammas=(1.0,), train_steps=2, out_dir=tmp_path, verbose=0)


@pytest.mark.parametrize("steps, steps_per_epoch", [
    (3, 3),  # not a multiple of the recipe's 2 steps per epoch: one epoch (as --encoder-steps 250 with 200)
    (4, 2),  # a multiple: the recipe's epochs
])
def test_methods_train_encoders_for_any_number_of_steps(tmp_path, monkeypatch, steps, steps_per_epoch):
    recipe = cifl_tf.encoder.pretrained_info()["1"]
    tiny = {**recipe["settings"], "shape": [32, 32], "batch_size": 1, **TINY, "steps_per_epoch": 2}
    monkeypatch.setattr(experiments, "pretrained_info", lambda: {"1": {**recipe, "settings": tiny}})
    experiments.methods(tau_gammas=(1.0,), train_steps=steps, out_dir=tmp_path, verbose=0)
    run = tmp_path / "encoder_tau_gamma=1"
    settings = json.loads((run / "settings.json").read_text())
    assert settings == {**cifl_tf.training.SETTING_DEFAULTS, **tiny, "steps": steps, "steps_per_epoch": steps_per_epoch}
    assert len((run / "log.csv").read_text().splitlines()) == 1 + steps // steps_per_epoch


@pytest.mark.parametrize("row, unseen", [("seg_inverted_oasis", "t1_inverted"), ("reg_ixi_t1_t2", "t2")])
def test_row_data_on_demo_subjects(row, unseen):
    train, tests, names = experiments.row_data(row, subjects=4)
    assert list(tests) == ["t1", unseen]
    subjects = list(cifl_tf.demo_data.demo_dataset(n_subjects=4).subjects[2:])  # the second half: the test subjects
    if row.startswith("seg"):
        assert names == subjects
        assert train[0].shape == train[1].shape == (2, 160, 192)
        assert all(images.shape == labels.shape == (2, 160, 192) for images, labels in tests.values())
        return
    assert train.shape == (2, 160, 192)
    assert names == [f"{subjects[0]} -> {subjects[1]}", f"{subjects[1]} -> {subjects[0]}"]
    moving, fixed, moving_labels, fixed_labels = tests[unseen]
    t1_moving, t1_fixed = tests["t1"][:2]
    np.testing.assert_array_equal(moving, t1_moving)  # both tests move the same T1 images
    assert not np.array_equal(moving_labels, fixed_labels)  # onto other subjects
    assert not np.array_equal(fixed, t1_fixed)  # in the unseen contrast


def test_row_data_from_an_oasis_folder_splits_subjects_and_inverts(tmp_path):
    make_oasis(tmp_path / "oasis", subjects=5)
    train, tests, names = experiments.row_data("seg_inverted_oasis", tmp_path / "oasis", split=(2, 1, 2))
    assert train[0].shape == (2, 16, 20) and tests["t1"][0].shape == (2, 16, 20)
    _, _, test = cifl_tf.data.load_oasis(tmp_path / "oasis", dim=2).split((2, 1, 2))
    assert names == list(test.subjects) and len(set(names)) == 2
    t1, inverted = tests["t1"][0], tests["t1_inverted"][0]
    brain = t1 > 0
    np.testing.assert_allclose(inverted[brain], (t1.max(axis=(1, 2), keepdims=True) - t1)[brain] /
                               (t1.max(axis=(1, 2), keepdims=True) - t1.min(axis=(1, 2), keepdims=True))[
                                   np.nonzero(brain)[0]][:, 0, 0], atol=1e-5)
    assert not np.isin(train[0], t1).all()  # held-out subjects


def test_row_data_refuses_label_maps_of_background_only(tmp_path):
    for subject in make_ixi(tmp_path / "ixi", subjects=3, shape=(16, 20)):
        write_nifti(tmp_path / "ixi" / subject / "labels.nii.gz", np.zeros((16, 20), np.uint8))
    with pytest.raises(ValueError, match=r"ixi: every label map is background \(0\) only"):
        experiments.row_data("reg_ixi_t1_t2", tmp_path / "ixi", split="all")


def test_row_data_from_an_ixi_folder_pairs_t1_with_t2(tmp_path):
    make_ixi(tmp_path / "ixi", subjects=3, shape=(16, 20))
    train, tests, _ = experiments.row_data("reg_ixi_t1_t2", tmp_path / "ixi", split="all")
    assert train.shape == (3, 16, 20) and list(tests) == ["t1", "t2"]
    assert tests["t2"][0].shape == tests["t2"][1].shape == (3, 16, 20)


@pytest.mark.parametrize("row, split, message", [
    ("reg_oasis_t1_inverted", (2, 1, 1), "registration needs at least 2 test subjects"),
    ("reg_oasis_t1_inverted", (1, 0, 3), "registration needs at least 2 training subjects to pair, the split "
                                         r"\(1, 0, 3\) leaves 1"),  # found before the encoders train
    ("seg_inverted_oasis", (0, 0, 4), r"leaves 0 for training and 4 for testing; give --split all \(split='all'\)"),
    ("seg_inverted_oasis", (3, 3, 3), r"--split 3,3,3 needs 9 subjects, .*oasis holds 4"),  # the option, not Python's
    ("no_such_row", None, "row must be one of"),
    ("seg_inverted_oasis", None, r"the paper's subject split \(232, 58, 100\) needs 390 subjects, the data hold 4: "
                                 r"give a split \(--split\)"),
])
def test_row_data_rejects(oasis_tiny, row, split, message):
    with pytest.raises(ValueError, match=message):
        experiments.row_data(row, oasis_tiny, split=split)


@pytest.mark.parametrize("row, subjects", [("reg_oasis_t1_inverted", 3), ("reg_oasis_t1_inverted", 2),
                                           ("seg_inverted_oasis", 1), ("seg_inverted_oasis", 2.0)])
def test_row_data_refuses_too_few_demo_subjects(row, subjects):
    """Two gave the pair of a subject with itself, one an empty training set."""
    least = 4 if row.startswith("reg") else 2
    with pytest.raises(ValueError, match=rf"subjects must be an integer >= {least} for the .* row {row} \(half "
                                         rf"train, half test\), got {subjects!r}"):
        experiments.row_data(row, subjects=subjects)


def test_a_segmentation_row_has_a_class_for_each_label_of_the_test_maps_too(monkeypatch):
    classes = []
    monkeypatch.setattr(experiments, "segmentation_row", lambda *args, nb_labels, **kwargs: classes.append(nb_labels))
    labels = np.zeros((2, 4, 4), np.int32)
    experiments.run_row("seg_inverted_oasis", {}, ((None, labels + 2), {"t1": (None, labels + 4)}, []))
    assert classes == [5]


def test_rows_stop_in_one_line_without_nilearn_or_with_a_damaged_row_file(tmp_path, monkeypatch, capsys):
    def no_nilearn(*args):
        raise ModuleNotFoundError("No module named 'nilearn'")

    monkeypatch.setattr(experiments, "row_data", no_nilearn)
    for damaged in (False, True):
        if damaged:  # as a run killed while writing it once left it
            (tmp_path / "out").mkdir()
            (tmp_path / "out" / "seg_inverted_oasis.json").write_text('{"row": "seg_in')
        with pytest.raises(SystemExit) as exited:
            experiments.main(["seg_inverted_oasis"], ["--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1, err
        assert (f"{tmp_path / 'out' / 'seg_inverted_oasis.json'}: not valid JSON" if damaged else
                "No module named 'nilearn'") in err


def test_defaults_script_checks_the_vxm_options_against_the_data_before_training(tmp_path, monkeypatch, capsys):
    images = types.SimpleNamespace(images=np.zeros((3, 48, 64), np.float32), labels=np.zeros((3, 48, 64), np.int32))
    monkeypatch.setattr(experiments, "defaults_data", lambda folder: (images, images, (None,) * 4))
    monkeypatch.setattr(experiments, "pair_batches", _no_work)
    with pytest.raises(SystemExit) as exited:
        experiments.defaults_main(["--data", str(tmp_path / "data"), "--int-resolution", "3",
                                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "field comes back at (48, 63), not at the (48, 64)" in err


def test_row_data_rejects_a_split_of_the_demo_data():
    with pytest.raises(ValueError, match=r"split \(1, 0, 1\) needs a data folder"):
        experiments.row_data("seg_inverted_oasis", None, split=(1, 0, 1), subjects=2)


def tiny_methods():
    return {"baseline": None, "cifl": cifl_tf.CIFLEncoder(**TINY, trainable=False)}


def phantoms(count, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (count, 2, 2)).repeat(16, axis=1).repeat(16, axis=2).astype(np.int32)
    return np.clip(labels / 2 + rng.normal(0, 0.05, labels.shape), 0, 1).astype(np.float32), labels  # as normalised


def test_the_module_example_runs_and_scores_every_method_on_every_contrast(capsys):
    example = "\n".join(line[4:] for line in experiments.__doc__.splitlines() if line.startswith("    "))
    rows = []  # what segmentation_row returned to the example

    def segmentation_row(*args, **kwargs):
        rows.append(experiments.segmentation_row(*args, epochs=1, verbose=0, nb_features=4, nb_levels=2, **kwargs))
        return rows[-1]

    tiny = types.SimpleNamespace(methods=tiny_methods, markdown_table=experiments.markdown_table,
                                 segmentation_row=segmentation_row)
    test = phantoms(2, 1)
    tests = {"t1": test, "t1_inverted": (1 - test[0], test[1])}
    exec(example, {"experiments": tiny, "train": phantoms(4, 0), "tests": tests})
    assert "| Segmentation | 2D | Inverted OASIS T1 | " in capsys.readouterr().out
    (results, models), = rows
    assert list(results) == list(models) == ["baseline", "cifl"]
    for scores in results.values():
        assert list(scores) == ["t1", "t1_inverted"]
        assert all(s.dice.shape == (2, 4) for s in scores.values())  # 2 test images, labels 1-4 of the example's 5


def test_cross_subject_pairs_moves_each_image_onto_the_next_subject():
    moving, fixed = np.arange(3), np.arange(3) + 10
    assert [a.tolist() for a in experiments.cross_subject_pairs(moving, fixed, moving, fixed)] == \
        [[0, 1, 2], [11, 12, 10], [0, 1, 2], [11, 12, 10]]


@pytest.fixture
def row_results():
    scores = cifl_tf.evaluate.Scores([1, 2], np.array([[0.8, 0.6], [0.9, 0.9]]), np.array([0.7, 0.9]))
    return {"baseline": {"t1": scores, "t1_inverted": scores}, "tau_gamma=0.1": {"t1": scores, "t1_inverted": scores}}


def test_row_outputs_json_csv_and_text(tmp_path, row_results):
    experiments.save_row(tmp_path, "seg_inverted_oasis", row_results, ["OAS1_0002", "OAS1_0007"])
    saved = json.loads((tmp_path / "seg_inverted_oasis.json").read_text())
    assert saved["results"]["baseline"]["t1_inverted"]["per_image_dice"] == [0.7, 0.9]
    assert saved["images"] == ["OAS1_0002", "OAS1_0007"]
    assert saved["results"]["baseline"]["t1_inverted"]["dice"] == pytest.approx([0.8, 0.1])
    with open(tmp_path / "seg_inverted_oasis.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["method", "test", "image", "subjects", "dice"] and len(rows) == 1 + 2 * 2 * 2
    assert rows[1] == ["baseline", "t1", "0", "OAS1_0002", "0.7000"]
    assert rows[2] == ["baseline", "t1", "1", "OAS1_0007", "0.9000"]
    with pytest.raises(ValueError, match="save_row: 1 names for the 2 images of baseline on t1"):
        experiments.save_row(tmp_path, "seg_inverted_oasis", row_results, ["OAS1_0002"])
    assert experiments.row_text("seg_inverted_oasis", row_results) == \
        "Inverted OASIS T1 (t1_inverted): baseline 0.80 ± 0.10, tau_gamma=0.1 0.80 ± 0.10"


def test_markdown_table_puts_the_paper_under_each_row(row_results):
    row_results = {**row_results, "MIND": row_results["baseline"]}  # a method the paper does not report
    lines = experiments.markdown_table({"seg_inverted_oasis": row_results}).splitlines()
    assert lines[0] == "| Task | Dimension | Dataset | baseline | tau_gamma=0.1 | MIND |"
    assert lines[2] == "| Segmentation | 2D | Inverted OASIS T1 | 0.80 ± 0.10 | 0.80 ± 0.10 | 0.80 ± 0.10 |"
    assert lines[3] == "| | | *paper* | *0.18 ± 0.01* | *0.83 ± 0.04* |  |"


def test_experiment_script_runs_a_quick_row_on_a_data_folder(tmp_path, monkeypatch, capsys, tiny_networks):
    make_oasis(tmp_path / "oasis", subjects=3, volume_shape=(32, 32, 4))
    # The script itself, run as __main__ in this process, with the baseline and a tiny encoder (the compared
    # methods are checked above) and tiny networks.
    monkeypatch.setattr(experiments, "methods", lambda **kwargs: tiny_methods())
    rows, registration_row = [], experiments.registration_row  # what registration_row returned to the script

    def recorded_row(*args, **kwargs):
        rows.append(registration_row(*args, **kwargs))
        return rows[-1]

    monkeypatch.setattr(experiments, "registration_row", recorded_row)
    monkeypatch.setattr(sys, "argv", ["reg_oasis_t1_inverted.py", "--data", str(tmp_path / "oasis"), "--split",
                                      "all", "--quick", "--out", str(tmp_path / "out")])
    runpy.run_path(os.path.join(ROOT, "experiments", "reg_oasis_t1_inverted.py"), run_name="__main__")
    assert "OASIS T1-Inverted T1 (t1_inverted): baseline" in capsys.readouterr().out
    # every method scored on every pairing: each of the 3 subjects moved onto the next
    (results, _), = rows
    assert list(results) == ["baseline", "cifl"]
    for pairings in results.values():
        assert list(pairings) == ["t1", "t1_inverted"]
        assert all(s.dice.shape[0] == 3 and s.folding.shape == (3,) for s in pairings.values())
    # its own table, not table1.md, which holds every row (experiments/table1.py)
    assert sorted(os.listdir(tmp_path / "out")) == ["reg_oasis_t1_inverted.csv", "reg_oasis_t1_inverted.json",
                                                    "reg_oasis_t1_inverted.md"]
    assert "| Registration | 2D | OASIS T1-Inverted T1 |" in (tmp_path / "out" / "reg_oasis_t1_inverted.md").read_text()


@pytest.mark.parametrize("script, table, rows", [
    ("seg_inverted_oasis.py", "seg_inverted_oasis.md", ["seg_inverted_oasis"]),
    ("reg_ixi_t1_t2.py", "reg_ixi_t1_t2.md", ["reg_ixi_t1_t2"]),
    ("table1.py", "table1.md", list(experiments.ROWS)),
])
def test_each_script_writes_its_own_table(tmp_path, monkeypatch, row_results, script, table, rows):
    (tmp_path / "table1.md").write_text("every row")  # as table1.py left it
    no_work_rows(monkeypatch, row_results)
    monkeypatch.setattr(sys, "argv", [script, "--out", str(tmp_path)])
    runpy.run_path(os.path.join(ROOT, "experiments", script), run_name="__main__")
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".md")) == sorted({"table1.md", table})
    written = (tmp_path / table).read_text()
    assert [row for row in experiments.ROWS if f"| {experiments.ROWS[row][2]} (demo data) |" in written] == rows
    if table != "table1.md":
        assert (tmp_path / "table1.md").read_text() == "every row"


def no_work_rows(monkeypatch, row_results):
    """Makes experiments.main's rows score row_results's scores without data or training."""
    scores = row_results["baseline"]["t1"]
    monkeypatch.setattr(experiments, "row_data", lambda *args: (None, None, ["subject 1", "subject 2"]))
    monkeypatch.setattr(experiments, "methods", lambda **kwargs: tiny_methods())
    monkeypatch.setattr(experiments, "run_row", lambda row, *args: (
        {name: {"t1": scores, experiments.ROWS[row][3]: scores} for name in tiny_methods()}, {}))


def test_a_row_keeps_its_settings_and_is_not_replaced_by_a_run_on_other_data(tmp_path, monkeypatch, capsys,
                                                                              row_results):
    no_work_rows(monkeypatch, row_results)
    out = tmp_path / "results"
    experiments.main(["seg_inverted_oasis"], ["--data", str(tmp_path / "oasis"), "--split", "all", "--epochs", "3",
                                              "--out", str(out)])
    written = (out / "seg_inverted_oasis.json").read_text()
    assert json.loads(written)["settings"] == dict(data=str(tmp_path / "oasis"), size="paper", split="all", seed=0,
                                                   epochs=3, encoders="shipped")
    assert f"Ours: {tmp_path / 'oasis'}, paper settings, shipped encoders, 3 epochs, split all;" in \
        (out / "seg_inverted_oasis.md").read_text()
    with pytest.raises(SystemExit) as exited:  # table1.py's demo rows, into the same folder
        experiments.main(["seg_inverted_oasis"], ["--out", str(out)])
    assert exited.value.code == 2 and f"seg_inverted_oasis.json holds the row's results on {tmp_path / 'oasis'}, " \
        f"which this run on demo data would replace: choose another --out" in capsys.readouterr().err
    assert (out / "seg_inverted_oasis.json").read_text() == written


def _no_work(*args, **kwargs):
    raise AssertionError("work began before the arguments were checked")


@pytest.mark.parametrize("script, argv, message", [
    ("defaults.py", ["--steps", "-1"], "--steps must be a positive integer, got -1"),  # Keras: trains forever
    ("defaults.py", ["--steps", "0"], "--steps must be a positive integer, got 0"),
    ("defaults.py", ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ("defaults.py", ["--int-steps", "-1"], "--int-steps must be a non-negative integer, got -1"),
    ("defaults.py", ["--int-resolution", "0"], "--int-resolution must be a positive integer, got 0"),
    ("defaults.py", ["--svf-resolution", "0"], "--svf-resolution must be a positive integer, got 0"),
    ("defaults.py", ["--reg-weight", "-1"], "--reg-weight must be a non-negative number, got -1.0"),
    ("defaults.py", ["--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),
    ("defaults.py", ["--seg-epochs", "-1"], "--seg-epochs must be a non-negative integer, got -1"),
    ("defaults.py", ["--learning-rate", "nan"], "--learning-rate must be a positive number, got nan"),
    ("defaults.py", ["--learning-rate", "-1"], "--learning-rate must be a positive number, got -1.0"),  # ascent
    ("seg_inverted_oasis.py", ["--encoder-steps", "250"],
     "--encoder-steps 250 is an option of --train-encoders, which was not given"),
    ("seg_inverted_oasis.py", ["--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),
    ("table1.py", ["--split", "all"], "unrecognized arguments: --split all (see table1.py --help)"),
    ("seg_inverted_oasis.py", ["--seed", "x"], "argument --seed: invalid int value: 'x' (see seg_inverted_oasis.py "
                                               "--help)"),
    ("table1.py", ["--data", "DATA"], "--data DATA: one folder for rows that read different ones (neurite-oasis "
                                      "(2D slices): seg_inverted_oasis, reg_oasis_t1_inverted; IXI-style (2D t1/t2 "
                                      "slices and labels): reg_ixi_t1_t2); run each row's script with its "
                                      "folder (experiments/ROW.py --data DIR)"),
])
def test_scripts_refuse_bad_arguments_before_any_work(tmp_path, monkeypatch, capsys, script, argv, message):
    for work in ("defaults_data", "row_data", "methods", "run_row", "registration_model", "segmentation_model"):
        monkeypatch.setattr(experiments, work, _no_work)
    folder = str(tmp_path / "oasis")  # never read: the data are read after the checks
    argv = [folder if arg == "DATA" else arg for arg in argv]
    data = [] if "--data" in argv or script != "defaults.py" else ["--data", folder]
    monkeypatch.setattr(sys, "argv", [script, *data, *argv, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(os.path.join(ROOT, "experiments", script), run_name="__main__")
    assert exited.value.code == 2
    message = message.replace("DATA", folder)
    assert capsys.readouterr().err.splitlines() == [f"{script}: error: {message}"]  # one line, no traceback
    assert not (tmp_path / "out").exists()


def test_a_data_folder_that_does_not_load_stops_the_script_before_the_encoders_train(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "methods", _no_work)
    with pytest.raises(SystemExit) as exited:
        experiments.main(["seg_inverted_oasis"], ["--data", str(tmp_path / "typo"), "--train-encoders",
                                                  "--out", str(tmp_path / "out")])
    assert exited.value.code == 2 and "typo: no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--split", "1,2"], "--split must be three counts or three fractions"),
    (["--epochs", "x"], "invalid int value"),
    (["--data", "/no/such/folder"], "error: /no/such/folder"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--train-encoders", "--encoder-steps", "0"], "--encoder-steps must be a positive integer, got 0"),
    (["--encoder-steps", "5"], "--encoder-steps 5 is an option of --train-encoders, which was not given"),
    (["--out", "FILE/results"], "is not a folder"),  # refused before any training
])
def test_experiment_arguments_are_checked(capsys, tmp_path, argv, message):
    (tmp_path / "file").write_text("not a folder")
    argv = [str(tmp_path / "file" / "results") if arg == "FILE/results" else arg for arg in argv]
    with pytest.raises(SystemExit):
        experiments.main(["seg_inverted_oasis"], ["--out", str(tmp_path / "out"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_defaults_data_trains_on_even_slices_and_pairs_odd_slices_gap_apart(tmp_path):
    make_oasis(tmp_path / "oasis", subjects=2, volume_shape=(16, 20, 8))
    train, test, (moving, fixed, moving_labels, fixed_labels) = experiments.defaults_data(
        tmp_path / "oasis", indices=range(8), gap=4)
    volumes = cifl_tf.data.load_oasis(tmp_path / "oasis", dim=3)
    np.testing.assert_array_equal(train.images, np.concatenate([np.moveaxis(v[:, :, 0::2], -1, 0)
                                                                for v in volumes.images]))
    odd = [np.moveaxis(v[:, :, 1::2], -1, 0) for v in volumes.labels]  # slices 1, 3, 5, 7 of each subject
    np.testing.assert_array_equal(test.labels, np.concatenate(odd))
    # Pairs stay within a subject: slices 1 -> 5 and 3 -> 7 of each.
    np.testing.assert_array_equal(moving_labels, np.concatenate([o[:2] for o in odd]))
    np.testing.assert_array_equal(fixed_labels, np.concatenate([o[2:] for o in odd]))
    assert moving.shape == fixed.shape == (4, 16, 20)


def test_defaults_data_needs_3d_volumes_and_a_gap_that_pairs(tmp_path):
    make_oasis(tmp_path / "oasis", subjects=1, volume_shape=(16, 20, 8))
    with pytest.raises(ValueError, match="gap 8 leaves no pair of test slices 8 apart"):
        experiments.defaults_data(tmp_path / "oasis", indices=range(8), gap=8)
    with pytest.raises(ValueError, match="gap must be an even integer >= 2.*got 3"):
        experiments.defaults_data(tmp_path / "oasis", indices=range(8), gap=3)
    for name in ("aligned_norm.nii.gz", "aligned_seg4.nii.gz"):
        os.remove(tmp_path / "oasis" / "OASIS_OAS1_0001_MR1" / name)
    with pytest.raises(cifl_tf.data.DataError, match="no subject folder holds aligned_norm.nii.gz"):
        experiments.defaults_data(tmp_path / "oasis")
    with pytest.raises(cifl_tf.data.DataError, match="none: no such folder"):
        experiments.defaults_data(tmp_path / "none")


def test_defaults_script_names_a_seed_keras_cannot_take(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        experiments.defaults_main(["--data", str(tmp_path / "data"), "--seed", str(2 ** 32),
                                   "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "--seed must be an integer in [0, 2**32), got 4294967296" in capsys.readouterr().err


@pytest.mark.slow
def test_default_models_improve_on_real_slices_within_the_cpu_budget(oasis_sample, tmp_path):
    """Issue 11: 150 steps of batch 4 beat the identity overlap by >= 0.05 Dice; the UNet learns the labels."""
    results = experiments.defaults_main(["--data", str(oasis_sample), "--out", str(tmp_path)])
    registration = results["registration"]
    assert registration["overrides"] == {} and registration["steps"] == 150 and registration["batch_size"] == 4
    assert registration["registered_dice"][0] >= registration["identity_dice"][0] + 0.05
    segmentation = results["segmentation"]
    assert segmentation["dice"][0] >= segmentation["untrained_dice"][0] + 0.2
    assert json.loads((tmp_path / "defaults.json").read_text())["registration"]["pairs"] == registration["pairs"]
