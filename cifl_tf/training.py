"""Training the CIFL encoder on synthetic contrast pairs with ``model.fit`` (paper Fig. 1).

The two renders of a label map are taken at a random relative offset (method page, section 3b):
with voxel-aligned views Eq. 1 is minimised by features that ignore the image (padding and position
patterns are identical for any input). Each view is a crop of a larger render; the encoder sees the
crops, and Eq. 1 compares the two feature images on their overlap after aligning them.

Batch k of a seeded run (pair and crop origins) is a function of (seed, k) alone, so a run resumed
after its last finished epoch continues the stream where it stopped and ends as an uninterrupted run.

Every model this package fits is compiled by ``compile_for_fit``, so that ``fit`` traces its step once.
"""
import csv
import inspect
import json
import math
import numbers
import os
import shutil
import signal
import threading
import time
import warnings

import numpy as np
import tensorflow as tf

from . import checkpoint, machine
from .callbacks import StopOnNonFinite
from .checks import is_integer
from .data import write_atomically, write_json
from .encoder import (ARCHITECTURES, PRETRAINED_DIR, PRETRAINED_NAMES, CIFLEncoder, encoder_model, inflate,
                      load_encoder, positive_number, save_encoder_config)
from .losses import check_scales, check_temperatures, multiscale_contrastive_loss, pixel_contrastive_loss
from .synth import RENDER_DEFAULTS, ShapesSynth, batch_key, check_integer, check_shape, contrast_pairs, stream_seed


class RegisteredJSON:
    """A registered Keras model whose ``to_json`` names it by its registered name ("cifl_tf>Name"): Keras writes the
    bare class name, and ``model_from_json`` then returned that name, a string, instead of the model."""

    def to_json(self, **kwargs):
        config = json.loads(super().to_json())
        config["class_name"] = tf.keras.utils.get_registered_name(type(self))
        return json.dumps(config, **kwargs)


def compile_for_fit(model, outputs=None, **compile_kwargs):
    """``model.compile(**compile_kwargs)``, and the variables the first step of ``model.fit`` would
    otherwise make while it is traced: the optimizer's and the loss metrics'.

    tf.function traces a function a second time when its first trace made variables, so this halves the
    time ``fit`` takes to start: 11.0 -> 6.6 s for a 32x32 VxmDense, 5.0 -> 2.2 s for a UNet, 11-12 ->
    6-7 s for a 3D level of ``register_pair``, on 2 cores.

    The optimizer is built for the weights trainable now: compile again after freezing or unfreezing layers.

    Args:
        model: a Keras model whose weights are built.
        outputs: its outputs, or tensors of the same structure; None: ``model.outputs`` (a subclassed
            model has none until it is called).
    """
    if not model.built:
        raise ValueError(f"compile_for_fit: build {model.name} first (call it once), so that its weights exist")
    model.compile(**compile_kwargs)
    with model.distribute_strategy.scope():  # where compile and fit make their variables
        model.optimizer.build(model.trainable_variables)
        model.compiled_loss.build(model.outputs if outputs is None else outputs)


class _CPUSlurmClusterResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
    """SLURM's resolver on nodes without GPUs. Given 0 GPUs per node it divided them among the tasks in steps of 0
    ("range() arg 3 must not be zero"); here each task is given a GPU slot that is never used (no CUDA devices are
    set), and the strategy is told of no accelerator."""

    def __init__(self):
        super().__init__(gpus_per_node=2 ** 16, gpus_per_task=1, auto_set_gpu=False)

    def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
        return {}


def multi_worker_strategy():
    """tf.distribute.MultiWorkerMirroredStrategy over the cluster in TF_CONFIG, or else over the
    tasks of the SLURM job step this process is one of. Create it before any other TF op."""
    if "TF_CONFIG" in os.environ:
        try:
            cluster = json.loads(os.environ["TF_CONFIG"] or "{}").get("cluster")
        except (ValueError, AttributeError):
            raise ValueError(f"strategy 'multiworker': TF_CONFIG is not a JSON object, got "
                             f"{os.environ['TF_CONFIG']!r}") from None
        if not cluster:  # else TensorFlow trains alone, silently
            raise ValueError(f"strategy 'multiworker': TF_CONFIG names no cluster of workers, got "
                             f"{os.environ['TF_CONFIG']!r}")
        resolver = None  # the strategy's own: TF_CONFIG's
    elif "SLURM_STEP_NUM_TASKS" in os.environ:
        # The resolver counts GPUs with nvidia-smi, which fails where there is none
        resolver = (tf.distribute.cluster_resolver.SlurmClusterResolver() if shutil.which("nvidia-smi")
                    else _CPUSlurmClusterResolver())
    else:
        raise ValueError("strategy 'multiworker' needs a cluster: set TF_CONFIG on each worker, or start the "
                         "workers as the tasks of a SLURM job step (srun)")
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except tf.errors.UnknownError as error:  # "Could not start gRPC server": the worker's port is taken
        raise OSError(f"strategy 'multiworker': this worker's server did not start ({error.message.splitlines()[0]}): "
                      f"is its port in use, by another program or by a worker given the same task?") from None
    if on_sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # TensorFlow's runtime replaced it with one that ignores SIGTERM
    return strategy


LEARNING_RATE_DECAYS = ("constant", "cosine")
# Keras dtype policies the encoder may train under: 16-bit convolutions run on the bfloat16 units of recent CPUs
# (AVX512_BF16, AMX; through oneDNN) and on the tensor cores of GPUs (README, "Command line", --precision).
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = {
    "default": tf.distribute.get_strategy,
    "mirrored": tf.distribute.MirroredStrategy,
    "multiworker": multi_worker_strategy,
}


def offset_views(pairs, shape, max_offset, seed=None, start=0):
    """Crops both views of each batch of `pairs` at independent random origins.

    Args:
        pairs: dataset of (x1, x2), each (B, *big, 1) with big = shape + max_offset per axis.
        shape: spatial shape of the crops.
        max_offset: largest origin per axis; the views' relative offset is in [-max_offset, max_offset].
        seed: integer; the origins of batch k are a function of (seed, k). None: random every run.
        start: index of the first batch of `pairs` (as contrast_pairs' `start`).

    Returns: dataset of ((v1, v2, shift),): crops (B, *shape, 1) and shift (B, ndim) int32, the
    origin of view 2 minus that of view 1 (the same for the whole batch).
    """
    shape, start = check_shape(shape), check_integer("start", start, 0)
    ndim, seed = len(shape), stream_seed(seed)
    check_max_offset(max_offset, shape)
    wanted = (None, *(s + max_offset for s in shape), 1)
    for view in pairs.element_spec:  # each cropped to (B, *shape, 1)
        if view.shape.rank is not None and not view.shape.is_compatible_with(wanted):
            raise ValueError(f"offset_views: pairs of shape {tuple(view.shape)}, expected (B, *big, 1) with big the "
                             f"crop shape {shape} plus max_offset {max_offset} per axis, {wanted[1:-1]}")

    def crop(index, pair):
        x1, x2 = pair
        origins = tf.random.stateless_uniform((2, ndim), batch_key(seed, index, stream=1), 0, max_offset + 1,
                                              dtype=tf.int32)
        size = [-1, *shape, 1]
        v1 = tf.slice(x1, tf.pad(origins[0], [[1, 1]]), size)
        v2 = tf.slice(x2, tf.pad(origins[1], [[1, 1]]), size)
        shift = tf.tile((origins[1] - origins[0])[tf.newaxis], [tf.shape(x1)[0], 1])
        return ((v1, v2, shift),)

    return pairs.enumerate(start).map(crop)


def align_views(f1, f2, shift):
    """The overlap of two feature images whose origins differ by `shift`, pixel-aligned.

    f1, f2: (B, *spatial, C); shift: (B, ndim), view 2's origin minus view 1's (row 0 is used).
    Returns both restricted to the overlap, (B, *(spatial - |shift|), C) each.
    """
    shift = tf.cast(shift[0], tf.int32)
    channels = f1.shape[-1]
    zero = tf.zeros([1], tf.int32)
    size = tf.concat([[-1], tf.shape(f1)[1:-1] - tf.abs(shift), [channels]], axis=0)
    aligned = (tf.slice(f1, tf.concat([zero, tf.maximum(shift, 0), zero], 0), size),
               tf.slice(f2, tf.concat([zero, tf.maximum(-shift, 0), zero], 0), size))
    static = [None] * (f1.shape.rank - 1) + [channels]
    return tuple(tf.ensure_shape(f, static) for f in aligned)


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class SiameseCIFL(RegisteredJSON, tf.keras.Model):
    """One encoder with shared weights applied to both views; adds Eq. 1 on their overlap, averaged over
    `loss_scales` (losses.multiscale_contrastive_loss; (1,): Eq. 1 alone, as in the paper), plus, with
    `pixel_contrast` > 0, that weight times losses.pixel_contrastive_loss on the overlap.

    Input: (v1, v2, shift) as made by `offset_views`. Output: the aligned feature images.
    Its only weighted layer is the encoder, so its .h5 weights load into `encoder_model`.
    """

    def __init__(self, encoder, tau_alpha=1.0, tau_beta=1.0, tau_gamma=0.1, loss_scales=(1,), pixel_contrast=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(encoder, tf.keras.layers.Layer):
            raise TypeError(f"SiameseCIFL: encoder must be a Keras layer such as a CIFLEncoder, got {encoder!r}")
        check_temperatures(tau_alpha=tau_alpha, tau_beta=tau_beta, tau_gamma=tau_gamma)
        if not _non_negative(pixel_contrast):
            raise ValueError(f"pixel_contrast must be a non-negative number, got {pixel_contrast!r}")
        self.encoder = encoder
        self.taus = (tau_alpha, tau_beta, tau_gamma)
        self.loss_scales = check_scales(loss_scales)
        self.pixel_contrast = pixel_contrast

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype_policy.name,  # the policy it casts the views to
                "encoder": tf.keras.utils.serialize_keras_object(self.encoder),
                **dict(zip(("tau_alpha", "tau_beta", "tau_gamma"), self.taus)), "loss_scales": self.loss_scales,
                "pixel_contrast": self.pixel_contrast}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        encoder = tf.keras.utils.deserialize_keras_object(config["encoder"], custom_objects=custom_objects)
        return cls(**{**config, "encoder": encoder})

    def build_from_config(self, config):
        # Keras would call the model on placeholders, where its add_loss fails. Its only weights are the encoder's,
        # which its own config has built; the input shape is kept for the next save (without it, that file's
        # optimizer state would not load), and so is the signature of a call, without which it would not save as a
        # SavedModel until called.
        self._build_input_shape = tuple(tuple(shape) for shape in config["input_shape"])
        *views, shift = self._build_input_shape
        self._set_save_spec((*(tf.TensorSpec(view, tf.float32) for view in views), tf.TensorSpec(shift, tf.int32)))
        self.built = True

    def call(self, inputs):
        v1, v2, shift = inputs
        f1, f2 = align_views(self.encoder(v1), self.encoder(v2), shift)
        loss = multiscale_contrastive_loss(f1, f2, self.loss_scales, *self.taus)
        if self.pixel_contrast > 0:
            loss += self.pixel_contrast * pixel_contrastive_loss(f1, f2)
        self.add_loss(loss)
        return f1, f2


def check_verbose(verbose, where):
    """ValueError naming a verbose that Keras's fit and predict would not take."""
    if isinstance(verbose, bool) or verbose not in (0, 1, 2, "auto"):
        raise ValueError(f"{where}: verbose must be 0, 1, 2 or 'auto' (as Keras takes it), got {verbose!r}")


def _prepare_run_on_every_worker(strategy, chief, out_dir, prepare):
    """`prepare()` (which checks and writes the run folder) on the chief; under a multi-worker strategy every
    worker then learns whether it refused the folder and stops too, rather than waiting in collective ops that
    the chief has left."""
    refusal = None
    if chief:
        try:
            prepare()
        except (ValueError, OSError) as error:
            refusal = error
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        flags = strategy.run(lambda: tf.constant(0.0 if refusal is None else 1.0))
        if strategy.reduce(tf.distribute.ReduceOp.SUM, flags, axis=None).numpy() > 0 and refusal is None:
            raise ValueError(f"{out_dir}: the chief worker refused this run folder (its error says why)")
    if refusal is not None:
        raise refusal


def _get_strategy(strategy):
    if strategy is None:
        return tf.distribute.get_strategy()
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        return STRATEGIES[strategy]()
    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(f"strategy must be a name or a tf.distribute.Strategy, got {strategy!r}")
    return strategy


def _non_negative(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value < math.inf


def _positive(value):  # numpy's float32 too: the learning rate a downstream model is given may be one
    return positive_number(value) is not None


# (check of a value, what it must be), as checkpoint.check_settings takes them: shared by the settings.json
# fields below, the command lines' numeric options (cli._check_options) and the downstream models.
POSITIVE_INTEGER = (lambda v: is_integer(v, 1), "a positive integer")
NON_NEGATIVE_INTEGER = (lambda v: is_integer(v, 0), "a non-negative integer")
POSITIVE_NUMBER = (_positive, "a positive number")
NON_NEGATIVE_NUMBER = (_non_negative, "a non-negative number")
SEED = (lambda v: is_integer(v, 0) and v < 2 ** 32, "an integer in [0, 2**32)")  # Keras's seeds take no more

# Each settings.json field: (check of its value, what it must be).
SETTINGS = {
    "shape": (lambda v: isinstance(v, list) and len(v) in (2, 3) and all(is_integer(n, 1) for n in v),
              "a list of 2 or 3 positive integers"),
    **dict.fromkeys(("steps", "batch_size", "channels", "features", "steps_per_epoch"), POSITIVE_INTEGER),
    "architecture": (lambda v: v in ARCHITECTURES, f"one of {ARCHITECTURES}"),
    "dilations": (lambda v: v is None or isinstance(v, list) and len(v) > 0 and all(is_integer(n, 1) for n in v),
                  "null or a list of positive integers"),
    **{name: (lambda v: isinstance(v, bool), "true or false") for name in ("inversion_invariant", "use_bias")},
    "local_normalization": (lambda v: v is None or _positive(v), "null or a positive number"),
    "max_offset": NON_NEGATIVE_INTEGER,
    "pixel_contrast": NON_NEGATIVE_NUMBER,
    **dict.fromkeys(("tau_alpha", "tau_beta", "tau_gamma", "learning_rate"), POSITIVE_NUMBER),
    "learning_rate_decay": (lambda v: v in LEARNING_RATE_DECAYS, f"one of {LEARNING_RATE_DECAYS}"),
    "precision": (lambda v: v in PRECISIONS, f"one of {PRECISIONS}"),
    "loss_scales": (lambda v: isinstance(v, list) and len(v) > 0 and all(is_integer(n, 1) for n in v),
                    "a list of positive integers"),
    "seed": (lambda v: v is None or SEED[0](v), "null or " + SEED[1]),
    "init": (lambda v: v is None or isinstance(v, str) and v != "",
             "null or a shipped encoder's name or an encoder's path"),
    "synth_kwargs": (lambda v: isinstance(v, dict) and set(v) <= _synth_arguments(),
                     "an object of ShapesSynth and labels_to_image arguments"),
}


# Fields that runs of earlier versions did not write, with the value those runs used.
SETTING_DEFAULTS = {"architecture": "paper", "dilations": None, "inversion_invariant": False,
                    "local_normalization": None, "use_bias": True, "learning_rate_decay": "constant",
                    "loss_scales": [1], "pixel_contrast": 0.0, "precision": "float32", "init": None}


def _plain(value):
    """json.dumps's `default`: NumPy numbers and arrays as Python numbers and lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not a JSON value")


def as_json_holds(value):
    """`value` as a JSON file (settings.json, a Keras config) holds it: tuples as lists, and NumPy numbers and
    arrays at any depth as Python numbers and lists."""
    return json.loads(json.dumps(value, default=_plain))


def learning_rate_schedule(learning_rate, decay, steps):
    """The optimizer's learning rate: `learning_rate` throughout ("constant"), or from `learning_rate` at
    step 0 down to 0 at step `steps` along half a cosine ("cosine", Loshchilov & Hutter 2017; the shipped
    recommended encoder's recipe, README)."""
    if decay not in LEARNING_RATE_DECAYS:
        raise ValueError(f"learning_rate_decay must be one of {LEARNING_RATE_DECAYS}, got {decay!r}")
    if decay == "constant":
        return learning_rate
    return tf.keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)


def adam(learning_rate, precision="float32"):
    """The encoder's optimizer: Adam, with dynamic loss scaling under "mixed_float16", whose gradients would
    underflow (Keras's compile adds it for a model's own policy only, and the encoder's is its layer's)."""
    optimizer = tf.keras.optimizers.Adam(learning_rate)
    return tf.keras.mixed_precision.LossScaleOptimizer(optimizer) if precision == "mixed_float16" else optimizer


def _synth_arguments():
    """The names synth_kwargs may hold: ShapesSynth's own and the labels_to_image intensity arguments it takes."""
    return {*inspect.signature(ShapesSynth).parameters, *RENDER_DEFAULTS} - {"shape", "seed", "render_kwargs"}


def read_settings(out_dir):
    """The train_encoder arguments stored in `out_dir`/settings.json, checked field by field
    (``checkpoint.read_settings`` with SETTINGS)."""
    return checkpoint.read_settings(out_dir, SETTINGS, SETTING_DEFAULTS)


def check_max_offset(max_offset, shape):
    """ValueError unless max_offset is a non-negative integer smaller than every size of the crop shape, so
    that the two views overlap."""
    if not is_integer(max_offset, 0):
        raise ValueError(f"max_offset must be a non-negative integer, got {max_offset!r}")
    if max_offset >= min(shape, default=0):
        raise ValueError(f"max_offset {max_offset} must be smaller than the crop shape {tuple(shape)}")


def initial_encoder(init, encoder_args):
    """The encoder that a run of `encoder_args` (CIFLEncoder's) named by `init` starts from: a shipped encoder's
    file name root (PRETRAINED_NAMES) or an encoder's weights file or run folder (load_encoder), inflated to 3D
    (``inflate``) when it is 2D and the run's encoder 3D.

    Raises: FileNotFoundError for no such encoder; ValueError naming each setting in which it differs from the
        run's encoder (such as its features, or a 3D encoder for a 2D run).
    """
    try:
        encoder = load_encoder(os.path.join(PRETRAINED_DIR, f"{init}.weights.h5") if init in PRETRAINED_NAMES
                               else init)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"init {init!r} is none of the shipped encoders ({', '.join(PRETRAINED_NAMES)}), "
                                f"and {error}") from None
    if not isinstance(encoder, CIFLEncoder):
        raise ValueError(f"init {init!r}: a run starts from a CIFLEncoder, got a {type(encoder).__name__}")
    if encoder.ndim == 2 and encoder_args["ndim"] == 3:
        encoder = inflate(encoder)
    run, given = CIFLEncoder(**encoder_args).get_config(), encoder.get_config()
    differences = [f"{key} {given[key]!r} (the run's {value!r})" for key, value in run.items()
                   if key not in ("name", "trainable", "dtype") and given[key] != value]
    if differences:
        raise ValueError(f"init {init!r}: its encoder differs from the run's in {'; '.join(differences)}; "
                         f"give the run the same options")
    return encoder


def train_encoder(shape=(96, 96), steps=1000, batch_size=4, channels=16, features=32, architecture="paper",
                  dilations=None, inversion_invariant=False, local_normalization=None, use_bias=True, init=None,
                  tau_alpha=1.0, tau_beta=1.0, tau_gamma=0.1, loss_scales=(1,), pixel_contrast=0.0, max_offset=16,
                  learning_rate=1e-3, learning_rate_decay="constant",
                  precision="float32", seed=None, out_dir=None, resume=False, strategy=None, steps_per_epoch=100,
                  synth_kwargs=None, callbacks=(), verbose=1):
    """Trains a CIFLEncoder on synthetic contrast pairs with ``model.fit`` (paper Sec. 2).

    Args:
        shape: spatial shape of the training crops, 2D or 3D (sets the encoder's ndim).
        steps, batch_size: optimisation steps and pairs per step (global batch under a strategy).
        channels, features, architecture, dilations, inversion_invariant, local_normalization, use_bias: the
            encoder's C, hidden width, architecture, context dilations, first layer, input normalisation and
            biases (CIFLEncoder).
        init: None to start from random weights, or the encoder to start from (``initial_encoder``): a shipped
            one's name (PRETRAINED_NAMES, such as "tau_gamma_1") or an encoder's weights file or run folder, of
            the run's architecture; a 2D one for 3D crops is inflated (``inflate``). A resumed run goes on from
            its last epoch instead, and one stopped before its first epoch was saved starts from `init` again.
        tau_alpha, tau_beta, tau_gamma: Eq. 1 temperatures.
        loss_scales: Eq. 1 is averaged over the overlaps average-pooled by each of these factors
            (losses.multiscale_contrastive_loss); (1,), the default, is the paper's loss.
        pixel_contrast: weight of losses.pixel_contrastive_loss (InfoNCE over a grid of pixels of the
            overlap) added to Eq. 1; 0, the default, adds nothing (docs/levers.md: what it gave).
        learning_rate, learning_rate_decay: Adam's learning rate at the first step, and "constant" or
            "cosine" (down to 0 at the last step; learning_rate_schedule).
        precision: the Keras dtype policy of the encoder's convolutions, one of PRECISIONS: "float32", or
            "mixed_bfloat16" / "mixed_float16" (16-bit convolutions; weights, features and Eq. 1 stay
            float32, and mixed_float16 scales the loss against underflow). The saved encoder computes
            in float32.
        max_offset: largest origin of each view inside the render, so that the views' relative offset
            lies in [-max_offset, max_offset] per axis (method page 3b); 0 gives voxel-aligned views.
        seed: integer for reproducible synthesis and initialisation.
        out_dir: folder for settings.json, encoder.weights.h5 (+ .json), log.csv, tensorboard/ and
            the backup that `resume` continues from. None: nothing is written.
        resume: continue the unfinished run in `out_dir` after its last saved epoch; a seeded run
            then ends with the weights of an uninterrupted one.
        strategy: None (the current one), "default", "mirrored", "multiworker" (see
            multi_worker_strategy; the chief writes `out_dir`, which all workers must share) or a
            tf.distribute.Strategy.
        steps_per_epoch: steps between checkpoints and log rows (at most `steps`, which must be a multiple of it).
        synth_kwargs: ShapesSynth arguments (label scales, intensity ranges, ...).
        callbacks: more Keras callbacks.

    Returns: the trained CIFLEncoder.
    """
    shape = check_shape(shape)
    init = os.fspath(init) if isinstance(init, os.PathLike) else init
    for name, value in (("steps", steps), ("steps_per_epoch", steps_per_epoch)):
        if not is_integer(value, 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_max_offset(max_offset, shape)
    # checked before the run folder is written: Keras would fail on them only once it was
    if not isinstance(resume, (bool, np.bool_)):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    check_verbose(verbose, "train_encoder")
    wrong = TypeError(f"callbacks must be Keras callbacks (tf.keras.callbacks.Callback), got {callbacks!r}")
    if isinstance(callbacks, (str, bytes)) or callbacks is not None and not hasattr(callbacks, "__iter__"):
        raise wrong
    callbacks = list(callbacks or ())
    if not all(isinstance(callback, tf.keras.callbacks.Callback) for callback in callbacks):
        raise wrong
    if synth_kwargs is not None and not isinstance(synth_kwargs, dict):
        raise TypeError(f"synth_kwargs must be a dict of ShapesSynth arguments, got {synth_kwargs!r}")
    if resume and out_dir is None:
        raise ValueError("resume needs out_dir, the folder of the run to continue")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "mixed_bfloat16" and not tf.config.list_physical_devices("GPU") and not machine.native_bfloat16():
        warnings.warn(f"precision mixed_bfloat16 on a CPU whose bfloat16 TensorFlow emulates ({machine.describe()}): "
                      f"training may be much slower than in float32 (13x with oneDNN off on an AVX-512 CPU)",
                      stacklevel=2)
    loss_scales = check_scales(loss_scales)
    if max(loss_scales) > min(shape) - max_offset:
        raise ValueError(f"loss_scales {loss_scales}: each must be at most the smallest overlap of the views, "
                         f"{min(shape) - max_offset} pixels (crop shape {shape} minus max_offset {max_offset})")
    encoder_args = dict(channels=channels, features=features, ndim=len(shape), architecture=architecture,
                        dilations=dilations, inversion_invariant=inversion_invariant,
                        local_normalization=local_normalization, use_bias=use_bias)
    CIFLEncoder(**encoder_args)
    schedule = learning_rate_schedule(learning_rate, learning_rate_decay, steps)
    unknown = sorted(set(synth_kwargs or {}) - _synth_arguments())
    if unknown:
        raise ValueError(f"synth_kwargs: ShapesSynth does not take {unknown}; it takes {sorted(_synth_arguments())}")
    ShapesSynth(shape, **(synth_kwargs or {}))  # both check their arguments before anything is written
    steps_per_epoch = min(steps_per_epoch, steps)  # else a short run would train a whole epoch
    if steps % steps_per_epoch:  # fit trains whole epochs: the last one would run past `steps`
        raise ValueError(f"steps {steps} must be a multiple of steps_per_epoch {steps_per_epoch}")
    settings = dict(shape=list(shape), steps=steps, batch_size=batch_size, channels=channels,
                    features=features, architecture=architecture, dilations=dilations,
                    inversion_invariant=inversion_invariant, local_normalization=local_normalization,
                    use_bias=use_bias, init=init, tau_alpha=tau_alpha, tau_beta=tau_beta, tau_gamma=tau_gamma,
                    loss_scales=loss_scales, pixel_contrast=pixel_contrast, max_offset=max_offset,
                    learning_rate=learning_rate, learning_rate_decay=learning_rate_decay, precision=precision,
                    seed=seed, steps_per_epoch=steps_per_epoch, synth_kwargs=synth_kwargs or {})
    settings = as_json_holds(settings)
    checkpoint.check_settings(settings, SETTINGS)  # before anything is built or written: those a run resumes with
    own = [os.path.realpath(os.path.join(out_dir, name)) for name in ("", "encoder.weights.h5", "encoder.json")
           ] if out_dir is not None else []
    # a new run only: one started so by an earlier version resumes from its checkpoint, without its init
    if not resume and init is not None and init not in PRETRAINED_NAMES and os.path.realpath(init) in own:
        raise ValueError(f"init {init!r} is the encoder in out_dir {os.fspath(out_dir)!r}, which the run writes over: "
                         f"copy it to another folder first, or choose another out_dir")
    strategy = _get_strategy(strategy)  # before any TF op: a multi-worker strategy must come first
    if settings["batch_size"] % strategy.num_replicas_in_sync:  # else each worker's mean weighs its share unevenly
        raise ValueError(f"batch_size {settings['batch_size']} must be a multiple of the {strategy.num_replicas_in_sync} "
                         f"replicas that train it (each takes an equal share of the global batch)")
    chief = strategy.extended.should_checkpoint  # under a multi-worker strategy, only one worker writes
    # A resumed run starts from its last checkpoint, and without one, as the run it resumes did, from its init
    checkpointed = resume and tf.train.latest_checkpoint(os.path.join(out_dir, "backup")) is not None
    start_from = None if init is None or checkpointed else initial_encoder(init, encoder_args)
    # Python numbers from here on: Keras's seeding and the stream's start take Python integers only
    steps, steps_per_epoch, batch_size, seed = (settings[k] for k in ("steps", "steps_per_epoch", "batch_size", "seed"))
    if seed is not None:
        tf.keras.utils.set_random_seed(seed)
    with strategy.scope():
        encoder = CIFLEncoder(**encoder_args, name="cifl_encoder", dtype=precision)
        model = SiameseCIFL(encoder, tau_alpha, tau_beta, tau_gamma, loss_scales, pixel_contrast, name="siamese_cifl")
        outputs = model((tf.zeros((1, *shape, 1)),) * 2 + (tf.zeros((1, len(shape)), tf.int32),))  # builds the weights
        if start_from is not None:
            encoder.set_weights(start_from.get_weights())
        # Before the run folder is written: a tf.distribute.Strategy given without loss scaling (none of
        # STRATEGIES) refuses mixed_float16 here.
        compile_for_fit(model, outputs, optimizer=adam(schedule, precision))
    if out_dir is not None:
        _prepare_run_on_every_worker(strategy, chief, out_dir, lambda: checkpoint.prepare_run(
            out_dir, settings, resume, "result.json", "backup", SETTINGS, SETTING_DEFAULTS,
            outputs=("encoder.weights.h5", "encoder.json", "log.csv")))

    # StopOnNonFinite first: it must see NaN weights before a save
    callbacks, initial_epoch = [StopOnNonFinite(), *callbacks], 0
    if out_dir is not None:
        backup = checkpoint.EpochCheckpoint(os.path.join(out_dir, "backup"), model)
        if resume:
            initial_epoch = backup.restore()
        if chief:
            weights = os.path.join(out_dir, "encoder.weights.h5")
            if initial_epoch == 0 and os.path.exists(weights):  # no epoch of this run made them
                os.remove(weights)
            save_encoder_config(encoder, weights)  # the weights come at each epoch's end: none untrained
            # Made here, outside the strategy: a model made during fit on the chief alone would start
            # collective ops (its counters' initial values) that the other workers never join.
            saver = encoder_model(encoder)
            callbacks += [
                tf.keras.callbacks.LambdaCallback(
                    on_epoch_end=lambda epoch, logs: write_atomically(weights, saver.save_weights)),
                checkpoint.epoch_log(os.path.join(out_dir, "log.csv"), initial_epoch, resume),
                tf.keras.callbacks.TensorBoard(os.path.join(out_dir, "tensorboard")),
            ]
        callbacks.append(backup)  # last: an epoch counts as done once it is logged and saved

    # The stream starts at the first batch of the first epoch to train.
    first_batch = initial_epoch * steps_per_epoch
    big = tuple(s + max_offset for s in shape)
    pairs = contrast_pairs(big, batch_size, seed=seed, start=first_batch, **(synth_kwargs or {}))
    views = offset_views(pairs, shape, max_offset, seed=seed, start=first_batch).prefetch(tf.data.AUTOTUNE)
    # Under a multi-worker strategy every worker makes each global batch and keeps its share of it.
    options = tf.data.Options()  # contrast_pairs' stream_options are kept
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA

    start = time.time()
    model.fit(views.with_options(options), epochs=steps // steps_per_epoch, initial_epoch=initial_epoch,
              steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=verbose)
    if out_dir is not None and chief:
        with open(os.path.join(out_dir, "log.csv")) as f:
            final_loss = float(list(csv.DictReader(f))[-1]["loss"])  # also when resumed after the last epoch
        write_json(os.path.join(out_dir, "result.json"),
                   {"final_loss": final_loss, "seconds": round(time.time() - start, 1)})
        if verbose:  # by the chief only: the other workers wrote nothing
            print(f"encoder written to {weights}")
    return encoder
