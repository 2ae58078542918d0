"""Several processes on this machine (loopback), as on several hosts: --strategy multi_process.

Each run is real: separate Python processes that join JAX's distributed runtime over
127.0.0.1, with gloo CPU collectives, bounded in time.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_mae.distribute import StrategyError, resolve_cluster

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--preset", "mae_vit_debug_patch4", "--dataset", "synthetic", "--batch-size", "32",
         "--num-reconstructions", "4", "--verbose", "2"]
needs_jax = pytest.mark.skipif(keras.backend.backend() != "jax",
                               reason="multi-process runs are JAX's; they run once, in the jax pass")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(process_id, port, *argv, count=2, scratch=None):
    # `scratch` becomes the process's TMPDIR: a killed process cannot delete its folder there.
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
           **({"TMPDIR": str(scratch)} if scratch else {})}
    command = [sys.executable, "train.py", *QUICK, "--strategy", "multi_process", "--coordinator-address",
               f"127.0.0.1:{port}", "--num-processes", str(count), "--process-id", str(process_id), *map(str, argv)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_all(*argv, scratch=None, timeout=420):
    port = free_port()
    processes = [start(i, port, *argv, scratch=scratch) for i in range(2)]
    outputs = [process.communicate(timeout=timeout) for process in processes]
    return [process.returncode for process in processes], outputs


def digests(outputs):
    return [re.search(r"final weights sha256 ([0-9a-f]+)", out).group(1) for out, _ in outputs]


def weights_digest(path):
    import hashlib

    weights = keras.saving.load_model(path).get_weights()
    return hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest()


@needs_jax
def test_two_processes_train_resume_and_end_identical(tmp_path):
    run_dir, scratch = tmp_path / "run", tmp_path / "tmp"
    scratch.mkdir()
    codes, outputs = run_all("--epochs", "1", "--output-dir", run_dir, "--distributed-timeout", "120",
                             scratch=scratch)
    assert codes == [0, 0], [err[-2000:] for _, err in outputs]
    assert "in 2 processes" in outputs[0][0]
    first = digests(outputs)
    assert first[0] == first[1]
    # Restarted with --resume, both continue from the same completed epoch.
    codes, outputs = run_all("--epochs", "2", "--resume", "--output-dir", run_dir, "--distributed-timeout", "120",
                             scratch=scratch)
    assert codes == [0, 0], [err[-2000:] for _, err in outputs]
    assert all("Resuming after epoch 1" in out for out, _ in outputs)
    second = digests(outputs)
    assert second[0] == second[1] != first[0]
    assert weights_digest(run_dir / "mae.keras") == second[0]
    # Process 0 wrote the whole folder once; process 1 left nothing behind, there or in its temp folder.
    assert not list(scratch.glob("keras_mae_process*"))
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file() and "logs" not in p.parts}
    assert names == {"config.json", "mae.keras", "encoder.keras", "history.csv", "loss_curve.png", "state.json",
                     "checkpoint_002.keras", "reconstructions/epoch_001.png", "reconstructions/epoch_002.png"}
    assert len((run_dir / "history.csv").read_text().splitlines()) == 3
    assert "process 0 wrote" in outputs[1][0]


@needs_jax
def test_a_diverging_loss_stops_every_process_after_the_same_step(tmp_path):
    # Each step is collective: a process that stopped a step before the other would leave
    # it waiting for the distributed timeout, then failing as if a peer had died.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    codes, outputs = run_all("--epochs", "2", "--base-lr", "1e30", "--warmup-epochs", "0", "--output-dir",
                             tmp_path / "run", "--distributed-timeout", "60", scratch=scratch)
    assert codes == [1, 1], [err[-2000:] for _, err in outputs]
    for _, err in outputs:
        assert "error: the loss became NaN or infinite in epoch 1. No epoch ended with a finite loss" in err
    assert not (tmp_path / "run" / "state.json").exists()
    assert not list(scratch.glob("keras_mae_process*"))


@needs_jax
def test_a_killed_process_stops_the_other_within_the_timeout(tmp_path):
    port = free_port()
    timeout = 10
    argv = ["--epochs", "200", "--output-dir", tmp_path / "run", "--distributed-timeout", timeout]
    survivor, victim = start(0, port, *argv, scratch=tmp_path), start(1, port, *argv, scratch=tmp_path)
    deadline = time.time() + 300
    log = tmp_path / "victim.out"
    # Wait until training runs (its first epoch line), then kill process 1.
    lines = []
    for line in victim.stdout:
        lines.append(line)
        if line.startswith("Epoch 2/") or time.time() > deadline:
            break
    assert any(line.startswith("Epoch 2/") for line in lines), "".join(lines)[-2000:]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.time()
    _, err = survivor.communicate(timeout=timeout + 120)
    log.write_text(err)
    assert survivor.returncode != 0
    assert time.time() - killed_at < timeout + 90
    assert ("another process of this run failed or stopped answering" in err
            or "another task died" in err), err[-2000:]


@needs_jax
def test_unreachable_coordinator_is_one_line_within_the_limit(tmp_path):
    started = time.time()
    process = start(1, free_port(), "--output-dir", tmp_path / "run", "--distributed-timeout", "5", scratch=tmp_path)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: process 1 of 2: not every process joined the coordinator at 127.0.0.1:")
    assert time.time() - started < 90


def test_process_id_out_of_range_and_missing_settings():
    with pytest.raises(StrategyError, match=r"process id must be in 0..1"):
        resolve_cluster("127.0.0.1:1234", 2, 2, environ={})
    with pytest.raises(StrategyError, match="coordinator"):
        resolve_cluster(None, 2, 0, environ={})
    with pytest.raises(StrategyError, match="HOST:PORT"):
        resolve_cluster("localhost", 2, 0, environ={})
    with pytest.raises(StrategyError, match="number of processes"):
        resolve_cluster("h:1", None, None, environ={})


def test_cluster_from_scheduler_environment():
    slurm = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "node1:1234,node2:1234", "SLURM_NTASKS": "4", "SLURM_PROCID": "3"}
    cluster = resolve_cluster(environ=slurm)
    assert (cluster.coordinator, cluster.num_processes, cluster.process_id) == ("node1:1234", 4, 3)
    kubernetes = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "mae-0.mae:1234", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                  "JOB_COMPLETION_INDEX": "1"}
    assert resolve_cluster(environ=kubernetes).process_id == 1
    # Flags win over the environment.
    assert resolve_cluster("h:9", 2, 0, environ=slurm) == type(cluster)("h:9", 2, 0)


@pytest.mark.parametrize("strategy, backend, message", [
    ("multi_process", "tensorflow", "--strategy multi_process needs KERAS_BACKEND=jax"),
    ("multi_worker", "tensorflow", "keras-team/keras issue 20585"),
    ("multi_worker", "jax", "keras-team/keras issue 20585"),
])
def test_strategy_that_cannot_run_is_refused(tmp_path, strategy, backend, message):
    extra = ["--coordinator-address", "127.0.0.1:1", "--num-processes", "1", "--process-id", "0"] \
        if strategy == "multi_process" else []
    run = subprocess.run([sys.executable, "train.py", *QUICK, "--strategy", strategy, *extra, "--output-dir",
                          str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and message in last
    assert not (tmp_path / "run").exists()
