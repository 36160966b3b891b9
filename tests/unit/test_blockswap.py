"""Block swap on the CPU: planning from both nodes' arguments, the packed layout of every parameter kind, rebinding,
bit-exact outputs with swapping, stable memory over repeated forwards, LoRA-style hooks, interruption and detach.

The bit-exactness tests use the tiny InfiniteTalk fixture (2 blocks); ring and prefetch behaviour needs more blocks
and uses a random 6-block model of the same architecture."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitetalk.attention import resolve
from infinitetalk.blockswap import (ALIGN, BlockSwapper, SwapPlan, block_layout, block_nbytes,
                                    estimate_activation_bytes, plan_block_swap)
from infinitetalk.fp8_optimization import ops_for
from infinitetalk.multitalk.model import InfiniteTalkModel, load_infinitetalk
from infinitetalk.wanvideo.checkpoint import LoadOptions
from infinitetalk.wanvideo.config import AudioConfig, WanConfig
from parity import tensor_group

PLAIN = {"blocks_to_swap": 20, "offload_img_emb": False, "offload_txt_emb": False}
MODES = ["disabled", "fp8_e4m3fn_scaled", "fp4_scaled"]


# ------------------------------------------------------------------------------------------------------ models

@pytest.fixture(scope="module")
def fixture_file(fixtures_dir, tmp_path_factory):
    """(safetensors path, text_len, inputs, loaded models by mode: each test takes a deep copy)."""
    ref = fixtures_dir / "ref_tiny_1p.safetensors"
    tensors = load_file(str(ref))
    text_len = json.loads(safe_open(str(ref), "pt").metadata()["harness"])["config"]["text_len"]
    path = tmp_path_factory.mktemp("swap") / "model.safetensors"
    save_file(tensor_group(tensors, "state_dict"), str(path))
    inputs = {k[len("inputs."):]: v for k, v in tensors.items() if k.startswith("inputs.")}
    return path, text_len, inputs, {}


def _fixture_model(fixture_file, mode):
    path, text_len, _, loaded = fixture_file
    if mode not in loaded:
        loaded[mode] = load_infinitetalk(path, None, LoadOptions(dtype=torch.float32, text_len=text_len,
                                                                 ops=ops_for(mode)))
    return copy.deepcopy(loaded[mode])


def _fixture_forward(model, inputs):
    with torch.inference_mode():
        return model(inputs["x"][None], inputs["t"], inputs["context"][None], clip_fea=inputs["clip_fea"],
                     y=inputs["y"], audio=inputs["audio"][None], ref_target_masks=inputs["ref_target_masks"])


def _random_model(mode="disabled", layers=6):
    cfg = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=layers, in_dim=36, out_dim=16, text_dim=32,
                    text_len=8, clip_dim=32, audio=AudioConfig(intermediate_dim=16, output_dim=32, context_tokens=4))
    torch.manual_seed(0)
    attention = resolve("sdpa", "cpu", torch.float32)
    model = InfiniteTalkModel(cfg, ops_for("disabled"), attention)
    if mode != "disabled":
        quantized = InfiniteTalkModel(cfg, ops_for(mode), attention)
        quantized.load_state_dict(model.state_dict())
        model = quantized
    return model.eval()


def _random_inputs(model):
    gen = torch.Generator().manual_seed(1)
    cfg = model.config
    return {"x": torch.randn(16, 3, 4, 6, generator=gen), "t": torch.tensor([500.0]),
            "context": torch.randn(5, cfg.text_dim, generator=gen),
            "clip_fea": torch.randn(1, 257, cfg.clip_dim, generator=gen),
            "y": torch.randn(1, cfg.in_dim - 16, 3, 4, 6, generator=gen),
            "audio": torch.randn(1, 9, 5, 12, 768, generator=gen), "ref_target_masks": None}


def _plan(blocks, count, prefetch=1, streams=1, overlap=True, arena=True, debug=False):
    n = len(blocks)
    return SwapPlan(swapped=tuple(range(n - count, n)), num_blocks=n, prefetch=prefetch, num_streams=streams,
                    overlap=overlap, single_arena=arena, debug=debug)


def _in_range(tensor, buffer):
    start = buffer.data_ptr()
    return start <= tensor.data_ptr() and tensor.data_ptr() + tensor.numel() * tensor.element_size() <= \
        start + buffer.numel()


# ---------------------------------------------------------------------------------------------------- planning

def test_plain_node_args_swap_the_last_blocks():
    plan = plan_block_swap(PLAIN, [100] * 40, 10_000, 0)
    assert plan.swapped == tuple(range(20, 40)) and plan.prefetch == 0 and plan.ring_slots == 1
    assert not plan.overlap and plan.num_streams == 1 and plan.single_arena and not plan.debug
    assert plan.weight_vram_bytes == 20 * 100 + 100
    plan = plan_block_swap({**PLAIN, "blocks_to_swap": 48, "use_non_blocking": True, "prefetch_blocks": 3,
                            "block_swap_debug": True, "offload_txt_emb": True}, [100] * 40, 10_000, 0)
    assert plan.swapped == tuple(range(40)) and plan.overlap and plan.ring_slots == 4 and plan.debug
    assert plan.offload_txt_emb and not plan.offload_img_emb and plan.weight_vram_bytes == 400


def test_enhanced_node_args_without_tuning(caplog):
    args = {"blocks_to_swap": 10, "auto_hardware_tuning": False, "num_cuda_streams": 16, "bandwidth_target": 1.0,
            "enable_dram_optimization": False, "enable_cuda_optimization": False, "debug_mode": True,
            "vace_blocks_to_swap": 2}
    plan = plan_block_swap(args, [100] * 40, 10_000, 0)
    assert plan.swapped == tuple(range(30, 40)) and plan.prefetch == 1 and plan.num_streams == 16
    assert not plan.single_arena and not plan.overlap and plan.debug and plan.vace_blocks_to_swap == 2
    depths = {t: plan_block_swap({**args, "bandwidth_target": t}, [100] * 40, 10_000, 0).prefetch
              for t in (1.0, 0.8, 0.5, 0.3, 0.1)}
    assert depths == {1.0: 1, 0.8: 2, 0.5: 2, 0.3: 4, 0.1: 10}
    with caplog.at_level(logging.WARNING, logger="infinitetalk.blockswap"):
        plan_block_swap({**args, "vram_threshold_percent": 50.0}, [100] * 40, 4000, 0)
    assert "exceed the budget" in caplog.text


def test_auto_tuning_fits_resident_blocks_and_ring_in_the_budget():
    args = {"auto_hardware_tuning": True, "vram_threshold_percent": 50.0, "bandwidth_target": 0.5,
            "blocks_to_swap": 3}
    plan = plan_block_swap(args, [100] * 40, 3000, 0)  # budget 1500: 12 resident + 3 slots
    assert plan.swapped == tuple(range(12, 40)) and plan.prefetch == 2 and plan.weight_vram_bytes == 1500
    plan = plan_block_swap(args, [100] * 40, 3000, 2000)  # activations leave 1000
    assert len(plan.swapped) == 33 and plan.weight_vram_bytes == 1000
    plan = plan_block_swap({**args, "vram_threshold_percent": 90.0}, [100] * 40, 3000, 0)
    assert len(plan.swapped) == 16 and plan.weight_vram_bytes == 2700
    plan = plan_block_swap(args, [100] * 40, 300, 0)  # only one slot fits: no prefetch
    assert len(plan.swapped) == 40 and plan.prefetch == 0 and plan.ring_slots == 1
    plan = plan_block_swap(args, [100] * 40, 100_000, 0)
    assert plan.swapped == () and plan.weight_vram_bytes == 4000
    sizes = [100] * 38 + [300, 100]  # the ring slot is as large as the largest swapped block
    plan = plan_block_swap(args, sizes, 3000, 0)
    assert len(plan.swapped) == 34 and plan.weight_vram_bytes == 6 * 100 + 3 * 300
    with pytest.raises(RuntimeError, match="not even one block slot"):
        plan_block_swap(args, [100] * 40, 150, 100)


def test_bad_args_are_rejected_with_what_to_fix():
    with pytest.raises(ValueError, match="unknown block swap arguments"):
        plan_block_swap({**PLAIN, "blocks": 3}, [1] * 4, 10, 0)
    with pytest.raises(ValueError, match="num_cuda_streams"):
        plan_block_swap({"num_cuda_streams": 17, "auto_hardware_tuning": False}, [1] * 4, 10, 0)
    with pytest.raises(ValueError, match="use_non_blocking must be true or false"):
        plan_block_swap({**PLAIN, "use_non_blocking": 1}, [1] * 4, 10, 0)
    with pytest.raises(ValueError, match="blocks_to_swap"):
        plan_block_swap({**PLAIN, "blocks_to_swap": -1}, [1] * 4, 10, 0)
    with pytest.raises(ValueError, match="made for 3 blocks"):
        BlockSwapper.attach(_random_model(layers=2).blocks, SwapPlan(swapped=(2,), num_blocks=3), "cpu")


def test_activation_estimate_scales_with_tokens():
    small = estimate_activation_bytes(32760, 5120, 13824)
    assert estimate_activation_bytes(2 * 32760, 5120, 13824) == pytest.approx(2 * small, rel=1e-6)
    assert 2e9 < small < 3e9  # 32760 tokens at dim 5120: measured 2.24 GiB (H100)


# ------------------------------------------------------------------------------------------------------ layout

@pytest.mark.parametrize("mode,kinds", [
    ("disabled", {torch.float32}),
    ("fp8_e4m3fn_scaled", {torch.float32, torch.float8_e4m3fn}),
    ("fp8_e5m2", {torch.float32, torch.float8_e5m2}),
    ("fp4_scaled", {torch.float32, torch.uint8, torch.float8_e4m3fn}),
    ("fp4_experimental", {torch.float32, torch.uint8}),
])
def test_layout_packs_every_parameter_and_buffer_aligned(mode, kinds):
    block = _random_model(mode, layers=1).blocks[0]
    layout = block_layout(block)
    names = {n for spec in layout.tensors for n in spec.names}
    expected = {n for n, _ in block.named_parameters()} | {n for n, _ in block.named_buffers()}
    assert names == expected and any(n.startswith("norm_x.") for n in names)
    assert any(n.startswith("audio_cross_attn.") for n in names)
    assert {spec.dtype for spec in layout.tensors} == kinds
    end = 0
    for spec in layout.tensors:
        assert spec.offset % ALIGN == 0 and spec.offset >= end
        tensor = block.get_parameter(spec.names[0]) if spec.is_param else block.get_buffer(spec.names[0])
        assert spec.nbytes == tensor.numel() * tensor.element_size() and spec.shape == tuple(tensor.shape)
        end = spec.offset + spec.nbytes
    assert layout.nbytes % ALIGN == 0 and end <= layout.nbytes < end + ALIGN
    assert block_nbytes(block) == layout.nbytes


# --------------------------------------------------------------------------------------------------- swapping

def test_attach_rebinds_views_into_aligned_host_ranges_and_slots(fixture_file):
    model = _fixture_model(fixture_file, "fp4_scaled")
    swapper = BlockSwapper.attach(model.blocks, _plan(model.blocks, 1), "cpu")
    host = swapper.host_range(1)
    tensors = list(model.blocks[1].parameters()) + list(model.blocks[1].buffers())
    assert all(_in_range(t, host) and t.data_ptr() % ALIGN == 0 and t.is_contiguous() for t in tensors)
    resident = list(model.blocks[0].parameters()) + list(model.blocks[0].buffers())
    storage = resident[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage and t.data_ptr() % ALIGN == 0 for t in resident)
    seen = []

    def check(module, args):
        w, scale = module.weight, module.weight_scale
        seen.append(any(_in_range(w, s) and _in_range(scale, s) for s in swapper.slot_buffers()))
        seen.append(w.data_ptr() % ALIGN == 0 and scale.data_ptr() % ALIGN == 0 and w.is_contiguous())

    model.blocks[1].ffn[0].register_forward_pre_hook(check)
    _fixture_forward(model, fixture_file[2])
    assert seen == [True, True]
    assert all(_in_range(t, host) for t in tensors)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("count,prefetch,streams,overlap,arena", [
    (1, 0, 1, False, True), (2, 1, 4, True, False), (2, 0, 16, True, True), (2, 3, 2, False, False)])
def test_swapped_outputs_equal_resident_bit_exactly(fixture_file, mode, count, prefetch, streams, overlap, arena):
    model = _fixture_model(fixture_file, mode)
    inputs = fixture_file[2]
    ref = _fixture_forward(model, inputs)
    swapper = BlockSwapper.attach(model.blocks, _plan(model.blocks, count, prefetch, streams, overlap, arena), "cpu")
    for _ in range(2):
        assert torch.equal(_fixture_forward(model, inputs), ref)
    swapper.detach()
    assert torch.equal(_fixture_forward(model, inputs), ref)


def test_repeated_forwards_reuse_the_same_slots_and_copy_each_block_once_per_pass():
    model = _random_model()
    inputs = _random_inputs(model)
    ref = _fixture_forward(model, inputs)
    swapper = BlockSwapper.attach(model.blocks, _plan(model.blocks, 5, prefetch=1, streams=3), "cpu")
    slots = [s.data_ptr() for s in swapper.slot_buffers()]
    assert len(slots) == 2 and swapper.slot_bytes == 2 * block_nbytes(model.blocks[5])
    copies, views = [], []
    for _ in range(5):
        assert torch.equal(_fixture_forward(model, inputs), ref)
        copies.append(swapper.stats.copies)
        views.append(len(swapper._slot_views))
        assert [s.data_ptr() for s in swapper.slot_buffers()] == slots
        for b in range(1, 6):
            assert all(_in_range(p, swapper.host_range(b)) for p in model.blocks[b].parameters())
    assert [b - a for a, b in zip(copies, copies[1:])] == [5] * 4 and len(set(views)) == 1
    assert swapper.stats.passes == 5
    swapper.detach()
    ring = BlockSwapper.attach(model.blocks, _plan(model.blocks, 3, prefetch=5), "cpu")
    for _ in range(3):
        assert torch.equal(_fixture_forward(model, inputs), ref)
    assert ring.stats.copies == 3  # the ring holds every swapped block: copied once, at attach


def test_unmerged_lora_forward_hooks_stay_correct(fixture_file):
    model = _fixture_model(fixture_file, "fp8_e4m3fn_scaled")
    gen = torch.Generator().manual_seed(3)
    for block in model.blocks:
        for layer in (block.self_attn.q, block.ffn[2], block.audio_cross_attn.q_linear):
            down = torch.randn(4, layer.in_features, generator=gen) * 0.1
            up = torch.randn(layer.out_features, 4, generator=gen) * 0.1
            layer.register_forward_hook(lambda m, args, out, d=down, u=up: out + args[0] @ d.t() @ u.t())
    inputs = fixture_file[2]
    ref = _fixture_forward(model, inputs)
    BlockSwapper.attach(model.blocks, _plan(model.blocks, 2, prefetch=1), "cpu")
    assert torch.equal(_fixture_forward(model, inputs), ref)


def test_interrupted_forward_leaves_a_usable_swapper_and_release_frees_slots():
    model = _random_model("fp8_e4m3fn_scaled")
    inputs = _random_inputs(model)
    ref = _fixture_forward(model, inputs)
    swapper = BlockSwapper.attach(model.blocks, _plan(model.blocks, 4, prefetch=2, streams=2), "cpu")
    calls = []

    def cancel(module, args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("cancelled")

    handle = model.blocks[3].ffn[0].register_forward_pre_hook(cancel)
    with pytest.raises(RuntimeError, match="cancelled"):
        _fixture_forward(model, inputs)
    assert all(_in_range(p, swapper.host_range(3)) for p in model.blocks[3].parameters())
    assert torch.equal(_fixture_forward(model, inputs), ref)
    swapper.release()
    assert swapper.slot_bytes == 0 and swapper.slot_buffers() == []
    assert torch.equal(_fixture_forward(model, inputs), ref) and swapper.slot_bytes > 0
    handle.remove()


def test_detach_restores_plain_cpu_tensors_and_removes_the_hooks():
    model = _random_model("fp4_scaled", layers=3)
    inputs = _random_inputs(model)
    ref = _fixture_forward(model, inputs)
    swapper = BlockSwapper.attach(model.blocks, _plan(model.blocks, 2, arena=False), "cpu")
    swapper.detach()
    for block in model.blocks:
        assert not block._forward_pre_hooks and not block._forward_hooks
        tensors = list(block.parameters()) + list(block.buffers())
        assert all(t.device.type == "cpu" and t.is_contiguous() and not t.is_pinned() for t in tensors)
    assert torch.equal(_fixture_forward(model, inputs), ref)
    assert swapper.slot_bytes == 0


def test_compiled_blocks_run_with_swapping():
    model = _random_model(layers=2)
    inputs = _random_inputs(model)
    ref = _fixture_forward(model, inputs)
    BlockSwapper.attach(model.blocks, _plan(model.blocks, 1, prefetch=1), "cpu")
    for block in model.blocks:
        block.compile(backend="eager")
    for _ in range(2):
        assert torch.equal(_fixture_forward(model, inputs), ref)


def test_debug_mode_logs_transfers_per_pass(caplog):
    model = _random_model(layers=3)
    inputs = _random_inputs(model)
    swapper = BlockSwapper.attach(model.blocks, _plan(model.blocks, 3, prefetch=0, debug=True), "cpu")
    with caplog.at_level(logging.INFO, logger="infinitetalk.blockswap"):
        for _ in range(2):
            _fixture_forward(model, inputs)
        swapper.release()
    lines = [r.getMessage() for r in caplog.records if "block swap pass" in r.getMessage()]
    assert len(lines) == 2 and all("3 copies" in line for line in lines)


@pytest.mark.parametrize("mode", ["disabled", "fp4_scaled"])
def test_model_loaded_under_inference_mode_swaps_like_in_comfyui(fixture_file, mode):
    """ComfyUI runs every node under torch.inference_mode, so the loaded parameters are inference tensors."""
    path, text_len, inputs, _ = fixture_file
    with torch.inference_mode():
        model = load_infinitetalk(path, None, LoadOptions(dtype=torch.float32, text_len=text_len, ops=ops_for(mode)))
        expected = _fixture_forward(model, inputs)
        swapper = BlockSwapper.attach(model.blocks, _plan(model.blocks, len(model.blocks)), "cpu")
        try:
            swapped = _fixture_forward(model, inputs)
        finally:
            swapper.detach()
    assert torch.equal(swapped, expected)
