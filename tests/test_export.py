"""SavedModels load in a process without keras_mae and answer like the Keras models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from conftest import tiny_mae
from keras_mae.data import to_model_pixels
from keras_mae.quantization import quantize

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}

# Runs with tensorflow alone: what a serving client has.
CLIENT = """
import json, sys, numpy as np, tensorflow as tf
assert "keras_mae" not in sys.modules
images = np.load(sys.argv[1])
results = {}
for kind, path in json.loads(sys.argv[2]).items():
    loaded = tf.saved_model.load(path)
    stored = tf.train.load_checkpoint(path + "/variables/variables")
    for name, shape in stored.get_variable_to_shape_map().items():
        dtype = stored.get_variable_to_dtype_map()[name].name
        key = f"{kind}/stored_{dtype}"
        results[key] = results.get(key, 0) + int(np.prod(shape))
    outputs = loaded.signatures["serving_default"](images=tf.constant(images))
    if kind == "encoder":
        larger = loaded.signatures["serving_default"](images=tf.constant(np.load(sys.argv[4])))
        results["larger/tokens"] = larger["tokens"].numpy()
    for key, value in outputs.items():
        value = value.numpy()
        results[f"{kind}/{key}"] = value.astype(str) if value.dtype == object else value
    if kind == "reconstructor":
        seeded = loaded.signatures["reconstruct_seeded"](images=tf.constant(images), seed=tf.constant(5))
        results["seeded/mask"] = seeded["mask"].numpy()
assert "keras_mae" not in sys.modules
np.savez(sys.argv[3], **results)
"""


# Larger than the 16 x 16 training size, not square, not a whole multiple of it.
LARGER = np.random.default_rng(1).integers(0, 256, (3, 40, 56, 3)).astype("uint8")


def export(*argv):
    run = subprocess.run([sys.executable, "-m", "keras_mae.export", *map(str, argv)], env=ENV,
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny MAE and a classifier on its encoder, trained one step under this backend, exported."""
    tmp = tmp_path_factory.mktemp("export")
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3)).astype("uint8")
    mae = tiny_mae(norm_pix_loss=True)
    mae.compile(optimizer="adamw")
    mae.fit(images.astype("float32") / 255.0, batch_size=5, epochs=1, verbose=0)
    mae.save(tmp / "mae.keras")
    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling1D()(mae.encoder(inputs)[:, 1:])
    classifier = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
    classifier.save(tmp / "classifier.keras")
    paths = {}
    for name, source, kind, extra in (
        ("encoder", "mae.keras", "encoder", []),
        ("reconstructor", "mae.keras", "reconstructor", []),
        ("classifier", "classifier.keras", "classifier", ["--class-names", "cat,dog,owl"]),
        ("encoder_int8", "mae.keras", "encoder", ["--quantize", "int8"]),
    ):
        export(tmp / source, "--kind", kind, "--output", tmp / "serving" / name, *extra)
        paths[name] = str(tmp / "serving" / name / "1")
    np.save(tmp / "images.npy", images)
    np.save(tmp / "larger.npy", LARGER)
    client_env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", CLIENT, tmp / "images.npy", json.dumps(paths), tmp / "out.npz",
                          tmp / "larger.npy"],
                         env=client_env, capture_output=True, text=True, cwd="/")
    assert run.returncode == 0, run.stderr[-3000:]
    return mae, classifier, images, np.load(tmp / "out.npz"), paths


def test_encoder_serving_matches_keras(exported):
    mae, _, images, served, _ = exported
    tokens = ops.convert_to_numpy(mae.encoder(images.astype("float32") / 255.0))
    np.testing.assert_allclose(served["encoder/tokens"], tokens, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(served["encoder/features"], tokens[:, 1:].mean(axis=1), atol=1e-5, rtol=1e-5)


def test_encoder_serving_resizes_larger_images_as_the_training_pipeline_does(exported):
    mae, _, _, served, _ = exported
    pixels = to_model_pixels(LARGER, (16, 16), 3).numpy()  # antialiased: a plain resize aliases
    tokens = ops.convert_to_numpy(mae.encoder(pixels.astype("float32") / 255.0))
    np.testing.assert_allclose(served["larger/tokens"], tokens, atol=1e-5, rtol=1e-5)


def test_saved_models_store_each_weight_once(exported):
    mae, classifier, _, served, _ = exported
    assert served["encoder/stored_float32"] == mae.encoder.count_params()
    assert served["classifier/stored_float32"] == classifier.count_params()
    assert served["reconstructor/stored_float32"] == mae.count_params()


def test_int8_encoder_serving_matches_the_quantized_keras_encoder(exported):
    mae, _, images, served, paths = exported
    encoder = keras.saving.load_model(Path(paths["encoder"]).parents[2] / "mae.keras").encoder
    float_tokens = ops.convert_to_numpy(encoder(images.astype("float32") / 255.0))
    quantize(encoder, "int8")
    kernels = [layer.kernel for layer in encoder._flatten_layers() if layer.quantization_mode == "int8"]
    assert served["encoder_int8/stored_int8"] == sum(int(np.prod(kernel.shape)) for kernel in kernels) > 0
    tokens = ops.convert_to_numpy(encoder(images.astype("float32") / 255.0))
    np.testing.assert_allclose(served["encoder_int8/tokens"], tokens, atol=1e-4, rtol=1e-4)
    assert np.abs(tokens - float_tokens).max() > 1e-4  # quantized, not the float model


def test_classifier_serving_matches_keras_and_names_classes(exported):
    _, classifier, images, served, _ = exported
    probabilities = ops.convert_to_numpy(classifier(images.astype("float32") / 255.0))
    np.testing.assert_allclose(served["classifier/probabilities"], probabilities, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(served["classifier/class_index"], probabilities.argmax(axis=1))
    names = np.array(["cat", "dog", "owl"])[probabilities.argmax(axis=1)]
    assert served["classifier/class_name"].tolist() == names.tolist()


def test_reconstructor_serving_matches_keras_for_the_same_mask(exported):
    mae, _, images, served, _ = exported
    mask = served["reconstructor/mask"]
    np.testing.assert_array_equal(mask.sum(axis=1), 12)
    assert not np.array_equal(served["seeded/mask"], mask)
    # The prediction depends only on which patches are kept: rebuild noise from the mask.
    noise = mask + 0.5 * np.random.default_rng(0).random(mask.shape, dtype=np.float32)
    result = mae(images.astype("float32") / 255.0, noise=noise)
    np.testing.assert_array_equal(ops.convert_to_numpy(result["mask"]), mask)
    pixels = images.astype("float32") / 255.0
    patches = ops.convert_to_numpy(mae.patchify(pixels))
    pred = ops.convert_to_numpy(result["pred"]) * np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    pred += patches.mean(-1, keepdims=True)
    reconstruction = ops.convert_to_numpy(mae.unpatchify(pred))
    np.testing.assert_allclose(served["reconstructor/reconstruction"], reconstruction, atol=1e-5, rtol=1e-5)
    removed = np.repeat(np.repeat(mask.reshape(-1, 4, 4), 4, axis=1), 4, axis=2)[..., None]
    np.testing.assert_allclose(served["reconstructor/pasted"], np.where(removed, reconstruction, pixels), atol=1e-5)


def test_saved_model_cli_lists_the_signatures(exported):
    paths = exported[4]
    shown = subprocess.run(["saved_model_cli", "show", "--dir", paths["reconstructor"], "--all"],
                           env=ENV, capture_output=True, text=True).stdout
    for text in ("signature_def['serving_default']", "signature_def['reconstruct_seeded']",
                 "inputs['images']", "dtype: DT_UINT8", "shape: (-1, -1, -1, 3)", "outputs['mask']",
                 "shape: (-1, 16)", "outputs['reconstruction']", "shape: (-1, 16, 16, 3)", "dtype: DT_INT32"):
        assert text in shown, text
    shown = subprocess.run(["saved_model_cli", "show", "--dir", paths["classifier"], "--tag_set", "serve",
                            "--signature_def", "serving_default"], env=ENV, capture_output=True, text=True).stdout
    assert "outputs['class_name']" in shown and "DT_STRING" in shown and "shape: (-1, 3)" in shown


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="export's own checks run under TensorFlow")
def test_bad_exports_fail_with_one_line_and_leave_nothing(tmp_path, capsys, exported):
    from keras_mae.export import main

    mae_path = Path(exported[4]["encoder"]).parents[2] / "mae.keras"
    classifier_path = mae_path.with_name("classifier.keras")
    (tmp_path / "notes.keras").write_text("hello")
    quantized = keras.saving.load_model(mae_path).encoder
    quantize(quantized, "int8")
    quantized_path = tmp_path / "int8.keras"
    quantized.save(quantized_path)
    cases = [
        ([tmp_path / "notes.keras", "--kind", "encoder"], "is not a loadable .keras model"),
        ([tmp_path / "missing.keras", "--kind", "encoder"], "does not exist"),
        ([classifier_path, "--kind", "encoder"], "--kind encoder needs a keras-mae model"),
        ([classifier_path, "--kind", "reconstructor"], "needs a keras-mae MaskedAutoencoder"),
        ([mae_path, "--kind", "decoder"], "--kind must be one of encoder, classifier, reconstructor"),
        ([classifier_path, "--kind", "classifier", "--class-names", "a,b"], "3 outputs but 2 class names"),
        ([mae_path, "--kind", "encoder", "--quantize", "int2"], "--quantize must be one of int8, int4"),
        ([quantized_path, "--kind", "encoder", "--quantize", "int8"], "already quantized (int8)"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([*map(str, argv), "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    main([str(mae_path), "--kind", "encoder", "--output", str(tmp_path / "out")])
    before = (tmp_path / "out" / "1" / "saved_model.pb").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        main([str(mae_path), "--kind", "encoder", "--output", str(tmp_path / "out")])
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "1" / "saved_model.pb").stat().st_mtime_ns == before
    main([str(mae_path), "--kind", "encoder", "--output", str(tmp_path / "out"), "--overwrite", "--version", "1"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1"]
