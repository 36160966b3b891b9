"""Which GEMM a quantized Linear runs (a helper module of :mod:`fp8_optimization`): what each kernel needs from the
device, and the once-per-process self-test that refuses a numerically wrong path."""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from .quant_formats import Kernel, relative_error

log = logging.getLogger(__name__)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def unsupported_reason(kernel: Kernel, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``kernel`` cannot run on ``device`` for inputs of ``dtype`` (None when it can)."""
    if kernel is Kernel.DENSE:
        return None
    if device.type != "cuda":
        return f"needs a CUDA GPU, the input is on {device.type}"
    major, minor = cuda_capability(device)
    if kernel is Kernel.NVFP4_NATIVE:
        if (major, minor) < (10, 0) or not hasattr(torch, "float4_e2m1fn_x2"):
            return f"needs compute capability 10.0+ and torch.float4_e2m1fn_x2 (this GPU: {major}.{minor})"
        return None if dtype in (torch.bfloat16, torch.float16) else f"needs bf16/fp16 inputs, got {dtype}"
    if (major, minor) < (9, 0) and (major, minor) != (8, 9):
        return f"needs compute capability 8.9 or 9.0+ (this GPU: {major}.{minor})"
    return None


_SELF_TEST_TOLERANCE = {Kernel.DENSE: 2e-2, Kernel.FP8_ROWWISE: 0.1, Kernel.FP8_TENSORWISE: 0.1,
                        Kernel.NVFP4_NATIVE: 0.3}


@functools.cache
def self_test(cls: type, kernel: Kernel, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Run one small ``cls`` layer (3-D input, N and K needing padding) through ``kernel`` on ``device``.

    Returns None when the output matches ``F.linear`` in float32 on the layer's dequantized weight (so only the
    kernel's own error counts), else the reason. Cached: runs once per process, class, kernel, device and dtype.
    """
    gen = torch.Generator().manual_seed(0)
    n, k, m = 72, 272, 37
    weight = torch.randn(n, k, generator=gen) * torch.logspace(-2, 0, n)[:, None]
    bias = torch.randn(n, generator=gen)
    x = torch.randn(2, m, k, generator=gen).to(device=device, dtype=dtype)
    layer = cls.from_weight(weight.to(device), bias.to(device), layer_name=f"self-test of {cls.mode.value}")
    layer.kernel_override = kernel
    try:
        with torch.no_grad():
            y = layer(x)
    except (RuntimeError, ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    ref = F.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
    err, limit = relative_error(y.float(), ref), _SELF_TEST_TOLERANCE[kernel]
    return None if err <= limit else f"output differs from the float32 reference by {err:.3g} (limit {limit})"


@functools.cache
def select_kernel(cls: type, device: torch.device, dtype: torch.dtype) -> Kernel:
    """The first of ``cls.kernels`` that ``device`` supports and that passes :func:`self_test`.

    Logs one line when a preferred kernel is skipped; raises RuntimeError when none passes.
    """
    reasons = []
    for kernel in cls.kernels:
        why = unsupported_reason(kernel, device, dtype) or self_test(cls, kernel, device, dtype)
        if why is None:
            if reasons:
                log.warning("quantization %s on %s (%s): %s; running %s", cls.mode.value, device, dtype,
                            "; ".join(reasons), kernel.value)
            return kernel
        reasons.append(f"{kernel.value} skipped ({why})")
    raise RuntimeError(f"quantization {cls.mode.value}: no kernel is numerically correct on {device} for {dtype}: "
                       f"{'; '.join(reasons)}. Choose another quantization mode.")
