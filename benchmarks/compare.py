"""keras-mae against HuggingFace's ViTMAE (PyTorch) on the same configuration and machine.

Each measurement is a fresh child process; keras-mae (one per backend asked for) and
HuggingFace alternate, `--repeats` rounds, and the best round of each counts (the least
disturbed by anything else on the machine). Both time forward + backward + AdamW on
the same random batch after warm-up steps. keras-mae's runs tune their allocator as
train.py does (jemalloc where the system has it; keras_mae/memory.py);
HuggingFace runs on the system's malloc, as people run it. `--hf-jemalloc` also times
it on jemalloc with keras-mae's settings in every round (`hf_jemalloc`), so that one run
tells how much of a lead is the allocator's. To give every run jemalloc instead,
preload it for the whole tree:
    LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=narenas:1,oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1 python benchmarks/compare.py

Extra install (a benchmark extra, not a runtime dependency):
    pip install transformers==5.23.0 torch==2.13.0

    python benchmarks/compare.py --config T --backends tensorflow,jax,torch --batch-size 256

`--same-process` instead times keras-mae's torch backend and HuggingFace in one process,
blocks of steps in turn, on the allocator keras-mae picks: the same threads, allocator
and moment for both, so the per-round ratios scatter least; they compare the code alone.

    python benchmarks/compare.py --config T --backends torch --same-process --repeats 6

Before them, each backend's per-round ratios (each keras-mae run against the HuggingFace
run of the same round) and their median. Last lines: `<backend>_img_per_s=`,
`hf_img_per_s=`, `<backend>_vs_hf=` (bests) for each backend; with `--hf-jemalloc` also
`hf_jemalloc_img_per_s=` and `<backend>_vs_hf_jemalloc=`; with `--same-process`
`torch_img_per_s=`, `hf_same_process_img_per_s=` and `torch_vs_hf_same_process=`.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from throughput import CONFIGS, TORCH_COMPILE_WARMUP_ERROR, training_flops  # noqa: E402


def huggingface_training(config, batch_size, threads, dtype_policy):
    """HuggingFace's ViTMAEForPreTraining built to `config`'s sizes with PyTorch's AdamW:
    returns `step()`, one training step (forward, backward, update) on a fixed random
    batch, and `synchronize()`, which waits for the device.

    On a CUDA device when there is one; `mixed_bfloat16` / `mixed_float16` map to
    torch.autocast, the mixed precision HuggingFace's Trainer uses.
    """
    import contextlib

    import torch
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    if threads:  # only when asked (see --threads): setting it slows torch's CPU flash attention
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast_dtype = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}.get(dtype_policy)
    precision = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    hf_config = ViTMAEConfig(
        image_size=config["image_size"], patch_size=config["patch_size"], num_channels=config["num_channels"],
        hidden_size=config["encoder_width"], num_hidden_layers=config["encoder_depth"],
        num_attention_heads=config["encoder_num_heads"], intermediate_size=4 * config["encoder_width"],
        decoder_hidden_size=config["decoder_width"], decoder_num_hidden_layers=config["decoder_depth"],
        decoder_num_attention_heads=config["decoder_num_heads"], decoder_intermediate_size=4 * config["decoder_width"],
        mask_ratio=0.75, layer_norm_eps=1e-6,
    )
    model = ViTMAEForPreTraining(hf_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    size = config["image_size"]
    images = torch.rand(batch_size, config["num_channels"], size, size, device=device)

    def step():
        with precision:
            loss = model(pixel_values=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, (torch.cuda.synchronize if device == "cuda" else lambda: None)


def huggingface_rate(config, batch_size, steps, warmup, threads, dtype_policy):
    """Images/second of ViTMAEForPreTraining training steps, and their CPU seconds and page
    faults per step (`img_per_s`, `user_s_per_step`, `kernel_s_per_step`,
    `page_faults_per_step`; run in a child process)."""
    step, synchronize = huggingface_training(config, batch_size, threads, dtype_policy)
    for _ in range(warmup):
        step()
    synchronize()
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        step()
    synchronize()
    seconds, end = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    from keras_mae.memory import malloc_in_use  # after the timing: it imports Keras

    return {"img_per_s": batch_size * steps / seconds, "user_s_per_step": (end.ru_utime - usage.ru_utime) / steps,
            "kernel_s_per_step": (end.ru_stime - usage.ru_stime) / steps,
            "page_faults_per_step": (end.ru_minflt + end.ru_majflt - usage.ru_minflt - usage.ru_majflt) / steps,
            "malloc": malloc_in_use()}


def same_process_rates(config, batch_size, steps, warmup, repeats, threads, dtype_policy, jit_compile):
    """keras-mae's torch backend and HuggingFace in this one process, `steps` training
    steps of each in turn (which goes first alternates) for `repeats` rounds: each round's
    `(name, images/second)` pairs in the order they ran (`torch`, `hf_same_process`) and
    the malloc both ran on.

    Sharing a process, the two share its allocator, its threads, and whatever else the
    machine is doing in that minute, so their per-round ratios scatter less than
    those of separate processes. keras-mae's steps are the ones `fit` runs
    (`train_function`, torch.compile'd with `jit_compile` true), on the same batch.
    """
    import keras
    import numpy as np

    import keras_mae
    from keras_mae.memory import malloc_in_use
    from keras_mae.runs import jit_compile_setting

    hf_step, synchronize = huggingface_training(config, batch_size, threads, dtype_policy)
    keras.config.set_dtype_policy(dtype_policy)
    mae = keras_mae.MaskedAutoencoder(**config)
    mae.compile(optimizer=keras_mae.AdamW(1e-4, beta_2=0.95, weight_decay=0.05),
                jit_compile=jit_compile_setting(jit_compile))
    size = config["image_size"]
    batch = np.random.default_rng(0).random((batch_size, size, size, config["num_channels"]), dtype=np.float32)
    mae.fit(batch, batch_size=batch_size, epochs=1, verbose=0)  # builds the model, optimizer and train_function
    images = keras.ops.convert_to_tensor(batch)

    def mae_step():
        mae.train_function([(images,)])

    steps_of = {"torch": mae_step, "hf_same_process": hf_step}
    for step in steps_of.values():
        for _ in range(warmup):
            step()
    rounds = []
    for round_index in range(repeats):
        # Each goes first in every other round, so that neither always runs in the other's
        # wake and a machine slowing down or speeding up during the run favours neither
        # (with torch always first, its lead looked a few per cent larger on a Zen 3).
        rounds.append([])
        for name, step in list(steps_of.items())[::-1 if round_index % 2 else 1]:
            synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize()
            rounds[-1].append((name, batch_size * steps / (time.perf_counter() - start)))
    return {"rounds": rounds, "malloc": malloc_in_use()}


def child(command, env=None):
    run = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"error: {' '.join(command)} failed:\n{run.stderr[-3000:]}")
    return run.stdout


def separate_process_rates(args, backends, references, threads, common):
    """Images/second of each keras-mae backend and HuggingFace reference (`references`:
    name to environment), a fresh child process each, alternating, `args.repeats` rounds."""
    rates = {name: [] for name in [*backends, *references]}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.repeats):
            for name in rates:
                if name in references:
                    # Keras is imported only after the timing, for the malloc report; with torch
                    # it brings no other framework into the process.
                    out = child([sys.executable, __file__, "--hf-only", *threads, *common],
                                {"KERAS_BACKEND": "torch", **references[name]})
                    figures = json.loads(out.strip().splitlines()[-1])
                else:
                    figures_file = Path(tmp) / f"{name}.json"
                    child([sys.executable, str(HERE / "throughput.py"), "--backend", name, "--json", str(figures_file),
                           "--steps-per-execution", str(1 if name == "torch" else args.steps_per_execution), *common])
                    figures = json.loads(figures_file.read_text())
                rate = figures["img_per_s"]
                rates[name].append(rate)
                # CPU time tells a disturbed round (kernel time, or user time up) from a slow one.
                malloc = f", {figures['malloc']}" if "malloc" in figures else ""
                print(f"round {round_index + 1}: {name:<10} {rate:8.2f} img/s  (CPU per step: user "
                      f"{figures['user_s_per_step']:.3f} s, kernel {figures['kernel_s_per_step']:.3f} s, "
                      f"{figures['page_faults_per_step']:.0f} page faults{malloc})", flush=True)
    return rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="T", help="(default: %(default)s; see throughput.py --help)")
    parser.add_argument("--backends", default="tensorflow,jax,torch", help="Comma-separated Keras backends (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="Timed steps per run (default: %(default)s).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps per run (default: %(default)s).")
    parser.add_argument("--repeats", type=int, default=2, help="Alternating rounds (default: %(default)s).")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch threads for HuggingFace (default: torch's own choice, as keras-mae's torch backend "
                             "runs. Setting it at all, even to the number torch picks itself, made torch 2.13's CPU flash attention "
                             "2x slower at these sizes, and HuggingFace's steps at K 1.2x slower, on a 2-core Zen 3). With --same-process "
                             "it sets them for both.")
    parser.add_argument("--dtype-policy", default="float32",
                        help="keras-mae's dtype policy; mixed_* runs HuggingFace under torch.autocast (default: %(default)s).")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="The device's dense peak TFLOP/s for this dtype; adds model FLOPs utilisation.")
    parser.add_argument("--steps-per-execution", type=int, default=1,
                        help="keras-mae training steps fused into one compiled call, on tensorflow and jax; torch runs one "
                             "(default: %(default)s; see throughput.py --help).")
    parser.add_argument("--jit-compile", choices=["auto", "true", "false"], default="auto",
                        help="keras-mae's train-step compilation (see throughput.py; default: %(default)s).")
    parser.add_argument("--hf-jemalloc", action="store_true",
                        help="Also time HuggingFace on jemalloc with keras-mae's settings, every round (hf_jemalloc): "
                             "the lead that is not the allocator's.")
    parser.add_argument("--same-process", action="store_true",
                        help="Time keras-mae's torch backend and HuggingFace in one process instead, --steps of each in "
                             "turn, --repeats rounds, both on the allocator keras-mae picks (jemalloc where the system has "
                             "it): the steadiest ratio on a busy machine, with nothing between the two but the code "
                             "(hf_same_process). Needs --backends torch.")
    parser.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--same-process-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - {"tensorflow", "jax", "torch"}
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}")
    for flag in ("batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if "torch" in backends and args.jit_compile == "true" and args.warmup == 1 and not args.same_process:
        parser.error(TORCH_COMPILE_WARMUP_ERROR)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.same_process and (backends != ["torch"] or args.hf_jemalloc):
        parser.error("--same-process times the torch backend only, on keras-mae's allocator: give it --backends torch "
                     "and no --hf-jemalloc")
    if args.hf_only:
        print(json.dumps(huggingface_rate(CONFIGS[args.config], args.batch_size, args.steps, args.warmup, args.threads,
                                          args.dtype_policy)))
        return
    if args.same_process_child:
        from keras_mae.memory import tune_allocator

        tune_allocator()  # restarts this child as train.py restarts: both models then run on that allocator
        print(json.dumps(same_process_rates(CONFIGS[args.config], args.batch_size, args.steps, args.warmup, args.repeats,
                                            args.threads, args.dtype_policy, args.jit_compile)))
        return
    references = {"hf": {}}
    if args.hf_jemalloc:
        from keras_mae.memory import jemalloc_environment, preloaded_malloc

        if preloaded_malloc():
            parser.error("--hf-jemalloc: LD_PRELOAD already gives every run its malloc library, HuggingFace's too")
        # As keras-mae's runs get it (the user's MALLOC_CONF and LD_PRELOAD kept), even if
        # KERAS_MAE_JEMALLOC=0 keeps those on glibc: the flag asks for it.
        environ = {name: value for name, value in os.environ.items() if name != "KERAS_MAE_JEMALLOC"}
        references["hf_jemalloc"] = jemalloc_environment(environ)
        if not references["hf_jemalloc"]:
            parser.error("--hf-jemalloc needs jemalloc on Linux (Debian / Ubuntu: apt-get install libjemalloc2)")

    threads = ["--threads", str(args.threads)] if args.threads else []
    common = ["--config", args.config, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--dtype-policy", args.dtype_policy, "--jit-compile", args.jit_compile]
    if args.same_process:
        references = {"hf_same_process": {}}
        out = child([sys.executable, __file__, "--same-process-child", "--repeats", str(args.repeats), *threads, *common],
                    {"KERAS_BACKEND": "torch"})
        figures = json.loads(out.strip().splitlines()[-1])
        rates = {"torch": [], "hf_same_process": []}
        for round_index, runs in enumerate(figures["rounds"]):
            for name, rate in runs:
                rates[name].append(rate)
                print(f"round {round_index + 1}: {name:<15} {rate:8.2f} img/s  (one process, {figures['malloc']})")
    else:
        rates = separate_process_rates(args, backends, references, threads, common)
    best = {name: max(values) for name, values in rates.items()}
    print(f"config {args.config}, batch {args.batch_size}, {args.dtype_policy}, {os.cpu_count()} CPU cores")
    if args.peak_tflops:
        for name, rate in best.items():  # HuggingFace's decoder predicts every patch
            step_flops = training_flops(CONFIGS[args.config], 1, predicts_every_patch=name.startswith("hf"))
            print(f"{name}_mfu={step_flops * rate / 1e12 / args.peak_tflops:.3f}")
    # Each round's ratio compares runs made back to back, so their median is less at the
    # mercy of one undisturbed round than the ratio of the bests.
    for reference in references:
        for name in backends:
            ratios = sorted(mine / theirs for mine, theirs in zip(rates[name], rates[reference]))
            print(f"{name}_vs_{reference}_per_round={', '.join(f'{r:.3f}' for r in ratios)} "
                  f"(median {statistics.median(ratios):.3f})")
    for name in [*backends, *references]:
        print(f"{name}_img_per_s={best[name]:.2f}")
    for reference in references:
        for name in backends:
            print(f"{name}_vs_{reference}={best[name] / best[reference]:.3f}")


if __name__ == "__main__":
    main()
