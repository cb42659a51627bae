"""The embedded demo dataset built from nilearn's MNI template: labels, contrasts, geometry, errors."""
import re
import sys

import nibabel as nib
import numpy as np
import pytest

from cifl_tf import data, demo_data, metrics

N = 6
SHAPE = (160, 192)
CSF, GM, WM = 1, 2, 3


@pytest.fixture(scope="module")
def ds():
    return demo_data.demo_dataset(n_subjects=N, seed=0)


def tissue_means(ds, contrast):
    """Mean intensity per label 0..3 over all subjects."""
    image = ds.images[contrast]
    return np.array([image[ds.labels == label].mean() for label in range(4)])


def brain_dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def test_layout(ds):
    assert ds.labels.shape == (N, *SHAPE) and ds.labels.dtype == np.int32
    assert tuple(ds.images) == demo_data.CONTRASTS == ("t1", "t1_inverted", "t2", "pd")
    assert demo_data.LABEL_NAMES == ("background", "CSF", "GM", "WM")
    for image in ds.images.values():
        assert image.shape == (N, *SHAPE) and image.dtype == np.float32
        assert image.min() == 0 and np.allclose(image.max(axis=(1, 2)), 1)  # each image spans [0, 1]
    assert len(set(ds.subjects)) == N
    assert ds.inputs("t2").shape == (N, *SHAPE, 1)
    np.testing.assert_array_equal(ds.inputs("t2")[..., 0], ds.images["t2"])


def test_every_subject_has_the_four_labels(ds):
    for labels in ds.labels:
        assert set(np.unique(labels)) == {0, CSF, GM, WM}


def test_background_is_zero_and_brain_is_not(ds):
    for image in ds.images.values():
        assert np.all(image[ds.labels == 0] == 0)
        assert np.mean(image[ds.labels > 0] > 0) > 0.99


@pytest.mark.parametrize("contrast, dark_to_bright", [
    ("t1", (CSF, GM, WM)),
    ("t1_inverted", (WM, GM, CSF)),
    ("t2", (WM, GM, CSF)),
])
def test_tissue_ordering(ds, contrast, dark_to_bright):
    means = tissue_means(ds, contrast)
    assert np.all(np.diff(means[list(dark_to_bright)]) > 0.05), means


def test_pd_grey_matter_is_brightest(ds):
    means = tissue_means(ds, "pd")
    assert means[GM] > means[CSF] and means[GM] > means[WM], means


def test_inverted_t1_is_max_minus_t1_inside_the_brain(ds):
    brain = ds.labels[0] > 0
    expected = data.invert(ds.images["t1"][0], brain)
    np.testing.assert_allclose(ds.images["t1_inverted"][0], expected / expected.max(), atol=1e-6)


def test_same_seed_same_data_other_seed_other_data(ds):
    again = demo_data.demo_dataset(n_subjects=N, seed=0)
    other = demo_data.demo_dataset(n_subjects=N, seed=1)
    np.testing.assert_array_equal(again.labels, ds.labels)
    assert np.mean(other.labels != ds.labels) > 0.01
    for contrast in demo_data.CONTRASTS:
        np.testing.assert_array_equal(again.images[contrast], ds.images[contrast])
        assert not np.allclose(other.images[contrast], ds.images[contrast])


def test_subjects_differ_by_deformation_only(ds):
    for a in range(N):
        for b in range(a):
            assert np.mean(ds.labels[a] != ds.labels[b]) > 0.01
    template = demo_data.demo_dataset(n_subjects=3, seed=0, warp_std=0, slice_jitter=0)
    assert np.all(template.labels == template.labels[0])
    # A smooth deformation moves edges, it does not scramble the anatomy.
    for labels in ds.labels:
        assert 0.8 < brain_dice(labels > 0, template.labels[0] > 0) < 0.995


def test_slices_overlay_the_oasis_layout(oasis_sample):
    """Same grid as neurite-oasis: the undeformed demo brain overlaps the real brain, upside down does not."""
    demo = demo_data.demo_dataset(n_subjects=1, warp_std=0, slice_jitter=0).labels[0] > 0
    for seg in sorted(oasis_sample.glob("*/slice_seg4.nii.gz")):
        real = np.asarray(nib.load(seg).dataobj).squeeze() > 0
        assert real.shape == demo.shape
        assert brain_dice(demo, real) > 0.8 > brain_dice(demo[:, ::-1], real)


@pytest.mark.parametrize("name, value", [
    ("n_subjects", 0), ("seed", -1), ("shape", (160,)), ("shape", (160, 0)), ("shape", (1, 1)), ("slice_index", 500),
    ("warp_std", -1.0), ("intensity_jitter", 1.5), ("slice_jitter", 200), ("seed", 2 ** 32),
    ("bias_std", 30.0),  # its bias fields overflowed float32: NaN images
    ("noise_std", 1e39),  # as did its noise
    ("warp_std", demo_data.MAX_WARP_STD),  # larger fields folded
])
def test_bad_arguments_are_named(name, value):
    with pytest.raises(ValueError, match=f"{name}.*{re.escape(repr(value))}"):
        demo_data.demo_dataset(**{"n_subjects": 2, name: value})


def test_unknown_contrast_is_named(ds):
    with pytest.raises(ValueError, match="flair"):
        ds.inputs("flair")


# The two tests below empty the template cache: they come last so that the others load it once.
@pytest.fixture
def no_cached_template():
    demo_data._template.cache_clear()
    yield
    demo_data._template.cache_clear()


def test_missing_template_files_are_named(no_cached_template, monkeypatch, tmp_path):
    monkeypatch.setattr(demo_data.importlib.resources, "files", lambda package: tmp_path)
    missing = tmp_path / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(missing))} not found.*pip install nilearn"):
        demo_data.demo_dataset(n_subjects=2)


def test_missing_nilearn_says_how_to_install(no_cached_template, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # makes `import nilearn` fail
    with pytest.raises(ModuleNotFoundError, match=r"nilearn.*pip install nilearn.*cifl-tf\[demo\]"):
        demo_data.demo_dataset(n_subjects=2)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape, voxel_size", [((160, 192), 1), ((53, 65, 54), 3)])
def test_warps_below_the_largest_sd_do_not_fold(seed, shape, voxel_size):
    """As the slices and volumes draw them: at 10, one of these 3 mm volumes folded."""
    std = np.nextafter(demo_data.MAX_WARP_STD, 0) / voxel_size
    fields = demo_data._random_diffeomorphism(np.random.default_rng(seed), 2, shape, std,
                                              demo_data._WARP_SCALE / voxel_size)
    assert [metrics.folding_fraction(np.moveaxis(field, 0, -1)) for field in fields] == [0, 0]
