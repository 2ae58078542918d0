"""The torch backend's oneDNN matmuls (`keras_mae.onednn`) compute what Keras' Dense does."""

import keras
import numpy as np
import pytest

from conftest import random_images, tiny_mae
from keras_mae import onednn
from keras_mae.layers import Dense

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch backend path")


@pytest.fixture
def onednn_setting(monkeypatch):
    """Sets KERAS_MAE_ONEDNN_LINEAR for one test and forgets the cached decision after it."""

    monkeypatch.setattr(onednn, "MIN_MULTIPLY_ADDS", 0)  # these tests' layers are tiny

    def choose(value):
        monkeypatch.setenv(onednn.ENV_VARIABLE, value)
        onednn.onednn_linear_enabled.cache_clear()
        return onednn.onednn_linear_enabled()

    yield choose
    monkeypatch.undo()
    onednn.onednn_linear_enabled.cache_clear()


def needs_onednn():
    import torch

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("this torch build has no oneDNN linear")


@pytest.mark.parametrize(
    "input_shape,units,bias,kernel_grad,expanded_grad",
    [
        ((37, 24), 8, True, True, False),
        ((37, 8), 24, True, True, False),
        ((2, 5, 8), 12, False, True, False),
        ((37, 24), 8, True, False, False),
        ((37, 24), 8, True, True, True),
    ],
)
def test_linear_matches_torch_in_outputs_and_gradients(input_shape, units, bias, kernel_grad, expanded_grad):
    """Both weight-gradient layouts (tall and wide kernels), N-D inputs, no bias, a frozen
    kernel, and the stride-0 gradient that `y.sum()` sends back."""
    needs_onednn()
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*input_shape, generator=generator, requires_grad=True)
    kernel = torch.randn(input_shape[-1], units, generator=generator, requires_grad=kernel_grad)
    b = torch.randn(units, generator=generator, requires_grad=True) if bias else None
    upstream = torch.randn(*input_shape[:-1], units, generator=generator)
    if expanded_grad:
        upstream = torch.tensor(1.5).expand(upstream.shape)
    tensors = [t for t in (x, kernel, b) if t is not None and t.requires_grad]

    def outputs_and_grads(function):
        y = function(x, kernel, b)
        return [y, *torch.autograd.grad(y, tensors, upstream)]

    expected = outputs_and_grads(lambda x, k, b: x @ k + (0 if b is None else b))
    got = outputs_and_grads(onednn.linear)
    assert got[0].shape == expected[0].shape
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.detach().numpy(), e.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_linear_takes_an_empty_batch():
    needs_onednn()
    import torch

    assert tuple(onednn.linear(torch.zeros(0, 8), torch.ones(8, 3)).shape) == (0, 3)


def onednn_calls(function):
    from torch.profiler import profile

    with profile() as profiler:
        function()
    return sum(event.count for event in profiler.key_averages() if "_linear_pointwise" in event.key)


@pytest.mark.parametrize("enabled", ["1", "0"])
def test_dense_uses_onednn_only_when_enabled_and_matches_keras_dense(onednn_setting, enabled):
    needs_onednn()
    import torch

    assert onednn_setting(enabled) is (enabled == "1")
    ours, keras_dense = Dense(6, activation="relu"), keras.layers.Dense(6, activation="relu")
    x = np.random.default_rng(0).normal(size=(3, 4, 8)).astype("float32")
    ours.build(x.shape), keras_dense.build(x.shape)
    keras_dense.set_weights(ours.get_weights())

    def forward_backward(layer):
        y = layer(x)
        y.sum().backward()
        return y

    assert onednn_calls(lambda: forward_backward(ours)) == (2 if enabled == "1" else 0)  # forward, kernel grad (x needs none)
    ours.kernel.value.grad = None
    np.testing.assert_allclose(
        forward_backward(ours).detach().numpy(), forward_backward(keras_dense).detach().numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(ours.kernel.value.grad.numpy(), keras_dense.kernel.value.grad.numpy(), rtol=1e-5)
    with torch.no_grad():
        assert onednn_calls(lambda: ours(x)) == (1 if enabled == "1" else 0)


def test_small_matmuls_keep_torchs_path(onednn_setting, monkeypatch):
    # oneDNN's fixed cost per call outweighs its faster kernels below MIN_MULTIPLY_ADDS.
    needs_onednn()
    onednn_setting("1")
    monkeypatch.setattr(onednn, "MIN_MULTIPLY_ADDS", 1 << 25)
    layer = Dense(512)
    small, large = np.ones((64, 512), "float32"), np.ones((128, 512), "float32")  # 2^24 and 2^25
    layer.build(small.shape)
    assert onednn_calls(lambda: layer(small)) == 0
    assert onednn_calls(lambda: layer(large)) == 1
    np.testing.assert_allclose(layer(small).detach().numpy(), layer(large).detach().numpy()[:64], rtol=1e-5, atol=1e-5)


def test_dense_keeps_keras_path_in_bfloat16(onednn_setting):
    needs_onednn()
    onednn_setting("1")
    layer = Dense(4, dtype="mixed_bfloat16")
    x = np.ones((2, 8), "float32")
    assert onednn_calls(lambda: layer(x)) == 0
    assert str(layer(x).dtype) == "torch.bfloat16"


def test_one_training_step_is_the_same_with_and_without_onednn(onednn_setting):
    """The speed path trains the same model: loss and updated weights agree."""
    needs_onednn()
    images = random_images(batch=4)
    results = []
    for enabled in ("0", "1"):
        onednn_setting(enabled)
        keras.utils.set_random_seed(0)
        mae = tiny_mae()
        mae.compile(optimizer=keras.optimizers.SGD(0.1))
        loss = mae.train_on_batch(images, return_dict=True)["loss"]
        results.append((loss, [w.copy() for w in mae.get_weights()]))
    (loss_mkl, weights_mkl), (loss_onednn, weights_onednn) = results
    np.testing.assert_allclose(loss_onednn, loss_mkl, rtol=1e-5)
    for a, b in zip(weights_onednn, weights_mkl):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "vendor,capability,expected",
    [
        ("AuthenticAMD", "AVX512", True),  # Zen 4, Zen 5: MKL runs its AVX2 kernels there
        ("AuthenticAMD", "AVX2", False),  # Zen 3: MKL's AVX2 kernels are as fast as oneDNN's
        ("GenuineIntel", "AVX512", False),  # MKL's home
        ("HygonGenuine", "AVX512", True),
        (None, "AVX512", False),  # unknown vendor: keep torch's default
        ("AuthenticAMD", "DEFAULT", False),
    ],
)
def test_mkl_is_slow_only_on_other_vendors_cpus_with_avx512(vendor, capability, expected):
    assert onednn.mkl_is_slow_on(vendor, capability) is expected


@pytest.mark.parametrize("capability,expected", [("AVX512", True), ("AVX2", False)])
def test_unset_setting_follows_the_cpu(onednn_setting, monkeypatch, capability, expected):
    needs_onednn()
    import torch

    monkeypatch.setattr(onednn.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert onednn_setting("") is expected


def test_bad_setting_is_a_clear_error(onednn_setting):
    with pytest.raises(ValueError, match="KERAS_MAE_ONEDNN_LINEAR must be 0, 1 or unset"):
        onednn_setting("yes")
