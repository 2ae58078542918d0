"""`model.quantize` reaches every Dense layer of keras-mae's models, and a quantized
model saves and loads as it was."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_mae
from conftest import TINY, random_images, tiny_mae
from keras_mae.quantization import quantize, requantize


def make(kind):
    if kind == "encoder":
        return tiny_mae().encoder
    if kind == "classifier":
        return keras_mae.ViTClassifier(tiny_mae().encoder, num_classes=3, probe_norm=True)
    return tiny_mae()


def outputs(model, images):
    if isinstance(model, keras_mae.MaskedAutoencoder):
        noise = np.random.default_rng(1).random((len(images), model.encoder.num_patches), dtype=np.float32)
        return ops.convert_to_numpy(model(images, noise=noise)["pred"])
    return ops.convert_to_numpy(model(images))


def dense_layers(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dense)]


@pytest.mark.parametrize("kind", ["encoder", "classifier", "mae"])
def test_quantize_reaches_every_dense_layer_and_stays_close(kind):
    model = make(kind)
    images = random_images()
    before = outputs(model, images)
    quantize(model, "int8")
    layers = dense_layers(model)
    # Encoder: the patch projection and four per block; the MAE adds the decoder's.
    assert len(layers) >= 1 + 4 * TINY["encoder_depth"]
    for layer in layers:
        assert layer.quantization_mode == "int8", layer.path
        assert keras.backend.standardize_dtype(layer.kernel.dtype) == "int8", layer.path
    after = outputs(model, images)
    assert not np.array_equal(after, before)
    assert np.abs(after - before).max() <= 0.1 * np.abs(before).max()


@pytest.mark.parametrize(
    "kind, mode",
    [("encoder", "int8"), ("encoder", "int4"), ("encoder", "float8"), ("classifier", "int8"), ("mae", "int8")],
)
def test_quantized_model_saves_and_loads_identically(tmp_path, kind, mode):
    model = make(kind)
    images = random_images()
    quantize(model, mode)
    expected = outputs(model, images)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert {layer.path: layer.quantization_mode for layer in dense_layers(loaded)} == \
        {layer.path: layer.quantization_mode for layer in dense_layers(model)}
    np.testing.assert_array_equal(outputs(loaded, images), expected)


def test_quantization_config_is_kept(tmp_path):
    # Weight-only int8: no activation quantizer, so the outputs differ from the default's.
    config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    encoder, default = make("encoder"), make("encoder")
    quantize(encoder, "int8", config=config)
    quantize(default, "int8")
    images = random_images()
    assert not np.array_equal(outputs(encoder, images), outputs(default, images))
    encoder.save(tmp_path / "encoder.keras")
    loaded = keras.saving.load_model(tmp_path / "encoder.keras")
    for layer in dense_layers(loaded):
        assert layer.quantization_config.activation_quantizer is None, layer.path
    np.testing.assert_array_equal(outputs(loaded, images), outputs(encoder, images))


def test_a_float_model_config_names_no_quantized_layers():
    config = make("mae").get_config()
    assert "quantized_layers" not in config
    assert keras_mae.MaskedAutoencoder.from_config(config).get_config() == config


def test_quantizing_twice_raises_a_clear_error():
    encoder = make("encoder")
    quantize(encoder, "int8")
    with pytest.raises(ValueError, match=r"MAEEncoder is already quantized \(int8\)"):
        quantize(encoder, "int4")


def test_requantizing_a_layer_the_model_lacks_raises_a_clear_error():
    encoder = make("encoder")
    with pytest.raises(ValueError, match=r"no layers \['mae_encoder/block_9/attention/qkv'\]"):
        requantize(encoder, {"mae_encoder/block_9/attention/qkv": {"mode": "int8", "config": None}})


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="the torch backend's int8 inference")
@pytest.mark.parametrize("dtype, shape", [("float32", (3, 17, 24)), ("mixed_bfloat16", (5, 24)), ("float32", (16, 3072))])
def test_torch_int8_inference_in_float32_is_keras_int8_call_bit_for_bit(monkeypatch, dtype, shape):
    import torch

    matmuls = []
    in_float32 = keras_mae.layers._int8_matmul_in_float32
    monkeypatch.setattr(keras_mae.layers, "_int8_matmul_in_float32", lambda a, b: matmuls.append(a.shape) or in_float32(a, b))
    layer = keras_mae.layers.Dense(40, activation="gelu", dtype=dtype)
    layer.build(shape)
    inputs = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    if shape[-1] > 1024:
        # Products of 126 or 127 by 127, summed past 2**24, where float32 stops holding
        # odd integers.
        inputs = 1 - 0.01 * np.abs(inputs)
        layer.kernel.assign(np.ones(layer.kernel.shape))
    layer.quantize("int8")
    inputs = torch.as_tensor(inputs).to(getattr(torch, layer.compute_dtype))
    with torch.no_grad():
        fast = layer(inputs)
    assert matmuls == [inputs.shape]

    # With a gradient to its inputs the layer takes Keras' own int8 call (an int32
    # matmul), whose custom gradient defines it.
    inputs.requires_grad_(True)
    keras_own = layer(inputs)
    keras_own.float().sum().backward()
    assert len(matmuls) == 1 and inputs.grad is not None
    assert fast.dtype == keras_own.dtype and torch.equal(fast, keras_own.detach())
