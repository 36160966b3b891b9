"""ComfyUI's own encoders feeding this pack, and the wav2vec2 download, in a real ComfyUI server.

* Text: ComfyUI's umT5 (``comfy.text_encoders.wan``: its tokenizer reading the file's ``spiece_model``, its T5) ->
  core CLIPTextEncode -> CONDITIONING -> WanVideoTextEmbedBridge -> WanVideoSampler. The bridged embeddings equal the
  pack's headless umT5 (wanvideo/text_encoder.py) on the same weights and prompt.
* CLIP vision: ComfyUI's ``ClipVisionModel`` -> WanVideoClipVisionEncode -> WanVideoImageToVideoMultiTalk -> sampler;
  the CLIP tokens equal the headless core tower (wanvideo/clip_vision.py) on the same weights and image.
* The whole ComfyUI-encoder graph renders the same frames as the same graph on the pack's own encoder nodes.
* DownloadAndLoadWav2VecModel downloads only the needed files from a stand-in hub (tests/comfy/hubstub.py, reached
  through HF_ENDPOINT) into models/transformers/<repo> and the workflow runs; with the hub unreachable it fails
  naming that folder and the manual steps.

ComfyUI's CLIPLoader / CLIPVisionLoader only accept full-size umT5-XXL / ViT-L+ files (architecture chosen from the
layer count, umT5 config fixed to XXL), so the tiny files come in through the two test loaders of
tests/comfy/encoder_test_nodes, which build the same ComfyUI objects with the tiny sizes.
"""
import json
import shutil
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from safetensors.torch import load_file

import make_tiny_models as tiny
from comfyhost import ComfyServer
from hubstub import HubRepo, HubStub
from infinitetalk.multitalk import wav2vec as W
from infinitetalk.wanvideo.clip_vision import CLIPLoadOptions, load_clip_vision
from infinitetalk.wanvideo.text_encoder import T5LoadOptions, load_text_encoder

pytestmark = pytest.mark.comfy

TEST_NODES = Path(__file__).resolve().parent / "encoder_test_nodes"
REPO = "TencentGameMate/chinese-wav2vec2-base"
CTC_REPO = "facebook/wav2vec2-base-960h"
NEEDED = {"config.json", "preprocessor_config.json", "model.safetensors"}
PROMPT = "a woman is talking to the camera"
NEGATIVE = "static, blurred details, worst quality"
PREPROCESSOR = {"do_normalize": False, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
                "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
                "sampling_rate": 16000}
FRAMES = 5


def _saved_pretrained(raw: dict, folder: Path) -> dict[str, bytes]:
    """A Wav2Vec2Model built from ``raw`` and written by transformers' save_pretrained: file name -> bytes."""
    W.encoder_from_state_dict(raw, "fp16").model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _ctc_files(folder: Path) -> dict[str, bytes]:
    """Stand-in for facebook/wav2vec2-base-960h: a small wav2vec2 CTC fine-tune (``wav2vec2.`` + ``lm_head`` keys)
    whose weights come as pytorch_model.bin only, with config.json and preprocessor_config.json."""
    from transformers import Wav2Vec2ForCTC

    cfg = tiny.wav2vec_config(tiny.TinySizes())
    cfg.num_hidden_layers, cfg.vocab_size, cfg.architectures = 2, 32, ["Wav2Vec2ForCTC"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Wav2Vec2ForCTC(cfg).state_dict().items()}
    state = tiny.random_state(shapes, 77, torch.float16)
    torch.save(state, folder / "pytorch_model.bin")
    cfg.to_json_file(folder / "config.json")
    (folder / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "do_normalize": True}))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The server's folder, with the tiny models (both layouts) already in its models folder."""
    work = tmp_path_factory.mktemp("encoders_comfy")
    tiny.make_tiny_models(work / "models")
    tiny.make_comfy_layout_models(work / "models")
    return work


@pytest.fixture(scope="module")
def hub(workdir, tmp_path_factory):
    """The stand-in hub: REPO = the tiny wav2vec2 (same weights as models/wav2vec2's file) as save_pretrained writes
    it, plus files a loader must not fetch; CTC_REPO = a pytorch_model.bin-only CTC fine-tune."""
    work = tmp_path_factory.mktemp("hub")
    (work / "repo").mkdir()
    files = _saved_pretrained(load_file(str(workdir / "models" / tiny.WAV2VEC2)), work / "repo")
    assert "model.safetensors" in files and "config.json" in files
    files.update({"pytorch_model.bin": b"\0" * 4096, "chinese-wav2vec2-base-fairseq-ckpt.pt": b"\1" * 8192,
                  "README.md": b"# chinese-wav2vec2-base\n", ".gitattributes": b"*.bin filter=lfs\n"})
    (work / "ctc").mkdir()
    stub = HubStub({REPO: HubRepo(files), CTC_REPO: HubRepo(_ctc_files(work / "ctc"))}).start()
    yield stub
    stub.stop()


def _write_inputs(folder: Path) -> None:
    """A 224 x 224 PNG (CLIP's own size, so ComfyUI's resize step is skipped) and FRAMES frames of 16 kHz audio."""
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / "face224.png")
    t = np.arange(int(np.ceil(FRAMES * 16000 / 25)) + 1) / 16000
    soundfile.write(folder / "speech.wav", 0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)), 16000)


@pytest.fixture(scope="module")
def server(workdir, hub):
    """ComfyUI with this pack and the test nodes, reaching the stand-in hub through HF_ENDPOINT (its own HF_HOME)."""
    (workdir / "custom_nodes").mkdir()
    (workdir / "custom_nodes" / "infinitetalk_encoder_test_nodes").symlink_to(TEST_NODES, target_is_directory=True)
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(workdir / "hf_home"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    comfy = ComfyServer(workdir=workdir, env=env)
    comfy.start()
    try:
        assert "InfiniteTalkTestTinyWanCLIPLoader" in comfy.object_info(), comfy.log()[-4000:]
        _write_inputs(comfy.input_dir)
        yield comfy
    finally:
        comfy.stop()


def _prompt(text: str, clip: str, wav2vec: tuple[str, dict], prefix: str) -> dict:
    """API prompt: tiny InfiniteTalk image-to-video with the chosen text encoder ("comfy" / "pack"), CLIP vision
    ("comfy" / "pack") and wav2vec2 loader node (class and inputs). Saves the text / CLIP embeddings and the frames
    to ``<prefix>.safetensors`` and the video as ``<prefix>_NNNNN_.mp4``."""
    nodes = {
        "adapter": ("MultiTalkModelLoader", {"model": tiny.ADAPTER.split("/", 1)[1]}),
        "model": ("WanVideoModelLoader", {"model": tiny.TRANSFORMER.split("/", 1)[1], "base_precision": "fp32",
                                          "quantization": "disabled", "load_device": "main_device",
                                          "multitalk_model": ["adapter", 0]}),
        "vae": ("WanVideoVAELoader", {"model_name": Path(tiny.VAE).name, "precision": "fp32"}),
        "image": ("LoadImage", {"image": "face224.png"}),
        "audio": ("LoadAudio", {"audio": "speech.wav"}),
        "wav2vec": wav2vec,
        "embeds": ("MultiTalkWav2VecEmbeds", {"wav2vec_model": ["wav2vec", 0], "audio_1": ["audio", 0],
                                              "normalize_loudness": True, "num_frames": FRAMES, "fps": 25.0,
                                              "audio_scale": 1.0, "audio_cfg_scale": 1.0,
                                              "multi_audio_type": "para"}),
        "clip_embeds": ("WanVideoClipVisionEncode", {"clip_vision": ["clip", 0], "image_1": ["image", 0],
                                                     "strength_1": 1.0, "strength_2": 1.0, "crop": "center",
                                                     "combine_embeds": "average", "force_offload": True}),
        "i2v": ("WanVideoImageToVideoMultiTalk", {"vae": ["vae", 0], "width": 64, "height": 64,
                                                  "frame_window_size": FRAMES, "motion_frame": 1,
                                                  "force_offload": False, "colormatch": "disabled",
                                                  "start_image": ["image", 0], "clip_embeds": ["clip_embeds", 0],
                                                  "mode": "infinitetalk"}),
        "sampler": ("WanVideoSampler", {"model": ["model", 0], "image_embeds": ["i2v", 0], "steps": 1,
                                        "cfg": 2.0, "shift": 5.0, "seed": 7, "force_offload": False,
                                        "scheduler": "unipc", "riflex_freq_index": 0,
                                        "text_embeds": ["text", 0], "multitalk_embeds": ["embeds", 0]}),
        "frames": ("WanVideoPassImagesFromSamples", {"samples": ["sampler", 0]}),
        "video": ("CreateVideo", {"images": ["frames", 0], "fps": 25.0, "audio": ["embeds", 1]}),
        "save_video": ("SaveVideo", {"video": ["video", 0], "filename_prefix": prefix, "format": "auto",
                                     "codec": "auto"}),
        "save": ("InfiniteTalkTestSaveTensors", {"filename_prefix": prefix, "text_embeds": ["text", 0],
                                                 "clip_embeds": ["clip_embeds", 0], "images": ["frames", 0]}),
    }
    if text == "comfy":
        nodes["te"] = ("InfiniteTalkTestTinyWanCLIPLoader", {"clip_name": Path(tiny.COMFY_TEXT_ENCODER).name})
        nodes["pos"] = ("CLIPTextEncode", {"text": PROMPT, "clip": ["te", 0]})
        nodes["neg"] = ("CLIPTextEncode", {"text": NEGATIVE, "clip": ["te", 0]})
        nodes["text"] = ("WanVideoTextEmbedBridge", {"positive": ["pos", 0], "negative": ["neg", 0]})
    else:
        nodes["te"] = ("LoadWanVideoT5TextEncoder", {"model_name": Path(tiny.TEXT_ENCODER).name,
                                                     "precision": "fp32", "load_device": "main_device"})
        nodes["text"] = ("WanVideoTextEncode", {"positive_prompt": PROMPT, "negative_prompt": NEGATIVE,
                                                "t5": ["te", 0], "force_offload": False})
    if clip == "comfy":
        nodes["clip"] = ("InfiniteTalkTestTinyCLIPVisionLoader", {"clip_name": Path(tiny.COMFY_CLIP_VISION).name})
    else:
        nodes["clip"] = ("LoadWanVideoClipTextEncoder", {"model_name": Path(tiny.CLIP_VISION).name,
                                                        "precision": "fp32", "load_device": "main_device"})
    return {key: {"class_type": kind, "inputs": inputs} for key, (kind, inputs) in nodes.items()}


def _file_wav2vec(precision: str = "fp32") -> tuple:
    return ("Wav2VecModelLoader", {"model": Path(tiny.WAV2VEC2).name, "base_precision": precision,
                                   "load_device": "main_device"})


def _download_wav2vec(precision: str) -> tuple:
    return ("DownloadAndLoadWav2VecModel", {"model": REPO, "base_precision": precision, "load_device": "main_device"})


def _run(server: ComfyServer, prompt: dict, prefix: str, video: bool = True) -> dict[str, torch.Tensor]:
    """Run ``prompt``; check it succeeded and (``video``) saved one mp4 of FRAMES frames; return the saved tensors."""
    entry = server.run_prompt(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    if not video:
        return load_file(str(server.output_dir / f"{prefix}.safetensors"))
    videos = list(server.output_dir.glob(f"{prefix}_[0-9]*.mp4"))
    assert len(videos) == 1, videos
    with av.open(str(videos[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == FRAMES
    return load_file(str(server.output_dir / f"{prefix}.safetensors"))


@pytest.fixture(scope="module")
def pack_run(server):
    """The reference graph: the pack's own text encoder, CLIP loader and single-file wav2vec2 loader."""
    return _run(server, _prompt("pack", "pack", _file_wav2vec(), "pack_encoders"), "pack_encoders")


def test_comfy_encoders_bridge_into_the_sampler_and_equal_the_pack_encoders(server, pack_run):
    comfy = _run(server, _prompt("comfy", "comfy", _file_wav2vec(), "comfy_encoders"), "comfy_encoders")
    models = server.models_dir
    t5 = load_text_encoder(models / tiny.TEXT_ENCODER, T5LoadOptions(precision="fp32"))
    want_prompt, want_negative = t5([PROMPT, NEGATIVE])
    for saved in (comfy, pack_run):
        assert saved["prompt_embeds.0"].shape == want_prompt.shape
        assert saved["negative_prompt_embeds.0"].shape == want_negative.shape
        torch.testing.assert_close(saved["prompt_embeds.0"], want_prompt, rtol=0, atol=2e-5)
        torch.testing.assert_close(saved["negative_prompt_embeds.0"], want_negative, rtol=0, atol=2e-5)
    tower = load_clip_vision(models / tiny.CLIP_VISION, CLIPLoadOptions(precision="fp32"))
    image = torch.from_numpy(np.asarray(Image.open(server.input_dir / "face224.png"), dtype=np.float32) / 255.0)
    want_clip = tower.encode(image.permute(2, 0, 1)[None] * 2 - 1)
    for saved in (comfy, pack_run):
        torch.testing.assert_close(saved["clip_embeds"], want_clip, rtol=0, atol=2e-5)
    assert comfy["images"].shape == (FRAMES, 64, 64, 3)
    assert comfy["images"].std() > 1e-3
    torch.testing.assert_close(comfy["images"], pack_run["images"], rtol=0, atol=1e-4)


def test_download_fetches_only_the_needed_files_and_the_workflow_runs(server, hub, pack_run):
    folder = server.models_dir / "transformers" / REPO
    shutil.rmtree(folder, ignore_errors=True)
    before = len(hub.requests)
    prompt = _prompt("pack", "pack", _download_wav2vec("fp32"), "downloaded")
    saved = _run(server, prompt, "downloaded")
    saved_prompt = {key: (node["class_type"], node["inputs"]) for key, node in prompt.items()}
    assert {p.name for p in folder.iterdir() if p.is_file()} == NEEDED
    assert hub.fetched(REPO) == NEEDED
    assert any(path.startswith(f"/api/models/{REPO}/") for _, path in hub.requests[before:])
    for name in NEEDED:
        assert (folder / name).read_bytes() == hub.repos[REPO].files[name]
    torch.testing.assert_close(saved["images"], pack_run["images"], rtol=0, atol=1e-5)
    requests_after = len(hub.requests)
    again = {"wav2vec": _download_wav2vec("bf16"), "audio": saved_prompt["audio"], "embeds": saved_prompt["embeds"],
             "show": ("PreviewAny", {"source": ["embeds", 2]})}
    entry = server.run_prompt({k: {"class_type": c, "inputs": i} for k, (c, i) in again.items()}, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(hub.requests) == requests_after, "a downloaded repository must be used without asking the hub"


def test_download_with_the_hub_unreachable_names_the_folder(server, hub):
    folder = server.models_dir / "transformers" / REPO
    shutil.rmtree(folder, ignore_errors=True)
    with hub.unreachable():
        start = time.monotonic()
        entry = server.run_prompt(_prompt("pack", "pack", _download_wav2vec("fp16"), "offline"), timeout=300)
        seconds = time.monotonic() - start
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "DownloadAndLoadWav2VecModel"
    message = error["exception_message"]
    assert str(folder) in message and "hf download" in message and "Wav2vec2 Model Loader" in message, message
    assert not folder.exists() or not W.has_weights(folder)
    assert seconds < 60


def test_download_falls_back_to_pytorch_model_bin(server, hub):
    """A repository without model.safetensors (older hub repositories ship pytorch_model.bin only) gives its
    pytorch_model.bin. This one is a CTC fine-tune, so the embeds node then refuses it by name."""
    folder = server.models_dir / "transformers" / CTC_REPO
    shutil.rmtree(folder, ignore_errors=True)
    prompt = _prompt("pack", "pack", _download_wav2vec("fp32"), "ctc")
    prompt["wav2vec"]["inputs"]["model"] = CTC_REPO
    entry = server.run_prompt(prompt, timeout=300)
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "MultiTalkWav2VecEmbeds" and "CTC" in error["exception_message"], error
    bin_only = {"config.json", "preprocessor_config.json", "pytorch_model.bin"}
    assert {p.name for p in folder.iterdir() if p.is_file()} == bin_only
    assert hub.fetched(CTC_REPO) == bin_only


def _bridge_only(prompt: dict, prefix: str) -> dict:
    """The text part of a "comfy" prompt alone: loader, CLIPTextEncode nodes, bridge, tensor saver."""
    keep = {"te", "pos", "neg", "text"}
    out = {key: node for key, node in prompt.items() if key in keep}
    out["save"] = {"class_type": "InfiniteTalkTestSaveTensors",
                   "inputs": {"filename_prefix": prefix, "text_embeds": ["text", 0]}}
    return out


def test_bridge_without_negative_or_with_a_zeroed_one(server):
    no_negative = _bridge_only(_prompt("comfy", "pack", _file_wav2vec(), ""), "bridge_no_negative")
    del no_negative["neg"], no_negative["text"]["inputs"]["negative"]
    zeroed = _bridge_only(_prompt("comfy", "pack", _file_wav2vec(), ""), "bridge_zero_negative")
    zeroed["zero"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["neg", 0]}}
    zeroed["text"]["inputs"]["negative"] = ["zero", 0]
    for prompt, prefix in ((no_negative, "bridge_no_negative"), (zeroed, "bridge_zero_negative")):
        saved = _run(server, prompt, prefix, video=False)
        assert saved["negative_prompt_embeds.0"].shape == (1, saved["prompt_embeds.0"].shape[1]), prefix
        assert not saved["negative_prompt_embeds.0"].any(), prefix
        assert saved["prompt_embeds.0"].shape[0] > 1 and saved["prompt_embeds.0"][-1].any(), prefix
