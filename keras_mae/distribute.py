"""Several devices on one host, through each framework's own engine.

- TensorFlow backend: `tf.distribute.MirroredStrategy` over the GPUs (or the logical
  CPU devices when there is no GPU).
- JAX backend: `keras.distribution.DataParallel` over `keras.distribution.list_devices()`.
- PyTorch backend: one device (Keras' `fit` has no multi-device path for torch).

`--cpu-devices N` splits the CPU into N logical devices so the multi-device path can be
tried and tested on a machine without accelerators; it must be applied before the
backend starts, which `configure_cpu_devices` does.
"""

import contextlib
import os

STRATEGIES = ("auto", "none", "mirrored", "data_parallel")


class StrategyError(ValueError):
    """A strategy that this backend or machine cannot run."""


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
                f"--strategy data_parallel needs KERAS_BACKEND=jax (this run uses {backend}); "
                "on TensorFlow use --strategy mirrored."
            )
        devices = keras.distribution.list_devices()
        replicas = len(devices)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        scope = contextlib.nullcontext()
        description = f"keras.distribution.DataParallel over {replicas} devices"
    if batch_size % replicas:
        raise StrategyError(f"--batch-size {batch_size} must divide evenly over {replicas} devices.")
    return scope, description, replicas
