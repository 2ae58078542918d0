"""Callbacks of a run: logging, reconstruction pictures, crash-safe checkpoints, a k-NN monitor."""

import json
import math
import os
from pathlib import Path

import keras

from keras_mae.distribute import process_count
from keras_mae.evaluation import extract_features, knn_accuracy
from keras_mae.visualize import save_reconstructions


def write_atomically(path, write):
    """Calls `write(temporary_path)`, then renames over `path`: readers never see half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial{path.suffix}")
    write(str(temporary))
    os.replace(temporary, path)


def write_json(path, data):
    def dump(temporary):
        with open(temporary, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=True, default=str)
            stream.write("\n")

    write_atomically(path, dump)


def logging_callbacks(history_path, append=False, tensorboard_dir=None):
    """What every run logs: a stop on a non-finite loss, history.csv and (with
    `tensorboard_dir`) TensorBoard at epoch ends, none of which makes `fit` wait for the
    device between steps.

    A callback with a per-batch end hook not marked `async_safe` makes `fit` turn each
    step's logs into Python numbers before it starts the next step, a wait for the
    device at every step (Keras' asynchronous dispatch is for JAX and torch; on
    TensorFlow it always waits). Keras' own `TerminateOnNaN` and `TensorBoard` have
    such hooks.
    """
    callbacks = [NonFiniteLossStop(), keras.callbacks.CSVLogger(str(history_path), append=append)]
    if tensorboard_dir is not None:
        callbacks.append(EpochTensorBoard(log_dir=str(tensorboard_dir)))
    return callbacks


class NonFiniteLossStop(keras.callbacks.Callback):
    """Stops `fit` after a step whose loss is NaN or infinite, as `TerminateOnNaN` does,
    but reads the loss on Keras' callback thread (`async_safe`) and stops from the main
    thread, before the next step or at the epoch's end: on JAX, `self.model` syncs the
    model's state, which from that thread races the step running meanwhile (its
    buffers are donated). The stop comes a step or two late; `RunCheckpoint` does not
    save the diverged epoch."""

    @property
    def async_safe(self):  # read when `fit` starts
        # Every step of a multi-process run is collective, so each process must stop
        # after the same one: there the check runs step by step on the main thread.
        return process_count() == 1

    def on_train_begin(self, logs=None):
        self.diverged_at = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if self.diverged_at is None and loss is not None and not math.isfinite(loss):
            self.diverged_at = batch

    def stop_if_diverged(self):
        if self.diverged_at is not None and not self.model.stop_training:
            print(f"Batch {self.diverged_at}: the loss is NaN or infinite; stopping.")
            self.model.stop_training = True

    def on_train_batch_begin(self, batch, logs=None):
        self.stop_if_diverged()

    def on_epoch_end(self, epoch, logs=None):
        self.stop_if_diverged()


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard at its default `update_freq="epoch"`, whose batch hook cannot
    hold up a step: off TensorFlow it writes nothing there but reads `self.model` (on
    JAX a state sync that races the next step from the callback thread), so it is
    skipped; on TensorFlow, where Keras waits every step anyway, it writes the step's
    graph as before."""

    async_safe = True

    def on_train_batch_end(self, batch, logs=None):
        if keras.backend.backend() == "tensorflow":
            super().on_train_batch_end(batch, logs)


class ReconstructionLogger(keras.callbacks.Callback):
    """Every `every` epochs, a PNG grid of fixed images: original | masked | reconstruction
    | visible patches pasted back, the same mask each time so epochs compare.

    Args:
        images: float32 `(n, H, W, C)` in [0, 1], held out from training.
        output_dir: where `epoch_XXX.png` files go.
        every: epochs between pictures (the last epoch always gets one).
        log_dir: TensorBoard log folder for the same pictures, or None.
        seed: mask seed.
    """

    def __init__(self, images, output_dir, every=1, log_dir=None, seed=0):
        super().__init__()
        self.images = images
        self.output_dir = Path(output_dir)
        self.every = max(1, int(every))
        self.log_dir = log_dir
        self.seed = seed
        self.last_path = None

    def on_train_begin(self, logs=None):
        self.epochs = self.params.get("epochs")
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every and epoch + 1 != self.epochs:
            return
        path = self.output_dir / f"epoch_{epoch + 1:03d}.png"
        loss = (logs or {}).get("loss")
        title = f"epoch {epoch + 1}" + (f", loss {loss:.4f}" if loss is not None else "")
        pixels = save_reconstructions(self.model, self.images, path, seed=self.seed, title=title)
        self.last_path = path
        if self.log_dir:
            import tensorflow as tf  # TensorBoard's own writer

            with tf.summary.create_file_writer(str(self.log_dir)).as_default():
                tf.summary.image("reconstructions", pixels[None], step=epoch + 1)


class RunCheckpoint(keras.callbacks.Callback):
    """Saves the whole model (weights, optimizer, seed state) after every epoch, atomically.

    `checkpoint_XXX.keras` is written under a temporary name and renamed; `state.json`,
    renamed the same way, then points at it; older checkpoints are deleted last. A
    process killed at any moment leaves `state.json` naming a complete file. An epoch
    whose loss is NaN or infinite is not saved: the last finite one stays, to resume from.
    `model` saves another model than the one being fitted (a classifier whose head
    alone is fitted on cached features).
    """

    def __init__(self, run_dir, extra_state=None, model=None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.extra_state = extra_state or {}
        self.saved_model = model

    @staticmethod
    def load_state(run_dir):
        path = Path(run_dir) / "state.json"
        if not path.is_file():
            return None
        with open(path) as stream:
            return json.load(stream)

    @classmethod
    def divergence_advice(cls, run_dir, state_dir=None):
        """What to do once the loss stopped being finite: which checkpoint of `run_dir`
        survived (read from `state_dir`, a process's scratch copy, when given)."""
        kept = cls.load_state(state_dir or run_dir)
        if kept is None:
            return ("No epoch ended with a finite loss, so none was kept: start again with a lower --base-lr "
                    "(and --overwrite).")
        return (f"{run_dir} keeps the checkpoint of epoch {kept['epoch']}: continue from it with --resume and a "
                "lower --base-lr.")

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            return
        name = f"checkpoint_{epoch + 1:03d}.keras"
        write_atomically(self.run_dir / name, (self.saved_model or self.model).save)
        write_json(self.run_dir / "state.json", {**self.extra_state, "epoch": epoch + 1, "checkpoint": name})
        for old in self.run_dir.glob("checkpoint_*.keras"):
            if old.name != name:
                old.unlink()


class KNNMonitor(keras.callbacks.Callback):
    """k-NN accuracy (cosine, k=20) of the encoder's pooled features every `every` epochs.

    A cheap look at the representation while pre-training: no classifier is trained.
    The figure goes into the epoch's logs as `knn_accuracy`, so CSVLogger and
    TensorBoard record it.

    Args:
        encoder: the `MAEEncoder` to measure (e.g. `mae.encoder`).
        train_data, test_data: batched `(images, labels)` datasets, labelled.
    """

    def __init__(self, encoder, train_data, test_data, every=1, k=20, pooling="avg"):
        super().__init__()
        self.encoder = encoder
        self.train_data = train_data
        self.test_data = test_data
        self.every = max(1, int(every))
        self.k = k
        self.pooling = pooling

    def on_epoch_end(self, epoch, logs=None):
        # The first epoch always measures: CSVLogger fixes its columns there.
        if epoch and (epoch + 1) % self.every and epoch + 1 != self.params.get("epochs"):
            return
        train = extract_features(self.encoder, self.train_data, self.pooling)
        test = extract_features(self.encoder, self.test_data, self.pooling)
        accuracy = knn_accuracy(*train, *test, k=self.k)
        if logs is not None:
            logs["knn_accuracy"] = accuracy
        print(f"\nEpoch {epoch + 1}: k-NN (k={self.k}) accuracy {accuracy:.4f}", flush=True)
