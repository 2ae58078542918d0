"""The attention of a comparison configuration's blocks alone, forward and backward, on
the torch backend: which way of computing it is fastest on this CPU or GPU.

For the encoder (class token + kept patches) and the decoder (class token + every patch)
of each `--config`, times `keras_mae.layers.attention` on random packed q, k, v
`(batch, tokens, 3, heads, head_dim)`, each `--dtype`, three or four ways:

- `fused`: as keras-mae runs it: on a GPU `keras.ops.dot_product_attention`; on a CPU
  torch's SDPA on heads-major views of q, k and v, 16-bit inputs attended in float32
  and cast back;
- `keras_float32`: `keras.ops.dot_product_attention` in float32 (16-bit inputs cast up,
  the result back), which on torch copies q, k and v into contiguous heads-major
  tensors first: what the fused path did on a CPU until commit ff60f4d (2026-12-06);
- `fused_16bit` (16-bit dtypes only): SDPA on the 16-bit inputs themselves, what the
  fused path did before 2026-12-06 and what HuggingFace does under `torch.autocast`;
- `plain`: two batched matmuls around a float32 softmax.

Each figure is the best of `--repeats` blocks of `--steps` calls, in milliseconds; the
ways alternate from block to block. Last lines: with a 16-bit dtype,
`least_gain_over_fused_16bit=<float>`, the smallest `fused_16bit / fused` time ratio (what
attending in float32 gains at worst); `least_gain_over_keras_float32=<float>`, the
smallest `keras_float32 / fused` ratio; then `slowest_fused_vs_plain=<float>`, the
largest `fused / plain` time ratio over the shapes and dtypes timed.

    python benchmarks/attention.py --config K,T --dtype bfloat16,float32
    python benchmarks/attention.py --config B --batch-size 16
"""

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from throughput import CONFIGS  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def attention_shapes(config, batch_size):
    """`{"encoder": (B, T, heads, head_dim), "decoder": ...}` of one configuration, at the
    paper's mask ratio 0.75."""
    patches = (config["image_size"] // config["patch_size"]) ** 2
    kept = int(patches * 0.25)
    return {
        "encoder": (batch_size, kept + 1, config["encoder_num_heads"],
                    config["encoder_width"] // config["encoder_num_heads"]),
        "decoder": (batch_size, patches + 1, config["decoder_num_heads"],
                    config["decoder_width"] // config["decoder_num_heads"]),
    }


def attention_timer(shape, dtype, way, device):
    """A function that runs one forward and backward pass of `way` on random inputs."""
    import torch
    from keras import ops

    from keras_mae.layers import attention

    batch, tokens, heads, head_dim = shape
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=device).to(getattr(torch, dtype)).requires_grad_()

    def forward():
        if way == "fused_16bit":
            return ops.dot_product_attention(*ops.unstack(qkv, 3, axis=2))
        if way == "keras_float32":
            query, key, value = (ops.cast(t, "float32") for t in ops.unstack(qkv, 3, axis=2))
            return ops.cast(ops.dot_product_attention(query, key, value), qkv.dtype)
        return attention(qkv, fused=way == "fused")

    def run():
        forward().float().sum().backward()
        qkv.grad = None

    return run


def best_milliseconds(timers, steps, warmup, repeats, synchronize):
    """Each timer's best time per call over `repeats` alternating blocks of `steps` calls."""
    for run in timers.values():
        for _ in range(warmup):
            run()
    best = {name: float("inf") for name in timers}
    for _ in range(repeats):
        for name, run in timers.items():
            synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                run()
            synchronize()
            best[name] = min(best[name], (time.perf_counter() - start) / steps * 1e3)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="K,T",
                        help="Comma-separated comparison configurations, from %s (default: %%(default)s; see "
                             "throughput.py --help)." % ", ".join(sorted(CONFIGS)))
    parser.add_argument("--dtype", default="bfloat16,float32",
                        help="Comma-separated dtypes of q, k, v, from %s (default: %%(default)s)." % ", ".join(DTYPES))
    parser.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="Calls per timed block (default: %(default)s).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed calls of each way first (default: %(default)s).")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating timed blocks (default: %(default)s).")
    args = parser.parse_args(argv)
    configs, dtypes = args.config.split(","), args.dtype.split(",")
    for name in configs:
        if name not in CONFIGS:
            parser.error(f"--config: unknown configuration {name!r}; choose from {', '.join(sorted(CONFIGS))}")
    for dtype in dtypes:
        if dtype not in DTYPES:
            parser.error(f"--dtype: unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    for flag in ("batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if os.environ.setdefault("KERAS_BACKEND", "torch") != "torch":
        parser.error("it times torch's kernels: run it with KERAS_BACKEND=torch (or unset)")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"torch {torch.__version__} on {device}, forward + backward, ms per call (best of {args.repeats})")
    ratios, gains, copy_gains = [], [], []
    for name in configs:
        for part, shape in attention_shapes(CONFIGS[name], args.batch_size).items():
            for dtype in dtypes:
                ways = ["fused", "keras_float32", *(["fused_16bit"] if dtype != "float32" else []), "plain"]
                timers = {way: attention_timer(shape, dtype, way, device) for way in ways}
                best = best_milliseconds(timers, args.steps, args.warmup, args.repeats, synchronize)
                ratios.append(best["fused"] / best["plain"])
                copy_gains.append(best["keras_float32"] / best["fused"])
                if "fused_16bit" in best:
                    gains.append(best["fused_16bit"] / best["fused"])
                figures = "  ".join(f"{way} {best[way]:8.2f}" for way in ways)
                print(f"{name} {part:<8} {str(shape):<20} {dtype:<9} {figures}", flush=True)
    if gains:
        print(f"least_gain_over_fused_16bit={min(gains):.3f}")
    print(f"least_gain_over_keras_float32={min(copy_gains):.3f}")
    print(f"slowest_fused_vs_plain={max(ratios):.3f}")


if __name__ == "__main__":
    main()
