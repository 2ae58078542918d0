"""Allocator settings that make training steps faster on a CPU, made at start-up.

`tune_allocator()`, which train.py, finetune.py and the benchmarks call first thing,
applies the one each backend gains from.

All three backends free large blocks at every step and allocate them again at the next,
and glibc's malloc hands blocks that large back to the kernel, so each step page-faults
them in anew:

- JAX: XLA's CPU runtime allocates the whole scratch space of a compiled step (811 MB
  for the keras.io-sized model at batch 256) with `malloc` when the step starts and
  frees it when the step ends, on its own thread, from one of glibc's per-thread
  arenas, which map any block larger than their 64 MiB heaps whatever `M_MMAP_MAX`
  says. On a 2-core virtual machine the kernel spent 0.2-0.7 s a step clearing pages at
  K, and 4.4-4.6 s at T.
- torch: eager PyTorch frees every activation when its last reference goes; glibc
  serves blocks of 32 MiB and more (a decoder MLP's `(256 * 65, 512)` float32 activation
  at configuration T is 34 MB) with a fresh `mmap` each time (about 40,000 faults and
  130 ms of kernel CPU time per step at T).
- TensorFlow: its CPU allocator takes each op's output from malloc on the thread that
  runs the op. How much that costs depends on the machine: on an AMD EPYC Zen 3 VM,
  140,000 faults and 0.36-0.47 s of kernel time a step at K (365,000 and 0.9-1.0 s at
  T), over a quarter of its CPU time; on a Zen 4 one, 4,000-23,000 faults and 0.02-0.09 s.

The cure is an allocator that keeps what is freed. Where the system has jemalloc
(Debian / Ubuntu: `apt-get install libjemalloc2`), programs restart once on it, with
freed memory never returned and one arena for every thread (`MALLOC_CONF`,
`JEMALLOC_CONF`): the faults and the kernel time are gone (benchmarks/README.md has the
figures). An IPython shell or Jupyter kernel is not restarted (the user's session would
be lost); it is told how to start on jemalloc instead. Without jemalloc, glibc does what
it can: torch keeps freed memory through `mallopt` (`keep_freed_memory`, at once), JAX
restarts with glibc's huge pages (`restart_with_huge_pages`: fewer, larger faults; glibc
reads its tunables only when a program starts), and TensorFlow runs as it is.

The resident memory of a process then stays at its peak rather than falling between
steps. To opt out of jemalloc, set `KERAS_MAE_JEMALLOC=0`; a malloc library of your own
in `LD_PRELOAD`, and your own `MALLOC_CONF` or `GLIBC_TUNABLES` choices, win.
"""

import ctypes
import ctypes.util
import os
import platform
import sys
import warnings

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# jemalloc keeps every freed page: no decay, no separate arena that returns large blocks
# at once, and one arena for all threads, so that what one thread frees another reuses
# (with its default 4 arenas a core, TensorFlow's op threads each grew their own kept
# peak: 4.3 against 3.0 GiB at configuration T, and page faults in the timed steps).
# Not `thp:always`: when a step does need fresh memory (now and then XLA holds two
# steps' scratch at once), huge pages were far slower to fault in on the 2-core VM
# (0.7-1.2 s of kernel time a step against 0.04 s in 4 KiB pages).
JEMALLOC_CONF = "narenas:1,oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
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


def restartable():
    """Whether this Python program can be started again with the same arguments: a file,
    a module or `-c`; not stdin, an interactive session, or an IPython shell or Jupyter
    kernel (a restart would throw away the user's session)."""
    return sys.argv[0] not in ("", "-") and not sys.flags.interactive and not in_ipython()


def in_ipython():
    """Whether this code runs inside IPython: a terminal shell or a Jupyter kernel."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


def preloaded_malloc(environ=None):
    """Whether `LD_PRELOAD` already names a malloc library (jemalloc, tcmalloc, mimalloc...)."""
    environ = os.environ if environ is None else environ
    return "malloc" in environ.get("LD_PRELOAD", "")


def jemalloc_environment(environ=None, library=None):
    """The variables that start a program on jemalloc keeping freed memory
    (`LD_PRELOAD`, `MALLOC_CONF`), or `{}` where that is not wanted or not possible: not
    Linux, no jemalloc on the system, `KERAS_MAE_JEMALLOC=0`, or a malloc library
    already preloaded. A `MALLOC_CONF` of the user's own is kept.

    `library` defaults to the system's (`ctypes.util.find_library("jemalloc")`).
    """
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or environ.get("KERAS_MAE_JEMALLOC") == "0" or preloaded_malloc(environ):
        return {}
    library = library or ctypes.util.find_library("jemalloc")
    if not library:
        return {}
    preload = environ.get("LD_PRELOAD", "").strip()
    return {"LD_PRELOAD": f"{preload}:{library}" if preload else library,
            "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF)}


def huge_pages_would_help():
    """Whether `restart_with_huge_pages` would restart this process: a JAX program on
    Linux with glibc's malloc (no malloc library preloaded), glibc 2.35 or later, a kernel
    that gives huge pages only to memory that asks for them ('madvise'; under 'always'
    they are there already), no `glibc.malloc.hugetlb` choice of the user's own in
    `GLIBC_TUNABLES`, and a program that can be started again (`restartable`)."""
    import keras

    return (
        keras.config.backend() == "jax"
        and sys.platform.startswith("linux")
        and not preloaded_malloc()
        and glibc_has_hugetlb_tunable()
        and transparent_huge_page_mode() == "madvise"
        and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", "")
        and restartable()
    )


def restart(variables):
    """Re-executes this Python program, same arguments, with the environment `variables`
    added. Returns only when that is impossible (an unusual interpreter), having put the
    environment back: the program then runs on as it is, just slower."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def restart_with_jemalloc():
    """Re-executes this Python program, same arguments, on jemalloc keeping freed memory
    (`jemalloc_environment`) when it can be restarted; otherwise returns. Call it first
    thing in a script: the process image is replaced. It needs only the standard
    library, so a script can run it before it imports Keras (train.py, finetune.py)."""
    variables = jemalloc_environment()
    if variables and restartable():
        restart(variables)


def restart_with_huge_pages():
    """Re-executes this Python program, same arguments, with glibc's malloc asking for
    transparent huge pages, when `huge_pages_would_help()`; otherwise returns.

    Call it first thing in a script (before any work worth keeping): the process image is
    replaced. To opt out, set `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`.
    """
    if huge_pages_would_help():
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        restart({"GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE})


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
    global _freed_memory_kept
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        _freed_memory_kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
    return _freed_memory_kept


_freed_memory_kept = False


def malloc_in_use():
    """The malloc this process runs on, for reports (benchmarks print it): a preloaded
    library's file name (`libjemalloc.so.2`), else `glibc`, with its `GLIBC_TUNABLES` and
    whether `keep_freed_memory` applied."""
    try:
        with open("/proc/self/maps") as stream:
            libraries = {os.path.basename(line.split()[-1]) for line in stream if ".so" in line}
    except OSError:
        libraries = set()
    preloaded = sorted(name for name in libraries if "malloc" in name)
    if preloaded:
        return preloaded[0]
    details = [setting for setting in (os.environ.get("GLIBC_TUNABLES", ""),
                                       "freed memory kept" if _freed_memory_kept else "") if setting]
    library = platform.libc_ver()[0] or "the C library"
    return f"{library} ({', '.join(details)})" if details else library


def tune_allocator():
    """The allocator setting that speeds up this backend's training steps on a CPU. Every
    backend restarts on jemalloc where the system has it (`restart_with_jemalloc`);
    without it, torch keeps freed memory in glibc's heap (`keep_freed_memory`), JAX
    restarts with glibc's huge pages (`restart_with_huge_pages`) and TensorFlow runs as
    it is. Call this first thing: a restart replaces the process.

    Choices of your own win: `KERAS_MAE_JEMALLOC=0` keeps glibc, a malloc library in
    `LD_PRELOAD` is left alone, `glibc.malloc.mmap_max=65536` (glibc's default) in
    `GLIBC_TUNABLES` keeps torch on plain glibc malloc, `glibc.malloc.hugetlb=0` JAX.
    """
    restart_with_jemalloc()
    import keras

    variables = jemalloc_environment()
    if variables and in_ipython():
        warnings.warn(
            "keras_mae.memory: not restarting this IPython / Jupyter session on jemalloc. For "
            "faster CPU training steps, start it with `LD_PRELOAD=" + variables["LD_PRELOAD"]
            + " MALLOC_CONF=" + variables["MALLOC_CONF"] + "` (e.g. before `jupyter lab`).",
            stacklevel=2,
        )
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if keras.config.backend() == "torch" and not preloaded_malloc() and not any(
        name in tunables for name in ("glibc.malloc.mmap_max", "glibc.malloc.trim_threshold")
    ):
        keep_freed_memory()
    restart_with_huge_pages()


__all__ = [
    "huge_pages_would_help",
    "jemalloc_environment",
    "keep_freed_memory",
    "malloc_in_use",
    "restart_with_huge_pages",
    "restart_with_jemalloc",
    "transparent_huge_page_mode",
    "tune_allocator",
]
