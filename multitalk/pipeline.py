"""What the InfiniteTalk nodes hand each other, and the two core calls behind the loader and the sampler.

The socket payloads keep the upstream WanVideoWrapper layouts (dicts with the same keys) so mixed graphs keep working;
this module turns them into the loop's typed inputs. Nothing here imports ComfyUI.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..attention import resolve
from ..fp8_optimization import QuantMode, ops_for
from ..wanvideo.checkpoint import LoadOptions
from ..wanvideo.layers import use_native_rms_norm
from ..wanvideo.lora import LoraSet
from .colormatch import DISABLED, ColorMatch
from .embeds import MultiTalkEmbeds
from .loop import LOOP_VARIANTS, LoopInputs, SourceVideo
from .model import InfiniteTalkModel, load_infinitetalk

BASE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp16_fast": torch.float16}
COLORMATCH_MODES = (DISABLED, "mkl", "hm", "reinhard", "mvgd", "hm-mvgd-hm", "hm-mkl-hm")
LOOP_MODES = ("auto", *LOOP_VARIANTS)


@dataclass(frozen=True)
class ModelRequest:
    """WanVideoModelLoader's choices. ``adapter_path`` is the InfiniteTalk file from MultiTalkModelLoader (None when
    the base file already holds the adapter)."""

    base_path: Path
    adapter_path: Optional[Path]
    base_precision: str = "bf16"
    quantization: str = "disabled"
    attention_mode: str = "sdpa"
    rms_norm_function: str = "default"


@dataclass(frozen=True)
class TransformerHandle:
    """The WANVIDEOMODEL socket: the loaded transformer plus the per-model run options set by other nodes."""

    model: InfiniteTalkModel
    request: ModelRequest
    model_type: str = "InfiniteTalk"
    block_swap_args: Optional[dict] = None
    compile_args: Optional[dict] = None
    loras: Optional[LoraSet] = None

    def with_block_swap(self, args: Optional[dict]) -> "TransformerHandle":
        return dataclasses.replace(self, block_swap_args=args)


def load_transformer(request: ModelRequest, device: torch.device) -> InfiniteTalkModel:
    """Load base + adapter in the requested precision and quantization, for attention on ``device``."""
    if request.base_precision not in BASE_PRECISIONS:
        raise ValueError(f"unknown base_precision {request.base_precision!r}; choose one of "
                         f"{', '.join(BASE_PRECISIONS)}")
    dtype = BASE_PRECISIONS[request.base_precision]
    options = LoadOptions(dtype=dtype, ops=ops_for(QuantMode.parse(request.quantization)),
                          attention=resolve(request.attention_mode, device, dtype))
    if request.rms_norm_function not in ("default", "pytorch"):
        raise ValueError(f"unknown rms_norm_function {request.rms_norm_function!r}; choose default or pytorch")
    model = load_infinitetalk(request.base_path, request.adapter_path, options)
    use_native_rms_norm(model, request.rms_norm_function == "pytorch")
    return model


@dataclass(frozen=True)
class ImageEmbeds:
    """WanVideoImageToVideoMultiTalk's output (upstream WANVIDIMAGE_EMBEDS keys, multitalk variant)."""

    start_images: Optional[torch.Tensor]
    width: int
    height: int
    frame_window_size: int
    motion_frame: int
    clip_context: Optional[torch.Tensor]
    colormatch: str = "disabled"
    mode: str = "auto"
    output_path: str = ""
    force_offload: bool = False
    tiled_vae: bool = False

    def to_dict(self, vae) -> dict:
        lat_t = (self.frame_window_size - 1) // 4 + 1
        return {"multitalk_sampling": True, "multitalk_start_image": self.start_images, "vae": vae,
                "frame_window_size": self.frame_window_size, "motion_frame": self.motion_frame,
                "target_h": self.height, "target_w": self.width, "clip_context": self.clip_context,
                "colormatch": self.colormatch, "multitalk_mode": self.mode, "output_path": self.output_path,
                "force_offload": self.force_offload, "tiled_vae": self.tiled_vae,
                "target_shape": (16, lat_t, self.height // 8, self.width // 8)}


def image_to_video_embeds(width: int, height: int, frame_window_size: int, motion_frame: int,
                          start_image: Optional[torch.Tensor], **options) -> ImageEmbeds:
    """Validate the long-video geometry and lay out the start image(s) as [N, 3, H, W] in [-1, 1].

    start_image: IMAGE [N, H', W', 3] in [0, 1] (resized to width x height with bilinear antialiasing if needed).
    """
    if width % 16 or height % 16:
        raise ValueError(f"width and height must be divisible by 16, got {width}x{height}; e.g. 832x480 or 640x640")
    window = (frame_window_size - 1) // 4 * 4 + 1
    if not 1 <= motion_frame < window:
        raise ValueError(f"motion_frame ({motion_frame}) must be smaller than frame_window_size ({window})")
    if options.get("mode", "auto") not in LOOP_MODES:
        raise ValueError(f"unknown mode {options['mode']!r}; choose one of {', '.join(LOOP_MODES)}")
    if options.get("colormatch", DISABLED) not in COLORMATCH_MODES:
        raise ValueError(f"unknown colormatch {options['colormatch']!r}; choose one of {', '.join(COLORMATCH_MODES)}")
    images = None
    if start_image is not None:
        pixels = start_image[..., :3].permute(0, 3, 1, 2).float()
        if pixels.shape[-2:] != (height, width):
            pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True,
                                                     align_corners=False)
        images = pixels.clamp(0, 1) * 2 - 1
    return ImageEmbeds(start_images=images, width=width, height=height, frame_window_size=window,
                       motion_frame=motion_frame, **options)


def check_loop_mode(mode: str, model_type: str) -> str:
    """The loop variant (``infinitetalk`` / ``multitalk``) for the I2V node's ``mode``: ``auto`` follows the loaded
    adapter's type (``"InfiniteTalk"`` / ``"MultiTalk"``, lower-cased, workflow-spec §5.1)."""
    if mode not in LOOP_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(LOOP_MODES)}")
    resolved = str(model_type).lower() if mode == "auto" else mode
    if resolved not in LOOP_VARIANTS:
        raise ValueError(f"mode auto needs an InfiniteTalk or MultiTalk adapter, the model has {model_type!r}; "
                         "connect the Multi/InfiniteTalk Model Loader or choose mode infinitetalk or multitalk")
    return resolved


def default_speaker_masks(height: int, width: int) -> torch.Tensor:
    """Two-speaker masks [3, H, W] when none are given: left and right boxes, background (workflow-spec §5.6)."""
    masks = torch.zeros(3, height, width)
    top, bottom = int(0.1 * height), int(0.9 * height)
    half = width // 2
    left, right = int(0.1 * half), int(0.9 * half)
    masks[0, top:bottom, left:right] = 1
    masks[1, top:bottom, half + left:half + right] = 1
    masks[2] = 1 - (masks[0] + masks[1]).clamp(0, 1)
    return masks


def _resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    masks = masks.float()
    if masks.shape[-2:] != (height, width):
        masks = torch.nn.functional.interpolate(masks[None], size=(height, width), mode="nearest")[0]
    if masks.shape[0] == 2:
        masks = torch.cat([masks, (1 - masks.sum(0, keepdim=True)).clamp(0, 1)])
    return masks


def source_video(samples: Mapping) -> SourceVideo:
    """WanVideoEncode's LATENT dict ``{"samples": [1, 16, T, H/8, W/8], "noise_mask": MASK or None}`` -> the loop's
    V2V source (latents [16, T, h, w] float32; mask [F, H', W'] float32, a 2-D mask counts as one frame). The loop
    checks that the latent grid fits the video size."""
    latents = samples.get("samples") if isinstance(samples, Mapping) else None
    if latents is None or latents.dim() != 5 or latents.shape[0] != 1:
        shape = None if latents is None else tuple(latents.shape)
        raise ValueError(f"samples must be a LATENT from WanVideo Encode holding [1, 16, T, h, w] latents, got {shape}")
    mask = samples.get("noise_mask")
    if mask is not None:
        mask = mask.float()
        if mask.dim() == 2:
            mask = mask[None]
        if mask.dim() != 3:
            raise ValueError(f"noise_mask must be a MASK [frames, height, width], got {tuple(mask.shape)}")
    return SourceVideo(latents=latents[0].float(), noise_mask=mask)


def loop_inputs(image_embeds: Mapping, text_embeds: Mapping, multitalk_embeds: Mapping,
                num_frames_cap: Optional[int] = None, samples: Optional[Mapping] = None,
                model_type: str = "InfiniteTalk") -> LoopInputs:
    """Sampler sockets -> :class:`LoopInputs`. The audio decides the length (capped by ``num_frames_cap``).

    ``samples``: the sampler's optional LATENT input (video-to-video source, see :func:`source_video`).
    ``model_type``: the loaded adapter's type (``TransformerHandle.model_type``), which ``multitalk_mode`` ``auto``
    follows (see :func:`check_loop_mode`).
    """
    embeds = MultiTalkEmbeds.from_dict(multitalk_embeds)
    start = image_embeds.get("multitalk_start_image")
    if start is None:
        raise ValueError("the InfiniteTalk loop needs a start image: connect one to WanVideo Long I2V "
                         "Multi/InfiniteTalk")
    height, width = image_embeds["target_h"], image_embeds["target_w"]
    masks = embeds.ref_target_masks
    if masks is None and embeds.num_speakers == 2:
        masks = default_speaker_masks(height, width)
    if masks is not None:
        masks = _resize_masks(masks, height, width)
    prompts = text_embeds.get("prompt_embeds")
    negative = text_embeds.get("negative_prompt_embeds")
    if not prompts or not negative:
        raise ValueError("text_embeds must hold prompt_embeds and negative_prompt_embeds; connect a WanVideo "
                         "TextEncode node")
    total = embeds.num_frames if not num_frames_cap else min(embeds.num_frames, num_frames_cap)
    return LoopInputs(start_images=start, audio_features=[f.float() for f in embeds.audio_features],
                      prompts=[p.float() for p in prompts], negative=negative[0].float(), total_frames=total,
                      frame_window_size=image_embeds["frame_window_size"], motion_frame=image_embeds["motion_frame"],
                      clip_context=image_embeds.get("clip_context"), ref_target_masks=masks,
                      audio_scale=embeds.audio_scale,
                      colormatch=ColorMatch(method=image_embeds.get("colormatch", DISABLED)),
                      source=None if samples is None else source_video(samples),
                      variant=check_loop_mode(image_embeds.get("multitalk_mode", "auto"), model_type))


def scale_list(value, steps: int) -> float | list[float]:
    """A cfg widget value: float, or a per-step list (padded with its last entry to ``steps``)."""
    if isinstance(value, (int, float)):
        return float(value)
    values = [float(v) for v in value]
    if not values:
        raise ValueError("an empty cfg list was given; give one value per step or a single number")
    return values + [values[-1]] * max(0, steps - len(values))

