import numpy as np
import pytest

import keras_mae

# Parameters of the official pre-training models (facebookresearch/mae models_mae.py),
# frozen sin-cos tables (with their all-zero class row) included: the timm ViT
# encoder without its classifier, plus decoder_embed, mask_token, decoder_pos_embed,
# 8 x 512 blocks, decoder_norm and decoder_pred.
OFFICIAL_PARAMETERS = {
    "mae_vit_base_patch16": 111_907_840,
    "mae_vit_large_patch16": 329_541_888,
    "mae_vit_huge_patch14": 657_074_508,
}


def test_list_presets_names_the_paper_and_small_models():
    presets = keras_mae.list_presets()
    assert set(OFFICIAL_PARAMETERS) <= set(presets)
    assert {"mae_vit_debug_patch4", "mae_vit_tiny_patch4"} <= set(presets)
    assert all(isinstance(text, str) and text for text in presets.values())


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMETERS))
def test_paper_presets_match_official_parameter_counts(name):
    mae = keras_mae.MaskedAutoencoder.from_preset(name)
    assert mae.count_params() == pytest.approx(OFFICIAL_PARAMETERS[name], rel=0.01)
    # Only the two all-zero class rows of the official position tables are not stored.
    assert OFFICIAL_PARAMETERS[name] - mae.count_params() == mae.encoder_width + mae.decoder_width


def test_small_preset_with_overrides_trains_on_fashion_mnist_shapes():
    mae = keras_mae.MaskedAutoencoder.from_preset("mae_vit_debug_patch4", image_size=28, num_channels=1)
    images = np.zeros((2, 28, 28, 1), dtype=np.float32)
    assert tuple(mae(images)["pred"].shape) == (2, 49, 16)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown preset 'mae_vit_gigantic'. Valid presets: .*mae_vit_base_patch16"):
        keras_mae.MaskedAutoencoder.from_preset("mae_vit_gigantic")


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['mask_rate'\]"):
        keras_mae.MaskedAutoencoder.from_preset("mae_vit_debug_patch4", mask_rate=0.5)
