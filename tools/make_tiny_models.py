"""Write tiny random-weight models, in the real file formats the pack's loaders read, into a ComfyUI models folder.

The bundled tiny workflow runs end to end on a CPU with these files. Every file is a safetensors file keyed exactly
like the released checkpoint it stands in for:

* ``diffusion_models/infinitetalk_tiny/wan2.1_i2v_tiny.safetensors``: Wan2.1 I2V DiT, ``model.diffusion_model.``
  prefix (ComfyUI style), bf16;
* ``diffusion_models/infinitetalk_tiny/infinitetalk_single_tiny.safetensors``: the InfiniteTalk adapter only
  (``audio_proj.*``, ``blocks.N.norm_x.*``, ``blocks.N.audio_cross_attn.*``), unprefixed, bf16;
* ``vae/wan2.1_vae_tiny.safetensors``: Wan2.1 causal VAE (base width 8, real z_dim 16 structure), float32;
* ``text_encoders/umt5_tiny.safetensors``: umT5 encoder in the Wan layout plus a ``spiece_model`` uint8 tensor (a
  sentencepiece model trained here; pad 0, eos 1, unk 2, byte fallback), bf16;
* ``clip_vision/clip_vision_tiny.safetensors``: open-clip ViT ``visual.*`` keys plus ``log_scale``, 224 px, patch 14,
  width = the smallest open-clip width whose head count the loader knows, fp16;
* ``wav2vec2/wav2vec2_tiny.safetensors``: wav2vec2 (``wav2vec2.`` prefix, positional conv as ``weight_g`` /
  ``weight_v``) with the 12 layers x 768 the InfiniteTalk adapter needs, everything else tiny, fp16.

:func:`make_comfy_layout_models` writes the same text-encoder and CLIP weights (same seeds, same values) in the key
layouts ComfyUI's own loaders read, each with its Hugging Face style architecture config as JSON in the
``comfy_config`` metadata entry (ComfyUI's CLIPLoader / CLIPVisionLoader recognise only the full-size umT5-XXL and
ViT-L/H/G by their layer counts and widths, so a loader for tiny files must be told the sizes):

* ``text_encoders/umt5_tiny_comfy.safetensors``: Hugging Face UMT5 encoder keys (``shared.weight``,
  ``encoder.block.N.layer.…``, ``encoder.final_layer_norm.weight``) plus ``spiece_model``, bf16;
* ``clip_vision/clip_vision_tiny_comfy.safetensors``: Hugging Face CLIP vision keys (``vision_model.…``, q/k/v
  split, ``visual_projection.weight``), fp16.

Deterministic (one seeded generator per file, parameters in sorted-name order), idempotent (a file whose metadata
marker equals the one this version would write is skipped) and written atomically (temporary file, then rename).
Random init: norm scales 1 + 0.1·N(0,1), other 1-D tensors 0.1·N(0,1), matrices N(0,1)/sqrt(fan_in).

Usage: ``python tools/make_tiny_models.py --models-dir ComfyUI/models`` or ``make_tiny_models(Path(...))``.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import packimport
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

packimport.register()

from infinitetalk.attention import AttentionMode, resolve  # noqa: E402
from infinitetalk.fp8_optimization import QuantMode, ops_for  # noqa: E402
from infinitetalk.multitalk import wav2vec  # noqa: E402
from infinitetalk.multitalk.model import InfiniteTalkModel  # noqa: E402
from infinitetalk.wanvideo.clip_vision import HEADS_BY_WIDTH, CLIPVisionConfig, CLIPVisionTower  # noqa: E402
from infinitetalk.wanvideo.config import AUDIO_BLOCKS, AUDIO_CHANNELS, HEAD_DIM, AudioConfig, WanConfig  # noqa: E402
from infinitetalk.wanvideo.text_encoder import SPIECE_KEY, UMT5Config, UMT5Encoder  # noqa: E402
from infinitetalk.wanvideo.tokenizer import EOS_PIECE, PAD_PIECE  # noqa: E402
from infinitetalk.wanvideo.vae import WAN21_Z_DIM, VAEConfig, WanVAE  # noqa: E402

VERSION = 1
MARKER_KEY = "infinitetalk_tiny_model"
COMFY_PREFIX = "model.diffusion_model."
WAV2VEC_PREFIX = "wav2vec2."
ADAPTER_PARTS = ("audio_proj.", ".norm_x.", ".audio_cross_attn.")
POS_CONV = "encoder.pos_conv_embed.conv."
WEIGHT_NORM_RENAMES = (("parametrizations.weight.original0", "weight_g"),
                       ("parametrizations.weight.original1", "weight_v"))
TRANSFORMER = "diffusion_models/infinitetalk_tiny/wan2.1_i2v_tiny.safetensors"
ADAPTER = "diffusion_models/infinitetalk_tiny/infinitetalk_single_tiny.safetensors"
VAE = "vae/wan2.1_vae_tiny.safetensors"
TEXT_ENCODER = "text_encoders/umt5_tiny.safetensors"
CLIP_VISION = "clip_vision/clip_vision_tiny.safetensors"
WAV2VEC2 = "wav2vec2/wav2vec2_tiny.safetensors"
COMFY_TEXT_ENCODER = "text_encoders/umt5_tiny_comfy.safetensors"
COMFY_CLIP_VISION = "clip_vision/clip_vision_tiny_comfy.safetensors"
COMFY_CONFIG_KEY = "comfy_config"

# Tokenizer training text: the bundled workflow's prompts, Wan's default negative prompt and a small grammar of
# talking-head descriptions (so the unigram model learns whole English words).
PROMPTS = ("a person is talking", "a woman is talking to the camera", "a man is speaking",
           "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, still, "
           "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
           "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
           "picture, messy background, three legs, many people in the background, walking backwards")
SUBJECTS = ("a person", "a man", "a woman", "an old man", "a young woman", "two people", "the singer", "a child")
ACTIONS = ("is talking", "is speaking to the camera", "talks and smiles", "is singing a song", "is laughing",
           "explains something", "reads the news", "answers a question")
PLACES = ("in a quiet room", "outdoors in the sun", "in front of a bookshelf", "on a stage", "at a desk",
          "in a busy street", "near a window", "in a studio")


@dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny models. Audio frames stay AUDIO_BLOCKS x AUDIO_CHANNELS (12 x 768): the adapter's
    ``audio_proj`` input is fixed to wav2vec2-base frames. The CLIP width is the smallest the CLIP loader knows the
    head count of, so no ``num_heads`` override is needed."""

    dim: int = 256
    ffn_dim: int = 512
    num_layers: int = 2
    in_dim: int = 36
    audio_intermediate_dim: int = 16
    audio_output_dim: int = 64
    audio_context_tokens: int = 32
    vae_dim: int = 8
    t5_dim: int = 64
    t5_heads: int = 4
    t5_ffn_dim: int = 128
    t5_layers: int = 2
    t5_buckets: int = 32
    t5_vocab_target: int = 384
    clip_width: int = min(width for width, _ in HEADS_BY_WIDTH)
    clip_image_size: int = 224
    clip_patch_size: int = 14
    clip_layers: int = 2
    clip_mlp_dim: int = 64
    clip_embed_dim: int = 32
    w2v_intermediate_size: int = 64
    w2v_conv_dim: int = 32
    w2v_pos_kernel: int = 16
    w2v_pos_groups: int = 16


@dataclass(frozen=True)
class TinyFile:
    """One file to write: path relative to the models folder, seed, storage dtype, tensor builder."""

    role: str
    relpath: str
    seed: int
    dtype: torch.dtype
    build: Callable[["TinyFile", TinySizes], dict[str, torch.Tensor]] = field(compare=False)
    config: Optional[Callable[[dict[str, torch.Tensor]], dict]] = field(default=None, compare=False)

    def marker(self, sizes: TinySizes) -> str:
        """The metadata value identifying this file's recipe (one key, sorted JSON: byte-stable files)."""
        recipe = {"version": VERSION, "role": self.role, "seed": self.seed, "dtype": str(self.dtype),
                  "sizes": asdict(sizes)}
        return json.dumps(recipe, sort_keys=True)


@dataclass(frozen=True)
class TinyResult:
    """What :func:`make_tiny_models` did for one file: its path, whether it was (re)written, its size in bytes."""

    path: Path
    written: bool
    bytes: int


# ------------------------------------------------------------------------------------------------ random weights


def _is_norm_scale(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith("gamma") or (name.endswith("weight") and len(shape) == 1)


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """float32 tensor: norm scale 1 + 0.1·N, other <= 1-D 0.1·N, else N/sqrt(fan_in) (fan_in = numel of one row,
    or the last dim when the first dim is 1)."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if _is_norm_scale(name, shape):
        return 1.0 + 0.1 * noise
    if len(shape) <= 1:
        return 0.1 * noise
    fan_in = shape[-1] if shape[0] == 1 else math.prod(shape[1:])
    return noise / math.sqrt(fan_in)


def random_state(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded random tensors for ``shapes`` (key -> shape), drawn in sorted-key order, stored as ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return {name: _random_tensor(name, shapes[name], gen).to(dtype) for name in sorted(shapes)}


def _meta_shapes(module_factory: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a module's state dict, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        module = module_factory()
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ components


def transformer_config(sizes: TinySizes) -> WanConfig:
    """The tiny InfiniteTalk transformer: text_dim = the tiny umT5 width, clip_dim = the tiny CLIP width."""
    audio = AudioConfig(intermediate_dim=sizes.audio_intermediate_dim, output_dim=sizes.audio_output_dim,
                        context_tokens=sizes.audio_context_tokens)
    return WanConfig(dim=sizes.dim, ffn_dim=sizes.ffn_dim, num_heads=max(1, sizes.dim // HEAD_DIM),
                     num_layers=sizes.num_layers, in_dim=sizes.in_dim, out_dim=WAN21_Z_DIM, text_dim=sizes.t5_dim,
                     clip_dim=sizes.clip_width, audio=audio)


def _transformer_shapes(sizes: TinySizes, adapter: bool) -> dict[str, tuple[int, ...]]:
    cfg = transformer_config(sizes)
    ops = ops_for(QuantMode.DISABLED)
    backend = resolve(AttentionMode.SDPA, "cpu", torch.float32)
    shapes = _meta_shapes(lambda: InfiniteTalkModel(cfg, ops, backend))
    is_adapter = {k: k.startswith(ADAPTER_PARTS[0]) or any(p in k for p in ADAPTER_PARTS[1:]) for k in shapes}
    return {k: s for k, s in shapes.items() if is_adapter[k] == adapter}


def build_transformer(spec: TinyFile, sizes: TinySizes) -> dict[str, torch.Tensor]:
    """Wan2.1 I2V base keys (model-spec §2.1) with the ComfyUI ``model.diffusion_model.`` prefix."""
    state = random_state(_transformer_shapes(sizes, adapter=False), spec.seed, spec.dtype)
    return {COMFY_PREFIX + k: v for k, v in state.items()}


def build_adapter(spec: TinyFile, sizes: TinySizes) -> dict[str, torch.Tensor]:
    """InfiniteTalk adapter keys (model-spec §3.4), unprefixed like the official adapter file."""
    return random_state(_transformer_shapes(sizes, adapter=True), spec.seed, spec.dtype)


def build_vae(spec: TinyFile, sizes: TinySizes) -> dict[str, torch.Tensor]:
    """Wan2.1 VAE keys (encoder.*, decoder.*, conv1, conv2) at base width ``vae_dim``, real structure otherwise."""
    backend = resolve(AttentionMode.SDPA, "cpu", torch.float32)
    return random_state(_meta_shapes(lambda: WanVAE(VAEConfig(dim=sizes.vae_dim), backend)), spec.seed, spec.dtype)


def tokenizer_corpus() -> list[str]:
    """Sentences the tiny sentencepiece model is trained on (the bundled prompts first)."""
    return list(PROMPTS) + [" ".join(p) for p in itertools.product(SUBJECTS, ACTIONS, PLACES)]


def train_spiece(vocab_target: int) -> bytes:
    """Train a unigram sentencepiece model (umT5 ids: pad 0, eos 1, unk 2, no bos; byte fallback so any text
    tokenizes) and return its serialized proto. Single-threaded: the same bytes on every run."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_writer=out, vocab_size=vocab_target, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece=PAD_PIECE, eos_piece=EOS_PIECE, unk_piece="<unk>",
        character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return out.getvalue()


def build_text_encoder(spec: TinyFile, sizes: TinySizes) -> dict[str, torch.Tensor]:
    """umT5 encoder in the Wan layout (vocab = the trained tokenizer's size) plus ``spiece_model`` (uint8)."""
    import sentencepiece

    proto = train_spiece(sizes.t5_vocab_target)
    vocab = sentencepiece.SentencePieceProcessor(model_proto=proto).get_piece_size()
    cfg = UMT5Config(vocab_size=vocab, dim=sizes.t5_dim, dim_attn=sizes.t5_dim, dim_ffn=sizes.t5_ffn_dim,
                     num_heads=sizes.t5_heads, num_layers=sizes.t5_layers, num_buckets=sizes.t5_buckets)
    state = random_state(_meta_shapes(lambda: UMT5Encoder(cfg)), spec.seed, spec.dtype)
    state[SPIECE_KEY] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    return state


def build_clip_vision(spec: TinyFile, sizes: TinySizes) -> dict[str, torch.Tensor]:
    """open-clip ViT ``visual.*`` keys (Wan layout, with ``head``) plus the CLIP model's scalar ``log_scale``."""
    heads = dict(HEADS_BY_WIDTH)[sizes.clip_width]
    cfg = CLIPVisionConfig(dim=sizes.clip_width, patch_size=sizes.clip_patch_size, image_size=sizes.clip_image_size,
                           num_layers=sizes.clip_layers, num_heads=heads, mlp_dim=sizes.clip_mlp_dim,
                           embed_dim=sizes.clip_embed_dim)
    backend = resolve(AttentionMode.SDPA, "cpu", torch.float32)
    shapes = {"visual." + k: s for k, s in _meta_shapes(lambda: CLIPVisionTower(cfg, backend)).items()}
    shapes["log_scale"] = ()
    return random_state(shapes, spec.seed, spec.dtype)


def wav2vec_config(sizes: TinySizes):
    """transformers ``Wav2Vec2Config``: the bundled wav2vec2-base config with 12 x 768 layers and tiny convs/FFN."""
    from transformers import Wav2Vec2Config

    cfg = wav2vec.bundled_config()
    n_conv = len(cfg["conv_dim"])
    cfg.update(hidden_size=AUDIO_CHANNELS, num_hidden_layers=AUDIO_BLOCKS, conv_dim=[sizes.w2v_conv_dim] * n_conv,
               intermediate_size=sizes.w2v_intermediate_size, num_conv_pos_embeddings=sizes.w2v_pos_kernel,
               num_conv_pos_embedding_groups=sizes.w2v_pos_groups)
    return Wav2Vec2Config(**cfg)


def build_wav2vec2(spec: TinyFile, sizes: TinySizes) -> dict[str, torch.Tensor]:
    """``wav2vec2.``-prefixed Wav2Vec2Model keys; the positional conv's weight norm stored as weight_g / weight_v
    (g = per-tap norm of v, so the effective conv weight is v itself, N/sqrt(fan_in))."""
    from transformers import Wav2Vec2Model

    config = wav2vec_config(sizes)
    state = random_state(_meta_shapes(lambda: Wav2Vec2Model(config)), spec.seed, torch.float32)
    g_key, v_key = (POS_CONV + old for old, _ in WEIGHT_NORM_RENAMES)
    state[g_key] = state[v_key].norm(dim=(0, 1), keepdim=True)
    out = {}
    for key, value in state.items():
        for old, new in WEIGHT_NORM_RENAMES:
            key = key.replace(old, new)
        out[WAV2VEC_PREFIX + key] = value.to(spec.dtype)
    return out


def tiny_files() -> tuple[TinyFile, ...]:
    """Every file :func:`make_tiny_models` writes, in writing order."""
    return (
        TinyFile("transformer", TRANSFORMER, 1001, torch.bfloat16, build_transformer),
        TinyFile("adapter", ADAPTER, 1002, torch.bfloat16, build_adapter),
        TinyFile("vae", VAE, 1003, torch.float32, build_vae),
        TinyFile("text_encoder", TEXT_ENCODER, 1004, torch.bfloat16, build_text_encoder),
        TinyFile("clip_vision", CLIP_VISION, 1005, torch.float16, build_clip_vision),
        TinyFile("wav2vec2", WAV2VEC2, 1006, torch.float16, build_wav2vec2),
    )


# ------------------------------------------------------------------------------------------------ ComfyUI layouts

# Wan umT5 block key -> Hugging Face UMT5 encoder block key (the names ComfyUI's comfy/text_encoders/t5.py uses).
HF_T5_BLOCK_KEYS = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)
# Wan CLIP ``visual`` key pattern -> Hugging Face CLIP vision key (ComfyUI's comfy/clip_model.py names).
HF_CLIP_KEYS = (
    (r"patch_embedding\.weight", "vision_model.embeddings.patch_embedding.weight"),
    (r"pre_norm\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
    (r"post_norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"transformer\.(\d+)\.norm([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"transformer\.(\d+)\.attn\.proj\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.out_proj.\2"),
    (r"transformer\.(\d+)\.mlp\.0\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.fc1.\2"),
    (r"transformer\.(\d+)\.mlp\.2\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.fc2.\2"),
)
QKV_KEY = re.compile(r"transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)")


def umt5_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan-layout umT5 encoder keys -> Hugging Face UMT5 encoder keys (``spiece_model`` kept as is)."""
    block_keys = dict(HF_T5_BLOCK_KEYS)
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if block:
            out[f"encoder.block.{block.group(1)}.{block_keys[block.group(2)]}"] = value
        else:
            out[{"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight",
                 SPIECE_KEY: SPIECE_KEY}[key]] = value
    return out


def umt5_hf_config(state: dict[str, torch.Tensor]) -> dict:
    """Hugging Face UMT5 config of an HF-layout encoder state dict (every size read from the shapes)."""
    vocab, dim = state["shared.weight"].shape
    buckets, heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.block.")})
    return {"model_type": "umt5", "vocab_size": vocab, "d_model": dim, "num_heads": heads, "num_layers": layers,
            "d_kv": state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
            "d_ff": state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
            "relative_attention_num_buckets": buckets, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
            "layer_norm_epsilon": 1e-6, "pad_token_id": 0, "eos_token_id": 1}


def build_text_encoder_comfy(spec: TinyFile, sizes: TinySizes) -> dict[str, torch.Tensor]:
    """The tiny umT5 (same seed, same values as ``build_text_encoder``) in the Hugging Face UMT5 layout."""
    return umt5_to_hf(build_text_encoder(spec, sizes))


def clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan ``visual.*`` CLIP keys (+ ``log_scale``, dropped) -> Hugging Face CLIP vision keys: to_qkv split into
    q/k/v_proj, ``cls_embedding`` [1, 1, D] -> [D], ``pos_embedding`` [1, N, D] -> [N, D], ``head`` transposed."""
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    out = {"vision_model.embeddings.class_embedding": visual.pop("cls_embedding").reshape(-1),
           "vision_model.embeddings.position_embedding.weight": visual.pop("pos_embedding")[0],
           "visual_projection.weight": visual.pop("head").t().contiguous()}
    for key, value in visual.items():
        qkv = QKV_KEY.fullmatch(key)
        if qkv:
            prefix = f"vision_model.encoder.layers.{qkv.group(1)}.self_attn"
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.{name}_proj.{qkv.group(2)}"] = part.clone()
            continue
        pattern, target = next((p, t) for p, t in HF_CLIP_KEYS if re.fullmatch(p, key))
        out[re.sub(pattern, target, key)] = value
    return out


def clip_hf_config(state: dict[str, torch.Tensor]) -> dict:
    """Hugging Face CLIP vision config (exact-erf GELU as open-clip XLM-R ViT-H; heads from HEADS_BY_WIDTH)."""
    dim, _, patch, _ = state["vision_model.embeddings.patch_embedding.weight"].shape
    tokens = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = len({k.split(".")[3] for k in state if k.startswith("vision_model.encoder.layers.")})
    return {"model_type": "clip_vision_model", "hidden_size": dim, "num_attention_heads": dict(HEADS_BY_WIDTH)[dim],
            "num_hidden_layers": layers, "patch_size": patch, "image_size": round((tokens - 1) ** 0.5) * patch,
            "intermediate_size": state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "projection_dim": state["visual_projection.weight"].shape[0], "hidden_act": "gelu",
            "layer_norm_eps": 1e-5, "num_channels": 3}


def build_clip_vision_comfy(spec: TinyFile, sizes: TinySizes) -> dict[str, torch.Tensor]:
    """The tiny CLIP vision tower (same seed, same values as ``build_clip_vision``) in the Hugging Face layout."""
    return clip_to_hf(build_clip_vision(spec, sizes))


def comfy_layout_files() -> tuple[TinyFile, ...]:
    """Every file :func:`make_comfy_layout_models` writes: seeds and dtypes equal their Wan-layout twins'."""
    return (
        TinyFile("text_encoder_comfy", COMFY_TEXT_ENCODER, 1004, torch.bfloat16, build_text_encoder_comfy,
                 umt5_hf_config),
        TinyFile("clip_vision_comfy", COMFY_CLIP_VISION, 1005, torch.float16, build_clip_vision_comfy,
                 clip_hf_config),
    )


# ------------------------------------------------------------------------------------------------ writing


def is_current(path: Path, marker: str) -> bool:
    """True when ``path`` is a readable safetensors file carrying exactly ``marker``."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return False
    return metadata.get(MARKER_KEY) == marker


def write_file(spec: TinyFile, sizes: TinySizes, path: Path) -> None:
    """Build the tensors and write them atomically (``<name>.partial`` then rename) with the recipe marker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    state = spec.build(spec, sizes)
    metadata = {MARKER_KEY: spec.marker(sizes)}
    if spec.config is not None:
        metadata[COMFY_CONFIG_KEY] = json.dumps(spec.config(state), sort_keys=True)
    save_file(state, str(partial), metadata=metadata)
    os.replace(partial, path)


def _make(specs: Sequence[TinyFile], models_dir: Path, roles: Optional[Sequence[str]],
          sizes: Optional[TinySizes]) -> dict[str, TinyResult]:
    sizes = sizes or TinySizes()
    known = [s.role for s in specs]
    unknown = sorted(set(roles or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown tiny model role(s) {unknown}; choose from {known}")
    results = {}
    for spec in specs:
        if roles is not None and spec.role not in roles:
            continue
        path = Path(models_dir) / spec.relpath
        stale = not is_current(path, spec.marker(sizes))
        if stale:
            write_file(spec, sizes, path)
        results[spec.role] = TinyResult(path=path, written=stale, bytes=path.stat().st_size)
    return results


def make_tiny_models(models_dir: Path, roles: Optional[Sequence[str]] = None,
                     sizes: Optional[TinySizes] = None) -> dict[str, TinyResult]:
    """Write the tiny models under ``models_dir`` (a ComfyUI ``models`` folder); files already carrying this
    version's marker are left alone. ``roles``: a subset of transformer, adapter, vae, text_encoder, clip_vision,
    wav2vec2 (default all). Returns role -> :class:`TinyResult`."""
    return _make(tiny_files(), models_dir, roles, sizes)


def make_comfy_layout_models(models_dir: Path, roles: Optional[Sequence[str]] = None,
                             sizes: Optional[TinySizes] = None) -> dict[str, TinyResult]:
    """Write the ComfyUI-layout twins of the tiny text encoder and CLIP vision model (``text_encoder_comfy``,
    ``clip_vision_comfy``; same weights) with their architecture config in the ``comfy_config`` metadata entry."""
    return _make(comfy_layout_files(), models_dir, roles, sizes)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write tiny random-weight InfiniteTalk models (CPU demo/tests).")
    parser.add_argument("--models-dir", type=Path, required=True, help="ComfyUI models folder to write into")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = make_tiny_models(args.models_dir)
    for role, result in results.items():
        state = "written" if result.written else "up to date"
        print(f"{role:13s} {result.bytes / 2**20:8.2f} MiB  {state:10s}  {result.path}")
    total = sum(r.bytes for r in results.values())
    print(f"total {total / 2**20:.2f} MiB in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
