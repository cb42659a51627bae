"""Embedded demo data: labelled 2D brain slices or 3D volumes in four contrasts, built offline from the MNI template.

Source. The nilearn wheel ships the ICBM 2009a nonlinear symmetric MNI152 template (Fonov et al.,
NeuroImage 2011) at 1 mm: a brain-masked T1 and grey- and white-matter probability maps,
``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``. They are read in
place from the installed package (``importlib.resources``): nothing is downloaded and nilearn's fetchers
are never called (only nilearn's light top-level package is imported, to find its folder). No other
installed package ships a labelled brain (nibabel's test volumes are 2 mm and unlabelled).

Labels (0 background, 1 CSF, 2 GM, 3 WM; ``LABEL_NAMES``).
    brain mask = T1 template > 0: the shipped T1 is already brain-masked, without holes, and the mask
    includes the CSF of the ventricles and sulci. Inside the mask ``p_csf = max(0, 1 - p_gm - p_wm)``,
    outside it every probability is 0, and the label is the argmax of (p_csf, p_gm, p_wm): CSF is the
    brain where neither GM nor WM dominates. Deep grey nuclei (thalamus, basal ganglia) are GM, as in
    the template's GM map.

Geometry. Coronal slices on the grid of the OASIS neurite release that this package targets: 1 mm
pixels, (160, 192) by default, axis 0 running right -> left and axis 1 superior -> inferior (the LIA
orientation of its ``slice_norm.nii.gz``), the world origin (anterior commissure) at the centre.
Template slice 131 is y = -3 mm, the level of the OASIS mid-coronal slice. ``plt.imshow(x.T)`` shows
a slice the usual (radiological) way.

Volumes (``demo_volumes``): the template's own RAS grid, cropped to the brain with a 6 mm margin and
averaged over blocks of ``voxel_size``^3 mm (3 mm: 53x65x54 voxels). Deformations and bias fields keep
their lengths in mm, so a 3D subject is deformed as much as a 2D one.

Subjects. Per subject, the slice index is jittered by up to ``slice_jitter`` and then the slice is
deformed by a random diffeomorphism: a smooth random velocity field integrated by scaling and squaring
(the scheme of ``vxm.layers.VecInt``), applied with the same field to the label map (nearest
neighbour) and to the T1 and probability maps (linear). This uses numpy/scipy rather than
voxelmorph's TF layers: their ``SpatialTransformer`` maps over the batch one sample at a time in eager
mode (about 0.6 s per subject on two cores against 0.05 s), and seeded TF random ops are not
repeatable within a process.

Contrasts (``CONTRASTS``), each normalised to [0, 1] by its maximum, background exactly 0:

* ``t1``: the template T1, each tissue scaled by a random gain (blended by the probabilities);
* ``t1_inverted``: ``cifl_tf.data.invert`` of ``t1``, i.e. ``max - x`` inside the brain mask;
* ``t2``, ``pd``: partial-volume renders ``sum_k p_k * mean_k * gain_k`` over k in (CSF, GM, WM), so
  that tissue edges blend as in real images. The means (``TISSUE_MEANS``) are the spin-echo signal
  ``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` of typical 1.5 T tissue values (PD, T1 ms, T2 ms): CSF (1.0,
  4000, 2000), GM (0.8, 920, 100), WM (0.7, 790, 90), for a dual-echo sequence with TR = 4000 ms and
  TE = 100 ms (T2) or 15 ms (PD). Relative to the brightest tissue: T2 CSF 1.00 > GM 0.48 > WM 0.38;
  PD GM 1.00 > CSF 0.92 > WM 0.87.

``t1``, ``t2`` and ``pd`` are separate acquisitions: each gets its own tissue gains, smooth
multiplicative bias field and Gaussian noise. Example::

    ds = demo_dataset(n_subjects=40)
    x = ds.inputs("t2")            # (40, 160, 192, 1) float32, the layout the models take
    y = ds.labels                  # (40, 160, 192) int32 in 0..3
"""
import dataclasses
import functools
import importlib.resources

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi

from .checks import is_integer
from .data import invert

CONTRASTS = ("t1", "t1_inverted", "t2", "pd")
CONTRAST_NAMES = {"t1": "T1", "t1_inverted": "inverted T1", "t2": "T2-like", "pd": "PD-like"}  # for tables
LABEL_NAMES = ("background", "CSF", "GM", "WM")

_TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_INSTALL_HINT = "pip install nilearn, or pip install 'cifl-tf[demo]'"

# Typical 1.5 T (proton density, T1 ms, T2 ms) of CSF, GM, WM, and the spin-echo signal they give.
_TISSUE_MR = np.array([[1.0, 4000.0, 2000.0], [0.8, 920.0, 100.0], [0.7, 790.0, 90.0]])


def _spin_echo(tr, te):
    proton_density, t1, t2 = _TISSUE_MR.T
    signal = proton_density * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)
    return signal / signal.max()


TISSUE_MEANS = {"t2": _spin_echo(tr=4000, te=100), "pd": _spin_echo(tr=4000, te=15)}  # CSF, GM, WM

_WARP_SCALE = 32  # mm between independent velocity values: smooth, anatomy-scale deformations
_BIAS_SCALE = 64  # mm: bias fields vary over the whole head
_INTEGRATION_STEPS = 7  # scaling and squaring, as vxm.layers.VecInt
# Velocity SDs (mm, or pixels in 2D) from here up folded some warps (Jacobian <= 0 in 5e-6 of a 3 mm volume at 8
# mm, 1e-4 at 10, 0.1-0.3% of 2D slices at 20); more integration steps did not unfold them: the velocity is too rough
MAX_WARP_STD = 6.0
_MARGIN_MM = 6  # around the brain in the 3D volumes, room for the deformations


@dataclasses.dataclass(frozen=True)
class DemoDataset:
    """N labelled subjects, a coronal slice (``demo_dataset``) or a volume (``demo_volumes``) each, in
    every contrast of ``CONTRASTS``.

    Attributes:
        labels: (N, *shape) int32, indices into ``LABEL_NAMES`` (0 background, 1 CSF, 2 GM, 3 WM).
        images: dict contrast -> (N, *shape) float32 in [0, 1], exactly 0 where ``labels == 0``.
        subjects: N subject names.
    """
    labels: np.ndarray
    images: dict
    subjects: tuple

    def inputs(self, contrast):
        """The images of one contrast in the layout the models take: (N, *shape, 1) float32."""
        if contrast not in self.images:
            raise ValueError(f"contrast must be one of {tuple(self.images)}, got {contrast!r}")
        return self.images[contrast][..., np.newaxis]


def _template_path(tissue):
    name = _TEMPLATE_FILE.format(tissue)
    try:
        folder = importlib.resources.files("nilearn") / "datasets" / "data"
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"the demo data is built from {name}, which ships with nilearn: {_INSTALL_HINT}") from error
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the demo data is built from the MNI template files "
                                f"that ship with nilearn ({_INSTALL_HINT})")
    return path


@functools.lru_cache(maxsize=1)
def _template():
    """T1, GM and WM as (3, X, Y, Z) uint8 (0..255) on the 1 mm RAS grid, and the voxel of world 0."""
    volumes = []
    for tissue in ("t1", "gm", "wm"):
        image = nib.load(_template_path(tissue))
        if not np.allclose(image.affine[:3, :3], np.eye(3)):  # the slicing below assumes 1 mm RAS
            raise ValueError(f"{image.get_filename()}: expected a 1 mm RAS grid, got affine\n{image.affine}")
        volumes.append(np.asarray(image.dataobj, dtype=np.uint8))
    origin = np.rint(-image.affine[:3, 3]).astype(int)
    return np.stack(volumes), origin


def _coronal_slices(slices, shape):
    """(T1, GM, WM), each (N, H, W) float32 in [0, 1]: template slices ``slices`` on the OASIS grid."""
    volumes, origin = _template()
    size_x, _, size_z = volumes.shape[1:]
    rows = origin[0] + shape[0] // 2 - np.arange(shape[0])  # x from right to left
    cols = origin[2] + shape[1] // 2 - np.arange(shape[1])  # z from top to bottom
    inside = ((rows >= 0) & (rows < size_x))[:, None] & ((cols >= 0) & (cols < size_z))
    cut = volumes[:, rows.clip(0, size_x - 1)[None, :, None], np.asarray(slices)[:, None, None],
                  cols.clip(0, size_z - 1)[None, None, :]]
    return cut * (inside / np.float32(255))


def _tissues(brain, gm, wm):
    """(N, 3, *shape) probabilities of CSF, GM and WM: CSF is the rest of the brain, 0 outside it."""
    return np.stack([np.clip(1 - gm - wm, 0, 1), gm, wm], axis=1) * brain[:, np.newaxis]


def _smooth_fields(rng, count, shape, scale):
    """(count, *shape) random fields, each of zero mean and unit SD, smooth over ``scale`` pixels.

    White noise on a grid ``scale`` times coarser, upsampled by cubic splines (smoother than the linear
    resize of neurite's ``draw_perlin``). Spline upsampling is linear and separable, so it is applied as one
    (size, coarse size) matrix per axis, which is fast whatever the scale.
    """
    fields = rng.standard_normal((count, *(int(size / scale) + 2 for size in shape)), dtype=np.float32)
    for axis, size in enumerate(shape, start=1):
        coarse = fields.shape[axis]
        upsample = ndi.zoom(np.eye(coarse, dtype=np.float32), (size / coarse, 1), order=3)
        fields = np.moveaxis(np.tensordot(fields, upsample, axes=([axis], [1])), -1, axis)
    axes = tuple(range(1, fields.ndim))
    fields -= fields.mean(axis=axes, keepdims=True)
    return fields / fields.std(axis=axes, keepdims=True)


def _resample(images, displacement, order):
    """``images`` (N, *shape) sampled at x + displacement(x), with (N, ndim, *shape) displacements in pixels."""
    grid = np.indices(images.shape[1:], dtype=np.float32)
    return np.stack([ndi.map_coordinates(image, grid + shift, order=order, mode="nearest")
                     for image, shift in zip(images, displacement)])


def _random_diffeomorphism(rng, count, shape, std, scale):
    """(count, ndim, *shape) displacements: a velocity field of SD ``std`` px, smooth over ``scale`` px, integrated."""
    ndim = len(shape)
    velocity = std * _smooth_fields(rng, ndim * count, shape, scale).reshape(count, ndim, *shape)
    displacement = velocity / 2 ** _INTEGRATION_STEPS
    for _ in range(_INTEGRATION_STEPS):  # phi_2t = phi_t o phi_t
        displacement = displacement + np.stack(
            [_resample(displacement[:, axis], displacement, order=1) for axis in range(ndim)], axis=1)
    return displacement


def _unit_max(images):
    """Each image of (N, *shape) divided by its maximum."""
    peak = images.max(axis=tuple(range(1, images.ndim)), keepdims=True)
    return images / np.maximum(peak, np.finfo(np.float32).tiny)


def _acquire(rng, clean, mask, bias_std, noise_std, voxel_size):
    """One acquisition of (N, *shape) clean renders: smooth bias field, noise, background 0, max 1."""
    bias = np.exp(bias_std * _smooth_fields(rng, len(clean), clean.shape[1:], _BIAS_SCALE / voxel_size))
    noisy = clean * bias + noise_std * rng.standard_normal(clean.shape, dtype=np.float32)
    return _unit_max(np.clip(noisy, 0, None) * mask).astype(np.float32)


def _check_int(name, value, low, high=np.inf):
    if not (is_integer(value) and low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_number(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not low <= value < high:
        raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")


def demo_dataset(n_subjects=40, seed=0, shape=(160, 192), slice_index=131, slice_jitter=3,
                 warp_std=2.0, intensity_jitter=0.03, bias_std=0.05, noise_std=0.02):
    """Builds labelled demo subjects from the MNI template that nilearn ships (see the module doc).

    Args:
        n_subjects: N, the number of subjects.
        seed: integer; the same seed gives the same dataset. None draws a new one every call.
        shape: (H, W) of the slices in 1 mm pixels, cut around the world origin.
        slice_index: coronal slice of the template (index along its posterior -> anterior axis);
            the default 131 is y = -3 mm, the level of the OASIS mid-coronal slice.
        slice_jitter: each subject's slice is drawn uniformly within +-slice_jitter of slice_index.
        warp_std: SD in pixels of the random velocity field (0: no deformation), below MAX_WARP_STD.
        intensity_jitter: per-tissue gains are drawn uniformly in 1 +- intensity_jitter per subject
            and contrast; below 0.04 they cannot reverse the PD ordering GM > CSF.
        bias_std: SD of the log of the multiplicative bias fields, below 5 (already gains of e^+-15 at three
            SDs; from about 20 they overflow float32).
        noise_std: SD of the Gaussian noise, relative to the brightest tissue, below 10.

    Returns: a ``DemoDataset``: ``labels`` (N, H, W) int32 in 0..3, ``images[contrast]`` (N, H, W)
    float32 in [0, 1] for every contrast of ``CONTRASTS``, ``subjects``; ``inputs(contrast)`` gives
    (N, H, W, 1).

    Raises: ModuleNotFoundError without nilearn, FileNotFoundError when its template files are missing.
    """
    _check_int("n_subjects", n_subjects, 1)
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(is_integer(s, 2) for s in shape)):
        raise ValueError(f"shape must be (H, W), two integers >= 2, got {shape!r}")  # 1 pixel: its SD is 0
    rendering = _check_rendering(seed, warp_std, intensity_jitter, bias_std, noise_std)
    depth = _template()[0].shape[2]
    _check_int("slice_jitter", slice_jitter, 0, (depth - 1) // 2)  # else no slice_index leaves room for it
    _check_int("slice_index", slice_index, slice_jitter, depth - 1 - slice_jitter)

    rng = np.random.default_rng(seed)
    slices = slice_index + rng.integers(-slice_jitter, slice_jitter + 1, n_subjects)
    return _subjects(rng, *_coronal_slices(slices, tuple(shape)), voxel_size=1, **rendering)


def demo_volumes(n_subjects=2, seed=0, voxel_size=3, warp_std=2.0, intensity_jitter=0.03, bias_std=0.05,
                 noise_std=0.02):
    """Labelled 3D demo subjects: the whole MNI template brain, coarsened, deformed and rendered.

    The same subjects as ``demo_dataset`` builds (labels, random diffeomorphisms, contrasts, bias and
    noise: see the module doc), on the template's RAS grid (axis 0 left -> right, 1 posterior ->
    anterior, 2 inferior -> superior) cropped to the brain with a margin and averaged over blocks of
    ``voxel_size``^3 mm, e.g. 53x65x54 voxels of 3 mm.

    Args:
        n_subjects: N, the number of subjects.
        seed: integer; the same seed gives the same subjects. None draws new ones every call.
        voxel_size: integer edge of the voxels in mm (the template's 1 mm voxels averaged in blocks).
        warp_std: SD in mm of the random velocity field (0: no deformation), below MAX_WARP_STD; like the
            smoothness of the deformations and bias fields, the same length in mm as in ``demo_dataset``.
        intensity_jitter, bias_std, noise_std: as for ``demo_dataset``.

    Returns: a ``DemoDataset``: ``labels`` (N, X, Y, Z) int32 in 0..3, ``images[contrast]``
    (N, X, Y, Z) float32 in [0, 1]; ``inputs(contrast)`` gives (N, X, Y, Z, 1).

    Raises: ModuleNotFoundError without nilearn, FileNotFoundError when its template files are missing.
    """
    _check_int("n_subjects", n_subjects, 1)
    _check_int("voxel_size", voxel_size, 1, 16)
    rendering = _check_rendering(seed, warp_std, intensity_jitter, bias_std, noise_std)
    rng = np.random.default_rng(seed)
    volumes = np.repeat(_coarse_brain(voxel_size)[:, np.newaxis], n_subjects, axis=1)
    return _subjects(rng, *volumes, voxel_size=voxel_size, **rendering)


def _coarse_brain(voxel_size):
    """(T1, GM, WM), each (X, Y, Z) float32 in [0, 1]: the template cropped to the brain and block-averaged."""
    volumes = _template()[0]
    inside = np.argwhere(volumes[0] > 0)
    low = np.maximum(inside.min(axis=0) - _MARGIN_MM, 0)
    size = -(-(inside.max(axis=0) + 1 + _MARGIN_MM - low) // voxel_size)  # in coarse voxels, rounded up
    padded = np.zeros((3, *(size * voxel_size)), np.float32)
    crop = volumes[:, low[0]:, low[1]:, low[2]:][:, :padded.shape[1], :padded.shape[2], :padded.shape[3]]
    padded[:, :crop.shape[1], :crop.shape[2], :crop.shape[3]] = crop / np.float32(255)
    blocks = padded.reshape(3, size[0], voxel_size, size[1], voxel_size, size[2], voxel_size)
    # Each block is the mean of its brain voxels, or background where they are fewer than half of it: counted as
    # brain, the background share of the blocks at the brain's edge became CSF (p_csf = 1 - p_gm - p_wm), a rim
    # bright in T2 and PD (14% of the brain CSF at 3 mm against 8.5% at 1 mm). GM and WM outside the mask go too.
    brain = blocks[0] > 0
    count = brain.sum(axis=(1, 3, 5))
    means = (blocks * brain).sum(axis=(2, 4, 6)) / np.maximum(count, 1)
    return (means * (2 * count >= voxel_size ** 3)).astype(np.float32)


def _check_rendering(seed, warp_std, intensity_jitter, bias_std, noise_std):
    """The validated keyword arguments of ``_subjects``."""
    if seed is not None:
        _check_int("seed", seed, 0, 2 ** 32 - 1)  # Keras' seeds of the models trained on the subjects
    rendering = dict(warp_std=warp_std, intensity_jitter=intensity_jitter, bias_std=bias_std, noise_std=noise_std)
    for name, high in (("warp_std", MAX_WARP_STD), ("intensity_jitter", 1), ("bias_std", 5), ("noise_std", 10)):
        _check_number(name, rendering[name], 0, high)
    return rendering


def _subjects(rng, t1, gm, wm, voxel_size, warp_std, intensity_jitter, bias_std, noise_std):
    """Subjects from (N, *shape) template T1, GM and WM in [0, 1] on voxels of ``voxel_size`` mm: labels,
    deformation, every contrast. Lengths (warp_std, the smoothness of warps and bias fields) are in mm."""
    n_subjects, shape = len(t1), t1.shape[1:]
    brain = t1 > 0
    labels = np.where(brain, np.argmax(_tissues(brain, gm, wm), axis=1) + 1, 0).astype(np.float32)

    displacement = _random_diffeomorphism(rng, n_subjects, shape, warp_std / voxel_size, _WARP_SCALE / voxel_size)
    labels = _resample(labels, displacement, order=0).astype(np.int32)
    brain = labels > 0
    t1, gm, wm = (_resample(image, displacement, order=1) * brain for image in (t1, gm, wm))
    tissues = _tissues(brain, gm, wm)

    def render(means):  # partial-volume blend of per-subject tissue intensities (N, 3)
        gains = rng.uniform(1 - intensity_jitter, 1 + intensity_jitter, (n_subjects, 3))
        return np.einsum("nk...,nk->n...", tissues, means * gains)

    acquire = functools.partial(_acquire, rng, mask=brain, bias_std=bias_std, noise_std=noise_std,
                                voxel_size=voxel_size)
    images = {"t1": acquire(t1 * render(np.ones(3)))}  # the template T1 times per-tissue gains
    images["t1_inverted"] = _unit_max(np.stack([invert(x, m) for x, m in zip(images["t1"], brain)]))
    images.update((contrast, acquire(render(TISSUE_MEANS[contrast]))) for contrast in ("t2", "pd"))
    subjects = tuple(f"demo{index:03d}" for index in range(n_subjects))
    return DemoDataset(labels=labels, images={c: images[c] for c in CONTRASTS}, subjects=subjects)
