"""train.py as a user runs it: flags, errors, a short real run, several devices, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from conftest import BATCH_HOOKS_ON_MAIN_THREAD, probe_batch_end_threads  # noqa: E402

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
QUICK = ["--preset", "mae_vit_debug_patch4", "--batch-size", "32", "--num-reconstructions", "4"]


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        train.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--preset", "--dataset", "--data-dir", "--image-size", "--epochs", "--batch-size",
                 "--mask-ratio", "--norm-pix-loss", "--base-lr", "--output-dir", "--resume",
                 "--strategy", "--seed"):
        assert flag in text
    for action in train.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    other_backend = {"tensorflow": "data_parallel"}.get(keras.backend.backend(), "mirrored")
    return [
        (["--dataset", str(tmp_path / "missing")], "does not exist"),
        (["--dataset", str(empty)], "holds no image files"),
        (["--dataset", str(broken)], "None of the 1 image files"),
        (["--dataset", "synthetic", "--image-size", "30"], "--image-size 30 is not divisible by the patch size 4"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--base-lr", "-0.001"], "--base-lr must be positive"),
        (["--mask-ratio", "1"], "--mask-ratio must be strictly between 0 and 1"),
        (["--preset", "mae_vit_gigantic"], "Unknown preset 'mae_vit_gigantic'. Valid presets:"),
        (["--dataset", "synthetic", "--batch-size", "4096"], "larger than the 512 training images"),
        (["--dataset", "synthetic", "--strategy", other_backend], f"--strategy {other_backend} needs KERAS_BACKEND"),
    ] + ([(["--dataset", "synthetic", "--steps-per-execution", "2"], "--steps-per-execution must be 1 with KERAS_BACKEND=torch")]
         if keras.backend.backend() == "torch" else [])


def test_bad_input_is_one_clear_line_and_exit_status_2(tmp_path, capsys):
    for argv, message in bad_inputs(tmp_path):
        code, err = run_main(capsys, *argv, "--output-dir", str(tmp_path / "run"))
        assert code == 2, argv
        assert err.splitlines()[-1].startswith("train.py: error:") and message in err.splitlines()[-1], (argv, err)
        assert "Traceback" not in err


def test_warnings_of_the_project_read_as_one_line_and_others_keep_their_format(tmp_path, monkeypatch):
    from PIL import Image

    from keras_mae.data import load_image_folder
    from keras_mae.runs import brief_warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # put back afterwards
    brief_warnings("train.py")
    brief_warnings("train.py")  # main() may run twice in one process: still one prefix
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a JPEG")
    with warnings.catch_warnings(record=True) as caught:  # pytest records warnings: format them as Python would
        warnings.simplefilter("always")
        load_image_folder(tmp_path)
        warnings.warn_explicit("a library's own warning", UserWarning, "/elsewhere/library.py", 7)
    assert [warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught] == [
        f"train.py: warning: Skipping 1 of 2 image files under {tmp_path} that cannot be decoded.\n",
        "/elsewhere/library.py:7: UserWarning: a library's own warning\n",
    ]


def test_existing_run_folder_is_not_overwritten_by_accident(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "mae.keras").write_text("precious")
    code, err = run_main(capsys, "--dataset", "synthetic", "--output-dir", str(run_dir))
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert (run_dir / "mae.keras").read_text() == "precious"


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_two_epochs_on_real_fashion_mnist_write_the_whole_run_folder(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    probe = probe_batch_end_threads(monkeypatch)
    train.main([*QUICK, "--limit", "256", "--epochs", "2", "--output-dir", str(run_dir), "--export", "--knn-every", "1"])
    out = capsys.readouterr().out
    # With every callback of a run, k-NN monitor included, fit does not wait for each step's loss.
    assert probe.on_main_thread == {BATCH_HOOKS_ON_MAIN_THREAD}
    assert str(DEBIAN_FASHION_MNIST) in out and "Final loss" in out
    for name in ("config.json", "mae.keras", "encoder.keras", "history.csv", "loss_curve.png",
                 "state.json", "checkpoint_002.keras", "reconstructions/epoch_001.png",
                 "reconstructions/epoch_002.png", "serving/encoder/1/saved_model.pb",
                 "serving/reconstructor/1/saved_model.pb"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["flags"]["epochs"] == 2 and config["model"]["num_channels"] == 1
    assert config["model"]["image_size"] == 28 and "train.py" in config["command"]
    rows = (run_dir / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and "knn_accuracy" in rows[0].split(",")
    knn = [float(row.split(",")[rows[0].split(",").index("knn_accuracy")]) for row in rows[1:]]
    assert all(0.1 < value <= 1 for value in knn)  # above chance on 10 classes
    mae = keras.saving.load_model(run_dir / "mae.keras")
    encoder = keras.saving.load_model(run_dir / "encoder.keras")
    images = np.zeros((2, 28, 28, 1), dtype=np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(encoder(images)),
                               keras.ops.convert_to_numpy(mae.encoder(images)), atol=1e-6)


def test_a_diverging_epoch_keeps_the_last_checkpoint_with_a_finite_loss(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [*QUICK, "--dataset", "synthetic", "--limit", "128", "--warmup-epochs", "0", "--verbose", "0",
            "--output-dir", str(run_dir)]
    code, err = run_main(capsys, *argv, "--epochs", "1", "--base-lr", "1e30")
    assert code == 1
    assert err.splitlines()[-1] == ("train.py: error: the loss became NaN or infinite in epoch 1. No epoch ended "
                                    "with a finite loss, so none was kept: start again with a lower --base-lr "
                                    "(and --overwrite).")
    assert not (run_dir / "state.json").exists() and not list(run_dir.glob("checkpoint_*"))

    train.main([*argv, "--epochs", "1", "--overwrite"])
    finite = (run_dir / "checkpoint_001.keras").read_bytes()
    code, err = run_main(capsys, *argv, "--epochs", "2", "--resume", "--base-lr", "1e30")
    assert code == 1
    assert err.splitlines()[-1] == (f"train.py: error: the loss became NaN or infinite in epoch 2. {run_dir} keeps "
                                    "the checkpoint of epoch 1: continue from it with --resume and a lower --base-lr.")
    assert json.loads((run_dir / "state.json").read_text())["epoch"] == 1
    assert [p.name for p in run_dir.glob("checkpoint_*.keras")] == ["checkpoint_001.keras"]
    assert (run_dir / "checkpoint_001.keras").read_bytes() == finite


def train_process(*argv, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **(env_extra or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="Keras fit has no multi-device path for torch")
def test_two_devices_on_this_cpu(tmp_path):
    strategy = "mirrored" if keras.backend.backend() == "tensorflow" else "data_parallel"
    process = train_process(*QUICK, "--dataset", "synthetic", "--limit", "128", "--epochs", "1",
                            "--strategy", strategy, "--cpu-devices", "2", "--output-dir", str(tmp_path / "run"))
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert "over 2 devices" in output
    assert (tmp_path / "run" / "mae.keras").is_file()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute's mirrored variables")
def test_jit_compile_true_with_several_tensorflow_replicas_is_a_clear_error(tmp_path):
    process = train_process(*QUICK, "--dataset", "synthetic", "--strategy", "mirrored", "--cpu-devices", "2",
                            "--jit-compile", "true", "--output-dir", str(tmp_path / "run"))
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 2
    assert output.splitlines()[-1].startswith("train.py: error: --jit-compile true does not work with several")
    assert not (tmp_path / "run").exists()


def test_killed_mid_run_then_resumed_ends_with_every_epoch_once(tmp_path):
    run_dir = tmp_path / "run"
    argv = [*QUICK, "--dataset", "synthetic", "--epochs", "5", "--output-dir", str(run_dir)]
    process = train_process(*argv)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        state = run_dir / "state.json"
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.3)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.communicate()
    done_before = json.loads((run_dir / "state.json").read_text())["epoch"]
    assert 1 <= done_before < 5
    assert not (run_dir / "mae.keras").exists()

    resumed = train_process(*argv, "--resume")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert f"Resuming after epoch {done_before}" in output
    rows = (run_dir / "history.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [0, 1, 2, 3, 4]
    assert json.loads((run_dir / "state.json").read_text())["epoch"] == 5
    assert [p.name for p in run_dir.glob("checkpoint_*.keras")] == ["checkpoint_005.keras"]
    assert not list(run_dir.glob(".*partial*"))
    keras.saving.load_model(run_dir / "mae.keras")
