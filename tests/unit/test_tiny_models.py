"""tools/make_tiny_models.py: the tiny random-weight models load through the pack's real loaders and run the whole
InfiniteTalk forward on a CPU; their keys equal the official layouts (the parity fixtures); writing is
deterministic and idempotent."""
from __future__ import annotations

import hashlib
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import make_tiny_models as tiny
import pytest
import torch
from safetensors import safe_open

from infinitetalk.multitalk import wav2vec as W
from infinitetalk.multitalk.model import load_infinitetalk
from infinitetalk.multitalk.windows import audio_windows
from infinitetalk.wanvideo.checkpoint import LoadOptions
from infinitetalk.wanvideo.clip_vision import CLIPLoadOptions, load_clip_vision
from infinitetalk.wanvideo.text_encoder import T5LoadOptions, load_text_encoder
from infinitetalk.wanvideo.vae import load_vae

ROLES = ("transformer", "adapter", "vae", "text_encoder", "clip_vision", "wav2vec2")
EXPECTED_PATHS = {
    "transformer": "diffusion_models/infinitetalk_tiny/wan2.1_i2v_tiny.safetensors",
    "adapter": "diffusion_models/infinitetalk_tiny/infinitetalk_single_tiny.safetensors",
    "vae": "vae/wan2.1_vae_tiny.safetensors",
    "text_encoder": "text_encoders/umt5_tiny.safetensors",
    "clip_vision": "clip_vision/clip_vision_tiny.safetensors",
    "wav2vec2": "wav2vec2/wav2vec2_tiny.safetensors",
}
MAX_TOTAL_BYTES = 150 * 2**20
LAYER_INDEX = re.compile(r"\b(blocks|layers|transformer)\.\d+\.")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    models_dir = tmp_path_factory.mktemp("models")
    start = time.perf_counter()
    results = tiny.make_tiny_models(models_dir)
    return models_dir, results, time.perf_counter() - start


def keys_of(path: Path) -> dict[str, str]:
    """Key -> safetensors dtype name (F32, BF16, F16, U8) of a file."""
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_slice(k).get_dtype() for k in handle.keys()}


def fixture_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return {k[len("state_dict."):] for k in handle.keys() if k.startswith("state_dict.")}


def layerless(keys) -> set[str]:
    """Key names with block / layer indices replaced by N (the fixtures have other layer counts)."""
    return {LAYER_INDEX.sub(r"\1.N.", k) for k in keys}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_writes_every_file_under_the_workflow_names(made):
    models_dir, results, seconds = made
    assert tuple(results) == ROLES
    for role, result in results.items():
        assert result.written and result.path == models_dir / EXPECTED_PATHS[role]
        assert result.bytes == result.path.stat().st_size > 0
    total = sum(r.bytes for r in results.values())
    assert total < MAX_TOTAL_BYTES, f"tiny models take {total / 2**20:.1f} MiB"
    assert seconds < 30, f"writing the tiny models took {seconds:.1f} s"


def test_keys_equal_the_official_layouts(made, fixtures_dir):
    _, results, _ = made
    base = keys_of(results["transformer"].path)
    adapter = keys_of(results["adapter"].path)
    assert all(k.startswith("model.diffusion_model.") for k in base)
    assert all(k.startswith("audio_proj.") or ".norm_x." in k or ".audio_cross_attn." in k for k in adapter)
    merged = {k[len("model.diffusion_model."):] for k in base} | set(adapter)
    assert merged == fixture_keys(fixtures_dir / "ref_tiny_1p.safetensors")
    assert set(keys_of(results["vae"].path)) == fixture_keys(fixtures_dir / "ref_vae_a.safetensors")
    t5 = keys_of(results["text_encoder"].path)
    assert t5.pop("spiece_model") == "U8" and set(t5.values()) == {"BF16"}
    assert layerless(t5) == layerless(fixture_keys(fixtures_dir / "ref_t5_a.safetensors"))
    official_clip = {k for k in fixture_keys(fixtures_dir / "ref_clip_a.safetensors") if not k.startswith("textual.")}
    assert layerless(keys_of(results["clip_vision"].path)) == layerless(official_clip)
    w2v = keys_of(results["wav2vec2"].path)
    assert all(k.startswith("wav2vec2.") for k in w2v) and set(w2v.values()) == {"F16"}
    canonical = {k[len("wav2vec2."):].replace("weight_g", "parametrizations.weight.original0")
                 .replace("weight_v", "parametrizations.weight.original1") for k in w2v}
    assert layerless(canonical) == layerless(fixture_keys(fixtures_dir / "ref_wav2vec_a.safetensors"))


def test_second_call_is_a_no_op_and_damaged_files_are_rewritten(made):
    models_dir, results, _ = made
    before = {role: (r.path.stat().st_mtime_ns, digest(r.path)) for role, r in results.items()}
    again = tiny.make_tiny_models(models_dir)
    assert not any(r.written for r in again.values())
    assert {role: (r.path.stat().st_mtime_ns, digest(r.path)) for role, r in again.items()} == before
    vae = results["vae"].path
    vae.write_bytes(vae.read_bytes()[:1000])
    repaired = tiny.make_tiny_models(models_dir, roles=["vae", "text_encoder"])
    assert repaired["vae"].written and not repaired["text_encoder"].written
    assert digest(vae) == before["vae"][1], "a rewritten file must be byte-identical (fixed seeds)"
    with pytest.raises(ValueError, match="unknown tiny model role"):
        tiny.make_tiny_models(models_dir, roles=["unet"])


def test_cli_reports_up_to_date_files(made):
    models_dir, _, _ = made
    script = Path(tiny.__file__)
    run = subprocess.run([sys.executable, str(script), "--models-dir", str(models_dir)], capture_output=True,
                         text=True, timeout=120, check=True)
    lines = run.stdout.strip().splitlines()
    assert len(lines) == len(ROLES) + 1 and all("up to date" in line for line in lines[:-1])
    assert lines[-1].startswith("total ")


def sine_wave(seconds: float) -> torch.Tensor:
    t = torch.arange(int(seconds * W.SAMPLE_RATE), dtype=torch.float32) / W.SAMPLE_RATE
    gen = torch.Generator().manual_seed(7)
    return 0.3 * torch.sin(2 * math.pi * 220.0 * t) + 0.05 * torch.randn(t.shape, generator=gen)


def encode_inputs(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Text, CLIP, audio and image-latent inputs of the transformer, each from its tiny model's real loader."""
    text_encoder = load_text_encoder(paths["text_encoder"], T5LoadOptions(precision="fp32"))
    assert "spiece_model" in text_encoder.tokenizer.source
    ids, mask = text_encoder.tokenizer(["a person is talking"])
    assert (ids[0, : int(mask.sum())] != 2).all(), "the bundled prompt must tokenize without <unk>"
    context = text_encoder(["a person is talking"])[0]
    clip = load_clip_vision(paths["clip_vision"], CLIPLoadOptions(precision="fp32"))
    clip_fea = clip.encode(torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    encoder = W.load_wav2vec(paths["wav2vec2"], "fp32")
    features = W.wav2vec_features(encoder, sine_wave(1.0), 25.0)
    vae = load_vae(paths["vae"], torch.float32)
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return {"context": context, "clip_fea": clip_fea, "features": features, "latent": vae.encode(video), "vae": vae}


def test_real_loaders_and_one_transformer_forward(made):
    paths = {role: r.path for role, r in made[1].items()}
    inputs = encode_inputs(paths)
    sizes = tiny.TinySizes()
    assert inputs["context"].dim() == 2 and 1 < inputs["context"].shape[0] < 20
    assert inputs["context"].shape[1] == sizes.t5_dim
    assert inputs["clip_fea"].shape == (1, 257, sizes.clip_width)
    assert inputs["features"].shape == (25, 12, 768)
    latent = inputs["latent"]
    assert latent.shape == (1, 16, 2, 4, 4)
    for name in ("context", "clip_fea", "features", "latent"):
        value = inputs[name]
        assert torch.isfinite(value).all() and 1e-3 < value.float().std() < 1e3, name
    model = load_infinitetalk(paths["transformer"], paths["adapter"], LoadOptions(dtype=torch.float32))
    cfg = model.config
    assert (cfg.dim, cfg.num_heads, cfg.num_layers) == (sizes.dim, sizes.dim // tiny.HEAD_DIM, sizes.num_layers)
    assert (cfg.text_dim, cfg.clip_dim) == (sizes.t5_dim, sizes.clip_width)
    audio = audio_windows(inputs["features"], 0, 5)[None, None]
    y = torch.cat([torch.ones(1, 4, 2, 4, 4), latent], dim=1)
    y[:, :4, 1:] = 0
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    args = dict(x=x, t=torch.tensor([500.0]), context=inputs["context"][None], clip_fea=inputs["clip_fea"], y=y)
    with torch.no_grad():
        out = model(**args, audio=audio)
        silent = model(**args, audio=torch.zeros_like(audio))
    assert out.shape == (1, 16, 2, 4, 4) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and 1e-3 < out.std() < 1e3
    assert (out - silent).abs().max() > 1e-4, "the audio adapter must change the prediction"
    video = inputs["vae"].decode(out)
    assert video.shape == (1, 3, 5, 32, 32) and torch.isfinite(video).all()
