"""glibc malloc settings that make training steps faster on a CPU, made at start-up.

`tune_allocator()`, which train.py, finetune.py and the benchmarks call first thing,
applies the one each backend gains from; TensorFlow keeps its memory in its own pools
(no page faults in a step) and runs as it is.

JAX: XLA's CPU runtime allocates the whole scratch space of a compiled step (811 MB for
the keras.io-sized model at batch 256) with `malloc` when the step starts and frees it
when the step ends. glibc maps such a block fresh from the kernel every time, so each
training step first page-faults all of it in 4 KiB pages (about 200,000 faults a step)
and then works through a TLB that covers little of it. With glibc asked to back large
blocks with transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), the same
steps ran 1.3x (K) to 1.6x (T) faster. glibc reads its tunables once, when a program
starts, hence a restart rather than a setting (`restart_with_huge_pages`).
`keep_freed_memory` cannot help here: XLA allocates that block on its own thread, from
one of glibc's per-thread arenas, and those map any block larger than their 64 MiB heaps
whatever `M_MMAP_MAX` says. A single arena (`glibc.malloc.arena_max=1`) does keep it,
but measured no faster on the Intel Xeon (README, Speed).

torch: eager PyTorch allocates every activation and gradient with `malloc` and frees it
when its last reference goes. glibc serves blocks of 32 MiB and more (a decoder MLP's
`(256 * 65, 512)` float32 activation at configuration T is 34 MB) with a fresh `mmap`
each time, so every such tensor is page-faulted in again at every step (about 40,000
faults and 130 ms of kernel CPU time per step at T). Huge pages did not help it (nor
HuggingFace); keeping freed memory in the heap does (`keep_freed_memory`), and
`mallopt` takes effect at once, without a restart.
"""

import ctypes
import ctypes.util
import os
import platform
import sys

import keras

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_page_mode():
    """The kernel's transparent huge page mode: 'always', 'madvise', 'never', or None if unknown."""
    try:
        with open(THP_MODE_FILE) as stream:
            text = stream.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_has_hugetlb_tunable():
    """glibc 2.35 introduced `glibc.malloc.hugetlb`; older versions ignore it."""
    library, version = platform.libc_ver()
    try:
        return library == "glibc" and tuple(int(part) for part in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def huge_pages_would_help():
    """Whether `restart_with_huge_pages` would restart this process: a JAX program on
    Linux with glibc 2.35 or later, a kernel that gives huge pages only to memory that asks
    for them ('madvise'; under 'always' everything has them already), no
    `glibc.malloc.hugetlb` choice of the user's own in `GLIBC_TUNABLES`, and a program that
    can be started again (a file, a module or `-c`; not stdin or an interactive session)."""
    return (
        keras.config.backend() == "jax"
        and sys.platform.startswith("linux")
        and glibc_has_hugetlb_tunable()
        and transparent_huge_page_mode() == "madvise"
        and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", "")
        and sys.argv[0] not in ("", "-")
        and not sys.flags.interactive
    )


def restart_with_huge_pages():
    """Re-executes this Python program, same arguments, with glibc's malloc asking for
    transparent huge pages, when `huge_pages_would_help()`; otherwise returns.

    Call it first thing in a script (before any work worth keeping): the process image is
    replaced. train.py, finetune.py and benchmarks/throughput.py do, through
    `tune_allocator`. To opt out, set
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`.
    """
    if not huge_pages_would_help():
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # no restart possible (an unusual interpreter): run on, just slower
        if tunables:
            os.environ["GLIBC_TUNABLES"] = tunables
        else:
            del os.environ["GLIBC_TUNABLES"]


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


def keep_freed_memory():
    """Makes glibc's malloc serve large blocks from the heap and keep what is freed
    (`mallopt`: no `mmap`, trim only above 2 GiB) so that a training loop reuses its
    memory instead of page-faulting it in again at every step. The process's resident
    memory then stays at its peak rather than falling back between steps.

    Takes effect at once for later allocations. Returns whether it was applied (glibc only).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def tune_allocator():
    """The allocator setting that speeds up this backend's training steps on a CPU:
    torch keeps freed memory (`keep_freed_memory`); JAX restarts with huge pages
    (`restart_with_huge_pages`, which replaces the process: call this first thing);
    TensorFlow runs as it is.

    A choice of your own in `GLIBC_TUNABLES` wins: `glibc.malloc.mmap_max=65536` (glibc's
    default) keeps torch on plain malloc, `glibc.malloc.hugetlb=0` JAX.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if keras.config.backend() == "torch" and not any(
        name in tunables for name in ("glibc.malloc.mmap_max", "glibc.malloc.trim_threshold")
    ):
        keep_freed_memory()
    restart_with_huge_pages()


__all__ = [
    "huge_pages_would_help",
    "keep_freed_memory",
    "restart_with_huge_pages",
    "transparent_huge_page_mode",
    "tune_allocator",
]
