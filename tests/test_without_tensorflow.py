"""The model library runs where TensorFlow is not installed (JAX and torch backends).

TensorFlow belongs to the data pipeline and the SavedModel export only. GPU images such
as the benchmark device's ship JAX and torch without it, and so may a user's; this
child process hides TensorFlow, keras-cv and TFDS from the import system, then pre-trains,
saves, reloads and fine-tunes a model there.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                                reason="the TensorFlow backend needs TensorFlow")

ROOT = Path(__file__).resolve().parents[1]

HIDE_TENSORFLOW = textwrap.dedent("""
    import importlib.machinery, sys
    HIDDEN = ("tensorflow", "keras_cv", "tensorflow_datasets", "tf_keras")

    class PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                return None  # as if not installed
            return super().find_spec(name, path, target)

    sys.meta_path = [PathFinderWithoutTensorFlow if finder is importlib.machinery.PathFinder else finder
                     for finder in sys.meta_path]
""")

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras, keras_mae

    try:
        import tensorflow
        hidden = False
    except ImportError:
        hidden = True
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).random((8, 16, 16, 3), dtype=np.float32)
    mae = keras_mae.MaskedAutoencoder.from_preset("mae_vit_debug_patch4", image_size=16, seed=1)
    mae.compile(optimizer=keras_mae.AdamW(1e-3, beta_2=0.95, weight_decay=0.05))
    history = mae.fit(images, batch_size=4, epochs=3, verbose=0).history["loss"]
    noise = np.random.default_rng(1).random((2, 16), dtype=np.float32)
    path = sys.argv[1]
    mae.save(path)
    loaded = keras.saving.load_model(path)
    before = keras.ops.convert_to_numpy(mae(images[:2], noise=noise)["pred"])
    after = keras.ops.convert_to_numpy(loaded(images[:2], noise=noise)["pred"])
    classifier = keras_mae.ViTClassifier(loaded.encoder, num_classes=2)
    # 1e-3: at 1e-2 Adam overshoots on 8 images and the last epoch's loss can jump above the first's.
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    labels = np.array([0, 1] * 4)
    bright = (images + labels[:, None, None, None]) / 2  # class 1 is brighter: learnable in a few steps
    fine_tuning = classifier.fit(bright, labels, batch_size=4, epochs=5, verbose=0).history["loss"]
    print(json.dumps({"hidden": hidden, "tensorflow_loaded": "tensorflow" in sys.modules,
                      "losses": [float(loss) for loss in history],
                      "fine_tuning_losses": [float(loss) for loss in fine_tuning],
                      "max_difference": float(np.abs(before - after).max())}))
""")


def test_pretrains_saves_loads_and_fine_tunes_without_tensorflow(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HIDE_TENSORFLOW)
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend(),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "mae.keras")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["hidden"] and not result["tensorflow_loaded"]
    assert result["losses"][-1] < result["losses"][0]
    assert result["fine_tuning_losses"][-1] < result["fine_tuning_losses"][0]
    assert result["max_difference"] == 0.0
