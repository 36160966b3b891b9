"""LoRA files for the Wan transformer: parsing, mapping to the model's parameters, merged or unmerged application.

Key formats (each with or without a ``diffusion_model.`` / ``model.diffusion_model.`` prefix):

* PEFT: ``<module>.lora_A.weight`` [r, in] (down) and ``<module>.lora_B.weight`` [out, r] (up);
* kohya / lightx2v: ``<module>.lora_down.weight``, ``<module>.lora_up.weight`` and optional ``<module>.alpha``,
  module names dotted (``blocks.0.self_attn.q``) or underscored after ``lora_unet_``
  (``lora_unet_blocks_0_self_attn_q``);
* full deltas: ``<module>.diff`` (added to the weight, or to a bare parameter such as ``blocks.0.modulation``) and
  ``<module>.diff_b`` (added to the bias).

The change of a parameter at strength s is ``s·(alpha/r)·(up @ down)`` (alpha/r = 1 without ``alpha``; conv weights
use the flattened factors) plus ``s·diff``. MERGED: added to the weights once (a quantized layer is dequantized,
patched and re-quantized through ``layer.load_weight``). UNMERGED: every Linear weight gets a :class:`LoraAdapter`
child module whose output ``s·(alpha/r)·up(down(x)) + s·diff x`` a forward hook adds to the layer's; other
parameters (norms, biases, modulation, the patch embedding) are patched in place from a kept copy, so the strength
can change at any step (:meth:`LoraSet.set_step`). Adapters are submodules of their layer, so ``.to()`` and block
swap move them with it.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from ..fp8_optimization import QuantLinear

log = logging.getLogger(__name__)

Strength = Union[float, Sequence[float]]
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "lora_unet_")
PART_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
                 (".lora_up.weight", "up"), (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"))
UNSUPPORTED_KINDS = ("hada_", "lokr_", "dora_scale", "lora_mid")
_LIST = 5


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: file, strength (a float, or one value per sampling step), merged or not, and optional
    filters: ``blocks`` (keep only parameters under these ``blocks.N.`` prefixes; empty: all) and ``layer_filter``
    (skip parameters whose name contains one of these substrings)."""

    path: Path
    strength: Strength = 1.0
    merge: bool = True
    blocks: tuple[str, ...] = ()
    layer_filter: tuple[str, ...] = ()

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> "LoraSpec":
        """From one upstream ``WANVIDLORA`` list entry (``path``, ``strength``, ``merge_loras``, ``blocks`` as
        ``{prefix: selected}``, ``layer_filter`` as a comma-separated string)."""
        strength = entry.get("strength", 1.0)
        strength = float(strength) if isinstance(strength, (int, float)) else tuple(float(s) for s in strength)
        blocks = tuple(name if name.endswith(".") else name + "."
                       for name, on in (entry.get("blocks") or {}).items() if on)
        filters = tuple(part.strip() for part in str(entry.get("layer_filter") or "").split(",") if part.strip())
        return cls(Path(entry["path"]), strength, bool(entry.get("merge_loras", True)), blocks, filters)

    def schedule(self) -> tuple[float, ...]:
        """Strength per step (a single value for a constant strength)."""
        if isinstance(self.strength, (int, float)):
            return (float(self.strength),)
        if not self.strength:
            raise ValueError(f"LoRA {self.path.name}: empty strength list; give one value or one per step")
        return tuple(float(s) for s in self.strength)


@dataclass(frozen=True)
class LoraPatch:
    """The change one LoRA file makes to one model parameter ``target`` (unscaled by the strength).

    up [out, r, ...] / down [r, in, ...] (both or neither), ``alpha_scale`` = alpha / r, diff: full-size delta of the
    target (or None); CPU tensors in the file's dtype (converted to float32 only when applied)."""

    target: str
    up: Optional[torch.Tensor] = None
    down: Optional[torch.Tensor] = None
    alpha_scale: float = 1.0
    diff: Optional[torch.Tensor] = None

    def delta(self, strength: float, shape: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
        """float32 delta on ``device``: ``(up @ down) * (strength * alpha_scale) + diff * strength``, as ``shape``."""
        out = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        if self.up is not None:
            up, down = _staged(self.up.flatten(1), out), _staged(self.down.flatten(1), out)
            out += (up @ down).reshape(out.shape) * (strength * self.alpha_scale)
        if self.diff is not None:
            out += _staged(self.diff, out).reshape(out.shape) * strength
        return out


def _staged(tensor: torch.Tensor, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``tensor`` as ``dtype`` on ``like``'s device (a copy into a fresh allocation there)."""
    out = torch.empty(tensor.shape, dtype=dtype, device=like.device)
    return out.copy_(tensor)


# ---------------------------------------------------------------------------------------------------- parsing

def _split_key(key: str) -> tuple[Optional[str], Optional[str]]:
    """Raw LoRA key -> (module name with prefixes stripped, part) or (None, None) for an unknown key."""
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for suffix, part in PART_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None, None


def read_lora_keys(path: Union[str, Path]) -> dict[str, dict[str, str]]:
    """Module name (as written in the file, prefixes stripped) -> {part: raw key}; parts: down, up, alpha, diff,
    diff_b. Raises ValueError naming the file when it is unreadable, uses an unsupported LoRA kind (LoHa, LoKr, DoRA,
    LoCon mid) or holds no LoRA keys."""
    path = Path(path)
    keys = _safetensors_keys(path)
    odd = sorted(k for k in keys if any(kind in k for kind in UNSUPPORTED_KINDS))
    if odd:
        raise ValueError(f"LoRA {path}: {odd[0]} belongs to a LoHa/LoKr/DoRA/LoCon-mid LoRA, which this loader does "
                         "not apply; use a plain LoRA (lora_A/lora_B or lora_down/lora_up)")
    modules: dict[str, dict[str, str]] = {}
    ignored = []
    for key in keys:
        module, part = _split_key(key)
        if module is None:
            ignored.append(key)
        else:
            modules.setdefault(module, {})[part] = key
    if not modules:
        raise ValueError(f"LoRA {path}: no LoRA weights found (expected lora_A/lora_B, lora_down/lora_up, diff or "
                         f"diff_b keys; first keys: {', '.join(sorted(keys)[:_LIST])})")
    if ignored:
        log.warning("LoRA %s: %d keys of unknown kind ignored (e.g. %s)", path.name, len(ignored), ignored[0])
    return modules


def _safetensors_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"LoRA file not found: {path}")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ValueError(f"LoRA {path}: unsupported file type {path.suffix!r}; LoRAs are read from .safetensors files")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except SafetensorError as err:
        raise ValueError(f"LoRA {path}: not a readable safetensors file ({err}); it may be truncated") from err


def _module_targets(module: str, parts: Mapping[str, str], params: Mapping[str, nn.Parameter]
                    ) -> list[tuple[str, dict[str, str]]]:
    """(target parameter, its parts) for one LoRA module: low-rank factors, alpha and diff change ``.weight`` (or
    the bare parameter ``module`` itself for a diff, e.g. ``blocks.0.modulation``); diff_b changes ``.bias``."""
    out = []
    main = {k: v for k, v in parts.items() if k in ("up", "down", "alpha", "diff")}
    if set(main) - {"alpha"}:
        if f"{module}.weight" in params:
            out.append((f"{module}.weight", main))
        elif module in params and "diff" in main and "up" not in main and "down" not in main:
            out.append((module, main))
    if "diff_b" in parts and f"{module}.bias" in params:
        out.append((f"{module}.bias", {"diff_b": parts["diff_b"]}))
    return out


def _keep(target: str, spec: LoraSpec) -> bool:
    if spec.blocks and not target.startswith(spec.blocks):
        return False
    return not any(part in target for part in spec.layer_filter)


def _read_patch(handle, path: Path, target: str, parts: Mapping[str, str], shape: torch.Size) -> LoraPatch:
    """Read one target's tensors and check they fit ``shape``."""
    def read(part: str) -> Optional[torch.Tensor]:
        return handle.get_tensor(parts[part]) if part in parts else None

    up, down = read("up"), read("down")
    if (up is None) != (down is None):
        have = "up" if up is not None else "down"
        raise ValueError(f"LoRA {path}: {parts[have]} has no matching {'down' if have == 'up' else 'up'} weight")
    alpha_scale = 1.0
    if up is not None:
        rank = down.shape[0]
        if up.shape[1] != rank or up.shape[0] != shape[0] or up.shape[0] * down[0].numel() != shape.numel():
            raise ValueError(f"LoRA {path}: {parts['up']} {list(up.shape)} x {parts['down']} {list(down.shape)} "
                             f"does not fit the model's {target} {list(shape)} (a LoRA for another model size?)")
        if "alpha" in parts:
            alpha_scale = float(handle.get_tensor(parts["alpha"]).float().reshape(-1)[0]) / rank
    diff_key = next((k for k in ("diff", "diff_b") if k in parts), None)
    diff = read(diff_key) if diff_key else None
    if diff is not None and diff.numel() != shape.numel():
        raise ValueError(f"LoRA {path}: {parts[diff_key]} {list(diff.shape)} does not fit the model's {target} "
                         f"{list(shape)} (a LoRA for another model size?)")
    return LoraPatch(target, up, down, alpha_scale, diff)


def lora_patches(model: nn.Module, spec: LoraSpec) -> list[LoraPatch]:
    """Parse ``spec.path`` and map it onto ``model``'s parameters (after ``spec``'s block / layer filters).

    Raises ValueError naming the file when no key matches a layer of the model; logs how many matched otherwise.
    """
    path = Path(spec.path)
    in_file = read_lora_keys(path)
    params = dict(model.named_parameters())
    names = {name for name, _ in model.named_modules()} | set(params)
    underscored = {name.replace(".", "_"): name for name in names}
    wanted: dict[str, dict[str, str]] = {}
    unmatched = []
    for raw_module, parts in in_file.items():
        module = raw_module if raw_module in names else underscored.get(raw_module)
        targets = _module_targets(module, parts, params) if module is not None else []
        if not targets:
            unmatched.append(raw_module)
        wanted.update((target, target_parts) for target, target_parts in targets if _keep(target, spec))
    if len(unmatched) == len(in_file):
        raise ValueError(f"LoRA {path}: none of its {len(in_file)} layers matches a layer of this transformer "
                         f"(e.g. {', '.join(sorted(unmatched)[:_LIST])}); is it a LoRA for another model?")
    log.info("LoRA %s: %d of %d layers matched%s", path.name, len(in_file) - len(unmatched), len(in_file),
             f" (unmatched e.g. {', '.join(sorted(unmatched)[:3])})" if unmatched else "")
    with safe_open(str(path), framework="pt") as handle:
        return [_read_patch(handle, path, target, parts, params[target].shape) for target, parts in wanted.items()]


# ------------------------------------------------------------------------------------------------- application

class LoraAdapter(nn.Module):
    """Unmerged LoRA of one Linear: ``forward(x)`` = ``strength·(alpha/r)·up(down(x)) + strength·diff x``.

    x [..., in_features] of the compute dtype -> [..., out_features] of x's dtype. The factors are non-persistent
    buffers of ``like``'s device and dtype (float32 when ``like`` is not a float of 16+ bits); they follow ``.to()``
    and block swap of the layer but stay out of its ``state_dict``."""

    def __init__(self, patch: LoraPatch, schedule: tuple[float, ...], like: torch.Tensor) -> None:
        super().__init__()
        self.target, self.alpha_scale, self.schedule = patch.target, patch.alpha_scale, schedule
        self.strength = schedule[0]
        dtype = like.dtype if like.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        for name in ("up", "down", "diff"):
            tensor = getattr(patch, name)
            if tensor is not None and name != "diff":
                tensor = tensor.flatten(1)
            self.register_buffer(name, None if tensor is None else _staged(tensor, like, dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if self.up is not None:
            out = F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * (self.strength * self.alpha_scale)
        if self.diff is not None:
            part = F.linear(x, self.diff.to(x.dtype).reshape(self.diff.shape[0], -1)) * self.strength
            out = part if out is None else out + part
        return out

    def set_step(self, step: int) -> None:
        self.strength = self.schedule[min(step, len(self.schedule) - 1)]


@dataclass
class _ParamPatch:
    """Unmerged change of a non-Linear parameter: the original value kept, re-applied at each strength change."""

    param: nn.Parameter
    base: torch.Tensor
    patches: list[tuple[LoraPatch, tuple[float, ...]]] = field(default_factory=list)

    def apply(self, step: int) -> None:
        value = self.base.float()
        for patch, schedule in self.patches:
            value = value + patch.delta(schedule[min(step, len(schedule) - 1)], self.base.shape, self.base.device)
        with torch.no_grad():
            self.param.copy_(value.to(self.param.dtype))


@dataclass
class LoraSet:
    """LoRAs applied to one model. Merged ones are already in the weights; :meth:`set_step` updates the strength of
    the unmerged ones (per-step lists), :meth:`remove` takes the unmerged ones out again."""

    merged: list[str] = field(default_factory=list)
    adapters: list[tuple[nn.Module, str, LoraAdapter, Any]] = field(default_factory=list)
    params: dict[str, _ParamPatch] = field(default_factory=dict)

    def set_step(self, step: int) -> None:
        """Use every unmerged LoRA's strength for sampling step ``step`` (the last value past the list's end)."""
        for _, _, adapter, _ in self.adapters:
            adapter.set_step(step)
        for patch in self.params.values():
            patch.apply(step)

    def remove(self) -> None:
        """Detach the unmerged LoRAs (restoring patched parameters); merged ones stay in the weights."""
        for layer, name, _, handle in self.adapters:
            handle.remove()
            delattr(layer, name)
        for patch in self.params.values():
            with torch.no_grad():
                patch.param.copy_(patch.base)
        self.adapters.clear()
        self.params.clear()


def _add_adapter_output(adapter: LoraAdapter) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + adapter(args[0]).to(output.dtype)
    return hook


def _merge(model: nn.Module, patch: LoraPatch, strength: float) -> None:
    """Add ``patch`` at ``strength`` into the model's weights (quantized layers: dequantize, add, re-quantize)."""
    module_name, _, leaf = patch.target.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, QuantLinear) and leaf == "weight":
        weight = module.dequantized_weight(torch.float32)
        module.load_weight(weight + patch.delta(strength, weight.shape, weight.device))
        return
    param = getattr(module, leaf)
    with torch.no_grad():
        param.copy_((param.float() + patch.delta(strength, param.shape, param.device)).to(param.dtype))


def _attach(model: nn.Module, patch: LoraPatch, schedule: tuple[float, ...], lora_set: LoraSet) -> None:
    """Unmerged: an adapter + forward hook on a Linear weight, a kept-original patch on any other parameter."""
    module_name, _, leaf = patch.target.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf == "weight" and isinstance(module, (nn.Linear, QuantLinear)):
        like = module.bias if module.bias is not None else module.weight
        adapter = LoraAdapter(patch, schedule, like)
        name = next(f"lora_{i}" for i in itertools.count() if not hasattr(module, f"lora_{i}"))
        module.add_module(name, adapter)
        lora_set.adapters.append((module, name, adapter, module.register_forward_hook(_add_adapter_output(adapter))))
        return
    param = getattr(module, leaf)
    if patch.target not in lora_set.params:
        lora_set.params[patch.target] = _ParamPatch(param, param.detach().clone())
    lora_set.params[patch.target].patches.append((patch, schedule))


def apply_loras(model: nn.Module, specs: Sequence[LoraSpec], lora_set: Optional[LoraSet] = None) -> LoraSet:
    """Apply LoRAs to ``model`` in order; returns the :class:`LoraSet` (pass an existing one to extend it).

    A spec with ``merge`` and a constant strength is merged into the weights; a per-step strength list, or
    ``merge=False``, is applied unmerged (the model then needs ``set_step`` calls from the sampler). Strength 0 skips
    the file.
    """
    lora_set = lora_set if lora_set is not None else LoraSet()
    for spec in specs:
        schedule = spec.schedule()
        if all(s == 0 for s in schedule):
            continue
        merge = spec.merge and len(schedule) == 1
        if spec.merge and not merge:
            log.info("LoRA %s: per-step strengths need the unmerged path; applying it unmerged", Path(spec.path).name)
        for patch in lora_patches(model, spec):
            if merge:
                _merge(model, patch, schedule[0])
            else:
                _attach(model, patch, schedule, lora_set)
        if merge:
            lora_set.merged.append(str(spec.path))
    lora_set.set_step(0)
    return lora_set


def apply_lora_entries(model: nn.Module, entries: Optional[Sequence[Mapping[str, Any]]]) -> LoraSet:
    """Apply the upstream ``WANVIDLORA`` list (WanVideoLoraSelect / Multi output; None or empty: nothing)."""
    return apply_loras(model, [LoraSpec.from_entry(entry) for entry in entries or ()])
