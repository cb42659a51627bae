"""Figures: each writes a PNG of the expected layout (panels x panel size), from tiny inputs."""
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

import cifl_tf
from cifl_tf import figures

RNG = np.random.default_rng(0)
IMAGE = RNG.random((32, 32)).astype(np.float32)
LABELS = (IMAGE * 3).astype(np.int32)


def pixels(path):
    """(height, width) of a PNG in pixels."""
    return plt.imread(path).shape[:2]


def test_figure2_has_a_row_per_contrast_and_a_column_per_channel(tmp_path):
    encoder = cifl_tf.CIFLEncoder(channels=4, features=4)
    path = figures.feature_channels(encoder, {"t1": IMAGE, "t1_inverted": 1 - IMAGE}, tmp_path / "f2.png",
                                    channels=3)
    assert pixels(path) == (2 * 200, 4 * 160)  # figsize (1.6 (channels + 1), 2 rows) at 100 dpi
    path = figures.feature_channels(encoder, {"t1": IMAGE}, tmp_path / "all.png", channels=6)
    assert pixels(path) == (200, 5 * 160)  # the encoder's 4 channels, no empty panels
    with pytest.raises(ValueError, match="channels must be a positive integer, got -1"):
        figures.feature_channels(encoder, {"t1": IMAGE}, tmp_path / "none.png", channels=-1)
    path = figures.feature_channels(encoder, {"t1": IMAGE}, tmp_path / "numpy.png", channels=np.int64(2))
    assert pixels(path) == (200, 3 * 160)


def test_segmentations_have_rows_for_images_truth_and_each_method(tmp_path):
    predictions = {"baseline": {"t1": LABELS, "t2": LABELS}, "cifl": {"t1": LABELS, "t2": 2 - LABELS}}
    path = figures.segmentations({"t1": IMAGE, "t2": 1 - IMAGE}, LABELS, predictions, tmp_path / "seg.png",
                                 label_names=("background", "CSF", "GM"))
    assert pixels(path) == (int(100 * (2.1 * 4 + 0.4)), 2 * 180)


def test_segmentation_colours_span_the_labels_predicted_beyond_the_true_ones(tmp_path, monkeypatch):
    """Predicted labels 2 and 3 took label 1's colour when the true map held only 0 and 1."""
    truth = np.zeros((8, 8), np.int32)
    truth[:4] = 1
    predicted = truth.copy()
    predicted[4:, :4], predicted[4:, 4:] = 2, 3
    drawn = []
    monkeypatch.setattr(figures, "_labels", lambda axis, labels, nb_labels=None: drawn.append(nb_labels))
    figures.segmentations({"t1": IMAGE[:8, :8]}, truth, {"m": {"t1": predicted}}, tmp_path / "seg.png")
    assert drawn == [4, 4]
    with pytest.raises(ValueError, match="the label maps hold label 3, but label_names names 2 labels"):
        figures.segmentations({"t1": IMAGE[:8, :8]}, truth, {"m": {"t1": predicted}}, tmp_path / "seg.png",
                              label_names=("background", "CSF"))


def test_segmentations_of_background_only_have_no_legend(tmp_path):
    empty = np.zeros_like(LABELS)
    path = figures.segmentations({"t1": IMAGE}, empty, {"baseline": {"t1": empty}}, tmp_path / "seg.png")
    assert pixels(path)[0] > 0


def test_segmentation_rows_are_named_at_the_left_and_no_text_overlaps(tmp_path, monkeypatch):
    texts = {}

    def record(figure, path, layout=True):
        renderer = figure.canvas.get_renderer()
        texts["row names"] = [axis.get_ylabel() for axis in figure.axes[::2]]  # column 0 of 2
        texts["boxes"] = [text.get_window_extent(renderer) for axis in figure.axes
                          for text in (axis.title, axis.yaxis.label) if text.get_text()]
        return save(figure, path, layout)

    save = figures._save
    monkeypatch.setattr(figures, "_save", record)
    methods = ("baseline", "CIFL (paper, tau_gamma=0.1)", "CIFL (paper, tau_gamma=0.01)")
    figures.segmentations({"t1": IMAGE, "t2": 1 - IMAGE}, LABELS, {m: {"t1": LABELS, "t2": LABELS} for m in methods},
                          tmp_path / "seg.png")
    assert texts["row names"] == ["", "true labels", "baseline", "CIFL (paper,\ntau_gamma=0.1)",
                                  "CIFL (paper,\ntau_gamma=0.01)"]
    boxes = texts["boxes"]
    assert [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])] == []


def test_registrations_show_moving_fixed_and_each_moved_image(tmp_path):
    path = figures.registrations(IMAGE, IMAGE.T, {"baseline": IMAGE, "cifl": IMAGE.T}, tmp_path / "reg.png",
                                 fixed_labels=LABELS.T, moved_labels={"cifl": LABELS.T}, title="T1 onto T2")
    assert pixels(path) == (260, 4 * 200)


def test_training_curves_read_keras_csv_logs(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,val_loss\n0,40.0,NA\n1,2.5,NA\n2,-0.3,NA\n")
    path = figures.training_curves({"tau_gamma=0.01": log}, tmp_path / "curves.png")
    assert pixels(path) == (320, 500)


@pytest.mark.parametrize("losses", [
    (3.9, 2.6, 1.8),  # the shipped encoders' logs: within a decade
    (2.9, 2.7, 2.5),
    (40.0, 2.5, -0.3),  # low temperature: the first epoch far above the rest
    (0.4, 0.05, 0.01),
])
def test_training_curves_label_at_least_two_loss_ticks(tmp_path, monkeypatch, losses):
    labelled = []

    def save(figure, path):
        figure.canvas.draw()
        axis = figure.axes[0]
        low, high = axis.get_ylim()
        labelled.extend(label.get_text() for tick, label in zip(axis.get_yticks(), axis.get_yticklabels())
                        if low <= tick <= high and label.get_text())

    monkeypatch.setattr(figures, "_save", save)
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss\n" + "".join(f"{epoch},{loss}\n" for epoch, loss in enumerate(losses)))
    figures.training_curves({"run": log}, tmp_path / "curves.png")
    assert len(labelled) >= 2, labelled


@pytest.mark.integration
def test_drawing_leaves_the_users_matplotlib_backend_as_it_was(tmp_path):
    """figures once switched matplotlib to Agg when imported: a notebook's inline plots stopped showing."""
    code = ("import matplotlib; matplotlib.use('svg'); from cifl_tf import figures; "
            f"figures.training_curves({{}}, {str(tmp_path / 'c.png')!r}); print(matplotlib.get_backend())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0 and result.stdout.split()[-1] == "svg", result.stderr[-2000:]
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")


def test_training_curves_name_a_missing_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        figures.training_curves({"run": tmp_path / "missing.csv"}, tmp_path / "curves.png")


def test_label_maps_leave_the_background_unpainted():
    figure, axis = plt.subplots()
    figures._labels(axis, LABELS, nb_labels=3)
    shown = axis.images[0].get_array()
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), LABELS.T == 0)
    plt.close(figure)
