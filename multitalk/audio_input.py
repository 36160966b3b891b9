"""Waveform preparation for the wav2vec2 front end, speaker layouts and per-frame audio windows.

From a ComfyUI AUDIO dict (``{"waveform": [B, C, N], "sample_rate": int}``) to a mono float32 16 kHz waveform
``[N16]``: batch 0 and one channel (or the channel mean), band-limited resampling, cut to ``num_frames / fps``
seconds, optional loudness normalisation to -23 LUFS (pyloudnorm, BS.1770; skipped when |loudness| > 100 LUFS,
i.e. silence, or when the clip is shorter than one 0.4 s gating block), optional -45 dBFS white-noise floor and
optional 3 kHz 3rd-order Butterworth low-pass (zero phase). Bad input (no samples, sample rate <= 0, NaN/inf,
shorter than one video frame) raises ValueError; clipping and silence are logged.
"""
from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import pyloudnorm
import scipy.signal
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
TARGET_LUFS = -23.0
LOUDNESS_SKIP_ABOVE = 100.0
LOUDNESS_BLOCK_S = 0.4
NOISE_FLOOR_DB = -45.0
LOWPASS_HZ = 3000.0
LOWPASS_ORDER = 3
SILENCE_PEAK = 1e-4
CLIP_LEVEL = 0.999
SINC_WIDTH = 6
SINC_ROLLOFF = 0.99
MAX_SINC_KERNEL = 1 << 25


class MultiAudioType(str, enum.Enum):
    """``multi_audio_type`` widget: ``para`` (speakers overlap in time) or ``add`` (one after the other)."""

    PARA = "para"
    ADD = "add"

    @classmethod
    def parse(cls, value: "str | MultiAudioType") -> "MultiAudioType":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown multi_audio_type {value!r}; choose 'para' or 'add'") from None


@dataclass(frozen=True)
class AudioPrepOptions:
    """How one speaker's audio is prepared (MultiTalkWav2VecEmbeds widgets plus the channel choice).

    ``num_frames`` / ``fps``: keep the first ``num_frames / fps`` seconds. ``channel``: index to keep (upstream
    node: 0) or None for the mean of all channels (as librosa in the official script). ``noise_seed`` seeds the
    noise floor so runs are repeatable.
    """

    num_frames: int = 81
    fps: float = 25.0
    normalize_loudness: bool = True
    add_noise_floor: bool = False
    smooth_transients: bool = False
    channel: Optional[int] = 0
    noise_seed: int = 0


@dataclass(frozen=True, eq=False)
class PreparedAudio:
    """One speaker's processed audio: ``waveform`` [N] float32 at 16 kHz (CPU); loudness before gain (LUFS, or
    None when not measured); ``silent`` when the cut input peaked below -80 dBFS."""

    name: str
    waveform: torch.Tensor
    loudness: Optional[float]
    silent: bool

    @property
    def seconds(self) -> float:
        return self.waveform.shape[0] / SAMPLE_RATE


def waveform_from_audio(audio: Mapping, name: str = "audio", channel: Optional[int] = 0
                        ) -> tuple[torch.Tensor, int]:
    """ComfyUI AUDIO dict -> (mono float32 waveform [N] on CPU, sample rate). Batch 0 only.

    ``waveform`` may be [B, C, N], [C, N] or [N]. Raises ValueError for a missing / empty waveform, a sample rate
    <= 0, a channel that does not exist, or non-finite samples.
    """
    if not isinstance(audio, Mapping) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError(f"{name} must be an AUDIO dict with 'waveform' [B, C, N] and 'sample_rate'")
    wave = torch.as_tensor(audio["waveform"]).detach().to("cpu", torch.float32)
    shape = tuple(wave.shape)
    sample_rate = int(audio["sample_rate"])
    if sample_rate <= 0:
        raise ValueError(f"{name} has sample rate {sample_rate}; it must be a positive number of Hz. Re-load "
                         "the audio file.")
    while wave.dim() < 3:
        wave = wave.unsqueeze(0)
    if wave.dim() != 3 or wave.shape[0] == 0 or wave.shape[1] == 0 or wave.shape[2] == 0:
        raise ValueError(f"{name} has no samples (waveform shape {shape}); connect a "
                         "non-empty audio clip")
    if channel is None:
        mono = wave[0].mean(dim=0)
    elif 0 <= channel < wave.shape[1]:
        mono = wave[0, channel]
    else:
        raise ValueError(f"{name} has {wave.shape[1]} channel(s); channel {channel} does not exist")
    if not torch.isfinite(mono).all():
        raise ValueError(f"{name} contains NaN or infinite samples; the file is damaged or was produced by a "
                         "failed node. Re-export the audio.")
    return mono, sample_rate


def _sinc_kernel(orig: int, new: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Polyphase Hann-windowed sinc filters [new, 1, K] (dtype/device of ``like``) for reduced rates orig -> new,
    and the half width. Taps are computed in float64."""
    cutoff = min(orig, new) * SINC_ROLLOFF
    width = math.ceil(SINC_WIDTH * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64, device=like.device) / orig
    phase = -torch.arange(new, dtype=torch.float64, device=like.device)[:, None] / new
    t = ((phase + taps[None, :]) * cutoff).clamp(-SINC_WIDTH, SINC_WIDTH)
    window = torch.cos(t * math.pi / SINC_WIDTH / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    kernel = sinc * window * (cutoff / orig)
    return kernel[:, None, :].to(like.dtype), width


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Band-limited resampling along the last axis: [..., N] -> [..., ceil(N * new_sr / orig_sr)].

    Hann-windowed sinc, 6 zero crossings, roll-off 0.99 (the same filter family and defaults as
    torchaudio.functional.resample, which the upstream node uses).
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return waveform
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    if new * (2 * math.ceil(SINC_WIDTH * orig / (min(orig, new) * SINC_ROLLOFF)) + orig) > MAX_SINC_KERNEL:
        raise ValueError(f"cannot resample {orig_sr} Hz -> {new_sr} Hz efficiently (ratio {orig}:{new}); convert "
                         "the audio to 16000, 22050, 44100 or 48000 Hz first")
    kernel, width = _sinc_kernel(orig, new, waveform)
    shape, n = waveform.shape[:-1], waveform.shape[-1]
    x = F.pad(waveform.reshape(-1, 1, n), (width, width + orig))
    y = F.conv1d(x, kernel, stride=orig)
    target = math.ceil(new * n / orig)
    return y.transpose(1, 2).reshape(y.shape[0], -1)[:, :target].reshape(*shape, target)


def samples_for_frames(num_frames: int, fps: float, sample_rate: int = SAMPLE_RATE) -> int:
    """The fewest samples that cover ``num_frames`` video frames under the official frame rounding
    ``int(samples / rate * fps)`` (float rounding included: 57 frames at 25 fps need 36481 samples, not 36480),
    also for fractional rates such as 23.976 fps."""
    samples = math.ceil(num_frames * sample_rate / fps - 1e-6)
    while int(samples / sample_rate * fps) < num_frames:
        samples += 1
    return samples


def integrated_loudness(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> Optional[float]:
    """BS.1770 integrated loudness in LUFS (pyloudnorm), or None when shorter than one 0.4 s gating block."""
    if waveform.shape[-1] < LOUDNESS_BLOCK_S * sample_rate:
        return None
    meter = pyloudnorm.Meter(sample_rate)
    return float(meter.integrated_loudness(waveform.double().numpy()))


def normalize_loudness(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE, target: float = TARGET_LUFS,
                       name: str = "audio") -> tuple[torch.Tensor, Optional[float]]:
    """Gain the waveform [N] to ``target`` LUFS. Unchanged when |loudness| > 100 (silence) or too short to measure.

    Returns (waveform, measured loudness or None).
    """
    loudness = integrated_loudness(waveform, sample_rate)
    if loudness is None:
        log.info("%s: shorter than %.1f s, loudness normalisation skipped", name, LOUDNESS_BLOCK_S)
        return waveform, None
    if not abs(loudness) <= LOUDNESS_SKIP_ABOVE:
        log.info("%s: loudness %.1f LUFS (silence), normalisation skipped", name, loudness)
        return waveform, loudness
    gained = waveform * (10.0 ** ((target - loudness) / 20.0))
    peak = float(gained.abs().max())
    if peak > 1.0:
        log.warning("%s: peak %.2f exceeds full scale after normalising to %.0f LUFS (kept unclipped)",
                    name, peak, target)
    return gained, loudness


def add_noise_floor(waveform: torch.Tensor, level_db: float = NOISE_FLOOR_DB, seed: int = 0) -> torch.Tensor:
    """Add white Gaussian noise with RMS ``10 ** (level_db / 20)`` (re full scale), seeded: [N] CPU -> [N]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(waveform.shape, generator=generator, dtype=torch.float32)
    return waveform + noise.to(waveform.dtype) * (10.0 ** (level_db / 20.0))


def lowpass(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE, cutoff_hz: float = LOWPASS_HZ,
            order: int = LOWPASS_ORDER) -> torch.Tensor:
    """Butterworth low-pass [N] -> [N], applied forwards and backwards (zero phase: no lip-sync delay)."""
    sos = scipy.signal.butter(order, cutoff_hz, btype="low", fs=sample_rate, output="sos")
    padlen = min(waveform.shape[-1] - 1, 3 * (2 * len(sos) + 1))
    out = scipy.signal.sosfiltfilt(sos, waveform.double().numpy(), padlen=padlen)
    return torch.from_numpy(np.ascontiguousarray(out)).to(waveform.dtype)


def _report_levels(wave: torch.Tensor, name: str) -> bool:
    """Log clipping and silence; return True when the clip is silent."""
    peak = float(wave.abs().max())
    clipped = int((wave.abs() >= CLIP_LEVEL).sum())
    if clipped > max(2, wave.shape[0] // 1000):
        log.warning("%s looks clipped: %d samples at full scale; lip sync may suffer", name, clipped)
    if peak < SILENCE_PEAK:
        log.warning("%s is silent (peak %.1e); its speaker will not move the lips", name, peak)
        return True
    return False


def prepare_waveform(audio: Mapping, name: str, options: AudioPrepOptions) -> PreparedAudio:
    """AUDIO dict -> :class:`PreparedAudio` (mono 16 kHz, cut, normalised, optional noise floor and low-pass).

    Raises ValueError when the (cut) clip is shorter than one video frame at ``options.fps``.
    """
    if options.num_frames < 1 or not options.fps > 0:
        raise ValueError(f"num_frames must be >= 1 and fps > 0, got {options.num_frames} and {options.fps}")
    mono, rate = waveform_from_audio(audio, name, options.channel)
    need = samples_for_frames(options.num_frames, options.fps)
    margin = rate  # one second of source beyond the cut keeps the resampling filter's support intact
    wave = resample(mono[: math.ceil(need * rate / SAMPLE_RATE) + margin], rate, SAMPLE_RATE)[:need]
    if int(wave.shape[0] / SAMPLE_RATE * options.fps) < 1:
        raise ValueError(f"{name} is {mono.shape[0] / rate:.3f} s long, shorter than one video frame "
                         f"({1.0 / options.fps:.3f} s at {options.fps} fps); connect a longer audio clip")
    silent = _report_levels(wave, name)
    loudness = None
    if options.normalize_loudness:
        wave, loudness = normalize_loudness(wave, SAMPLE_RATE, TARGET_LUFS, name)
    if options.add_noise_floor:
        wave = add_noise_floor(wave, NOISE_FLOOR_DB, options.noise_seed)
    if options.smooth_transients:
        wave = lowpass(wave, SAMPLE_RATE)
    return PreparedAudio(name=name, waveform=wave.float(), loudness=loudness, silent=silent)


def layout_tracks(tracks: Sequence[torch.Tensor], mode: "str | MultiAudioType") -> list[torch.Tensor]:
    """Place speakers on one timeline along dim 0 (waveforms [N] or features [T, L, D]), zeros elsewhere.

    ``para``: every track zero-padded at the end to the longest. ``add``: track i occupies
    [sum of earlier lengths, + its length) of a timeline as long as all tracks together.
    """
    mode = MultiAudioType.parse(mode)
    if not tracks:
        raise ValueError("layout_tracks needs at least one track")
    lengths = [t.shape[0] for t in tracks]
    total = max(lengths) if mode is MultiAudioType.PARA else sum(lengths)
    out, offset = [], 0
    for track, length in zip(tracks, lengths):
        full = track.new_zeros((total, *track.shape[1:]))
        full[offset:offset + length] = track
        out.append(full)
        offset += length if mode is MultiAudioType.ADD else 0
    return out


def mix_tracks(tracks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of laid-out tracks (same length): the para mix, or the add concatenation."""
    return torch.stack(list(tracks)).sum(dim=0)

