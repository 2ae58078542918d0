"""tune_allocator: a JAX program restarts once, same arguments, with glibc asked for
transparent huge pages, and its large allocations get them; a torch program keeps freed
memory, so a large block allocated again is not page-faulted in again; a TensorFlow
program runs on untouched."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from keras_mae.memory import transparent_huge_page_mode

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20

CHILD = f"""
import ctypes, os, resource, sys
sys.path.insert(0, {str(REPO)!r})
print("started", flush=True)
from keras_mae.memory import tune_allocator
tune_allocator()
print("arguments", sys.argv[1:])
print("tunables", os.environ.get("GLIBC_TUNABLES", ""))

def huge_kib():
    with open("/proc/self/smaps_rollup") as stream:
        return sum(int(line.split()[1]) for line in stream if line.startswith("AnonHugePages:"))

before = huge_kib()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc({64 * MiB})  # how XLA gets a step's scratch space
ctypes.memset(block, 1, {64 * MiB})
print("huge_kib", huge_kib() - before)
libc.free(ctypes.c_void_p(block))

faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc({64 * MiB})  # the same size again, as at the next training step
ctypes.memset(block, 1, {64 * MiB})
print("reuse_faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""

needs_madvise_mode = pytest.mark.skipif(
    not sys.platform.startswith("linux") or transparent_huge_page_mode() != "madvise",
    reason=f"the kernel's transparent huge page mode is {transparent_huge_page_mode()!r}, not 'madvise'",
)


def run_child(backend, tunables=None, from_stdin=False):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    source = ["-"] if from_stdin else ["-c", CHILD]
    run = subprocess.run([sys.executable, *source, "--flag", "a value"], env=env, capture_output=True,
                         text=True, timeout=300, input=CHILD if from_stdin else None)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    fields = dict(line.split(" ", 1) for line in lines if line != "started")
    return lines.count("started"), fields


@needs_madvise_mode
def test_jax_program_restarts_once_with_huge_pages():
    starts, fields = run_child("jax")
    assert starts == 2
    assert fields["arguments"] == "['--flag', 'a value']"
    assert fields["tunables"] == "glibc.malloc.hugetlb=1"
    assert int(fields["huge_kib"]) >= 2048  # at least one 2 MiB page behind the 64 MiB block


@needs_madvise_mode
def test_user_tunables_are_kept_and_their_choice_wins():
    starts, fields = run_child("jax", tunables="glibc.malloc.check=0")
    assert starts == 2
    assert fields["tunables"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"

    starts, fields = run_child("jax", tunables="glibc.malloc.hugetlb=0")
    assert starts == 1
    assert fields["tunables"] == "glibc.malloc.hugetlb=0"
    assert int(fields["huge_kib"]) == 0  # the control: without the tunable, no huge pages


@needs_madvise_mode
def test_program_read_from_stdin_is_not_restarted():
    starts, fields = run_child("jax", from_stdin=True)  # a restart would find stdin empty
    assert starts == 1
    assert fields["tunables"] == ""
    assert fields["arguments"] == "['--flag', 'a value']"


@pytest.mark.parametrize("backend", ["tensorflow", "torch"])
def test_other_backends_are_not_restarted(backend):
    starts, fields = run_child(backend)
    assert starts == 1
    assert fields["tunables"] == ""
    assert fields["arguments"] == "['--flag', 'a value']"


glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


@glibc
def test_torch_program_reuses_freed_memory():
    starts, fields = run_child("torch")
    assert starts == 1
    assert int(fields["reuse_faults"]) < 1024  # 64 MiB fresh from the kernel would be 16,384 pages


@glibc
@pytest.mark.skipif(transparent_huge_page_mode() == "always", reason="huge pages everywhere: few faults anyway")
@pytest.mark.parametrize("backend, tunables", [("tensorflow", None), ("torch", "glibc.malloc.mmap_max=65536")])
def test_tensorflow_and_opted_out_torch_keep_glibc_defaults(backend, tunables):
    starts, fields = run_child(backend, tunables=tunables)
    assert int(fields["reuse_faults"]) >= 8192  # the control: glibc maps a freed 64 MiB block anew
