"""Shared pytest fixtures. Test data is generated here; the real OASIS sample is read in place."""
import functools
import os
import pathlib

# The same kernels on every CPU, set before anything imports TensorFlow: TF turns its oneDNN kernels on by itself
# on CPUs with AVX-512 VNNI (machine.onednn_enabled), and their float32 results depend on the batch shape (tiled
# triplanar features 1.4e-5 from untiled ones) and, under load, on the run (machine.onednn_enabled's docstring).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
OASIS_SAMPLE = pathlib.Path(os.environ.get("CIFL_OASIS_SAMPLE", REPO.parent / "shared" / "data" / "oasis-sample"))


@pytest.fixture(scope="session")
def oasis_sample():
    """The real two-subject OASIS sample (neurite-oasis layout); skips when it is absent."""
    if not OASIS_SAMPLE.is_dir():
        pytest.skip(f"OASIS sample not found at {OASIS_SAMPLE} (set CIFL_OASIS_SAMPLE)")
    return OASIS_SAMPLE


SEG4_MEANS = (0.0, 0.23, 0.22, 0.35, 0.05)  # mean norm intensity per seg4 label in the real sample


def phantom_labels(shape, rng):
    """A brain-like seg4 label map: nested shells (3 white matter inside 2, 1, 4) around a jittered centre."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum((g - rng.uniform(-0.1, 0.1)) ** 2 for g in grid)) + rng.normal(0, 0.03, shape)
    return np.select([radius < 0.3, radius < 0.45, radius < 0.6, radius < 0.75], [3, 2, 1, 4], 0).astype(np.uint8)


def phantom_image(labels, rng, means=SEG4_MEANS):
    """float32 image of a label map: one mean per label plus noise inside the brain, 0 outside."""
    image = np.asarray(means, np.float32)[labels] + rng.uniform(0.005, 0.02, labels.shape).astype(np.float32)
    return np.where(labels > 0, image, 0).astype(np.float32)


def config_without_name(layer):
    """A layer's config but its name, which load_encoder makes new for every layer it reads."""
    return {key: value for key, value in layer.get_config().items() if key != "name"}


def write_nifti(path, array, affine=None):
    nib.Nifti1Image(array, np.eye(4) if affine is None else affine, dtype=array.dtype).to_filename(path)


def make_oasis(folder, subjects=4, volume_shape=(16, 20, 8), seed=0):
    """Tiny neurite-oasis layout: per subject the 2D slice files (H x W x 1) and 3D aligned files.

    As in the real release, slice_norm is aligned_norm[:, :, D // 2]; seg24 and seg35 are seg4
    scaled to reach their top label (24, 32). Returns the subject folder names.
    """
    rng = np.random.default_rng(seed)
    names = [f"OASIS_OAS1_{i:04d}_MR1" for i in range(1, subjects + 1)]
    for name in names:
        subject = pathlib.Path(folder, name)
        subject.mkdir(parents=True)
        seg4 = phantom_labels(volume_shape, rng)
        norm = phantom_image(seg4, rng)
        middle = volume_shape[2] // 2
        for prefix, index in (("aligned", slice(None)), ("slice", slice(middle, middle + 1))):
            write_nifti(subject / f"{prefix}_norm.nii.gz", norm[:, :, index])
            write_nifti(subject / f"{prefix}_seg4.nii.gz", seg4[:, :, index])
        write_nifti(subject / "slice_seg24.nii.gz", seg4[:, :, middle:middle + 1] * 6)
        write_nifti(subject / "aligned_seg35.nii.gz", seg4 * 8)
    return names


def make_ixi(folder, subjects=3, shape=(12, 14, 10), seed=0):
    """Tiny IXI-style layout: <subject>/t1.nii.gz, t2.nii.gz (CSF bright) and labels.nii.gz."""
    rng = np.random.default_rng(seed)
    names = [f"IXI{i:03d}" for i in range(subjects)]
    for name in names:
        subject = pathlib.Path(folder, name)
        subject.mkdir(parents=True)
        labels = phantom_labels(shape, rng)
        write_nifti(subject / "t1.nii.gz", phantom_image(labels, rng))
        write_nifti(subject / "t2.nii.gz", phantom_image(labels, rng, means=(0.0, 0.5, 0.45, 0.3, 0.9)))
        write_nifti(subject / "labels.nii.gz", labels)
    return names


@pytest.fixture
def oasis_tiny(tmp_path):
    """A fresh tiny neurite-oasis folder (4 subjects, 16x20 slices, 16x20x8 volumes) to read or break."""
    make_oasis(tmp_path / "oasis")
    return tmp_path / "oasis"


@pytest.fixture
def ixi_tiny(tmp_path):
    """A fresh tiny IXI-style folder (3 subjects, 12x14x10 volumes)."""
    make_ixi(tmp_path / "ixi")
    return tmp_path / "ixi"


@pytest.fixture
def tiny_networks(monkeypatch):
    """Makes the Table 1 row runners (so `cifl demo` and the experiments/ scripts) train tiny UNets and
    VxmDense models: building and tracing the full-width networks is most of a smoke run."""
    from cifl_tf import experiments

    monkeypatch.setattr(experiments, "segmentation_row",
                        functools.partial(experiments.segmentation_row, nb_features=4, nb_levels=2))
    monkeypatch.setattr(experiments, "registration_row",
                        functools.partial(experiments.registration_row, nb_unet_features=[[4, 4], [4, 4]],
                                          int_steps=0))


# A train_encoder run stopped by an exception after the first of its three epochs: the state that
# resume continues from. The tuple in
# synth_kwargs is deliberate: settings.json stores it as a list, and resume must still match.
INTERRUPTED_RUN = dict(shape=(32, 32), steps=3, steps_per_epoch=1, batch_size=2, channels=4, features=8,
                       max_offset=0, seed=1, synth_kwargs={"label_scales": (2, 4, 8)})


class Interrupted(Exception):
    """Raised by a test callback to simulate a crash or kill during training."""


def interrupt_at_second_epoch():
    """A Keras callback that raises Interrupted as the second epoch begins."""
    import tensorflow as tf

    class InterruptAtSecondEpoch(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise Interrupted

    return InterruptAtSecondEpoch()


@pytest.fixture(scope="session")
def interrupted_run(tmp_path_factory):
    """Factory: each call returns a fresh copy of one interrupted INTERRUPTED_RUN output folder."""
    import shutil

    import cifl_tf

    original = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(Interrupted):
        cifl_tf.train_encoder(**INTERRUPTED_RUN, out_dir=str(original), callbacks=[interrupt_at_second_epoch()],
                              verbose=0)
    return lambda: shutil.copytree(original, tmp_path_factory.mktemp("resume") / "run")
