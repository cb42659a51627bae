"""cifl_tf.data: NIfTI I/O, bad-input errors, transforms, slices, splits and loaders."""
import gzip
import logging
import os
import re

import nibabel as nib
import numpy as np
import pytest

from cifl_tf import data
from cifl_tf.data import DataError
from conftest import make_ixi, write_nifti
from test_hostile_inputs import _raw

SUBJECT_1 = "OASIS_OAS1_0001_MR1"


def raises_naming(path, problem):
    """pytest.raises(DataError) whose one-line message names ``path`` and ``problem``."""
    return pytest.raises(DataError, match=rf"^{re.escape(str(path))}\S*: [^\n]*{problem}[^\n]*$")


# --- NIfTI I/O -------------------------------------------------------------------------------------

def test_save_then_load_keeps_values_affine_and_header(tmp_path):
    array = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = (10, -20, 30)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    data.save_nifti(tmp_path / "a.nii.gz", array, affine, header)
    loaded, loaded_affine, loaded_header = data.load_nifti(tmp_path / "a.nii.gz", ndim=3)
    np.testing.assert_array_equal(loaded, array)
    np.testing.assert_allclose(loaded_affine, affine)
    assert loaded_header.get_xyzt_units() == ("mm", "sec")


@pytest.mark.parametrize("header_class", [nib.Nifti1Header, nib.Nifti2Header])
@pytest.mark.parametrize("channels", [False, True])
def test_save_resets_the_display_range_and_intent_of_the_input_header(tmp_path, capfd, header_class, channels):
    """They describe the input's values: a label map under the input's cal_max 100 would show nearly black."""
    header = header_class()
    header["cal_min"], header["cal_max"] = 0, 100
    header.set_intent("estimate")
    data.save_nifti(tmp_path / "out.nii.gz", np.ones((4, 5, 2), np.float32), np.eye(4), header, channels=channels)
    saved = nib.load(tmp_path / "out.nii.gz")
    assert isinstance(saved.header, header_class)  # NIfTI-2 stays NIfTI-2
    assert (saved.header["cal_min"], saved.header["cal_max"]) == (0, 0)
    assert saved.header.get_intent()[0] == ("vector" if channels else "none")
    assert capfd.readouterr().err == ""  # no "sizeof_hdr should be 348" from a NIfTI-1 image of a NIfTI-2 header


def test_save_keeps_integer_and_bool_labels(tmp_path):
    labels = np.arange(20, dtype=np.int64).reshape(4, 5)
    data.save_nifti(tmp_path / "labels.nii", labels)
    data.save_nifti(tmp_path / "mask.nii.gz", labels > 9)
    np.testing.assert_array_equal(data.load_labels(tmp_path / "labels.nii", labels=range(20)), labels)
    np.testing.assert_array_equal(data.load_labels(tmp_path / "mask.nii.gz", labels=(0, 1)), labels > 9)


@pytest.mark.parametrize("dtype", ["<f2", ">f2"])
@pytest.mark.parametrize("channels", [False, True])
def test_save_stores_float16_as_the_same_float32_values(tmp_path, channels, dtype):
    """NIfTI has no float16 (features of a mixed_float16 encoder are)."""
    features = np.random.default_rng(2).random((4, 5, 3)).astype(dtype)
    data.save_nifti(tmp_path / "features.nii.gz", features, channels=channels)
    assert nib.load(tmp_path / "features.nii.gz").get_data_dtype() == np.float32
    loaded = data.load_nifti(tmp_path / "features.nii.gz", ndim=2 if channels else 3, channels=channels)[0]
    np.testing.assert_array_equal(loaded, features.astype(np.float32))


@pytest.mark.parametrize("dtype", [object, "U3"])
def test_save_refuses_a_dtype_nifti_lacks_by_name_and_writes_nothing(tmp_path, dtype):
    with pytest.raises(ValueError, match=re.escape(f"save_nifti: cannot store {np.dtype(dtype)} values in NIfTI")):
        data.save_nifti(tmp_path / "out.nii.gz", np.zeros((4, 5), dtype))
    assert os.listdir(tmp_path) == []


def test_save_header_of_other_dtype_does_not_cast_the_data(tmp_path):
    write_nifti(tmp_path / "seg.nii.gz", np.ones((4, 5, 1), np.uint8))
    _, affine, header = data.load_nifti(tmp_path / "seg.nii.gz")
    features = np.full((4, 5), 0.25, np.float32)
    data.save_nifti(tmp_path / "features.nii.gz", features, affine, header)
    np.testing.assert_array_equal(data.load_nifti(tmp_path / "features.nii.gz")[0], features)


@pytest.mark.parametrize("shape", [(4, 5, 3), (4, 5, 6, 2)])
def test_multichannel_image_round_trips_as_vector_image(tmp_path, shape):
    features = np.random.default_rng(1).random(shape).astype(np.float32)
    data.save_nifti(tmp_path / "features.nii.gz", features, channels=True)
    loaded, _, header = data.load_nifti(tmp_path / "features.nii.gz", ndim=len(shape) - 1, channels=True)
    np.testing.assert_array_equal(loaded, features)
    assert header.get_intent()[0] == "vector"


@pytest.mark.parametrize("reserve", [True, False], ids=["posix_fallocate", "sparse"])
@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("name", ["features.nii", "features.nii.gz"])
@pytest.mark.parametrize("shape", [(4, 5, 3), (4, 5, 6, 2)])
def test_features_filled_in_the_file_are_the_bytes_save_nifti_writes(tmp_path, monkeypatch, name, shape, byte_order,
                                                                     reserve):
    """Header from a scaled int16 image, little- or big-endian: its slope must not scale the float
    features, and its byte order is kept, as save_nifti keeps it. With and without posix_fallocate (macOS)."""
    if not reserve:
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    write_nifti(tmp_path / "image.nii.gz", np.ones(shape[:-1], np.int16), affine=np.diag([2.0, 3.0, 4.0, 1.0]))
    _, affine, header = data.load_nifti(tmp_path / "image.nii.gz")
    header = header.as_byteswapped(byte_order)
    header.set_slope_inter(2.0, 1.0)
    features = np.random.default_rng(1).random(shape).astype(np.float32)
    (tmp_path / "expected").mkdir()
    data.save_nifti(tmp_path / "expected" / name, features, affine, header, channels=True)
    filled = []

    def fill(out):
        assert isinstance(out, np.memmap) and out.shape == shape and out.dtype == np.dtype(byte_order + "f4")
        out[...] = features
        filled.append(True)

    data.save_nifti_channels(tmp_path / name, shape, fill, affine, header)
    assert filled and (tmp_path / name).read_bytes() == (tmp_path / "expected" / name).read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted(["image.nii.gz", "expected", name])


def test_a_failed_fill_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "out.nii.gz"
    data.save_nifti(path, np.zeros((3, 4, 2), np.float32), channels=True)
    before = path.read_bytes()

    def crash_midway(out):
        out[0] = 1
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        data.save_nifti_channels(path, (3, 4, 2), crash_midway)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.nii.gz"]


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz"])
def test_remove_unfinished_files_removes_the_files_of_a_write_in_progress(tmp_path, name):
    """What a SIGTERM handler calls before ending the process: no temporary file may stay, neither the
    temporary output nor, for .nii.gz, the uncompressed file being filled."""
    seen = []

    def fill(out):
        out[...] = 1
        seen.extend(os.listdir(tmp_path))
        data.remove_unfinished_files()
        assert os.listdir(tmp_path) == []
        raise KeyboardInterrupt  # stands for the end of the process

    with pytest.raises(KeyboardInterrupt):
        data.save_nifti_channels(tmp_path / name, (3, 4, 2), fill)
    assert len(seen) == 1 and seen[0].startswith(".") and seen[0].endswith(".nii"), seen
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("shape, problem", [
    ((3, 0, 2), "shape must be a tuple of positive integers \\(\\*spatial, C\\), got \\(3, 0, 2\\)"),
    ((3, 4.0, 2), "shape must be a tuple of positive integers"),
    (5, "shape must be a tuple of positive integers .* got 5"),
    ((3, 4, 5, 6, 2), "save_nifti_channels: needs \\(\\*spatial, C\\) with 1-3 spatial axes"),
])
def test_features_filled_in_the_file_refuse_a_bad_shape(tmp_path, shape, problem):
    with pytest.raises(ValueError, match=problem):
        data.save_nifti_channels(tmp_path / "out.nii.gz", shape, lambda out: None)
    assert os.listdir(tmp_path) == []


def test_features_filled_in_the_file_refuse_a_fill_that_is_not_callable(tmp_path):
    with pytest.raises(ValueError, match="fill must be a callable .* got ndarray"):
        data.save_nifti_channels(tmp_path / "out.nii.gz", (3, 4, 2), np.zeros((3, 4, 2), np.float32))


def test_slice_stored_as_h_w_1_loads_as_h_w(tmp_path):
    image = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    write_nifti(tmp_path / "slice.nii.gz", image)
    np.testing.assert_array_equal(data.load_nifti(tmp_path / "slice.nii.gz", ndim=2)[0], image[..., 0])


def test_failed_save_leaves_old_file_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "out.nii.gz"
    data.save_nifti(path, np.zeros((3, 4), np.float32))
    before = path.read_bytes()

    def crash_midway(image, filename):
        with open(filename, "wb") as partial:
            partial.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        data.save_nifti(path, np.ones((3, 4), np.float32))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.nii.gz"]


@pytest.mark.parametrize("mode", [0o600, 0o664])
def test_a_replaced_file_keeps_its_permissions(tmp_path, mode):
    """A private scan's output must not become readable to others when written again."""
    path = tmp_path / "out.nii.gz"
    data.save_nifti(path, np.zeros((3, 4), np.float32))
    path.chmod(mode)
    data.save_nifti(path, np.ones((3, 4), np.float32))
    assert path.stat().st_mode & 0o777 == mode
    np.testing.assert_array_equal(data.load_nifti(path, ndim=2)[0], 1)


def test_resample_onto_places_a_label_map_by_the_affines(tmp_path):
    """Shifted 3 voxels and flipped along the last axis: each grid voxel takes the label there, the rest the smallest
    label (the image's background); half a voxel further, nearest voxels (order 0) keep labels where linear
    interpolation (order 1) blends them."""
    labels = np.random.default_rng(0).integers(1, 5, (6, 5, 4)).astype(np.float32)
    affine = np.eye(4)
    affine[0, 3] = 3
    affine[2, 2], affine[2, 3] = -1, 3  # voxel k at world 3 - k
    data.save_nifti(tmp_path / "labels.nii.gz", labels, affine)
    affine[1, 3] = 0.25  # grid voxel j now lies a quarter voxel before label voxel j
    data.save_nifti(tmp_path / "shifted.nii.gz", labels, affine)
    data.save_nifti(tmp_path / "grid.nii.gz", np.zeros((10, 5, 4), np.float32))
    on_grid, grid, grid_affine, _, share = data.resample_onto(tmp_path / "labels.nii.gz", tmp_path / "grid.nii.gz",
                                                              order=0)
    assert share == 6 / 10
    assert on_grid.shape == grid.shape == (10, 5, 4)
    np.testing.assert_array_equal(grid_affine, np.eye(4))
    np.testing.assert_array_equal(on_grid[3:9], labels[..., ::-1])
    np.testing.assert_array_equal(on_grid[:3], 1)
    np.testing.assert_array_equal(on_grid[9:], 1)
    nearest, linear = (data.resample_onto(tmp_path / "shifted.nii.gz", tmp_path / "grid.nii.gz", order=order)[0][3:9]
                       for order in (0, 1))
    np.testing.assert_array_equal(nearest, labels[..., ::-1])  # a quarter voxel rounds to the same voxel
    np.testing.assert_allclose(linear[:, 1:], 0.75 * labels[:, 1:, ::-1] + 0.25 * labels[:, :-1, ::-1], rtol=1e-6)


@pytest.mark.parametrize("shift", [0, 2])  # the same grid, given as it is, and another one
def test_resample_onto_keeps_label_values_beyond_float32s_exact_integers(tmp_path, shift):
    labels = np.array([2 ** 24 + 1, 2 ** 24, 614454277, 2 ** 31 - 1], np.int32).reshape(2, 2, 1).repeat(3, axis=2)
    affine = np.eye(4)
    affine[2, 3] = shift
    data.save_nifti(tmp_path / "labels.nii.gz", labels, affine)
    data.save_nifti(tmp_path / "grid.nii.gz", np.zeros((2, 2, 3 + shift), np.float32))
    on_grid = data.resample_onto(tmp_path / "labels.nii.gz", tmp_path / "grid.nii.gz", order=0)[0]
    np.testing.assert_array_equal(on_grid[..., shift:], labels)
    np.testing.assert_array_equal(on_grid[..., :shift], 2 ** 24)  # the smallest label, the background


def test_resample_onto_interpolates_an_integer_scan_in_float32(tmp_path):
    rows = np.arange(0, 40, 5, dtype=np.int16)[:, None, None] * np.ones((1, 3, 2), np.int16)
    data.save_nifti(tmp_path / "scan.nii.gz", rows)
    affine = np.eye(4)
    affine[0, 3] = 0.5  # grid voxel i lies halfway between scan voxels i and i + 1
    data.save_nifti(tmp_path / "grid.nii.gz", np.zeros((7, 3, 2), np.float32), affine)
    on_grid = data.resample_onto(tmp_path / "scan.nii.gz", tmp_path / "grid.nii.gz")[0]
    assert on_grid.dtype == np.float32
    np.testing.assert_allclose(on_grid[:, 0, 0], np.arange(2.5, 35, 5))


def _raw_nifti(path, image, edit):
    """Writes `image` as a .nii file whose header `edit` changes after nibabel's own settings (sform and qform of the
    identity, codes 1), as a file from another tool may hold it."""
    header = nib.Nifti1Header()
    header.set_data_shape(image.shape)
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), 1)
    header.set_qform(np.eye(4), 1)
    edit(header)
    _raw(path, header, image.astype(np.float32).tobytes(order="F"))


def _no_codes(header):
    """A header that does not say where its voxels lie (as Analyze-era tools write it)."""
    header["sform_code"] = header["qform_code"] = 0


@pytest.mark.parametrize("unit, mm_per_unit", [("meter", 1000.0), ("micron", 1e-3), ("mm", 1.0), ("unknown", 1.0)])
def test_resample_onto_reads_each_affine_in_the_unit_its_header_states(tmp_path, unit, mm_per_unit):
    """An image stored in metres lands where the same image stored in mm does (it landed in about one voxel)."""
    image = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    in_mm = np.diag([2.0, 2.0, 2.0, 1.0])
    in_mm[0, 3] = 4  # image voxel i at grid voxel i + 2
    header = nib.Nifti1Header()
    header.set_xyzt_units(unit)
    data.save_nifti(tmp_path / "image.nii.gz", image, np.diag([1 / mm_per_unit] * 3 + [1]) @ in_mm, header)
    data.save_nifti(tmp_path / "grid.nii.gz", np.zeros((10, 5, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    on_grid = data.resample_onto(tmp_path / "image.nii.gz", tmp_path / "grid.nii.gz")[0]
    np.testing.assert_allclose(on_grid[2:8], image, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([on_grid[:2], on_grid[8:]]), image.min())


def test_resample_onto_refuses_a_spatial_unit_nifti_does_not_define_where_the_grids_differ(tmp_path):
    _raw_nifti(tmp_path / "image.nii", np.ones((4, 4, 4)), lambda header: header.__setitem__("xyzt_units", 5))
    data.save_nifti(tmp_path / "grid.nii.gz", np.zeros((5, 4, 4), np.float32))
    with raises_naming(tmp_path / "image.nii", "spatial unit code 5"):
        data.resample_onto(tmp_path / "image.nii", tmp_path / "grid.nii.gz")
    # one grid, in one unit whatever it is: the image as it is
    _raw_nifti(tmp_path / "grid.nii", np.zeros((4, 4, 4)), lambda header: header.__setitem__("xyzt_units", 5))
    np.testing.assert_array_equal(data.resample_onto(tmp_path / "image.nii", tmp_path / "grid.nii")[0], 1)


@pytest.mark.parametrize("unplaced", ["image", "grid"])
def test_resample_onto_refuses_to_place_a_file_without_codes_against_one_with_them(tmp_path, unplaced):
    """nibabel's guess for a file whose sform and qform codes are 0 mirrors x: it moved the image without a word."""
    for name in ("image", "grid"):
        _raw_nifti(tmp_path / f"{name}.nii", np.ones((4, 4, 4)), _no_codes if name == unplaced else lambda header: None)
    with raises_naming(tmp_path / f"{unplaced}.nii", "codes are 0"):
        data.resample_onto(tmp_path / "image.nii", tmp_path / "grid.nii")


def test_resample_onto_takes_a_file_without_codes_on_the_grid_of_one_with_them(tmp_path):
    """The coded file states the very affine nibabel gives the other (as a file saved with its affine does)."""
    image = np.random.default_rng(0).random((4, 5, 3)).astype(np.float32)
    _raw_nifti(tmp_path / "image.nii", image, _no_codes)
    data.save_nifti(tmp_path / "grid.nii.gz", np.zeros((4, 5, 3), np.float32), nib.load(tmp_path / "image.nii").affine)
    on_grid, *_, share = data.resample_onto(tmp_path / "image.nii", tmp_path / "grid.nii.gz")
    np.testing.assert_array_equal(on_grid, image)
    assert share == 1


def test_resample_onto_places_two_files_without_codes_alike(tmp_path):
    """nibabel centres both: the 4 rows of the image on the middle 4 of the grid's 6."""
    image = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32)
    for name, array in (("image", image), ("grid", np.zeros((6, 4, 4)))):
        _raw_nifti(tmp_path / f"{name}.nii", array, _no_codes)
    on_grid, *_, share = data.resample_onto(tmp_path / "image.nii", tmp_path / "grid.nii")
    np.testing.assert_allclose(on_grid[1:5], image, atol=1e-6)
    assert share == 4 / 6


def test_resample_onto_reads_the_units_of_files_that_state_one_affine_in_different_units(tmp_path):
    """The same affine in microns and in mm: the image's voxels are a thousandth of the grid's, near its voxel 0."""
    for name, unit in (("image", "micron"), ("grid", "mm")):
        header = nib.Nifti1Header()
        header.set_xyzt_units(unit)
        data.save_nifti(tmp_path / f"{name}.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4), header)
    assert data.resample_onto(tmp_path / "image.nii.gz", tmp_path / "grid.nii.gz")[4] == 1 / 64


@pytest.mark.parametrize("rows_on", [0, 2, -6, 7])
def test_resample_onto_gives_the_share_of_grid_voxels_in_the_image(tmp_path, rows_on):
    """An 8-row image shifted `rows_on` rows over an 8-row grid covers (8 - |rows_on|) / 8 of it."""
    shifted = np.eye(4)
    shifted[0, 3] = rows_on
    data.save_nifti(tmp_path / "image.nii.gz", np.ones((8, 3, 2), np.float32), shifted)
    data.save_nifti(tmp_path / "grid.nii.gz", np.zeros((8, 3, 2), np.float32))
    assert data.resample_onto(tmp_path / "image.nii.gz", tmp_path / "grid.nii.gz")[4] == (8 - abs(rows_on)) / 8


def test_a_broken_qform_is_reported_naming_the_file(tmp_path):
    def broken(header):  # a quaternion of norm above 1: no rotation
        header["quatern_b"] = header["quatern_c"] = 0.9

    _raw_nifti(tmp_path / "image.nii", np.ones((4, 4, 4)), broken)
    with raises_naming(tmp_path / "image.nii", "broken sform or qform"):
        data.load_nifti(tmp_path / "image.nii")


def test_nibabels_header_repairs_are_not_logged(tmp_path, monkeypatch):
    def negative_pixdim(header):  # nibabel repairs it, and logged "pixdim[1,2,3] should be positive"
        header["pixdim"][1] = -1
        header["sform_code"] = 0

    _raw_nifti(tmp_path / "image.nii", np.ones((4, 4, 4)), negative_pixdim)
    records = []
    collect = logging.Handler()
    collect.emit = records.append
    # Wherever the record would go: nibabel's own handler (which writes to the stderr it found at import, not pytest's
    # capture), or, in a process that configured no logging, Python's last-resort handler
    nibabel_logger = logging.getLogger("nibabel.global")
    monkeypatch.setattr(nibabel_logger, "handlers", [*nibabel_logger.handlers, collect])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging, "lastResort", collect)
    data.load_nifti(tmp_path / "image.nii")
    assert [record.getMessage() for record in records] == []


@pytest.mark.parametrize("order", [2, True, "0"])
def test_resample_onto_refuses_another_order(tmp_path, order):
    with pytest.raises(ValueError, match=re.escape(f"order must be 0 (nearest) or 1 (linear), got {order!r}")):
        data.resample_onto(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", order)


def test_save_rejects_a_path_that_is_not_nifti(tmp_path):
    with pytest.raises(ValueError, match="out.png"):
        data.save_nifti(tmp_path / "out.png", np.zeros((3, 4)))



def test_save_into_a_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent/out.nii.gz: no such folder"):
        data.save_nifti(tmp_path / "absent" / "out.nii.gz", np.zeros((3, 4)))


@pytest.mark.parametrize("labels", [[], [0.5, 1.0], "abc"])
def test_load_labels_rejects_a_declared_set_that_is_not_integers(oasis_tiny, labels):
    with pytest.raises(ValueError, match="labels must be a non-empty sequence of integers"):
        data.load_labels(oasis_tiny / SUBJECT_1 / "slice_seg4.nii.gz", labels=labels)

# --- bad input: one DataError per case, naming the file ----------------------------------------------

def test_missing_file(tmp_path):
    with raises_naming(tmp_path / "absent.nii.gz", "no such file"):
        data.load_nifti(tmp_path / "absent.nii.gz")


@pytest.mark.parametrize("content", [b"just some text", b"\x1f\x8b\x08\x00 broken gzip"])
def test_file_that_is_not_nifti(tmp_path, content):
    path = tmp_path / "image.nii.gz"
    path.write_bytes(content)
    with raises_naming(path, "not a readable NIfTI image"):
        data.load_nifti(path)


def _rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[[i, i, j, j], [i, j, i, j]] = c, -s, s, c
    return rotation


def _tilted(degrees, voxel_sizes=(0.9375, 0.9375, 5.0), flip_x=True):
    """A voxel-to-world affine as scanners write them: x flipped (radiological), tilted about y, thick slices."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(1, degrees) @ np.diag([-1.0 if flip_x else 1.0, 1, 1]) @ np.diag(voxel_sizes)
    affine[:3, 3] = (-3, 20, 40)
    return affine


def _with_qform(affine, qform):
    image = nib.Nifti1Image(np.ones((8, 8, 4), np.float32), None)
    image.header.set_sform(affine, 1)
    image.header.set_qform(qform, 1)
    return image


@pytest.mark.parametrize("degrees", [0.0, 0.012, 0.05, 0.074, 1.0, 30.0])
def test_sform_and_qform_of_one_affine_agree_whatever_the_quaternion_rounds(tmp_path, degrees):
    """Near 180-degree rotations (x flipped, a slight tilt) the qform's float32 quaternion rounds its axes by up to
    1e-3, 4e-3 mm on a 5 mm axis: a file that dcm2niix writes so, both forms of one affine, reads with its sform."""
    affine = _tilted(degrees)
    _with_qform(affine, affine).to_filename(tmp_path / "image.nii.gz")
    np.testing.assert_allclose(data.load_nifti(tmp_path / "image.nii.gz")[1], affine, atol=1e-5)


@pytest.mark.parametrize("flip_x, degrees_about_z, shift_mm, disagree", [
    (False, 0.0, 0.0, False),
    (True, 0.0, 0.0, True),
    (False, 1.0, 0.0, True),
    (False, 0.0, 0.09, False),  # under 0.1 of the smallest voxel (0.9375 mm)
    (False, 0.0, 0.1, True),
    (False, 0.0, 1.0, True),
])
def test_sform_and_qform_apart_by_more_than_rounding_disagree(tmp_path, flip_x, degrees_about_z, shift_mm, disagree):
    """The qform: the sform moved in world space. A flip, a rotation or an origin 0.1 voxel away disagree."""
    affine = _tilted(0.0, flip_x=False)
    moved = np.eye(4)
    moved[:3, :3] = _rotation(2, degrees_about_z) @ np.diag([-1.0 if flip_x else 1.0, 1, 1])
    moved[0, 3] = shift_mm
    _with_qform(affine, moved @ affine).to_filename(tmp_path / "image.nii.gz")
    if disagree:
        with raises_naming(tmp_path / "image.nii.gz", "sform .* and qform .* disagree"):
            data.load_nifti(tmp_path / "image.nii.gz")
    else:
        data.load_nifti(tmp_path / "image.nii.gz")


def test_truncated_nifti(tmp_path):
    path = tmp_path / "image.nii.gz"
    write_nifti(path, np.random.default_rng(2).random((30, 30, 30)).astype(np.float32))
    path.write_bytes(path.read_bytes()[:-1000])
    with raises_naming(path, "not a readable NIfTI image"):
        data.load_nifti(path)


def test_image_of_another_format(tmp_path):
    path = tmp_path / "image.mgz"
    nib.MGHImage(np.zeros((3, 4, 5), np.float32), np.eye(4)).to_filename(path)
    with raises_naming(path, "not a NIfTI image but MGHImage"):
        data.load_nifti(path)


def test_wrong_number_of_dimensions(oasis_tiny):
    path = oasis_tiny / SUBJECT_1 / "aligned_norm.nii.gz"
    with raises_naming(path, r"has 3 dimensions \(16, 20, 8\), expected 2"):
        data.load_nifti(path, ndim=2)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_inf_voxels(tmp_path, bad_value):
    image = np.ones((4, 5), np.float32)
    image[1, 2:4] = bad_value
    write_nifti(tmp_path / "image.nii.gz", image)
    with raises_naming(tmp_path / "image.nii.gz", "contains 2 NaN/Inf voxels"):
        data.load_nifti(tmp_path / "image.nii.gz")


def test_labels_outside_the_declared_set(oasis_tiny):
    path = oasis_tiny / SUBJECT_1 / "slice_seg24.nii.gz"
    with raises_naming(path, r"label values outside the declared set \[0, 1, 2, 3, 4\], e.g. \[6, 12"):
        data.load_labels(path, labels=range(5))


def test_non_integer_labels(tmp_path):
    write_nifti(tmp_path / "labels.nii.gz", np.array([[0.0, 1.5], [2.0, 3.0]], np.float32))
    with raises_naming(tmp_path / "labels.nii.gz", "non-integer values"):
        data.load_labels(tmp_path / "labels.nii.gz")


def test_float_labels_load_exactly_or_are_refused_beyond_int32(tmp_path):
    # through float32 first, 2^24 + 1 merged with 2^24 and int32's largest wrapped to its smallest
    path = tmp_path / "labels.nii.gz"
    values = [0, 2 ** 24, 2 ** 24 + 1, 2 ** 31 - 1]
    write_nifti(path, np.array([values, values[::-1]], np.float64))
    np.testing.assert_array_equal(data.load_labels(path), [values, values[::-1]])
    write_nifti(path, np.array([[0, 2 ** 31], [1, 2]], np.float64))
    with raises_naming(path, "label values 0.0..2147483648.0 outside 0..2147483647"):
        data.load_labels(path)


def test_loader_names_the_bad_file_of_one_subject(oasis_tiny):
    path = oasis_tiny / "OASIS_OAS1_0003_MR1" / "slice_norm.nii.gz"
    image = np.full((16, 20, 1), np.nan, np.float32)
    write_nifti(path, image)
    with raises_naming(path, "contains 320 NaN/Inf voxels"):
        data.load_oasis(oasis_tiny)


def test_subject_folder_missing_a_file(oasis_tiny):
    path = oasis_tiny / "OASIS_OAS1_0002_MR1" / "slice_seg4.nii.gz"
    path.unlink()
    with raises_naming(path, "no such file"):
        data.load_folder(oasis_tiny)


def test_label_map_of_another_shape_than_its_image(oasis_tiny):
    path = oasis_tiny / "OASIS_OAS1_0002_MR1" / "slice_seg4.nii.gz"
    write_nifti(path, np.zeros((16, 19, 1), np.uint8))
    with raises_naming(path, r"shape \(16, 19\) differs from \(16, 20\) of .*slice_norm.nii.gz"):
        data.load_oasis(oasis_tiny)


def test_subjects_of_different_shapes(tmp_path):
    for name, shape in (("a", (4, 5)), ("b", (4, 6))):
        write_nifti(tmp_path / f"{name}.nii.gz", np.ones(shape, np.float32))
        write_nifti(tmp_path / f"{name}_seg.nii.gz", np.ones(shape, np.uint8))
    pairs = [(tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_seg.nii.gz") for name in "ab"]
    with raises_naming(tmp_path / "b.nii.gz", r"shape \(4, 6\) differs from \(4, 5\)"):
        data.load_pairs(pairs)


def test_empty_folder(tmp_path):
    with raises_naming(tmp_path, "empty folder"):
        data.load_folder(tmp_path)


def test_folder_in_no_known_layout(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "notes.txt").write_text("not data")
    with raises_naming(tmp_path, "not a data folder"):
        data.load_folder(tmp_path)


def test_missing_folder(tmp_path):
    with raises_naming(tmp_path / "absent", "no such folder"):
        data.load_oasis(tmp_path / "absent")


def test_oasis_folder_without_subjects(tmp_path):
    with raises_naming(tmp_path, r"no OASIS_\* subject folders"):
        data.load_oasis(tmp_path)


def test_malformed_pair_list_line(tmp_path):
    (tmp_path / "pairs.csv").write_text("image,labels\na.nii.gz,a_seg.nii.gz\nb.nii.gz\n")
    with raises_naming(tmp_path / "pairs.csv", r"expected 'image,labels', got 'b.nii.gz'"):
        data.load_pairs(tmp_path / "pairs.csv")


def test_pair_list_naming_a_missing_image(tmp_path):
    (tmp_path / "pairs.csv").write_text("absent.nii.gz,absent_seg.nii.gz\n")
    with raises_naming(tmp_path / "absent.nii.gz", "no such file"):
        data.load_pairs(tmp_path / "pairs.csv")


# --- intensity and contrast transforms ---------------------------------------------------------------

@pytest.mark.parametrize("image, mask, expected", [
    ([[2, 4], [6, 10]], None, [[0, 0.25], [0.5, 1]]),
    ([[3, 3], [3, 3]], None, [[0, 0], [0, 0]]),
    ([[0, 4], [6, 10]], [[False, True], [True, True]], [[0, 0], [1 / 3, 1]]),
    ([[-1, 0], [1, 3]], None, [[0, 0.25], [0.5, 1]]),
    ([[-3e38, 0], [1.5e38, 3e38]], None, [[0, 0.5], [0.75, 1]]),  # a span beyond float32: NaN and 0 before
])
def test_normalize(image, mask, expected):
    result = data.normalize(np.array(image, np.float64), None if mask is None else np.array(mask))
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-6)


@pytest.mark.parametrize("image, mask, expected", [
    ([[0, 0.2], [0.5, 0.8]], None, [[0, 0.6], [0.3, 0]]),  # max - x in the brain, background 0
    ([[0, 0.2], [0.5, 0.8]], [[True, True], [True, False]], [[0.5, 0.3], [0, 0]]),  # max inside the mask
    ([[0, 0], [0, 0]], None, [[0, 0], [0, 0]]),  # no brain at all
])
def test_invert(image, mask, expected):
    result = data.invert(np.array(image), None if mask is None else np.array(mask))
    np.testing.assert_allclose(result, expected, atol=1e-7)


@pytest.mark.parametrize("image, expected", [
    ([[2, 4], [6, 10]], [[1 / 8, 3 / 8], [5 / 8, 7 / 8]]),         # (#{< x} + #{<= x}) / 2N: (0 + 1) / 8, ...
    ([[0, 0], [0, 5]], [[3 / 8, 3 / 8], [3 / 8, 7 / 8]]),           # ties share their mid-rank: (0 + 3) / 8
    ([[3, 3], [3, 3]], [[0.5, 0.5], [0.5, 0.5]]),
    ([[0.5, 0.52, 0.51, 0.9]], [[1 / 8, 5 / 8, 3 / 8, 7 / 8]]),      # close intensities as far apart as any
])
def test_equalize(image, expected):
    image = np.array(image, np.float64)
    result = data.equalize(image)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    np.testing.assert_allclose(data.equalize(np.exp(3 * image)), expected, rtol=1e-6)  # any increasing remap
    np.testing.assert_allclose(data.equalize(1 - image), 1 - np.array(expected), rtol=1e-6)  # inversion


@pytest.mark.parametrize("image, message", [(np.array([[0.0, np.nan]]), "1 NaN/Inf"), (np.zeros((0, 3)), "empty")])
def test_equalize_refuses_what_has_no_ranks(image, message):
    with pytest.raises(ValueError, match=f"equalize: .*{message}"):
        data.equalize(image)


def test_remap_intensity_applies_a_curve_inside_the_mask_only():
    image = np.array([[0.0, 0.25], [0.5, 1.0]])
    curve = lambda values: np.interp(values, [0, 0.5, 1], [1, 0, 1])  # noqa: E731  (a V-shaped contrast)
    np.testing.assert_allclose(data.remap_intensity(image, curve), [[0, 0.5], [0, 1]])
    mask = np.array([[True, True], [False, True]])
    np.testing.assert_allclose(data.remap_intensity(image, curve, mask), [[1, 0.5], [0, 1]])


def test_remap_intensity_rejects_a_mask_of_another_shape():
    with pytest.raises(ValueError, match=r"mask shape \(3,\) differs from image shape \(2,\)"):
        data.remap_intensity(np.ones(2), np.sqrt, np.ones(3, bool))


# --- slices ------------------------------------------------------------------------------------------

VOLUME = np.arange(4 * 5 * 6).reshape(4, 5, 6)


@pytest.mark.parametrize("axis, indices, expected", [
    (0, [1, 3], [VOLUME[1], VOLUME[3]]),
    (1, range(2, 4), [VOLUME[:, 2], VOLUME[:, 3]]),
    (-1, 5, [VOLUME[:, :, 5]]),
    (2, slice(0, 6, 3), [VOLUME[:, :, 0], VOLUME[:, :, 3]]),
    (0, None, list(VOLUME)),
])
def test_extract_slices(axis, indices, expected):
    np.testing.assert_array_equal(data.extract_slices(VOLUME, axis, indices), np.stack(expected))


@pytest.mark.parametrize("volume, axis, indices, message", [
    (VOLUME, 0, [4], r"indices \[4\] out of range for an axis of size 4"),
    (VOLUME, 2, range(3, 3), "select no slice"),
    (VOLUME, 2, np.arange(60, 161), r"^slice indices \[ 60  61  62 \.\.\. 158 159 160\] out of range for an axis of "
                                    r"size 6$"),  # one line
    (VOLUME, 3, None, "axis 3 is out of bounds"),
    (VOLUME[0], 0, None, r"volume must be 3D, got shape \(5, 6\)"),
])
def test_extract_slices_rejects_bad_arguments(volume, axis, indices, message):
    with pytest.raises(ValueError, match=message):
        data.extract_slices(volume, axis, indices)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_affines_map_slice_pixels_to_the_same_world_point(oasis_tiny, axis):
    volumes = data.load_oasis(oasis_tiny, dim=3, subjects=[SUBJECT_1])
    volumes.affines[0] = np.array([[0, 0, -1, 5], [2, 0, 0, -3], [0, 3, 0, 7], [0, 0, 0, 1]], float)
    slices = volumes.slices(axis, [1, 3])
    for index, affine, image in zip((1, 3), slices.affines, slices.images):
        volume_voxel = np.insert([2, 1], axis, index)  # slice pixel (2, 1) lies at `index` along `axis`
        np.testing.assert_allclose(affine @ [2, 1, 0, 1], volumes.affines[0] @ [*volume_voxel, 1])
        assert image[2, 1] == volumes.images[0][tuple(volume_voxel)]


# --- splits ------------------------------------------------------------------------------------------

SUBJECTS = [f"OASIS_OAS1_{i:04d}_MR1" for i in range(1, 415)]


def test_paper_split_is_reproducible_disjoint_and_order_free():
    train, val, test = data.split_subjects(SUBJECTS)
    assert (len(train), len(val), len(test)) == (232, 58, 100)
    assert len(set(train) | set(val) | set(test)) == 390
    assert data.split_subjects(SUBJECTS[::-1], seed=0) == (train, val, test)
    assert data.split_subjects(SUBJECTS, seed=1)[0] != train


@pytest.mark.parametrize("count, sizes, expected", [
    (5, None, (3, 1, 1)),            # the paper's 232:58:100 proportions
    (39, None, (23, 6, 10)),
    (10, (0.6, 0.2, 0.2), (6, 2, 2)),
    (10, (0.5, 0.0, 0.25), (5, 0, 3)),
    (10, (4, 3, 2), (4, 3, 2)),
])
def test_split_sizes(count, sizes, expected):
    parts = data.split_subjects([str(i) for i in range(count)], sizes)
    assert tuple(map(len, parts)) == expected


@pytest.mark.parametrize("subjects, sizes, message", [
    (["a", "b", "c"], (232, 58, 100), r"need 390 subjects, got 3 \(pass sizes=None"),
    (["a", "b", "a"], None, "must be unique"),
    (["a", "b"], (0.5, 0.5, 0.5), "sum to more than 1"),
    (["a", "b"], (1, 1), "three non-negative numbers"),
    (["a", "b"], (1, -1, 1), "three non-negative numbers"),
    (["a", "b"], (0.5, float("nan"), 0.2), "three non-negative numbers"),
])
def test_split_rejects(subjects, sizes, message):
    with pytest.raises(ValueError, match=message):
        data.split_subjects(subjects, sizes)


# --- loaders on tiny fixtures ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("232,58,100", (232, 58, 100)),
    ("0.6, 0.15, 0.25", (0.6, 0.15, 0.25)),
    ("2,0,0", (2, 0, 0)),
    ("0,0.5,0.5", (0.0, 0.5, 0.5)),  # a 0 goes with fractions too
    ("2,0.0,1", (2, 0, 1)),  # and a 0.0 with counts
])
def test_parse_split(text, expected):
    sizes = data.parse_split(text)
    assert sizes == expected and list(map(type, sizes)) == list(map(type, expected))  # counts or fractions


@pytest.mark.parametrize("text", ["1,2", "a,b,c", "1,0.5,0.5", "1,0,0.5", "1,2,3,4", ""])
def test_parse_split_rejects(text):
    with pytest.raises(ValueError, match=f"three counts or three fractions .*got {text!r}"):
        data.parse_split(text)


def test_load_oasis_2d_normalises_each_image_and_keeps_labels(oasis_tiny):
    dataset = data.load_oasis(oasis_tiny, seg="seg24")
    assert dataset.subjects == [f"OASIS_OAS1_{i:04d}_MR1" for i in range(1, 5)]
    raw = data.load_nifti(oasis_tiny / SUBJECT_1 / "slice_norm.nii.gz")[0]
    np.testing.assert_allclose(dataset.images[0], raw / raw.max(), rtol=1e-6)
    np.testing.assert_array_equal(dataset.images.max(axis=(1, 2)), 1)
    labels = data.load_labels(oasis_tiny / SUBJECT_1 / "slice_seg24.nii.gz")
    np.testing.assert_array_equal(dataset.labels[0], labels)
    assert dataset.labels.dtype == np.int32 and set(np.unique(dataset.labels)) == {0, 6, 12, 18, 24}


def test_oasis_3d_slices_match_the_2d_files(oasis_tiny):
    slices = data.load_oasis(oasis_tiny, dim=3).slices(axis=2, indices=[4])
    flat = data.load_oasis(oasis_tiny)
    peaks = slices.images.max(axis=(1, 2), keepdims=True)  # each image was normalised on its own
    np.testing.assert_allclose(slices.images / peaks, flat.images, rtol=1e-6)
    np.testing.assert_array_equal(slices.labels, flat.labels)
    assert slices.subjects == flat.subjects


def test_split_of_slices_keeps_each_subject_in_one_part(oasis_tiny):
    slices = data.load_oasis(oasis_tiny, dim=3).slices(axis=0, indices=range(3, 9))
    parts = slices.split(sizes=(2, 1, 1), seed=3)
    assert [len(part) for part in parts] == [12, 6, 6]
    owners = [set(part.subjects) for part in parts]
    assert sorted(s for group in owners for s in group) == sorted(set(slices.subjects))
    for part in parts:
        first = slices.subjects.index(part.subjects[0])
        np.testing.assert_array_equal(part.images[:6], slices.images[first:first + 6])


def test_subset_and_map_images(oasis_tiny):
    dataset = data.load_oasis(oasis_tiny)
    subset = dataset.subset(["OASIS_OAS1_0003_MR1", SUBJECT_1])
    assert subset.subjects == [SUBJECT_1, "OASIS_OAS1_0003_MR1"]
    inverted = subset.map_images(data.invert)
    np.testing.assert_allclose(inverted.images[1], data.invert(dataset.images[2]))
    np.testing.assert_array_equal(inverted.labels, subset.labels)
    with pytest.raises(ValueError, match="unknown subjects"):
        dataset.subset(["OASIS_OAS1_0099_MR1"])


def test_load_ixi_takes_contrasts_from_an_iterator(ixi_tiny):
    assert sorted(data.load_ixi(ixi_tiny, contrasts=(c for c in ("t1", "t2")))) == ["t1", "t2"]
    with pytest.raises(ValueError, match="contrasts must be a non-empty sequence of names"):
        data.load_ixi(ixi_tiny, contrasts=iter(()))


def test_load_ixi_refuses_the_label_maps_as_a_contrast(ixi_tiny):
    with pytest.raises(ValueError, match=r"'labels' names the label maps \(labels.nii.gz\), not a contrast"):
        data.load_folder(ixi_tiny, contrast="labels")  # scored the label maps as images before


def test_load_ixi_gives_both_contrasts_on_shared_labels(ixi_tiny):
    contrasts = data.load_ixi(ixi_tiny)
    t1, t2 = contrasts["t1"], contrasts["t2"]
    assert t1.subjects == t2.subjects == ["IXI000", "IXI001", "IXI002"]
    np.testing.assert_array_equal(t1.labels, t2.labels)
    csf = t1.labels == 4  # dark in T1, bright in T2
    assert t1.images[csf].mean() < 0.3 < 0.9 < t2.images[csf].mean()
    np.testing.assert_array_equal(data.load_folder(ixi_tiny, contrast="t2").images, t2.images)


@pytest.mark.parametrize("flip, shift_mm, refused", [(False, 1e-5, False), (True, 0.0, True), (False, 0.5, True)])
def test_labels_must_place_their_voxels_where_their_images_do(ixi_tiny, flip, shift_mm, refused):
    """A label map of the image's shape stored otherwise (reversed along an axis with its affine to match, as a
    reoriented export is, or shifted) would pair each voxel with another place's label."""
    path = ixi_tiny / "IXI001" / "labels.nii.gz"
    labels = nib.load(path)
    affine = labels.affine.copy()
    array = np.asarray(labels.dataobj)
    if flip:  # the same world-space map, voxel axis 0 reversed
        array, affine = array[::-1], affine @ np.array([[-1, 0, 0, array.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0],
                                                          [0, 0, 0, 1]])
    affine[1, 3] += shift_mm
    write_nifti(path, np.ascontiguousarray(array), affine)
    if refused:
        with raises_naming(path, r"its affine .* places the voxels otherwise than .*IXI001/t1\.nii\.gz's"):
            data.load_folder(ixi_tiny)
    else:
        np.testing.assert_array_equal(data.load_folder(ixi_tiny).labels[1], array)


def test_load_folder_detects_oasis(oasis_tiny):
    detected = data.load_folder(oasis_tiny, dim=3)
    np.testing.assert_array_equal(detected.images, data.load_oasis(oasis_tiny, dim=3).images)


def test_load_pairs_from_a_list_file_and_from_tuples(oasis_tiny):
    lines = ["image,labels", "# comment", "",
             f"{SUBJECT_1}/slice_norm.nii.gz, {SUBJECT_1}/slice_seg4.nii.gz",
             f"{oasis_tiny}/OASIS_OAS1_0002_MR1/slice_norm.nii.gz,OASIS_OAS1_0002_MR1/slice_seg4.nii.gz"]
    (oasis_tiny / "pairs.csv").write_text("\n".join(lines))
    (oasis_tiny / "excel.csv").write_text("\r\n".join(lines), encoding="utf-8-sig")  # "CSV UTF-8": a byte-order mark
    from_file = data.load_pairs(oasis_tiny / "pairs.csv", labels=range(5))
    np.testing.assert_array_equal(data.load_pairs(oasis_tiny / "excel.csv", labels=range(5)).images, from_file.images)
    subjects = [SUBJECT_1, "OASIS_OAS1_0002_MR1"]
    tuples = [(oasis_tiny / s / "slice_norm.nii.gz", oasis_tiny / s / "slice_seg4.nii.gz")
              for s in subjects]
    from_tuples = data.load_pairs(tuples, dim=2)
    oasis = data.load_oasis(oasis_tiny, subjects=subjects)
    for dataset in (from_file, from_tuples):
        np.testing.assert_array_equal(dataset.images, oasis.images)
        np.testing.assert_array_equal(dataset.labels, oasis.labels)
    assert from_tuples.subjects == [str(oasis_tiny / s / "slice_norm.nii.gz") for s in subjects]


def test_a_list_file_names_its_subjects_alike_however_it_is_read(oasis_tiny, tmp_path, monkeypatch):
    """Relative and absolute lines, another working folder, "./" and ".." spellings: the same subjects (absolute
    paths), so the same split; quoted fields and a header after a comment are read as CSV."""
    lines = ["# made by R's write.csv", '"image","labels"',
             f'"{SUBJECT_1}/slice_norm.nii.gz","{SUBJECT_1}/slice_seg4.nii.gz"',
             f"./OASIS_OAS1_0002_MR1/slice_norm.nii.gz,OASIS_OAS1_0002_MR1/slice_seg4.nii.gz",
             *(f"{oasis_tiny}/OASIS_OAS1_000{i}_MR1/slice_norm.nii.gz,{oasis_tiny}/OASIS_OAS1_000{i}_MR1/"
               f"slice_seg4.nii.gz" for i in (3, 4))]
    (oasis_tiny / "pairs.csv").write_text("\n".join(lines))
    expected = [str(oasis_tiny / f"OASIS_OAS1_000{i}_MR1" / "slice_norm.nii.gz") for i in range(1, 5)]
    monkeypatch.chdir(oasis_tiny)
    for listed in ("pairs.csv", oasis_tiny / "pairs.csv", f"../{oasis_tiny.name}/./pairs.csv"):
        dataset = data.load_pairs(listed, labels=range(5))
        assert dataset.subjects == expected
        assert [part.subjects for part in dataset.split((2, 1, 1))] == \
            [[expected[i] for i in part] for part in ([0, 2], [1], [3])]
    (oasis_tiny / "sub").mkdir()  # through a linked folder and "..": the list read is the one the paths are from
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "link").symlink_to(oasis_tiny / "sub")
    monkeypatch.chdir(tmp_path / "work")
    assert data.load_pairs("link/../pairs.csv", labels=range(5)).subjects == expected


@pytest.mark.parametrize("content, problem", [
    ("a.nii.gz,a_seg.nii.gz".encode("utf-16"), "not a UTF-8 text file of image,labels lines"),  # PowerShell's >
    (gzip.compress(b"\x5c\x01\x00\x00" + bytes(400)), "not a UTF-8 text file of image,labels lines"),  # an image
    (b"x" * 200000 + b",y\n", r"not an 'image,labels' line \(field larger than field limit"),
], ids=["utf-16", "nifti", "long"])
def test_a_list_file_that_is_not_text_is_named(tmp_path, content, problem):
    """Nor one whose line is longer than csv's field limit (given as --data, it ended in a traceback)."""
    (tmp_path / "pairs.csv").write_bytes(content)
    with raises_naming(tmp_path / "pairs.csv", problem):
        data.load_pairs(tmp_path / "pairs.csv")


def test_subjects_stored_in_another_orientation_are_refused_not_stacked_mirrored(tmp_path):
    make_ixi(tmp_path / "ixi")
    for name in ("t1", "labels"):  # the same world image, its voxels stored right to left
        path = tmp_path / "ixi" / "IXI001" / f"{name}.nii.gz"
        image = nib.load(path)
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = image.shape[0] - 1
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1], image.affine @ flip), path)
    with raises_naming(tmp_path / "ixi" / "IXI001" / "t1.nii.gz", "its voxel axes point otherwise than those of "
                                                                  ".*IXI000.*t1.nii.gz \\(a mirrored or turned storage\\)"):
        data.load_folder(tmp_path / "ixi", dim=3)


def test_subjects_whose_kept_axes_point_alike_load_together(tmp_path):
    """A slice stored 1 x H x W beside one stored H x W x 1, one whose slice axis points the other way, and oblique
    ones turned 30 degrees either way: the same pixels, facing the same way, once load_nifti drops the slice axis;
    and a volume beside them is refused for its shape, not its orientation."""
    image = np.arange(20, dtype=np.float32).reshape(4, 5) / 20
    labels = (image > 0.5).astype(np.int16)
    def oblique(degrees):
        turn = np.radians(degrees)
        return np.array([[np.cos(turn), -np.sin(turn), 0, 0], [np.sin(turn), np.cos(turn), 0, 0], [0, 0, 1, 0],
                         [0, 0, 0, 1]])

    stored = {"plain": (lambda a: a[:, :, None], np.eye(4)),
              "first": (lambda a: a[None], np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])),
              "down": (lambda a: a[:, :, None], np.diag([1, 1, -1, 1.0])),
              "oblique": (lambda a: a[:, :, None], oblique(30)), "other way": (lambda a: a[:, :, None], oblique(-30))}
    pairs = []
    for name, (layout, affine) in stored.items():
        for suffix, array in (("", image), ("_seg", labels)):
            write_nifti(tmp_path / f"{name}{suffix}.nii.gz", layout(array), affine)
        pairs.append((tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_seg.nii.gz"))
    dataset = data.load_pairs(pairs, dim=2)
    np.testing.assert_array_equal(dataset.labels, np.stack([labels] * 5))
    write_nifti(tmp_path / "volume.nii.gz", np.zeros((4, 5, 6), np.float32))
    write_nifti(tmp_path / "volume_seg.nii.gz", np.zeros((4, 5, 6), np.int16))
    with raises_naming(tmp_path / "volume.nii.gz", r"shape \(4, 5, 6\) differs from \(4, 5\)"):
        data.load_pairs([pairs[0], (tmp_path / "volume.nii.gz", tmp_path / "volume_seg.nii.gz")])


def test_a_dangling_subject_link_is_named_not_dropped_and_subjects_are_named_once(oasis_tiny, tmp_path):
    (oasis_tiny / "OASIS_OAS1_0009_MR1").symlink_to(oasis_tiny / "unmounted")
    with raises_naming(oasis_tiny / "OASIS_OAS1_0009_MR1", ""):
        data.load_oasis(oasis_tiny)
    assert len(data.load_oasis(oasis_tiny, subjects=(f"OASIS_OAS1_000{i}_MR1" for i in (1, 2)))) == 2  # any iterable
    make_ixi(tmp_path / "ixi")  # files that are links, as in a git-annex copy, are no subjects; nor fetched or not
    (tmp_path / "ixi" / "README.txt").symlink_to(tmp_path / "ixi" / "IXI000" / "labels.nii.gz")
    (tmp_path / "ixi" / "CHANGES").symlink_to(tmp_path / "not-fetched")
    assert len(data.load_folder(tmp_path / "ixi", dim=3)) == 3  # make_ixi's subjects
    with pytest.raises(ValueError, match="subjects must name each subject folder once"):
        data.load_oasis(oasis_tiny, subjects=[SUBJECT_1, SUBJECT_1])
    with pytest.raises(ValueError, match="Dataset.subset: subjects must be a list of subjects, got the string"):
        data.load_oasis(oasis_tiny, subjects=[SUBJECT_1]).subset(SUBJECT_1)


# --- the real OASIS sample ---------------------------------------------------------------------------

def test_real_sample_2d(oasis_sample):
    dataset = data.load_folder(oasis_sample)
    assert dataset.subjects == [SUBJECT_1, "OASIS_OAS1_0002_MR1"]
    assert dataset.images.shape == (2, 160, 192)
    np.testing.assert_array_equal(dataset.images.min(axis=(1, 2)), 0)
    np.testing.assert_array_equal(dataset.images.max(axis=(1, 2)), 1)
    assert set(np.unique(dataset.labels)) == {0, 1, 2, 3, 4}
    assert set(np.unique(data.load_oasis(oasis_sample, seg="seg24").labels)) <= set(range(25))


def test_real_sample_slice_is_the_aligned_volume_at_109(oasis_sample):
    volume = data.load_nifti(oasis_sample / SUBJECT_1 / "aligned_norm.nii.gz", ndim=3)[0]
    flat = data.load_nifti(oasis_sample / SUBJECT_1 / "slice_norm.nii.gz", ndim=2)[0]
    np.testing.assert_array_equal(data.extract_slices(volume, axis=2, indices=109)[0], flat)
    sliced = data.load_oasis(oasis_sample, dim=3, subjects=[SUBJECT_1]).slices(axis=2, indices=[109])
    flat_labels = data.load_oasis(oasis_sample, subjects=[SUBJECT_1]).labels
    assert 0.7 < np.mean(sliced.labels == flat_labels) < 0.9  # README: the 2D maps agree on ~80%


def test_real_sample_inversion_keeps_background_zero(oasis_sample):
    image = data.load_oasis(oasis_sample).images[0]
    inverted = data.invert(image)
    brain = image > 0
    np.testing.assert_array_equal(inverted[~brain], 0)
    np.testing.assert_allclose(inverted[brain], 1 - image[brain])
    labels = data.load_labels(oasis_sample / SUBJECT_1 / "slice_seg4.nii.gz", labels=range(5), ndim=2)
    assert inverted[labels == 3].mean() < inverted[labels == 4].mean()  # now WM is darker than CSF


def test_normalize_refuses_non_finite_images():
    with pytest.raises(ValueError, match="normalize: the image holds 2 NaN/Inf values"):
        data.normalize(np.array([np.nan, 1.0, 2.0, np.inf]))


def test_loaders_refuse_a_single_subject_name_as_a_string(oasis_tiny):
    with pytest.raises(ValueError, match="subjects must be a list of subject folder names, got the string"):
        data.load_oasis(oasis_tiny, subjects=SUBJECT_1)


def test_normalize_keeps_intensities_that_float32_cannot_tell_apart():
    # cast to float32 first, 1e8, 1e8 + 1 and 1e8 + 2 were one value: all zeros
    np.testing.assert_allclose(data.normalize(np.array([1e8, 1e8 + 1, 1e8 + 2])), [0, 0.5, 1])
    np.testing.assert_allclose(data.normalize(np.array([2 ** 40, 2 ** 40 + 2], np.int64)), [0, 1])
    np.testing.assert_allclose(data.normalize(np.array([0, 1e300])), [0, 1])  # finite, beyond float32


@pytest.mark.parametrize("function", [data.normalize, data.invert, data.equalize])
def test_intensity_functions_refuse_what_is_not_a_finite_image_by_name(function):
    name = function.__name__
    with pytest.raises(TypeError, match=f"{name}: the image must hold real numbers, got None"):
        function(None)
    with pytest.raises(ValueError, match=f"{name}: the image holds 1 NaN/Inf values$"):
        function(np.array([[0.2, np.nan], [0.5, 0.7]]), **({"mask": np.ones((2, 2), bool)} if name == "invert" else {}))


def test_invert_leaves_a_nan_background_outside_its_mask_as_zero():
    # some pipelines write NaN outside the brain; the default mask (image > 0) leaves it out
    np.testing.assert_allclose(data.invert(np.array([[np.nan, 0.2, 0.5], [0, 1, np.nan]])), [[0, 0.8, 0.5], [0, 0, 0]])
    with pytest.raises(ValueError, match="invert: the image holds 1 NaN/Inf values in the mask"):
        data.invert(np.array([[np.nan, 0.2], [0.5, 1]]), mask=np.array([[True, True], [False, True]]))


def test_a_file_name_of_the_longest_length_is_written_through_its_temporary(tmp_path):
    # the temporary's name had added 34 characters: a 250-character output failed only at the end of the work
    path = tmp_path / ("m" * 243 + ".nii.gz")
    data.save_nifti(path, np.ones((3, 4), np.float32))
    assert os.listdir(tmp_path) == [path.name]
    np.testing.assert_array_equal(data.load_nifti(path)[0], np.ones((3, 4)))


def test_files_written_together_change_none_of_their_paths_when_one_write_fails(tmp_path):
    first, second = tmp_path / "warp.nii.gz", tmp_path / "moved.nii.gz"
    data.save_nifti(first, np.zeros((3, 4), np.float32))
    before = first.read_bytes()

    def fail(temporary):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="moved.nii.gz: cannot write \\(No space left on device\\)"):
        data.write_all_atomically([(first, data.nifti_writer(first, np.ones((3, 4), np.float32))), (second, fail)])
    assert first.read_bytes() == before and os.listdir(tmp_path) == ["warp.nii.gz"]
    data.write_all_atomically([(first, data.nifti_writer(first, np.ones((3, 4), np.float32))),
                               (second, data.nifti_writer(second, np.full((3, 4), 2, np.float32)))])
    assert data.load_nifti(first)[0].max() == 1 and data.load_nifti(second)[0].max() == 2


def test_a_file_name_longer_than_the_file_system_takes_is_refused_before_anything_is_written(tmp_path):
    # its temporary was cut to fit and written; the rename then failed after --moved had been replaced
    moved, warp = tmp_path / "moved.nii.gz", tmp_path / ("w" * 250 + ".nii.gz")
    data.save_nifti(moved, np.zeros((3, 4), np.float32))
    with pytest.raises(OSError, match=r"w\.nii\.gz: its file name is 257 bytes, longer than the 255 the file system"):
        data.write_all_atomically([(moved, data.nifti_writer(moved, np.ones((3, 4), np.float32))),
                                   (warp, data.nifti_writer(warp, np.ones((3, 4), np.float32)))])
    assert data.load_nifti(moved)[0].max() == 0 and os.listdir(tmp_path) == ["moved.nii.gz"]
