"""The callbacks every run uses: they must not make `fit` wait for the device each step."""

import threading

import keras

from conftest import random_images, tiny_mae
from keras_mae.callbacks import logging_callbacks


class BatchEndThreads(keras.callbacks.Callback):
    """Records whether each `on_train_batch_end` ran on the main thread. Marked async-safe
    itself, so it follows whatever dispatch the other callbacks allow."""

    async_safe = True

    def __init__(self):
        super().__init__()
        self.on_main_thread = set()

    def on_train_batch_end(self, batch, logs=None):
        self.on_main_thread.add(threading.current_thread() is threading.main_thread())


def batch_end_threads(callbacks, steps=4):
    mae = tiny_mae()
    mae.compile(optimizer="adam")
    probe = BatchEndThreads()
    mae.fit(random_images(batch=4 * steps), batch_size=4, epochs=1, verbose=0, callbacks=[*callbacks, probe])
    return probe.on_main_thread


def test_logging_callbacks_let_fit_start_the_next_step_before_the_batch_hooks_run(tmp_path):
    callbacks = logging_callbacks(tmp_path / "history.csv", tensorboard_dir=tmp_path / "logs")
    assert [type(c).__name__ for c in callbacks] == ["NonFiniteLossStop", "CSVLogger", "EpochTensorBoard"]
    waits_every_step = keras.backend.backend() == "tensorflow"  # Keras dispatches asynchronously on JAX and torch only
    # 200 steps: on JAX, Keras' TensorBoard marked async-safe failed within them every time
    # ("Buffer has been deleted or donated"): its batch hook reads `self.model` from the
    # callback thread, a state sync racing the next step.
    assert batch_end_threads(callbacks, steps=200) == {waits_every_step}
    assert (tmp_path / "history.csv").read_text().startswith("epoch,loss")
    # The same callbacks unmarked: their batch hooks run on the main thread, between steps.
    assert batch_end_threads([keras.callbacks.TerminateOnNaN()]) == {True}


def test_a_nan_loss_still_stops_fit_when_the_check_runs_off_the_main_thread(tmp_path):
    mae = tiny_mae()
    mae.compile(optimizer=keras.optimizers.SGD(1e30))
    history = mae.fit(random_images(batch=64), batch_size=4, epochs=5, verbose=0,
                      callbacks=logging_callbacks(tmp_path / "history.csv"))
    assert len(history.history["loss"]) == 1  # stopped in the first epoch
