"""What train.py and finetune.py share about their run folders: creating one safely,
trimming the history to a resumed epoch, exporting from it in a child process; and how
they show this project's warnings."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def brief_warnings(prog):
    """Shows this project's own warnings (a skipped file, a fallback taken) as one
    `prog: warning: ...` line, like its errors, rather than with Python's file:line
    header and source line. Other libraries' warnings, and recorded ones, are unchanged."""
    default = getattr(warnings.formatwarning, "__wrapped__", warnings.formatwarning)

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(PROJECT):
            return f"{prog}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    format_warning.__wrapped__ = default
    warnings.formatwarning = format_warning


def verbosity(choice):
    """A `--verbose` value for Keras: the user's, else a progress bar on a terminal and
    one line per epoch elsewhere (a redirected bar is a wall of carriage returns)."""
    return choice if choice is not None else (1 if sys.stdout.isatty() else 2)


def jit_compile_setting(choice):
    """A `--jit-compile` choice ('auto', 'true', 'false') as `Model.compile(jit_compile=)` takes it."""
    return {"auto": "auto", "true": True, "false": False}[choice]


def counted(number, noun):
    """'1 epoch', '4 epochs': a count with its noun in the right number."""
    return f"{number} {noun}{'s' * (number != 1)}"


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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "keras_mae.export", str(model_path), "--kind", kind, "--output", str(output),
               "--overwrite"]
    return subprocess.call(command, env=env) == 0
