"""umT5 tokenizer: discovery, text cleaning and prompt parsing (as Wan2.1 / WanVideoWrapper use them).

Tokenisation follows Wan's ``HuggingfaceTokenizer(name='google/umt5-xxl', seq_len=512, clean='whitespace')``:
the text is cleaned (HTML entities unescaped twice, whitespace runs collapsed to one space, stripped; Wan also runs
``ftfy.fix_text`` first, which only repairs mojibake and is not reproduced here), encoded without special tokens,
truncated to ``max_length - 1`` pieces, ended with ``</s>`` and right-padded with ``<pad>``.

Where the tokenizer comes from, in order (:func:`find_tokenizer`):

1. a ``spiece_model`` uint8 tensor inside the text-encoder checkpoint (ComfyUI's own umT5 files carry one);
2. a tokenizer folder next to the checkpoint: the checkpoint's folder itself or one of :data:`SIBLING_FOLDERS`,
   holding ``tokenizer.json`` (preferred: what ``AutoTokenizer`` loads for Wan) or ``spiece.model``;
3. the Hugging Face cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``), snapshot of
   ``google/umt5-xxl``, read offline.
"""
from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

MAX_LENGTH = 512
HF_REPO_ID = "google/umt5-xxl"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
SIBLING_FOLDERS = ("umt5-xxl", "google/umt5-xxl", "umt5_xxl", "T5_tokenizer", "tokenizer")
PAD_PIECE = "<pad>"
EOS_PIECE = "</s>"

_WHITESPACE = re.compile(r"\s+")
# "(text:weight)": text without parentheses or a colon-free tail, weight a plain non-negative decimal number.
_WEIGHTED = re.compile(r"\(([^()]*?):(\d+(?:\.\d*)?|\.\d+)\)")


def clean_text(text: str) -> str:
    """Wan's ``clean='whitespace'``: HTML-unescape twice, collapse whitespace runs to one space, strip (no ftfy)."""
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class PromptSegment:
    """One prompt of a ``|``-separated list: the text fed to the encoder and the factor for its embedding."""

    text: str
    weight: float = 1.0


def parse_prompt_weights(prompt: str) -> PromptSegment:
    """Strip every ``(text:weight)`` group to ``text``; the segment weight is the product of all weights found.

    As WanVideoWrapper does, the weight scales the whole embedding of the prompt, not only the marked words.
    """
    weight = 1.0
    for match in _WEIGHTED.finditer(prompt):
        weight *= float(match.group(2))
    text = _WEIGHTED.sub(lambda m: m.group(1), prompt)
    if not math.isfinite(weight):
        raise ValueError(f"prompt weight is not finite in {prompt!r}")
    return PromptSegment(text=text, weight=weight)


def split_prompts(positive: str) -> list[PromptSegment]:
    """Split the positive prompt on ``|`` (prompt travel: window k uses prompt min(k, n-1)); each part stripped
    and weight-parsed. An empty prompt gives one empty segment."""
    return [parse_prompt_weights(part.strip()) for part in positive.split("|")]


class _SentencePieceBackend:
    """sentencepiece model proto -> ids (no special tokens)."""

    def __init__(self, model_proto: bytes, source: str):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(model_proto)
        except RuntimeError as err:
            raise ValueError(f"umT5 tokenizer from {source} is not a valid sentencepiece model: {err}") from err
        self.pad_id = _required_id(self.processor.piece_to_id(PAD_PIECE), self.processor.unk_id(), PAD_PIECE, source)
        self.eos_id = _required_id(self.processor.piece_to_id(EOS_PIECE), self.processor.unk_id(), EOS_PIECE, source)

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text, out_type=int))


class _TokenizersBackend:
    """Hugging Face ``tokenizer.json`` -> ids (no special tokens), read with the ``tokenizers`` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust binding raises plain Exception subclasses for malformed files
            raise ValueError(f"umT5 tokenizer {path} cannot be read: {err}") from err
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.pad_id = _required_id(self.tokenizer.token_to_id(PAD_PIECE), None, PAD_PIECE, str(path))
        self.eos_id = _required_id(self.tokenizer.token_to_id(EOS_PIECE), None, EOS_PIECE, str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)


def _required_id(token_id: Optional[int], unk_id: Optional[int], piece: str, source: str) -> int:
    if token_id is None or token_id < 0 or token_id == unk_id:
        raise ValueError(f"umT5 tokenizer from {source} has no {piece!r} token; it is not the google/umt5-xxl "
                         "tokenizer")
    return int(token_id)


class UMT5Tokenizer:
    """Prompts -> (ids [B, L] int64, mask [B, L] int64): cleaned, ``</s>``-terminated, right-padded with ``<pad>``."""

    def __init__(self, backend: _SentencePieceBackend | _TokenizersBackend, source: str, max_length: int = MAX_LENGTH):
        if max_length < 1:
            raise ValueError(f"tokenizer max_length must be >= 1, got {max_length}")
        self.backend = backend
        self.source = source
        self.max_length = max_length
        self.pad_id = backend.pad_id
        self.eos_id = backend.eos_id

    @classmethod
    def from_spiece_bytes(cls, model_proto: bytes, source: str, max_length: int = MAX_LENGTH) -> "UMT5Tokenizer":
        """Build from a serialized sentencepiece model (``spiece.model`` bytes)."""
        return cls(_SentencePieceBackend(model_proto, source), source, max_length)

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = MAX_LENGTH) -> "UMT5Tokenizer":
        """Build from ``tokenizer.json`` or a sentencepiece ``*.model`` file."""
        path = Path(path)
        if path.suffix == ".json":
            return cls(_TokenizersBackend(path), str(path), max_length)
        return cls.from_spiece_bytes(path.read_bytes(), str(path), max_length)

    def encode(self, text: str) -> list[int]:
        """One prompt -> token ids: cleaned, truncated to ``max_length - 1`` pieces, ``</s>`` appended."""
        return self.backend.encode(clean_text(text))[: self.max_length - 1] + [self.eos_id]

    def __call__(self, texts: Sequence[str], pad_to_max_length: bool = True,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ids, mask, both [B, L] int64 on ``device``; L = max_length, or the longest prompt when
        ``pad_to_max_length`` is False. mask is 1 for real tokens (``</s>`` included), 0 for padding."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t) for t in texts]
        length = self.max_length if pad_to_max_length else max((len(e) for e in encoded), default=1)
        ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.int64, device=device)
        mask = torch.zeros((len(encoded), length), dtype=torch.int64, device=device)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64, device=device)
            mask[row, : len(tokens)] = 1
        return ids, mask


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _tokenizer_file_in(folder: Path) -> Optional[Path]:
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _hf_snapshots(repo_dir: Path) -> list[Path]:
    """Snapshot folders of a cached repo, the one ``refs/main`` points at first."""
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return []
    ordered = []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        ordered.append(snapshots / ref.read_text(encoding="utf-8").strip())
    ordered.extend(sorted(p for p in snapshots.iterdir() if p.is_dir() and p not in ordered))
    return ordered


def tokenizer_search_paths(encoder_path: Optional[str | Path]) -> list[Path]:
    """Folders searched for ``tokenizer.json`` / ``spiece.model``, in order (checkpoint-embedded model aside)."""
    folders = []
    if encoder_path is not None:
        base = Path(encoder_path).parent
        folders.append(base)
        folders.extend(base / name for name in SIBLING_FOLDERS)
    repo_dir = hf_hub_cache() / ("models--" + HF_REPO_ID.replace("/", "--"))
    folders.extend(_hf_snapshots(repo_dir) or [repo_dir / "snapshots" / "<revision>"])
    return folders


def find_tokenizer(encoder_path: Optional[str | Path] = None, embedded: Optional[bytes] = None,
                   max_length: int = MAX_LENGTH) -> UMT5Tokenizer:
    """Locate the umT5 tokenizer: ``embedded`` sentencepiece bytes (from the checkpoint's ``spiece_model``
    tensor), else a folder next to ``encoder_path``, else the Hugging Face cache. Raises FileNotFoundError
    naming where to put the ``google/umt5-xxl`` tokenizer files."""
    if embedded is not None:
        source = f"the 'spiece_model' tensor of {encoder_path}" if encoder_path else "an embedded spiece_model"
        return UMT5Tokenizer.from_spiece_bytes(embedded, source, max_length)
    folders = tokenizer_search_paths(encoder_path)
    found = next((f for f in map(_tokenizer_file_in, folders) if f is not None), None)
    if found is None:
        raise FileNotFoundError(_missing_tokenizer_message(encoder_path, folders))
    return UMT5Tokenizer.from_file(found, max_length)


def _missing_tokenizer_message(encoder_path: Optional[str | Path], searched: list[Path]) -> str:
    target = (Path(encoder_path).parent / "umt5-xxl") if encoder_path is not None else Path("<text_encoders>/umt5-xxl")
    return (
        f"umT5 tokenizer not found for {encoder_path or 'the text encoder'}: the checkpoint carries no "
        f"'spiece_model' tensor and none of these folders holds tokenizer.json or spiece.model: "
        f"{', '.join(str(p) for p in searched)}. Fix: copy the {HF_REPO_ID} tokenizer files (spiece.model, or "
        f"tokenizer.json with tokenizer_config.json and special_tokens_map.json, from "
        f"https://huggingface.co/{HF_REPO_ID}) into {target}/, or put them in the Hugging Face cache with "
        f"`huggingface-cli download {HF_REPO_ID} spiece.model tokenizer.json tokenizer_config.json "
        f"special_tokens_map.json` (cache folder {hf_hub_cache()}).")
