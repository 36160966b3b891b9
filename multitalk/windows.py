"""Window bookkeeping for the InfiniteTalk long-video loop: pure functions, no model work.

Frames are video frames at the audio's frame rate (25 fps by default). A window of ``F = 4k + 1`` frames starts
``F - M`` frames after the previous one, so its first ``M`` ("motion") frames repeat the previous window's tail and
are not emitted again. Unlike the upstream loop, the plan emits exactly ``total_frames`` frames: the last window is
shortened to the smallest valid length that covers what is left (never padded with invented speech).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AUDIO_WINDOW = 5


@dataclass(frozen=True)
class Window:
    """One window of the loop.

    start: first video frame the window covers (its motion frames included).
    num_frames: frames the model generates (4k + 1).
    motion_frames: leading frames conditioned on the previous window (1 for the first window: the start image).
    emit_from: index inside the window of the first frame that is emitted.
    emit_count: how many frames are emitted from ``emit_from`` on.
    """

    index: int
    start: int
    num_frames: int
    motion_frames: int
    emit_from: int
    emit_count: int

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // 4 + 1

    @property
    def motion_latent_frames(self) -> int:
        return (self.motion_frames - 1) // 4 + 1


def round_window_size(frames: int) -> int:
    """Largest 4k + 1 that is <= ``frames`` (at least 1)."""
    return max(1, (frames - 1) // 4 * 4 + 1)


def covering_window_size(frames: int) -> int:
    """Smallest 4k + 1 that is >= ``frames``."""
    return (max(frames, 1) + 2) // 4 * 4 + 1


def plan_windows(total_frames: int, frame_window_size: int, motion_frame: int) -> list[Window]:
    """Windows that together emit exactly ``total_frames`` frames.

    ``frame_window_size`` is rounded down to 4k + 1; ``motion_frame`` must be smaller than it.
    """
    window = round_window_size(frame_window_size)
    if total_frames < 1:
        raise ValueError("the audio gives no video frame: it is shorter than one frame at this fps")
    if not 1 <= motion_frame < window:
        raise ValueError(f"motion_frame ({motion_frame}) must be at least 1 and smaller than frame_window_size "
                         f"({window} after rounding to 4k+1)")
    first = min(window, covering_window_size(total_frames))
    plan = [Window(0, 0, first, 1, 0, min(first, total_frames))]
    emitted = plan[0].emit_count
    while emitted < total_frames:
        start = emitted - motion_frame
        remaining = total_frames - emitted
        size = min(window, covering_window_size(motion_frame + remaining))
        count = min(size - motion_frame, remaining)
        plan.append(Window(len(plan), start, size, motion_frame, motion_frame, count))
        emitted += count
    return plan


def frames_before(plan: list[Window], index: int) -> int:
    """Frames emitted by the windows before window ``index`` of ``plan`` (what a run resumed there has written)."""
    return sum(window.emit_count for window in plan[:index])


def audio_windows(features: torch.Tensor, start: int, num_frames: int) -> torch.Tensor:
    """Per-frame audio neighbourhoods for frames ``start .. start+num_frames-1``.

    features: [T, L, C] wav2vec2 features of one speaker (one row per video frame).
    Returns [num_frames, 5, L, C]: for frame i the rows i-2 .. i+2, clamped to [0, T-1] (frames past the end of the
    audio repeat the last row's neighbourhood).
    """
    if features.dim() != 3:
        raise ValueError(f"audio features must be [frames, layers, channels], got {tuple(features.shape)}")
    half = AUDIO_WINDOW // 2
    centres = torch.arange(start, start + num_frames)[:, None]
    offsets = torch.arange(-half, half + 1)[None, :]
    index = (centres + offsets).clamp(0, features.shape[0] - 1)
    return features[index]


def source_latent_offset(index: int, frame_window_size: int, motion_frame: int) -> int:
    """First source latent frame of window ``index`` in video-to-video (workflow-spec §5.4 step 4):
    ``a = k · ((F - M - 1) // 4 + 1)`` with F the window size rounded to 4k + 1 (0 for the first window)."""
    window = round_window_size(frame_window_size)
    return index * ((window - motion_frame - 1) // 4 + 1)


def source_latent_window(latents: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """Latent frames ``offset .. offset+count-1`` of source latents [C, T, h, w] -> [C, count, h, w]; frames past
    the end repeat the source's last latent frame."""
    if latents.dim() != 4 or latents.shape[1] < 1:
        raise ValueError(f"source latents must be [channels, frames, h, w] with at least one frame, got "
                         f"{tuple(latents.shape)}")
    index = torch.arange(offset, offset + count).clamp(max=latents.shape[1] - 1)
    return latents[:, index]


def noise_mask_window(mask: torch.Tensor, start: int, num_frames: int, latent_shape: tuple[int, int, int]
                      ) -> torch.Tensor:
    """The V2V noise mask of video frames ``start .. start+num_frames-1`` on the window's latent grid.

    mask: [F_mask, H, W] float (frames past its end repeat the last one). latent_shape: (T, h, w).
    Returns [1, T, h, w] float32: the frames trilinearly resized (align_corners False) to the latent grid.
    """
    if mask.dim() != 3 or mask.shape[0] < 1:
        raise ValueError(f"noise_mask must be [frames, height, width], got {tuple(mask.shape)}")
    index = torch.arange(start, start + num_frames).clamp(max=mask.shape[0] - 1)
    frames = mask[index].float()[None, None]
    return torch.nn.functional.interpolate(frames, size=latent_shape, mode="trilinear", align_corners=False)[0]
