"""The block-swap seed matrix on CUDA (skipped without a GPU): {0, 20, 40 of 40 blocks swapped} x {1, 4, 16 copy
streams} x {bf16, fp8_e4m3fn_scaled, fp4_scaled} x {sdpa, sageattn}. Every case must give the resident run's output
bit for bit. The model is a reduced-size 40-block InfiniteTalk transformer (dim 256, 2 heads of 128, 72 tokens)
written to a safetensors file by the test and loaded with the real loader, so that the whole matrix fits a run
under ``compute-sanitizer --tool memcheck`` (the layouts, slots and streams are those of the full size; only the
tensors are smaller). ``sageattn`` runs the pack's 8-bit Triton kernel where the card can run it (the kernel
``sageattn`` uses when it is the fastest), else whatever ``resolve('sageattn')`` picks."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from infinitetalk import attention as A
from infinitetalk.attention import AttentionMode, build_backend, resolve
from infinitetalk.blockswap import BlockSwapper
from tiny_infinitetalk import enhanced_plan, forward, load_on_cuda, weights_and_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
LAYERS = 40
MODES = ["disabled", "fp8_e4m3fn_scaled", "fp4_scaled"]
ATTENTION = ["sdpa", "sageattn"]


def attention_backend(name: str) -> A.AttentionBackend:
    """``sdpa``: the resolved mode. ``sageattn``: the pack's 8-bit kernel first, for every call (``min_keys`` 0:
    this model's sequences are short), then SDPA for shapes it does not take, where this card can run it; else the
    resolved mode."""
    if name == "sageattn":
        spec = dataclasses.replace(A._KERNELS["triton_fp8"], min_keys=0)
        if A._unavailable(spec, CUDA, torch.bfloat16, True) is None:
            return build_backend(AttentionMode.SAGEATTN, (spec, A._KERNELS["sdpa"]))
    return resolve(name, CUDA, torch.bfloat16)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return weights_and_inputs(tmp_path_factory.mktemp("swap_matrix"), LAYERS)


@pytest.fixture(scope="module")
def models(weights):
    """(mode, attention) -> (model on CUDA in bf16, resident output), built on first use."""
    path, inputs = weights
    built = {}

    def get(mode: str, attention: str):
        if (mode, attention) not in built:
            built.clear()  # one model at a time keeps the run small
            model = load_on_cuda(path, mode, attention_backend(attention))
            built[(mode, attention)] = (model, forward(model, inputs))
        return built[(mode, attention)]

    return get


@pytest.mark.parametrize("streams", [1, 4, 16], ids=lambda s: f"streams{s}")
@pytest.mark.parametrize("count", [0, 20, 40], ids=lambda c: f"swap{c}")
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("mode", MODES)
def test_seed_matrix_case_is_bit_identical_to_resident(weights, models, mode, attention, count, streams):
    model, ref = models(mode, attention)
    plan = enhanced_plan(model.blocks, count, streams)
    swapper = BlockSwapper.attach(model.blocks, plan, CUDA)
    try:
        for _ in range(2):
            out = forward(model, weights[1])
            assert torch.isfinite(out).all()
            assert torch.equal(out, ref)
        assert swapper.stats.passes == (2 if count else 0)
        assert len(plan.swapped) == count
    finally:
        swapper.detach()
    model.to(CUDA)
