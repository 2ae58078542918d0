"""Measuring representations and classifiers: features, k-NN accuracy, per-class figures.

Accuracies are computed on NumPy arrays that came out of a model, so they are the
same on every backend.
"""

import warnings

import keras
import numpy as np

from keras_mae.classifier import pool_tokens


class PooledEncoder(keras.Model):
    """An encoder followed by pooling, in inference mode: `predict` compiles it.

    Called on `(images, labels)` it returns `{"features", "labels"}`, the labels passed
    through, so `predict` reads a labelled dataset once (decoding an image folder twice
    for features and labels would double the input work).
    """

    def __init__(self, encoder, pooling="avg", **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.pooling = pooling

    def call(self, inputs):
        if isinstance(inputs, (tuple, list)):
            images, labels = inputs
            return {"features": self.call(images), "labels": labels}
        return pool_tokens(self.encoder(inputs, training=False), self.pooling)


def extract_features(encoder, dataset, pooling="avg", verbose=0):
    """Pooled features and labels of every batch of a `(images, labels)` dataset, in one pass.

    Returns `(features (N, D) float32, labels (N,) int)`; one-hot labels are turned
    back into class indices.
    """
    with warnings.catch_warnings():
        # Keras says "ran out of data; interrupting training" at the end of a dataset of
        # unknown length (a generator, a filter); reading to the end is the point here.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        outputs = PooledEncoder(encoder, pooling).predict(
            dataset.map(lambda images, labels: ((images, labels),)), verbose=verbose
        )
    labels = np.asarray(outputs["labels"])
    labels = labels.argmax(-1) if labels.ndim > 1 else labels
    return np.asarray(outputs["features"], dtype="float32"), labels.astype("int64")


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07,
                 num_classes=None, chunk=1024):
    """Weighted k-nearest-neighbour top-1 accuracy with cosine similarity.

    Each test feature votes with its `k` most similar training features, each weighted
    by exp(similarity / temperature) (the monitor of DINO and many MAE reports): no
    training, so it measures the representation itself.
    """
    if len(train_features) < 1 or len(test_features) < 1:
        raise ValueError("k-NN accuracy needs at least one training and one test feature.")
    k = min(k, len(train_features))
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1

    def normalize(features):
        features = np.asarray(features, dtype="float32")
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

    train_features, test_features = normalize(train_features), normalize(test_features)
    correct = 0
    for start in range(0, len(test_features), chunk):
        similarity = test_features[start : start + chunk] @ train_features.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
        votes = np.zeros((len(similarity), num_classes), dtype="float64")
        np.add.at(votes, (np.arange(len(similarity))[:, None], train_labels[nearest]), weights)
        correct += int((votes.argmax(1) == test_labels[start : start + chunk]).sum())
    return correct / len(test_features)


def confusion_matrix(labels, predictions, num_classes):
    """`(true class, predicted class)` counts."""
    matrix = np.zeros((num_classes, num_classes), dtype="int64")
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def classification_report(probabilities, labels, class_names):
    """Top-1, top-5 and per-class accuracy and the confusion matrix of predictions.

    Top-5 only with more than 5 classes: with 5 or fewer it is 1.0 whatever the model does.
    """
    num_classes = probabilities.shape[1]
    predictions = probabilities.argmax(1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    per_class = matrix.diagonal() / np.maximum(matrix.sum(1), 1)
    report = {"top1_accuracy": float((predictions == labels).mean())}
    if num_classes > 5:
        top = np.argsort(-probabilities, axis=1)[:, :5]
        report["top5_accuracy"] = float((top == labels[:, None]).any(1).mean())
    return report | {
        "per_class_accuracy": {name: float(value) for name, value in zip(class_names, per_class)},
        "confusion_matrix": matrix.tolist(),
        "num_examples": int(len(labels)),
    }
