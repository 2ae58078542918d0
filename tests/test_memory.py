"""tune_allocator: where the system has jemalloc, a program of any backend restarts once,
same arguments, on it, and a large block freed and allocated again is not page-faulted
in again. Without it (`KERAS_MAE_JEMALLOC=0` here), a JAX program restarts with glibc
asked for transparent huge pages, and its large allocations get them, a torch program
keeps freed memory in glibc's heap, and a TensorFlow program runs on untouched."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from keras_mae.memory import JEMALLOC_CONF, jemalloc_environment, transparent_huge_page_mode

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20

CHILD = f"""
import ctypes, os, resource, sys, threading
sys.path.insert(0, {str(REPO)!r})
print("started", flush=True)
from keras_mae.memory import malloc_in_use, tune_allocator
tune_allocator()
print("malloc", malloc_in_use())
print("arguments", sys.argv[1:])
print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
print("malloc_conf", os.environ.get("MALLOC_CONF", ""))
with open("/proc/self/maps") as stream:
    print("jemalloc_mapped", "libjemalloc" in stream.read())

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
libc.free(ctypes.c_void_p(block))

def allocate_on_another_thread():  # as TensorFlow's op threads and XLA's step thread do
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc({64 * MiB})
    ctypes.memset(block, 1, {64 * MiB})
    print("other_thread_faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

thread = threading.Thread(target=allocate_on_another_thread)
thread.start()
thread.join()
"""

needs_madvise_mode = pytest.mark.skipif(
    not sys.platform.startswith("linux") or transparent_huge_page_mode() != "madvise",
    reason=f"the kernel's transparent huge page mode is {transparent_huge_page_mode()!r}, not 'madvise'",
)


needs_jemalloc = pytest.mark.skipif(
    not jemalloc_environment(environ={}), reason="no jemalloc on this system (Debian: apt-get install libjemalloc2)"
)


def run_child(backend, tunables=None, from_stdin=False, jemalloc=False, malloc_conf=None):
    """Runs CHILD in a fresh interpreter: the glibc path unless `jemalloc`."""
    chosen = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "KERAS_MAE_JEMALLOC")
    env = {k: v for k, v in os.environ.items() if k not in chosen}
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if not jemalloc:
        env["KERAS_MAE_JEMALLOC"] = "0"
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    if malloc_conf is not None:
        env["MALLOC_CONF"] = malloc_conf
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
    assert fields["malloc"] == "glibc (glibc.malloc.hugetlb=1)"
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
def test_other_backends_are_not_restarted_without_jemalloc(backend):
    starts, fields = run_child(backend)
    assert starts == 1
    assert fields["tunables"] == ""
    assert fields["jemalloc_mapped"] == "False"
    assert fields["malloc"] == ("glibc (freed memory kept)" if backend == "torch" else "glibc")
    assert fields["arguments"] == "['--flag', 'a value']"


@needs_jemalloc
def test_ipython_session_is_not_restarted_but_told_how_to_get_jemalloc():
    pytest.importorskip("IPython")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "KERAS_MAE_JEMALLOC")}
    env.update(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    source = "import warnings; warnings.simplefilter('always')\n" + CHILD
    run = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", "-c", source],
                         env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines.count("started") == 1  # a restart would throw the session away
    assert "malloc glibc" in lines
    assert "jemalloc_mapped False" in lines
    assert "not restarting this IPython / Jupyter session on jemalloc" in run.stderr
    assert "LD_PRELOAD=" in run.stderr


@needs_jemalloc
@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_every_backend_restarts_once_on_jemalloc_that_keeps_freed_memory(backend):
    starts, fields = run_child(backend, jemalloc=True)
    assert starts == 2
    assert fields["arguments"] == "['--flag', 'a value']"
    assert fields["jemalloc_mapped"] == "True"
    assert fields["malloc"].startswith("libjemalloc.so")
    assert fields["malloc_conf"] == JEMALLOC_CONF
    assert fields["tunables"] == ""  # glibc's settings are moot under jemalloc
    # 64 MiB fresh from the kernel would be 16,384 faults, or 32 in huge pages.
    assert int(fields["reuse_faults"]) < 16, fields["reuse_faults"]
    # One arena: what one thread freed, another reuses (not one kept peak per arena).
    assert int(fields["other_thread_faults"]) < 64, fields["other_thread_faults"]


@needs_jemalloc
def test_users_malloc_conf_wins():
    starts, fields = run_child("jax", jemalloc=True, malloc_conf="narenas:2")
    assert starts == 2
    assert fields["jemalloc_mapped"] == "True"
    assert fields["malloc_conf"] == "narenas:2"
    # The control: jemalloc's defaults return a large freed block (16,384 faults again, 32 in huge pages).
    assert int(fields["reuse_faults"]) >= 16, fields["reuse_faults"]


def test_jemalloc_environment_leaves_other_choices_alone():
    library = "libjemalloc.so.2"
    assert jemalloc_environment({"KERAS_MAE_JEMALLOC": "0"}, library) == {}
    assert jemalloc_environment({"LD_PRELOAD": "/opt/libtcmalloc_minimal.so.4"}, library) == {}
    expected = {} if not sys.platform.startswith("linux") else {
        "LD_PRELOAD": f"/opt/libfix.so:{library}", "MALLOC_CONF": JEMALLOC_CONF}
    assert jemalloc_environment({"LD_PRELOAD": "/opt/libfix.so"}, library) == expected


glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


@glibc
def test_torch_program_reuses_freed_memory():
    starts, fields = run_child("torch")
    assert starts == 1
    assert fields["malloc"] == "glibc (freed memory kept)"
    assert int(fields["reuse_faults"]) < 1024  # 64 MiB fresh from the kernel would be 16,384 pages


@glibc
@pytest.mark.skipif(transparent_huge_page_mode() == "always", reason="huge pages everywhere: few faults anyway")
@pytest.mark.parametrize("backend, tunables", [("tensorflow", None), ("torch", "glibc.malloc.mmap_max=65536")])
def test_tensorflow_and_opted_out_torch_keep_glibc_defaults(backend, tunables):
    starts, fields = run_child(backend, tunables=tunables)
    assert int(fields["reuse_faults"]) >= 8192  # the control: glibc maps a freed 64 MiB block anew


@needs_jemalloc
@pytest.mark.parametrize("script, flags", [("train.py", []), ("finetune.py", ["--init", "random"])])
def test_scripts_restart_on_jemalloc_before_they_import_keras(tmp_path, script, flags):
    # Keras and its backend take seconds to import; a restart after importing them would
    # import them twice. `-X importtime` lists every import of both starts of the program.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "KERAS_MAE_JEMALLOC")}
    run = subprocess.run([sys.executable, "-X", "importtime", str(REPO / script), *flags,
                          "--dataset", str(tmp_path / "missing")],  # an error right after the start
                         env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"{script}: error: Dataset folder" in run.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
    assert imported.count("site") == 2  # Python started twice: restarted once, on jemalloc
    assert imported.count("keras") == 1
