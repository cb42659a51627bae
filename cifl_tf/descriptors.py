"""Hand-made modality independent descriptors, as Keras layers that stand wherever an encoder does.

MIND, the modality independent neighbourhood descriptor (Heinrich et al., "MIND: Modality independent
neighbourhood descriptor for multi-modal deformable registration", Medical Image Analysis 16(7), 2012),
and its self-similarity context variant MIND-SSC (Heinrich et al., "Towards realtime multimodal fusion for
image-guided interventions using self-similarities", MICCAI 2013). Both compare small patches of one image
with each other, so they describe local structure whatever the contrast:

    D_p(I, x + a, x + b) = sum_p G_sigma(p) (I(x + a + p) - I(x + b + p))^2     Gaussian-weighted patch SSD
    V(I, x)              = mean over the K pairs (a, b) of D_p(I, x + a, x + b)  local variance estimate
    MIND(I, x, k)        = exp(-D_p(I, x + a_k, x + b_k) / V(I, x)) / n(x)       n(x): the max over k

* MIND (2012): pairs (0, r) for r in the six-neighbourhood N (the four-neighbourhood in 2D), the search
  region the paper recommends; K = 2 ndim channels.
* MIND-SSC (2013): pairs (a, b) of neighbours in N at distance sqrt(2) of each other (never the centre
  itself); K = 12 in 3D, and the 2D analogue K = 4.

The neighbours lie `dilation` pixels from the centre (1 in MIND 2012; Heinrich's SSC code uses 2). The patch
weights G_sigma are a normalised Gaussian of SD `sigma` (0.5 in MIND 2012) truncated at radius ceil(3 sigma).
As in Heinrich's public MIND-SSC code, V is clipped to [1e-3, 1e3] times its mean over the image, so that
flat regions (V -> 0) do not turn noise into structure; an all-constant image gives MIND = 1 everywhere.
Images are extended beyond their border by mirror symmetry (edge pixels repeated).

Channel k belongs to the k-th pair of ``MIND.pairs``: neighbours ordered -axis0, +axis0, -axis1, +axis1,
..., and SSC pairs (N[i], N[j]) for i < j in that order.
"""
import itertools
import math

import numpy as np
import tensorflow as tf

from . import tiling
from .encoder import L2Normalize, convolve, gaussian_blur, positive_integer, positive_number

KL = tf.keras.layers

VARIANTS = ("mind", "ssc")
_VARIANCE_CLIP = 1e3  # V is kept within [mean / clip, mean * clip], as in Heinrich's MIND-SSC code


def _neighbours(ndim):
    """The 2 ndim unit offsets of the six-neighbourhood (four in 2D): -axis0, +axis0, -axis1, ..."""
    return [tuple(sign * (axis == i) for i in range(ndim)) for axis in range(ndim) for sign in (-1, 1)]


def descriptor_pairs(ndim, variant, dilation=1):
    """The K offset pairs (a, b) compared by the descriptor, each a tuple of ndim pixel offsets."""
    neighbours = [tuple(dilation * n for n in offset) for offset in _neighbours(ndim)]
    if variant == "mind":
        return [((0,) * ndim, r) for r in neighbours]
    return [(a, b) for a, b in itertools.combinations(neighbours, 2)
            if sum((i - j) ** 2 for i, j in zip(a, b)) == 2 * dilation ** 2]


def mirror_pad(images, margin, axis):
    """`images` extended by `margin` voxels at both ends of `axis` by mirroring, the edge voxel repeated (tf.pad's
    SYMMETRIC mode), the mirror images repeated where the axis has fewer than `margin` voxels (which tf.pad
    refuses), as np.pad's "symmetric" mode does."""
    size = images.shape[axis] or tf.shape(images)[axis]
    period = tf.range(-margin, size + margin) % (2 * size)
    return tf.gather(images, tf.minimum(period, 2 * size - 1 - period), axis=axis)


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class MIND(KL.Layer):
    """MIND or MIND-SSC descriptor (see the module doc), a Keras layer without weights.

    Args:
        ndim: 2 (images (B, H, W, 1)) or 3 (volumes (B, D, H, W, 1)).
        variant: "mind" (Heinrich 2012, K = 2 ndim) or "ssc" (MIND-SSC, Heinrich 2013, K = 4 in 2D, 12 in 3D).
        sigma: SD in pixels of the Gaussian patch weights.
        dilation: distance in pixels of the compared neighbours from the centre.
        l2_normalize: put each pixel's K-vector on the unit sphere, as CIFL encoders do (default). Then dot
            products are cosines and MSE is 2 - 2 cos, so matching and registration treat MIND and the
            encoders alike; False keeps the paper's normalisation (max over the K channels = 1).

    Call: (B, *spatial, 1) -> (B, *spatial, K) float32 in [0, 1] (0 where exp underflows); K is ``channels``.
    ``ndim`` and ``channels`` give it the interface of CIFLEncoder, so models take it as their ``encoder``. Its
    dtype policy is float32 unless given (not the global policy), and it computes in float32 under any: it has no
    weights to train in 16 bits, and where contrast is faint, the image rounded to bfloat16 changed it by up to 0.9.
    """

    def __init__(self, ndim=2, variant="mind", sigma=0.5, dilation=1, l2_normalize=True, **kwargs):
        # No autocast either: an explicit mixed policy must not round the images to 16 bits.
        super().__init__(**{"dtype": "float32", "autocast": False, **kwargs})
        if positive_integer(ndim) not in (2, 3):
            raise ValueError(f"MIND: ndim must be 2 or 3, got {ndim!r}")
        if variant not in VARIANTS:
            raise ValueError(f"MIND: variant must be one of {VARIANTS}, got {variant!r}")
        if positive_number(sigma) is None:
            raise ValueError(f"MIND: sigma must be a positive number, got {sigma!r}")
        if positive_integer(dilation) is None:
            raise ValueError(f"MIND: dilation must be a positive integer, got {dilation!r}")
        if not isinstance(l2_normalize, bool):
            raise TypeError(f"MIND: l2_normalize must be True or False, got {l2_normalize!r}")
        self.ndim, self.variant, self.sigma, self.dilation = int(ndim), variant, float(sigma), int(dilation)
        self.l2_normalize = l2_normalize
        self.pairs = descriptor_pairs(self.ndim, variant, self.dilation)
        self.channels = len(self.pairs)
        self.patch_radius = math.ceil(3 * self.sigma)
        self.normalize = L2Normalize(name="l2_normalize", dtype="float32") if l2_normalize else None

    @property
    def receptive_radius(self):
        """How far, in pixels, the descriptor at a pixel looks (tiling.receptive_radius): the neighbours'
        `dilation` plus the patch's ceil(3 sigma). Stated, since measuring it probes an 83^3 volume for a second
        in 3D, for each new layer: in register_pair, and in each save and load of a model holding a FeatureStack
        (Keras reads its properties). The variance clip's image mean is not counted: `tiled_features` takes it
        over the whole image first (register_pair's slabs, each over its own)."""
        return self.dilation + self.patch_radius

    @property
    def live_activations(self):
        """K-channel float32 images that a tile holds at once per pixel (tiling.bytes_per_pixel): the distances,
        their patch sums and the steps of the descriptor's exponential. Measured by bench/tile_memory.py: up to 5.3
        on a whole image."""
        return 6

    def _check_images(self, images):
        return tiling.check_images(f"MIND(ndim={self.ndim})", self.ndim, images)

    def build(self, input_shape):
        self._check_images(input_shape)
        super().build(input_shape)

    def _differences_kernel(self):
        """(2 dilation + 1,) * ndim + (1, K): +1 at a_k and -1 at b_k, i.e. I(x + a_k) - I(x + b_k)."""
        kernel = np.zeros((2 * self.dilation + 1,) * self.ndim + (1, self.channels), np.float32)
        for k, (a, b) in enumerate(self.pairs):
            kernel[tuple(self.dilation + i for i in a) + (0, k)] += 1
            kernel[tuple(self.dilation + i for i in b) + (0, k)] -= 1
        return kernel

    def distances(self, images):
        """D_p of the K pairs, (B, *spatial, K) float32, of images (B, *spatial, 1)."""
        images = self._check_images(images)  # every call, not just the first: see tiling.check_images
        if tf.as_dtype(images.dtype).is_complex:  # the cast below would drop the imaginary part
            raise TypeError(f"MIND(ndim={self.ndim}): images must be real intensities, got {images.dtype.name}")
        margin = self.dilation + self.patch_radius
        padded = tf.cast(images, tf.float32)
        for axis in range(1, self.ndim + 1):
            padded = mirror_pad(padded, margin, axis)
        distances = tf.square(convolve(padded, self._differences_kernel(), "VALID"))
        # the Gaussian-weighted patch sums D_p
        return gaussian_blur(distances, self.sigma, self.patch_radius, self.ndim, self.channels, "VALID")

    def variance(self, images):
        """V, (B, *spatial, 1), before the clip."""
        return tf.reduce_mean(self.distances(images), axis=-1, keepdims=True)

    def call(self, images, variance_mean=None):
        """`variance_mean`: the mean of V that the clip takes, a scalar (`tiled_features`: the whole image's);
        None, each input's own."""
        distances = self.distances(images)
        variance = tf.reduce_mean(distances, axis=-1, keepdims=True)
        if variance_mean is None:
            # over the finite V only: a NaN pixel (a masked background) spoils its neighbourhood, not the image
            finite = tf.math.is_finite(variance)
            spatial = list(range(1, self.ndim + 1))
            variance_mean = tf.math.divide_no_nan(
                tf.reduce_sum(tf.where(finite, variance, 0), spatial, keepdims=True),
                tf.reduce_sum(tf.cast(finite, tf.float32), spatial, keepdims=True))
        variance = tf.clip_by_value(variance, variance_mean / _VARIANCE_CLIP, variance_mean * _VARIANCE_CLIP)
        # exp(-(D - min D) / V) is exp(-D / V) divided by its max over k, without underflow; 0 / 0 (an
        # all-constant image) gives exp(0) = 1.
        descriptor = tf.exp(-tf.math.divide_no_nan(distances - tf.reduce_min(distances, -1, keepdims=True),
                                                   variance))
        return descriptor if self.normalize is None else self.normalize(descriptor)

    def tiled_features(self, image, max_memory, out):
        """``self(image)`` of one image, written into `out` ((*spatial, K) float32), tile by tile within
        max_memory bytes (``tiling.map_tiles``): first V, for the clip's mean over the whole image, then the
        descriptor with that mean, so that a tile's descriptor is the whole image's."""
        radius = self.receptive_radius
        core = tiling.tile_shape(image.shape, radius, tiling.bytes_per_pixel(self), max_memory)
        if all(c >= n for c, n in zip(core, image.shape)):  # one tile, whose own mean is the image's
            return tiling.map_tiles(tiling.graph_call(self), image, radius, core, out)
        variance = tiling.map_tiles(tiling.graph_call(self.variance), image, radius, core,
                                    np.empty((*image.shape, 1), np.float32))
        finite = np.isfinite(variance)
        count = np.count_nonzero(finite)
        mean = tf.constant(variance.sum(where=finite, dtype=np.float64) / count if count else 0, tf.float32)
        return tiling.map_tiles(lambda tile: tiling.graph_call(self._with_mean)(tile, mean), image, radius, core, out)

    def _with_mean(self, images, variance_mean):
        """A graph of its own: one tf.function traced with and without the argument failed in TensorFlow."""
        return self(images, variance_mean=variance_mean)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.channels])

    def get_config(self):
        return {**super().get_config(), "ndim": self.ndim, "variant": self.variant, "sigma": self.sigma,
                "dilation": self.dilation, "l2_normalize": self.l2_normalize}
