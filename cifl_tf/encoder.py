"""The CIFL encoder f_theta (paper Sec. 2): eight 3x3 convolutions and an l2 normalisation.

    x (B, *spatial, 1)  ->  r = f_theta(x) (B, *spatial, C),  ||r[b, p, :]||_2 = 1 at every pixel p.

The paper's eight convolutions see 17 pixels across: inside a large region of uniform intensity
every pixel looks the same. `architecture="context"` keeps that full-resolution path and adds
context to it: residual dilated convolutions before the last one widen the view (to 77 pixels with the
default dilations 2, 4, 8 and 16). `inversion_invariant=True` makes the features of an image and of
its inversion 1 - x equal by construction, as MIND's are. `local_normalization=sigma` shows the convolutions
the image's local contrast (`LocalNormalize`) instead of its intensities, so that a faint edge between two
tissues of nearly equal intensity (grey and white matter in PD) looks like a strong one. `use_bias=False` makes
the features the same when the image is scaled about 0 (about 1/2 with inversion_invariant).
"""
import json
import math
import numbers
import os

import h5py
import numpy as np

import tensorflow as tf

from .checks import is_integer
from .data import first_line, read_json, write_atomically, write_json
from .tiling import check_images, check_layer
from .triplanar import Triplanar

KL = tf.keras.layers

NUM_CONVS = 8  # paper Sec. 2: "eight convolutional layers each with kernel size 3"
CONTEXT_DILATIONS = (2, 4, 8, 16)
ARCHITECTURES = ("paper", "context")


def positive_integer(value):
    """`value` as a Python int if it is a positive integer of any type (NumPy's too, not a bool), else None.
    Python numbers keep the layers' configs JSON-serialisable."""
    if is_integer(value, 1):
        return int(value)
    return None


def positive_number(value):
    """`value` as a Python float if it is a finite positive real number of any type (not a bool), else None."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    return None


def convolve(images, kernel, padding):
    """tf.nn.convolution of channels-last images (B, *spatial, C), its data format named: without it, the eager
    gradient of a 3D convolution with respect to its input fails in TF 2.21 (no data_format attribute)."""
    data_format = ("NWC", "NHWC", "NDHWC")[np.ndim(kernel) - 3]  # the kernel's rank: the images' may be unknown
    return tf.nn.convolution(images, kernel, padding=padding, data_format=data_format)


def gaussian_blur(maps, sigma, radius, ndim, channels, padding):
    """Each of the `channels` channels of maps (B, *spatial, channels), `ndim` spatial axes, convolved with a
    normalised Gaussian of SD `sigma` truncated at `radius`, as one 1D kernel per axis."""
    taps = np.arange(-radius, radius + 1)
    gauss = np.exp(-taps ** 2 / (2 * sigma ** 2))
    gauss /= gauss.sum()
    identity = np.eye(channels)
    for axis in range(ndim):
        kernel = gauss.reshape([-1 if i == axis else 1 for i in range(ndim)])[..., None, None] * identity
        maps = convolve(maps, kernel.astype(np.float32), padding)
    return maps


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class L2Normalize(KL.Layer):
    """Puts each pixel's feature vector on the unit sphere (paper Sec. 2, Wang and Isola 2020).

    (B, *spatial, C) -> (B, *spatial, C). All-zero vectors stay zero instead of becoming NaN: the divisor is at
    least 1e-6 (epsilon 1e-12 on the sum of squares), so vectors shorter than that come out shorter than 1.
    """

    def call(self, features):
        # In float16 the epsilon 1e-12 is 0 (zero vectors would give 0 / 0) and squares above 65504 overflow.
        exact = tf.float32 if features.dtype == tf.float16 else features.dtype
        normalized = tf.math.l2_normalize(tf.cast(features, exact), axis=-1, epsilon=1e-12)
        return tf.cast(normalized, features.dtype)


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class LocalNormalize(KL.Layer):
    """Local contrast normalisation: each pixel's intensity relative to the mean and SD of its surroundings,

        z = (x - m) / sqrt(v + epsilon^2),  m = G * x,  v = G * x^2 - m^2,

    G a Gaussian window of SD `sigma` pixels truncated at ceil(3 sigma), renormalised where it passes the image
    border (so that the border is not read as a dark edge). z is unchanged by x -> a x + b for a > 0 where the
    local SD is well above epsilon, and changes sign for a < 0, so 1 - x gives -z. epsilon, in intensity units
    (images in [0, 1]), is the contrast below which differences count as noise, not as edges.

    Call: (B, *spatial, 1) -> (B, *spatial, 1); 2D or 3D.
    """

    def __init__(self, sigma=2.0, epsilon=0.01, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("sigma", sigma), ("epsilon", epsilon)):
            if positive_number(value) is None:
                raise ValueError(f"LocalNormalize: {name} must be a positive number, got {value!r}")
        self.sigma, self.epsilon = float(sigma), float(epsilon)
        self.radius = math.ceil(3 * self.sigma)

    @staticmethod
    def _check_images(input_shape):
        shape = tf.TensorShape(input_shape)
        if shape.rank is not None and (shape.rank not in (4, 5) or shape[-1] != 1):
            raise ValueError(f"LocalNormalize expects single-channel 2D or 3D inputs (batch, spatial..., 1), "
                             f"got shape {tuple(shape)}")

    def build(self, input_shape):
        self._check_images(input_shape)
        super().build(input_shape)

    def call(self, images):
        self._check_images(images.shape)  # every call, not just the first: see tiling.check_images
        images = tf.cast(images, tf.float32)
        sums = gaussian_blur(tf.concat([images, tf.square(images), tf.ones_like(images)], axis=-1), self.sigma,
                             self.radius, images.shape.rank - 2, 3, "SAME")
        mean, mean_square = sums[..., :1] / sums[..., 2:], sums[..., 1:2] / sums[..., 2:]
        variance = tf.maximum(mean_square - tf.square(mean), 0.)
        return (images - mean) * tf.math.rsqrt(variance + self.epsilon ** 2)

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "epsilon": self.epsilon}


def dilated(conv, x, rate):
    """An undilated 3^ndim "same" convolution layer applied at dilation `rate`: the same output as the layer
    built with dilation_rate=rate, computed as the undilated convolution of the rate^ndim interleaved
    sub-images (pixels rate apart along each axis; ``tf.space_to_batch``), each zero-padded at its end to a
    multiple of rate. oneDNN's dilated kernels ran at 0.58-0.75 of the speed of its undilated ones (float32,
    32 -> 32 channels at 96x96, forward and backward, 2 cores; docs/benchmarks.md); this way the context
    convolutions keep that speed. The interleaved copies take one more activation's memory while it runs.

    x: (B, *spatial, C) -> (B, *spatial, conv.filters).
    """
    if rate == 1:
        return conv(x)
    x = tf.convert_to_tensor(x)
    ndim, static = len(x.shape) - 2, x.shape[:-1]
    spatial = tf.shape(x)[1:-1]
    ends = tf.stack([tf.zeros_like(spatial), -spatial % rate], axis=1)  # zeros, as the "same" padding's
    y = tf.batch_to_space(conv(tf.space_to_batch(x, [rate] * ndim, ends)), [rate] * ndim, ends)
    y.set_shape(static.concatenate([conv.filters]))  # the next layers check the static channel count
    return y


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class CIFLEncoder(KL.Layer):
    """Contrast invariant feature learner f_theta, a reusable Keras layer.

    Args:
        channels: C, the number of output feature channels.
        features: filters of each of the seven hidden convolutions.
        ndim: 2 (images (B, H, W, 1)) or 3 (volumes (B, D, H, W, 1)).
        activation: the non-linearity between convolutions (none after the last).
        architecture: "paper", the eight convolutions of the paper, or "context", which adds a
            residual dilated 3x3 convolution per dilation after the seventh, so that each pixel's
            features also describe its surroundings (up to 38 pixels away with CONTEXT_DILATIONS).
        dilations: with "context", the context convolutions' dilation rates (default CONTEXT_DILATIONS).
            Training crops should be wider than the receptive field (2 * receptive_radius + 1): where
            every pixel sees the crop's zero padding, features that ignore the image are cheap (method
            page 3b), as a 3D encoder with the default dilations learned on 48^3 crops.
        inversion_invariant: the first convolution, without bias, sees x - 1/2 and is followed by its
            absolute value instead of the activation, so that x and its inversion 1 - x (which maps
            x - 1/2 to its negative, zero padding included) have the same features. The views of a
            training pair draw their intensities independently, so the sign of an edge carries no
            information the loss rewards; this removes it exactly instead of by learning.
        local_normalization: None, or the `sigma` in pixels of a LocalNormalize in front of the first
            convolution, which then sees local contrast instead of intensities (centred already, so an
            inversion-invariant first layer takes it as it is).
        use_bias: False drops every convolution's bias. With a positively homogeneous activation (ReLU, the
            default) the network then is too, so the l2-normalised features of k * y equal those of y for every
            k > 0, y being what the first convolution sees: x, x - 1/2 with inversion_invariant (then for every
            k != 0), or LocalNormalize(x). The features are thus unchanged when the image is scaled about 0 (about
            1/2 with inversion_invariant; with local_normalization, nearly, as its epsilon is not scaled), where
            biases set thresholds on contrast; up to rounding under a 16-bit policy. A pixel whose receptive field
            sees y = 0 only gets the zero vector, and one whose features before L2Normalize are shorter than 1e-6
            (a small enough k) gets features shorter than 1. Measured as a lever in docs/levers.md; not the
            shipped encoders'.
        dtype: as for any Keras layer, also a mixed precision policy ("mixed_bfloat16", "mixed_float16"):
            the convolutions then compute in 16 bits, while the weights, the normalisations and the
            features stay at the variables' dtype (float32).

    Call: (B, *spatial, 1) -> (B, *spatial, C), l2-normalised across C at every pixel (without biases, zero
    where a pixel's receptive field sees y = 0 only).
    """

    def __init__(self, channels=16, features=32, ndim=2, activation="relu", architecture="paper", dilations=None,
                 inversion_invariant=False, local_normalization=None, use_bias=True, **kwargs):
        # Inputs stay as given, each layer inside casting them for itself: LocalNormalize and x - 1/2 see the
        # float32 image under a mixed policy (bfloat16 would round x and 1 - x unequally, and flatten faint contrast).
        super().__init__(**{"autocast": False, **kwargs})
        for name, value in (("channels", channels), ("features", features)):
            if positive_integer(value) is None:
                raise ValueError(f"CIFLEncoder: {name} must be a positive integer, got {value!r}")
        if positive_integer(ndim) not in (2, 3):
            raise ValueError(f"CIFLEncoder: ndim must be 2 or 3, got {ndim!r}")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"CIFLEncoder: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if architecture == "paper" and dilations is not None:
            raise ValueError(f"CIFLEncoder: dilations are those of the context architecture; "
                             f"architecture 'paper' takes none, got {dilations!r}")
        if architecture == "context" and dilations is None:
            dilations = CONTEXT_DILATIONS
        if architecture == "context" and (not isinstance(dilations, (list, tuple)) or not dilations or any(
                positive_integer(d) is None for d in dilations)):
            raise ValueError(f"CIFLEncoder: dilations must be positive integers such as (2, 4), got {dilations!r}")
        for name, value in (("inversion_invariant", inversion_invariant), ("use_bias", use_bias)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"CIFLEncoder: {name} must be True or False, got {value!r}")
        if local_normalization is not None and positive_number(local_normalization) is None:
            raise ValueError(f"CIFLEncoder: local_normalization must be None or a positive sigma in pixels, "
                             f"got {local_normalization!r}")
        self.channels, self.features, self.ndim = int(channels), int(features), int(ndim)
        self.architecture = architecture
        self.dilations = tuple(int(d) for d in dilations or ())
        self.inversion_invariant, self.use_bias = bool(inversion_invariant), bool(use_bias)
        self.local_normalization = None if local_normalization is None else float(local_normalization)
        exact = self.dtype_policy.variable_dtype  # the normalisations' (see dtype above)
        self.local_normalize = (None if local_normalization is None
                                else LocalNormalize(self.local_normalization, name="local_normalize", dtype=exact))
        # A name ("relu"), also in configs saved before activations were serialised, or a function ("relu6")
        self.activation = tf.keras.activations.get(activation)
        conv = KL.Conv2D if self.ndim == 2 else KL.Conv3D
        widths = [self.features] * (NUM_CONVS - 1) + [self.channels]
        self.convs = [conv(width, 3, padding="same", use_bias=use_bias and (i > 0 or not inversion_invariant),
                           name=f"conv_{i}", dtype=self.dtype_policy) for i, width in enumerate(widths)]
        # Undilated: `dilated` applies each at its dilation rate, on interleaved sub-images (faster, same output).
        self.context = [conv(self.features, 3, padding="same", use_bias=use_bias, name=f"context_{i}",
                             dtype=self.dtype_policy) for i in range(len(self.dilations))]
        self.normalize = L2Normalize(name="l2_normalize", dtype=exact)

    def _check_images(self, images):
        return check_images(f"CIFLEncoder(ndim={self.ndim})", self.ndim, images)

    def build(self, input_shape):
        self._check_images(input_shape)
        shape = tf.TensorShape(input_shape)
        for conv in self.convs[:-1] + self.context + self.convs[-1:]:
            with tf.name_scope(conv.name):  # unique weight names: the .h5 model format needs them
                conv.build(shape)
            shape = conv.compute_output_shape(shape)
        super().build(input_shape)

    def call(self, images):
        images = self._check_images(images)  # every call, not just the first: see tiling.check_images
        if not images.dtype.is_floating:  # an integer image is not yet in [0, 1]
            raise TypeError(f"{self.name}: images must be floating-point intensities in [0, 1], "
                            f"got {images.dtype.name}")
        if self.local_normalize is not None:
            x = self.local_normalize(images)
        else:
            x = images - 0.5 if self.inversion_invariant else images  # 1 - x is then -(x - 1/2)
        x = self.convs[0](x)
        x = tf.abs(x) if self.inversion_invariant else self.activation(x)
        for conv in self.convs[1:-1]:
            x = self.activation(conv(x))
        for conv, rate in zip(self.context, self.dilations):
            x = x + self.activation(dilated(conv, x, rate))  # residual: the local features stay, context is added
        return self.normalize(self.convs[-1](x))

    @property
    def receptive_radius(self):
        """Pixels, along each axis, that the output at a pixel sees on either side: 8 for the paper's
        eight 3x3 convolutions, 8 plus the dilations' sum with context (38 by default), plus the window's
        ceil(3 sigma) with local_normalization (tiling needs it, and measuring it would miss dead ReLUs)."""
        window = 0 if self.local_normalize is None else self.local_normalize.radius
        rates = [conv.dilation_rate[0] for conv in self.convs] + list(self.dilations)  # `dilated` applies the latter
        return window + sum(rate * (conv.kernel_size[0] // 2) for conv, rate in zip(self.convs + self.context, rates))

    @property
    def live_activations(self):
        """Float32 images as wide as the widest convolution that a tile holds at once per pixel
        (tiling.bytes_per_pixel): a convolution's input and output, and with context also the residual sum and the
        dilation's interleaved copies (`dilated`). Measured by bench/tile_memory.py: up to 3.2 and 5.3."""
        return 4 if self.architecture == "paper" else 6

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.channels])

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "features": self.features, "ndim": self.ndim,
                "activation": tf.keras.activations.serialize(self.activation), "architecture": self.architecture,
                "dilations": list(self.dilations) if self.architecture == "context" else None,
                "inversion_invariant": self.inversion_invariant, "local_normalization": self.local_normalization,
                "use_bias": self.use_bias}


def inflate(encoder):
    """A 3D CIFLEncoder that computes what a 2D one does on each slice across a volume's last axis.

    Each 3x3 kernel becomes the central plane of a 3x3x3 one, zero elsewhere (the inflation of I3D, Carreira
    and Zisserman 2017, with the kernel in one plane rather than repeated across it), biases as they are:
    with "same" padding the volume's features then equal the 2D encoder's slice by slice. The start of a 3D
    encoder trained from a 2D one (``train_encoder(init=...)``), which training then teaches to use the third
    axis.

    Args:
        encoder: a 2D CIFLEncoder, without local_normalization (its Gaussian window would reach across slices).

    Returns: a built 3D CIFLEncoder, (B, X, Y, Z, 1) -> (B, X, Y, Z, C), of the same architecture and C.
    """
    if not isinstance(encoder, CIFLEncoder) or encoder.ndim != 2:
        raise TypeError(f"inflate: takes a 2D CIFLEncoder, got {getattr(encoder, 'name', encoder)!r} "
                        f"({type(encoder).__name__}, ndim {getattr(encoder, 'ndim', None)})")
    if encoder.local_normalization is not None:
        raise ValueError(f"inflate: {encoder.name} has local_normalization {encoder.local_normalization}, whose "
                         f"window would reach across the slices; inflate encoders without it")
    if not encoder.built:
        encoder(tf.zeros((1, 8, 8, 1)))
    config = {key: value for key, value in encoder.get_config().items() if key not in ("name", "dtype", "trainable")}
    volume = CIFLEncoder(**{**config, "ndim": 3}, name=f"{encoder.name}_3d")
    volume(tf.zeros((1, 8, 8, 8, 1)))
    for flat, deep in zip(encoder.convs + encoder.context, volume.convs + volume.context):
        kernel, *bias = flat.get_weights()
        inflated = np.zeros((*kernel.shape[:2], 3, *kernel.shape[2:]), kernel.dtype)
        inflated[:, :, 1] = kernel
        deep.set_weights([inflated, *bias])
    return volume


def encoder_model(encoder, name="cifl_encoder_model"):
    """Wraps an encoder layer into a Model (B, *spatial, 1) -> (B, *spatial, C) of any spatial size."""
    check_layer(encoder)
    images = tf.keras.Input((None,) * encoder.ndim + (1,), name="image")
    return tf.keras.Model(images, encoder(images), name=name)


_SAVED_LAYERS = ("cifl_tf>CIFLEncoder", "cifl_tf>Triplanar", "cifl_tf>FeatureStack")  # what load_encoder loads


def save_encoder(encoder, path):
    """Writes `path` (.weights.h5 of an encoder_model) and `path` with .json: the layer config, with the
    dtype of its weights (float32 for an encoder trained under a mixed precision policy) as the policy of each
    of its layers, nested encoders' too (a Triplanar's or FeatureStack's).

    Each file is replaced atomically, so that a run killed while saving keeps the previous one.
    Raises: TypeError for any other layer (a MIND, say), which load_encoder would not load.
    """
    save_encoder_config(encoder, path)
    write_atomically(path, encoder_model(encoder).save_weights)


def save_encoder_config(encoder, path):
    """Writes only the .json of ``save_encoder(encoder, path)``: what a training run writes before its
    weights, which it writes at the end of its first epoch (not the untrained ones before it)."""
    if tf.keras.utils.get_registered_name(type(encoder)) not in _SAVED_LAYERS:
        raise TypeError(f"save_encoder: saves a CIFLEncoder, Triplanar or FeatureStack (what load_encoder loads), "
                        f"got {type(encoder).__name__}")
    path = os.fspath(path)
    if not path.endswith(".h5"):  # Keras would write a TF checkpoint (several files) under another name
        raise ValueError(f"save_encoder: the weights file must be an .h5 file (encoder.weights.h5), got {path!r}")
    write_json(_config_path(path), _variable_dtypes(tf.keras.utils.serialize_keras_object(encoder)))


def _variable_dtypes(config):
    """A layer config with each layer's dtype policy, nested layers' too, replaced by the dtype of its weights:
    a mixed policy's 16 bits were for training."""
    if isinstance(config, list):
        return [_variable_dtypes(item) for item in config]
    if not isinstance(config, dict):
        return config
    config = {key: _variable_dtypes(value) for key, value in config.items()}
    policy = config.get("dtype")
    if isinstance(policy, dict) and policy.get("class_name") == "Policy":
        policy = policy["config"]["name"]
    if isinstance(policy, str):
        config["dtype"] = tf.keras.mixed_precision.Policy(policy).variable_dtype
    return config


def load_encoder(path, trainable=False):
    """Reads an encoder written by save_encoder (or `cifl train-encoder`); frozen unless told.

    `path` is the weights file or the folder of a training run (holding encoder.weights.h5). The layer gets a
    name of its own, as a new one does (cifl_encoder, cifl_encoder_1, ...), so that several fit in one model.
    Raises: FileNotFoundError for a missing file; ValueError naming the file for a file that is no .h5 weights
        file (a model.keras, an encoder.json), a config that is not a valid CIFLEncoder's (or Triplanar's or
        FeatureStack's), or weights that do not load into it (damaged, of other shapes, or more of them).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "encoder.weights.h5")
    elif os.path.isfile(path) and not path.endswith(".h5"):  # save_encoder writes .h5 files; X.json's .json is not
        raise ValueError(f"load_encoder: {path!r} is neither an encoder's weights file (an .h5 file such as "
                         f"encoder.weights.h5, its .json beside it) nor the folder of a training run")
    config_path = _config_path(path)
    if os.path.isfile(config_path) and not os.path.exists(path):
        raise FileNotFoundError(f"load_encoder: {config_path!r} but no {os.path.basename(path)!r} yet: a training "
                                f"run writes its weights at the end of its first epoch")
    for required in (path, config_path):
        if not os.path.isfile(required):
            raise FileNotFoundError(f"load_encoder: no such file {required!r} (an encoder is a .weights.h5 file "
                                    f"with its .json beside it, or the folder of a training run)")
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("registered_name") not in _SAVED_LAYERS:
        raise ValueError(f"load_encoder: {config_path!r} does not describe a CIFLEncoder (or a Triplanar or "
                         f"FeatureStack)")
    if not isinstance(trainable, (bool, np.bool_)):
        raise TypeError(f"load_encoder: trainable must be True or False, got {trainable!r}")
    kind = config["registered_name"].split(">")[1]
    if isinstance(config.get("config"), dict):  # a fresh name, as a new layer gets: saved encoders share theirs
        config = {**config, "config": {k: v for k, v in config["config"].items() if k != "name"}}
    try:
        encoder = tf.keras.utils.deserialize_keras_object(config)
    except (ValueError, TypeError, KeyError) as error:  # Keras's own error names no cause: the one it caught does
        raise ValueError(f"{config_path}: not a valid {kind} config ({first_line(error.__context__ or error)})"
                         ) from None
    if not isinstance(encoder, tf.keras.layers.Layer):  # a config without its "config" or "class_name"
        raise ValueError(f"{config_path}: not a valid {kind} config (it gives a {type(encoder).__name__})")
    model = encoder_model(encoder)
    try:
        model.load_weights(path)
        stored = _stored_weight_count(path)
    except (ValueError, OSError, RuntimeError, KeyError) as error:  # h5py: RuntimeError, KeyError if damaged
        raise ValueError(f"{path}: weights do not load into the encoder of {config_path} "
                         f"({first_line(error)})") from None
    if stored not in (None, len(model.weights)):  # Keras loads the weights it finds and says nothing of the rest
        raise ValueError(f"{path}: weights do not load into the encoder of {config_path} (the file holds "
                         f"{stored} weights, the encoder has {len(model.weights)}: another encoder's weights?)")
    encoder.trainable = bool(trainable)
    return encoder


def _stored_weight_count(path):
    """The variables of its layers that a .weights.h5 file holds (its optimizer's and metrics' aside); None for a
    legacy .h5 file, whose loader counts them itself."""
    with h5py.File(path, "r") as weights:
        if "layers" not in weights:
            return None
        datasets = []
        weights["layers"].visititems(lambda name, item: datasets.append(name) if isinstance(item, h5py.Dataset)
                                     else None)
    return len(datasets)


def _config_path(weights_path):
    root = weights_path[:-len(".weights.h5")] if weights_path.endswith(".weights.h5") else weights_path
    return root + ".json"


PRETRAINED_DIR = os.path.join(os.path.dirname(__file__), "weights")
PRETRAINED_TAU_GAMMAS = (1.0, 0.1, 0.01)  # the paper's sweep (Table 1)
PRETRAINED_RECOMMENDED = {2: "recommended_2d", 3: "recommended_3d"}  # ndim -> general-purpose encoder's name
# The file name roots of the shipped encoders, as train_encoder's `init` takes them
PRETRAINED_NAMES = (*(f"tau_gamma_{tau_gamma:g}" for tau_gamma in PRETRAINED_TAU_GAMMAS),
                    *PRETRAINED_RECOMMENDED.values())


def pretrained_info():
    """How each shipped encoder was made, keyed by its name: the tau_gamma of the sweep ("1", "0.1",
    "0.01") or a PRETRAINED_RECOMMENDED name ("recommended_2d", "recommended_3d").

    Returns: {name: {"command", "steps", "seed", "final_loss", "wall_seconds", "settings" (train_encoder's
    arguments), "machine"}}; the recommended encoders' entries also name the git "commit" they were trained at.
    """
    with open(os.path.join(PRETRAINED_DIR, "encoders.json")) as f:
        return json.load(f)


def pretrained(tau_gamma=None, ndim=2, trainable=False):
    """A shipped CIFLEncoder trained on synthetic shapes only, read offline.

    Args:
        tau_gamma: None for the recommended general-purpose encoder of `ndim`, or one of
            PRETRAINED_TAU_GAMMAS for that 2D encoder of the paper's sweep (the paper's architecture).
        ndim: 2, or 3: with tau_gamma None the recommended 3D encoder (trained in 3D from the inflated
            tau_gamma = 1 encoder, ``inflate``; docs/levers.md, "3D-trained encoders against tri-planar
            features"), else the tri-planar features of that 2D encoder (Triplanar).
        trainable: False (the default) freezes the encoder.

    Returns: a CIFLEncoder (B, *spatial, 1) -> (B, *spatial, C), or with ndim 3 and a tau_gamma a Triplanar,
    (B, X, Y, Z, 1) -> (B, X, Y, Z, 3C); images in [0, 1].
    Raises: ValueError for another ndim or tau_gamma.
    """
    encoder = load_encoder(os.path.join(PRETRAINED_DIR, f"{_pretrained_name(tau_gamma, ndim)}.weights.h5"), trainable)
    return Triplanar(encoder, trainable=trainable) if encoder.ndim < ndim else encoder


def pretrained_log(tau_gamma=None, ndim=2):
    """The path of a shipped encoder's training log (Keras CSVLogger: epoch, loss, and val_loss, NA as there
    was no validation), for `pretrained`'s arguments."""
    return os.path.join(PRETRAINED_DIR, f"{_pretrained_name(tau_gamma, ndim)}.log.csv")


def _pretrained_name(tau_gamma, ndim):
    """The file name root of the shipped encoder `pretrained(tau_gamma, ndim)`; ValueError for none."""
    if not is_integer(ndim) or ndim not in (2, 3):
        raise ValueError(f"pretrained: ndim must be 2 or 3, got {ndim!r}")
    if tau_gamma is None:
        return PRETRAINED_RECOMMENDED[ndim]
    if isinstance(tau_gamma, bool) or tau_gamma not in PRETRAINED_TAU_GAMMAS:
        raise ValueError(f"pretrained: tau_gamma must be None or one of {PRETRAINED_TAU_GAMMAS}, got {tau_gamma!r}")
    return f"tau_gamma_{tau_gamma:g}"
