"""python -m keras_mae.features as a user runs it: the rows are the encoder's pooled
tokens of each image in order, with labels and files; bad input fails in one line."""

import sys

import keras
import numpy as np
import pytest
from keras import ops
from PIL import Image

from conftest import run_main, tiny_mae
from keras_mae import features
from keras_mae.data import to_model_images, to_model_pixels


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("model") / "mae.keras"
    tiny_mae().save(path)  # 16 x 16 x 3 images
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of RGB, grayscale and RGBA images of different sizes, none 16 x 16."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, mode, channels in (("cats", "RGB", 3), ("dogs", "L", 1), ("dogs", "RGBA", 4)):
        (root / name).mkdir(exist_ok=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (20 + 5 * i, 30, channels), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(root / name / f"{mode}{i}.png")
    return root


def run(capsys, *argv):
    return run_main(features.main, capsys, *argv)


def expected_rows(model_file, files, pooling):
    encoder = keras.saving.load_model(model_file).encoder
    images = []
    for path in files:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # the pipeline's decoding: RGB whatever the file holds
        images.append(to_model_images(to_model_pixels(pixels, (16, 16), 3)).numpy())
    tokens = ops.convert_to_numpy(encoder(np.stack(images), training=False))
    return tokens[:, 1:].mean(axis=1) if pooling == "avg" else tokens[:, 0]


@pytest.mark.parametrize("pooling", ["avg", "token"])
def test_rows_are_each_images_pooled_tokens_with_its_label_and_file(capsys, tmp_path, model_file, folder, pooling):
    output = tmp_path / "out" / "features.npz"
    code, out, err = run(capsys, model_file, "--dataset", folder, "--output", output, "--pooling", pooling,
                         "--batch-size", "4", "--verbose", "2")
    assert code == 0, err
    assert f"Wrote {output}: features 9 x 16" in out
    with np.load(output) as saved:
        files = saved["files"].tolist()
        assert files == sorted(str(p) for p in folder.rglob("*.png"))
        assert saved["class_names"].tolist() == ["cats", "dogs"]
        np.testing.assert_array_equal(saved["labels"], [0, 0, 0, 1, 1, 1, 1, 1, 1])
        assert saved["features"].dtype == np.float32
        np.testing.assert_allclose(saved["features"], expected_rows(model_file, files, pooling), atol=1e-5)
    assert [p.name for p in output.parent.iterdir()] == ["features.npz"]  # no temporary left


def test_unlabelled_limited_dataset_and_overwrite(capsys, tmp_path, model_file, folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((folder / "cats").iterdir()):
        (flat / path.name).write_bytes(path.read_bytes())
    output = tmp_path / "f.npz"
    output.write_bytes(b"older")
    code, _, err = run(capsys, model_file, "--dataset", flat, "--output", output)
    assert code == 2 and "exists; pass --overwrite" in err and output.read_bytes() == b"older"
    code, out, err = run(capsys, model_file, "--dataset", flat, "--output", output, "--overwrite", "--limit", "2",
                         "--verbose", "0")
    assert code == 0 and out == "", err
    with np.load(output) as saved:
        np.testing.assert_array_equal(saved["labels"], [-1, -1])
        assert saved["class_names"].size == 0 and saved["features"].shape == (2, 16)


def test_the_synthetic_dataset_has_no_files(capsys, tmp_path, model_file):
    output = tmp_path / "s.npz"
    code, _, err = run(capsys, model_file, "--dataset", "synthetic", "--limit", "5", "--output", output,
                       "--verbose", "0")
    assert code == 0, err
    with np.load(output) as saved:
        assert "files" not in saved.files and saved["features"].shape == (5, 16)
        assert set(saved["labels"].tolist()) <= set(range(len(saved["class_names"])))


@pytest.mark.parametrize("argv, message", [
    (["--output", "f.txt"], "--output must be a .npz file"),
    (["--output", "f.npz", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--output", "f.npz", "--limit", "0"], "--limit must be at least 1"),
    (["--output", "f.npz", "--dataset", "no_such_dataset"], "is neither fashion_mnist"),
])
def test_bad_input_fails_in_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch, model_file, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, model_file, *argv)
    assert code == 2
    assert err.startswith("python -m keras_mae.features: error: ") and message in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_a_path_that_is_not_a_model_fails_in_one_line(capsys, tmp_path):
    code, _, err = run(capsys, tmp_path / "missing.keras", "--output", tmp_path / "f.npz")
    assert code == 2 and "missing.keras does not exist" in err and not (tmp_path / "f.npz").exists()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        features.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--output", "--overwrite", "--dataset", "--split", "--data-dir", "--pooling", "--limit",
                 "--batch-size", "--verbose"):
        assert flag in text
    assert sys.modules["keras_mae.features"].__doc__.splitlines()[0] in text
