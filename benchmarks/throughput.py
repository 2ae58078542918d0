"""Pre-training throughput of keras-mae: images/second of `fit` steps, their CPU time and peak memory.

Times forward + backward + AdamW update through `MaskedAutoencoder.fit` on random
images (the input pipeline is not part of the figure), after warm-up steps that
absorb compilation. With `--compare-mask-tokens` it also times the paper's
"encoder with [M]" baseline and prints how much faster the asymmetric design is.

    python benchmarks/throughput.py --backend jax --preset mae_vit_base_patch16 --batch-size 8
    python benchmarks/throughput.py --backend torch --preset mae_vit_tiny_patch4 --compare-mask-tokens

With `--peak-tflops` (the device's dense peak for the dtype used, e.g. about 800 for an
H100's bf16) it also prints the model FLOPs utilisation: matrix-multiply FLOPs of the
model as built (`training_flops`), three times the forward pass per step, over time.

With `--kernel-breakdown` (JAX on a GPU) it then traces two more executions with
`jax.profiler` and prints where the GPU's time goes: matmuls, attention kernels,
fused element-wise and reduction kernels, copies, and the costliest kernels.

Last line: `img_per_s=<float>`, or `speedup=<float>` with `--compare-mask-tokens`.
"""

import argparse
import collections
import glob
import json
import os
import resource
import sys
import tempfile
import time


# Shared with benchmarks/compare.py, which builds HuggingFace's ViTMAE to the same sizes.
CONFIGS = {
    "K": dict(image_size=48, patch_size=6, num_channels=3, encoder_width=128, encoder_depth=6,
              encoder_num_heads=4, decoder_width=64, decoder_depth=2, decoder_num_heads=4),
    "T": dict(image_size=32, patch_size=4, num_channels=3, encoder_width=192, encoder_depth=12,
              encoder_num_heads=3, decoder_width=128, decoder_depth=2, decoder_num_heads=4),
    "B": dict(image_size=224, patch_size=16, num_channels=3, encoder_width=768, encoder_depth=12,
              encoder_num_heads=12, decoder_width=512, decoder_depth=8, decoder_num_heads=16),
    # B's 20 blocks with almost no arithmetic (width 96, 32 px, batch 1): a step bound by
    # Python and op dispatch, as an eager step at B's sizes is on a GPU, measurable on a CPU.
    "D": dict(image_size=32, patch_size=16, num_channels=3, encoder_width=96, encoder_depth=12,
              encoder_num_heads=12, decoder_width=96, decoder_depth=8, decoder_num_heads=16),
}


# keras_mae.torch_compile runs a compiled step's first call eagerly and compiles at the
# second (minutes on a CPU), which one untimed step would leave in the timed ones.
TORCH_COMPILE_WARMUP_ERROR = (
    "--warmup 1 would time torch.compile's compiling: with --jit-compile true on torch the first step runs "
    "eagerly and the second compiles. Give --warmup 2 or more (or 0 to time every step)."
)


def training_flops(config, batch_size, mask_tokens_in_encoder=False, predicts_every_patch=False):
    """Matrix-multiply FLOPs of one training step (forward + backward = 3 x forward).

    Counts what keras-mae computes: every patch is embedded, the encoder sees the class
    token plus the kept patches (all patches with `mask_tokens_in_encoder`), the decoder
    sees the class token plus all patches, and in training its last block's queries
    (all tokens are keys and values), and the head, run only on the removed patches
    (JAX's cuDNN attention still attends from every token, 0.1 % more FLOPs at B).
    `predicts_every_patch` counts a decoder that predicts every patch in training
    (HuggingFace's ViTMAE).
    """
    def pair(value):
        return (value, value) if isinstance(value, int) else tuple(value)

    (height, width), (patch_h, patch_w) = pair(config["image_size"]), pair(config["patch_size"])
    patches = (height // patch_h) * (width // patch_w)
    patch_values = patch_h * patch_w * config["num_channels"]
    kept = int(patches * (1 - config.get("mask_ratio", 0.75)))
    encoded = patches if mask_tokens_in_encoder else kept
    predicted = patches if predicts_every_patch else patches - kept

    def block(tokens, width, outputs):  # `outputs` tokens leave it, attending to all `tokens`
        attention = 6 * tokens * width**2 + 4 * outputs * tokens * width  # qkv; QK^T and AV
        return attention + 18 * outputs * width**2  # proj, 4x MLP

    encoder_width, decoder_width = config["encoder_width"], config["decoder_width"]
    decoded = patches + 1
    forward = (2 * patches * patch_values * encoder_width
               + config["encoder_depth"] * block(encoded + 1, encoder_width, encoded + 1)
               + 2 * (encoded + 1) * encoder_width * decoder_width
               + (config["decoder_depth"] - 1) * block(decoded, decoder_width, decoded)
               + block(decoded, decoder_width, predicted)
               + 2 * predicted * decoder_width * patch_values)
    return 3 * forward * batch_size


def kernel_category(name):
    """Coarse kind of a GPU kernel, from the names cuBLAS, cuDNN and XLA give them."""
    name = name.lower()
    kinds = [("attention", ("sdpa", "fmha", "flash", "cudnn")),
             ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "gemv")),
             ("copy", ("memcpy", "memset")),
             ("reduction fusion", ("reduce",)),
             ("transpose / copy fusion", ("transpose", "copy", "slice"))]
    return next((kind for kind, marks in kinds if any(mark in name for mark in marks)), "element-wise fusion")


def print_kernel_breakdown(trace_dir, steps, top=15):
    """GPU kernel time per training step from a `jax.profiler` trace, by kind and by kernel."""
    from jax.profiler import ProfileData

    totals, launches = collections.Counter(), collections.Counter()
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if "XLA" in line.name:  # module and HLO-op summaries, not kernels
                    continue
                for event in line.events:
                    totals[event.name] += event.duration_ns / 1e6 / steps
                    launches[event.name] += 1 / steps
    if not totals:
        print("kernel breakdown: no GPU kernels in the trace (it needs KERAS_BACKEND=jax on a GPU)")
        return
    total = sum(totals.values())
    by_kind = collections.Counter()
    for name, ms in totals.items():
        by_kind[kernel_category(name)] += ms
    print(f"GPU kernel time per step: {total:.2f} ms in {sum(launches.values()):.0f} launches")
    for kind, ms in by_kind.most_common():
        print(f"  {kind:<24} {ms:7.2f} ms  {100 * ms / total:5.1f} %")
    print("costliest kernels (ms per step, launches per step):")
    for name, ms in totals.most_common(top):
        print(f"  {ms:7.3f} ms  x{launches[name]:<5.1f} {name[:100]}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                        help="Keras backend to time (default: $KERAS_BACKEND or tensorflow).")
    parser.add_argument("--preset", default="mae_vit_tiny_patch4", help="keras_mae preset name (default: %(default)s).")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="A comparison configuration instead of --preset: K = the keras.io example's sizes "
                             "(48 px, patch 6, encoder 6 x 128, decoder 2 x 64, 4 heads), T = ViT-Tiny-like on "
                             "32 px (patch 4, encoder 12 x 192, 3 heads, decoder 2 x 128), B = ViT-B/16 at 224 px "
                             "with the 8 x 512 decoder, D = B's blocks at width 96 on 32 px (run it at batch 1: "
                             "a step bound by Python and op dispatch, as an eager GPU step is).")
    parser.add_argument("--dtype-policy", default="float32",
                        help="Keras dtype policy: float32, mixed_bfloat16 or mixed_float16 (default: %(default)s).")
    parser.add_argument("--steps-per-execution", type=int, default=1,
                        help="Training steps fused into one compiled call (default: %(default)s).")
    parser.add_argument("--jit-compile", choices=["auto", "true", "false"], default="auto",
                        help="Compile the train step (XLA on tensorflow/jax, torch.compile on torch); "
                             "auto = Keras' choice per backend (default: %(default)s).")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="The device's dense peak TFLOP/s for this dtype; prints model FLOPs utilisation.")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--image-size", type=int, default=None, help="Override the preset's image size.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per training step (default: %(default)s).")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps after warm-up (default: %(default)s).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first, for compilation (default: %(default)s).")
    parser.add_argument("--mask-tokens-in-encoder", action="store_true",
                        help="Time the paper's baseline whose encoder runs on all patches with mask tokens.")
    parser.add_argument("--compare-mask-tokens", action="store_true",
                        help="Time both designs, alternating, and print the asymmetric speed-up.")
    parser.add_argument("--kernel-breakdown", action="store_true",
                        help="JAX on a GPU: trace two more executions and print GPU kernel time per step by kind.")
    parser.add_argument("--repeats", type=int, default=2, help="Alternating rounds with --compare-mask-tokens (default: %(default)s).")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "steps", "repeats", "steps_per_execution"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.backend == "torch" and args.jit_compile == "true" and args.warmup == 1:
        parser.error(TORCH_COMPILE_WARMUP_ERROR)
    if args.kernel_breakdown and (args.backend != "jax" or args.compare_mask_tokens):
        parser.error("--kernel-breakdown needs --backend jax and no --compare-mask-tokens")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras
    import numpy as np

    import keras_mae
    from keras_mae.memory import malloc_in_use
    from keras_mae.runs import jit_compile_setting

    if args.steps_per_execution > 1 and keras.backend.backend() == "torch":
        sys.exit("error: --steps-per-execution must be 1 with the torch backend (Keras' torch trainer runs one step per call).")
    overrides = {} if args.image_size is None else {"image_size": args.image_size}
    try:
        keras.config.set_dtype_policy(args.dtype_policy)
        if args.config:
            config = {**CONFIGS[args.config], **overrides}
            keras_mae.MaskedAutoencoder(**config)  # validates
        else:
            config = {**keras_mae.MaskedAutoencoder.from_preset(args.preset, **overrides).get_config()}
            config.pop("dtype", None)
    except ValueError as error:
        sys.exit(f"error: {error}")
    height, width = (config["image_size"],) * 2 if isinstance(config["image_size"], int) else config["image_size"]
    batch = np.random.default_rng(0).random((args.batch_size, height, width, config["num_channels"]), dtype=np.float32)

    class SameBatch(keras.utils.PyDataset):
        def __len__(self):
            return (args.warmup + args.steps) * args.steps_per_execution

        def __getitem__(self, index):
            return batch

    class StepTimer(keras.callbacks.Callback):
        """Wall time, this process's CPU time (user, kernel) and page faults in the timed steps.

        No batch-end hook: one would make Keras turn every step's loss into a number
        before it starts the next step, a wait for the device that training
        (keras_mae.callbacks.logging_callbacks) and HuggingFace's timed loop do not have.
        The clock starts before the first timed step, once the warm-up's last update is
        done on the device; it stops at the epoch's end, after Keras has read the last loss.
        """

        def mark(self):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return time.perf_counter(), usage.ru_utime, usage.ru_stime, usage.ru_minflt + usage.ru_majflt

        def on_train_batch_begin(self, step, logs=None):
            if step == args.warmup * args.steps_per_execution:
                keras.ops.convert_to_numpy(self.model.optimizer.iterations)  # waits for the device
                self.start = self.mark()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds, self.user, self.kernel, self.faults = (end - start for end, start in zip(self.mark(), self.start))

    def images_per_second(mask_tokens_in_encoder):
        mae = keras_mae.MaskedAutoencoder(**{**config, "mask_tokens_in_encoder": mask_tokens_in_encoder})
        mae.compile(optimizer=keras_mae.AdamW(1e-4, beta_2=0.95, weight_decay=0.05),
                    steps_per_execution=args.steps_per_execution, jit_compile=jit_compile_setting(args.jit_compile))
        timer = StepTimer()
        mae.fit(SameBatch(), epochs=1, verbose=0, callbacks=[timer])
        steps = args.steps * args.steps_per_execution
        cpu_time.update(user_s_per_step=timer.user / steps, kernel_s_per_step=timer.kernel / steps,
                        page_faults_per_step=timer.faults / steps,
                        cores_busy=(timer.user + timer.kernel) / timer.seconds)
        if args.kernel_breakdown:
            import jax

            with tempfile.TemporaryDirectory() as trace_dir:
                with jax.profiler.trace(trace_dir):
                    mae.fit(SameBatch(), epochs=1, verbose=0, steps_per_epoch=2 * args.steps_per_execution)
                print_kernel_breakdown(trace_dir, steps=2 * args.steps_per_execution)
        return args.batch_size * steps / timer.seconds

    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu_time = {}  # of the last timed run: idle cores and kernel time show what img/s alone hides
    name = f"{('config ' + args.config) if args.config else args.preset} {height}x{width} batch {args.batch_size} " \
           f"{args.dtype_policy} on {keras.backend.backend()}"
    figures = {"backend": keras.backend.backend(), "config": args.config or args.preset, "batch_size": args.batch_size}
    if args.compare_mask_tokens:
        rates = {False: [], True: []}
        for _ in range(args.repeats):
            for variant in (False, True):
                rates[variant].append(images_per_second(variant))
        fast, slow = max(rates[False]), max(rates[True])
        print(f"{name}: asymmetric encoder {fast:.2f} img/s, encoder with mask tokens {slow:.2f} img/s")
        print(f"peak_rss_mib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
        figures.update(img_per_s=fast, mask_tokens_img_per_s=slow, speedup=fast / slow)
        write_json(args.json, figures)
        print(f"img_per_s={fast:.2f}")
        print(f"speedup={fast / slow:.3f}")
    else:
        rate = images_per_second(args.mask_tokens_in_encoder)
        print(f"{name}{' (mask tokens in encoder)' if args.mask_tokens_in_encoder else ''}: {rate:.2f} img/s")
        print(f"peak_rss_mib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
        print(f"CPU time per step: user {cpu_time['user_s_per_step']:.3f} s, kernel "
              f"{cpu_time['kernel_s_per_step']:.3f} s; cores busy {cpu_time['cores_busy']:.2f} of {usable_cores}; "
              f"{cpu_time['page_faults_per_step']:.0f} page faults")
        print(f"malloc: {malloc_in_use()}")
        figures.update(img_per_s=rate, malloc=malloc_in_use(), **cpu_time)
        tflops = training_flops(config, 1, args.mask_tokens_in_encoder) * rate / 1e12
        figures.update(model_tflops_per_s=tflops)
        print(f"model_tflops_per_s={tflops:.4g}")
        if args.peak_tflops:
            figures.update(mfu=tflops / args.peak_tflops)
            print(f"mfu={tflops / args.peak_tflops:.3f}")
        write_json(args.json, figures)
        print(f"img_per_s={rate:.2f}")


def write_json(path, figures):
    if path:
        figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(path, "w") as stream:
            json.dump(figures, stream, indent=2)


if __name__ == "__main__":
    os.environ["KERAS_BACKEND"] = parse_args().backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from keras_mae.memory import tune_allocator

    tune_allocator()  # as train.py does
    main()
