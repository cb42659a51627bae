"""`cifl demo --3d`: the 3D demo subjects, the orthogonal-slice figure, the run and its one-line errors."""
import json
import re

import matplotlib.image
import numpy as np
import pytest

import cifl_tf
from cifl_tf import cli, demo, demo3d, demo_data, figures
from cifl_tf.descriptors import MIND

CSF, GM, WM = 1, 2, 3


@pytest.fixture(scope="module")
def volumes():
    return demo_data.demo_volumes(n_subjects=2, seed=0, voxel_size=8)


def test_volumes_layout(volumes):
    shape = volumes.labels.shape[1:]
    assert volumes.labels.shape == (2, *shape) and volumes.labels.dtype == np.int32 and len(shape) == 3
    assert volumes.inputs("t2").shape == (2, *shape, 1)
    for labels in volumes.labels:
        assert set(np.unique(labels)) == {0, CSF, GM, WM}
    for image in volumes.images.values():
        assert image.shape == (2, *shape) and image.dtype == np.float32
        assert np.allclose(image.max(axis=(1, 2, 3)), 1) and np.all(image[volumes.labels == 0] == 0)


def test_voxel_size_coarsens_the_whole_brain():
    """The template brain (145x181x155 mm) with 6 mm margins (none below: the brain stem reaches the
    template's edge) is cut into voxel_size mm blocks."""
    for voxel_size in (4, 8):
        expected = [-(-extent // voxel_size) for extent in (145 + 12, 181 + 12, 155 + 6)]
        assert list(demo_data.demo_volumes(n_subjects=1, voxel_size=voxel_size).labels.shape[1:]) == expected


def test_coarser_voxels_keep_the_brain_and_add_no_csf():
    """A block is the mean of its brain voxels, or background where they are fewer than half of it: counted as
    brain, the background share of the brain's edge blocks was CSF (14% of the brain at 3 mm, 27% at 8 mm, 8.5%
    at 1 mm), as bright as CSF in T2 and PD, and the brain 7% and 25% larger."""
    plain = dict(n_subjects=1, warp_std=0, bias_std=0, noise_std=0, intensity_jitter=0)
    fine = demo_data.demo_volumes(voxel_size=1, **plain).labels[0]
    for voxel_size in (3, 8):
        coarse = demo_data.demo_volumes(voxel_size=voxel_size, **plain).labels[0]
        assert np.count_nonzero(coarse) * voxel_size ** 3 == pytest.approx(np.count_nonzero(fine), rel=0.01)
        assert np.mean(coarse[coarse > 0] == CSF) <= np.mean(fine[fine > 0] == CSF)


@pytest.mark.parametrize("contrast, dark_to_bright", [("t1", (CSF, GM, WM)), ("t2", (WM, GM, CSF))])
def test_volumes_tissue_ordering(volumes, contrast, dark_to_bright):
    means = [volumes.images[contrast][volumes.labels == label].mean() for label in dark_to_bright]
    assert np.all(np.diff(means) > 0.05), means


def test_volumes_seeded_and_deformed(volumes):
    again = demo_data.demo_volumes(n_subjects=2, seed=0, voxel_size=8)
    np.testing.assert_array_equal(again.labels, volumes.labels)
    np.testing.assert_array_equal(again.images["pd"], volumes.images["pd"])
    assert np.mean(volumes.labels[0] != volumes.labels[1]) > 0.01  # each subject has its own deformation
    still = demo_data.demo_volumes(n_subjects=2, seed=0, voxel_size=8, warp_std=0)
    np.testing.assert_array_equal(still.labels[0], still.labels[1])


@pytest.mark.parametrize("name, value", [("voxel_size", 0), ("voxel_size", 2.5), ("n_subjects", 0), ("warp_std", -1.0),
                                         ("warp_std", demo_data.MAX_WARP_STD)])
def test_volumes_bad_arguments_are_named(name, value):
    with pytest.raises(ValueError, match=f"{name}.*{re.escape(repr(value))}"):
        demo_data.demo_volumes(**{"voxel_size": 8, name: value})


def test_orthogonal_registrations_draws_a_row_per_volume(volumes, tmp_path):
    fixed, labels = volumes.images["t2"][1], volumes.labels
    moved = {"A": volumes.images["t1"][0], "B": volumes.images["t1"][0]}
    path = figures.orthogonal_registrations(fixed, labels[1], moved, {"A": labels[0], "B": labels[0]},
                                            str(tmp_path / "f.png"), title="t")
    one = figures.orthogonal_registrations(fixed, labels[1], {}, {}, str(tmp_path / "g.png"))
    unlabelled = figures.orthogonal_registrations(fixed, labels[1], moved, None, str(tmp_path / "h.png"))
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width == 660 and height == 3 * 220 and matplotlib.image.imread(one).shape[0] == 220
    assert matplotlib.image.imread(unlabelled).shape[:2] == (height, width)


def test_methods_compare_the_shipped_3d_encoder_or_the_given_one():
    shipped = demo3d.methods()["CIFL"][0]
    assert isinstance(shipped, cifl_tf.CIFLEncoder) and shipped.ndim == 3
    for ours, theirs in zip(shipped.get_weights(), cifl_tf.pretrained(ndim=3).get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    encoder = cifl_tf.CIFLEncoder(channels=3, features=4, ndim=3)
    compared = demo3d.methods(encoder)
    assert list(compared) == ["CIFL", "CIFL + MIND", "MIND", "NCC", "MI"] and compared["CIFL"] == (encoder, None)
    stack, similarity = compared["CIFL + MIND"]
    assert stack.describers[0] is encoder and isinstance(stack.describers[1], MIND) and similarity is None
    assert compared["MI"] == (None, "mi") and compared["MIND"][0].ndim == 3


@pytest.mark.integration
def test_quick_3d_demo_with_an_encoder_writes_table_results_and_figures(tmp_path, monkeypatch, capsys):
    # One target and the CIFL row keep it short; the slow test below runs every method and target. The NCC X -> X
    # reference registers with a zero field: its calls are the next test's, and register_pair's NCC test_instance's.
    monkeypatch.setattr(demo3d, "TARGETS", ("t2",))
    compared, registered = demo3d.methods, demo3d.register_pair
    monkeypatch.setattr(demo3d, "methods", lambda encoder=None: {"CIFL": compared(encoder)["CIFL"]})

    def register_pair(moving, fixed, encoder, similarity, **kwargs):
        if similarity == "ncc":  # the NCC X -> X reference
            return np.zeros((*moving.shape, 3), np.float32)
        return registered(moving, fixed, encoder=encoder, similarity=similarity, **kwargs)

    monkeypatch.setattr(demo3d, "register_pair", register_pair)
    cifl_tf.save_encoder(cifl_tf.CIFLEncoder(channels=3, features=4, ndim=3), str(tmp_path / "enc.weights.h5"))
    out = tmp_path / "out"
    assert cli.main(["demo", "--3d", "--quick", "--encoder", str(tmp_path / "enc.weights.h5"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GFLOP/s" in printed and "wall time" in printed
    assert re.fullmatch(rf"results and figures written to {re.escape(str(out))}/, \d+ s in all",
                        printed.splitlines()[-1])  # the wall time of the tables above, and of the figures
    assert sorted(p.name for p in out.iterdir()) == ["registrations_3d_t2.png", "results.json", "table.md"]
    results = json.loads((out / "results.json").read_text())
    assert (results["seed"], results["quick"], results["shipped_encoder"]) == (0, True, False)  # what was run
    assert list(results["results"]) == ["unregistered", "CIFL", "NCC X -> X"]
    scores = results["results"]["CIFL"]["t2"]
    assert set(scores["dice"]) == {"CSF", "GM", "WM"} and 0 < scores["mean_dice"] <= 1
    assert 0 <= scores["folding"] <= 1 and scores["seconds"] > 0 and results["matmul_gflops"] > 0
    assert results["results"]["unregistered"]["t2"]["folding"] == 0
    table = (out / "table.md").read_text()
    assert re.search(r"\nCIFL +t2 +(0\.\d{3} +){4}", table) and "GFLOP/s" in table
    assert "--quick: a smoke run" in table  # its Dice are the unregistered ones: no comparison to read


def test_same_contrast_reference_registers_subject_0_in_the_fixed_contrast(tmp_path, monkeypatch):
    calls = []

    def register_pair(moving, fixed, encoder, similarity, **kwargs):  # records the call instead of registering
        calls.append((moving, fixed, encoder, similarity))
        return np.zeros((*moving.shape, 3), np.float32)

    monkeypatch.setattr(demo3d, "register_pair", register_pair)
    monkeypatch.setattr(demo3d, "methods", lambda encoder=None: {"MI": (None, "mi")})
    monkeypatch.setattr(demo3d, "matmul_gflops", lambda: 1.0)  # measured in the test above
    results = demo3d.run_demo_3d(str(tmp_path), quick=True, verbose=0)
    data = demo_data.demo_volumes(n_subjects=2, seed=0, voxel_size=8)
    assert [call[2:] for call in calls] == [(None, "mi")] * 3 + [(None, "ncc")] * 3
    movings = [data.images["t1"][0]] * 3 + [data.images[target][0] for target in demo3d.TARGETS]
    for (moving, fixed, _, _), expected, target in zip(calls, movings, 2 * demo3d.TARGETS, strict=True):
        np.testing.assert_array_equal(moving, expected)
        np.testing.assert_array_equal(fixed, data.images[target][1])
    for target in demo3d.TARGETS:  # zero fields leave subject 0's labels where they were
        assert results["NCC X -> X"][target]["mean_dice"] == results["unregistered"][target]["mean_dice"]


@pytest.mark.slow
def test_quick_3d_demo_compares_every_method_on_every_contrast(tmp_path, capsys):
    results = demo3d.run_demo_3d(str(tmp_path), quick=True, verbose=0)
    assert list(results) == ["unregistered", "CIFL", "CIFL + MIND", "MIND", "NCC", "MI", "NCC X -> X"]
    assert all(list(targets) == ["t1", "t2", "pd"] for targets in results.values())


def test_2d_demo_refuses_a_3d_encoder(tmp_path, capsys):
    cifl_tf.save_encoder(cifl_tf.CIFLEncoder(channels=3, features=4, ndim=3), str(tmp_path / "enc.weights.h5"))
    assert cli.main(["demo", "--quick", "--encoder", str(tmp_path / "enc.weights.h5"),
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert f"--encoder {tmp_path / 'enc.weights.h5'}: the 2D demo needs a 2D encoder, got a 3D CIFLEncoder" in err


def test_3d_demo_refuses_a_2d_encoder(tmp_path, capsys):
    cifl_tf.save_encoder(cifl_tf.CIFLEncoder(channels=3, features=4, ndim=2), str(tmp_path / "enc.weights.h5"))
    assert cli.main(["demo", "--3d", "--quick", "--encoder", str(tmp_path / "enc.weights.h5"),
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert f"--encoder {tmp_path / 'enc.weights.h5'}: the 3D demo needs a 3D encoder, got a 2D CIFLEncoder" in err


@pytest.mark.parametrize("options", [[], ["--3d"]], ids=["2d", "3d"])
def test_demo_refuses_an_empty_encoder_path(tmp_path, capsys, options):
    """An unset shell variable (`--encoder "$RUN"`) is not the shipped encoder."""
    assert cli.main(["demo", *options, "--quick", "--encoder", "", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--encoder is an empty name (an unset shell variable?)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [[], ["--3d"]], ids=["2d", "3d"])
@pytest.mark.parametrize("out, message", [
    ("", "--out is an empty name (an unset shell variable?)"),  # was the default folder
    ("file/out", "is not a folder"),  # under a file
    ("file", "is not a folder"),
    ("/proc/cifl-demo", "cannot write in /proc"),  # a folder that takes no files, even for root
])
def test_demo_refuses_an_unusable_output_folder_before_working(tmp_path, monkeypatch, capsys, options, out, message):
    started = lambda *args, **kwargs: pytest.fail("the demo started before checking --out")  # noqa: E731
    monkeypatch.setattr(demo, "run_demo", started)
    monkeypatch.setattr(demo3d, "run_demo_3d", started)
    (tmp_path / "file").write_text("")
    assert cli.main(["demo", *options, "--quick", "--out", out and str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("run", [lambda out: demo.run_demo(out, quick=True),
                                 lambda out: demo3d.run_demo_3d(out, quick=True)])
def test_the_demos_python_api_refuses_an_unusable_output_folder_before_working(monkeypatch, run):
    monkeypatch.setattr(demo_data, "demo_dataset", lambda *a, **k: pytest.fail("the demo started before its checks"))
    monkeypatch.setattr(demo_data, "demo_volumes", lambda *a, **k: pytest.fail("the demo started before its checks"))
    with pytest.raises(OSError, match="cannot write in /proc"):
        run("/proc/cifl-demo")


@pytest.mark.parametrize("run", [demo.run_demo, demo3d.run_demo_3d])
def test_the_demos_python_api_refuses_an_empty_output_folder(run):
    with pytest.raises(ValueError, match=r"the output folder is an empty name \(an unset shell variable\?\)"):
        run("", quick=True)


def test_3d_demo_refuses_a_bad_seed_before_working(tmp_path, monkeypatch):
    monkeypatch.setattr(demo3d, "matmul_gflops", lambda: pytest.fail("the demo started before checking the seed"))
    with pytest.raises(ValueError, match="seed must be an integer"):
        demo3d.run_demo_3d(str(tmp_path / "out"), quick=True, seed=-1)
    assert not (tmp_path / "out").exists()
