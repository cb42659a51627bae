"""Features of several describers side by side: a CIFL encoder's and a hand-made descriptor's together.

    x (B, *spatial, 1)  ->  l2-normalise(concat over k of f_k(x))   (B, *spatial, C_1 + ... + C_K)

Each pixel keeps a unit-length feature vector, as CIFL features do, so a stack stands wherever an encoder does in
``register_pair`` and ``tiling.tiled_features``. Why: for registration the two kinds of features together did
better than the encoder alone in every case measured but one (the shipped 3D encoder on the OASIS volume with grey
and white matter nearly equal; README, "Stacked features"), and better than MIND alone in most cases. The
recommended 2D encoder stacked with MIND, by ``register_pair``'s defaults, registered the OASIS sample's slices
(both directions: T1, inverted T1, grey and white matter nearly equal) and four pairs of 2D demo subjects (T1 to
T1, T2-like, PD-like) 0.016-0.044 Dice better than the encoder alone, and better than MIND but on the PD-like demo
pairs (docs/registration.md, "Stacked features"). For segmentation it did not: a UNet on those stacked features
segmented T1 0.05 worse than on the encoder's (docs/levers.md).
"""
import itertools

import tensorflow as tf

from . import tiling
from .triplanar import deserialize_layer

KL = tf.keras.layers


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class FeatureStack(KL.Layer):
    """The features of two or more describers of one image, concatenated and l2-normalised.

    Args:
        describers: two or more layers (B, *spatial, 1) -> (B, *spatial, C_k) of the same ``ndim``, with
            ``ndim`` and ``channels`` attributes (CIFLEncoder, Triplanar, descriptors.MIND), or their
            Keras configs.

    Call: (B, *spatial, 1) -> (B, *spatial, C_1 + ... + C_K) float32, unit length along the last axis;
    the channels of describer k follow those of describer k - 1.

    A describer with the name of an earlier one, or weights of the same names (those of two encoders read by
    load_encoder or pretrained), is replaced by a copy, with the same config and weights, whose names are its
    own: the .h5 model format keeps a layer's weights by name. The stack then holds the copy, not that layer.
    """

    def __init__(self, describers, **kwargs):
        # No autocast: under a mixed precision policy the images would reach the describers in 16 bits, and
        # CIFLEncoder keeps them in float32 for the same reason (its first layer needs the intensities exact).
        super().__init__(**{"autocast": False, **kwargs})
        if not isinstance(describers, (list, tuple)) or len(describers) < 2:
            raise ValueError(f"FeatureStack: describers must be a list of two or more describer layers, "
                             f"got {describers!r}")
        describers = [deserialize_layer(d) if isinstance(d, dict) else d for d in describers]
        # A layer twice would be saved once and loaded as two: a describer given twice, or an unbuilt layer inside
        # two (an encoder in two Triplanars; built, its weights' names clash and _with_own_names copies it).
        seen, unbuilt_shared = set(), False
        for describer in describers:
            layers = {id(layer): layer for layer in (describer, *getattr(describer, "submodules", ()))}
            unbuilt_shared |= any(not getattr(layers[key], "built", True) for key in layers.keys() & seen)
            seen.update(layers)
        if unbuilt_shared or len({id(d) for d in describers}) < len(describers):
            raise ValueError(f"FeatureStack: a describer, or a layer inside one, appears twice in "
                             f"{[getattr(d, 'name', d) for d in describers]}: stack different layers")
        for describer in describers:
            tiling.check_layer(describer)
        dims = [d.ndim for d in describers]
        if len(set(dims)) > 1:
            raise ValueError(f"FeatureStack: describers must all be 2D or all 3D, got ndims {dims} "
                             f"({', '.join(d.name for d in describers)})")
        self.describers = _with_own_names(describers)
        self.ndim, self.channels = dims[0], sum(d.channels for d in describers)

    @property
    def receptive_radius(self):
        """The farthest any describer looks."""
        return max(tiling.receptive_radius(d) for d in self.describers)

    def call(self, images):
        # float32 whatever each describer's policy, so that they concatenate and normalise as one vector
        features = [tf.cast(describer(images), tf.float32) for describer in self.describers]
        return tf.math.l2_normalize(tf.concat(features, axis=-1), axis=-1, epsilon=1e-12)

    def tiled_features(self, image, max_memory, out):
        """``self(image)`` of one image, written into `out` ((*spatial, C) float32): each describer's channels
        by its own tiling within max_memory bytes (``tiling.tiled_features``; whole slices for a
        Triplanar), then each pixel's vector l2-normalised."""
        start = 0
        for describer in self.describers:
            tiling.tiled_features(describer, image, max_memory, out[..., start:start + describer.channels])
            start += describer.channels
        return tiling.l2_normalize_in_place(out)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.channels])

    def get_config(self):
        return {**super().get_config(),
                "describers": [tf.keras.utils.serialize_keras_object(d) for d in self.describers]}


def _with_own_names(describers):
    """`describers`, each that shares its name or its weights' names with an earlier one replaced by a copy whose
    weights' names begin with its own name (see FeatureStack)."""
    names, weight_names, distinct = set(), set(), []
    for describer in describers:
        if describer.name in names or weight_names.intersection(weight.name for weight in describer.weights):
            describer = _copy(describer, _free_name(describer.name, names, weight_names))
        names.add(describer.name)
        weight_names.update(weight.name for weight in describer.weights)
        distinct.append(describer)
    return distinct


def _free_name(name, names, weight_names):
    """`name`, else `name`_1, `name`_2, ...: the first that is none of `names` and begins none of `weight_names`."""
    candidates = itertools.chain([name], (f"{name}_{i}" for i in itertools.count(1)))
    return next(candidate for candidate in candidates
                if candidate not in names and not any(weight.startswith(candidate + "/") for weight in weight_names))


def _copy(layer, name):
    """`layer` made again from its config, named `name`, with its weights if it has any: made inside `name`'s scope
    (by a call, or by the build of a nested layer as it is deserialised), their names all begin with `name`/."""
    with tf.name_scope(name):
        copy = type(layer).from_config({**layer.get_config(), "name": name})
        if layer.built:
            copy(tf.zeros((1,) * (layer.ndim + 1) + (1,)))
            copy.set_weights(layer.get_weights())
    return copy
