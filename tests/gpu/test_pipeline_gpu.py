"""The transformer and the long-video loop on CUDA (skipped without a GPU): fixture parity in float32, bf16 close to
the float32 reference, and a whole two-window run with quantized linears finite and seed-reproducible."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitetalk.fp8_optimization import ops_for
from infinitetalk.multitalk.frame_sink import MemorySink
from infinitetalk.multitalk.loop import InfiniteTalkLoop, LoopInputs, SamplerSettings
from infinitetalk.wanvideo.checkpoint import LoadOptions, open_state_dict
from infinitetalk.wanvideo.vae import load_vae
from parity import tensor_group

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def files(fixtures_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu")
    out = {}
    for name in ("ref_tiny_2p", "ref_vae_a"):
        tensors = load_file(str(fixtures_dir / f"{name}.safetensors"))
        save_file(tensor_group(tensors, "state_dict"),
                  str(folder / f"{name}.safetensors"))
        out[name] = (folder / f"{name}.safetensors", tensors)
    meta = json.loads(safe_open(str(fixtures_dir / "ref_tiny_2p.safetensors"), "pt").metadata()["harness"])
    out["text_len"] = meta["config"]["text_len"]
    return out


def _load(files, dtype, mode="disabled"):
    path = files["ref_tiny_2p"][0]
    from infinitetalk.attention import resolve
    from infinitetalk.multitalk.model import InfiniteTalkModel
    from infinitetalk.wanvideo.checkpoint import load_model

    options = LoadOptions(dtype=dtype, device="cuda", text_len=files["text_len"], ops=ops_for(mode),
                          attention=resolve("sdpa", CUDA, dtype))
    return load_model(InfiniteTalkModel, open_state_dict([path], "cuda"), options)


def _forward(model, t):
    cuda = {k: v.to(CUDA) for k, v in t.items() if k.startswith("inputs.")}
    with torch.inference_mode():
        return model(cuda["inputs.x"][None], cuda["inputs.t"], cuda["inputs.context"][None],
                     clip_fea=cuda["inputs.clip_fea"], y=cuda["inputs.y"], audio=cuda["inputs.audio"][None],
                     ref_target_masks=cuda["inputs.ref_target_masks"]).cpu()


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2e-5), (torch.bfloat16, 5e-2)])
def test_transformer_on_cuda_matches_the_fixture(files, dtype, bound):
    t = files["ref_tiny_2p"][1]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = _forward(_load(files, dtype), t)
    ref = t["outputs.noise_pred"]
    assert ((out - ref).norm() / ref.norm()).item() < bound


@pytest.mark.parametrize("mode", ["fp8_e4m3fn_scaled_fast", "fp4_scaled"])
def test_two_window_loop_on_cuda_with_quantized_linears(files, mode):
    model = _load(files, torch.bfloat16, mode)
    vae = load_vae(files["ref_vae_a"][0], "bf16").to(CUDA)
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    masks = torch.zeros(3, 32, 48)
    masks[0, :, :24], masks[1, :, 24:] = 1, 1
    masks[2] = 0
    inputs = LoopInputs(start_images=torch.rand(1, 3, 32, 48, generator=gen) * 2 - 1,
                        audio_features=[torch.randn(20, 12, 768, generator=gen) for _ in range(2)],
                        prompts=[torch.randn(6, cfg.text_dim, generator=gen)],
                        negative=torch.randn(5, cfg.text_dim, generator=gen), total_frames=14,
                        frame_window_size=9, motion_frame=5, clip_context=torch.randn(1, 257, cfg.clip_dim),
                        ref_target_masks=masks)
    settings = SamplerSettings(scheduler="unipc", steps=3, shift=5.0, seed=5, cfg=2.0, audio_cfg=2.0,
                               batched_cfg=True)
    runs = []
    for _ in range(2):
        sink = MemorySink()
        InfiniteTalkLoop(model, vae, settings, CUDA).run(inputs, sink)
        runs.append(sink.result())
    assert runs[0].shape == (14, 32, 48, 3) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])
