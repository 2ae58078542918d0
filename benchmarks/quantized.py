"""Feature extraction with a quantized encoder: speed, size and error against float.

Builds a preset's encoder, copies it, quantizes each copy (`encoder.quantize(mode)`:
Dense kernels stored as int8 or int4 with a scale per output channel; int8 also
quantizes each layer's input on the fly), then times `encoder.predict` on the same
random images, alternating float and quantized for `--repeats` rounds. Prints, per
mode, the best rate of each, the largest token error relative to the largest float
token, and the size of the saved `.keras` file.

    python benchmarks/quantized.py --backend jax --preset mae_vit_base_patch16 --batch-size 8

Last line: `speedup=<float>`, quantized over float for the last mode.
"""

import argparse
import os
import sys
import tempfile
import time

MODES = ("int8", "int4")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                        help="Keras backend to time (default: $KERAS_BACKEND or tensorflow).")
    parser.add_argument("--preset", default="mae_vit_tiny_patch4", help="keras_mae preset whose encoder is timed (default: %(default)s).")
    parser.add_argument("--modes", default="int8", help=f"Comma-separated quantization modes out of {', '.join(MODES)} (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per predict batch (default: %(default)s).")
    parser.add_argument("--batches", type=int, default=4, help="Timed batches per measurement (default: %(default)s).")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating float / quantized rounds (default: %(default)s).")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"--modes takes {', '.join(MODES)}, got {', '.join(unknown)}")
    for flag in ("batch_size", "batches", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args, modes


def main(argv=None):
    args, modes = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras
    import numpy as np

    import keras_mae
    from keras_mae.quantization import quantize

    try:
        config = keras_mae.MaskedAutoencoder.from_preset(args.preset).encoder.get_config()
    except ValueError as error:
        sys.exit(f"error: {error}")
    reference = keras_mae.MAEEncoder.from_config(config)
    size = config["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    images = np.random.default_rng(0).random(
        (args.batch_size * args.batches, height, width, config["num_channels"]), dtype=np.float32)

    def rate(encoder):
        encoder.predict(images[:args.batch_size], batch_size=args.batch_size, verbose=0)  # compiles
        start = time.perf_counter()
        tokens = encoder.predict(images, batch_size=args.batch_size, verbose=0)
        return len(images) / (time.perf_counter() - start), tokens

    def file_mib(encoder):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "encoder.keras")
            encoder.save(path)
            return os.path.getsize(path) / 2**20

    print(f"{args.preset} encoder ({height}x{width}, batch {args.batch_size}) on {keras.backend.backend()}")
    float_mib = file_mib(reference)
    for mode in modes:
        quantized = keras_mae.MAEEncoder.from_config(config)
        quantized.set_weights(reference.get_weights())
        quantize(quantized, mode)
        rates = {"float": [], mode: []}
        for _ in range(args.repeats):
            float_rate, float_tokens = rate(reference)
            mode_rate, tokens = rate(quantized)
            rates["float"].append(float_rate)
            rates[mode].append(mode_rate)
        error = np.abs(tokens - float_tokens).max() / np.abs(float_tokens).max()
        best_float, best = max(rates["float"]), max(rates[mode])
        print(f"float32: {best_float:.1f} img/s, {float_mib:.1f} MiB | {mode}: {best:.1f} img/s, "
              f"{file_mib(quantized):.1f} MiB | {mode} / float {best / best_float:.2f}x, "
              f"largest token error {error:.4f} of the largest token")
    print(f"speedup={best / best_float:.3f}")


if __name__ == "__main__":
    main()
