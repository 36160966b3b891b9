"""Thin wrappers over the attention kernels used by :mod:`attention` (its helper module): torch SDPA per back-end
(with the key mask for padded keys and the per-call ``can_use_*`` check), and the optional third-party packages.

Every third-party ``*_run(q, k, v, k_lens)`` receives q/k/v already contiguous, 16-byte aligned and in a supported dtype, in the
layout its kernel is registered with in ``attention._KERNELS`` (NHD = [B, L, H, D] unless noted), and returns the
kernel's output in that layout. ``k_lens`` is always None here (these kernels are not ``masked``: padded keys are
sliced off per batch element by the caller). Packages are imported on first use, never at import time.
Probes return why an installed package cannot be used (wrong major version, a known-bad build) or None.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import zlib
from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDNN_SEQ_FIX = 91500  # cuDNN runtimes above 9.15.0 fixed SDPA for lengths that are not multiples of 128


# ------------------------------------------------------------------------------------------------ torch SDPA

def key_mask(k_lens: torch.Tensor, lk: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [B, 1, 1, Lk]: True where the key is kept."""
    keep = torch.arange(lk, device=device)[None, :] < k_lens.to(device)[:, None]
    return keep[:, None, None, :]


def sdpa_run(backend: Optional[SDPBackend]) -> Callable:
    """SDPA on NHD-contiguous operands viewed as [B, H, L, D] (the strides cuDNN wants); output NHD-strided."""
    def run(q, k, v, k_lens):
        mask = None if k_lens is None else key_mask(k_lens, k.shape[1], q.device)
        with sdpa_kernel([backend]) if backend is not None else nullcontext():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask)
        return out.transpose(1, 2)

    return run


def sdpa_accepts(backend: SDPBackend) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]:
    """Per-call check with torch's own ``can_use_*`` for ``backend`` (operands NHD contiguous)."""
    checker = {SDPBackend.FLASH_ATTENTION: "can_use_flash_attention",
               SDPBackend.EFFICIENT_ATTENTION: "can_use_efficient_attention",
               SDPBackend.CUDNN_ATTENTION: "can_use_cudnn_attention"}[backend]

    def accepts(q, k, v):
        if backend is SDPBackend.CUDNN_ATTENTION and not cudnn_lengths_ok(q.shape[1], k.shape[1]):
            return False
        check = getattr(torch.backends.cuda, checker, None)
        if check is None:
            return True
        params = torch.backends.cuda.SDPAParams(*(t.transpose(1, 2) for t in (q, k, v)), None, 0.0, False, False)
        with sdpa_kernel([backend]):  # inside, as at run time: a back-end off by default is switched on
            return bool(check(params, False))

    return accepts


def cudnn_lengths_ok(lq: int, lk: int) -> bool:
    """cuDNN SDPA before 9.15.1 fails (memory errors) when a length is not a multiple of 128 (pytorch#169849)."""
    version = torch.backends.cudnn.version() or 0
    return version > CUDNN_SEQ_FIX or (lq % 128 == 0 and lk % 128 == 0)


# ------------------------------------------------------------------------------------- third-party packages

SAGE1_INSTALL = "pip install sageattention"
SAGE2_INSTALL = ("build SageAttention 2 from source: git clone https://github.com/thu-ml/SageAttention && "
                 "cd SageAttention && pip install --no-build-isolation . (on Hopper from a commit at or after "
                 "ff71e1e)")
SAGE3_INSTALL = ("build sageattention3_blackwell from https://github.com/thu-ml/SageAttention (RTX 50xx / RTX PRO "
                 "6000, CUDA >= 12.8): cd sageattention3_blackwell && pip install --no-build-isolation .")
FLASH2_INSTALL = "pip install flash-attn --no-build-isolation"
FLASH3_INSTALL = ("build FlashAttention 3: git clone https://github.com/Dao-AILab/flash-attention && "
                  "cd flash-attention/hopper && python setup.py install")
FLASH4_INSTALL = "pip install flash-attn-4"
TRITON_INSTALL = "pip install triton"

SAGE2_BAD_HOPPER_RELEASES = ("2.2.0",)  # the v2.2.0 tag: sm90 op name rebound to its fake impl (kernels.md §3.2)
SM90_OP = "qk_int8_sv_f8_accum_f32_fuse_v_scale_attn_inst_buf"

Probe = Callable[[torch.device], Optional[str]]


@functools.cache
def load(module: str):
    """Import ``module`` once (raises ImportError/OSError when it is installed but broken)."""
    return importlib.import_module(module)


def installed(module: str) -> bool:
    """Whether ``module`` (dotted names allowed) can be found, without importing it beyond its parents."""
    parts = module.split(".")
    return all(importlib.util.find_spec(".".join(parts[:i])) is not None for i in range(1, len(parts) + 1))


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _output(result) -> torch.Tensor:
    """Some kernels return ``(out, lse)`` depending on their version; keep the output."""
    return result[0] if isinstance(result, (tuple, list)) else result


def sage2_run(q, k, v, k_lens):
    """SageAttention 2 auto-dispatch (sm80/86/89/90/120), NHD; does not modify its inputs."""
    return load("sageattention").sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def sage1_run(q, k, v, k_lens):
    """SageAttention 1 (Triton), NHD; subtracts the key mean from ``k`` IN PLACE (the caller passes a copy)."""
    return load("sageattention").sageattn(q, k, v, tensor_layout="NHD", is_causal=False, smooth_k=True)


def sage3_run(q, k, v, k_lens):
    """SageAttention 3 FP4 (sm120/121), HND [B, H, L, D]; modifies ``k`` IN PLACE (the caller passes a copy)."""
    return load("sageattn3").sageattn3_blackwell(q, k, v, is_causal=False, per_block_mean=True)


def flash2_run(q, k, v, k_lens):
    """FlashAttention 2, NHD."""
    return _output(load("flash_attn").flash_attn_func(q, k, v, dropout_p=0.0, causal=False))


def flash3_run(q, k, v, k_lens):
    """FlashAttention 3 (Hopper), NHD."""
    return _output(load("flash_attn_interface").flash_attn_func(q, k, v, causal=False))


def flash4_run(q, k, v, k_lens):
    """FlashAttention 4 (CuTe DSL, compiled on first call), NHD."""
    return _output(load("flash_attn.cute").flash_attn_func(q, k, v, causal=False))


def triton_fp8_run(q, k, v, k_lens):
    """The pack's Triton INT8-QK / FP8-PV attention (sm_90), NHD."""
    from . import attention_triton

    return attention_triton.fp8_attention(q, k, v)


def triton_fp8_rows(q, k, v):
    """The same, written as e4m3 rows with their scale for an fp8 row-wise GEMM."""
    from . import attention_triton

    return attention_triton.fp8_attention_rows(q, k, v)


def key_lengths(k_lens: torch.Tensor, batch: int, lk: int) -> list[int]:
    """``k_lens`` (one key count per batch element) as a checked list."""
    lens = [int(n) for n in k_lens.reshape(-1).tolist()]
    if len(lens) != batch or any(n < 1 or n > lk for n in lens):
        raise ValueError(f"k_lens must hold {batch} key counts in 1..{lk}, got {lens}")
    return lens


def self_test_inputs(name: str, lengths: tuple[int, int], d: int, dtype: torch.dtype, device: torch.device):
    """Gaussian q [2, Lq, 3, d] (a transposed slice), k [2, Lk, 3, d] (contiguous: a kernel writing into it is
    caught) and v (a slice of an interleaved buffer) in ``dtype`` on ``device``, seeded by the kernel name."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    lq, lk = lengths
    q = torch.randn(2, 3, lq + 5, d, generator=gen).to(dtype).to(device).transpose(1, 2)[:, 5:]
    kv = torch.randn(2, lk, 2, 3, d, generator=gen).to(dtype).to(device)
    return q, kv[:, :, 0].contiguous(), kv[:, :, 1]


def sage_probe(major: int) -> Probe:
    """Probe for the SageAttention kernel of ``major`` version 1 or 2 (both ship as ``sageattention``)."""
    def probe(device: torch.device) -> Optional[str]:
        is_v2 = hasattr(load("sageattention"), "sageattn_qk_int8_pv_fp16_cuda")
        version = dist_version("sageattention")
        if major == 2 and not is_v2:
            return f"the installed sageattention {version} is SageAttention 1; for SageAttention 2 {SAGE2_INSTALL}"
        if major == 1 and is_v2:
            return f"the installed sageattention {version} is SageAttention 2 (it runs as sage2)"
        if major == 2 and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9 \
                and sage2_hopper_release_bug(version):
            return (f"sageattention {version} is the release whose Hopper kernel returns uninitialised output "
                    f"(thu-ml/SageAttention#320); rebuild it from a commit at or after ff71e1e")
        return None

    return probe


def sage2_hopper_release_bug(version: str) -> bool:
    """True for the 2.2.0 release build, whose sm90 op binding is a plain Python function (the fake impl that
    never launches the kernel); fixed builds report 2.2.0 too, so the binding itself is checked."""
    if not version.startswith(SAGE2_BAD_HOPPER_RELEASES) or not installed("sageattention.sm90_compile"):
        return False
    return inspect.isfunction(getattr(load("sageattention.sm90_compile"), SM90_OP, None))


def has_attr_probe(module: str, attr: str, what: str) -> Probe:
    """Probe that rejects an installed ``module`` lacking ``attr`` (e.g. flash-attn-4 alone provides no FA2)."""
    def probe(device: torch.device) -> Optional[str]:
        if not hasattr(load(module), attr):
            return f"the installed {module} ({dist_version(module.split('.')[0].replace('_', '-'))}) is not {what}"
        return None

    return probe

