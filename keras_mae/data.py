"""Where images come from, and the `tf.data` pipeline that feeds `fit` on every backend.

Sources (`load_source(spec)`):
- `fashion_mnist`: the four IDX `.gz` files, looked up in `data_dir`, then
  `/usr/share/datasets/fashion-mnist/` (Debian's `dataset-fashion-mnist`), then keras'
  cache `~/.keras/datasets/fashion-mnist/`, then downloaded through keras.
- `tfds:NAME[:SPLIT]`: any `tensorflow_datasets` dataset with an `image` feature; SPLIT
  as TFDS writes it (`train`, `train[:10%]`, `train+test`).
- a folder: every png/jpg/jpeg/bmp/gif/webp below it, hidden files and folders left out;
  sub-folders are class labels when images sit in them. Files that TensorFlow cannot
  decode, and images in other formats (tiff, heic, ...), are skipped with one warning each.
- `synthetic`: random shapes, for smoke tests only.

Images reach the model as float32 in [0, 1], `(batch, height, width, channels)`.
"""

import collections
import dataclasses
import difflib
import gzip
import mimetypes
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

FASHION_MNIST_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("~/.keras/datasets/fashion-mnist").expanduser(),
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Folders of at least this many files say that they are being checked (_decodable).
SCAN_NOTICE_FROM = 2000
JPEG_SCALES = (8, 4, 2)  # the reductions libjpeg decodes to directly, largest first (_decode_file)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # what tf.io.decode_image reads


class DataError(ValueError):
    """A data source that cannot be used, with a message meant for the user."""


@dataclasses.dataclass
class ImageSource:
    """Images and labels of one split, before resizing and batching.

    Either `images` (uint8 `(N, H, W, C)` in memory) or `files` (paths decoded in the
    pipeline) or `dataset` (a `tf.data.Dataset` of `(uint8 image, label)`) is set.
    `labels` is None when the source has none.
    """

    name: str
    description: str
    num_examples: int
    num_channels: int
    class_names: tuple = ()
    images: np.ndarray = None
    files: list = None
    dataset: tf.data.Dataset = None
    labels: np.ndarray = None

    @property
    def has_labels(self):
        return bool(self.class_names)

    def take(self, count):
        """The first `count` examples only."""
        count = min(count, self.num_examples)
        return dataclasses.replace(
            self,
            description=f"{self.description}, first {count} used",
            num_examples=count,
            images=None if self.images is None else self.images[:count],
            files=None if self.files is None else self.files[:count],
            dataset=None if self.dataset is None else self.dataset.take(count),
            labels=None if self.labels is None else self.labels[:count],
        )

    def label_array(self):
        """Every example's label as int32 `(N,)`; a dataset source is read once for it."""
        if not self.has_labels:
            raise DataError(f"{self.description} has no labels.")
        if self.labels is not None:
            return np.asarray(self.labels, dtype="int32")
        return np.fromiter(self.dataset.map(lambda image, label: label).as_numpy_iterator(), dtype="int32")

    def select(self, indices, description):
        """The examples at `indices` (sorted, unique), e.g. a stratified subset."""
        indices = np.asarray(indices, dtype="int64")
        dataset = None
        if self.dataset is not None:
            keep = np.zeros(self.num_examples, dtype=bool)
            keep[indices] = True
            keep = tf.constant(keep)
            dataset = self.dataset.enumerate().filter(lambda i, example: keep[i]).map(lambda i, example: example)
            # A filter hides the length from tf.data, and Keras warns of running out of data
            # at the end of every pass over a dataset of unknown length.
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(indices)))
        return dataclasses.replace(
            self,
            description=f"{self.description}, {description}",
            num_examples=len(indices),
            images=None if self.images is None else self.images[indices],
            files=None if self.files is None else [self.files[i] for i in indices],
            dataset=dataset,
            labels=None if self.labels is None else self.labels[indices],
        )


def stratified_indices(labels, fraction, seed=0, keep=0):
    """Sorted indices of `fraction` of each class (rounded, at least one per class), but
    never so many that fewer than `keep` of a class are left out."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(max(1, int(round(fraction * len(members)))), len(members) - keep)
        chosen.append(rng.choice(members, size=max(count, 0), replace=False))
    return np.sort(np.concatenate(chosen))


def stratified_split(source, fraction, seed=0):
    """`(rest, held_out)`: `fraction` of every class held out, for sources without a test
    split. A class of one example stays whole in `rest` (untested, but learnable)."""
    labels = source.label_array()
    held_out = stratified_indices(labels, fraction, seed, keep=1)
    if not len(held_out):
        raise DataError(f"{source.description} is too small to hold out {fraction:.0%} for testing: "
                        "no class has two images.")
    values, counts = np.unique(labels, return_counts=True)
    single = [repr(source.class_names[label]) if source.class_names else str(label) for label in values[counts == 1]]
    if single:
        warnings.warn(f"Class {', '.join(single)} has one image: kept for training, not tested." if len(single) == 1
                      else f"Classes {', '.join(single)} have one image each: kept for training, not tested.",
                      stacklevel=2)
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    return (source.select(rest, f"{len(rest)} kept for training"),
            source.select(held_out, f"{len(held_out)} held out for testing"))


def with_test_split(source, spec, data_dir=None, fraction=0.1, seed=0):
    """`(train, test)` of a labelled `source` read from `spec`: the dataset's own test
    split when it has one (fashion_mnist, tfds:NAME), else `fraction` of every class
    held out."""
    if spec == "fashion_mnist" or spec.startswith("tfds:") and spec.count(":") == 1:
        try:
            return source, load_source(spec, "test", data_dir)
        except DataError:
            pass
    return stratified_split(source, fraction, seed=seed)


def read_idx(path):
    """Reads an IDX file (gzipped or not) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as stream:
        data = stream.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {body.size} values.")
    return body.reshape(shape)


def find_fashion_mnist(data_dir=None, split="train"):
    """The first folder holding this split's two IDX files, or None. A `data_dir` given
    is the only place looked at: a user who names a folder means that folder."""
    candidates = [Path(data_dir).expanduser()] if data_dir else FASHION_MNIST_DIRS
    for folder in candidates:
        if all((folder / name).is_file() for name in FASHION_MNIST_FILES[split]):
            return folder
    return None


def load_fashion_mnist(split="train", data_dir=None):
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"Fashion-MNIST has splits {sorted(FASHION_MNIST_FILES)}, not {split!r}.")
    folder = find_fashion_mnist(data_dir, split)
    if folder is None and data_dir:
        raise DataError(
            f"--data-dir {data_dir} does not hold the Fashion-MNIST files {FASHION_MNIST_FILES[split]}."
        )
    if folder is None:
        import keras

        try:
            keras.datasets.fashion_mnist.load_data()  # downloads into keras' cache
        except Exception as error:  # no network: say where the files were looked for
            raise DataError(
                "Fashion-MNIST not found in "
                + ", ".join(str(d) for d in FASHION_MNIST_DIRS)
                + f" and the download failed ({error}). Install it with "
                "`apt-get install dataset-fashion-mnist` or pass --data-dir."
            ) from None
        folder = find_fashion_mnist(None, split)
    image_file, label_file = (folder / name for name in FASHION_MNIST_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"{folder}: images {images.shape} and labels {labels.shape} do not match.")
    return ImageSource(
        name="fashion_mnist",
        description=f"Fashion-MNIST {split} ({len(images)} images) from {folder}",
        num_examples=len(images),
        num_channels=1,
        class_names=FASHION_MNIST_CLASSES,
        images=images[..., None],
        labels=labels.astype("int32"),
    )


def _decodable(files):
    """The `files` that the pipeline's own decoder reads, in order.

    Decoding them all once here, in parallel, leaves no file that would fail mid-epoch:
    the pipeline then knows its length, so `fit` shows each epoch's progress and never
    runs out of data. It costs about an epoch of decoding (190 three-megapixel JPEGs a
    second on 2 cores, read at 1/8 scale), so a large folder says what it is doing, with
    a progress bar on a terminal.
    """
    checked = tf.data.Dataset.from_tensor_slices([str(path) for path in files]).map(
        # The pipeline's decoder at its smallest output (a JPEG's 1/8 scale): it reads every byte all the same.
        lambda path: (path, tf.shape(_decode_file(path, at_least=(1, 1)))),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=False,
    )
    progress = None
    if len(files) >= SCAN_NOTICE_FROM:
        print(f"Decoding each of the {len(files):,} image files once, to leave out any that cannot be read.",
              flush=True)
        if sys.stdout.isatty():
            import keras

            progress = keras.utils.Progbar(len(files), unit_name="file", interval=0.5)
    readable = set()
    for path, _ in checked.ignore_errors().as_numpy_iterator():
        readable.add(path.decode())
        if progress is not None and len(readable) % 64 == 0:
            progress.update(len(readable))
    if progress is not None:
        progress.update(len(files), finalize=True)
    return [path for path in files if str(path) in readable]


def _count_by_suffix(paths):
    """'15 .tif, 2 .heic': how many of `paths` have each extension, most common first."""
    counts = collections.Counter(p.suffix.lower() for p in paths)
    return ", ".join(f"{n} {suffix}" for suffix, n in counts.most_common())


def load_image_folder(folder):
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"Dataset folder {folder} does not exist.")
    # Hidden entries are not the user's images: .DS_Store, .ipynb_checkpoints/ copies,
    # the ._name resource forks of an archive unpacked from macOS.
    visible = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    files = [p for p in visible if p.suffix.lower() in IMAGE_EXTENSIONS]
    # Images in a format the decoder lacks would otherwise vanish without a word.
    unreadable = [
        p for p in visible if p.suffix.lower() not in IMAGE_EXTENSIONS
        and (mimetypes.guess_type(p.name, strict=False)[0] or "").startswith("image/")
    ]
    formats = ", ".join(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(
            f"{folder} holds no image files ({formats})"
            + (f"; convert its other images ({_count_by_suffix(unreadable)}) to PNG or JPEG." if unreadable else ".")
        )
    if unreadable:
        warnings.warn(
            f"Skipping {len(unreadable)} image{'s' if len(unreadable) > 1 else ''} under {folder} in "
            f"formats TensorFlow cannot decode "
            f"({_count_by_suffix(unreadable)}); convert them to PNG or JPEG to use them.",
            stacklevel=2,
        )
    good = _decodable(files)
    if not good:
        raise DataError(f"None of the {len(files)} image files under {folder} can be decoded.")
    if len(good) < len(files):
        warnings.warn(
            f"Skipping {len(files) - len(good)} of {len(files)} image files under {folder} "
            "that cannot be decoded.",
            stacklevel=2,
        )
    classes = sorted({p.relative_to(folder).parts[0] for p in good if len(p.relative_to(folder).parts) > 1})
    in_classes = all(len(p.relative_to(folder).parts) > 1 for p in good)
    labels = None
    if classes and in_classes:
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[p.relative_to(folder).parts[0]] for p in good], dtype="int32")
    else:
        classes = []
    return ImageSource(
        name=folder.name,
        description=f"{len(good)} images from {folder}"
        + (f" in {len(classes)} class{'es' * (len(classes) != 1)}" if classes else " (no class sub-folders)"),
        num_examples=len(good),
        num_channels=3,
        class_names=tuple(classes),
        files=[str(p) for p in good],
        labels=labels,
    )


def load_tfds(name, split="train", data_dir=None):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        # TFDS's own message lists all ~450 datasets; name the nearest few instead.
        close = difflib.get_close_matches(name.lower(), tfds.list_builders(with_community_datasets=False), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise DataError(f"Unknown TFDS dataset {name!r}.{hint} `tfds.list_builders()` lists them all.") from None
    except Exception as error:
        raise DataError(f"Unknown TFDS dataset {name!r}: {error}") from None
    features = builder.info.features
    if "image" not in features:
        raise DataError(f"TFDS dataset {name!r} has no 'image' feature (features: {list(features)}).")
    try:
        builder.download_and_prepare()
    except Exception as error:
        raise DataError(f"Could not download or prepare TFDS dataset {name!r}: {error}") from None
    splits = builder.info.splits
    num_examples = None  # unknown only under tfds.testing.mock_data, whose `splits` is empty
    if splits:
        try:  # TFDS parses slices and unions itself: train[:10%], train[1000:], train+test
            num_examples = splits[split].num_examples
        except (KeyError, ValueError) as error:
            raise DataError(f"TFDS dataset {name!r} has no split {split!r} (its splits: {', '.join(splits)}; "
                            f"slices such as train[:10%] and unions such as train+test work too). "
                            f"{' '.join(str(error).split())}") from None
        if num_examples <= 0:
            raise DataError(f"TFDS split {name}:{split} holds no examples.")
    # Shards in a shuffled order, but the same one on every pass: `take` and `select`
    # (a held-out test part) pick examples by position, and with the order TFDS draws
    # anew each pass they would pick other examples each time (the test part leaking
    # into training). The pipeline's own shuffle still mixes every epoch.
    read_config = tfds.ReadConfig(shuffle_seed=0, shuffle_reshuffle_each_iteration=False)
    dataset = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config)
    label = features["label"] if "label" in features else None
    class_names = tuple(label.names) if label is not None and hasattr(label, "names") else ()
    dataset = dataset.map(
        lambda example: (example["image"], example["label"] if class_names else tf.constant(-1, tf.int64))
    )
    if num_examples is None:
        num_examples = int(dataset.reduce(0, lambda n, _: n + 1))
    return ImageSource(
        name=name,
        description=f"TFDS {name}:{split} ({num_examples} images)",
        num_examples=num_examples,
        num_channels=features["image"].shape[-1] or 3,
        class_names=class_names,
        dataset=dataset,
    )


def synthetic_source(num_examples=512, size=32, channels=3, seed=0):
    """Random rectangles on noise: learnable structure, no files."""
    rng = np.random.default_rng(seed)
    images = (rng.random((num_examples, size, size, channels)) * 64).astype("uint8")
    corners = rng.integers(0, size // 2, size=(num_examples, 2))
    extents = rng.integers(size // 4, size // 2, size=(num_examples, 2))
    labels = rng.integers(0, 4, size=num_examples).astype("int32")
    for image, (top, left), (h, w), label in zip(images, corners, extents, labels):
        image[top : top + h, left : left + w] = 80 + 50 * label
    return ImageSource(
        name="synthetic",
        description=f"{num_examples} synthetic {size}x{size} images (smoke tests only)",
        num_examples=num_examples,
        num_channels=channels,
        class_names=("0", "1", "2", "3"),
        images=images,
        labels=labels,
    )


def load_source(spec, split="train", data_dir=None):
    """Reads a `--dataset` value: fashion_mnist, tfds:NAME[:SPLIT], synthetic or a folder."""
    if spec == "fashion_mnist":
        return load_fashion_mnist(split, data_dir)
    if spec == "synthetic":
        return synthetic_source(seed=0 if split == "train" else 1)
    if spec.startswith("tfds:"):
        name, has_split, own_split = spec[len("tfds:"):].partition(":")  # a split may hold colons: train[:10%]
        if not name or has_split and not own_split:
            raise DataError(f"Expected tfds:NAME or tfds:NAME:SPLIT, got {spec!r}.")
        return load_tfds(name, own_split or split, data_dir)
    if os.path.exists(spec) or os.sep in spec or spec.startswith(("~", ".")):
        return load_image_folder(spec)
    raise DataError(
        f"Dataset {spec!r} is neither fashion_mnist, synthetic, tfds:NAME[:SPLIT] nor an existing folder."
    )


def _decode_file(path, at_least=None):
    """Any supported file as RGB (palette, grayscale and alpha included): every decoder
    TensorFlow has can produce 3 channels, not all can produce 1 or 4.

    A JPEG is decoded at 1/8, 1/4 or 1/2 of its size when that still covers `at_least`
    (height, width): libjpeg then computes only the coarse frequencies, an averaging
    downscale, and the resize after it has a fraction of the pixels to filter. Three-
    megapixel photos reach a 64 or 224 px model 4-6x faster (benchmarks/pipeline.py --no-cache).
    """
    contents = tf.io.read_file(path)

    def any_format():
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return image

    if at_least is None:
        return any_format()

    def scaled_jpeg():
        height, width = tf.unstack(tf.io.extract_jpeg_shape(contents)[:2])
        covers = [tf.logical_and((height + ratio - 1) // ratio >= at_least[0],  # libjpeg rounds up
                                 (width + ratio - 1) // ratio >= at_least[1]) for ratio in JPEG_SCALES]
        first = tf.argmax(tf.cast(tf.stack([*covers, True]), tf.int32), output_type=tf.int32)
        return tf.switch_case(first, [lambda ratio=ratio: tf.io.decode_jpeg(contents, channels=3, ratio=ratio)
                                      for ratio in (*JPEG_SCALES, 1)])

    return tf.cond(tf.io.is_jpeg(contents), scaled_jpeg, any_format)


def to_model_pixels(image, image_size, channels):
    """uint8 image of any size and channel count -> uint8 at `image_size` with `channels`:
    what the pipeline caches and shuffles, a quarter of the float32 the model takes (a
    10,000-image shuffle buffer at 224 px: 1.5 GB, not 6)."""
    image = tf.convert_to_tensor(image)
    have = image.shape[-1]
    if have != channels:
        if have == 4:
            image = image[..., :3]
            have = 3
        if have == 3 and channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        elif have == 1 and channels == 3:
            image = tf.image.grayscale_to_rgb(image)
        elif have != channels:
            raise DataError(f"Cannot convert {have}-channel images to {channels} channels.")
    if tuple(image.shape[-3:-1]) != tuple(image_size):
        # On the uint8 pixels: converting a photo to float first quadruples what the
        # filter reads (39 against 105 three-megapixel images a second to 224 px).
        image = tf.image.resize(image, image_size, antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image


def to_model_images(pixels):
    """uint8 pixels -> float32 in [0, 1], what the models take."""
    return tf.cast(pixels, tf.float32) / 255.0


def image_dataset(source, image_size, channels, with_labels=False, as_pixels=False):
    """Unbatched `tf.data.Dataset` of float32 images in [0, 1] (uint8 with `as_pixels`),
    and labels, at `image_size`."""
    labels = source.labels if source.labels is not None else np.full(source.num_examples, -1, "int32")
    if source.images is not None:
        dataset = tf.data.Dataset.from_tensor_slices((source.images, labels))
    elif source.files is not None:
        dataset = tf.data.Dataset.from_tensor_slices((source.files, labels)).map(
            lambda path, label: (_decode_file(path, at_least=image_size), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        dataset = source.dataset
    convert = to_model_pixels if as_pixels else lambda *args: to_model_images(to_model_pixels(*args))
    dataset = dataset.map(
        lambda image, label: (convert(image, image_size, channels), tf.cast(label, tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset if with_labels else dataset.map(lambda image, label: image)


def make_pipeline(
    source,
    image_size,
    channels,
    batch_size,
    training=True,
    augment=None,
    with_labels=False,
    seed=0,
    cache_limit_bytes=2 * 1024**3,
    shuffle_buffer=10_000,
):
    """Batched, prefetched float32 pipeline.

    Images are cached in memory as uint8 when they fit under `cache_limit_bytes`, and
    shuffled as uint8; each batch becomes float32 after that. `augment(images, seed)`
    transforms a float32 batch in training, drawing its randomness from `seed`, a new
    int64 pair for every batch and epoch (for `tf.random.stateless_*`): the same `seed`
    gives the same shuffles and augmentations, however the parallel map interleaves.

    It runs without tf.data's autotuner (`tf.data.AUTOTUNE` then stays at its starting
    value, a parallel call per core): Keras leaves each epoch's iterator at its last
    batch and starts another, and deleting the old one waited for the autotuner's
    thread, which busy training steps had starved: 2-9 s at every epoch's end on 2
    cores, for no faster input (benchmarks/README.md). The option carries to what is
    chained after it.
    """
    dataset = image_dataset(source, image_size, channels, with_labels, as_pixels=True)
    if source.num_examples * image_size[0] * image_size[1] * channels <= cache_limit_bytes:
        dataset = dataset.cache()
    if training:
        dataset = dataset.shuffle(min(shuffle_buffer, source.num_examples), seed=seed)
    dataset = dataset.batch(batch_size, drop_remainder=training)
    augmenting = training and augment is not None
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def prepare(batch, pair):
        images = to_model_images(batch[0] if with_labels else batch)
        if augmenting:
            images = augment(images, pair)
        return (images, batch[1]) if with_labels else images

    dataset = tf.data.Dataset.zip(dataset, seeds).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def crop_and_flip_augmentation(image_size, crop_area=(0.2, 1.0), aspect_ratio=(3 / 4, 4 / 3)):
    """The paper's augmentation as `augment(images, seed)` for `make_pipeline`: a random
    resized crop (a fraction `crop_area` of the image, width/height log-uniform in
    `aspect_ratio`) and a horizontal flip, the default area for pre-training and a larger
    one for fine-tuning.

    The whole batch is one `tf.image.crop_and_resize`, the flip a crop box read right to
    left: keras-cv's `RandomCropAndResize` crops image by image, 2.4x slower at 224 px.
    """
    low, high = crop_area
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop_area must satisfy 0 < low <= high <= 1, got {crop_area}.")
    if not 0 < aspect_ratio[0] <= aspect_ratio[1]:
        raise ValueError(f"aspect_ratio must satisfy 0 < low <= high, got {aspect_ratio}.")
    log_ratio = np.log(aspect_ratio).astype("float32")

    def augment(images, seed):
        count = tf.shape(images)[0]
        area_seed, ratio_seed, top_seed, left_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 5))

        def uniform(seed, minval=0.0, maxval=1.0):
            return tf.random.stateless_uniform([count], seed, minval, maxval)

        area = uniform(area_seed, low, high)
        ratio = tf.exp(uniform(ratio_seed, *log_ratio))
        height = tf.minimum(tf.sqrt(area / ratio), 1.0)  # of the image's height, as the box's coordinates
        width = tf.minimum(tf.sqrt(area * ratio), 1.0)
        top = uniform(top_seed) * (1.0 - height)
        left = uniform(left_seed) * (1.0 - width)
        flip = uniform(flip_seed) < 0.5
        boxes = tf.stack([top, tf.where(flip, left + width, left),
                          top + height, tf.where(flip, left, left + width)], axis=1)
        return tf.image.crop_and_resize(images, boxes, tf.range(count), tuple(image_size))

    return augment
