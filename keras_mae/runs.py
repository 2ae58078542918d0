"""What train.py and finetune.py share about their run folders: creating one safely,
trimming the history to a resumed epoch, exporting from it in a child process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def dataset_slug(spec):
    """A `--dataset` value as a folder-name part: a folder's own name, `tfds:x` -> `tfds_x`."""
    return Path(spec).name if os.path.exists(spec) else spec.replace(":", "_")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked, with the reason."""


def prepare_run_dir(run_dir, resume=False, overwrite=False, chief=True):
    """The run folder, created; an existing run is kept unless `overwrite`.

    Only the chief (process 0 of a multi-process run) creates or clears it; the other
    processes check the same conditions, so that every process stops on the same error.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--output-dir {run_dir} exists and is not a folder.")
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: choose one.")
    started = run_dir.is_dir() and any(run_dir.iterdir())
    if started and not (resume or overwrite):
        raise RunFolderError(f"run folder {run_dir} already holds a run: pass --resume to continue it, "
                             "--overwrite to start again, or another --output-dir.")
    if chief:
        if started and overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def trim_history(history_path, epochs):
    """Keeps the header and the first `epochs` rows of a CSVLogger file: rows of epochs
    after the checkpoint (a run killed between the two writes) are redone on resume."""
    history_path = Path(history_path)
    if epochs and history_path.is_file():
        lines = history_path.read_text().splitlines(keepends=True)
        history_path.write_text("".join(lines[: 1 + epochs]))


def export_saved_model(model_path, kind, output):
    """`python -m keras_mae.export` in a child process (it needs the TensorFlow
    backend, whatever this process runs); True when it succeeded."""
    project = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "keras_mae.export", str(model_path), "--kind", kind, "--output", str(output),
               "--overwrite"]
    return subprocess.call(command, env=env) == 0
