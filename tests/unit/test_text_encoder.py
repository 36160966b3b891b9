"""umT5 encoder, tokenizer discovery, prompt parsing and the text-embedding disk cache.

Parity against every ``ref_t5_*.safetensors`` fixture; checkpoints and tokenizers are real files written to
tmp_path (a tiny sentencepiece model is trained on the fly).
"""
import io
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitetalk.wanvideo.text_cache import EncoderIdentity, TextEmbedCache, cached_encode
from infinitetalk.wanvideo.text_encoder import (T5LoadOptions, T5TextEncoder, build_umt5, encode_text_embeds,
                                                load_text_encoder, prepare_t5_state_dict, relative_position_bucket)
from infinitetalk.wanvideo.tokenizer import (UMT5Tokenizer, clean_text, find_tokenizer, parse_prompt_weights,
                                             split_prompts)
from parity import tensor_group

SENTENCES = ["the quick brown fox jumps over the lazy dog", "a talking woman sings a song in the park",
             "hello world this is a tiny tokenizer", "video of a man speaking to the camera with a calm voice"]


def _fixture_files(fixtures_dir: Path) -> list[Path]:
    files = sorted(fixtures_dir.glob("ref_t5_*.safetensors"))
    assert files, f"no ref_t5_*.safetensors in {fixtures_dir}"
    return files


@pytest.fixture(scope="module")
def t5_fixtures(fixtures_dir):
    return [load_file(str(p)) for p in _fixture_files(fixtures_dir)]


@pytest.fixture(scope="module")
def t5_fixture(t5_fixtures):
    return t5_fixtures[0]


def _state_dict(fixture: dict) -> dict:
    return tensor_group(fixture, "state_dict")


def _to_hf_layout(sd: dict) -> dict:
    """Wan-layout umT5 keys -> Hugging Face UMT5EncoderModel keys (the inverse of the loader's rename)."""
    block = {"norm1.weight": "layer.0.layer_norm.weight", "attn.q.weight": "layer.0.SelfAttention.q.weight",
             "attn.k.weight": "layer.0.SelfAttention.k.weight", "attn.v.weight": "layer.0.SelfAttention.v.weight",
             "attn.o.weight": "layer.0.SelfAttention.o.weight",
             "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
             "norm2.weight": "layer.1.layer_norm.weight", "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
             "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight", "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    out = {"shared.weight": sd["token_embedding.weight"], "encoder.final_layer_norm.weight": sd["norm.weight"]}
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            out[f"encoder.block.{n}.{block[rest]}"] = value
    return out


@pytest.fixture(scope="module")
def spiece_bytes() -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 10), model_writer=model, vocab_size=60, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1)
    return model.getvalue()


def _write_tokenizer_json(spiece: bytes, path: Path) -> None:
    """A tokenizer.json (Unigram + Metaspace) with the sentencepiece model's pieces and scores."""
    import sentencepiece
    from tokenizers import Tokenizer, models, pre_tokenizers

    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.save(str(path))


# ------------------------------------------------------------------------------------------------------ parity

def test_parity_with_fixtures(t5_fixtures):
    for fx in t5_fixtures:
        model = build_umt5(prepare_t5_state_dict(_state_dict(fx)).state_dict, "fp32")
        ids, mask = fx["inputs.ids"], fx["inputs.mask"]
        length = ids.shape[1]
        pos = torch.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], model.config.num_buckets, model.config.max_dist)
        assert torch.equal(buckets, fx["intermediates.rel_buckets"])
        captured = {}
        hooks = [b.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
                 for i, b in enumerate(model.blocks)]
        with torch.inference_mode():
            hidden = model(ids, mask)
        for h in hooks:
            h.remove()
        for i in range(model.config.num_layers):
            assert (captured[i] - fx[f"intermediates.blocks.{i}"]).abs().max() <= 1e-5, f"block {i}"
        assert (hidden - fx["outputs.hidden_states"]).abs().max() <= 1e-5
        context = model.encode(ids, mask)
        assert len(context) == ids.shape[0]
        for i, ctx in enumerate(context):
            ref = fx[f"outputs.context.{i}"]
            assert ctx.shape == ref.shape
            assert (ctx - ref).abs().max() <= 1e-5


def test_real_size_config_from_meta_shapes():
    """umT5-XXL shapes (on the meta device, nothing allocated): 64 heads from the [32, 64] position table."""
    dims = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096)}
    sd = {"shared.weight": torch.empty(256384, 4096, device="meta"),
          "encoder.final_layer_norm.weight": torch.empty(4096, device="meta")}
    for n in range(24):
        pre = f"encoder.block.{n}.layer."
        sd.update({pre + f"0.SelfAttention.{p}.weight": torch.empty(*s, device="meta") for p, s in dims.items()})
        sd[pre + "0.SelfAttention.relative_attention_bias.weight"] = torch.empty(32, 64, device="meta")
        sd[pre + "0.layer_norm.weight"] = torch.empty(4096, device="meta")
        sd[pre + "1.layer_norm.weight"] = torch.empty(4096, device="meta")
        sd[pre + "1.DenseReluDense.wi_0.weight"] = torch.empty(10240, 4096, device="meta")
        sd[pre + "1.DenseReluDense.wi_1.weight"] = torch.empty(10240, 4096, device="meta")
        sd[pre + "1.DenseReluDense.wo.weight"] = torch.empty(4096, 10240, device="meta")
    ckpt = prepare_t5_state_dict(sd, "umt5_xxl_fp16.safetensors")
    assert ckpt.layout == "huggingface" and ckpt.spiece_model is None
    model = build_umt5(ckpt.state_dict, "bf16", "fp8_e4m3fn")
    cfg = model.config
    assert (cfg.vocab_size, cfg.dim, cfg.num_heads, cfg.head_dim, cfg.dim_ffn, cfg.num_layers, cfg.num_buckets) == (
        256384, 4096, 64, 64, 10240, 24, 32)
    assert model.blocks[23].ffn.fc2.weight.dtype == torch.float8_e4m3fn


def test_config_from_shapes(t5_fixture, fixtures_dir):
    meta = json.loads(safe_open(str(_fixture_files(fixtures_dir)[0]), "pt").metadata()["harness"])["config"]
    cfg = build_umt5(_state_dict(t5_fixture), "fp32").config
    assert (cfg.vocab_size, cfg.dim, cfg.dim_attn, cfg.dim_ffn, cfg.num_heads, cfg.num_layers) == (
        meta["vocab_size"], meta["dim"], meta["dim_attn"], meta["dim_ffn"], meta["num_heads"], meta["encoder_layers"])


def test_hf_layout_file_with_embedded_tokenizer(t5_fixture, spiece_bytes, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    sd = _to_hf_layout(_state_dict(t5_fixture))
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    path = tmp_path / "umt5_hf.safetensors"
    save_file(sd, str(path))
    encoder = load_text_encoder(path, T5LoadOptions(precision="fp32"))
    assert "spiece_model" in encoder.tokenizer.source
    context = encoder.model.encode(t5_fixture["inputs.ids"], t5_fixture["inputs.mask"])
    for i, ctx in enumerate(context):
        assert (ctx - t5_fixture[f"outputs.context.{i}"]).abs().max() <= 1e-5
    prompts = ["hello world", "  a   talking &amp; woman  "]
    out = encoder(prompts)
    expected = [len(encoder.tokenizer.encode(p)) for p in prompts]
    assert [o.shape for o in out] == [torch.Size([n, t5_fixture["state_dict.norm.weight"].shape[0]]) for n in expected]
    assert all(o.dtype == torch.float32 for o in out)


def test_bf16_and_fp8_storage(t5_fixture):
    ids, mask = t5_fixture["inputs.ids"], t5_fixture["inputs.mask"]
    ref, real = t5_fixture["outputs.hidden_states"], mask.bool()
    sd = _state_dict(t5_fixture)
    bf16 = build_umt5(dict(sd), "bf16")
    fp8 = build_umt5(dict(sd), "bf16", "fp8_e4m3fn")
    assert len(sd) == len(_state_dict(t5_fixture))
    assert fp8.blocks[0].attn.q.weight.dtype == torch.float8_e4m3fn
    assert fp8.blocks[0].ffn.gate[0].weight.dtype == torch.float8_e4m3fn
    assert fp8.token_embedding.weight.dtype == torch.bfloat16 and fp8.norm.weight.dtype == torch.bfloat16
    assert fp8.blocks[0].pos_embedding.embedding.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        out_bf16, out_fp8 = bf16(ids, mask), fp8(ids, mask)
    assert out_bf16.dtype == out_fp8.dtype == torch.bfloat16
    # the tiny random encoder amplifies rounding (bf16 alone is up to 15 % off); fp8 must stay strongly correlated
    cos_fp8 = torch.nn.functional.cosine_similarity(out_fp8.float()[real], out_bf16.float()[real], dim=-1)
    assert not torch.equal(out_fp8, out_bf16) and cos_fp8.mean() > 0.9
    cos = torch.nn.functional.cosine_similarity(out_bf16.float()[real], ref[real], dim=-1)
    assert cos.mean() > 0.99
    assert (out_bf16.float() - ref)[real].norm() / ref[real].norm() < 0.15


def test_fp8_file_switches_quantization(t5_fixture, spiece_bytes, tmp_path):
    sd = {k: (v.to(torch.float8_e4m3fn) if ".attn." in k or ".ffn." in k else v)
          for k, v in _state_dict(t5_fixture).items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    path = tmp_path / "umt5-xxl-enc-fp8_e4m3fn.safetensors"
    save_file(sd, str(path))
    encoder = load_text_encoder(path, T5LoadOptions(precision="bf16", quantization="disabled"))
    assert encoder.model.blocks[1].attn.o.weight.dtype == torch.float8_e4m3fn
    assert encoder(["hello"])[0].dtype == torch.bfloat16


def test_rejects_bad_checkpoints(t5_fixture, fixtures_dir):
    sd = _state_dict(t5_fixture)
    scaled = dict(sd, scaled_fp8=torch.zeros(0), **{"blocks.0.attn.q.scale_weight": torch.ones(())})
    with pytest.raises(ValueError, match="scaled-fp8"):
        prepare_t5_state_dict(scaled, "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    clip = load_file(str(fixtures_dir / "ref_clip_a.safetensors"))
    with pytest.raises(ValueError, match="not a umT5 encoder"):
        prepare_t5_state_dict({k: v for k, v in clip.items() if k.startswith("state_dict.")}, "clip.safetensors")
    shared_pos = {k: v for k, v in _to_hf_layout(sd).items()
                  if "relative_attention_bias" not in k or k.startswith("encoder.block.0.")}
    with pytest.raises(ValueError, match="only in block 0"):
        prepare_t5_state_dict(shared_pos, "t5xxl_fp16.safetensors")
    truncated = {k: v for k, v in sd.items() if k != "blocks.1.norm2.weight"}
    with pytest.raises(ValueError, match="missing"):
        prepare_t5_state_dict(truncated, "broken.safetensors")
    with pytest.raises(ValueError, match="precision"):
        build_umt5(sd, "fp16")


# ------------------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_ids_padding_truncation(spiece_bytes):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece_bytes)
    tok = UMT5Tokenizer.from_spiece_bytes(spiece_bytes, "test", max_length=12)
    ids, mask = tok(["hello  world\n", "the quick brown fox jumps over the lazy dog"])
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == torch.int64
    first = sp.encode("hello world") + [1]
    assert ids[0, : len(first)].tolist() == first and mask[0].sum() == len(first)
    assert (ids[0, len(first):] == 0).all()
    assert mask[1].sum() == 12 and ids[1, -1] == 1
    assert ids[1, :11].tolist() == sp.encode("the quick brown fox jumps over the lazy dog")[:11]
    short_ids, _ = tok(["hello"], pad_to_max_length=False)
    assert short_ids.shape == (1, len(sp.encode("hello")) + 1)
    assert clean_text("  a &amp;amp; b\t\n c  ") == "a & b c"


def test_tokenizer_discovery_order(spiece_bytes, tmp_path, monkeypatch):
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    models = tmp_path / "text_encoders"
    models.mkdir()
    encoder_file = models / "umt5-xxl-enc-bf16.safetensors"
    encoder_file.write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        find_tokenizer(encoder_file)
    message = str(err.value)
    assert "google/umt5-xxl" in message and str(models / "umt5-xxl") in message and "spiece.model" in message

    snapshot = hf_home / "hub" / "models--google--umt5-xxl" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "spiece.model").write_bytes(spiece_bytes)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert find_tokenizer(encoder_file).source == str(snapshot / "spiece.model")

    folder = models / "google" / "umt5-xxl"
    folder.mkdir(parents=True)
    _write_tokenizer_json(spiece_bytes, folder / "tokenizer.json")
    json_tok = find_tokenizer(encoder_file)
    assert json_tok.source == str(folder / "tokenizer.json")
    sp_tok = UMT5Tokenizer.from_spiece_bytes(spiece_bytes, "reference")
    for text in SENTENCES + ["zebra  talking fox"]:
        assert json_tok.encode(text) == sp_tok.encode(text)

    embedded = find_tokenizer(encoder_file, embedded=spiece_bytes)
    assert "spiece_model" in embedded.source


def test_tokenizer_rejects_non_umt5(tmp_path):
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 10), model_writer=model,
                                             vocab_size=40, hard_vocab_limit=False, num_threads=1)
    with pytest.raises(ValueError, match="<pad>"):
        UMT5Tokenizer.from_spiece_bytes(model.getvalue(), "llama-style.model")


def test_prompt_parsing():
    assert parse_prompt_weights("a (red:1.5) car").text == "a red car"
    assert parse_prompt_weights("a (red:1.5) car").weight == pytest.approx(1.5)
    both = parse_prompt_weights("(a:2) b (c:.5)")
    assert both.text == "a b c" and both.weight == pytest.approx(1.0)
    assert parse_prompt_weights("no (weight here) or (bad:x)").text == "no (weight here) or (bad:x)"
    assert parse_prompt_weights("no (weight here) or (bad:x)").weight == 1.0
    segments = split_prompts(" first | (second:0.5) |third")
    assert [s.text for s in segments] == ["first", "second", "third"]
    assert [s.weight for s in segments] == [1.0, 0.5, 1.0]
    assert [(s.text, s.weight) for s in split_prompts("")] == [("", 1.0)]


# ------------------------------------------------------------------------------------------------------ cache

class CountingEncoder:
    """Wraps a real T5TextEncoder and records which prompts reached it."""

    def __init__(self, encoder: T5TextEncoder):
        self.encoder = encoder
        self.calls: list[list[str]] = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return self.encoder(prompts)


@pytest.fixture()
def tiny_encoder(t5_fixture, spiece_bytes):
    model = build_umt5(_state_dict(t5_fixture), "fp32")
    return T5TextEncoder(model, UMT5Tokenizer.from_spiece_bytes(spiece_bytes, "test"))


def test_encode_text_embeds_weights_and_lists(tiny_encoder):
    embeds = encode_text_embeds("hello world | (a talking woman:0.5)", "lazy dog", tiny_encoder)
    plain = tiny_encoder(["hello world", "a talking woman", "lazy dog"])
    assert len(embeds.prompt_embeds) == 2 and len(embeds.negative_prompt_embeds) == 1
    assert torch.allclose(embeds.prompt_embeds[0], plain[0])
    assert torch.allclose(embeds.prompt_embeds[1], plain[1] * 0.5)
    assert torch.allclose(embeds.negative_prompt_embeds[0], plain[2])
    assert embeds.to_dict()["echoshot"] is False


def test_disk_cache_hit_miss_invalidation(tiny_encoder, tmp_path):
    encoder_file = tmp_path / "umt5.safetensors"
    encoder_file.write_bytes(b"x" * 10)
    identity = EncoderIdentity.from_file(encoder_file, "fp32")
    cache = TextEmbedCache(tmp_path / "cache")
    counting = CountingEncoder(tiny_encoder)
    first = encode_text_embeds("hello world", "lazy dog", counting, cache, identity)
    assert counting.calls == [["hello world", "lazy dog"]]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    second = encode_text_embeds("hello world", "lazy dog", counting, cache, identity)
    assert len(counting.calls) == 1
    assert torch.equal(second.prompt_embeds[0], first.prompt_embeds[0])
    assert torch.equal(second.negative_prompt_embeds[0], first.negative_prompt_embeds[0])
    offline = encode_text_embeds("hello world", "lazy dog", None, cache, identity)
    assert torch.equal(offline.prompt_embeds[0], first.prompt_embeds[0])

    encode_text_embeds("hello world", "lazy dog", counting, cache, EncoderIdentity.from_file(encoder_file, "bf16"))
    assert len(counting.calls) == 2
    encoder_file.write_bytes(b"y" * 11)
    os.utime(encoder_file, ns=(1, 1))
    changed = EncoderIdentity.from_file(encoder_file, "fp32")
    assert changed != identity
    encode_text_embeds("hello world", "lazy dog", counting, cache, changed)
    assert len(counting.calls) == 3
    with pytest.raises(RuntimeError, match="not in the text-embedding cache"):
        encode_text_embeds("something new", "lazy dog", None, cache, identity)


def test_disk_cache_corrupt_file_is_a_miss(tiny_encoder, tmp_path):
    identity = EncoderIdentity(name="umt5.safetensors", size=1, mtime_ns=2, variant="fp32")
    cache = TextEmbedCache(tmp_path)
    cache.path_for("hello", identity).write_bytes(b"not a safetensors file")
    assert cache.load("hello", identity) is None
    out = cached_encode(["hello", "hello"], tiny_encoder, cache, identity)
    assert len(out) == 2 and torch.equal(out[0], out[1])
    assert torch.equal(cache.load("hello", identity)[0], out[0])


def test_tokenizer_vocab_mismatch_is_reported(t5_fixture, spiece_bytes):
    sd = _state_dict(t5_fixture)
    sd["token_embedding.weight"] = sd["token_embedding.weight"][:10]
    encoder = T5TextEncoder(build_umt5(sd, "fp32"), UMT5Tokenizer.from_spiece_bytes(spiece_bytes, "small.model"))
    with pytest.raises(ValueError, match="beyond the encoder's vocabulary of 10"):
        encoder(["the quick brown fox"])
