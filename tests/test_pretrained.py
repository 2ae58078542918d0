"""The model shipped in saved_models/ loads under every backend and has learned something."""

from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from keras_mae.data import load_source
from keras_mae.losses import masked_patch_loss

SHIPPED = Path(__file__).resolve().parents[1] / "saved_models" / "pretrained_fashion_mnist_mini" / "mae.keras"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_shipped_model_reconstructs_held_out_images_far_better_than_a_blank_guess():
    mae = keras.saving.load_model(SHIPPED)
    assert mae.get_config()["image_size"] == 28 and mae.get_config()["num_channels"] == 1
    images = load_source("fashion_mnist", split="test").images[:256].astype("float32") / 255.0
    out = mae(images, noise=np.random.default_rng(0).random((256, 49), dtype=np.float32))
    targets = mae.patchify(images)
    loss = float(ops.convert_to_numpy(masked_patch_loss(targets, out["pred"], out["mask"])))
    # Predicting every removed patch as the mean visible pixel value of its image:
    visible = ops.convert_to_numpy(targets) * (1 - ops.convert_to_numpy(out["mask"]))[..., None]
    means = visible.sum(axis=(1, 2)) / ((1 - ops.convert_to_numpy(out["mask"])).sum(axis=1) * 16)
    guess = np.broadcast_to(means[:, None, None], visible.shape)
    baseline = float(ops.convert_to_numpy(masked_patch_loss(targets, guess, out["mask"])))
    assert loss < 0.05 and loss < 0.5 * baseline, (loss, baseline)
    assert tuple(mae.encoder(images[:2]).shape) == (2, 50, 128)
