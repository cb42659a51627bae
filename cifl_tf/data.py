"""Images and label maps: NIfTI I/O, intensity normalisation, contrast transforms, slices, splits.

Layouts read by the loaders (every image is min-max normalised to [0, 1] on load):

* neurite-oasis (``load_oasis``): ``OASIS_OAS1_XXXX_MR1/`` subject folders holding
  ``slice_norm.nii.gz`` (H x W x 1) with ``slice_seg4`` / ``slice_seg24`` (2D), and
  ``aligned_norm.nii.gz`` (D x H x W) with ``aligned_seg4`` / ``aligned_seg35`` (3D).
* IXI-style (``load_ixi``), supplied by the user: one folder per subject holding one image per
  contrast, ``t1.nii.gz`` and ``t2.nii.gz`` (any ``<contrast>.nii.gz``), and ``labels.nii.gz``,
  all voxel-aligned.
* Lists of (image, label map) paths (``load_pairs``): a Python list, or a text file of
  ``image,labels`` lines.

Every bad input raises ``DataError``, with a one-line message that names the file and the problem.
"""
import collections.abc
import contextlib
import csv
import dataclasses
import gzip
import json
import logging
import math
import os
import pathlib
import shutil
import stat
import uuid
import zlib

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi

from .checks import is_integer

PAPER_SPLIT = (232, 58, 100)  # OASIS 2D subjects: train, validation, test (paper Sec. 3)
OASIS_SEGS = {2: {"seg4": 5, "seg24": 25}, 3: {"seg4": 5, "seg35": 36}}  # number of labels, 0 included
OASIS_PREFIX = {2: "slice", 3: "aligned"}
IXI_LABELS = "labels.nii.gz"

# What nibabel, gzip and zlib raise on a file that is not a (complete) NIfTI image.
_UNREADABLE = (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError, EOFError,
               ValueError, zlib.error)
# Largest image read, checked on the header before any voxel is: 512^3 voxels, at most 1 GiB as stored
# (8-byte types) and 512 MiB as float32. A header claiming more is broken or not a brain image.
MAX_VOXELS = 512 ** 3
# Affines that differ by more than a header's float32 rounding place the voxels otherwise: by 0.01 in an axis's
# direction cosines (a qform's quaternion rounds them by up to 1e-3 near 180-degree rotations), or by 0.1 voxel in
# the origin's position.
_COSINE_ATOL, _ORIGIN_ATOL = 1e-2, 0.1
# Millimetres per NIfTI spatial unit code (the low 3 bits of xyzt_units: metre, mm, micron; `_spatial_unit` reads
# unknown, 0, as mm, as scanners and most tools write and read it, while nibabel ignores the units).
_MM_PER_UNIT = {1: 1000.0, 2: 1.0, 3: 1e-3}


class DataError(ValueError):
    """Bad input data; the message names the file and the problem on one line."""


def first_line(error):
    """The first line of an exception's message (its type name if empty), for one-line error messages."""
    return str(error).strip().split("\n")[0] or type(error).__name__


def _stat_file(path):
    """DataError unless `path` is a regular file (or a link to one) that can be read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:  # missing, a symlink loop, a path through a file, no permission
        raise DataError(f"{path}: {error.strerror.lower()}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a file")


def _check_header(path, image):
    """DataError for a header that no voxel read should follow: bad size, type or geometry."""
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: not a NIfTI image but {type(image).__name__}")
    header = image.header
    shape = header.get_data_shape()
    if not shape or min(shape) < 1:
        raise DataError(f"{path}: header dimensions {shape} must all be positive")
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise DataError(f"{path}: header claims {voxels} voxels {shape}, more than the limit of {MAX_VOXELS}")
    dtype = header.get_data_dtype()
    if dtype.kind not in "iuf":
        raise DataError(f"{path}: voxel type {dtype} is not a real integer or float type")
    affine = image.affine
    if not np.all(np.isfinite(affine)) or np.linalg.matrix_rank(affine[:3, :3]) < 3:
        raise DataError(f"{path}: singular or non-finite voxel-to-world affine {affine[:3].tolist()}")
    try:
        sform, sform_code = header.get_sform(coded=True)
        qform, qform_code = header.get_qform(coded=True)
    except ValueError as error:  # a qform quaternion that is no rotation
        raise DataError(f"{path}: broken sform or qform ({first_line(error)})") from None
    if sform_code and qform_code and not _place_alike(sform, qform):
        raise DataError(f"{path}: sform {sform[:3].tolist()} and qform {qform[:3].tolist()} disagree")


def _place_alike(affine, other):
    """Whether two voxel-to-world affines place the voxels alike, up to a header's float32 rounding."""
    voxel_sizes = np.linalg.norm(affine[:3, :3], axis=0)
    return (np.allclose(affine[:3, :3] / voxel_sizes, other[:3, :3] / voxel_sizes, rtol=0, atol=_COSINE_ATOL)
            and np.allclose(affine[:3, 3], other[:3, 3], rtol=0, atol=_ORIGIN_ATOL * voxel_sizes.min()))


def _voxels(path, image):
    """The voxels of a NIfTI image whose header was checked, as stored (scaled if the header says so).

    A .gz file is decompressed in one pass to the end of its stream, so that gzip checks its length and
    CRC: nibabel alone stops once it has the voxels, and would take a file cut inside its trailer.
    """
    if not path.lower().endswith(".gz"):  # nibabel's own test of the name: X.NII.GZ is gzipped too
        return np.asanyarray(image.dataobj)
    with gzip.open(path) as stream:
        voxels = np.asanyarray(type(image).from_stream(stream).dataobj)
        while stream.read(2 ** 20):  # to the end of the stream, where gzip checks it; memory stays bounded
            pass
    return voxels


@contextlib.contextmanager
def _reading(path):
    """Turns what nibabel, gzip and zlib raise on a broken file into a DataError naming it.

    nibabel also logs the header repairs it makes; silenced, as the checks here report (removing its handler, as
    nibabel's LoggingOutputSuppressor does, leaves Python's last-resort handler printing them to stderr).
    """
    logger = logging.getLogger("nibabel.global")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    except _UNREADABLE as error:
        raise DataError(f"{path}: not a readable NIfTI image ({first_line(error)})") from error
    finally:
        logger.disabled = disabled


def _read(path, ndim, channels=False, float32=True):
    """Voxels (singleton axes of space squeezed, the channels last with `channels`; floats as float32 unless not
    `float32`: label maps, whose integers above 2^24 float32 would round) and nibabel image of a checked NIfTI
    file."""
    path = os.fspath(path)
    if ndim is not None and (isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1):
        raise ValueError(f"ndim must be None or a positive integer, got {ndim!r}")
    if not isinstance(channels, (bool, np.bool_)):
        raise TypeError(f"channels must be a bool, got {channels!r}")
    _stat_file(path)
    with _reading(path):
        image = nib.load(path)
    _check_header(path, image)
    shape = image.shape
    if not channels and math.prod(shape[3:]) > 1:  # squeezed, they would pass for an axis of space
        raise DataError(f"{path}: holds {math.prod(shape[3:])} volumes or channels {shape}; a single 2D or 3D "
                        f"image is expected")
    with _reading(path):
        data = _voxels(path, image)
    # NIfTI pads shapes with singleton axes: a 2D slice is stored H x W x 1, its C channels H x W x 1 x 1 x C
    spatial = [size for size in shape[:3] if size > 1]
    data = data.reshape(spatial + [math.prod(shape[3:])] if channels else spatial)
    if ndim is not None and len(spatial) != ndim:
        raise DataError(f"{path}: has {len(spatial)} dimensions {shape}, expected {ndim}")
    if data.dtype.kind == "f":
        if float32:
            with np.errstate(over="ignore"):  # values beyond float32 become Inf, reported next
                data = data.astype(np.float32, copy=False)
        bad = data.size - np.count_nonzero(np.isfinite(data))
        if bad:
            raise DataError(f"{path}: contains {bad} NaN/Inf voxels{' (as float32)' if float32 else ''}")
    return data, image


def load_nifti(path, ndim=None, channels=False):
    """Reads a NIfTI image.

    Args:
        path: a ``.nii`` / ``.nii.gz`` file.
        ndim: the number of spatial dimensions the image must have once singleton axes are dropped
            (2 for an H x W x 1 slice); None accepts any.
        channels: read the axes after the third (volumes, or the channels of a vector image such as
            ``save_nifti(..., channels=True)`` writes) as a last axis of channels; without it a file
            with more than one volume or channel is refused.

    Returns: (array float32 with singleton axes of space dropped, (*spatial) or with `channels` (*spatial, C),
        4x4 affine, nibabel header). The affine is the file's, for the file's axes: to save the array with it where
        a dropped axis was not the last (a 1 x H x W slice), put that axis back first
        (``array.reshape(header.get_data_shape()[:3])``).
    Raises: DataError for a missing or unreadable file, a header with non-positive dimensions or more
        than MAX_VOXELS voxels (checked before reading voxels), several volumes or channels without
        `channels`, a complex or RGB voxel type, a singular affine, sform and qform that disagree, a wrong
        ndim, or NaN/Inf voxels.
    """
    data, image = _read(path, ndim, channels)
    return data.astype(np.float32), image.affine, image.header


def file_axes(header):
    """The spatial shape of the NIfTI file behind `header` as three axes, with the singleton axes that load_nifti
    drops (a 2D header's H x W is H x W x 1)."""
    return (tuple(header.get_data_shape()[:3]) + (1, 1))[:3]


def resample_onto(path, grid_path, order=1, grid=None):
    """The image of NIfTI file `path` on the voxel grid of NIfTI file `grid_path`, placed by the two files' affines
    (each in the spatial unit its header states): what ``cifl register`` registers when the moving and fixed files'
    grids differ (order 1), so that its ``--warp`` applies to the result; order 0 (nearest voxel) carries a label map
    over.

    A voxel fills its box, half a voxel either side of its centre: grid points in an edge voxel's box take its value,
    so a slice (an axis of one voxel) holds across its thickness, and a slice in the grid's plane up to the rounding of
    its header lands there. Grid points outside every box take the image's smallest value, its background (air in
    CT, not the 0 of water). Files of one grid (the same axes, affine and spatial unit) give the image as it is; the
    units and codes are read only where the grids differ.

    Args:
        path, grid_path: NIfTI files of as many axes once singleton ones are dropped.
        order: 1 (linear) or 0 (nearest).
        grid: ``load_nifti(grid_path)``'s (image, affine, header), where the caller has read it already.

    Returns: (image on the grid, grid image, grid affine, grid header, share), both images as load_nifti gives the
        grid file's (singleton axes dropped; float32, but with order 0 the image keeps its file's values and type, as
        float32 would round label values above 2^24); share: the share of the grid's voxels that the image covers
        (1.0 for files of one grid; a small share says the affines may be wrong).
    Raises: DataError as load_nifti does, where no part of the image lies in the grid's field of view, and, where the
        grids differ, for a spatial unit code NIfTI lacks or one file without sform and qform codes beside one with.
    """
    if isinstance(order, bool) or order not in (0, 1):
        raise ValueError(f"resample_onto: order must be 0 (nearest) or 1 (linear), got {order!r}")
    grid, grid_affine, grid_header = load_nifti(grid_path) if grid is None else grid
    image, nifti = _read(path, grid.ndim, float32=order == 1)
    if order == 1:  # an integer scan too: interpolated values are not whole
        image = image.astype(np.float32, copy=False)
    # The files' axes, not the loaded shapes: a slice stored 1 x H x W and one stored H x W x 1 under one affine lie
    # in perpendicular planes
    if (file_axes(nifti.header) == file_axes(grid_header) and np.allclose(nifti.affine, grid_affine)
            and _spatial_unit(nifti.header) == _spatial_unit(grid_header)):
        return image, grid, grid_affine, grid_header, 1.0
    image = image.reshape(file_axes(nifti.header))
    to_image = _to_image(path, nifti.header, grid_path, grid_header)
    values = ndi.affine_transform(image, to_image, output_shape=file_axes(grid_header), order=order, mode="nearest")
    # order 0 rounds to the nearest voxel: within [-0.5, n - 0.5) along each axis of n voxels
    inside = ndi.affine_transform(np.ones(image.shape, np.uint8), to_image, output_shape=file_axes(grid_header),
                                  order=0, mode="grid-constant", cval=0).astype(bool)
    if not inside.any():
        raise DataError(f"{path}: no part of it lies in the field of view of {grid_path} (their affines place them "
                        f"apart)")
    return (np.where(inside, values, image.min()).reshape(grid.shape), grid, grid_affine, grid_header,
            float(inside.mean()))


def _to_image(path, header, grid_path, grid_header):
    """The 4x4 map from the voxels of the grid file to those of the image file, through the world coordinates of
    both headers in mm (their spatial units, xyzt_units, converted).

    Raises: DataError for a spatial unit code NIfTI does not define, or where one file states where its voxels lie
    (an sform or qform code) and the other does not: nibabel's guess for the latter (centred, x mirrored) would
    place it wrongly without a word.
    """
    placed, grid_placed = (bool(head["sform_code"] or head["qform_code"]) for head in (header, grid_header))
    if placed != grid_placed:
        unplaced, other = (grid_path, path) if placed else (path, grid_path)
        raise DataError(f"{unplaced}: its sform and qform codes are 0, so its header does not say where its voxels "
                        f"lie, while {other}'s does: set its sform (nibabel's set_sform) to place the two")
    return np.linalg.inv(_mm_affine(path, header)) @ _mm_affine(grid_path, grid_header)


def _spatial_unit(header):
    """The header's spatial unit code, unknown (0) read as mm (2)."""
    return int(header["xyzt_units"]) & 7 or 2


def _mm_affine(path, header):
    """The header's voxel-to-world affine in mm."""
    code = _spatial_unit(header)
    if code not in _MM_PER_UNIT:
        raise DataError(f"{path}: spatial unit code {code} (xyzt_units {int(header['xyzt_units'])}) is none of "
                        f"NIfTI's (0 unknown, 1 metre, 2 mm, 3 micron)")
    return np.diag([_MM_PER_UNIT[code]] * 3 + [1.0]) @ header.get_best_affine()


def load_labels(path, labels=None, ndim=None):
    """Reads a label map like ``load_nifti`` and checks its values.

    Args:
        labels: the declared label values (e.g. ``range(5)``); None accepts any integers.

    Returns: int32 array with singleton axes dropped.
    Raises: DataError also for non-integer or negative values, values beyond int32, and values
        outside ``labels``.
    """
    return _labels(path, labels, ndim)[0]


def _labels(path, labels, ndim):
    """load_labels's label map, and the affine of its file."""
    declared = None if labels is None else _label_values(labels)
    data, image = _read(path, ndim, float32=False)
    if np.any(data != np.round(data)):
        raise DataError(f"{path}: label map has non-integer values")
    largest = np.iinfo(np.int32).max
    if data.min() < 0 or data.max() > largest:
        raise DataError(f"{path}: label values {data.min()}..{data.max()} outside 0..{largest}")
    if declared is not None:
        outside = np.setdiff1d(data, declared)
        if outside.size:
            raise DataError(f"{path}: {outside.size} label values outside the declared set "
                            f"{declared.tolist()}, e.g. {outside[:5].astype(int).tolist()}")
    return data.astype(np.int32), image.affine


def _label_values(labels):
    values = np.asarray(list(labels))
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty sequence of integers, got {labels!r}")
    return values


def save_nifti(path, array, affine=None, header=None, channels=False):
    """Writes an array as NIfTI atomically: to a temporary file in the same folder, then renamed.

    Args:
        path: ``.nii`` or ``.nii.gz`` file; an existing one is replaced only by a complete file.
        array: (*spatial) image or label map, float or integer (bool is stored as uint8 and float16, which
            NIfTI lacks, as float32), or (*spatial, C) with ``channels=True``.
        affine: 4x4 voxel-to-world matrix; None keeps the header's, identity without a header.
        header: nibabel header to keep (e.g. from ``load_nifti``); shape and dtype follow ``array``.
        channels: the last axis holds C values per pixel; stored as a NIfTI vector image
            (*spatial, 1..., 1, C), so that ``load_nifti`` gives back (*spatial, C).
    """
    write_atomically(path, nifti_writer(path, array, affine, header, channels))


def nifti_writer(path, array, affine=None, header=None, channels=False):
    """The function that writes `array` as save_nifti would write it to `path` (the arguments are save_nifti's),
    given the file name to write; for ``write_all_atomically``, which writes several files as one."""
    array = np.asarray(array)
    if array.dtype == bool:  # types NIfTI lacks, widened exactly
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f" and array.dtype.itemsize == 2:  # float16, of either byte order
        array = array.astype(np.float32)
    return _nifti_image(path, array, affine, header, channels).to_filename


def save_nifti_channels(path, shape, fill, affine=None, header=None):
    """Writes a float32 (*spatial, C) vector image as ``save_nifti(..., channels=True)`` does, the same
    bytes, without holding it in memory: ``fill(out)`` fills ``out``, a writable (*spatial, C) float32
    array (in the header's byte order) mapped onto the voxels of the file on disk (numpy.memmap). The file's
    space is reserved first where the OS can (posix_fallocate, not on macOS), so that a full disk fails
    here rather than while ``fill`` writes. For
    ``.nii.gz`` the file is written uncompressed beside the output, then compressed into it. Atomic as
    save_nifti.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        shape: (*spatial, C), 1-3 spatial axes.
        fill: callable taking ``out``.
        affine, header: as for save_nifti.
    """
    name = "save_nifti_channels"
    if not isinstance(shape, (tuple, list)) or not all(
            is_integer(n, 1) for n in shape):
        raise ValueError(f"{name}: shape must be a tuple of positive integers (*spatial, C), got {shape!r}")
    if not callable(fill):
        raise ValueError(f"{name}: fill must be a callable taking the array to fill, got {type(fill).__name__}")
    image = _nifti_image(path, np.broadcast_to(np.float32(0), tuple(shape)), affine, header, True, name)
    image.header.set_slope_inter(1, 0)  # as nibabel writes float32 arrays: unscaled
    dtype = image.header.get_data_dtype()

    def fill_file(file_path):
        with open(file_path, "wb") as file:
            image.header.write_to(file)  # sets the header's data offset
            offset = image.header.get_data_offset()
            size = image.dataobj.size * dtype.itemsize
            if hasattr(os, "posix_fallocate"):  # a full disk fails here, not (SIGBUS) while filling
                os.posix_fallocate(file.fileno(), offset, size)
            else:  # macOS: a sparse file
                file.truncate(offset + size)
        voxels = np.memmap(file_path, dtype, "r+", offset, image.shape, order="F")
        fill(voxels.reshape(shape, order="F"))  # a view: only singleton axes go
        voxels.flush()

    def write(temporary):
        if not temporary.endswith(".gz"):
            return fill_file(temporary)
        raw = temporary[:-len(".gz")]
        with _unfinished(raw):
            fill_file(raw)
            with open(raw, "rb") as source, nib.openers.Opener(temporary, "wb") as target:
                shutil.copyfileobj(source, target, 2 ** 24)

    write_atomically(path, write)


def _nifti_image(path, array, affine, header, channels, name="save_nifti"):
    """The Nifti1Image that save_nifti writes to `path`, after checking the path and shape (errors
    named after the public function `name`)."""
    path = os.fspath(path)
    if not path.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{name}: path must end in .nii or .nii.gz, got {path!r}")
    if channels:
        spatial = array.shape[:-1]
        if not 1 <= len(spatial) <= 3:
            raise ValueError(f"{name}: needs (*spatial, C) with 1-3 spatial axes, got shape {array.shape}")
        array = array.reshape(spatial + (1,) * (3 - len(spatial)) + (1, array.shape[-1]))
    if not os.path.isdir(os.path.dirname(path) or "."):
        raise FileNotFoundError(f"{path}: no such folder to write to")
    if affine is None and header is None:
        affine = np.eye(4)
    # NIfTI-2 stays NIfTI-2 (a NIfTI-1 image made from its header warns that it resized the header)
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        image = image_class(array, affine, header, dtype=array.dtype)
    except nib.spatialimages.HeaderDataError as error:  # a dtype NIfTI has no code for (object, str)
        raise ValueError(f"{name}: cannot store {array.dtype} values in NIfTI ({first_line(error)})") from None
    # The input's display range and intent describe its own values, not these (viewers would show labels 0..2
    # under a cal_max of 100 nearly black)
    image.header["cal_min"] = image.header["cal_max"] = 0
    image.header.set_intent("vector" if channels else "none")
    return image


def read_json(path):
    """The content of a JSON file; ValueError naming the file when it is not JSON (or not UTF-8 text)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:  # also UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({first_line(error)})") from None


def write_atomically(path, write):
    """Calls ``write(temporary)`` for a temporary file beside ``path``, then renames it to ``path``.

    Readers never see a partial file, and a failed write leaves neither a temporary file nor a
    changed ``path``. A replaced file keeps its permissions. Returns ``path``.
    """
    return write_all_atomically([(path, write)])[0]


def _name_max(folder):
    """The longest file name, in bytes, that the file system of `folder` takes (255 where it does not say)."""
    try:
        return os.pathconf(folder or ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder yet, or no pathconf (Windows)
        return 255


def check_file_name(path):
    """OSError unless the file system of `path`'s folder takes its name; before any work, so that a name too long
    fails there and not when the results are written."""
    name, folder = os.fsencode(os.path.basename(path)), os.path.dirname(os.fspath(path))
    if len(name) > _name_max(folder):
        raise OSError(f"{os.fspath(path)}: its file name is {len(name)} bytes, longer than the {_name_max(folder)} "
                      f"the file system takes")


def _temporary_beside(path):
    """A new hidden file name in `path`'s folder that ends as `path` does, so that writers that go by the ending
    (nibabel's .nii.gz compression, Keras's .weights.h5) write the same format, and is no longer than the longest
    name the file system takes: the temporary of a legal 250-character name failed after a whole registration."""
    folder = os.path.dirname(path)
    name = os.fsdecode(os.fsencode(os.path.basename(path))[-(_name_max(folder) - 18):])  # what ".<16 hex>." leaves
    return os.path.join(folder, f".{uuid.uuid4().hex[:16]}.{name}")


def write_all_atomically(writes):
    """``write_atomically`` of several files as one: each ``write(temporary)`` of (path, write) in `writes`, and
    only when all have succeeded, each temporary renamed to its path (``cifl register`` had written --warp when
    --moved failed). A failed write changes none of the paths; the renames that follow are checked for beforehand
    (names the file system takes), so that a failure among them is one of the file system's own. Returns the
    paths."""
    paths = [os.fspath(path) for path, _ in writes]
    for path in paths:
        check_file_name(path)
    temporaries = [_temporary_beside(path) for path in paths]
    path = None
    try:
        with contextlib.ExitStack() as unfinished:
            for path, temporary, (_, write) in zip(paths, temporaries, writes):
                unfinished.enter_context(_unfinished(temporary))
                write(temporary)
                if os.path.exists(path):  # else a private (0600) scan's output would become as readable as a new file
                    shutil.copymode(path, temporary)
            for path, temporary in zip(paths, temporaries):  # same folder: each rename is atomic
                os.replace(temporary, path)
    except OSError as error:  # else the message would name the temporary file
        raise OSError(f"{path}: cannot write ({error.strerror or first_line(error)})") from error
    return paths


# The temporary files being written now, for remove_unfinished_files.
_UNFINISHED = set()


@contextlib.contextmanager
def _unfinished(temporary):
    """Removes the file `temporary` (if it exists) when the block ends, and lists it meanwhile for
    remove_unfinished_files."""
    _UNFINISHED.add(temporary)
    try:
        yield
    finally:
        _UNFINISHED.discard(temporary)
        if os.path.exists(temporary):
            os.remove(temporary)


def remove_unfinished_files():
    """Removes the temporary files of the writes in progress, for a process about to end without unwinding
    (a SIGTERM handler): an exception raised from a signal handler can surface inside a C extension's
    callback, where it is lost or reported as SystemError, and the process would then go on."""
    for temporary in list(_UNFINISHED):
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def _json_safe(value):
    """`value` with every non-finite float (a Dice of a label absent from both maps: NaN) as None, which JSON
    writes as null: NaN and Infinity are not JSON, and strict parsers refuse them."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value.item() if isinstance(value, np.generic) else value  # NumPy scalars as JSON's numbers


def write_json(path, content):
    """Writes `content` as indented JSON to `path`, atomically (see write_atomically); NaN and infinite
    numbers as null. Returns `path`."""
    text = json.dumps(_json_safe(content), indent=2, allow_nan=False)
    return write_atomically(path, lambda temporary: pathlib.Path(temporary).write_text(text))


def _real_image(image, caller):
    """`image` as an array (not copied); TypeError unless it holds real numbers."""
    given, image = image, np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise TypeError(f"{caller}: the image must hold real numbers, got {given!r:.80}")
    return image


def _refuse_non_finite(values, caller, where=""):
    bad = np.count_nonzero(~np.isfinite(values))
    if bad:
        raise ValueError(f"{caller}: the image holds {bad} NaN/Inf values{where}")


def remap_intensity(image, function, mask=None, caller="remap_intensity"):
    """Applies ``function`` to the pixels inside ``mask``; pixels outside it become 0 (background).

    Args:
        image: array of any shape, finite in the mask.
        function: callable taking the 1-D float64 array of the masked values and returning as
            many new values, e.g. ``lambda v: np.interp(v, curve_x, curve_y)``.
        mask: boolean array of the image's shape; default ``image > 0`` (the brain of a
            skull-stripped image; NaN background stays outside it).
        caller: the name that errors give.

    Returns: float32 array of the image's shape (the masked values in float64 until then: in float32, intensities
    of 1e8 and 1e8 + 1 were one value).
    """
    image = _real_image(image, caller)
    if not callable(function):
        raise TypeError(f"function must be callable, got {function!r}")
    mask = image > 0 if mask is None else np.asarray(mask, bool)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    _refuse_non_finite(image[mask], caller, "" if mask.all() else " in the mask")
    out = np.zeros(image.shape, np.float32)
    if mask.any():
        out[mask] = function(image[mask].astype(np.float64))
    return out


def _min_max(values):
    low = values.min()
    span = values.max() - low
    return (values - low) / span if span > 0 else np.zeros_like(values)


def normalize(image, mask=None):
    """Min-max normalisation of one image to [0, 1] (a constant image gives zeros).

    With a mask, minimum and maximum are taken inside it and pixels outside it become 0.
    Returns float32 of the image's shape.
    """
    return remap_intensity(image, _min_max, np.ones(np.shape(image), bool) if mask is None else mask, "normalize")


def equalize(image):
    """Histogram equalisation: each voxel's intensity replaced by its mid-rank in the image, (#{< x} + #{<= x}) / 2N.

    The same for every strictly increasing remapping of the intensities, and equalize(1 - x) = 1 - equalize(x):
    tissues whose intensities lie close (grey and white matter in PD) are spread apart by the voxels between them.
    Returns float32 of the image's shape, in (0, 1).
    """
    image = _real_image(image, "equalize")
    _refuse_non_finite(image, "equalize")
    if not image.size:
        raise ValueError("equalize: the image is empty")
    # Each distinct value's #{< x} and #{<= x} from where it starts and ends in the sorted image, and each voxel's
    # value searched among the distinct ones (a scan's few thousand stay in cache): searching all N sorted values
    # for every voxel, twice, took 12 times as long on a 128^3 scan.
    distinct, counts = np.unique(image, return_counts=True)
    at_most = np.cumsum(counts)
    mid_ranks = ((2 * at_most - counts) / (2 * image.size)).astype(np.float32)
    return mid_ranks[np.searchsorted(distinct, image)]


def invert(image, mask=None):
    """Inverted contrast (method page section 4): ``max - x`` inside the brain mask, 0 outside.

    The mask defaults to ``image > 0``; ``max`` is the maximum inside the mask.
    Returns float32 of the image's shape.
    """
    return remap_intensity(image, lambda values: values.max() - values, mask, "invert")


def extract_slices(volume, axis=-1, indices=None):
    """2D slices of a 3D volume.

    Args:
        volume: (D0, D1, D2) array.
        axis: the axis to slice along.
        indices: an index, a ``slice``/``range``, or a list of indices along ``axis``; None: all.

    Returns: (N, H, W), slice n being ``volume`` at ``indices[n]`` along ``axis`` (the other two
    axes in their order).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"extract_slices: volume must be 3D, got shape {volume.shape}")
    axis = np.lib.array_utils.normalize_axis_index(axis, 3)
    return np.moveaxis(volume.take(_slice_indices(volume.shape[axis], indices), axis=axis), axis, 0)


def _slice_indices(size, indices):
    """The chosen indices among ``size`` as a 1-D array; ValueError when out of range or empty."""
    try:
        chosen = np.atleast_1d(np.arange(size)[slice(None) if indices is None else indices])
    except IndexError as error:
        raise ValueError(f"slice indices {_one_line(indices)} out of range for an axis of size {size}") from error
    if chosen.size == 0:
        raise ValueError(f"slice indices {_one_line(indices)} select no slice of an axis of size {size}")
    return chosen


def _one_line(indices):
    """Indices as one line of text: an array's first and last three when there are more."""
    if isinstance(indices, (np.ndarray, list, range)):
        return np.array2string(np.asarray(indices), threshold=6, edgeitems=3, max_line_width=10 ** 6)
    return repr(indices)


def _slice_affine(affine, axis, index):
    """Affine of slice ``index`` along ``axis``, for its array stored as H x W x 1."""
    to_volume = np.eye(4)  # slice voxel (i, j, 0) -> volume voxel
    to_volume[:3, :3] = np.eye(3)[:, [a for a in range(3) if a != axis] + [axis]]
    to_volume[axis, 3] = index
    return affine @ to_volume


def split_subjects(subjects, sizes=PAPER_SPLIT, seed=0):
    """Reproducible random split of subjects into (train, validation, test).

    Args:
        subjects: unique subject ids; the split depends on the set, not on its order.
        sizes: three subject counts (the paper's 232/58/100 by default; subjects beyond their
            sum are left out), three fractions summing to at most 1, or None for the paper's
            proportions of however many subjects there are.
        seed: the same seed and subjects give the same split.

    Returns: three lists of subject ids.
    """
    subjects = sorted(subjects)
    if len(set(subjects)) != len(subjects):
        raise ValueError("split_subjects: subject ids must be unique")
    sizes = np.asarray(PAPER_SPLIT) / sum(PAPER_SPLIT) if sizes is None else np.asarray(sizes)
    numbers = sizes.dtype != bool and np.issubdtype(sizes.dtype, np.number)
    if sizes.shape != (3,) or not numbers or not np.all(np.isfinite(sizes) & (sizes >= 0)):
        raise ValueError(f"split_subjects: sizes must be three non-negative numbers, "
                         f"got {sizes.tolist()}")
    if np.issubdtype(sizes.dtype, np.integer):
        ends = np.cumsum(sizes)
    elif sizes.sum() > 1 + 1e-9:
        raise ValueError(f"split_subjects: fractions {sizes.tolist()} sum to more than 1")
    else:
        ends = np.round(np.cumsum(sizes) * len(subjects)).astype(int)  # cumulative: counts sum to <= n
    if ends[-1] > len(subjects):
        raise ValueError(f"split_subjects: sizes {sizes.tolist()} need {ends[-1]} subjects, got "
                         f"{len(subjects)} (pass sizes=None for the same proportions)")
    order = np.random.default_rng(seed).permutation(len(subjects))
    return tuple([subjects[i] for i in order[start:end]] for start, end in zip((0, *ends[:2]), ends))


def parse_split(text):
    """Subject split sizes from text: three counts ("232,58,100") or fractions ("0.6,0.15,0.25")."""
    fields = text.split(",")
    try:
        sizes = tuple(int(f) if f.strip().isdigit() else float(f) for f in fields)
    except ValueError:
        sizes = ()
    kinds = {type(size) for size in sizes if size != 0}  # a 0 is a count and a fraction alike: 0.5,0,0.5
    if len(sizes) != 3 or len(kinds) > 1:
        raise ValueError(f"split must be three counts or three fractions like 0.6,0.15,0.25, got {text!r}")
    return tuple(map(float if float in kinds else int, sizes))


def check_split_counts(sizes, dataset, folder):
    """DataError, naming --split and `folder`, when subject counts `sizes` need more subjects than `dataset` holds
    (split_subjects's own error names its Python arguments)."""
    subjects = len(set(dataset.subjects))
    if sizes is not None and all(isinstance(size, int) for size in sizes) and sum(sizes) > subjects:
        raise DataError(f"--split {','.join(map(str, sizes))} needs {sum(sizes)} subjects, {folder} holds {subjects}")


@dataclasses.dataclass
class Dataset:
    """Images of one contrast with their label maps, one entry per image.

    Attributes:
        images: (N, *shape) float32, each image min-max normalised to [0, 1].
        labels: (N, *shape) int32 label maps.
        subjects: N subject ids (repeated when a subject gives several images, e.g. slices).
        affines: N 4x4 voxel-to-world matrices, each its file's (see ``load_nifti``; for ``save_nifti``).
    """

    images: np.ndarray
    labels: np.ndarray
    subjects: list
    affines: list

    def __post_init__(self):
        if self.images.shape != self.labels.shape or not (
                len(self.images) == len(self.subjects) == len(self.affines)):
            raise ValueError(f"Dataset: images {self.images.shape}, labels {self.labels.shape}, "
                             f"{len(self.subjects)} subjects and {len(self.affines)} affines disagree")

    def __len__(self):
        return len(self.images)

    def _take(self, indices):
        return Dataset(self.images[indices], self.labels[indices],
                       [self.subjects[i] for i in indices], [self.affines[i] for i in indices])

    def subset(self, subjects):
        """The entries of these subjects, in the dataset's order."""
        if isinstance(subjects, str):  # would be taken letter by letter
            raise ValueError(f"Dataset.subset: subjects must be a list of subjects, got the string {subjects!r}")
        unknown = set(subjects) - set(self.subjects)
        if unknown:
            raise ValueError(f"Dataset.subset: unknown subjects {sorted(unknown)}")
        wanted = set(subjects)
        return self._take([i for i, subject in enumerate(self.subjects) if subject in wanted])

    def split(self, sizes=PAPER_SPLIT, seed=0):
        """(train, validation, test) Datasets, split by subject with ``split_subjects``."""
        parts = split_subjects(dict.fromkeys(self.subjects), sizes, seed)
        return tuple(self.subset(part) for part in parts)

    def slices(self, axis=-1, indices=None):
        """2D Dataset of the slices ``extract_slices(volume, axis, indices)`` of every 3D entry."""
        if self.images.ndim != 4:
            raise ValueError(f"Dataset.slices: needs 3D images, got shape {self.images.shape[1:]}")
        axis = np.lib.array_utils.normalize_axis_index(axis, 3)
        chosen = _slice_indices(self.images.shape[1 + axis], indices)

        def cut(stack):
            return np.concatenate([extract_slices(volume, axis, chosen) for volume in stack])

        return Dataset(cut(self.images), cut(self.labels),
                       [subject for subject in self.subjects for _ in chosen],
                       [_slice_affine(affine, axis, index)
                        for affine in self.affines for index in chosen])

    def map_images(self, function):
        """The same Dataset with ``function`` applied to every image, e.g. ``map_images(invert)``."""
        images = np.stack([function(image) for image in self.images]).astype(np.float32)
        return dataclasses.replace(self, images=images)


def _stack(arrays, paths):
    """(N, *shape) stack; DataError naming the first file whose shape differs from the first one."""
    for array, path in zip(arrays, paths):
        if array.shape != arrays[0].shape:
            raise DataError(f"{path}: shape {array.shape} differs from {arrays[0].shape} of {paths[0]}")
    return np.stack(arrays)


def _load_entries(entries, ndim, labels):
    """Dataset from (subject, image path, label map path) triples."""
    images, label_maps, affines, first_axes = [], [], [], None
    for _, image_path, label_path in entries:
        image, affine, header = load_nifti(image_path, ndim)
        label_map, label_affine = _labels(label_path, labels, ndim)
        if label_map.shape != image.shape:
            raise DataError(f"{label_path}: shape {label_map.shape} differs from {image.shape} "
                            f"of {image_path}")
        if not _place_alike(affine, label_affine):  # same shape, other voxels: a flipped or shifted export
            raise DataError(f"{label_path}: its affine {label_affine[:3].tolist()} places the voxels otherwise "
                            f"than {image_path}'s {affine[:3].tolist()}; resample one onto the other")
        axes = _kept_axis_orientation(affine, header)
        first_axes = axes if first_axes is None else first_axes
        # Stacked with the others, its brain would lie mirrored or turned among theirs: a kept axis nearest another
        # world axis or direction than the first subject's (not an oblique scan, nor a slice stored 1 x H x W); other
        # shapes are _stack's to refuse
        if axes.shape == first_axes.shape and not np.array_equal(axes, first_axes):
            raise DataError(f"{image_path}: its voxel axes point otherwise than those of {entries[0][1]} (a mirrored "
                            f"or turned storage): store every subject in one orientation (e.g. nibabel's "
                            f"as_closest_canonical)")
        images.append(normalize(image))
        label_maps.append(label_map)
        affines.append(affine)
    return Dataset(_stack(images, [e[1] for e in entries]), _stack(label_maps, [e[2] for e in entries]),
                   [e[0] for e in entries], affines)


def _kept_axis_orientation(affine, header):
    """(K, 2): for each of the K voxel axes that load_nifti keeps (the file's axes of more than one voxel), in order,
    the world axis nearest its direction and the sign along it (nibabel's io_orientation)."""
    kept = [axis for axis, size in enumerate(file_axes(header)) if size > 1]
    return nib.orientations.io_orientation(affine)[kept]


def existing_folder(folder):
    """`folder` as a str; DataError naming it when it is no folder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    return folder


def _subject_folders(folder, subjects, prefix=""):
    """The requested subjects, or every subfolder starting with ``prefix``; DataError when none."""
    if isinstance(subjects, str):  # would be taken letter by letter
        raise ValueError(f"subjects must be a list of subject folder names, got the string {subjects!r}")
    if subjects is None:
        # A dangling link named as a subject (OASIS_*) fails naming itself, rather than its subject being dropped
        # unsaid; without a prefix (IXI) it may be any file not fetched yet (git-annex), and is passed over.
        subjects = sorted(name for name in os.listdir(folder)
                          if name.startswith(prefix) and not name.startswith(".")
                          and (os.path.isdir(os.path.join(folder, name))
                               or prefix and not os.path.exists(os.path.join(folder, name))))
    subjects = list(subjects)
    if len(set(subjects)) != len(subjects):  # one subject twice would fall on both sides of a split
        raise ValueError(f"subjects must name each subject folder once, got {subjects!r}")
    if not subjects:
        raise DataError(f"{folder}: no {prefix}* subject folders")
    return subjects


def load_oasis(folder, dim=2, seg="seg4", subjects=None):
    """Loads the neurite-oasis layout (``OASIS_OAS1_XXXX_MR1/`` subject folders).

    Args:
        folder: the folder holding the subject folders.
        dim: 2 for ``slice_norm`` (images (N, 160, 192) in the full release) or 3 for
            ``aligned_norm`` (N, 160, 192, 224).
        seg: the label maps, "seg4" (both dims), "seg24" (2D) or "seg35" (3D); labels are
            checked against 0..4, 0..24, 0..35.
        subjects: subject folder names to load; None: every ``OASIS_*`` folder, sorted.

    Returns: Dataset with the subject folder names as subjects.
    """
    if dim not in OASIS_SEGS:
        raise ValueError(f"load_oasis: dim must be 2 or 3, got {dim!r}")
    if seg not in OASIS_SEGS[dim]:
        raise ValueError(f"load_oasis: seg must be one of {sorted(OASIS_SEGS[dim])} for dim={dim}, "
                         f"got {seg!r}")
    folder, prefix = existing_folder(folder), OASIS_PREFIX[dim]
    entries = [(subject, os.path.join(folder, subject, f"{prefix}_norm.nii.gz"),
                os.path.join(folder, subject, f"{prefix}_{seg}.nii.gz"))
               for subject in _subject_folders(folder, subjects, "OASIS_")]
    return _load_entries(entries, dim, range(OASIS_SEGS[dim][seg]))


def load_ixi(folder, contrasts=("t1", "t2"), dim=3, labels=None, subjects=None):
    """Loads an IXI-style layout: ``<subject>/<contrast>.nii.gz`` and ``<subject>/labels.nii.gz``.

    Args:
        folder: the folder holding one folder per subject.
        contrasts: the image files to load, by name without ``.nii.gz``.
        dim: 2 or 3, the dimensions of every image.
        labels: the declared label values; None accepts any integers.
        subjects: subject folder names; None: every subfolder, sorted.

    Returns: dict contrast -> Dataset; the Datasets share subjects and label maps, entry by entry.
    """
    given = contrasts
    iterable = isinstance(contrasts, collections.abc.Iterable) and not isinstance(contrasts, str)
    contrasts = tuple(contrasts) if iterable else ()
    if not contrasts:  # a tuple, as they are read twice below
        raise ValueError(f"load_ixi: contrasts must be a non-empty sequence of names, got {given!r}")
    if IXI_LABELS.removesuffix(".nii.gz") in contrasts:  # the label maps would be read as images
        raise ValueError(f"load_ixi: {IXI_LABELS.removesuffix('.nii.gz')!r} names the label maps ({IXI_LABELS}), "
                         f"not a contrast")
    if dim not in (2, 3):
        raise ValueError(f"load_ixi: dim must be 2 or 3, got {dim!r}")
    folder = existing_folder(folder)
    subjects = _subject_folders(folder, subjects)
    return {contrast: _load_entries([(subject, os.path.join(folder, subject, f"{contrast}.nii.gz"),
                                      os.path.join(folder, subject, IXI_LABELS))
                                     for subject in subjects], dim, labels)
            for contrast in contrasts}


def _read_pair_list(path):
    """(image, labels) paths from a text file of ``image,labels`` lines (CSV: fields may be quoted).

    Relative paths are relative to the list's folder, and every path is made absolute: the subjects are then the
    same files whichever folder the list is read from or however its path is written. Blank lines, ``#`` comments
    and a first line ``image,labels`` (of any case) are skipped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    folder = os.path.realpath(os.path.dirname(path) or os.curdir)  # the folder read, links in it followed
    pairs, header_allowed = [], True
    try:
        with open(path, encoding="utf-8-sig", newline="") as lines:  # -sig: a byte-order mark, as spreadsheets write
            for number, line in enumerate(lines, 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    fields = [field.strip() for field in next(csv.reader([line], skipinitialspace=True))]
                except csv.Error as error:  # a field over csv's limit: not a list of paths
                    raise DataError(f"{path}:{number}: not an 'image,labels' line ({error})") from None
                if header_allowed and [field.lower() for field in fields] == ["image", "labels"]:
                    header_allowed = False
                    continue
                header_allowed = False
                if len(fields) != 2 or not all(fields):
                    raise DataError(f"{path}:{number}: expected 'image,labels', got {line.strip()!r}")
                pairs.append(tuple(os.path.normpath(os.path.join(folder, field)) for field in fields))
    except UnicodeDecodeError:  # a NIfTI image given as the list, or a UTF-16 file
        raise DataError(f"{path}: not a UTF-8 text file of image,labels lines") from None
    if not pairs:
        raise DataError(f"{path}: no image,labels lines")
    return pairs


def load_pairs(pairs, dim=None, labels=None):
    """Loads (image, label map) pairs given as a list of path tuples or as a list file.

    Args:
        pairs: a text/CSV file of ``image,labels`` lines (see ``_read_pair_list``), or a sequence
            of (image path, label map path).
        dim: the dimensions of every image; None accepts any, as long as all shapes agree.
        labels: the declared label values; None accepts any integers.

    Returns: Dataset whose subjects are the image paths.
    """
    if isinstance(pairs, (str, os.PathLike)):
        pairs = _read_pair_list(pairs)
    entries = []
    for pair in pairs:
        if isinstance(pair, (str, os.PathLike)) or len(pair) != 2:
            raise ValueError(f"load_pairs: expected (image, labels) path pairs, got {pair!r}")
        entries.append((os.fspath(pair[0]), os.fspath(pair[0]), os.fspath(pair[1])))
    if not entries:
        raise ValueError("load_pairs: no pairs given")
    return _load_entries(entries, dim, labels)


def _is_oasis(folder, names):
    """Whether the data folder holding `names` has the neurite-oasis layout: OASIS_* subject folders."""
    return any(name.startswith("OASIS_") and os.path.isdir(os.path.join(folder, name)) for name in names)


def read_as_subject(folder, name):
    """Whether ``load_folder(folder)`` would take a folder `name` made inside the data folder `folder` for one of
    its subjects: an OASIS_* folder in the neurite-oasis layout, any folder not hidden in another."""
    return not name.startswith(".") and (name.startswith("OASIS_") or not _is_oasis(folder, os.listdir(folder)))


def load_folder(folder, contrast="t1", **kwargs):
    """Loads a data folder, detecting its layout: neurite-oasis or IXI-style (see module doc).

    Args:
        contrast: for IXI-style folders, the contrast to load; neurite-oasis images are T1.
        **kwargs: arguments of ``load_oasis`` or ``load_ixi`` (dim, seg, labels, subjects).

    Returns: Dataset.
    Raises: DataError for a missing, empty or unrecognised folder.
    """
    folder = existing_folder(folder)
    names = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    if not names:
        raise DataError(f"{folder}: empty folder")
    if _is_oasis(folder, names):
        if contrast != "t1":
            raise DataError(f"{folder}: neurite-oasis images are T1, got contrast {contrast!r}")
        return load_oasis(folder, **kwargs)
    if any(os.path.isfile(os.path.join(folder, name, IXI_LABELS)) for name in names):
        return load_ixi(folder, contrasts=(contrast,), **kwargs)[contrast]
    raise DataError(f"{folder}: not a data folder: expected OASIS_*/ subject folders (neurite-oasis) "
                    f"or <subject>/{IXI_LABELS} with <subject>/<contrast>.nii.gz (IXI-style)")
