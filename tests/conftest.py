"""Shared tiny configuration: every test builds models small enough for 2 CPU cores."""

import threading

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


class BatchEndThreads(keras.callbacks.Callback):
    """Records whether each `on_train_batch_end` ran on the main thread. Marked async-safe
    itself, so it follows whatever dispatch the other callbacks allow."""

    async_safe = True

    def __init__(self):
        super().__init__()
        self.on_main_thread = set()

    def on_train_batch_end(self, batch, logs=None):
        self.on_main_thread.add(threading.current_thread() is threading.main_thread())


def probe_batch_end_threads(monkeypatch):
    """Adds a `BatchEndThreads` to every `fit` from now on (train.py's and finetune.py's,
    with their own callbacks) and returns it."""
    probe = BatchEndThreads()
    original = keras.Model.fit

    def fit(self, *args, callbacks=None, **kwargs):
        return original(self, *args, callbacks=[*(callbacks or []), probe], **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    return probe


# Keras runs batch-end hooks on a thread of its own, so that `fit` need not wait for each
# step's loss, on JAX and torch only, and only while every callback allows it.
BATCH_HOOKS_ON_MAIN_THREAD = keras.backend.backend() == "tensorflow"


@pytest.fixture
def images():
    return random_images()


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global seed: weight initialisation is reproducible."""
    keras.utils.set_random_seed(0)
