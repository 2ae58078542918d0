"""Seconds per AdamW update over a preset's weights: keras_mae.AdamW against Keras' own.

The torch backend runs the update eagerly after every training step, so its cost adds
to every step: Keras' torch AdamW makes about a dozen `_foreach` passes over the
weights, keras_mae.AdamW one call of torch's fused Adam kernel per group of variables
sharing a learning-rate multiplier. On TensorFlow and JAX `fit` compiles the update into
the training step; the eager figures this script prints there are not what `fit` pays.

    python benchmarks/optimizer.py --backend torch --preset mae_vit_base_patch16

Last line: `speedup=<float>` (Keras' AdamW time over keras_mae.AdamW's, no multipliers).
"""

import argparse
import os
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default="torch",
                        help="Keras backend (default: %(default)s).")
    parser.add_argument("--preset", default="mae_vit_base_patch16",
                        help="keras_mae preset whose trainable weights are updated (default: %(default)s).")
    parser.add_argument("--steps", type=int, default=5, help="Timed updates after one untimed (default: %(default)s).")
    parser.add_argument("--layer-decay", type=float, default=0.75,
                        help="Also time keras_mae.AdamW with a multiplier per encoder block, this decay "
                             "per block as in fine-tuning (default: %(default)s).")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if not 0 < args.layer_decay <= 1:
        parser.error("--layer-decay must be in (0, 1]")
    return args


def seconds_per_update(optimizer, variables, grads, steps, keras):
    optimizer.build(variables)
    optimizer.apply(grads, variables)
    keras.ops.convert_to_numpy(variables[-1])
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.apply(grads, variables)
    keras.ops.convert_to_numpy(variables[-1])  # waits for asynchronous devices
    return (time.perf_counter() - start) / steps


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras

    import keras_mae
    from keras_mae.presets import check_preset

    try:
        check_preset(args.preset)
    except ValueError as error:
        sys.exit(f"optimizer.py: {error}")
    mae = keras_mae.MaskedAutoencoder.from_preset(args.preset)
    variables = mae.trainable_variables
    grads = [keras.ops.full(v.shape, 1e-3, dtype=v.dtype) for v in variables]
    # Layer-wise decay as a ViTClassifier would give it: block i of depth d gets decay^(d - i).
    depth = len(mae.encoder.blocks)
    multipliers = {}
    for i, block in enumerate(mae.encoder.blocks):
        for v in block.trainable_variables:
            multipliers[v.path] = args.layer_decay ** (depth - i)
    size = sum(int(keras.ops.size(v)) for v in variables) / 1e6
    print(f"{args.preset}: {len(variables)} trainable variables, {size:.1f} M weights, backend {args.backend}")

    hyper = dict(beta_2=0.95, weight_decay=0.05)
    theirs = seconds_per_update(keras.optimizers.AdamW(1e-4, **hyper), variables, grads, args.steps, keras)
    ours = seconds_per_update(keras_mae.AdamW(1e-4, **hyper), variables, grads, args.steps, keras)
    layered = seconds_per_update(keras_mae.AdamW(1e-4, multipliers, **hyper), variables, grads, args.steps, keras)
    print(f"keras.optimizers.AdamW:                      {theirs:.3f} s per update")
    print(f"keras_mae.AdamW:                             {ours:.3f} s per update")
    print(f"keras_mae.AdamW, {depth + 1} learning-rate multipliers: {layered:.3f} s per update")
    print(f"speedup={theirs / ours:.2f}")


if __name__ == "__main__":
    main()
