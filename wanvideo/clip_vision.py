"""CLIP vision tower (open-clip XLM-R ViT-H/14 ``visual``) as Wan2.1 I2V / InfiniteTalk use it (wan/modules/clip.py).

Module attribute names equal the official ``visual.*`` keys (``patch_embedding``, ``cls_embedding``,
``pos_embedding``, ``pre_norm``, ``transformer.N.{norm1,attn.to_qkv,attn.proj,norm2,mlp.0,mlp.2}``, ``post_norm``,
``head``). Wan runs blocks 0 … L-2 only (``use_31_block=True``): no last block, no post-norm, no head.
Also loads the Hugging Face CLIP vision layout (ComfyUI's ``clip_vision_h.safetensors``, ``vision_model.*``) and the
native open_clip layout (``visual.conv1``, ``visual.transformer.resblocks.N``), renamed on load.

Head count: no weight shape carries it (ViT-H/14 has width 1280 and 16 heads of 80; open-clip ViT-B uses 12 of 64).
``num_heads`` is a config field: pass it when known (the parity fixtures store it in their metadata), otherwise
it comes from :data:`HEADS_BY_WIDTH`, the open-clip ViT widths; an unknown width without ``num_heads`` is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionBackend, resolve
from ..fp8_optimization import QuantMode, ops_for

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEADS_BY_WIDTH = ((768, 12), (1024, 16), (1280, 16), (1408, 16), (1664, 16))
PRECISIONS = MappingProxyType({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16})


@dataclass(frozen=True)
class CLIPVisionConfig:
    """ViT sizes read from the state dict (``num_heads`` see module docstring)."""

    dim: int
    patch_size: int
    image_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    embed_dim: Optional[int]
    eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], num_heads: Optional[int] = None) -> "CLIPVisionConfig":
        """Sizes from Wan ``visual.*``-layout shapes (prefix already stripped)."""
        dim, _, patch, _ = sd["patch_embedding.weight"].shape
        tokens = sd["pos_embedding"].shape[1]
        grid = round((tokens - 1) ** 0.5)
        if grid * grid != tokens - 1:
            raise ValueError(f"CLIP pos_embedding has {tokens} tokens; expected 1 + a square number of patches")
        layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"transformer\.(\d+)\.", k))})
        if num_heads is None:
            num_heads = dict(HEADS_BY_WIDTH).get(dim)
            if num_heads is None:
                raise ValueError(f"CLIP vision width {dim} is not a known open-clip ViT; pass num_heads explicitly")
        if dim % num_heads:
            raise ValueError(f"CLIP vision width {dim} is not divisible by num_heads={num_heads}")
        head = sd.get("head")
        return cls(dim=dim, patch_size=patch, image_size=grid * patch, num_layers=len(layers), num_heads=num_heads,
                   mlp_dim=sd["transformer.0.mlp.0.weight"].shape[0],
                   embed_dim=None if head is None else head.shape[1])


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, result cast back to the input dtype (Wan's clip.LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class CLIPSelfAttention(nn.Module):
    """x [B, S, dim] -> [B, S, dim]; ``to_qkv`` output viewed [B, S, 3, heads, head_dim], softmax(q kᵀ/√d) v."""

    def __init__(self, cfg: CLIPVisionConfig, linear: type, backend: AttentionBackend):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.backend = backend
        self.to_qkv = linear(cfg.dim, 3 * cfg.dim)
        self.proj = linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, c // self.num_heads).unbind(2)
        return self.proj(self.backend(q, k, v).reshape(b, s, c))


class CLIPAttentionBlock(nn.Module):
    """Pre-norm block: ``x += attn(norm1(x)); x += mlp(norm2(x))`` with an exact-erf GELU MLP."""

    def __init__(self, cfg: CLIPVisionConfig, linear: type, backend: AttentionBackend):
        super().__init__()
        self.norm1 = LayerNorm32(cfg.dim, eps=cfg.eps)
        self.attn = CLIPSelfAttention(cfg, linear, backend)
        self.norm2 = LayerNorm32(cfg.dim, eps=cfg.eps)
        self.mlp = nn.Sequential(linear(cfg.dim, cfg.mlp_dim), nn.GELU(), linear(cfg.mlp_dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionTower(nn.Module):
    """The ViT of Wan's CLIP. ``encode(image [B, 3, H, W] in [-1, 1]) -> [B, 1 + patches, dim]`` (penultimate)."""

    def __init__(self, cfg: CLIPVisionConfig, backend: AttentionBackend,
                 quantization: str | QuantMode = QuantMode.DISABLED):
        super().__init__()
        self.config = cfg
        linear = ops_for(quantization).Linear
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.pre_norm = LayerNorm32(cfg.dim, eps=cfg.eps)
        self.transformer = nn.ModuleList(CLIPAttentionBlock(cfg, linear, backend) for _ in range(cfg.num_layers))
        self.post_norm = LayerNorm32(cfg.dim, eps=cfg.eps)
        if cfg.embed_dim is not None:
            self.head = nn.Parameter(torch.zeros(cfg.dim, cfg.embed_dim))

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> pixels [B, 3, S, S]: bicubic resize (align_corners False, no antialias),
        to [0, 1], CLIP mean/std. Computed in float32."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"CLIP vision expects an image [B, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
        size = (self.config.image_size, self.config.image_size)
        x = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub(mean).div(std)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> tokens [B, 1 + patches, dim] after positions and ``pre_norm`` (model dtype)."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pre_norm(x + self.pos_embedding)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> output of block L-2 [B, 1 + patches, dim] (no post-norm, no head)."""
        x = self.embed(pixels)
        for block in self.transformer[:-1]:
            x = block(x)
        return x

    @torch.inference_mode()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> ``clip_fea`` [B, 1 + patches, dim] (model dtype)."""
        return self.forward(self.preprocess(image))


# --------------------------------------------------------------------------------------------- checkpoint loading

_HF_RENAMES = (
    (r"vision_model\.embeddings\.patch_embedding\.weight", "patch_embedding.weight"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"pre_norm.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"post_norm.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"transformer.\1.norm\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"transformer.\1.attn.proj.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.\1.mlp.0.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.\1.mlp.2.\2"),
)
_OPEN_CLIP_RENAMES = (
    (r"conv1\.weight", "patch_embedding.weight"),
    (r"ln_pre\.(weight|bias)", r"pre_norm.\1"),
    (r"ln_post\.(weight|bias)", r"post_norm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_([12])\.(weight|bias)", r"transformer.\1.norm\2.\3"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"transformer.\1.attn.to_qkv.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"transformer.\1.attn.proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"transformer.\1.mlp.0.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"transformer.\1.mlp.2.\2"),
)


def _rename(sd: dict[str, torch.Tensor], table: tuple, layout: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, target in table:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            raise ValueError(f"unexpected key {key!r} in a {layout} CLIP vision checkpoint")
    return out


def convert_hf_clip_vision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPVisionModel(WithProjection)`` keys -> Wan ``visual`` keys (q/k/v concatenated into to_qkv)."""
    sd = {k: v for k, v in sd.items() if not k.startswith(("text_model.", "text_projection", "logit_scale"))
          and not k.endswith("position_ids")}
    special = {"vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding.weight",
               "visual_projection.weight"}
    qkv = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
    out = _rename({k: v for k, v in sd.items() if k not in special and not qkv.fullmatch(k)}, _HF_RENAMES, "HF")
    for n in sorted({int(m.group(1)) for k in sd if (m := qkv.fullmatch(k))}):
        for kind in ("weight", "bias"):
            parts = [sd[f"vision_model.encoder.layers.{n}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.{n}.attn.to_qkv.{kind}"] = torch.cat(parts, dim=0)
    out["cls_embedding"] = sd["vision_model.embeddings.class_embedding"].reshape(1, 1, -1)
    out["pos_embedding"] = sd["vision_model.embeddings.position_embedding.weight"].unsqueeze(0)
    if "visual_projection.weight" in sd:
        out["head"] = sd["visual_projection.weight"].t()
    return out


def convert_open_clip_visual(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native open_clip ``visual.*`` keys (prefix stripped: conv1, class_embedding, positional_embedding, ln_pre,
    transformer.resblocks.N, ln_post, proj) -> Wan ``visual`` keys."""
    special = {"class_embedding", "positional_embedding", "proj"}
    out = _rename({k: v for k, v in sd.items() if k not in special}, _OPEN_CLIP_RENAMES, "open_clip")
    out["cls_embedding"] = sd["class_embedding"].reshape(1, 1, -1)
    out["pos_embedding"] = sd["positional_embedding"].unsqueeze(0)
    if "proj" in sd:
        out["head"] = sd["proj"]
    return out


def prepare_clip_state_dict(sd: dict[str, torch.Tensor], name: str = "state dict") -> dict[str, torch.Tensor]:
    """Any supported layout -> Wan ``visual`` keys without prefix; ``textual.*``/``log_scale`` dropped."""
    if any(k.startswith("vision_model.") for k in sd):
        return convert_hf_clip_vision(sd)
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if not visual and "patch_embedding.weight" in sd:
        visual = dict(sd)
    if "transformer.resblocks.0.attn.in_proj_weight" in visual:
        return convert_open_clip_visual(visual)
    if "patch_embedding.weight" not in visual or "transformer.0.attn.to_qkv.weight" not in visual:
        raise ValueError(f"{name} is not a CLIP vision checkpoint: expected 'visual.patch_embedding.weight' "
                         "(Wan / open-clip XLM-R ViT-H/14) or 'vision_model.*' keys (ComfyUI clip_vision_h); "
                         f"found e.g. {sorted(sd)[:5]}")
    return visual


@dataclass(frozen=True)
class CLIPLoadOptions:
    """precision fp32|fp16|bf16 (Wan runs fp16), attention mode (attention.py), device, optional head count."""

    precision: str = "fp16"
    attention_mode: str = "sdpa"
    device: str = "cpu"
    num_heads: Optional[int] = None


def build_clip_vision(sd: dict[str, torch.Tensor], options: Optional[CLIPLoadOptions] = None,
                      name: str = "state dict") -> CLIPVisionTower:
    """State dict (any supported layout) -> CLIPVisionTower in eval mode on the tensors' device."""
    options = options or CLIPLoadOptions()
    if options.precision not in PRECISIONS:
        raise ValueError(f"CLIP precision {options.precision!r} is not supported; choose one of {list(PRECISIONS)}")
    visual = prepare_clip_state_dict(sd, name)
    cfg = CLIPVisionConfig.from_state_dict(visual, options.num_heads)
    dtype = PRECISIONS[options.precision]
    device = visual["patch_embedding.weight"].device
    with torch.device("meta"):
        model = CLIPVisionTower(cfg, resolve(options.attention_mode, device, dtype))
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(visual)), sorted(set(visual) - expected)
    if missing or extra:
        raise ValueError(f"{name}: CLIP vision keys do not match (missing {missing[:5]}, unexpected {extra[:5]})")
    model.load_state_dict({k: v.to(dtype) for k, v in visual.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_clip_vision(path: str | Path, options: Optional[CLIPLoadOptions] = None) -> CLIPVisionTower:
    """Load a CLIP vision file (.safetensors, or the official .pth loaded weights-only)."""
    options = options or CLIPLoadOptions()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP vision file not found: {path}")
    if path.suffix in (".pth", ".pt", ".bin"):
        sd = torch.load(str(path), map_location=options.device, weights_only=True, mmap=True)
    else:
        from safetensors.torch import load_file

        sd = load_file(str(path), device=options.device)
    return build_clip_vision(sd, options, path.name)
