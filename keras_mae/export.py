"""TensorFlow SavedModels for TensorFlow Serving, from a model trained under any backend.

    python -m keras_mae.export run/mae.keras --kind encoder --output saved_models/serving/encoder
    python -m keras_mae.export run/mae.keras --kind reconstructor --output saved_models/serving/mae
    python -m keras_mae.export classifier.keras --kind classifier --class-names a,b,c --output ...
    python -m keras_mae.export run/encoder.keras --kind encoder --quantize int8 --output ...

Writes `OUTPUT/<version>/saved_model.pb` + `variables/` (the layout TensorFlow Serving
watches). Every `serving_default` signature takes raw `uint8` images
`(batch, height, width, channels)` of any batch size and any height and width, and
resizes (antialiased, as the training pipeline does) and scales them (/255) inside the graph:

- encoder: `features` `(batch, width)` (average of the patch tokens) and `tokens`
  `(batch, 1 + patches, width)`.
- classifier: `probabilities` `(batch, classes)`, `class_index` and `class_name` of the
  most likely class (the names are also stored in the graph).
- reconstructor: `reconstruction`, `pasted` (visible patches kept) as float images in
  [0, 1] and `mask` `(batch, patches)`, 1 = removed; masks come from a fixed seed (the
  same image gives the same answer). A second signature `reconstruct_seeded` also takes
  an int32 `seed` for a different uniformly random mask.

Exporting needs the TensorFlow backend; under JAX or PyTorch this module re-runs itself
in a child process with `KERAS_BACKEND=tensorflow` (a `.keras` file loads under any
backend). The SavedModel is written to a temporary folder and renamed, so a failed
export leaves nothing behind.

`--quantize int8` (or `int4`) stores the weights of every Dense layer as int8 (int4)
with scales, about 4x (7x) smaller, int8 also quantizing each layer's input on the fly.
It buys size, not CPU speed: ViT-Tiny on a 2-core AMD EPYC served int8 at a third of
float's rate (TensorFlow's int8 matmuls are slow there). A model saved already quantized
(`model.quantize`, then `save`) exports as it is.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = ("encoder", "classifier", "reconstructor")
QUANTIZE_MODES = ("int8", "int4")  # weight formats for serving; Keras' float8 is for training


class ExportError(ValueError):
    """A model or destination that cannot be exported, with the reason."""


def _load(model_path, kind):
    import keras

    from keras_mae.classifier import ViTClassifier, load_encoder
    from keras_mae.models import MaskedAutoencoder

    if kind == "encoder":
        try:
            return load_encoder(model_path)
        except ValueError as error:
            raise ExportError(f"--kind encoder needs a keras-mae model: {error}") from None
    if not Path(model_path).is_file():
        raise ExportError(f"{model_path} does not exist.")
    try:
        model = keras.saving.load_model(model_path)
    except Exception as error:
        raise ExportError(f"{model_path} is not a loadable .keras model: {str(error).splitlines()[0]}") from None
    if kind == "reconstructor":
        if not isinstance(model, MaskedAutoencoder):
            raise ExportError(f"--kind reconstructor needs a keras-mae MaskedAutoencoder (mae.keras), got {type(model).__name__}.")
    elif not isinstance(model, ViTClassifier):
        shape = model.outputs[0].shape if getattr(model, "outputs", None) else None
        if shape is None or len(shape) != 2 or len(model.inputs[0].shape) != 4:
            raise ExportError(
                f"--kind classifier needs a model from images (batch, H, W, C) to probabilities "
                f"(batch, classes); {model_path} is {type(model).__name__}."
            )
    return model


def _image_geometry(model):
    from keras_mae.layers import _pair

    shape = model.inputs[0].shape if getattr(model, "inputs", None) else None
    if shape is None:  # subclassed keras-mae models keep it in their config
        return (*_pair(model.image_size, "image_size"), model.num_channels)
    return tuple(shape[1:])


def build_archive(model, kind, class_names=None):
    """An `ExportArchive` whose endpoints take uint8 images (TensorFlow backend only)."""
    import keras
    import tensorflow as tf

    from keras_mae.data import to_model_images, to_model_pixels

    height, width, channels = _image_geometry(model)
    spec = tf.TensorSpec((None, None, None, channels), tf.uint8, name="images")

    def prepare(images):
        # The training pipeline's own conversion, so that a served image reaches the model
        # exactly as it did in training: a plain bilinear resize of the float image aliased
        # large photos (0.043 mean difference per pixel on 2000 x 1500 JPEGs brought to
        # 224 px) and took 3x as long (17-18 against 5-6 ms a photo, 2-core Zen 3).
        return to_model_images(to_model_pixels(images, (height, width), channels))

    # No `archive.track(model)`: each endpoint tracks the variables it uses, and tracking
    # the model too stores every weight twice (keras-team/keras#23553: twice the size on
    # disk and twice the memory in TensorFlow Serving).
    archive = keras.export.ExportArchive()
    if kind == "encoder":
        def serve(images):
            tokens = model(prepare(images), training=False)
            return {"features": tf.reduce_mean(tokens[:, 1:], axis=1), "tokens": tokens}

        archive.add_endpoint("serving_default", serve, input_signature=[spec])
    elif kind == "classifier":
        names = tf.constant(list(class_names))

        def serve(images):
            probabilities = model(prepare(images), training=False)
            index = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
            return {"probabilities": probabilities, "class_index": index, "class_name": tf.gather(names, index)}

        archive.add_endpoint("serving_default", serve, input_signature=[spec])
    else:
        def reconstruct(images, noise):
            pixels = prepare(images)
            pictures = model.to_pixels(pixels, model(pixels, noise=noise, training=False))
            return {key: pictures[key] for key in ("reconstruction", "pasted", "mask")}

        def serve(images):
            return reconstruct(images, model.masking.sample_noise(tf.shape(images)[0], seed=0))

        def serve_seeded(images, seed):
            shape = (tf.shape(images)[0], model.masking.num_patches)
            return reconstruct(images, tf.random.stateless_uniform(shape, seed=tf.stack([seed, 0])))

        archive.add_endpoint("serving_default", serve, input_signature=[spec])
        archive.add_endpoint(
            "reconstruct_seeded", serve_seeded,
            input_signature=[spec, tf.TensorSpec((), tf.int32, name="seed")],
        )
    return archive


def export(model_path, kind, output, version=1, overwrite=False, class_names=None, quantize_mode=None):
    """Writes `output/version/` (TensorFlow backend), the weights quantized to
    `quantize_mode` if given; returns that folder."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ExportError("export() needs KERAS_BACKEND=tensorflow; the command line switches by itself.")
    if kind not in KINDS:
        raise ExportError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    if version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}.")
    target = Path(output) / str(version)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists: pass --overwrite or another --version.")
    model = _load(model_path, kind)
    if quantize_mode is not None:
        if quantize_mode not in QUANTIZE_MODES:
            raise ExportError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize_mode!r}.")
        from keras_mae.quantization import quantize

        try:
            quantize(model, quantize_mode)
        except ValueError as error:
            raise ExportError(f"{error} Export it without --quantize.") from None
    if kind == "classifier":
        classes = getattr(model, "num_classes", None) or model.outputs[0].shape[-1]
        class_names = list(class_names or getattr(model, "class_names", None) or [str(i) for i in range(classes)])
        if len(class_names) != classes:
            raise ExportError(f"The classifier has {classes} outputs but {len(class_names)} class names were given.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=target.parent))
    try:
        build_archive(model, kind, class_names).write_out(str(staging), verbose=False)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_mae.export", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="A .keras file: mae.keras, encoder.keras or a classifier.")
    parser.add_argument("--kind", required=True, help=f"What to serve: {', '.join(KINDS)}.")
    parser.add_argument("--output", required=True, help="Model folder; the SavedModel goes to OUTPUT/VERSION/.")
    parser.add_argument("--version", type=int, default=1, help="Version sub-folder (default: %(default)s).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing OUTPUT/VERSION.")
    parser.add_argument("--class-names", default=None,
                        help="Classifier only: comma-separated class names in output order (default: 0, 1, ...).")
    parser.add_argument("--quantize", default=None, metavar="MODE",
                        help=f"Store the Dense weights quantized, {' or '.join(QUANTIZE_MODES)}: 4x or 7x smaller, "
                             "not faster on a CPU (default: as the model was saved).")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    if args.kind not in KINDS:
        fail(f"--kind must be one of {', '.join(KINDS)}, got {args.kind!r}.")
    if args.quantize is not None and args.quantize not in QUANTIZE_MODES:
        fail(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {args.quantize!r}.")
    import keras

    if keras.backend.backend() != "tensorflow":
        package_parent = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": path}
        argv = sys.argv[1:] if argv is None else list(argv)
        sys.exit(subprocess.call([sys.executable, "-m", "keras_mae.export", *argv], env=env))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    class_names = args.class_names.split(",") if args.class_names else None
    try:
        target = export(args.model, args.kind, args.output, args.version, args.overwrite, class_names, args.quantize)
    except ExportError as error:
        fail(str(error))
    weights = f", {args.quantize} weights" if args.quantize else ""
    print(f"Wrote the {args.kind} SavedModel{weights} to {target}/ (serving_default takes uint8 images).")


if __name__ == "__main__":
    main()
