"""Latent-level streaming of Live Avatar against an offline oracle that recomputes everything.

The oracle (`oracle_stream`) keeps no cache: for block b and step i it re-runs ALL blocks 0..b of the
stream jointly from their stored step-i noisy inputs, in upstream's training formulation: one joint
sequence with the block mask (block j's queries see blocks j-3..j and its condition; condition tokens
see only themselves), RoPE as complex float64 multipliers at ABSOLUTE indices (noisy frames at
3 * block, reference at max(30, f0 + rd) per query block, motion at its fixed indices), weights read
from the state dict with the functional helpers of test_liveavatar_forward.py. So it checks ring slots,
eviction, the per-step split, relative roping, the rolling and adaptive sinks and the Euler update.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.families.liveavatar import build_liveavatar, randomize_weights
from runtime.families.liveavatar.stream import LiveAvatarStream, StreamSettings, drawn_sink_offset
from tests.test_liveavatar_forward import TINY, _audio_oracle, _ln, _one_thread, _rms, _time  # noqa: F401 - autouse

LH, LW, NFB = 8, 8, 3
H_, W_ = LH // 2, LW // 2
T = H_ * W_



@pytest.fixture(scope="module")
def model():
    return randomize_weights(build_liveavatar(TINY, dtype=torch.float32), seed=0)


def _session(seed=1, blocks=7):
    g = torch.Generator().manual_seed(seed)
    return {"ref": torch.randn(1, 16, 1, LH, LW, generator=g), "motion": torch.randn(1, 16, 19, LH, LW, generator=g),
            "prompt": torch.randn(1, 5, TINY.text_dim, generator=g),
            "audio": [torch.randn(1, TINY.audio_layers, TINY.audio_dim, 4 * NFB, generator=g) for _ in range(blocks)]}


def _stream(model, s, settings):
    return LiveAvatarStream(model, s["ref"], s["motion"], s["prompt"], settings)


# ---- oracle ---------------------------------------------------------------------------------------
def _freqs(frames, hs, ws):
    """complex128 [L, D/2] RoPE multipliers of a (frames x hs x ws) raster grid, absolute indices."""
    d = TINY.head_dim
    parts = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    f, h, w = (a.ravel() for a in np.meshgrid(frames, hs, ws, indexing="ij"))
    out = []
    for idx, n in zip((f, h, w), parts):
        inv = 1.0 / np.power(10000.0, np.arange(0, n, 2) / n)
        ang = torch.from_numpy(np.outer(np.abs(idx), inv))
        z = torch.polar(torch.ones_like(ang), ang)
        out.append(torch.where(torch.from_numpy(idx < 0)[:, None], z.conj(), z))  # upstream: conj for f < 0
    return torch.cat(out, dim=1)


def _rot(x, fr):  # x [L, H, D] real -> roped
    xc = torch.view_as_complex(x.double().reshape(x.shape[0], x.shape[1], -1, 2))
    return torch.view_as_real(xc * fr[:, None]).flatten(1).float().view_as(x)


def _cond_freqs(ref_frame):
    sub2, sub4 = np.linspace(0, H_ - 1, H_ // 2).astype(int), np.linspace(0, H_ - 1, H_ // 4).astype(int)
    return torch.cat([_freqs([ref_frame], np.arange(H_), np.arange(W_)), _freqs([-1], np.arange(H_), np.arange(W_)),
                      _freqs([-3], sub2, sub2), _freqs([-19, -14, -9, -4], sub4, sub4)])


def _cond_tokens(p, ref, motion):
    def conv(name, x):
        return F.conv3d(x, p[name + ".weight"], p[name + ".bias"], stride=p[name + ".weight"].shape[2:]).flatten(2)[0].T
    mot = torch.cat([conv("frame_packer.proj", motion[:, :, 18:]), conv("frame_packer.proj_2x", motion[:, :, 16:18]),
                     conv("frame_packer.proj_4x", motion[:, :, :16])])
    mask = p["trainable_cond_mask.weight"]
    return torch.cat([conv("patch_embedding", ref) + mask[1], mot + mask[2]])


def _qkv(p, pre, x):
    H = TINY.num_heads
    q = _rms(F.linear(x, p[pre + "q.weight"], p[pre + "q.bias"]), p[pre + "norm_q.weight"]).unflatten(-1, (H, -1))
    k = _rms(F.linear(x, p[pre + "k.weight"], p[pre + "k.bias"]), p[pre + "norm_k.weight"]).unflatten(-1, (H, -1))
    return q, k, F.linear(x, p[pre + "v.weight"], p[pre + "v.bias"]).unflatten(-1, (H, -1))


def _sdpa(p, pre, q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    return F.linear(o.transpose(0, 1).flatten(1), p[pre + "o.weight"], p[pre + "o.bias"])


def _joint_velocity(p, xs, t, first_block, cond_of, conds, ref_frames, audios, ctx):
    """Velocity of the LAST block of xs (blocks first_block.. at one timestep t) by joint recomputation.

    cond_of[j]: index into conds (condition token sets) that block j sees; ref_frames[j]: the RoPE index
    block j's queries read the reference at; audios[j]: (global, local) audio tokens of block j.
    """
    n = len(xs)
    embed = [F.conv3d(x, p["patch_embedding.weight"], p["patch_embedding.bias"], stride=(1, 2, 2)).flatten(2)[0].T
             + p["cond_encoder.bias"] + p["trainable_cond_mask.weight"][0] for x in xs]
    hs, cs = list(embed), [c.clone() for c in conds]
    e, e0 = _time(p, [t, 0.0])
    fr_noisy = [_freqs(np.arange(3 * (first_block + j), 3 * (first_block + j) + 3), np.arange(H_), np.arange(W_))
                for j in range(n)]
    fr_cond = _cond_freqs(TINY.ref_rope_frame)  # the condition pass: reference at 30, never rolled
    for i in range(TINY.num_layers):
        b = f"blocks.{i}."
        nm = [_pre_attn(p, b, h, e0[0]) for h in hs]
        cm = [_pre_attn(p, b, c, e0[1]) for c in cs]
        new_h = []
        for j, (mod, (q, _, _)) in enumerate(nm):
            seen = range(max(0, j - 3), j + 1)  # the ring: this block and 3 before it
            _, ck, cv = cm[cond_of[j]][1]
            keys = torch.cat([_rot(nm[m][1][1], fr_noisy[m]) for m in seen] + [_rot(ck, _cond_freqs(ref_frames[j]))])
            vals = torch.cat([nm[m][1][2] for m in seen] + [cv])
            new_h.append(hs[j] + _sdpa(p, b + "self_attn.", _rot(q, fr_noisy[j]), keys, vals) * mod[2])
        new_c = [c + _sdpa(p, b + "self_attn.", _rot(q, fr_cond), _rot(k, fr_cond), v) * mod[2]
                 for c, (mod, (q, k, v)) in zip(cs, cm)]
        hs = [_tail(p, b, h, m[0], ctx) for h, m in zip(new_h, nm)]
        cs = [_tail(p, b, c, m[0], ctx) for c, m in zip(new_c, cm)]
        if i in TINY.audio_inject_layers:
            hs = [h + _audio_residual(p, TINY.audio_inject_layers.index(i), h, a) for h, a in zip(hs, audios)]
    hm = (p["head.modulation"][0] + e[0]).unbind(0)
    out = F.linear(_ln(hs[-1]) * (1 + hm[1]) + hm[0], p["head.head.weight"], p["head.head.bias"])
    return torch.einsum("fhwpqrc->cfphqwr", out.view(3, H_, W_, 1, 2, 2, 16)).reshape(16, 3, LH, LW)[None]


def _pre_attn(p, b, x, slot):
    mod = (p[b + "modulation"][0] + slot).unbind(0)
    return mod, _qkv(p, b + "self_attn.", _ln(x) * (1 + mod[1]) + mod[0])


def _tail(p, b, x, mod, ctx):
    x = x + _sdpa(p, b + "cross_attn.", *_cross_qkv(p, b, x, ctx))
    hidden = F.gelu(F.linear(_ln(x) * (1 + mod[4]) + mod[3], p[b + "ffn.0.weight"], p[b + "ffn.0.bias"]),
                    approximate="tanh")
    return x + F.linear(hidden, p[b + "ffn.2.weight"], p[b + "ffn.2.bias"]) * mod[5]


def _cross_qkv(p, b, x, ctx):
    pre = b + "cross_attn."
    q, _, _ = _qkv(p, pre, F.layer_norm(x, (TINY.dim,), p[b + "norm3.weight"], p[b + "norm3.bias"], 1e-6))
    _, k, v = _qkv(p, pre, ctx)
    return q, k, v


def _audio_residual(p, j, h, audio):
    glob, loc = audio
    a = f"audio_injector.injector_adain_layers.{j}.linear."
    out = []
    for f in range(3):
        hf = h[f * T:(f + 1) * T]
        shift, scale = F.linear(F.silu(glob[0, f]), p[a + "weight"], p[a + "bias"]).chunk(2)
        q, _, _ = _qkv(p, f"audio_injector.injector.{j}.", _ln(hf, 1e-5) * (1 + scale) + shift)
        _, k, v = _qkv(p, f"audio_injector.injector.{j}.", loc[0, f])
        out.append(_sdpa(p, f"audio_injector.injector.{j}.", q, k, v))
    return torch.cat(out)


def oracle_stream(model, s, n_blocks, start_block=0, seed=0, sink_offset=None, adaptive_at=None):
    """Latents of n_blocks streamed blocks, every velocity recomputed from scratch (no caches)."""
    p = {k: v.float() for k, v in model.state_dict().items()}
    ctx_in = torch.cat([s["prompt"][0], torch.zeros(TINY.text_len - s["prompt"].shape[1], TINY.text_dim)])
    ctx = F.linear(F.gelu(F.linear(ctx_in, p["text_embedding.0.weight"], p["text_embedding.0.bias"]), approximate="tanh"),
                   p["text_embedding.2.weight"], p["text_embedding.2.bias"])
    ts = torch.tensor(TINY.timesteps, dtype=torch.float32)
    sig = torch.tensor(TINY.sigmas, dtype=torch.float32)
    noise = torch.Generator().manual_seed(seed)
    conds, cond_of, inputs, outs, audios = [_cond_tokens(p, s["ref"], s["motion"])], [], [], [], []
    for j in range(n_blocks):
        if adaptive_at is not None and j == adaptive_at:
            conds.append(_cond_tokens(p, outs[0][:, :, :1], s["motion"]))
        cond_of.append(len(conds) - 1)
        audios.append(_audio_oracle(p, s["audio"][j]))
        x = torch.randn(1, 16, 3, LH, LW, generator=noise)
        inputs.append([])
        for i in range(TINY.num_steps):
            inputs[j].append(x)
            rds = [sink_offset if sink_offset is not None else
                   drawn_sink_offset(seed, start_block + m, i, *TINY.sink_offset_range) for m in range(j + 1)]
            ref_frames = [max(30, 3 * (start_block + m) + rd) for m, rd in enumerate(rds)]
            v = _joint_velocity(p, [inputs[m][i] for m in range(j + 1)], ts[i].item(), start_block,
                                cond_of, conds, ref_frames, audios, ctx)
            x = x + (sig[i + 1] - sig[i]) * v
        outs.append(x)
    return outs


# ---- tests ----------------------------------------------------------------------------------------
def _run(model, s, settings, n):
    st = _stream(model, s, settings)
    return st, [st.generate_block(s["audio"][j]) for j in range(n)]


def _close(got, want, tol=2e-5):
    for b, (g, w) in enumerate(zip(got, want)):
        err = (g - w).abs().max() / w.abs().max()
        assert err < tol, f"block {b}: relative error {err:.2e}"


def test_stream_equals_oracle_over_ring_wraps(model):
    """7 blocks: the 4-block rings wrap (blocks 4..6 evict 0..2), drawn rolling-sink offsets, no adaptive sink."""
    s = _session()
    _, got = _run(model, s, StreamSettings(seed=3, adaptive_sink_block=None), 7)
    _close(got, oracle_stream(model, s, 7, seed=3))


def test_adaptive_sink_equals_oracle(model):
    """Upstream timing: block 0's first denoised frame is the reference from block 4 on."""
    s = _session(seed=2, blocks=6)
    settings = StreamSettings(seed=5, adaptive_sink_block=4)
    _, got = _run(model, s, settings, 6)
    _close(got, oracle_stream(model, s, 6, seed=5, adaptive_at=4))
    # and it matters: without it blocks 4.. differ, before it nothing does
    _, plain = _run(model, s, StreamSettings(seed=5, adaptive_sink_block=None), 6)
    assert torch.equal(plain[3], got[3]) and not torch.allclose(plain[4], got[4], atol=1e-3)


def test_adaptive_sink_after_first_block(model):
    s = _session(seed=4, blocks=3)
    _, got = _run(model, s, StreamSettings(seed=1, adaptive_sink_block=1, sink_offset=30), 3)
    _close(got, oracle_stream(model, s, 3, seed=1, sink_offset=30, adaptive_at=1))


def test_far_into_the_stream_is_finite_and_equals_oracle(model):
    """A stream that starts at block 10^5 (~13 h of video): positions from integers, no table, no cliff."""
    s = _session(seed=6, blocks=5)
    settings = StreamSettings(seed=9, start_block=100_000, adaptive_sink_block=None)
    st, got = _run(model, s, settings, 5)
    assert all(torch.isfinite(g).all() for g in got)
    _close(got, oracle_stream(model, s, 5, start_block=100_000, seed=9))
    assert st.ref_frame(100_004, 0) >= 3 * 100_004 + 4  # the sink follows the block


def test_rolling_sink_offset_is_a_setting(model):
    s = _session(seed=7, blocks=2)
    base = StreamSettings(seed=0, adaptive_sink_block=None, start_block=20)
    _, fixed4 = _run(model, s, StreamSettings(**{**base.__dict__, "sink_offset": 4}), 2)
    _, fixed30 = _run(model, s, StreamSettings(**{**base.__dict__, "sink_offset": 30}), 2)
    assert not torch.allclose(fixed4[1], fixed30[1], atol=1e-4)
    _close(fixed4, oracle_stream(model, s, 2, start_block=20, seed=0, sink_offset=4))
    draws = {drawn_sink_offset(0, b, i, 4, 30) for b in range(50) for i in range(4)}
    assert draws <= set(range(4, 31)) and len(draws) > 20
    assert drawn_sink_offset(0, 7, 2, 4, 30) == drawn_sink_offset(0, 7, 2, 4, 30)


def test_same_seed_same_stream_other_seed_other_noise(model):
    s = _session(seed=8, blocks=2)
    _, a = _run(model, s, StreamSettings(seed=1), 2)
    _, b = _run(model, s, StreamSettings(seed=1), 2)
    _, c = _run(model, s, StreamSettings(seed=2), 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0])


def test_state_is_allocated_once_and_does_not_grow(model):
    s = _session(seed=9, blocks=1)
    st = _stream(model, s, StreamSettings(seed=0, adaptive_sink_block=2))
    st.generate_block(s["audio"][0])
    held = [t for r in st.rings for t in (r.k, r.v, r.key_mask)] + st.cond.keys + st.cond.values
    ptrs = [t.data_ptr() for t in held]
    for _ in range(10):  # past the adaptive-sink refill and two ring wraps
        st.generate_block(s["audio"][0])
    assert [t.data_ptr() for t in held] == ptrs
    assert all(r.slot_frame.shape == (TINY.ring_frames,) for r in st.rings)
    assert sorted(st.rings[0].slot_frame) == list(range(3 * 7, 3 * 11))  # exactly the last 4 blocks
    assert len(st.__dict__) == len(_stream(model, s, StreamSettings()).__dict__)


def test_bad_settings_and_inputs_are_clear_errors(model):
    with pytest.raises(ValueError, match="adaptive_sink_block"):
        StreamSettings(adaptive_sink_block=0)
    with pytest.raises(ValueError, match="start_block"):
        StreamSettings(start_block=-1)
    s = _session(seed=1, blocks=1)
    st = _stream(model, s, StreamSettings())
    with pytest.raises(ValueError, match="audio features"):
        st.generate_block(torch.zeros(1, TINY.audio_layers, TINY.audio_dim, 10))
    with pytest.raises(ValueError, match="batch"):
        st.generate_block(torch.zeros(2, TINY.audio_layers, TINY.audio_dim, 12))
    assert st.blocks_done == 0
