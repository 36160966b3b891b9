"""Generated kernels for small pure tensor functions (a helper module of :mod:`fp8_optimization`, also used by the
DiT's per-token steps in :mod:`wanvideo.layers`).

:func:`fused` runs a function as ``torch.compile``-generated (Triton) kernels on CUDA, so a chain of elementwise
ops and row reductions reads its inputs once and writes its outputs once, with no float32 temporaries in memory;
on other devices, without Triton, or inside :func:`eager_kernels` the same function runs eagerly. The eager run is
the reference: both compute the same expression (the generated kernels may order a reduction differently).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

_RECOMPILE_LIMIT = 64  # compiled kernels per function: shapes, dtypes, batch of 1 or more, layouts

_EAGER = ContextVar("infinitetalk_eager_kernels", default=False)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def eager_kernels(enabled: bool = True) -> Iterator[None]:
    """Inside (when ``enabled``; this thread / task only), :func:`fused` functions run eagerly: no generated
    (Triton) kernels, only torch's own, at the cost of more passes over the tensors (the sampler's
    ``use_cublas_gemm``)."""
    token = _EAGER.set(enabled)
    try:
        yield
    finally:
        _EAGER.reset(token)


@functools.cache
def _triton_supports(device: torch.device) -> bool:
    """Triton generates code for compute capability 7.0 and newer only."""
    return torch.cuda.get_device_capability(device) >= (7, 0)


def runs_compiled(first: torch.Tensor) -> bool:
    """Whether a :func:`fused` function called with ``first`` runs as generated kernels: a CUDA GPU Triton supports
    (compute capability 7.0+), Triton installed, outside :func:`eager_kernels`, and not while ``torch.compile``
    traces the caller (a compiled block, the WanVideoTorchCompileSettings node: there the function is traced inline
    and fused with its neighbours)."""
    return (first.is_cuda and _triton_available() and not _EAGER.get() and not torch.compiler.is_compiling()
            and _triton_supports(first.device))


def fused(dynamic_rows: bool = False) -> Callable[[Callable], Callable]:
    """Run the decorated function (positional tensor / constant arguments, first one a tensor) as generated kernels
    where :func:`runs_compiled`, eagerly otherwise.

    Shapes are static by default (one kernel per weight shape, tuned for it). With ``dynamic_rows`` every dim but
    the last of each tensor argument stays symbolic where its size is above 1 (tokens, batch, frames), so all
    sequence lengths and batch sizes share one kernel per channel width; the last dim (channels) stays static.
    """
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(first: torch.Tensor, *args):
            if not runs_compiled(first):
                return fn(first, *args)
            if dynamic_rows:
                for tensor in (first, *args):
                    if isinstance(tensor, torch.Tensor):
                        for dim in range(tensor.dim() - 1):
                            if tensor.shape[dim] > 1:
                                torch._dynamo.maybe_mark_dynamic(tensor, dim)
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                return _compiled(fn)(first, *args)

        return call

    return wrap
