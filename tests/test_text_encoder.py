"""The umT5 prompt encoder: Wan2.1's checkpoint layout, numerics against a plain-PyTorch oracle written
from Wan's `wan/modules/t5.py` formulas, tokenization and cleaning, strict loading, the engine's
prompt path and the `avatar encode-prompt` round trip. Tiny random-weight models only."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from typer.testing import CliRunner

from runtime import Engine
from runtime.checkpoint import CheckpointError, save_state_dict
from runtime.cli import app
from runtime.text import PromptEncoder, TextEncoderConfig, load_prompt_embeds, save_prompt_embeds
from runtime.text.tokenize import clean_prompt, load_tokenizer, tokenize
from runtime.text.umt5 import key_map, load_umt5

TINY = TextEncoderConfig.from_preset("tiny")
XXL = TextEncoderConfig.from_preset("umt5-xxl")
WORDS = ("a", "woman", "man", "person", "talks", "smiles", "speaks", "listens", "nods", "the", "at", "to",
         "camera", "slowly", "calmly", "happy", "sad", "news", "studio", "rock", "&", "roll", "it's",
         "fine", "and", "with", "her", "his", "hands", "in", "front", "of", "bright", "light", "dark",
         "room")


# ---- Wan's layout and formulas, written independently of runtime/text --------------------------

def wan_layout(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of Wan's `T5Encoder(shared_pos=False).state_dict()` (what the .pth holds)."""
    d, a, f = cfg.dim, cfg.dim_attn, cfg.dim_ffn
    out = {"token_embedding.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    for i in range(cfg.num_layers):
        out.update({f"blocks.{i}.{k}": s for k, s in {
            "norm1.weight": (d,), "attn.q.weight": (a, d), "attn.k.weight": (a, d), "attn.v.weight": (a, d),
            "attn.o.weight": (d, a), "norm2.weight": (d,), "ffn.gate.0.weight": (f, d),
            "ffn.fc1.weight": (f, d), "ffn.fc2.weight": (d, f),
            "pos_embedding.embedding.weight": (cfg.num_buckets, cfg.num_heads)}.items()})
    return out


def random_wan_state(cfg: TextEncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights at scales where every term matters: norm weights away from 1, a position bias
    large enough to move the softmax, unit-variance activations."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in wan_layout(cfg).items():
        x = torch.randn(shape, generator=g)
        if key.endswith("norm.weight") or ".norm" in key:
            x = 1 + 0.3 * x
        elif "pos_embedding" in key:
            x = 1.5 * x
        elif key != "token_embedding.weight":
            x = x / math.sqrt(shape[1])
        state[key] = x
    return state


def oracle_bucket(rel: torch.Tensor, num_buckets: int, max_dist: int) -> torch.Tensor:
    """T5RelativeEmbedding._relative_position_bucket, bidirectional: half the buckets per direction
    (keys after the query in the upper half), exact up to max_exact, then logarithmic up to max_dist."""
    half = num_buckets // 2
    exact = half // 2
    base = (rel > 0).long() * half
    dist = rel.abs()
    log_part = exact + (torch.log(dist.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    return base + torch.where(dist < exact, dist, log_part.clamp(max=half - 1))


def oracle_rms(x, w, eps):
    y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return w * (y.type_as(w) if w.dtype in (torch.float16, torch.bfloat16) else y)


def oracle_gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def oracle_encode(state, cfg: TextEncoderConfig, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wan's T5Encoder.forward in eval mode, on a Wan-layout state dict; dtype follows the state."""
    B, L = ids.shape
    n, c = cfg.num_heads, cfg.head_dim
    x = state["token_embedding.weight"][ids]
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]  # key position - query position
    bucket = oracle_bucket(rel, cfg.num_buckets, cfg.max_distance)
    for i in range(cfg.num_layers):
        p = {k.removeprefix(f"blocks.{i}."): v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = oracle_rms(x, p["norm1.weight"], cfg.eps)
        q, k, v = (torch.nn.functional.linear(h, p[f"attn.{w}.weight"]).view(B, L, n, c) for w in "qkv")
        bias = x.new_zeros(B, n, L, L) + p["pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask.view(B, 1, 1, L) == 0, torch.finfo(x.dtype).min)
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(c) scaling in T5
        attn = torch.softmax(scores.float(), dim=-1).type_as(scores)
        o = torch.einsum("bnij,bjnc->binc", attn, v).reshape(B, L, n * c)
        x = x + torch.nn.functional.linear(o, p["attn.o.weight"])
        h = oracle_rms(x, p["norm2.weight"], cfg.eps)
        lin = torch.nn.functional.linear
        x = x + lin(lin(h, p["ffn.fc1.weight"]) * oracle_gelu(lin(h, p["ffn.gate.0.weight"])), p["ffn.fc2.weight"])
    return oracle_rms(x, state["norm.weight"], cfg.eps)


# ---- fixtures: a tiny tokenizer and tiny checkpoints in the release layout -----------------------

def write_tokenizer(directory, words=WORDS):
    """A WordLevel tokenizer saved as tokenizer.json + tokenizer_config.json (umT5's special tokens:
    <pad> 0, </s> 1 appended to every sequence, <unk> 2). It splits on single spaces only, so text
    that was not whitespace-cleaned tokenizes differently."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
              "unk_token": "<unk>", "padding_side": "right", "model_max_length": 512}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def write_text_files(root, cfg: TextEncoderConfig, state, fmt: str = "pth"):
    """Wan2.1's release layout: Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/."""
    wan = root / "Wan2.1-T2V-1.3B"
    wan.mkdir(parents=True, exist_ok=True)
    path = wan / f"models_t5_umt5-xxl-enc-bf16.{'pth' if fmt == 'pth' else 'safetensors'}"
    if fmt == "pth":
        torch.save(state, path)  # a plain state dict, as Wan saves it
    else:
        save_state_dict(state, path)
    write_tokenizer(wan / "google" / "umt5-xxl")
    return path, wan / "google" / "umt5-xxl"


@pytest.fixture(scope="module")
def tiny_state():
    return random_wan_state(TINY, seed=1)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_state):
    return write_text_files(tmp_path_factory.mktemp("text"), TINY, tiny_state)


@pytest.fixture(scope="module")
def encoder(tiny_files):
    checkpoint, tokenizer_dir = tiny_files
    return PromptEncoder.from_files(checkpoint, tokenizer_dir, config="tiny", dtype=torch.float32)


def random_batch(cfg, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (len(lengths), cfg.seq_len), generator=g)
    mask = (torch.arange(cfg.seq_len)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


# ---- layout and strict loading --------------------------------------------------------------------

def test_key_map_is_wans_layout_at_full_size():
    """Every key of the real 242-tensor file, with its shape, loads into a model of 5.68 B parameters
    (on the meta device: no memory)."""
    layout = wan_layout(XXL)
    assert len(layout) == 2 + 24 * 10 and set(key_map(XXL)) == set(layout)
    state = {k: torch.empty(s, device="meta", dtype=torch.bfloat16) for k, s in layout.items()}
    model = load_umt5(state, XXL, dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
    assert model.config._attn_implementation == "eager"
    assert model.encoder.embed_tokens.weight is model.shared.weight  # tied: one parameter


@pytest.mark.parametrize("change, words", [
    (lambda s: s.pop("blocks.1.ffn.fc1.weight"), ["1 missing", "blocks.1.ffn.fc1.weight"]),
    (lambda s: s.update({"blocks.2.norm1.weight": torch.ones(48)}), ["1 unexpected", "blocks.2.norm1.weight"]),
    (lambda s: s.update({"blocks.0.attn.o.weight": s["blocks.0.attn.o.weight"].T}),
     ["1 mis-shaped", "blocks.0.attn.o.weight: checkpoint (32, 48) vs model (48, 32)"]),
    (lambda s: s.update({"pos_embedding.embedding.weight": torch.zeros(8, 4)}),  # Wan's shared_pos=True key
     ["1 unexpected", "pos_embedding.embedding.weight"]),
])
def test_strict_loading_names_the_key(tiny_state, change, words):
    state = dict(tiny_state)
    change(state)
    with pytest.raises(CheckpointError) as err:
        load_umt5(state, TINY, dtype=torch.float32, device="cpu")
    for w in words:
        assert w in str(err.value)


def test_wrong_config_for_the_file_is_named(tiny_files):
    checkpoint, tokenizer_dir = tiny_files
    other = dataclasses.replace(TINY, name="other", dim_ffn=96)
    with pytest.raises(CheckpointError, match=r"ffn\.fc1\.weight: checkpoint \(80, 48\) vs model \(96, 48\)"):
        PromptEncoder.from_files(checkpoint, tokenizer_dir, config=other)


def test_config_is_validated():
    with pytest.raises(ValueError, match="dim_attn 30 not divisible by num_heads 4"):
        dataclasses.replace(TINY, dim_attn=30)
    with pytest.raises(ValueError, match="num_buckets must be even"):
        dataclasses.replace(TINY, num_buckets=7)
    with pytest.raises(ValueError, match="unknown text encoder preset 'xl'"):
        TextEncoderConfig.from_preset("xl")


# ---- numerics against the oracle ------------------------------------------------------------------

def test_bucket_oracle_anchors():
    """Hand-computed buckets of umT5-XXL (32 buckets, max distance 128): exact below 8, log above,
    keys after the query in the upper half."""
    rel = torch.tensor([0, -1, 1, -7, -8, -12, -127, -1000, 127, 1000])
    want = [0, 1, 17, 7, 8, 9, 15, 15, 31, 31]
    assert oracle_bucket(rel, 32, 128).tolist() == want


def test_relative_bias_matches_wan_at_full_bucket_config():
    """umT5-XXL's bucketing (32 buckets, distance 128) over 600 positions, past the log range."""
    cfg = dataclasses.replace(TINY, num_buckets=32, max_distance=128, seq_len=600)
    state = random_wan_state(cfg, seed=2)
    model = load_umt5(state, cfg, dtype=torch.float32, device="cpu")
    rel = torch.arange(600)[None, :] - torch.arange(600)[:, None]
    for i in range(cfg.num_layers):
        table = state[f"blocks.{i}.pos_embedding.embedding.weight"]
        want = table[oracle_bucket(rel, 32, 128)].permute(2, 0, 1)[None]
        got = model.encoder.block[i].layer[0].SelfAttention.compute_bias(600, 600)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_encoder_matches_oracle_fp32(tmp_path, fmt):
    state = random_wan_state(TINY, seed=3)
    checkpoint, tokenizer_dir = write_text_files(tmp_path, TINY, state, fmt)
    enc = PromptEncoder.from_files(checkpoint, tokenizer_dir, config="tiny", dtype=torch.float32)
    ids, mask = random_batch(TINY, [TINY.seq_len, 5, 1], seed=4)
    with torch.no_grad():
        got = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = oracle_encode(state, TINY, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A shorter mask changes the real rows: the padding mask is applied, not ignored.
    assert (got[1, :5] - oracle_encode(state, TINY, ids[1:2], torch.ones_like(mask[1:2]))[0, :5]).abs().max() > 1e-2


def test_encoder_matches_oracle_bf16(tiny_state, tiny_files):
    """bf16, Wan's dtype: equal to the oracle run in bf16 (bitwise on this CPU; the tolerance leaves room
    for other kernels) and within bf16 rounding of the fp32 oracle (outputs reach about 4)."""
    enc = PromptEncoder.from_files(*tiny_files, config="tiny", dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    ids, mask = random_batch(TINY, [TINY.seq_len, 9], seed=5)
    with torch.no_grad():
        got = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
    bf16_state = {k: v.bfloat16() for k, v in tiny_state.items()}
    want = oracle_encode(bf16_state, TINY, ids, mask)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    fp32 = oracle_encode(tiny_state, TINY, ids, mask)
    torch.testing.assert_close(got.float(), fp32, rtol=0.1, atol=0.1)


def test_prompt_string_end_to_end(encoder, tiny_state):
    """String -> clean -> tokenize (padded to seq_len) -> encode -> the real tokens' rows (Wan's u[:v])."""
    text = "a  woman\n talks\tto the camera"
    out = encoder(text)
    ids = [encoder.tokenizer.convert_tokens_to_ids(w) for w in ["a", "woman", "talks", "to", "the", "camera"]] + [1]
    assert out.shape == (len(ids), TINY.dim)
    padded = torch.tensor([ids + [0] * (TINY.seq_len - len(ids))])
    mask = (padded != 0).long()
    want = oracle_encode(tiny_state, TINY, padded, mask)[0, : len(ids)]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert encoder.count_tokens(text) == len(ids)


# ---- tokenization ------------------------------------------------------------------------------

def test_clean_prompt_is_wans_whitespace_clean():
    assert clean_prompt("  Itâ€™s &amp;amp;\t fine\n\n ") == "It's & fine"  # ftfy, unescape twice, fold
    assert clean_prompt("a\u3000b\u00a0 c") == "a b c"
    assert clean_prompt("a&#28;b\x1c c") == "ab c"  # control characters go (ftfy / html)


def test_tokenize_pads_to_seq_len_and_refuses_long_prompts(encoder):
    ids, mask = tokenize(encoder.tokenizer, "rock &amp;amp; roll", TINY.seq_len)
    assert ids.shape == mask.shape == (1, TINY.seq_len)
    assert mask[0].tolist() == [1] * 4 + [0] * (TINY.seq_len - 4)
    assert ids[0, :4].tolist() == [encoder.tokenizer.convert_tokens_to_ids(w) for w in ("rock", "&", "roll")] + [1]
    assert ids[0, 4:].eq(0).all()
    fits = " ".join(["a"] * (TINY.seq_len - 1))  # + </s> = seq_len tokens
    assert encoder.count_tokens(fits) == TINY.seq_len
    with pytest.raises(ValueError, match=f"the prompt is {TINY.seq_len + 1} tokens .* at most {TINY.seq_len}"):
        encoder(fits + " a")
    with pytest.raises(TypeError, match="prompt must be a str"):
        encoder(b"bytes")


def test_tokenizer_directory_problems_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(tmp_path / "umt5-xxl")
    d = write_tokenizer(tmp_path / "umt5-xxl")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: tokenizer\.json or spiece\.model"):
        load_tokenizer(d)
    d = write_tokenizer(tmp_path / "left")
    config = json.loads((d / "tokenizer_config.json").read_text()) | {"padding_side": "left"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pads on the left"):
        load_tokenizer(d)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tiny_state):
    d = write_tokenizer(tmp_path / "umt5-xxl", words=[f"w{i}" for i in range(70)])
    with pytest.raises(ValueError, match="tokenizer has 73 tokens but the encoder's vocabulary is 64"):
        PromptEncoder(load_umt5(tiny_state, TINY, dtype=torch.float32, device="cpu"), load_tokenizer(d), TINY)


def test_cache_encodes_each_prompt_once(tiny_files):
    enc = PromptEncoder.from_files(*tiny_files, config="tiny", dtype=torch.float32, cache_size=2)
    calls = []
    enc.model.register_forward_hook(lambda *_: calls.append(1))
    first = enc("a man nods")
    first.zero_()  # callers get copies: the cached embedding is not changed
    again = enc("a man nods")
    assert len(calls) == 1 and again.abs().sum() > 0
    enc("a woman nods")
    enc("a person nods")  # evicts "a man nods" (cache of 2)
    enc("a man nods")
    assert len(calls) == 4


# ---- the engine's prompt path -------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(encoder):
    eng = Engine.from_pretrained("tiny", device="cpu", seed=0)  # its DiT takes [<= 16, 48]: TINY's output
    eng.attach_text_encoder(encoder)
    return eng


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def speech():
    # One block: 9 video frames plus the 0.25 s lookahead, at 1000 samples per frame.
    return (np.random.default_rng(1).standard_normal(13000) * 0.2).clip(-1, 1).astype(np.float32)


def first_block(eng, image, speech, **prompt):
    eng.reset(image, seed=3, **prompt)
    (block,) = eng.step(speech) + eng.drain()   # blocks may still be in flight when step() returns
    return block.frames


def test_prompt_text_equals_its_embedding_and_prompts_differ(engine, image, speech):
    text = "a woman smiles at the camera"
    by_text = first_block(engine, image, speech, prompt=text)
    by_embeds = first_block(engine, image, speech, prompt_embeds=engine.encode_prompt(text).numpy())
    np.testing.assert_array_equal(by_text, by_embeds)
    other = first_block(engine, image, speech, prompt="a man listens calmly")
    assert np.abs(other.astype(int) - by_text.astype(int)).max() > 0
    default = first_block(engine, image, speech)  # no prompt: the all-zero embedding
    assert np.abs(default.astype(int) - by_text.astype(int)).max() > 0


def test_same_prompt_is_encoded_once(engine, image):
    calls = []
    hook = engine.text_encoder.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for _ in range(3):
            engine.reset(image, prompt="his hands in front of the camera")
    finally:
        hook.remove()
    assert len(calls) == 1


def test_bad_prompts_are_refused_and_the_session_kept(engine, image):
    engine.reset(image, prompt="a person nods")
    session = engine._session
    with pytest.raises(ValueError, match="not both"):
        engine.reset(image, prompt_embeds=np.zeros((2, 48), np.float32), prompt="a person nods")
    with pytest.raises(TypeError, match="pass text as prompt="):
        engine.reset(image, "a person nods")
    with pytest.raises(ValueError, match="the prompt is 17 tokens"):
        engine.reset(image, prompt=" ".join(["a"] * 16))
    assert engine._session is session


def test_text_prompt_without_encoder_names_the_files(image):
    eng = Engine.from_pretrained("tiny", device="cpu", seed=0)
    with pytest.raises(RuntimeError, match=r"models_t5_umt5-xxl-enc-bf16\.pth .*google/umt5-xxl/.*prompt_embeds"):
        eng.reset(image, prompt="a woman talks")
    with pytest.raises(ValueError, match="no text encoder"):
        Engine.from_pretrained("tiny", device="cpu", text_encoder=True)


def test_encoder_of_another_width_is_refused(tiny_files):
    eng = Engine.from_pretrained("micro", device="cpu")  # DiT text_dim 16
    with pytest.raises(ValueError, match=r"gives \[<= 16, 48\] embeddings; the DiT takes \[<= 4, 16\]"):
        eng.attach_text_encoder(PromptEncoder.from_files(*tiny_files, config="tiny", dtype=torch.float32))


def test_sessions_of_one_engine_take_text_prompts(engine, image, speech):
    """Three sessions batched in one engine's rounds, each with its own prompt (text or embeddings)."""
    text, other = "a woman smiles at the camera", "a man nods"
    want = first_block(engine, image, speech, prompt=text)
    engine._default_session().close()  # the one-session shorthand's session ends; the three below batch
    prompts = [{"prompt": text}, {"prompt_embeds": engine.encode_prompt(text)}, {"prompt": other}]
    sessions = [engine.open(image, seed=3, **p) for p in prompts]
    try:
        blocks = [s.step(speech) for s in sessions]
        frames = [(b + s.drain())[0].frames.astype(int) for b, s in zip(blocks, sessions)]
    finally:
        for s in sessions:
            s.close()
    # same prompt as text and as embeddings, in rows 0 and 1 of one batched GEMM: the CPU kernels may
    # round a row differently by its position (docs/engine.md), by at most one level
    assert np.abs(frames[0] - frames[1]).max() <= 1
    assert np.abs(frames[0] - want).max() <= 1  # batched rows vs one row: float rounding (docs/engine.md)
    assert np.abs(frames[2] - frames[0]).max() > 1


# ---- release directory discovery ------------------------------------------------------------------

MICRO_TEXT = dataclasses.replace(TINY, name="micro-text", dim=16, dim_attn=16, dim_ffn=32, num_heads=2, seq_len=4)


@pytest.fixture(scope="module")
def micro_release(tmp_path_factory):
    from tests.test_release_loading import _write_release

    root = tmp_path_factory.mktemp("release")
    _write_release(root, Engine.from_pretrained("micro", device="cpu", seed=11))
    write_text_files(root, MICRO_TEXT, random_wan_state(MICRO_TEXT, seed=6))
    return root


def test_release_directory_finds_the_text_encoder(micro_release):
    kw = {"device": "cpu", "config": "micro", "text_config": MICRO_TEXT}
    eng = Engine.from_pretrained(str(micro_release), text_dtype=torch.float32, **kw)
    assert eng.text_encoder is not None and eng.text_encoder.dtype == torch.float32
    assert eng.encode_prompt("a woman talks").shape == (4, 16)
    assert Engine.from_pretrained(str(micro_release), **kw).text_encoder.dtype == torch.bfloat16  # Wan's dtype
    skipped = Engine.from_pretrained(str(micro_release), text_encoder=False, **kw)
    assert skipped.text_encoder is None
    with pytest.raises(RuntimeError, match=r"skipped \(text_encoder=False\)"):
        skipped.encode_prompt("a woman talks")


def test_release_directory_without_tokenizer(micro_release, tmp_path):
    import shutil

    root = tmp_path / "release"
    shutil.copytree(micro_release, root)
    shutil.rmtree(root / "Wan2.1-T2V-1.3B" / "google")
    kw = {"device": "cpu", "config": "micro", "text_config": MICRO_TEXT}
    eng = Engine.from_pretrained(str(root), **kw)  # optional: the engine loads without it
    with pytest.raises(RuntimeError, match=r"none was found under .*release \(no google/umt5-xxl/ tokenizer"):
        eng.encode_prompt("a woman talks")
    with pytest.raises(FileNotFoundError, match="release: found no google/umt5-xxl/ tokenizer directory"):
        Engine.from_pretrained(str(root), text_encoder=True, **kw)


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_encode_prompt_round_trip(tmp_path, tiny_state, encoder, engine, image, speech):
    write_text_files(tmp_path / "ckpt", TINY, tiny_state)
    out = tmp_path / "embeds.safetensors"
    args = ["encode-prompt", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "a woman smiles at the camera",
            "--out", str(out), "--text-config", "tiny", "--dtype", "float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "[7, 48]" in result.output
    embeds = load_prompt_embeds(out)
    torch.testing.assert_close(embeds, encoder("a woman smiles at the camera"), rtol=0, atol=0)
    np.testing.assert_array_equal(first_block(engine, image, speech, prompt_embeds=embeds),
                                  first_block(engine, image, speech, prompt="a woman smiles at the camera"))
    result = CliRunner().invoke(app, args[:3] + ["--prompt", " ".join(["a"] * 16)] + args[5:])
    assert result.exit_code == 2 and "17 tokens" in result.output


def test_prompt_embeds_file_problems_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prompt_embeds(tmp_path / "none.safetensors")
    save_state_dict({"x": torch.zeros(2, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"no tensor named 'prompt_embeds' \(found \['x'\]\)"):
        load_prompt_embeds(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"must be \[L, dim\]"):
        save_prompt_embeds(tmp_path / "bad.safetensors", torch.zeros(1, 2, 3))


def test_cli_demo_prompt_options(tmp_path):
    embeds = tmp_path / "e.safetensors"
    save_prompt_embeds(embeds, torch.randn(3, 48))
    base = ["demo", "--out", str(tmp_path / "o.mp4"), "--seconds", "0.6", "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(app, base + ["--prompt-embeds", str(embeds)])
    assert result.exit_code == 0, result.output
    for extra, words in ((["--prompt", "a woman"], "needs the umT5 text encoder"),
                         (["--prompt", "a", "--prompt-embeds", str(embeds)], "not both")):
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2 and words in result.output, result.output
    save_prompt_embeds(embeds, torch.randn(3, 47))
    result = CliRunner().invoke(app, base + ["--prompt-embeds", str(embeds)])
    assert result.exit_code == 2 and "prompt_embeds must be [L, 48]" in result.output, result.output
