import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from keras_mae.data import (
    DataError,
    FASHION_MNIST_FILES,
    load_fashion_mnist,
    load_image_folder,
    load_source,
    make_pipeline,
    crop_and_flip_augmentation,
    read_idx,
    stratified_split,
    with_test_split,
)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder, count=12):
    rng = np.random.default_rng(0)
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        write_idx(folder / images_name, rng.integers(0, 256, (count, 28, 28)))
        write_idx(folder / labels_name, np.arange(count) % 10)
    return folder


def test_idx_files_from_data_dir(tmp_path):
    source = load_fashion_mnist("train", data_dir=fake_fashion_mnist(tmp_path))
    assert source.images.shape == (12, 28, 28, 1) and source.images.dtype == np.uint8
    np.testing.assert_array_equal(source.labels, np.arange(12) % 10)
    assert str(tmp_path) in source.description and source.num_channels == 1
    assert len(source.class_names) == 10


def test_read_idx_rejects_other_and_truncated_files(tmp_path):
    (tmp_path / "text.gz").write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "text.gz")
    header = bytes([0, 0, 8, 2]) + (5).to_bytes(4, "big") + (5).to_bytes(4, "big")
    (tmp_path / "short.gz").write_bytes(gzip.compress(header + bytes(7)))
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short.gz")


def test_data_dir_without_the_files_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not hold the Fashion-MNIST files"):
        load_fashion_mnist("train", data_dir=tmp_path)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_the_debian_package():
    train, test = load_source("fashion_mnist"), load_source("fashion_mnist", split="test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert str(DEBIAN_FASHION_MNIST) in train.description
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    batch = next(iter(make_pipeline(test, (28, 28), 1, 32, training=False)))
    assert batch.shape == (32, 28, 28, 1) and 0.0 <= float(np.min(batch)) and float(np.max(batch)) <= 1.0


def image_folder(root):
    rng = np.random.default_rng(1)
    pixels = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "deeper").mkdir(parents=True)
    Image.fromarray(pixels(20, 30, 3)).save(root / "cats" / "rgb.png")
    Image.fromarray(pixels(40, 40, 4), "RGBA").save(root / "cats" / "rgba.png")
    Image.fromarray(pixels(25, 25)).save(root / "cats" / "gray.JPG", format="JPEG")
    Image.fromarray(pixels(16, 16, 3)).convert("P").save(root / "dogs" / "palette.gif")
    Image.fromarray(pixels(12, 18, 3)).save(root / "dogs" / "deeper" / "bitmap.bmp")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_with_classes_and_a_corrupt_file(tmp_path, channels):
    with pytest.warns(UserWarning, match="Skipping 1 of 6 image files"):
        source = load_image_folder(image_folder(tmp_path))
    assert source.num_examples == 5 and source.class_names == ("cats", "dogs")
    assert sorted(source.labels.tolist()) == [0, 0, 0, 1, 1]
    batches = list(make_pipeline(source, (16, 16), channels, 2, training=False, with_labels=True))
    images = np.concatenate([b[0] for b in batches])
    assert images.shape == (5, 16, 16, channels) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_image_folder_trains_epochs_of_known_length_despite_a_corrupt_file(tmp_path):
    # Keras warns "Your input ran out of data" and shows no epoch total for a dataset of
    # unknown length; the folder's pipeline knows its length because the scan leaves out
    # every file its decoder cannot read.
    import keras

    from keras_mae import MaskedAutoencoder

    with pytest.warns(UserWarning, match="Skipping 1 of 6"):
        source = load_image_folder(image_folder(tmp_path))
    pipeline = make_pipeline(source, (16, 16), 3, 2, seed=0)
    assert int(pipeline.cardinality()) == 2  # 5 images, batches of 2, the partial one dropped
    mae = MaskedAutoencoder.from_preset("mae_vit_debug_patch4", image_size=16)
    mae.compile(optimizer=keras.optimizers.AdamW(1e-3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = mae.fit(pipeline, epochs=2, verbose=0)
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    assert len(history.history["loss"]) == 2


def test_image_folder_without_class_folders_has_no_labels(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = load_image_folder(tmp_path)
    assert source.num_examples == 1 and not source.has_labels


def test_image_folder_reads_webp_leaves_out_hidden_files_and_names_unreadable_formats(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    for folder in ("cats", "dogs", ".ipynb_checkpoints"):
        (tmp_path / folder).mkdir()
    Image.fromarray(pixels).save(tmp_path / "cats" / "photo.webp")
    Image.fromarray(pixels).save(tmp_path / "cats" / "scan.tif")
    Image.fromarray(pixels).save(tmp_path / "dogs" / "photo.png")
    Image.fromarray(pixels).save(tmp_path / ".ipynb_checkpoints" / "copy.png")  # would be a third class
    (tmp_path / "dogs" / "._photo.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "dogs" / "labels.csv").write_text("photo.png,dog\n")  # not an image: no word about it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = load_image_folder(tmp_path)
    assert [str(w.message) for w in caught] == [
        f"Skipping 1 image under {tmp_path} in formats TensorFlow cannot decode (1 .tif); "
        "convert them to PNG or JPEG to use them."
    ]
    assert source.num_examples == 2 and source.class_names == ("cats", "dogs")
    assert [Path(f).name for f in source.files] == ["photo.webp", "photo.png"]
    images, labels = next(iter(make_pipeline(source, (16, 16), 3, 2, training=False, with_labels=True)))
    assert images.shape == (2, 16, 16, 3) and sorted(np.asarray(labels).tolist()) == [0, 1]

    (tmp_path / "cats" / "photo.webp").unlink()
    (tmp_path / "dogs" / "photo.png").unlink()
    Image.fromarray(pixels).save(tmp_path / "dogs" / "scan.tiff")
    with pytest.raises(DataError, match=r"holds no image files \(png, .*webp\); convert its other images "
                                        r"\(1 .tif, 1 .tiff\) to PNG or JPEG"):
        load_image_folder(tmp_path)


def test_a_large_folder_says_that_it_decodes_every_file_first(tmp_path, capsys, monkeypatch):
    import keras_mae.data

    monkeypatch.setattr(keras_mae.data, "SCAN_NOTICE_FROM", 3)
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
    load_image_folder(tmp_path)
    assert capsys.readouterr().out == ""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "2.png")
    assert load_image_folder(tmp_path).num_examples == 3
    assert capsys.readouterr().out.startswith("Decoding each of the 3 image files once")


def test_large_jpegs_are_decoded_at_the_smallest_scale_that_still_covers_the_model_size(tmp_path):
    from keras_mae.data import _decode_file, image_dataset

    y, x = np.mgrid[0:200, 0:120] / 100.0  # smooth, photo-like content: two gradients and a disc
    pixels = np.stack([np.sin(3 * x + y), np.cos(2 * y), ((x - 0.6) ** 2 + (y - 1) ** 2 < 0.2) * 1.6 - 0.8], -1)
    pixels = ((pixels * 0.5 + 0.5) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    shape = lambda name, at_least: tuple(_decode_file(str(tmp_path / name), at_least).shape)  # noqa: E731
    assert shape("photo.jpg", None) == (200, 120, 3)
    assert shape("photo.jpg", (1, 1)) == (25, 15, 3)  # 1/8
    assert shape("photo.jpg", (16, 16)) == (50, 30, 3)  # 1/4: at 1/8 the width, 15, would not cover 16
    assert shape("photo.jpg", (100, 60)) == (100, 60, 3)  # 1/2, exactly
    assert shape("photo.jpg", (101, 60)) == (200, 120, 3)  # full size
    assert shape("photo.png", (1, 1)) == (200, 120, 3)  # only libjpeg decodes to a smaller scale

    # What reaches the model hardly changes: the pipeline's 24 x 24 images against the full
    # decode resized directly.
    full = tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(str(tmp_path / "photo.jpg"))), (24, 24), antialias=True)
    source = load_image_folder(tmp_path)
    images = np.stack(list(image_dataset(source, (24, 24), 3).as_numpy_iterator()))
    assert images.shape == (2, 24, 24, 3)
    for image in images:  # the JPEG at 1/4 scale, and the PNG (no JPEG loss, full size)
        difference = np.abs(image * 255 - full.numpy())
        assert difference.mean() < 1.5 and difference.max() < 20  # unfiltered subsampling: 2.2 and 66


def test_unusable_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="holds no image files"):
        load_image_folder(tmp_path)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="None of the 1 image files"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="neither fashion_mnist"):
        load_source("no_such_dataset_or_folder")


def test_tfds_source_runs_the_real_loading_code_on_mock_data():
    with tfds.testing.mock_data(num_examples=10):
        source = load_source("tfds:cifar10:test")
        assert source.num_examples == 10 and source.num_channels == 3 and len(source.class_names) == 10
        images, labels = next(iter(make_pipeline(source, (16, 16), 3, 4, with_labels=True)))
    assert images.shape == (4, 16, 16, 3) and labels.shape == (4,)
    assert 0 <= int(np.min(labels)) and int(np.max(labels)) < 10


class KerasMaeTestShapes(tfds.core.GeneratorBasedBuilder):
    """A real TFDS dataset built on disk by the tests: `mock_data` has no splits to slice."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(names=["dark", "light"]),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20, seed=0), "test": self._generate_examples(6, seed=1)}

    def _generate_examples(self, count, seed):
        for i in range(count):
            image = np.full((8, 8, 3), 40 + 160 * (i % 2), np.uint8)
            image[0, 0, 0] = 100 * seed + i  # which example it is
            yield i, {"image": image, "label": i % 2}


def example_ids(dataset):
    return [int(image[0, 0, 0]) for image, _ in dataset.as_numpy_iterator()]


def test_held_out_split_leaves_every_class_something_to_learn_from(tmp_path):
    for name, count in [("many", 4), ("single", 1), ("solo", 1)]:
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / name / f"{i}.png")
    source = load_image_folder(tmp_path)
    with pytest.warns(UserWarning, match="Classes 'single', 'solo' have one image each: kept for training, not"):
        kept, held_out = stratified_split(source, 0.25)
    assert sorted(kept.labels.tolist()) == [0, 0, 0, 1, 2] and held_out.labels.tolist() == [0]
    for name in ("many", "solo"):
        for path in (tmp_path / name).iterdir():
            path.unlink()
        (tmp_path / name).rmdir()
    (tmp_path / "other").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "other" / "0.png")
    with pytest.raises(DataError, match="too small to hold out 25% for testing: no class has two images"):
        stratified_split(load_image_folder(tmp_path), 0.25)


def test_tfds_subsets_hold_the_same_examples_on_every_pass(tmp_path):
    # In several shards, which TFDS reads in a shuffled order: a held-out part chosen by
    # position must not become other examples on the next pass (test images in training).
    tfds.builder("keras_mae_test_shapes", data_dir=tmp_path).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    source = load_source("tfds:keras_mae_test_shapes:train", data_dir=tmp_path)
    kept, held_out = stratified_split(source, 0.25)
    first_kept, first_held_out = example_ids(kept.dataset), example_ids(held_out.dataset)
    assert sorted(first_kept + first_held_out) == list(range(20))
    for _ in range(2):
        assert example_ids(kept.dataset) == first_kept and example_ids(held_out.dataset) == first_held_out
    assert example_ids(source.take(5).dataset) == example_ids(source.take(5).dataset)


def test_tfds_splits_take_slices_and_unions_as_tfds_writes_them(tmp_path):
    name = "tfds:keras_mae_test_shapes"
    for split, count in [("train", 20), ("train[:50%]", 10), ("test[:3]", 3), ("train+test", 26)]:
        source = load_source(f"{name}:{split}", data_dir=tmp_path)
        assert source.num_examples == count and source.class_names == ("dark", "light"), split
        images = np.concatenate(list(make_pipeline(source, (8, 8), 3, 4, training=False)))
        assert images.shape == (count, 8, 8, 3), split
    assert load_source(name, "test", data_dir=tmp_path).num_examples == 6
    # An explicit split has no test split beside it: a stratified part is held out, and
    # both parts keep a known length (else Keras warns of running out of data every pass).
    kept, held_out = with_test_split(load_source(f"{name}:train[:50%]", data_dir=tmp_path), f"{name}:train[:50%]")
    assert (kept.num_examples, held_out.num_examples) == (8, 2)
    assert int(kept.dataset.cardinality()) == 8 and int(held_out.dataset.cardinality()) == 2
    assert int(make_pipeline(kept, (8, 8), 3, 4).cardinality()) == 2
    assert sorted(held_out.label_array().tolist()) == [0, 1]
    with pytest.raises(DataError, match=r"has no split 'validation' \(its splits: train, test; slices"):
        load_source(f"{name}:validation", data_dir=tmp_path)
    with pytest.raises(DataError, match="no split 'train\\[:200%\\]'"):
        load_source(f"{name}:train[:200%]", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"train\[5:2\] holds no examples"):
        load_source(f"{name}:train[5:2]", data_dir=tmp_path)


def test_tfds_errors_are_clear():
    with pytest.raises(DataError, match="Unknown TFDS dataset 'no_such_thing'") as raised:
        load_source("tfds:no_such_thing")
    assert len(str(raised.value).splitlines()) == 1  # not TFDS's list of every dataset
    with pytest.raises(DataError, match=r"Unknown TFDS dataset 'cifar_10'\. Did you mean 'cifar10'"):
        load_source("tfds:cifar_10")
    with pytest.raises(DataError, match="Expected tfds:NAME"):
        load_source("tfds:")
    with pytest.raises(DataError, match="Expected tfds:NAME"):
        load_source("tfds:cifar10:")


def test_tfds_can_prepare_its_registered_datasets_with_the_requirements():
    # Preparing a TFDS dataset checks its downloads against registered checksums, which
    # TFDS finds through `importlib_resources`, a package it imports but does not declare.
    urls = tfds.builder("fashion_mnist").url_infos
    assert sorted(url.rsplit("/", 1)[1] for url in urls) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    ]


def test_augmentation_keeps_shape_and_range():
    augment = crop_and_flip_augmentation((16, 16))
    images = np.random.default_rng(0).random((4, 16, 16, 3), dtype=np.float32)
    out = np.asarray(augment(images, tf.constant([1, 2], tf.int64)))
    assert out.shape == images.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert not np.allclose(out, images)


def test_augmentation_crops_the_asked_area_and_flips_about_half():
    # A horizontal ramp 0..1: a crop of a quarter of the area (half the width) spans half
    # the ramp, read backwards when flipped.
    ramp = np.tile(np.linspace(0, 1, 33, dtype=np.float32), (33, 1))
    images = np.repeat(ramp[None, :, :, None], 200, axis=0)
    out = np.asarray(crop_and_flip_augmentation((33, 33), crop_area=(0.25, 0.25), aspect_ratio=(1, 1))(
        images, tf.constant([0, 7], tf.int64)))
    span = out[:, 0, -1, 0] - out[:, 0, 0, 0]
    np.testing.assert_allclose(np.abs(span), 0.5, atol=1e-5)
    np.testing.assert_allclose(out[:, 0], out[:, -1], atol=1e-6)  # rows unchanged: the crop is of the same image
    assert 70 < np.sum(span < 0) < 130

    whole = np.asarray(crop_and_flip_augmentation((33, 33), crop_area=(1, 1), aspect_ratio=(1, 1))(
        images[:20], tf.constant([0, 8], tf.int64)))
    for image in whole:  # the whole image, or its mirror
        assert np.allclose(image, images[0], atol=1e-6) or np.allclose(image, images[0][:, ::-1], atol=1e-6)


def test_augmentation_rejects_impossible_areas():
    for area in [(0.0, 1.0), (0.5, 0.2), (0.2, 1.5)]:
        with pytest.raises(ValueError, match="crop_area"):
            crop_and_flip_augmentation((16, 16), crop_area=area)


def test_augmented_pipeline_is_reproducible_from_its_seed_and_varies_by_epoch():
    source = load_source("synthetic").take(24)
    augment = crop_and_flip_augmentation((16, 16))

    def two_epochs(seed):
        dataset = make_pipeline(source, (16, 16), 3, 8, augment=augment, with_labels=True, seed=seed)
        return [np.concatenate([images for images, _ in dataset.as_numpy_iterator()]) for _ in range(2)]

    first, again, other = two_epochs(5), two_epochs(5), two_epochs(6)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[0], other[0])


def test_training_pipeline_shuffles_augments_and_drops_the_last_partial_batch():
    source = load_source("synthetic").take(50)
    augment = crop_and_flip_augmentation((32, 32))
    batches = list(make_pipeline(source, (32, 32), 3, 16, augment=augment, seed=3))
    assert [b.shape[0] for b in batches] == [16, 16, 16]


def test_pipelines_run_without_tf_data_autotuning_also_in_what_is_chained_after_them():
    # With the autotuner, deleting the iterator that Keras leaves at each epoch's last
    # batch waited seconds for its thread; AUTOTUNE's starting values feed as fast.
    source = load_source("synthetic").take(20)
    for training in (True, False):
        dataset = make_pipeline(source, (16, 16), 3, 8, training=training, with_labels=True)
        assert dataset.options().autotune.enabled is False
        chained = dataset.map(lambda images, labels: (images, labels + 1), num_parallel_calls=tf.data.AUTOTUNE)
        assert chained.options().autotune.enabled is False
        assert sum(int(images.shape[0]) for images, _ in chained) == (16 if training else 20)


def test_pipeline_keeps_uint8_pixels_until_the_batch_and_gives_the_model_the_same_images(tmp_path):
    # The cache and the shuffle buffer hold uint8 (a quarter of float32); the model still
    # gets float32 in [0, 1], equal to the float images of image_dataset.
    from keras_mae.data import image_dataset

    rng = np.random.default_rng(4)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (30 + i, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    source = load_image_folder(tmp_path)
    pixels = np.stack(list(image_dataset(source, (16, 16), 1, as_pixels=True).as_numpy_iterator()))
    floats = np.stack(list(image_dataset(source, (16, 16), 1).as_numpy_iterator()))
    assert pixels.dtype == np.uint8 and pixels.shape == (6, 16, 16, 1) and len(np.unique(pixels)) > 20
    np.testing.assert_array_equal(floats, pixels.astype(np.float32) / 255)
    batches = list(make_pipeline(source, (16, 16), 1, 4, training=False))
    assert [b.dtype for b in batches] == [np.float32, np.float32]
    np.testing.assert_array_equal(np.concatenate(batches), floats)
