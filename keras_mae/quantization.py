"""Quantized keras-mae models that save and load: `model.quantize("int8")`, then `save`.

Keras records a layer's quantization in that layer's own config. keras-mae's models
build their sublayers in their constructors, from their own dtype policy, so a loaded
model would come back in float and the saved int8 weights would not fit it.
`KeepsQuantization` lists the quantized layers in the model's config and quantizes them
again when the model is rebuilt, before its weights load.
"""

import json
import warnings

import keras

# Modes whose layers `quantize` rebuilds from the mode and config alone; GPTQ and AWQ
# need calibration data.
RESTORABLE_MODES = ("int8", "int4", "float8")


class KeepsQuantization:
    """Mixin for a `keras.Model` whose constructor builds its sublayers: `get_config`
    names its quantized layers (by path, with mode and quantization config) and
    `from_config` quantizes them again."""

    def get_config(self):
        config = super().get_config()
        quantized = quantized_layers(self)
        if quantized:
            config["quantized_layers"] = quantized
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        quantized = config.pop("quantized_layers", None)
        model = super().from_config(config, custom_objects=custom_objects)
        if quantized:
            requantize(model, quantized)
        return model


def quantize(model, mode, config=None):
    """`model.quantize(mode, config=config)` for a model not yet quantized, without
    Keras' warning for each layer that has nothing to quantize (norms, embeddings)."""
    already = sorted({layer.quantization_mode for layer in model._flatten_layers() if layer.quantization_mode})
    if already:
        raise ValueError(f"{type(model).__name__} is already quantized ({', '.join(already)}).")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        model.quantize(mode, config=config)


def quantized_layers(model):
    """`{layer path: {"mode", "config"}}` of every quantized layer inside `model`."""
    found = {}
    for layer in model._flatten_layers(include_self=False):
        mode = layer.quantization_mode
        if mode is None:
            continue
        if mode not in RESTORABLE_MODES:
            raise ValueError(
                f"Layer {layer.path} is quantized with mode {mode!r}; keras-mae models save "
                f"quantized layers of the modes {RESTORABLE_MODES} only."
            )
        found[layer.path] = {
            "mode": mode,
            "config": keras.saving.serialize_keras_object(getattr(layer, "quantization_config", None)),
        }
    return found


def requantize(model, quantized):
    """Quantizes the layers `quantized` (from `quantized_layers`) of a freshly built
    `model` again, each with its mode and config; raises a ValueError naming any path
    the model does not have."""
    layers = {layer.path: layer for layer in model._flatten_layers(include_self=False)}
    missing = sorted(set(quantized) - set(layers))
    if missing:
        raise ValueError(f"{type(model).__name__} has no layers {missing} to quantize.")
    # `Model.quantize` once per (mode, config): it also re-tracks the torch parameters.
    groups = {}
    for path, entry in quantized.items():
        if layers[path].quantization_mode is None:  # a nested model may have done it
            key = (entry["mode"], json.dumps(entry["config"], sort_keys=True))
            groups.setdefault(key, set()).add(path)
    for (mode, config), paths in groups.items():
        model.quantize(
            mode,
            config=keras.saving.deserialize_keras_object(json.loads(config)),
            filters=lambda layer, paths=paths: layer.path in paths,
        )
