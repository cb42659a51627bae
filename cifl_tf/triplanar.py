"""A 2D encoder made 3D: the encoder applied to the slices of a volume along each of its three axes.

    x (B, X, Y, Z, 1)  ->  l2-normalise(concat over axes a of f(the slices of x across axis a)) (B, X, Y, Z, 3C)

Each voxel gets the 2D encoder's features of the three orthogonal slices through it (tri-planar), so
each voxel still has a unit-length feature vector, as CIFL features do: any 2D encoder (or 2D MIND) describes
volumes this way, such as the paper's sweep (``pretrained(tau_gamma, ndim=3)``). Until the recommended 3D
encoder trained from an inflated 2D one (``encoder.inflate``), the tri-planar features of the tau_gamma = 1
encoder were the shipped 3D features: every 3D encoder trained from random weights registered worse
(docs/levers.md, "3D-trained encoders against tri-planar features").
They are for feature extraction and ``register_pair``; UNet and VxmDense models take 2D or 3D CIFLEncoders.
"""
import numpy as np
import tensorflow as tf

from . import tiling

KL = tf.keras.layers


def deserialize_layer(config):
    """The layer of a Keras config nested in another layer's (a Triplanar's encoder, a FeatureStack's describers).
    Loading an .h5 model deserialises the old way, which looks a class up by its "class_name" ("CIFLEncoder"), not
    by the name it is registered under ("cifl_tf>CIFLEncoder"): the package's registered classes are given by both."""
    package = {name.split(">", 1)[1]: cls for name, cls in tf.keras.utils.get_custom_objects().items()
               if name.startswith("cifl_tf>")}
    return tf.keras.utils.deserialize_keras_object(config, custom_objects=package)


@tf.keras.utils.register_keras_serializable(package="cifl_tf")
class Triplanar(KL.Layer):
    """A 2D encoder applied slice by slice along each axis of a volume, the three feature images concatenated.

    Args:
        encoder: a 2D encoder layer (B, H, W, 1) -> (B, H, W, C) with ``ndim`` 2 and ``channels`` C
            attributes (a CIFLEncoder, a MIND descriptor), or its Keras config.

    Call: volumes (B, X, Y, Z, 1) -> (B, X, Y, Z, 3C), unit length along the last axis; channels
    [a C : (a + 1) C] are the encoder's features of the slices across axis a.
    """

    def __init__(self, encoder, **kwargs):
        # No autocast, as CIFLEncoder: the encoder's first layer needs the volumes' intensities exact, not in 16 bits.
        super().__init__(**{"autocast": False, **kwargs})
        if isinstance(encoder, dict):
            encoder = deserialize_layer(encoder)
        if not isinstance(encoder, KL.Layer) or getattr(encoder, "ndim", None) != 2 or not hasattr(encoder, "channels"):
            raise ValueError(f"Triplanar: encoder must be a 2D encoder layer with ndim 2 and channels attributes, "
                             f"got {getattr(encoder, 'name', encoder)!r} (ndim {getattr(encoder, 'ndim', None)})")
        self.encoder = encoder
        self.ndim, self.channels = 3, 3 * encoder.channels

    @property
    def receptive_radius(self):
        """In-plane, the 2D encoder's reach; across the slices, none. (A property: for an encoder that states
        no radius it is measured, which is not worth doing on every build.)"""
        return tiling.receptive_radius(self.encoder)

    def _check_images(self, images):
        return tiling.check_images(f"Triplanar({self.encoder.name})", 3, images)

    def build(self, input_shape):
        self._check_images(input_shape)
        super().build(input_shape)

    def call(self, volumes):
        volumes = self._check_images(volumes)  # every call, not just the first: see tiling.check_images
        shape = tf.shape(volumes)
        features = []
        for axis in (1, 2, 3):
            others = [a for a in (1, 2, 3) if a != axis]
            slices = tf.transpose(volumes, [0, axis, *others, 4])  # (B, N_axis, H, W, 1)
            encoded = self.encoder(tf.reshape(slices, [-1, shape[others[0]], shape[others[1]], 1]))
            encoded = tf.reshape(encoded, [shape[0], shape[axis], shape[others[0]], shape[others[1]],
                                           self.encoder.channels])
            back = [0] + [1 + [axis, *others].index(a) for a in (1, 2, 3)] + [4]
            features.append(tf.transpose(encoded, back))
        return tf.math.l2_normalize(tf.concat(features, axis=-1), axis=-1)

    @property
    def live_activations(self):
        """Its 2D encoder's (tiling.bytes_per_pixel): the slices are that encoder's images."""
        return tiling.live_activations(self.encoder)

    def tiled_features(self, volume, max_memory, out):
        """``self(volume)`` of one volume (X, Y, Z), written into `out`, a (X, Y, Z, 3C) float32 array, within
        max_memory bytes of activations (per pixel as tiling.bytes_per_pixel(self), as for 3D tiles): the
        slices across each axis are encoded whole, as many at a time as fit, and a slice larger than that in
        2D tiles (``tiling.tiled_features`` calls this). Whole slices need no halo; 3D tiles do, and the 2D
        encoder encoded it again in each (1.7 times the voxels of a 160x192x224 volume in 1 GiB tiles): the
        shipped 3D features of such a volume took 17.2 s instead of 34.0 s on 2 cores (tf.matmul at 127 and
        115 GFLOP/s).
        """
        tiling.check_finite(volume)
        channels = self.encoder.channels
        call = tiling.graph_call(self.encoder)
        for axis in range(3):
            slices = np.moveaxis(volume, axis, 0)
            encoded = np.moveaxis(out[..., axis * channels:(axis + 1) * channels], axis, 0)  # a view
            batch = max_memory // (tiling.bytes_per_pixel(self) * slices[0].size)
            if batch == 0:
                for index, image in enumerate(slices):
                    tiling.tiled_features(self.encoder, image, max_memory, encoded[index])
            else:
                for start in range(0, len(slices), batch):
                    encoded[start:start + batch] = call(tf.constant(slices[start:start + batch, ..., np.newaxis]))
        return tiling.l2_normalize_in_place(out)  # as call() does

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.channels])

    def get_config(self):
        return {**super().get_config(), "encoder": tf.keras.utils.serialize_keras_object(self.encoder)}
