"""Reading Wan2.1 / InfiniteTalk transformer checkpoints and materialising a model from them.

Flow: :func:`open_state_dict` opens one or more files (base shards, then an adapter; later files override earlier
ones on equal keys), strips ``model.diffusion_model.`` / ``diffusion_model.`` / ``model.`` prefixes and rejects files
that are not a Wan transformer. Nothing is read yet: the result maps each key to a lazy entry (shape, dtype,
reader), plus the quantization side-data of fp8 files (:class:`QuantInfo`): per-layer weight scales of scaled-fp8
files (``<layer>.scale_weight``, or ``<layer>.weight_scale``, plus the ``scaled_fp8`` marker) and of ComfyUI-quantized
files (``weight_scale`` / ``input_scale`` keys, layer formats from the ``_quantization_metadata`` header JSON or
per-layer ``<layer>.comfy_quant`` tensors; float8 formats only). :func:`load_model` settles the quantization mode
(``disabled`` on an fp8 file becomes the fp8 mode of the file's storage, ``_scaled`` when it has scales), infers
:class:`WanConfig` from the shapes, builds the model on the meta device, checks the keys strictly and materialises the
parameters one tensor at a time from the files, in the requested dtype (``KEEP_FP32`` parameters in float32). fp8
weights go into the quantized layers with their scales (kept bit-exactly by an fp8 mode of the same dtype,
dequantized and re-quantized by any other); fp8 tensors of non-quantized parameters are dequantized (weight x scale).
File formats plug in through :data:`READERS` (safetensors, GGUF).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Protocol, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..attention import AttentionBackend, AttentionMode, resolve
from ..fp8_optimization import Ops, QuantLinear, QuantMode, assign_layer_names, ops_for
from .config import TEXT_LEN, WanConfig
from .gguf_reader import GGUFTensorReader, read_bytes

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
_LIST = 5
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class TensorReader(Protocol):
    """One open checkpoint file: raw key names, per-key shape/dtype, and reading one tensor at a time."""

    path: Path

    def keys(self) -> list[str]:
        """Raw key names as stored in the file."""

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor, without reading it."""

    def dtype(self, key: str) -> torch.dtype:
        """The dtype :meth:`read` returns for one tensor, without reading it."""

    def read(self, key: str) -> torch.Tensor:
        """One tensor, in the file's dtype, on the reader's device."""

    def metadata(self) -> dict[str, str]:
        """The file's string metadata (may be empty)."""


class SafetensorsReader:
    """A safetensors file opened with ``safe_open`` (validation, keys, shapes, dtypes, metadata).

    :meth:`read` returns one tensor on ``device``. On the CPU the bytes are read with ``os.preadv`` into a fresh
    buffer instead of a view of a memory map: a weight converted at load (quantized, cast) then leaves nothing
    resident behind, so host RSS holds only the model (a mapped file's touched pages would stay resident as long as
    any tensor of the file lives). Other devices go through ``safe_open(device=...)``.
    """

    def __init__(self, path: Path, device: str = "cpu") -> None:
        self.path = path
        self._cpu = torch.device(device).type == "cpu"
        try:
            self._file = safe_open(str(path), framework="pt", device=device)
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err}); the file may be truncated or "
                             f"still downloading — download it again") from err
        self._offsets = self._data_offsets() if self._cpu else {}

    def _data_offsets(self) -> dict[str, tuple[int, int]]:
        """Absolute (start, end) byte range of every tensor, from the JSON header (8-byte little-endian length)."""
        with open(self.path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        return {key: (8 + length + info["data_offsets"][0], 8 + length + info["data_offsets"][1])
                for key, info in header.items() if key != "__metadata__"}

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._file.get_slice(key).get_dtype()
        if name not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {name}, which this loader does not read")
        return SAFETENSORS_DTYPES[name]

    def read(self, key: str) -> torch.Tensor:
        if self._cpu:
            start, end = self._offsets[key]
            return read_bytes(self.path, start, end - start, key).view(self.dtype(key)).reshape(self.shape(key))
        try:
            return self._file.get_tensor(key)
        except SafetensorError as err:
            raise ValueError(f"{self.path}: cannot read tensor {key!r} ({err}); the file may be damaged") from err

    def metadata(self) -> dict[str, str]:
        return dict(self._file.metadata() or {})


READERS: dict[str, type] = {".safetensors": SafetensorsReader, ".sft": SafetensorsReader, ".gguf": GGUFTensorReader}


def open_reader(path: PathLike, device: str = "cpu") -> TensorReader:
    """Open ``path`` with the reader registered for its suffix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported checkpoint format {path.suffix!r}; supported: "
                         f"{', '.join(sorted(READERS))}")
    return reader(path, device)


def strip_prefix(key: str) -> str:
    """Remove one leading ComfyUI-style prefix (``model.diffusion_model.``, ``diffusion_model.``, ``model.``)."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


@dataclass(frozen=True)
class LazyTensor:
    """A tensor not yet read: its file, key in the file, shape and dtype (``view``: a dtype to reinterpret the
    stored bytes as, e.g. fp8 weights stored in uint8 containers)."""

    reader: TensorReader
    raw_key: str
    shape: tuple[int, ...]
    dtype: Optional[torch.dtype] = None
    view: Optional[torch.dtype] = None

    def read(self) -> torch.Tensor:
        """Read the tensor now (file dtype, or ``view``)."""
        tensor = self.reader.read(self.raw_key)
        return tensor if self.view is None else tensor.view(self.view)


@dataclass(frozen=True)
class QuantInfo:
    """Quantization side-data of the opened files, keyed by layer name (``blocks.0.self_attn.q``).

    scales: the weight scale of each scaled fp8 layer (per-tensor [] / [1] or per-output-channel [N], float);
    formats: the declared ComfyUI format of each quantized layer (``float8_e4m3fn`` / ``float8_e5m2``);
    scaled_marker: a ``scaled_fp8`` marker key was present; input_scales: how many activation scales were ignored
    (activation scales are computed per call).
    """

    scales: dict[str, LazyTensor] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    scaled_marker: bool = False
    input_scales: int = 0

    @property
    def scaled(self) -> bool:
        return bool(self.scales) or self.scaled_marker


@dataclass(frozen=True)
class LazyStateDict(Mapping[str, LazyTensor]):
    """Prefix-stripped key -> :class:`LazyTensor`, merged over ``paths`` (later files win)."""

    entries: dict[str, LazyTensor]
    paths: tuple[Path, ...] = field(default=())
    device: str = "cpu"
    quant: QuantInfo = field(default_factory=QuantInfo)

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
)


def _foreign_kind(keys: set[str]) -> Optional[str]:
    """Name what a non-transformer file is, from its (stripped) keys, or None if nothing foreign is recognised."""
    for signature in FOREIGN_FILES:
        if any(signature.matches(k) for k in keys):
            return signature.kind
    return None


def _check_file(path: Path, keys: set[str]) -> None:
    kind = _foreign_kind(keys)
    if kind is not None:
        raise ValueError(f"{path}: this is {kind}, not a Wan2.1 transformer / InfiniteTalk adapter")
    wan = "patch_embedding.weight" in keys or any(k.startswith("blocks.") for k in keys)
    if not wan and not any(k.startswith("audio_proj.") for k in keys):
        sample = ", ".join(sorted(keys)[:_LIST])
        raise ValueError(f"{path}: not a Wan2.1 transformer or InfiniteTalk adapter (first keys: {sample})")


SCALED_MARKER = "scaled_fp8"
QUANT_METADATA_KEY = "_quantization_metadata"
WEIGHT_SCALE_LEAVES = ("scale_weight", "weight_scale")
INPUT_SCALE_LEAVES = ("input_scale", "scale_input")
COMFY_QUANT_LEAF = "comfy_quant"
FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def _format_of(path: Path, layer: str, spec) -> str:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("format"), str):
        raise ValueError(f"{path}: quantization entry of layer {layer!r} has no 'format' string: {spec!r}")
    return spec["format"]


def _layer_formats(reader: TensorReader, stripped: Mapping[str, str]) -> dict[str, str]:
    """ComfyUI quantization formats per layer: the ``_quantization_metadata`` header JSON and ``.comfy_quant``
    tensors (UTF-8 JSON bytes). Raises ValueError naming the layer for a format other than float8."""
    formats: dict[str, str] = {}
    header = reader.metadata().get(QUANT_METADATA_KEY)
    if header:
        try:
            layers = json.loads(header).get("layers", {})
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{reader.path}: the {QUANT_METADATA_KEY} header entry is not a JSON object with "
                             f"'layers' ({err})") from err
        formats.update({strip_prefix(name): _format_of(reader.path, name, spec) for name, spec in layers.items()})
    for key, raw in stripped.items():
        layer, _, leaf = key.rpartition(".")
        if leaf == COMFY_QUANT_LEAF:
            try:
                spec = json.loads(bytes(reader.read(raw).reshape(-1).tolist()))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{reader.path}: {raw} is not UTF-8 JSON ({err})") from err
            formats[layer] = _format_of(reader.path, layer, spec)
    bad = {layer: fmt for layer, fmt in formats.items() if fmt not in FP8_FORMATS}
    if bad:
        layer, fmt = next(iter(sorted(bad.items())))
        raise ValueError(f"{reader.path}: ComfyUI quantization format {fmt!r} (layer {layer!r} and {len(bad) - 1} "
                         f"more) is not supported; supported formats: {', '.join(FP8_FORMATS)}. Use an fp8 or "
                         "bf16/fp16 file")
    return formats


def _read_file(reader: TensorReader, stripped: Mapping[str, str]) -> tuple[dict[str, LazyTensor], QuantInfo]:
    """Split one file's (stripped) keys into parameter entries and quantization side-data."""
    formats = _layer_formats(reader, stripped)
    entries, scales, marker, inputs = {}, {}, False, 0
    for key, raw in stripped.items():
        layer, _, leaf = key.rpartition(".")
        if key == SCALED_MARKER:
            marker = True
        elif leaf in WEIGHT_SCALE_LEAVES:
            scales[layer] = LazyTensor(reader, raw, reader.shape(raw), reader.dtype(raw))
        elif leaf in INPUT_SCALE_LEAVES:
            inputs += 1
        elif leaf != COMFY_QUANT_LEAF:
            dtype = reader.dtype(raw)
            view = FP8_FORMATS[formats[layer]] if leaf == "weight" and layer in formats and dtype == torch.uint8 \
                else None
            entries[key] = LazyTensor(reader, raw, reader.shape(raw), view or dtype, view)
    return entries, QuantInfo(scales, formats, marker, inputs)


def open_state_dict(paths: Sequence[PathLike], device: str = "cpu") -> LazyStateDict:
    """Open base file(s) then adapter file(s); return the merged, prefix-stripped lazy state dict.

    A later file's weight replaces an earlier one together with its scale (an unscaled replacement drops the old
    scale). Raises ValueError naming the file when a file is missing, unreadable, not a Wan transformer/adapter or
    quantized in an unsupported format, or when no file holds the base weights.
    """
    if not paths:
        raise ValueError("no checkpoint files given")
    entries: dict[str, LazyTensor] = {}
    scales: dict[str, LazyTensor] = {}
    formats: dict[str, str] = {}
    marker, inputs = False, 0
    for path in paths:
        reader = open_reader(path, device)
        stripped = {strip_prefix(k): k for k in reader.keys()}
        _check_file(reader.path, set(stripped))
        file_entries, quant = _read_file(reader, stripped)
        for key in file_entries:
            if key.endswith(".weight"):
                scales.pop(key[: -len(".weight")], None)
        entries.update(file_entries)
        scales.update(quant.scales)
        formats.update(quant.formats)
        marker, inputs = marker or quant.scaled_marker, inputs + quant.input_scales
    result = LazyStateDict(entries, tuple(Path(p) for p in paths), device, QuantInfo(scales, formats, marker, inputs))
    if "patch_embedding.weight" not in entries:
        raise ValueError(f"{result.describe()}: no Wan2.1 base weights (patch_embedding.weight missing); these "
                         f"files hold only an adapter — also pass the Wan2.1 I2V base model")
    return result


def fp8_storage(sd: LazyStateDict) -> Optional[torch.dtype]:
    """The fp8 dtype most ``.weight`` tensors of ``sd`` are stored in, or None when none is fp8."""
    counts = Counter(entry.dtype for key, entry in sd.items() if key.endswith(".weight") and entry.dtype in FP8_DTYPES)
    return counts.most_common(1)[0][0] if counts else None


_AUTO_MODES = {(torch.float8_e4m3fn, False): QuantMode.FP8_E4M3FN,
               (torch.float8_e4m3fn, True): QuantMode.FP8_E4M3FN_SCALED,
               (torch.float8_e5m2, False): QuantMode.FP8_E5M2,
               (torch.float8_e5m2, True): QuantMode.FP8_E5M2_SCALED}


def settle_quant_mode(sd: LazyStateDict, requested: Union[str, QuantMode]) -> QuantMode:
    """The quantization a model loaded from ``sd`` uses: ``disabled`` on fp8 storage becomes that fp8 mode
    (``_scaled`` when the files carry weight scales or the ``scaled_fp8`` marker); any other choice is kept (fp8
    weights are then dequantized with their scales and re-quantized into the chosen format)."""
    mode = requested if isinstance(requested, QuantMode) else QuantMode.parse(requested)
    storage = fp8_storage(sd)
    if mode is not QuantMode.DISABLED or storage is None:
        return mode
    settled = _AUTO_MODES[(storage, sd.quant.scaled)]
    log.info("%s stores %s weights%s: quantization 'disabled' loads them as %s", sd.describe(), storage,
             " with scales" if sd.quant.scaled else "", settled.value)
    return settled


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


def _read_scale(sd: LazyStateDict, layer: str, rows: int) -> Optional[torch.Tensor]:
    """The weight scale of ``layer`` as float32 [1] or [rows], or None when the layer has none."""
    entry = sd.quant.scales.get(layer)
    if entry is None:
        return None
    scale = entry.read().float().reshape(-1)
    if scale.numel() not in (1, rows):
        raise ValueError(f"{entry.reader.path}: the weight scale of {layer} has shape {list(entry.shape)}; only "
                         f"per-tensor or per-output-channel ({rows}) fp8 scales are supported, not block scales")
    return scale


def _scaled(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``weight`` [N, ...] times a per-tensor [1] or per-row [N] scale."""
    return weight.float() * scale.reshape(-1, *([1] * (weight.dim() - 1)))


def _effective(sd: LazyStateDict, name: str) -> torch.Tensor:
    """A non-quantized parameter's value: as stored, except fp8 tensors, dequantized (x their scale) to float32."""
    tensor = sd[name].read()
    layer, _, leaf = name.rpartition(".")
    scale = _read_scale(sd, layer, tensor.shape[0]) if leaf == "weight" and tensor.dim() else None
    if scale is not None:
        return _scaled(tensor, scale)
    return tensor.float() if tensor.dtype in FP8_DTYPES else tensor


def _layer_tensors(sd: LazyStateDict, prefix: str) -> dict[str, torch.Tensor]:
    """``{weight, bias[, scale_weight]}`` for one quantized layer: fp8 weights travel with their scale (1.0 when the
    file has none), other weights with a scale are multiplied out."""
    tensors = {leaf: sd[f"{prefix}.{leaf}"].read() for leaf in ("weight", "bias") if f"{prefix}.{leaf}" in sd}
    weight = tensors["weight"]
    scale = _read_scale(sd, prefix, weight.shape[0])
    if weight.dtype in FP8_DTYPES:
        tensors["scale_weight"] = scale if scale is not None else torch.ones((), device=weight.device)
    elif scale is not None:
        tensors["weight"] = _scaled(weight, scale)
    return tensors


def _settle_ops(sd: LazyStateDict, ops: Optional[Ops]) -> Ops:
    requested = ops.mode if ops is not None else QuantMode.DISABLED
    mode = settle_quant_mode(sd, requested)
    return ops if ops is not None and mode is requested else ops_for(mode)


def load_model(model_cls: type, sd: LazyStateDict, options: LoadOptions) -> nn.Module:
    """Build ``model_cls(config, ops, attention)`` on the meta device and fill it from ``sd`` one tensor at a time.

    The quantization is settled by :func:`settle_quant_mode` (``options.ops`` of mode ``disabled`` on an fp8 file
    becomes that fp8 mode). Strict: every model parameter must be in the files and every file key must be a model
    parameter, with equal shapes; otherwise one ValueError lists the differences. Returns the model in eval mode
    without gradients.
    """
    if options.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"base dtype must be float32, bfloat16 or float16, got {options.dtype}")
    if torch.device(sd.device) != torch.device(options.device):
        raise ValueError(f"the files were opened for device {sd.device} but LoadOptions.device is {options.device}; "
                         f"pass the same device to open_state_dict")
    cfg = WanConfig.from_state_dict(sd, text_len=options.text_len, num_heads=options.num_heads)
    ops = _settle_ops(sd, options.ops)
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
    if sd.quant.input_scales:
        log.info("%s: %d activation scales ignored (activations are scaled per call)", sd.describe(),
                 sd.quant.input_scales)
    keep = getattr(model_cls, "KEEP_FP32", ())
    for name, param in params.items():
        entry = sd[name]
        if tuple(entry.shape) != tuple(param.shape):
            raise ValueError(f"{entry.reader.path}: {name} has shape {list(entry.shape)}, the model built from "
                             f"these files expects {list(param.shape)} (mixed architectures?)")
        dtype = torch.float32 if _matches(name, keep) else options.dtype
        _assign(model, name, _effective(sd, name).to(dtype))
    for prefix in sorted(quantized):
        model.get_submodule(prefix).load_state_dict(_layer_tensors(sd, prefix), strict=True, assign=True)
    assign_layer_names(model)
    return model.eval()
