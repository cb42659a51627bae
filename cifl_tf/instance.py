"""Registration of one image pair without training a network: instance optimisation.

As ``vxm.networks.InstanceDense`` does, the trainable weights of a small Keras model are a stationary
velocity field, integrated by ``VecInt`` (scaling and squaring: diffeomorphic) and applied by
``SpatialTransformer`` (voxelmorph's layers, batched: ``cifl_tf.transform``); ``model.fit`` minimises

    similarity(features of fixed, moved features of moving) + reg_weight * vxm.losses.Grad('l2')(velocity)

coarse to fine: at each level the features are average-pooled by the level's factor and the velocity
field of the previous level is upsampled to start from; a level's step is compiled with XLA where its
steps and voxels repay the compile time (``uses_xla``). With ``affine=True`` an affine transform
(``AffineMatrix``) is fitted first on the coarsest grid, and the deformation is composed with it.

Features are those of a CIFL encoder, of a descriptor layer such as MIND, or the intensities. With
``moved_features="warped"`` they are computed once per image, tile by tile (``cifl_tf.tiling``), pooled for
each level, and the moved features are the moving features warped. ``"encoded"`` instead warps the moving
image and encodes it again in every step, at each level's resolution: the features of the moved image itself,
not warped and pooled ones. The default is "encoded" for 2D images and "warped" for 3D ones
(``MOVED_FEATURES_DEFAULT``): on real 2D slices "encoded" registered 0.01-0.09 Dice better with the recommended
encoder and 0.04-0.12 with MIND, in up to 2.5 times the time (``bench/moved_features.py``), but on the 3D demo it
did worse, and in 3D an encoder pass per step (about 1 TFLOP forward and backward on a 80x96x112 grid) is far
beyond the 2-minute budget and cannot be tiled.
``feature_scale`` encodes images upsampled and pools their features back, for images coarser than the encoder
suits.
"""
import contextlib
import functools
import math
import numbers

import numpy as np
import tensorflow as tf

import voxelmorph as vxm

from . import data, models, tiling, transform
from .checks import is_integer
from .encoder import pretrained
from .losses import NCC
from .synth import stream_options
from .training import compile_for_fit
from .triplanar import deserialize_layer

KL = tf.keras.layers

SIMILARITIES = ("mse", "ncc", "mi")
# Smoothness weights for images and features in [0, 1]: voxelmorph's recommendation for NCC and MSE
# (models.REG_WEIGHTS); for MI, NCC's: at 0.01 MI folded voxels on the OASIS slices, the 3D demo and the OASIS
# volume, and left the volume below unregistered (docs/registration.md, "Mutual information's smoothness").
REG_WEIGHTS = {**models.REG_WEIGHTS, "mi": models.REG_WEIGHTS["ncc"]}
MOVED_FEATURES = ("warped", "encoded")
# register_pair's moved_features by the images' ndim. Measured with levels (4, 2, 1) of 100 steps (README,
# "Registering a pair without training", and docs/registration.md): on the OASIS sample's slices (both
# directions; T1, inverted T1, GM≈WM), "encoded" gave the recommended encoder 0.01-0.09 and MIND 0.04-0.12 more
# seg4 Dice; on 2D demo pairs the recommended encoder 0.03-0.06 more on T1 and T2-like and 0.003 less on PD-like,
# MIND 0.02-0.03 more, in up to 2.5 times the time (the encoder shipped before: 0.05-0.08, also on slices not
# bias-corrected; 0.04-0.06 and 0.006 less; 3 times). On the 3D demo (tri-planar features, 3 mm) the recommended
# encoder lost 0.02-0.07 and MIND up to 0.015, in 1.8-3 times the time.
MOVED_FEATURES_DEFAULT = {2: "encoded", 3: "warped"}
MI_BINS = 16
# XLA (jit_compile) halves a step of a large level (0.41 -> 0.20 s at 40x48x56 with 48 channels on 2 cores)
# but compiling takes about 4 s more than tracing, which only that many steps of that many voxels repay.
# Measured with 48 channels; with fewer a step costs less, yet the 3D demo's intensity levels also gained.
XLA_MIN_VOXEL_STEPS = 2 ** 21
# The finest default level has at most this many voxels: at 64^3 with 48 channels a step took 0.47 s on 2 cores
# (XLA), at 80x96x112 (a 1 mm head pooled by 2) 1.7 s and 5.7 GB; full resolution has 8 times its voxels.
# It keeps 2D images up to 512x512 and the 3D demo's 3 mm volumes at full resolution.
MAX_FINE_VOXELS = 2 ** 18


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class VelocityField(KL.Layer):
    """A trainable stationary velocity field, the same for every batch item.

    Args:
        shape: (*grid, ndim): the field's grid and its vectors, in voxels of that grid ('ij' indexing).

    Call: any tensor (B, ...) -> (B, *grid, ndim), the field (the input gives only the batch size).
    """

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(s) for s in shape)
        self.velocity = self.add_weight(name="velocity", shape=self.shape, initializer="zeros")

    def call(self, inputs):
        return tf.broadcast_to(self.velocity, (tf.shape(inputs)[0], *self.shape))

    def get_config(self):
        return {**super().get_config(), "shape": list(self.shape)}


def instance_model(grid, channels, int_steps=5, encoder=None, initial=False):
    """The model one level of register_pair fits (voxelmorph's InstanceDense without its downsampling).

    Args:
        grid: the level's spatial shape.
        channels: F, channels of the image or features that are warped.
        int_steps: scaling-and-squaring steps of VecInt (voxelmorph's, batched: transform.VecInt).
        encoder: None, or a layer applied to the moved image (moved_features="encoded").
        initial: also take a fixed affine transform (register_pair's affine stage) that follows the fitted
            deformation: the moving image is warped once, by both (ComposeAffine).

    Call: moving (B, *grid, F) [, initial (B, ndim, ndim + 1): an affine matrix on the grid] -> [moved (B, *grid, F
    or C), velocity (B, *grid, ndim)]. The deformation is the velocity integrated by the layer "integrate" (see
    displacement()).
    """
    grid = tuple(grid)
    inputs = [tf.keras.Input((*grid, channels), name="moving")]
    velocity = VelocityField((*grid, len(grid)), name="velocity", dtype=transform.EXACT)(inputs[0])
    displacement = transform.VecInt(method="ss", int_steps=int_steps, name="integrate")(velocity)
    if initial:
        inputs.append(tf.keras.Input((len(grid), len(grid) + 1), name="initial"))
        displacement = ComposeAffine(name="compose")([displacement, inputs[1]])
    moved = transform.SpatialTransformer(interp_method="linear", indexing="ij", name="warp")(
        [inputs[0], displacement])
    if encoder is not None:
        moved = Encode(encoder, name="encode")(moved)
    return tf.keras.Model(inputs if initial else inputs[0], [moved, velocity], name="cifl_instance")


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class ComposeAffine(KL.Layer):
    """The displacement of a deformation u followed by an affine transform a(y) = (A - I)(y - m) + t (m: the
    grid's centre; SpatialTransformer's matrices [A | t]): u(x) + a(x + u(x)) = A (x - m + u(x)) + t - (x - m).

    Exact, with no interpolation of a warped field (``vxm.layers.ComposeTransform`` interpolates the affine
    displacement at x + u(x), one batch item at a time).

    Call: [u (B, *grid, ndim), matrices (B, ndim, ndim + 1)] -> (B, *grid, ndim), float32 unless given a dtype
    (transform.EXACT).
    """

    def __init__(self, **kwargs):
        super().__init__(**{"dtype": transform.EXACT, **kwargs})

    def call(self, inputs):
        deformation, matrices = inputs
        grid = deformation.shape[1:-1]
        centred = tf.stack(tf.meshgrid(*[tf.range(n, dtype=tf.float32) - (n - 1) / 2 for n in grid], indexing="ij"),
                           -1)
        linear, shift = matrices[:, :, :-1], matrices[:, tf.newaxis, :, -1]
        moved = tf.einsum("b...j,bij->b...i", centred + deformation, linear)
        return moved + tf.reshape(shift, [-1, *[1] * len(grid), len(grid)]) - centred


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class Encode(KL.Layer):
    """`encoder` applied inside this layer's call, so that the level models built on one shared encoder
    (moved_features="encoded") add no functional node to it: each node would keep its model's layers and velocity
    field alive after the model is dropped (32 fields after 16 registrations of other shapes).

    Call: (B, *grid, 1) -> the encoder's (B, *grid, C).
    """

    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = deserialize_layer(encoder) if isinstance(encoder, dict) else encoder

    def call(self, images):
        return self.encoder(images)

    def get_config(self):
        return {**super().get_config(), "encoder": tf.keras.utils.serialize_keras_object(self.encoder)}


def displacement(model):
    """(*grid, ndim) float32: an instance_model's velocity field integrated, in voxels of its grid."""
    velocity = model.get_layer("velocity").velocity[tf.newaxis]
    return model.get_layer("integrate")(velocity)[0].numpy()


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class AffineMatrix(KL.Layer):
    """A trainable affine transform of a grid, for vxm.layers.SpatialTransformer (centred coordinates).

    The weights (ndim, ndim + 1) are the displacements in voxels that the transform adds at the grid's
    border along each axis (the linear part, each column divided by the grid's half extent along its
    axis) and everywhere (the translation), so that an optimiser step moves voxels by similar amounts on
    any grid. Zeros: the identity.

    Args:
        grid: the spatial shape the transform applies to.

    Call: any tensor (B, ...) -> (B, ndim, ndim + 1) matrices, the same for every batch item.
    """

    def __init__(self, grid, **kwargs):
        super().__init__(**kwargs)
        self.grid = tuple(int(n) for n in grid)
        ndim = len(self.grid)
        self.shifts = self.add_weight(name="shifts", shape=(ndim, ndim + 1), initializer="zeros")
        self._scale = np.array([max((n - 1) / 2, 1) for n in self.grid] + [1], np.float32)

    def call(self, inputs):
        ndim = len(self.grid)
        matrix = np.eye(ndim, ndim + 1, dtype=np.float32) + self.shifts / self._scale
        return tf.broadcast_to(matrix, (tf.shape(inputs)[0], ndim, ndim + 1))

    def get_config(self):
        return {**super().get_config(), "grid": list(self.grid)}


def affine_model(grid, channels, encoder=None):
    """The model of register_pair's affine stage: moving (B, *grid, F) -> moved (B, *grid, F or C)."""
    moving = tf.keras.Input((*tuple(grid), channels), name="moving")
    matrix = AffineMatrix(grid, name="affine", dtype=transform.EXACT)(moving)
    moved = transform.SpatialTransformer(interp_method="linear", indexing="ij", name="warp")(
        [moving, matrix])
    if encoder is not None:
        moved = Encode(encoder, name="encode")(moved)
    return tf.keras.Model(moving, moved, name="cifl_affine")


def affine_displacement(matrix, factor, shape):
    """The full-resolution displacement (*shape, ndim) of an affine matrix fitted on the grid pooled by `factor`."""
    return vxm.utils.affine_to_dense_shift(level_matrix(matrix, factor, shape), shape, shift_center=True).numpy()


def level_matrix(matrix, factor, shape, to_factor=1):
    """An affine matrix fitted on the grid pooled by `factor`: the matrix of the same transform on the grid pooled
    by `to_factor` (1: full resolution), (ndim, ndim + 1) float32.

    SpatialTransformer maps a grid point x to A (x - m) + t + m (m: the grid's centre). A point x_f of the
    grid pooled by f is the full-resolution point f x_f + c_f, and that grid's centre is the full-resolution
    point m + o_f; so, about the full grid's centre m, the transform is A u + f t + (I - A) o_f, and on the
    grid pooled by g it is A (x_g - m_g) + (f t + (I - A)(o_f - o_g)) / g + m_g.
    """
    matrix = np.asarray(matrix, np.float32)
    linear = matrix[:, :-1]

    def offset(f):  # o_f
        return np.array([(_centres(n, f)[0] + _centres(n, f)[-1] - (n - 1)) / 2 for n in shape], np.float32)

    translation = (factor * matrix[:, -1] + (np.eye(len(shape)) - linear) @ (offset(factor) - offset(to_factor)))
    return np.concatenate([linear, translation[:, np.newaxis] / to_factor], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _compiled(kind, grid, channels, encoder, similarity, learning_rate, jit_compile, reg_weight=None,
              int_steps=None, initial=False):
    """The compiled affine_model or instance_model of a level, kept for the next registration with the same
    grid and settings: tracing its train step takes seconds (7 s for a 3D level on 2 cores, about 4 s more with
    XLA), reusing it none.
    Each keeps its field and Adam's two copies of it (250 MB at 160x192x224); ``_compiled.cache_clear()``
    frees them."""
    loss, optimizer = _similarity_loss(similarity), tf.keras.optimizers.Adam(learning_rate)
    if kind == "affine":
        model = affine_model(grid, channels, encoder)
        compile_for_fit(model, optimizer=optimizer, loss=loss, jit_compile=jit_compile)
    else:
        model = instance_model(grid, channels, int_steps, encoder, initial)
        compile_for_fit(model, optimizer=optimizer, loss=[loss, vxm.losses.Grad("l2").loss],
                        loss_weights=[1, reg_weight], jit_compile=jit_compile)
    return model


def _fresh(model, weights=None):
    """A _compiled model as if just built: Adam's state zero, its trainable weights zero (the identity
    transform) or `weights`; a moved_features="encoded" encoder is frozen, so it is left alone."""
    for variable in model.optimizer.variables:
        variable.assign(tf.zeros_like(variable))
    weights = [tf.zeros_like(w) for w in model.trainable_weights] if weights is None else weights
    for variable, value in zip(model.trainable_weights, weights, strict=True):
        variable.assign(value)
    return model


def _fit(model, inputs, targets, steps, verbose, similarity):
    """model.fit for `steps` optimisation steps on one (inputs, targets) pair of arrays without batch axes, in one
    call; ValueError if the transform diverged (a learning rate far too large), rather than a NaN field."""
    if verbose:
        print(f"{model.name}: grid {'x'.join(map(str, inputs[0].shape[:-1]))}")
    pair = tuple(tuple(array[np.newaxis] for array in arrays) for arrays in (inputs, targets))
    pairs = tf.data.Dataset.from_tensors(pair).repeat().with_options(stream_options())
    # With MI, neurite's checks fail inside TensorFlow at the step after a diverging one: each step is checked.
    # Otherwise the fit's end is: a callback at every step costs up to 8% on small images (it waits for each step).
    model.fit(pairs, steps_per_epoch=steps, epochs=1, verbose=verbose,
              callbacks=[_StopOnDivergence()] if similarity == "mi" else [])
    _check_finite(model, steps)


class _StopOnDivergence(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        _check_finite(self.model, batch + 1)


def _check_finite(model, steps):
    if not all(tf.reduce_all(tf.math.is_finite(w)) for w in model.trainable_weights):
        raise ValueError(f"register_pair: the fit diverged within {steps} steps of the level on "
                         f"{'x'.join(map(str, model.inputs[0].shape[1:-1]))} voxels (its transform is NaN or "
                         f"infinite): lower learning_rate")


def _check_in_view(field, steps):
    """ValueError when a displacement (*spatial, ndim) is not finite or sends every voxel out of the image: a fit
    that diverged, which the weights alone do not show when the affine stage's grow without bound."""
    inside = np.isfinite(field).all(axis=-1)
    for axis, size in enumerate(field.shape[:-1]):
        position = np.arange(size).reshape([-1 if i == axis else 1 for i in range(field.ndim - 1)]) + field[..., axis]
        inside &= (position > -1) & (position < size)
    if not inside.any():
        raise ValueError(f"register_pair: the fit diverged within {steps} steps of a level (its transform is NaN or "
                         f"infinite, or moves the whole image out of view): lower learning_rate")


def _similarity_loss(similarity):
    if similarity == "ncc":
        return NCC().loss
    if similarity == "mi":  # neurite's default bins, with the soft-bin width it would print if not given
        return vxm.losses.MutualInformation(nb_bins=MI_BINS, soft_bin_alpha=2 * (MI_BINS - 1) ** 2).loss
    return vxm.losses.MSE().loss


def pool(image, factor):
    """(*shape, F) -> (*ceil(shape / factor), F): means over factor^ndim blocks, as ``tf.nn.avg_pool`` with
    'SAME' padding (blocks centred on the image, each the mean of its voxels inside the image).

    Summed one axis at a time in NumPy, which needs memory for little more than the result: tf.nn.avg_pool
    first copies the image into a tensor (1.3 GB for 48 channels at 160x192x224). The whole blocks are
    summed as a reshaped view: 0.32 s for factor 8 on 48 channels at 160x192x224, where np.add.reduceat took 2.7 s.
    """
    _check_factor("pool", factor)
    return _pool_axes(np.asarray(image, np.float32), factor, range(np.ndim(image) - 1))


def _check_factor(caller, factor):
    if not is_integer(factor, 1):
        raise ValueError(f"{caller}: factor must be a positive integer, got {factor!r}")


def _pool_axes(image, factor, axes):
    """`pool` along the given spatial axes only."""
    if factor == 1:
        return image
    voxels = np.ones((1,) * image.ndim, np.float32)  # of each block, inside the image
    for axis in axes:
        image, counts, _ = _block_sums(image, axis, factor, image.shape[axis])
        voxels = voxels * _along_axis(counts, axis, image.ndim)
    image /= voxels  # once, on the sums (a new array): dividing after each axis took 0.08-0.14 s more (factor 4)
    return image


def _block_sums(image, axis, factor, size, first=0):
    """Sums of the image's rows along `axis` over the blocks of `pool` (factor rows, centred on an axis of
    `size` rows), where the image holds rows [first, first + image.shape[axis]) of that axis.

    Returns: (sums, counts, block): one sum per block that the rows reach (float32, the axis shortened to
    their number), the number of rows in each, and the index of the first of these blocks.
    """
    if factor == 1:
        return image, np.ones(image.shape[axis], np.float32), first
    length = image.shape[axis]
    # Blocks start at factor * k - p, p = (ceil(size / factor) * factor - size) // 2: a partial block
    # [0, start) if row `first` is not a block's first, then whole blocks up to stop, then what is left.
    p = (-(-size // factor) * factor - size) // 2
    start = min(-(first + p) % factor, length)
    whole = (length - start) // factor
    stop = start + whole * factor
    blocks = _along(image, axis, start, stop).reshape(*image.shape[:axis], whole, factor, *image.shape[axis + 1:])
    parts, counts = [blocks.sum(axis + 1)], [factor] * whole
    if start:
        parts.insert(0, _along(image, axis, 0, start).sum(axis, keepdims=True))
        counts.insert(0, start)
    if stop < length:
        parts.append(_along(image, axis, stop, length).sum(axis, keepdims=True))
        counts.append(length - stop)
    sums = parts[0] if len(parts) == 1 else np.concatenate(parts, axis)
    return sums, np.asarray(counts, np.float32), (first + p) // factor


def _along(image, axis, start, stop):
    """The view image[start:stop] along `axis`."""
    return image[(slice(None),) * axis + (slice(start, stop),)]


def _along_axis(values, axis, ndim):
    """1D values shaped to broadcast along `axis` of an ndim-dimensional array."""
    return np.reshape(values, [-1 if a == axis else 1 for a in range(ndim)])


def _pyramid(describe, image, levels, halo, row_bytes, max_memory):
    """{factor: describe(image) average-pooled by factor (`pool`)} for each level, holding at most about
    max_memory bytes of full-resolution features at a time.

    Where the whole image's features would take more, the image is described in slabs along its first
    axis, each extended by `halo` rows on both sides (the describer's reach, so that a slab's features
    equal the whole image's there; not MIND's, whose variance clip takes each slab's own mean), and each slab's
    features are pooled and summed into the levels' blocks.
    Slabs have about 4 halos of rows or more, so that the halos add at most about half the work.

    Args:
        describe: (*slab) image -> (*slab, C) features.
        image: (*spatial).
        levels: pooling factors.
        halo: rows.
        row_bytes: bytes of the features of one row (image.shape[1:]) of the image.
        max_memory: bytes.
    """
    size = image.shape[0]
    if row_bytes * size <= max_memory:  # one slab; level 1 keeps the features themselves
        features = describe(image)
        return {factor: features if factor == 1 else pool(features, factor) for factor in levels}
    rows = max(max_memory // row_bytes, 4 * halo, 1)
    rows = -(-size // -(-size // rows))  # equal slabs, no sliver at the end
    sums, counts = {}, {}
    for first in range(0, size, rows):
        last = min(first + rows, size)
        below, above = max(first - halo, 0), min(last + halo, size)
        # One slab's features at a time: the call's argument is freed before the next slab is described.
        _add_slab(sums, counts, describe(image[below:above])[first - below:last - below], first, size, levels)
    for factor in levels:
        sums[factor] /= _along_axis(counts[factor], 0, image.ndim + 1)  # in place: level 1 is full-size
    return sums


def _add_slab(sums, counts, features, first, size, levels):
    """Adds the block sums of a slab's features (rows [first, first + len(features)) of `size`) to each level's."""
    for factor in levels:
        part, count, block = _block_sums(_pool_axes(features, factor, range(1, features.ndim - 1)), 0, factor, size,
                                         first)
        if factor not in sums:
            sums[factor] = np.zeros((-(-size // factor), *part.shape[1:]), np.float32)
            counts[factor] = np.zeros(len(sums[factor]), np.float32)
        sums[factor][block:block + len(part)] += part
        counts[factor][block:block + len(part)] += count


def _centres(size, factor):
    """Full-resolution coordinates of the voxel centres of a grid pooled by `factor` ('SAME' padding)."""
    count = -(-size // factor)
    return factor * np.arange(count) + (factor - 1) / 2 - (count * factor - size) // 2


def resample(values, factor, to_factor, shape):
    """Values on the grid pooled by `factor` linearly interpolated onto the grid pooled by `to_factor`.

    Args:
        values: (*grid, C).
        factor, to_factor: pooling factors of both grids, relative to the full-resolution `shape`.
        shape: the full-resolution spatial shape.

    Returns: (*to_grid, C) float32 (border clamped); the values themselves when both grids are one.
    """
    values = np.asarray(values, np.float32)
    if factor == to_factor:
        return values
    # Linear interpolation on a rectilinear grid is separable: one axis at a time, it needs little more
    # memory than its result (neurite's interpn at every point took 2.2 GB more to upsample a field to 224^3).
    for axis, size in enumerate(shape):
        points = np.clip((_centres(size, to_factor) - _centres(size, factor)[0]) / factor, 0, values.shape[axis] - 1)
        below = np.floor(points).astype(np.int64)
        above = np.minimum(below + 1, values.shape[axis] - 1)
        weight = (points - below).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(values.ndim)])
        values = np.take(values, below, axis) * (1 - weight) + np.take(values, above, axis) * weight
    return values


def resample_field(field, factor, to_factor, shape):
    """A vector field on the grid pooled by `factor` resampled onto the grid pooled by `to_factor` (`resample`).

    Args:
        field: (*grid, ndim) vectors in voxels of its grid.
        factor, to_factor, shape: as `resample` takes them.

    Returns: (*to_grid, ndim) float32 in voxels of the new grid.
    """
    return resample(field, factor, to_factor, shape) * np.float32(factor / to_factor)


def upsample(image, factor):
    """(*shape) image -> (*(shape * factor)), linearly interpolated between pixel centres (border clamped):
    each pixel becomes a block of factor^ndim pixels, which `pool` averages back."""
    _check_factor("upsample", factor)
    shape = tuple(size * factor for size in np.shape(image))
    return resample(np.asarray(image)[..., np.newaxis], factor, 1, shape)[..., 0]


def register_pair(moving, fixed, encoder="pretrained", similarity=None, reg_weight=None, levels=None,
                  steps=100, learning_rate=0.1, int_steps=5, affine=False, moved_features=None,
                  feature_scale=1, max_memory=tiling.DEFAULT_MAX_MEMORY, jit_compile=None, equalize=False, verbose=1):
    """The displacement that registers `moving` to `fixed`, by instance optimisation (no training).

    Args:
        moving, fixed: (*spatial) arrays of one shape, 2D or 3D, finite, intensities in [0, 1].
        encoder: "pretrained" (``pretrained(ndim=moving.ndim)``: the recommended shipped encoder of
            the images' ndim), a Keras layer (B, *spatial, 1) -> (B, *spatial, C) with
            ``ndim`` and ``channels`` attributes (a CIFLEncoder, a MIND descriptor), or None for the
            intensities.
        similarity: "ncc" (the default: local 9^ndim windows, each over all channels, as vxm.losses.NCC),
            "mse" or "mi" (mutual information, intensities only).
        reg_weight: weight of the smoothness term; default REG_WEIGHTS[similarity].
        levels: pooling factors, coarse to fine, e.g. (4, 2, 1); the displacement of the last is
            upsampled to full resolution. None: `default_levels` of the images' shape ((4, 2, 1) up to
            MAX_FINE_VOXELS voxels).
        steps: optimisation steps per level (one ``fit`` call each).
        learning_rate: of Adam, in voxels of the level's grid per step.
        int_steps: scaling-and-squaring steps of the velocity integration.
        affine: first fit an affine transform (`steps` steps on the coarsest level's grid); each deformable
            level then fits the deformation that follows it, and warps the moving features (or image, with
            "encoded") once by both.
        moved_features: "warped" (warp the moving features), "encoded" (encode the moved image in every
            step) or None: MOVED_FEATURES_DEFAULT of the images' ndim ("encoded" in 2D), "warped" with
            feature_scale > 1.
        feature_scale: encode each image upsampled by this integer factor (`upsample`) and average the
            features back onto its grid (`pool`); 1 encodes it as it is. Larger factors are for images
            coarser than the encoder's training crops suit (the shipped encoders learned on 96x96-pixel
            crops of synthetic shapes); docs/registration.md compares factors on 2 mm and 3 mm brains. Costs
            feature_scale^ndim times the encoder's time and its features' memory (within max_memory). With an
            encoder and moved_features="warped" only.
        max_memory: bytes per tile of encoder inference (tiling.tiled_features), and of each image's
            full-resolution features held at a time while they are pooled for the levels (in slabs along the
            first axis where they take more); moved_features="warped" only: "encoded" encodes whole images.
        jit_compile: compile the optimisation step of each level with XLA (True), not (False), or where
            steps times the level's voxels reach XLA_MIN_VOXEL_STEPS (None): there it took half the time.
        equalize: describe both images histogram-equalised (``data.equalize``), whose intensities are their
            ranks: tissues of nearly equal intensity (grey and white matter in PD) are then as far apart as
            in T1.
        verbose: 1 prints the levels and shows a progress bar per level (and the affine stage), 0 nothing.

    Returns: (*spatial, ndim) float32 displacement in voxels: moved(x) = moving(x + displacement(x)),
    as ``cifl_tf.models.warp`` applies it.

    Raises: ValueError or TypeError naming a bad argument, and ValueError when a level's fit diverged (a
    learning_rate far too large) instead of returning a NaN field.
    """
    moving, fixed = _check_images(moving, fixed)
    if not isinstance(equalize, (bool, np.bool_)):
        raise TypeError(f"register_pair: equalize must be True or False, got {equalize!r}")
    if equalize:
        moving, fixed = data.equalize(moving), data.equalize(fixed)
    encoder = _check_encoder(encoder, moving.ndim)
    similarity = _check_similarity(similarity, encoder)
    reg_weight = REG_WEIGHTS[similarity] if reg_weight is None else reg_weight
    if isinstance(reg_weight, bool) or not isinstance(reg_weight, numbers.Real) or not 0 <= reg_weight < math.inf:
        raise ValueError(f"register_pair: reg_weight must be a non-negative number, got {reg_weight!r}")
    levels = default_levels(moving.shape) if levels is None else _check_levels(levels, moving.shape)
    for name, value in (("steps", steps), ("int_steps", int_steps)):
        if not is_integer(value, 1):
            raise ValueError(f"register_pair: {name} must be a positive integer, got {value!r}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real) \
            or not 0 < learning_rate < math.inf:
        raise ValueError(f"register_pair: learning_rate must be a positive number, got {learning_rate!r}")
    if not isinstance(affine, (bool, np.bool_)):
        raise TypeError(f"register_pair: affine must be True or False, got {affine!r}")
    tiling.check_max_memory(max_memory)
    if not isinstance(verbose, (int, np.integer)) or verbose not in (0, 1):
        raise ValueError(f"register_pair: verbose must be 1 or 0, got {verbose!r}")
    if jit_compile is not None and not isinstance(jit_compile, (bool, np.bool_)):
        raise TypeError(f"register_pair: jit_compile must be True, False or None, got {jit_compile!r}")
    jit_compile = None if jit_compile is None else bool(jit_compile)
    if not is_integer(feature_scale, 1):
        raise ValueError(f"register_pair: feature_scale must be a positive integer, got {feature_scale!r}")
    if moved_features is not None and encoder is None:
        raise ValueError(f"register_pair: moved_features {moved_features!r} chooses how an encoder's features of the "
                         f"moved image are made; intensities have none")
    if moved_features is None:
        moved_features = MOVED_FEATURES_DEFAULT[moving.ndim] if feature_scale == 1 else "warped"
    if moved_features not in MOVED_FEATURES:
        raise ValueError(f"register_pair: moved_features must be one of {MOVED_FEATURES}, got {moved_features!r}")
    if feature_scale != 1 and encoder is None:
        raise ValueError(f"register_pair: feature_scale {feature_scale} scales an encoder's features; "
                         f"intensities have none")
    if feature_scale != 1 and moved_features == "encoded":
        raise ValueError(f"register_pair: feature_scale {feature_scale} scales the features computed once per "
                         f"image; it needs moved_features='warped'")
    if verbose:
        print(f"register_pair: levels {levels} (pooling factors), {steps} steps each", flush=True)

    encoded = encoder is not None and moved_features == "encoded"

    def describe(image):
        if encoder is None or encoded:
            return image[..., np.newaxis]
        if feature_scale == 1:
            return tiling.tiled_features(encoder, image, max_memory)
        return pool(tiling.tiled_features(encoder, upsample(image, feature_scale), max_memory), feature_scale)

    if encoder is None or encoded:
        halo, channels = 0, 1
    else:  # a feature reaches ceil(radius / scale) pixels, and one more through the linear upsampling
        radius = tiling.receptive_radius(encoder)
        halo, channels = (radius if feature_scale == 1 else -(-radius // feature_scale) + 1), encoder.channels
    row_bytes = 4 * channels * int(np.prod(moving.shape[1:])) * feature_scale ** moving.ndim

    def pyramid(image):
        # Pooled for every level as they are made, slab by slab where they take more than max_memory: without
        # level 1, no image's full-resolution features are held (1.3 GB for 48 channels at 160x192x224).
        return _pyramid(describe, image, levels, halo, row_bytes, max_memory)

    with _frozen(encoder):  # its weights stay as they are while the field is fitted
        sources, targets = pyramid(moving), pyramid(fixed)
        shape, ndim = moving.shape, moving.ndim
        after = encoder if encoded else None
        settings = dict(encoder=after, similarity=similarity, learning_rate=learning_rate)
        initials = {}
        if affine:
            source, target = sources[levels[0]], targets[levels[0]]
            grid = source.shape[:-1]
            model = _fresh(_compiled("affine", grid, source.shape[-1], jit_compile=uses_xla(grid, steps, jit_compile),
                                     **settings))
            _fit(model, [source], [encoder(target[np.newaxis])[0].numpy() if encoded else target], steps, verbose,
                 similarity)
            matrix = model.get_layer("affine")(source[np.newaxis])[0]
            # Composed with the deformation in each level's model, so that the moving features, described once, are
            # interpolated once: warping them by the affine transform first blurred them twice (docs/registration.md).
            initials = {factor: level_matrix(matrix, levels[0], shape, factor) for factor in levels}
        velocity, previous = None, None
        for factor in levels:
            source, target = sources[factor], targets[factor]
            if encoded:
                target = encoder(target[np.newaxis]).numpy()[0]
            grid = source.shape[:-1]
            model = _compiled("deformable", grid, source.shape[-1], jit_compile=uses_xla(grid, steps, jit_compile),
                              reg_weight=reg_weight, int_steps=int_steps, initial=affine, **settings)
            model = _fresh(model, None if velocity is None else [resample_field(velocity, previous, factor, shape)])
            _fit(model, [source, initials[factor]] if affine else [source],
                 [target, np.zeros((*source.shape[:-1], ndim), np.float32)], steps, verbose, similarity)
            velocity, previous = model.get_layer("velocity").get_weights()[0], factor
        field = displacement(model)
        field = resample_field(field, previous, 1, shape)
        if affine:  # moving(x + field(x) + a(x + field(x))): the image moved by the affine transform a, then deformed
            matrix = level_matrix(matrix, levels[0], shape)[np.newaxis]
            field = ComposeAffine()([field[np.newaxis], matrix])[0].numpy()
        _check_in_view(field, steps)
        return field


def default_levels(shape):
    """register_pair's default levels for images of `shape`: (4 f, 2 f, f), where f is the smallest power of
    two whose pooled grid has at most MAX_FINE_VOXELS voxels ((4, 2, 1) for 2D slices; (16, 8, 4) at
    160x192x224), without levels that would pool an axis to a single voxel."""
    finest = 1
    # Every axis of every level keeps 2 voxels (thick-slice volumes), which Grad needs, over the voxel bound.
    while math.prod(_grid(shape, finest)) > MAX_FINE_VOXELS and min(_grid(shape, 2 * finest)) >= 2:
        finest *= 2
    return tuple(f for f in (4 * finest, 2 * finest) if min(_grid(shape, f)) >= 2) + (finest,)


def _grid(shape, factor):
    """The spatial shape of a grid pooled by `factor` ('SAME' padding)."""
    return tuple(-(-size // factor) for size in shape)


def uses_xla(grid, steps, jit_compile=None):
    """Whether register_pair compiles the step of a level on `grid` with XLA: `jit_compile` if it is
    True or False; for None, where `steps` steps of the grid's voxels reach XLA_MIN_VOXEL_STEPS."""
    return bool(math.prod(grid) * steps >= XLA_MIN_VOXEL_STEPS) if jit_compile is None else jit_compile


def _check_images(moving, fixed):
    arrays = []
    for name, image in (("moving", moving), ("fixed", fixed)):
        if isinstance(image, np.ma.MaskedArray):
            raise TypeError(f"register_pair: {name} is a masked array, whose mask registration would ignore; pass "
                            f"{name}.filled(0)")
        image = np.asarray(image)
        if image.dtype.kind not in "biuf":  # complex would register its real part, strings fail inside NumPy
            raise TypeError(f"register_pair: {name} must hold real numbers, got dtype {image.dtype}")
        if image.ndim not in (2, 3):
            raise ValueError(f"register_pair: {name} must be a 2D or 3D array (*spatial), got shape {image.shape}")
        if image.size == 0:
            raise ValueError(f"register_pair: {name} is empty, shape {image.shape}")
        if 1 in image.shape:
            raise ValueError(f"register_pair: {name} has an axis of one voxel, shape {image.shape}: a slice stored "
                             f"as 3D registers as 2D with that axis dropped (np.squeeze)")
        if not np.isfinite(image).all():
            raise ValueError(f"register_pair: {name} holds {np.count_nonzero(~np.isfinite(image))} NaN/Inf values")
        if image.min() < 0 or image.max() > 1:
            raise ValueError(f"register_pair: {name} intensities must lie in [0, 1] (data.normalize), got "
                             f"[{image.min():g}, {image.max():g}]")
        arrays.append(image.astype(np.float32))
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"register_pair: moving {arrays[0].shape} and fixed {arrays[1].shape} differ in shape")
    return arrays


def _check_encoder(encoder, ndim):
    if isinstance(encoder, str) and encoder == "pretrained":
        return _shipped(ndim)
    if encoder is None:
        return None
    if isinstance(encoder, str):
        raise ValueError(f"register_pair: encoder must be 'pretrained', None (the intensities) or a Keras layer such "
                         f"as a CIFLEncoder or MIND, got {encoder!r}")
    tiling.check_layer(encoder)
    if encoder.ndim != ndim:
        raise ValueError(f"register_pair: encoder {encoder.name} is {encoder.ndim}D but the images are {ndim}D")
    return encoder


@contextlib.contextmanager
def _frozen(layer):
    """`layer` (or None) not trainable within the block, so that fitting the field leaves its weights as they
    are; afterwards trainable as before (it may be the caller's own layer)."""
    if layer is None:
        yield
        return
    # Each flag of its own: Keras's setter writes the outer one into every layer inside (a frozen encoder inside
    # a Triplanar or FeatureStack would come back trainable)
    # (parents come before their layers, so restoring in this order leaves each flag as it was)
    flags = [(inner, inner.trainable) for inner in [layer, *layer.submodules]
             if isinstance(inner, tf.keras.layers.Layer)]
    layer.trainable = False
    try:
        yield
    finally:
        for inner, trainable in flags:
            inner.trainable = trainable


@functools.lru_cache(maxsize=None)
def _shipped(ndim):
    """pretrained(ndim=ndim), frozen, loaded once: the same layer each time keeps its traced graphs in use."""
    encoder = pretrained(ndim=ndim)
    encoder.trainable = False
    return encoder


def _check_similarity(similarity, encoder):
    if similarity is None:
        return "ncc"
    if similarity not in SIMILARITIES:
        raise ValueError(f"register_pair: similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if similarity == "mi" and encoder is not None:
        raise ValueError("register_pair: similarity 'mi' compares intensities; use it with encoder=None")
    return similarity


def _check_levels(given, shape=None):
    """register_pair's `levels` as a tuple of ints; ValueError unless they are decreasing positive integers that,
    for images of `shape` if given, each leave at least 2 voxels along every axis."""
    if isinstance(given, np.ndarray) and given.ndim <= 1:
        given = given.tolist()  # a 0-d array gives its number
    levels = tuple(given) if isinstance(given, (list, tuple, range)) else (given,)
    if not levels or any(not is_integer(f, 1) for f in levels) \
            or list(levels) != sorted(set(levels), reverse=True):
        raise ValueError(f"register_pair: levels must be decreasing positive integer pooling factors such as "
                         f"(4, 2, 1), got {given!r}")
    for factor in levels if shape is not None else ():
        if min(_grid(shape, factor)) < 2:
            raise ValueError(f"register_pair: level {factor} pools the {shape} images to a "
                             f"{_grid(shape, factor)} grid; every axis needs at least 2 voxels")
    return tuple(int(f) for f in levels)
