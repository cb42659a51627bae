"""Synthetic contrast pairs for CIFL training (paper Fig. 1, method page section 1).

A label map of random shapes is drawn SynthMorph-style (Hoffmann et al. 2021): J channels of
multi-scale Perlin noise, optionally warped (nearest neighbour) by one random smooth
diffeomorphism, then argmax.
That one map is rendered twice with independent random intensities, noise, bias field, blur and
gamma, as neurite's ``labels_to_image`` renders, giving two voxel-aligned images of the same
anatomy in two contrasts. Everything runs in the TF graph of a ``tf.data`` pipeline.

Batch k of a stream is a pure function of (seed, k) and the batch size. neurite's ``draw_perlin`` and
``labels_to_image`` draw with op-seeded stateful random ops, whose output depends on how often and
in which order the ops ran before: seeded runs repeated only if batches were made one after the
other from the start of the stream, one sample at a time. So this module keeps their model (the
same draws, argument names and defaults) but makes each draw with ``tf.random.stateless_*`` from
a key folded from (seed, k), and reuses neurite's deterministic parts (separable convolution,
min-max normalisation) and voxelmorph's integration and transform, batched (cifl_tf.transform).
Batches can then be made in parallel, for a whole batch at once, and a stream can start at any batch.

Speed: Perlin noise is upsampled by matrix products (linear interpolation along each axis) rather than
neurite's gathers, and the warp is integrated on a coarser grid (CELL_VOXELS per cell of its finest noise
scale) and upsampled, as VxmDense integrates at int_downsize.
"""
import inspect
import numbers
import sys

import numpy as np
import tensorflow as tf

import neurite as ne

from .checks import is_integer
from .transform import integrate_velocity, spatial_transform

# The labels_to_image arguments that set the intensity model. Its others are this module's: the
# pair must stay voxel-aligned (no warp per render) and the labels are not returned.
RENDER_DEFAULTS = {name: p.default for name, p in inspect.signature(ne.models.labels_to_image).parameters.items()
                   if name in ("mean_min", "mean_max", "std_min", "std_max", "zero_background", "bias_res",
                               "bias_std", "bias_modulate", "blur_std", "blur_modulate", "normalize",
                               "gamma_std", "dc_offset")}
# Grid voxels per cell of the finest Perlin scale of the velocity field that _coarse_grid keeps.
CELL_VOXELS = 4
_RENDER_DRAWS = ("mean", "std", "noise", "background", "blur", "bias", "gamma", "dc_offset", "tie", "partner",
                 "jitter", "low_contrast", "contrast_factor", "resolution")
# Gaussian SD per voxel of a point-spread function whose full width at half maximum is one voxel: 1 / (2 sqrt(2 ln 2)).
FWHM_SD = 0.4247


def _positive_ints(name, values):
    if isinstance(values, tf.TensorShape):
        values = values.as_list()
    if not isinstance(values, (list, tuple, range, np.ndarray)):
        raise ValueError(f"{name} must be positive integers, got {values!r}")
    values = tuple(values)
    if not values or any(not is_integer(v, 1)
                         for v in values):
        raise ValueError(f"{name} must be positive integers, got {values!r}")
    return values


def check_shape(shape):
    """`shape` as a tuple of positive ints, 2D or 3D; else a ValueError naming it."""
    shape = _positive_ints("shape", shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must be 2D or 3D, got {shape!r}")
    return shape


def check_integer(name, value, least):
    """`value` as an int: an integer, Python's or NumPy's, >= least; else a ValueError naming it."""
    if not is_integer(value, least):
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def _number(name, value, holds, wanted):
    """`value` as a float: a real number, Python's or NumPy's, for which `holds`; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not holds(value):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return float(value)


def _check_render_args(args, num_labels):
    """ValueError naming the first of labels_to_image's intensity arguments (RENDER_DEFAULTS) with a bad value."""
    def check(name, condition, wanted):
        try:
            array = np.asarray(args[name], np.float64)
            good = np.asarray(args[name]).dtype.kind in "iuf" and bool(condition(array))  # not bools or strings
        except (TypeError, ValueError):  # not numbers, or ragged lists
            good = False
        if not good:
            raise ValueError(f"{name} must be {wanted}, got {args[name]!r}")

    def within(array, low):  # finite in float32, the dtype the draws are made in
        with np.errstate(over="ignore"):
            return bool(np.all(np.isfinite(array.astype(np.float32)) & (array >= low)))

    for name in ("mean_min", "mean_max", "std_min", "std_max"):
        if args[name] is not None:  # None: neurite's ranges per label
            kind, low = ("finite", -np.inf) if name.startswith("mean") else ("non-negative", 0)
            check(name, lambda array: array.shape in ((), (num_labels,)) and within(array, low),
                  f"a {kind} number or {num_labels} of them (one per label)")
    ranges = _intensity_ranges(args, num_labels)
    for low, high in (("mean_min", "mean_max"), ("std_min", "std_max")):
        if np.any(ranges[low] > ranges[high]):  # a bound left out is neurite's, per label
            raise ValueError(f"{low} {_given(args, low)} is above {high} {_given(args, high)}")
    if np.any(ranges["mean_max"] < 0) or np.any(ranges["mean_min"] > 255):  # all negative: blank images
        raise ValueError(f"mean_min {_given(args, 'mean_min')} and mean_max {_given(args, 'mean_max')}: each label's "
                         f"range of means must reach into [0, 255], to which the render clips")
    check("zero_background", lambda array: array.shape == () and 0 <= array <= 1, "a number in [0, 1]")
    check("bias_res", lambda array: array.ndim <= 1 and array.size and within(array, np.nextafter(0, 1)),
          "a positive number or a list of them")
    for name in ("bias_std", "blur_std", "gamma_std", "dc_offset"):
        check(name, lambda array: array.shape == () and within(array, 0), "a non-negative number")
    for name in ("bias_modulate", "blur_modulate", "normalize"):
        if not isinstance(args[name], (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {args[name]!r}")


def _intensity_ranges(args, num_labels):
    """{mean_min, mean_max, std_min, std_max: (num_labels,) float32}: the bounds of the labels' mean and SD
    draws, where a bound is None neurite's labels_to_image's per label (background 0-225 and SD 0-25, the
    other labels 25-225 and 5-25)."""
    defaults = {"mean_min": [0] + [25] * (num_labels - 1), "mean_max": [225] * num_labels,
                "std_min": [0] + [5] * (num_labels - 1), "std_max": [25] * num_labels}
    return {name: np.broadcast_to(np.float32(default if args[name] is None else args[name]), num_labels)
            for name, default in defaults.items()}


def _given(args, name):
    return repr(args[name]) if args[name] is not None else f"(neurite's default per label, {name} unset)"


def stream_seed(seed):
    """`seed` checked, or for None a fresh random one, so that an unseeded run differs every time."""
    if seed is None:
        return int(np.random.default_rng().integers(2 ** 31))
    if not is_integer(seed):
        raise TypeError(f"seed must be an integer or None, got {seed!r}")
    if not -2 ** 63 <= seed < 2 ** 63:  # the stateless RNG's keys are int64
        raise ValueError(f"seed must be within [-2**63, 2**63), got {seed!r}")
    return int(seed)


def batch_key(seed, index, stream):
    """The stateless RNG key, (2,) int64, of batch `index` of the random stream number `stream` of `seed`."""
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, stream], tf.int64),
                                                    tf.cast(index, tf.int64))


def _split(key, names):
    return dict(zip(names, tf.unstack(tf.random.experimental.stateless_split(key, len(names)))))


def _uniform(key, shape, low, high):
    return low + (high - low) * tf.random.stateless_uniform(shape, key)


def _interpolation_rows(points, size):
    """(n, size) weights of linear interpolation at `points` (n,) in [0, size - 1] along an axis of `size` voxels."""
    low = tf.floor(points)
    weight = (points - low)[:, None]
    low = tf.cast(low, tf.int32)
    return (1 - weight) * tf.one_hot(low, size) + weight * tf.one_hot(tf.minimum(low + 1, size - 1), size)


def _upsampling_matrix(size, new_size):
    """(new_size, size): linear interpolation of `size` samples at `new_size` points, the corners aligned.
    Made eagerly, as a constant: built in a traced synthesis, its ~50 ops a matrix were half of that graph."""
    with tf.init_scope():
        return _interpolation_rows(tf.linspace(0., size - 1., new_size), size)


def _along(images, axis, matrix):
    """`matrix` (m, n) applied along `axis` of images (..., n, ...) -> (..., m, ...), as one matrix product."""
    dims = images.shape
    columns = tf.reshape(images, (int(np.prod(dims[:axis])), dims[axis], int(np.prod(dims[axis + 1:]))))
    product = tf.linalg.matmul(matrix[tf.newaxis], columns)
    return tf.reshape(product, (*dims[:axis], matrix.shape[0], *dims[axis + 1:]))


def _resize(images, shape, first_axis=1):
    """(B, *S, C) -> (B, *shape, C) by linear interpolation with the corner voxels aligned, as
    ``ne.utils.resize`` resizes, one axis at a time (separable). `shape` is the whole spatial shape; with
    `first_axis` > 1 the spatial axes before it keep their size in S (their entries of `shape` are not read).
    As matrix products: neurite's gathers through ``interpn`` cost several times more, and in the label
    noise tf.image's native resize of each scale and their sum three times more (docs/benchmarks.md)."""
    for axis in range(first_axis, images.shape.rank - 1):
        images = _along(images, axis, _upsampling_matrix(images.shape[axis], shape[axis - 1]))
    return images


def _coarse_grid(shape, scales):
    """The spatial shape, corners aligned with `shape`'s, on which a field of Perlin `scales` is
    integrated before one linear upsampling: such a field is linear across cells of min(scales)
    voxels, and CELL_VOXELS grid voxels per cell resolve it. Not for the label noise: on a grid of
    4 voxels per cell, its label maps had 6-8% fewer regions (their kinks between cells matter)."""
    return tuple((np.array(shape) - 1) // max(1, min(scales) // CELL_VOXELS) + 1)


def _spacing(shape, grid):
    """(ndim,) float32: voxels of `shape` per voxel of `grid`, whose corners are shape's."""
    return np.float32(np.maximum(np.array(shape) - 1, 1) / np.maximum(np.array(grid) - 1, 1))


def _perlin(key, batch_size, shape, scales, min_std, max_std, grid=None):
    """(B, *grid, channels) noise as ``ne.utils.augment.draw_perlin`` draws it for each sample.

    shape: (*spatial, channels). Per sample and scale: N(0, std^2) noise at 1/scale resolution,
    std ~ U(min_std, max_std), linearly upsampled to `spatial`; the scales are summed.
    grid: the spatial shape to sample that field on, corners aligned with `spatial`'s (default `spatial`).
    """
    spatial, channels = np.asarray(shape[:-1]), shape[-1]
    grid = tuple(spatial if grid is None else grid)
    per_sample = (batch_size, *[1] * len(spatial), 1)
    keys = tf.random.experimental.stateless_split(key, 2 * len(scales))
    # Each scale upsampled along all axes but the first; then the scales side by side along the first, whose
    # interpolation matrices side by side upsample and sum them in one product.
    partial, first_rows = [], []
    for i, scale in enumerate(scales):
        std = _uniform(keys[2 * i], per_sample, min_std, max_std)
        small = np.int32(np.ceil(spatial / scale))
        noise = tf.random.stateless_normal((batch_size, *small, channels), keys[2 * i + 1]) * std
        partial.append(_resize(noise, grid, first_axis=2))
        first_rows.append(_upsampling_matrix(small[0], grid[0]))
    return _along(tf.concat(partial, axis=1), 1, tf.concat(first_rows, axis=1))


def _resolution_matrix(size, factor):
    """(size, size) linear map along an axis that takes an image to voxels `factor` (>= 1, a scalar tensor) times
    as large and back: a Gaussian point-spread function of full width `factor` voxels at half maximum (the
    extra SD FWHM_SD sqrt(factor^2 - 1), the image's own voxel being one), sampled every `factor` voxels from
    voxel 0 and at the last voxel, then linearly interpolated onto the voxels again. Factor 1 is the identity."""
    positions = tf.range(size, dtype=tf.float32)
    sigma = tf.maximum(FWHM_SD * tf.sqrt(factor ** 2 - 1), 1e-3)  # 1e-3: exp underflows to the identity
    blur = tf.exp(-0.5 * (positions[:, None] - positions[None, :]) ** 2 / sigma ** 2)
    blur /= tf.reduce_sum(blur, axis=1, keepdims=True)
    first = tf.floor(positions / factor) * factor
    last = tf.minimum(first + factor, size - 1)  # the last sample is at the last voxel
    weight = ((positions - first) / tf.maximum(last - first, 1e-6))[:, None]
    samples = (1 - weight) * _interpolation_rows(first, size) + weight * _interpolation_rows(last, size)
    return samples @ blur


def _gaussian_kernels(sigmas, width):
    """One normalised 1D Gaussian of `width` taps per (tensor) SD. neurite's gaussian_kernel builds
    the same from Python floats, or from a stateful draw of its own."""
    taps = tf.range(width, dtype=tf.float32) - (width - 1) / 2
    kernels = [tf.exp(-0.5 * taps ** 2 / sigma ** 2) for sigma in tf.unstack(sigmas)]
    return [kernel / tf.reduce_sum(kernel) for kernel in kernels]


class ShapesSynth:
    """Draws random-shape label maps and renders each one in two random contrasts.

    Args:
        shape: spatial shape of the images, (H, W) or (D, H, W).
        num_labels: J, the number of noise channels (and so of shapes' labels).
        label_scales: Perlin noise scales (1/resolution) of the label noise; small scales make
            thin structures, large ones large regions.
        label_std: upper bound on each scale's noise SD (drawn per sample).
        warp_std: upper bound on the SD of the random velocity field (in pixels); 0 disables the warp.
        warp_scales: Perlin scales of that velocity field.
        tie_prob: chance that a label's mean intensity is tied to another label's mean plus a jitter of
            at most `tie_jitter` (of 255), drawn for each render independently: tissues nearly equal in
            one contrast and apart in the other, as GM and WM are in PD and T1, so that the features
            must not rest on strong edges alone.
        tie_jitter: largest difference of a tied label's mean from its partner's.
        low_contrast_prob: chance, for each render, that the foreground labels' means are drawn
            together towards their average by a factor drawn log-uniformly in [low_contrast_min, 1],
            with the noise SDs kept (the background's mean is drawn as before): all tissues within a
            narrow band, as in PD, where the brain's tissues lie within 13% of each other (``demo_data``).
        low_contrast_min: smallest such factor, in (0, 1].
        resolution_max: largest factor by which a render's voxels are made coarser along each axis (1:
            never): for each batch and view a factor in [1, resolution_max] is drawn per axis, and the render,
            noise included, is imaged at that voxel size and interpolated back (``_resolution_matrix``), as
            scans of other voxel sizes or thick slices are, so that the two views may differ in resolution.
        seed: integer for reproducible draws; None draws differently every time.
        **render_kwargs: the intensity arguments of ``ne.models.labels_to_image``, with its
            defaults (RENDER_DEFAULTS): mean_min, mean_max, std_min, std_max, zero_background,
            bias_res, bias_std, bias_modulate, blur_std, blur_modulate, normalize, gamma_std,
            dc_offset. The blur SDs are drawn per batch and view (neurite draws them once per model).
    """

    def __init__(self, shape, num_labels=16, label_scales=(8, 16, 32, 64), label_std=1.0,
                 warp_std=2.0, warp_scales=(16, 32), tie_prob=0.0, tie_jitter=10.0, low_contrast_prob=0.0,
                 low_contrast_min=0.1, resolution_max=1.0, seed=None, **render_kwargs):
        self.shape = check_shape(shape)
        num_labels = check_integer("num_labels", num_labels, 2)
        self.label_scales = _positive_ints("label_scales", label_scales)
        self.warp_scales = _positive_ints("warp_scales", warp_scales)
        unit, non_negative = "a number in [0, 1]", "a non-negative number"
        tie_prob = _number("tie_prob", tie_prob, lambda v: 0 <= v <= 1, unit)
        low_contrast_prob = _number("low_contrast_prob", low_contrast_prob, lambda v: 0 <= v <= 1, unit)
        low_contrast_min = _number("low_contrast_min", low_contrast_min, lambda v: 0 < v <= 1, "a number in (0, 1]")
        resolution_max = _number("resolution_max", resolution_max, lambda v: 1 <= v < np.inf, "a number >= 1")
        # a label_std of 0 would leave every label map one label: nothing to tell apart
        label_std = _number("label_std", label_std, lambda v: 0 < v < np.inf, "a positive number")
        warp_std = _number("warp_std", warp_std, lambda v: 0 <= v < np.inf, non_negative)
        tie_jitter = _number("tie_jitter", tie_jitter, lambda v: 0 <= v < np.inf, non_negative)
        unknown = sorted(set(render_kwargs) - set(RENDER_DEFAULTS))
        if unknown:
            raise ValueError(f"ShapesSynth does not take {unknown}: of labels_to_image's arguments it takes "
                             f"the intensity ones {sorted(RENDER_DEFAULTS)}; the two renders stay voxel-aligned")
        self.num_labels, self.label_std, self.warp_std = num_labels, label_std, warp_std
        self.tie_prob, self.tie_jitter = tie_prob, tie_jitter
        self.low_contrast_prob, self.low_contrast_min = low_contrast_prob, low_contrast_min
        self.resolution_max = resolution_max
        self.seed = stream_seed(seed)
        self.render_args = {**RENDER_DEFAULTS, **render_kwargs}
        _check_render_args(self.render_args, num_labels)

    def label_map(self, key, batch_size):
        """Random-shape label maps drawn from `key`, (B, *shape, 1) int32 in [0, num_labels)."""
        keys = _split(key, ("labels", "warp"))
        noise = _perlin(keys["labels"], batch_size, (*self.shape, self.num_labels), self.label_scales,
                        0, self.label_std)
        # top_k(1) is argmax (ties go to the lower index) at half the cost of tf.argmax's reduction here.
        labels = tf.math.top_k(noise, 1).indices
        if self.warp_std > 0:
            # The argmax of noise warped by nearest interpolation is the argmax warped: one channel gathered,
            # not J (docs/benchmarks.md: what this changed against the noise warped linearly).
            labels = tf.cast(spatial_transform(tf.cast(labels, tf.float32),
                                               self.displacement(keys["warp"], batch_size), "nearest"), tf.int32)
        return labels

    def displacement(self, key, batch_size):
        """The random smooth warps drawn from `key`, (B, *shape, ndim) in voxels: Perlin velocity fields
        (warp_scales, SD up to warp_std) integrated by scaling and squaring in 5 steps.

        As VxmDense does with int_downsize, the field is integrated on a coarser grid (_coarse_grid)
        and upsampled.
        """
        coarse = _coarse_grid(self.shape, self.warp_scales)
        spacing = _spacing(self.shape, coarse)
        velocity = _perlin(key, batch_size, (*self.shape, len(self.shape)), self.warp_scales, 0, self.warp_std,
                           grid=coarse)
        return _resize(integrate_velocity(velocity / spacing, steps=5) * spacing, self.shape)  # scaled on the grid

    def render(self, key, labels):
        """One random contrast of label maps (B, *shape, 1), drawn from `key` as labels_to_image
        draws it: (B, *shape, 1) float32, in [0, 1] before gamma and dc offset if normalised."""
        args, keys = self.render_args, _split(key, _RENDER_DRAWS)
        batch_size, ndim = labels.shape[0], len(self.shape)
        per_image = (batch_size, *[1] * ndim, 1)
        num = self.num_labels
        ranges = _intensity_ranges(args, num)
        mean = _uniform(keys["mean"], (batch_size, num), ranges["mean_min"], ranges["mean_max"])
        if self.tie_prob > 0:
            mean = self._tie(keys, mean)
        if self.low_contrast_prob > 0:
            mean = self._low_contrast(keys, mean)
        std = _uniform(keys["std"], (batch_size, num), ranges["std_min"], ranges["std_max"])
        mean_std = tf.gather(tf.stack([mean, std], axis=-1), labels[..., 0], batch_dims=1)  # one gather for both
        image = tf.random.stateless_normal(labels.shape, keys["noise"]) * mean_std[..., 1:] + mean_std[..., :1]
        if args["zero_background"] > 0:
            flip = tf.random.stateless_uniform(per_image, keys["background"]) < args["zero_background"]
            image *= 1. - tf.cast(tf.logical_and(labels == 0, flip), image.dtype)
        if args["blur_std"] > 0:
            sigmas = tf.fill([ndim], float(args["blur_std"]))
            if args["blur_modulate"]:
                sigmas = _uniform(keys["blur"], [ndim], np.finfo(np.float32).eps, args["blur_std"])
            width = int(np.round(args["blur_std"] * 3) * 2 + 1)  # neurite's window for the largest SD
            image = ne.utils.separable_conv(image, _gaussian_kernels(sigmas, width), batched=True)
        if self.resolution_max > 1:
            factors = _uniform(keys["resolution"], [ndim], 1., self.resolution_max)
            for axis, factor in enumerate(tf.unstack(factors), start=1):
                image = _along(image, axis, _resolution_matrix(image.shape[axis], factor))
        if args["bias_std"] > 0:
            low = 0 if args["bias_modulate"] else args["bias_std"]
            image *= tf.exp(_perlin(keys["bias"], batch_size, (*self.shape, 1), np.ravel(args["bias_res"]),
                                    low, args["bias_std"]))
        image = tf.clip_by_value(image, 0, 255)
        if args["normalize"]:
            image = ne.utils.minmax_norm(image, axis=list(range(1, ndim + 2)))
        if args["gamma_std"] > 0:
            # image ** gamma as exp(gamma log image): tf.pow is not vectorised on CPU (3 times the time); 0 stays 0.
            gamma = tf.exp(args["gamma_std"] * tf.random.stateless_normal(per_image, keys["gamma"]))
            image = tf.exp(gamma * tf.math.log(image))
        if args["dc_offset"] > 0:
            image += _uniform(keys["dc_offset"], per_image, 0, args["dc_offset"])
        return image

    def _tie(self, keys, mean):
        """`mean` (B, J) with each foreground label, at chance tie_prob, moved to within tie_jitter of the
        mean of another label drawn at random (the background keeps its own)."""
        shape = mean.shape
        tied = tf.random.stateless_uniform(shape, keys["tie"]) < self.tie_prob
        tied = tf.logical_and(tied, tf.range(shape[1]) > 0)
        step = tf.random.stateless_uniform(shape, keys["partner"], 1, shape[1], dtype=tf.int32)
        partner = (tf.range(shape[1]) + step) % shape[1]  # any label but itself
        near = tf.gather(mean, partner, batch_dims=1) + _uniform(keys["jitter"], shape, -self.tie_jitter,
                                                                 self.tie_jitter)
        return tf.where(tied, near, mean)

    def _low_contrast(self, keys, mean):
        """`mean` (B, J) with, at chance low_contrast_prob per image, the foreground labels' means m_j
        moved to c + s (m_j - c), c their average and log s uniform in [log low_contrast_min, 0]."""
        batch_size = mean.shape[0]
        squeezed = tf.random.stateless_uniform((batch_size, 1), keys["low_contrast"]) < self.low_contrast_prob
        log_smallest = np.float32(np.log(self.low_contrast_min))
        log_factor = _uniform(keys["contrast_factor"], (batch_size, 1), log_smallest, 0.)
        foreground = mean[:, 1:]
        centre = tf.reduce_mean(foreground, axis=1, keepdims=True)
        foreground = tf.where(squeezed, centre + tf.exp(log_factor) * (foreground - centre), foreground)
        return tf.concat([mean[:, :1], foreground], axis=1)

    def __call__(self, index, batch_size):
        """Batch `index` of the stream: label maps (B, *shape, 1) and their two renders x1, x2, each
        (B, *shape, 1). A pure function of (seed, index, batch_size). `index` may be a tensor (a dataset's map)."""
        batch_size = check_integer("batch_size", batch_size, 1)
        if not tf.is_tensor(index):
            check_integer("index", index, 0)
        keys = _split(batch_key(self.seed, index, stream=0), ("labels", "view1", "view2"))
        labels = self.label_map(keys["labels"], batch_size)
        return labels, self.render(keys["view1"], labels), self.render(keys["view2"], labels)


def stream_options():
    """tf.data options for the endless streams that ``fit`` reads (synthesis, registration pairs, epochs of
    arrays, register_pair's levels): without the autotuning thread. Its rounds grow to many seconds apart, and
    the iterator that ``fit`` leaves behind waits for the current round when it is destroyed: after a 33 s
    ``train_encoder`` the CPU stood idle 10.7 s before it returned, and after each 30 s VxmDense fit of ``cifl
    demo`` 12-14 s (TF 2.21). Parallel maps then run one call per core (measured: as many at once as with
    autotuning, on 2 cores); prefetch buffers keep their own tuning."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def contrast_pairs(shape, batch_size, seed=None, start=0, **synth_kwargs):
    """Endless, prefetched ``tf.data.Dataset`` of voxel-aligned contrast pairs ``(x1, x2)``.

    Args:
        shape: spatial shape (H, W) or (D, H, W).
        batch_size: B, pairs per batch.
        seed: integer; the same seed gives the same batches. None: different every time.
        start: index of the first batch: the stream from `start` equals the stream from 0 without
            its first `start` batches (resuming a run).
        **synth_kwargs: ShapesSynth arguments (num_labels, label_scales, warp_std, labels_to_image
            intensity arguments, ...).

    Yields: x1, x2 of shape (B, *shape, 1), float32 in [0, 1] (before gamma), same anatomy.
    """
    batch_size, start = check_integer("batch_size", batch_size, 1), check_integer("start", start, 0)
    synth = ShapesSynth(shape, seed=seed, **synth_kwargs)
    # Batches are made in parallel and handed out in order; each is a function of its index alone. The synthesis
    # branches on Python values only, so autograph's conversion would change nothing but cost ~1 s a process.
    pairs = tf.data.Dataset.range(start, sys.maxsize).map(
        tf.autograph.experimental.do_not_convert(lambda index: synth(index, batch_size)[1:]),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return pairs.prefetch(tf.data.AUTOTUNE).with_options(stream_options())
