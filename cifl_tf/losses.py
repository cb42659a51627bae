"""The CIFL contrastive loss, paper Eq. 1 (method page, section 3).

For one sample, with u_c, v_c the c-th channel images of views 1 and 2 and s the cosine:

    loss = -log( sum_c exp(s(u_c, v_c) / tau_a)
                 / (sum_c exp(s(u_c, v_c) / tau_b) + sum_c sum_{c' != c} exp(s(u_c, u_c') / tau_g)) )

computed as a difference of log-sum-exps, so that it stays finite for small temperatures.

Beside it, optionally, ``pixel_contrastive_loss``: InfoNCE over pixels (each pixel's feature should be
closer to its own counterpart in the other view than to other pixels'), as dense contrastive learners use it.

Also here: ``NCC``, voxelmorph's local normalised cross-correlation for registration, made fast on CPUs.
"""
import math
import numbers

import numpy as np
import tensorflow as tf

import voxelmorph as vxm

from .checks import is_integer


def check_temperatures(**taus):
    for name, tau in taus.items():
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < tau < math.inf:
            raise ValueError(f"{name} must be a positive number, got {tau!r}")


def _feature_pair(f1, f2, caller):
    """f1 and f2 as float32 tensors (in 16 bits, l2_normalize's epsilon underflows: zero features gave NaN)
    checked to be two (B, *spatial, C) feature images of one shape, and C, which must be known."""
    f1, f2 = (tf.convert_to_tensor(f) for f in (f1, f2))
    if not all(f.dtype.is_floating or f.dtype.is_integer for f in (f1, f2)):
        raise TypeError(f"{caller}: features must be real numbers, got {f1.dtype.name} and {f2.dtype.name}")
    f1, f2 = (tf.cast(f, tf.float32) for f in (f1, f2))
    if f1.shape.rank is not None and f1.shape.rank < 3:
        raise ValueError(f"{caller}: features need shape (B, *spatial, C), got {f1.shape}")
    if any(f.shape.rank is not None and 0 in f.shape for f in (f1, f2)):  # an empty batch gave NaN, no pixels log C
        raise ValueError(f"{caller}: the features are empty, shapes {f1.shape} and {f2.shape}")
    if not f1.shape.is_compatible_with(f2.shape):
        raise ValueError(f"{caller}: f1 {f1.shape} and f2 {f2.shape} differ in shape")
    channels = f1.shape[-1]
    if channels is None:
        raise ValueError(f"{caller}: the channel dimension C must be known")
    return f1, f2, channels


def contrastive_loss(f1, f2, tau_alpha=1.0, tau_beta=1.0, tau_gamma=0.1, per_sample=False):
    """Paper Eq. 1 between the feature images of two views of the same anatomy.

    Args:
        f1, f2: features of view 1 and view 2, (B, *spatial, C) with matching shapes.
        tau_alpha, tau_beta, tau_gamma: the temperatures of Eq. 1.
        per_sample: return the (B,) losses instead of their mean.

    Returns: the batch mean (a scalar), or (B,) with per_sample=True.
    """
    check_temperatures(tau_alpha=tau_alpha, tau_beta=tau_beta, tau_gamma=tau_gamma)
    if not isinstance(per_sample, (bool, np.bool_)):
        raise TypeError(f"contrastive_loss: per_sample must be True or False, got {per_sample!r}")
    f1, f2, channels = _feature_pair(f1, f2, "contrastive_loss")

    # Channel images as unit vectors over pixels: (B, C, N).
    batch = tf.shape(f1)[0]
    u = tf.math.l2_normalize(tf.transpose(tf.reshape(f1, (batch, -1, channels)), (0, 2, 1)), axis=-1)
    v = tf.math.l2_normalize(tf.transpose(tf.reshape(f2, (batch, -1, channels)), (0, 2, 1)), axis=-1)

    agree = tf.reduce_sum(u * v, axis=-1)                                # s(u_c, v_c): (B, C)
    similar = tf.linalg.matmul(u, u, transpose_b=True)                   # s(u_c, u_c'): (B, C, C)
    off_diagonal = tf.reshape(~tf.eye(channels, dtype=tf.bool), (-1,))
    similar = tf.boolean_mask(tf.reshape(similar, (batch, -1)), off_diagonal, axis=1)

    numerator = tf.reduce_logsumexp(agree / tau_alpha, axis=-1)
    denominator = tf.reduce_logsumexp(tf.concat([agree / tau_beta, similar / tau_gamma], -1), axis=-1)
    losses = denominator - numerator
    return losses if per_sample else tf.reduce_mean(losses)


def check_scales(scales):
    """`scales` as a tuple of distinct positive integers (pooling factors of multiscale_contrastive_loss)."""
    if isinstance(scales, (str, bytes)) or not hasattr(scales, "__iter__"):
        raise ValueError(f"scales must be a sequence of positive integers such as (1, 2, 4), got {scales!r}")
    scales = tuple(scales)
    if not scales or len(set(scales)) < len(scales) or not all(
            is_integer(s, 1) for s in scales):
        raise ValueError(f"scales must be distinct positive integers such as (1, 2, 4), got {scales!r}")
    return tuple(int(s) for s in scales)


def multiscale_contrastive_loss(f1, f2, scales=(1,), tau_alpha=1.0, tau_beta=1.0, tau_gamma=0.1):
    """Eq. 1 averaged over scales: at scale s, between both feature images average-pooled over s^ndim
    blocks ('VALID' padding; s = 1 is Eq. 1 itself).

    Eq. 1's cosines are dominated by where features change most, at edges; on pooled images what fills a
    region weighs as much, so features must also agree across contrasts inside large uniform regions.

    Args:
        f1, f2: (B, *spatial, C) features of two aligned views; each spatial size at least max(scales).
        scales: distinct positive integer pooling factors.

    Returns: the batch mean, a scalar.
    """
    scales = check_scales(scales)
    f1, f2, _ = _feature_pair(f1, f2, "multiscale_contrastive_loss")  # before pooling, which can equalise sizes
    spatial = [size for size in f1.shape[1:-1] if size is not None]
    if spatial and min(spatial) < max(scales):  # 'VALID' pooling would leave no pixel: a constant loss
        raise ValueError(f"multiscale_contrastive_loss: scale {max(scales)} is larger than the features' spatial "
                         f"size {min(spatial)}")
    losses = [contrastive_loss(*(f if s == 1 else tf.nn.avg_pool(f, s, s, "VALID") for f in (f1, f2)),
                               tau_alpha, tau_beta, tau_gamma) for s in scales]
    return tf.add_n(losses) / len(scales)


def pixel_contrastive_loss(f1, f2, stride=5, temperature=0.1, max_pixels=1024):
    """InfoNCE (van den Oord et al. 2018) over the pixels of a grid, as dense contrastive learning uses it
    (e.g. anatomix, Dey et al. 2024): for each grid pixel p of view 1, the positive is p in view 2 and the
    negatives are the other grid pixels of view 2,

        loss_p = -log( exp(f1_p . f2_p / T) / sum_q exp(f1_p . f2_q / T) ),

    averaged over p, in both directions (views swapped) and over the batch. The grid takes every `stride`-th
    pixel along each axis from the first, so that every negative lies at least `stride` pixels from its
    positive; of a grid of more than `max_pixels` pixels (in 3D), every k-th in row-major order, k the smallest
    that leaves at most `max_pixels` (the logits are N x N per sample). Similarities are dot products of the
    given vectors (cosines for the l2-normalised features of an encoder). One grid pixel gives 0.

    Args:
        f1, f2: aligned features of two views, (B, *spatial, C) with matching shapes.
        stride: positive integer, the grid's spacing in pixels.
        temperature: T > 0.
        max_pixels: positive integer, the most grid pixels compared.

    Returns: the batch mean, a scalar.
    """
    for name, value in (("stride", stride), ("max_pixels", max_pixels)):
        if not is_integer(value, 1):
            raise ValueError(f"pixel_contrastive_loss: {name} must be a positive integer, got {value!r}")
    check_temperatures(temperature=temperature)
    f1, f2, channels = _feature_pair(f1, f2, "pixel_contrastive_loss")
    grid = (slice(None),) + (slice(None, None, stride),) * (f1.shape.rank - 2)
    batch = tf.shape(f1)[0]
    p1, p2 = (tf.reshape(f[grid], (batch, -1, channels)) for f in (f1, f2))
    every = (tf.shape(p1, out_type=tf.int64)[1] + max_pixels - 1) // max_pixels  # int32 overflows at 2^31
    p1, p2 = p1[:, ::every], p2[:, ::every]
    logits = tf.linalg.matmul(p1, p2, transpose_b=True) / temperature          # (B, N, N): rows view 1
    positives = tf.linalg.diag_part(logits)
    losses = (tf.reduce_logsumexp(logits, axis=2) - positives + tf.reduce_logsumexp(logits, axis=1) - positives) / 2
    return tf.reduce_mean(losses)


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class ContrastiveLoss(tf.keras.losses.Loss):
    """Keras loss wrapper of `contrastive_loss`: ``loss(f1, f2)`` with f1 in the y_true slot.

    Per-sample values are reduced by Keras (the default reduction gives the batch mean).
    """

    def __init__(self, tau_alpha=1.0, tau_beta=1.0, tau_gamma=0.1, name="contrastive_loss", **kwargs):
        check_temperatures(tau_alpha=tau_alpha, tau_beta=tau_beta, tau_gamma=tau_gamma)
        super().__init__(name=name, **kwargs)
        self.tau_alpha, self.tau_beta, self.tau_gamma = tau_alpha, tau_beta, tau_gamma

    def call(self, f1, f2):
        return contrastive_loss(f1, f2, self.tau_alpha, self.tau_beta, self.tau_gamma, per_sample=True)

    def get_config(self):
        return {**super().get_config(), "tau_alpha": self.tau_alpha, "tau_beta": self.tau_beta,
                "tau_gamma": self.tau_gamma}


class NCC(vxm.losses.NCC):
    """voxelmorph's local normalised cross-correlation: the arguments and values of ``vxm.losses.NCC``.

    Only the window sums differ: voxelmorph convolves with a ones kernel of 9^ndim taps, here they are
    differences of cumulative sums along each axis, in float64. On 2 AVX2 cores without oneDNN (tf.matmul
    at 99 GFLOP/s), the loss and its gradient took 6.2 s on a 53x65x54 volume with the 3D convolution,
    0.20 s with the cumulative sums; and the sums are exact where the float32 convolution's were off by
    1.3e-4 (``bench/ncc.py``).

    Call ``loss(y_true, y_pred)`` with (B, *spatial, F) images: -(B,) mean local squared correlation, or
    signed correlation with ``signed=True`` (the sums also run over the F channels, as voxelmorph's do).
    """

    def __init__(self, win=None, eps=1e-5, signed=False):
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
            raise ValueError(f"NCC: eps must be a positive number (a zero variance would give NaN), got {eps!r}")
        if not isinstance(signed, (bool, np.bool_)):
            raise TypeError(f"NCC: signed must be True or False, got {signed!r}")
        super().__init__(win=win, eps=eps, signed=bool(signed))

    def ncc(self, Ii, Ji):
        Ji = tf.convert_to_tensor(Ji)
        # y_pred's dtype, as Keras losses give, if a float; 16-bit squares and variances overflow: float32 within
        dtype = Ji.dtype if Ji.dtype.is_floating else tf.float32
        Ii, Ji = (tf.cast(image, tf.float32 if dtype.size < 4 else dtype) for image in (Ii, Ji))
        ndims = Ji.shape.rank - 2
        if ndims not in (1, 2, 3):
            raise ValueError(f"NCC: images need shape (B, *spatial, F) with 1 to 3 spatial axes, got {Ji.shape}")
        if not Ii.shape.is_compatible_with(Ji.shape):  # broadcast, they would give values outside [-1, 0]
            raise ValueError(f"NCC: y_true {Ii.shape} and y_pred {Ji.shape} differ in shape")
        win = [9] * ndims if self.win is None else list(self.win) if isinstance(self.win, (list, tuple)) \
            else [self.win] * ndims
        if len(win) != ndims or any(not is_integer(w, 1) for w in win):
            raise ValueError(f"NCC: win must be a positive integer or one per spatial axis ({ndims}), "
                             f"got {self.win!r}")
        maps = tf.concat([tf.reduce_sum(m, -1, keepdims=True) for m in (Ii, Ji, Ii * Ii, Ji * Ji, Ii * Ji)], -1)
        I_sum, J_sum, I2_sum, J2_sum, IJ_sum = tf.unstack(tf.cast(window_sums(maps, win), Ji.dtype), axis=-1)
        # voxelmorph's formula from here on
        win_size = np.prod(win) * Ji.shape[-1]
        u_I, u_J = I_sum / win_size, J_sum / win_size
        cross = tf.maximum(IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * win_size, self.eps)
        I_var = tf.maximum(I2_sum - 2 * u_I * I_sum + u_I * u_I * win_size, self.eps)
        J_var = tf.maximum(J2_sum - 2 * u_J * J_sum + u_J * u_J * win_size, self.eps)
        if self.signed:
            cc = cross / tf.sqrt(I_var * J_var + self.eps)
        else:
            cc = (cross / I_var) * (cross / J_var)
        return tf.cast(cc, dtype)[..., tf.newaxis]


def window_sums(images, window):
    """Sums over the window centred on each voxel, zeros outside (a ones-kernel 'SAME' convolution).

    Args:
        images: (B, *spatial, F).
        window: one size per spatial axis; an even size reaches one voxel further after the centre.

    Returns: (B, *spatial, F) float64, each channel summed on its own.
    """
    sums = tf.cast(images, tf.float64)
    if len(window) != sums.shape.rank - 2:
        raise ValueError(f"window_sums: {len(window)} window sizes for images of shape {sums.shape}")
    for axis, size in enumerate(window, start=1):
        padding = [[0, 0]] * sums.shape.rank
        padding[axis] = [(size - 1) // 2 + 1, size // 2]  # one more zero before: cumulative[0] = 0
        cumulative = tf.cumsum(tf.pad(sums, padding), axis=axis)
        ahead = [slice(None)] * sums.shape.rank
        behind = list(ahead)
        ahead[axis], behind[axis] = slice(size, None), slice(None, -size)
        sums = cumulative[tuple(ahead)] - cumulative[tuple(behind)]
    return sums
