"""Reading Wan2.1 / InfiniteTalk transformer checkpoints and materialising a model from them.

Flow: :func:`open_state_dict` opens one or more files (base shards, then an adapter; later files override earlier
ones on equal keys), strips ``model.diffusion_model.`` / ``diffusion_model.`` / ``model.`` prefixes and rejects files
that are not a Wan transformer. Nothing is read yet: the result maps each key to a lazy entry (shape, dtype,
reader). :func:`load_model` infers :class:`WanConfig` from the shapes, builds the model on the meta device, checks
the keys strictly and materialises the parameters one tensor at a time from the memory-mapped files, in the
requested dtype (``KEEP_FP32`` parameters in float32). File formats plug in through :data:`READERS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Protocol, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..attention import AttentionBackend, AttentionMode, resolve
from ..fp8_optimization import Ops, QuantLinear, QuantMode, assign_layer_names, ops_for
from .config import TEXT_LEN, WanConfig

PathLike = Union[str, Path]
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
_LIST = 5


class TensorReader(Protocol):
    """One open checkpoint file: raw key names, per-key shape/dtype, and reading one tensor at a time."""

    path: Path

    def keys(self) -> list[str]:
        """Raw key names as stored in the file."""

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor, without reading it."""

    def read(self, key: str) -> torch.Tensor:
        """One tensor, in the file's dtype, on the reader's device."""

    def metadata(self) -> dict[str, str]:
        """The file's string metadata (may be empty)."""


class SafetensorsReader:
    """Memory-mapped safetensors file (``safe_open``); :meth:`read` returns one tensor on ``device``."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt", device=device)
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err}); the file may be truncated or "
                             f"still downloading — download it again") from err

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def read(self, key: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(key)
        except SafetensorError as err:
            raise ValueError(f"{self.path}: cannot read tensor {key!r} ({err}); the file may be damaged") from err

    def metadata(self) -> dict[str, str]:
        return dict(self._file.metadata() or {})


READERS: dict[str, type] = {".safetensors": SafetensorsReader, ".sft": SafetensorsReader}


def open_reader(path: PathLike, device: str = "cpu") -> TensorReader:
    """Open ``path`` with the reader registered for its suffix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported checkpoint format {path.suffix!r}; supported: "
                         f"{', '.join(sorted(READERS))} (GGUF support comes with the GGUF loader)")
    return reader(path, device)


def strip_prefix(key: str) -> str:
    """Remove one leading ComfyUI-style prefix (``model.diffusion_model.``, ``diffusion_model.``, ``model.``)."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


@dataclass(frozen=True)
class LazyTensor:
    """A tensor not yet read: its file, key in the file, and shape."""

    reader: TensorReader
    raw_key: str
    shape: tuple[int, ...]

    def read(self) -> torch.Tensor:
        """Read the tensor now (file dtype)."""
        return self.reader.read(self.raw_key)


@dataclass(frozen=True)
class LazyStateDict(Mapping[str, LazyTensor]):
    """Prefix-stripped key -> :class:`LazyTensor`, merged over ``paths`` (later files win)."""

    entries: dict[str, LazyTensor]
    paths: tuple[Path, ...] = field(default=())
    device: str = "cpu"

    def __getitem__(self, key: str) -> LazyTensor:
        return self.entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self) -> str:
        """The source files, for error messages."""
        return ", ".join(str(p) for p in self.paths)


@dataclass(frozen=True)
class _Signature:
    """Keys that identify a file which is not a Wan transformer: any key with one of the prefixes / substrings /
    suffixes, or equal to one of ``keys``."""

    kind: str
    prefixes: tuple[str, ...] = ()
    contains: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()

    def matches(self, key: str) -> bool:
        return (key.startswith(self.prefixes) or key.endswith(self.suffixes) or key in self.keys
                or any(part in key for part in self.contains))


_QUANT_HINT = "which this loader does not read yet; use a bf16/fp16 file"
FOREIGN_FILES = (
    _Signature("a LongCat-Avatar checkpoint (its audio attention has q_norm/k_norm); InfiniteTalk needs the "
               "InfiniteTalk or MultiTalk adapter", keys=("blocks.0.audio_cross_attn.q_norm.weight",)),
    _Signature("a LoRA file; load it with the LoRA node", contains=("lora_",), suffixes=(".alpha", ".diff")),
    _Signature("a Wan VAE; load it with the VAE loader", prefixes=("encoder.downsamples.", "decoder.upsamples.")),
    _Signature("a T5 text encoder; load it with the text encoder loader", prefixes=("encoder.block.",),
               keys=("token_embedding.weight", "shared.weight")),
    _Signature("a CLIP vision model; load it with the CLIP loader", prefixes=("visual.",), keys=("log_scale",)),
    _Signature("a wav2vec2 audio encoder", prefixes=("feature_extractor.conv_layers.", "wav2vec2.")),
    _Signature("a Wan VACE model, which this pack does not support", prefixes=("vace_blocks.",)),
    _Signature(f"a scaled-fp8 / ComfyUI-quantized checkpoint, {_QUANT_HINT}",
               suffixes=(".scale_weight", ".weight_scale"), keys=("scaled_fp8",)),
)


def _foreign_kind(keys: set[str]) -> Optional[str]:
    """Name what a non-transformer file is, from its (stripped) keys, or None if nothing foreign is recognised."""
    for signature in FOREIGN_FILES:
        if any(signature.matches(k) for k in keys):
            return signature.kind
    return None


def _check_file(path: Path, keys: set[str], metadata: Mapping[str, str]) -> None:
    kind = _foreign_kind(keys)
    if kind is None and "_quantization_metadata" in metadata:
        kind = f"a ComfyUI-quantized checkpoint, {_QUANT_HINT}"
    if kind is not None:
        raise ValueError(f"{path}: this is {kind}, not a Wan2.1 transformer / InfiniteTalk adapter")
    wan = "patch_embedding.weight" in keys or any(k.startswith("blocks.") for k in keys)
    if not wan and not any(k.startswith("audio_proj.") for k in keys):
        sample = ", ".join(sorted(keys)[:_LIST])
        raise ValueError(f"{path}: not a Wan2.1 transformer or InfiniteTalk adapter (first keys: {sample})")


def open_state_dict(paths: Sequence[PathLike], device: str = "cpu") -> LazyStateDict:
    """Open base file(s) then adapter file(s); return the merged, prefix-stripped lazy state dict.

    Raises ValueError naming the file when a file is missing, unreadable or not a Wan transformer/adapter, or when
    no file holds the base weights.
    """
    if not paths:
        raise ValueError("no checkpoint files given")
    entries: dict[str, LazyTensor] = {}
    for path in paths:
        reader = open_reader(path, device)
        stripped = {strip_prefix(k): k for k in reader.keys()}
        _check_file(reader.path, set(stripped), reader.metadata())
        for key, raw in stripped.items():
            entries[key] = LazyTensor(reader, raw, reader.shape(raw))
    result = LazyStateDict(entries, tuple(Path(p) for p in paths), device)
    if "patch_embedding.weight" not in entries:
        raise ValueError(f"{result.describe()}: no Wan2.1 base weights (patch_embedding.weight missing); these "
                         f"files hold only an adapter — also pass the Wan2.1 I2V base model")
    return result


@dataclass(frozen=True)
class LoadOptions:
    """How to materialise a model.

    dtype: base parameter dtype (float32 / bfloat16 / float16; ``KEEP_FP32`` parameters stay float32);
    device: the device the files were opened for (``open_state_dict(paths, device)``; tensors are read straight
    there) and the attention back-end is resolved for; text_len / num_heads: overrides for
    :meth:`WanConfig.from_state_dict`; ops: Linear namespace (default: unquantized); attention: back-end (default:
    SDPA resolved for device and dtype).
    """

    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    text_len: int = TEXT_LEN
    num_heads: Optional[int] = None
    ops: Optional[Ops] = None
    attention: Optional[AttentionBackend] = None


def _key_error(where: str, missing: list[str], unexpected: list[str]) -> ValueError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:_LIST])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:_LIST])})")
    hint = ""
    if any("audio" in k for k in missing):
        hint = "; the InfiniteTalk adapter keys are missing — pass the adapter file"
    return ValueError(f"{where}: checkpoint does not match the model: {'; '.join(parts)}{hint}")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_path), leaf, nn.Parameter(tensor, requires_grad=False))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(p in name for p in patterns)


def load_model(model_cls: type, sd: LazyStateDict, options: LoadOptions) -> nn.Module:
    """Build ``model_cls(config, ops, attention)`` on the meta device and fill it from ``sd`` one tensor at a time.

    Strict: every model parameter must be in the files and every file key must be a model parameter, with equal
    shapes; otherwise one ValueError lists the differences. Returns the model in eval mode without gradients.
    """
    if options.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"base dtype must be float32, bfloat16 or float16, got {options.dtype}")
    if torch.device(sd.device) != torch.device(options.device):
        raise ValueError(f"the files were opened for device {sd.device} but LoadOptions.device is {options.device}; "
                         f"pass the same device to open_state_dict")
    cfg = WanConfig.from_state_dict(sd, text_len=options.text_len, num_heads=options.num_heads)
    ops = options.ops if options.ops is not None else ops_for(QuantMode.DISABLED)
    attention = options.attention or resolve(AttentionMode.SDPA, options.device, options.dtype)
    with torch.device("meta"):
        model = model_cls(cfg, ops, attention)
    quantized = {name for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    params = {name: p for name, p in model.named_parameters() if name.rpartition(".")[0] not in quantized}
    expected = set(params) | {f"{q}.{leaf}" for q in quantized
                              for leaf in ("weight", "bias") if getattr(model.get_submodule(q), leaf) is not None}
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise _key_error(sd.describe(), missing, unexpected)
    keep = getattr(model_cls, "KEEP_FP32", ())
    for name, param in params.items():
        entry = sd[name]
        if tuple(entry.shape) != tuple(param.shape):
            raise ValueError(f"{entry.reader.path}: {name} has shape {list(entry.shape)}, the model built from "
                             f"these files expects {list(param.shape)} (mixed architectures?)")
        dtype = torch.float32 if _matches(name, keep) else options.dtype
        _assign(model, name, entry.read().to(dtype))
    for prefix in sorted(quantized):
        layer = model.get_submodule(prefix)
        tensors = {leaf: sd[f"{prefix}.{leaf}"].read() for leaf in ("weight", "bias") if f"{prefix}.{leaf}" in sd}
        layer.load_state_dict(tensors, strict=True, assign=True)
    assign_layer_names(model)
    return model.eval()
