"""`cifl register` without --model (instance optimisation), resampling onto the fixed grid, `features --max-memory`."""
import re

import nibabel as nib
import numpy as np
import pytest

import cifl_tf
from cifl_tf import cli, data, metrics, models
from conftest import phantom_image, phantom_labels, write_nifti
from test_cli import run

FIXED_AFFINE = np.array([[0, 0, -1.5, 80], [2, 0, 0, -90], [0, 1, 0, 40], [0, 0, 0, 1]], float)


@pytest.fixture
def pair(tmp_path):
    """fixed.nii.gz (32 x 32 x 1 slice) and moving.nii.gz: the same anatomy shifted 2 pixels along axis 0,
    in twice the voxel size along axis 1 (32 x 16 x 1), with its own affine."""
    rng = np.random.default_rng(0)
    labels = phantom_labels((36, 32), rng)
    image = phantom_image(labels, rng)
    write_nifti(tmp_path / "fixed.nii.gz", image[2:34, :, None], FIXED_AFFINE)
    moving_affine = FIXED_AFFINE @ np.diag([1.0, 2.0, 1.0, 1.0])
    write_nifti(tmp_path / "moving.nii.gz", image[4:36, ::2, None], moving_affine)  # 2 rows on, every 2nd column
    return tmp_path


@pytest.mark.parametrize("moving_axes, fixed_axes", [((1,), (1,)), ((), (1,)), ((1, 1), (1,)), ((1,), (1, 1))])
def test_moving_is_resampled_onto_the_fixed_grid(pair, moving_axes, fixed_axes):
    """Whichever way the files store the slice: H x W x 1, H x W, or with a 4th singleton axis."""
    for name, axes in (("moving", moving_axes), ("fixed", fixed_axes)):
        image = nib.load(pair / f"{name}.nii.gz")
        write_nifti(pair / f"{name}.nii.gz", np.asarray(image.dataobj)[..., 0].reshape(image.shape[:2] + axes),
                    image.affine)
    moving, fixed, affine, header = cli._on_fixed_grid(pair / "moving.nii.gz", pair / "fixed.nii.gz")
    assert moving.shape == fixed.shape == (32, 32)
    np.testing.assert_array_equal(affine, FIXED_AFFINE)
    assert header.get_data_shape() == (32, 32) + fixed_axes
    # Same world positions: on the columns both grids share, the fixed anatomy 2 rows further on.
    np.testing.assert_allclose(moving[:-2, ::2], fixed[2:, ::2], atol=1e-6)


@pytest.mark.parametrize("offset, lands", [(1e-6, True), (0.49, True), (0.51, False)])
def test_a_slice_resamples_in_plane_across_its_thickness(tmp_path, offset, lands):
    """A moving slice 1 mm thick, its plane `offset` mm from the fixed one's (as a header's float32 rounding puts it,
    or further): within half its thickness it lands in-plane, further it is refused, not zeroed."""
    tilt = np.array([[1, 0, 0], [0, np.cos(0.5), -np.sin(0.5)], [0, np.sin(0.5), np.cos(0.5)]])
    fixed_affine = np.eye(4)
    fixed_affine[:3, :3] = tilt
    moving_affine = fixed_affine @ np.diag([2.0, 2.0, 1.0, 1.0])  # 2 mm pixels in the same plane
    moving_affine[:3, 3] += offset * tilt[:, 2]  # along the slices' normal
    image = np.add.outer(np.arange(16.0), 100 * np.arange(16.0))[..., None].astype(np.float32)
    write_nifti(tmp_path / "fixed.nii.gz", np.zeros((32, 32, 1), np.float32), fixed_affine)
    write_nifti(tmp_path / "moving.nii.gz", image, moving_affine)
    if not lands:
        with pytest.raises(data.DataError, match="no part of it lies in the field of view"):
            cli._on_fixed_grid(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz")
        return
    moving, _, _, _ = cli._on_fixed_grid(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz")
    np.testing.assert_allclose(moving[:30:2, :30:2], image[:15, :15, 0], atol=1e-3)  # the moving pixels' centres
    np.testing.assert_allclose(moving[1:30:2, 1:30:2], image[:15, :15, 0] + 50.5, atol=1e-3)  # halfway: linear


def test_each_image_is_read_once(pair, monkeypatch):
    reads = []
    read = data._read  # under load_nifti and resample_onto alike
    monkeypatch.setattr(data, "_read", lambda path, *args, **kwargs: reads.append(path) or read(path, *args, **kwargs))
    cli._on_fixed_grid(pair / "moving.nii.gz", pair / "fixed.nii.gz")
    assert sorted(reads) == [pair / "fixed.nii.gz", pair / "moving.nii.gz"]


def test_slices_stored_along_other_axes_under_one_affine_are_resampled(tmp_path):
    """1 x 32 x 32 and 32 x 32 x 1 under the identity lie in perpendicular planes, which meet in one line."""
    image = np.arange(1.0, 1025.0, dtype=np.float32).reshape(1, 32, 32)
    write_nifti(tmp_path / "fixed.nii.gz", np.zeros((32, 32, 1), np.float32))
    write_nifti(tmp_path / "moving.nii.gz", image)
    moving, _, _, _ = cli._on_fixed_grid(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz")
    np.testing.assert_array_equal(moving[0], image[0, :, 0])  # world (0, j, 0): where the planes meet
    np.testing.assert_array_equal(moving[1:], image.min())  # elsewhere the moving image's background


def test_the_fixed_grid_outside_the_moving_image_takes_its_background(tmp_path):
    """CT-like values: where the moving image has no voxel, the fixed grid takes its smallest value (air), not 0."""
    image = np.full((8, 16, 4), -1000.0, np.float32)
    image[2:6, 4:12] = 40.0
    write_nifti(tmp_path / "fixed.nii.gz", np.zeros((16, 16, 4), np.float32))
    shifted = np.eye(4)
    shifted[0, 3] = 4  # the moving image covers rows 4-11 of the fixed grid
    write_nifti(tmp_path / "moving.nii.gz", image, shifted)
    moving, _, _, _ = cli._on_fixed_grid(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz")
    np.testing.assert_array_equal(moving[4:12], image)
    np.testing.assert_array_equal(moving[:4], -1000)
    np.testing.assert_array_equal(moving[12:], -1000)


@pytest.mark.parametrize("rows_on, stdout, stderr", [
    (0, "", ""),
    (4, "covers 75.0% of the field of view", ""),
    (12, "", "warning: {moving} covers 25.0% of the field of view of {fixed} where their affines place it"),
])
def test_the_share_of_the_fixed_grid_the_moving_image_covers_is_told(tmp_path, capsys, rows_on, stdout, stderr):
    """A small share is likely a wrong affine, and the rest of the grid takes the moving image's background."""
    shifted = np.eye(4)
    shifted[0, 3] = rows_on
    write_nifti(tmp_path / "fixed.nii.gz", np.zeros((16, 16, 4), np.float32))
    write_nifti(tmp_path / "moving.nii.gz", np.ones((16, 16, 4), np.float32), shifted)
    cli._on_fixed_grid(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz")
    told = capsys.readouterr()
    paths = dict(moving=tmp_path / "moving.nii.gz", fixed=tmp_path / "fixed.nii.gz")
    for said, expected in ((told.out, stdout), (told.err, stderr)):
        assert (expected.format(**paths) in said) if expected else said == ""


def register(pair, capsys, *options):
    """Runs `cifl register --intensity ncc` on the pair; returns (status, stdout, displacement)."""
    status, stdout, _ = run(capsys, "register", "--moving", pair / "moving.nii.gz", "--fixed", pair / "fixed.nii.gz",
                            "--moved", pair / "moved.nii.gz", "--warp", pair / "warp.nii.gz", "--intensity", "ncc",
                            *options)
    return status, stdout, data.load_nifti(pair / "warp.nii.gz", channels=True)[0] if status == 0 else None


def test_register_counts_a_single_folded_voxel(pair, capsys, monkeypatch):
    field = np.zeros((32, 32, 2), np.float32)
    field[10, 10, 0] = 3.0  # by central differences, det = 1 - 3 / 2 < 0 at (11, 10) only
    assert metrics.folding_fraction(field) == 1 / 1024
    monkeypatch.setattr(cli, "register_pair", lambda *args, **kwargs: field)
    status, stdout, _ = register(pair, capsys)
    assert status == 0 and "folded voxels: 1 of 1024 (0.098%)" in stdout


def test_register_without_a_model_writes_on_the_fixed_grid(pair, capsys):
    status, stdout, displacement = register(pair, capsys, "--levels", "1", "--steps", 2)
    assert status == 0 and "moved image written" in stdout and "folded voxels: 0 of 1024 (0.000%)" in stdout
    moved, warp = nib.load(pair / "moved.nii.gz"), nib.load(pair / "warp.nii.gz")
    fixed = nib.load(pair / "fixed.nii.gz")
    assert moved.shape == fixed.shape and displacement.shape == (32, 32, 2)
    for image in (moved, warp):
        np.testing.assert_array_equal(image.affine, fixed.affine)
    assert moved.header.get_xyzt_units() == fixed.header.get_xyzt_units()
    moving = data.resample_onto(pair / "moving.nii.gz", pair / "fixed.nii.gz")[0]  # the README's way to reproduce it
    expected = models.warp(moving[None, ..., None], displacement[None])[0, ..., 0]
    np.testing.assert_allclose(np.asarray(moved.dataobj)[..., 0], expected, atol=1e-6)


@pytest.mark.parametrize("options, passed_on", [([], dict(moved_features=None, equalize=False)),
                                               (["--moved-features", "warped"], dict(moved_features="warped")),
                                               (["--moved-features", "encoded"], dict(moved_features="encoded")),
                                               (["--equalize"], dict(equalize=True))])
def test_register_passes_its_options_on(pair, capsys, monkeypatch, options, passed_on):
    passed = []
    monkeypatch.setattr(cli, "register_pair", lambda moving, fixed, encoder, **kwargs: passed.append(
        kwargs) or np.zeros((*fixed.shape, 2), np.float32))
    status, _, _ = run(capsys, "register", "--moving", pair / "moving.nii.gz", "--fixed", pair / "fixed.nii.gz",
                       "--moved", pair / "moved.nii.gz", *options)
    assert status == 0 and len(passed) == 1 and passed_on.items() <= passed[0].items()


@pytest.mark.slow
def test_register_without_a_model_undoes_the_shift(pair, capsys):
    status, _, displacement = register(pair, capsys, "--levels", "2,1", "--steps", 30)
    inside = np.asarray(nib.load(pair / "fixed.nii.gz").dataobj)[..., 0] > 0
    assert status == 0 and metrics.folding_fraction(displacement) == 0
    assert np.median(displacement[inside][:, 0]) < -1  # the moving anatomy lies 2 rows further on


def test_features_with_a_small_memory_budget_equal_the_untiled_features(pair, capsys):
    status, _, _ = run(capsys, "features", pair / "fixed.nii.gz", pair / "f.nii.gz", "--pretrained", "0.1",
                       "--max-memory", "300K")
    features, _, _ = data.load_nifti(pair / "f.nii.gz", channels=True)
    image, _, _ = data.load_nifti(pair / "fixed.nii.gz")
    expected = cifl_tf.pretrained(0.1)(data.normalize(image)[None, ..., None])[0]
    assert status == 0
    np.testing.assert_allclose(features, expected, atol=1e-5)


@pytest.fixture(scope="module")
def saved_stack(tmp_path_factory):
    """A saved FeatureStack, which no case changes: written once, not in each case (a quarter second each)."""
    path = str(tmp_path_factory.mktemp("stack") / "stack.weights.h5")
    cifl_tf.save_encoder(cifl_tf.FeatureStack([cifl_tf.pretrained(0.1), cifl_tf.descriptors.MIND()]), path)
    return path


@pytest.mark.parametrize("ndim, options, tau_gamma", [(2, [], None), (2, ["--pretrained", "0.1"], 0.1),
                                                      (3, ["--pretrained", "0.1"], 0.1)])
def test_register_stacks_the_descriptor_beside_the_chosen_encoder(pair, capsys, monkeypatch, ndim, options,
                                                                  tau_gamma):
    passed = []
    monkeypatch.setattr(cli, "register_pair", lambda moving, fixed, encoder, **kwargs: passed.append(encoder)
                        or np.zeros((*fixed.shape, ndim), np.float32))
    images = {"--moving": pair / "moving.nii.gz", "--fixed": pair / "fixed.nii.gz"}
    if ndim == 3:
        write_nifti(pair / "volume.nii.gz", np.random.default_rng(0).random((8, 8, 8), np.float32))
        images = {"--moving": pair / "volume.nii.gz", "--fixed": pair / "volume.nii.gz"}
    status, _, _ = run(capsys, "register", *[item for option in images.items() for item in option],
                       "--moved", pair / "moved.nii.gz", "--stack-descriptor", "ssc", *options)
    (stack,) = passed
    assert status == 0 and isinstance(stack, cifl_tf.FeatureStack) and stack.ndim == ndim
    encoder, mind = stack.describers
    assert isinstance(encoder, cifl_tf.Triplanar if ndim == 3 else cifl_tf.CIFLEncoder)
    expected = cifl_tf.pretrained() if tau_gamma is None else cifl_tf.pretrained(tau_gamma)
    for ours, shipped in zip(encoder.encoder.get_weights() if ndim == 3 else encoder.get_weights(),
                             expected.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, shipped)
    assert (mind.variant, mind.ndim) == ("ssc", ndim)


def test_features_refuse_a_descriptor_stacked_beside_a_descriptor_in_one_line(pair, capsys):
    status, _, err = run(capsys, "features", pair / "fixed.nii.gz", pair / "f.nii.gz", "--descriptor", "mind",
                         "--stack-descriptor", "mind")
    assert status == 2 and err.count("\n") == 1 and "not beside --descriptor" in err
    assert not (pair / "f.nii.gz").exists()


def test_features_with_a_stacked_descriptor_are_the_stacks_features(pair, capsys):
    status, stdout, _ = run(capsys, "features", pair / "fixed.nii.gz", pair / "f.nii.gz", "--pretrained", "0.1",
                            "--stack-descriptor", "mind", "--max-memory", "300K")
    features, _, _ = data.load_nifti(pair / "f.nii.gz", channels=True)
    image, _, _ = data.load_nifti(pair / "fixed.nii.gz")
    stack = cifl_tf.FeatureStack([cifl_tf.pretrained(0.1), cifl_tf.descriptors.MIND(ndim=2)])
    assert status == 0 and "20-channel features written" in stdout
    np.testing.assert_allclose(features, stack(data.normalize(image)[None, ..., None])[0], atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--moving", "VOLUME", "--fixed", "VOLUME", "--encoder", "ENCODER_2D"],
     r"volume\.nii\.gz: has 3 dimensions, --encoder .* is 2D"),
    (["--fixed", "VOLUME", "--intensity", "ncc"], r"moving\.nii\.gz: has 2 dimensions .*, expected 3"),
    (["--intensity", "ncc", "--steps", "0"], r"argument --steps: must be a positive integer, got '0'"),
    (["--descriptor", "mind", "--feature-scale", "0"], r"argument --feature-scale: must be a positive integer, "
                                                        r"got '0'"),
    (["--intensity", "ncc", "--levels", "1,2"], r"levels must be decreasing positive integer pooling factors"),
    (["--intensity", "ncc", "--feature-scale", "2"], r"feature_scale 2 scales an encoder's features; intensities"),
    (["--model", "MISSING", "--feature-scale", "2"], r"--feature-scale is an option of instance optimisation"),
    (["--model", "MISSING", "--affine", None], r"--affine is an option of instance optimisation"),
    (["--model", "MISSING", "--levels", "2,1"], r"--levels is an option of instance optimisation"),
    (["--model", "MISSING", "--steps", "5"], r"--steps is an option of instance optimisation"),
    (["--model", "MISSING", "--moved-features", "warped"], r"--moved-features is an option of instance optimisation"),
    (["--model", "MISSING", "--stack-descriptor", "mind"], r"--stack-descriptor is an option of instance optimisation"),
    (["--model", "MISSING", "--max-memory", "1M"], r"--max-memory is an option of instance optimisation"),
    (["--model", "MISSING", "--max-memory", "1G"], r"--max-memory is an option of instance optimisation"),
    (["--model", "MISSING", "--feature-scale", "1"], r"--feature-scale is an option of instance optimisation"),
    (["--model", "MISSING", "--equalize", None], r"--equalize is an option of instance optimisation"),
    (["--intensity", "ncc", "--moved-features", "warped"], r"moved_features 'warped' chooses how an encoder's "
                                                            r"features .* intensities have none"),
    (["--intensity", "ncc", "--warp", "MOVED"], r"--moved and --warp are the same file"),
    (["--intensity", "ncc", "--warp", "FIXED"], r"fixed\.nii\.gz is the --fixed image: the output would overwrite"),
    (["--intensity", "ncc", "--moved", "MOVING"], r"moving\.nii\.gz is the --moving image: the output would"),
    (["--intensity", "ncc", "--moving", "APART"], r"apart\.nii\.gz: no part of it lies in the field of view of "
                                                   r".*fixed\.nii\.gz"),
    (["--intensity", "ncc", "--stack-descriptor", "mind"], r"stacks a descriptor beside a CIFL encoder, not beside "
                                                            r"--intensity"),
    (["--descriptor", "mind", "--stack-descriptor", "ssc"], r"stacks a descriptor beside a CIFL encoder, not beside "
                                                            r"--descriptor"),
    (["--encoder", "STACK", "--stack-descriptor", "mind"], r"not beside a saved FeatureStack"),
    (["--moving", "VOLUME", "--fixed", "VOLUME", "--encoder", "ENCODER_2D", "--stack-descriptor", "mind"],
     r"volume\.nii\.gz: has 3 dimensions, --encoder .* is 2D"),
    (["--intensity", "ncc", "--fixed", "MISSING"], r"missing\.nii\.gz: no such file"),
    (["--descriptor", "mind", "--fixed", "CONSTANT"], r"constant\.nii\.gz: every voxel on the fixed grid holds 7: "
                                                      r"nothing to register"),
    (["--intensity", "ncc", "--moving", "CONSTANT"], r"constant\.nii\.gz: every voxel on the fixed grid holds 7"),
    # unset shell variables: instance optimisation instead of --model, no warp written, a warp left behind
    (["--model", ""], r"--model is an empty name \(an unset shell variable\?\)"),
    (["--intensity", "ncc", "--warp", ""], r"--warp is an empty name"),
    (["--intensity", "ncc", "--moved", ""], r"--moved is an empty name"),
    (["--intensity", "ncc", "--moved", "NOFOLDER"], r"nowhere/moved\.nii\.gz: no such folder to write to"),
])
def test_bad_register_input_gives_one_line_exit_2_and_no_file(pair, saved_stack, capsys, argv, message):
    write_nifti(pair / "volume.nii.gz", np.random.default_rng(0).random((8, 8, 8)).astype(np.float32))
    moving = nib.load(pair / "moving.nii.gz")
    write_nifti(pair / "constant.nii.gz", np.full(moving.shape, 7, np.float32), moving.affine)
    apart = moving.affine.copy()
    apart[2, 3] += 500  # 500 mm along z: a slice from elsewhere
    write_nifti(pair / "apart.nii.gz", np.asarray(moving.dataobj), apart)
    (pair / "out").mkdir()
    names = {"VOLUME": pair / "volume.nii.gz", "MISSING": pair / "missing.nii.gz", "APART": pair / "apart.nii.gz",
             "CONSTANT": pair / "constant.nii.gz",
             "MOVED": pair / "out" / "moved.nii.gz",
             "FIXED": pair / "fixed.nii.gz", "MOVING": pair / "moving.nii.gz",
             "NOFOLDER": pair / "nowhere" / "moved.nii.gz",
             "ENCODER_2D": cifl_tf.encoder.PRETRAINED_DIR + "/tau_gamma_0.1.weights.h5", "STACK": saved_stack}
    options = {"--moving": pair / "moving.nii.gz", "--fixed": pair / "fixed.nii.gz",
               "--moved": pair / "out" / "moved.nii.gz", "--warp": pair / "out" / "warp.nii.gz"}
    options.update(zip(argv[::2], [names.get(value, value) for value in argv[1::2]]))
    try:
        status, _, err = run(capsys, "register", *[item for option in options.items() for item in option
                                                   if item is not None])  # None: the option is a flag
    except SystemExit as exit_info:  # argparse's refusal
        status, err = exit_info.code, capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("cifl register: error: ") and re.search(message, err), err
    assert list((pair / "out").iterdir()) == []


def test_mind_describes_images_smaller_than_its_mirrored_margin(pair, capsys):
    """MIND mirrors its input by 2 pixels beyond each border (dilation 1, sigma 0.5): a 2 x 5 image is mirrored
    again, and the moved image of an 8 x 8 pair on register's coarsest default level, 4 (2 x 2), too; that level
    alone (one model to trace, not three)."""
    write_nifti(pair / "thin.nii.gz", np.random.default_rng(0).random((2, 5)).astype(np.float32))
    status, stdout, _ = run(capsys, "features", pair / "thin.nii.gz", pair / "f.nii.gz", "--descriptor", "mind")
    assert status == 0 and "4-channel features written" in stdout
    for name in ("moving", "fixed"):
        write_nifti(pair / f"{name}8.nii.gz", np.random.default_rng(len(name)).random((8, 8)).astype(np.float32))
    status, _, err = run(capsys, "register", "--moving", pair / "moving8.nii.gz", "--fixed", pair / "fixed8.nii.gz",
                         "--moved", pair / "moved8.nii.gz", "--descriptor", "mind", "--levels", "4", "--steps", "1")
    assert status == 0 and (pair / "moved8.nii.gz").exists(), err
