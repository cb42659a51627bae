"""Synthetic contrast pairs for CIFL training (paper Fig. 1, method page section 1).

A label map of random shapes is drawn SynthMorph-style (Hoffmann et al. 2021): J channels of
multi-scale Perlin noise, optionally warped by one random smooth diffeomorphism, then argmax.
neurite's ``labels_to_image`` renders that one map twice with independent random intensities,
noise, bias field, blur and gamma, giving two voxel-aligned images of the same anatomy in two
contrasts. Everything runs in the TF graph of a ``tf.data`` pipeline.
"""
import warnings

import numpy as np
import tensorflow as tf

import neurite as ne
import voxelmorph as vxm

# labels_to_image settings that this module owns: the pair must stay voxel-aligned and unlabelled.
_FIXED_RENDER_ARGS = ("in_shape", "in_label_list", "warp_std", "one_hot", "seeds", "id", "num_chan")
_SEED_KEYS = ("mean", "std", "noise", "background", "blur", "bias", "gamma", "dc_offset")


def _positive_ints(name, values):
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                         for v in values):
        raise ValueError(f"{name} must be positive integers, got {values!r}")
    return values


def _draw_perlin(shape, scales, max_std, seed):
    with warnings.catch_warnings():  # neurite 0.2 warns on `modulate`, but needs it (method page 1.1)
        warnings.simplefilter("ignore", category=UserWarning)
        return ne.utils.augment.draw_perlin(shape, scales, max_std=max_std, modulate=True, seed=seed)


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
        seed: integer for reproducible draws; None draws differently every time.
        **render_kwargs: any other ``ne.models.labels_to_image`` argument (mean_min, mean_max,
            std_min, std_max, zero_background, bias_std, bias_res, blur_std, gamma_std, ...).
    """

    def __init__(self, shape, num_labels=16, label_scales=(8, 16, 32, 64), label_std=1.0,
                 warp_std=2.0, warp_scales=(16, 32), seed=None, **render_kwargs):
        self.shape = _positive_ints("shape", shape)
        if len(self.shape) not in (2, 3):
            raise ValueError(f"shape must be 2D or 3D, got {self.shape!r}")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
        self.label_scales = _positive_ints("label_scales", label_scales)
        self.warp_scales = _positive_ints("warp_scales", warp_scales)
        for name, value in (("label_std", label_std), ("warp_std", warp_std)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        fixed = sorted(set(render_kwargs) & set(_FIXED_RENDER_ARGS))
        if fixed:
            raise ValueError(f"ShapesSynth sets {fixed} itself: the two renders must stay voxel-aligned")
        self.num_labels, self.label_std, self.warp_std = num_labels, label_std, warp_std

        rng = np.random.default_rng(seed)
        draw_seed = lambda: None if seed is None else int(rng.integers(2 ** 31 - 1))  # noqa: E731
        self._label_seed, self._warp_seed = draw_seed(), draw_seed()
        # neurite draws a modulated blur eagerly, once, while building the model, where `seed` cannot
        # reach it (a second ShapesSynth(seed=s) would blur differently): draw it here instead.
        blur_std = render_kwargs.pop("blur_std", 1.0)
        blur_modulate = render_kwargs.pop("blur_modulate", True)
        self._renders = [
            ne.models.labels_to_image(
                self.shape, list(range(num_labels)), warp_std=0, one_hot=False, id=view,
                seeds={} if seed is None else {key: draw_seed() for key in _SEED_KEYS},
                blur_std=float(rng.uniform(0, blur_std)) if blur_modulate else blur_std,
                blur_modulate=False, **render_kwargs)
            for view in range(2)
        ]

    def label_map(self, _=None):
        """One random-shape label map, (*shape, 1) int32 in [0, num_labels)."""
        noise = _draw_perlin((*self.shape, self.num_labels), self.label_scales, self.label_std,
                             self._label_seed)
        if self.warp_std > 0:
            velocity = _draw_perlin((*self.shape, len(self.shape)), self.warp_scales, self.warp_std,
                                    self._warp_seed)
            noise = vxm.utils.transform(noise, vxm.utils.integrate_vec(velocity, nb_steps=5))
        return tf.argmax(noise, axis=-1, output_type=tf.int32)[..., tf.newaxis]

    def _sample(self, _=None):
        labels = self.label_map()[tf.newaxis]
        return (labels, *(render(labels)[0] for render in self._renders))

    def __call__(self, batch_size):
        """A batch of label maps (B, *shape, 1) and its two renders x1, x2, each (B, *shape, 1)."""
        # One sample at a time: parallel tf.map_fn iterations (here and inside neurite's renders)
        # would hand the seeded random streams to the samples in a racy order.
        labels, x1, x2 = tf.map_fn(self._sample, tf.range(batch_size), parallel_iterations=1,
                                   fn_output_signature=(tf.int32, tf.float32, tf.float32))
        return labels[:, 0], x1[:, 0], x2[:, 0]


def contrast_pairs(shape, batch_size, seed=None, **synth_kwargs):
    """Endless, prefetched ``tf.data.Dataset`` of voxel-aligned contrast pairs ``(x1, x2)``.

    Args:
        shape: spatial shape (H, W) or (D, H, W).
        batch_size: B, pairs per batch.
        seed: integer; the same seed gives the same batches. None: different every time.
        **synth_kwargs: ShapesSynth arguments (num_labels, label_scales, warp_std, labels_to_image
            ranges, ...).

    Yields: x1, x2 of shape (B, *shape, 1), float32 in [0, 1] (before gamma), same anatomy.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    synth = ShapesSynth(shape, seed=seed, **synth_kwargs)
    # One batch per map call, in order: stateful seeded draws then repeat exactly.
    pairs = tf.data.Dataset.from_tensors(batch_size).repeat().map(lambda b: synth(b)[1:])
    return pairs.prefetch(tf.data.AUTOTUNE)
