"""Where the long-video loop puts finished frames: kept in RAM, or streamed to PNG files as they are made.

Every sink takes frames as float32 [F, H, W, 3] in [0, 1] on the CPU, window by window, in order. A sink that also
implements :class:`ResumableSink` (``PngSink``) keeps the loop's state beside the frames after every window, so an
interrupted run can continue where it stopped (see :mod:`.resume`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from . import resume
from .resume import Checkpoint

log = logging.getLogger(__name__)

FRAME_NAME = "frame_{:05d}.png"


class FrameSink(Protocol):
    def write(self, frames: torch.Tensor) -> None:
        """Append frames [F, H, W, 3] float32 in [0, 1]."""

    def result(self) -> Optional[torch.Tensor]:
        """All frames [N, H, W, 3] (None for sinks that do not keep them)."""


@runtime_checkable
class ResumableSink(Protocol):
    def open_run(self, variant: str, fingerprint: Callable[[], dict]) -> Optional[Checkpoint]:
        """Pick the run's folder before the first window (``fingerprint()`` builds the run's fingerprint); returns
        the checkpoint to continue from, or None to start at window 0."""

    def commit(self, checkpoint: Checkpoint) -> None:
        """Record the state after a finished window whose frames were written."""


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
    """Writes ``frame_00000.png``, ``frame_00001.png``, … and keeps nothing in RAM.

    Used by the loop, it is resumable: :meth:`open_run` picks a run folder under ``root`` (the previous folder of the
    same run, or a fresh ``<YYYYmmdd_HHMMSS>_<variant>_output``) and :meth:`commit` stores a checkpoint there after
    every window. Without ``open_run`` the frames go straight into ``root``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.folder = self.root
        self.frame_count = 0
        self._digest: Optional[str] = None

    def write(self, frames: torch.Tensor) -> None:
        pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for frame in pixels:
            Image.fromarray(np.ascontiguousarray(frame)).save(self.folder / FRAME_NAME.format(self.frame_count))
            self.frame_count += 1

    def result(self) -> Optional[torch.Tensor]:
        return None

    def open_run(self, variant: str, fingerprint: Callable[[], dict]) -> Optional[Checkpoint]:
        """Resume the newest run folder made with the same fingerprint, or make a fresh one (see :mod:`.resume`)."""
        run = fingerprint()
        self._digest = resume.fingerprint_digest(run)
        found = resume.find_run(self.root, run, _frames_present)
        if found is None:
            self.folder, checkpoint = resume.new_run_folder(self.root, variant, run), None
        else:
            self.folder, checkpoint = found
        self.frame_count = 0 if checkpoint is None else checkpoint.frames_written
        _remove_frames_from(self.folder, self.frame_count)
        log.info("writing frames to %s%s", self.folder,
                 "" if checkpoint is None else f" (resuming at window {checkpoint.next_window}, "
                                               f"{checkpoint.frames_written} frames done)")
        return checkpoint

    def commit(self, checkpoint: Checkpoint) -> None:
        if self._digest is None:
            raise RuntimeError("PngSink.commit before open_run: the run folder is not chosen yet")
        if checkpoint.frames_written != self.frame_count:
            raise RuntimeError(f"checkpoint says {checkpoint.frames_written} frames were written, the sink wrote "
                               f"{self.frame_count}")
        resume.save_checkpoint(self.folder, checkpoint, self._digest)


def _frames_present(folder: Path, count: int) -> bool:
    return all((folder / FRAME_NAME.format(i)).is_file() for i in range(count))


def _remove_frames_from(folder: Path, first: int) -> None:
    """Delete frames numbered ``first`` and up (left by a window that did not finish) and stray temporary files."""
    for path in folder.glob("frame_*.png"):
        stem = path.stem.removeprefix("frame_")
        if stem.isdigit() and int(stem) >= first:
            path.unlink()
    for path in folder.glob("*.tmp"):
        path.unlink()
