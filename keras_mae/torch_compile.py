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
`keras.random` with the layer's `SeedGenerator`.
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
