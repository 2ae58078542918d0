"""The torch backend's training step stays one graph under torch.compile (jit_compile=True)."""

import keras
import numpy as np
import pytest

import keras_mae
from conftest import random_images, tiny_mae
from keras_mae.torch_compile import compiling, eager_first_call, uniform

torch_only = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.compile is the torch backend's")


def test_uniform_is_keras_random_outside_torch_compile():
    assert not compiling()
    drawn = uniform((3, 5), keras.random.SeedGenerator(4), -2.0, 3.0)
    expected = keras.random.uniform((3, 5), -2.0, 3.0, seed=keras.random.SeedGenerator(4))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(drawn), keras.ops.convert_to_numpy(expected))


@torch_only
def test_uniform_draws_from_torchs_generator_while_compiling():
    import torch

    seed = keras.random.SeedGenerator(4)
    draw = torch.compile(lambda: (compiling(), uniform((64, 50), seed, -2.0, 3.0)), backend="eager")
    torch.manual_seed(1)
    (traced, first), (_, second) = draw(), draw()
    torch.manual_seed(1)
    _, again = draw()
    assert traced
    assert tuple(first.shape) == (64, 50) and first.min() >= -2.0 and first.max() < 3.0
    assert first.std() > 1.0  # spread over the range, not a constant
    assert not torch.equal(first, second)  # fresh numbers every call
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # seeded by torch's generator


def graphs_and_breaks(function, *args):
    import torch

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(function)(*args)
    return explanation.graph_count, explanation.graph_break_count


@torch_only
@pytest.mark.parametrize("mask_sampling, mask_tokens_in_encoder", [("random", False), ("block", True), ("grid", False)])
def test_the_training_forward_pass_is_one_graph(mask_sampling, mask_tokens_in_encoder):
    """A graph break inside a layer sends torch.compile's whole model call back to eager,
    layer by layer (every Keras layer call then costs its Python again)."""
    import torch

    mae = tiny_mae(mask_sampling=mask_sampling, mask_tokens_in_encoder=mask_tokens_in_encoder, drop_path_rate=0.1)
    images = torch.as_tensor(random_images())
    mae(images, training=True)  # built and called once, as fit does before compiling
    assert graphs_and_breaks(lambda x: mae(x, training=True), images) == (1, 0)


@torch_only
def test_the_mixed_precision_training_forward_pass_is_one_graph():
    # 16-bit attention takes its own branch on a CPU (attended in float32).
    import torch

    mae = tiny_mae(dtype="mixed_bfloat16")
    images = torch.as_tensor(random_images())
    assert mae(images, training=True)["pred"].dtype == torch.bfloat16
    assert graphs_and_breaks(lambda x: mae(x, training=True), images) == (1, 0)


@torch_only
def test_the_fine_tuning_forward_pass_is_one_graph():
    import torch

    classifier = keras_mae.ViTClassifier(tiny_mae(drop_path_rate=0.1).encoder, num_classes=3, dropout_rate=0.2)
    images = torch.as_tensor(random_images())
    classifier(images, training=True)
    assert graphs_and_breaks(lambda x: classifier(x, training=True), images) == (1, 0)


@torch_only
def test_eager_first_call_compiles_from_the_second_call():
    import torch

    graphs_after_each_call = []
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    run = eager_first_call(torch.compile(lambda x: x * 2, backend=count_graphs))
    results = []
    for i in range(4):
        results.append(float(run(torch.tensor(float(i)))))
        graphs_after_each_call.append(len(graphs))
    assert graphs_after_each_call == [0, 1, 1, 1]  # eager first, then one graph for all
    assert results == [0.0, 2.0, 4.0, 6.0]


@torch_only
def test_compiled_pre_training_lowers_the_loss_with_a_fresh_mask_every_step():
    import torch
    from torch._dynamo.utils import counters

    keras.utils.set_random_seed(0)
    mae = tiny_mae()
    mae.compile(optimizer=keras_mae.AdamW(3e-3), jit_compile=True)
    images = random_images(batch=32, seed=1)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # compiled once, at the first step
        losses = mae.fit(images, batch_size=8, epochs=4, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    # Each graph break met once: no trace of the whole forward pass was thrown away
    # (Keras' wrapper around train_step), and the optimizer's update is not traced.
    breaks = {reason.splitlines()[0]: count for reason, count in counters["graph_break"].items()}
    assert len(breaks) == 2 and set(breaks.values()) == {1}, breaks
    assert any("backward()" in reason for reason in breaks) and any("disable" in reason for reason in breaks), breaks

    masks = torch.compile(lambda x: mae(x, training=True)["mask"])
    x = torch.as_tensor(images[:8])
    first, second = masks(x), masks(x)
    removed = 1 - mae.masking.num_keep / mae.masking.num_patches
    np.testing.assert_allclose(keras.ops.convert_to_numpy(first).mean(axis=1), removed)
    assert not torch.equal(first, second)


@torch_only
def test_the_learning_rate_schedule_compiles_once():
    """Keras' CosineDecay branches with `ops.cond` (a graph break, and a recompile per
    step from its new op name); the optimizer's step runs it every step."""
    import torch

    from keras_mae.optimizers import WarmupCosineDecay

    schedule = WarmupCosineDecay(0.0, decay_steps=6, warmup_target=0.1, warmup_steps=3)
    assert graphs_and_breaks(schedule, torch.tensor(1)) == (1, 0)
    torch._dynamo.reset()
    compiled = torch.compile(schedule, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        rates = [float(compiled(torch.tensor(step))) for step in range(12)]
    assert rates == pytest.approx([float(schedule(step)) for step in range(12)])
