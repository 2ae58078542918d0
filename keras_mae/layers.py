"""Building blocks of the Vision Transformer used by the MAE encoder and decoder.

Every layer here works on channels-last images or on token sequences shaped
`(batch, tokens, width)`, uses only `keras.ops` / `keras.random`, and returns its
constructor arguments from `get_config`.
"""

import keras
import numpy as np
from keras import ops
# Keras exports no public handle on the autocast scope its `Layer.__call__` sets.
from keras.src.backend.common.variables import AutocastScope, get_autocast_scope

from keras_mae import onednn
from keras_mae.masking import gather_tokens
from keras_mae.torch_compile import compiling, uniform


def _pair(value, name):
    """Reads an int or an (height, width) pair as a tuple of two positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
        raise ValueError(f"`{name}` must be a positive int or a pair of them, got {value!r}.")
    return int(pair[0]), int(pair[1])


def patch_grid(image_size, patch_size):
    """Number of patches along height and width; fails clearly when they do not tile."""
    (height, width), (ph, pw) = _pair(image_size, "image_size"), _pair(patch_size, "patch_size")
    if height % ph or width % pw:
        raise ValueError(
            f"image_size {(height, width)} is not divisible by patch_size {(ph, pw)}: "
            f"the image must tile exactly into patches."
        )
    return height // ph, width // pw


def sincos_position_table(grid_size, width):
    """Fixed 2-D sine-cosine position embeddings, shape `(grid_h * grid_w, width)`.

    As in the official MAE: the first half of the channels encodes the column of a
    patch and the second half its row, each half as `[sin(pos * w), cos(pos * w)]`
    with frequencies `w = 1 / 10000 ** (k / (width / 4))`. Patches are in row-major
    order, the order `Patchify` produces.
    """
    if width % 4:
        raise ValueError(f"2-D sin-cos position embeddings need a width divisible by 4, got {width}.")
    grid_h, grid_w = grid_size
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    frequencies = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))

    def encode(positions):
        angles = positions.reshape(-1, 1).astype(np.float64) * frequencies
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype("float32")


@keras.saving.register_keras_serializable(package="keras_mae")
class Patchify(keras.layers.Layer):
    """Cuts channels-last images into non-overlapping patches.

    `(batch, H, W, C)` -> `(batch, (H / p) * (W / p), p * p * C)`, patches in row-major
    order, values inside a patch in (row, column, channel) order (the layout of the
    official MAE, so its pixel targets and weights map one to one).

    Args:
        patch_size: int or (height, width) of a patch.
    """

    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self._ph, self._pw = _pair(patch_size, "patch_size")

    def call(self, images):
        _, height, width, channels = images.shape
        grid_h, grid_w = patch_grid((height, width), (self._ph, self._pw))
        x = ops.reshape(images, (-1, grid_h, self._ph, grid_w, self._pw, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, gh, gw, ph, pw, C)
        return ops.reshape(x, (-1, grid_h * grid_w, self._ph * self._pw * channels))

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        grid_h, grid_w = patch_grid((height, width), (self._ph, self._pw))
        return (batch, grid_h * grid_w, self._ph * self._pw * channels)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


@keras.saving.register_keras_serializable(package="keras_mae")
class Unpatchify(keras.layers.Layer):
    """Inverse of `Patchify`: `(batch, patches, p * p * C)` -> `(batch, H, W, C)`.

    Args:
        image_size: int or (height, width) of the images to rebuild.
        patch_size: int or (height, width) of a patch.
    """

    def __init__(self, image_size, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self._grid = patch_grid(image_size, patch_size)
        self._ph, self._pw = _pair(patch_size, "patch_size")
        self.built = True  # no weights; MaskedAutoencoder holds it unused until reconstruct()

    def call(self, patches):
        grid_h, grid_w = self._grid
        num_patches, patch_dim = patches.shape[1], patches.shape[2]
        if num_patches != grid_h * grid_w or patch_dim % (self._ph * self._pw):
            raise ValueError(
                f"Unpatchify expects (batch, {grid_h * grid_w}, k * {self._ph * self._pw}) "
                f"patches for image_size {self.image_size} and patch_size "
                f"{self.patch_size}, got shape {tuple(patches.shape)}."
            )
        channels = patch_dim // (self._ph * self._pw)
        x = ops.reshape(patches, (-1, grid_h, grid_w, self._ph, self._pw, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, gh, ph, gw, pw, C)
        return ops.reshape(x, (-1, grid_h * self._ph, grid_w * self._pw, channels))

    def compute_output_shape(self, input_shape):
        channels = input_shape[2] // (self._ph * self._pw)
        return (input_shape[0], self._grid[0] * self._ph, self._grid[1] * self._pw, channels)

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
        }


@keras.saving.register_keras_serializable(package="keras_mae")
class Dense(keras.layers.Dense):
    """`keras.layers.Dense` that is one torch op on the torch backend.

    Keras' torch Dense is a matmul and an add, each behind Keras' dtype bookkeeping;
    torch's `linear` adds the bias inside the matmul (one kernel, one launch: on a GPU
    an eager step waits on launches and Python). Its float32 matmuls on a CPU go through
    oneDNN where torch's default, MKL, is slow (non-Intel x86 with AVX-512: 1.7x the
    training steps of configuration T on an AMD EPYC Zen 5; `keras_mae.onednn`). The
    other backends, mixed input dtypes and quantization (Keras' `quantized_call`) keep
    Keras' own layer, except that torch int8 inference on a CPU multiplies in float32
    (`_int8_call`). The ViT's every projection is one."""

    def call(self, inputs, training=None):
        if keras.backend.backend() == "torch":
            kernel = ops.convert_to_tensor(self.kernel)  # with LoRA's update, if enabled
            bias = None if self.bias is None else ops.convert_to_tensor(self.bias)
            if ops.is_tensor(inputs) and inputs.dtype == kernel.dtype == (kernel if bias is None else bias).dtype:
                outputs = _torch_linear(inputs, kernel, bias)
                return outputs if self.activation is None else self.activation(outputs)
        return super().call(inputs, training=training)

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras quantizes no subclass of Dense unless told to: this one changes only how
        # the calls run, and once quantized it runs Keras' own `quantized_call`.
        super().quantize(mode, type_check=False, config=config)

    def _int8_call(self, inputs, training=None):
        if not _int8_matmul_in_float32_applies(self, inputs):
            return super()._int8_call(inputs, training=training)
        # Keras' int8 forward pass with its integer matmul done in float32, exactly: on a
        # CPU Keras' torch backend multiplies int8 in int32, 9-13x slower than a float32
        # matmul, and torch's `_int_mm` was slower still on an AVX2 CPU. Same bits.
        quantized, inputs_scale = self.inputs_quantizer(inputs, axis=-1)
        x = ops.cast(_int8_matmul_in_float32(quantized, ops.convert_to_tensor(self._kernel)), self.compute_dtype)
        x = ops.divide(x, ops.multiply(ops.convert_to_tensor(self.kernel_scale), inputs_scale))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        return x if self.activation is None else self.activation(x)


# float32 holds every integer up to 2**24 exactly, and 1024 products of int8 values sum
# to at most 1024 * 128**2 = 2**24: a float32 matmul over that depth is an exact integer
# matmul, whatever order it adds in.
EXACT_FLOAT32_DEPTH = 1024


def _int8_matmul_in_float32(a, b):
    """`a @ b` for int8 torch tensors `(..., k)` and `(k, n)`, exactly: float32 matmuls
    over slices of depth `EXACT_FLOAT32_DEPTH`, summed in int32 when there are several."""
    import torch

    leading, depth = a.shape[:-1], b.shape[0]
    a = a.reshape(-1, depth)
    product = None
    for start in range(0, depth, EXACT_FLOAT32_DEPTH):
        rows = slice(start, start + EXACT_FLOAT32_DEPTH)
        part = _torch_linear(a[:, rows].to(torch.float32), b[rows].to(torch.float32), None)
        if depth > EXACT_FLOAT32_DEPTH:
            part = part.to(torch.int32)
        product = part if product is None else product + part
    return product.reshape(*leading, -1)


def _int8_matmul_in_float32_applies(layer, inputs):
    """Whether `layer`'s int8 forward pass can multiply in float32: torch on a CPU, inputs
    quantized too, float32 matmuls at full precision, no LoRA, and no gradient to the
    inputs (Keras' int8 call defines that gradient itself)."""
    if keras.backend.backend() != "torch" or layer.inputs_quantizer is None or layer.lora_enabled:
        return False
    import torch

    return (isinstance(inputs, torch.Tensor) and inputs.device.type == "cpu"
            and not (torch.is_grad_enabled() and inputs.requires_grad)
            and torch.get_float32_matmul_precision() == "highest"
            and torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee"))


def _torch_linear(inputs, kernel, bias):
    """`inputs @ kernel + bias` for torch tensors: oneDNN where it applies, else torch."""
    if onednn.onednn_linear_applies(inputs, kernel):
        return onednn.linear(inputs, kernel, bias)
    import torch

    return torch.nn.functional.linear(inputs, kernel.t(), bias)


@keras.saving.register_keras_serializable(package="keras_mae")
class PatchEmbedding(keras.layers.Layer):
    """Linear projection of every patch to a token: images -> `(batch, patches, width)`.

    A `Patchify` followed by a per-patch `Dense`, which is the same map as the
    strided convolution of the official code, with the same Xavier initialisation
    over the flattened `(p * p * C, width)` kernel.

    Args:
        patch_size: int or (height, width) of a patch.
        width: token width.
    """

    def __init__(self, patch_size, width, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.width = width
        self.patchify = Patchify(patch_size, dtype=self.dtype_policy, name="patchify")
        self.projection = Dense(width, dtype=self.dtype_policy, name="projection")

    def build(self, input_shape):
        self.patchify.build(input_shape)
        self.projection.build(self.patchify.compute_output_shape(input_shape))

    def call(self, images, patch_ids=None):
        """`patch_ids` `(batch, K)`: embed only those patches (MAE pre-training projects
        only what the encoder will see, a quarter of the work at mask ratio 0.75)."""
        patches = call_sublayer(self.patchify, images)
        if patch_ids is not None:
            patches = gather_tokens(patches, patch_ids)
        return per_token(lambda tokens: call_sublayer(self.projection, tokens), patches)

    def compute_output_shape(self, input_shape):
        return self.patchify.compute_output_shape(input_shape)[:2] + (self.width,)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size, "width": self.width}


@keras.saving.register_keras_serializable(package="keras_mae")
class SinCosPositionEmbedding(keras.layers.Layer):
    """Adds fixed 2-D sin-cos position embeddings to patch tokens `(batch, patches, width)`.

    The table is a non-trainable weight (as the frozen parameter of the official code),
    so it travels with saved models and is counted like theirs. Class tokens get no
    position embedding: the official table's class row is all zeros.

    Args:
        grid_size: (rows, columns) of the patch grid.
    """

    def __init__(self, grid_size, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(grid_size)

    def build(self, input_shape):
        num_patches, width = input_shape[1], input_shape[2]
        expected = self.grid_size[0] * self.grid_size[1]
        if num_patches is not None and num_patches != expected:
            raise ValueError(
                f"Expected {expected} patch tokens for a {self.grid_size} grid, got {num_patches}."
            )
        table = sincos_position_table(self.grid_size, width)
        self.table = self.add_weight(
            shape=table.shape,
            initializer=keras.initializers.Constant(table),
            trainable=False,
            name="table",
        )

    def call(self, tokens, patch_ids=None):
        """`patch_ids` `(batch, K)`: which patch each of the K tokens is (all, in order, if None)."""
        table = ops.cast(self.table, tokens.dtype)
        if patch_ids is None:
            return tokens + table[None]
        return tokens + ops.take(table, patch_ids, axis=0)

    def get_config(self):
        return {**super().get_config(), "grid_size": self.grid_size}


@keras.saving.register_keras_serializable(package="keras_mae")
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops a whole residual branch per sample while training.

    Keras has no such layer (keras-cv's pulls TensorFlow into every backend).

    Args:
        rate: probability of dropping the branch.
        seed: int seed of the layer's `SeedGenerator`.
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"DropPath rate must be in [0, 1), got {rate}.")
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.rate == 0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        draw = uniform(shape, self.seed_generator, dtype=x.dtype)
        return x * ops.floor(keep + draw) / keep

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def per_token(function, x):
    """Applies a token-wise `function` to `x` `(B, T, D)` as one `(B * T, D)` matrix.

    The same result; but XLA's CPU compiler makes much slower code for the gradients of
    a matmul with a 3-D input than with a 2-D one (4x for the weight gradient of a
    `(256, 17, 128) @ (128, 512)` Dense on JAX), and in a traced graph reshaping costs
    nothing. Torch folds the leading axes of a matmul itself and runs every step
    eagerly, where each `keras.ops.reshape` costs some 25 us of Python (six per block),
    so there `function` gets `x` as it is.
    """
    if keras.backend.backend() == "torch":
        return function(x)
    tokens = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
    y = function(ops.reshape(x, (-1, x.shape[-1])))
    return ops.reshape(y, (-1, tokens, y.shape[-1]))


def call_sublayer(layer, inputs, **kwargs):
    """`layer(inputs, **kwargs)` for a built sublayer, on torch without Keras' `Layer.__call__`.

    The torch backend runs every step eagerly, and each `Layer.__call__` costs about
    0.1 ms of Python (input conversion, call context, name scope, torch's module hooks):
    a ViT block's seven sublayers, and the MAE's blocks, norms, embeddings and decoder
    around them, make a step at the paper's sizes wait on the CPU while the GPU idles.
    Inside a built layer its sublayers are built, see inputs already in their compute
    dtype and need none of that, so this calls their `call` with the same autocast scope
    `__call__` would set; a model's own call is then the only one through Keras.
    Anything else (other backends, which trace the call once; unbuilt, quantized or
    rematerialised layers; activity regularizers; an input of another dtype; symbolic
    inputs) takes the full `layer(...)`.
    """
    if not _direct_call_applies(layer, inputs):
        return layer(inputs, **kwargs)
    if _layer_norm_in_16_bits_on_cpu(layer, inputs):
        import torch

        return torch.nn.functional.layer_norm(inputs, inputs.shape[-1:], layer.gamma.value, layer.beta.value,
                                              layer.epsilon)
    if not layer.autocast and get_autocast_scope() is not None:
        with AutocastScope(None):  # as `__call__` does for layers that compute in float32
            return layer.call(inputs, **kwargs)
    return layer.call(inputs, **kwargs)


def _layer_norm_in_16_bits_on_cpu(layer, inputs):
    """Whether a Keras `LayerNormalization` of 16-bit `inputs` on torch's CPU can be torch's
    own `layer_norm`, which takes them with the float32 scale and offset and computes in
    float32 inside. Keras casts the inputs to float32 and the result back, four copies a
    norm forward and backward; without them bf16 training steps ran 2-3 % faster at
    configurations K and T (Intel Xeon with AMX, benchmarks/README.md). The result is the
    same to bf16 rounding."""
    return (
        type(layer) is keras.layers.LayerNormalization
        and _half_precision_on_torch_cpu(inputs)
        and list(layer.axis) in ([-1], [len(inputs.shape) - 1])
        and not layer.rms_scaling and layer.center and layer.scale
        and layer.gamma.dtype == layer.beta.dtype == "float32"
    )


def _direct_call_applies(layer, inputs):
    if keras.backend.backend() != "torch" or not layer.built or not keras.ops.is_tensor(inputs):
        return False
    if layer.quantization_mode is not None or layer.activity_regularizer is not None:
        return False
    if getattr(layer, "_remat_mode", None) is not None:
        return False
    if not layer.autocast:
        return True
    scope = get_autocast_scope()
    scope_dtype = layer.variable_dtype if scope is None else scope.dtype
    return scope_dtype == layer.compute_dtype == keras.backend.standardize_dtype(inputs.dtype)


def gelu(x):
    """Exact (erf) GELU, as the official MAE's `nn.GELU()`.

    Keras' `gelu` on JAX is written with `erfc`, which XLA's CPU compiler expands into
    several slow passes; `erf` is one cheap polynomial, and the same function. Torch
    keeps its own fused kernel.
    """
    if keras.backend.backend() == "torch":
        return keras.activations.gelu(x, approximate=False)
    return 0.5 * x * (1.0 + ops.erf(x * ops.cast(0.7071067811865476, x.dtype)))


def _accelerator_present():
    return any(not device.lower().startswith("cpu") for device in keras.distribution.list_devices())


def _fused_kernel_runs(qkv):
    """Whether `keras.ops.dot_product_attention` reaches a fused kernel for `qkv`.

    Torch: SDPA, always. JAX: cuDNN's flash attention on GPUs (or TPU kernels), which
    take only 16-bit inputs; for anything else, and on TensorFlow, Keras computes the
    same generic XLA math as the plain path but slower (it materialises masks).
    """
    backend = keras.backend.backend()
    if backend == "torch":
        return True
    half = keras.backend.standardize_dtype(qkv.dtype) in ("bfloat16", "float16")
    return backend == "jax" and half and _accelerator_present()


def attention(qkv, fused=None, query_ids=None):
    """Softmax self-attention of packed queries, keys and values `(B, T, 3, heads, head_dim)`
    -> `(B, T, heads, head_dim)`; with `query_ids` `(B, M)`, only those tokens' outputs
    `(B, M, heads, head_dim)`, every token still a key and a value.

    `fused=True` is `keras.ops.dot_product_attention`, which dispatches to a fused
    kernel where the backend has one (torch's SDPA, cuDNN flash attention on GPUs); on
    torch's CPU, SDPA called directly (`_torch_cpu_attention`).
    cuDNN trains only on an even number of tokens, so on JAX an odd sequence (a class
    token plus an even patch grid) gets one padding token that the mask hides from
    every query: exact, and 2.4x faster than XLA's attention (forward and backward) for
    the ViT-B decoder's 197 tokens on an H100. `fused=False` is two batched matmuls
    around a float32 softmax, heads-major so no matmul needs a transposed copy. `None`
    picks fused where a fused kernel runs (`_fused_kernel_runs`). Both give the same
    result (tested).

    `query_ids` asks only those tokens' queries (the MAE decoder's last block, whose
    loss reads only the removed patches: at the keras.io sizes 48 of 65 queries, 27 %
    less of that attention's time). JAX's padded cuDNN path, not yet run with fewer
    queries than keys on a GPU, still attends from every token and keeps the rows asked.
    """
    if fused is None:
        fused = _fused_kernel_runs(qkv)
    jax_fused = fused and keras.backend.backend() == "jax"
    # One unstack, not three slices: the gradient of a slice is a zero tensor the size
    # of all of `qkv` with the slice written in, three of them summed (torch).
    if query_ids is not None and not jax_fused:
        query, key, value = ops.unstack(qkv, 3, axis=2)  # 3 x (B, T, H, Dh)
        query = _take_tokens(query, query_ids)
        if fused:
            return _fused_attention(query, key, value)
        return _plain_attention(*(ops.transpose(t, (0, 2, 1, 3)) for t in (query, key, value)))
    if fused:
        tokens, mask = qkv.shape[1], None
        if jax_fused and tokens is not None and tokens % 2:
            qkv = ops.pad(qkv, [(0, 0), (0, 1), (0, 0), (0, 0), (0, 0)])
            visible = ops.arange(tokens + 1) < tokens
            mask = ops.broadcast_to(visible[None, None, None, :], (1, 1, tokens + 1, tokens + 1))
        attended = _fused_attention(*ops.unstack(qkv, 3, axis=2), mask=mask)[:, :tokens]
    else:
        attended = _plain_attention(*ops.unstack(ops.transpose(qkv, (2, 0, 3, 1, 4)), 3))  # 3 x (B, H, T, Dh)
    return attended if query_ids is None else _take_tokens(attended, query_ids)


def _take_tokens(heads, ids):
    """`gather_tokens` for per-head `(B, T, H, Dh)` tensors -> `(B, M, H, Dh)`."""
    batch, (num_heads, head_dim) = ops.shape(heads)[0], heads.shape[2:]
    taken = gather_tokens(ops.reshape(heads, (batch, -1, num_heads * head_dim)), ids)
    return ops.reshape(taken, (batch, -1, num_heads, head_dim))


def _fused_attention(query, key, value, mask=None):
    """`keras.ops.dot_product_attention` on token-major `(B, T, H, Dh)` inputs; on torch's
    CPU, torch's SDPA called directly (`_torch_cpu_attention`)."""
    if mask is None and _on_torch_cpu(query):
        return _torch_cpu_attention(query, key, value)
    # Keras' torch check for flash attention builds an object torch.compile cannot
    # trace; when compiling, torch's own kernel choice inside SDPA decides instead.
    flash = False if compiling() else None
    return ops.dot_product_attention(query, key, value, mask=mask, flash_attention=flash)


def _torch_cpu_attention(query, key, value):
    """torch's SDPA on heads-major views of token-major torch tensors on a CPU.

    Keras' torch attention copies q, k and v into contiguous heads-major tensors before
    SDPA, which torch's CPU kernel does not need: without the copies float32 training
    steps ran 3.5-4.5 % faster at configurations K and T. 16-bit inputs are attended in
    float32: torch 2.13's CPU flash attention trains 3-11x slower in bfloat16 than in
    float32 at ViT sequence lengths (17 tokens: 36 against 4-5 ms, forward and backward,
    at the keras.io sizes, batch 256; its backward pass dominates), so casting up and
    back costs far less than it saves, and is more accurate (Intel Xeon with AMX;
    benchmarks/README.md has both measurements).
    """
    import torch

    dtype = query.dtype
    if _half_precision_on_torch_cpu(query):
        query, key, value = (t.to(torch.float32) for t in (query, key, value))
    heads_major = (t.transpose(1, 2) for t in (query, key, value))
    return torch.nn.functional.scaled_dot_product_attention(*heads_major).transpose(1, 2).to(dtype)


def _on_torch_cpu(tensor):
    return keras.backend.backend() == "torch" and tensor.device.type == "cpu"


def _half_precision_on_torch_cpu(tensor):
    """Whether `tensor` is a 16-bit (bfloat16, float16) torch tensor on a CPU, where the
    attention (`_torch_cpu_attention`) and the layer norms (`call_sublayer`) take their
    own way."""
    return _on_torch_cpu(tensor) and keras.backend.standardize_dtype(tensor.dtype) in ("bfloat16", "float16")


def _plain_attention(query, key, value):
    """Heads-major `(B, H, T, Dh)` queries, keys and values -> token-major `(B, T, H, Dh)`."""
    scale = ops.cast(1.0 / np.sqrt(query.shape[-1]), query.dtype)
    logits = ops.matmul(query * scale, ops.swapaxes(key, -1, -2))  # (B, H, Tq, T)
    weights = ops.cast(ops.softmax(ops.cast(logits, "float32"), axis=-1), value.dtype)
    return ops.transpose(ops.matmul(weights, value), (0, 2, 1, 3))


@keras.saving.register_keras_serializable(package="keras_mae")
class MultiHeadSelfAttention(keras.layers.Layer):
    """Self-attention with one fused query-key-value projection.

    `keras.layers.MultiHeadAttention` projects query, key and value with three
    separate kernels and supports cross-attention; a ViT needs only self-attention,
    where one `(width, 3 * width)` matmul is cheaper and maps directly onto the
    official checkpoints' `qkv` weights. The attention itself is `attention`.

    Args:
        num_heads: number of attention heads; `width` must divide by it.
        qkv_bias: whether the query-key-value projection has a bias.
    """

    def __init__(self, num_heads, qkv_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.qkv_bias = qkv_bias

    def build(self, input_shape):
        width = input_shape[-1]
        if width % self.num_heads:
            raise ValueError(f"Width {width} is not divisible by num_heads {self.num_heads}.")
        self.qkv = Dense(
            3 * width, use_bias=self.qkv_bias, dtype=self.dtype_policy, name="qkv"
        )
        self.qkv.build(input_shape)
        self.proj = Dense(width, dtype=self.dtype_policy, name="proj")
        self.proj.build(input_shape)

    def call(self, x, token_ids=None):
        """`x` `(B, T, D)` -> `(B, T, D)`; with `token_ids` `(B, M)`, only those tokens'
        queries and outputs `(B, M, D)` (every token is still attended to)."""
        width = x.shape[-1]
        head_dim = width // self.num_heads
        qkv = per_token(lambda tokens: call_sublayer(self.qkv, tokens), x)
        packed = ops.reshape(qkv, (ops.shape(x)[0], -1, 3, self.num_heads, head_dim))
        attended = attention(packed, query_ids=token_ids)  # (B, T or M, H, Dh)
        attended = ops.reshape(attended, (ops.shape(x)[0], -1, width))
        return per_token(lambda tokens: call_sublayer(self.proj, tokens), attended)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "qkv_bias": self.qkv_bias}


@keras.saving.register_keras_serializable(package="keras_mae")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm ViT block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

    Args:
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP over the token width.
        drop_path_rate: stochastic-depth rate of both residual branches.
        layer_norm_epsilon: epsilon of both layer norms (1e-6 as the official MAE).
        seed: int seed for drop path.
    """

    def __init__(
        self,
        num_heads,
        mlp_ratio=4.0,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.drop_path_rate = drop_path_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        self.seed = seed

    def build(self, input_shape):
        width = input_shape[-1]
        policy = self.dtype_policy
        self.norm1 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="norm1"
        )
        self.attention = MultiHeadSelfAttention(self.num_heads, dtype=policy, name="attention")
        self.norm2 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="norm2"
        )
        self.mlp_hidden = Dense(
            int(width * self.mlp_ratio), dtype=policy, name="mlp_hidden"
        )
        self.mlp_output = Dense(width, dtype=policy, name="mlp_output")
        self.drop_path = DropPath(self.drop_path_rate, seed=self.seed, dtype=policy, name="drop_path")
        for layer in (self.norm1, self.attention, self.norm2, self.mlp_hidden, self.drop_path):
            layer.build(input_shape)
        self.mlp_output.build(input_shape[:-1] + (int(width * self.mlp_ratio),))

    def call(self, x, training=None, token_ids=None):
        """`x` `(B, T, D)` -> `(B, T, D)`. With `token_ids` `(B, M)` only those tokens'
        outputs `(B, M, D)`: all T are still keys and values, but the queries, projection,
        MLP and residuals run on M tokens (the MAE decoder's last block, whose loss reads
        only the removed patches)."""
        attended = call_sublayer(self.attention, call_sublayer(self.norm1, x), token_ids=token_ids)
        if token_ids is not None:
            x = gather_tokens(x, token_ids)
        x = x + self._drop_path(attended, training)
        mlp = per_token(self._mlp, x)
        return x + self._drop_path(mlp, training)

    def _mlp(self, tokens):
        hidden = gelu(call_sublayer(self.mlp_hidden, call_sublayer(self.norm2, tokens)))
        return call_sublayer(self.mlp_output, hidden)

    def _drop_path(self, branch, training):
        # Not called at rate 0 (all of pre-training), where it would return its input.
        return call_sublayer(self.drop_path, branch, training=training) if self.drop_path_rate else branch

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "drop_path_rate": self.drop_path_rate,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "seed": self.seed,
        }


def drop_path_rates(max_rate, depth):
    """Stochastic-depth rates rising linearly from 0 to `max_rate` over the blocks."""
    return [max_rate * i / max(depth - 1, 1) for i in range(depth)]


__all__ = [
    "Dense",
    "Patchify",
    "Unpatchify",
    "PatchEmbedding",
    "SinCosPositionEmbedding",
    "DropPath",
    "MultiHeadSelfAttention",
    "TransformerBlock",
    "patch_grid",
    "sincos_position_table",
    "drop_path_rates",
    "attention",
    "call_sublayer",
    "gelu",
    "per_token",
]
