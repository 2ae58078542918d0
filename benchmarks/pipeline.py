"""Images/second of train.py's input pipeline alone (decode, cache, shuffle, augment,
batch), to compare with the training rate: the pipeline must not be the bottleneck.

    python benchmarks/pipeline.py --dataset fashion_mnist --batch-size 64
    python benchmarks/pipeline.py --dataset ~/photos --image-size 224 --no-cache   # decoding every epoch

Last line: `pipeline_img_per_s=<float>`.
"""

import argparse
import os
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", help="Any train.py --dataset value (default: %(default)s).")
    parser.add_argument("--data-dir", default=None, help="As train.py's --data-dir.")
    parser.add_argument("--image-size", type=int, default=None, help="Default: the dataset's own size, else 32.")
    parser.add_argument("--channels", type=int, default=None, help="Default: the dataset's.")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="Passes timed after a first pass that fills the cache (default: %(default)s).")
    parser.add_argument("--no-augment", action="store_true", help="Time without the random resized crop and flip.")
    parser.add_argument("--no-cache", action="store_true",
                        help="Decode every pass, as for a dataset too large for the in-memory cache (2 GiB).")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from keras_mae.data import DataError, load_source, make_pipeline, crop_and_flip_augmentation

    try:
        source = load_source(args.dataset, "train", args.data_dir)
    except DataError as error:
        sys.exit(f"error: {error}")
    size = args.image_size or (source.images.shape[1] if source.images is not None else 32)
    augment = None if args.no_augment else crop_and_flip_augmentation((size, size))
    cache = {"cache_limit_bytes": 0} if args.no_cache else {}
    dataset = make_pipeline(source, (size, size), args.channels or source.num_channels, args.batch_size, augment=augment,
                            **cache)
    for _ in dataset:  # first pass: tracing and the cache
        pass
    start, count = time.perf_counter(), 0
    for _ in range(args.epochs):
        for batch in dataset:
            count += int(batch.shape[0])
    rate = count / (time.perf_counter() - start)
    print(f"{source.description}, {size}x{size}, batch {args.batch_size}, augment {not args.no_augment}, "
          f"cache {not args.no_cache}")
    print(f"pipeline_img_per_s={rate:.0f}")


if __name__ == "__main__":
    main()
