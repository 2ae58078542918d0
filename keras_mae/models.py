"""The encoder, the decoder and the Masked Autoencoder that trains them with `fit`.

Shapes in comments: B batch, N patches, K kept patches, D encoder width,
Dd decoder width, P = p * p * C pixels per patch.
"""

import inspect

import keras
import numpy as np
from keras import ops

from keras_mae import torch_compile
from keras_mae.layers import (
    Dense,
    Patchify,
    PatchEmbedding,
    SinCosPositionEmbedding,
    TransformerBlock,
    Unpatchify,
    _pair,
    call_sublayer,
    drop_path_rates,
    patch_grid,
    per_token,
)
from keras_mae.losses import NORM_PIX_EPSILON, masked_patch_loss, patch_statistics
from keras_mae.masking import RandomMasking, check_mask_ratio, unshuffle
from keras_mae.presets import check_preset
from keras_mae.quantization import KeepsQuantization


def token_initializer():
    """A new initializer per weight: one made at import time would draw its seed before
    `keras.utils.set_random_seed`, and processes of one run would start differently."""
    return keras.initializers.RandomNormal(stddev=0.02)


class CompiledSteps:
    """Mixin for `keras.Model`s: what `jit_compile="auto"` means for these ViTs.

    TensorFlow: Keras' "auto" leaves XLA off when there is no GPU; for these ViTs XLA is
    faster on a CPU as well (keras.io sizes, 2 cores, training: 610 vs 410 img/s;
    ViT-Tiny encoder `predict`: 129 vs 72 img/s). The choice applies to `compile()` and
    to an uncompiled model's `predict` alike. Under a several-replica `tf.distribute`
    strategy, and on torch, "auto" stays Keras' own choice. A saved model compiles again
    with "auto" on load, so a file saved under one backend gets the loading backend's
    choice (not torch.compile because XLA was on where it was saved).

    torch: `jit_compile=True` hands Keras' `train_step` itself to torch.compile, its first
    call eager (`torch_compile.compiled_train_function`).
    """

    def _resolve_auto_jit_compile(self):
        # Not across replicas: XLA cannot reach variables mirrored on other CPU devices.
        if keras.backend.backend() == "tensorflow" and self.distribute_strategy.num_replicas_in_sync == 1:
            return True
        return super()._resolve_auto_jit_compile()

    def compile_from_config(self, config):
        config = {**keras.saving.deserialize_keras_object(config), "jit_compile": "auto"}
        self.compile(**config)
        if self.built and getattr(self, "optimizer", None) is not None:
            self.optimizer.build(self.trainable_variables)

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force)
        if keras.backend.backend() == "torch" and self.jit_compile is True:
            self.train_function = torch_compile.compiled_train_function(self.train_step)
        return self.train_function


def _check_positive_int(value, name):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def _blocks(depth, num_heads, mlp_ratio, drop_path_rate, epsilon, seed, policy, prefix):
    return [
        TransformerBlock(
            num_heads,
            mlp_ratio=mlp_ratio,
            drop_path_rate=rate,
            layer_norm_epsilon=epsilon,
            seed=None if seed is None else seed + i,
            dtype=policy,
            name=f"{prefix}_{i}",
        )
        for i, rate in enumerate(drop_path_rates(drop_path_rate, depth))
    ]


@keras.saving.register_keras_serializable(package="keras_mae")
class MAEEncoder(KeepsQuantization, CompiledSteps, keras.Model):
    """The Vision Transformer encoder: images -> tokens `(B, 1 + N, D)`, class token first.

    Called on images it runs on every patch (features for downstream use). Pre-training
    uses its two halves: `embed` (patches -> position-aware tokens) and `encode`
    (any subset of those tokens -> class token + encoded tokens), so the transformer
    only ever sees the kept patches.

    Args:
        image_size: int or (height, width) of the input images.
        patch_size: int or (height, width) of a patch; must tile the image.
        num_channels: channels of the input images.
        width: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width over the token width.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        layer_norm_epsilon: epsilon of every layer norm.
        seed: int seed of the drop-path randomness.
    """

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        num_channels=3,
        width=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int(num_channels, "num_channels")
        _check_positive_int(depth, "depth")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.width = width
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.drop_path_rate = drop_path_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        self.seed = seed

        self.grid_size = patch_grid(image_size, patch_size)
        policy = self.dtype_policy
        self.patch_embedding = PatchEmbedding(patch_size, width, dtype=policy, name="patch_embedding")
        self.position_embedding = SinCosPositionEmbedding(
            self.grid_size, dtype=policy, name="position_embedding"
        )
        self.blocks = _blocks(
            depth, num_heads, mlp_ratio, drop_path_rate, layer_norm_epsilon, seed, policy, "block"
        )
        self.norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=policy, name="norm"
        )
        self.build((None, *_pair(image_size, "image_size"), num_channels))

    @property
    def num_patches(self):
        return self.grid_size[0] * self.grid_size[1]

    def build(self, input_shape):
        self.check_images(input_shape)
        token_shape = (None, self.num_patches, self.width)
        self.patch_embedding.build(input_shape)
        self.position_embedding.build(token_shape)
        self.class_token = self.add_weight(
            shape=(1, 1, self.width), initializer=token_initializer(), name="class_token"
        )
        for block in self.blocks:
            block.build(token_shape)
        self.norm.build(token_shape)
        self.built = True

    def check_images(self, shape):
        """Raises a ValueError unless `shape` is `(batch, height, width, channels)` of this model."""
        expected = (*_pair(self.image_size, "image_size"), self.num_channels)
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise ValueError(
                f"Expected images shaped (batch, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(height, width, channels), got {tuple(shape)}."
            )

    def embed(self, images, patch_ids=None):
        """Images `(B, H, W, C)` -> patch tokens with positions `(B, N, D)`, or only the
        patches `patch_ids` `(B, K)` -> `(B, K, D)`."""
        self.check_images(images.shape)
        tokens = call_sublayer(self.patch_embedding, images, patch_ids=patch_ids)
        return call_sublayer(self.position_embedding, tokens, patch_ids=patch_ids)

    def encode(self, tokens, training=None):
        """Tokens `(B, T, D)` (any subset of patches) -> `(B, 1 + T, D)`, class token first."""
        class_token = ops.cast(self.class_token, tokens.dtype)
        class_token = ops.broadcast_to(class_token, (ops.shape(tokens)[0], 1, self.width))
        x = ops.concatenate([class_token, tokens], axis=1)
        for block in self.blocks:
            x = call_sublayer(block, x, training=training)
        return call_sublayer(self.norm, x)

    def call(self, images, training=None):
        return self.encode(self.embed(images), training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1 + self.num_patches, self.width)

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "width": self.width,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "drop_path_rate": self.drop_path_rate,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="keras_mae")
class MAEDecoder(KeepsQuantization, keras.Model):
    """The lightweight decoder: encoded kept tokens -> pixels of every patch `(B, N, P)`.

    Projects the encoder's tokens to its own width, appends one shared learned mask
    token per removed patch, un-shuffles to image order, adds its own position
    embeddings, runs its blocks and predicts each patch's pixels with a per-patch
    linear head.

    Args:
        image_size, patch_size, num_channels: as the encoder's; they fix N and P.
        input_width: the encoder's token width.
        width, depth, num_heads, mlp_ratio, layer_norm_epsilon: the decoder's ViT.
        use_mask_token: False when the encoder already holds every patch (the
            paper's "encoder with [M]" baseline) and there is nothing to fill in.
    """

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        num_channels=3,
        input_width=768,
        width=512,
        depth=8,
        num_heads=16,
        mlp_ratio=4.0,
        layer_norm_epsilon=1e-6,
        use_mask_token=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int(num_channels, "num_channels")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.input_width = input_width
        self.width = width
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_mask_token = use_mask_token

        self.grid_size = patch_grid(image_size, patch_size)
        ph, pw = _pair(patch_size, "patch_size")
        policy = self.dtype_policy
        self.embed = Dense(width, dtype=policy, name="embed")
        self.position_embedding = SinCosPositionEmbedding(
            self.grid_size, dtype=policy, name="position_embedding"
        )
        self.blocks = _blocks(depth, num_heads, mlp_ratio, 0.0, layer_norm_epsilon, None, policy, "block")
        self.norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=policy, name="norm"
        )
        self.head = Dense(ph * pw * num_channels, dtype=policy, name="head")
        self.build((None, None, input_width))

    @property
    def num_patches(self):
        return self.grid_size[0] * self.grid_size[1]

    def build(self, input_shape):
        token_shape = (None, self.num_patches, self.width)
        self.embed.build(input_shape)
        if self.use_mask_token:
            self.mask_token = self.add_weight(
                shape=(1, 1, self.width), initializer=token_initializer(), name="mask_token"
            )
        self.position_embedding.build(token_shape)
        for block in self.blocks:
            block.build(token_shape)
        self.norm.build(token_shape)
        self.head.build(token_shape)
        self.built = True

    def call(self, latent, ids_restore=None, patch_ids=None, training=None):
        """`latent` `(B, 1 + K, D)` from the encoder; `ids_restore` `(B, N)` from the masking.

        Without `ids_restore` the latent must already hold all N patches in image order.
        With `patch_ids` `(B, M)` (image-order indices) only those patches are predicted,
        `(B, M, P)`: in the last block every token is still a key and a value, but its
        queries, projection, MLP, and the norm and head after it, run on M tokens alone.
        """
        x = per_token(lambda tokens: call_sublayer(self.embed, tokens), latent)  # (B, 1 + K, Dd)
        class_token, patches = x[:, :1], x[:, 1:]
        if ids_restore is not None:
            if not self.use_mask_token:
                raise ValueError("This decoder has no mask token: pass all N patches, no ids_restore.")
            num_missing = self.num_patches - patches.shape[1]
            mask_tokens = ops.broadcast_to(
                ops.cast(self.mask_token, x.dtype), (ops.shape(x)[0], num_missing, self.width)
            )
            patches = unshuffle(ops.concatenate([patches, mask_tokens], axis=1), ids_restore)
        x = ops.concatenate([class_token, call_sublayer(self.position_embedding, patches)], axis=1)
        for block in self.blocks[:-1]:
            x = call_sublayer(block, x, training=training)
        if patch_ids is None:
            x = call_sublayer(self.blocks[-1], x, training=training)[:, 1:]  # (B, N, Dd)
        else:  # the class token is token 0, so patch i is token i + 1
            x = call_sublayer(self.blocks[-1], x, training=training, token_ids=patch_ids + 1)  # (B, M, Dd)
        return per_token(lambda tokens: call_sublayer(self.head, call_sublayer(self.norm, tokens)), x)

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "input_width": self.input_width,
            "width": self.width,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "use_mask_token": self.use_mask_token,
        }


@keras.saving.register_keras_serializable(package="keras_mae")
class MaskedAutoencoder(KeepsQuantization, CompiledSteps, keras.Model):
    """Masked Autoencoder (He et al., 2021) that pre-trains a ViT with plain `fit`.

    `mae(images)` masks each image, encodes the kept patches, decodes every patch and
    returns `{"pred": (B, N, P), "mask": (B, N) with 1 = removed, "ids_restore": (B, N)}`.
    In training (`training=True`, as in `fit`) only the removed patches are predicted,
    the only ones the loss reads, and the kept patches' rows of `"pred"` are zeros: the
    decoder's last block, norm and head then skip the kept patches.
    Training needs only images (labels, if the dataset yields them, are ignored): the
    loss is the pixel MSE on the removed patches, computed in `compute_loss`, so every
    backend's own `train_step` runs it.

    Args:
        image_size: int or (height, width) of the input images.
        patch_size: int or (height, width) of a patch; must tile the image.
        num_channels: channels of the input images (1 grayscale, 3 RGB, ...).
        encoder_width, encoder_depth, encoder_num_heads: the ViT being pre-trained.
        decoder_width, decoder_depth, decoder_num_heads: the decoder (thrown away after).
        mlp_ratio: MLP hidden width over token width, encoder and decoder.
        mask_ratio: fraction of patches removed, in (0, 1); 0.75 in the paper.
        mask_sampling: "random" (paper default), "block" or "grid".
        norm_pix_loss: predict per-patch normalised pixels (better features).
        mask_tokens_in_encoder: the paper's slower baseline where the encoder runs on
            all patches with mask tokens in place of the removed ones.
        drop_path_rate: stochastic depth of the encoder (0 in MAE pre-training).
        layer_norm_epsilon: epsilon of every layer norm.
        seed: int seed of masking and drop path.
    """

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        num_channels=3,
        encoder_width=768,
        encoder_depth=12,
        encoder_num_heads=12,
        decoder_width=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        mask_ratio=0.75,
        mask_sampling="random",
        norm_pix_loss=False,
        mask_tokens_in_encoder=False,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_mask_ratio(mask_ratio)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.encoder_width = encoder_width
        self.encoder_depth = encoder_depth
        self.encoder_num_heads = encoder_num_heads
        self.decoder_width = decoder_width
        self.decoder_depth = decoder_depth
        self.decoder_num_heads = decoder_num_heads
        self.mlp_ratio = mlp_ratio
        self.mask_ratio = mask_ratio
        self.mask_sampling = mask_sampling
        self.norm_pix_loss = norm_pix_loss
        self.mask_tokens_in_encoder = mask_tokens_in_encoder
        self.drop_path_rate = drop_path_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        self.seed = seed

        policy = self.dtype_policy
        self.encoder = MAEEncoder(
            image_size,
            patch_size,
            num_channels,
            width=encoder_width,
            depth=encoder_depth,
            num_heads=encoder_num_heads,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            layer_norm_epsilon=layer_norm_epsilon,
            seed=seed,
            dtype=policy,
            name="encoder",
        )
        self.decoder = MAEDecoder(
            image_size,
            patch_size,
            num_channels,
            input_width=encoder_width,
            width=decoder_width,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
            layer_norm_epsilon=layer_norm_epsilon,
            use_mask_token=not mask_tokens_in_encoder,
            dtype=policy,
            name="decoder",
        )
        self.masking = RandomMasking(
            self.encoder.grid_size, mask_ratio, mask_sampling, seed=seed, name="masking"
        )
        # The loss targets and the pictures `reconstruct` returns stay float32 under a
        # global mixed policy (train.py's --dtype-policy), which would round them to bf16.
        self.patchify = Patchify(patch_size, dtype="float32", name="patchify")
        self.unpatchify = Unpatchify(image_size, patch_size, dtype="float32", name="unpatchify")
        self.build((None, *_pair(image_size, "image_size"), num_channels))

    def build(self, input_shape):
        self.encoder.check_images(input_shape)
        if self.mask_tokens_in_encoder:
            self.encoder_mask_token = self.add_weight(
                shape=(1, 1, self.encoder_width),
                initializer=token_initializer(),
                name="encoder_mask_token",
            )
        # Weightless, but built: `quantize` stops at any unbuilt layer inside a model.
        patch = self.decoder.head.units
        self.patchify.build(input_shape)
        self.unpatchify.build((None, self.encoder.num_patches, patch))
        self.masking.build((None, self.encoder.num_patches, self.encoder_width))
        self.built = True

    @classmethod
    def from_preset(cls, name, **overrides):
        """Builds a named configuration (`keras_mae.list_presets()`), any argument overridden."""
        config = check_preset(name)
        accepted = inspect.signature(cls.__init__).parameters
        unknown = sorted(set(overrides) - set(accepted) - {"name", "dtype"})
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for {cls.__name__}; valid: "
                f"{[p for p in accepted if p not in ('self', 'kwargs')]}."
            )
        return cls(**{**config, **overrides})

    def call(self, images, noise=None, training=None):
        ids_shuffle, mask, ids_restore = self.masking.shuffle(ops.shape(images)[0], noise)  # (B, N) each
        num_keep = self.masking.num_keep
        ids_keep = ids_shuffle[:, :num_keep]  # (B, K)
        # Training predicts only the removed patches, the only ones the loss reads.
        predicted = ids_shuffle[:, num_keep:] if training else None  # (B, N - K)
        if self.mask_tokens_in_encoder:
            tokens = self.encoder.embed(images)  # (B, N, D)
            table = ops.cast(self.encoder.position_embedding.table, tokens.dtype)[None]
            filler = ops.cast(self.encoder_mask_token, tokens.dtype) + table  # (1, N, D)
            tokens = ops.where(ops.expand_dims(mask, -1) > 0, filler, tokens)
            latent, unshuffle_ids = self.encoder.encode(tokens, training=training), None
        else:
            kept = self.encoder.embed(images, patch_ids=ids_keep)  # (B, K, D), only what is seen
            latent = self.encoder.encode(kept, training=training)  # (B, 1 + K, D)
            unshuffle_ids = ids_restore
        pred = call_sublayer(
            self.decoder, latent, ids_restore=unshuffle_ids, patch_ids=predicted, training=training
        )
        if predicted is not None:  # back to (B, N, P) in image order, kept patches zero
            unpredicted = ops.zeros((ops.shape(pred)[0], num_keep, pred.shape[-1]), dtype=pred.dtype)
            pred = unshuffle(ops.concatenate([unpredicted, pred], axis=1), ids_restore)
        return {"pred": pred, "mask": mask, "ids_restore": ids_restore}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = masked_patch_loss(self.patchify(x), y_pred["pred"], y_pred["mask"], self.norm_pix_loss)
        for extra in self.losses:
            loss = loss + ops.cast(extra, loss.dtype)
        return loss

    def reconstruct(self, images, seed=0):
        """Masks, encodes and decodes `images`; returns numpy arrays for display.

        `"masked"` (removed patches zeroed), `"reconstruction"` (every patch predicted),
        `"pasted"` (visible patches from the input, removed ones predicted), each shaped
        like `images`, and `"mask"` `(B, N)`. With `norm_pix_loss` the prediction is
        mapped back to pixels with each patch's own mean and variance, as the paper's
        figures do. The same `seed` gives the same mask.
        """
        images = ops.convert_to_tensor(np.asarray(images, dtype="float32"))
        self.encoder.check_images(images.shape)
        noise = self.masking.sample_noise(images.shape[0], seed=seed)
        pictures = self.to_pixels(images, self(images, noise=noise, training=False))
        return {key: ops.convert_to_numpy(value) for key, value in pictures.items()}

    def to_pixels(self, images, outputs):
        """`self(images)`'s outputs as images: `masked`, `reconstruction`, `pasted`, plus `mask`.

        One home for the display logic of `reconstruct` and the exported reconstructor.
        """
        pred, mask = ops.cast(outputs["pred"], "float32"), outputs["mask"]
        if self.norm_pix_loss:
            mean, variance = patch_statistics(self.patchify(images))
            pred = pred * ops.sqrt(variance + NORM_PIX_EPSILON) + mean
        reconstruction = self.unpatchify(pred)
        removed = self.unpatchify(ops.repeat(ops.expand_dims(mask, -1), pred.shape[-1], axis=-1))
        visible = images * (1.0 - removed)
        return {
            "masked": visible,
            "reconstruction": reconstruction,
            "pasted": visible + reconstruction * removed,
            "mask": mask,
        }

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "encoder_width": self.encoder_width,
            "encoder_depth": self.encoder_depth,
            "encoder_num_heads": self.encoder_num_heads,
            "decoder_width": self.decoder_width,
            "decoder_depth": self.decoder_depth,
            "decoder_num_heads": self.decoder_num_heads,
            "mlp_ratio": self.mlp_ratio,
            "mask_ratio": self.mask_ratio,
            "mask_sampling": self.mask_sampling,
            "norm_pix_loss": self.norm_pix_loss,
            "mask_tokens_in_encoder": self.mask_tokens_in_encoder,
            "drop_path_rate": self.drop_path_rate,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "seed": self.seed,
        }

