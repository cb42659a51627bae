"""The downstream `cifl` sub-commands: NIfTI in and out, training and evaluation on data folders, errors."""
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

import cifl_tf
import tensorflow as tf
from cifl_tf import cli, data, evaluate, models
from cifl_tf.descriptors import MIND
from conftest import REPO, make_oasis, phantom_image, phantom_labels, write_nifti

SLICE = (16, 20)  # the 2D shape of the tiny neurite-oasis fixture
AFFINE = np.array([[0, 0, -1.5, 80], [2, 0, 0, -90], [0, 1, 0, 40], [0, 0, 0, 1]], float)
TINY_TRAIN = ["--nb-features", "4", "--nb-levels", "2", "--batch-size", "2", "--seed", "0"]


def run(capsys, *argv):
    """(exit status, stdout, stderr) of `cifl argv` run in this process."""
    status = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def slice_file(path, shape=SLICE, seed=0, affine=AFFINE):
    """A T1-like phantom image stored as a neurite slice (H x W x 1); returns its (H, W) array."""
    image = phantom_image(phantom_labels(shape, np.random.default_rng(seed)), np.random.default_rng(seed))
    write_nifti(path, image[..., np.newaxis] if len(shape) == 2 else image, affine)
    return image


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder with a tiny 2D encoder, 3D encoder, segmentation and registration model, and two slices."""
    folder = tmp_path_factory.mktemp("files")
    tf.keras.utils.set_random_seed(0)  # else the weights follow the tests run before (some draws leave dead voxels)
    for name, ndim in (("encoder", 2), ("encoder3d", 3)):
        cifl_tf.save_encoder(cifl_tf.CIFLEncoder(channels=3, features=4, ndim=ndim), str(folder / f"{name}.weights.h5"))
    models.save_model(cifl_tf.segmentation_model(SLICE, 5, nb_features=4, nb_levels=2), str(folder / "seg.keras"))
    reg = cifl_tf.registration_model(SLICE, nb_unet_features=[[4], [4, 4]], int_steps=0)
    layer = reg.get_layer(f"{reg.name}_flow")  # a large random flow kernel: a real deformation
    kernel, bias = layer.get_weights()
    layer.set_weights([np.random.default_rng(0).normal(0, 0.5, kernel.shape).astype(np.float32), bias])
    models.save_model(reg, str(folder / "reg.keras"))
    slice_file(folder / "a.nii.gz", seed=1)
    slice_file(folder / "b.nii.gz", seed=2)
    return folder


@pytest.mark.parametrize("shape, options, describer", [
    (SLICE, lambda files: ["--encoder", files / "encoder.weights.h5"],
     lambda files: cifl_tf.load_encoder(str(files / "encoder.weights.h5"))),
    ((8, 10, 6), lambda files: ["--encoder", files / "encoder3d.weights.h5"],
     lambda files: cifl_tf.load_encoder(str(files / "encoder3d.weights.h5"))),
    (SLICE, lambda files: ["--pretrained", "0.1"], lambda files: cifl_tf.pretrained(0.1)),
    (SLICE, lambda files: [], lambda files: cifl_tf.pretrained()),  # the recommended encoder
    ((8, 10, 6), lambda files: [], lambda files: cifl_tf.pretrained(ndim=3)),  # the shipped 3D encoder
], ids=["2d encoder", "3d encoder", "pretrained 0.1", "default 2d", "default 3d"])
def test_features_are_the_encoders_output_on_the_input_grid(files, tmp_path, capsys, shape, options, describer):
    image = slice_file(tmp_path / "in.nii.gz", shape)
    status, stdout, _ = run(capsys, "features", tmp_path / "in.nii.gz", tmp_path / "f.nii.gz", *options(files))
    features, affine, _ = data.load_nifti(tmp_path / "f.nii.gz", channels=True)
    encoder = describer(files)
    assert status == 0 and f"{encoder.channels}-channel features" in stdout
    assert features.shape == (*shape, encoder.channels)
    np.testing.assert_allclose(features, encoder(data.normalize(image)[None, ..., None])[0], atol=1e-5)
    np.testing.assert_array_equal(affine, AFFINE)


def test_features_of_a_slice_stored_across_the_first_axis_lie_where_its_voxels_do(files, tmp_path, capsys):
    image = np.random.default_rng(0).random((1, 16, 20)).astype(np.float32)  # a 1 x H x W slice
    affine = np.diag([0.5, 0.7, 0.9, 1.0])
    write_nifti(tmp_path / "across.nii.gz", image, affine)
    status, _, _ = run(capsys, "features", tmp_path / "across.nii.gz", tmp_path / "f.nii.gz", "--encoder",
                       files / "encoder.weights.h5")
    stored = nib.load(tmp_path / "f.nii.gz")
    encoder = cifl_tf.load_encoder(str(files / "encoder.weights.h5"))
    assert status == 0 and stored.shape[:3] == (1, 16, 20)  # voxel [0, i, j] of the image is feature [0, i, j]
    np.testing.assert_allclose(stored.get_fdata()[0, :, :, 0], encoder(data.normalize(image)[..., None])[0],
                               atol=1e-6)
    np.testing.assert_allclose(stored.affine, affine, rtol=1e-6)  # the header's float32


def test_features_of_a_4d_image_name_the_file(tmp_path, capsys):
    write_nifti(tmp_path / "in.nii.gz", np.ones((4, 5, 6, 2), np.float32))
    status, _, err = run(capsys, "features", tmp_path / "in.nii.gz", tmp_path / "f.nii.gz")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert re.search(r"in\.nii\.gz: holds 2 volumes or channels \(4, 5, 6, 2\)", err), err
    assert not (tmp_path / "f.nii.gz").exists()


def test_segment_writes_the_model_label_map_with_the_input_geometry(files, tmp_path, capsys):
    status, _, _ = run(capsys, "segment", "--model", files / "seg.keras", files / "a.nii.gz", tmp_path / "seg.nii.gz")
    assert status == 0
    written = nib.load(tmp_path / "seg.nii.gz")
    assert written.shape == (*SLICE, 1) and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, AFFINE)
    image, _, _ = data.load_nifti(files / "a.nii.gz")
    expected = evaluate.segment(models.load_model(str(files / "seg.keras")), data.normalize(image)[None])[0]
    np.testing.assert_array_equal(np.asarray(written.dataobj)[..., 0], expected)


def test_register_writes_the_moved_image_and_the_displacement_in_fixed_space(files, tmp_path, capsys):
    slice_file(tmp_path / "fixed.nii.gz", seed=2)
    status, stdout, _ = run(capsys, "register", "--model", files / "reg.keras", "--moving", files / "a.nii.gz",
                            "--fixed", tmp_path / "fixed.nii.gz", "--moved", tmp_path / "moved.nii.gz",
                            "--warp", tmp_path / "warp.nii.gz")
    assert status == 0 and "moved image written" in stdout
    moved = nib.load(tmp_path / "moved.nii.gz")
    displacement, warp_affine, _ = data.load_nifti(tmp_path / "warp.nii.gz", channels=True)
    assert moved.shape == (*SLICE, 1) and displacement.shape == (*SLICE, 2)
    assert np.abs(displacement).max() > 0.5
    np.testing.assert_array_equal(moved.affine, AFFINE)
    np.testing.assert_array_equal(warp_affine, moved.affine)
    moving, _, _ = data.load_nifti(files / "a.nii.gz")  # warped in its own intensities, not normalised
    expected = models.warp(moving[None, ..., None], displacement[None])[0, ..., 0]
    np.testing.assert_allclose(np.asarray(moved.dataobj)[..., 0], expected, atol=1e-6)


def test_train_seg_then_evaluate_on_a_data_folder(oasis_tiny, tmp_path, capsys):
    run_dir = tmp_path / "seg"
    status, stdout, _ = run(capsys, "train-seg", "--data", oasis_tiny, "--out", run_dir, "--epochs", 2,
                            "--split", "2,1,1", *TINY_TRAIN)
    assert status == 0 and f"model written to {run_dir / 'model.keras'}" in stdout
    log = [line.split(",") for line in (run_dir / "log.csv").read_text().splitlines()]
    assert log[0] == ["epoch", "loss", "val_loss"] and len(log) == 3
    assert all(0 <= float(row[2]) <= 1 for row in log[1:])  # the Dice loss on the validation subject
    model = models.load_model(str(run_dir))
    assert model.nb_labels == 5 and model.inshape == SLICE
    status, stdout, _ = run(capsys, "evaluate", "--model", run_dir, "--data", oasis_tiny, "--split", "2,1,1",
                            "--contrast", "inverted", "--json", tmp_path / "scores.json")
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert status == 0 and "segmentation of inverted, test part" in stdout
    assert scores["images"] == 1 and sorted(scores["per_label"]) == ["1", "2", "3", "4"]
    assert 0 <= scores["dice"][0] <= 1 and "folding" not in scores
    status, stdout, _ = run(capsys, "evaluate", "--model", run_dir, "--data", oasis_tiny, "--part", "all")
    assert status == 0 and "over 4 images" in stdout
    # without --split, the run's: its one test subject, not a test part of the paper's proportions
    status, stdout, _ = run(capsys, "evaluate", "--model", run_dir / "model.keras", "--data", oasis_tiny)
    assert status == 0 and "over 1 image" in stdout
    for option, value, message in (("--seed", 1, "--seed 1 differs from the seed 0 that"),
                                   ("--split", "1,1,2", "--split 1,1,2 differs from the split [2, 1, 1] that")):
        status, _, err = run(capsys, "evaluate", "--model", run_dir, "--data", oasis_tiny, option, value)
        assert status == 2 and err.count("\n") == 1 and message in err and "leave " + option + " out" in err, err
    for split in ("1,1,2", "100,0,0"):  # every subject, whatever the split
        status, stdout, _ = run(capsys, "evaluate", "--model", run_dir, "--data", oasis_tiny, "--part", "all",
                                "--split", split)
        assert status == 0 and "over 4 images" in stdout
    (tmp_path / "link").symlink_to(oasis_tiny)  # the same folder by another path: the run's split still
    status, stdout, err = run(capsys, "evaluate", "--model", run_dir, "--data", tmp_path / "link")
    assert status == 0 and "over 1 image" in stdout and "trained on" not in err
    shutil.copytree(oasis_tiny, tmp_path / "copy")  # not known to be the same: said, and split by the defaults
    status, stdout, err = run(capsys, "evaluate", "--model", run_dir, "--data", tmp_path / "copy")
    assert status == 0 and f"trained on {oasis_tiny}, not on {tmp_path / 'copy'}" in err
    status, _, err = run(capsys, "evaluate", "--model", run_dir, "--data", tmp_path / "missing")  # one line: no note
    assert status == 2 and err.count("\n") == 1 and "missing: no such file or folder" in err, err


def test_evaluate_refuses_a_test_part_that_now_holds_subjects_the_run_trained_on(oasis_tiny, tmp_path, capsys):
    """Subjects added to --data after training change its split: its test part may then hold trained subjects."""
    run_dir = tmp_path / "seg"
    status, _, _ = run(capsys, "train-seg", "--data", oasis_tiny, "--out", run_dir, "--epochs", 1, "--split", "2,1,1",
                       *TINY_TRAIN)
    split = json.loads((run_dir / "subjects.json").read_text())
    assert status == 0 and [len(split[part]) for part in ("train", "val", "test")] == [2, 1, 1]
    assert sorted(sum(split.values(), [])) == sorted(path.name for path in oasis_tiny.iterdir())
    outcomes = []
    for added in range(5, 9):
        shutil.copytree(oasis_tiny / "OASIS_OAS1_0001_MR1", oasis_tiny / f"OASIS_OAS1_{added:04d}_MR1")
        test = data.split_subjects([path.name for path in oasis_tiny.iterdir()], (2, 1, 1), seed=0)[2]
        leaked = set(test) & {*split["train"], *split["val"]}
        status, _, err = run(capsys, "evaluate", "--model", run_dir, "--data", oasis_tiny)
        assert status == (2 if leaked else 0), err
        if leaked:
            assert err.count("\n") == 1 and f"its test part now holds subjects that {run_dir} trained or validated on " \
                f"({', '.join(sorted(leaked))}): its subjects have changed since that run split them" in err, err
        outcomes.append(bool(leaked))
    assert True in outcomes  # the folders added made the case at least once


@pytest.mark.parametrize("command", ["train-seg", "train-reg"])
def test_a_new_training_run_refuses_a_folder_holding_a_log_it_would_write_over(oasis_tiny, tmp_path, capsys, command):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.csv").write_text("epoch,loss\n0,0.5\n")  # a run's, without its settings.json: replaced before
    status, _, err = run(capsys, command, "--data", oasis_tiny, "--out", run_dir, "--epochs", 1, *TINY_TRAIN)
    assert status == 2 and "holds log.csv, which a new run would write over" in err
    assert os.listdir(run_dir) == ["log.csv"] and (run_dir / "log.csv").read_text() == "epoch,loss\n0,0.5\n"


def test_evaluate_refuses_to_write_its_json_over_a_file_it_reads(oasis_tiny, tmp_path, capsys):
    run_dir = tmp_path / "seg"
    assert run(capsys, "train-seg", "--data", oasis_tiny, "--out", run_dir, "--epochs", 1, "--split", "2,1,1",
               *TINY_TRAIN)[0] == 0
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("".join(f"{folder}/slice_norm.nii.gz,{folder}/slice_seg4.nii.gz\n"
                             for folder in sorted(oasis_tiny.iterdir())))
    for data_path, written in ((oasis_tiny, run_dir / "model.keras"), (oasis_tiny, run_dir / "settings.json"),
                               (oasis_tiny, run_dir / "subjects.json"), (pairs, pairs)):
        before = written.read_bytes()
        status, _, err = run(capsys, "evaluate", "--model", run_dir, "--data", data_path, "--json", written)
        assert status == 2 and err.count("\n") == 1 and f"--json {written}: is a file this evaluation reads" in err
        assert written.read_bytes() == before
    status, _, err = run(capsys, "evaluate", "--model", run_dir, "--data", oasis_tiny, "--seed", -1)
    assert status == 2 and "--seed must be null or an integer in [0, 2**32), got -1" in err, err
    status, _, err = run(capsys, "evaluate", "--model", run_dir, "--data", oasis_tiny, "--json", "")
    assert status == 2 and "--json is an empty name (an unset shell variable?)" in err, err  # wrote no JSON before


def test_evaluate_names_the_default_split_of_the_run_as_such(oasis_tiny, tmp_path, capsys):
    assert run(capsys, "train-seg", "--data", oasis_tiny, "--out", tmp_path / "seg", "--epochs", 1, *TINY_TRAIN)[0] == 0
    status, _, err = run(capsys, "evaluate", "--model", tmp_path / "seg", "--data", oasis_tiny, "--split", "2,1,1")
    assert status == 2 and "differs from the split of the paper's proportions (none given) that" in err, err  # None


@pytest.mark.parametrize("file, content, message", [
    ("subjects.json", '{"train": 5}', "subjects.json: expected an object of the subjects (lists of paths)"),
    ("settings.json", {"seed": "0"}, "settings.json: seed must be null or an integer"),
    ("settings.json", {"data": 5}, "settings.json: data must be a path, got 5"),
    ("settings.json", {"split": [1, 1]}, "settings.json: split must be null or three subject counts or fractions"),
])
def test_evaluate_refuses_damaged_run_files_in_one_line(oasis_tiny, tmp_path, capsys, file, content, message):
    run_dir = tmp_path / "seg"
    assert run(capsys, "train-seg", "--data", oasis_tiny, "--out", run_dir, "--epochs", 1, "--split", "2,1,1",
               *TINY_TRAIN)[0] == 0
    if isinstance(content, dict):  # a change to the run's settings
        content = json.dumps({**json.loads((run_dir / file).read_text()), **content})
    (run_dir / file).write_text(content)
    status, _, err = run(capsys, "evaluate", "--model", run_dir, "--data", oasis_tiny)
    assert status == 2 and err.count("\n") == 1 and message in err, err


def test_train_seg_on_encoder_features_keeps_the_encoder_weights(files, oasis_tiny, tmp_path, capsys):
    status, _, _ = run(capsys, "train-seg", "--data", oasis_tiny, "--out", tmp_path, "--epochs", 1,
                       "--encoder", files / "encoder.weights.h5", *TINY_TRAIN)
    assert status == 0
    stacked = [layer for layer in models.load_model(str(tmp_path)).layers if isinstance(layer, cifl_tf.CIFLEncoder)]
    original = cifl_tf.load_encoder(str(files / "encoder.weights.h5"))
    assert len(stacked) == 1 and not stacked[0].trainable
    for a, b in zip(stacked[0].get_weights(), original.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant, shape", [("mind", SLICE), ("ssc", (8, 10, 6))])
def test_features_with_the_mind_descriptor_of_the_image_dimension(tmp_path, capsys, variant, shape):
    image = slice_file(tmp_path / "in.nii.gz", shape)
    status, stdout, _ = run(capsys, "features", tmp_path / "in.nii.gz", tmp_path / "f.nii.gz", "--descriptor", variant)
    features, affine, _ = data.load_nifti(tmp_path / "f.nii.gz", channels=True)
    descriptor = MIND(len(shape), variant)
    assert status == 0 and f"{descriptor.channels}-channel features" in stdout
    np.testing.assert_allclose(features, descriptor(data.normalize(image)[None, ..., None])[0], atol=1e-6)
    np.testing.assert_array_equal(affine, AFFINE)


@pytest.mark.parametrize("argv, message", [
    (["features", "a.nii.gz", "f.nii.gz", "--descriptor", "mind", "--pretrained", "0.1"],
     "cifl features: error: argument --pretrained: not allowed with argument --descriptor"),
    (["features", "a.nii.gz", "f.nii.gz", "--max-memory", "lots"],
     "cifl features: error: argument --max-memory: expected bytes such as 1073741824 or 1G, got 'lots'"),
    (["register", "--moving", "a.nii.gz"], "cifl register: error: the following arguments are required: --fixed"),
    (["align"], "cifl: error: argument command: invalid choice: 'align'"),
])
def test_argparse_errors_are_one_line_naming_the_help(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, *argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err
    assert err.rstrip().endswith(f"(see {message.split(': error')[0]} --help)"), err


@pytest.mark.parametrize("command", ["train-seg", "train-reg"])
def test_train_on_the_mind_descriptor(oasis_tiny, tmp_path, capsys, command):
    extra = ["--steps-per-epoch", 1, "--int-steps", 0] if command == "train-reg" else []
    status, _, _ = run(capsys, command, "--data", oasis_tiny, "--out", tmp_path, "--epochs", 1, "--descriptor", "ssc",
                       *extra, *TINY_TRAIN)
    assert status == 0
    stacked = [layer.get_config() for layer in models.load_model(str(tmp_path)).submodules if isinstance(layer, MIND)]
    assert [(config["variant"], config["ndim"]) for config in stacked] == [("ssc", 2)]


def test_train_reg_then_evaluate_across_contrasts(oasis_tiny, tmp_path, capsys):
    run_dir = tmp_path / "reg"
    status, stdout, _ = run(capsys, "train-reg", "--data", oasis_tiny, "--out", run_dir, "--epochs", 1,
                            "--steps-per-epoch", 2, "--int-steps", 0, "--split", "2,0,2", *TINY_TRAIN)
    assert status == 0 and "similarity" in (run_dir / "log.csv").read_text()
    status, stdout, _ = run(capsys, "evaluate", "--model", run_dir, "--data", oasis_tiny, "--split", "2,0,2",
                            "--moving-contrast", "t1", "--contrast", "inverted", "--json", tmp_path / "s.json")
    scores = json.loads((tmp_path / "s.json").read_text())
    assert status == 0 and "registration t1 -> inverted, test part" in stdout and "folding pixels" in stdout
    assert scores["images"] == 2 and 0 <= scores["folding"][0] <= 1 and 0 <= scores["dice"][0] <= 1


def test_evaluate_reads_a_list_file_of_image_label_pairs(files, tmp_path, capsys):
    rng = np.random.default_rng(3)
    lines = ["image,labels"]
    for n in range(2):
        labels = phantom_labels(SLICE, rng)
        write_nifti(tmp_path / f"image{n}.nii.gz", phantom_image(labels, rng))
        write_nifti(tmp_path / f"labels{n}.nii.gz", labels)
        lines.append(f"image{n}.nii.gz,labels{n}.nii.gz")  # relative to the list's folder
    (tmp_path / "pairs.csv").write_text("\n".join(lines))
    status, stdout, _ = run(capsys, "evaluate", "--model", files / "seg.keras", "--data", tmp_path / "pairs.csv",
                            "--part", "all")
    assert status == 0 and "segmentation of t1, all part" in stdout and "over 2 images" in stdout


def test_train_seg_on_ixi_volumes_and_evaluate_on_t2(ixi_tiny, tmp_path, capsys):
    status, _, _ = run(capsys, "train-seg", "--data", ixi_tiny, "--dim", 3, "--out", tmp_path, "--epochs", 1,
                       "--split", "1,1,1", *TINY_TRAIN)
    assert status == 0 and models.load_model(str(tmp_path)).inshape == (12, 14, 10)
    status, stdout, _ = run(capsys, "evaluate", "--model", tmp_path, "--data", ixi_tiny, "--split", "1,1,1",
                            "--contrast", "t2")
    assert status == 0 and "segmentation of t2, test part" in stdout and "over 1 images" in stdout


def test_train_seg_refuses_label_values_that_are_not_0_to_l_minus_1_unless_told_how_many(ixi_tiny, tmp_path,
                                                                                          capsys):
    for path in ixi_tiny.glob("*/labels.nii.gz"):  # 0..4 -> 0, 10, ..., 40, as label values of an atlas may be
        image = nib.load(path)
        write_nifti(path, np.asarray(image.dataobj) * 10, image.affine)
    argv = ["train-seg", "--data", ixi_tiny, "--dim", 3, "--epochs", 1, "--split", "1,1,1", *TINY_TRAIN]
    status, _, err = run(capsys, *argv, "--out", tmp_path / "run")
    assert status == 2 and "hold 5 values up to 40 (0, 10, 20, 30, 40), not 0..4: renumber them" in err
    assert not (tmp_path / "run" / "settings.json").exists()
    status, _, _ = run(capsys, *argv, "--out", tmp_path / "told", "--nb-labels", 41)
    assert status == 0 and models.load_model(str(tmp_path / "told")).nb_labels == 41


def test_train_seg_refuses_label_maps_of_the_background_only(ixi_tiny, tmp_path, capsys):
    for path in ixi_tiny.glob("*/labels.nii.gz"):
        write_nifti(path, np.zeros(nib.load(path).shape, np.int16), nib.load(path).affine)
    status, _, err = run(capsys, "train-seg", "--data", ixi_tiny, "--dim", 3, "--split", "1,1,1", *TINY_TRAIN,
                         "--out", tmp_path / "run")
    assert status == 2 and err.count("\n") == 1 and f"{ixi_tiny}: every label map holds the one value 0" in err, err
    assert not (tmp_path / "run" / "settings.json").exists()


def test_train_refuses_to_overwrite_a_model(oasis_tiny, tmp_path, capsys):
    (tmp_path / "model.keras").write_text("an earlier model")
    status, _, err = run(capsys, "train-seg", "--data", oasis_tiny, "--out", tmp_path, *TINY_TRAIN)
    assert status == 2 and "model.keras: already exists" in err
    assert (tmp_path / "model.keras").read_text() == "an earlier model"


@pytest.mark.parametrize("command, options, message", [
    ("train-reg", [*TINY_TRAIN, "--seed", "-1"], r"--seed must be null or an integer in \[0, 2\*\*32\), got -1"),
    ("train-seg", [*TINY_TRAIN, "--seed", str(2 ** 32)], r"--seed must be .* got 4294967296"),
    ("train-reg", [*TINY_TRAIN, "--svf-resolution", "32"],
     r"svf_resolution 32 is too coarse for the \(16, 20\) images"),
    # a field of one voxel across: a translation that the smoothness term does not see
    ("train-reg", [*TINY_TRAIN, "--svf-resolution", "16"],
     r"svf_resolution 16 is too coarse for the \(16, 20\) images"),
    ("train-reg", [*TINY_TRAIN, "--svf-resolution", "3"], r"svf_resolution 3, VxmDense's field comes back at "
                                                           r"\(16, 18\), not at the \(16, 20\) of the images"),
    ("train-reg", ["--nb-levels", "2"], r"--nb-levels sets the levels of the UNet of --nb-features; give both"),
    ("train-seg", [*TINY_TRAIN, "--encoder", ""],  # an unset variable is not the baseline
     r"--encoder is an empty name \(an unset shell variable\?\)"),
    ("train-reg", [*TINY_TRAIN, "--encoder", "{files}/encoder3d.weights.h5"],
     r"\(its images\): has 2 dimensions, --encoder .*encoder3d\.weights\.h5 is 3D"),
])
def test_train_refuses_settings_it_cannot_use_in_one_line_before_it_writes_a_run(oasis_tiny, files, tmp_path, capsys,
                                                                                 command, options, message):
    options = [str(option).format(files=files) for option in options]
    status, _, err = run(capsys, command, "--data", oasis_tiny, "--out", tmp_path / "run", *options)
    assert status == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run" / "settings.json").exists()


def test_train_refuses_an_out_folder_that_its_data_folder_would_read_as_a_subject(ixi_tiny, oasis_tiny, capsys):
    """Inside an IXI-style folder every folder is a subject: the run's broke the folder for evaluate and --resume.
    Inside a neurite-oasis folder only OASIS_* folders are, and hidden folders nowhere."""
    for out in (ixi_tiny / "run", ixi_tiny, oasis_tiny / "OASIS_run"):
        status, _, err = run(capsys, "train-seg", "--data", out.parent if out.name == "OASIS_run" else ixi_tiny,
                             "--out", out, *TINY_TRAIN)
        made = "checkpoints" if out == ixi_tiny else out.name
        assert status == 2 and err.count("\n") == 1 and f"which would read its folder {made} as a subject" in err, err
    subject = sorted(ixi_tiny.iterdir())[0]
    for data_folder, out in ((oasis_tiny, oasis_tiny / "runs" / "seg"), (ixi_tiny, ixi_tiny / ".runs"),
                             (ixi_tiny, subject / "run")):
        status, _, err = run(capsys, "train-seg", "--data", data_folder, "--out", out, "--epochs", 1,
                             "--split", "2,0,1" if data_folder == ixi_tiny else "2,1,1", *TINY_TRAIN,
                             *(["--dim", 3] if data_folder == ixi_tiny else []))
        assert status == 0, err


def test_train_reg_refuses_a_train_part_of_one_image_before_it_writes_a_run(oasis_tiny, tmp_path, capsys):
    status, _, err = run(capsys, "train-reg", "--data", oasis_tiny, "--out", tmp_path / "run", *TINY_TRAIN,
                         "--split", "1,1,2")
    assert status == 2 and "pairs two or more images of the train part, which holds 1: choose --split" in err
    assert not (tmp_path / "run" / "settings.json").exists()


@pytest.mark.parametrize("command, option, value", [
    ("train-seg", "--batch-size", "0"), ("train-seg", "--epochs", "0"), ("train-seg", "--learning-rate", "nan"),
    ("train-seg", "--nb-levels", "0"), ("train-reg", "--steps-per-epoch", "0"), ("train-reg", "--batch-size", "-1"),
    ("train-reg", "--svf-resolution", "0"), ("train-seg", "--nb-features", "0"),
])
def test_train_refuses_bad_numbers_in_one_line_before_it_writes_a_run(oasis_tiny, tmp_path, capsys, command, option,
                                                                      value):
    status, _, err = run(capsys, command, "--data", oasis_tiny, "--out", tmp_path / "run", *TINY_TRAIN, option, value)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{option} must be a positive" in err and f"got {value}" in err
    assert not (tmp_path / "run" / "settings.json").exists()  # else the corrected command would need --resume


def _bad_slice(folder, name, array):
    write_nifti(folder / name, array)
    return folder / name


def _case_missing(files, tmp):
    return ["features", tmp / "missing.nii.gz", "OUT", "--encoder", files / "encoder.weights.h5"], \
        r"missing\.nii\.gz: no such file"


def _case_not_nifti(files, tmp):
    (tmp / "notes.nii.gz").write_text("not an image")
    return ["features", tmp / "notes.nii.gz", "OUT", "--encoder", files / "encoder.weights.h5"], \
        r"notes\.nii\.gz: not a readable NIfTI image"


def _case_wrong_ndim(files, tmp):
    path = _bad_slice(tmp, "volume.nii.gz", np.ones((*SLICE, 3), np.float32))
    return ["segment", "--model", files / "seg.keras", path, "OUT"], r"volume\.nii\.gz: has 3 dimensions"


def _case_nan(files, tmp):
    image = np.ones((*SLICE, 1), np.float32)
    image[3, 4] = np.nan
    path = _bad_slice(tmp, "nan.nii.gz", image)
    return ["segment", "--model", files / "seg.keras", path, "OUT"], r"nan\.nii\.gz: contains 1 NaN/Inf voxels"


def _case_model_shape(files, tmp):
    path = _bad_slice(tmp, "small.nii.gz", np.ones((16, 16), np.float32))
    return ["segment", "--model", files / "seg.keras", path, "OUT"], \
        r"small\.nii\.gz: shape \(16, 16\) differs from the model's input shape \(16, 20\)"


def _case_model_fixed(files, tmp):
    path = _bad_slice(tmp, "other.nii.gz", np.ones((16, 16), np.float32))
    return ["register", "--model", files / "reg.keras", "--moving", files / "a.nii.gz", "--fixed", path,
            "--moved", "OUT"], r"other\.nii\.gz: shape \(16, 16\) differs from the model's input shape \(16, 20\)"


def _case_data_shape(files, tmp):
    make_oasis(tmp / "oasis", volume_shape=(12, 20, 8))
    return ["evaluate", "--model", files / "seg.keras", "--data", tmp / "oasis", "--json", "OUT"], \
        r"oasis: its images are \(12, 20\), the model .*seg\.keras takes \(16, 20\)"


def _train_seg_case(name, option, value, message):
    """A case of `cifl train-seg` on a folder of 4 subjects with one bad option."""
    def case(files, tmp):
        make_oasis(tmp / "oasis")
        return ["train-seg", "--data", tmp / "oasis", "--out", "OUT", option, value], message
    case.__name__ = f"_case_{name}"
    return case


_case_nb_labels = _train_seg_case("nb_labels", "--nb-labels", "0", r"--nb-labels must be an integer >= 2 .*got 0")
_case_split_counts = _train_seg_case("split_counts", "--split", "5,0,0",
                                     r"--split 5,0,0 needs 5 subjects, .*oasis holds 4$")
_case_oasis_contrast = _train_seg_case("oasis_contrast", "--contrast", "t2",
                                       r"error: .*oasis: neurite-oasis images are T1, got contrast 't2'$")


def _case_moving_contrast(files, tmp):
    make_oasis(tmp / "oasis")
    return ["evaluate", "--model", files / "seg.keras", "--data", tmp / "oasis", "--moving-contrast", "t2",
            "--json", "OUT"], r"--moving-contrast t2 is for registration models; .*seg\.keras segments"


def _case_labels_outside(files, tmp):
    make_oasis(tmp / "oasis")
    path = tmp / "oasis" / "OASIS_OAS1_0002_MR1" / "slice_seg4.nii.gz"
    labels = np.asarray(nib.load(path).dataobj).copy()
    labels[0, 0] = 7
    write_nifti(path, labels)
    return ["evaluate", "--model", files / "seg.keras", "--data", tmp / "oasis", "--json", "OUT"], \
        r"OASIS_OAS1_0002_MR1/slice_seg4\.nii\.gz: 1 label values outside the declared set"


def _case_empty_folder(files, tmp):
    (tmp / "empty").mkdir()
    return ["train-seg", "--data", tmp / "empty", "--out", "OUT"], r"empty: empty folder"


def _case_malformed_folder(files, tmp):
    (tmp / "junk" / "subject").mkdir(parents=True)
    (tmp / "junk" / "subject" / "image.txt").write_text("?")
    return ["train-reg", "--data", tmp / "junk", "--out", "OUT"], r"junk: not a data folder"


def _case_model_text(files, tmp):
    (tmp / "model.keras").write_text("weights?")
    return ["segment", "--model", tmp / "model.keras", files / "a.nii.gz", "OUT"], \
        r"model\.keras: not a cifl_tf model file"


def _case_model_foreign(files, tmp):
    image = tf.keras.Input((*SLICE, 1))
    tf.keras.Model(image, tf.keras.layers.Conv2D(5, 3, padding="same")(image)).save(str(tmp / "unet.keras"))
    return ["segment", "--model", tmp / "unet.keras", files / "a.nii.gz", "OUT"], \
        r"unet\.keras: not a cifl_tf model file \(it holds a 'Functional'"


def _case_model_kind(files, tmp):
    return ["segment", "--model", files / "reg.keras", files / "a.nii.gz", "OUT"], \
        r"reg\.keras: holds a registration model, not a segmentation model"


def _case_model_missing(files, tmp):
    return ["register", "--model", tmp / "none.keras", "--moving", files / "a.nii.gz", "--fixed",
            files / "b.nii.gz", "--moved", "OUT"], r"none\.keras: no such model file"


def _case_encoder_missing(files, tmp):
    return ["features", files / "a.nii.gz", "OUT", "--encoder", tmp / "enc.weights.h5"], \
        r"no such file .*enc\.weights\.h5"


def _case_encoder_ndim(files, tmp):
    return ["features", files / "a.nii.gz", "OUT", "--encoder", files / "encoder3d.weights.h5"], \
        r"a\.nii\.gz: has 2 dimensions, --encoder .*encoder3d\.weights\.h5 is 3D"


def _case_output_name(files, tmp):
    return ["features", files / "a.nii.gz", tmp / "features.npy", "--encoder", files / "encoder.weights.h5"], \
        r"features\.npy: output must end in \.nii or \.nii\.gz"


def _case_output_is_input(files, tmp):
    path = _bad_slice(tmp, "a.nii.gz", np.ones(SLICE, np.float32))
    return ["features", path, path, "--encoder", files / "encoder.weights.h5"], \
        r"a\.nii\.gz is the input image: the output would overwrite it"


def _case_segmentation_is_input(files, tmp):
    path = _bad_slice(tmp, "a.nii.gz", np.ones(SLICE, np.float32))
    return ["segment", "--model", files / "seg.keras", path, path], \
        r"a\.nii\.gz is the input image: the output would overwrite it"


def _case_memory_without_encoder(files, tmp):
    return ["segment", "--model", files / "seg.keras", files / "a.nii.gz", "OUT", "--max-memory", "512M"], \
        r"--max-memory bounds the features of a model's encoder, and .*seg\.keras has none"


def _case_default_memory_without_encoder(files, tmp):  # refused as given, not as differing from the default
    return ["segment", "--model", files / "seg.keras", files / "a.nii.gz", "OUT", "--max-memory", "1G"], \
        r"--max-memory bounds the features of a model's encoder, and .*seg\.keras has none"


def _case_warp_name_too_long(files, tmp):  # refused before the registration, not after --moved was written
    return ["register", "--model", files / "reg.keras", "--moving", files / "a.nii.gz", "--fixed", files / "b.nii.gz",
            "--moved", "OUT", "--warp", tmp / ("w" * 250 + ".nii.gz")], r"its file name is 257 bytes, longer than"


@pytest.mark.parametrize("case", [
    _case_missing, _case_not_nifti, _case_wrong_ndim, _case_nan, _case_model_shape, _case_model_fixed,
    _case_data_shape, _case_nb_labels, _case_moving_contrast, _case_labels_outside, _case_empty_folder, _case_malformed_folder, _case_model_text, _case_model_foreign,
    _case_model_kind, _case_model_missing, _case_encoder_missing, _case_encoder_ndim, _case_output_name,
    _case_output_is_input, _case_segmentation_is_input, _case_memory_without_encoder,
    _case_default_memory_without_encoder,
    _case_split_counts, _case_oasis_contrast, _case_warp_name_too_long,
], ids=lambda case: case.__name__[len("_case_"):])
def test_bad_input_gives_one_line_naming_the_file_and_writes_nothing(files, tmp_path, capsys, case):
    inputs = tmp_path / "in"
    inputs.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    argv, message = case(files, inputs)
    argv = [out / "result.nii.gz" if arg == "OUT" else arg for arg in argv]
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"cifl {argv[0]}: error: ")
    assert re.search(message, err), err
    assert list(out.iterdir()) == []


def test_real_sample_segmentation_baseline_trains_and_scores_t1_and_inverted_t1(oasis_sample, tmp_path, capsys):
    status, _, _ = run(capsys, "train-seg", "--data", oasis_sample, "--out", tmp_path / "seg", "--epochs", 20,
                       "--batch-size", 1, "--seed", 0)
    assert status == 0
    dice = {}
    for contrast in ("t1", "inverted"):
        status, stdout, _ = run(capsys, "evaluate", "--model", tmp_path / "seg", "--data", oasis_sample,
                                "--contrast", contrast, "--json", tmp_path / f"{contrast}.json")
        scores = json.loads((tmp_path / f"{contrast}.json").read_text())
        assert status == 0 and scores["images"] == 1  # the held-out subject of the two
        dice[contrast] = scores["dice"][0]
    assert 0 <= dice["inverted"] < dice["t1"] <= 1  # the baseline does not carry over to inverted T1


def test_real_sample_registration_baseline_trains_and_scores_t1_and_inverted_t1(oasis_sample, tmp_path, capsys):
    status, _, _ = run(capsys, "train-reg", "--data", oasis_sample, "--out", tmp_path / "reg", "--split", "2,0,0",
                       "--epochs", 1, "--steps-per-epoch", 3, "--batch-size", 2, "--int-steps", 0,
                       "--learning-rate", 1e-3)
    assert status == 0
    for contrast in ("t1", "inverted"):
        status, stdout, _ = run(capsys, "evaluate", "--model", tmp_path / "reg", "--data", oasis_sample,
                                "--part", "all", "--contrast", contrast, "--json", tmp_path / f"{contrast}.json")
        scores = json.loads((tmp_path / f"{contrast}.json").read_text())
        assert status == 0 and scores["images"] == 2 and f"registration t1 -> {contrast}" in stdout
        assert 0 < scores["dice"][0] < 1 and 0 <= scores["folding"][0] <= 1


# The closing note's numbers for the baselines on the real sample: these exact commands (seeded) give
# segmentation (train OAS1_0001, test OAS1_0002) T1 0.664, inverted T1 0.176; registration (MSE,
# trained and scored on both pairs) T1 -> T1 0.694, T1 -> inverted T1 0.443.
@pytest.mark.slow
@pytest.mark.parametrize("task, train, evaluate_args, expected", [
    ("seg", ["train-seg", "--epochs", 150, "--batch-size", 1], [], {"t1": 0.664, "inverted": 0.176}),
    ("reg", ["train-reg", "--split", "2,0,0", "--epochs", 5, "--steps-per-epoch", 20, "--batch-size", 2,
             "--learning-rate", 1e-3], ["--part", "all"], {"t1": 0.694, "inverted": 0.443}),
])
def test_real_sample_baseline_dice_as_reported(oasis_sample, tmp_path, capsys, task, train, evaluate_args, expected):
    assert run(capsys, *train, "--data", oasis_sample, "--out", tmp_path / task, "--seed", 0)[0] == 0
    for contrast, dice in expected.items():
        status, _, _ = run(capsys, "evaluate", "--model", tmp_path / task, "--data", oasis_sample, *evaluate_args,
                           "--contrast", contrast, "--json", tmp_path / f"{contrast}.json")
        assert status == 0
        assert json.loads((tmp_path / f"{contrast}.json").read_text())["dice"][0] == pytest.approx(dice, abs=0.05)


@pytest.mark.parametrize("command, function, names", [
    ("train-seg", models.segmentation_model, ("learning_rate", "loss")),
    ("train-reg", models.registration_model, ("learning_rate", "similarity", "reg_weight")),
])
def test_train_commands_take_their_defaults_from_the_python_api(command, function, names):
    args = cli._parser().parse_args([command, "--data", "DATA", "--out", "OUT"])
    defaults = inspect.signature(function).parameters
    assert {name: getattr(args, name) for name in names} == {name: defaults[name].default for name in names}


@pytest.mark.integration
def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path):
    """kill, timeout and SLURM send SIGTERM: the command ends with status 143 and removes its unfinished file."""
    volume = np.random.default_rng(0).random((64, 64, 64)).astype(np.float32)
    write_nifti(tmp_path / "volume.nii.gz", volume)
    out = tmp_path / "out"
    out.mkdir()
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "TF_CPP_MIN_LOG_LEVEL": "3"}
    # a tiny budget: tiles of a few voxels, so that the process is still writing when the signal comes
    process = subprocess.Popen([sys.executable, "-m", "cifl_tf.cli", "features", str(tmp_path / "volume.nii.gz"),
                                str(out / "features.nii.gz"), "--max-memory", "3M"], env=environ,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not any(out.iterdir()):  # the temporary file is being filled
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, process.stderr.read()
    assert list(out.iterdir()) == []


def test_a_diverging_registration_run_stops_with_one_line(oasis_tiny, tmp_path, capsys):
    """A huge learning rate makes the field NaN: the warp's gather must not fail on its coordinates before the
    NaN loss reaches StopOnNonFinite."""
    # --int-steps 0: the final warp gathers at the NaN field too, and seven squarings would triple the trace.
    status, _, err = run(capsys, "train-reg", "--data", oasis_tiny, "--out", tmp_path / "run", "--epochs", "2",
                         "--steps-per-epoch", "2", "--split", "3,0,1", "--learning-rate", "1e25", "--int-steps", "0",
                         *TINY_TRAIN)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "training stopped: the " in err and "lower the learning rate" in err, err
