"""finetune.py as a user runs it: the three modes, its files, the few-label subset, k-NN, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import BATCH_HOOKS_ON_MAIN_THREAD, probe_batch_end_threads, run_main, tiny_mae

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import finetune  # noqa: E402

from keras_mae.classifier import ViTClassifier  # noqa: E402
from keras_mae.data import load_source, stratified_indices, stratified_split  # noqa: E402
from keras_mae.evaluation import knn_accuracy  # noqa: E402

# The synthetic source: 512 32x32 RGB images, 4 classes; a 51-image stratified test split.
QUICK = ["--dataset", "synthetic", "--batch-size", "32", "--base-lr", "3e-2", "--warmup-epochs", "0", "--verbose", "0"]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A tiny MAE for 32 px images, saved as a train.py run would save it."""
    keras.utils.set_random_seed(0)
    mae = tiny_mae(image_size=32, encoder_depth=3)
    path = tmp_path_factory.mktemp("pretrained") / "mae.keras"
    mae.save(path)
    return path


def run(capsys, *argv):
    return run_main(finetune.main, capsys, *argv)


def losses(run_dir):
    rows = [line.split(",") for line in (run_dir / "history.csv").read_text().splitlines()]
    return [float(row[rows[0].index("loss")]) for row in rows[1:]]


def weights_by_path(model):
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


def test_help_explains_every_flag(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for flag in ("--encoder", "--init", "--mode", "--blocks", "--dataset", "--data-dir", "--image-size", "--epochs",
                 "--batch-size", "--labels-fraction", "--output-dir", "--seed", "--export", "--knn", "--jit-compile"):
        assert flag in out
    assert all(action.help for action in finetune.build_parser()._actions)


def test_linear_probe_keeps_the_encoder_frozen_and_writes_consistent_metrics(capsys, tmp_path, encoder_file,
                                                                              monkeypatch):
    out_dir = tmp_path / "linear"
    probe = probe_batch_end_threads(monkeypatch)
    code, out, err = run(capsys, "--encoder", encoder_file, "--mode", "linear", "--epochs", "4", "--knn",
                         "--output-dir", out_dir, *QUICK)
    assert code == 0, err
    assert probe.on_main_thread == {BATCH_HOOKS_ON_MAIN_THREAD}  # fit does not wait for each step's loss
    for name in ("classifier.keras", "metrics.json", "confusion_matrix.png", "history.csv", "training_curves.png",
                 "config.json"):
        assert (out_dir / name).is_file(), name
    last = out.strip().splitlines()[-1]
    assert last.startswith("test_accuracy=")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert float(last.split("=")[1]) == pytest.approx(metrics["top1_accuracy"], abs=1e-6)
    assert 0 <= metrics["knn_accuracy"] <= 1 and metrics["num_examples"] == 51
    assert set(metrics["per_class_accuracy"]) == {"0", "1", "2", "3"}
    assert "top5_accuracy" not in metrics and "top-5" not in out  # always 1 with 4 classes: no figure
    assert np.sum(metrics["confusion_matrix"]) == 51
    assert losses(out_dir)[-1] < losses(out_dir)[0]

    classifier = keras.saving.load_model(out_dir / "classifier.keras")
    assert isinstance(classifier, ViTClassifier) and classifier.class_names == ["0", "1", "2", "3"]
    original = weights_by_path(keras.saving.load_model(encoder_file).encoder)
    for path, value in weights_by_path(classifier.encoder).items():
        np.testing.assert_array_equal(value, original[path])
    # metrics.json says what model.evaluate says on the same test split.
    _, test = stratified_split(load_source("synthetic"), 0.1, seed=0)
    images = test.images.astype("float32") / 255.0
    classifier.compile(loss="categorical_crossentropy", metrics=["accuracy"])
    _, accuracy = classifier.evaluate(images, keras.utils.to_categorical(test.labels, 4), verbose=0)
    assert accuracy == pytest.approx(metrics["top1_accuracy"], abs=1e-6)


def test_partial_fine_tuning_moves_only_the_last_blocks(capsys, tmp_path, encoder_file):
    out_dir = tmp_path / "partial"
    code, _, err = run(capsys, "--encoder", encoder_file, "--mode", "partial", "--blocks", "1", "--epochs", "3",
                       "--no-augment", "--output-dir", out_dir, *QUICK)
    assert code == 0, err
    assert losses(out_dir)[-1] < losses(out_dir)[0]
    encoder = keras.saving.load_model(out_dir / "classifier.keras").encoder
    original = weights_by_path(keras.saving.load_model(encoder_file).encoder)
    moved = {path.split("/")[1] for path, value in weights_by_path(encoder).items()
             if not np.array_equal(value, original[path])}
    assert moved == {"block_2", "norm"}


def test_full_fine_tuning_lowers_the_loss(capsys, tmp_path, encoder_file):
    out_dir = tmp_path / "full"
    code, _, err = run(capsys, "--encoder", encoder_file, "--mode", "full", "--epochs", "4", "--no-augment",
                       "--output-dir", out_dir, *QUICK)
    assert code == 0, err
    assert losses(out_dir)[-1] < losses(out_dir)[0]
    assert json.loads((out_dir / "config.json").read_text())["encoder"]["drop_path_rate"] == 0.1


def test_a_diverging_run_saves_no_checkpoint_and_says_so(capsys, tmp_path, encoder_file):
    out_dir = tmp_path / "diverged"
    code, _, err = run(capsys, "--encoder", encoder_file, "--mode", "full", "--epochs", "2", "--output-dir", out_dir,
                       *QUICK, "--base-lr", "1e30")
    assert code == 1
    assert err.splitlines()[-1] == ("finetune.py: error: the loss became NaN or infinite in epoch 1. No epoch ended "
                                    "with a finite loss, so none was kept: start again with a lower --base-lr "
                                    "(and --overwrite).")
    assert not (out_dir / "state.json").exists() and not list(out_dir.glob("checkpoint_*"))
    assert not (out_dir / "classifier.keras").exists()


def test_few_labels_with_mixup_cutmix_and_export(capsys, tmp_path, encoder_file):
    out_dir = tmp_path / "few"
    code, out, err = run(capsys, "--encoder", encoder_file, "--mode", "full", "--epochs", "1", "--labels-fraction",
                         "0.5", "--mixup", "0.8", "--cutmix", "1.0", "--export", "--output-dir", out_dir, *QUICK)
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["train_examples"] == pytest.approx(230, abs=2)  # half of the 461 left after the test split
    # The SavedModel, served by TensorFlow alone, answers like classifier.keras.
    from test_export import CLIENT, ENV

    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype("uint8")
    np.save(tmp_path / "images.npy", images)
    paths = json.dumps({"classifier": str(out_dir / "serving" / "classifier" / "1")})
    client = subprocess.run([sys.executable, "-c", CLIENT, str(tmp_path / "images.npy"), paths,
                             str(tmp_path / "served.npz")], env=ENV, capture_output=True, text=True)
    assert client.returncode == 0, client.stderr[-3000:]
    served = np.load(tmp_path / "served.npz")
    expected = keras.ops.convert_to_numpy(
        keras.saving.load_model(out_dir / "classifier.keras")(images.astype("float32") / 255.0))
    np.testing.assert_allclose(served["classifier/probabilities"], expected, atol=1e-5)
    assert list(served["classifier/class_name"]) == [str(i) for i in expected.argmax(1)]


def test_random_init_needs_no_encoder_file(capsys, tmp_path):
    code, out, err = run(capsys, "--init", "random", "--preset", "mae_vit_debug_patch4", "--mode", "linear",
                         "--epochs", "1", "--output-dir", tmp_path / "scratch", *QUICK)
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("test_accuracy=")


def test_stratified_fraction_keeps_every_class_in_proportion():
    labels = np.repeat(np.arange(5), [100, 50, 20, 10, 3])
    chosen = stratified_indices(labels, 0.1, seed=3)
    assert np.bincount(labels[chosen]).tolist() == [10, 5, 2, 1, 1]  # at least one per class
    assert np.array_equal(chosen, np.unique(chosen))
    assert not np.array_equal(chosen, stratified_indices(labels, 0.1, seed=4))
    held_out = stratified_indices(labels, 0.5, seed=3, keep=1)  # a test split leaves some of each class
    assert np.bincount(labels[held_out]).tolist() == [50, 25, 10, 5, 2]
    assert np.bincount(labels[stratified_indices(np.array([0, 0, 1]), 0.5, keep=1)]).tolist() == [1]


def test_knn_accuracy():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 5
    labels = rng.integers(0, 3, 300)
    features = centers[labels] + rng.normal(size=(300, 8))
    assert knn_accuracy(features[:200], labels[:200], features[200:], labels[200:], k=20) > 0.95
    shuffled = rng.permutation(labels[:200])
    assert knn_accuracy(features[:200], shuffled, features[200:], labels[200:], k=20) < 0.6


@pytest.fixture
def unlabelled_folder(tmp_path):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, "uint8")).save(folder / f"{i}.png")
    return folder


def test_bad_input_fails_with_one_clear_line(capsys, tmp_path, encoder_file, unlabelled_folder):
    not_mae = tmp_path / "dense.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(not_mae)
    cases = [
        (["--encoder", not_mae], "not a keras-mae model"),
        (["--encoder", tmp_path / "missing.keras"], "does not exist"),
        (["--encoder", encoder_file, "--dataset", unlabelled_folder], "has no labels"),
        (["--encoder", encoder_file, "--image-size", "28"], "does not match the encoder"),
        (["--encoder", encoder_file, "--mode", "partial", "--blocks", "4"], "larger than the encoder's depth"),
        (["--encoder", encoder_file, "--labels-fraction", "0"], "--labels-fraction must be in (0, 1]"),
        (["--encoder", encoder_file, "--labels-fraction", "1.5"], "--labels-fraction must be in (0, 1]"),
        (["--encoder", encoder_file, "--mode", "partial"], "needs --blocks"),
        ([], "--encoder is required"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv, "--output-dir", tmp_path / "bad", "--dataset", "synthetic")\
            if "--dataset" not in argv else run(capsys, *argv, "--output-dir", tmp_path / "bad")
        assert code == 2, (argv, err)
        assert message in err and len(err.splitlines()) == 1 and err.startswith("finetune.py: error:"), (argv, err)
