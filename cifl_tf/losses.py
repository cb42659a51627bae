"""The CIFL contrastive loss, paper Eq. 1 (method page, section 3).

For one sample, with u_c, v_c the c-th channel images of views 1 and 2 and s the cosine:

    loss = -log( sum_c exp(s(u_c, v_c) / tau_a)
                 / (sum_c exp(s(u_c, v_c) / tau_b) + sum_c sum_{c' != c} exp(s(u_c, u_c') / tau_g)) )

computed as a difference of log-sum-exps, so that it stays finite for small temperatures.
"""
import tensorflow as tf


def _check_temperatures(**taus):
    for name, tau in taus.items():
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"{name} must be a positive number, got {tau!r}")


def contrastive_loss(f1, f2, tau_alpha=1.0, tau_beta=1.0, tau_gamma=0.1, per_sample=False):
    """Paper Eq. 1 between the feature images of two views of the same anatomy.

    Args:
        f1, f2: features of view 1 and view 2, (B, *spatial, C) with matching shapes.
        tau_alpha, tau_beta, tau_gamma: the temperatures of Eq. 1.
        per_sample: return the (B,) losses instead of their mean.

    Returns: the batch mean (a scalar), or (B,) with per_sample=True.
    """
    _check_temperatures(tau_alpha=tau_alpha, tau_beta=tau_beta, tau_gamma=tau_gamma)
    f1 = tf.convert_to_tensor(f1)
    f2 = tf.cast(f2, f1.dtype)
    if f1.shape.rank is not None and f1.shape.rank < 3:
        raise ValueError(f"contrastive_loss: features need shape (B, *spatial, C), got {f1.shape}")
    if not f1.shape.is_compatible_with(f2.shape):
        raise ValueError(f"contrastive_loss: f1 {f1.shape} and f2 {f2.shape} differ in shape")
    channels = f1.shape[-1]
    if channels is None:
        raise ValueError("contrastive_loss: the channel dimension C must be known")

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


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class ContrastiveLoss(tf.keras.losses.Loss):
    """Keras loss wrapper of `contrastive_loss`: ``loss(f1, f2)`` with f1 in the y_true slot.

    Per-sample values are reduced by Keras (the default reduction gives the batch mean).
    """

    def __init__(self, tau_alpha=1.0, tau_beta=1.0, tau_gamma=0.1, name="contrastive_loss", **kwargs):
        _check_temperatures(tau_alpha=tau_alpha, tau_beta=tau_beta, tau_gamma=tau_gamma)
        super().__init__(name=name, **kwargs)
        self.tau_alpha, self.tau_beta, self.tau_gamma = tau_alpha, tau_beta, tau_gamma

    def call(self, f1, f2):
        return contrastive_loss(f1, f2, self.tau_alpha, self.tau_beta, self.tau_gamma, per_sample=True)

    def get_config(self):
        return {**super().get_config(), "tau_alpha": self.tau_alpha, "tau_beta": self.tau_beta,
                "tau_gamma": self.tau_gamma}
