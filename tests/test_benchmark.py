"""cifl_tf.benchmark: the invariance benchmark's pairs, describers, scores, tables and script."""
import json
import os
import runpy
import sys

import numpy as np
import pytest

import cifl_tf
from cifl_tf import benchmark, data
from cifl_tf.descriptors import MIND
from conftest import write_nifti

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InputIgnoringEncoder:
    """The shortcut of method page 3b: the same features for every input."""

    def __call__(self, batch):
        return np.ones((*np.shape(batch)[:-1], 2), np.float32) / np.sqrt(2)


def squares(count=2, size=32, seed=0):
    """(count, size, size) images in [0, 1] of random 8x8 blocks of three levels, with noise."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 3, (count, size // 8, size // 8)).repeat(8, axis=1).repeat(8, axis=2)
    return (levels / 2 + rng.normal(0, 0.05, levels.shape)).clip(0, 1).astype(np.float32)


def test_score_of_a_describer_with_itself_and_of_a_shortcut():
    images = squares()
    masks = np.ones(images.shape, bool)
    same = benchmark.score(MIND(), images, images, masks)
    assert list(same) == ["match", "agreement", "zero_input_cosine"]
    assert same["agreement"] == pytest.approx(1, abs=1e-6)
    shortcut = benchmark.score(InputIgnoringEncoder(), images, 1 - images, masks)
    assert shortcut["agreement"] == pytest.approx(1) and shortcut["zero_input_cosine"] == pytest.approx(1)
    assert shortcut["match"] == pytest.approx(9 / images[0].size)  # all match pixel (0, 0): 3x3 are within 2 px


@pytest.mark.parametrize("x, y", [(0.0, 0.0), (0.0, 1.0), (0.3, 0.7), (0.9, 0.85), (1.0, 0.5)])
def test_intensity_features_compare_by_intensity_difference(x, y):
    fx, fy = benchmark.intensity_features(np.array([[[[x]], [[y]]]], np.float32))[0, :, 0]
    np.testing.assert_allclose([np.linalg.norm(fx), np.linalg.norm(fy)], 1, rtol=1e-6)
    np.testing.assert_allclose(fx @ fy, np.cos(np.pi / 2 * (x - y)), atol=1e-6)


def nested_labels(count=3, size=48):
    """(count, size, size) label maps: background, then nested squares of labels 1, 2 and 3."""
    labels = np.zeros((count, size, size), np.int32)
    for label, margin in zip((1, 2, 3), (4, 12, 20)):
        labels[:, margin:size - margin, margin:size - margin] = label
    return labels


def test_near_equal_render_makes_the_chosen_tissues_nearly_equal():
    labels = nested_labels()
    images = benchmark.near_equal_render(labels, near=(2, 3), gap=0.05, noise_std=0.01, seed=1)
    assert images.shape == labels.shape and images.dtype == np.float32
    np.testing.assert_array_equal(images[labels == 0], 0)
    np.testing.assert_allclose(images.max(axis=(1, 2)), 1)
    for image in images:  # region interiors, away from the partial-volume blur
        csf, gm, wm = (image[margin + 3:-margin - 3, margin + 3:margin + 5].mean() for margin in (4, 12, 20))
        assert abs(gm - wm) < 0.1 < 0.2 < min(abs(csf - gm), abs(csf - wm))
    np.testing.assert_array_equal(images, benchmark.near_equal_render(labels, (2, 3), 0.05, noise_std=0.01, seed=1))


def test_near_equal_render_renders_volumes():
    labels = np.zeros((2, 32, 32, 32), np.int32)  # nested cubes, with empty slices at the edges
    for label, margin in zip((1, 2, 3), (2, 8, 13)):
        labels[:, margin:32 - margin, margin:32 - margin, margin:32 - margin] = label
    images = benchmark.near_equal_render(labels, near=(2, 3), noise_std=0.01, seed=1)
    assert images.shape == labels.shape and np.isfinite(images).all()
    np.testing.assert_array_equal(images[labels == 0], 0)
    np.testing.assert_allclose(images.max(axis=(1, 2, 3)), 1)
    for image in images:  # region interiors, away from the partial-volume blur
        csf, gm, wm = (image[4:6, 4:6, 4:6].mean(), image[10:12, 10:12, 10:12].mean(), image[15:17, 15:17, 15:17].mean())
        assert abs(gm - wm) < 0.1 < 0.2 < min(abs(csf - gm), abs(csf - wm))


@pytest.mark.parametrize("near", [(2, 2), (0, 1), (1, 4)])
def test_near_equal_render_needs_two_foreground_labels_of_the_maps(near):
    with pytest.raises(ValueError, match=rf"near must be two different foreground labels.*{near[0]}, {near[1]}"):
        benchmark.near_equal_render(nested_labels(1), near)


def test_pairs_cover_demo_hard_and_oasis_and_note_a_missing_sample(oasis_tiny, monkeypatch, tmp_path):
    pairs, notes = benchmark.benchmark_pairs(subjects=2, oasis=str(oasis_tiny))
    assert list(pairs) == ["demo T1 / inverted T1", "demo T1 / T2-like", "demo T1 / PD-like",
                           "OASIS T1 / inverted T1", "hard T1 / CSF≈GM", "hard T1 / CSF≈WM", "hard T1 / GM≈WM"]
    assert notes == []
    t1, inverted, brain = pairs["OASIS T1 / inverted T1"]
    assert t1.shape == inverted.shape == brain.shape == (4, 16, 20) and brain.any()
    for name, (a, b, masks) in pairs.items():
        assert a.shape == b.shape == masks.shape and not np.array_equal(a, b), name
    monkeypatch.setenv("CIFL_OASIS_SAMPLE", str(tmp_path / "absent"))
    pairs, notes = benchmark.benchmark_pairs(subjects=2)
    assert "OASIS T1 / inverted T1" not in pairs
    assert notes == [f"OASIS T1 / inverted T1 skipped: no OASIS sample at {tmp_path / 'absent'} "
                     f"(set CIFL_OASIS_SAMPLE or --data)"]


def test_pairs_refuse_an_oasis_subject_without_labels(oasis_tiny):
    subject = sorted(oasis_tiny.iterdir())[1]
    write_nifti(subject / "slice_seg4.nii.gz", np.zeros((16, 20, 1), np.uint8))
    with pytest.raises(data.DataError, match=f"the label map of {subject.name}.* is background \\(0\\) only"):
        benchmark.benchmark_pairs(subjects=2, oasis=str(oasis_tiny))


def test_mind_and_the_shipped_encoder_are_far_more_invariant_than_intensities():
    pairs, _ = benchmark.benchmark_pairs(subjects=2, oasis=None)
    images = pairs["demo T1 / inverted T1"]
    intensity = benchmark.score(benchmark.intensity_features, *images)
    scores = {"MIND": benchmark.score(MIND(), *images), "CIFL": benchmark.score(cifl_tf.pretrained(0.1), *images)}
    for scored in scores.values():
        assert scored["match"] > intensity["match"] + 0.3 and scored["agreement"] > intensity["agreement"]
    assert scores["CIFL"]["zero_input_cosine"] < 0.5


def test_markdown_has_a_table_per_metric_with_a_mean_row():
    results = {"MIND": {"a": dict(match=0.5, agreement=0.9, zero_input_cosine=0.1),
                        "b": dict(match=0.7, agreement=0.8, zero_input_cosine=0.2)},
               "enc": {"a": dict(match=0.25, agreement=0.5, zero_input_cosine=0.9),
                       "b": dict(match=0.75, agreement=0.5, zero_input_cosine=0.95)}}
    lines = benchmark.markdown(results, ["a note"]).splitlines()
    assert lines[0].startswith("**match@2px:")
    assert lines[2:6] == ["| pair | MIND | enc |", "|---|---|---|", "| a | 0.500 | 0.250 |", "| b | 0.700 | 0.750 |"]
    assert lines[6] == "| **mean** | 0.600 | 0.500 |"
    assert "| **mean** | 0.850 | 0.500 |" in lines and "| **mean** | 0.150 | 0.925 |" in lines
    assert lines[-1] == "*a note*"


def test_script_refuses_an_output_folder_that_is_a_file_before_it_scores(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit):
        benchmark.main(["--subjects", "1", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "file")])
    assert "is not a folder" in capsys.readouterr().err  # not the missing data, found after it


@pytest.mark.parametrize("argv, message", [
    (["--subjects", "0"], "--subjects must be a positive integer, got 0"),
    (["--offset-ablation", "-5"], "--offset-ablation must be a non-negative integer, got -5"),
])
def test_script_refuses_bad_counts_by_their_options_before_it_scores(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(benchmark, "benchmark_pairs", _no_work)
    monkeypatch.setattr(sys, "argv", ["invariance.py"])  # argparse's program name
    with pytest.raises(SystemExit) as exited:
        benchmark.main([*argv, "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"invariance.py: error: {message}"]
    assert not (tmp_path / "out").exists()


def _no_work(*args, **kwargs):
    raise AssertionError("pairs made or scored before the arguments were checked")


def test_script_refuses_a_3d_encoder_before_it_scores(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "enc3d.weights.h5")
    cifl_tf.save_encoder(cifl_tf.CIFLEncoder(channels=3, features=4, ndim=3, name="encoder_3d"), path)
    monkeypatch.setattr(benchmark, "benchmark_pairs", _no_work)
    monkeypatch.setattr(benchmark, "score", _no_work)
    script = os.path.join(ROOT, "experiments", "invariance.py")
    monkeypatch.setattr(sys, "argv", [script, "--encoder", path, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(script, run_name="__main__")
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"invariance.py: error: --encoder {path}: the invariance benchmark needs a 2D encoder, got a 3D CIFLEncoder"]
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_script_scores_every_describer_and_writes_tables(oasis_tiny, tmp_path, monkeypatch, capsys):
    cifl_tf.save_encoder(cifl_tf.CIFLEncoder(channels=3, features=4), str(tmp_path / "enc.weights.h5"))
    # Tiny encoders in the shipped ones' columns: scoring those on every pair is most of a run, and what they
    # score is the test above's.
    monkeypatch.setattr(benchmark, "pretrained", lambda tau_gamma=None: cifl_tf.CIFLEncoder(channels=3, features=4,
                                                                                          trainable=False))
    results = benchmark.main(["--subjects", "1", "--data", str(oasis_tiny),
                              "--encoder", str(tmp_path / "enc.weights.h5"), "--out", str(tmp_path / "out")])
    assert list(results) == ["intensity", "MIND", "MIND-SSC", "tau_gamma=1", "tau_gamma=0.1", "tau_gamma=0.01",
                             "recommended", str(tmp_path / "enc.weights.h5")]
    assert all(len(scores) == 7 for scores in results.values())
    saved = json.loads((tmp_path / "out" / "invariance.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results)) and saved["notes"] == []
    table = (tmp_path / "out" / "invariance.md").read_text()
    assert table in capsys.readouterr().out
    assert table.count("| OASIS T1 / inverted T1 | ") == 3


@pytest.mark.slow
def test_script_offset_ablation_trains_encoders_with_and_without_the_offset(oasis_tiny, tmp_path):
    results = benchmark.main(["--subjects", "1", "--data", str(oasis_tiny), "--offset-ablation", "1",
                              "--out", str(tmp_path)])
    assert list(results)[-2:] == ["max_offset=16, 1 steps", "max_offset=0, 1 steps"]


@pytest.mark.parametrize("steps", [1, 150, 300])
def test_script_offset_ablation_trains_for_any_number_of_steps(oasis_tiny, tmp_path, monkeypatch, steps):
    """train_encoder trains whole epochs: 150 steps in epochs of its default 100 had been refused."""
    asked = []

    def recorded(**kwargs):
        asked.append(kwargs)
        raise ValueError("recorded")  # the script's one-line exit, before any training

    monkeypatch.setattr(benchmark, "train_encoder", recorded)
    with pytest.raises(SystemExit):
        benchmark.main(["--subjects", "1", "--data", str(oasis_tiny), "--offset-ablation", str(steps),
                        "--out", str(tmp_path)])
    assert asked[0]["steps"] == steps and steps % asked[0]["steps_per_epoch"] == 0


def test_script_reports_a_missing_data_folder_in_one_line(tmp_path, monkeypatch, capsys):
    # The script file run as __main__ in this process: a subprocess would only add a TensorFlow import.
    script = os.path.join(ROOT, "experiments", "invariance.py")
    monkeypatch.setattr(sys, "argv", [script, "--data", str(tmp_path / "none"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(script, run_name="__main__")
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"invariance.py: error: {tmp_path / 'none'}")


def test_slice_contrasts_are_the_slice_its_inversion_and_its_labels_with_gm_near_wm():
    labels = np.zeros((24, 24), np.int32)
    labels[4:20, 4:20], labels[8:16, 8:16], labels[10:14, 10:14] = 3, 1, 2
    image = np.random.default_rng(0).uniform(0, 1, (24, 24)).astype(np.float32)
    contrasts = benchmark.slice_contrasts(image, labels)
    assert list(contrasts) == ["T1", "inverted T1", "GM≈WM"]
    np.testing.assert_array_equal(contrasts["T1"], image)
    np.testing.assert_array_equal(contrasts["inverted T1"], data.invert(image))  # max - x inside the brain
    np.testing.assert_array_equal(contrasts["GM≈WM"], benchmark.near_equal_render(labels[None], (1, 3))[0])


@pytest.mark.parametrize("shift, expected", [
    (0, 2 * 48 / (64 + 64)),  # unregistered: each 8x8 square overlaps the other's by 6 columns
    (2, 1.0),                 # the displacement that undoes the shift: moved(x) = moving(x + 2 columns)
])
def test_registered_dice_warps_the_moving_labels_by_the_displacement(shift, expected):
    moving, fixed = np.zeros((16, 16), np.int32), np.zeros((16, 16), np.int32)
    moving[4:12, 6:14], fixed[4:12, 4:12] = 1, 1
    displacement = np.zeros((16, 16, 2), np.float32)
    displacement[..., 1] = shift
    np.testing.assert_allclose(benchmark.registered_dice(displacement, moving, fixed), expected)
