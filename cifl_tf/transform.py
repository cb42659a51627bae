"""Dense spatial transforms on the whole batch at once: voxelmorph's layers without their ``tf.map_fn``.

voxelmorph 0.2 (``vxm.layers.SpatialTransformer``, ``VecInt``, ``RescaleTransform``) transforms one batch
element at a time in a ``tf.map_fn`` loop. Differentiating those loops is what makes tracing the train step
of a ``VxmDense`` slow (10-40 s on 2 cores). Here the same interpolation (neurite's ``interpn``: 'ij' voxel
coordinates, linear or nearest, points outside the image take the nearest border value or ``fill_value``)
gathers from all batch elements in one op. The layers take voxelmorph's arguments and give its results;
SpatialTransformer and RescaleTransform subclass voxelmorph's, VecInt cannot (its ``__init__`` calls
``super(self.__class__, self)``, which recurses in a subclass) and takes the arguments VxmDense passes:

    SpatialTransformer()([images (B, *S, C), displacement (B, *S', ndim)]) -> (B, *S', C)
    VecInt(int_steps=7)(velocity (B, *S, ndim))                             -> (B, *S, ndim)
    RescaleTransform(zoom_factor)(field (B, *S, ndim))                      -> (B, *(S * zoom), ndim)

``_compat.vxm_layers(BATCHED_LAYERS)`` makes voxelmorph's own networks (``vxm.networks.VxmDense``) build with them.
"""
import itertools
import math

import numpy as np
import tensorflow as tf

import voxelmorph as vxm

from .checks import is_integer
from .encoder import positive_number

KL = tf.keras.layers

INTERP_METHODS = ("linear", "nearest")


# These functions hold no tensor-dependent control flow: autograph converting them when Keras traces a
# layer's call only costs tracing time.
_plain_python = tf.autograph.experimental.do_not_convert


def _check_interp_method(interp_method):
    if interp_method not in INTERP_METHODS:
        raise ValueError(f"interp_method must be one of {INTERP_METHODS}, got {interp_method!r}")


def _check_indexing(layer, indexing):
    if indexing not in ("ij", "xy"):
        raise ValueError(f"{layer}: indexing must be 'ij' or 'xy', got {indexing!r}")


def interpolate(images, points, interp_method="linear", fill_value=None):
    """Samples each image at its own voxel coordinates (neurite's ``interpn``, batched).

    Args:
        images: (B, *S, C) float.
        points: (B, *P, ndim) 'ij' voxel coordinates into S (ndim = len(S)).
        interp_method: "linear" or "nearest" (ties round to even, as ``tf.round``).
        fill_value: value of points outside [0, S - 1]; None: the value at the nearest border voxel.

    Returns: (B, *P, C), the dtype of images.
    """
    _check_interp_method(interp_method)
    images, points = tf.convert_to_tensor(images), tf.convert_to_tensor(points)  # NumPy arrays too
    if not images.dtype.is_floating:
        raise TypeError(f"images must be floating point (cast label maps to float32), got {images.dtype.name}")
    shape = images.shape[1:-1]
    if points.shape[-1] != len(shape):
        raise ValueError(f"points of {points.shape[-1]} coordinates for {len(shape)}D images {images.shape}")
    if None not in (images.shape[0], points.shape[0]) and images.shape[0] != points.shape[0]:  # else broadcast
        raise ValueError(f"images {images.shape} and points {points.shape} differ in batch size")
    points = tf.cast(points, images.dtype)
    top = [size - 1 for size in shape]
    coords = [points[..., axis] for axis in range(len(shape))]
    # One gather from all images: (B * prod(S), C) rows, indexed by batch element then voxel (row-major).
    # tf.gather(..., batch_dims=1) would do the same, but its gradient takes seconds to trace.
    flat = tf.reshape(images, [-1, images.shape[-1]])
    strides = np.cumprod((1, *shape[:0:-1]))[::-1].tolist()
    first_rows = tf.range(tf.shape(images)[0]) * int(np.prod(shape))
    first_rows = tf.reshape(first_rows, [-1] + [1] * (points.shape.rank - 2))

    def subscript(coordinate):
        """int32 voxel subscripts of float ones in [0, S - 1] or NaN. A NaN (a diverged field's) casts to -2^31, which
        would stop the gather: it reads voxel 0, and its value is made NaN by the linear weights or below, so that
        the loss, not an index error, reports the divergence."""
        return tf.maximum(tf.cast(coordinate, tf.int32), 0)

    def gather(subscripts):
        """Values at int32 subscripts, one (B, *P) tensor per axis -> (B, *P, C)."""
        return tf.gather(flat, first_rows + sum(sub * stride for sub, stride in zip(subscripts, strides)))

    if interp_method == "nearest":
        sampled = gather([subscript(tf.clip_by_value(tf.round(c), 0, t)) for c, t in zip(coords, top)])
    else:
        lower = [tf.clip_by_value(tf.floor(c), 0, t) for c, t in zip(coords, top)]
        upper = [tf.clip_by_value(low + 1, 0, t) for low, t in zip(lower, top)]
        # Weights as neurite computes them (upper minus the clipped point), so results agree to rounding.
        lower_weight = [up - tf.clip_by_value(c, 0, t) for up, c, t in zip(upper, coords, top)]
        corners = ([subscript(low) for low in lower], [subscript(up) for up in upper])
        weights = (lower_weight, [1 - w for w in lower_weight])
        sampled = 0
        for corner in itertools.product((0, 1), repeat=len(shape)):
            weight = math.prod(weights[c][axis] for axis, c in enumerate(corner))
            sampled += weight[..., tf.newaxis] * gather([corners[c][axis] for axis, c in enumerate(corner)])
    if fill_value is not None:
        outside = tf.reduce_any((points < 0) | (points > tf.constant(top, points.dtype)), axis=-1, keepdims=True)
        sampled = tf.where(outside, tf.cast(fill_value, sampled.dtype), sampled)
    # Nearest interpolation has no weight to carry a NaN, and a fill value overwrites a NaN point outside along
    # another axis: such points are made NaN here.
    if interp_method == "nearest" or fill_value is not None:
        nan_point = tf.reduce_any(tf.math.is_nan(points), axis=-1, keepdims=True)
        sampled = tf.where(nan_point, tf.constant(np.nan, sampled.dtype), sampled)
    return sampled


def _swap_xy(field):
    """A field in 'xy' indexing (voxelmorph's: the first two components swapped) in 'ij', and back."""
    return tf.concat([field[..., 1::-1], field[..., 2:]], axis=-1)


def _grid(shape, dtype):
    """The voxel coordinates of a grid of `shape`: (*shape, len(shape)), 'ij'."""
    return tf.stack(tf.meshgrid(*[tf.range(size, dtype=dtype) for size in shape], indexing="ij"), axis=-1)


@_plain_python
def spatial_transform(images, displacement, interp_method="linear", fill_value=None):
    """moved(x) = images(x + displacement(x)) for every batch element (``vxm.utils.transform``, batched).

    Args:
        images: (B, *S, C).
        displacement: (B, *P, ndim) in voxels, 'ij' indexing; usually P = S.
        interp_method, fill_value: see ``interpolate``.

    Returns: (B, *P, C).
    """
    images = tf.convert_to_tensor(images)
    displacement = tf.cast(displacement, images.dtype)
    return interpolate(images, _grid(displacement.shape[1:-1], images.dtype) + displacement, interp_method,
                       fill_value)


@_plain_python
def integrate_velocity(velocity, steps=7):
    """Displacement of a stationary velocity field by scaling and squaring (``vxm.utils.integrate_vec``).

    velocity: (B, *S, ndim) in voxels -> (B, *S, ndim).
    """
    displacement = tf.convert_to_tensor(velocity) / 2 ** steps
    for _ in range(steps):
        displacement += spatial_transform(displacement, displacement)
    return displacement


@_plain_python
def rescale_field(field, factor, interp_method="linear"):
    """A displacement field resized by `factor` and scaled by it (``vxm.utils.rescale_dense_transform``).

    field: (B, *S, ndim) -> (B, *floor(S * factor), ndim), sampled on a grid whose corners are S's corners.
    """
    field = tf.convert_to_tensor(field)
    shape = field.shape[1:-1]
    if factor == 1:
        return field
    new_shape = [int(size * factor) for size in shape]
    grid = tf.stack(tf.meshgrid(*[tf.linspace(0.0, size - 1.0, new) for size, new in zip(shape, new_shape)],
                                indexing="ij"), axis=-1)
    grid = tf.broadcast_to(tf.cast(grid, field.dtype), [tf.shape(field)[0], *grid.shape])
    # In the order voxelmorph uses, which scales the smaller of the two fields.
    if factor < 1:
        return interpolate(field, grid, interp_method) * factor
    return interpolate(field * factor, grid, interp_method)


# The layers below compute in float32 unless given a dtype, whatever the global Keras policy: in bfloat16 voxel
# coordinates past 128 round to whole voxels (299 to 300, past the border of a 300-voxel axis), and float16 has no
# tf.range to build them.
EXACT = "float32"


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class SpatialTransformer(vxm.layers.SpatialTransformer):
    """``vxm.layers.SpatialTransformer`` applying dense transforms to the whole batch in one op.

    Same arguments and results: [images (B, *S, C), displacement (B, *S', ndim)] -> (B, *S', C).
    Affine matrices and ``single_transform`` are left to voxelmorph's implementation.
    """

    def __init__(self, interp_method="linear", indexing="ij", **kwargs):
        _check_interp_method(interp_method)
        _check_indexing("SpatialTransformer", indexing)  # voxelmorph asserts it, which python -O skips
        super().__init__(interp_method=interp_method, indexing=indexing, **{"dtype": EXACT, **kwargs})

    def call(self, inputs):
        if self.is_affine or self.single_transform:
            return super().call(inputs)
        images, displacement = inputs
        if self.indexing == "xy":
            displacement = _swap_xy(displacement)
        return spatial_transform(images, displacement, self.interp_method, self.fill_value)


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class VecInt(KL.Layer):
    """``vxm.layers.VecInt`` (scaling and squaring) on the whole batch: velocity (B, *S, ndim) -> displacement.

    Args:
        indexing: of the velocity, "ij" or "xy" (the first two components swapped); the displacement is
            'ij' in both cases, as voxelmorph's.
        method: "ss" (or "scaling_and_squaring"), the only method VxmDense uses.
        int_steps: squaring steps; the velocity is first divided by 2 ** int_steps.
    """

    METHODS = ("ss", "scaling_and_squaring")

    def __init__(self, indexing="ij", method="ss", int_steps=7, **kwargs):
        super().__init__(**{"dtype": EXACT, **kwargs})
        _check_indexing("VecInt", indexing)
        if method not in self.METHODS:
            raise ValueError(f"VecInt: method must be one of {self.METHODS}, got {method!r}")
        if not is_integer(int_steps, 0):
            raise ValueError(f"VecInt: int_steps must be a non-negative integer, got {int_steps!r}")
        self.indexing, self.method, self.int_steps = indexing, method, int(int_steps)

    def call(self, velocity):
        if self.indexing == "xy":
            velocity = _swap_xy(velocity)
        return integrate_velocity(velocity, self.int_steps)

    def get_config(self):
        return {**super().get_config(), "indexing": self.indexing, "method": self.method,
                "int_steps": self.int_steps}


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class RescaleTransform(vxm.layers.RescaleTransform):
    """``vxm.layers.RescaleTransform`` resizing dense fields of the whole batch in one op.

    Same arguments and results: field (B, *S, ndim) -> (B, *floor(S * zoom_factor), ndim).
    Affine matrices are left to voxelmorph's implementation.
    """

    def __init__(self, zoom_factor, interp_method="linear", **kwargs):
        if positive_number(zoom_factor) is None:
            raise ValueError(f"RescaleTransform: zoom_factor must be a positive number, got {zoom_factor!r}")
        _check_interp_method(interp_method)
        super().__init__(zoom_factor, interp_method=interp_method, **{"dtype": EXACT, **kwargs})

    def call(self, transform):
        if self.is_affine:
            return super().call(transform)
        return rescale_field(transform, self.zoom_factor, self.interp_method)


BATCHED_LAYERS = {"SpatialTransformer": SpatialTransformer, "VecInt": VecInt, "RescaleTransform": RescaleTransform}
