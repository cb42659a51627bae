"""Hostile inputs (issue 11, item 3): every `cifl` sub-command that reads files, on malformed files.

Each malformed input is generated here (none is committed) and given, in each role it can play, to
each sub-command that reads it. Every run must end with exit status 2 and one line on stderr that
names the file and the problem, with no traceback and no file written or left behind. The valid
variants of the same files (integer types, scaled data, trailing singleton axes, .nii, qform-only)
run beside them and must give the same results as a plain float32 file.

A new sub-command that reads files is one more row in IMAGE_ROLES, MODEL_ROLES, ENCODER_ROLES or
OUTPUT_ROLES.
"""
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest

import cifl_tf
from cifl_tf import cli, data, models
from conftest import phantom_image, phantom_labels

SLICE = (16, 20)
AFFINE = np.array([[0, 0, -1.5, 80], [2, 0, 0, -90], [0, 1, 0, 40], [0, 0, 0, 1]], float)
TINY_TRAIN = ["--epochs", "1", "--nb-features", "4", "--nb-levels", "2", "--batch-size", "2"]


# ---- the shared session fixture: tiny models, an encoder and good files -----------------------------

def _slice(seed):
    """(labels uint8, image float32 in 0..200 whole numbers) of a phantom slice, SLICE-shaped."""
    rng = np.random.default_rng(seed)
    labels = phantom_labels(SLICE, rng)
    return labels, np.round(phantom_image(labels, rng) * 500).astype(np.float32)


def _save(path, array, affine=AFFINE, dtype=None):
    image = nib.Nifti1Image(array, affine, dtype=dtype or array.dtype)
    image.to_filename(path)
    return path


@pytest.fixture(scope="session")
def good(tmp_path_factory):
    """Folder of valid inputs: encoder, segmentation and registration models, slices and label maps."""
    folder = tmp_path_factory.mktemp("good")
    cifl_tf.save_encoder(cifl_tf.CIFLEncoder(channels=3, features=4), str(folder / "enc.weights.h5"))
    models.save_model(cifl_tf.segmentation_model(SLICE, 5, nb_features=4, nb_levels=2), str(folder / "seg.keras"))
    models.save_model(cifl_tf.registration_model(SLICE, nb_unet_features=[[4], [4, 4]], int_steps=0),
                      str(folder / "reg.keras"))
    for n in range(2):
        labels, image = _slice(n)
        _save(folder / f"image{n}.nii.gz", image[..., np.newaxis])
        _save(folder / f"labels{n}.nii.gz", labels[..., np.newaxis])
    return folder


def _pair_list(folder, good, image=None, labels=None):
    """A list file of two good image,labels pairs and a third pair with `image` or `labels` swapped in."""
    lines = [f"{good / f'image{n}.nii.gz'},{good / f'labels{n}.nii.gz'}" for n in range(2)]
    lines.append(f"{image or good / 'image0.nii.gz'},{labels or good / 'labels0.nii.gz'}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


# ---- malformed NIfTI files: name -> builder(folder) -> (path, problem regex) -------------------------

def _header(shape=(*SLICE, 1), dtype=np.float32):
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(AFFINE, 1)
    return header


def _raw(path, header, payload=b""):
    """Writes a header and voxel bytes as they are, with no checks (what a broken writer does)."""
    if not header.get_data_offset():  # else the offset under test
        header.set_data_offset(352)
    block = header.binaryblock + b"\0" * 4 + payload
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(block)
    return path


def _image_bytes(dtype=np.float32):
    return np.ones(SLICE, dtype).tobytes()


def _good_bytes():
    """The bytes of a valid uncompressed .nii slice."""
    image = _slice(0)[1][..., np.newaxis]
    return nib.Nifti1Image(image, AFFINE).to_bytes()


def _write(path, content):
    path.write_bytes(content)
    return path


def _truncated_gzip(folder, keep):
    whole = gzip.compress(_good_bytes())
    return _write(folder / "truncated.nii.gz", whole[:keep(len(whole))])


def _with_dims(dims):
    header = _header()
    header["dim"][:len(dims)] = dims
    return header


def _affine_header(sform=None, qform=None):
    header = _header()
    header.set_sform(None, 0)
    header.set_qform(None, 0)
    if sform is not None:  # set field by field: nibabel refuses to decompose a singular affine
        header["srow_x"], header["srow_y"], header["srow_z"] = sform[:3]
        header["sform_code"] = 1
    if qform is not None:
        header.set_qform(qform, 1)
    return header


def _symlink_loop(folder):
    os.symlink("loop_b.nii.gz", folder / "loop_a.nii.gz")
    os.symlink("loop_a.nii.gz", folder / "loop_b.nii.gz")
    return folder / "loop_a.nii.gz"


def _under_a_file(folder):
    (folder / "plain.txt").write_text("a file, not a folder")
    return folder / "plain.txt" / "image.nii.gz"


def _nan_slice(value, dtype=np.float32):
    image = _slice(0)[1][..., np.newaxis].astype(dtype)
    image[2:4, 3:9] = value
    return image


UNREADABLE = "not a readable NIfTI image"
BAD_NIFTI = {
    "empty .nii": lambda d: (_write(d / "empty.nii", b""), UNREADABLE),
    "empty .nii.gz": lambda d: (_write(d / "empty.nii.gz", b""), UNREADABLE),
    "truncated gzip, half": lambda d: (_truncated_gzip(d, lambda n: n // 2), UNREADABLE),
    "truncated gzip, header only": lambda d: (_truncated_gzip(d, lambda n: 10), UNREADABLE),
    "truncated gzip, trailer cut": lambda d: (_truncated_gzip(d, lambda n: n - 6), UNREADABLE),
    "gzip of junk": lambda d: (_write(d / "junk.nii.gz", gzip.compress(os.urandom(2000))), UNREADABLE),
    "truncated .nii voxels": lambda d: (_write(d / "short.nii", _good_bytes()[:400]), UNREADABLE),
    "header only .nii": lambda d: (_raw(d / "bare.nii", _header()), UNREADABLE),
    "wrong magic": lambda d: (_write(d / "magic.nii", _good_bytes()[:344] + b"xx1\0" + _good_bytes()[348:]),
                              UNREADABLE),
    "wrong magic .gz": lambda d: (_write(d / "magic.nii.gz", gzip.compress(
        _good_bytes()[:344] + b"ni9\0" + _good_bytes()[348:])), UNREADABLE),
    "text file": lambda d: (_write(d / "notes.nii.gz", b"a text file\n"), UNREADABLE),
    "random bytes": lambda d: (_write(d / "noise.nii", os.urandom(4096)), UNREADABLE),
    "voxel offset past the end": lambda d: (_raw(d / "offset.nii", _with_offset(10 ** 6)), UNREADABLE),
    "zero dimension": lambda d: (_raw(d / "zero.nii", _with_dims([3, 0, 20, 1])), "dimensions .* must all be positive"),
    "negative dimension": lambda d: (_raw(d / "negative.nii", _with_dims([3, -16, 20, 1]), _image_bytes()),
                                     "dimensions .* must all be positive"),
    "rank 0": lambda d: (_raw(d / "rank0.nii", _with_dims([0])), "dimensions .* must all be positive"),
    "1e10 voxels .nii": lambda d: (_raw(d / "huge.nii", _header((3000, 3000, 1200))), "claims 10800000000 voxels"),
    "1e10 voxels .nii.gz": lambda d: (_raw(d / "huge.nii.gz", _header((3000, 3000, 1200)), _image_bytes()),
                                      "claims 10800000000 voxels"),
    "2^31 voxels int8": lambda d: (_raw(d / "huge8.nii.gz", _header((2048, 1024, 1024), np.int8)),
                                   "claims 2147483648 voxels"),
    "4D, 3 volumes": lambda d: (_save(d / "volumes.nii.gz", np.ones((*SLICE, 1, 3), np.float32)), "has 3 dimensions"),
    "5D": lambda d: (_save(d / "five.nii.gz", np.ones((*SLICE, 1, 2, 2), np.float32)), "has 4 dimensions"),
    "3D volume": lambda d: (_save(d / "volume.nii.gz", np.ones((*SLICE, 4), np.float32)), "has 3 dimensions"),
    "1D": lambda d: (_save(d / "line.nii.gz", np.ones(20, np.float32)), "has 1 dimensions"),
    "complex64": lambda d: (_save(d / "complex.nii.gz", np.ones((*SLICE, 1), np.complex64)),
                            "voxel type complex64 is not a real"),
    "complex128": lambda d: (_save(d / "complex.nii", np.ones((*SLICE, 1), np.complex128)),
                             "voxel type complex128 is not a real"),
    "RGB": lambda d: (_save(d / "rgb.nii.gz", np.zeros((*SLICE, 1), [("R", "u1"), ("G", "u1"), ("B", "u1")])),
                      "voxel type .* is not a real"),
    "all NaN": lambda d: (_save(d / "nan.nii.gz", np.full((*SLICE, 1), np.nan, np.float32)), "320 NaN/Inf voxels"),
    "all Inf": lambda d: (_save(d / "inf.nii.gz", np.full((*SLICE, 1), np.inf, np.float32)), "320 NaN/Inf voxels"),
    "some NaN float64": lambda d: (_save(d / "nan64.nii", _nan_slice(np.nan, np.float64)), "12 NaN/Inf voxels"),
    "some -Inf": lambda d: (_save(d / "neginf.nii.gz", _nan_slice(-np.inf)), "12 NaN/Inf voxels"),
    "float64 beyond float32": lambda d: (_save(d / "big.nii.gz", _nan_slice(1e300, np.float64)),
                                         "12 NaN/Inf voxels"),
    "NaN scl_inter": lambda d: (_raw(d / "inter.nii", _scaled(2.0, np.nan), _image_bytes(np.int16)),
                                "invalid intercept"),
    "zero affine": lambda d: (_raw(d / "zero_affine.nii", _affine_header(sform=np.zeros((4, 4))), _image_bytes()),
                              "singular or non-finite .*affine"),
    "singular affine": lambda d: (_raw(d / "flat.nii", _affine_header(sform=np.diag([1.0, 1, 0, 1])), _image_bytes()),
                                  "singular or non-finite .*affine"),
    "NaN affine": lambda d: (_raw(d / "nan_affine.nii", _affine_header(sform=np.full((4, 4), np.nan)), _image_bytes()),
                             "singular or non-finite .*affine"),
    "sform and qform disagree": lambda d: (
        _raw(d / "forms.nii", _affine_header(sform=AFFINE, qform=np.diag([1.0, 1, 1, 1])), _image_bytes()),
        "sform .* and qform .* disagree"),
    "a folder": lambda d: (_folder(d / "folder.nii.gz"), "not a file"),
    "a symlink loop": lambda d: (_symlink_loop(d), "too many levels of symbolic links"),
    "a path through a file": lambda d: (_under_a_file(d), "not a directory"),
    "a device": lambda d: ("/dev/zero", "not a file"),
    "missing": lambda d: (d / "missing.nii.gz", "no such file"),
}


def _with_offset(offset):
    header = _header()
    header.set_data_offset(offset)
    return header


def _scaled(slope, inter):
    header = _header(dtype=np.int16)
    header["scl_slope"], header["scl_inter"] = slope, inter
    return header


def _folder(path):
    path.mkdir()
    return path


# ---- where a malformed file goes: sub-command rows. OUT is the output path checked to stay unwritten --

OUT = "OUT"
IMAGE_ROLES = {
    "features": lambda g, bad, d: ["features", bad, OUT, "--encoder", g / "enc.weights.h5"],
    "segment": lambda g, bad, d: ["segment", "--model", g / "seg.keras", bad, OUT],
    "register --moving": lambda g, bad, d: ["register", "--model", g / "reg.keras", "--moving", bad,
                                            "--fixed", g / "image1.nii.gz", "--moved", OUT],
    "register --fixed": lambda g, bad, d: ["register", "--model", g / "reg.keras", "--moving", g / "image0.nii.gz",
                                           "--fixed", bad, "--moved", OUT],
    "evaluate image": lambda g, bad, d: ["evaluate", "--model", g / "seg.keras", "--data", _pair_list(d, g, image=bad),
                                         "--part", "all", "--json", OUT],
    "evaluate labels": lambda g, bad, d: ["evaluate", "--model", g / "seg.keras",
                                          "--data", _pair_list(d, g, labels=bad), "--part", "all", "--json", OUT],
    "train-seg": lambda g, bad, d: ["train-seg", "--data", _pair_list(d, g, image=bad), "--out", OUT, *TINY_TRAIN],
    "train-reg": lambda g, bad, d: ["train-reg", "--data", _pair_list(d, g, labels=bad), "--out", OUT,
                                    "--steps-per-epoch", "1", *TINY_TRAIN],
}


def run(capsys, argv):
    """(exit status, stdout, stderr) of `cifl argv` run in this process."""
    status = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _tree(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def assert_fails_cleanly(capsys, tmp_path, argv, named, problem):
    """Runs argv (OUT: a path in a fresh folder) and checks the failure: status 2, one line naming
    `named` and matching `problem`, no traceback, nothing written anywhere under tmp_path."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    argv = [out / "result.nii.gz" if arg == OUT and argv[0] != "evaluate" else
            out / "scores.json" if arg == OUT else arg for arg in argv]
    before = _tree(tmp_path)
    status, stdout, err = run(capsys, argv)
    assert status == 2, (status, stdout, err)
    assert len(err.splitlines()) == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert err.startswith(f"cifl {argv[0]}: error: "), err
    assert str(named) in err and re.search(problem, err, re.IGNORECASE), err
    assert _tree(tmp_path) == before, "a file was written or left behind"


@pytest.mark.parametrize("bad", sorted(BAD_NIFTI))
@pytest.mark.parametrize("role", sorted(IMAGE_ROLES))
def test_malformed_nifti_fails_with_one_line_naming_it(good, tmp_path, capsys, role, bad):
    path, problem = BAD_NIFTI[bad](tmp_path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    assert_fails_cleanly(capsys, tmp_path, IMAGE_ROLES[role](good, path, tmp_path), path, problem)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # nothing near the claimed size
