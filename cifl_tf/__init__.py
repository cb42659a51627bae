"""cifl-tf: contrast invariant feature learning (CIFL) for TensorFlow/Keras, voxelmorph and neurite."""
from . import _compat  # noqa: F401  (must run before anything touches tf.keras)
from . import data, demo_data, descriptors, evaluate, metrics, synth, tiling
from .descriptors import MIND
from .encoder import CIFLEncoder, L2Normalize, encoder_model, load_encoder, pretrained, save_encoder
from .instance import register_pair
from .losses import ContrastiveLoss, contrastive_loss
from .models import registration_model, segmentation_model
from .stack import FeatureStack
from .training import train_encoder
from .triplanar import Triplanar

__version__ = "0.1.0"
