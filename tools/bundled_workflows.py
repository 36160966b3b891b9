"""The bundled UI workflows (``workflows/*.json``), generated from one definition per graph.

``python tools/bundled_workflows.py`` starts a ComfyUI host with this pack (for ``/object_info``) and rewrites the files.
Each workflow exists for the real models and as a ``*_tiny_demo`` twin that points at the tiny random-weight models of
``tools/make_tiny_models.py`` (same graph, small sizes, few steps) so it runs on a CPU in about a minute.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workflow_graph import Graph  # noqa: E402

WORKFLOWS_DIR = Path(__file__).resolve().parents[1] / "workflows"
NEGATIVE = ("bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
            "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
            "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
            "picture, messy background, three legs, many people in the background, walking backwards")


@dataclass(frozen=True)
class Profile:
    """Model files and sizes of one flavour of a workflow."""

    suffix: str
    transformer: str
    adapter: str
    adapter_multi: str
    vae: str
    text_encoder: str
    clip_vision: str
    wav2vec: str
    precision: str
    width: int
    height: int
    window: int
    motion: int
    steps: int
    max_frames: int
    note: str


REAL = Profile(
    suffix="", transformer="wan2.1-i2v-14b-480p_fp8_e4m3fn.safetensors",
    adapter="Wan2_1-InfiniteTalk_Single_fp16.safetensors",
    adapter_multi="Wan2_1-InfiniteTalk_Multi_fp16.safetensors", vae="Wan2_1_VAE_bf16.safetensors",
    text_encoder="umt5-xxl-enc-bf16.safetensors", clip_vision="clip_vision_h.safetensors",
    wav2vec="wav2vec2-chinese-base_fp16.safetensors", precision="bf16", width=832, height=480, window=81, motion=9,
    steps=40, max_frames=1000,
    note=("## InfiniteTalk image-to-video\n\nModel files (folder under `ComfyUI/models/`):\n\n"
          "| file | folder |\n|---|---|\n"
          "| Wan2.1 I2V 14B 480p (bf16, fp16 or fp8 safetensors) | `diffusion_models/` |\n"
          "| InfiniteTalk single-speaker adapter | `diffusion_models/` |\n"
          "| `Wan2_1_VAE_bf16.safetensors` | `vae/` |\n| `umt5-xxl-enc-bf16.safetensors` | `text_encoders/` |\n"
          "| `clip_vision_h.safetensors` | `clip_vision/` |\n"
          "| `wav2vec2-chinese-base_fp16.safetensors` | `wav2vec2/` |\n\n"
          "The video is as long as the audio (at most *num_frames*). Windows of 81 frames overlap by 9."))

TINY = Profile(
    suffix="_tiny_demo", transformer="infinitetalk_tiny/wan2.1_i2v_tiny.safetensors",
    adapter="infinitetalk_tiny/infinitetalk_single_tiny.safetensors",
    adapter_multi="infinitetalk_tiny/infinitetalk_single_tiny.safetensors", vae="wan2.1_vae_tiny.safetensors",
    text_encoder="umt5_tiny.safetensors", clip_vision="clip_vision_tiny.safetensors",
    wav2vec="wav2vec2_tiny.safetensors", precision="fp32", width=160, height=160, window=33, motion=9, steps=3,
    max_frames=57,
    note=("## Tiny demo\n\nThe same graph as `infinitetalk_i2v.json`, on tiny **random-weight** models written by "
          "`tools/make_tiny_models.py`: it proves the pipeline runs end to end on a CPU, and its frames look like "
          "noise. For real videos open `infinitetalk_i2v.json` and put the real model files in place."))


def _models(g: Graph, p: Profile, adapter_file: str, prompt: str, low_vram: bool = False):
    """Transformer (+ adapter), VAE and cached text encoder; returns (model, vae, text) nodes. ``low_vram``: FP4
    weights, SageAttention and all blocks streamed from host RAM."""
    adapter = g.add("MultiTalkModelLoader", (0, 0), model=adapter_file)
    model = g.add("WanVideoModelLoader", (0, 110), model=p.transformer, base_precision=p.precision,
                  quantization="fp4_scaled" if low_vram else "disabled", load_device="offload_device",
                  attention_mode="sageattn" if low_vram else "sdpa")
    g.link(adapter, 0, model, "multitalk_model")
    if low_vram:
        swap = g.add("WanVideoEnhancedBlockSwap", (-460, 520), blocks_to_swap=40, auto_hardware_tuning=False,
                     num_cuda_streams=2, bandwidth_target=0.5)
        g.link(swap, 0, model, "block_swap_args")
    vae = g.add("WanVideoVAELoader", (0, 500), model_name=p.vae, precision=p.precision)
    text = g.add("WanVideoTextEncodeCached", (0, 660), model_name=p.text_encoder, precision=p.precision,
                 positive_prompt=prompt,
                 negative_prompt=NEGATIVE, use_disk_cache=False, device="gpu")
    return model, vae, text


def _image_conditioning(g: Graph, p: Profile, image_file: str, vae, width: int, height: int):
    """Start image, its CLIP tokens and the long-video setup; returns (image, i2v) nodes."""
    image = g.add("LoadImage", (420, 0), image=image_file)
    clip = g.add("LoadWanVideoClipTextEncoder", (420, 420), model_name=p.clip_vision, precision=p.precision)
    clip_embeds = g.add("WanVideoClipVisionEncode", (420, 570), crop="center", combine_embeds="average")
    g.link(clip, 0, clip_embeds, "clip_vision")
    g.link(image, 0, clip_embeds, "image_1")
    i2v = g.add("WanVideoImageToVideoMultiTalk", (1260, 0), width=width, height=height,
                frame_window_size=p.window, motion_frame=p.motion, mode="infinitetalk")
    g.link(vae, 0, i2v, "vae")
    g.link(image, 0, i2v, "start_image")
    g.link(clip_embeds, 0, i2v, "clip_embeds")
    return image, i2v


def _sample_and_save(g: Graph, p: Profile, model, i2v, text, embeds, prefix: str, source=None) -> None:
    """Sampler -> frames -> mp4 with the processed speech as soundtrack. ``source``: V2V latents (WanVideo Encode),
    re-noised to 60 % of the schedule."""
    v2v = {"denoise_strength": 0.6, "add_noise_to_samples": True} if source is not None else {}
    sampler = g.add("WanVideoSampler", (1260, 400), steps=p.steps, cfg=1.0, shift=7.0, seed=42,
                    scheduler="multitalk", **v2v)
    if source is not None:
        g.link(source, 0, sampler, "samples")
    for source, name in ((model, "model"), (i2v, "image_embeds"), (text, "text_embeds"),
                         (embeds, "multitalk_embeds")):
        g.link(source, 0, sampler, name)
    frames = g.add("WanVideoPassImagesFromSamples", (1680, 0))
    g.link(sampler, 0, frames, "samples")
    video = g.add("CreateVideo", (1680, 140), fps=25.0)
    g.link(frames, 0, video, "images")
    g.link(embeds, 1, video, "audio")
    save = g.add("SaveVideo", (1680, 300), filename_prefix=prefix)
    g.link(video, 0, save, "video")


def infinitetalk_i2v(p: Profile, low_vram: bool = False) -> Graph:
    """Single-speaker image-to-video: portrait + speech -> talking video with the speech as its soundtrack."""
    g = Graph()
    g.note(p.note + (LOW_VRAM_NOTE if low_vram else ""), (-460, 0))
    model, vae, text = _models(g, p, p.adapter, "a person is talking to the camera, natural head motion", low_vram)
    _, i2v = _image_conditioning(g, p, "sample_portrait.png", vae, p.width, p.height)
    audio = g.add("LoadAudio", (840, 0), audio="sample_speech.mp3")
    wav2vec = g.add("Wav2VecModelLoader", (840, 200), model=p.wav2vec, base_precision=p.precision)
    embeds = g.add("MultiTalkWav2VecEmbeds", (840, 360), num_frames=p.max_frames, fps=25.0)
    g.link(wav2vec, 0, embeds, "wav2vec_model")
    g.link(audio, 0, embeds, "audio_1")
    _sample_and_save(g, p, model, i2v, text, embeds, "InfiniteTalk/infinitetalk")
    return g


def infinitetalk_two_speakers(p: Profile) -> Graph:
    """Two speakers taking turns (multi_audio_type add): speaker 1 on the left half, speaker 2 on the right."""
    g = Graph()
    g.note(p.note + TWO_SPEAKER_NOTE, (-460, 0))
    model, vae, text = _models(g, p, p.adapter_multi, "two people talking to each other, natural head motion")
    wide = p.width * 9 // 16 // 16 * 16
    _, i2v = _image_conditioning(g, p, "sample_two_people.png", vae, p.width, wide)
    first = g.add("LoadAudio", (840, 0), audio="sample_speech.mp3")
    second = g.add("LoadAudio", (840, 180), audio="sample_speech_2.mp3")
    wav2vec = g.add("Wav2VecModelLoader", (840, 370), model=p.wav2vec, base_precision=p.precision)
    embeds = g.add("MultiTalkWav2VecEmbeds", (840, 520), num_frames=p.max_frames, fps=25.0, multi_audio_type="add")
    g.link(wav2vec, 0, embeds, "wav2vec_model")
    g.link(first, 0, embeds, "audio_1")
    g.link(second, 0, embeds, "audio_2")
    _sample_and_save(g, p, model, i2v, text, embeds, "InfiniteTalk/two_speakers")
    return g


def infinitetalk_v2v_dubbing(p: Profile) -> Graph:
    """Video-to-video dubbing: a talking video is re-rendered so its lips follow new speech; the frames are
    re-noised to 60 % and denoised with the new audio, each window conditioned on the video's own frames."""
    g = Graph()
    g.note(p.note + V2V_NOTE, (-460, 0))
    model, vae, text = _models(g, p, p.adapter, "a person is talking to the camera, natural head motion")
    video = g.add("LoadVideo", (420, -260), file="sample_talking.mp4")
    parts = g.add("GetVideoComponents", (420, -120))
    g.link(video, 0, parts, "video")
    frames = g.add("ImageScale", (420, 0), upscale_method="bilinear", width=p.width, height=p.height, crop="center")
    g.link(parts, 0, frames, "image")
    encode = g.add("WanVideoEncode", (420, 180))
    g.link(vae, 0, encode, "vae")
    g.link(frames, 0, encode, "image")
    i2v = g.add("WanVideoImageToVideoMultiTalk", (1260, 0), width=p.width, height=p.height,
                frame_window_size=p.window, motion_frame=p.motion, mode="infinitetalk")
    g.link(vae, 0, i2v, "vae")
    g.link(frames, 0, i2v, "start_image")
    speech = g.add("LoadAudio", (840, 0), audio="sample_speech_2.mp3")
    wav2vec = g.add("Wav2VecModelLoader", (840, 200), model=p.wav2vec, base_precision=p.precision)
    embeds = g.add("MultiTalkWav2VecEmbeds", (840, 360), num_frames=min(p.max_frames, 80), fps=25.0)
    g.link(wav2vec, 0, embeds, "wav2vec_model")
    g.link(speech, 0, embeds, "audio_1")
    _sample_and_save(g, p, model, i2v, text, embeds, "InfiniteTalk/dubbing", source=encode)
    return g


V2V_NOTE = ("\n\n### Video-to-video dubbing\n\n`Load Video` gives the frames to re-render; `WanVideo Encode` turns "
            "them into the sampler's `samples`; `denoise_strength` 0.6 keeps the picture and lets the mouth follow "
            "the new speech (lower keeps more of the source). The output is as long as the new speech, capped by "
            "`num_frames`: keep it at most the source video's frame count.")


def infinitetalk_i2v_low_vram(p: Profile) -> Graph:
    """The single-speaker graph for 12-16 GB cards: FP4 weights, SageAttention, 40 blocks streamed."""
    return infinitetalk_i2v(p, low_vram=True)


LOW_VRAM_NOTE = ("\n\n### Low VRAM\n\nWeights are quantized to NVFP4 at load (`fp4_scaled`, about 4.5 bits per "
                 "weight), every transformer block is streamed from pinned host RAM (`WanVideo Enhanced BlockSwap`, "
                 "40 blocks), attention uses SageAttention when it is installed (else the fastest available kernel, "
                 "said once in the log). Needs about 12 GB of free host RAM for the 14B model.")

TWO_SPEAKER_NOTE = ("\n\n### Two speakers\n\nUse the InfiniteTalk **multi** adapter. Without a `ref_target_masks` "
                    "input the left and right halves of the picture are the two speakers. `add` plays the speeches "
                    "one after the other; `para` plays them at the same time.")


GRAPHS = {"infinitetalk_i2v": infinitetalk_i2v, "infinitetalk_two_speakers": infinitetalk_two_speakers,
          "infinitetalk_i2v_low_vram": infinitetalk_i2v_low_vram, "infinitetalk_v2v_dubbing": infinitetalk_v2v_dubbing}
PROFILES = (REAL, TINY)


def write_all(object_info: dict, folder: Path = WORKFLOWS_DIR) -> list[Path]:
    """Write every bundled workflow for every profile; returns the paths."""
    written = []
    for name, build in GRAPHS.items():
        for profile in PROFILES:
            path = folder / f"{name}{profile.suffix}.json"
            path.write_text(json.dumps(build(profile).to_ui(object_info), indent=1) + "\n")
            written.append(path)
    return written


def main() -> None:
    from comfyhost import ComfyServer

    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(workdir=Path(tmp)).start()
        try:
            for path in write_all(server.object_info()):
                print(path)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
