"""keras-mae: Masked Autoencoder pre-training of Vision Transformers for Keras 3.

Runs unchanged on the TensorFlow, JAX and PyTorch backends (`KERAS_BACKEND`).
"""

from keras_mae.layers import (
    DropPath,
    MultiHeadSelfAttention,
    PatchEmbedding,
    Patchify,
    SinCosPositionEmbedding,
    TransformerBlock,
    Unpatchify,
)
from keras_mae.losses import masked_patch_loss, normalize_patches
from keras_mae.classifier import ViTClassifier
from keras_mae.masking import MASK_SAMPLINGS, RandomMasking
from keras_mae.models import MAEDecoder, MAEEncoder, MaskedAutoencoder
from keras_mae.optimizers import AdamW, WarmupCosineDecay
from keras_mae.presets import list_presets

__version__ = "0.1.0"
