"""LoRA files in each key format, written here as real safetensors files and applied to the transformer loaded from
the float32 parity fixture: merged changes the weights by exactly s x (alpha/r) x B @ A, unmerged (hooks) gives the
merged output within rounding, per-step strengths, quantized layers, and clear errors for LoRAs that do not fit."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitetalk.fp8_optimization import QuantLinear, ops_for
from infinitetalk.multitalk.model import load_infinitetalk
from infinitetalk.wanvideo.checkpoint import LoadOptions
from infinitetalk.wanvideo.lora import LoraSpec, apply_lora_entries, apply_loras, read_lora_keys
from parity import tensor_group

RANK = 4
LAYERS = ("self_attn.q", "self_attn.o", "cross_attn.k_img", "ffn.0", "audio_cross_attn.kv_linear")


pytestmark = pytest.mark.usefixtures("one_thread")  # float32 results as the fixtures were made


@pytest.fixture(scope="module")
def ref(fixtures_dir, tmp_path_factory):
    src = fixtures_dir / "ref_tiny_1p.safetensors"
    tensors = load_file(str(src))
    text_len = json.loads(safe_open(str(src), "pt").metadata()["harness"])["config"]["text_len"]
    sd = tensor_group(tensors, "state_dict")
    path = tmp_path_factory.mktemp("lora") / "wan_tiny.safetensors"
    save_file(sd, str(path))
    return {"sd": sd, "t": tensors, "path": path, "text_len": text_len}


def fresh(ref, mode="disabled"):
    return load_infinitetalk(ref["path"], None, LoadOptions(dtype=torch.float32, text_len=ref["text_len"],
                                                             ops=ops_for(mode)))


def run(model, t) -> torch.Tensor:
    with torch.inference_mode():
        return model(x=t["inputs.x"][None], t=t["inputs.t"], context=t["inputs.context"][None],
                     clip_fea=t["inputs.clip_fea"], y=t["inputs.y"], audio=t["inputs.audio"][None],
                     ref_target_masks=t["inputs.ref_target_masks"])


def factors(sd: dict, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down [r, in], up [out, r]) per LoRA'd layer of both blocks."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for block in (0, 1):
        for layer in LAYERS:
            rows, cols = sd[f"blocks.{block}.{layer}.weight"].shape
            out[f"blocks.{block}.{layer}"] = (torch.randn(RANK, cols, generator=gen) / cols ** 0.5,
                                              torch.randn(rows, RANK, generator=gen) * 0.05)
    return out


def write_lora(path, fx: dict, style: str, alpha: float | None = None, extra: dict | None = None):
    """Write ``fx`` in one key style: peft (lora_A/B, ``diffusion_model.``), kohya (lora_down/up + alpha,
    ``model.diffusion_model.``), kohya_underscore (``lora_unet_blocks_0_self_attn_q``), plain (no prefix)."""
    tensors = {}
    for module, (down, up) in fx.items():
        if style == "peft":
            base, names = f"diffusion_model.{module}", ("lora_A.weight", "lora_B.weight")
        elif style == "kohya":
            base, names = f"model.diffusion_model.{module}", ("lora_down.weight", "lora_up.weight")
        elif style == "kohya_underscore":
            base, names = "lora_unet_" + module.replace(".", "_"), ("lora_down.weight", "lora_up.weight")
        else:
            base, names = module, ("lora_down.weight", "lora_up.weight")
        tensors[f"{base}.{names[0]}"], tensors[f"{base}.{names[1]}"] = down.to(torch.bfloat16), up.to(torch.bfloat16)
        if alpha is not None:
            tensors[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(tensors | (extra or {}), str(path))
    return {k: (d.to(torch.bfloat16).float(), u.to(torch.bfloat16).float()) for k, (d, u) in fx.items()}


@pytest.mark.parametrize("style, alpha", [("peft", None), ("kohya", 2.0), ("kohya_underscore", 8.0), ("plain", 4.0)])
def test_merged_changes_weights_by_exactly_s_times_the_product(ref, tmp_path, style, alpha):
    path = tmp_path / f"lora_{style}.safetensors"
    stored = write_lora(path, factors(ref["sd"]), style, alpha)
    assert len(read_lora_keys(path)) == len(stored)
    scale = 1.0 if alpha is None else alpha / RANK
    for strength in (1.0, -0.75):
        model = fresh(ref)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        lora_set = apply_loras(model, [LoraSpec(path, strength)])
        assert len(lora_set.merged) == 1 and not lora_set.adapters
        after = model.state_dict()
        for module, (down, up) in stored.items():
            key = f"{module}.weight"
            assert torch.equal(after[key], before[key] + (up @ down) * (strength * scale)), key
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        assert changed == {f"{m}.weight" for m in stored}


def test_diff_keys_patch_weights_biases_and_bare_parameters(ref, tmp_path):
    gen = torch.Generator().manual_seed(3)
    sd = ref["sd"]
    diffs = {"diffusion_model.blocks.0.self_attn.k.diff": ("blocks.0.self_attn.k.weight", None),
             "diffusion_model.blocks.0.self_attn.k.diff_b": ("blocks.0.self_attn.k.bias", None),
             "diffusion_model.blocks.1.modulation.diff": ("blocks.1.modulation", None),
             "diffusion_model.blocks.1.norm3.diff": ("blocks.1.norm3.weight", None),
             "diffusion_model.head.head.diff_b": ("head.head.bias", None),
             "diffusion_model.patch_embedding.diff": ("patch_embedding.weight", None)}
    tensors = {key: torch.randn(sd[target].shape, generator=gen) * 0.01 for key, (target, _) in diffs.items()}
    path = tmp_path / "lora_diff.safetensors"
    save_file(tensors, str(path))
    model = fresh(ref)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_loras(model, [LoraSpec(path, 0.5)])
    after = model.state_dict()
    for key, (target, _) in diffs.items():
        assert torch.equal(after[target], before[target] + tensors[key] * 0.5), target
    assert sum(not torch.equal(after[k], before[k]) for k in after) == len(diffs)


def test_lightx2v_style_file(ref, tmp_path):
    """The lightx2v distill LoRA layout: ``diffusion_model.`` + lora_down/lora_up + alpha per Linear, ``diff_b`` for
    the same Linears' biases, ``diff`` for norm weights and the head, all bf16."""
    sd, gen = ref["sd"], torch.Generator().manual_seed(11)
    tensors, expected = {}, {}
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.2", "blocks.1.cross_attn.v_img"):
        rows, cols = sd[f"{module}.weight"].shape
        down = (torch.randn(RANK, cols, generator=gen) / cols ** 0.5).to(torch.bfloat16)
        up = (torch.randn(rows, RANK, generator=gen) * 0.05).to(torch.bfloat16)
        bias = (torch.randn(rows, generator=gen) * 0.01).to(torch.bfloat16)
        tensors |= {f"diffusion_model.{module}.lora_down.weight": down, f"diffusion_model.{module}.lora_up.weight": up,
                    f"diffusion_model.{module}.alpha": torch.tensor(8.0, dtype=torch.bfloat16),
                    f"diffusion_model.{module}.diff_b": bias}
        expected[f"{module}.weight"] = sd[f"{module}.weight"] + (up.float() @ down.float()) * (1.0 * 8.0 / RANK)
        expected[f"{module}.bias"] = sd[f"{module}.bias"] + bias.float() * 1.0
    for target in ("blocks.0.self_attn.norm_q.weight", "head.head.weight"):
        delta = (torch.randn(sd[target].shape, generator=gen) * 0.01).to(torch.bfloat16)
        tensors[f"diffusion_model.{target[:-len('.weight')]}.diff"] = delta
        expected[target] = sd[target] + delta.float() * 1.0
    path = tmp_path / "lightx2v_I2V_14B_480p_cfg_step_distill_rank4_bf16.safetensors"
    save_file(tensors, str(path))
    model = fresh(ref)
    apply_loras(model, [LoraSpec(path, 1.0)])
    after = model.state_dict()
    for target, value in expected.items():
        assert torch.equal(after[target], value), target
    assert sum(not torch.equal(after[k], sd[k]) for k in sd) == len(expected)


def test_unmerged_equals_merged_and_follows_per_step_strengths(ref, tmp_path):
    path = tmp_path / "lora.safetensors"
    write_lora(path, factors(ref["sd"]), "kohya", alpha=2.0, extra={
        "diffusion_model.blocks.0.ffn.2.diff_b": torch.full_like(ref["sd"]["blocks.0.ffn.2.bias"], 0.01),
        "diffusion_model.blocks.1.self_attn.v.diff": torch.randn(ref["sd"]["blocks.1.self_attn.v.weight"].shape) * 0.01,
    })
    base = run(fresh(ref), ref["t"])
    merged_model = fresh(ref)
    apply_loras(merged_model, [LoraSpec(path, 0.8)])
    merged = run(merged_model, ref["t"])
    model = fresh(ref)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lora_set = apply_loras(model, [LoraSpec(path, 0.8, merge=False)])
    assert len(lora_set.adapters) == 2 * len(LAYERS) + 1 and list(lora_set.params) == ["blocks.0.ffn.2.bias"]
    assert set(model.state_dict()) == set(state)
    unmerged = run(model, ref["t"])
    print(f"merged vs unmerged max |diff| {(merged - unmerged).abs().max():.3g}, LoRA effect "
          f"{(merged - base).abs().max():.3g}")
    assert (merged - base).abs().max() > 1e-2
    assert torch.allclose(unmerged, merged, rtol=1e-4, atol=1e-5)
    lora_set.remove()
    assert torch.equal(run(model, ref["t"]), base)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    scheduled = fresh(ref)
    steps = apply_loras(scheduled, [LoraSpec(path, (0.0, 0.8))])
    assert not steps.merged and steps.adapters
    assert torch.equal(run(scheduled, ref["t"]), base)
    steps.set_step(1)
    assert torch.allclose(run(scheduled, ref["t"]), merged, rtol=1e-4, atol=1e-5)
    steps.set_step(7)
    assert torch.allclose(run(scheduled, ref["t"]), merged, rtol=1e-4, atol=1e-5)


def test_quantized_layers_merged_and_unmerged(ref, tmp_path):
    path = tmp_path / "lora.safetensors"
    stored = write_lora(path, factors(ref["sd"], seed=5), "peft")
    reference = fresh(ref)
    apply_loras(reference, [LoraSpec(path, 1.0)])
    target = run(reference, ref["t"])
    merged = fresh(ref, "fp8_e4m3fn_scaled")
    layer = merged.blocks[0].self_attn.q
    before = layer.dequantized_weight()
    apply_loras(merged, [LoraSpec(path, 1.0)])
    assert isinstance(layer, QuantLinear) and layer.weight.dtype == torch.float8_e4m3fn
    down, up = stored["blocks.0.self_attn.q"]
    expected = before + up @ down
    assert ((layer.dequantized_weight() - expected).norm() / expected.norm()) < 0.03
    unmerged = fresh(ref, "fp8_e4m3fn_scaled_fast")
    apply_loras(unmerged, [LoraSpec(path, 1.0, merge=False)])
    for model in (merged, unmerged):
        out = run(model, ref["t"])
        assert ((out - target).norm() / target.norm()) < 0.05


def test_upstream_entries_filters_and_zero_strength(ref, tmp_path):
    path = tmp_path / "lora.safetensors"
    stored = write_lora(path, factors(ref["sd"]), "peft")
    model = fresh(ref)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    entries = [{"path": str(path), "strength": 1.0, "name": "lora", "blocks": {"blocks.1.": True, "blocks.0.": False},
                "layer_filter": "ffn, kv_linear", "low_mem_load": False, "merge_loras": True},
               {"path": str(path), "strength": 0.0, "merge_loras": True}]
    apply_lora_entries(model, entries)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"{m}.weight" for m in stored if m.startswith("blocks.1.") and "ffn" not in m
                       and "kv_linear" not in m}
    assert apply_lora_entries(model, None).merged == []


def test_bad_loras_are_named(ref, tmp_path, caplog):
    model = fresh(ref)
    other = tmp_path / "other_model.safetensors"
    save_file({"transformer.single_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
               "transformer.single_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)}, str(other))
    with pytest.raises(ValueError, match="none of its 1 layers matches") as err:
        apply_loras(model, [LoraSpec(other)])
    assert str(other) in str(err.value)
    partial = tmp_path / "partial.safetensors"
    fx = factors(ref["sd"])
    write_lora(partial, {"blocks.0.self_attn.q": fx["blocks.0.self_attn.q"], "blocks.7.self_attn.q": (
        torch.zeros(RANK, 256), torch.zeros(256, RANK))}, "peft")
    with caplog.at_level(logging.INFO, logger="infinitetalk.wanvideo.lora"):
        apply_loras(model, [LoraSpec(partial, 0.5)])
    assert "1 of 2 layers matched" in caplog.text and "blocks.7.self_attn.q" in caplog.text
    wrong_size = tmp_path / "wrong_size.safetensors"
    write_lora(wrong_size, {"blocks.0.self_attn.q": (torch.zeros(RANK, 128), torch.zeros(256, RANK))}, "peft")
    with pytest.raises(ValueError, match="does not fit the model's blocks.0.self_attn.q.weight"):
        apply_loras(model, [LoraSpec(wrong_size)])
    half = tmp_path / "half.safetensors"
    save_file({"blocks.0.self_attn.q.lora_up.weight": torch.zeros(256, RANK)}, str(half))
    with pytest.raises(ValueError, match="no matching down"):
        apply_loras(model, [LoraSpec(half)])
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.zeros(2, 2)}, str(loha))
    with pytest.raises(ValueError, match="LoHa"):
        apply_loras(model, [LoraSpec(loha)])
    not_lora = tmp_path / "not_lora.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(not_lora))
    with pytest.raises(ValueError, match="no LoRA weights found"):
        apply_loras(model, [LoraSpec(not_lora)])
    with pytest.raises(ValueError, match="not found"):
        apply_loras(model, [LoraSpec(tmp_path / "absent.safetensors")])
