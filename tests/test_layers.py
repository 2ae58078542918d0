import math

import keras
import numpy as np
import pytest
from keras import ops
from keras.src.backend.common.variables import AutocastScope

import keras_mae.layers
from conftest import count_layer_calls
from keras_mae.layers import (
    Dense,
    DropPath,
    MultiHeadSelfAttention,
    PatchEmbedding,
    Patchify,
    SinCosPositionEmbedding,
    TransformerBlock,
    Unpatchify,
    attention,
    call_sublayer,
    gelu,
    patch_grid,
    per_token,
    sincos_position_table,
)


def to_numpy(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("image_size,patch_size", [(8, 4), ((12, 8), (3, 4)), (6, 1)])
def test_patchify_unpatchify_are_exact_inverses(channels, image_size, patch_size):
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = np.random.default_rng(0).random((2, height, width, channels), dtype=np.float32)
    patches = Patchify(patch_size)(images)
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    assert tuple(patches.shape) == (2, (height // ph) * (width // pw), ph * pw * channels)
    np.testing.assert_array_equal(to_numpy(Unpatchify(image_size, patch_size)(patches)), images)


def test_patchify_layout_is_row_major_patches_of_row_column_channel():
    images = np.arange(2 * 4 * 4 * 2, dtype=np.float32).reshape(2, 4, 4, 2)
    patches = to_numpy(Patchify(2)(images))
    # Second patch of the first row: rows 0-1, columns 2-3, channels interleaved last.
    np.testing.assert_array_equal(patches[0, 1], images[0, 0:2, 2:4, :].reshape(-1))
    # First patch of the second row.
    np.testing.assert_array_equal(patches[1, 2], images[1, 2:4, 0:2, :].reshape(-1))


def test_patch_grid_rejects_sizes_that_do_not_tile():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        patch_grid(30, 4)
    with pytest.raises(ValueError, match="positive int"):
        patch_grid(0, 4)


def test_sincos_table_matches_its_definition():
    table = sincos_position_table((3, 5), 8)
    assert table.shape == (15, 8)
    # Patch (row 1, column 2) is index 7; width 8 -> 2 frequencies per sin/cos quarter.
    freqs = 1.0 / 10000 ** (np.arange(2) / 2)
    expected = np.concatenate([np.sin(2 * freqs), np.cos(2 * freqs), np.sin(1 * freqs), np.cos(1 * freqs)])
    np.testing.assert_allclose(table[7], expected, rtol=1e-6)
    # Patches in one column share the first half, patches in one row the second.
    np.testing.assert_array_equal(table[2, :4], table[12, :4])
    np.testing.assert_array_equal(table[5, 4:], table[9, 4:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_table((2, 2), 6)


def test_position_embedding_is_fixed_and_added():
    layer = SinCosPositionEmbedding((2, 2))
    tokens = np.zeros((3, 4, 8), dtype=np.float32)
    out = to_numpy(layer(tokens))
    np.testing.assert_allclose(out[1], sincos_position_table((2, 2), 8), rtol=1e-6)
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 1
    with pytest.raises(ValueError, match="Expected 4 patch tokens"):
        SinCosPositionEmbedding((2, 2))(np.zeros((1, 5, 8), dtype=np.float32))


def test_patch_embedding_is_a_linear_map_of_each_patch():
    layer = PatchEmbedding(4, 6)
    images = np.random.default_rng(1).random((2, 8, 8, 3), dtype=np.float32)
    out = to_numpy(layer(images))
    kernel, bias = (to_numpy(w) for w in layer.projection.weights)
    expected = to_numpy(Patchify(4)(images)) @ kernel + bias
    assert out.shape == (2, 4, 6)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_matches_a_plain_softmax_attention():
    layer = MultiHeadSelfAttention(num_heads=2)
    x = np.random.default_rng(2).random((2, 5, 8), dtype=np.float32)
    out = to_numpy(layer(x))
    w_qkv, b_qkv, w_proj, b_proj = (to_numpy(w) for w in layer.weights)
    q, k, v = np.split(x @ w_qkv + b_qkv, 3, axis=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        logits = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / 2.0
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        heads.append(weights / weights.sum(-1, keepdims=True) @ v[..., sl])
    expected = np.concatenate(heads, axis=-1) @ w_proj + b_proj
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MultiHeadSelfAttention(num_heads=3)(x)


@pytest.mark.parametrize("tokens,heads,head_dim", [(5, 2, 4), (17, 4, 32), (65, 4, 16)])
def test_fused_and_plain_attention_agree(tokens, heads, head_dim):
    # The two speed paths `attention` picks between per backend and device give one result.
    qkv = np.random.default_rng(3).normal(size=(3, tokens, 3, heads, head_dim)).astype("float32")
    fused, plain = (to_numpy(attention(ops.convert_to_tensor(qkv), fused=f)) for f in (True, False))
    assert plain.shape == (3, tokens, heads, head_dim)
    np.testing.assert_allclose(plain, fused, rtol=1e-5, atol=1e-5)
    half = to_numpy(ops.cast(attention(ops.cast(qkv, "bfloat16"), fused=False), "float32"))
    np.testing.assert_allclose(half, fused, atol=0.05)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_fused_attention_keeps_its_dtype(dtype):
    # Mixed precision hands attention 16-bit q, k, v. On torch's CPU they are attended in
    # float32 (its 16-bit flash kernel trains several times slower): float32 attention
    # of the same rounded inputs, rounded once. Elsewhere it is computed in 16 bits,
    # within the loose bound of the plain path above.
    qkv = ops.cast(np.random.default_rng(9).normal(size=(3, 17, 3, 4, 32)).astype("float32"), dtype)
    out = attention(qkv, fused=True)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    exact = to_numpy(attention(ops.cast(qkv, "float32"), fused=True))
    float32_inside = keras.backend.backend() == "torch" and qkv.device.type == "cpu"
    rounding = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    bound = 2 * rounding if float32_inside else 0.05
    np.testing.assert_allclose(to_numpy(ops.cast(out, "float32")), exact, rtol=bound, atol=bound)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch's own CPU path")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("queries", [17, 9])
def test_torch_cpu_attention_matches_keras_attention(dtype, queries):
    # On torch's CPU, fused attention hands SDPA heads-major views of q, k and v where
    # Keras copies them; values and gradients must not change (in bfloat16 Keras attends
    # in 16 bits, this path in float32: within 16-bit rounding).
    import torch

    from keras_mae.layers import _fused_attention

    rng = np.random.default_rng(5)
    packed = rng.normal(size=(2, 17, 3, 4, 8)).astype("float32")

    def outputs_and_gradient(function):
        qkv = torch.tensor(packed).to(getattr(torch, dtype)).requires_grad_()
        query, key, value = qkv.unbind(2)  # strided views, as `attention` hands them over
        out = function(query[:, :queries], key, value)
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach().float().numpy(), qkv.grad.float().numpy()

    ours, keras_own = outputs_and_gradient(_fused_attention), outputs_and_gradient(ops.dot_product_attention)
    assert ours[0].shape == (2, queries, 4, 8)
    bound = 1e-6 if dtype == "float32" else 2.0**-6
    for mine, theirs in zip(ours, keras_own):
        np.testing.assert_allclose(mine, theirs, rtol=bound, atol=bound)


def gradient(function, x):
    """d function(x) / dx with the running backend's own autodiff."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(function)(x))
    if backend == "torch":
        import torch

        tensor = torch.tensor(x, requires_grad=True)
        function(tensor).backward()
        return tensor.grad.numpy()
    import tensorflow as tf

    variable = tf.Variable(x)
    with tf.GradientTape() as tape:
        value = function(variable)
    return tape.gradient(value, variable).numpy()


@pytest.mark.parametrize("tokens", [6, 17])
def test_fused_and_plain_attention_have_the_same_gradients(tokens):
    # On JAX the fused path pads odd sequences by one token (cuDNN trains only on even
    # lengths): the padding must neither be attended to nor carry gradient.
    rng = np.random.default_rng(4)
    qkv = rng.normal(size=(2, tokens, 3, 2, 8)).astype("float32")
    weights = ops.convert_to_tensor(rng.normal(size=(2, tokens, 2, 8)).astype("float32"))
    fused, plain = (gradient(lambda x, f=f: ops.sum(attention(x, fused=f) * weights), qkv) for f in (True, False))
    assert fused.shape == qkv.shape
    np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_from_chosen_queries_is_full_attention_at_those_tokens(fused):
    # The MAE decoder's last block asks only the removed patches' queries; every token
    # is still a key and a value, so values and gradients are the full attention's rows.
    rng = np.random.default_rng(8)
    qkv = rng.normal(size=(2, 7, 3, 2, 8)).astype("float32")
    ids = np.stack([rng.permutation(7)[:4] for _ in range(2)]).astype("int32")  # each sample its own
    query_ids = ops.convert_to_tensor(ids)
    weights = ops.convert_to_tensor(rng.normal(size=(2, 4, 2, 8)).astype("float32"))

    def rows_of_full(x):
        return ops.take_along_axis(attention(x, fused=fused), ops.convert_to_tensor(ids[:, :, None, None]), axis=1)

    chosen = to_numpy(attention(ops.convert_to_tensor(qkv), fused=fused, query_ids=query_ids))
    assert chosen.shape == (2, 4, 2, 8)
    np.testing.assert_allclose(chosen, to_numpy(rows_of_full(ops.convert_to_tensor(qkv))), rtol=1e-5, atol=1e-6)
    subset = gradient(lambda x: ops.sum(attention(x, fused=fused, query_ids=query_ids) * weights), qkv)
    full = gradient(lambda x: ops.sum(rows_of_full(x) * weights), qkv)
    np.testing.assert_allclose(subset, full, rtol=1e-4, atol=1e-6)


def test_gelu_is_the_exact_erf_gelu():
    x = np.linspace(-6, 6, 241, dtype=np.float32)
    expected = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(to_numpy(gelu(x)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(gelu(x)), to_numpy(keras.activations.gelu(x, approximate=False)),
                               rtol=1e-5, atol=1e-6)


def test_per_token_matches_applying_a_dense_to_the_sequence():
    dense = keras.layers.Dense(5)
    x = np.random.default_rng(4).random((3, 7, 6), dtype=np.float32)
    np.testing.assert_allclose(to_numpy(per_token(dense, x)), to_numpy(dense(x)), rtol=1e-5, atol=1e-6)


def test_per_token_hands_torch_the_sequence_and_xla_one_matrix():
    seen = []
    x = ops.convert_to_tensor(np.random.default_rng(5).random((3, 7, 6), dtype=np.float32))
    y = per_token(lambda tokens: seen.append(tuple(tokens.shape)) or tokens * 2.0, x)
    assert seen == ([(3, 7, 6)] if keras.backend.backend() == "torch" else [(21, 6)])
    assert tuple(y.shape) == (3, 7, 6)
    np.testing.assert_array_equal(to_numpy(y), 2 * to_numpy(x))


def test_embedding_only_chosen_patches_equals_gathering_them_afterwards():
    patches, positions = PatchEmbedding(4, 8), SinCosPositionEmbedding((2, 2))
    images = np.random.default_rng(5).random((2, 8, 8, 3), dtype=np.float32)
    ids = np.array([[3, 1], [0, 2]], dtype="int32")
    everything = to_numpy(positions(patches(images)))
    chosen = to_numpy(positions(patches(images, patch_ids=ids), patch_ids=ids))
    np.testing.assert_allclose(chosen, np.take_along_axis(everything, ids[..., None], axis=1), rtol=1e-5, atol=1e-6)


def test_drop_path_drops_whole_samples_only_while_training():
    layer = DropPath(0.5, seed=3)
    x = np.ones((256, 3, 4), dtype=np.float32)
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), x)
    out = to_numpy(layer(x, training=True))
    per_sample = out.reshape(256, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
    assert 0.3 < (per_sample[:, 0] == 0).mean() < 0.7
    with pytest.raises(ValueError, match="rate"):
        DropPath(1.0)


def test_transformer_block_is_residual_pre_norm():
    block = TransformerBlock(num_heads=2, mlp_ratio=2.0)
    x = np.random.default_rng(4).random((2, 5, 8), dtype=np.float32)
    assert tuple(block(x).shape) == (2, 5, 8)
    assert block.mlp_hidden.units == 16
    # Zeroing the two output projections leaves only the residual path.
    for dense in (block.attention.proj, block.mlp_output):
        for w in dense.weights:
            w.assign(np.zeros(w.shape, dtype=np.float32))
    np.testing.assert_allclose(to_numpy(block(x)), x, rtol=1e-6)


def test_block_outputs_for_chosen_tokens_are_its_full_outputs_at_those_tokens():
    # The MAE decoder's last block computes only the removed patches: every token is
    # still a key and a value, so the chosen tokens' outputs, and their gradients with
    # respect to all inputs, are the full block's.
    block = TransformerBlock(num_heads=2)
    rng = np.random.default_rng(5)
    x = rng.random((3, 7, 8), dtype=np.float32)
    ids = np.stack([rng.permutation(7)[:4] for _ in range(3)])  # (3, 4), each sample its own
    chosen = to_numpy(block(x, token_ids=ids))
    assert chosen.shape == (3, 4, 8)
    np.testing.assert_allclose(chosen, np.take_along_axis(to_numpy(block(x)), ids[..., None], axis=1), rtol=1e-5, atol=1e-6)
    weights = ops.convert_to_tensor(rng.normal(size=(3, 4, 8)).astype("float32"))
    full = gradient(lambda t: ops.sum(ops.take_along_axis(block(t), ids[..., None], axis=1) * weights), x)
    subset = gradient(lambda t: ops.sum(block(t, token_ids=ids) * weights), x)
    np.testing.assert_allclose(subset, full, rtol=1e-4, atol=1e-6)


def test_transformer_block_drops_its_branches_only_at_a_nonzero_rate_while_training():
    x = np.random.default_rng(6).random((64, 5, 8), dtype=np.float32)
    plain = TransformerBlock(num_heads=2, drop_path_rate=0.0)
    np.testing.assert_array_equal(to_numpy(plain(x, training=True)), to_numpy(plain(x, training=False)))
    block = TransformerBlock(num_heads=2, drop_path_rate=0.9, seed=1)
    # A sample whose two branches are both dropped (p = 0.81) comes out unchanged.
    unchanged = np.all(to_numpy(block(x, training=True)) == x, axis=(1, 2))
    assert 0.6 < unchanged.mean() < 0.97
    assert not np.any(np.all(to_numpy(block(x, training=False)) == x, axis=(1, 2)))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_block_gives_the_same_results_whether_its_sublayers_are_called_directly_or_not(monkeypatch, policy):
    # On torch a block calls its sublayers' `call` without Keras' `Layer.__call__`
    # (`call_sublayer`); forcing the full call must not change a bit, in float32 or
    # under mixed precision, where the layer norms keep float32 parameters (and on
    # torch's CPU take the 16-bit tokens straight into torch's `layer_norm`).
    block = TransformerBlock(2, drop_path_rate=0.5, seed=3, dtype=policy)
    x = np.random.default_rng(7).random((8, 5, 8), dtype=np.float32)
    block.build(x.shape)
    state = to_numpy(block.drop_path.seed_generator.state)

    def run():
        block.drop_path.seed_generator.state.assign(state)  # the same drop-path draws
        outputs = to_numpy(ops.cast(block(x, training=True), "float32"))
        grads = gradient(lambda t: ops.sum(ops.cast(block(t, training=False), "float32") ** 2), x)
        return outputs, grads

    calls = count_layer_calls(monkeypatch)
    direct = run()
    direct_calls = len(calls)
    monkeypatch.setattr(keras_mae.layers, "_direct_call_applies", lambda layer, inputs: False)
    del calls[:]
    full = run()
    np.testing.assert_array_equal(direct[0], full[0])
    np.testing.assert_array_equal(direct[1], full[1])
    # Per block call: the block, 2 norms, the attention and its 2 projections, 2 MLP
    # layers and drop path on each branch; on torch only the block's own goes through Keras.
    assert len(calls) == 2 * 10
    assert direct_calls == (2 if keras.backend.backend() == "torch" else 2 * 10)


def test_call_sublayer_falls_back_to_the_full_call_where_that_does_more():
    x = ops.convert_to_tensor(np.random.default_rng(8).random((3, 4), dtype=np.float32))
    fresh = Dense(5)
    np.testing.assert_array_equal(to_numpy(call_sublayer(fresh, x)), to_numpy(fresh(x)))  # builds first
    half = ops.cast(x, "float16")
    assert keras.backend.standardize_dtype(call_sublayer(fresh, half).dtype) == "float32"  # input cast
    symbolic = call_sublayer(fresh, keras.Input((4,)))
    assert isinstance(symbolic, keras.KerasTensor) and tuple(symbolic.shape) == (None, 5)
    quantized = Dense(5)
    quantized.build((None, 4))
    quantized.quantize("int8", type_check=False)
    np.testing.assert_array_equal(to_numpy(call_sublayer(quantized, x)), to_numpy(quantized(x)))
    regularized = Dense(5, activity_regularizer="l2")
    regularized.build((None, 4))
    call_sublayer(regularized, x)
    assert len(regularized.losses) == 1
    relu = keras.layers.Activation("relu")
    relu.build((None, 4))
    assert keras.backend.standardize_dtype(call_sublayer(relu, half).dtype) == "float32"  # input cast
    # Inside a bfloat16 autocast scope (a mixed-precision parent): a float32 layer and one
    # that does not autocast read their variables in float32, as `__call__` sets it.
    float32_dense = Dense(5)
    float32_dense.build((None, 4))
    no_autocast = keras.layers.Dense(5, dtype="mixed_bfloat16", autocast=False)
    no_autocast.build((None, 4))
    for layer in (float32_dense, no_autocast):
        with AutocastScope("bfloat16"):
            np.testing.assert_array_equal(to_numpy(call_sublayer(layer, x)), to_numpy(layer(x)))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_dense_matches_keras_dense_with_and_without_lora(policy):
    # On torch `Dense` is one torch linear (or oneDNN's); LoRA's update must reach it.
    x = np.random.default_rng(9).normal(size=(3, 4, 8)).astype("float32")
    ours, theirs = Dense(6, dtype=policy), keras.layers.Dense(6, dtype=policy)
    ours.build(x.shape), theirs.build(x.shape)
    theirs.set_weights(ours.get_weights())
    tolerance = dict(rtol=1e-5, atol=1e-5) if policy == "float32" else dict(rtol=2e-2, atol=2e-2)
    as_float = lambda y: to_numpy(ops.cast(y, "float32"))
    np.testing.assert_allclose(as_float(ours(x)), as_float(theirs(x)), **tolerance)
    for layer in (ours, theirs):
        layer.enable_lora(2)
        layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.5, "float32"))
    theirs.lora_kernel_a.assign(ours.lora_kernel_a)
    with_lora = as_float(ours(x))
    np.testing.assert_allclose(with_lora, as_float(theirs(x)), **tolerance)
    assert np.abs(with_lora - as_float(ops.matmul(x, ours._kernel) + ours.bias)).max() > 0.1


LAYER_CASES = [
    (lambda: Dense(6, activation="relu", use_bias=False), (2, 4, 8)),
    (lambda: Patchify((2, 4)), (2, 8, 8, 3)),
    (lambda: Unpatchify((8, 8), (2, 4)), (2, 8, 24)),
    (lambda: PatchEmbedding(4, 8), (2, 8, 8, 3)),
    (lambda: SinCosPositionEmbedding((2, 2)), (2, 4, 8)),
    (lambda: DropPath(0.1, seed=1), (2, 4, 8)),
    (lambda: MultiHeadSelfAttention(2, qkv_bias=False), (2, 4, 8)),
    (lambda: TransformerBlock(2, mlp_ratio=3.0, drop_path_rate=0.1, layer_norm_epsilon=1e-5, seed=2), (2, 4, 8)),
]


@pytest.mark.parametrize("make,shape", LAYER_CASES)
def test_layer_config_round_trip_gives_same_layer_and_outputs(make, shape):
    layer = make()
    x = np.random.default_rng(5).random(shape, dtype=np.float32)
    out = to_numpy(layer(x))
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(to_numpy(clone(x)), out)
    # Through Keras' own (de)serialisation, registered name included.
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer) and revived.get_config() == config
