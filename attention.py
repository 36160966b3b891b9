"""Attention back-ends: one entry point, one layout contract, a registry of kernels checked against the device.

Contract of every back-end returned by :func:`resolve`::

    backend(q, k, v, k_lens=None) -> out
    q: [B, Lq, H, D], k and v: [B, Lk, H, D] (any strides, any storage offset), same dtype and device.
    k_lens: optional int tensor [B] (values in 1..Lk): keys at positions >= k_lens[b] are ignored for batch b.
    out: [B, Lq, H, D], contiguous, dtype of q. Scale is 1/sqrt(D), no dropout, no causal mask.

The back-end owns every transpose, cast and copy its kernel needs; callers pass views freely. Each kernel
(:class:`KernelSpec`) declares its contract: device, compute capabilities, dtypes, head dims, layout (NHD = [B, L, H, D]
or HND = [B, H, L, D]) and whether it overwrites K. Operands reach it contiguous in that layout, 16-byte aligned,
in a dtype it supports, and K is a private copy when the kernel writes into it.

Each mode maps to a chain of candidate kernels. :func:`resolve` checks each ONCE against the device (capability,
dtype, installed package and version), self-tests it against float32 math and keeps the passing ones: the first is
the mode's kernel (``AttentionBackend.kernel``), the rest take the calls it cannot take (e.g. the VAE's head dim of
384). Skips and mode mappings are logged in one line per (mode, device, dtype). The model receives the resolved
object when it is built; there is no global active back-end.
"""
from __future__ import annotations

import enum
import functools
import logging
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch.nn.attention import SDPBackend

from . import attention_kernels as ext

log = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ALIGN_BYTES = 16
MATH_CHUNK_ELEMENTS = 1 << 26  # logits held at once by the math kernel (256 MiB of float32)
PROBE_TOKENS = 32760  # the sequence length at which an 8-bit kernel must beat the exact one (480p, 81 frames)
# H100, 32760 queries x 40 heads: the Triton 8-bit kernel (with its quantization) took 1.11 / 1.00 / 4.30 / 7.67 ms
# for 512 / 257 / 4096 / 8192 keys against cuDNN's 0.61 / 0.51 / 4.18 / 8.76 ms (benchmarks/RESULTS.md): the text,
# CLIP and audio cross-attention run the exact kernel
TRITON_FP8_MIN_KEYS = 6144
KERNEL_ERRORS = (RuntimeError, ValueError, TypeError, AssertionError, ImportError, OSError, ArithmeticError,
                 LookupError, AttributeError)  # what a third-party kernel may raise when it cannot run


class AttentionMode(str, enum.Enum):
    """The loader's ``attention_mode`` choices, in UI order (upstream's list, then the two added)."""

    SDPA = "sdpa"
    FLASH_ATTN_2 = "flash_attn_2"
    FLASH_ATTN_3 = "flash_attn_3"
    SAGEATTN = "sageattn"
    SAGEATTN_3 = "sageattn_3"
    RADIAL_SAGE_ATTENTION = "radial_sage_attention"
    SAGEATTN_COMPILED = "sageattn_compiled"
    SAGEATTN_ULTRAVICO = "sageattn_ultravico"
    COMFY = "comfy"
    SAGEATTN_3_FP4 = "sageattn_3_fp4"
    SAGEATTN_3_FP8 = "sageattn_3_fp8"

    @classmethod
    def parse(cls, value: str) -> "AttentionMode":
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown attention_mode {value!r}; choose one of: {choices}") from None


ATTENTION_MODES = tuple(m.value for m in AttentionMode)

KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class Layout(str, enum.Enum):
    """Operand layout a kernel reads and writes: NHD = [B, L, H, D], HND = [B, H, L, D]."""

    NHD = "NHD"
    HND = "HND"


@dataclass(frozen=True)
class KernelSpec:
    """One attention kernel and its declared input contract.

    ``run(q, k, v, k_lens)`` gets q/k/v contiguous in ``layout`` and returns the output in ``layout``; ``k_lens`` is
    passed only to ``masked`` kernels (the others get one call per batch element with the keys sliced). ``ccs``:
    allowed CUDA compute capabilities (None = any at or above ``min_cc``). ``probe(device)`` returns why an installed
    package cannot be used (version, broken build) or None; ``accepts(q, k, v)`` is the per-call shape check on the
    prepared operands. ``min_keys``: calls with fewer keys run the next kernel of the chain that takes them (where
    the kernel was measured slower than the exact ones; the self-test and a chain of one still run it).
    ``tolerance``: relative error bound of the self-test against float32 math. ``run_rows(q, k, v)``: the same
    attention written as e4m3 rows for an fp8 row-wise GEMM, ``(data [B, Lq, H, D], scale float32 [B·Lq, 1])``,
    where the kernel can (see :meth:`AttentionBackend.rows_e4m3`).
    """

    name: str
    label: str
    run: KernelFn
    devices: tuple[str, ...] = ("cuda",)
    min_cc: tuple[int, int] = (8, 0)
    ccs: Optional[tuple[tuple[int, int], ...]] = None
    dtypes: tuple[torch.dtype, ...] = HALF
    head_dims: Optional[tuple[int, ...]] = None
    max_head_dim: int = 256
    layout: Layout = Layout.NHD
    masked: bool = False
    mutates_k: bool = False
    package: Optional[str] = None
    install: str = ""
    probe: Optional[Callable[[torch.device], Optional[str]]] = None
    accepts: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]] = None
    min_keys: int = 0
    tolerance: float = 0.02
    reference: bool = False
    run_rows: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None


@dataclass(frozen=True)
class AttentionBackend:
    """A resolved attention back-end. ``requested`` is the UI mode, ``kernel`` names what really runs.

    ``chain`` holds every kernel that passed the device checks and the self-test, ``kernel`` first; the others take
    the calls whose shape or dtype ``kernel`` cannot take. ``notes`` say what was skipped or mapped and why.
    """

    requested: AttentionMode
    kernel: str
    fn: KernelFn
    chain: tuple[KernelSpec, ...] = ()
    notes: tuple[str, ...] = ()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_operands(q, k, v)
        return self.fn(q, k, v, k_lens)

    def rows_e4m3(self, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``self(q, k, v)`` written as the e4m3 activations of an fp8 row-wise GEMM (the output projection's):
        (data [B·Lq, H·D] e4m3 contiguous, scale float32 [B·Lq, 1]), output ≈ data · scale per row, when the
        kernel this call runs writes them itself (``KernelSpec.run_rows``); else None: the caller calls the
        back-end."""
        _check_operands(q, k, v)
        return _run_rows(self.chain, _allows_cast(self.requested), q, k, v)

    @property
    def fallbacks(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.chain[1:])

    def kernel_for(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
        """Name of the kernel a call with these operands (no key padding) runs."""
        _check_operands(q, k, v)
        return _pick(self.chain, q, k, v, _allows_cast(self.requested))[0].name

    def describe(self) -> str:
        """A few lines for the node UI: mode, the kernel that runs, fallbacks for other shapes, notes."""
        label = self.chain[0].label if self.chain else self.kernel
        text = f"attention_mode {self.requested.value}: runs {self.kernel} ({label})"
        if self.fallbacks:
            text += f"; shapes or dtypes it cannot take run {', '.join(self.fallbacks)}"
            if self.chain[0].min_keys:
                text += f" (also calls with fewer than {self.chain[0].min_keys} keys, where that is faster)"
        return text + "".join(f".\n{note}" for note in self.notes)


def _check_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, L, H, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention device mismatch: q {q.device}, k {k.device}, v {v.device}")


# ------------------------------------------------------------------------------------------- reference kernels

def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: Optional[torch.Tensor] = None,
                   chunk_elements: int = MATH_CHUNK_ELEMENTS) -> torch.Tensor:
    """Plain softmax(q kᵀ / sqrt(D)) v in float32 (the reference). q [B, Lq, H, D], k/v [B, Lk, H, D] any strides.

    Queries are processed in chunks so that at most ``chunk_elements`` logits exist at once. Returns
    [B, Lq, H, D] contiguous in q's dtype.
    """
    b, lq, h, d = q.shape
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))
    mask = None if k_lens is None else ext.key_mask(k_lens, k.shape[1], q.device)
    rows = max(1, chunk_elements // max(1, b * h * k.shape[1]))
    outs = []
    for start in range(0, lq, rows):
        logits = torch.matmul(qf[:, :, start:start + rows], kf.transpose(-1, -2)) / math.sqrt(d)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        outs.append(torch.matmul(logits.softmax(dim=-1), vf))
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype).contiguous()


# ---------------------------------------------------------------------------------------------- the registry

_SDPA_CCS = ((9, 0), (10, 0), (10, 3))
_ANY = 1 << 30

_KERNELS: dict[str, KernelSpec] = {spec.name: spec for spec in (
    KernelSpec("math", "float32 math reference", lambda q, k, v, n: math_attention(q, k, v, n), devices=("cpu",),
               min_cc=(0, 0), dtypes=(torch.float32,), max_head_dim=_ANY, masked=True, reference=True),
    KernelSpec("sdpa", "torch SDPA, torch's own back-end choice", ext.sdpa_run(None), devices=("cpu", "cuda"),
               min_cc=(0, 0), dtypes=FLOATS, max_head_dim=_ANY, masked=True, reference=True),
    KernelSpec("sdpa_cudnn", "torch SDPA, cuDNN back-end", ext.sdpa_run(SDPBackend.CUDNN_ATTENTION), ccs=_SDPA_CCS,
               accepts=ext.sdpa_accepts(SDPBackend.CUDNN_ATTENTION)),
    KernelSpec("sdpa_flash", "torch SDPA, flash back-end", ext.sdpa_run(SDPBackend.FLASH_ATTENTION),
               accepts=ext.sdpa_accepts(SDPBackend.FLASH_ATTENTION)),
    KernelSpec("sdpa_efficient", "torch SDPA, memory-efficient back-end", ext.sdpa_run(SDPBackend.EFFICIENT_ATTENTION),
               min_cc=(5, 0), dtypes=(torch.float32, *HALF), max_head_dim=_ANY,
               accepts=ext.sdpa_accepts(SDPBackend.EFFICIENT_ATTENTION)),
    KernelSpec("flash_attn_2", "FlashAttention 2 (flash_attn)", ext.flash2_run, package="flash_attn",
               install=ext.FLASH2_INSTALL,
               probe=ext.has_attr_probe("flash_attn", "flash_attn_func", "FlashAttention 2")),
    KernelSpec("flash_attn_3", "FlashAttention 3 (flash_attn_interface)", ext.flash3_run, ccs=((9, 0),),
               package="flash_attn_interface", install=ext.FLASH3_INSTALL),
    KernelSpec("flash_attn_4", "FlashAttention 4 (flash_attn.cute)", ext.flash4_run, ccs=_SDPA_CCS,
               max_head_dim=128, package="flash_attn.cute", install=ext.FLASH4_INSTALL),
    KernelSpec("sage2", "SageAttention 2 (INT8 QK, FP8 PV on sm89/sm90/sm120)", ext.sage2_run,
               ccs=((8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (12, 0), (12, 1)), max_head_dim=128,
               package="sageattention", install=ext.SAGE2_INSTALL, probe=ext.sage_probe(2), tolerance=0.08),
    KernelSpec("sage1", "SageAttention 1 (Triton, INT8 QK, FP16 PV)", ext.sage1_run, head_dims=(64, 96, 128),
               mutates_k=True, package="sageattention", install=ext.SAGE1_INSTALL, probe=ext.sage_probe(1),
               tolerance=0.08),
    KernelSpec("sage3_fp4", "SageAttention 3 (Blackwell FP4)", ext.sage3_run, ccs=((12, 0), (12, 1)),
               head_dims=(64, 128), layout=Layout.HND, mutates_k=True, package="sageattn3",
               install=ext.SAGE3_INSTALL, tolerance=0.3),
    KernelSpec("triton_fp8", "this pack's Triton INT8-QK / FP8-PV attention for sm_90",
               ext.triton_fp8_run, ccs=((9, 0),), head_dims=(64, 128), package="triton", install=ext.TRITON_INSTALL,
               min_keys=TRITON_FP8_MIN_KEYS, tolerance=0.08, run_rows=ext.triton_fp8_rows),
)}


@dataclass(frozen=True)
class ModeRoute:
    """``own``: the kernels that honour the mode, best first; ``rest``: fallbacks, fastest correct first;
    ``note``: said once (log and UI) when the mode runs a kernel other than its name suggests."""

    own: tuple[str, ...]
    rest: tuple[str, ...]
    note: str = ""


_TAIL = ("math", "sdpa")
_TORCH = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient")
_EXACT = ("flash_attn_3", "sdpa_cudnn", "flash_attn_2", "sdpa_flash", "sdpa_efficient") + _TAIL
_SAGE = ("sage2", "sage1", "triton_fp8")
_DENSE = "{mode} runs the dense SageAttention kernel: {what} is not implemented by this pack"
_ROUTES: dict[AttentionMode, ModeRoute] = {
    AttentionMode.SDPA: ModeRoute(_TORCH + _TAIL, ()),
    AttentionMode.FLASH_ATTN_2: ModeRoute(("flash_attn_2",), _EXACT),
    AttentionMode.FLASH_ATTN_3: ModeRoute(("flash_attn_3", "flash_attn_4"), _EXACT),
    AttentionMode.SAGEATTN: ModeRoute(_SAGE, _EXACT),
    AttentionMode.SAGEATTN_3: ModeRoute(("sage3_fp4",), _SAGE + _EXACT),
    AttentionMode.SAGEATTN_3_FP4: ModeRoute(("sage3_fp4",), _SAGE + _EXACT),
    AttentionMode.SAGEATTN_3_FP8: ModeRoute(_SAGE, _EXACT, "SageAttention 3 has no FP8 kernel: sageattn_3_fp8 runs "
                                            "the SageAttention 2 INT8-QK / FP8-PV kernel family"),
    AttentionMode.RADIAL_SAGE_ATTENTION: ModeRoute(_SAGE, _EXACT, _DENSE.format(mode="radial_sage_attention",
                                                                                what="the radial sparse mask")),
    AttentionMode.SAGEATTN_COMPILED: ModeRoute(_SAGE, _EXACT, "sageattn_compiled runs the sageattn kernels (they are "
                                               "compiled kernels already; the call is not wrapped in torch.compile)"),
    AttentionMode.SAGEATTN_ULTRAVICO: ModeRoute(_SAGE, _EXACT, _DENSE.format(mode="sageattn_ultravico",
                                                                             what="UltraViCo's attention decay")),
    AttentionMode.COMFY: ModeRoute(("comfy",), _TORCH + _TAIL),
}
_EXTERNAL: dict[str, Callable] = {}  # filled at import by nodes.py through register_external


def register_external(name: str, fn: Callable) -> None:
    """Register a host application's attention for the mode ``name`` (only ``"comfy"``).

    ``fn(q, k, v, heads)`` takes q/k/v [B, L, heads·D] contiguous and returns [B, Lq, heads·D] (ComfyUI's
    ``optimized_attention`` calling convention). It is self-tested like every kernel when a back-end is resolved.
    """
    if name != AttentionMode.COMFY.value:
        raise ValueError(f"register_external: only {AttentionMode.COMFY.value!r} can be registered, got {name!r}")
    if not callable(fn):
        raise ValueError(f"register_external: {fn!r} is not callable")
    _EXTERNAL[name] = fn
    clear_cache()


def _external_spec(fn: Callable) -> KernelSpec:
    def run(q, k, v, k_lens):
        b, lq, h, d = q.shape
        return fn(q.flatten(2), k.flatten(2), v.flatten(2), h).reshape(b, lq, h, d)

    name = getattr(fn, "__qualname__", type(fn).__name__)
    return KernelSpec(f"comfy:{name}", f"ComfyUI optimized attention ({name})", run, devices=("cpu", "cuda"),
                      min_cc=(0, 0), dtypes=FLOATS, max_head_dim=_ANY, tolerance=0.08)


def _spec(name: str) -> Optional[KernelSpec]:
    if name.split(":")[0] == "comfy":
        return _external_spec(_EXTERNAL["comfy"]) if "comfy" in _EXTERNAL else None
    return _KERNELS[name]


# ------------------------------------------------------------------------------------------------- contracts

def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def _allows_cast(mode: AttentionMode) -> bool:
    """float32 inputs are cast to bf16 only for modes that ask for a half-precision kernel."""
    return mode not in (AttentionMode.SDPA, AttentionMode.COMFY)


def _run_dtype(spec: KernelSpec, dtype: torch.dtype, allow_cast: bool) -> Optional[torch.dtype]:
    """The dtype ``spec`` computes ``dtype`` inputs in, or None when it cannot."""
    if dtype in spec.dtypes:
        return dtype
    if allow_cast and dtype == torch.float32 and torch.bfloat16 in spec.dtypes:
        return torch.bfloat16
    return None


def _head_dim_ok(spec: KernelSpec, d: int, dtype: torch.dtype) -> bool:
    rows_aligned = spec.reference or (d * dtype.itemsize) % ALIGN_BYTES == 0
    return rows_aligned and d <= spec.max_head_dim and (spec.head_dims is None or d in spec.head_dims)


def _device_problem(spec: KernelSpec, device: torch.device, dtype: torch.dtype, allow_cast: bool) -> Optional[str]:
    if device.type not in spec.devices:
        return "needs a CUDA GPU" if spec.devices == ("cuda",) else f"runs on {'/'.join(spec.devices)} only"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        cc = _capability(device)
        if cc < spec.min_cc or (spec.ccs is not None and cc not in spec.ccs):
            wanted = (", ".join(f"sm_{a}{b}" for a, b in spec.ccs) if spec.ccs
                      else f"sm_{spec.min_cc[0]}{spec.min_cc[1]}+")
            return f"needs {wanted}, this GPU is sm_{cc[0]}{cc[1]}"
    return None if _run_dtype(spec, dtype, allow_cast) is not None else f"does not support {dtype}"


def _unavailable(spec: KernelSpec, device: torch.device, dtype: torch.dtype, allow_cast: bool) -> Optional[str]:
    """Why ``spec`` cannot serve ``device``/``dtype`` (device, capability, dtype; package missing, with how to
    install it; version or build rejected by its probe), or None."""
    problems = [p for p in (_device_problem(spec, device, dtype, allow_cast),) if p]
    if spec.package is not None and not ext.installed(spec.package):
        problems.append(f"{spec.package} is not installed ({spec.install})")
    if problems or spec.probe is None:
        return "; ".join(problems) or None
    try:
        return spec.probe(device)
    except KERNEL_ERRORS as err:
        return f"{spec.package} is installed but cannot be loaded ({type(err).__name__}: {err})"


def _operand(t: torch.Tensor, layout: Layout, dtype: torch.dtype, private: bool = False) -> torch.Tensor:
    """``t`` [B, L, H, D] as a contiguous, 16-byte-aligned tensor in ``layout`` and ``dtype``; a fresh copy when
    ``private`` (the kernel writes into it)."""
    src = t.to(dtype)
    view = src.transpose(1, 2) if layout is Layout.HND else src
    if not view.is_contiguous():
        return view.contiguous()
    if view.data_ptr() % ALIGN_BYTES or (private and src is t):
        return view.clone(memory_format=torch.contiguous_format)
    return view


def _fits(spec: KernelSpec, q: torch.Tensor, allow_cast: bool) -> Optional[torch.dtype]:
    """Run dtype when ``spec`` takes operands like q (device, dtype, head dim), else None."""
    dtype = _run_dtype(spec, q.dtype, allow_cast)
    if q.device.type not in spec.devices or dtype is None or not _head_dim_ok(spec, q.shape[-1], dtype):
        return None
    return dtype


def _pick(chain: tuple[KernelSpec, ...], q, k, v, allow_cast: bool):
    """First kernel of ``chain`` that takes these operands ([B, L, H, D]): (spec, prepared q, k, v)."""
    for index, spec in enumerate(chain):
        if k.shape[1] < spec.min_keys and index + 1 < len(chain):
            continue
        dtype = _fits(spec, q, allow_cast)
        if dtype is None:
            continue
        ops = (_operand(q, spec.layout, dtype), _operand(k, spec.layout, dtype, spec.mutates_k),
               _operand(v, spec.layout, dtype))
        if spec.accepts is None or spec.accepts(*ops):
            return (spec, *ops)
    raise RuntimeError(f"no attention kernel of {[s.name for s in chain]} takes q {tuple(q.shape)} {q.dtype} on "
                       f"{q.device}; resolve the back-end for this device")


_CHECKS: ContextVar[Optional[set]] = ContextVar("infinitetalk_attention_checks", default=None)


@contextmanager
def operand_checks(enabled: bool = True) -> Iterator[None]:
    """Inside (when ``enabled``: the sampler's ``force_contiguous_tensors``), every attention call verifies the
    operands it hands its kernel (contiguous in the kernel's layout, 16-byte aligned; RuntimeError naming the kernel
    otherwise) and logs once per kernel and operand an input that arrived non-contiguous and was copied."""
    token = _CHECKS.set(set() if enabled else None)
    try:
        yield
    finally:
        _CHECKS.reset(token)


def _picked(chain: tuple[KernelSpec, ...], allow_cast: bool, q, k, v):
    """:func:`_pick`; under :func:`operand_checks` the prepared operands are verified and copied inputs logged."""
    spec, *used = _pick(chain, q, k, v, allow_cast)
    reported = _CHECKS.get()
    for name, t, op in zip("qkv", (q, k, v), used) if reported is not None else ():
        if not op.is_contiguous() or op.data_ptr() % ALIGN_BYTES:
            raise RuntimeError(f"attention kernel {spec.name}: operand {name} {tuple(op.shape)} is not contiguous "
                               f"and {ALIGN_BYTES}-byte aligned (strides {op.stride()}, address {op.data_ptr():#x})")
        if not t.is_contiguous() and (spec.name, name) not in reported:
            reported.add((spec.name, name))
            log.info("force_contiguous_tensors: attention input %s %s of %s arrived with strides %s; copied to a "
                     "contiguous %s operand", name, tuple(t.shape), spec.name, t.stride(), spec.layout.value)
    return (spec, *used)


@torch.compiler.disable  # runs eagerly inside compiled models: one graph break instead of several
def _run(chain: tuple[KernelSpec, ...], allow_cast: bool, q, k, v, k_lens) -> torch.Tensor:
    """Dispatch one call to the first kernel of ``chain`` that takes it; padded keys go to a masked kernel as a
    mask, otherwise one call per batch element with its keys sliced. Output [B, Lq, H, D] contiguous, q's dtype."""
    lens = None if k_lens is None else ext.key_lengths(k_lens, q.shape[0], k.shape[1])
    if lens is not None and all(n == k.shape[1] for n in lens):
        lens = None
    first = next((spec for spec in chain if _fits(spec, q, allow_cast) is not None), None)
    if lens is not None and (first is None or not first.masked):
        return torch.cat([_run(chain, allow_cast, q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], None)
                          for b, n in enumerate(lens)])
    spec, qp, kp, vp = _picked(chain, allow_cast, q, k, v)
    out = spec.run(qp, kp, vp, None if lens is None else torch.tensor(lens, device=q.device))
    out = out.transpose(1, 2) if spec.layout is Layout.HND else out
    return out.to(q.dtype).contiguous()


@torch.compiler.disable
def _run_rows(chain: tuple[KernelSpec, ...], allow_cast: bool, q, k, v) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """:meth:`AttentionBackend.rows_e4m3` for the kernel of ``chain`` that takes this call, or None."""
    spec, qp, kp, vp = _picked(chain, allow_cast, q, k, v)
    if spec.run_rows is None:
        return None
    data, scale = spec.run_rows(qp, kp, vp)
    return data.view(q.shape[0] * q.shape[1], -1), scale


# ---------------------------------------------------------------------------------------------- self-test

@functools.cache
def self_test(name: str, device: torch.device, dtype: torch.dtype, allow_cast: bool) -> Optional[str]:
    """Run kernel ``name`` on small strided ``dtype`` inputs on ``device`` (once without and once with key padding)
    and compare with float32 math on the CPU. Returns None when within the kernel's bound, else why not."""
    spec = _spec(name)
    run_dtype = _run_dtype(spec, dtype, allow_cast)
    d = next((n for n in (128, 64, 80) if _head_dim_ok(spec, n, run_dtype)), None)
    if d is None:
        return "takes none of the self-test head dims"
    for lengths in ((300, 200), (256, 384)):
        q, k, v = ext.self_test_inputs(name, lengths, d, dtype, device)
        if _fits(spec, q, allow_cast) is not None and (
                spec.accepts is None or spec.accepts(*(_operand(t, spec.layout, run_dtype) for t in (q, k, v)))):
            break
    else:
        return "takes none of the self-test shapes"
    q_ref, k_ref, v_ref = (t.cpu().float().clone() for t in (q, k, v))
    worst = 0.0
    try:
        for k_lens in (None, torch.tensor([k.shape[1], k.shape[1] * 2 // 3])):
            _poison(device, q.numel(), run_dtype)
            out = _run((spec,), allow_cast, q, k, v, None if k_lens is None else k_lens.to(device))
            worst = max(worst, relative_error(out.cpu(), math_attention(q_ref, k_ref, v_ref, k_lens)))
    except KERNEL_ERRORS as err:
        return f"self-test raised {type(err).__name__}: {err}"
    if not torch.equal(k.cpu().float(), k_ref):
        return "the kernel modified its input k (declare mutates_k)"
    if not worst <= spec.tolerance:
        return f"self-test error {worst:.3g} exceeds {spec.tolerance:g} against float32 math"
    return None


def _poison(device: torch.device, numel: int, dtype: torch.dtype) -> None:
    """Leave NaNs in the allocator block the next output will likely get, so a kernel that never writes its
    output (the SageAttention 2.2.0 Hopper bug) cannot pass by returning stale memory."""
    if device.type == "cuda":
        torch.full((numel,), float("nan"), dtype=dtype, device=device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32 (inf when out is not finite)."""
    out = out.float()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------- resolve

def _normalise(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve(mode: str | AttentionMode, device: torch.device | str, dtype: torch.dtype) -> AttentionBackend:
    """Choose the kernel for ``mode`` on ``device`` for ``dtype`` inputs (checked and self-tested once, cached).

    Raises ValueError naming the choices for an unknown mode. Logs one line when the mode's own kernel is not
    available (naming the missing package and how to install it) or the mode is mapped to another kernel.
    """
    requested = mode if isinstance(mode, AttentionMode) else AttentionMode.parse(mode)
    return _resolve(requested, _normalise(device), dtype)


@functools.cache
def _resolve(requested: AttentionMode, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    route, allow_cast = _ROUTES[requested], _allows_cast(requested)
    chain, skipped = [], []
    for name in dict.fromkeys(route.own + route.rest):
        spec, why = _spec(name), "no ComfyUI attention is registered (running outside ComfyUI)"
        if spec is not None:
            why = _unavailable(spec, device, dtype, allow_cast)
            if why is None and not spec.reference:
                why = self_test(spec.name, device, dtype, allow_cast)
        if why is None:
            chain.append(spec)
        elif name in route.own:
            skipped.append(f"{name}: {why}")
    if chain[0].name == "triton_fp8" and len(chain) > 1:
        why = _slower(chain[0], chain[1], device, dtype, allow_cast)
        if why is not None:
            skipped.append(f"triton_fp8: {why}")
            chain.pop(0)
    primary = chain[0]
    notes = [] if primary.name in route.own or primary.name.startswith("comfy:") else [
        f"Not available: {'; '.join(skipped)}"]
    notes += [route.note] if route.note and primary.name in _SAGE else []
    run_dtype = _run_dtype(primary, dtype, allow_cast)
    if run_dtype != dtype:
        notes.append(f"{dtype} inputs are cast to {run_dtype} for {primary.name}")
    if notes:
        log.warning("attention_mode %s on %s (%s): running %s. %s", requested.value, device, dtype, primary.name,
                    " ".join(notes))
    return build_backend(requested, tuple(chain), tuple(notes))


def build_backend(requested: AttentionMode, chain: tuple[KernelSpec, ...], notes: tuple[str, ...] = ()
                  ) -> AttentionBackend:
    """A back-end dispatching every call to the first kernel of ``chain`` that takes it (the chain is trusted:
    :func:`resolve` builds it from kernels that passed the device checks and the self-test). The last kernel
    should take every shape (``sdpa`` or ``math``)."""
    if not chain:
        raise ValueError("build_backend needs at least one kernel")
    return AttentionBackend(requested=requested, kernel=chain[0].name,
                            fn=functools.partial(_run, chain, _allows_cast(requested)), chain=chain, notes=notes)


def _slower(spec: KernelSpec, rival: KernelSpec, device: torch.device, dtype: torch.dtype,
            allow_cast: bool) -> Optional[str]:
    """Why ``spec`` does not beat ``rival`` at the 14B model's 480p self-attention (1 x 32760 tokens x 40 heads x
    128; about 2 GB of scratch, and only sm_90 cards get here) on ``device``, or None when it is faster (CUDA
    events, 5 calls each after one warm-up call that compiles and tunes). Shorter sequences favour the exact kernel
    slightly (H100, 8192 tokens: 2.06 vs 2.01 ms); the long ones dominate a video's attention time."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, PROBE_TOKENS, 40, 128, generator=gen, device=device).to(dtype) for _ in range(3))
    times = []
    try:
        for candidate in (spec, rival):
            _run((candidate,), allow_cast, q, k, v, None)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                _run((candidate,), allow_cast, q, k, v, None)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 5)
    except KERNEL_ERRORS as err:
        return f"timing against {rival.name} raised {type(err).__name__}: {err}"
    if times[0] < times[1]:
        return None
    return f"slower than {rival.name} on this GPU ({times[0]:.2f} ms vs {times[1]:.2f} ms at {PROBE_TOKENS} tokens)"


def clear_cache() -> None:
    """Forget resolved back-ends and self-test results (after installing a kernel package or registering one)."""
    _resolve.cache_clear()
    self_test.cache_clear()
    ext.load.cache_clear()
