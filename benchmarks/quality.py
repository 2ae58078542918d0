"""What pre-training buys: the whole story on real Fashion-MNIST, in one run.

1. pre-train an MAE with train.py (or reuse a run with --pretrained);
2. linear probes (BatchNorm without affine + linear head, the same epochs) on raw
   pixels, on a randomly initialised encoder and on the MAE encoder, and k-NN (cosine,
   k=20) on both encoders' features;
3. full fine-tuning of the random encoder (from scratch) and of the MAE encoder with
   the same epochs and recipe, on 100 % and on a stratified 10 % of the labels.

Every classifier is trained by finetune.py in its own process, as a user would run it.
Writes <output-dir>/quality.md (a markdown table) and quality.json; the last lines are
key=value test accuracies: pixels_linear, random_linear, mae_linear, random_knn, mae_knn,
scratch_finetune_100, mae_finetune_100, scratch_finetune_10, mae_finetune_10.

    python benchmarks/quality.py --budget cpu        # under an hour on 2 CPU cores
    python benchmarks/quality.py --budget gpu        # longer, closer to the paper's recipe
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {
    # Sized so that the whole run stays under an hour on 2 CPU cores.
    "cpu": dict(pretrain_epochs=10, pretrain_batch=64, pretrain_base_lr=3e-3, linear_epochs=20,
                finetune_epochs_100=3, finetune_epochs_10=10, batch=128, base_lr=1e-3, layer_decay=0.75,
                mixup=0.0, cutmix=0.0, warmup_epochs=1.0),
    # The paper's recipe scaled to a 6 x 128 ViT: long pre-training, mixup + cutmix fine-tuning.
    "gpu": dict(pretrain_epochs=200, pretrain_batch=512, pretrain_base_lr=1.5e-3, linear_epochs=90,
                finetune_epochs_100=50, finetune_epochs_10=100, batch=256, base_lr=1e-3, layer_decay=0.65,
                mixup=0.8, cutmix=1.0, warmup_epochs=5.0),
    # Checks that every step runs (minutes): 1000 training images, one epoch each.
    "smoke": dict(pretrain_epochs=1, pretrain_batch=64, pretrain_base_lr=3e-3, linear_epochs=1,
                  finetune_epochs_100=1, finetune_epochs_10=1, batch=64, base_lr=1e-3, layer_decay=0.75,
                  mixup=0.8, cutmix=1.0, warmup_epochs=0.0, limit=1000),
}
KEYS = ("pixels_linear", "random_linear", "mae_linear", "random_knn", "mae_knn",
        "scratch_finetune_100", "mae_finetune_100", "scratch_finetune_10", "mae_finetune_10")


def run(command, log_path):
    """Runs a step, its output into a log file; returns the log text. Exits on failure."""
    started = time.time()
    print(f"$ {' '.join(command)}", flush=True)
    with open(log_path, "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    text = Path(log_path).read_text()
    if code:
        sys.exit(f"quality.py: error: step failed (exit {code}), see {log_path}:\n{text[-2000:]}")
    print(f"  done in {time.time() - started:.0f} s", flush=True)
    return text


def test_accuracy(text):
    found = re.findall(r"^test_accuracy=([0-9.]+)$", text, flags=re.M)
    if not found:
        sys.exit("quality.py: error: a finetune.py run printed no test_accuracy= line.")
    return float(found[-1])


def pixels_linear(epochs, batch, base_lr, seed, limit=None):
    """The same probe as finetune.py --mode linear, on the 784 raw pixels."""
    import keras

    from keras_mae.data import load_source

    keras.utils.set_random_seed(seed)
    train, test = load_source("fashion_mnist", "train"), load_source("fashion_mnist", "test")

    def flat(source):
        return source.images.reshape(source.num_examples, -1).astype("float32") / 255.0, \
            keras.utils.to_categorical(source.labels, 10)

    (x, y), (x_test, y_test) = flat(train), flat(test)
    head = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.BatchNormalization(center=False, scale=False, epsilon=1e-6),
        keras.layers.Dense(10, activation="softmax", kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01)),
    ])
    if limit:
        x, y = x[:limit], y[:limit]
    steps = epochs * (len(x) // batch)
    warmup = min(steps // epochs, steps - 1)  # one epoch, as finetune.py's default
    schedule = keras.optimizers.schedules.CosineDecay(0.0, max(steps - warmup, 1), warmup_target=base_lr * batch / 256,
                                                      warmup_steps=warmup)
    head.compile(keras.optimizers.Adam(schedule), keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
                 metrics=["accuracy"])
    head.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    return float(head.evaluate(x_test, y_test, verbose=0)[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="(default: %(default)s)")
    parser.add_argument("--pretrained", default=None,
                        help="Reuse this train.py run folder instead of pre-training (its time is then not counted).")
    parser.add_argument("--preset", default="mae_vit_mini_patch4", help="Pre-training preset (default: %(default)s).")
    parser.add_argument("--output-dir", default="saved_models/quality", help="(default: %(default)s)")
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                        choices=["tensorflow", "jax", "torch"], help="(default: $KERAS_BACKEND or tensorflow)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    limit = ["--limit", str(budget["limit"])] if "limit" in budget else []
    out = (ROOT / args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(ROOT))
    started = time.time()
    python = sys.executable
    seconds = {}

    mae_run = Path(args.pretrained).resolve() if args.pretrained else out / "pretrain"
    if not args.pretrained:
        step = time.time()
        run([python, "train.py", "--preset", args.preset, "--epochs", str(budget["pretrain_epochs"]),
             "--batch-size", str(budget["pretrain_batch"]), "--base-lr", str(budget["pretrain_base_lr"]),
             "--seed", str(args.seed), "--output-dir", str(mae_run), "--overwrite", "--verbose", "2", *limit],
            out / "pretrain.log")
        seconds["pretrain"] = time.time() - step
    results = {}
    step = time.time()
    results["pixels_linear"] = pixels_linear(budget["linear_epochs"], budget["batch"], budget["base_lr"], args.seed,
                                             budget.get("limit"))
    print(f"  pixels linear probe: {results['pixels_linear']:.4f}", flush=True)
    seconds["pixels_linear"] = time.time() - step

    common = [*limit, "--dataset", "fashion_mnist", "--batch-size", str(budget["batch"]), "--base-lr", str(budget["base_lr"]),
              "--seed", str(args.seed), "--overwrite", "--verbose", "2"]
    encoders = {"random": ["--encoder", str(mae_run), "--init", "random"],
                "mae": ["--encoder", str(mae_run), "--init", "pretrained"]}
    for name, encoder in encoders.items():
        step = time.time()
        folder = out / f"{name}_linear"
        text = run([python, "finetune.py", *encoder, "--mode", "linear", "--knn", "--epochs",
                    str(budget["linear_epochs"]), "--output-dir", str(folder), *common], out / f"{name}_linear.log")
        results[f"{name}_linear"] = test_accuracy(text)
        results[f"{name}_knn"] = json.loads((folder / "metrics.json").read_text())["knn_accuracy"]
        seconds[f"{name}_linear"] = time.time() - step
    finetune = ["--mode", "full", "--layer-decay", str(budget["layer_decay"]), "--mixup", str(budget["mixup"]),
                "--cutmix", str(budget["cutmix"]), "--warmup-epochs", str(budget["warmup_epochs"])]
    for percent in (100, 10):
        for name, key in (("random", "scratch"), ("mae", "mae")):
            step = time.time()
            label = f"{key}_finetune_{percent}"
            text = run([python, "finetune.py", *encoders[name], *finetune, "--labels-fraction", str(percent / 100),
                        "--epochs", str(budget[f"finetune_epochs_{percent}"]), "--output-dir", str(out / label),
                        *common], out / f"{label}.log")
            results[label] = test_accuracy(text)
            seconds[label] = time.time() - step
    total = time.time() - started

    def points(a, b):
        return 100 * (results[a] - results[b])

    checks = {
        "mae_finetune_10 - scratch_finetune_10 >= 3 points": points("mae_finetune_10", "scratch_finetune_10"),
        "mae_linear - random_linear >= 2 points": points("mae_linear", "random_linear"),
        "mae_linear - pixels_linear >= 2 points": points("mae_linear", "pixels_linear"),
    }
    summary = {"budget": args.budget, "budget_settings": budget, "backend": args.backend, "pretrained": str(mae_run),
               "results": results, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "total_seconds": round(total, 1), "checks_points": checks}
    (out / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        ("Linear probe, raw pixels", "pixels_linear"), ("Linear probe, random encoder", "random_linear"),
        ("Linear probe, MAE encoder", "mae_linear"), ("k-NN (k=20), random encoder", "random_knn"),
        ("k-NN (k=20), MAE encoder", "mae_knn"), ("Fine-tune from scratch, 100 % labels", "scratch_finetune_100"),
        ("Fine-tune MAE, 100 % labels", "mae_finetune_100"), ("Fine-tune from scratch, 10 % labels", "scratch_finetune_10"),
        ("Fine-tune MAE, 10 % labels", "mae_finetune_10"),
    ]
    table = ["| Fashion-MNIST test accuracy | key | top-1 |", "| --- | --- | --- |"]
    table += [f"| {title} | `{key}` | {100 * results[key]:.2f} % |" for title, key in rows]
    table += ["", f"Budget `{args.budget}` ({', '.join(f'{k}={v}' for k, v in budget.items())}), backend "
              f"{args.backend}, {os.cpu_count()} CPU cores, {total / 60:.1f} min in all.", ""]
    table += [f"- {check}: {value:+.2f} points ({'met' if value >= float(check.split('>= ')[1].split()[0]) else 'missed'})"
              for check, value in checks.items()]
    (out / "quality.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"total_seconds={total:.0f}")
    for key in KEYS:
        print(f"{key}={results[key]:.4f}")


if __name__ == "__main__":
    main()
