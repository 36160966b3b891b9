"""wav2vec2 front end: parity with the official InfiniteTalk embedding (fixtures.md §4), loading, precision."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Wav2Vec2Config, Wav2Vec2Model

from infinitetalk.multitalk import wav2vec as W
from parity import tensor_group

TOL = 1e-5


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    path = fixtures_dir / "ref_wav2vec_a.safetensors"
    meta = json.loads(safe_open(str(path), "pt").metadata()["harness"])
    tensors = load_file(str(path))
    state = tensor_group(tensors, "state_dict")
    return meta, tensors, state


def fairseq_naming(state):
    """``wav2vec2.`` prefix and weight_g / weight_v, as in chinese-wav2vec2-base's converted checkpoint."""
    out = {}
    for key, value in state.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        out["wav2vec2." + key] = value
    return out


def write_config_beside(path, hf_config):
    (path.parent / "config.json").write_text(json.dumps(hf_config))


@pytest.mark.parametrize("naming", ["bare_parametrizations", "prefixed_weight_g"])
def test_fixture_parity_from_safetensors(fixture, tmp_path, naming):
    meta, t, state = fixture
    weights = state if naming == "bare_parametrizations" else fairseq_naming(state)
    path = tmp_path / "wav2vec.safetensors"
    save_file(weights, str(path))
    write_config_beside(path, meta["hf_config"])
    enc = W.load_wav2vec(path, "fp32")
    assert enc.do_normalize is False and not enc.ctc_finetuned
    out = W.wav2vec_features(enc, t["inputs.waveform"], 25.0)
    assert out.shape == t["outputs.audio_emb"].shape
    assert (out - t["outputs.audio_emb"]).abs().max() < TOL


def test_fixture_intermediates(fixture):
    meta, t, state = fixture
    enc = W.encoder_from_state_dict(state, "fp32", meta["hf_config"])
    values = W.input_values(t["inputs.waveform"], False)
    assert torch.equal(values, t["inputs.input_values"])
    with torch.no_grad():
        conv = W.conv_features(enc.model, values)
        assert (conv - t["intermediates.conv_features"]).abs().max() < TOL
        frames = W.frame_count(t["inputs.waveform"].shape[0], 25.0)
        interp = W.interpolate_frames(conv, frames)
        assert (interp - t["intermediates.interpolated_features"]).abs().max() < TOL
        proj = W.project_features(enc.model, interp, torch.float32)
        assert (proj - t["intermediates.projected"]).abs().max() < TOL
        states = W.encoder_hidden_states(enc.model, proj)
    assert len(states) == meta["hf_config"]["num_hidden_layers"] + 1
    assert (states[0] - t["intermediates.hidden_state_0"]).abs().max() < TOL


def test_fixture_normalized_input(fixture):
    meta, t, state = fixture
    enc = W.encoder_from_state_dict(fairseq_naming(state), "fp32", meta["hf_config"], do_normalize=True)
    values = W.input_values(t["inputs.waveform"], True)
    assert (values - t["inputs.input_values_normalized"]).abs().max() < 1e-5
    out = W.wav2vec_features(enc, t["inputs.waveform"], 25.0)
    assert (out - t["outputs.audio_emb_normalized"]).abs().max() < TOL
    assert (out - t["outputs.audio_emb"]).abs().max() > 1e-4


def test_config_sizes_come_from_the_state_dict(fixture):
    meta, _, state = fixture
    hf = meta["hf_config"]
    cfg = W.config_from_state_dict(state, hf)
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "conv_dim", "conv_kernel",
                "conv_stride", "conv_bias", "feat_extract_norm", "num_conv_pos_embeddings",
                "num_conv_pos_embedding_groups", "num_attention_heads"):
        assert getattr(cfg, key) == hf[key], key
    bundled = W.config_from_state_dict(state)
    assert bundled.hidden_size == hf["hidden_size"] and bundled.num_hidden_layers == hf["num_hidden_layers"]
    assert W.bundled_config()["hidden_size"] == 768 and W.bundled_config()["num_attention_heads"] == 12


def test_huggingface_folder_with_bin_and_preprocessor(fixture, tmp_path):
    meta, t, state = fixture
    folder = tmp_path / "TencentGameMate" / "chinese-wav2vec2-base"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(meta["hf_config"]))
    heads = {"quantizer.codevectors": torch.zeros(1, 4, 2), "project_q.weight": torch.zeros(2, 2)}
    torch.save({**fairseq_naming(state), **heads}, folder / "pytorch_model.bin")
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    enc = W.load_wav2vec(folder, "fp32")
    assert enc.model_type == "TencentGameMate/chinese-wav2vec2-base" and enc.do_normalize
    out = W.wav2vec_features(enc, t["inputs.waveform"], 25.0)
    assert (out - t["outputs.audio_emb_normalized"]).abs().max() < TOL


def test_rejects_non_wav2vec_and_ctc_models(fixture, tmp_path):
    meta, _, state = fixture
    bad = tmp_path / "vae.safetensors"
    save_file({"decoder.conv1.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match="not a wav2vec2 model"):
        W.load_wav2vec(bad)
    ctc = {**fairseq_naming(state), "lm_head.weight": torch.zeros(32, meta["hf_config"]["hidden_size"]),
           "lm_head.bias": torch.zeros(32)}
    enc = W.encoder_from_state_dict(ctc, "fp32", meta["hf_config"], model_type="facebook/wav2vec2-base-960h")
    assert enc.ctc_finetuned
    with pytest.raises(ValueError, match="chinese-wav2vec2-base"):
        enc.check_multitalk()
    with pytest.raises(ValueError, match="precision"):
        W.encoder_from_state_dict(state, "fp8", meta["hf_config"])


@pytest.mark.parametrize("precision, rel_tol", [("bf16", 5e-2), ("fp16", 1e-2)])
def test_half_precisions_keep_conv_encoder_fp32(fixture, precision, rel_tol):
    meta, t, state = fixture
    enc = W.encoder_from_state_dict(state, precision, meta["hf_config"])
    assert all(p.dtype == torch.float32 for p in enc.model.feature_extractor.parameters())
    assert enc.model.encoder.layers[0].attention.q_proj.weight.dtype == W.PRECISIONS[precision]
    out = W.wav2vec_features(enc, t["inputs.waveform"], 25.0)
    ref = t["outputs.audio_emb"]
    assert out.dtype == W.PRECISIONS[precision]
    assert (out.float() - ref).abs().max() / ref.abs().max() < rel_tol


def test_audio_shorter_than_one_frame_or_receptive_field(fixture):
    meta, t, state = fixture
    enc = W.encoder_from_state_dict(state, "fp32", meta["hf_config"])
    with pytest.raises(ValueError, match="longer audio"):
        W.wav2vec_features(enc, t["inputs.waveform"][:500], 25.0)
    with pytest.raises(ValueError, match="longer audio"):
        W.wav2vec_features(enc, t["inputs.waveform"][:300], 60.0)
    assert W.receptive_field(enc.model.config) == 400


def _random_variant(stable: bool) -> Wav2Vec2Model:
    """A second configuration with other sizes, built and randomly initialised by transformers itself."""
    cfg = Wav2Vec2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
                         conv_dim=[16, 20, 20], conv_kernel=[10, 4, 3], conv_stride=[5, 3, 2], conv_bias=True,
                         feat_extract_norm="layer" if stable else "group", do_stable_layer_norm=stable,
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_prob=0.0)
    torch.manual_seed(3)
    return Wav2Vec2Model(cfg).eval()


@pytest.mark.parametrize("stable", [False, True])
def test_own_forward_matches_transformers_hidden_states(stable, tmp_path):
    ref_model = _random_variant(stable)
    path = tmp_path / "variant.safetensors"
    save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()}, str(path))
    write_config_beside(path, ref_model.config.to_dict())
    enc = W.load_wav2vec(path, "fp32")
    assert enc.model.config.num_attention_heads == 3 and enc.model.config.conv_bias
    wave = torch.randn(8000, generator=torch.Generator().manual_seed(5)) * 0.1
    with torch.no_grad():
        n50 = ref_model.feature_extractor(wave[None]).shape[-1]
        ref = ref_model(wave[None], output_hidden_states=True)
    fps = (n50 + 0.5) * W.SAMPLE_RATE / wave.shape[0]
    out = W.wav2vec_features(enc, wave, fps)
    assert out.shape[0] == n50
    # layers 1..L-1 as transformers reports them; the last state equals last_hidden_state (for pre-LN models
    # transformers 4.x reports it after the encoder LayerNorm, 5.x before; we keep the 4.x meaning)
    expected = torch.stack(ref.hidden_states[1:-1], dim=2)[0]
    assert (out[:, :-1] - expected).abs().max() < TOL
    assert (out[:, -1] - ref.last_hidden_state[0]).abs().max() < TOL
