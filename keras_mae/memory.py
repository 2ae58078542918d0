"""Transparent huge pages for JAX on a CPU: a process-level setting made at start-up.

XLA's CPU runtime allocates the whole scratch space of a compiled step (811 MB for
the keras.io-sized model at batch 256) with `malloc` when the step starts and frees
it when the step ends. glibc maps such a block fresh from the kernel every time, so
each training step first page-faults all of it in 4 KiB pages (about 200,000 faults
a step) and then works through a TLB that covers little of it. With glibc asked to
back large blocks with transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`),
the same steps ran 1.3x (K) to 1.6x (T) faster on JAX; TensorFlow and PyTorch keep
their memory in their own allocators and were not helped (HuggingFace ran slower),
so only JAX gets it. glibc reads its tunables once, when a program starts, hence a
restart rather than a setting.
"""

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
    replaced. train.py, finetune.py and benchmarks/throughput.py do. To opt out, set
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


__all__ = ["huge_pages_would_help", "restart_with_huge_pages", "transparent_huge_page_mode"]
