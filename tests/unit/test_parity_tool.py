"""tools/parity.py reproduces every parity fixture (transformer, VAE, umT5, CLIP, wav2vec2, sampler) within the
tolerances of fixtures.md / issue 3, writes exactly the fixture's output names, reads every size from the file (a
transformer fixture of another configuration, built here), and fails loudly on a wrong model or file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import parity
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitetalk.attention import resolve
from infinitetalk.fp8_optimization import ops_for
from infinitetalk.multitalk.model import InfiniteTalkModel
from infinitetalk.wanvideo.config import AudioConfig, WanConfig

PACK_ROOT = Path(__file__).resolve().parents[2]
KINDS = {"ref_tiny_*": "transformer", "ref_vae_*": "vae", "ref_t5_*": "t5", "ref_clip_*": "clip",
         "ref_wav2vec_*": "wav2vec", "ref_sampler_*": "sampler"}


@pytest.mark.parametrize("pattern", list(KINDS))
def test_every_fixture_is_reproduced(fixtures_dir, pattern):
    paths = sorted(fixtures_dir.glob(f"{pattern}.safetensors"))
    assert paths, f"no {pattern} fixture in {fixtures_dir}"
    for path in paths:
        fx, outputs, _ = parity.run_fixture(path)
        assert fx.component == KINDS[pattern]
        reference = fx.group("outputs")
        assert set(outputs) == set(reference), path.name
        errors = parity.errors(outputs, reference)
        worst = {name: err for name, (err, _) in errors.items()}
        print(f"{path.name}: worst max abs error {max(worst.values()):.3g} over {len(worst)} outputs")
        over = {name: err for name, err in worst.items() if not err <= parity.tolerance(fx, name)}
        assert not over, f"{path.name}: above tolerance: {over}"
        for name, ref in reference.items():
            assert outputs[name].dtype == ref.dtype, name


def test_command_line_writes_the_output_names(fixtures_dir, tmp_path):
    fixture = fixtures_dir / "ref_clip_a.safetensors"
    out = tmp_path / "out" / "clip.safetensors"
    done = subprocess.run([sys.executable, str(PACK_ROOT / "tools" / "parity.py"), str(fixture), "--out", str(out),
                           "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok     outputs.tokens" in done.stdout
    written = load_file(str(out))
    reference = {k[len("outputs."):]: v for k, v in load_file(str(fixture)).items() if k.startswith("outputs.")}
    assert set(written) == set(reference)
    assert (written["tokens"] - reference["tokens"]).abs().max() <= 1e-5


def test_wrong_weights_fail_the_check(fixtures_dir, tmp_path, capsys):
    tensors = load_file(str(fixtures_dir / "ref_clip_a.safetensors"))
    key = next(k for k in tensors if k.startswith("state_dict.visual.transformer.0.attn.to_qkv.weight"))
    tensors[key] = tensors[key] * 1.01
    broken = tmp_path / "ref_clip_broken.safetensors"
    metadata = safe_open(str(fixtures_dir / "ref_clip_a.safetensors"), "pt").metadata()
    save_file(tensors, str(broken), metadata=metadata)
    assert parity.main([str(broken), "--out", str(tmp_path / "o.safetensors"), "--check"]) == 1
    assert "OVER   outputs.tokens" in capsys.readouterr().out
    unknown = tmp_path / "unknown.safetensors"
    save_file({"inputs.x": torch.zeros(1)}, str(unknown), metadata={"harness": json.dumps({"component": "mystery"})})
    with pytest.raises(ValueError, match="unknown fixture component 'mystery'"):
        parity.read_fixture(unknown)


def test_transformer_fixture_of_another_configuration(tmp_path):
    """Sizes unlike the shipped fixtures (3 heads of 64, 3 layers, text_len 16, 2 speakers, latent 2x6x10): the tool
    takes every size from the file and matches the model run directly."""
    torch.manual_seed(7)
    audio = AudioConfig(intermediate_dim=24, output_dim=32, context_tokens=3)
    cfg = WanConfig(dim=192, ffn_dim=96, num_heads=3, num_layers=3, in_dim=36, out_dim=16, text_dim=48, text_len=16,
                    audio=audio)
    model = InfiniteTalkModel(cfg, ops_for("disabled"), resolve("sdpa", "cpu", torch.float32)).eval()
    frames, h, w = 2, 6, 10
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2], masks[1, :, w // 2:] = 1, 1
    inputs = {"x": torch.randn(16, frames, h, w), "t": torch.tensor([700.0]), "context": torch.randn(7, 48),
              "clip_fea": torch.randn(1, 257, 1280), "y": torch.randn(1, 20, frames, h, w),
              "audio": torch.randn(2, 1 + 4 * (frames - 1), 5, 12, 768), "ref_target_masks": masks}
    with torch.inference_mode():
        expected = model(x=inputs["x"][None], t=inputs["t"], context=inputs["context"][None],
                         clip_fea=inputs["clip_fea"], y=inputs["y"], audio=inputs["audio"][None],
                         ref_target_masks=masks)
    tensors = {f"state_dict.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"inputs.{k}": v for k, v in inputs.items()} | {"outputs.noise_pred": expected}
    path = tmp_path / "ref_tiny_other.safetensors"
    save_file(tensors, str(path), metadata={"harness": json.dumps({"config": {"num_heads": 3, "text_len": 16}})})
    fx, outputs, _ = parity.run_fixture(path)
    assert fx.component == "transformer"
    assert outputs["noise_pred"].shape == (1, 16, frames, h, w)
    assert (outputs["noise_pred"] - expected).abs().max() <= 1e-5
