"""Use published MAE weights: official PyTorch checkpoints and HuggingFace ViTMAE.

    python -m keras_mae.convert mae_pretrain_vit_base.pth --output mae_vit_base.keras
    python -m keras_mae.convert ./vit-mae-base/ --output mae_vit_base.keras

Every layout is first renamed to the official one (`patch_embed.proj.weight`,
`blocks.N.attn.qkv.weight`, `decoder_embed.weight`, ...; HuggingFace's separate
query/key/value are fused into `qkv`), the architecture is read off the tensor shapes
(and `config.json` where there is one), and the tensors are copied into a
`MaskedAutoencoder` (or an `MAEEncoder` for encoder-only checkpoints) with torch's
`(out, in)` kernels transposed to Keras' `(in, out)`. Anything that cannot be mapped
raises `ConversionError` naming the tensor.

Reading `.pth` / `.bin` needs torch; `.safetensors` needs safetensors.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

# Heads of the paper's encoders by width, and of its 512-wide decoder.
PAPER_HEADS = {768: 12, 1024: 16, 1280: 16, 512: 16}
SKIPPED = ("head.", "fc_norm.")  # classifier of fine-tuned checkpoints: not part of the encoder


class ConversionError(ValueError):
    """A checkpoint that cannot be mapped onto keras_mae, with the reason."""


def read_checkpoint(source):
    """`(tensors, hf_config)`: numpy arrays by name, and HuggingFace's config dict or None."""
    source = Path(source)
    config = None
    if source.is_dir():
        if (source / "config.json").is_file():
            config = json.loads((source / "config.json").read_text())
        weights = [source / n for n in ("model.safetensors", "pytorch_model.bin") if (source / n).is_file()]
        if not weights:
            raise ConversionError(f"{source} holds neither model.safetensors nor pytorch_model.bin.")
        source = weights[0]
    if not source.is_file():
        raise ConversionError(f"{source} does not exist.")
    if source.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(str(source)), config
        except Exception as error:
            raise ConversionError(f"{source} is not a safetensors file: {error}") from None
    try:
        import torch
    except ImportError:
        raise ConversionError("Reading a PyTorch checkpoint needs torch: pip install torch") from None
    try:
        state = torch.load(str(source), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConversionError(f"{source} is not a PyTorch checkpoint: {str(error).splitlines()[0]}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ConversionError(f"{source} holds no state dict of tensors.")
    return {k: v.detach().float().numpy() for k, v in state.items()}, config


_HF_BLOCK = [
    (r"attention\.(?:attention\.)?(query|q_proj)\.", "attn.q."),
    (r"attention\.(?:attention\.)?(key|k_proj)\.", "attn.k."),
    (r"attention\.(?:attention\.)?(value|v_proj)\.", "attn.v."),
    (r"attention\.(?:output\.dense|o_proj)\.", "attn.proj."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"^output\.dense\.", "mlp.fc2."),
    (r"layernorm_before\.", "norm1."),
    (r"layernorm_after\.", "norm2."),
]
_HF_TOP = [
    (r"^vit\.embeddings\.cls_token$", "cls_token"),
    (r"^vit\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^vit\.layernorm\.", "norm."),
    (r"^decoder\.decoder_embed\.", "decoder_embed."),
    (r"^decoder\.mask_token$", "mask_token"),
    (r"^decoder\.decoder_pos_embed$", "decoder_pos_embed"),
    (r"^decoder\.decoder_norm\.", "decoder_norm."),
    (r"^decoder\.decoder_pred\.", "decoder_pred."),
]


def to_official_names(tensors):
    """Renames HuggingFace layouts (transformers 4 and 5) to the official one and fuses
    separate q/k/v into `qkv`; official checkpoints pass through unchanged."""
    renamed = {}
    for name, value in tensors.items():
        block = re.match(
            r"^(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)\.(\d+)\.(.*)$",
            name,
        )
        if block:
            prefix = "blocks" if block.group(1).startswith("vit") else "decoder_blocks"
            rest = block.group(3)
            for pattern, replacement in _HF_BLOCK:
                rest = re.sub(pattern, replacement, rest)
            name = f"{prefix}.{block.group(2)}.{rest}"
        else:
            for pattern, replacement in _HF_TOP:
                name = re.sub(pattern, replacement, name)
        renamed[name] = value
    for name in [n for n in renamed if re.search(r"\.attn\.q\.(weight|bias)$", n)]:
        stem, kind = name.rsplit(".q.", 1)
        parts = [renamed.pop(f"{stem}.{p}.{kind}", None) for p in "qkv"]
        if any(p is None for p in parts):
            raise ConversionError(f"{stem}: query, key and value {kind} must all be present.")
        renamed[f"{stem}.qkv.{kind}"] = np.concatenate(parts, axis=0)
    return renamed


def _count(tensors, prefix):
    indices = {int(m.group(1)) for n in tensors for m in [re.match(rf"^{prefix}\.(\d+)\.", n)] if m}
    if indices != set(range(len(indices))):
        raise ConversionError(f"{prefix} indices are not 0..N-1: {sorted(indices)}.")
    return len(indices)


def _require(tensors, name, ndim=None):
    if name not in tensors:
        raise ConversionError(f"Missing tensor {name!r} (found: {', '.join(sorted(tensors)[:12])}, ...).")
    value = tensors[name]
    if ndim is not None and value.ndim != ndim:
        raise ConversionError(f"Tensor {name!r} has shape {value.shape}, expected {ndim} dimensions.")
    return value


def infer_config(tensors, hf_config=None, num_heads=None, decoder_num_heads=None):
    """`MaskedAutoencoder` (or encoder-only) arguments read off the tensor shapes."""
    hf_config = hf_config or {}
    width, channels, patch, patch_w = _require(tensors, "patch_embed.proj.weight", 4).shape
    if patch != patch_w:
        raise ConversionError(f"Non-square patches {patch}x{patch_w} in patch_embed.proj.weight are not supported.")
    if "pos_embed" in tensors:
        num_patches = tensors["pos_embed"].shape[-2] - 1
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ConversionError(f"pos_embed {tensors['pos_embed'].shape}: {num_patches} patches is not a square grid.")
        image_size = grid * patch
    else:
        image_size = hf_config.get("image_size", 224)
    depth = _count(tensors, "blocks")
    hidden = _require(tensors, "blocks.0.mlp.fc1.weight", 2).shape[0]
    config = dict(
        image_size=image_size,
        patch_size=patch,
        num_channels=channels,
        encoder_width=width,
        encoder_depth=depth,
        encoder_num_heads=num_heads or hf_config.get("num_attention_heads") or PAPER_HEADS.get(width),
        mlp_ratio=hidden / width,
        layer_norm_epsilon=hf_config.get("layer_norm_eps", 1e-6),
    )
    if config["encoder_num_heads"] is None:
        raise ConversionError(f"Cannot tell the head count of a {width}-wide encoder: pass --num-heads.")
    if not hf_config.get("qkv_bias", True) or "blocks.0.attn.qkv.bias" not in tensors:
        raise ConversionError("Attention without a qkv bias is not supported (every MAE checkpoint has one).")
    if "decoder_embed.weight" in tensors:
        decoder_width = tensors["decoder_embed.weight"].shape[0]
        decoder_hidden = _require(tensors, "decoder_blocks.0.mlp.fc1.weight", 2).shape[0]
        if decoder_hidden / decoder_width != config["mlp_ratio"]:
            raise ConversionError(
                f"Decoder MLP ratio {decoder_hidden / decoder_width} differs from the encoder's "
                f"{config['mlp_ratio']}; keras_mae shares one mlp_ratio."
            )
        config.update(
            decoder_width=decoder_width,
            decoder_depth=_count(tensors, "decoder_blocks"),
            decoder_num_heads=decoder_num_heads
            or hf_config.get("decoder_num_attention_heads")
            or PAPER_HEADS.get(decoder_width),
            # A config saved for feature extraction may say 0: keep the paper's ratio then.
            mask_ratio=hf_config["mask_ratio"] if 0 < hf_config.get("mask_ratio", 0) < 1 else 0.75,
            norm_pix_loss=bool(hf_config.get("norm_pix_loss", False)),
        )
        if config["decoder_num_heads"] is None:
            raise ConversionError(f"Cannot tell the head count of a {decoder_width}-wide decoder: pass --decoder-num-heads.")
    return config


class _Copier:
    """Copies named tensors into Keras variables, checking shapes and tracking use."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.used = set()

    def take(self, name):
        self.used.add(name)
        return _require(self.tensors, name)

    def assign(self, variable, name, transform=lambda x: x):
        value = transform(self.take(name))
        if tuple(value.shape) != tuple(variable.shape):
            raise ConversionError(
                f"Tensor {name!r} maps to shape {tuple(value.shape)}, but {variable.path} is {tuple(variable.shape)}."
            )
        variable.assign(value.astype("float32"))

    def dense(self, layer, name):
        self.assign(layer.kernel, f"{name}.weight", lambda w: w.T)
        self.assign(layer.bias, f"{name}.bias")

    def norm(self, layer, name):
        self.assign(layer.gamma, f"{name}.weight")
        self.assign(layer.beta, f"{name}.bias")

    def positions(self, layer, name):
        table = self.take(name).reshape(-1, layer.table.shape[-1])
        if not np.allclose(table[0], 0.0):
            raise ConversionError(f"{name} gives the class token a position embedding; keras_mae's is zero.")
        self.assign(layer.table, name, lambda _: table[1:])

    def blocks(self, blocks, prefix):
        for i, block in enumerate(blocks):
            name = f"{prefix}.{i}"
            self.norm(block.norm1, f"{name}.norm1")
            self.dense(block.attention.qkv, f"{name}.attn.qkv")
            self.dense(block.attention.proj, f"{name}.attn.proj")
            self.norm(block.norm2, f"{name}.norm2")
            self.dense(block.mlp_hidden, f"{name}.mlp.fc1")
            self.dense(block.mlp_output, f"{name}.mlp.fc2")


def load_into(model, tensors):
    """Copies official-layout tensors into a `MaskedAutoencoder` or `MAEEncoder`; returns
    the names of tensors deliberately left out (a fine-tuned checkpoint's classifier)."""
    from keras_mae.models import MaskedAutoencoder

    copier = _Copier(tensors)
    encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
    patch_kernel = encoder.patch_embedding.projection.kernel
    copier.assign(patch_kernel, "patch_embed.proj.weight",
                  lambda w: w.transpose(2, 3, 1, 0).reshape(patch_kernel.shape))
    copier.assign(encoder.patch_embedding.projection.bias, "patch_embed.proj.bias")
    copier.assign(encoder.class_token, "cls_token", lambda t: t.reshape(1, 1, -1))
    if "pos_embed" in tensors:
        copier.positions(encoder.position_embedding, "pos_embed")
    copier.blocks(encoder.blocks, "blocks")
    if "norm.weight" in tensors or "fc_norm.weight" not in tensors:
        copier.norm(encoder.norm, "norm")
    else:  # global-pool fine-tuning replaced the token norm by fc_norm after pooling
        encoder.norm.gamma.assign(np.ones(encoder.norm.gamma.shape, "float32"))
        encoder.norm.beta.assign(np.zeros(encoder.norm.beta.shape, "float32"))
    if isinstance(model, MaskedAutoencoder):
        decoder = model.decoder
        copier.dense(decoder.embed, "decoder_embed")
        copier.assign(decoder.mask_token, "mask_token", lambda t: t.reshape(1, 1, -1))
        if "decoder_pos_embed" in tensors:
            copier.positions(decoder.position_embedding, "decoder_pos_embed")
        copier.blocks(decoder.blocks, "decoder_blocks")
        copier.norm(decoder.norm, "decoder_norm")
        copier.dense(decoder.head, "decoder_pred")
    left = sorted(set(tensors) - copier.used)
    skipped = [n for n in left if n.startswith(SKIPPED)]
    unexpected = [n for n in left if not n.startswith(SKIPPED)]
    if unexpected:
        raise ConversionError(f"Unexpected tensors that keras_mae has no place for: {', '.join(unexpected)}.")
    return skipped


def convert(source, num_heads=None, decoder_num_heads=None):
    """Reads a checkpoint and returns `(model, skipped_tensor_names)`."""
    from keras_mae.models import MAEEncoder, MaskedAutoencoder

    raw, hf_config = read_checkpoint(source)
    tensors = to_official_names(raw)
    config = infer_config(tensors, hf_config, num_heads, decoder_num_heads)
    if "decoder_embed.weight" in tensors:
        model = MaskedAutoencoder(**config)
    else:
        model = MAEEncoder(
            config["image_size"], config["patch_size"], config["num_channels"],
            width=config["encoder_width"], depth=config["encoder_depth"],
            num_heads=config["encoder_num_heads"], mlp_ratio=config["mlp_ratio"],
            layer_norm_epsilon=config["layer_norm_epsilon"],
        )
    try:
        skipped = load_into(model, tensors)
    except ValueError as error:  # a head count that does not divide the width, say
        raise ConversionError(str(error)) from None
    return model, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_mae.convert",
        description="Convert an official MAE PyTorch checkpoint (.pth, {'model': state_dict}) or a "
                    "HuggingFace ViTMAE directory / .safetensors file to a keras_mae .keras file.",
    )
    parser.add_argument("source", help="A .pth/.bin/.safetensors file or a HuggingFace model directory.")
    parser.add_argument("--output", required=True, help="The .keras file to write.")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="Encoder attention heads, when neither a config.json nor the paper's "
                             "presets (768: 12, 1024/1280: 16) tell.")
    parser.add_argument("--decoder-num-heads", type=int, default=None,
                        help="Decoder attention heads (default: config.json, else 16 for a 512-wide decoder).")
    args = parser.parse_args(argv)
    if not args.output.endswith(".keras"):
        parser.exit(2, f"{parser.prog}: error: --output must end in .keras, got {args.output}\n")
    try:
        model, skipped = convert(args.source, args.num_heads, args.decoder_num_heads)
    except ConversionError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    model.save(args.output)
    kind = type(model).__name__
    print(f"Wrote {args.output}: {kind} with {model.count_params():,} parameters.")
    if skipped:
        print(f"Left out (the fine-tuned classifier, not part of the encoder): {', '.join(skipped)}")


if __name__ == "__main__":
    sys.exit(main())
