"""A pre-trained encoder's features for every image of a dataset, in one .npz file.

    python -m keras_mae.features saved_models/pretrained_fashion_mnist_mini --split test --output features.npz
    python -m keras_mae.features RUN_DIR --dataset ~/photos --output photos.npz --pooling token

The file holds `features` (N, D) float32: the mean of the patch tokens (or the class
token with --pooling token) of the encoder without masking, the representation the
paper's linear probe and fine-tuning read; `labels` (N,) int64, -1 where the dataset has
none; `class_names`; and for a folder `files`, the image behind each row, in order.
Images reach the encoder as in training, without augmentation: resized (antialiased) to
its square image size and converted to its channels. Runs under every backend; the input
pipeline is tf.data. The file is written under a temporary name and renamed, so an
interrupted run leaves no half-written file.

    with numpy.load("features.npz") as saved:
        features, labels = saved["features"], saved["labels"]
"""

import argparse
import os
from pathlib import Path

from keras_mae.classifier import POOLINGS


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_mae.features", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("encoder", help="A train.py run folder, or a .keras file of a MaskedAutoencoder, "
                                        "an MAEEncoder or a fine-tuned ViTClassifier.")
    parser.add_argument("--output", required=True, help="The .npz file to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    parser.add_argument("--dataset", default="fashion_mnist",
                        help="fashion_mnist (default), tfds:NAME[:SPLIT], a folder of images (class sub-folders "
                             "give labels; searched recursively) or synthetic, as in train.py.")
    parser.add_argument("--split", default="train",
                        help="Split of fashion_mnist or tfds:NAME, e.g. test (default: %(default)s; "
                             "tfds:NAME:SPLIT names its own).")
    parser.add_argument("--data-dir", default=None, help="Where the dataset's files are (as in train.py).")
    parser.add_argument("--pooling", choices=POOLINGS, default="avg",
                        help="Mean of the patch tokens or the class token (default: %(default)s).")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N images.")
    parser.add_argument("--batch-size", type=int, default=256, help="Images per batch (default: %(default)s).")
    parser.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None,
                        help="0 silent, 1 progress bar, 2 one line at the end "
                             "(default: progress bar on a terminal, else one line).")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    output = Path(args.output).expanduser()
    if output.suffix != ".npz":
        fail(f"--output must be a .npz file, got {args.output!r}.")
    if output.exists() and not args.overwrite:
        fail(f"{output} exists; pass --overwrite to replace it.")
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.limit is not None and args.limit < 1:
        fail(f"--limit must be at least 1, got {args.limit}.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow first loads

    import numpy as np

    from keras_mae.callbacks import write_atomically
    from keras_mae.classifier import load_encoder
    from keras_mae.data import DataError, load_source, make_pipeline
    from keras_mae.evaluation import extract_features
    from keras_mae.layers import _pair
    from keras_mae.runs import brief_warnings, verbosity

    brief_warnings(parser.prog)
    try:
        encoder = load_encoder(args.encoder)
    except ValueError as error:
        fail(str(error))
    try:
        source = load_source(args.dataset, args.split, args.data_dir)
    except DataError as error:
        fail(str(error))
    if args.limit:
        source = source.take(args.limit)
    size = _pair(encoder.image_size, "image_size")
    # One pass: no in-memory cache (TensorFlow would also warn that predict left it unfinished).
    data = make_pipeline(source, size, encoder.num_channels, args.batch_size, training=False, with_labels=True,
                         cache_limit_bytes=0)
    verbose = verbosity(args.verbose)
    if verbose:
        print(f"Features ({args.pooling} pooling, width {encoder.width}) of {source.description}, "
              f"at {size[0]}x{size[1]}x{encoder.num_channels}:")
    features, labels = extract_features(encoder, data, args.pooling, verbose=verbose)

    arrays = {"features": features, "labels": labels, "class_names": np.array(source.class_names, dtype=str)}
    if source.files is not None:
        arrays["files"] = np.array(source.files, dtype=str)

    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(output, lambda temporary: np.savez(temporary, **arrays))
    if verbose:
        labelled = f"labels of {len(source.class_names)} classes" if source.class_names else "no labels"
        print(f"Wrote {output}: features {features.shape[0]} x {features.shape[1]}, {labelled}.")


if __name__ == "__main__":
    main()
