import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from conftest import random_images, tiny_mae

ROOT = Path(__file__).resolve().parents[1]


def trained_mae(**overrides):
    mae = tiny_mae(**overrides)
    mae.compile(optimizer=keras.optimizers.AdamW(1e-3))
    mae.fit(random_images(batch=8, seed=2), batch_size=4, epochs=1, verbose=0)
    return mae


@pytest.mark.parametrize("options", [dict(), dict(norm_pix_loss=True, mask_sampling="block", mask_tokens_in_encoder=True)])
def test_keras_file_round_trip_gives_identical_outputs(tmp_path, images, options):
    mae = trained_mae(**options)
    path = tmp_path / "mae.keras"
    mae.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: the classes are registered
    assert type(loaded) is type(mae) and loaded.get_config() == mae.get_config()
    expected, got = mae.reconstruct(images, seed=5), loaded.reconstruct(images, seed=5)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    np.testing.assert_array_equal(
        ops.convert_to_numpy(loaded.encoder(images)), ops.convert_to_numpy(mae.encoder(images))
    )
    # Training state travels too: the optimizer resumes where it stopped.
    assert int(loaded.optimizer.iterations) == int(mae.optimizer.iterations) == 2


def test_encoder_saves_and_loads_on_its_own(tmp_path, images):
    encoder = trained_mae().encoder
    encoder.save(tmp_path / "encoder.keras")
    loaded = keras.saving.load_model(tmp_path / "encoder.keras")
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(images)), ops.convert_to_numpy(encoder(images)))


LOAD_ELSEWHERE = """
import sys, numpy as np, keras
import keras_mae  # registers the classes
data = np.load(sys.argv[2])
mae = keras.saving.load_model(sys.argv[1])
out = mae(data["images"], noise=data["noise"])
np.savez(sys.argv[3], pred=keras.ops.convert_to_numpy(out["pred"]),
         mask=keras.ops.convert_to_numpy(out["mask"]),
         tokens=keras.ops.convert_to_numpy(mae.encoder(data["images"])))
"""


@pytest.mark.parametrize("other", ["tensorflow", "jax", "torch"])
def test_file_saved_here_loads_under_another_backend(tmp_path, images, other):
    if other == keras.backend.backend():
        pytest.skip("same backend: covered by the round-trip test")
    mae = trained_mae(norm_pix_loss=True)
    mae.save(tmp_path / "mae.keras")
    noise = np.random.default_rng(3).random((4, 16), dtype=np.float32)
    np.savez(tmp_path / "inputs.npz", images=images, noise=noise)
    env = {**os.environ, "KERAS_BACKEND": other, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [str(tmp_path / name) for name in ("mae.keras", "inputs.npz", "outputs.npz")]
    run = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, *args], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    there = np.load(tmp_path / "outputs.npz")
    here = mae(images, noise=noise)
    np.testing.assert_array_equal(there["mask"], ops.convert_to_numpy(here["mask"]))
    np.testing.assert_allclose(there["pred"], ops.convert_to_numpy(here["pred"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(there["tokens"], ops.convert_to_numpy(mae.encoder(images)), rtol=1e-5, atol=1e-5)


def test_saved_config_is_plain_json(tmp_path):
    mae = tiny_mae(image_size=(16, 8), patch_size=(4, 2))
    mae.save(tmp_path / "mae.keras")
    with zipfile.ZipFile(tmp_path / "mae.keras") as archive:
        config = json.loads(archive.read("config.json"))["config"]
    assert config["image_size"] == [16, 8] and config["patch_size"] == [4, 2]
    reloaded = keras.saving.load_model(tmp_path / "mae.keras")
    assert tuple(reloaded(np.zeros((1, 16, 8, 3), dtype=np.float32))["pred"].shape) == (1, 16, 24)
