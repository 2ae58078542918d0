#!/usr/bin/env python
"""Pre-train a Masked Autoencoder (ViT) on unlabeled images with Keras 3.

With no argument it pre-trains a small ViT on Fashion-MNIST (offline: the Debian
package dataset-fashion-mnist, keras' cache, or a download) in a few minutes on a CPU.
Every run writes one folder (--output-dir): config.json, mae.keras, encoder.keras,
history.csv, loss_curve.png, reconstructions/epoch_XXX.png, TensorBoard logs/ and a
crash-safe checkpoint that --resume continues from.

Runs under KERAS_BACKEND=tensorflow, jax or torch.
"""

import argparse
import importlib.util
import hashlib
import os
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PRESET = "mae_vit_mini_patch4"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="fashion_mnist",
                      help="fashion_mnist (default), tfds:NAME[:SPLIT] (SPLIT as TFDS writes it: train, "
                           "train[:10%%], train+test), a folder of images "
                           "(png, jpg, bmp, gif, webp; searched recursively, hidden files left out), or "
                           "synthetic (smoke tests).")
    data.add_argument("--data-dir", default=None,
                      help="Where the dataset's files are: the Fashion-MNIST IDX .gz files, or "
                           "TFDS's data_dir. Default: the standard places, see README.")
    data.add_argument("--image-size", type=int, default=None,
                      help="Square size images are resized to. Default: 28/32 for fashion_mnist/"
                           "synthetic, else the preset's.")
    data.add_argument("--channels", type=int, default=None,
                      help="Channels the model sees (1 grayscale, 3 RGB); images are converted. "
                           "Default: the dataset's.")
    data.add_argument("--limit", type=int, default=None,
                      help="Train on the first N images only (quick experiments).")
    data.add_argument("--no-augment", action="store_true",
                      help="Turn off the paper's random resized crop (area 0.2-1) and horizontal flip.")

    model = parser.add_argument_group("model")
    model.add_argument("--preset", default=DEFAULT_PRESET,
                       help="Model configuration, one of keras_mae.list_presets() "
                            "(default: %(default)s).")
    model.add_argument("--patch-size", type=int, default=None, help="Override the preset's patch size.")
    model.add_argument("--mask-ratio", type=float, default=0.75,
                       help="Fraction of patches removed, in (0, 1) (default: %(default)s).")
    model.add_argument("--mask-sampling", choices=["random", "block", "grid"], default="random",
                       help="How removed patches are chosen (default: %(default)s).")
    model.add_argument("--norm-pix-loss", action="store_true",
                       help="Predict per-patch normalised pixels (the paper's better-features option).")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=4, help="Epochs in all (default: %(default)s).")
    train.add_argument("--batch-size", type=int, default=64,
                       help="Global batch size, over all devices (default: %(default)s).")
    train.add_argument("--base-lr", type=float, default=3e-3,
                       help="Learning rate per 256 images; lr = base_lr x batch / 256 (default: %(default)s; "
                            "the paper's 1.5e-4 is for 800 epochs at batch 4096, short runs need more).")
    train.add_argument("--weight-decay", type=float, default=0.05,
                       help="AdamW weight decay, not applied to biases, norms and tokens (default: %(default)s).")
    train.add_argument("--warmup-epochs", type=float, default=0.25,
                       help="Linear warm-up before the cosine decay (default: %(default)s).")
    train.add_argument("--dtype-policy", choices=["float32", "mixed_bfloat16", "mixed_float16"], default="float32",
                       help="Keras dtype policy: mixed_bfloat16 (GPUs/TPUs since Ampere) or mixed_float16 "
                            "(older GPUs, with loss scaling) halve activation memory. On a CPU it depends on the CPU: "
                            "on an Intel Xeon with AMX, torch trained 1.6-1.95x faster in bf16 (batch 256, "
                            "keras.io and ViT-Tiny sizes), TensorFlow and JAX slower (XLA's CPU matmuls skip AMX); "
                            "on AMD EPYCs torch was 1.24x faster in bf16 on a Zen 4 and 0.86x on a Zen 5 (measured "
                            "before 2026-12-06, when its 16-bit attention began to run in float32 on a CPU). Time "
                            "yours with benchmarks/throughput.py --dtype-policy (default: %(default)s).")
    train.add_argument("--steps-per-execution", type=int, default=1,
                       help="Training steps run per compiled call: fewer Python round trips for small "
                            "models on fast devices (default: %(default)s).")
    train.add_argument("--jit-compile", choices=["auto", "true", "false"], default="auto",
                       help="Compile the training step: auto = XLA on TensorFlow (one replica) and JAX, eager "
                            "PyTorch; true on torch = torch.compile, one graph per step instead of a Python call "
                            "per layer and op, after minutes of compiling at the start (ViT-B's configuration "
                            "at width 96 on 2 CPU cores: 84 -> 39 ms per step); false = eager everywhere, "
                            "for debugging (default: %(default)s).")
    train.add_argument("--seed", type=int, default=0, help="Seed of masking, shuffling and augmentation.")
    train.add_argument("--strategy", choices=["auto", "none", "mirrored", "data_parallel", "multi_process",
                                              "multi_worker"], default="auto",
                       help="Several devices: mirrored (TensorFlow), data_parallel (JAX); auto picks "
                            "one when more than one device is present. Several processes or machines: "
                            "multi_process (JAX; see --coordinator-address). multi_worker (TensorFlow) is "
                            "refused: it does not work with Keras 3's fit (default: %(default)s).")
    train.add_argument("--coordinator-address", default=None,
                       help="multi_process: HOST:PORT of process 0, which every process connects to "
                            "(default: $KERAS_DISTRIBUTION_JOB_ADDRESSES).")
    train.add_argument("--num-processes", type=int, default=None,
                       help="multi_process: how many processes in all (default: $KERAS_DISTRIBUTION_NUM_PROCESSES "
                            "or $SLURM_NTASKS).")
    train.add_argument("--process-id", type=int, default=None,
                       help="multi_process: this process's index, 0 writes the run folder (default: "
                            "$KERAS_DISTRIBUTION_PROCESS_ID, $SLURM_PROCID or $JOB_COMPLETION_INDEX).")
    train.add_argument("--distributed-timeout", type=float, default=300,
                       help="multi_process: seconds to wait for every process at start-up, and for a process "
                            "that went silent during training, before stopping with an error (default: %(default)s).")
    train.add_argument("--cpu-devices", type=int, default=1,
                       help="Split the CPU into N logical devices, to try multi-device training without GPUs.")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default=None,
                        help="The run folder itself (default: saved_models/<preset>_<dataset>).")
    output.add_argument("--resume", action="store_true",
                        help="Continue the run in --output-dir from its last completed epoch.")
    output.add_argument("--overwrite", action="store_true",
                        help="Delete an existing run folder and start again.")
    output.add_argument("--export", action="store_true",
                        help="Also write TensorFlow SavedModels for serving: <run>/serving/encoder/1 and "
                             "<run>/serving/reconstructor/1 (see python -m keras_mae.export --help).")
    output.add_argument("--reconstruct-every", type=int, default=1,
                        help="Epochs between reconstruction grids (default: %(default)s).")
    output.add_argument("--num-reconstructions", type=int, default=8,
                        help="Images in each reconstruction grid (default: %(default)s).")
    output.add_argument("--knn-every", type=int, default=0,
                        help="Every N epochs (and the first and last), the k-NN accuracy (cosine, k=20) of the "
                             "encoder's features, into history.csv and TensorBoard: a cheap look at the "
                             "representation. Needs labels; uses up to 10,000 training and test images (the "
                             "test split, or 10%% held out). 0 = off (default).")
    output.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None,
                        help="Keras fit verbosity: 0 silent, 1 progress bar, 2 a line per epoch "
                             "(default: progress bar on a terminal, else a line per epoch).")
    return parser


def fail(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_flags(args):
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--base-lr": args.base_lr,
                "--reconstruct-every": args.reconstruct_every, "--num-reconstructions": args.num_reconstructions,
                "--cpu-devices": args.cpu_devices, "--steps-per-execution": args.steps_per_execution}
    if args.distributed_timeout <= 0:
        fail(f"--distributed-timeout must be positive, got {args.distributed_timeout}.")
    if args.strategy != "multi_process" and any(
            v is not None for v in (args.coordinator_address, args.num_processes, args.process_id)):
        fail("--coordinator-address, --num-processes and --process-id need --strategy multi_process.")
    if args.knn_every < 0:
        fail(f"--knn-every must not be negative, got {args.knn_every}.")
    for flag in ("--image-size", "--channels", "--limit", "--patch-size"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            positive[flag] = value
    for flag, value in positive.items():
        if not value > 0:
            fail(f"{flag} must be positive, got {value}.")
    if not 0 < args.mask_ratio < 1:
        fail(f"--mask-ratio must be strictly between 0 and 1, got {args.mask_ratio}.")
    if args.weight_decay < 0 or args.warmup_epochs < 0:
        fail("--weight-decay and --warmup-epochs must not be negative.")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras_mae.distribute import configure_cpu_devices

    configure_cpu_devices(args.cpu_devices)  # must precede the backend's start

    import keras
    import numpy as np

    from keras_mae.distribute import StrategyError, resolve_cluster, start_multi_process

    if args.steps_per_execution > 1 and keras.backend.backend() == "torch":
        fail("--steps-per-execution must be 1 with KERAS_BACKEND=torch (Keras' torch trainer runs one step per call).")
    if args.strategy == "multi_process":
        # First, before any computation: JAX's runtime must start before it is used.
        if keras.backend.backend() != "jax":
            fail(f"--strategy multi_process needs KERAS_BACKEND=jax (this run uses {keras.backend.backend()}).")
        try:
            start_multi_process(resolve_cluster(args.coordinator_address, args.num_processes, args.process_id),
                                timeout=args.distributed_timeout)
        except StrategyError as error:
            fail(str(error))
    keras.utils.set_random_seed(args.seed)  # the same initial weights in every process

    from keras_mae import MaskedAutoencoder
    from keras_mae.callbacks import (KNNMonitor, ReconstructionLogger, RunCheckpoint, logging_callbacks,
                                     write_atomically, write_json)
    from keras_mae.data import (DataError, crop_and_flip_augmentation, image_dataset, load_source, make_pipeline,
                                with_test_split)
    from keras_mae.distribute import process_index, strategy_scope
    from keras_mae.optimizers import AdamW, WarmupCosineDecay
    from keras_mae.presets import check_preset
    from keras_mae.runs import (RunFolderError, brief_warnings, counted, dataset_slug, export_saved_model,
                                jit_compile_setting, prepare_run_dir, trim_history, verbosity)
    from keras_mae.visualize import read_history, save_loss_curve

    brief_warnings("train.py")
    started_at = time.time()
    try:
        preset = check_preset(args.preset)
        source = load_source(args.dataset, "train", args.data_dir)
    except (DataError, ValueError) as error:
        fail(str(error))
    if args.limit:
        source = source.take(args.limit)
    native = source.images.shape[1] if source.images is not None else None
    image_size = args.image_size or native or preset["image_size"]
    channels = args.channels or source.num_channels
    patch_size = args.patch_size or preset["patch_size"]
    if image_size % patch_size:
        fail(f"--image-size {image_size} is not divisible by the patch size {patch_size}.")
    if args.batch_size > source.num_examples:
        fail(f"--batch-size {args.batch_size} is larger than the {source.num_examples} training images.")
    steps_per_epoch = source.num_examples // args.batch_size

    try:
        scope, strategy_text, replicas = strategy_scope(args.strategy, args.batch_size)
    except StrategyError as error:
        fail(str(error))
    if args.jit_compile == "true" and keras.backend.backend() == "tensorflow" and replicas > 1:
        fail("--jit-compile true does not work with several TensorFlow replicas (XLA cannot reach the mirrored "
             "variables); use --jit-compile auto.")
    chief = process_index() == 0
    try:
        default = Path("saved_models") / f"{args.preset}_{dataset_slug(args.dataset)}"
        run_dir = prepare_run_dir(args.output_dir or default, args.resume, args.overwrite, chief)
    except RunFolderError as error:
        fail(str(error))
    # Every process runs the same callbacks (their model calls are collective); the
    # others write into a scratch folder that is deleted at the end.
    out_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix=f"keras_mae_process{process_index()}_"))
    state = RunCheckpoint.load_state(run_dir) if args.resume else None
    if args.strategy == "multi_process":
        from jax.experimental import multihost_utils

        mine = state["epoch"] if state else 0
        chiefs = int(multihost_utils.broadcast_one_to_all(np.int32(mine)))
        if mine != chiefs:
            fail(f"process {process_index()} finds epoch {mine} in {run_dir} but process 0 finds epoch {chiefs}: "
                 "--resume needs the run folder on a file system every process shares.")
    if args.resume and state is None:
        print(f"No checkpoint in {run_dir}: starting from epoch 0.")

    print(f"Data: {source.description}")
    print(f"Backend: {keras.backend.backend()}, {strategy_text}; run folder: {run_dir}")

    size = (image_size, image_size)
    try:
        augment = None if args.no_augment else crop_and_flip_augmentation(size)
        train_data = make_pipeline(source, size, channels, args.batch_size, augment=augment, seed=args.seed)
        preview_source = load_source(args.dataset, "test", args.data_dir) if args.dataset == "fashion_mnist" else source
        preview = np.stack(list(image_dataset(preview_source, size, channels).take(args.num_reconstructions).as_numpy_iterator()))
        knn_sources = None
        if args.knn_every:
            if not source.has_labels:
                raise DataError(f"--knn-every needs labelled images; {source.description} has no labels.")
            knn_sources = [
                make_pipeline(s.take(10_000), size, channels, 256, training=False, with_labels=True)
                for s in with_test_split(source, args.dataset, args.data_dir, seed=args.seed)
            ]
    except DataError as error:
        fail(str(error))

    model_config = {
        **preset,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": channels,
        "mask_ratio": args.mask_ratio,
        "mask_sampling": args.mask_sampling,
        "norm_pix_loss": args.norm_pix_loss,
        "seed": args.seed,
    }
    learning_rate = args.base_lr * args.batch_size / 256
    run_config = {
        "flags": vars(args),
        "command": " ".join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": model_config,
        "learning_rate": learning_rate,
        "steps_per_epoch": steps_per_epoch,
        "dataset": source.description,
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "strategy": strategy_text,
    }
    write_json(out_dir / "config.json", run_config)

    keras.config.set_dtype_policy(args.dtype_policy)
    with scope:
        mae = MaskedAutoencoder(**model_config)
        schedule = WarmupCosineDecay.for_run(learning_rate, args.epochs, steps_per_epoch, args.warmup_epochs)
        optimizer = AdamW(schedule, beta_1=0.9, beta_2=0.95, weight_decay=args.weight_decay)
        mae.compile(optimizer=optimizer, steps_per_execution=args.steps_per_execution,
                    jit_compile=jit_compile_setting(args.jit_compile))
        initial_epoch = 0
        if state is not None:
            mae.optimizer.build(mae.trainable_variables)
            mae.load_weights(run_dir / state["checkpoint"])
            initial_epoch = state["epoch"]
            print(f"Resuming after epoch {initial_epoch} from {run_dir / state['checkpoint']}.")

    history_path = out_dir / "history.csv"
    trim_history(history_path, initial_epoch)
    callbacks = [
        *([KNNMonitor(mae.encoder, *knn_sources, every=args.knn_every)] if knn_sources else []),  # before the logger
        *logging_callbacks(history_path, append=bool(initial_epoch), tensorboard_dir=out_dir / "logs"),
        ReconstructionLogger(preview, out_dir / "reconstructions", every=args.reconstruct_every,
                             log_dir=out_dir / "logs" / "images", seed=args.seed),
        RunCheckpoint(out_dir, {"epochs": args.epochs}),
    ]
    verbose = verbosity(args.verbose)
    print(f"Pre-training {args.preset} ({mae.count_params():,} parameters) on {image_size}x{image_size}x"
          f"{channels} images: {counted(args.epochs, 'epoch')} of {counted(steps_per_epoch, 'step')}, "
          f"batch {args.batch_size}, lr {learning_rate:.3g}.")
    try:
        history = mae.fit(train_data, epochs=args.epochs, initial_epoch=initial_epoch, callbacks=callbacks,
                          verbose=verbose, shuffle=False)  # the pipeline shuffles
    except Exception as error:
        if args.strategy != "multi_process":
            raise
        # A peer died or went silent: the collective fails here. Leave at once: JAX's
        # orderly shutdown would wait for the missing process, then abort noisily.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        print(f"\ntrain.py: error: process {process_index()} stopped: another process of this run failed or stopped "
              f"answering ({reason}). The last completed epoch is in {run_dir}: start every process again with "
              "--resume.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if not chief:
            shutil.rmtree(out_dir, ignore_errors=True)
        os._exit(1)

    losses = history.history.get("loss", [])
    if losses and not np.isfinite(losses[-1]):
        print(f"train.py: error: the loss became NaN or infinite in epoch {initial_epoch + len(losses)}. "
              f"{RunCheckpoint.divergence_advice(run_dir, out_dir)}", file=sys.stderr)
        if not chief:
            shutil.rmtree(out_dir, ignore_errors=True)
        sys.exit(1)
    # The run's products carry no optimizer state (a third of the size); the
    # checkpoint keeps it for --resume.
    trained = MaskedAutoencoder.from_config(mae.get_config())
    trained.set_weights(mae.get_weights())
    write_atomically(out_dir / "mae.keras", trained.save)
    write_atomically(out_dir / "encoder.keras", mae.encoder.save)
    final_loss = float("nan")
    if history_path.is_file():
        history = read_history(history_path)
        save_loss_curve(history, out_dir / "loss_curve.png")
        final_loss = history.get("loss", [final_loss])[-1]
    if args.strategy == "multi_process":
        # Every process prints it: equal digests mean the replicas ended identical.
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in trained.get_weights()))
        print(f"Process {process_index()}: final weights sha256 {digest.hexdigest()}")
    if not chief:
        shutil.rmtree(out_dir, ignore_errors=True)
        print(f"Process {process_index()} done in {time.time() - started_at:.0f} s (process 0 wrote {run_dir}).")
        return
    if args.export:
        for kind in ("encoder", "reconstructor"):
            if not export_saved_model(run_dir / "mae.keras", kind, run_dir / "serving" / kind):
                print(f"train.py: error: exporting the {kind} failed (the .keras files are saved).", file=sys.stderr)
                sys.exit(1)
    print(f"Done in {time.time() - started_at:.0f} s. Final loss {final_loss:.4f}.")
    print(f"Wrote {run_dir}/: mae.keras, encoder.keras, config.json, history.csv, loss_curve.png, "
          "reconstructions/, logs/ (tensorboard --logdir " f"{run_dir / 'logs'}).")


if __name__ == "__main__":
    check_flags(build_parser().parse_args())  # --help and flag mistakes answer before the slow imports
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow first loads
    # On jemalloc before keras_mae imports Keras and its backend, which a restart after
    # them would do again (3-4 s): keras_mae/memory.py runs without its package.
    package = importlib.util.find_spec("keras_mae")  # found, not imported
    runpy.run_path(os.path.join(package.submodule_search_locations[0], "memory.py"))["restart_with_jemalloc"]()
    from keras_mae.memory import tune_allocator

    tune_allocator()  # faster CPU steps on JAX and torch (see keras_mae/memory.py)
    main()
