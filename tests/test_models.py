import keras
import numpy as np
import pytest
from keras import ops

import keras_mae
import keras_mae.layers
from conftest import TINY, count_layer_calls, random_images, tiny_mae


def test_call_returns_predictions_and_mask(images):
    outputs = tiny_mae()(images)
    assert tuple(outputs["pred"].shape) == (4, 16, 48)  # 4 x 4 patches of 4 x 4 x 3
    assert tuple(outputs["mask"].shape) == (4, 16)
    assert tuple(outputs["ids_restore"].shape) == (4, 16)
    assert keras.backend.standardize_dtype(outputs["pred"].dtype) == "float32"
    assert "int" in keras.backend.standardize_dtype(outputs["ids_restore"].dtype)
    np.testing.assert_array_equal(ops.convert_to_numpy(outputs["mask"]).sum(axis=1), 12)


def test_encoder_alone_maps_images_to_all_tokens(images):
    encoder = tiny_mae().encoder
    assert isinstance(encoder, keras.Model)
    assert tuple(encoder(images).shape) == (4, 1 + 16, 16)
    with pytest.raises(ValueError, match=r"Expected images shaped \(batch, 16, 16, 3\)"):
        encoder(random_images(size=32))


def test_encoder_sees_only_the_kept_patches(images):
    mae = tiny_mae()
    seen = []
    original = mae.encoder.encode
    mae.encoder.encode = lambda tokens, training=None: seen.append(tuple(tokens.shape)) or original(tokens, training)
    mae(images)
    assert seen == [(4, 4, 16)]


def test_pixels_of_removed_patches_cannot_change_any_prediction(images):
    # Changing a removed patch's pixels cannot change any prediction: the encoder never sees it.
    mae = tiny_mae()
    noise = ops.convert_to_numpy(mae.masking.sample_noise(4, seed=1))
    first = mae(images, noise=noise)
    mask = ops.convert_to_numpy(first["mask"])
    changed = images.copy()
    patch = int(np.flatnonzero(mask[0])[0])
    row, col = divmod(patch, 4)
    changed[0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = 9.0
    second = mae(changed, noise=noise)
    np.testing.assert_allclose(ops.convert_to_numpy(first["pred"]), ops.convert_to_numpy(second["pred"]), atol=1e-6)


def test_baseline_with_mask_tokens_in_encoder_runs_on_all_patches(images):
    mae = tiny_mae(mask_tokens_in_encoder=True)
    seen = []
    original = mae.encoder.encode
    mae.encoder.encode = lambda tokens, training=None: seen.append(tuple(tokens.shape)) or original(tokens, training)
    outputs = mae(images)
    assert seen == [(4, 16, 16)]
    assert tuple(outputs["pred"].shape) == (4, 16, 48)
    assert not hasattr(mae.decoder, "mask_token")
    assert any("encoder_mask_token" in w.path for w in mae.trainable_weights)


def test_training_predicts_the_removed_patches_alone_and_as_inference_does(images):
    mae = tiny_mae(decoder_depth=2)
    noise = ops.convert_to_numpy(mae.masking.sample_noise(4, seed=2))
    trained, inferred = (mae(images, noise=noise, training=t) for t in (True, False))
    removed = ops.convert_to_numpy(trained["mask"]) == 1
    trained, inferred = ops.convert_to_numpy(trained["pred"]), ops.convert_to_numpy(inferred["pred"])
    assert trained.shape == inferred.shape == (4, 16, 48)
    np.testing.assert_allclose(trained[removed], inferred[removed], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(trained[~removed], 0.0)
    assert np.abs(inferred[~removed]).min() > 0


class PredictsEveryPatch(keras_mae.MaskedAutoencoder):
    """Trains through the inference forward pass, which predicts every patch."""

    def call(self, images, noise=None, training=None):
        return super().call(images, noise=noise, training=False)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(mask_tokens_in_encoder=True), dict(mask_ratio=0.25, norm_pix_loss=True, decoder_depth=2)],
)
def test_a_training_step_is_the_one_that_predicts_every_patch(images, options):
    # Drop path is 0, so predicting only the removed patches is the one difference: the
    # loss and every updated weight must be those of the full prediction.
    ours, full = tiny_mae(**options), PredictsEveryPatch(**{**TINY, **options})
    full.set_weights(ours.get_weights())
    for model in (ours, full):
        model.compile(optimizer=keras.optimizers.SGD(0.5))
    losses = [model.train_on_batch(images) for model in (ours, full)]  # the same seed: the same masks
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for mine, theirs in zip(ours.get_weights(), full.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(norm_pix_loss=True, mask_sampling="block"), dict(mask_tokens_in_encoder=True, mask_sampling="grid")],
)
def test_a_few_fit_steps_lower_the_loss(options):
    mae = tiny_mae(**options)
    mae.compile(optimizer=keras.optimizers.AdamW(3e-3))
    images = random_images(batch=32, seed=1)
    before = mae.evaluate(images, batch_size=32, verbose=0)
    history = mae.fit(images, batch_size=8, epochs=4, verbose=0)
    after = mae.evaluate(images, batch_size=32, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert after < 0.8 * before


def test_fit_ignores_labels_when_the_data_has_them():
    mae = tiny_mae()
    mae.compile(optimizer="adamw")
    history = mae.fit(random_images(batch=8), np.arange(8), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_every_layer_is_built_at_construction_and_after_a_training_step(images):
    """Keras re-traces the whole model symbolically before every train_on_batch /
    test_on_batch / evaluate call while any sub-layer is unbuilt (on torch that trace
    took 3x longer than the step itself). The model is built through at construction
    already: `quantize` stops at an unbuilt layer, and `fit` would run that trace on its
    first batch (drawing a shuffle of the data on the way)."""
    mae = tiny_mae()
    assert [layer.name for layer in mae._flatten_layers() if not layer.built] == []
    mae.compile(optimizer="adamw")
    mae.train_on_batch(images)
    assert [layer.name for layer in mae._flatten_layers() if not layer.built] == []


def test_reconstruct_pastes_visible_input_and_predicted_masked_patches(images):
    mae = tiny_mae()
    result = mae.reconstruct(images, seed=3)
    assert set(result) >= {"masked", "reconstruction", "pasted", "mask"}
    for key in ("masked", "reconstruction", "pasted"):
        assert isinstance(result[key], np.ndarray) and result[key].shape == images.shape
    removed = np.repeat(np.repeat(result["mask"].reshape(4, 4, 4), 4, axis=1), 4, axis=2)[..., None]
    np.testing.assert_allclose(result["pasted"], np.where(removed, result["reconstruction"], images), atol=1e-6)
    np.testing.assert_array_equal(result["masked"], np.where(removed, 0.0, images))
    again = mae.reconstruct(images, seed=3)
    np.testing.assert_array_equal(again["mask"], result["mask"])
    np.testing.assert_array_equal(again["pasted"], result["pasted"])
    assert not np.array_equal(mae.reconstruct(images, seed=4)["mask"], result["mask"])


def test_norm_pix_reconstruction_is_mapped_back_to_pixels(images):
    mae = tiny_mae(norm_pix_loss=True)
    noise = ops.convert_to_numpy(mae.masking.sample_noise(4, seed=0))
    pred = ops.convert_to_numpy(mae(images, noise=noise)["pred"])
    patches = ops.convert_to_numpy(mae.patchify(images))
    expected = pred * np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6) + patches.mean(-1, keepdims=True)
    got = ops.convert_to_numpy(mae.patchify(mae.reconstruct(images, seed=0)["reconstruction"]))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_grayscale_and_non_square_images():
    mae = tiny_mae(image_size=(8, 12), patch_size=(4, 2), num_channels=1)
    images = np.random.default_rng(0).random((2, 8, 12, 1), dtype=np.float32)
    assert tuple(mae(images)["pred"].shape) == (2, 12, 8)
    assert mae.reconstruct(images)["pasted"].shape == images.shape


def test_config_holds_the_image_geometry():
    config = tiny_mae().get_config()
    assert {config[k] for k in ("image_size", "patch_size", "num_channels")} == {16, 4, 3}
    assert {k: config[k] for k in TINY} == TINY
    clone = keras_mae.MaskedAutoencoder.from_config(config)
    assert clone.get_config() == config
    encoder_config = clone.encoder.get_config()
    assert keras_mae.MAEEncoder.from_config(encoder_config).get_config() == encoder_config
    decoder_config = clone.decoder.get_config()
    assert keras_mae.MAEDecoder.from_config(decoder_config).get_config() == decoder_config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(image_size=18), "not divisible by patch_size"),
        (dict(mask_ratio=1.0), "mask_ratio must be a number strictly between 0 and 1"),
        (dict(mask_ratio=0), "mask_ratio must be a number strictly between 0 and 1"),
        (dict(num_channels=0), "num_channels"),
        (dict(encoder_num_heads=3), "not divisible by num_heads"),
        (dict(encoder_width=18, encoder_num_heads=2), "divisible by 4"),
        (dict(mask_sampling="checkerboard"), "mask_sampling must be one of"),
    ],
)
def test_bad_configuration_raises_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_mae(**overrides)


@pytest.mark.parametrize(
    "shape", [(2, 16, 16, 1), (2, 16, 16, 4), (2, 32, 32, 3), (16, 16, 3)]
)
def test_images_of_the_wrong_shape_raise_a_clear_error(shape):
    images = np.zeros(shape, dtype=np.float32)
    mae = tiny_mae()
    with pytest.raises(ValueError, match=r"Expected images shaped \(batch, 16, 16, 3\)"):
        mae(images)
    with pytest.raises(ValueError, match=r"Expected images shaped"):
        mae.reconstruct(images)


def test_encoder_inside_a_functional_classifier_trains_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    encoder = tiny_mae().encoder
    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling1D()(encoder(inputs)[:, 1:])
    classifier = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))
    classifier.compile(keras.optimizers.AdamW(3e-3), "sparse_categorical_crossentropy")
    labels = np.arange(32) % 2
    images = 0.5 * random_images(batch=32, seed=3) + 0.5 * labels[:, None, None, None]  # class 1 is bright
    before = classifier.evaluate(images, labels, verbose=0)
    classifier.fit(images, labels, batch_size=8, epochs=8, verbose=0)
    assert classifier.evaluate(images, labels, verbose=0) < 0.7 * before
    classifier.save(tmp_path / "classifier.keras")
    reloaded = keras.saving.load_model(tmp_path / "classifier.keras")
    np.testing.assert_array_equal(ops.convert_to_numpy(reloaded(images)), ops.convert_to_numpy(classifier(images)))


def test_mixed_precision_matches_float32_within_tolerance(images):
    reference = tiny_mae()
    mixed = tiny_mae(dtype="mixed_bfloat16")
    mixed.set_weights(reference.get_weights())
    noise = ops.convert_to_numpy(reference.masking.sample_noise(4, seed=2))
    want, got = reference(images, noise=noise), mixed(images, noise=noise)
    assert keras.backend.standardize_dtype(got["pred"].dtype) == "bfloat16"
    assert all(w.dtype == "float32" for w in mixed.trainable_weights)
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(got["pred"], "float32")),
                               ops.convert_to_numpy(want["pred"]), atol=0.1, rtol=0.05)
    loss = lambda model, out: float(ops.convert_to_numpy(model.compute_loss(images, None, out)))  # noqa: E731
    assert loss(mixed, got) == pytest.approx(loss(reference, want), rel=0.02)


def test_loss_targets_stay_float32_under_a_global_mixed_policy(images):
    # train.py sets the policy globally; the pixels the loss compares against must not
    # be rounded to bfloat16 on the way.
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mae = tiny_mae()
    finally:
        keras.config.set_dtype_policy("float32")
    targets = mae.patchify(images)
    assert keras.backend.standardize_dtype(targets.dtype) == "float32"
    exact = images.reshape(4, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(4, 16, 48)
    np.testing.assert_array_equal(ops.convert_to_numpy(targets), exact)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_a_training_step_is_the_same_whether_sublayers_are_called_directly_or_not(monkeypatch, images, policy):
    # On torch the models call their built sublayers' `call` without Keras'
    # `Layer.__call__` (`keras_mae.layers.call_sublayer`); that must not change a bit of
    # a training step, and only the model's own call goes through Keras.
    direct, full = tiny_mae(dtype=policy), tiny_mae(dtype=policy)
    full.set_weights(direct.get_weights())
    for model in (direct, full):
        model.compile(optimizer=keras.optimizers.SGD(0.5))
    calls = count_layer_calls(monkeypatch)
    direct(images, training=True)
    if keras.backend.backend() == "torch":
        assert calls == [direct.name]
    else:  # traced once per step function: the full calls cost nothing per step
        assert {"block_0", "decoder"} <= set(calls)
    full(images, training=True)  # the same masking draws from here on
    losses = [direct.train_on_batch(images)]
    monkeypatch.setattr(keras_mae.layers, "_direct_call_applies", lambda layer, inputs: False)
    losses.append(full.train_on_batch(images))
    assert losses[0] == losses[1]
    # Under mixed precision on torch's CPU the layer norms take the 16-bit tokens into
    # torch's own `layer_norm`, whose float32 gradients are summed in another order than
    # those of Keras' float32 copy: after rounding to bf16 a value can land one step
    # (2^-8 of it) apart, so the update is the same to bf16 rounding, not to the bit.
    rtol, atol = (0, 0) if policy == "float32" else (2.0**-7, 1e-6)
    for mine, theirs in zip(direct.get_weights(), full.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=rtol, atol=atol)


def test_compiled_and_eager_forward_passes_agree():
    # Masks come from explicit noise: TensorFlow's random kernels differ under XLA.
    mae = tiny_mae(norm_pix_loss=True)
    images, noise = keras.Input((16, 16, 3)), keras.Input((16,))
    wrapper = keras.Model([images, noise], mae(images, noise=noise))
    x = random_images(batch=8, seed=4)
    n = np.random.default_rng(5).random((8, 16), dtype=np.float32)
    outputs = []
    for compile_options in (dict(run_eagerly=True), dict(jit_compile=True)):
        wrapper.compile(**compile_options)
        outputs.append(wrapper.predict_on_batch([x, n]))
    np.testing.assert_array_equal(outputs[0]["mask"], outputs[1]["mask"])
    np.testing.assert_allclose(outputs[0]["pred"], outputs[1]["pred"], rtol=1e-4, atol=1e-5)


def test_auto_jit_compile_is_xla_on_tensorflow_and_keras_choice_elsewhere(tmp_path, images):
    auto = {"tensorflow": True, "jax": True, "torch": False}[keras.backend.backend()]
    # An uncompiled model predicts with the same choice: feature extraction gets XLA too.
    assert tiny_mae().encoder.jit_compile is auto
    mae = tiny_mae()
    mae.compile(optimizer="adamw")
    assert mae.jit_compile is auto
    mae.compile(optimizer="adamw", jit_compile=False)
    assert mae.jit_compile is False
    mae.compile(optimizer="adamw", run_eagerly=True)
    assert mae.jit_compile is False
    # A saved model compiles again on load with this backend's "auto", and trains.
    mae.compile(optimizer="adamw", jit_compile="auto")
    mae.fit(images, epochs=1, batch_size=4, verbose=0)
    mae.save(tmp_path / "mae.keras")
    reloaded = keras.saving.load_model(tmp_path / "mae.keras")
    assert reloaded.optimizer is not None and reloaded.jit_compile is mae.jit_compile
    reloaded.fit(images, epochs=1, batch_size=4, verbose=0)
