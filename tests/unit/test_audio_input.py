"""Audio front end: real codecs, resampling, loudness, noise floor, low-pass, speaker layouts, frame windows, and the
MultiTalkWav2VecEmbeds computation on the tiny fixture wav2vec2."""
import json
import math

import av
import numpy as np
import pyloudnorm
import pytest
import soundfile
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from infinitetalk.multitalk import audio_input as A
from infinitetalk.multitalk import embeds as E
from infinitetalk.multitalk import wav2vec as W
from parity import tensor_group

SR_IN = 44100


def stereo_sine(seconds, left_hz=440.0, right_hz=1000.0, left_amp=0.3, right_amp=0.1, rate=SR_IN):
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([left_amp * np.sin(2 * np.pi * left_hz * t), right_amp * np.sin(2 * np.pi * right_hz * t)], 1)


def audio_dict(data, rate=SR_IN):
    """[N, C] numpy -> ComfyUI AUDIO dict."""
    return {"waveform": torch.from_numpy(np.ascontiguousarray(data.T, dtype=np.float32))[None], "sample_rate": rate}


def read_soundfile(path):
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return audio_dict(data, rate)


def encode_with_pyav(path, data, codec):
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=SR_IN)
        stream.layout = "stereo"
        planar = np.ascontiguousarray(data.T.astype(np.float32))
        step = 1152
        for i in range(0, planar.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, i:i + step]), format="fltp",
                                               layout="stereo")
            frame.sample_rate = SR_IN
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def read_pyav(path):
    chunks, rate = [], None
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks.append(frame.to_ndarray().reshape(len(frame.layout.channels), -1))
            rate = frame.sample_rate
    return audio_dict(np.concatenate(chunks, axis=1).T, rate)


def peak_hz(wave, rate=A.SAMPLE_RATE):
    spectrum = np.abs(np.fft.rfft(wave.double().numpy() * np.hanning(wave.shape[0])))
    return spectrum.argmax() * rate / wave.shape[0]


def opts(**kw):
    base = dict(num_frames=10000, fps=25.0, normalize_loudness=False)
    base.update(kw)
    return A.AudioPrepOptions(**base)


@pytest.mark.parametrize("suffix", ["wav", "flac"])
def test_soundfile_codecs_resample_and_pick_channel(tmp_path, suffix):
    data = stereo_sine(1.0)
    path = tmp_path / f"tone.{suffix}"
    soundfile.write(str(path), data, SR_IN)
    audio = read_soundfile(path)
    left = A.prepare_waveform(audio, "audio_1", opts())
    assert left.waveform.shape == (math.ceil(data.shape[0] * A.SAMPLE_RATE / SR_IN),)
    assert abs(peak_hz(left.waveform) - 440) < 2
    assert abs(float(left.waveform.abs().max()) - 0.3) < 0.01
    right = A.prepare_waveform(audio, "audio_1", opts(channel=1))
    assert abs(peak_hz(right.waveform) - 1000) < 2
    mean = A.prepare_waveform(audio, "audio_1", opts(channel=None))
    assert torch.allclose(mean.waveform, (left.waveform + right.waveform) / 2, atol=1e-5)


@pytest.mark.parametrize("suffix, codec", [("mp3", "libmp3lame"), ("m4a", "aac")])
def test_compressed_codecs_via_pyav(tmp_path, suffix, codec):
    data = stereo_sine(1.0)
    path = tmp_path / f"tone.{suffix}"
    encode_with_pyav(path, data, codec)
    audio = read_pyav(path)
    assert audio["waveform"].shape[1] == 2 and audio["sample_rate"] == SR_IN
    prepared = A.prepare_waveform(audio, "audio_1", opts())
    assert abs(prepared.seconds - 1.0) < 0.1
    assert abs(peak_hz(prepared.waveform) - 440) < 3


def test_resampler_matches_torchaudio():
    torchaudio_functional = pytest.importorskip("torchaudio.functional")
    wave = torch.randn(2, 4410, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for rate in (44100, 48000, 22050, 8000):
        ours = A.resample(wave, rate, 16000)
        ref = torchaudio_functional.resample(wave, rate, 16000)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < 1e-9
        single = A.resample(wave.float(), rate, 16000)
        assert (single.double() - ref).abs().max() < 1e-4  # float32 rounding of the filter taps


def test_cut_to_num_frames_and_fractional_fps():
    audio = audio_dict(stereo_sine(5.0))
    cut = A.prepare_waveform(audio, "audio_1", opts(num_frames=30, fps=25.0))
    assert cut.waveform.shape[0] == 19200 and W.frame_count(19200, 25.0) == 30
    ntsc = A.prepare_waveform(audio, "audio_1", opts(num_frames=81, fps=23.976))
    assert W.frame_count(ntsc.waveform.shape[0], 23.976) == 81


@pytest.mark.parametrize("amplitude", [0.01, 0.6])
def test_loudness_normalised_to_minus_23_lufs(amplitude):
    audio = audio_dict(stereo_sine(2.0, left_amp=amplitude))
    prepared = A.prepare_waveform(audio, "audio_1", opts(normalize_loudness=True))
    measured = pyloudnorm.Meter(A.SAMPLE_RATE).integrated_loudness(prepared.waveform.double().numpy())
    assert abs(measured - A.TARGET_LUFS) < 0.5
    assert prepared.loudness is not None and abs(prepared.loudness - A.TARGET_LUFS) > 1
    untouched = A.prepare_waveform(audio, "audio_1", opts(normalize_loudness=False))
    assert abs(float(untouched.waveform.abs().max()) - amplitude) < amplitude * 0.02


def test_silence_and_short_clips_skip_normalisation():
    silent = A.prepare_waveform(audio_dict(np.zeros((SR_IN, 2))), "audio_1", opts(normalize_loudness=True))
    assert silent.silent and torch.count_nonzero(silent.waveform) == 0
    assert silent.loudness is not None and abs(silent.loudness) > A.LOUDNESS_SKIP_ABOVE
    short = audio_dict(stereo_sine(0.2))
    prepared = A.prepare_waveform(short, "audio_1", opts(normalize_loudness=True))
    assert prepared.loudness is None and not prepared.silent
    assert abs(float(prepared.waveform.abs().max()) - 0.3) < 0.01


def test_noise_floor_and_lowpass():
    zeros = torch.zeros(A.SAMPLE_RATE)
    noisy = A.add_noise_floor(zeros, A.NOISE_FLOOR_DB, seed=3)
    rms = float(noisy.pow(2).mean().sqrt())
    assert abs(20 * math.log10(rms) - A.NOISE_FLOOR_DB) < 0.5
    assert torch.equal(noisy, A.add_noise_floor(zeros, A.NOISE_FLOOR_DB, seed=3))
    t = torch.arange(A.SAMPLE_RATE, dtype=torch.float64) / A.SAMPLE_RATE
    low, high = (torch.sin(2 * math.pi * f * t).float() for f in (1000.0, 6000.0))
    mid = slice(2000, -2000)
    assert float(A.lowpass(low)[mid].abs().max()) > 0.95
    assert float(A.lowpass(high)[mid].abs().max()) < 0.05
    both = A.prepare_waveform(audio_dict(stereo_sine(1.0, left_hz=6000.0)), "audio_1",
                              opts(add_noise_floor=True, smooth_transients=True))
    assert float(both.waveform[mid].abs().max()) < 0.05 and float(both.waveform.abs().max()) > 0


def test_bad_audio_is_reported():
    good = audio_dict(stereo_sine(1.0))
    with pytest.raises(ValueError, match="sample rate 0"):
        A.prepare_waveform({**good, "sample_rate": 0}, "audio_1", opts())
    with pytest.raises(ValueError, match="no samples"):
        A.prepare_waveform({"waveform": torch.zeros(1, 2, 0), "sample_rate": SR_IN}, "audio_1", opts())
    nan = good["waveform"].clone()
    nan[0, 0, 100] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        A.prepare_waveform({"waveform": nan, "sample_rate": SR_IN}, "audio_1", opts())
    with pytest.raises(ValueError, match="channel 5"):
        A.prepare_waveform(good, "audio_1", opts(channel=5))
    with pytest.raises(ValueError, match="AUDIO dict"):
        A.prepare_waveform({"samples": 1}, "audio_1", opts())
    with pytest.raises(ValueError, match="shorter than one video frame"):
        A.prepare_waveform(audio_dict(stereo_sine(0.02)), "audio_2", opts())
    with pytest.raises(ValueError, match="multi_audio_type"):
        A.MultiAudioType.parse("mix")


def test_layout_tracks_para_and_add():
    a, b = torch.ones(10), torch.full((6,), 2.0)
    para = A.layout_tracks([a, b], "para")
    assert [t.shape[0] for t in para] == [10, 10]
    assert torch.equal(para[1][:6], b) and torch.count_nonzero(para[1][6:]) == 0
    add = A.layout_tracks([a, b], A.MultiAudioType.ADD)
    assert [t.shape[0] for t in add] == [16, 16]
    assert torch.count_nonzero(add[0][10:]) == 0 and torch.count_nonzero(add[1][:10]) == 0
    assert torch.equal(A.mix_tracks(add), torch.cat([a, b]))
    assert torch.equal(A.mix_tracks(para)[:6], torch.full((6,), 3.0))


@pytest.fixture(scope="module")
def encoder(fixtures_dir):
    path = fixtures_dir / "ref_wav2vec_a.safetensors"
    meta = json.loads(safe_open(str(path), "pt").metadata()["harness"])
    state = tensor_group(load_file(str(path)), "state_dict")
    return W.encoder_from_state_dict(state, "fp32", meta["hf_config"])


def two_speakers():
    return audio_dict(stereo_sine(1.0)), audio_dict(stereo_sine(0.6, left_hz=300.0))


def test_embeds_para_layout(encoder):
    a1, a2 = two_speakers()
    options = E.EmbedOptions(prep=A.AudioPrepOptions(num_frames=81), audio_scale=1.5, multi_audio_type="para")
    result = E.embed_audio(encoder, [a1, a2, None, None], options)
    f1, f2 = result.embeds.audio_features
    layers, hidden = encoder.num_layers, encoder.hidden_size
    assert f1.shape == f2.shape == (25, layers, hidden)
    assert torch.count_nonzero(f2[15:]) == 0 and torch.count_nonzero(f2[:15]) > 0
    assert torch.count_nonzero(f1[15:]) > 0
    assert result.num_frames == 25 and result.audio["sample_rate"] == 16000
    assert result.audio["waveform"].shape == (1, 1, 16000)
    d = result.embeds.to_dict()
    assert d["audio_scale"] == 1.5 and len(d["audio_features"]) == 2 and d["ref_target_masks"] is None
    assert E.MultiTalkEmbeds.from_dict(d).num_speakers == 2


def test_embeds_add_layout_and_frame_cap(encoder):
    a1, a2 = two_speakers()
    options = E.EmbedOptions(prep=A.AudioPrepOptions(num_frames=30), multi_audio_type="add")
    masks = torch.zeros(3, 8, 8)
    result = E.embed_audio(encoder, [a1, a2], options, ref_target_masks=masks)
    f1, f2 = result.embeds.audio_features
    # speaker 1 talks for 25 frames, then speaker 2; the timeline (40 frames) is cut to num_frames = 30
    assert f1.shape[0] == f2.shape[0] == 30
    assert torch.count_nonzero(f1[25:]) == 0 and torch.count_nonzero(f2[:25]) == 0
    assert torch.count_nonzero(f2[25:]) > 0
    assert result.num_frames == 30
    assert result.audio["waveform"].shape == (1, 1, 30 * 16000 // 25)
    assert result.embeds.ref_target_masks is masks


def test_embeds_waveform_domain_embeds_silence(encoder):
    a1, a2 = two_speakers()
    options = E.EmbedOptions(multi_audio_type="para", layout_domain="waveform")
    f1, f2 = E.embed_audio(encoder, [a1, a2], options).embeds.audio_features
    assert f2.shape == f1.shape and torch.count_nonzero(f2[15:]) > 0


def test_embeds_single_speaker_matches_direct_features(encoder):
    a1, _ = two_speakers()
    result = E.embed_audio(encoder, [a1], E.EmbedOptions())
    prepared = result.speakers[0]
    direct = W.wav2vec_features(encoder, prepared.waveform, 25.0)
    assert torch.equal(result.embeds.audio_features[0], direct)
    assert torch.equal(result.audio["waveform"][0, 0], prepared.waveform)


def test_embeds_reject_silence_ctc_and_bad_masks(encoder):
    silent = audio_dict(np.zeros((SR_IN, 2)))
    with pytest.raises(ValueError, match="silent"):
        E.embed_audio(encoder, [silent], E.EmbedOptions())
    result = E.embed_audio(encoder, [two_speakers()[0], silent], E.EmbedOptions())
    assert result.speakers[1].silent and not result.speakers[0].silent
    with pytest.raises(ValueError, match="no audio"):
        E.embed_audio(encoder, [None], E.EmbedOptions())
    with pytest.raises(ValueError, match="masks"):
        E.embed_audio(encoder, list(two_speakers()), E.EmbedOptions(), ref_target_masks=torch.zeros(1, 4, 4))
    ctc = W.Wav2VecEncoder(encoder.model, False, torch.float32, "facebook/wav2vec2-base-960h", ctc_finetuned=True)
    with pytest.raises(ValueError, match="chinese-wav2vec2-base"):
        E.embed_audio(ctc, [two_speakers()[0]], E.EmbedOptions())


def test_silent_embeds_have_the_requested_length_and_are_silence_features(encoder):
    embeds = E.silent_embeds(encoder, 30)
    assert embeds.num_speakers == 1 and embeds.num_frames == 30
    direct = W.wav2vec_features(encoder, torch.zeros(A.samples_for_frames(30, 25.0)), 25.0)[:30]
    assert torch.equal(embeds.audio_features[0], direct.cpu())
    with pytest.raises(ValueError, match="num_frames"):
        E.silent_embeds(encoder, 0)


@pytest.mark.parametrize("frames", [1, 56, 57, 81, 100, 399, 400, 1001])
@pytest.mark.parametrize("fps", [25.0, 23.976, 30.0])
def test_samples_for_frames_is_the_fewest_that_round_to_the_frame_count(frames, fps):
    samples = A.samples_for_frames(frames, fps)
    assert int(samples / A.SAMPLE_RATE * fps) == frames
    assert int((samples - 1) / A.SAMPLE_RATE * fps) == frames - 1
