"""Using a pre-trained encoder downstream: `ViTClassifier`.

The paper's three protocols are three settings of one model:

- linear probe: frozen encoder, BatchNorm without affine parameters, linear head;
- partial fine-tuning: the last K blocks (and the final norm) train too;
- full fine-tuning: everything trains, with layer-wise learning-rate decay.
"""

from pathlib import Path

import keras
from keras import ops

from keras_mae.models import CompiledSteps, MAEEncoder, MaskedAutoencoder
from keras_mae.quantization import KeepsQuantization

POOLINGS = ("avg", "token")
MODES = ("linear", "partial", "full")


def load_encoder(path):
    """The `MAEEncoder` inside a train.py run folder (its encoder.keras or mae.keras),
    or inside a `.keras` file of a MaskedAutoencoder, an MAEEncoder or a ViTClassifier.

    Raises a ValueError that says what was found instead.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = [path / "encoder.keras", path / "mae.keras"]
        found = [candidate for candidate in candidates if candidate.is_file()]
        if not found:
            raise ValueError(f"{path} holds neither encoder.keras nor mae.keras (is it a train.py run folder?).")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"{path} does not exist.")
    try:
        model = keras.saving.load_model(path)
    except Exception as error:
        raise ValueError(f"{path} is not a loadable .keras model: {str(error).splitlines()[0]}") from None
    if isinstance(model, (MaskedAutoencoder, ViTClassifier)):
        model = model.encoder
    if not isinstance(model, MAEEncoder):
        raise ValueError(f"{path} is a {type(model).__name__}, not a keras-mae model "
                         "(mae.keras, encoder.keras or classifier.keras).")
    return model


def pool_tokens(tokens, pooling="avg"):
    """Encoder tokens `(B, 1 + N, D)` -> features `(B, D)`: mean of the patch tokens
    ("avg", the paper's fine-tuning default) or the class token ("token")."""
    if pooling == "avg":
        return ops.mean(tokens[:, 1:], axis=1)
    if pooling == "token":
        return tokens[:, 0]
    raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}.")


@keras.saving.register_keras_serializable(package="keras_mae")
class ViTClassifier(KeepsQuantization, CompiledSteps, keras.Model):
    """Images -> class probabilities with an `MAEEncoder` and a linear head.

    Args:
        encoder: an `MAEEncoder` (pre-trained, or fresh for a from-scratch baseline).
        num_classes: outputs of the head.
        pooling: "avg" (mean of patch tokens) or "token" (class token).
        probe_norm: put BatchNorm without affine parameters before the head (the
            paper's linear probe: it calibrates features of any scale for a linear layer).
        dropout_rate: dropout on the pooled features.
        activation: of the head; "softmax" gives probabilities, None logits.
        class_names: optional names of the outputs, kept with the model (and used by
            `python -m keras_mae.export --kind classifier`).
        mode, blocks: what trains, see `set_mode`; saved with the model so that a
            loaded classifier resumes training the same weights.
    """

    def __init__(self, encoder, num_classes, pooling="avg", probe_norm=False, dropout_rate=0.0,
                 activation="softmax", class_names=None, mode="full", blocks=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(encoder, MAEEncoder):
            raise ValueError(f"`encoder` must be a keras_mae MAEEncoder, got {type(encoder).__name__}.")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an int of at least 2, got {num_classes!r}.")
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} `class_names` given for {num_classes} classes.")
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        self.encoder = encoder
        self.num_classes = num_classes
        self.pooling = pooling
        self.probe_norm = probe_norm
        self.dropout_rate = dropout_rate
        self.activation = activation
        head = [keras.layers.BatchNormalization(center=False, scale=False, epsilon=1e-6, name="probe_norm")] \
            if probe_norm else []
        head += [
            keras.layers.Dropout(dropout_rate, name="dropout"),
            keras.layers.Dense(num_classes, activation=activation, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01),
                               dtype=keras.DTypePolicy("float32") if activation == "softmax" else None,
                               name="logits"),
        ]
        # The head alone is a model too: a linear probe trains it on cached features.
        self.head = keras.Sequential(head, name="head")
        self.head.build((None, encoder.width))
        self.built = True
        self.set_mode(mode, blocks)

    @property
    def image_size(self):
        return self.encoder.image_size

    @property
    def num_channels(self):
        return self.encoder.num_channels

    def features(self, images, training=None):
        """Pooled encoder features `(B, D)`: what the head sees."""
        return pool_tokens(self.encoder(images, training=training), self.pooling)

    def call(self, images, training=None):
        return self.head(self.features(images, training=training), training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def set_mode(self, mode, blocks=None):
        """Chooses what trains: "linear" (head only), "partial" (head, the last `blocks`
        transformer blocks and the final norm) or "full" (everything)."""
        depth = self.encoder.depth
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if mode == "partial" and not (isinstance(blocks, int) and 1 <= blocks <= depth):
            raise ValueError(f"Partial fine-tuning needs 1 <= blocks <= {depth} (the encoder's depth), got {blocks!r}.")
        self.mode, self.blocks = mode, blocks
        trainable_blocks = {"linear": 0, "partial": blocks, "full": depth}[mode]
        # Keras hides all weights of a layer whose `trainable` is False, so the encoder
        # stays trainable and its parts are switched one by one.
        self.encoder.trainable = mode != "linear"
        if mode == "linear":
            return
        full = mode == "full"
        self.encoder.patch_embedding.trainable = full
        self.encoder.class_token.trainable = full
        for index, block in enumerate(self.encoder.blocks):
            block.trainable = index >= depth - trainable_blocks
        self.encoder.norm.trainable = True

    def layer_decay_multipliers(self, decay):
        """`{variable path: learning-rate multiplier}` of layer-wise decay (BEiT, MAE):
        the head and final norm get 1, block i gets decay ** (depth - i), the patch
        embedding and class token decay ** (depth + 1)."""
        depth = self.encoder.depth
        multipliers = {v.path: 1.0 for v in self.weights}
        embedding = [*self.encoder.patch_embedding.weights, *self.encoder.position_embedding.weights,
                     self.encoder.class_token]
        for variable in embedding:
            multipliers[variable.path] = decay ** (depth + 1)
        for index, block in enumerate(self.encoder.blocks):
            for variable in block.weights:
                multipliers[variable.path] = decay ** (depth - index)
        return multipliers

    def get_config(self):
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "num_classes": self.num_classes,
            "pooling": self.pooling,
            "probe_norm": self.probe_norm,
            "dropout_rate": self.dropout_rate,
            "activation": self.activation,
            "class_names": self.class_names,
            "mode": self.mode,
            "blocks": self.blocks,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)
