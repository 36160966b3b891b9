"""umT5-XXL text encoder as Wan2.1 runs it (``wan/modules/t5.py``: ``T5Encoder`` built by ``umt5_xxl``).

Module attribute names equal the Wan checkpoint keys (``token_embedding``, ``blocks.N.{norm1,attn.{q,k,v,o},norm2,
ffn.{gate.0,fc1,fc2},pos_embedding.embedding}``, ``norm``). Checkpoints in the Hugging Face T5 encoder layout
(``shared``, ``encoder.block.N.layer.…``) are renamed on load. Precision fp32 or bf16; with fp8 storage the
Linear weights are kept as float8_e4m3fn and cast per layer to the compute dtype.

Math (fixtures.md §2): T5 RMS LayerNorm without bias, attention without 1/sqrt(d) scaling plus a per-layer
bidirectional relative-position bias, masked keys' logits replaced by finfo.min, gated gelu_tanh FFN.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..fp8_optimization import QuantMode, ops_for
from .text_cache import EncoderIdentity, TextEmbedCache, cached_encode
from .tokenizer import UMT5Tokenizer, find_tokenizer, split_prompts

log = logging.getLogger(__name__)

PRECISIONS = MappingProxyType({"fp32": torch.float32, "bf16": torch.bfloat16})
QUANTIZATIONS = (QuantMode.DISABLED.value, QuantMode.FP8_E4M3FN.value)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SPIECE_KEY = "spiece_model"


@dataclass(frozen=True)
class UMT5Config:
    """umT5 encoder sizes; every field but ``max_dist``/``eps`` is read from the state dict."""

    vocab_size: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int
    max_dist: int = 128
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "UMT5Config":
        """Sizes from Wan-layout shapes; heads = second dim of the relative-position table [buckets, heads]."""
        vocab, dim = sd["token_embedding.weight"].shape
        layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
        if not layers or layers != list(range(len(layers))):
            raise ValueError(f"umT5 state dict has no consecutive blocks.N.* keys (found block indices {layers})")
        buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
        if dim_attn % heads:
            raise ValueError(f"umT5 attention width {dim_attn} is not divisible by the {heads} heads of the "
                             "relative-position table")
        return cls(vocab_size=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0],
                   num_heads=heads, num_layers=len(layers), num_buckets=buckets)


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias: ``weight * x * rsqrt(mean(x^2) + eps)``, statistics in float32.

    x [B, L, dim] -> [B, L, dim] of the weight's dtype when that is 16-bit, else float32 (as Wan's T5LayerNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class GELUTanh(nn.Module):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written out as Wan's T5 does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_dist: int) -> torch.Tensor:
    """Bidirectional T5 bucket of ``rel`` = key position - query position (int64 in, int64 out)."""
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    max_exact = half // 2
    scaled = torch.log(dist.clamp(min=1).float() / max_exact) / math.log(max_dist / max_exact)
    large = (max_exact + (scaled * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class T5RelativeEmbedding(nn.Module):
    """Per-layer position bias table ``embedding`` [buckets, heads]."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.num_buckets = cfg.num_buckets
        self.max_dist = cfg.max_dist
        self.embedding = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """Bias [1, heads, L, L] for query i, key j (model dtype)."""
        pos = torch.arange(length, device=self.embedding.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_dist)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Self-attention without bias and without 1/sqrt(d) scaling; logits get the position bias, masked keys
    get finfo.min. x [B, L, dim], mask [B, L] (1 = real token), pos_bias [1, H, L, L] -> [B, L, dim]."""

    def __init__(self, cfg: UMT5Config, linear: type):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q = linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = linear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_bias: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        shape = (b, length, self.num_heads, self.head_dim)
        q, k, v = self.q(x).view(shape), self.k(x).view(shape), self.v(x).view(shape)
        keep = (mask != 0).view(b, 1, 1, length)
        bias = pos_bias.to(x.dtype).masked_fill(~keep, torch.finfo(x.dtype).min)
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias
        attn = torch.softmax(logits.float(), dim=-1).type_as(logits)
        out = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, -1)
        return self.o(out)


class T5FeedForward(nn.Module):
    """Gated FFN ``fc2(fc1(x) * gelu_tanh(gate.0(x)))``; x [B, L, dim] -> [B, L, dim]."""

    def __init__(self, cfg: UMT5Config, linear: type):
        super().__init__()
        self.gate = nn.Sequential(linear(cfg.dim, cfg.dim_ffn, bias=False), GELUTanh())
        self.fc1 = linear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc2 = linear(cfg.dim_ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    """``x += attn(norm1(x)) ; x += ffn(norm2(x))`` with this layer's own position bias."""

    def __init__(self, cfg: UMT5Config, linear: type):
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg, linear)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg, linear)
        self.pos_embedding = T5RelativeEmbedding(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, self.pos_embedding(x.shape[1]))
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """umT5 encoder stack. forward(ids [B, L] int64, mask [B, L]) -> hidden states [B, L, dim] (model dtype)."""

    NOT_QUANTIZED = ("token_embedding", "norm", "pos_embedding")

    def __init__(self, cfg: UMT5Config, quantization: str | QuantMode = QuantMode.DISABLED):
        super().__init__()
        self.config = cfg
        linear = ops_for(quantization).Linear
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg, linear) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    @torch.inference_mode()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """ids, mask [B, L] -> one [L_i, dim] tensor per row, trimmed to its real length ``mask[i].sum()``."""
        if ids.shape != mask.shape or ids.dim() != 2:
            raise ValueError(f"umT5 encode expects ids and mask of equal shape [B, L], got {tuple(ids.shape)} "
                             f"and {tuple(mask.shape)}")
        hidden = self.forward(ids, mask)
        lengths = (mask > 0).sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]


# --------------------------------------------------------------------------------------------- checkpoint loading

_HF_BLOCK_RENAMES = (
    ("layer.0.layer_norm.weight", "norm1.weight"),
    ("layer.0.SelfAttention.q.weight", "attn.q.weight"),
    ("layer.0.SelfAttention.k.weight", "attn.k.weight"),
    ("layer.0.SelfAttention.v.weight", "attn.v.weight"),
    ("layer.0.SelfAttention.o.weight", "attn.o.weight"),
    ("layer.0.SelfAttention.relative_attention_bias.weight", "pos_embedding.embedding.weight"),
    ("layer.1.layer_norm.weight", "norm2.weight"),
    ("layer.1.DenseReluDense.wi_0.weight", "ffn.gate.0.weight"),
    ("layer.1.DenseReluDense.wi_1.weight", "ffn.fc1.weight"),
    ("layer.1.DenseReluDense.wo.weight", "ffn.fc2.weight"),
)
_HF_IGNORED_PREFIXES = ("decoder.", "lm_head.")


def convert_hf_t5(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face (U)MT5 encoder state dict to the Wan layout. Decoder / lm_head keys are dropped."""
    block_map = dict(_HF_BLOCK_RENAMES)
    out, unknown = {}, []
    for key, value in sd.items():
        block = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif block and block.group(2) in block_map:
            out[f"blocks.{block.group(1)}.{block_map[block.group(2)]}"] = value
        elif not key.startswith(_HF_IGNORED_PREFIXES):
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in a Hugging Face T5 encoder checkpoint: {unknown[:5]}")
    return out


def _check_wan_layout(sd: dict[str, torch.Tensor], name: str) -> None:
    """Raise ValueError naming what is missing or extra against the umT5 encoder built from ``sd``'s shapes."""
    needed = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight", "norm.weight")
    if any(k not in sd for k in needed):
        raise ValueError(f"{name} is not a umT5 encoder checkpoint: expected Wan keys (token_embedding.weight, "
                         "blocks.N.attn.q.weight, …) or Hugging Face T5 keys (shared.weight, "
                         f"encoder.block.N.layer.0.SelfAttention.q.weight, …); found e.g. {sorted(sd)[:5]}")
    if "blocks.1.attn.q.weight" in sd and "blocks.1.pos_embedding.embedding.weight" not in sd:
        raise ValueError(f"{name} is a T5 encoder whose position bias lives only in block 0 (T5 v1.1 / t5xxl as "
                         "used by Flux/SD3), not umT5-XXL; Wan needs umt5-xxl-enc (bf16 or fp8_e4m3fn)")
    with torch.device("meta"):
        expected = set(UMT5Encoder(UMT5Config.from_state_dict(sd)).state_dict())
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise ValueError(f"{name}: umT5 encoder keys do not match (missing {missing[:5]}, unexpected {extra[:5]})")


def _reject_scaled_fp8(sd: dict[str, torch.Tensor], name: str) -> None:
    scaled = [k for k in sd if k == "scaled_fp8" or k.endswith((".scale_weight", ".weight_scale", ".scale_input"))]
    if scaled:
        raise ValueError(f"{name} is a scaled-fp8 text encoder (key {scaled[0]!r}), which this loader does not "
                         "support; use umt5-xxl-enc-bf16.safetensors, or umt5-xxl-enc-fp8_e4m3fn.safetensors with "
                         "quantization fp8_e4m3fn")


@dataclass(frozen=True)
class T5Checkpoint:
    """A umT5 state dict in the Wan layout, the layout it came in and an embedded tokenizer model, if any."""

    state_dict: dict[str, torch.Tensor]
    layout: str
    spiece_model: Optional[bytes]

    @property
    def is_fp8(self) -> bool:
        return self.state_dict["blocks.0.attn.q.weight"].dtype in FP8_DTYPES


def read_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file (or a torch .pth/.pt/.bin checkpoint, loaded weights-only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text encoder file not found: {path}")
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = torch.load(str(path), map_location=device, weights_only=True, mmap=True)
        return sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def prepare_t5_state_dict(sd: dict[str, torch.Tensor], name: str = "state dict") -> T5Checkpoint:
    """Detect the layout (Wan or HF), reject scaled fp8, pull out ``spiece_model`` and check the keys."""
    sd = dict(sd)
    spiece = None
    for key in [k for k in sd if k == SPIECE_KEY or k.endswith("." + SPIECE_KEY)]:
        spiece = sd.pop(key).cpu().numpy().tobytes()
    _reject_scaled_fp8(sd, name)
    layout = "wan"
    if "shared.weight" in sd or any(k.startswith("encoder.block.") for k in sd):
        sd, layout = convert_hf_t5(sd), "huggingface"
    _check_wan_layout(sd, name)
    return T5Checkpoint(state_dict=sd, layout=layout, spiece_model=spiece)


def build_umt5(sd: dict[str, torch.Tensor], precision: str = "bf16", quantization: str = "disabled") -> UMT5Encoder:
    """Wan-layout state dict -> UMT5Encoder in eval mode on the tensors' device. With ``quantization`` fp8_e4m3fn
    the Linear layers store float8_e4m3fn weights with a per-tensor scale (quantized at load by the layer, or taken
    as is from an fp8 file); everything else is ``precision`` (fp32|bf16).

    ``sd`` is consumed (emptied) while casting, so at most one extra tensor exists at a time."""
    if precision not in PRECISIONS:
        raise ValueError(f"text encoder precision {precision!r} is not supported; choose one of {list(PRECISIONS)}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"text encoder quantization {quantization!r} is not supported; choose one of "
                         f"{list(QUANTIZATIONS)}")
    dtype = PRECISIONS[precision]
    with torch.device("meta"):
        model = UMT5Encoder(UMT5Config.from_state_dict(sd), quantization)
    cast = {}
    for key in list(sd):
        tensor = sd.pop(key)
        cast[key] = tensor if tensor.dtype == torch.float8_e4m3fn else tensor.to(dtype)
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- prompts -> embeddings

class T5TextEncoder:
    """umT5 encoder plus its tokenizer: prompts -> list of [L_i, dim] embeddings (model dtype, model device)."""

    def __init__(self, model: UMT5Encoder, tokenizer: UMT5Tokenizer, name: str = "umt5"):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name

    @property
    def dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    def __call__(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Encode prompts as one batch padded to the tokenizer's max length (512), trimmed per prompt."""
        ids, mask = self.tokenizer(list(prompts), device=self.model.token_embedding.weight.device)
        top = int(ids.max()) if ids.numel() else 0
        if top >= self.model.config.vocab_size:
            raise ValueError(f"tokenizer {self.tokenizer.source} produced token id {top}, beyond the encoder's "
                             f"vocabulary of {self.model.config.vocab_size}: use the google/umt5-xxl tokenizer")
        return self.model.encode(ids, mask)


@dataclass(frozen=True)
class T5LoadOptions:
    """How to load a text encoder file: precision fp32|bf16, quantization disabled|fp8_e4m3fn, target device."""

    precision: str = "bf16"
    quantization: str = "disabled"
    device: str = "cpu"


def load_text_encoder(path: str | Path, options: Optional[T5LoadOptions] = None) -> T5TextEncoder:
    """Load a umT5 encoder file (Wan or HF layout, bf16/fp32/fp8) and find its tokenizer (see tokenizer.py).

    A file whose Linear weights are fp8 switches quantization to fp8_e4m3fn (storage stays fp8)."""
    path = Path(path)
    options = options or T5LoadOptions()
    ckpt = prepare_t5_state_dict(read_state_dict(path, options.device), path.name)
    tokenizer = find_tokenizer(path, embedded=ckpt.spiece_model)
    quantization = options.quantization
    if ckpt.is_fp8 and quantization == QuantMode.DISABLED.value:
        log.info("%s stores fp8 weights: using quantization fp8_e4m3fn", path.name)
        quantization = QuantMode.FP8_E4M3FN.value
    model = build_umt5(ckpt.state_dict, options.precision, quantization)
    log.info("loaded umT5 %s (%s layout, %d layers, dim %d, vocab %d, tokenizer %s)", path.name, ckpt.layout,
             model.config.num_layers, model.config.dim, model.config.vocab_size, tokenizer.source)
    return T5TextEncoder(model, tokenizer, path.name)


@dataclass(frozen=True)
class TextEmbeds:
    """Result of a text-encode node: one [L_i, dim] per positive prompt segment, the negative prompt's list."""

    prompt_embeds: list[torch.Tensor]
    negative_prompt_embeds: list[torch.Tensor]
    prompts: tuple[str, ...]

    def to_dict(self) -> dict:
        """The WANVIDEOTEXTEMBEDS socket dict."""
        return {"prompt_embeds": self.prompt_embeds, "negative_prompt_embeds": self.negative_prompt_embeds,
                "echoshot": False}


def encode_text_embeds(positive: str, negative: str, encode: Optional[Callable[[list[str]], list[torch.Tensor]]],
                       cache: Optional[TextEmbedCache] = None,
                       identity: Optional[EncoderIdentity] = None) -> TextEmbeds:
    """WanVideoTextEncode logic: split ``positive`` on ``|``, strip ``(text:weight)`` and scale that prompt's whole
    embedding by the weight; the negative prompt is encoded as is. ``encode`` (e.g. a T5TextEncoder, or a
    function that loads one) runs only for prompts missing from ``cache``."""
    segments = split_prompts(positive)
    texts = [s.text for s in segments]
    embeds = cached_encode(texts + [negative], encode, cache, identity)
    weighted = [e if s.weight == 1.0 else e * s.weight for s, e in zip(segments, embeds)]
    return TextEmbeds(prompt_embeds=weighted, negative_prompt_embeds=[embeds[-1]], prompts=tuple(texts))
