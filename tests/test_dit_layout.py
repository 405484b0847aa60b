"""The 1.3B DiT's parameter layout must be exactly the release's (857 tensors)."""
import torch

from runtime import EngineConfig, build_dit


def _release_shapes() -> dict[str, tuple[int, ...]]:
    """Written out from the spec's key list, independently of the model code."""
    d, ffn, layers, text, freq = 1536, 8960, 30, 4096, 256
    s = {
        "patch_embedding.weight": (d, 33, 1, 2, 2), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, text), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, freq), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.head.weight": (64, d), "head.head.bias": (64,),
        "audio_proj.proj.weight": (32, 43008), "audio_proj.proj.bias": (32,),
        "audio_proj.norm_out.weight": (32,), "audio_proj.norm_out.bias": (32,),
    }
    for i in range(14):
        s[f"audio_cond_projs.{i}.weight"] = (d, 32)
        s[f"audio_cond_projs.{i}.bias"] = (d,)
    for i in range(layers):
        p = f"blocks.{i}."
        s[p + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for lin in "qkvo":
                s[f"{p}{attn}.{lin}.weight"] = (d, d)
                s[f"{p}{attn}.{lin}.bias"] = (d,)
            s[f"{p}{attn}.norm_q.weight"] = (d,)
            s[f"{p}{attn}.norm_k.weight"] = (d,)
        s[p + "norm3.weight"] = (d,)
        s[p + "norm3.bias"] = (d,)
        s[p + "ffn.0.weight"] = (ffn, d)
        s[p + "ffn.0.bias"] = (ffn,)
        s[p + "ffn.2.weight"] = (d, ffn)
        s[p + "ffn.2.bias"] = (d,)
    return s


def test_livetalk_1_3b_state_dict_matches_release_on_meta():
    model = build_dit(EngineConfig.from_preset("livetalk-1.3b"), device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = _release_shapes()
    assert len(want) == 857
    assert len(got) == 857
    assert got == want
    n_params = sum(v.numel() for v in model.state_dict().values())
    assert 1.40e9 < n_params < 1.45e9, n_params
    assert all(v.device.type == "meta" for v in model.state_dict().values())


def test_tiny_forward_shapes_and_finite():
    from runtime.models.ops import Ops
    from runtime.session import KVRing, plan_block

    cfg = EngineConfig.from_preset("tiny")
    torch.manual_seed(0)
    dit = build_dit(cfg)
    d = cfg.dit
    h, w = cfg.latent_hw
    F = cfg.cache.block_frames
    x = torch.randn(1, d.in_dim, F, h, w)
    ring = KVRing.allocate(cfg, 1, "cpu", torch.float32)
    mod = dit.time_mod(torch.full((1, F), 1000.0))
    audio = dit.audio_cond(torch.randn(1, d.audio_pack * F, d.audio_feature_dim))
    text_kv = dit.text_kv(torch.randn(1, 5, d.text_dim))
    out = dit.forward_block(x, mod, audio, text_kv, ring.k, ring.v, plan_block(0, cfg.cache), Ops)
    assert out.shape == (1, d.out_dim, F, h, w)
    assert torch.isfinite(out).all()
    # The block's K/V went into slots 0..F-1 of every layer and nowhere else.
    T = cfg.tokens_per_frame
    assert ring.k[:, :, : F * T].abs().sum() > 0
    assert ring.k[:, :, F * T:].abs().sum() == 0
