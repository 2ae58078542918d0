"""Named MAE configurations: the paper's three and small ones that train on a CPU.

Names read `mae_vit_<size>_patch<p>`. The paper's models use 224 px RGB images and
the 8-block, 512-wide decoder; the small ones 32 px images with 4 px patches (pass
`image_size=28, num_channels=1` for Fashion-MNIST as it comes).
"""

_PAPER_DECODER = dict(decoder_width=512, decoder_depth=8, decoder_num_heads=16)
_SMALL_IMAGES = dict(image_size=32, patch_size=4, num_channels=3)

PRESETS = {
    "mae_vit_debug_patch4": dict(
        description="2 x 32 encoder, 1 x 32 decoder: runs everything in seconds (tests, smoke runs).",
        config=dict(
            **_SMALL_IMAGES,
            encoder_width=32, encoder_depth=2, encoder_num_heads=2,
            decoder_width=32, decoder_depth=1, decoder_num_heads=2,
        ),
    ),
    "mae_vit_mini_patch4": dict(
        description="6 x 128 encoder, 2 x 64 decoder (the keras.io example's sizes): minutes on a laptop CPU.",
        config=dict(
            **_SMALL_IMAGES,
            encoder_width=128, encoder_depth=6, encoder_num_heads=4,
            decoder_width=64, decoder_depth=2, decoder_num_heads=4,
        ),
    ),
    "mae_vit_tiny_patch4": dict(
        description="ViT-Tiny encoder (12 x 192, 3 heads), 2 x 128 decoder, for 32 px images.",
        config=dict(
            **_SMALL_IMAGES,
            encoder_width=192, encoder_depth=12, encoder_num_heads=3,
            decoder_width=128, decoder_depth=2, decoder_num_heads=4,
        ),
    ),
    "mae_vit_base_patch16": dict(
        description="The paper's ViT-B/16 (12 x 768, 12 heads) with the 8 x 512 decoder, 224 px.",
        config=dict(
            image_size=224, patch_size=16, num_channels=3,
            encoder_width=768, encoder_depth=12, encoder_num_heads=12, **_PAPER_DECODER,
        ),
    ),
    "mae_vit_large_patch16": dict(
        description="The paper's ViT-L/16 (24 x 1024, 16 heads) with the 8 x 512 decoder, 224 px.",
        config=dict(
            image_size=224, patch_size=16, num_channels=3,
            encoder_width=1024, encoder_depth=24, encoder_num_heads=16, **_PAPER_DECODER,
        ),
    ),
    "mae_vit_huge_patch14": dict(
        description="The paper's ViT-H/14 (32 x 1280, 16 heads) with the 8 x 512 decoder, 224 px.",
        config=dict(
            image_size=224, patch_size=14, num_channels=3,
            encoder_width=1280, encoder_depth=32, encoder_num_heads=16, **_PAPER_DECODER,
        ),
    ),
}


def list_presets():
    """`{name: description}` of every preset `MaskedAutoencoder.from_preset` accepts."""
    return {name: preset["description"] for name, preset in PRESETS.items()}


def check_preset(name):
    """The config of preset `name`; a ValueError that lists the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}. Valid presets: {', '.join(PRESETS)}.")
    return dict(PRESETS[name]["config"])
