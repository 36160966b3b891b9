"""wav2vec2 audio features per video frame: 16 kHz waveform -> ``[frames, L, D]`` (InfiniteTalk front end).

transformers' ``Wav2Vec2Model`` supplies the modules (conv feature encoder, feature projection, positional conv,
encoder layers); the forward is our own (:func:`encoder_hidden_states`), so it does not depend on transformers'
``output_hidden_states`` / ``output_attentions`` plumbing, which changed between 4.4x and 5.x.

Math (model-spec §4.2, fixtures.md §4): conv encoder (~50 Hz) -> linear interpolation (align_corners) to exactly
``int(seconds * fps)`` frames -> LayerNorm + Linear -> ``x + GELU(posconv(x))`` -> encoder LayerNorm -> the L
post-LN layers; the embedding stacks the L layer outputs (``hidden_states[1:]``).

Precision: the conv feature encoder always runs in float32 (``KEEP_FP32``), as fairseq trained these checkpoints
(its first-layer GroupNorm is an ``Fp32GroupNorm``); it is a small share of the compute and the interpolation that
follows it is done in float32 too. This is a safety choice: on the tiny random fixture model a half-precision conv
encoder differs from float32 by ~1e-3 (fp16) / ~1e-2 (bf16) relative; the real checkpoint was not measured here.
Everything after the interpolation runs in the chosen dtype.

:func:`download_wav2vec` fetches a Hugging Face wav2vec2 repository (config + one weights file) for the
"(Down)load Wav2Vec Model" node; loading itself never downloads.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Wav2Vec2Config, Wav2Vec2Model

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
BUNDLED_CONFIG = Path(__file__).with_name("wav2vec2_base_config.json")
KEEP_FP32 = ("feature_extractor",)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTN_IMPLEMENTATION = "sdpa"
NORMALIZE_EPS = 1e-7
PREFIX = "wav2vec2."
POS_CONV = "encoder.pos_conv_embed.conv."
WEIGHT_NORM_NAMES = (("weight_g", "parametrizations.weight.original0"),
                     ("weight_v", "parametrizations.weight.original1"))
REQUIRED_KEYS = ("feature_extractor.conv_layers.0.conv.weight", "feature_projection.projection.weight",
                 "encoder.layers.0.attention.q_proj.weight", "encoder.layer_norm.weight",
                 POS_CONV + "parametrizations.weight.original1")
HEAD_PREFIXES = ("lm_head.", "quantizer.", "project_q.", "project_hid.", "projector.", "classifier.")
CTC_HINTS = ("960h", "ForCTC")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILES = ("config.json", "preprocessor_config.json")


@dataclass(frozen=True, eq=False)
class Wav2VecEncoder:
    """A loaded wav2vec2 model plus the feature-extractor setting and what kind of checkpoint it was.

    ``model`` is an eval-mode ``transformers.Wav2Vec2Model``; ``dtype`` the compute dtype after the conv encoder;
    ``ctc_finetuned`` is True for ASR fine-tunes (facebook/wav2vec2-base-960h), which MultiTalk cannot use.
    """

    model: Wav2Vec2Model
    do_normalize: bool
    dtype: torch.dtype
    model_type: str
    ctc_finetuned: bool = False

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def check_multitalk(self) -> None:
        """Raise ValueError unless this is a pre-trained (not CTC fine-tuned) model usable by Multi/InfiniteTalk."""
        if self.ctc_finetuned:
            raise ValueError(
                f"wav2vec2 model {self.model_type!r} is a CTC speech-recognition fine-tune (like "
                "facebook/wav2vec2-base-960h); Multi/InfiniteTalk were trained on TencentGameMate/"
                "chinese-wav2vec2-base features. Load that model in the wav2vec2 loader instead.")


def parse_precision(name: str) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` -> torch dtype; ValueError naming the choices otherwise."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown wav2vec2 precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def bundled_config() -> dict:
    """The wav2vec2-base (chinese-wav2vec2-base) configuration dict shipped with the pack."""
    return json.loads(BUNDLED_CONFIG.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------- state dicts


def canonical_state_dict(raw: Mapping[str, torch.Tensor], source: str = "checkpoint"
                         ) -> tuple[dict[str, torch.Tensor], bool]:
    """Bare ``Wav2Vec2Model`` keys with the positional conv as ``parametrizations.weight.original0/1``.

    Accepts ``wav2vec2.<param>`` or bare keys and ``weight_g``/``weight_v`` naming; drops pre-training / CTC heads.
    Returns (state dict, has_ctc_head). Raises ValueError when the file is not a wav2vec2 model.
    """
    prefixed = any(k.startswith(PREFIX) for k in raw)
    has_ctc_head = any(k.startswith("lm_head.") for k in raw)
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if prefixed:
            if not key.startswith(PREFIX):
                continue
            key = key[len(PREFIX):]
        elif key.startswith(HEAD_PREFIXES):
            continue
        for old, new in WEIGHT_NORM_NAMES:
            if key == POS_CONV + old:
                key = POS_CONV + new
        out[key] = value
    missing = [k for k in REQUIRED_KEYS if k not in out]
    if missing:
        sample = ", ".join(sorted(raw)[:5])
        raise ValueError(f"{source} is not a wav2vec2 model: missing {', '.join(missing)} (first keys: {sample}). "
                         "Select a wav2vec2 checkpoint such as TencentGameMate/chinese-wav2vec2-base.")
    return out, has_ctc_head


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    n = 0
    while pattern.format(n) in sd:
        n += 1
    return n


def config_from_state_dict(sd: Mapping[str, torch.Tensor], base: Optional[Mapping] = None) -> Wav2Vec2Config:
    """Build a ``Wav2Vec2Config``: every size from the (canonical) state-dict shapes, the rest from ``base``.

    ``base`` (default: the bundled wav2vec2-base dict) supplies what shapes cannot show: conv strides, activations,
    LayerNorm eps, pre/post-LN, and the head count (kept when the hidden size matches ``base``, else hidden / 64).
    """
    cfg = dict(bundled_config() if base is None else base)
    n_conv = _count(sd, "feature_extractor.conv_layers.{}.conv.weight")
    convs = [sd[f"feature_extractor.conv_layers.{i}.conv.weight"] for i in range(n_conv)]
    strides = list(cfg.get("conv_stride", []))
    if len(strides) != n_conv:
        raise ValueError(f"wav2vec2 checkpoint has {n_conv} conv layers but the config lists {len(strides)} conv "
                         "strides; put the model's config.json next to the weights")
    proj = sd["feature_projection.projection.weight"]
    hidden = proj.shape[0]
    v = sd[POS_CONV + "parametrizations.weight.original1"]
    heads = cfg.get("num_attention_heads", 12)
    if cfg.get("hidden_size") != hidden:
        heads = max(hidden // 64, 1)
        log.warning("wav2vec2 hidden size %d differs from the config's %s; assuming %d attention heads (head dim "
                    "64). Put the model's config.json next to the weights to be exact.", hidden,
                    cfg.get("hidden_size"), heads)
    if hidden % heads:
        raise ValueError(f"wav2vec2 hidden size {hidden} is not divisible by {heads} attention heads; put the "
                         "model's config.json next to the weights")
    cfg.update(
        hidden_size=hidden, num_attention_heads=heads,
        num_feat_extract_layers=n_conv, conv_dim=[w.shape[0] for w in convs],
        conv_kernel=[w.shape[2] for w in convs], conv_stride=strides,
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in sd,
        feat_extract_norm="layer" if "feature_extractor.conv_layers.1.layer_norm.weight" in sd else "group",
        num_hidden_layers=_count(sd, "encoder.layers.{}.attention.q_proj.weight"),
        intermediate_size=sd["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
        num_conv_pos_embeddings=v.shape[2], num_conv_pos_embedding_groups=hidden // v.shape[1],
    )
    if proj.shape[1] != cfg["conv_dim"][-1]:
        raise ValueError(f"wav2vec2 feature projection expects {proj.shape[1]} channels but the last conv has "
                         f"{cfg['conv_dim'][-1]}; the checkpoint is inconsistent")
    for key in [k for k in cfg if k.startswith("_")] + ["architectures", "torch_dtype", "dtype",
                                                        "transformers_version", "attn_implementation"]:
        cfg.pop(key, None)
    return Wav2Vec2Config(**cfg, attn_implementation=ATTN_IMPLEMENTATION)


def _match_model_keys(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename the positional-conv weight-norm tensors to the naming this torch/transformers uses."""
    out = dict(sd)
    for old, new in WEIGHT_NORM_NAMES:
        if POS_CONV + new not in model_keys and POS_CONV + old in model_keys and POS_CONV + new in out:
            out[POS_CONV + old] = out.pop(POS_CONV + new)
    if "masked_spec_embed" not in model_keys:
        out.pop("masked_spec_embed", None)
    return out


def build_model(config: Wav2Vec2Config, sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Wav2Vec2Model:
    """Instantiate ``Wav2Vec2Model`` without random init and fill it strictly from ``sd`` (canonical keys).

    Parameters under ``KEEP_FP32`` stay float32; all others are cast to ``dtype``. Returns an eval-mode model on
    the CPU with gradients off. Raises ValueError naming missing / unexpected keys.
    """
    with torch.device("meta"):
        model = Wav2Vec2Model(config)
    model_keys = set(model.state_dict())
    weights = _match_model_keys(dict(sd), model_keys)
    if "masked_spec_embed" in model_keys and "masked_spec_embed" not in weights:
        weights["masked_spec_embed"] = torch.zeros(config.hidden_size)
    missing = sorted(model_keys - set(weights))
    unexpected = sorted(set(weights) - model_keys)
    if missing or unexpected:
        raise ValueError(f"wav2vec2 checkpoint does not match its config: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    cast = {k: (t.float() if k.startswith(KEEP_FP32) else t.to(dtype)) for k, t in weights.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model


def encoder_from_state_dict(raw: Mapping[str, torch.Tensor], precision: str = "fp32",
                            base_config: Optional[Mapping] = None, do_normalize: bool = False,
                            model_type: str = "tencent") -> Wav2VecEncoder:
    """Build a :class:`Wav2VecEncoder` from an in-memory state dict (either key naming)."""
    dtype = parse_precision(precision)
    sd, has_ctc_head = canonical_state_dict(raw, model_type)
    config = config_from_state_dict(sd, base_config)
    ctc = has_ctc_head or _names_ctc(model_type, base_config)
    return Wav2VecEncoder(build_model(config, sd, dtype), do_normalize, dtype, model_type, ctc)


def _names_ctc(model_type: str, config: Optional[Mapping]) -> bool:
    """True when the name or the config's ``architectures`` mark a CTC fine-tune (e.g. wav2vec2-base-960h)."""
    names = [model_type, *((config or {}).get("architectures") or ())]
    return any(hint in name for name in names for hint in CTC_HINTS)


# ----------------------------------------------------------------------------------------------- files


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in (".bin", ".pt", ".pth"):
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        raise ValueError(f"{path.name} is not a plain state dict (a fairseq .pt checkpoint?); use the Hugging Face "
                         "conversion (config.json + model.safetensors or pytorch_model.bin)")
    raise ValueError(f"unsupported wav2vec2 file {path.name!r}: expected .safetensors, .bin or a model folder")


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_wav2vec(path: str | Path, precision: str = "fp16", model_type: Optional[str] = None,
                 do_normalize: Optional[bool] = None) -> Wav2VecEncoder:
    """Load wav2vec2 from a Hugging Face folder or a single weights file (no downloads).

    Folder: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` (torch.load with weights_only);
    ``preprocessor_config.json`` supplies ``do_normalize`` when present. Single file: ``wav2vec2.<param>`` or bare
    keys; config from a ``config.json`` beside it, else the bundled wav2vec2-base config; ``do_normalize`` False
    (as for chinese-wav2vec2-base). ``model_type`` defaults to the folder / file name.
    """
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"wav2vec2 folder {path} has none of {', '.join(WEIGHT_FILES)}")
        config = _read_json(path / "config.json")
        preprocessor = _read_json(path / "preprocessor_config.json") or {}
        default_normalize = bool(preprocessor.get("do_normalize", False))
        name = f"{path.parent.name}/{path.name}"
    elif path.is_file():
        weights, config, default_normalize, name = path, _read_json(path.with_name("config.json")), False, path.name
    else:
        raise FileNotFoundError(f"wav2vec2 model not found at {path}")
    encoder = encoder_from_state_dict(_read_weights(weights), precision, config,
                                      default_normalize if do_normalize is None else do_normalize, model_type or name)
    cfg = encoder.model.config
    log.info("wav2vec2 %s: %d layers x %d, %s (conv encoder float32), do_normalize %s%s", encoder.model_type,
             cfg.num_hidden_layers, cfg.hidden_size, precision, encoder.do_normalize,
             ", CTC fine-tune" if encoder.ctc_finetuned else "")
    return encoder


def has_weights(folder: str | Path) -> bool:
    """True when ``folder`` holds a Hugging Face wav2vec2 weights file (``model.safetensors`` or
    ``pytorch_model.bin``)."""
    return any((Path(folder) / name).is_file() for name in WEIGHT_FILES)


def _manual_steps(repo_id: str, folder: Path, reason: str) -> str:
    return (f"could not download {repo_id} into {folder} ({reason}). To install it by hand, put config.json, "
            f"preprocessor_config.json and model.safetensors (or pytorch_model.bin) from "
            f"https://huggingface.co/{repo_id} into {folder}, e.g. on a machine with internet access: "
            f"`hf download {repo_id} {' '.join(CONFIG_FILES)} pytorch_model.bin --local-dir {folder}`, then copy "
            "the folder over")


def download_wav2vec(repo_id: str, folder: str | Path, endpoint: Optional[str] = None) -> Path:
    """Download a wav2vec2 repository from the Hugging Face hub into ``folder`` and return ``folder``.

    Only what :func:`load_wav2vec` reads is fetched: ``config.json``, ``preprocessor_config.json`` and one weights
    file, ``model.safetensors`` when the repository has it, else ``pytorch_model.bin``. ``endpoint``: hub URL
    (default ``$HF_ENDPOINT``, else huggingface.co). Raises RuntimeError naming ``folder`` and the manual steps when
    huggingface_hub is missing, the hub cannot be reached (offline, ``HF_HUB_OFFLINE=1``) or the repository has no
    weights file.
    """
    folder = Path(folder)
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:
        raise RuntimeError(_manual_steps(repo_id, folder, "the huggingface_hub package is not installed")) from err
    try:
        for weights in WEIGHT_FILES:
            snapshot_download(repo_id, local_dir=folder, allow_patterns=[*CONFIG_FILES, weights], endpoint=endpoint)
            if (folder / weights).is_file():
                break
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        detail = (str(err).strip().splitlines() or [""])[0]
        reason = f"the hub at {endpoint or constants.ENDPOINT} could not be reached or refused: {detail}"
        raise RuntimeError(_manual_steps(repo_id, folder, reason)) from err
    if not has_weights(folder):
        raise RuntimeError(_manual_steps(repo_id, folder, f"no {' or '.join(WEIGHT_FILES)} was downloaded"))
    log.info("downloaded %s into %s", repo_id, folder)
    return folder


# ----------------------------------------------------------------------------------------------- forward


def frame_count(num_samples: int, fps: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Video frames covered by ``num_samples``: ``int(num_samples / sample_rate * fps)`` (the official rounding)."""
    return int(num_samples / sample_rate * fps)


def receptive_field(config: Wav2Vec2Config) -> int:
    """Samples the conv feature encoder needs for one output vector (400 for wav2vec2-base)."""
    size, hop = config.conv_kernel[0], config.conv_stride[0]
    for kernel, stride in zip(config.conv_kernel[1:], config.conv_stride[1:]):
        size += (kernel - 1) * hop
        hop *= stride
    return size


def input_values(waveform: torch.Tensor, do_normalize: bool) -> torch.Tensor:
    """Feature-extractor output ``[1, N]`` float32; with ``do_normalize`` ``(x - mean) / sqrt(var + 1e-7)``."""
    x = waveform.float().reshape(1, -1)
    if do_normalize:
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + NORMALIZE_EPS)
    return x


def conv_features(model: Wav2Vec2Model, values: torch.Tensor) -> torch.Tensor:
    """Conv feature encoder in float32: ``[B, N]`` samples -> ``[B, C, n50]`` (about 50 Hz)."""
    return model.feature_extractor(values.float())


def interpolate_frames(features: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, C, n50]`` -> ``[B, frames, C]`` by linear interpolation along time with align_corners=True."""
    return F.interpolate(features, size=frames, mode="linear", align_corners=True).transpose(1, 2)


def project_features(model: Wav2Vec2Model, features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Feature projection (LayerNorm + Linear): ``[B, T, C]`` -> ``[B, T, D]`` in ``dtype``."""
    out = model.feature_projection(features.to(dtype))
    return out[0] if isinstance(out, tuple) else out


def encoder_hidden_states(model: Wav2Vec2Model, hidden: torch.Tensor) -> list[torch.Tensor]:
    """Positional conv + encoder: ``[B, T, D]`` -> ``[state_0, state_1, ..., state_L]``, each ``[B, T, D]``.

    Post-LN models (wav2vec2-base): state_0 = LN(x + posconv(x)), state_i = layer i output. Pre-LN ("stable")
    models: state_0 = x + posconv(x) and state_L = LN(last layer output) = ``last_hidden_state``, as transformers
    4.x reports ``hidden_states`` (5.x reports state_L before that LayerNorm).
    """
    encoder = model.encoder
    x = hidden + encoder.pos_conv_embed(hidden)
    stable = model.config.do_stable_layer_norm
    if not stable:
        x = encoder.layer_norm(x)
    states = [x]
    for layer in encoder.layers:
        out = layer(x)
        x = out[0] if isinstance(out, tuple) else out
        states.append(x)
    if stable:
        states[-1] = encoder.layer_norm(x)
    return states


def wav2vec_features(encoder: Wav2VecEncoder, waveform: torch.Tensor, fps: float = 25.0) -> torch.Tensor:
    """Per-video-frame features of a mono 16 kHz waveform ``[N]``.

    Returns ``[int(N / 16000 * fps), L, D]`` in ``encoder.dtype`` on the model's device: layer outputs 1..L.
    Raises ValueError when the audio is shorter than one video frame or than the conv encoder's receptive field.
    """
    if waveform.dim() != 1:
        raise ValueError(f"wav2vec2 expects a mono waveform [N], got shape {tuple(waveform.shape)}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    model = encoder.model
    frames = frame_count(waveform.shape[0], fps)
    field = receptive_field(model.config)
    if frames < 1 or waveform.shape[0] < field:
        need = max(math.ceil(SAMPLE_RATE / fps), field)
        raise ValueError(f"audio is {waveform.shape[0] / SAMPLE_RATE:.3f} s long; wav2vec2 needs at least "
                         f"{need / SAMPLE_RATE:.3f} s ({need} samples at 16 kHz) for one video frame at {fps} fps. "
                         "Use a longer audio clip.")
    device = model.feature_projection.projection.weight.device
    with torch.no_grad():
        values = input_values(torch.as_tensor(waveform, device=device), encoder.do_normalize)
        feats = interpolate_frames(conv_features(model, values), frames)
        states = encoder_hidden_states(model, project_features(model, feats, encoder.dtype))
        return torch.stack(states[1:], dim=2)[0]
