"""Pictures a person would rather look at than read: reconstruction grids and loss curves.

Uses matplotlib's object API (no pyplot state), so it is safe in callbacks and threads.
"""

import csv

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLUMNS = ("original", "masked", "reconstruction", "visible + predicted")


def _show(axis, image):
    image = np.clip(image, 0.0, 1.0)
    if image.shape[-1] == 1:
        axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        axis.imshow(image[..., :3])
    axis.set_xticks([])
    axis.set_yticks([])


def reconstruction_figure(images, result, title=None):
    """A grid: one row per image, columns original | masked | reconstruction | pasted."""
    rows = len(images)
    figure = Figure(figsize=(1.6 * len(COLUMNS), 1.6 * rows + (0.4 if title else 0)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, len(COLUMNS), squeeze=False)
    panels = (images, result["masked"], result["reconstruction"], result["pasted"])
    for row in range(rows):
        for column, panel in enumerate(panels):
            _show(axes[row, column], panel[row])
            if row == 0:
                axes[row, column].set_title(COLUMNS[column], fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def figure_to_array(figure):
    """RGB uint8 pixels of a figure, `(height, width, 3)`: for TensorBoard images."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_reconstructions(mae, images, path, seed=0, title=None):
    """Reconstructs `images` with a fixed mask seed, writes the grid PNG, returns its pixels."""
    figure = reconstruction_figure(np.asarray(images), mae.reconstruct(images, seed=seed), title)
    figure.savefig(path)
    return figure_to_array(figure)


def read_history(path):
    """history.csv written by keras' CSVLogger -> {column: [floats]}, columns that hold
    anything but numbers (CSVLogger writes "NA" for metrics it never saw) left out."""
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    history = {}
    for key in rows[0] if rows else ():
        try:
            history[key] = [float(row[key]) for row in rows]
        except ValueError:
            continue
    return history


def save_loss_curve(history, path, title="MAE pre-training"):
    """Plots every loss-like column of a history dict against the epoch."""
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    epochs = [int(e) + 1 for e in history.get("epoch", range(len(history.get("loss", []))))]
    for key, values in history.items():
        if "loss" in key:
            axis.plot(epochs, values, marker="o", markersize=3, label=key)
    axis.set_xlabel("epoch")
    axis.set_ylabel("masked-patch MSE")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def save_training_curves(history, path, title="Fine-tuning"):
    """Two panels against the epoch: every loss column, every accuracy column."""
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    epochs = [int(e) + 1 for e in history.get("epoch", range(len(history.get("loss", []))))]
    for axis, word in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        for key, values in history.items():
            if word in key:
                axis.plot(epochs, values, marker="o", markersize=3, label=key)
        axis.set_xlabel("epoch")
        axis.set_ylabel(word)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)


def save_confusion_matrix(matrix, class_names, path, title="Confusion matrix"):
    """Row-normalised confusion matrix (true class per row) with the counts written in."""
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    if len(class_names) <= 30:
        for row in ticks:
            for column in ticks:
                axis.text(column, row, str(matrix[row, column]), ha="center", va="center", fontsize=7,
                          color="white" if rates[row, column] > 0.5 else "black")
    figure.tight_layout()
    figure.savefig(path)
