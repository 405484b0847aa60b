"""The Live Avatar forward on the tiny preset: shapes, determinism, the two modulation slots, the causal
audio encoder, the RoPE placement of reference and motion tokens, bf16 against fp32, and the whole
forward against an oracle written in upstream's formulation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.families.liveavatar import LiveAvatarConfig, build_liveavatar, randomize_weights
from runtime.families.liveavatar.motion import motion_positions, noisy_positions, reference_positions
from runtime.families.liveavatar.rope import Positions, Rope, apply_rope

TINY = LiveAvatarConfig.from_preset("tiny")
NF, LH, LW = 3, 8, 8  # one block of 3 latent frames at a tiny 8x8 latent (4x4 tokens)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: thread hand-offs cost more than the maths (and other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return randomize_weights(build_liveavatar(TINY, dtype=torch.float32), seed=0)


def _inputs(seed=0, t=700.0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    return {"x": r(1, 16, NF, LH, LW), "t": t, "ref_latent": r(1, 16, 1, LH, LW),
            "motion_latents": r(1, 16, 19, LH, LW), "prompt_embeds": r(1, 5, TINY.text_dim),
            "audio_features": r(1, TINY.audio_layers, TINY.audio_dim, 4 * NF)}


# ---- an oracle in upstream's formulation ----------------------------------------------------------
# Everything below is re-derived from the upstream sources, not from runtime/families/liveavatar: one joint
# sequence [noisy | ref | motion] with Live Avatar's training block mask (causal_model_s2v.py,
# _prepare_blockwise_causal_attn_mask), per-token modulation by segment (zero_timestep), RoPE as
# complex float64 multipliers placed by rope_precompute's grid groups, audio via MotionEncoder_tc.

def _rope_params(n, dim):
    freqs = torch.outer(torch.arange(n), 1.0 / torch.pow(10000, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
    return torch.polar(torch.ones_like(freqs), freqs)


def _rope_precompute(seq_len, head_dim, grid_groups):
    """s2v_utils.rope_precompute for one sample: grid groups [(start), (end), (range)] in sequence order."""
    d = head_dim
    freqs = torch.cat([_rope_params(1024, d - 4 * (d // 6)), _rope_params(1024, 2 * (d // 6)),
                       _rope_params(1024, 2 * (d // 6))], dim=1)
    c = d // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    out = torch.zeros(seq_len, c, dtype=torch.complex128)
    at = 0
    for (f_o, h_o, w_o), (f, h, w), (t_f, t_h, t_w) in grid_groups:
        seq_f, seq_h, seq_w = f - f_o, h - h_o, w - w_o
        if f_o >= 0:
            f_sam = np.linspace(f_o, t_f + f_o - 1, seq_f).astype(int).tolist()
        else:
            f_sam = np.linspace(-f_o, -t_f - f_o + 1, seq_f).astype(int).tolist()
        h_sam = np.linspace(h_o, t_h + h_o - 1, seq_h).astype(int).tolist()
        w_sam = np.linspace(w_o, t_w + w_o - 1, seq_w).astype(int).tolist()
        f0 = freqs[0][f_sam] if f_o >= 0 else freqs[0][f_sam].conj()
        block = torch.cat([f0.view(seq_f, 1, 1, -1).expand(seq_f, seq_h, seq_w, -1),
                           freqs[1][h_sam].view(1, seq_h, 1, -1).expand(seq_f, seq_h, seq_w, -1),
                           freqs[2][w_sam].view(1, 1, seq_w, -1).expand(seq_f, seq_h, seq_w, -1)], dim=-1)
        n = seq_f * seq_h * seq_w
        out[at:at + n] = block.reshape(n, -1)
        at += n
    assert at == seq_len
    return out


def _rope_apply(x, freqs):  # x [L, H, D]
    xc = torch.view_as_complex(x.double().reshape(x.shape[0], x.shape[1], -1, 2))
    return torch.view_as_real(xc * freqs[:, None]).flatten(2).float()


def _ln(x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _audio_oracle(p, feats):
    feats = torch.cat([feats[..., :1].repeat(1, 1, 1, 73), feats], dim=-1)
    w = F.silu(p["casual_audio_encoder.weights"])
    x = ((feats * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)  # b c t
    e = "casual_audio_encoder.encoder."

    def cconv(v, name, stride):
        return F.conv1d(F.pad(v, (2, 0), mode="replicate"), p[e + name + ".conv.weight"], p[e + name + ".conv.bias"],
                        stride=stride)

    def tail(v):  # (b n) t c in, (b n) t c out
        v = cconv(F.silu(_ln(v)).transpose(1, 2), "conv2", 2).transpose(1, 2)
        v = cconv(F.silu(_ln(v)).transpose(1, 2), "conv3", 2).transpose(1, 2)
        return F.silu(_ln(v))
    b, n = x.shape[0], 4
    loc = cconv(x, "conv1_local", 1)  # b (n c) t
    loc = loc.view(b, n, -1, loc.shape[-1]).permute(0, 1, 3, 2).reshape(b * n, loc.shape[-1], -1)
    loc = tail(loc).view(b, n, -1, TINY.dim).permute(0, 2, 1, 3)  # b t n c
    loc = torch.cat([loc, p[e + "padding_tokens"].repeat(b, loc.shape[1], 1, 1)], dim=2)
    glob = tail(cconv(x, "conv1_global", 1).transpose(1, 2))
    glob = F.linear(glob, p[e + "final_linear.weight"], p[e + "final_linear.bias"])
    return glob[:, 19:], loc[:, 19:]  # b t c, b t 5 c


def _attn(p, pre, xq, xkv, rope_q=None, rope_k=None, mask=None):
    H = TINY.num_heads
    q = _rms(F.linear(xq, p[pre + "q.weight"], p[pre + "q.bias"]), p[pre + "norm_q.weight"]).unflatten(-1, (H, -1))
    k = _rms(F.linear(xkv, p[pre + "k.weight"], p[pre + "k.bias"]), p[pre + "norm_k.weight"]).unflatten(-1, (H, -1))
    v = F.linear(xkv, p[pre + "v.weight"], p[pre + "v.bias"]).unflatten(-1, (H, -1))
    if rope_q is not None:
        q, k = _rope_apply(q, rope_q), _rope_apply(k, rope_k)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return F.linear(o.transpose(0, 1).flatten(1), p[pre + "o.weight"], p[pre + "o.bias"])


def _time(p, t):
    half = TINY.freq_dim // 2
    pos = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    arg = torch.outer(pos, torch.pow(10000, -torch.arange(half).to(pos).div(half)))
    sin = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()
    e = F.linear(F.silu(F.linear(sin, p["time_embedding.0.weight"], p["time_embedding.0.bias"])),
                 p["time_embedding.2.weight"], p["time_embedding.2.bias"])
    return e, F.linear(F.silu(e), p["time_projection.1.weight"], p["time_projection.1.bias"]).unflatten(1, (6, -1))


def upstream_oracle(model, inp, cond_uses_t=False):
    p = {k: v.float() for k, v in model.state_dict().items()}
    d, (H_, W_) = TINY.dim, (LH // 2, LW // 2)
    T = H_ * W_

    def conv_tokens(name, x):
        return F.conv3d(x, p[name + ".weight"], p[name + ".bias"], stride=p[name + ".weight"].shape[2:]).flatten(2)[0].T
    noisy = conv_tokens("patch_embedding", inp["x"]) + conv_tokens("cond_encoder", torch.zeros_like(inp["x"]))
    ref = conv_tokens("patch_embedding", inp["ref_latent"])
    m = inp["motion_latents"][:, :, -19:]
    mot = torch.cat([conv_tokens("frame_packer.proj", m[:, :, 18:]), conv_tokens("frame_packer.proj_2x", m[:, :, 16:18]),
                     conv_tokens("frame_packer.proj_4x", m[:, :, :16])])
    ids = torch.tensor([0] * len(noisy) + [1] * len(ref) + [2] * len(mot))
    x = torch.cat([noisy, ref, mot]) + p["trainable_cond_mask.weight"][ids]
    L, n_noisy = len(x), len(noisy)
    groups = [((0, 0, 0), (NF, H_, W_), (NF, H_, W_)), ((30, 0, 0), (31, H_, W_), (1, H_, W_)),  # noisy, ref
              ((-1, 0, 0), (0, H_, W_), (1, H_, W_)),                                                # proj
              ((-3, 0, 0), (-2, H_ // 2, W_ // 2), (2, H_, W_)),                                     # proj_2x
              ((-19, 0, 0), (-15, H_ // 4, W_ // 4), (16, H_, W_))]                                  # proj_4x
    rope = _rope_precompute(L, TINY.head_dim, groups)
    is_cond = torch.arange(L) >= n_noisy
    mask = is_cond[None, :] | (~is_cond[:, None] & ~is_cond[None, :]) | torch.eye(L, dtype=torch.bool)
    e, e0 = _time(p, [inp["t"]] * NF + [0.0])
    token_frame = torch.arange(n_noisy) // T
    slot = torch.cat([e0[token_frame], (e0[token_frame[:1]] if cond_uses_t else e0[-1:]).expand(L - n_noisy, 6, d)])
    ctx_in = torch.cat([inp["prompt_embeds"][0], torch.zeros(TINY.text_len - 5, TINY.text_dim)])
    ctx = F.linear(F.gelu(F.linear(ctx_in, p["text_embedding.0.weight"], p["text_embedding.0.bias"]), approximate="tanh"),
                   p["text_embedding.2.weight"], p["text_embedding.2.bias"])
    glob, loc = _audio_oracle(p, inp["audio_features"])
    for i in range(TINY.num_layers):
        b = f"blocks.{i}."
        mod = (p[b + "modulation"][0] + slot).unbind(1)  # each [L, d]
        y = _attn(p, b + "self_attn.", _ln(x) * (1 + mod[1]) + mod[0], _ln(x) * (1 + mod[1]) + mod[0], rope, rope, mask)
        x = x + y * mod[2]
        x = x + _attn(p, b + "cross_attn.", F.layer_norm(x, (d,), p[b + "norm3.weight"], p[b + "norm3.bias"], 1e-6), ctx)
        hidden = F.gelu(F.linear(_ln(x) * (1 + mod[4]) + mod[3], p[b + "ffn.0.weight"], p[b + "ffn.0.bias"]),
                        approximate="tanh")
        x = x + F.linear(hidden, p[b + "ffn.2.weight"], p[b + "ffn.2.bias"]) * mod[5]
        if i in TINY.audio_inject_layers:
            j = TINY.audio_inject_layers.index(i)
            a = f"audio_injector.injector_adain_layers.{j}.linear."
            out = []
            for f in range(NF):  # "b (t n) c -> (b t) n c": each frame's tokens with that frame's audio
                hf = x[f * T:(f + 1) * T]
                shift, scale = F.linear(F.silu(glob[0, f]), p[a + "weight"], p[a + "bias"]).chunk(2)
                hf = _ln(hf, 1e-5) * (1 + scale) + shift
                out.append(_attn(p, f"audio_injector.injector.{j}.", hf, loc[0, f]))
            x = torch.cat([x[:n_noisy] + torch.cat(out), x[n_noisy:]])
    hm = (p["head.modulation"][0] + e[token_frame][:, None]).unbind(1)
    out = F.linear(_ln(x[:n_noisy]) * (1 + hm[1]) + hm[0], p["head.head.weight"], p["head.head.bias"])
    u = out.view(NF, H_, W_, 1, 2, 2, 16)
    return torch.einsum("fhwpqrc->cfphqwr", u).reshape(16, NF, LH, LW)[None]


def test_forward_equals_the_upstream_formulation(model):
    inp = _inputs()
    got = model(**inp)
    want = upstream_oracle(model, inp)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()  # fp32 both: observed ~3e-7
    # the oracle can tell the slots apart: condition tokens at the noisy timestep give another answer
    wrong = upstream_oracle(model, inp, cond_uses_t=True)
    assert (wrong - want).abs().max() > 1e-2 * want.abs().max()


# ---- properties --------------------------------------------------------------------------------------

def test_shapes_finite_and_deterministic(model):
    a = model(**_inputs())
    b = model(**_inputs())
    assert a.shape == (1, 16, NF, LH, LW) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_output_depends_on_every_input(model):
    base = model(**_inputs())
    for key in ("x", "ref_latent", "motion_latents", "prompt_embeds", "audio_features"):
        changed = _inputs()
        changed[key] = changed[key] + 0.5
        assert not torch.allclose(model(**changed), base), key
    assert not torch.allclose(model(**_inputs(t=300.0)), base)


def test_time_slots_noisy_uses_t_condition_uses_zero(model):
    t = torch.tensor([[850.0, 850.0, 850.0]])
    mod = model.time_mod(t)
    zero = model.time_mod(torch.zeros(1, 3))
    assert mod.noisy.shape == (1, 3, 6, TINY.dim) and mod.cond.shape == (1, 1, 6, TINY.dim)
    assert torch.equal(mod.cond, zero.noisy[:, :1])  # the appended t = 0 row, whatever t is
    assert not torch.allclose(mod.noisy[:, :1], mod.cond)
    assert torch.equal(mod.noisy[:, 0], mod.noisy[:, 2])  # one timestep per block


def test_pose_none_is_cond_encoder_of_zeros(model):
    inp = _inputs()
    text_kv = model.text_kv(inp["prompt_embeds"])
    cond = model.encode_condition(inp["ref_latent"], inp["motion_latents"], text_kv)
    mod, audio = model.time_mod(torch.full((1, NF), 500.0)), model.encode_audio(inp["audio_features"])
    none = model.forward_block(inp["x"], mod, audio, text_kv, cond)
    zeros = model.forward_block(inp["x"], mod, audio, text_kv, cond, pose_latents=torch.zeros_like(inp["x"]))
    torch.testing.assert_close(none, zeros, rtol=0, atol=1e-6)
    assert not torch.allclose(none, model.forward_block(inp["x"], mod, audio, text_kv, cond,
                                                        pose_latents=torch.ones_like(inp["x"])))


def test_reference_read_position_is_a_parameter(model):
    inp = _inputs()
    text_kv = model.text_kv(inp["prompt_embeds"])
    cond = model.encode_condition(inp["ref_latent"], inp["motion_latents"], text_kv)
    mod, audio = model.time_mod(torch.full((1, NF), 500.0)), model.encode_audio(inp["audio_features"])
    default = model.forward_block(inp["x"], mod, audio, text_kv, cond)
    assert torch.equal(default, model.forward_block(inp["x"], mod, audio, text_kv, cond, ref_frame=30))
    assert not torch.allclose(default, model.forward_block(inp["x"], mod, audio, text_kv, cond, ref_frame=45))
    assert not torch.allclose(default, model.forward_block(inp["x"], mod, audio, text_kv, cond, first_frame=6))


def test_audio_encoder_is_causal(model):
    """Latent frame m sees video frames <= 4m + 3 of its block, never a later one."""
    feats = _inputs()["audio_features"]
    base = model.encode_audio(feats)
    assert base.local.shape == (1, NF, 5, TINY.dim) and base.global_.shape == (1, NF, TINY.dim)
    for m in range(NF - 1):
        later = feats.clone()
        later[..., 4 * m + 4:] += torch.randn_like(later[..., 4 * m + 4:])
        got = model.encode_audio(later)
        assert torch.equal(got.local[:, :m + 1], base.local[:, :m + 1])
        assert torch.equal(got.global_[:, :m + 1], base.global_[:, :m + 1])
        assert not torch.allclose(got.local[:, m + 1], base.local[:, m + 1])
        own = feats.clone()
        own[..., 4 * m + 3] += 1.0  # the last video frame of latent frame m does reach it
        assert not torch.allclose(model.encode_audio(own).local[:, m], base.local[:, m])


def test_audio_padding_token_is_the_fifth_token(model):
    local = model.encode_audio(_inputs()["audio_features"]).local
    pad = model.casual_audio_encoder.encoder.padding_tokens[0, 0, 0]
    assert all(torch.equal(local[0, f, 4], pad) for f in range(NF))


def test_motion_and_reference_rope_indices_at_the_release_geometry():
    cfg = LiveAvatarConfig.from_preset("liveavatar-14b")
    token_hw = (44, 24)  # 704x384 video -> latent 88x48 -> 44x24 tokens
    mot = motion_positions(cfg, token_hw)
    ref = reference_positions(cfg, token_hw)
    assert len(ref) == 1056 and set(ref.frame) == {30}
    assert len(ref) + len(mot) == 2640  # condition tokens per the spec
    assert list(mot.frame[:1056]) == [-1] * 1056
    assert list(mot.frame[1056:1320]) == [-3] * 264
    assert list(mot.frame[1320:]) == [f for f in (-19, -14, -9, -4) for _ in range(66)]
    noisy = noisy_positions(12, 3, token_hw)
    assert len(noisy) == 3168 and sorted(set(noisy.frame)) == [12, 13, 14]


def test_downsampled_buckets_spread_over_the_full_grid():
    mot = motion_positions(TINY, (8, 8))  # 16x16 latent
    post, two, four = np.split(np.arange(len(mot)), [64, 64 + 16])
    assert sorted(set(mot.height[post])) == list(range(8))
    assert sorted(set(mot.height[two])) == [0, 2, 4, 7]  # linspace(0, 7, 4) truncated
    assert sorted(set(mot.width[four])) == [0, 7]  # linspace(0, 7, 2)


def test_short_motion_history_is_zero_padded_in_front(model):
    hist = torch.randn(1, 16, 5, LH, LW)
    padded = model.frame_packer.history(hist)
    assert padded.shape[2] == 19
    assert torch.equal(padded[:, :, 14:], hist) and padded[:, :, :14].abs().sum() == 0


def test_bad_inputs_are_named(model):
    inp = _inputs()
    bad_audio = dict(inp, audio_features=inp["audio_features"][..., :8])
    with pytest.raises(ValueError, match="audio tokens cover"):
        model(**bad_audio)
    with pytest.raises(ValueError, match="at most text_len"):
        model(**dict(inp, prompt_embeds=torch.randn(1, TINY.text_len + 1, TINY.text_dim)))
    with pytest.raises(ValueError, match="multiple of 8x8"):
        model(**dict(inp, x=torch.randn(1, 16, NF, 4, 4), ref_latent=torch.randn(1, 16, 1, 4, 4),
                     motion_latents=torch.randn(1, 16, 19, 4, 4)))
    with pytest.raises(ValueError, match="audio features must be"):
        model.encode_audio(torch.randn(1, TINY.audio_layers + 1, TINY.audio_dim, 12))


def test_bf16_tracks_fp32(model):
    """Same weights in bf16 (what the release runs) against fp32: relative L2 error of the velocity."""
    bf16 = build_liveavatar(TINY, dtype=torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    inp = _inputs()
    want = model(**inp)
    got = bf16(**inp)
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - want).norm() / want.norm()).item()
    assert 0 < rel < 0.015, rel  # observed 0.0064-0.0068 over three seeds


def test_bf16_model_modulates_in_fp32(model):
    """Upstream's time MLPs and modulation run in fp32 (autocast float32) on the bf16 weights."""
    bf16 = build_liveavatar(TINY, dtype=torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    rounded = build_liveavatar(TINY, dtype=torch.float32)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    t = torch.full((1, NF), 857.69)
    got, want = bf16.time_mod(t), rounded.time_mod(t)
    assert got.noisy.dtype == torch.float32
    for a, b in ((got.noisy, want.noisy), (got.cond, want.cond), (got.head, want.head)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_rope_is_exact_far_into_a_stream():
    """Angles from float64 positions, no table: frame 10**6 rotates as a complex128 reference says."""
    cfg = TINY.replace(num_heads=1, dim=128)  # head_dim 128: the release's 44/42/42 split
    pos = Positions.grid([10**6, -19, 30], [0, 43], [5])
    x = torch.randn(1, len(pos), 1, 128, dtype=torch.float64)
    got = apply_rope(x.float(), Rope.of(pos, cfg.rope_split, cfg.rope_theta, "cpu"))
    parts = []
    for idx, dim in zip((pos.frame, pos.height, pos.width), cfg.rope_split):
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(torch.outer(torch.from_numpy(idx).double(), inv))
    angle = torch.cat(parts, dim=1)
    xc = torch.view_as_complex(x.reshape(1, len(pos), 1, 64, 2))
    want = torch.view_as_real(xc * torch.polar(torch.ones_like(angle), angle)[None, :, None]).flatten(-2)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
