"""Disk cache of text embeddings, one safetensors file per (prompt, encoder file, precision variant).

The caller chooses the folder (the nodes pass a folder under ComfyUI's temp or user directory, never the pack
folder). The file name is the sha256 of the key; the key is also stored in the file's metadata and checked on
read, so a changed encoder file (other name, size or modification time) or another precision is a miss.
Files: tensors ``embeds.<i>`` ([L_i, dim], the encoder's output dtype), metadata ``key`` (JSON) and ``count``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"

EncodeFn = Callable[[list[str]], list[torch.Tensor]]


@dataclass(frozen=True)
class EncoderIdentity:
    """What makes an encoder's embeddings reusable: file name, size, mtime and the precision/quant variant."""

    name: str
    size: int
    mtime_ns: int
    variant: str = ""

    @classmethod
    def from_file(cls, path: str | Path, variant: str = "") -> "EncoderIdentity":
        """Identity of the encoder file at ``path``; ``variant`` names precision/quantization (e.g. 'bf16')."""
        stat = Path(path).stat()
        return cls(name=Path(path).name, size=stat.st_size, mtime_ns=stat.st_mtime_ns, variant=variant)


class TextEmbedCache:
    """Embeddings of prompts on disk under ``folder`` (created on first save)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def key(prompt: str, identity: EncoderIdentity) -> str:
        """JSON key of one entry (prompt text exactly as encoded, plus the encoder identity)."""
        return json.dumps({"v": FORMAT_VERSION, "prompt": prompt, "encoder": asdict(identity)}, sort_keys=True)

    def path_for(self, prompt: str, identity: EncoderIdentity) -> Path:
        """File of the entry for ``prompt`` encoded by ``identity``."""
        digest = hashlib.sha256(self.key(prompt, identity).encode("utf-8")).hexdigest()
        return self.folder / f"{digest}.safetensors"

    def load(self, prompt: str, identity: EncoderIdentity) -> Optional[list[torch.Tensor]]:
        """The cached embeddings (list of [L_i, dim] CPU tensors) or None on a miss or an unreadable file."""
        path = self.path_for(prompt, identity)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("key") != self.key(prompt, identity):
                    return None
                return [handle.get_tensor(f"embeds.{i}") for i in range(int(meta["count"]))]
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            log.warning("ignoring unreadable text-embedding cache file %s (%s)", path, err)
            return None

    def save(self, prompt: str, identity: EncoderIdentity, embeds: Sequence[torch.Tensor]) -> Path:
        """Write the embeddings of ``prompt`` (stored on CPU); atomic replace of any older entry."""
        path = self.path_for(prompt, identity)
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"embeds.{i}": e.detach().cpu().clone() for i, e in enumerate(embeds)}
        meta = {"key": self.key(prompt, identity), "count": str(len(embeds))}
        handle, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(handle)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path


def cached_encode(prompts: Sequence[str], encode: Optional[EncodeFn], cache: Optional[TextEmbedCache] = None,
                  identity: Optional[EncoderIdentity] = None) -> list[torch.Tensor]:
    """Embeddings for ``prompts`` (one [L_i, dim] tensor each, in order), from the cache where possible.

    Misses are encoded in one ``encode(list_of_prompts)`` call and saved. ``encode`` may be None when every prompt
    is expected to hit; a miss then raises RuntimeError. Cache hits come back on the CPU.
    """
    if cache is not None and identity is None:
        raise ValueError("cached_encode: a cache needs the encoder identity (EncoderIdentity.from_file(path))")
    found: dict[str, torch.Tensor] = {}
    if cache is not None:
        for prompt in dict.fromkeys(prompts):
            hit = cache.load(prompt, identity)
            if hit is not None and len(hit) == 1:
                found[prompt] = hit[0]
    missing = [p for p in dict.fromkeys(prompts) if p not in found]
    if missing:
        if encode is None:
            raise RuntimeError(f"no text encoder is connected and {len(missing)} prompt(s) are not in the "
                               f"text-embedding cache (first: {missing[0]!r}); connect a T5 text encoder or "
                               "encode these prompts once with use_disk_cache enabled")
        encoded = encode(missing)
        if len(encoded) != len(missing):
            raise RuntimeError(f"text encoder returned {len(encoded)} embeddings for {len(missing)} prompts")
        for prompt, embed in zip(missing, encoded):
            found[prompt] = embed
            if cache is not None:
                cache.save(prompt, identity, [embed])
    return [found[p] for p in prompts]
