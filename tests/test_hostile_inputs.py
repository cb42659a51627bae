"""Hostile inputs (issue 11, item 3): every `cifl` sub-command that reads files, on malformed files.

Each malformed input is generated here (none is committed) and given, in each role it can play, to
each sub-command that reads it. Every run must end with exit status 2 and one line on stderr that
names the file and the problem, with no traceback and no file written or left behind. The valid
variants of the same files (integer types, scaled data, trailing singleton axes, .nii, qform-only)
run beside them and must give the same results as a plain float32 file.

Tables: BAD_NIFTI (named kinds of damage) and FUZZED_NIFTI (systematic cuts, bit flips, header
codes) of images and label maps, BAD_MODELS, BAD_ENCODERS, BAD_OUTPUT_FILES / BAD_OUTPUT_FOLDERS and
BAD_RUNS (--resume of every training command, RESUME_ROLES) and BAD_ENCODER_SETTINGS (train-encoder's
own fields). A new sub-command that reads files is one more row in IMAGE_ROLES,
MODEL_ROLES, ENCODER_ROLES, OUTPUT_ROLES or RESUME_ROLES. Where cases repeat one kind of failure (one
message), the default run keeps one of each kind (`cases`; SAMPLE for the sub-commands that load a model
before the image); `-m slow` runs every case.
"""
import functools
import gzip
import json
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest

import cifl_tf
import tensorflow as tf
from cifl_tf import cli, data, models
from cifl_tf.descriptors import MIND
from conftest import REPO, phantom_image, phantom_labels

SLICE = (16, 20)
AFFINE = np.array([[0, 0, -1.5, 80], [2, 0, 0, -90], [0, 1, 0, 40], [0, 0, 0, 1]], float)
TINY_TRAIN = ["--epochs", "1", "--nb-features", "4", "--nb-levels", "2", "--batch-size", "2"]


# ---- the shared session fixture: tiny models, an encoder and good files -----------------------------

def _slice(seed):
    """(labels uint8, image float32 in 0..200 whole numbers) of a phantom slice, SLICE-shaped."""
    rng = np.random.default_rng(seed)
    labels = phantom_labels(SLICE, rng)
    return labels, np.round(phantom_image(labels, rng) * 500).astype(np.float32)


def _save(path, array, affine=AFFINE):
    nib.Nifti1Image(array, affine, dtype=array.dtype).to_filename(path)
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


_load_model = models.load_model


@functools.cache
def _good_model(path, kind):
    return _load_model(path, kind)


@pytest.fixture
def good_models_read_once(good, monkeypatch):
    """models.load_model gives one model per good model file (and kind), read once a session: the cases that give
    a command a good model are about its other files, and reading and tracing a model is most of such a case."""
    def load_model(path, kind=None):
        return _good_model(path, kind) if pathlib.Path(path).parent == good else _load_model(path, kind)

    monkeypatch.setattr(models, "load_model", load_model)


def cases(rows, default):
    """pytest params of `rows` (tuples of arguments, the last one a case's name in its table): the cases named
    in `default`, one of each kind of failure, run by default; the others only in the slow run (`-m slow`)."""
    return [pytest.param(*row, id="-".join(row), marks=[] if row[-1] in default else [pytest.mark.slow])
            for row in rows]


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


def _truncated_gzip(folder, keep, name="truncated.nii.gz"):
    whole = gzip.compress(_good_bytes())
    return _write(folder / name, whole[:keep(len(whole))])


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


def _through_file(folder, name):
    """A path `name` inside a regular file: no folder can be made or read there."""
    (folder / "plain.txt").write_text("a file, not a folder")
    return folder / "plain.txt" / name


def _nan_slice(value, dtype=np.float32):
    image = _slice(0)[1][..., np.newaxis].astype(dtype)
    image[2:4, 3:9] = value
    return image


UNREADABLE = "not a readable NIfTI image"
DAMAGED = f"{UNREADABLE}|singular|disagree|dimensions|voxel type|NaN/Inf"  # whichever check a random change meets
BAD_NIFTI = {
    "empty .nii": lambda d: (_write(d / "empty.nii", b""), UNREADABLE),
    "empty .nii.gz": lambda d: (_write(d / "empty.nii.gz", b""), UNREADABLE),
    "truncated gzip, half": lambda d: (_truncated_gzip(d, lambda n: n // 2), UNREADABLE),
    "truncated gzip, header only": lambda d: (_truncated_gzip(d, lambda n: 10), UNREADABLE),
    "truncated gzip, trailer cut": lambda d: (_truncated_gzip(d, lambda n: n - 6), UNREADABLE),
    # nibabel reads any case of .gz as gzip
    "truncated gzip, trailer cut, .NII.GZ": lambda d: (_truncated_gzip(d, lambda n: n - 6, "CUT.NII.GZ"), UNREADABLE),
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
    "4D, 3 volumes": lambda d: (_save(d / "volumes.nii.gz", np.ones((*SLICE, 1, 3), np.float32)),
                                "holds 3 volumes or channels"),
    "5D": lambda d: (_save(d / "five.nii.gz", np.ones((*SLICE, 1, 2, 2), np.float32)),
                     "holds 4 volumes or channels"),
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
    # Inf as a float32 image; a label map is read at its stored precision, where 1e300 is out of range
    "float64 beyond float32": lambda d: (_save(d / "big.nii.gz", _nan_slice(1e300, np.float64)),
                                         r"12 NaN/Inf voxels \(as float32\)|label values .* outside 0\.\.2147483647"),
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
    "a path through a file": lambda d: (_through_file(d, "image.nii.gz"), "not a directory"),
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


# Sub-commands that load a model before they read images meet one file of each kind of damage in the default run
# (160 cases fewer), and every file in the slow run (`-m slow`). The others meet every file.
MODEL_FIRST = {"segment", "register --moving", "register --fixed", "evaluate image", "evaluate labels"}
SAMPLE = {"truncated gzip, half", "wrong magic", "1e10 voxels .nii.gz", "4D, 3 volumes", "complex64", "all NaN",
          "zero affine", "sform and qform disagree", "a symlink loop"}
NIFTI_CASES = [pytest.param(role, bad, id=f"{role}-{bad}",
                            marks=[pytest.mark.slow] if role in MODEL_FIRST and bad not in SAMPLE else [])
               for role in IMAGE_ROLES for bad in BAD_NIFTI]


@pytest.mark.parametrize("role, bad", NIFTI_CASES)
def test_malformed_nifti_fails_with_one_line_naming_it(good, good_models_read_once, tmp_path, capsys, role, bad):
    path, problem = BAD_NIFTI[bad](tmp_path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    assert_fails_cleanly(capsys, tmp_path, IMAGE_ROLES[role](good, path, tmp_path), path, problem)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # nothing near the claimed size


def _flip(content, position):
    return content[:position] + bytes([content[position] ^ 0x10]) + content[position + 1:]


def _with_field(name, value):
    header = _header()
    header[name] = value
    return header


def _fuzzed():
    """Systematic damage to one valid slice: name -> builder(folder) -> (path, problem). The file cut
    short at 39 points, .nii and .nii.gz; one bit flipped at 20 points of the deflate stream (between
    the gzip header and trailer, so the CRC catches it if the header checks do not); datatype codes and
    ranks out of range."""
    plain = _good_bytes()
    packed = gzip.compress(plain, mtime=0)
    cases = {}
    for k in range(1, 40):
        cases[f".nii cut at {k}/40"] = lambda d, n=len(plain) * k // 40: (_write(d / "cut.nii", plain[:n]),
                                                                            UNREADABLE)
        cases[f".nii.gz cut at {k}/40"] = lambda d, n=len(packed) * k // 40: (_write(d / "cut.nii.gz", packed[:n]),
                                                                                UNREADABLE)
    # Up to the deflate stream's last byte but one: that byte's padding bits carry nothing.
    for position in np.linspace(10, len(packed) - 10, 20).astype(int):
        cases[f".nii.gz byte {position} flipped"] = lambda d, p=position: (_write(d / "flipped.nii.gz",
                                                                                  _flip(packed, p)), DAMAGED)
    for code in (0, 1, 3, 32, 99, 128, 1792, 2048, 2304, 4096):
        cases[f"datatype code {code}"] = lambda d, c=code: (
            _raw(d / "code.nii", _with_field("datatype", c), _image_bytes()),
            f"{UNREADABLE}|is not a real integer or float type")
    for rank in (-1, 8, 100):
        cases[f"rank {rank}"] = lambda d, r=rank: (_raw(d / "rank.nii", _with_field("dim", [r, 16, 20, 1, 1, 1, 1, 1]),
                                                        _image_bytes()), UNREADABLE)
    return cases


FUZZED_NIFTI = _fuzzed()


def _family(name):
    """".nii.gz cut at 7/40" -> ".nii.gz cut at #/#": the systematic family a fuzzed case belongs to."""
    return re.sub(r"-?\d+", "#", name)


# By default the first case of each family (a cut .nii, a cut .nii.gz, a flipped byte, a datatype code, a rank);
# the python API test above reads every file of BAD_NIFTI with both readers.
FUZZED_DEFAULT = {min(name for name in FUZZED_NIFTI if _family(name) == family)
                  for family in set(map(_family, FUZZED_NIFTI))}


@pytest.mark.parametrize("bad", cases([(name,) for name in sorted(FUZZED_NIFTI)], FUZZED_DEFAULT))
def test_fuzzed_nifti_fails_with_one_line_naming_it(good, tmp_path, capsys, bad):
    path, problem = FUZZED_NIFTI[bad](tmp_path)
    assert_fails_cleanly(capsys, tmp_path, IMAGE_ROLES["features"](good, path, tmp_path), path, problem)


@pytest.mark.parametrize("bad", sorted(BAD_NIFTI))
@pytest.mark.parametrize("reader", [data.load_nifti, data.load_labels])
def test_python_api_raises_a_data_error_naming_the_file(tmp_path, reader, bad):
    path, problem = BAD_NIFTI[bad](tmp_path)
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(path))}: [^\n]*(?i:{problem})[^\n]*$"):
        reader(path, ndim=2)


# ---- malformed model files (.keras): name -> builder(folder, good model file, kind) -> (path, problem) --

NOT_OURS = "not a cifl_tf model file"
CANNOT_LOAD = "cannot load the (segmentation|registration) model"


def _archive(path, source, config=None, weights=None, drop=()):
    """A copy of the .keras archive `source`, its config edited by `config` or its weights bytes by `weights`."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w") as copy:
        for item in original.namelist():
            content = original.read(item)
            if item == "config.json" and config:
                content = json.dumps(config(json.loads(content))).encode()
            if item == "model.weights.h5" and weights:
                content = weights(content)
            if item not in drop:
                copy.writestr(item, content)
    return path


def _arguments(**changes):
    """Edits the constructor arguments in a Keras config (a .keras model's, or an encoder's)."""
    def edit(config):
        config["config"].update(changes)
        return config
    return edit


def _renamed(name):
    def edit(config):
        config["registered_name"] = name
        return config
    return edit


def _other_shapes(kind):  # the same model with wider layers: the stored weights no longer fit
    return (_arguments(nb_labels=3, nb_features=8) if kind == "seg" else
            _arguments(nb_unet_features=[[8], [8, 8]]))


def _functional_with_lambda(path):
    image = tf.keras.Input((*SLICE, 1))
    tf.keras.Model(image, tf.keras.layers.Lambda(lambda x: x * 2)(image)).save(str(path))
    return path


def _lambda_config():
    return tf.keras.utils.serialize_keras_object(tf.keras.layers.Lambda(lambda x: x * 2))


UNKNOWN_CONFIG = {"module": "evil", "class_name": "Evil", "registered_name": "evil>Evil", "config": {}}

BAD_MODELS = {
    "empty file": lambda d, m, k: (_write(d / "empty.keras", b""), NOT_OURS),
    "text file": lambda d, m, k: (_write(d / "text.keras", b"weights?"), NOT_OURS),
    "truncated archive": lambda d, m, k: (_write(d / "cut.keras", m.read_bytes()[:m.stat().st_size // 2]), NOT_OURS),
    "archive cut by 10 bytes": lambda d, m, k: (_write(d / "cut.keras", m.read_bytes()[:-10]), NOT_OURS),
    "no config.json": lambda d, m, k: (_archive(d / "bare.keras", m, drop=("config.json",)), NOT_OURS),
    "config not JSON": lambda d, m, k: (_archive(d / "junk.keras", m, config=lambda c: "{"), NOT_OURS),
    "config a list": lambda d, m, k: (_archive(d / "list.keras", m, config=lambda c: [c]), NOT_OURS),
    "unknown class": lambda d, m, k: (_archive(d / "unknown.keras", m, config=_renamed("evil>Evil")), NOT_OURS),
    "Functional with a Lambda": lambda d, m, k: (_functional_with_lambda(d / "lambda.keras"),
                                                 NOT_OURS + r" \(it holds a 'Functional'"),
    "Lambda layer as encoder": lambda d, m, k: (_archive(d / "lambda_encoder.keras", m,
                                                         config=lambda c: _arguments(encoder=_lambda_config())(c)),
                                                "holds a Lambda layer"),
    "unknown class as encoder": lambda d, m, k: (_archive(d / "unknown_encoder.keras", m,
                                                          config=_arguments(encoder=UNKNOWN_CONFIG)), CANNOT_LOAD),
    "bad argument": lambda d, m, k: (_archive(d / "zero.keras", m, config=_arguments(inshape=[0, 20])), CANNOT_LOAD),
    "unknown argument": lambda d, m, k: (_archive(d / "extra.keras", m, config=_arguments(bogus=1)), CANNOT_LOAD),
    "weights of other shapes": lambda d, m, k: (_archive(d / "wide.keras", m, config=_other_shapes(k)), CANNOT_LOAD),
    "weights truncated": lambda d, m, k: (_archive(d / "weights.keras", m, weights=lambda w: w[:len(w) // 2]),
                                          CANNOT_LOAD),
    "weights missing": lambda d, m, k: (_archive(d / "weightless.keras", m, drop=("model.weights.h5",)), CANNOT_LOAD),
    "folder without model.keras": lambda d, m, k: (_folder(d / "run"), "no such model file"),
    "missing": lambda d, m, k: (d / "missing.keras", "no such model file"),
}
MODEL_ROLES = {  # role -> (model kind, argv)
    "segment": ("seg", lambda g, bad, d: ["segment", "--model", bad, g / "image0.nii.gz", OUT]),
    "register": ("reg", lambda g, bad, d: ["register", "--model", bad, "--moving", g / "image0.nii.gz",
                                           "--fixed", g / "image1.nii.gz", "--moved", OUT]),
    "evaluate": ("seg", lambda g, bad, d: ["evaluate", "--model", bad, "--data", _pair_list(d, g), "--part", "all",
                                           "--json", OUT]),
}


# One of each message: not our file, a foreign Functional, a Lambda, a config or weights that do not load, none.
MODELS_DEFAULT = {"text file", "Functional with a Lambda", "Lambda layer as encoder", "unknown argument",
                  "weights truncated", "missing"}


@pytest.mark.parametrize("role, bad", cases([(role, bad) for role in sorted(MODEL_ROLES) for bad in sorted(BAD_MODELS)],
                                            MODELS_DEFAULT))
def test_malformed_model_file_fails_with_one_line_naming_it(good, tmp_path, capsys, role, bad):
    kind, argv = MODEL_ROLES[role]
    path, problem = BAD_MODELS[bad](tmp_path, good / f"{kind}.keras", kind)
    assert_fails_cleanly(capsys, tmp_path, argv(good, path, tmp_path), path, problem)


# ---- malformed encoders (weights .h5 + config .json): name -> builder(folder, good) -> (weights, named, problem)

def _encoder_copy(folder, good, config=None, weights=None):
    """enc.weights.h5 and enc.json in `folder`: the good encoder's, with `config` (a dict, or text) or
    `weights` (bytes -> bytes) changed."""
    encoder_config = json.loads((good / "enc.json").read_text())
    content = config(encoder_config) if config else encoder_config
    _write(folder / "enc.json", content if isinstance(content, bytes) else
           (content if isinstance(content, str) else json.dumps(content)).encode())
    stored = (good / "enc.weights.h5").read_bytes()
    _write(folder / "enc.weights.h5", weights(stored) if weights else stored)
    return folder / "enc.weights.h5"


def _stacked_with(other):
    """Edits an encoder's config into a FeatureStack's of that encoder and `other`, a layer."""
    def edit(config):
        stack = tf.keras.utils.serialize_keras_object(cifl_tf.FeatureStack([MIND(), MIND()]))
        stack["config"]["describers"] = [config, tf.keras.utils.serialize_keras_object(other)]
        return stack
    return edit


def _bad_encoder(config=None, weights=None, named="enc.json", problem=""):
    return lambda d, g: (_encoder_copy(d, g, config, weights), d / named, problem)


NOT_ENCODER = "does not describe a CIFLEncoder \\(or a Triplanar or FeatureStack\\)"
NO_WEIGHTS = "weights do not load into the encoder"
BAD_ENCODERS = {
    "config of another class": _bad_encoder(lambda c: {**c, "registered_name": "cifl_tf>L2Normalize"},
                                            problem=NOT_ENCODER),
    "config of a Lambda": _bad_encoder(lambda c: _lambda_config(), problem=NOT_ENCODER),
    "config a list": _bad_encoder(lambda c: [c], problem=NOT_ENCODER),
    "config empty": _bad_encoder(lambda c: "", problem="not valid JSON"),
    "config not JSON": _bad_encoder(lambda c: "{'channels': 3", problem="not valid JSON"),
    "config binary": _bad_encoder(lambda c: b"\xff\xfe{", problem="not valid JSON"),
    "bad argument": _bad_encoder(_arguments(channels=-1), problem="not a valid CIFLEncoder config"),
    "unknown argument": _bad_encoder(_arguments(bogus=1), problem="not a valid CIFLEncoder config"),
    "stack of mixed ndims": _bad_encoder(_stacked_with(MIND(ndim=3)), problem="not a valid FeatureStack config"),
    "stack of a non-describer": _bad_encoder(_stacked_with(tf.keras.layers.Dense(2)),
                                             problem="not a valid FeatureStack config"),
    "weights of other shapes": _bad_encoder(_arguments(features=8), named="enc.weights.h5",
                                            problem=NO_WEIGHTS),
    "weights truncated": _bad_encoder(weights=lambda w: w[:len(w) // 2], named="enc.weights.h5", problem=NO_WEIGHTS),
    "weights text": _bad_encoder(weights=lambda w: b"weights?", named="enc.weights.h5", problem=NO_WEIGHTS),
    "weights empty": _bad_encoder(weights=lambda w: b"", named="enc.weights.h5", problem=NO_WEIGHTS),
    "config missing": lambda d, g: (_write(d / "enc.weights.h5", (g / "enc.weights.h5").read_bytes()),
                                    d / "enc.json", "no such file"),
    "folder without weights": lambda d, g: (_folder(d / "run"), d / "run" / "encoder.weights.h5", "no such file"),
}
ENCODER_ROLES = {
    "features": lambda g, bad, d: ["features", g / "image0.nii.gz", OUT, "--encoder", bad],
    "train-seg": lambda g, bad, d: ["train-seg", "--data", _pair_list(d, g), "--out", OUT, "--encoder", bad,
                                    *TINY_TRAIN],
    "train-reg": lambda g, bad, d: ["train-reg", "--data", _pair_list(d, g), "--out", OUT, "--encoder", bad,
                                    "--steps-per-epoch", "1", *TINY_TRAIN],
}


# One of each message: not an encoder, not JSON, not a valid config, weights that do not load, a missing file.
ENCODERS_DEFAULT = {"config of a Lambda", "config not JSON", "bad argument", "stack of mixed ndims",
                    "weights truncated", "config missing", "folder without weights"}


@pytest.mark.parametrize("role, bad", cases([(role, bad) for role in sorted(ENCODER_ROLES)
                                             for bad in sorted(BAD_ENCODERS)], ENCODERS_DEFAULT))
def test_malformed_encoder_fails_with_one_line_naming_it(good, tmp_path, capsys, role, bad):
    path, named, problem = BAD_ENCODERS[bad](tmp_path, good)
    assert_fails_cleanly(capsys, tmp_path, ENCODER_ROLES[role](good, path, tmp_path), named, problem)


# ---- outputs that cannot be written: checked before any work --------------------------------------

BAD_OUTPUT_FILES = {  # name -> builder(folder, file name) -> (path, problem)
    "a folder": lambda d, name: (_folder(d / name), "is a folder, not a file"),
    "under a regular file": lambda d, name: (_through_file(d, name), "no such folder to write to"),
    "in a missing folder": lambda d, name: (d / "missing" / name, "no such folder to write to"),
    "in /proc": lambda d, name: (f"/proc/{name}", "cannot write in /proc"),
}
BAD_OUTPUT_FOLDERS = {  # name -> builder(folder) -> (path, problem)
    "a regular file": lambda d: (_write(d / "run", b"a file"), "is not a folder"),
    "under a regular file": lambda d: (_through_file(d, "run"), "is not a folder"),
    "a symlink loop": lambda d: (_symlink_loop(d), "is not a folder"),
    "in /proc": lambda d: ("/proc/cifl-run", "cannot write in /proc"),
}
OUTPUT_ROLES = {  # role -> (file name, or None for a folder; argv with OUT the output)
    "features": ("f.nii.gz", lambda g, d: ["features", g / "image0.nii.gz", OUT, "--encoder", g / "enc.weights.h5"]),
    "segment": ("s.nii", lambda g, d: ["segment", "--model", g / "seg.keras", g / "image0.nii.gz", OUT]),
    "register --moved": ("m.nii.gz", lambda g, d: ["register", "--model", g / "reg.keras", "--moving",
                                                   g / "image0.nii.gz", "--fixed", g / "image1.nii.gz",
                                                   "--moved", OUT]),
    "register --warp": ("w.nii.gz", lambda g, d: ["register", "--model", g / "reg.keras", "--moving",
                                                  g / "image0.nii.gz", "--fixed", g / "image1.nii.gz",
                                                  "--moved", d / "moved.nii.gz", "--warp", OUT]),
    "evaluate --json": ("scores.json", lambda g, d: ["evaluate", "--model", g / "seg.keras", "--data",
                                                     _pair_list(d, g), "--part", "all", "--json", OUT]),
    "train-seg --out": (None, lambda g, d: ["train-seg", "--data", _pair_list(d, g), "--out", OUT, *TINY_TRAIN]),
    "train-reg --out": (None, lambda g, d: ["train-reg", "--data", _pair_list(d, g), "--out", OUT,
                                            "--steps-per-epoch", "1", *TINY_TRAIN]),
}
OUTPUT_CASES = [(role, bad) for role, (name, _) in OUTPUT_ROLES.items()
                for bad in (BAD_OUTPUT_FILES if name else BAD_OUTPUT_FOLDERS)]


@pytest.mark.parametrize("role, bad", OUTPUT_CASES)
def test_unwritable_output_fails_before_any_work(good, tmp_path, capsys, role, bad):
    name, argv = OUTPUT_ROLES[role]
    path, problem = BAD_OUTPUT_FILES[bad](tmp_path, name) if name else BAD_OUTPUT_FOLDERS[bad](tmp_path)
    argv = [path if arg == OUT else arg for arg in argv(good, tmp_path)]
    assert_fails_cleanly(capsys, tmp_path, argv, path, problem)


# ---- --resume of a training command on a broken run folder ------------------------------------------

# train-reg without integration steps: each resume builds the model before it reads the run (~1 s with them)
TRAIN_RESUME = {"train-seg": TINY_TRAIN, "train-reg": ["--steps-per-epoch", "1", "--int-steps", "0", *TINY_TRAIN]}


@pytest.fixture(scope="session")
def stopped_runs(good, tmp_path_factory):
    """Factory: command -> a fresh copy of a train-seg or train-reg run stopped after its checkpoint
    (model.keras removed), and the argv that resumes it."""
    import shutil

    runs = {}
    for command, argv in TRAIN_RESUME.items():
        folder = tmp_path_factory.mktemp(command)
        argv = [command, "--data", _pair_list(folder, good), "--out", folder / "run", *argv]
        assert cli.main([str(arg) for arg in argv]) == 0
        (folder / "run" / models.MODEL_FILE).unlink()
        runs[command] = folder, argv

    def copy(command):
        folder, argv = runs[command]
        copied = shutil.copytree(folder, tmp_path_factory.mktemp("resume") / command)
        moved = {str(folder / "pairs.csv"): str(copied / "pairs.csv"), str(folder / "run"): str(copied / "run")}
        settings = json.loads((copied / "run" / "settings.json").read_text())  # the run as if started here
        (copied / "run" / "settings.json").write_text(json.dumps({k: moved.get(v, v) if isinstance(v, str) else v
                                                                  for k, v in settings.items()}))
        return copied / "run", [moved.get(str(arg), arg) for arg in argv] + ["--resume"]
    return copy


@pytest.mark.parametrize("command", TRAIN_RESUME)
def test_the_stopped_runs_resume_when_intact(stopped_runs, command):
    """The baseline of the broken-run cases below: the copied run, undamaged, resumes and finishes."""
    run_dir, argv = stopped_runs(command)
    assert cli.main([str(arg) for arg in argv]) == 0
    assert (run_dir / models.MODEL_FILE).is_file()


RESUME_ROLES = {  # command -> the run's checkpoint folder
    "train-encoder": "backup",
    "train-seg": "checkpoints",
    "train-reg": "checkpoints",
}


def _settings(edit):
    def build(run, checkpoints):
        path = run / "settings.json"
        settings = json.loads(path.read_text())
        content = edit(settings)
        path.write_bytes(content if isinstance(content, bytes) else
                         (content if isinstance(content, str) else json.dumps(content)).encode())
        return path
    return build


def _checkpoint(suffix, edit):
    """Edits one file of the latest checkpoint; the message names the checkpoint (its files' prefix)."""
    def build(run, checkpoints):
        prefix = pathlib.Path(tf.train.latest_checkpoint(str(run / checkpoints)))
        path = prefix.with_name(prefix.name + suffix)
        path.write_bytes(edit(path.read_bytes()))
        return prefix
    return build


def _checkpoint_index_deleted(run, checkpoints):
    """The state file names a checkpoint whose index is gone: resumed, it would start again from epoch 0."""
    prefix = pathlib.Path(tf.train.latest_checkpoint(str(run / checkpoints)))
    prefix.with_name(prefix.name + ".index").unlink()
    return run / checkpoints


def _checkpoints_a_file(run, checkpoints):
    shutil.rmtree(run / checkpoints)
    (run / checkpoints).write_text("not a folder")
    return run / checkpoints


def _settings_folder(run, checkpoints):
    (run / "settings.json").unlink()
    return _folder(run / "settings.json")


BAD_RUNS = {  # name -> (builder(run folder, its checkpoint folder) -> the file named, problem): every command
    "settings empty": (_settings(lambda s: ""), "not valid JSON"),
    "settings not JSON": (_settings(lambda s: "{\"steps\": 3"), "not valid JSON"),
    "settings binary": (_settings(lambda s: b"\xff\xfe{"), "not valid JSON"),
    "settings a list": (_settings(lambda s: [s]), "expected an object"),
    "settings unknown field": (_settings(lambda s: {**s, "bogus": 1}),
                               r"expected an object with the fields|settings \['bogus'\] differ"),
    "settings a folder": (_settings_folder, "is a directory"),
    "checkpoint data truncated": (_checkpoint(".data-00000-of-00001", lambda b: b[:len(b) // 2]),
                                  "damaged checkpoint"),
    "checkpoint data flipped": (_checkpoint(".data-00000-of-00001", lambda b: bytes(255 - x for x in b)),
                                "damaged checkpoint"),
    "checkpoint index truncated": (_checkpoint(".index", lambda b: b[:len(b) // 2]), "damaged checkpoint"),
    "checkpoint index deleted": (_checkpoint_index_deleted, "damaged checkpoint"),
    "checkpoints a file": (_checkpoints_a_file, "not a folder"),
}
BAD_ENCODER_SETTINGS = {  # name -> (builder, problem): train-encoder checks each field of its settings.json
    "settings missing field": (_settings(lambda s: {k: v for k, v in s.items() if k != "steps"}),
                               "expected an object with the fields"),
    "shape text": (_settings(lambda s: {**s, "shape": "32x32"}), "shape must be a list of 2 or 3 positive"),
    "shape 4D": (_settings(lambda s: {**s, "shape": [8, 8, 8, 8]}), "shape must be a list of 2 or 3 positive"),
    "shape zero": (_settings(lambda s: {**s, "shape": [0, 32]}), "shape must be a list of 2 or 3 positive"),
    "steps negative": (_settings(lambda s: {**s, "steps": -1}), "steps must be a positive integer"),
    "steps huge float": (_settings(lambda s: {**s, "steps": 1e300}), "steps must be a positive integer"),
    "batch size bool": (_settings(lambda s: {**s, "batch_size": True}), "batch_size must be a positive integer"),
    "tau zero": (_settings(lambda s: {**s, "tau_gamma": 0}), "tau_gamma must be a positive number"),
    "learning rate text": (_settings(lambda s: {**s, "learning_rate": "fast"}),
                           "learning_rate must be a positive number"),
    "seed negative": (_settings(lambda s: {**s, "seed": -1}), r"seed must be null or an integer in \[0, 2\*\*32\)"),
    "inversion invariant text": (_settings(lambda s: {**s, "inversion_invariant": "yes"}),
                                 "inversion_invariant must be true or false"),
    "use bias number": (_settings(lambda s: {**s, "use_bias": 0}), "use_bias must be true or false"),
    "pixel contrast negative": (_settings(lambda s: {**s, "pixel_contrast": -1}),
                                "pixel_contrast must be a non-negative number"),
    "local normalization zero": (_settings(lambda s: {**s, "local_normalization": 0}),
                                 "local_normalization must be null or a positive number"),
    "unknown synthesis argument": (_settings(lambda s: {**s, "synth_kwargs": {"bogus": 1}}),
                                   "synth_kwargs must be an object of"),
    "precision unknown": (_settings(lambda s: {**s, "precision": "float16"}), "precision must be one of"),
}
RESUME_CASES = [(command, bad) for command in RESUME_ROLES for bad in BAD_RUNS] + \
               [("train-encoder", bad) for bad in BAD_ENCODER_SETTINGS]
# One of each message for every command, and each field check of train-encoder's settings once.
RESUME_DEFAULT = {"settings not JSON", "settings a list", "settings unknown field", "settings a folder",
                  "checkpoint data truncated", "checkpoint index deleted", "checkpoints a file", *BAD_ENCODER_SETTINGS} - {"shape text", "shape zero", "steps huge float"}


@pytest.mark.parametrize("command, bad", cases(RESUME_CASES, RESUME_DEFAULT))
def test_resume_of_a_broken_run_fails_with_one_line_naming_the_file(interrupted_run, stopped_runs, capsys,
                                                                   command, bad):
    if command == "train-encoder":
        run_dir = interrupted_run()
        argv = ["train-encoder", "--resume", "--out", run_dir]
    else:
        run_dir, argv = stopped_runs(command)
    build, problem = {**BAD_RUNS, **BAD_ENCODER_SETTINGS}[bad]
    named = build(run_dir, RESUME_ROLES[command])
    assert_fails_cleanly(capsys, run_dir, argv, named, problem)


# ---- valid variants of the same files: read as the plain float32 file, same results -----------------

def _stored(dtype):
    return lambda path, array, affine: _save(path, array[..., np.newaxis].astype(dtype), affine)


def _scaled_int16(path, array, affine):
    """int16 voxels with scl_slope 0.5 and scl_inter 10 that read back as `array`."""
    header = _header(dtype=np.int16)
    header.set_sform(affine, 1)
    header["scl_slope"], header["scl_inter"] = 0.5, 10
    return _raw(path, header, ((array[..., np.newaxis] - 10.0) * 2).astype(np.int16).tobytes("F"))


def _with_forms(sform_code, qform_code):
    def save(path, array, affine):
        image = nib.Nifti1Image(array[..., np.newaxis], None)
        image.header.set_sform(affine, sform_code)
        image.header.set_qform(affine, qform_code)
        image.to_filename(path)
        return path
    return save


VALID_VARIANTS = {  # name -> (file name, writer(path, (H, W) array, affine)); labels and images alike
    "float32 .nii.gz": ("f32.nii.gz", _stored(np.float32)),
    "float32 .nii": ("f32.nii", _stored(np.float32)),
    "float64": ("f64.nii.gz", _stored(np.float64)),
    "uint8": ("u8.nii.gz", _stored(np.uint8)),
    "int16 .nii": ("i16.nii", _stored(np.int16)),
    "int32": ("i32.nii.gz", _stored(np.int32)),
    "scaled int16": ("scaled.nii.gz", _scaled_int16),
    "no trailing axis (H, W)": ("hw.nii.gz", lambda path, array, affine: _save(path, array.astype(np.float32), affine)),
    "two trailing singleton axes": ("hw11.nii", lambda path, array, affine: _save(
        path, array[..., np.newaxis, np.newaxis].astype(np.float32), affine)),
    "qform only": ("qform.nii.gz", _with_forms(0, 1)),
    "sform only": ("sform.nii.gz", _with_forms(1, 0)),
    "sform and qform agree": ("both.nii.gz", _with_forms(2, 1)),
}


def _outputs(folder, good, image):
    """What the image-writing sub-commands make of `image`: features, label map, displacement, moved onto it."""
    runs = [
        ["features", image, folder / "features.nii.gz", "--encoder", good / "enc.weights.h5"],
        ["segment", "--model", good / "seg.keras", image, folder / "labels.nii.gz"],
        ["register", "--model", good / "reg.keras", "--moving", image, "--fixed", good / "image1.nii.gz",
         "--moved", folder / "moved.nii.gz", "--warp", folder / "warp.nii.gz"],
        ["register", "--model", good / "reg.keras", "--moving", good / "image1.nii.gz", "--fixed", image,
         "--moved", folder / "moved_onto.nii.gz"],
    ]
    for argv in runs:
        assert cli.main([str(arg) for arg in argv]) == 0, argv
    return {name: data.load_nifti(folder / name, channels=name in ("features.nii.gz", "warp.nii.gz"))[:2]
            for name in ("features.nii.gz", "labels.nii.gz", "warp.nii.gz", "moved_onto.nii.gz")}


@pytest.fixture(scope="module")
def plain_outputs(good, tmp_path_factory):
    """_outputs of the plain float32 slice that every valid variant stores."""
    folder = tmp_path_factory.mktemp("plain")
    return _outputs(folder, good, _stored(np.float32)(folder / "image.nii.gz", _slice(0)[1], AFFINE))


# Each variant runs four sub-commands (~3 s): by default one of each kind (an integer type, scaled data, extra
# axes, qform only); the evaluate test below reads every variant.
VARIANTS_DEFAULT = {"int16 .nii", "scaled int16", "two trailing singleton axes", "qform only"}


@pytest.mark.parametrize("variant", cases([(name,) for name in sorted(VALID_VARIANTS)], VARIANTS_DEFAULT))
def test_valid_variant_gives_the_outputs_of_the_plain_float32_file(good, good_models_read_once, plain_outputs, tmp_path,
                                                                   variant):
    name, write = VALID_VARIANTS[variant]
    outputs = _outputs(tmp_path, good, write(tmp_path / name, _slice(0)[1], AFFINE))
    for key, (array, affine) in plain_outputs.items():
        np.testing.assert_allclose(outputs[key][0], array, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(outputs[key][1], affine, atol=1e-5, err_msg=key)
    assert np.abs(outputs["warp.nii.gz"][0]).max() > 0  # the comparison above is not between two zero fields


def test_valid_variants_of_images_and_label_maps_score_alike(good, good_models_read_once, tmp_path, capsys):
    """Every variant of one (image, label map) pair, in one list: all score as the plain pair does."""
    labels, image = _slice(0)
    lines = []
    for n, (name, write) in enumerate(VALID_VARIANTS.values()):
        (tmp_path / str(n)).mkdir()
        lines.append(f"{write(tmp_path / str(n) / name, image, AFFINE)},"
                     f"{write(tmp_path / str(n) / f'labels_{name}', labels, AFFINE)}")
    (tmp_path / "variants.csv").write_text("\n".join(lines))
    (tmp_path / "plain.csv").write_text(lines[0])  # float32 .nii.gz
    scores = {}
    for name in ("variants", "plain"):
        status, _, err = run(capsys, ["evaluate", "--model", good / "seg.keras", "--data", tmp_path / f"{name}.csv",
                                      "--part", "all", "--json", tmp_path / f"{name}.json"])
        assert status == 0 and err == "", err
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["variants"]["images"] == len(VALID_VARIANTS) and scores["plain"]["images"] == 1
    def table(summary):  # rows (mean, std) of the mean Dice and of each label
        return [summary["dice"]] + [summary["per_label"][label] for label in sorted(summary["per_label"])]

    # Every variant read alike: the plain pair's Dice (one image, std 0), and no spread among the variants.
    np.testing.assert_allclose(table(scores["variants"]), table(scores["plain"]), atol=1e-12)


# ---- one real process: no traceback or warning at process level, and memory bounded ------------------

ADDRESS_SPACE = 3 * 2 ** 30  # enough for TensorFlow and a tiny model; a 10^10-voxel image is 40 GB
TF_LOG = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl|To enable the following instructions)")
# The `cifl` console script is sys.exit(cifl_tf.cli.main()): this runs main() as it does, once for each command of
# argv[1] (a JSON list of argvs) and in the same process, as commands run one after another. A process per command
# would import TensorFlow (~5 s) for each.
CONSOLE_COMMANDS = """
import json, sys
from cifl_tf import cli
for argv in json.loads(sys.argv[1]):
    sys.argv = ["cifl", *argv]
    print("exit status", cli.main(), flush=True)
"""


def _process(commands):
    """(exit status of each command, stderr lines that are not TensorFlow's own start-up log) of the `cifl`
    commands run in one Python process (CONSOLE_COMMANDS), its address space limited to ADDRESS_SPACE."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", CONSOLE_COMMANDS, json.dumps([list(map(str, argv))
                                                                               for argv in commands])],
                            capture_output=True, text=True, env=env, preexec_fn=limit, timeout=240)
    assert result.returncode == 0, result.stderr  # nothing failed outside the commands, nor at exit
    statuses = [int(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("exit status ")]
    return statuses, [line for line in result.stderr.splitlines() if not TF_LOG.match(line)]


PROCESS_CASES = {  # name -> (builder(folder, good) -> (argv, named), problem)
    # under ADDRESS_SPACE, reading the voxels the header claims would end in a MemoryError and its traceback
    "features of a 1e10-voxel header": (
        lambda d, g: (["features", BAD_NIFTI["1e10 voxels .nii.gz"](d)[0], d / "f.nii.gz", "--encoder",
                       g / "enc.weights.h5"], d / "huge.nii.gz"), "claims 10800000000 voxels"),
    # the lambda's module (this one) is not imported there: Keras would warn of it if it met the Lambda layer first
    "segment with a Lambda-layer model": (
        lambda d, g: (["segment", "--model", BAD_MODELS["Lambda layer as encoder"](d, g / "seg.keras", "seg")[0],
                       g / "image0.nii.gz", d / "s.nii.gz"], d / "lambda_encoder.keras"), "holds a Lambda layer"),
}


@pytest.mark.integration
def test_a_real_process_prints_one_line_per_failure_and_reads_a_valid_file_within_the_same_address_space(
        good, tmp_path):
    """Each of PROCESS_CASES fails with exit status 2 and one line, no traceback and no file written; then a
    valid file is read, with nothing on stderr, in the address space the failures had."""
    failures = {name: build(tmp_path, good) for name, (build, _) in PROCESS_CASES.items()}
    valid = ["features", good / "image0.nii.gz", tmp_path / "valid.nii.gz", "--encoder", good / "enc.weights.h5"]
    before = _tree(tmp_path)
    statuses, lines = _process([argv for argv, _ in failures.values()] + [valid])
    assert statuses == [2] * len(failures) + [0] and len(lines) == len(failures), (statuses, lines)
    for line, (name, (argv, named)) in zip(lines, failures.items()):
        assert line.startswith(f"cifl {argv[0]}: error: {named}") and re.search(PROCESS_CASES[name][1], line), lines
    assert _tree(tmp_path) == sorted(before + ["valid.nii.gz"])
    assert data.load_nifti(tmp_path / "valid.nii.gz", channels=True)[0].shape == (*SLICE, 3)
