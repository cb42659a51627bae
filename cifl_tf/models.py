"""Downstream networks on CIFL features, and their intensity baselines (paper Sec. 2-3).

* ``segmentation_model``: image (B, *inshape, 1) -> frozen CIFL encoder -> stock ``ne.models.unet``
  -> softmax (B, *inshape, nb_labels). Trained on one contrast (T1), tested on unseen ones.
* ``registration_model``: stock ``vxm.networks.VxmDense`` on [moving, fixed] images (B, *inshape, 1)
  with the frozen encoder as its ``input_model``, trained unsupervised: similarity between the moved
  moving FEATURES and the fixed FEATURES, plus a weighted ``vxm.losses.Grad('l2')`` smoothness term.

With ``encoder=None`` both are the paper's baselines: the same networks on raw intensities.
Both models save to and load from one ``.keras`` file, with Keras' own ``model.save`` and
``tf.keras.models.load_model`` (safe mode included) or with ``save_model`` / ``load_model`` here,
which write atomically and reject files that do not hold one of these models.
"""
import inspect
import json
import math
import numbers
import os
import zipfile

import numpy as np
import tensorflow as tf

import neurite as ne
import voxelmorph as vxm

from . import checkpoint
from ._compat import vxm_layers
from .checks import is_integer
from .data import first_line, write_atomically
from .descriptors import MIND
from .encoder import CIFLEncoder
from .losses import NCC
from .metrics import check_label_map
from .stack import FeatureStack
from .synth import stream_options, stream_seed
from .training import POSITIVE_NUMBER, RegisteredJSON, as_json_holds, check_verbose, compile_for_fit
from .transform import BATCHED_LAYERS, EXACT, spatial_transform
from .triplanar import Triplanar

KL = tf.keras.layers

MODEL_FILE = "model.keras"  # the model file inside a training run folder
UNET_DEFAULTS = dict(nb_features=16, nb_levels=4, conv_size=3, feat_mult=2, nb_conv_per_level=2)
SIMILARITIES = ("mse", "ncc")
REG_WEIGHTS = {"mse": 0.01, "ncc": 1.0}  # voxelmorph's recommended lambda for each similarity
_VXM_DEFAULTS = {name: parameter.default
                 for name, parameter in inspect.signature(vxm.networks.VxmDense.__init__).parameters.items()}
# VxmDense arguments that registration_model sets itself, or whose outputs its loss cannot train.
_VXM_RESERVED = {
    "input_model": "the encoder is the input model",
    "src_feats": "set from the encoder's channels",
    "trg_feats": "set from the encoder's channels",
    "bidir": "the unsupervised loss covers the forward direction only",
    "use_probs": "the unsupervised loss has no KL term",
    "hyp_model": "HyperMorph is not supported",
}


def _check_inshape(inshape):
    try:
        shape = tuple(inshape)
    except TypeError:
        raise TypeError(f"inshape must be a sequence of 2 or 3 sizes, got {inshape!r}") from None
    if len(shape) not in (2, 3) or not all(is_integer(v, 1) for v in shape):
        raise ValueError(f"inshape must be 2 or 3 positive integer sizes, got {inshape!r}")
    return tuple(int(s) for s in shape)


def _check_encoder(encoder, inshape):
    """Freezes and returns the encoder (or None); its ndim must match the input shape."""
    if encoder is None:
        return None
    if isinstance(encoder, (Triplanar, FeatureStack)):  # the models' save and load are built for one describer
        raise ValueError("a Triplanar encoder (pretrained(tau_gamma, ndim=3), --pretrained on 3D data) or a "
                         "FeatureStack gives features for register_pair and `cifl features` only; UNet and VxmDense "
                         "take a CIFLEncoder (such as pretrained(ndim=3)) or MIND")
    if not isinstance(encoder, (CIFLEncoder, MIND)):
        raise TypeError(f"encoder must be a cifl_tf.CIFLEncoder, a cifl_tf.descriptors.MIND or None, "
                        f"got {type(encoder).__name__}")
    if encoder.ndim != len(inshape):
        raise ValueError(f"encoder is {encoder.ndim}D but inshape {inshape} is {len(inshape)}D")
    encoder.trainable = False
    return encoder


def _check_divisible(inshape, factor, what, levels_argument):
    """ValueError unless each size divides by `factor`, one int for all axes or one per axis."""
    factors = np.broadcast_to(factor, len(inshape))
    if any(size % f for size, f in zip(inshape, factors)):
        factor = int(factors[0]) if len(set(factors)) == 1 else tuple(int(f) for f in factors)
        raise ValueError(f"inshape {inshape} must be divisible by {factor} for {what}: "
                         f"pad or crop the images, or give fewer {levels_argument}")


def _check_unet(unet_kwargs, ndim):
    """ValueError naming an ``ne.models.unet`` size argument that neurite would take wrongly or fail on deep
    inside; returns the UNet's number of levels and its pool size per axis."""
    features, levels = unet_kwargs["nb_features"], unet_kwargs["nb_levels"]
    per_level = isinstance(features, list) and features and all(
        isinstance(level, list) and level and all(is_integer(v, 1) for v in level) for level in features)
    if not (per_level or is_integer(features, 1)):
        raise ValueError(f"nb_features must be a positive integer or a list of lists of them (each level's), "
                         f"got {features!r}")
    if per_level:  # neurite: a list of each level's features sets the levels
        levels = len(features)
    elif not is_integer(levels, 1):
        raise ValueError(f"nb_levels must be a positive integer, got {levels!r}")
    if not is_integer(unet_kwargs["nb_conv_per_level"], 1):
        raise ValueError(f"nb_conv_per_level must be a positive integer, got {unet_kwargs['nb_conv_per_level']!r}")
    feat_mult = unet_kwargs.get("feat_mult", 1)
    if not per_level and (isinstance(feat_mult, bool) or not isinstance(feat_mult, numbers.Real)
                          or not 0 < feat_mult < math.inf):  # each level's features given: neurite ignores it
        raise ValueError(f"feat_mult must be a positive number, got {feat_mult!r}")
    layers = (2 * levels - 1) * unet_kwargs["nb_conv_per_level"]  # neurite reads one per encoder and decoder conv
    per_layer = unet_kwargs.get("layer_nb_feats")
    if per_layer is not None and not per_level and not (
            isinstance(per_layer, (list, tuple)) and len(per_layer) >= layers
            and all(is_integer(v, 1) for v in per_layer)):
        raise ValueError(f"layer_nb_feats must be {layers} or more positive integers (one per convolution of the "
                         f"{levels}-level UNet), got {per_layer!r}")
    if not isinstance(unet_kwargs.get("use_residuals", False), (bool, np.bool_)):
        raise TypeError(f"use_residuals must be True or False, got {unet_kwargs['use_residuals']!r}")
    sizes = {key: unet_kwargs.get(key, 2) for key in ("conv_size", "pool_size")}  # neurite's pool_size default: 2
    for key, size in sizes.items():
        size = [size] * ndim if is_integer(size, 1) else size
        if not isinstance(size, (list, tuple)) or len(size) != ndim or not all(is_integer(v, 1) for v in size):
            raise ValueError(f"{key} must be a positive integer or {ndim} of them, got {unet_kwargs[key]!r}")
        sizes[key] = tuple(int(s) for s in size)
    return levels, sizes["pool_size"]


def _check_compiled(model):
    if getattr(model, "optimizer", None) is None:
        raise ValueError(f"{type(model).__name__}.head: compile the model first (segmentation_model and "
                         f"registration_model return it compiled)")


def _serialize(encoder):
    return None if encoder is None else tf.keras.utils.serialize_keras_object(encoder)


def check_batching(batch_size, verbose, where):
    """ValueError naming a batch_size or verbose that Keras's predict would take wrongly or fail on deep inside
    (None and "auto" are Keras's own defaults)."""
    if batch_size is not None and not is_integer(batch_size, 1):
        raise ValueError(f"{where}: batch_size must be None or a positive integer, got {batch_size!r}")
    check_verbose(verbose, where)


# How far intensities may stray outside [0, 1] (a resampling's overshoot, noise) before they are taken for
# another scale, such as 0-255, z-scores or a scanner's units.
INTENSITY_MARGIN = 0.5


class _DescribedImages:
    """The encoder of a model that describes its input images, and the check of those images."""

    @property
    def encoder(self):
        """The model's CIFLEncoder or MIND layer, or None where the network takes the intensities."""
        return next((layer for layer in self.layers if isinstance(layer, (CIFLEncoder, MIND))), None)

    def check_intensities(self, images, what, where):
        """`images` (an array) as float32; TypeError unless they are real numbers, and where the model has a
        CIFLEncoder, which learned intensities in [0, 1], TypeError for integers and ValueError for finite values more
        than INTENSITY_MARGIN outside [0, 1] (images of 0-255 gave finite, meaningless output)."""
        images = np.asarray(images)
        if images.dtype.kind not in "biuf":
            raise TypeError(f"{where}: {what} must hold real numbers, got dtype {images.dtype}")
        if not isinstance(self.encoder, CIFLEncoder):
            return np.asarray(images, np.float32)
        if images.dtype.kind in "iu":
            raise TypeError(f"{where}: {what} must be intensities normalised as in training (data.normalize), "
                            f"got {images.dtype}")
        images = np.asarray(images, np.float32)
        if images.size and np.isfinite(images).all():  # else the caller refuses them by name
            low, high = images.min(), images.max()
            if low < -INTENSITY_MARGIN or high > 1 + INTENSITY_MARGIN:
                raise ValueError(f"{where}: {what}: intensities must lie in [0, 1] for {self.name}'s CIFL encoder "
                                 f"(data.normalize), got [{low:g}, {high:g}]")
        return images


class _RebuiltFromArguments:
    """Keras config of a model built from arguments: the arguments, with the encoder serialised, and the global
    dtype policy it was built under.

    Loading calls the constructor again with them, under that policy, and then the weights are read into the result.
    """

    def _keep_arguments(self, **arguments):
        self._cifl_config = {**arguments, "dtype_policy": tf.keras.mixed_precision.global_policy().name}

    def get_config(self):
        return dict(self._cifl_config)

    def save(self, filepath, overwrite=True, save_format=None, **kwargs):
        """Keras' ``save``, to a .keras file only: the .h5 and SavedModel formats would write files that do not
        load (they revive the model from its layers, not from its arguments)."""
        if not os.fspath(filepath).endswith(".keras") or save_format not in (None, "keras"):
            raise ValueError(f"{type(self).__name__} saves to a .keras file only (save_model), got "
                             f"{os.fspath(filepath)!r}" + (f" with save_format {save_format!r}" if save_format else ""))
        super().save(filepath, overwrite=overwrite, **kwargs)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if config.get("encoder") is not None:
            config["encoder"] = tf.keras.utils.deserialize_keras_object(config["encoder"])
        policy = config.pop("dtype_policy", None)  # None: saved before it was kept; the current one
        current = tf.keras.mixed_precision.global_policy()
        tf.keras.mixed_precision.set_global_policy(policy or current)
        try:
            return cls(**config)
        finally:
            tf.keras.mixed_precision.set_global_policy(current)


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class SoftDiceLoss(tf.keras.losses.Loss):
    """1 - soft Dice (neurite's ``ne.losses.Dice``) averaged over labels, background included.

    y_true one-hot and y_pred softmax, (B, *spatial, L) each -> (B,) losses in [0, 1].
    """

    def __init__(self, name="soft_dice", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_true, y_pred = tf.convert_to_tensor(y_true), tf.convert_to_tensor(y_pred)
        labels, predicted = y_true.shape[-1], y_pred.shape[-1]
        if y_true.shape.rank != y_pred.shape.rank or None not in (labels, predicted) and labels != predicted:
            raise ValueError(f"SoftDiceLoss: labels must be one-hot like the predictions {y_pred.shape}, got shape "
                             f"{y_true.shape} (tf.keras.utils.to_categorical of a label map)")
        # float32 under any policy (float16 sums over a 256x256 image overflow), and one-hot labels of any type
        y_true, y_pred = tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)
        # Without neurite's range asserts, a NaN prediction gives a NaN loss, which StopOnNonFinite
        # reports in one line, instead of an InvalidArgumentError from inside the graph.
        dice = ne.losses.Dice(check_input_limits=False)
        return 1 + tf.reduce_mean(dice.loss(y_true, y_pred), axis=-1)


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class CrossentropyLoss(tf.keras.losses.CategoricalCrossentropy):
    """Keras's categorical cross-entropy of one-hot labels and softmax probabilities, in float32 under any
    policy (a mixed policy's UNet gives 16-bit probabilities)."""

    def call(self, y_true, y_pred):
        return super().call(tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32))


SEG_LOSSES = {"dice": SoftDiceLoss, "crossentropy": CrossentropyLoss}


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class SegmentationModel(_DescribedImages, _RebuiltFromArguments, RegisteredJSON, tf.keras.Model):
    """Frozen CIFL encoder (or nothing: the baseline) followed by ``ne.models.unet`` (paper Sec. 3).

    Args:
        inshape: spatial shape (H, W) or (D, H, W); divisible by pool_size ** (nb_levels - 1) (2 ** ...).
        nb_labels: L, the number of labels, background included.
        encoder: a CIFLEncoder, frozen here, or a descriptors.MIND; None feeds the intensities to the UNet.
        **unet_kwargs: ``ne.models.unet`` arguments (nb_features, nb_levels, conv_size, feat_mult,
            nb_conv_per_level, ...); defaults ``UNET_DEFAULTS``.

    Call: image (B, *inshape, 1) -> softmax probabilities (B, *inshape, L).
    """

    def __init__(self, inshape, nb_labels, encoder=None, name="cifl_segmentation", **unet_kwargs):
        inshape = _check_inshape(inshape)
        if not is_integer(nb_labels, 2):
            raise ValueError(f"nb_labels must be an integer >= 2 (background included), got {nb_labels!r}")
        if "final_pred_activation" in unet_kwargs:
            raise TypeError("unet_kwargs may not set final_pred_activation: the output is a softmax")
        encoder = _check_encoder(encoder, inshape)
        unet_kwargs = {**UNET_DEFAULTS, **as_json_holds(unet_kwargs)}  # NumPy values too, as the config holds them
        levels, pool = _check_unet(unet_kwargs, len(inshape))
        _check_divisible(inshape, [p ** (levels - 1) for p in pool], f"a UNet of nb_levels={levels}", "nb_levels")

        image = tf.keras.Input((*inshape, 1), name="image")
        features = image if encoder is None else encoder(image)
        # The softmax is passed as a function: neurite turns the string 'softmax' into a Lambda
        # layer, which safe-mode loading refuses; a function gives a plain Activation layer.
        unet = ne.models.unet(input_shape=(*inshape, features.shape[-1]), nb_labels=int(nb_labels),
                              name=f"{name}_unet", final_pred_activation=tf.keras.activations.softmax,
                              **unet_kwargs)
        super().__init__(image, unet(features), name=name)
        self.inshape, self.nb_labels = inshape, int(nb_labels)
        self._keep_arguments(inshape=list(inshape), nb_labels=int(nb_labels), encoder=_serialize(encoder), name=name,
                             **unet_kwargs)

    def head(self):
        """The UNet after the encoder, compiled as this model is: features (B, *inshape, F) -> softmax
        (B, *inshape, nb_labels), F the encoder's channels (1 without one). It shares this model's weights
        and optimizer, so fitting it on features encoded once (the encoder is frozen) trains this model."""
        _check_compiled(self)
        unet = self.get_layer(f"{self.name}_unet")
        compile_for_fit(unet, optimizer=self.optimizer, loss=self.loss)
        return unet


def segmentation_model(inshape, nb_labels, encoder=None, loss="dice", learning_rate=1e-3, **unet_kwargs):
    """A compiled SegmentationModel, so that ``model.fit(images, one_hot_labels)`` trains it.

    Args:
        inshape, nb_labels, encoder, **unet_kwargs: see SegmentationModel.
        loss: "dice" (SoftDiceLoss) or "crossentropy"; compile again for any other.
        learning_rate: of the Adam optimiser, a positive number (or a Keras LearningRateSchedule).

    Returns: SegmentationModel, image (B, *inshape, 1) -> softmax (B, *inshape, nb_labels).
    """
    if not isinstance(loss, str) or loss not in SEG_LOSSES:
        raise ValueError(f"loss must be one of {sorted(SEG_LOSSES)}, got {loss!r}")
    _check_learning_rate("segmentation_model", learning_rate)
    model = SegmentationModel(inshape, nb_labels, encoder, **unet_kwargs)
    compile_for_fit(model, optimizer=tf.keras.optimizers.Adam(learning_rate), loss=SEG_LOSSES[loss]())
    return model


def _registration_weight(similarity, reg_weight):
    """Checks the loss arguments; returns reg_weight, REG_WEIGHTS[similarity] for None."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    reg_weight = REG_WEIGHTS[similarity] if reg_weight is None else reg_weight
    if isinstance(reg_weight, bool) or not isinstance(reg_weight, numbers.Real) or not 0 <= reg_weight < math.inf:
        raise ValueError(f"reg_weight must be a non-negative number, got {reg_weight!r}")
    return float(reg_weight)


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class RegistrationLoss(KL.Layer):
    """Unsupervised registration loss: similarity(fixed, moved) + reg_weight * Grad('l2')(field) (vxm).

    Inputs: [fixed (B, *S, F), moved (B, *S, F), field (B, *S', ndim)], where F is C for features
    or 1 for intensities, and field is the regularised (possibly half-resolution) velocity field.
    Output: the scalar loss. Also logs the metrics "similarity" and "smoothness".

    Args:
        similarity: "mse" (vxm.losses.MSE) or "ncc" (vxm.losses.NCC, local 9^ndim windows, as losses.NCC sums them).
        reg_weight: weight of the smoothness term; None: REG_WEIGHTS[similarity], voxelmorph's
            recommendation for images in [0, 1] (0.01 for MSE, 1 for NCC).
        loss_mult: factor of the gradient loss, the resolution ratio of the field (as voxelmorph
            trains it: ``Grad('l2', loss_mult=int_downsize)``).
    """

    def __init__(self, similarity="mse", reg_weight=None, loss_mult=1.0, **kwargs):
        # float32 under any policy: NCC's local variances cancel to noise in bfloat16 (-218 for a loss of -0.72)
        super().__init__(**{"dtype": EXACT, **kwargs})
        self.similarity, self.loss_mult = similarity, float(loss_mult)
        self.reg_weight = _registration_weight(similarity, reg_weight)

    def call(self, inputs):
        fixed, moved, field = inputs
        if self.similarity == "mse":
            similar = vxm.losses.MSE().loss(fixed, moved)
        else:
            similar = tf.reduce_mean(NCC().loss(fixed, moved))
        smooth = tf.reduce_mean(vxm.losses.Grad("l2", loss_mult=self.loss_mult).loss(None, field))
        self.add_metric(similar, name="similarity")
        self.add_metric(smooth, name="smoothness")
        return similar + self.reg_weight * smooth

    def get_config(self):
        return {**super().get_config(), "similarity": self.similarity, "reg_weight": self.reg_weight,
                "loss_mult": self.loss_mult}


def _check_vxm_integers(vxm_kwargs):
    """ValueError naming a VxmDense count or resolution that is not an integer of its least value: VxmDense takes
    int_steps and nb_unet_levels below it as 0 and 1 silently, and fails on the others deep inside. None is a
    default only for nb_unet_levels (then taken from nb_unet_features) and for int_downsize, voxelmorph's deprecated
    name of int_resolution."""
    for key, least in (("int_steps", 0), ("nb_unet_levels", 1), ("int_resolution", 1), ("svf_resolution", 1),
                       ("int_downsize", 1), ("nb_unet_conv_per_level", 1)):
        if key not in vxm_kwargs:
            continue
        value = vxm_kwargs[key]
        if value is None and key in ("nb_unet_levels", "int_downsize"):
            continue
        if not is_integer(value, least):
            raise ValueError(f"registration_model: {key} must be an integer >= {least}, got {value!r}")


def _vxm_downsampling(vxm_kwargs):
    """The factor by which VxmDense's UNet downsamples, from its feature arguments; ValueError for
    nb_unet_features that VxmDense would fail on deep inside."""
    features = vxm_kwargs.get("nb_unet_features")
    if features is None:
        features = vxm.py.utils.default_unet_features()
    pair = isinstance(features, (list, tuple)) and len(features) == 2 and all(
        isinstance(side, (list, tuple)) and all(is_integer(v, 1) for v in side) for side in features)
    if not (is_integer(features, 1) or pair):
        raise ValueError(f"registration_model: nb_unet_features must be a positive integer or [encoder features, "
                         f"decoder features] (two lists of positive integers), got {features!r}")
    if isinstance(features, (int, np.integer)):
        return 2 ** ((vxm_kwargs.get("nb_unet_levels") or 1) - 1)
    if len(features[1]) < len(features[0]):  # voxelmorph reads one decoder entry per encoder convolution
        raise ValueError(f"registration_model: nb_unet_features' decoder list needs at least as many entries as its "
                         f"encoder list ({len(features[0])}; more are final convolutions), got {features!r}")
    return 2 ** (len(features[0]) // vxm_kwargs.get("nb_unet_conv_per_level", 1))


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class RegistrationModel(_DescribedImages, _RebuiltFromArguments, RegisteredJSON, vxm.networks.VxmDense):
    """VxmDense on CIFL features of [moving, fixed] (or on intensities: the baseline), paper Sec. 3.

    Args:
        inshape: spatial shape (H, W) or (D, H, W), divisible by the UNet's downsampling (16 for
            VxmDense's default features).
        encoder: a CIFLEncoder (frozen) or a descriptors.MIND, used as VxmDense's input_model on both
            images (src_feats = trg_feats = its channels); None registers the intensities.
        similarity: "mse" or "ncc", computed between the moved moving features and the fixed
            features (with an encoder) or intensities (without).
        reg_weight: weight of the Grad('l2') smoothness term; None: REG_WEIGHTS[similarity].
        **vxm_kwargs: other VxmDense arguments (nb_unet_features, int_steps, int_resolution, ...).

    Call: [moving, fixed], each (B, *inshape, 1) -> [moved (B, *inshape, F), field]. The loss is part
    of the model, so ``fit([moving, fixed])`` needs no targets. ``register`` gives the displacement.
    """

    def __init__(self, inshape, encoder=None, similarity="mse", reg_weight=None, name="cifl_registration",
                 **vxm_kwargs):
        inshape = _check_inshape(inshape)
        for key in vxm_kwargs:
            if key in _VXM_RESERVED:
                raise TypeError(f"registration_model: vxm_kwargs may not set {key!r} ({_VXM_RESERVED[key]})")
        if vxm_kwargs.get("unet_half_res"):  # it would set svf_resolution behind the checks below
            raise TypeError("registration_model: unet_half_res is voxelmorph's deprecated name: give svf_resolution=2")
        vxm_kwargs = as_json_holds(vxm_kwargs)  # NumPy values too, as the config holds them
        reg_weight = _registration_weight(similarity, reg_weight)
        _check_vxm_integers(vxm_kwargs)
        for key, value in _field_resolutions({"int_resolution": 1, "svf_resolution": 1, **vxm_kwargs}).items():
            if value > min(inshape):
                raise ValueError(f"registration_model: {key} {value} is coarser than the {inshape} images: "
                                 f"the field would have no voxel along their shortest axis")
        encoder = _check_encoder(encoder, inshape)
        _check_divisible(inshape, _vxm_downsampling(vxm_kwargs), "VxmDense's UNet",
                         "levels (shorter nb_unet_features lists, or nb_unet_levels; in cifl train-reg, "
                         "--nb-features with --nb-levels)")

        moving = tf.keras.Input((*inshape, 1), name="moving")
        fixed = tf.keras.Input((*inshape, 1), name="fixed")
        outputs = [moving, fixed] if encoder is None else [encoder(moving), encoder(fixed)]
        input_model = tf.keras.Model([moving, fixed], outputs, name=f"{name}_inputs")
        feats = 1 if encoder is None else encoder.channels
        with vxm_layers(BATCHED_LAYERS):  # voxelmorph's per-sample map_fn loops take 10-40 s to differentiate
            super().__init__(inshape, input_model=input_model, src_feats=feats, trg_feats=feats, name=name,
                             **vxm_kwargs)
        moved_shape = tuple(self.references.y_source.shape[1:-1])
        if moved_shape != inshape:  # VxmDense's rescaled field falls short of the images: the loss would not build
            steps = vxm_kwargs.get("int_steps", _VXM_DEFAULTS["int_steps"])
            resolutions = {"int_resolution": integration_resolution(vxm_kwargs),
                           "svf_resolution": vxm_kwargs.get("svf_resolution", _VXM_DEFAULTS["svf_resolution"])}
            if steps == 0:
                why = "without integration (int_steps 0) it stays at svf_resolution"
            elif any(size % factor for factor in resolutions.values() for size in inshape):
                why = "pad or crop them, or give resolutions that divide them"
            else:
                why = "it brings the field back to full size only from an int_resolution above 1"
            raise ValueError(f"registration_model: with {', '.join(f'{k} {v}' for k, v in resolutions.items())}, "
                             f"VxmDense's field comes back at {moved_shape}, not at the {inshape} of the images: {why}")
        field = self.outputs[-1]
        loss = RegistrationLoss(similarity, reg_weight, loss_mult=inshape[0] / field.shape[1],
                                name="registration_loss")
        self.references.loss = loss([self.references.target, self.references.y_source, field])
        self.add_loss(self.references.loss)
        self.references.registration_model = self.get_registration_model()
        self.inshape = inshape
        self._keep_arguments(inshape=list(inshape), encoder=_serialize(encoder), similarity=similarity,
                             reg_weight=reg_weight, name=name, **vxm_kwargs)

    def head(self):
        """The network after the encoder, compiled as this model is: [moving features, fixed features],
        each (B, *inshape, F), -> [moved features, field, loss], the loss also added as this model adds it;
        F is the encoder's channels (1 without one). It shares this model's weights and optimizer, so fitting it on features encoded
        once (the encoder is frozen) trains this model."""
        _check_compiled(self)
        sources = [self.references.source, self.references.target]
        # Keras gives a model built from intermediate tensors Inputs of its own, and the loss is kept
        # as an output so that it moves onto them too.
        head = tf.keras.Model(sources, [*self.outputs, self.references.loss], name=f"{self.name}_head")
        head.add_loss(head.outputs[-1])
        compile_for_fit(head, optimizer=self.optimizer)
        return head

    def register(self, moving, fixed, batch_size=8, verbose=0):
        """The displacement that warps `moving` onto `fixed`, at full resolution.

        Args:
            moving, fixed: (B, *inshape, 1) images, normalised as in training.

        Returns: (B, *inshape, ndim) float32 displacement in voxels ('ij' indexing): moved(x) =
        moving(x + displacement(x)), as ``warp`` applies it.
        """
        moving, fixed = (self.check_intensities(images, what, "register") for images, what in ((moving, "moving"),
                                                                                                (fixed, "fixed")))
        check_batching(batch_size, verbose, "register")
        expected = (*self.inshape, 1)
        for what, images in (("moving", moving), ("fixed", fixed)):
            if images.shape[1:] != expected:
                raise ValueError(f"register: {what} images must be (B, {', '.join(map(str, expected))}), "
                                 f"got {images.shape}")
        if len(moving) != len(fixed):
            raise ValueError(f"register: {len(moving)} moving but {len(fixed)} fixed images")
        for what, images in (("moving", moving), ("fixed", fixed)):
            if not np.isfinite(images).all():
                raise ValueError(f"register: the {what} images hold {np.count_nonzero(~np.isfinite(images))} "
                                 f"NaN/Inf values")
        return self.references.registration_model.predict([moving, fixed], batch_size=batch_size,
                                                          verbose=verbose)


def registration_model(inshape, encoder=None, similarity="mse", reg_weight=None, learning_rate=3e-3,
                       svf_resolution=None, **vxm_kwargs):
    """A compiled RegistrationModel, so that ``model.fit([moving, fixed])`` trains it unsupervised.

    The defaults are voxelmorph's (MSE with reg_weight 0.01, VxmDense's int_steps 7 at int_resolution 2)
    except the learning rate: Adam 3e-3 instead of voxelmorph's 1e-4, which suits its 1500-epoch runs
    but does not move within a CPU budget. ``experiments/defaults.py``, 150 steps of batch 4 on real
    OASIS T1 slices, mean Dice of 46 held-out pairs (coronal slices 8 mm apart; identity 0.509):
    lr 1e-4 0.507; 1e-3 0.572 and 0.556 (seeds 0, 1); 3e-3 0.567, 0.567 and 0.573 (seeds 0-2), no folding. Other losses
    at lr 1e-3 did worse: NCC (reg_weight 1) 0.530 and MSE with reg_weight 0.1 0.549 (seed 0), MSE with
    reg_weight 0.001 0.553 (seed 1).

    And the velocity field is predicted at the resolution it is integrated at (VxmDense's svf_resolution =
    int_resolution), where voxelmorph's default predicts it at full resolution and halves it before integrating:
    the UNet's full-resolution decoder level is not built. The same script: 0.574 and 0.568 (seeds 0, 1) against
    0.572 and 0.571 with ``--svf-resolution 1``, the script's run 20-21 s against 30 s.

    Under a mixed precision policy the UNet computes in 16 bits, and the loss, the integration and the warps in
    float32 (``transform.EXACT``).

    Args:
        inshape, encoder, similarity, reg_weight, **vxm_kwargs: see RegistrationModel.
        learning_rate: of the Adam optimiser, a positive number (or a Keras LearningRateSchedule).
        svf_resolution: VxmDense's relative voxel size of the predicted velocity field; None: its int_resolution
            (2 by default) when the field is integrated (int_steps > 0), else 1. Without integration it must be 1,
            as the field then warps at the resolution it is predicted at.

    Returns: RegistrationModel; ``model.register(moving, fixed)`` -> (B, *inshape, ndim) displacement.
    """
    _check_learning_rate("registration_model", learning_rate)
    _check_vxm_integers(vxm_kwargs if svf_resolution is None else {**vxm_kwargs, "svf_resolution": svf_resolution})
    if svf_resolution is None:
        svf_resolution = default_svf_resolution(**vxm_kwargs)
    elif svf_resolution != 1 and vxm_kwargs.get("int_steps", _VXM_DEFAULTS["int_steps"]) == 0:
        raise ValueError(f"registration_model: svf_resolution {svf_resolution} needs an integrated field "
                         f"(int_steps > 0): without integration the field warps at the resolution it is predicted at")
    elif svf_resolution != 1 and integration_resolution(vxm_kwargs) == 1:
        raise ValueError(f"registration_model: svf_resolution {svf_resolution} needs an int_resolution above 1: "
                         f"VxmDense brings the field back to full size only from a coarser integration")
    # a field of one voxel across is a translation, which the smoothness term does not see; RegistrationModel
    # itself keeps building them, as models saved before this check hold them
    shortest = min(_check_inshape(inshape))
    for key, value in _field_resolutions({**vxm_kwargs, "svf_resolution": svf_resolution}).items():
        if np.round(shortest / value) < 2:  # VxmDense's rounding of the field's size
            raise ValueError(f"registration_model: {key} {value} is too coarse for the {inshape} images: the field "
                             f"would have fewer than 2 voxels along their shortest axis")
    model = RegistrationModel(inshape, encoder, similarity, reg_weight, svf_resolution=svf_resolution, **vxm_kwargs)
    compile_for_fit(model, optimizer=tf.keras.optimizers.Adam(learning_rate))
    return model


def _field_resolutions(vxm_kwargs):
    """{int_resolution, svf_resolution}: the relative voxel sizes of VxmDense's fields for these arguments; without
    integration (int_steps 0) only svf_resolution, as VxmDense ignores int_resolution then."""
    integrated = vxm_kwargs.get("int_steps", _VXM_DEFAULTS["int_steps"]) != 0
    return {**({"int_resolution": integration_resolution(vxm_kwargs)} if integrated else {}),
            "svf_resolution": vxm_kwargs["svf_resolution"]}


def integration_resolution(vxm_kwargs):
    """The relative voxel size VxmDense integrates the field at: its int_resolution, which its deprecated
    int_downsize overrides."""
    downsize = vxm_kwargs.get("int_downsize")
    return vxm_kwargs.get("int_resolution", _VXM_DEFAULTS["int_resolution"]) if downsize is None else downsize


def default_svf_resolution(**vxm_kwargs):
    """registration_model's svf_resolution for these VxmDense arguments: the integration's resolution
    (int_resolution, 2 by default) when the field is integrated (int_steps > 0), else 1."""
    if vxm_kwargs.get("int_steps", _VXM_DEFAULTS["int_steps"]) == 0:
        return 1
    return integration_resolution(vxm_kwargs)


def _check_learning_rate(caller, learning_rate):
    """ValueError naming a learning rate that is not a positive finite number, before anything is built: Adam
    takes NaN and trains NaN weights, and a negative rate, which it takes too, ascends the loss."""
    if not isinstance(learning_rate, tf.keras.optimizers.schedules.LearningRateSchedule):  # Adam takes one too
        checkpoint.check_settings({"learning_rate": learning_rate}, {"learning_rate": POSITIVE_NUMBER}, f"{caller}: ")


def warp(images, displacement, interp_method="linear"):
    """Resamples images with displacement fields (as vxm.layers.SpatialTransformer, 'ij' indexing).

    Args:
        images: (B, *spatial, K) images or label maps (label maps: use interp_method="nearest").
        displacement: (B, *spatial, ndim) in voxels, as from RegistrationModel.register.
        interp_method: "linear" or "nearest". Points outside the image take the nearest border
            value, as in VxmDense's own warp.

    Returns: (B, *spatial, K) float32.
    """
    images, displacement = np.asarray(images, np.float32), np.asarray(displacement, np.float32)
    if images.shape[:-1] != displacement.shape[:-1] or displacement.shape[-1] != images.ndim - 2:
        raise ValueError(f"warp: images {images.shape} and displacement {displacement.shape} do not match")
    if not np.isfinite(displacement).all():  # an infinite one would take a border value, a NaN one give NaN
        raise ValueError(f"warp: the displacement holds {np.count_nonzero(~np.isfinite(displacement))} NaN or "
                         f"infinite values")
    return spatial_transform(tf.constant(images), displacement, interp_method).numpy()


def warp_labels(labels, displacement):
    """Label maps moved by displacement fields (nearest neighbour), each label value kept exactly.

    ``warp`` resamples in float32, which holds integers exactly only up to 2**24, and atlases number their
    labels beyond it (the Allen mouse brain's reach 614454277): the index of each voxel's label among the
    map's distinct values is warped instead.

    Args:
        labels: (B, *spatial) label maps: integers, booleans, or whole floats (``metrics.check_label_map``).
        displacement: (B, *spatial, ndim) in voxels, as for ``warp``.

    Returns: (B, *spatial) label maps of the dtype of `labels`.
    """
    labels = check_label_map(labels, "warp_labels: labels")
    if labels.shape != np.shape(displacement)[:-1]:
        raise ValueError(f"warp_labels: labels {labels.shape} must be (B, *spatial) of the displacement "
                         f"{np.shape(displacement)}")
    values, indices = np.unique(labels, return_inverse=True)
    if len(values) > 2 ** 24:  # nor do their indices fit float32
        raise ValueError(f"warp_labels: {len(values)} distinct labels, more than the 2**24 it can warp: an image, "
                         f"not a label map?")
    moved = warp(indices.reshape(labels.shape)[..., np.newaxis], displacement, "nearest")[..., 0]
    return values[np.rint(moved).astype(np.int64)]


def pair_batches(images, batch_size=1, seed=None, first_step=0):
    """Endless batches of random (moving, fixed) pairs of different images, for ``fit``.

    Batch k is a pure function of (seed, k), so a run resumed at step k (``first_step``) draws the
    same pairs as one that ran through.

    Args:
        images: (N, *inshape, C), N >= 2: images (C = 1), or their features for a model's ``head``.
        seed: integer for a reproducible draw; None: a fresh random seed.
        first_step: the index of the first batch (a resumed run's initial_epoch * steps_per_epoch).

    Returns: tf.data.Dataset of ((moving, fixed),), each (batch_size, *inshape, C): the input of a
    RegistrationModel (or of its head).
    """
    images = np.asarray(images, np.float32)
    if images.ndim not in (4, 5):
        raise ValueError(f"pair_batches: images must be (N, *inshape, C) with 2 or 3 spatial axes, got {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError(f"pair_batches: the images hold {np.count_nonzero(~np.isfinite(images))} NaN/Inf values")
    if len(images) < 2:
        raise ValueError(f"registration training needs at least 2 images to pair, got {len(images)}")
    if not is_integer(batch_size, 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not is_integer(first_step, 0):
        raise ValueError(f"first_step must be a non-negative integer, got {first_step!r}")
    seed = stream_seed(seed)
    count, stack = len(images), tf.constant(images)

    def draw(step):
        seeds = tf.random.experimental.stateless_split(tf.stack([tf.constant(seed, tf.int64), step]), 2)
        moving = tf.random.stateless_uniform([batch_size], seeds[0], 0, count, tf.int64)
        fixed = (moving + tf.random.stateless_uniform([batch_size], seeds[1], 1, count, tf.int64)) % count
        return ((tf.gather(stack, moving), tf.gather(stack, fixed)),)  # fixed is never the moving image

    steps = tf.data.Dataset.range(first_step, np.iinfo(np.int64).max)
    return steps.map(draw).prefetch(tf.data.AUTOTUNE).with_options(stream_options())


MODEL_KINDS = {"segmentation": SegmentationModel, "registration": RegistrationModel}


def _model_kind(path):
    """"segmentation" or "registration" from a .keras file's config; ValueError naming the file if neither."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        name = config.get("registered_name") or config.get("class_name")
    except (zipfile.BadZipFile, KeyError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: not a cifl_tf model file (no Keras .keras model config: "
                         f"{first_line(error)})") from None
    kinds = {tf.keras.utils.get_registered_name(cls): kind for kind, cls in MODEL_KINDS.items()}
    if name not in kinds:
        raise ValueError(f"{path}: not a cifl_tf model file (it holds a {name!r}, not one of {sorted(kinds)})")
    if _has_lambda(config):  # refused in safe mode anyway, but only after Keras warns about its code
        raise ValueError(f"{path}: holds a Lambda layer (arbitrary code), which safe-mode loading refuses")
    return kinds[name]


def _has_lambda(config):
    """Whether a Keras config (nested dicts and lists) holds a Lambda layer anywhere."""
    if isinstance(config, dict):
        return config.get("class_name") == "Lambda" or any(map(_has_lambda, config.values()))
    return isinstance(config, list) and any(map(_has_lambda, config))


def save_model(model, path):
    """Writes a Segmentation- or RegistrationModel to one .keras file, atomically.

    Args:
        path: a ``.keras`` file, or a folder, which then holds ``model.keras``.

    Returns: the file written.
    """
    if not isinstance(model, tuple(MODEL_KINDS.values())):
        raise TypeError(f"save_model: expected a SegmentationModel or RegistrationModel, got {type(model).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not path.endswith(".keras"):
        raise ValueError(f"save_model: path must be a folder or end in .keras, got {path!r}")
    return write_atomically(path, model.save)


def load_model(path, kind=None):
    """Reads a model written by save_model (or Keras' ``model.save``), in safe mode.

    Args:
        path: the .keras file, or a training run folder holding ``model.keras``.
        kind: None, "segmentation" or "registration": the kind of model required.

    Returns: the compiled SegmentationModel or RegistrationModel.
    Raises: FileNotFoundError for a missing file; ValueError naming the file for one that holds no
        such model, or one Keras cannot load (unknown or unsafe classes such as Lambda, bad
        arguments, weights missing or of other shapes, a damaged archive).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file")
    if kind not in (None, *MODEL_KINDS):
        raise ValueError(f"kind must be None or one of {sorted(MODEL_KINDS)}, got {kind!r}")
    found = _model_kind(path)
    if kind not in (None, found):
        raise ValueError(f"{path}: holds a {found} model, not a {kind} model")
    try:
        return tf.keras.models.load_model(path, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: cannot load the {found} model ({first_line(error)})") from error
