"""CLIP vision tower (Wan's XLM-R ViT-H/14 visual): parity with every ``ref_clip_*`` fixture and the key layouts."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitetalk.wanvideo.clip_vision import (CLIPLoadOptions, CLIPVisionConfig, build_clip_vision,
                                               load_clip_vision)
from parity import tensor_group


def _fixture_paths(fixtures_dir: Path) -> list[Path]:
    paths = sorted(fixtures_dir.glob("ref_clip_*.safetensors"))
    assert paths, f"no ref_clip_*.safetensors in {fixtures_dir}"
    return paths


def _load(path: Path) -> tuple[dict, dict]:
    meta = json.loads(safe_open(str(path), "pt").metadata()["harness"])["config"]
    return load_file(str(path)), meta


@pytest.fixture(scope="module")
def clip_fixture(fixtures_dir):
    return _load(_fixture_paths(fixtures_dir)[0])


def _state_dict(fx: dict) -> dict:
    return tensor_group(fx, "state_dict")


def _visual(fx: dict) -> dict:
    return {k[len("visual."):]: v for k, v in _state_dict(fx).items() if k.startswith("visual.")}


def _to_hf_layout(visual: dict) -> dict:
    """Wan ``visual`` keys -> Hugging Face CLIPVisionModelWithProjection keys (ComfyUI clip_vision_h layout)."""
    out = {"vision_model.embeddings.patch_embedding.weight": visual["patch_embedding.weight"],
           "vision_model.embeddings.class_embedding": visual["cls_embedding"].reshape(-1),
           "vision_model.embeddings.position_embedding.weight": visual["pos_embedding"][0],
           "vision_model.embeddings.position_ids": torch.arange(visual["pos_embedding"].shape[1])[None],
           "visual_projection.weight": visual["head"].t().contiguous()}
    for side, name in (("pre", "pre_layrnorm"), ("post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"vision_model.{name}.{kind}"] = visual[f"{side}_norm.{kind}"]
    layers = {int(k.split(".")[1]) for k in visual if k.startswith("transformer.")}
    for n in layers:
        src, dst = f"transformer.{n}.", f"vision_model.encoder.layers.{n}."
        for kind in ("weight", "bias"):
            q, k, v = visual[src + f"attn.to_qkv.{kind}"].chunk(3, dim=0)
            out.update({dst + f"self_attn.q_proj.{kind}": q.contiguous(), dst + f"self_attn.k_proj.{kind}": k.contiguous(),
                        dst + f"self_attn.v_proj.{kind}": v.contiguous(),
                        dst + f"self_attn.out_proj.{kind}": visual[src + f"attn.proj.{kind}"],
                        dst + f"layer_norm1.{kind}": visual[src + f"norm1.{kind}"],
                        dst + f"layer_norm2.{kind}": visual[src + f"norm2.{kind}"],
                        dst + f"mlp.fc1.{kind}": visual[src + f"mlp.0.{kind}"],
                        dst + f"mlp.fc2.{kind}": visual[src + f"mlp.2.{kind}"]})
    return out


def _to_open_clip_layout(visual: dict) -> dict:
    """Wan ``visual`` keys -> native open_clip ``visual.*`` keys."""
    out = {"visual.conv1.weight": visual["patch_embedding.weight"],
           "visual.class_embedding": visual["cls_embedding"].reshape(-1),
           "visual.positional_embedding": visual["pos_embedding"][0], "visual.proj": visual["head"]}
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.to_qkv": "attn.in_proj", "attn.proj": "attn.out_proj",
             "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}
    for key, value in visual.items():
        if key.startswith("transformer."):
            _, n, rest = key.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            joiner = "_" if module == "attn.to_qkv" else "."
            out[f"visual.transformer.resblocks.{n}.{names[module]}{joiner}{kind}"] = value
        elif key.startswith(("pre_norm", "post_norm")):
            side, kind = key.split(".")
            out[f"visual.ln_{side[:-5]}.{kind}"] = value
    return out


def test_parity_with_fixtures(fixtures_dir):
    for path in _fixture_paths(fixtures_dir):
        fx, meta = _load(path)
        model = build_clip_vision(_state_dict(fx), CLIPLoadOptions(precision="fp32", num_heads=meta["vision_heads"]))
        assert model.config.num_layers == meta["vision_layers"] and model.config.image_size == meta["image_size"]
        image = fx["inputs.video"][:, :, 0]
        pixels = model.preprocess(image)
        assert (pixels - fx["inputs.pixels"]).abs().max() <= 1e-6
        with torch.inference_mode():
            x = model.embed(fx["inputs.pixels"])
            assert (x - fx["intermediates.pre_norm"]).abs().max() <= 1e-5
            for n, block in enumerate(model.transformer[:-1]):
                x = block(x)
                assert (x - fx[f"intermediates.blocks.{n}"]).abs().max() <= 1e-5, f"block {n}"
        tokens = model.encode(image)
        assert tokens.shape == fx["outputs.tokens"].shape
        assert (tokens - fx["outputs.tokens"]).abs().max() <= 1e-5


@pytest.mark.parametrize("layout", ["wan", "huggingface", "open_clip"])
def test_file_layouts_give_same_tokens(clip_fixture, tmp_path, layout):
    fx, meta = clip_fixture
    visual = _visual(fx)
    sd = {"wan": _state_dict(fx), "huggingface": _to_hf_layout(visual), "open_clip": _to_open_clip_layout(visual)}[layout]
    path = tmp_path / f"clip_{layout}.safetensors"
    save_file(sd, str(path))
    model = load_clip_vision(path, CLIPLoadOptions(precision="fp32", num_heads=meta["vision_heads"]))
    tokens = model.encode(fx["inputs.video"][:, :, 0])
    assert (tokens - fx["outputs.tokens"]).abs().max() <= 1e-5


def test_batch_and_bf16(clip_fixture):
    fx, meta = clip_fixture
    image = fx["inputs.video"][:, :, 0]
    other = image.flip(-1)
    fp32 = build_clip_vision(_state_dict(fx), CLIPLoadOptions(precision="fp32", num_heads=meta["vision_heads"]))
    batch = fp32.encode(torch.cat([image, other]))
    assert torch.allclose(batch[0:1], fx["outputs.tokens"], atol=1e-5)
    assert torch.allclose(batch[1:2], fp32.encode(other), atol=1e-5)
    bf16 = build_clip_vision(_state_dict(fx), CLIPLoadOptions(precision="bf16", num_heads=meta["vision_heads"]))
    assert bf16.transformer[0].attn.to_qkv.weight.dtype == torch.bfloat16
    low = bf16.encode(image)
    assert low.dtype == torch.bfloat16
    ref = fx["outputs.tokens"]
    assert (low.float() - ref).norm() / ref.norm() < 0.05


def test_head_count_rule_and_errors(clip_fixture):
    fx, _ = clip_fixture
    visual = _visual(fx)
    with pytest.raises(ValueError, match="num_heads"):
        CLIPVisionConfig.from_state_dict(visual)
    with pytest.raises(ValueError, match="divisible"):
        CLIPVisionConfig.from_state_dict(visual, num_heads=5)
    meta_sd = {"patch_embedding.weight": torch.empty(1280, 3, 14, 14, device="meta"),
               "pos_embedding": torch.empty(1, 257, 1280, device="meta"),
               "transformer.0.mlp.0.weight": torch.empty(5120, 1280, device="meta"),
               "transformer.31.mlp.0.weight": torch.empty(5120, 1280, device="meta")}
    for n in range(32):
        meta_sd[f"transformer.{n}.norm1.weight"] = torch.empty(1280, device="meta")
    cfg = CLIPVisionConfig.from_state_dict(meta_sd)
    assert (cfg.num_heads, cfg.image_size, cfg.patch_size, cfg.num_layers, cfg.embed_dim) == (16, 224, 14, 32, None)


def test_rejects_non_clip_and_missing_keys(clip_fixture, fixtures_dir):
    fx, meta = clip_fixture
    t5 = load_file(str(fixtures_dir / "ref_t5_a.safetensors"))
    with pytest.raises(ValueError, match="not a CLIP vision checkpoint"):
        build_clip_vision({k: v for k, v in t5.items() if k.startswith("state_dict.")}, name="umt5.safetensors")
    broken = {k: v for k, v in _state_dict(fx).items() if k != "visual.transformer.1.norm2.bias"}
    with pytest.raises(ValueError, match="missing"):
        build_clip_vision(broken, CLIPLoadOptions(precision="fp32", num_heads=meta["vision_heads"]))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        build_clip_vision(_state_dict(fx), CLIPLoadOptions(precision="fp32", num_heads=meta["vision_heads"])) \
            .encode(fx["inputs.video"])
