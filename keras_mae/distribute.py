"""Several devices on one host, through each framework's own engine.

- TensorFlow backend: `tf.distribute.MirroredStrategy` over the GPUs (or the logical
  CPU devices when there is no GPU).
- JAX backend: `keras.distribution.DataParallel` over `keras.distribution.list_devices()`.
- PyTorch backend: one device (Keras' `fit` has no multi-device path for torch).

Several processes (hosts), JAX backend: `--strategy multi_process` starts JAX's
distributed runtime (what `keras.distribution.initialize` calls, here with its
time limits exposed) and trains with `keras.distribution.DataParallel` over every
process's devices; Keras shards a `tf.data.Dataset` per process by itself. TensorFlow's
MultiWorkerMirroredStrategy does not work with Keras 3's `fit` (keras-team/keras#20585),
so `--strategy multi_worker` is refused with that reason.

`--cpu-devices N` splits the CPU into N logical devices so the multi-device path can be
tried and tested on a machine without accelerators; it must be applied before the
backend starts, which `configure_cpu_devices` does.
"""

import contextlib
import dataclasses
import os

STRATEGIES = ("auto", "none", "mirrored", "data_parallel", "multi_process", "multi_worker")
MULTI_WORKER_REFUSAL = (
    "--strategy multi_worker (TensorFlow's MultiWorkerMirroredStrategy) does not work with Keras 3's fit: "
    "it fails with \"Attempt to convert a value (PerReplica...)\" (keras-team/keras issue 20585). "
    "Train on several machines with KERAS_BACKEND=jax and --strategy multi_process instead."
)


class StrategyError(ValueError):
    """A strategy that this backend or machine cannot run."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process sits among those of one multi-process run."""

    coordinator: str
    num_processes: int
    process_id: int


def _integer(value, name):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StrategyError(f"{name} must be an integer, got {value!r}.") from None


def resolve_cluster(coordinator=None, num_processes=None, process_id=None, environ=None):
    """The cluster from flags, else from the environment a scheduler sets.

    Looked up in order: the flags; Keras' own KERAS_DISTRIBUTION_JOB_ADDRESSES (the
    first address is the coordinator), KERAS_DISTRIBUTION_NUM_PROCESSES and
    KERAS_DISTRIBUTION_PROCESS_ID; SLURM's SLURM_NTASKS and SLURM_PROCID; a Kubernetes
    indexed Job's JOB_COMPLETION_INDEX.
    """
    environ = os.environ if environ is None else environ
    addresses = environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
    coordinator = coordinator or (addresses.split(",")[0].strip() if addresses else None)
    if num_processes is None:
        num_processes = environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES") or environ.get("SLURM_NTASKS")
    if process_id is None:
        process_id = next((environ[key] for key in ("KERAS_DISTRIBUTION_PROCESS_ID", "SLURM_PROCID",
                                                    "JOB_COMPLETION_INDEX") if environ.get(key)), None)
    if not coordinator:
        raise StrategyError("--strategy multi_process needs the coordinator's HOST:PORT: pass --coordinator-address "
                            "or set KERAS_DISTRIBUTION_JOB_ADDRESSES.")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StrategyError(f"The coordinator address must be HOST:PORT, got {coordinator!r}.")
    if num_processes is None or process_id is None:
        raise StrategyError("--strategy multi_process needs the number of processes and this process's id: pass "
                            "--num-processes and --process-id (or set KERAS_DISTRIBUTION_NUM_PROCESSES and "
                            "KERAS_DISTRIBUTION_PROCESS_ID; SLURM and Kubernetes indexed Jobs set them for you).")
    num_processes = _integer(num_processes, "The number of processes")
    process_id = _integer(process_id, "The process id")
    if num_processes < 1:
        raise StrategyError(f"The number of processes must be at least 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise StrategyError(f"The process id must be in 0..{num_processes - 1} for {num_processes} processes, "
                            f"got {process_id}.")
    return Cluster(coordinator, num_processes, process_id)


def start_multi_process(cluster, timeout=300):
    """Joins JAX's distributed runtime; never waits forever.

    `timeout` bounds both the wait for every process at start-up and, later, how long
    a silent process (killed, or its host gone) is tolerated before the others stop.
    JAX aborts the whole process when its own start-up limit passes, so a watchdog
    stops first with one clear line and exit status 2. CPU collectives go through gloo,
    so CPU-only hosts work too.
    """
    import sys
    import threading

    import jax

    def give_up():
        print(f"train.py: error: process {cluster.process_id} of {cluster.num_processes}: not every process joined "
              f"the coordinator at {cluster.coordinator} within {timeout:g} s (start all {cluster.num_processes} "
              "with the same --coordinator-address and --num-processes, process 0 on that host, and check that "
              "the port is reachable).", file=sys.stderr, flush=True)
        os._exit(2)

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            initialization_timeout=int(timeout) + 60,  # the watchdog speaks first
            heartbeat_timeout_seconds=max(int(timeout), 1),
        )
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise StrategyError(f"process {cluster.process_id} could not join the coordinator at "
                            f"{cluster.coordinator}: {first_line[:300]}") from None
    finally:
        watchdog.cancel()


def process_index():
    """This process's index in a multi-process JAX run, 0 otherwise."""
    import keras

    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.process_index()


def process_count():
    """How many processes a multi-process JAX run has, 1 otherwise."""
    import keras

    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def configure_cpu_devices(count):
    """Before keras is imported: ask TensorFlow and XLA for `count` logical CPU devices."""
    if count <= 1:
        return
    flag = f"--xla_force_host_platform_device_count={count}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )


def _tensorflow_devices():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def strategy_scope(name, batch_size):
    """Returns `(scope, description, num_replicas)` for a `--strategy` value.

    Build and compile the model inside `scope`; `fit` then runs on every device.
    """
    import keras

    backend = keras.backend.backend()
    if name not in STRATEGIES:
        raise StrategyError(f"--strategy must be one of {STRATEGIES}, got {name!r}.")
    if name == "auto":
        if backend == "tensorflow" and len(_tensorflow_devices()) > 1:
            name = "mirrored"
        elif backend == "jax" and len(keras.distribution.list_devices()) > 1:
            name = "data_parallel"
        else:
            name = "none"
    if name == "none":
        return contextlib.nullcontext(), "one device", 1
    if name == "multi_worker":
        raise StrategyError(MULTI_WORKER_REFUSAL)
    if name == "mirrored":
        if backend != "tensorflow":
            raise StrategyError(
                f"--strategy mirrored needs KERAS_BACKEND=tensorflow (this run uses {backend}); "
                "on JAX use --strategy data_parallel."
            )
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy(devices=_tensorflow_devices())
        replicas = strategy.num_replicas_in_sync
        scope = strategy.scope()
        description = f"tf.distribute.MirroredStrategy over {replicas} devices"
    else:
        if backend != "jax":
            raise StrategyError(
                f"--strategy {name} needs KERAS_BACKEND=jax (this run uses {backend}); "
                + ("on TensorFlow use --strategy mirrored." if name == "data_parallel" else
                   "TensorFlow's multi-worker path does not work with Keras 3's fit (keras-team/keras issue 20585).")
            )
        import jax

        devices = keras.distribution.list_devices()  # every process's devices
        replicas = len(devices)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        scope = contextlib.nullcontext()
        description = f"keras.distribution.DataParallel over {replicas} devices"
        if jax.process_count() > 1:
            description += (f" in {jax.process_count()} processes (this is process {jax.process_index()}; "
                            "tf.data input sharded per process by Keras)")
    if batch_size % replicas:
        raise StrategyError(f"--batch-size {batch_size} must divide evenly over {replicas} devices.")
    return scope, description, replicas
