"""float32 matmuls of the torch backend through oneDNN on CPUs where MKL is slow.

PyTorch multiplies float32 matrices on a CPU with Intel's MKL, which runs its AVX-512
kernels only on Intel's CPUs: on this project's AMD EPYC (Zen 5, 2 cores) its `sgemm`
reached 190-225 GFLOP/s for the ViT's projection shapes (the same with `MKL_CBWR` or
`MKL_ENABLE_INSTRUCTIONS` set), while oneDNN, the other matrix library in every x86
build of torch (torch's own bf16 matmuls and its compiler's CPU kernels use it), reached
365-465 on the same shapes. `keras_mae.layers.Dense` therefore sends its float32
matmul, forward and backward, through `torch.ops.mkldnn._linear_pointwise` on x86 CPUs
with AVX-512 that are not Intel's, and keeps torch's default everywhere else: Intel
CPUs, where MKL is at home (on an Intel Xeon (Emerald Rapids) the two ran these shapes
within 3 % of each other); AVX2-only CPUs, where MKL's AVX2 kernels are as fast as
oneDNN's (on a Zen 3 EPYC the seven projection shapes of configurations T and K took
75-79 ms in MKL against 80-83 in oneDNN, and training steps at T ran 1.13x faster in
MKL, which takes the weight gradient's transposed operand without oneDNN's copy);
GPUs; other backends; bf16, which torch already gives oneDNN; `torch.compile`, which
picks its own kernels.

Each call to oneDNN costs some 0.1 ms more than torch's, so matmuls smaller than
`MIN_MULTIPLY_ADDS` (a batch of a few images through a small ViT) keep torch's: at
`(64, 96) @ (96, 384)` a forward and backward pass took 0.33 ms in oneDNN against 0.26
in torch, at `(1024, 128) @ (128, 512)` 2.6 against 4.1 (Zen 4, 2 cores).

`KERAS_MAE_ONEDNN_LINEAR=1` forces oneDNN on (to try it on another CPU), `=0` off.
"""

import functools
import os
import platform

import keras

from keras_mae import torch_compile

ENV_VARIABLE = "KERAS_MAE_ONEDNN_LINEAR"
MIN_MULTIPLY_ADDS = 1 << 25  # rows x inputs x outputs; where oneDNN began to win (module)


def cpu_vendor():
    """The x86 vendor string ('GenuineIntel', 'AuthenticAMD', ...), or None if unknown."""
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    for vendor in ("GenuineIntel", "AuthenticAMD"):  # Windows names it in platform.processor()
        if vendor in platform.processor():
            return vendor
    return None


@functools.cache
def onednn_linear_enabled():
    """Whether float32 CPU matmuls of `keras_mae.layers.Dense` go through oneDNN (see module)."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    choice = os.environ.get(ENV_VARIABLE, "").strip()
    if choice not in ("", "0", "1"):
        raise ValueError(f"{ENV_VARIABLE} must be 0, 1 or unset, got {choice!r}.")
    if choice:
        return choice == "1" and available
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return available and x86 and mkl_is_slow_on(cpu_vendor(), torch.backends.cpu.get_cpu_capability())


def mkl_is_slow_on(vendor, capability):
    """Whether MKL leaves a CPU's widest vectors unused: it runs AVX-512 code only on
    Intel's, so an x86 CPU of another vendor (`vendor`, as `cpu_vendor` names it) whose
    ATen `capability` is AVX-512 gets MKL's AVX2 kernels and half its arithmetic."""
    return vendor not in (None, "GenuineIntel") and capability.upper().startswith("AVX512")


def onednn_linear_applies(inputs, kernel):
    """Whether `linear` should compute `inputs @ kernel` (torch tensors)."""
    # Under torch.compile first: inductor lowers the op only for frozen weights, and
    # the checks below would break the graph (dynamo does not trace mkldnn.is_available).
    if torch_compile.compiling() or not onednn_linear_enabled():
        return False
    import torch

    return (
        inputs.device.type == "cpu"
        and inputs.dtype == kernel.dtype == torch.float32
        and inputs.ndim >= 2
        and inputs.numel() * kernel.shape[-1] >= MIN_MULTIPLY_ADDS
    )


@functools.cache
def _linear_function():
    import torch

    onednn_linear = torch.ops.mkldnn._linear_pointwise

    def matmul_transposed(a, b):
        """`a @ b.T` in oneDNN, which takes strided (transposed) views without copying."""
        return onednn_linear(a, b, None, "none", [], "")

    class OneDNNLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, kernel, bias):
            ctx.save_for_backward(x, kernel)
            ctx.has_bias = bias is not None
            return onednn_linear(x, kernel.t(), bias, "none", [], "")

        @staticmethod
        def backward(ctx, grad):
            x, kernel = ctx.saved_tensors
            # `y.sum()` sends back a stride-0 view of one value, which oneDNN multiplies
            # some 360x slower than the same values laid out (a (4352, 192) @ (192, 576)
            # forward and backward: 7 s against 20 ms).
            grad = grad.contiguous()
            grad_x = grad_kernel = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_x = matmul_transposed(grad, kernel)
            if ctx.needs_input_grad[1]:
                # x.T @ grad; oneDNN is fastest with the larger dimension of the result
                # last (up to 1.9x on the ViT's shapes), so for a tall kernel compute the
                # transpose, grad.T @ x, and hand back its view.
                if kernel.shape[0] >= kernel.shape[1]:
                    grad_kernel = matmul_transposed(grad.t(), x.t()).t()
                else:
                    grad_kernel = matmul_transposed(x.t(), grad.t())
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad.sum(0)
            return grad_x, grad_kernel, grad_bias

    return OneDNNLinear.apply


def linear(inputs, kernel, bias=None):
    """`inputs @ kernel + bias` for torch tensors `(..., k)`, `(k, n)`, `(n,)`, in oneDNN,
    with its own gradients (the same as torch's `addmm`, to float32 rounding)."""
    leading = inputs.shape[:-1]
    outputs = _linear_function()(inputs.reshape(-1, inputs.shape[-1]), kernel, bias)
    return outputs.reshape(*leading, kernel.shape[-1])
