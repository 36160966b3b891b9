"""Where the long-video loop puts finished frames: kept in RAM, or streamed to PNG files as they are made.

Every sink takes frames as float32 [F, H, W, 3] in [0, 1] on the CPU, window by window, in order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch
from PIL import Image


class FrameSink(Protocol):
    def write(self, frames: torch.Tensor) -> None:
        """Append frames [F, H, W, 3] float32 in [0, 1]."""

    def result(self) -> Optional[torch.Tensor]:
        """All frames [N, H, W, 3] (None for sinks that do not keep them)."""


class MemorySink:
    """Keeps the frames; peak RAM is the finished video plus one window."""

    def __init__(self) -> None:
        self._chunks: list[torch.Tensor] = []

    def write(self, frames: torch.Tensor) -> None:
        self._chunks.append(frames)

    def result(self) -> Optional[torch.Tensor]:
        return torch.cat(self._chunks) if self._chunks else None

    @property
    def frame_count(self) -> int:
        return sum(chunk.shape[0] for chunk in self._chunks)


class PngSink:
    """Writes ``frame_00000.png``, ``frame_00001.png``, … into ``folder``; keeps nothing in RAM."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.frame_count = 0

    def write(self, frames: torch.Tensor) -> None:
        pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for frame in pixels:
            Image.fromarray(np.ascontiguousarray(frame)).save(self.folder / f"frame_{self.frame_count:05d}.png")
            self.frame_count += 1

    def result(self) -> Optional[torch.Tensor]:
        return None
