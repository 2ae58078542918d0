"""What keeps the torch backend's training step whole under `torch.compile`.

`compile(jit_compile=True)` on the torch backend hands Keras' train step to
`torch.compile`. Anything its tracer (dynamo) cannot follow inside a layer's call
breaks the graph there, and a break inside Keras' `Layer.__call__` (a name scope
that cannot be split) drops that whole frame, the model's call included, back to eager
Python, layer by layer. `compiling` lets such checks step aside (the oneDNN matmul,
Keras' flash-attention test); `uniform` replaces Keras' torch random ops, each of which
builds a `torch.Generator` from the `SeedGenerator`'s state, which dynamo cannot trace:
while torch compiles, it draws from torch's own generator instead,
as Keras' torch `Dropout` does when it has no seed (seeded by
`keras.utils.set_random_seed`); eager steps and the other backends keep
`keras.random` with the layer's `SeedGenerator`. `compiled_train_function` is the
train function these models give Keras' torch trainer: the step is traced once, from
`train_step` itself, after a first eager call; `not_traced` keeps a function out of the
graph (the optimizer's update, `keras_mae.AdamW.apply`).
"""

import keras


def compiling():
    """Whether torch.compile is tracing the code that calls this (torch backend)."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    return torch.compiler.is_compiling()


def uniform(shape, seed, minval=0.0, maxval=1.0, dtype="float32"):
    """`keras.random.uniform(shape, minval, maxval, dtype, seed)`, traceable by torch.compile."""
    if not compiling():
        return keras.random.uniform(shape, minval=minval, maxval=maxval, dtype=dtype, seed=seed)
    import torch
    from keras.src.backend.torch.core import get_device, to_torch_dtype

    draw = torch.rand(tuple(shape), dtype=to_torch_dtype(dtype), device=get_device())
    return draw * (maxval - minval) + minval


def not_traced(function):
    """`function`, run eagerly where torch.compile meets it (a graph break) on the torch
    backend; unchanged on the others."""
    if keras.backend.backend() != "torch":
        return function
    import torch

    return torch.compiler.disable(function)


def eager_first_call(step):
    """`step`, a function given to torch.compile, with its first call run eagerly.

    A first call changes Python state that torch.compile's guards check: Keras layers
    record their name-scope path and Keras its per-thread call context, weightless
    layers become built, gradients go from None to tensors. Traced from the first call,
    the guards capture the state before it and fail at the second, and the whole step
    compiles again (76 s more at the keras.io sizes on a 2-core CPU).
    Run eagerly (a real step, at eager speed), the first call settles that state, and
    the second compiles once for all the steps after it.
    """
    import torch

    first = True

    def run(*args, **kwargs):
        nonlocal first
        if first:
            first = False
            with torch.compiler.set_stance("force_eager"):
                return step(*args, **kwargs)
        return step(*args, **kwargs)

    return run


def compiled_train_function(train_step):
    """Keras' torch train function (`data` -> `train_step(data[0])`) with `train_step`
    itself given to torch.compile, its first call eager (`eager_first_call`).

    Keras compiles a wrapper that calls `train_step`; dynamo then traces the whole
    forward pass inside the wrapper, meets the graph break at `loss.backward()`, throws
    that trace away and starts again from `train_step` as a frame of its own (31-42 s
    of a 4-minute compile at the keras.io sizes on 2 cores, for nothing).
    """
    import torch

    step = eager_first_call(torch.compile(train_step))

    def one_step_on_data(data):
        return step(data[0])

    return one_step_on_data
