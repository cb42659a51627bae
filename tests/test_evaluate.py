"""Evaluation (paper Table 1): per-label Dice with mean ± std, warped label maps, folding."""
import numpy as np
import pytest

import cifl_tf
import tensorflow as tf
from cifl_tf import evaluate, metrics

SHAPE = (16, 16)


@pytest.fixture(scope="module")
def seg_model():
    return cifl_tf.segmentation_model(SHAPE, 3, nb_features=4, nb_levels=2)


@pytest.fixture(scope="module")
def reg_model():
    return cifl_tf.registration_model(SHAPE, nb_unet_features=[[4], [4, 4]], int_steps=0)


def squares(*boxes):
    """A label map of SHAPE with label k + 1 in box k = (row, col, height, width)."""
    labels = np.zeros(SHAPE, np.int32)
    for label, (r, c, h, w) in enumerate(boxes, 1):
        labels[r:r + h, c:c + w] = label
    return labels


def predicting(model, monkeypatch, label_maps):
    """Makes the segmentation model output the one-hot of `label_maps`, whatever the images."""
    onehot = tf.keras.utils.to_categorical(label_maps, model.nb_labels)
    monkeypatch.setattr(model, "predict", lambda images, **kwargs: onehot[:len(images)])


def test_segmentation_dice_per_label_and_mean_std_over_images(seg_model, monkeypatch):
    truth = np.stack([squares((0, 0, 4, 4), (8, 8, 4, 4))] * 2)
    # Image 0: label 1 right, label 2 covers half of its box (Dice 2*8/(16+8)); image 1 all right.
    # Its background is wrong in places outside any box: background is not scored.
    predicted = np.stack([squares((0, 0, 4, 4), (8, 8, 2, 4)), squares((0, 0, 4, 4), (8, 8, 4, 4))])
    predicted[1, 15, 15] = 0
    predicting(seg_model, monkeypatch, predicted)
    scores = evaluate.evaluate_segmentation(seg_model, np.zeros((2, *SHAPE)), truth)
    assert scores.labels == [1, 2]
    np.testing.assert_allclose(scores.dice, [[1, 2 / 3], [1, 1]])
    np.testing.assert_allclose(scores.mean_dice, [5 / 6, 1])
    summary = scores.summary()
    np.testing.assert_allclose(summary["dice"], (11 / 12, 1 / 12))
    np.testing.assert_allclose(summary["per_label"][2], (5 / 6, 1 / 6))
    assert "folding" not in summary
    assert str(scores).splitlines()[0] == "Dice 0.917 ± 0.083 over 2 images"


def test_label_absent_from_both_maps_is_nan_and_left_out_of_the_means(seg_model, monkeypatch):
    truth = np.stack([squares((0, 0, 4, 4)), squares((0, 0, 4, 4), (8, 8, 4, 4))])
    predicting(seg_model, monkeypatch, truth)
    scores = evaluate.evaluate_segmentation(seg_model, np.zeros((2, *SHAPE, 1)), truth)
    assert np.isnan(scores.dice[0, 1]) and np.count_nonzero(np.isnan(scores.dice)) == 1
    np.testing.assert_allclose(scores.mean_dice, [1, 1])
    np.testing.assert_allclose(scores.summary()["per_label"][2], (1, 0))


def test_an_image_with_none_of_the_labels_is_left_out_of_the_count_it_says():
    truth = np.zeros((3, 8, 8), np.int32)
    truth[0, :4], truth[1, :2] = 1, 1
    predicted = truth.copy()
    predicted[1, :3] = 1  # image 2 has the label in neither map
    scores = evaluate.label_overlap(predicted, truth)
    assert (scores.summary()["images"], scores.summary()["scored"]) == (3, 2)
    assert str(scores).splitlines()[0] == "Dice 0.900 ± 0.100 over 2 pairs (1 more with none of the labels in " \
                                          "either map)"


def test_segment_is_the_argmax_of_the_model(seg_model):
    images = np.random.default_rng(0).random((3, *SHAPE)).astype(np.float32)
    probabilities = seg_model.predict(images[..., np.newaxis], verbose=0)
    np.testing.assert_array_equal(evaluate.segment(seg_model, images), probabilities.argmax(-1))
    scores = evaluate.evaluate_segmentation(seg_model, images, probabilities.argmax(-1).astype(np.int32))
    np.testing.assert_allclose(scores.dice[~np.isnan(scores.dice)], 1)


def test_registration_warps_moving_labels_by_nearest_neighbour(reg_model, monkeypatch):
    moving = np.stack([squares((6, 4, 4, 4), (6, 10, 4, 4))])
    fixed = np.stack([squares((4, 4, 4, 4), (4, 10, 4, 4))])  # the same boxes 2 rows up
    # moved(x) = moving(x + d): d = +2 rows moves the boxes up; 1.6 rounds to the same voxels.
    displacement = np.zeros((1, *SHAPE, 2), np.float32)
    displacement[..., 0] = 1.6
    monkeypatch.setattr(reg_model, "register", lambda *args, **kwargs: displacement)
    scores = evaluate.evaluate_registration(reg_model, np.zeros((1, *SHAPE)), np.zeros((1, *SHAPE)), moving, fixed)
    np.testing.assert_allclose(scores.dice, [[1, 1]])
    np.testing.assert_array_equal(scores.folding, [0])
    assert "folding pixels (Jacobian determinant <= 0): 0.000% ± 0.000%" in str(scores)


def test_registration_scores_labels_beyond_float32s_exact_integers(reg_model, monkeypatch):
    """Atlas labels such as the Allen mouse brain's 614454277: an identity warp scores 1, not 0."""
    labels = np.zeros((1, *SHAPE), np.int64)
    labels[0, :8], labels[0, 8:] = 2 ** 24 + 1, 2 ** 24
    monkeypatch.setattr(reg_model, "register", lambda *args, **kwargs: np.zeros((1, *SHAPE, 2), np.float32))
    scores = evaluate.evaluate_registration(reg_model, np.zeros((1, *SHAPE)), np.zeros((1, *SHAPE)), labels, labels)
    assert scores.labels == [2 ** 24, 2 ** 24 + 1]
    np.testing.assert_array_equal(scores.dice, [[1, 1]])


def test_registration_names_the_pairs_whose_displacement_is_not_finite(reg_model, monkeypatch):
    displacement = np.zeros((3, *SHAPE, 2), np.float32)
    displacement[1, 4, 5, 0] = np.nan
    monkeypatch.setattr(reg_model, "register", lambda *args, **kwargs: displacement)
    labels = np.stack([squares((4, 4, 8, 8))] * 3)
    with pytest.raises(ValueError, match=rf"{reg_model.name} gave a NaN or infinite displacement for pairs \[1\] "
                                         r"\(of 3\)"):
        evaluate.evaluate_registration(reg_model, np.zeros((3, *SHAPE)), np.zeros((3, *SHAPE)), labels, labels)


def test_registration_reports_the_share_of_folding_pixels(reg_model, monkeypatch):
    labels = np.stack([squares((4, 4, 8, 8))] * 2)
    rows = np.arange(SHAPE[0], dtype=np.float32)[:, np.newaxis]
    displacement = np.zeros((2, *SHAPE, 2), np.float32)
    displacement[1, ..., 0] = -2 * rows + 15  # x -> 15 - x along rows: a mirror, Jacobian determinant -1
    monkeypatch.setattr(reg_model, "register", lambda *args, **kwargs: displacement)
    scores = evaluate.evaluate_registration(reg_model, np.zeros((2, *SHAPE)), np.zeros((2, *SHAPE)), labels, labels)
    np.testing.assert_array_equal(scores.folding, [0, 1])
    np.testing.assert_allclose(scores.summary()["folding"], (0.5, 0.5))
    np.testing.assert_allclose(scores.dice, [[1], [1]])  # the box is symmetric about the mirror's axis
    assert str(scores).splitlines()[::2] == ["Dice 1.000 ± 0.000 over 2 pairs",
                                             "folding pixels (Jacobian determinant <= 0): 50.000% ± 50.000%"]
    assert str(evaluate.label_overlap(labels, labels)).startswith("Dice 1.000 ± 0.000 over 2 pairs\n")


def test_registration_with_a_fresh_model_scores_the_unwarped_labels(reg_model):
    rng = np.random.default_rng(0)
    moving = np.stack([squares((2, 2, 6, 6), (9, 9, 5, 5)), squares((3, 3, 6, 6), (10, 8, 4, 6))])
    fixed = moving[::-1]
    images = rng.random((2, *SHAPE)).astype(np.float32)
    scores = evaluate.evaluate_registration(reg_model, images, images[::-1], moving, fixed)
    # A fresh VxmDense predicts a near-zero displacement, so the moved labels are the moving ones.
    expected = [metrics.mean_dice(m, f, [1, 2]) for m, f in zip(moving, fixed)]
    np.testing.assert_allclose(scores.mean_dice, expected)
    assert np.all(scores.mean_dice < 1)


def test_evaluation_rejects_inputs_that_do_not_match_the_model(seg_model, reg_model):
    labels = np.zeros((2, *SHAPE), np.int32)
    with pytest.raises(ValueError, match=r"^evaluate_segmentation: images must be \(N, 16, 16\[, 1\]\).*"
                                         r"\(2, 16, 15\)"):
        evaluate.evaluate_segmentation(seg_model, np.zeros((2, 16, 15)), labels)
    with pytest.raises(ValueError, match=r"^evaluate_registration: fixed must be \(N, 16, 16\[, 1\]\).*"
                                         r"\(2, 16, 15\)"):
        evaluate.evaluate_registration(reg_model, np.zeros((2, *SHAPE)), np.zeros((2, 16, 15)), labels, labels)
    with pytest.raises(ValueError, match=r"^evaluate_segmentation: labels must be an integer label map, "
                                         r"got 512 float64 values that are not whole, such as \[0.5, 0.5, 0.5\]"):
        evaluate.evaluate_segmentation(seg_model, np.zeros((2, *SHAPE)), labels + 0.5)
    with pytest.raises(ValueError, match=r"^evaluate_segmentation: labels must be label maps of shape \(2, 16, 16\), "
                                         r"got \(2, 16, 15\)"):
        evaluate.evaluate_segmentation(seg_model, np.zeros((2, *SHAPE)), labels[..., 1:])
    with pytest.raises(ValueError, match="2 moving but 1 fixed"):
        evaluate.evaluate_registration(reg_model, np.zeros((2, *SHAPE)), np.zeros((1, *SHAPE)), labels, labels[:1])
    with pytest.raises(TypeError, match="expected a RegistrationModel, got SegmentationModel"):
        evaluate.evaluate_registration(seg_model, np.zeros((2, *SHAPE)), np.zeros((2, *SHAPE)), labels, labels)
    with pytest.raises(TypeError, match="expected a SegmentationModel, got RegistrationModel"):
        evaluate.segment(reg_model, np.zeros((2, *SHAPE)))


def test_evaluate_segmentation_refuses_bad_labels_before_predicting(seg_model, monkeypatch):
    def predict(*args, **kwargs):
        raise AssertionError("predicted before the labels were checked")

    monkeypatch.setattr(seg_model, "predict", predict)
    with pytest.raises(ValueError, match="^evaluate_segmentation: labels must be label maps of shape"):
        evaluate.evaluate_segmentation(seg_model, np.zeros((2, *SHAPE)), np.zeros((3, *SHAPE), np.int32))


@pytest.mark.parametrize("moving, fixed, expected", [
    # Dice = 2 |A & B| / (|A| + |B|) per label, straight from the formula; labels are the fixed map's.
    (squares((0, 0, 4, 4)), squares((0, 0, 4, 4)), {1: 1.0}),
    (squares((0, 0, 4, 4)), squares((0, 2, 4, 4)), {1: 2 * 8 / 32}),
    (squares((0, 0, 4, 4), (8, 8, 2, 2)), squares((8, 8, 4, 4)), {1: 0.0}),
    (squares((0, 0, 4, 4), (8, 8, 2, 2)), squares((8, 8, 4, 4), (8, 8, 2, 2)), {1: 0.0, 2: 2 * 4 / 8}),
])
def test_label_overlap_is_the_dice_of_the_unregistered_maps(moving, fixed, expected):
    scores = evaluate.label_overlap(moving[np.newaxis], fixed[np.newaxis])
    assert scores.labels == sorted(expected) and scores.folding is None
    np.testing.assert_allclose(scores.dice[0], [expected[label] for label in sorted(expected)])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_segmentation_and_registration_refuse_images_that_are_not_finite(seg_model, reg_model, bad):
    images = np.zeros((2, *SHAPE), np.float32)
    images[1, 3, 3] = bad  # one such pixel made a third of a UNet's labels background
    labels = np.zeros((2, *SHAPE), np.int32)
    with pytest.raises(ValueError, match="^segment: images holds 1 NaN or infinite values"):
        evaluate.segment(seg_model, images)
    with pytest.raises(ValueError, match="^evaluate_registration: fixed holds 1 NaN or infinite values"):
        evaluate.evaluate_registration(reg_model, np.zeros((2, *SHAPE)), images, labels, labels)


def test_label_values_may_be_any_iterable():
    labels = np.stack([squares((0, 0, 4, 4), (8, 8, 4, 4))] * 2)
    scores = evaluate.label_overlap(labels, labels, label_values=(label for label in [2, 1]))
    assert scores.labels == [2, 1]
    np.testing.assert_array_equal(scores.dice, [[1, 1], [1, 1]])


def test_label_overlap_rejects_maps_that_do_not_pair():
    labels = np.zeros((2, *SHAPE), np.int32)
    with pytest.raises(ValueError, match=r"^label_overlap: moving_labels must be label maps of shape "
                                         r"\(2, 16, 16\), got \(1, 16, 16\)"):
        evaluate.label_overlap(labels[:1], labels)
    with pytest.raises(ValueError, match="^label_overlap: fixed_labels must be an integer label map, "
                                         "got 512 float64 values"):
        evaluate.label_overlap(labels, labels + 0.5)
    # one (H, W) map was scored as H one-row maps
    with pytest.raises(ValueError, match=r"label_overlap: expected a batch of label maps \(N, \*shape\) with 2 or 3 "
                                         r"spatial axes, got shape \(16, 16\)"):
        evaluate.label_overlap(labels[0], labels[0])


def test_label_maps_stored_as_whole_floats_or_booleans_are_scored_as_integers():
    labels = np.stack([squares((0, 0, 4, 4), (8, 8, 4, 4))] * 2)  # as a float NIfTI stores them
    np.testing.assert_array_equal(evaluate.label_overlap(labels.astype(np.float32), labels).dice, [[1, 1], [1, 1]])
    np.testing.assert_array_equal(evaluate.label_overlap(labels > 0, labels > 0).dice, [[1], [1]])


@pytest.fixture(scope="module")
def encoded_models():
    encoder = cifl_tf.CIFLEncoder(2, 2)
    return (cifl_tf.segmentation_model(SHAPE, 3, encoder=encoder, nb_features=4, nb_levels=2),
            cifl_tf.registration_model(SHAPE, encoder=encoder, nb_unet_features=[[4], [4, 4]], int_steps=0))


@pytest.mark.parametrize("images, error, message", [
    (np.full((2, *SHAPE), 200, np.uint8), TypeError, "must be intensities normalised as in training "
                                                     r"\(data.normalize\), got uint8"),
    (np.full((2, *SHAPE), 200.0), ValueError, r": intensities must lie in \[0, 1\] for .*'s CIFL encoder "
                                              r"\(data.normalize\), got \[200, 200\]"),
    (np.linspace(-0.6, 1, 2 * 16 * 16).reshape(2, *SHAPE), ValueError, r"got \[-0.6, 1\]"),
    (np.full((2, *SHAPE), 1j), TypeError, "must hold real numbers, got dtype complex128"),
])
def test_models_with_an_encoder_refuse_intensities_it_never_learned(encoded_models, images, error, message):
    # the models' float32 inputs cast 0-255 images, which the encoder then described as if in [0, 1]
    seg, reg = encoded_models
    labels = np.zeros((2, *SHAPE), np.int32)
    for call in (lambda: evaluate.segment(seg, images), lambda: evaluate.evaluate_segmentation(seg, images, labels),
                 lambda: reg.register(images[..., None], images[..., None]),
                 lambda: evaluate.evaluate_registration(reg, images, images, labels, labels)):
        with pytest.raises(error, match=message):
            call()


def test_the_intensity_baseline_takes_intensities_of_any_range(seg_model):
    assert evaluate.segment(seg_model, np.full((2, *SHAPE), 200, np.uint8)).shape == (2, *SHAPE)


def test_an_encoder_takes_intensities_a_little_outside_0_1(encoded_models):
    # a cubic resampling's overshoot of a normalised image, or noise added to it
    images = np.linspace(-0.2, 1.2, 2 * 16 * 16, dtype=np.float32).reshape(2, *SHAPE)
    seg, reg = encoded_models
    assert evaluate.segment(seg, images).shape == (2, *SHAPE)
    assert reg.register(images[..., None], images[..., None]).shape == (2, *SHAPE, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=2.5), "batch_size must be None or a positive integer, got 2.5"),
    (dict(batch_size=0), "batch_size must be None or a positive integer, got 0"),
    (dict(verbose="x"), r"verbose must be 0, 1, 2 or 'auto' \(as Keras takes it\), got 'x'"),
])
def test_prediction_refuses_a_bad_batch_size_or_verbosity(seg_model, reg_model, kwargs, message):
    images = np.zeros((2, *SHAPE, 1), np.float32)
    with pytest.raises(ValueError, match=f"register: {message}"):
        reg_model.register(images, images, **kwargs)
    with pytest.raises(ValueError, match=f"^segment: {message}"):
        evaluate.segment(seg_model, images, **kwargs)
    labels = np.zeros((2, *SHAPE), np.int32)
    with pytest.raises(ValueError, match=f"^evaluate_segmentation: {message}"):
        evaluate.evaluate_segmentation(seg_model, images, labels, **kwargs)
    with pytest.raises(ValueError, match=f"^evaluate_registration: {message}"):
        evaluate.evaluate_registration(reg_model, images, images, labels, labels, **kwargs)
    keras_defaults = dict(batch_size=None, verbose="auto")  # as Keras's predict takes them
    assert reg_model.register(images, images, **keras_defaults).shape == (2, *SHAPE, 2)
    assert evaluate.segment(seg_model, images, **keras_defaults).shape == (2, *SHAPE)
