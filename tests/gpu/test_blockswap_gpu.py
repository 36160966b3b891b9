"""Block swap on CUDA (skipped without a GPU): outputs with any swap setting are bit-identical to the resident run for
bf16, fp8_e4m3fn_scaled and fp4_scaled, parameters are aligned views into device slots while their block runs, the
host arena is page-locked, 100 forwards do not grow VRAM, and a cancelled forward followed by ``release`` frees the
slots. The model is a random tiny InfiniteTalk transformer written to a safetensors file by the test and loaded
with the real loader (the device machine has no parity fixtures)."""
from __future__ import annotations

import ctypes
import logging

import pytest
import torch

from infinitetalk.attention import resolve
from infinitetalk.blockswap import ALIGN, BlockSwapper, SwapPlan, block_nbytes, plan_block_swap
from tiny_infinitetalk import enhanced_plan, forward, load_on_cuda, weights_and_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
LAYERS = 8
MODES = ["disabled", "fp8_e4m3fn_scaled", "fp4_scaled"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return weights_and_inputs(tmp_path_factory.mktemp("swap_gpu"), LAYERS)


@pytest.fixture(scope="module")
def models(weights):
    """mode -> (model on CUDA in bf16, resident reference output); tests attach and detach on these models."""
    path, inputs = weights
    out = {}
    for mode in MODES:
        model = load_on_cuda(path, mode, resolve("sdpa", CUDA, torch.bfloat16))
        out[mode] = (model, forward(model, inputs))
    return out


def page_locked(t: torch.Tensor) -> bool:
    """Whether the CUDA driver sees t's memory as page-locked host memory. torch's ``is_pinned()`` answers False for
    memory registered with cudaHostRegister (it only knows its own pinned allocator), so ask the driver."""
    memory_type = ctypes.c_uint(0)
    err = ctypes.CDLL("libcuda.so.1").cuPointerGetAttribute(ctypes.byref(memory_type), ctypes.c_int(2),  # MEMORY_TYPE
                                                            ctypes.c_uint64(t.data_ptr()))
    return err == 0 and memory_type.value == 1  # CU_MEMORYTYPE_HOST


@pytest.mark.parametrize("streams", [1, 4, 16], ids=lambda s: f"streams{s}")
@pytest.mark.parametrize("count", [0, LAYERS // 2, LAYERS], ids=lambda c: f"swap{c}")
@pytest.mark.parametrize("mode", MODES)
def test_swapped_forward_is_bit_identical_to_resident(weights, models, mode, count, streams):
    model, ref = models[mode]
    swapper = BlockSwapper.attach(model.blocks, enhanced_plan(model.blocks, count, streams), CUDA)
    try:
        for _ in range(3):
            assert torch.equal(forward(model, weights[1]), ref)
        assert swapper.stats.passes == (3 if count else 0)
    finally:
        swapper.detach()


def test_plain_node_args_copy_on_the_compute_stream(weights, models):
    model, ref = models["fp8_e4m3fn_scaled"]
    plan = plan_block_swap({"blocks_to_swap": 48, "offload_img_emb": False, "offload_txt_emb": False},
                           [block_nbytes(b) for b in model.blocks], 1 << 40, 0)
    assert not plan.overlap and plan.ring_slots == 1
    swapper = BlockSwapper.attach(model.blocks, plan, CUDA)
    try:
        assert torch.equal(forward(model, weights[1]), ref)
    finally:
        swapper.detach()


def test_weights_are_aligned_slot_views_and_lora_hooks_stay_correct(weights, models, caplog):
    model, _ = models["fp4_scaled"]
    gen = torch.Generator(device=CUDA).manual_seed(2)
    handles = []
    for block in model.blocks:
        layer = block.ffn[0]
        down = torch.randn(4, layer.in_features, generator=gen, device=CUDA, dtype=torch.bfloat16) * 0.1
        up = torch.randn(layer.out_features, 4, generator=gen, device=CUDA, dtype=torch.bfloat16) * 0.1
        handles.append(layer.register_forward_hook(lambda m, a, out, d=down, u=up: out + a[0] @ d.t() @ u.t()))
    resident = BlockSwapper.attach(model.blocks, enhanced_plan(model.blocks, 0, 1), CUDA)  # earlier tests detached
    ref = forward(model, weights[1])
    resident.detach()
    swapper = BlockSwapper.attach(model.blocks, enhanced_plan(model.blocks, 6, 4, debug_mode=True), CUDA)
    seen = []

    def check(module, args):
        tensors = (module.weight, module.weight_scale, module.weight_scale_2, module.bias)
        in_slot = [any(s.data_ptr() <= t.data_ptr() < s.data_ptr() + s.numel() for s in swapper.slot_buffers())
                   for t in tensors]
        seen.append(all(in_slot) and all(t.is_cuda and t.is_contiguous() and t.data_ptr() % ALIGN == 0
                                         for t in tensors))

    handles += [block.ffn[0].register_forward_pre_hook(check) for block in model.blocks[2:]]
    try:
        assert all(page_locked(swapper.host_range(b)) for b in range(2, LAYERS))
        with caplog.at_level(logging.INFO, logger="infinitetalk.blockswap"):
            for _ in range(2):
                assert torch.equal(forward(model, weights[1]), ref)
            swapper.release()
        assert seen == [True] * 12
        assert any("GB/s" in r.getMessage() for r in caplog.records)
    finally:
        swapper.detach()
        for handle in handles:
            handle.remove()


def test_hundred_forwards_do_not_grow_vram(weights, models):
    model, ref = models["fp8_e4m3fn_scaled"]
    swapper = BlockSwapper.attach(model.blocks, enhanced_plan(model.blocks, LAYERS, 4), CUDA)
    try:
        out = forward(model, weights[1])
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(100):
            out = forward(model, weights[1])
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
        assert torch.cuda.memory_allocated() == allocated
        peak_100 = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = forward(model, weights[1])
        torch.cuda.synchronize()
        assert peak_100 == torch.cuda.max_memory_allocated()
    finally:
        swapper.detach()


def test_cancelled_forward_then_release_frees_the_slots(weights, models):
    model, ref = models["disabled"]
    swapper = BlockSwapper.attach(model.blocks, enhanced_plan(model.blocks, LAYERS, 2), CUDA)

    def cancel(module, args):
        raise RuntimeError("cancelled")

    handle = model.blocks[5].cross_attn.register_forward_pre_hook(cancel)
    try:
        with pytest.raises(RuntimeError, match="cancelled"):
            forward(model, weights[1])
        handle.remove()
        before, slots = torch.cuda.memory_allocated(), swapper.slot_bytes
        swapper.release()
        torch.cuda.synchronize()
        assert slots > 0 and swapper.slot_bytes == 0
        assert before - torch.cuda.memory_allocated() >= slots
        assert torch.equal(forward(model, weights[1]), ref)
    finally:
        handle.remove()
        swapper.detach()


def test_embedders_stream_from_host_memory_next_to_swapped_blocks(weights, models):
    """offload_txt_emb / offload_img_emb: the text embedder and the CLIP-image projection are streamed by a second
    swapper (one slot, copies on the compute stream) while the blocks swap; outputs stay bit-identical and the
    embedders' weights are back in page-locked host memory between forwards."""
    model, ref = models["fp8_e4m3fn_scaled"]
    embedders = torch.nn.ModuleList([model.text_embedding, model.img_emb])
    streamer = BlockSwapper.attach(embedders, SwapPlan(swapped=(0, 1), num_blocks=2, prefetch=0, overlap=False), CUDA)
    swapper = BlockSwapper.attach(model.blocks, enhanced_plan(model.blocks, LAYERS, 4), CUDA)
    try:
        for _ in range(2):
            assert torch.equal(forward(model, weights[1]), ref)
        assert streamer.stats.passes == 2 and streamer.slot_bytes > 0
        assert all(page_locked(streamer.host_range(b)) for b in range(2))
    finally:
        swapper.detach()
        streamer.detach()
    model.to(CUDA)
    assert torch.equal(forward(model, weights[1]), ref)
