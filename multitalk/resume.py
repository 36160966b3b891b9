"""Resumable long runs: one run folder per run under ``output_path``, a fingerprint of everything that decides the
frames, and a checkpoint after every finished window.

Run folder ``<output_path>/<YYYYmmdd_HHMMSS>_<variant>_output/`` (``..._<n>_output`` if that name is taken):

* ``frame_00000.png`` … the finished frames (written by :class:`~.frame_sink.PngSink`);
* ``run.json``: ``{"format", "created", "variant", "fingerprint"}``, written once when the folder is made;
* ``resume.safetensors``: after each finished window, ``motion_pixels`` [M, 3, H, W] float32 in [-1, 1] (the frames
  that condition the next window) and ``rng_state`` uint8 (the seeded CPU generator's state), with metadata
  ``next_window``, ``frames_written`` and the fingerprint's digest.

Both files are written to a temporary name in the folder, flushed to disk and moved into place with ``os.replace``,
so a crash leaves the previous version intact.

Finding the previous run (:func:`find_run`): every sub-folder of ``output_path`` that ends in ``_output`` and holds a
readable ``run.json`` is a candidate, newest first (``created``). The first whose fingerprint equals this run's, and
whose checkpointed frames are all on disk, is resumed (no checkpoint yet: it restarts at window 0 in that folder).
Otherwise a fresh folder is made and the log names the fingerprint fields that differ from the newest candidate.

The fingerprint (:func:`run_fingerprint`) is JSON: scalars as they are, tensors as digests (dtype, shape, bytes),
the transformer and the VAE as a digest of every parameter's and buffer's name, dtype and shape plus 256 evenly
spaced elements' bytes, and the step schedules of attached unmerged LoRAs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..wanvideo.lora import LoraAdapter

log = logging.getLogger(__name__)

FORMAT = 1
RUN_FILE = "run.json"
CHECKPOINT_FILE = "resume.safetensors"
FOLDER_SUFFIX = "_output"
SAMPLES_PER_TENSOR = 256


@dataclass(frozen=True)
class Checkpoint:
    """State after window ``next_window - 1``: the run continues with window ``next_window``.

    frames_written: frames emitted so far; motion_pixels: [M, 3, H, W] float32 in [-1, 1] on the CPU (the last
    decoded, colour-matched frames); rng_state: uint8 state of the run's CPU ``torch.Generator``.
    """

    next_window: int
    frames_written: int
    motion_pixels: torch.Tensor
    rng_state: torch.Tensor


def tensor_digest(tensor: torch.Tensor) -> str:
    """blake2b of dtype, shape and every byte of ``tensor`` (any dtype and device)."""
    data = tensor.detach().cpu().reshape(-1)
    digest = hashlib.blake2b(f"{data.dtype}{tuple(tensor.shape)}".encode(), digest_size=16)
    digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()


def describe(value: Any) -> Any:
    """JSON-ready description: tensors -> digests, dataclasses -> dicts, sequences -> lists, scalars unchanged."""
    if isinstance(value, torch.Tensor):
        return "tensor:" + tensor_digest(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


def _sampled_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Up to SAMPLES_PER_TENSOR evenly spaced elements of ``tensor`` as raw bytes [k * itemsize] uint8 (same device)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return flat.new_empty(0, dtype=torch.uint8)
    index = torch.linspace(0, flat.numel() - 1, min(flat.numel(), SAMPLES_PER_TENSOR)).long().to(flat.device)
    return flat.view(torch.uint8).reshape(flat.numel(), -1)[index].reshape(-1)


def module_digest(module: torch.nn.Module) -> str:
    """Digest of a model's weights: names, dtypes, shapes and sampled bytes of every parameter and buffer (wherever
    each lives: one host copy per device), plus the schedules of unmerged LoRA adapters."""
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t is not None]
    by_device: dict[torch.device, list[int]] = {}
    samples = [_sampled_bytes(t) for _, t in named]
    for i, (_, tensor) in enumerate(named):
        by_device.setdefault(tensor.device, []).append(i)
    host: dict[int, torch.Tensor] = {}
    for indices in by_device.values():
        joined = torch.cat([samples[i] for i in indices]).cpu()
        host.update(zip(indices, joined.split([samples[i].numel() for i in indices])))
    digest = hashlib.blake2b(digest_size=16)
    for i, (name, tensor) in enumerate(named):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(host[i].numpy()))
    for name, child in module.named_modules():
        if isinstance(child, LoraAdapter):
            digest.update(f"{name}|{child.alpha_scale}|{child.schedule}|".encode())
    return digest.hexdigest()


def run_fingerprint(inputs: Any, settings: Any, transformer: torch.nn.Module, vae: torch.nn.Module) -> dict:
    """The run's fingerprint (JSON-normal dict) from the loop's inputs and settings dataclasses and its models."""
    description = {"format": FORMAT, "inputs": describe(inputs), "settings": describe(settings),
                   "transformer": module_digest(transformer), "vae": module_digest(vae)}
    return json.loads(json.dumps(description))


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.blake2b(json.dumps(fingerprint, sort_keys=True).encode(), digest_size=16).hexdigest()


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two fingerprints differ (e.g. ``settings.seed``, ``inputs.audio_features``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return found
    return [] if old == new else [prefix or "fingerprint"]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then ``os.replace``."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_checkpoint(folder: Path, checkpoint: Checkpoint, digest: str) -> None:
    """Write ``resume.safetensors`` into ``folder`` atomically (``digest``: the run's fingerprint digest)."""
    metadata = {"format": str(FORMAT), "next_window": str(checkpoint.next_window),
                "frames_written": str(checkpoint.frames_written), "fingerprint": digest}
    packed = torch.contiguous_format
    tensors = {"motion_pixels": checkpoint.motion_pixels.detach().cpu().float().clone(memory_format=packed),
               "rng_state": checkpoint.rng_state.detach().cpu().to(torch.uint8).clone(memory_format=packed)}
    atomic_write(Path(folder) / CHECKPOINT_FILE, save(tensors, metadata=metadata))


def load_checkpoint(folder: Path, digest: str) -> Optional[Checkpoint]:
    """The checkpoint in ``folder``; None when there is none yet. Raises RuntimeError when it belongs to another
    fingerprint or cannot be read."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            motion, rng = handle.get_tensor("motion_pixels"), handle.get_tensor("rng_state")
        checkpoint = Checkpoint(int(meta["next_window"]), int(meta["frames_written"]), motion, rng)
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        raise RuntimeError(f"the resume checkpoint {path} cannot be read ({error}); delete its folder to start "
                           "that run over") from error
    if meta.get("fingerprint") != digest:
        raise RuntimeError(f"the resume checkpoint {path} belongs to another run than its {RUN_FILE}; delete the "
                           "folder to start that run over")
    return checkpoint


def _read_run(folder: Path) -> Optional[dict]:
    try:
        record = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _candidates(root: Path) -> list[tuple[Path, dict]]:
    """Run folders under ``root`` with a readable run.json, newest first."""
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            record = _read_run(folder) if folder.is_dir() and folder.name.endswith(FOLDER_SUFFIX) else None
            if record is not None:
                found.append((folder, record))
    return sorted(found, key=lambda item: (float(item[1].get("created", 0.0)), item[0].name), reverse=True)


def find_run(root: Path, fingerprint: dict, frames_present: Callable[[Path, int], bool]
             ) -> Optional[tuple[Path, Optional[Checkpoint]]]:
    """The newest run folder under ``root`` made with ``fingerprint`` whose checkpointed frames are all present
    (``frames_present(folder, count)``), and its checkpoint (None: no window finished yet). None when there is
    none; the log then says why the newest folder does not fit."""
    digest = fingerprint_digest(fingerprint)
    candidates = _candidates(Path(root))
    for folder, record in candidates:
        if record.get("fingerprint") != fingerprint:
            continue
        checkpoint = load_checkpoint(folder, digest)
        if checkpoint is not None and not frames_present(folder, checkpoint.frames_written):
            log.warning("run folder %s matches this run but some of its %d finished frames are missing; "
                        "not resuming it", folder, checkpoint.frames_written)
            continue
        return folder, checkpoint
    if candidates:
        newest, record = candidates[0]
        changed = differences(record.get("fingerprint"), fingerprint)
        log.info("starting a fresh run folder: the newest one, %s, was made with other inputs (%s)", newest.name,
                 ", ".join(changed) or "its frames are incomplete")
    return None


def new_run_folder(root: Path, variant: str, fingerprint: dict) -> Path:
    """Make ``<root>/<YYYYmmdd_HHMMSS>_<variant>_output`` (or ``…_<n>_output``) with its run.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    folder, n = root / f"{stamp}_{variant}{FOLDER_SUFFIX}", 1
    while folder.exists():
        folder, n = root / f"{stamp}_{variant}_{n}{FOLDER_SUFFIX}", n + 1
    folder.mkdir()
    record = {"format": FORMAT, "created": time.time(), "variant": variant, "fingerprint": fingerprint}
    atomic_write(folder / RUN_FILE, json.dumps(record, indent=1).encode())
    return folder
