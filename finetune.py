#!/usr/bin/env python
"""Use a pre-trained MAE encoder on a labelled dataset: linear probe, partial or full fine-tuning.

    python finetune.py --encoder saved_models/pretrained_fashion_mnist_mini --mode linear
    python finetune.py --encoder RUN_DIR --mode partial --blocks 2
    python finetune.py --encoder RUN_DIR --mode full --labels-fraction 0.1
    python finetune.py --init random --preset mae_vit_mini_patch4 --mode full   # from-scratch baseline

--mode linear: the encoder is frozen; BatchNorm without affine parameters and a linear
head are trained on its pooled features, which are computed once (no augmentation).
--mode partial --blocks K: the last K blocks and the final norm train with the head.
--mode full: everything trains, with layer-wise learning-rate decay, drop path, label
smoothing and optionally mixup/cutmix (the paper's recipe, scaled to short runs).

Writes --output-dir: classifier.keras (images in [0, 1] -> class probabilities; class
names inside), metrics.json (top-1, top-5 for more than 5 classes, per-class accuracy,
confusion matrix, the exact config), confusion_matrix.png, history.csv,
training_curves.png, and a checkpoint that --resume continues from. The last line printed is `test_accuracy=<float>`.

Runs under KERAS_BACKEND=tensorflow, jax or torch.
"""

import argparse
import importlib.util
import os
import runpy
import sys
import time
from pathlib import Path

DEFAULT_PRESET = "mae_vit_mini_patch4"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="finetune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument("--encoder", default=None,
                       help="The pre-trained encoder: a train.py run folder, or an encoder.keras, mae.keras "
                            "or classifier.keras file.")
    model.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                       help="pretrained: the --encoder's weights; random: a freshly initialised encoder of the "
                            "same architecture (or --preset's), the from-scratch baseline (default: %(default)s).")
    model.add_argument("--preset", default=None,
                       help=f"Architecture for --init random without --encoder (default: {DEFAULT_PRESET}).")
    model.add_argument("--mode", choices=["linear", "partial", "full"], default="full",
                       help="What trains: the head on frozen features, the last --blocks blocks too, or "
                            "everything (default: %(default)s).")
    model.add_argument("--blocks", type=int, default=None, help="--mode partial: how many of the last blocks train.")
    model.add_argument("--pooling", choices=["avg", "token"], default="avg",
                       help="Features: mean of the patch tokens or the class token (default: %(default)s).")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="fashion_mnist",
                      help="Labelled images: fashion_mnist (default), tfds:NAME (its train and test splits), "
                           "tfds:NAME:SPLIT (SPLIT as TFDS writes it, e.g. train[:10%%]; --test-fraction of it "
                           "held out), or a folder with one sub-folder per class.")
    data.add_argument("--data-dir", default=None, help="Where the dataset's files are (as in train.py).")
    data.add_argument("--image-size", type=int, default=None,
                      help="Must equal the encoder's image size if given; images are resized to it.")
    data.add_argument("--labels-fraction", type=float, default=1.0,
                      help="Train on this stratified fraction of the labelled training set, in (0, 1] "
                           "(default: %(default)s).")
    data.add_argument("--test-fraction", type=float, default=0.1,
                      help="For a source without a test split (a folder, or tfds without 'test'): the "
                           "stratified fraction held out for testing (default: %(default)s).")
    data.add_argument("--limit", type=int, default=None, help="Use only the first N training images.")
    data.add_argument("--no-augment", action="store_true",
                      help="Partial/full: no random resized crop (area 0.35-1) and horizontal flip.")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    train.add_argument("--base-lr", type=float, default=1e-3,
                       help="Learning rate per 256 images of the head (AdamW); lr = base_lr x batch / 256 "
                            "(default: %(default)s; the paper: 5e-4 for ViT-B full fine-tuning).")
    train.add_argument("--layer-decay", type=float, default=0.75,
                       help="Full/partial: block i's lr is scaled by decay^(depth - i), the embedding's by "
                            "decay^(depth + 1); 1 turns it off (default: %(default)s; paper 0.65 B, 0.75 L/H).")
    train.add_argument("--weight-decay", type=float, default=None,
                       help="Decoupled weight decay (default: 0 for linear, as in the paper; 0.05 otherwise).")
    train.add_argument("--drop-path", type=float, default=0.1,
                       help="Full/partial: stochastic depth of the last block (default: %(default)s).")
    train.add_argument("--dropout", type=float, default=0.0, help="Dropout before the head (default: %(default)s).")
    train.add_argument("--label-smoothing", type=float, default=0.1, help="(default: %(default)s)")
    train.add_argument("--mixup", type=float, default=0.0,
                       help="Mixup alpha, 0 = off (default: %(default)s; the paper: 0.8).")
    train.add_argument("--cutmix", type=float, default=0.0,
                       help="CutMix alpha, 0 = off (default: %(default)s; the paper: 1.0). With both, each "
                            "batch gets one of the two at random.")
    train.add_argument("--warmup-epochs", type=float, default=1.0,
                       help="Linear warm-up before the cosine decay (default: %(default)s).")
    train.add_argument("--knn", action="store_true",
                       help="Also report the k-NN accuracy (cosine, k=20) of the encoder's features before training.")
    train.add_argument("--dtype-policy", choices=["float32", "mixed_bfloat16", "mixed_float16"], default="float32",
                       help="Keras dtype policy (default: %(default)s).")
    train.add_argument("--jit-compile", choices=["auto", "true", "false"], default="auto",
                       help="Compile the training step: auto = XLA on TensorFlow and JAX, eager PyTorch; true on "
                            "torch = torch.compile, one graph per step, after minutes of compiling at the start; "
                            "false = eager everywhere, for debugging (default: %(default)s).")
    train.add_argument("--seed", type=int, default=0, help="Seed of initialisation, subsets, shuffling, augmentation.")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default=None,
                        help="The run folder (default: saved_models/finetune_<mode>_<dataset>).")
    output.add_argument("--resume", action="store_true", help="Continue the run in --output-dir from its last epoch.")
    output.add_argument("--overwrite", action="store_true", help="Delete an existing run folder and start again.")
    output.add_argument("--export", action="store_true",
                        help="Also write a TensorFlow SavedModel: <run>/serving/classifier/1 (uint8 images in; "
                             "probabilities, class index and class name out).")
    output.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None,
                        help="Keras verbosity: 0 silent, 1 progress bar, 2 a line per epoch "
                             "(default: progress bar on a terminal, else a line per epoch).")
    return parser


def fail(message):
    print(f"finetune.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_flags(args):
    if args.init == "pretrained" and not args.encoder:
        fail("--encoder is required (or --init random for a from-scratch baseline).")
    if args.preset and args.encoder:
        fail("--preset only chooses the architecture of --init random without --encoder.")
    if args.mode == "partial" and args.blocks is None:
        fail("--mode partial needs --blocks K (how many of the last blocks train).")
    if args.mode != "partial" and args.blocks is not None:
        fail("--blocks only applies to --mode partial.")
    if not 0 < args.labels_fraction <= 1:
        fail(f"--labels-fraction must be in (0, 1], got {args.labels_fraction}.")
    if not 0 < args.test_fraction < 1:
        fail(f"--test-fraction must be in (0, 1), got {args.test_fraction}.")
    for flag in ("epochs", "batch_size", "base_lr", "image_size", "limit", "blocks"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {value}.")
    if not 0 < args.layer_decay <= 1:
        fail(f"--layer-decay must be in (0, 1], got {args.layer_decay}.")
    for flag in ("drop_path", "dropout", "label_smoothing"):
        if not 0 <= getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be in [0, 1), got {getattr(args, flag)}.")
    for flag in ("mixup", "cutmix", "warmup_epochs"):
        if getattr(args, flag) < 0:
            fail(f"--{flag.replace('_', '-')} must not be negative.")
    if args.weight_decay is not None and args.weight_decay < 0:
        fail("--weight-decay must not be negative.")


def load_splits(args):
    """(train, test) labelled sources; errors are DataErrors with a message for the user."""
    from keras_mae.data import DataError, load_source, stratified_indices, with_test_split

    train = load_source(args.dataset, "train", args.data_dir)
    if not train.has_labels:
        raise DataError(f"{train.description} has no labels: finetune.py needs classes (for a folder, one "
                        "sub-folder per class).")
    if len(train.class_names) < 2:
        raise DataError(f"{train.description} has {len(train.class_names)} class; a classifier needs at least 2.")
    train, test = with_test_split(train, args.dataset, args.data_dir, args.test_fraction, seed=args.seed)
    if args.limit:
        train = train.take(args.limit)
    if args.labels_fraction < 1:
        labels = train.label_array()
        chosen = stratified_indices(labels, args.labels_fraction, seed=args.seed)
        train = train.select(chosen, f"{args.labels_fraction:g} of the labels per class ({len(chosen)} images)")
    return train, test


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_mae import MAEEncoder
    from keras_mae.callbacks import RunCheckpoint, logging_callbacks, write_atomically, write_json
    from keras_mae.classifier import ViTClassifier, load_encoder
    from keras_mae.data import DataError, crop_and_flip_augmentation, make_pipeline
    from keras_mae.evaluation import classification_report, extract_features, knn_accuracy
    from keras_mae.models import MaskedAutoencoder
    from keras_mae.optimizers import AdamW, WarmupCosineDecay
    from keras_mae.runs import (RunFolderError, brief_warnings, counted, dataset_slug, export_saved_model,
                                prepare_run_dir, trim_history, verbosity)
    from keras_mae.visualize import read_history, save_confusion_matrix, save_training_curves

    brief_warnings("finetune.py")
    started_at = time.time()
    tf.get_logger().setLevel("ERROR")  # retracing notes of predict's last, smaller batch
    keras.utils.set_random_seed(args.seed)
    try:
        if args.encoder:
            pretrained = load_encoder(args.encoder)
        else:
            mae = MaskedAutoencoder.from_preset(args.preset or DEFAULT_PRESET)
            pretrained = mae.encoder
    except ValueError as error:
        fail(str(error))
    encoder_config = pretrained.get_config()
    size = pretrained.image_size if isinstance(pretrained.image_size, int) else None
    height, width = (size, size) if size else tuple(pretrained.image_size)
    if args.image_size is not None and (args.image_size, args.image_size) != (height, width):
        fail(f"--image-size {args.image_size} does not match the encoder, which takes {height}x{width} images.")
    if args.mode == "partial" and args.blocks > pretrained.depth:
        fail(f"--blocks {args.blocks} is larger than the encoder's depth ({pretrained.depth} blocks).")
    try:
        train_source, test_source = load_splits(args)
    except (DataError, ValueError) as error:
        fail(str(error))
    class_names = list(train_source.class_names)
    num_classes = len(class_names)
    if args.batch_size > train_source.num_examples:
        fail(f"--batch-size {args.batch_size} is larger than the {train_source.num_examples} training images.")

    try:
        default = Path("saved_models") / f"finetune_{args.mode}_{dataset_slug(args.dataset)}"
        run_dir = prepare_run_dir(args.output_dir or default, args.resume, args.overwrite)
    except RunFolderError as error:
        fail(str(error))
    state = RunCheckpoint.load_state(run_dir) if args.resume else None
    keras.config.set_dtype_policy(args.dtype_policy)

    # The encoder that trains: drop path is part of its config, so it is rebuilt; weights
    # are copied unless this is the from-scratch baseline.
    drop_path = args.drop_path if args.mode != "linear" else 0.0
    encoder_config.update(drop_path_rate=drop_path, dtype=args.dtype_policy)
    encoder = MAEEncoder.from_config(encoder_config)
    if args.init == "pretrained":
        encoder.set_weights(pretrained.get_weights())
    classifier = ViTClassifier(encoder, num_classes, pooling=args.pooling, probe_norm=args.mode == "linear",
                               dropout_rate=args.dropout, class_names=class_names, mode=args.mode,
                               blocks=args.blocks)

    channels = pretrained.num_channels
    size = (height, width)
    weight_decay = args.weight_decay if args.weight_decay is not None else (0.0 if args.mode == "linear" else 0.05)
    learning_rate = args.base_lr * args.batch_size / 256
    steps_per_epoch = train_source.num_examples // args.batch_size
    schedule = WarmupCosineDecay.for_run(learning_rate, args.epochs, steps_per_epoch, args.warmup_epochs)
    decay = args.layer_decay if args.mode != "linear" else 1.0
    optimizer = AdamW(schedule, classifier.layer_decay_multipliers(decay), weight_decay=weight_decay,
                      beta_1=0.9, beta_2=0.999)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing)
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:  # with 5 classes or fewer, top-5 accuracy is always 1
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy"))

    def one_hot(images, labels):
        return images, tf.one_hot(labels, num_classes)

    def pipeline(source, training):
        augment = None
        if training and args.mode != "linear" and not args.no_augment:
            augment = crop_and_flip_augmentation(size, crop_area=(0.35, 1.0))
        data = make_pipeline(source, size, channels, args.batch_size, training=training, augment=augment,
                             with_labels=True, seed=args.seed)
        data = data.map(one_hot, num_parallel_calls=tf.data.AUTOTUNE)
        if training and (args.mixup or args.cutmix):
            data = data.map(mixing(), num_parallel_calls=tf.data.AUTOTUNE)
        return data

    def mixing():
        layers = [keras.layers.MixUp(alpha=args.mixup, seed=args.seed)] if args.mixup else []
        layers += [keras.layers.CutMix(factor=args.cutmix, seed=args.seed)] if args.cutmix else []

        def mix(images, labels):
            batch = {"images": images, "labels": labels}
            if len(layers) == 1:
                mixed = layers[0](batch)
            else:
                mixed = tf.cond(tf.random.uniform(()) < 0.5, lambda: layers[0](batch), lambda: layers[1](batch))
            return mixed["images"], mixed["labels"]

        return mix

    try:
        train_data = pipeline(train_source, training=True)
        test_data = pipeline(test_source, training=False)
    except DataError as error:
        fail(str(error))

    encoder_text = "random initialisation" if args.init == "random" else str(args.encoder)
    print(f"Data: {train_source.description}; test: {test_source.description}")
    print(f"Backend: {keras.backend.backend()}; encoder: {encoder_text} ({encoder.depth} x {encoder.width}, "
          f"{height}x{width}x{channels}); run folder: {run_dir}")
    run_config = {
        "flags": vars(args),
        "command": " ".join(["python", "finetune.py", *(sys.argv[1:] if argv is None else argv)]),
        "encoder": encoder_config,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "steps_per_epoch": steps_per_epoch,
        "train_dataset": train_source.description,
        "test_dataset": test_source.description,
        "class_names": class_names,
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
    }
    write_json(run_dir / "config.json", run_config)
    verbose = verbosity(args.verbose)
    results = {}
    if args.knn or args.mode == "linear":
        # Frozen features of every image, once: the linear probe trains on them and k-NN
        # needs nothing else.
        print("Computing frozen features of the training and test images...")
        frozen_train = extract_features(encoder, pipeline(train_source, training=False), args.pooling, verbose=verbose)
        frozen_test = extract_features(encoder, test_data, args.pooling, verbose=verbose)
        if args.knn:
            results["knn_accuracy"] = knn_accuracy(*frozen_train, *frozen_test, k=20, num_classes=num_classes)
            print(f"k-NN (k=20, cosine) accuracy of the encoder's features: {results['knn_accuracy']:.4f}")

    # Linear probing trains the head alone on the cached features; otherwise the whole
    # classifier trains on images.
    trainee = classifier.head if args.mode == "linear" else classifier
    jit_compile = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    trainee.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile)
    if args.mode == "linear":
        fit_data = tf.data.Dataset.from_tensor_slices(
            (frozen_train[0], tf.one_hot(frozen_train[1], num_classes))
        ).shuffle(len(frozen_train[0]), seed=args.seed).batch(args.batch_size, drop_remainder=True)
        validation = tf.data.Dataset.from_tensor_slices(
            (frozen_test[0], tf.one_hot(frozen_test[1], num_classes))).batch(args.batch_size)
    else:
        fit_data, validation = train_data, test_data
    initial_epoch = 0
    if state is not None:
        trainee.optimizer.build(trainee.trainable_variables)
        classifier.load_weights(run_dir / state["checkpoint"])
        initial_epoch = state["epoch"]
        print(f"Resuming after epoch {initial_epoch} from {run_dir / state['checkpoint']}.")

    history_path = run_dir / "history.csv"
    trim_history(history_path, initial_epoch)

    callbacks = [
        *logging_callbacks(history_path, append=bool(initial_epoch)),
        RunCheckpoint(run_dir, {"epochs": args.epochs}, model=classifier),
    ]
    mode_text = {"linear": "linear probe", "partial": f"partial fine-tuning (last {args.blocks} blocks)",
                 "full": "full fine-tuning"}[args.mode]
    print(f"{mode_text.capitalize()} on {train_source.num_examples} images, {num_classes} classes: "
          f"{counted(args.epochs, 'epoch')} of {counted(steps_per_epoch, 'step')}, batch {args.batch_size}, "
          f"lr {learning_rate:.3g}, "
          f"{len(classifier.trainable_weights)} trainable weight tensors "
          f"({sum(int(np.prod(v.shape)) for v in classifier.trainable_weights):,} parameters).")
    if initial_epoch < args.epochs:
        trainee.fit(fit_data, validation_data=validation, epochs=args.epochs, initial_epoch=initial_epoch,
                    callbacks=callbacks, verbose=verbose, shuffle=False)  # the pipelines shuffle
    history = read_history(history_path) if history_path.is_file() else {}
    if history.get("loss") and not np.isfinite(history["loss"][-1]):
        print(f"finetune.py: error: the loss became NaN or infinite in epoch {len(history['loss'])}. "
              f"{RunCheckpoint.divergence_advice(run_dir)}", file=sys.stderr)
        sys.exit(1)

    # The product: the whole classifier on images, without optimizer state.
    trained = ViTClassifier.from_config(classifier.get_config())
    trained.set_weights(classifier.get_weights())
    write_atomically(run_dir / "classifier.keras", trained.save)
    probabilities = trained.predict(test_data.map(lambda images, labels: images), verbose=0)
    test_labels = np.concatenate([labels.argmax(-1) for _, labels in test_data.as_numpy_iterator()])
    results.update(classification_report(probabilities, test_labels, class_names))
    results.update(
        mode=args.mode, init=args.init, encoder=None if args.encoder is None else str(args.encoder),
        train_examples=train_source.num_examples, epochs=args.epochs, seconds=round(time.time() - started_at, 1),
        config=run_config,
    )
    write_json(run_dir / "metrics.json", results)
    save_confusion_matrix(results["confusion_matrix"], class_names, run_dir / "confusion_matrix.png",
                          title=f"{mode_text}: top-1 {results['top1_accuracy']:.4f}")
    if history:
        save_training_curves(history, run_dir / "training_curves.png", title=mode_text)
    if args.export and not export_saved_model(run_dir / "classifier.keras", "classifier",
                                              run_dir / "serving" / "classifier"):
        print("finetune.py: error: exporting the classifier failed (classifier.keras is saved).", file=sys.stderr)
        sys.exit(1)
    top5 = f", top-5 {results['top5_accuracy']:.4f}" if "top5_accuracy" in results else ""
    print(f"Done in {time.time() - started_at:.0f} s. Top-1 {results['top1_accuracy']:.4f}{top5} "
          f"on {results['num_examples']} test images.")
    print(f"Wrote {run_dir}/: classifier.keras, metrics.json, confusion_matrix.png, history.csv, "
          "training_curves.png, config.json.")
    print(f"test_accuracy={results['top1_accuracy']:.6f}")


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
