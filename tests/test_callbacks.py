"""The callbacks every run uses: they must not make `fit` wait for the device each step."""

import keras

from conftest import BATCH_HOOKS_ON_MAIN_THREAD, BatchEndThreads, random_images, tiny_mae
from keras_mae.callbacks import logging_callbacks


def batch_end_threads(callbacks, steps=4):
    mae = tiny_mae()
    mae.compile(optimizer="adam")
    probe = BatchEndThreads()
    mae.fit(random_images(batch=4 * steps), batch_size=4, epochs=1, verbose=0, callbacks=[*callbacks, probe])
    return probe.on_main_thread


def test_logging_callbacks_let_fit_start_the_next_step_before_the_batch_hooks_run(tmp_path):
    callbacks = logging_callbacks(tmp_path / "history.csv", tensorboard_dir=tmp_path / "logs")
    assert [type(c).__name__ for c in callbacks] == ["NonFiniteLossStop", "CSVLogger", "EpochTensorBoard"]
    # 200 steps: on JAX, Keras' TensorBoard marked async-safe failed within them every time
    # ("Buffer has been deleted or donated"): its batch hook reads `self.model` from the
    # callback thread, a state sync racing the next step.
    assert batch_end_threads(callbacks, steps=200) == {BATCH_HOOKS_ON_MAIN_THREAD}
    assert (tmp_path / "history.csv").read_text().startswith("epoch,loss")
    # The same callbacks unmarked: their batch hooks run on the main thread, between steps.
    assert batch_end_threads([keras.callbacks.TerminateOnNaN()]) == {True}


def test_a_nan_loss_still_stops_fit_when_the_check_runs_off_the_main_thread(tmp_path):
    mae = tiny_mae()
    mae.compile(optimizer=keras.optimizers.SGD(1e30))
    history = mae.fit(random_images(batch=64), batch_size=4, epochs=5, verbose=0,
                      callbacks=logging_callbacks(tmp_path / "history.csv"))
    assert len(history.history["loss"]) == 1  # stopped in the first epoch
