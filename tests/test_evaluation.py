import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from conftest import random_images, tiny_mae
from keras_mae.classifier import pool_tokens
from keras_mae.evaluation import classification_report, extract_features


def test_extract_features_does_not_read_the_dataset_twice_and_keeps_labels_in_order():
    encoder = tiny_mae().encoder
    images = random_images(batch=10, seed=3)
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    reads = []

    def examples():
        for image, label in zip(images, labels):
            reads.append(label)
            yield image, label

    dataset = tf.data.Dataset.from_generator(
        examples, output_signature=(tf.TensorSpec((16, 16, 3), tf.float32), tf.TensorSpec((), tf.int64))
    ).batch(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features, got = extract_features(encoder, dataset)
    # Read to its end, a dataset of unknown length is no cause for Keras' warning.
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    # One pass (Keras' JAX trainer also peeks at a first batch or two to build the step).
    assert 10 <= len(reads) < 20
    np.testing.assert_array_equal(got, labels)
    expected = ops.convert_to_numpy(pool_tokens(encoder(images, training=False), "avg"))
    assert features.dtype == np.float32 and features.shape == (10, 16)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    one_hot = tf.data.Dataset.from_tensor_slices((images, keras.utils.to_categorical(labels, 10))).batch(4)
    np.testing.assert_array_equal(extract_features(encoder, one_hot)[1], labels)


def test_classification_report_counts_top5_only_where_it_can_miss():
    labels = np.array([0, 1, 2, 3, 4, 5, 6])
    probabilities = np.full((7, 7), 0.01)
    probabilities[np.arange(7), (labels + 1) % 7] = 0.5  # top-1 wrong everywhere
    probabilities[np.arange(6), labels[:6]] = 0.2  # second for six of seven, so in their top 5
    probabilities[6, :] = [0.3, 0.1, 0.2, 0.25, 0.22, 0.21, 0.0]  # class 6 last
    report = classification_report(probabilities, labels, [str(c) for c in range(7)])
    assert report["top1_accuracy"] == 0
    assert report["top5_accuracy"] == pytest.approx(6 / 7)
    assert report["confusion_matrix"][6][0] == 1 and report["num_examples"] == 7
    few = classification_report(probabilities[:, :4] / probabilities[:, :4].sum(1, keepdims=True), labels % 4,
                                ["a", "b", "c", "d"])
    assert "top5_accuracy" not in few and set(few["per_class_accuracy"]) == {"a", "b", "c", "d"}
