"""The pack's models live under ComfyUI's model management, observed in a real server.

A test-only custom node (written into the server's custom_nodes folder here, not shipped with the pack) reports
ComfyUI's own ``comfy.model_management.current_loaded_models`` in its UI output, which the test reads back through
/history, and saves the sampler's video so runs can be compared. With ``force_offload`` off the transformer and the
VAE stay in ComfyUI's loaded list after the sampler (the transformer whole, or block-swapped with only the resident
blocks counted as loaded); ``force_offload`` takes them out again; POST /free unloads them (block swapper detached)
and the next run loads them again from the cached loader outputs and gives the same video as a fresh placement.
The umT5 text encoder is loaded through ComfyUI when it encodes and is unloaded by POST /free likewise; the cached
text-encode node loads its own encoder through ComfyUI too and frees it after encoding.
"""
import json

import pytest
import torch

from bundled_workflows import WORKFLOWS_DIR
from comfyhost import ComfyServer
from make_tiny_models import make_tiny_models
from workflow_graph import ui_to_api

pytestmark = pytest.mark.comfy

PROBE_NODE = '''
import json
import os

import comfy.model_management
import folder_paths
import torch


class LoadedModelsProbe:
    """Test-only: ComfyUI's loaded-models list after ``after`` ran; saves ``after["video"]`` as <tag>.pt."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""})},
                "optional": {"after": ("LATENT", {}), "embeds": ("WANVIDEOTEXTEMBEDS", {})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, tag, after=None, embeds=None):
        if isinstance(after, dict) and "video" in after:
            torch.save(after["video"].clone(), os.path.join(folder_paths.get_output_directory(), tag + ".pt"))
        loaded = [{"module": type(m.model.model).__name__, "loaded": int(m.model.loaded_size()),
                   "size": int(m.model.model_size()), "device": str(m.model.current_loaded_device()),
                   "swapped": getattr(m.model.model, "swapper", None) is not None,
                   "streamed_embedders": len(getattr(getattr(m.model.model, "embed_swapper", None), "blocks", ()))}
                  for m in comfy.model_management.current_loaded_models if m.model is not None]
        return {"ui": {"text": [json.dumps(loaded)]}}


NODE_CLASS_MAPPINGS = {"LoadedModelsProbe": LoadedModelsProbe}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("comfy_mm")
    probe = workdir / "custom_nodes" / "loaded_models_probe"
    probe.mkdir(parents=True)
    (probe / "__init__.py").write_text(PROBE_NODE)
    instance = ComfyServer(workdir=workdir)
    make_tiny_models(instance.models_dir)
    instance.start()
    for asset in (WORKFLOWS_DIR / "assets").iterdir():
        (instance.input_dir / asset.name).write_bytes(asset.read_bytes())
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def base_prompt(server):
    """The tiny I2V demo, shrunk to one 64 x 64 window of one step, with the probe after the sampler."""
    prompt = ui_to_api(json.loads((WORKFLOWS_DIR / "infinitetalk_i2v_tiny_demo.json").read_text()),
                       server.object_info())
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "WanVideoSampler")
    for node in prompt.values():
        if node["class_type"] == "MultiTalkWav2VecEmbeds":
            node["inputs"]["num_frames"] = 9
        elif node["class_type"] == "WanVideoImageToVideoMultiTalk":
            node["inputs"].update(width=64, height=64)
        elif node["class_type"] == "WanVideoSampler":
            node["inputs"].update(steps=1, force_offload=False)
    keep = {k: n for k, n in prompt.items() if n["class_type"] not in ("CreateVideo", "SaveVideo")}
    keep["probe"] = {"class_type": "LoadedModelsProbe", "inputs": {"tag": "", "after": [sampler, 0]}}
    return keep


def _variant(prompt: dict, tag: str, seed: int, force_offload: bool = False, swap_blocks: int = 0,
             offload_embedders: bool = False) -> dict:
    prompt = json.loads(json.dumps(prompt))
    sampler = next(n for n in prompt.values() if n["class_type"] == "WanVideoSampler")
    sampler["inputs"].update(seed=seed, force_offload=force_offload)
    prompt["probe"]["inputs"]["tag"] = tag
    if swap_blocks:
        prompt["swap_args"] = {"class_type": "WanVideoBlockSwap", "inputs": {
            "blocks_to_swap": swap_blocks, "offload_img_emb": offload_embedders,
            "offload_txt_emb": offload_embedders}}
        prompt["set_swap"] = {"class_type": "WanVideoSetBlockSwap", "inputs": {
            "model": sampler["inputs"]["model"], "block_swap_args": ["swap_args", 0]}}
        sampler["inputs"]["model"] = ["set_swap", 0]
    return prompt


def _loaded(server: ComfyServer, prompt: dict) -> tuple[dict, torch.Tensor | None]:
    """Run a prompt; return ComfyUI's loaded models after it, by module class, and the saved video (if any)."""
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    listed = json.loads(entry["outputs"]["probe"]["text"][0])
    tag = prompt["probe"]["inputs"]["tag"]
    video = server.output_dir / f"{tag}.pt"
    return {item["module"]: item for item in listed}, torch.load(video) if tag and video.exists() else None


def _probe_only(server: ComfyServer) -> dict:
    return _loaded(server, {"probe": {"class_type": "LoadedModelsProbe", "inputs": {"tag": ""}}})[0]


def test_models_stay_loaded_and_post_free_unloads_them(server, base_prompt):
    loaded, _ = _loaded(server, _variant(base_prompt, "whole_seed5", seed=5))
    transformer = loaded["WanVideoModel"]
    assert transformer["loaded"] == transformer["size"] > 0 and not transformer["swapped"]
    assert loaded["WanVAE"]["loaded"] == loaded["WanVAE"]["size"] > 0

    server.free(unload_models=True)
    _probe_only(server)
    after_free = _probe_only(server)  # the second prompt after /free runs after ComfyUI acted on it
    assert "WanVideoModel" not in after_free and "WanVAE" not in after_free

    loaded, _ = _loaded(server, _variant(base_prompt, "whole_seed6", seed=6))
    assert loaded["WanVideoModel"]["loaded"] == loaded["WanVideoModel"]["size"]


def test_force_offload_takes_the_models_out_of_the_loaded_list(server, base_prompt):
    loaded, video = _loaded(server, _variant(base_prompt, "offloaded", seed=7, force_offload=True))
    assert "WanVideoModel" not in loaded and "WanVAE" not in loaded
    assert video is not None and video.shape[1:] == (64, 64, 3)


def test_block_swapped_transformer_reports_its_resident_size_and_survives_unload(server, base_prompt):
    _, whole = _loaded(server, _variant(base_prompt, "whole_seed8", seed=8))
    loaded, swapped = _loaded(server, _variant(base_prompt, "swapped_seed8", seed=8, swap_blocks=2))
    transformer = loaded["WanVideoModel"]
    assert transformer["swapped"]
    assert 0 < transformer["loaded"] < transformer["size"]
    torch.testing.assert_close(swapped, whole, rtol=0, atol=1e-5)

    server.free(unload_models=True)
    _probe_only(server)
    assert "WanVideoModel" not in _probe_only(server)

    loaded, again = _loaded(server, _variant(base_prompt, "swapped_seed9", seed=9, swap_blocks=2))
    assert loaded["WanVideoModel"]["swapped"] and loaded["WanVideoModel"]["loaded"] == transformer["loaded"]
    _, reference = _loaded(server, _variant(base_prompt, "whole_seed9", seed=9))
    torch.testing.assert_close(again, reference, rtol=0, atol=1e-5)


def test_text_encoder_loads_through_comfyui_and_unloads(server):
    prompt = {
        "te": {"class_type": "LoadWanVideoT5TextEncoder", "inputs": {
            "model_name": "umt5_tiny.safetensors", "precision": "fp32", "load_device": "offload_device"}},
        "text": {"class_type": "WanVideoTextEncode", "inputs": {
            "positive_prompt": "a person is talking", "negative_prompt": "static", "t5": ["te", 0]}},
        "probe": {"class_type": "LoadedModelsProbe", "inputs": {"tag": "", "embeds": ["text", 0]}},
    }
    loaded, _ = _loaded(server, prompt)
    assert loaded["UMT5Encoder"]["loaded"] == loaded["UMT5Encoder"]["size"] > 0

    server.free(unload_models=True)
    _probe_only(server)
    assert "UMT5Encoder" not in _probe_only(server)
    prompt["text"]["inputs"]["positive_prompt"] = "a man is speaking"
    loaded, _ = _loaded(server, prompt)
    assert loaded["UMT5Encoder"]["loaded"] > 0


def test_cached_text_encoder_loads_through_comfyui_and_is_freed_after_encoding(server):
    """WanVideoTextEncodeCached on a cache miss: ComfyUI's model management loads the encoder (so it can free room
    first: "Requested to load UMT5Encoder" in the server log) and it is out of the loaded list afterwards."""
    server.free(unload_models=True)
    requested = server.log().count("Requested to load UMT5Encoder")
    prompt = {
        "text": {"class_type": "WanVideoTextEncodeCached", "inputs": {
            "model_name": "umt5_tiny.safetensors", "precision": "fp32", "positive_prompt": "a cached prompt",
            "negative_prompt": "static", "quantization": "disabled", "use_disk_cache": False, "device": "gpu"}},
        "probe": {"class_type": "LoadedModelsProbe", "inputs": {"tag": "", "embeds": ["text", 0]}},
    }
    loaded, _ = _loaded(server, prompt)
    assert "UMT5Encoder" not in loaded
    assert server.log().count("Requested to load UMT5Encoder") == requested + 1


def test_offloaded_embedders_stream_from_host_memory(server, base_prompt):
    """offload_txt_emb / offload_img_emb: the text embedder and the CLIP-image projection stay in host memory and
    stream in for each call (fewer bytes loaded), with the same video."""
    swapped, _ = _loaded(server, _variant(base_prompt, "swapped_seed10", seed=10, swap_blocks=2))
    loaded, streamed = _loaded(server, _variant(base_prompt, "embedders_seed10", seed=10, swap_blocks=2,
                                                offload_embedders=True))
    transformer = loaded["WanVideoModel"]
    assert transformer["streamed_embedders"] == 2 and swapped["WanVideoModel"]["streamed_embedders"] == 0
    assert transformer["loaded"] < swapped["WanVideoModel"]["loaded"]
    _, whole = _loaded(server, _variant(base_prompt, "whole_seed10", seed=10))
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)
