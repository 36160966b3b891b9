"""Run-time settings of the quantized Linears and of torch's matmul precision (a helper module of
:mod:`fp8_optimization`): the sampler's ``use_cublas_gemm``, ``fuse_qkv_projections``, ``force_contiguous_tensors``,
``use_tf32`` and ``fp16_fast`` switches, scoped to one run (a context variable: this thread / task only)."""
from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch

from .compiled_kernels import eager_kernels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearRuntime:
    """Per-run switches (the sampler's extra inputs). ``cublas_only``: no generated (Triton) kernels, so the only
    kernels of a quantized layer are cuBLAS/cuBLASLt GEMMs and the DiT's per-token steps run as torch's own
    (``use_cublas_gemm``; ``compiled_kernels.eager_kernels``); ``fuse_qkv``:
    ``fp8_optimization.projections`` runs the q/k/v projections as one GEMM (``fuse_qkv_projections``);
    ``report_layouts``: log once per layer an input that needed a layout copy before its GEMM
    (``force_contiguous_tensors``)."""

    cublas_only: bool = False
    fuse_qkv: bool = False
    report_layouts: bool = False


_RUNTIME: ContextVar[tuple[LinearRuntime, set]] = ContextVar("infinitetalk_linear_runtime",
                                                             default=(LinearRuntime(), set()))


@contextlib.contextmanager
def linear_runtime(settings: LinearRuntime) -> Iterator[None]:
    """Apply ``settings`` to every Linear call inside (this thread / task only)."""
    token = _RUNTIME.set((settings, set()))
    try:
        with eager_kernels(settings.cublas_only):
            yield
    finally:
        _RUNTIME.reset(token)


def report_layout(layer: str, x: torch.Tensor, fix: str) -> None:
    """Under ``report_layouts``: log, once per layer and run, that ``layer`` got input ``x`` needing ``fix``."""
    settings, reported = _RUNTIME.get()
    if settings.report_layouts and layer not in reported:
        reported.add(layer)
        log.info("force_contiguous_tensors: %s got input %s with strides %s at address %#x; %s before the GEMM",
                 layer, tuple(x.shape), x.stride(), x.data_ptr(), fix)


def current_runtime() -> LinearRuntime:
    """The settings of the innermost :func:`linear_runtime` (defaults outside one)."""
    return _RUNTIME.get()[0]


@contextlib.contextmanager
def matmul_precision(tf32: bool = False, fp16_accumulation: bool = False) -> Iterator[None]:
    """Inside: float32 matmuls and cuDNN convolutions may use TF32 (``tf32``), and fp16 GEMMs may accumulate in
    fp16 (``fp16_accumulation``, the ``fp16_fast`` base precision; only where the torch build has the flag). The
    process-wide flags are restored on exit."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, getattr(matmul, "allow_fp16_accumulation", None))
    if fp16_accumulation and saved[2] is None:
        log.warning("fp16_fast: this torch build has no fp16 accumulation flag; using plain fp16 GEMMs")
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = tf32, tf32
        if saved[2] is not None:
            matmul.allow_fp16_accumulation = fp16_accumulation
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved[0], saved[1]
        if saved[2] is not None:
            matmul.allow_fp16_accumulation = saved[2]
