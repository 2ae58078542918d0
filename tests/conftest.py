"""Shared tiny configuration: every test builds models small enough for 2 CPU cores."""

import keras
import numpy as np
import pytest

import keras_mae

TINY = dict(
    image_size=16,
    patch_size=4,
    num_channels=3,
    encoder_width=16,
    encoder_depth=2,
    encoder_num_heads=2,
    decoder_width=16,
    decoder_depth=1,
    decoder_num_heads=2,
    seed=7,
)


def tiny_mae(**overrides):
    return keras_mae.MaskedAutoencoder(**{**TINY, **overrides})


def run_main(main, capsys, *argv):
    """A command's `main(argv)` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def random_images(batch=4, size=16, channels=3, seed=0):
    return np.random.default_rng(seed).random((batch, size, size, channels), dtype=np.float32)


def count_layer_calls(monkeypatch):
    """Counts `keras.layers.Layer.__call__` invocations from now on."""
    calls = []
    original = keras.layers.Layer.__call__

    def counting(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "__call__", counting)
    return calls


@pytest.fixture
def images():
    return random_images()


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global seed: weight initialisation is reproducible."""
    keras.utils.set_random_seed(0)
