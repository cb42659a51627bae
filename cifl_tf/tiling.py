"""Encoder or descriptor inference on a whole image, tile by tile, in bounded memory.

A layer (B, *spatial, 1) -> (B, *spatial, C) whose output at a pixel depends only on the input within
`radius` pixels of it (its receptive field: 8 for eight 3x3 convolutions) gives the same output on a
tile extended by `radius` pixels on every side as on the whole image, inside the tile. So the image is
cut into tiles, each extended by that halo (at the image border moved inside the image, where the layer's own
padding then applies as on the whole image), and the tiles' centres are put together again.
"""
import bisect
import functools
import itertools
import math

import numpy as np
import tensorflow as tf

from .checks import is_integer

DEFAULT_MAX_MEMORY = 2 ** 30  # bytes of activations per tile: 1 GiB
_PROBE_RADIUS = 40  # the largest receptive field measured_radius measures
# Float32 activations as wide as the widest layer live at once per pixel while a layer runs, for layers that do
# not state their own ``live_activations``: the input and output of one convolution and its non-linearity.
LIVE_ACTIVATIONS = 3


def receptive_radius(layer):
    """How far, in pixels, the layer's output at a pixel looks into its input (its receptive field):
    the layer's own ``receptive_radius`` where it states one (CIFLEncoder, MIND), else `measured_radius`."""
    stated = getattr(layer, "receptive_radius", None)
    return measured_radius(layer) if stated is None else stated


@functools.lru_cache(maxsize=8)
def measured_radius(layer):
    """The receptive radius measured on the layer itself, so that it holds for any layer (a user's own):
    the pixels of a random input on which the output at the centre has a nonzero gradient. A ReLU
    that is off at every probed path hides pixels, so layers with ReLUs had better state theirs.
    Kept for the layer's next call (register_pair describes an image in slabs; a 3D probe takes a second).

    Args:
        layer: Keras layer (B, *spatial, 1) -> (B, *spatial, C) with an ``ndim`` attribute.

    Returns: int, the largest distance along any axis (8 for eight 3x3 convolutions).
    Raises: ValueError if it exceeds 40 pixels or reaches across the whole image.
    """
    ndim = check_layer(layer)
    size = 2 * _PROBE_RADIUS + 3
    image = tf.random.stateless_uniform((1,) + (size,) * ndim + (1,), seed=(1, 2))
    centre = (0,) + (size // 2,) * ndim

    @tf.function  # eager gradients of tf.nn.convolution in 3D fail in TF 2.21 (no data_format attribute)
    def centre_gradient(image):
        with tf.GradientTape() as tape:
            tape.watch(image)
            output = layer(image)
            # Random weights per channel, so that channels cannot cancel each other's gradients.
            weights = tf.random.stateless_normal(output.shape[-1:], seed=(3, 4))
            value = tf.reduce_sum(output[centre] * weights)
        return tape.gradient(value, image)

    reached = np.argwhere(centre_gradient(image).numpy()[0, ..., 0] != 0)
    radius = int(np.abs(reached - size // 2).max()) if len(reached) else 0
    if radius > _PROBE_RADIUS:
        raise ValueError(f"measured_radius: the receptive field of {layer.name} reaches more than "
                         f"{_PROBE_RADIUS} pixels; it cannot be tiled")
    return radius


def bytes_per_pixel(layer):
    """Estimated peak activation memory per pixel of an input tile, in bytes: the layer's ``live_activations``
    (LIVE_ACTIVATIONS where it states none) float32 images as wide as the widest Keras layer inside `layer` (a
    convolution's filters) or its output channels. ``python bench/tile_memory.py`` compares it with the memory
    that tiles of the shipped describers take.
    """
    widths = [layer.channels] + [sub.filters for sub in layer.submodules if hasattr(sub, "filters")]
    return 4 * live_activations(layer) * max(widths)


def live_activations(layer):
    return getattr(layer, "live_activations", LIVE_ACTIVATIONS)


def tile_shape(shape, radius, pixel_bytes, max_memory=DEFAULT_MAX_MEMORY):
    """The largest tile (core, without its halo) whose extended tile fits in max_memory bytes.

    The extended tile is the core plus `radius` pixels on each side, within the image. Cores share one side,
    the largest the budget allows, except along axes that an extended tile spans whole (a thin volume's): those
    are taken whole, with no halo. Then the cores are shrunk so that equal tiles cover each axis (no sliver at
    the end).

    Args:
        shape: the image's spatial shape.
        radius: the layer's receptive field (receptive_radius).
        pixel_bytes: memory per pixel of an extended tile (bytes_per_pixel).
        max_memory: bytes.

    Returns: tuple of ints, each between 1 and the image's size.
    """
    check_max_memory(max_memory)

    def extended_pixels(side):
        return math.prod(min(side + 2 * radius, size) for size in shape)

    # extended_pixels grows with the side: the number of sides that fit is the largest that does
    side = bisect.bisect_right(range(1, max(shape) + 1), max_memory // pixel_bytes, key=extended_pixels)
    if side < 1:
        raise ValueError(f"max_memory (--max-memory) {max_memory} bytes is too small: a tile with its {radius}-pixel "
                         f"halo needs at least {pixel_bytes * extended_pixels(1)} bytes")
    return tuple(size if side + 2 * radius >= size else math.ceil(size / math.ceil(size / side)) for size in shape)


def check_max_memory(max_memory):
    if not is_integer(max_memory, 1):
        raise ValueError(f"max_memory must be a positive integer number of bytes, got {max_memory!r}")


def tiled_features(layer, image, max_memory=DEFAULT_MAX_MEMORY, out=None):
    """The layer's output on a whole image, computed tile by tile, or by the layer's own
    ``tiled_features(image, max_memory, out)`` where it has one (Triplanar: whole slices, no halo;
    FeatureStack: each describer its own way).

    Equal to ``layer(image)`` (up to float rounding) for layers whose output depends only on the
    input within receptive_radius(layer) pixels. An integer image reaches the layer as it is (MIND takes it, a
    CIFLEncoder refuses it, as when called); an image with NaN or infinite values is refused (check_finite) unless
    the layer tiles itself (MIND keeps them to their neighbourhoods).

    Args:
        layer: Keras layer (B, *spatial, 1) -> (B, *spatial, C) with ``ndim`` and ``channels``
            attributes: a CIFLEncoder, a MIND descriptor, ...
        image: (*spatial) array, ndim == layer.ndim.
        max_memory: bytes of activations per tile (see tile_shape).
        out: None, or a writable (*spatial, C) float32 array (of either byte order) to fill instead of a
            new one (such as data.save_nifti_channels's map of a file: features larger than memory).

    Returns: (*spatial, C) float32, `out` if given.
    """
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32, copy=False)
    ndim = check_layer(layer)
    if image.ndim != ndim:
        raise ValueError(f"tiled_features: {layer.name} is {ndim}D but the image has shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"tiled_features: the image is empty, shape {image.shape}")
    check_max_memory(max_memory)
    shape = image.shape + (layer.channels,)
    if out is not None and not (isinstance(out, np.ndarray) and out.shape == shape
                                and out.dtype.newbyteorder("=") == np.float32):
        raise ValueError(f"tiled_features: out must be a float32 array of shape {shape}, got "
                         + (f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__))
    features = np.empty(shape, np.float32) if out is None else out
    if hasattr(layer, "tiled_features"):
        return layer.tiled_features(image, max_memory, features)
    check_finite(image)
    radius = receptive_radius(layer)
    core = tile_shape(image.shape, radius, bytes_per_pixel(layer), max_memory)
    return map_tiles(graph_call(layer), image, radius, core, features)


def check_finite(image):
    """ValueError unless the image's values are finite: as a graph, TensorFlow fuses each convolution with its ReLU,
    which with oneDNN turned NaN into numbers where the layer called eagerly gives NaN."""
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError(f"tiled_features: the image has {image.size - np.count_nonzero(np.isfinite(image))} NaN "
                         f"or infinite values")


def map_tiles(call, image, radius, core, out):
    """Fills `out` (*spatial, C) with ``call`` (a (1, *tile, 1) tensor -> (1, *tile, C)) of `image` (*spatial),
    tile by tile: tiles of `core` shape, each extended by `radius` on every side. Every extended tile has one
    shape, core + 2 radius clipped to the image: at the border it is moved inside the image rather than cut, so
    that it holds more context, not less. One shape is one set of oneDNN primitives and buffers: with a shape
    per border the shipped 3D encoder's tiles of a 128 MiB budget took 193 MiB instead of 105 (docs/benchmarks.md,
    "Bench scripts"). Returns `out`."""
    extended = [min(c + 2 * radius, n) for c, n in zip(core, image.shape)]
    for start in itertools.product(*[range(0, size, step) for size, step in zip(image.shape, core)]):
        inner = tuple(slice(s, min(s + c, n)) for s, c, n in zip(start, core, image.shape))
        outer = tuple(slice(first, first + e) for first, e in
                      ((min(max(i.start - radius, 0), n - e), e) for i, n, e in zip(inner, image.shape, extended)))
        tile = np.asarray(call(tf.constant(image[outer][np.newaxis, ..., np.newaxis])))[0]  # .numpy() copied it
        out[inner] = tile[tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))]
    return out


def l2_normalize_in_place(features):
    """Puts each pixel's vector of `features` (*spatial, C) on the unit sphere in place, one chunk at a time
    (no copy of a volume larger than memory); all-zero vectors stay zero. Returns `features`."""
    slowest = int(np.argmax(features.strides[:-1]))  # chunks compact in memory, in C or Fortran order
    for chunk in np.moveaxis(features, slowest, 0):
        chunk /= np.sqrt(np.maximum(np.sum(np.square(chunk), axis=-1, keepdims=True), 1e-12))  # TF's epsilon
    return features


@functools.lru_cache(maxsize=8)
def graph_call(layer):
    """The layer as a tf.function, kept for the layer's next image (it keeps the last 8 layers alive): as a
    graph, TensorFlow fuses each convolution with its bias and activation; the shipped 3D features of a
    96x112x96 volume took 8.5 s instead of 14.6 s eagerly on 2 cores. After a second tile shape, one
    trace with unknown sizes serves all (reduce_retracing)."""
    return tf.function(layer, reduce_retracing=True)


def check_images(layer, ndim, images):
    """ValueError naming `layer` unless `images` (a shape, or a tensor or array) are single-channel images of `ndim`
    (B, *spatial, 1), none of whose axes but the channels' is empty. Returns `images`.

    Layers check in call() as well as in build(), on the static shape: build() sees the first input's shape only,
    and another rank could reach oneDNN's kernels, which abort the process. A tensor whose rank is unknown when
    traced (a retrace with relaxed shapes) is returned with its shape checked when the graph runs, for the same
    reason."""
    shape = tf.TensorShape(getattr(images, "shape", images))
    if shape.rank is not None and (shape.rank != ndim + 2 or shape[-1] != 1):
        raise ValueError(f"{layer} expects single-channel inputs of rank {ndim + 2} (batch, spatial..., 1), "
                         f"got shape {tuple(shape)}")
    if shape.rank is not None and 0 in shape[:-1]:
        raise ValueError(f"{layer}: the {'batch' if shape[0] == 0 else 'image'} is empty, shape {tuple(shape)}")
    if shape.rank is None and tf.is_tensor(images):
        return tf.ensure_shape(images, [None] * (ndim + 1) + [1])
    return images


def check_layer(layer):
    if not isinstance(layer, tf.keras.layers.Layer) or getattr(layer, "ndim", None) not in (2, 3) \
            or not isinstance(getattr(layer, "channels", None), int):
        raise TypeError(f"expected a Keras layer with ndim (2 or 3) and channels attributes, such as a "
                        f"CIFLEncoder or MIND, got {type(layer).__name__}")
    return layer.ndim
