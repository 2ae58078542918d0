import keras
import numpy as np
import pytest
from conftest import TINY, random_images

from keras_mae import MAEEncoder
from keras_mae.classifier import ViTClassifier, pool_tokens
from keras_mae.optimizers import AdamW

ENCODER = dict(image_size=16, patch_size=4, num_channels=3, width=16, depth=3, num_heads=2, seed=7)


def classifier(**overrides):
    return ViTClassifier(MAEEncoder(**ENCODER), num_classes=3, **overrides)


def easy_task(count=48, seed=0):
    """Class = which third of the image is bright: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    images = rng.random((count, 16, 16, 3), dtype=np.float32) * 0.2
    for image, label in zip(images, labels):
        image[:, 5 * label : 5 * label + 6] += 0.8
    return images, keras.utils.to_categorical(labels, 3)


def snapshot(variables):
    return {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in variables}


def train(model, mode, blocks=None, epochs=6, decay=1.0):
    model.set_mode(mode, blocks)
    images, labels = easy_task()
    model.compile(
        optimizer=AdamW(3e-3, model.layer_decay_multipliers(decay), weight_decay=0.05),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        metrics=["accuracy"],
    )
    before = snapshot(model.weights)
    history = model.fit(images, labels, batch_size=16, epochs=epochs, verbose=0)
    after = snapshot(model.weights)
    moved = {path for path in before if not np.array_equal(before[path], after[path])}
    return history.history["loss"], moved


def test_shapes_and_pooling(images):
    model = classifier()
    probabilities = keras.ops.convert_to_numpy(model(images))
    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    tokens = model.encoder(images)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.features(images)),
                               keras.ops.convert_to_numpy(pool_tokens(tokens, "avg")), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pool_tokens(tokens, "token")),
                               keras.ops.convert_to_numpy(tokens[:, 0]))


def test_linear_mode_trains_only_the_head():
    model = classifier(probe_norm=True)
    losses, moved = train(model, "linear")
    assert losses[-1] < losses[0]
    assert moved and all(path.startswith(model.head.name) or "/head/" in path for path in moved), moved
    assert not any("encoder" in path for path in moved)


def test_partial_mode_moves_only_the_last_blocks():
    model = classifier()
    losses, moved = train(model, "partial", blocks=1)
    assert losses[-1] < losses[0]
    encoder_moved = {path.split("/")[1] for path in moved if "encoder" in path}
    assert encoder_moved == {"block_2", "norm"}, encoder_moved


def test_full_mode_with_layer_decay_trains_everything():
    model = classifier(dropout_rate=0.1)
    losses, moved = train(model, "full", decay=0.75)
    assert losses[-1] < losses[0]
    trainable = {v.path for v in model.trainable_weights}
    assert trainable <= moved | {v.path for v in model.encoder.position_embedding.weights}


def test_layer_decay_multipliers():
    model = classifier()
    multipliers = model.layer_decay_multipliers(0.5)
    encoder = model.encoder
    assert multipliers[encoder.class_token.path] == 0.5**4
    assert multipliers[encoder.patch_embedding.weights[0].path] == 0.5**4
    for index, block in enumerate(encoder.blocks):
        assert {multipliers[v.path] for v in block.weights} == {0.5 ** (3 - index)}
    assert multipliers[encoder.norm.weights[0].path] == 1.0
    assert all(multipliers[v.path] == 1.0 for v in model.head.weights)


def test_layer_decay_scales_each_variables_step():
    """Adam's first step moves every weight by about its learning rate: the per-block
    rates show directly in the size of that step."""
    model = classifier()
    model.set_mode("full")
    multipliers = model.layer_decay_multipliers(0.5)
    optimizer = AdamW(1e-2, multipliers, weight_decay=0.0)
    images, labels = easy_task(16)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    before = snapshot(model.trainable_weights)
    model.fit(images, labels, batch_size=16, epochs=1, verbose=0)
    after = snapshot(model.trainable_weights)
    for block in model.encoder.blocks:
        kernel = block.attention.weights[0].path
        step = np.median(np.abs(after[kernel] - before[kernel]))
        assert step == pytest.approx(1e-2 * multipliers[kernel], rel=0.2)


def test_bad_arguments():
    encoder = MAEEncoder(**ENCODER)
    with pytest.raises(ValueError, match="blocks"):
        ViTClassifier(encoder, 3).set_mode("partial", 4)
    with pytest.raises(ValueError, match="mode"):
        ViTClassifier(encoder, 3).set_mode("frozen")
    with pytest.raises(ValueError, match="pooling"):
        ViTClassifier(encoder, 3, pooling="max")
    with pytest.raises(ValueError, match="num_classes"):
        ViTClassifier(encoder, 1)
    with pytest.raises(ValueError, match="MAEEncoder"):
        ViTClassifier(keras.layers.Dense(3), 3)


def test_config_and_save_round_trip(tmp_path, images):
    model = classifier(pooling="token", probe_norm=True, dropout_rate=0.2)
    clone = ViTClassifier.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    model.set_mode("partial", 2)
    model.compile(optimizer=AdamW(1e-3, model.layer_decay_multipliers(0.75)), loss="categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    path = tmp_path / "classifier.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, ViTClassifier) and isinstance(loaded.optimizer, AdamW)
    assert loaded.optimizer.lr_multipliers == model.optimizer.lr_multipliers
    assert [v.path for v in loaded.trainable_weights] == [v.path for v in model.trainable_weights]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(images)), keras.ops.convert_to_numpy(model(images)),
                               rtol=1e-6, atol=1e-6)


def test_encoder_from_a_pretrained_mae_is_shared(images):
    from conftest import tiny_mae

    mae = tiny_mae()
    model = ViTClassifier(mae.encoder, num_classes=4)
    assert model.encoder is mae.encoder
    assert keras.ops.convert_to_numpy(model(random_images(2, TINY["image_size"]))).shape == (2, 4)
