"""MULTITALK_EMBEDS content and the MultiTalkWav2VecEmbeds computation: speaker audios -> wav2vec2 features.

Per connected audio: :func:`audio_input.prepare_waveform` -> :func:`wav2vec.wav2vec_features` (``[T_i, L, D]``).
Speakers are then laid out on one timeline (``para``: zero-padded to the longest; ``add``: one after the other,
each zero outside its own span). By default the layout pads the *features* with zeros, as the upstream ComfyUI
node does; ``layout_domain="waveform"`` pads the *audio* with silence before wav2vec2, as the official
InfiniteTalk script does (silence then has wav2vec2 features instead of zeros).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from .audio_input import (SAMPLE_RATE, AudioPrepOptions, MultiAudioType, PreparedAudio, layout_tracks, mix_tracks,
                          prepare_waveform, samples_for_frames)
from .wav2vec import Wav2VecEncoder, wav2vec_features

MAX_SPEAKERS = 4


class LayoutDomain(str, enum.Enum):
    """Where multi-speaker padding happens: on the wav2vec2 ``features`` (upstream node) or the ``waveform``."""

    FEATURES = "features"
    WAVEFORM = "waveform"

    @classmethod
    def parse(cls, value: "str | LayoutDomain") -> "LayoutDomain":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown layout_domain {value!r}; choose 'features' or 'waveform'") from None


@dataclass(frozen=True, eq=False)
class MultiTalkEmbeds:
    """What travels on a MULTITALK_EMBEDS socket.

    ``audio_features``: one ``[T, L, D]`` tensor per speaker (CPU, wav2vec2 dtype, all the same T);
    ``ref_target_masks``: per-speaker pixel masks ``[n_masks, H, W]`` (+ optional background) or None.
    """

    audio_features: tuple[torch.Tensor, ...]
    audio_scale: float = 1.0
    audio_cfg_scale: float = 1.0
    ref_target_masks: Optional[torch.Tensor] = None

    @property
    def num_speakers(self) -> int:
        return len(self.audio_features)

    @property
    def num_frames(self) -> int:
        return self.audio_features[0].shape[0]

    def to_dict(self) -> dict:
        """The upstream dict layout: ``audio_features`` (list), ``audio_scale``, ``audio_cfg_scale``,
        ``ref_target_masks``."""
        return {"audio_features": list(self.audio_features), "audio_scale": self.audio_scale,
                "audio_cfg_scale": self.audio_cfg_scale, "ref_target_masks": self.ref_target_masks}

    @classmethod
    def from_dict(cls, data: Mapping) -> "MultiTalkEmbeds":
        """Accept the upstream dict (``audio_features`` a list of ``[T, L, D]`` or one bare tensor)."""
        if not isinstance(data, Mapping) or "audio_features" not in data:
            raise ValueError("MULTITALK_EMBEDS must be a dict with 'audio_features'; connect a "
                             "Multi/InfiniteTalk Wav2vec2 Embeds (or Silent Embeds) node")
        feats = data["audio_features"]
        feats = (feats,) if isinstance(feats, torch.Tensor) else tuple(feats)
        if not feats or any(f.dim() != 3 for f in feats):
            raise ValueError(f"audio_features must be [T, layers, dim] tensors, got "
                             f"{[tuple(f.shape) for f in feats]}")
        return cls(feats, float(data.get("audio_scale", 1.0)), float(data.get("audio_cfg_scale", 1.0)),
                   data.get("ref_target_masks"))


@dataclass(frozen=True)
class EmbedOptions:
    """MultiTalkWav2VecEmbeds widgets: per-speaker preparation plus scales and the multi-speaker layout."""

    prep: AudioPrepOptions = field(default_factory=AudioPrepOptions)
    audio_scale: float = 1.0
    audio_cfg_scale: float = 1.0
    multi_audio_type: str = "para"
    layout_domain: str = "features"


@dataclass(frozen=True, eq=False)
class EmbedResult:
    """Node outputs: embeds, the processed audio (AUDIO dict, ``waveform`` [1, 1, N] at 16 kHz; para: the mix,
    add: the concatenation) and ``num_frames = min(requested, frames on the speakers' timeline)``."""

    embeds: MultiTalkEmbeds
    audio: dict
    num_frames: int
    speakers: tuple[PreparedAudio, ...]


def _check_masks(masks: Optional[torch.Tensor], speakers: int) -> None:
    if masks is None:
        return
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        raise ValueError(f"ref_target_masks must be a MASK [n, H, W], got "
                         f"{getattr(masks, 'shape', type(masks).__name__)}")
    if masks.shape[0] < speakers:
        raise ValueError(f"ref_target_masks has {masks.shape[0]} masks for {speakers} speakers; give one mask per "
                         "speaker (plus an optional background mask)")


def _features(encoder: Wav2VecEncoder, speakers: Sequence[PreparedAudio], mode: MultiAudioType,
              domain: LayoutDomain, fps: float) -> list[torch.Tensor]:
    """Per-speaker ``[T, L, D]`` features on the common timeline (CPU)."""
    waves = [s.waveform for s in speakers]
    if domain is LayoutDomain.WAVEFORM:
        feats = [wav2vec_features(encoder, w, fps) for w in layout_tracks(waves, mode)]
    else:
        feats = layout_tracks([wav2vec_features(encoder, w, fps) for w in waves], mode)
    return [f.cpu() for f in feats]


def embed_audio(encoder: Wav2VecEncoder, audios: Sequence[Optional[Mapping]], options: EmbedOptions,
                ref_target_masks: Optional[torch.Tensor] = None) -> EmbedResult:
    """MultiTalkWav2VecEmbeds: up to four AUDIO dicts (``None`` = not connected) -> :class:`EmbedResult`.

    Raises ValueError for a CTC fine-tuned wav2vec2, no audio, more than four, all-silent audio, bad masks, and
    (from the preparation) unusable audio.
    """
    encoder.check_multitalk()
    connected = [(f"audio_{i + 1}", a) for i, a in enumerate(audios) if a is not None]
    if not connected:
        raise ValueError("no audio connected; connect audio_1")
    if len(connected) > MAX_SPEAKERS:
        raise ValueError(f"{len(connected)} audios connected; at most {MAX_SPEAKERS} speakers are supported")
    mode = MultiAudioType.parse(options.multi_audio_type)
    domain = LayoutDomain.parse(options.layout_domain)
    _check_masks(ref_target_masks, len(connected))
    speakers = [prepare_waveform(audio, name, options.prep) for name, audio in connected]
    if all(s.silent for s in speakers):
        raise ValueError("every connected audio is silent, which would give a talking head that does not talk; "
                         "connect audio with speech, or use MultiTalk Silent Embeds for a silent clip")
    frames = options.prep.num_frames
    feats = [f[:frames] for f in _features(encoder, speakers, mode, domain, options.prep.fps)]
    mixed = mix_tracks(layout_tracks([s.waveform for s in speakers], mode))
    mixed = mixed[:samples_for_frames(feats[0].shape[0], options.prep.fps)]
    embeds = MultiTalkEmbeds(tuple(feats), options.audio_scale, options.audio_cfg_scale, ref_target_masks)
    audio = {"waveform": mixed.reshape(1, 1, -1), "sample_rate": SAMPLE_RATE}
    return EmbedResult(embeds, audio, embeds.num_frames, tuple(speakers))



def silent_embeds(encoder: Wav2VecEncoder, num_frames: int, fps: float = 25.0) -> MultiTalkEmbeds:
    """MultiTalkSilentEmbeds: wav2vec2 features of ``num_frames`` frames of digital silence, one speaker, audio scale
    and audio cfg 1 (a clip where nobody talks). Computed with the given model instead of shipped as a file, so they
    always match the model that encodes the speech."""
    encoder.check_multitalk()
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    silence = torch.zeros(samples_for_frames(num_frames, fps))
    features = wav2vec_features(encoder, silence, fps)[:num_frames].cpu()
    return MultiTalkEmbeds((features,), 1.0, 1.0, None)
