"""Live Avatar / Wan2.2-S2V-14B: the full-size key layout on the meta device, the shard index, the config."""
import json

import pytest
import torch

from runtime.checkpoint import CheckpointError
from runtime.families.liveavatar import LiveAvatarConfig, build_liveavatar, check_index, release_index


def _release_shapes() -> dict[str, tuple[int, ...]]:
    """Written out from the spec and the upstream module definitions, independently of the model code."""
    d, ffn, text, freq, lat, heads_tokens = 5120, 13824, 4096, 256, 16, 4
    s = {
        "patch_embedding.weight": (d, lat, 1, 2, 2), "patch_embedding.bias": (d,),
        "cond_encoder.weight": (d, lat, 1, 2, 2), "cond_encoder.bias": (d,),
        "trainable_cond_mask.weight": (3, d),
        "text_embedding.0.weight": (d, text), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, freq), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.head.weight": (64, d), "head.head.bias": (64,),
        "casual_audio_encoder.weights": (1, 25, 1, 1),
        "casual_audio_encoder.encoder.conv1_local.conv.weight": (d // 4 * heads_tokens, 1024, 3),
        "casual_audio_encoder.encoder.conv1_local.conv.bias": (d,),
        "casual_audio_encoder.encoder.conv1_global.conv.weight": (d // 4, 1024, 3),
        "casual_audio_encoder.encoder.conv1_global.conv.bias": (d // 4,),
        "casual_audio_encoder.encoder.conv2.conv.weight": (d // 2, d // 4, 3),
        "casual_audio_encoder.encoder.conv2.conv.bias": (d // 2,),
        "casual_audio_encoder.encoder.conv3.conv.weight": (d, d // 2, 3),
        "casual_audio_encoder.encoder.conv3.conv.bias": (d,),
        "casual_audio_encoder.encoder.final_linear.weight": (d, d),
        "casual_audio_encoder.encoder.final_linear.bias": (d,),
        "casual_audio_encoder.encoder.padding_tokens": (1, 1, 1, d),
        "frame_packer.proj.weight": (d, lat, 1, 2, 2), "frame_packer.proj.bias": (d,),
        "frame_packer.proj_2x.weight": (d, lat, 2, 4, 4), "frame_packer.proj_2x.bias": (d,),
        "frame_packer.proj_4x.weight": (d, lat, 4, 8, 8), "frame_packer.proj_4x.bias": (d,),
    }

    def attention(prefix):
        for lin in "qkvo":
            s[f"{prefix}.{lin}.weight"] = (d, d)
            s[f"{prefix}.{lin}.bias"] = (d,)
        s[f"{prefix}.norm_q.weight"] = (d,)
        s[f"{prefix}.norm_k.weight"] = (d,)

    for i in range(40):
        p = f"blocks.{i}."
        s[p + "modulation"] = (1, 6, d)
        attention(p + "self_attn")
        attention(p + "cross_attn")
        s[p + "norm3.weight"] = (d,)
        s[p + "norm3.bias"] = (d,)
        s[p + "ffn.0.weight"] = (ffn, d)
        s[p + "ffn.0.bias"] = (ffn,)
        s[p + "ffn.2.weight"] = (d, ffn)
        s[p + "ffn.2.bias"] = (d,)
    for j in range(12):  # audio injected after blocks 0,4,...,24,27,30,33,36,39
        attention(f"audio_injector.injector.{j}")
        s[f"audio_injector.injector_adain_layers.{j}.linear.weight"] = (2 * d, d)
        s[f"audio_injector.injector_adain_layers.{j}.linear.bias"] = (2 * d,)
    return s


@pytest.fixture(scope="module")
def meta_14b():
    return build_liveavatar("liveavatar-14b", device="meta")


def test_14b_state_dict_is_the_release_layout_on_meta(meta_14b):
    got = {k: tuple(v.shape) for k, v in meta_14b.state_dict().items()}
    want = _release_shapes()
    assert len(want) == 1260
    assert sorted(set(want) - set(got)) == [], "missing"
    assert sorted(set(got) - set(want)) == [], "unexpected"
    assert got == want
    assert all(v.device.type == "meta" for v in meta_14b.state_dict().values())


def test_14b_parameter_count_and_bytes(meta_14b):
    n = sum(v.numel() for v in meta_14b.state_dict().values())
    assert n == 16_295_755_609  # "about 16 B with the audio modules"
    assert abs(2 * n / 1e9 - 32.6) < 0.05  # 32.6 GB of bf16 shards


def test_14b_head_and_rope_geometry():
    cfg = LiveAvatarConfig.from_preset("liveavatar-14b")
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.ffn_dim) == (5120, 40, 40, 128, 13824)
    assert (cfg.text_dim, cfg.text_len, cfg.latent_channels, cfg.patch_size) == (4096, 512, 16, (1, 2, 2))
    assert cfg.rope_split == (44, 42, 42)
    assert cfg.audio_inject_layers == (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    assert cfg.motion_frames == 19 and cfg.audio_drop_tokens == 19


def test_shard_index_round_trip(meta_14b):
    index = json.loads(json.dumps(release_index("liveavatar-14b", num_shards=4)))
    assert set(index["weight_map"]) == set(meta_14b.state_dict())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"diffusion_pytorch_model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert index["metadata"]["total_size"] == 2 * 16_295_755_609
    check_index(index, "liveavatar-14b")  # passes as written


def test_index_check_names_missing_and_unexpected_keys():
    index = release_index("liveavatar-14b")
    del index["weight_map"]["casual_audio_encoder.encoder.padding_tokens"]
    index["weight_map"]["causal_audio_encoder.weights"] = "x.safetensors"  # the typo fixed = wrong
    with pytest.raises(CheckpointError) as err:
        check_index(index, "liveavatar-14b")
    assert "casual_audio_encoder.encoder.padding_tokens" in str(err.value)
    assert "causal_audio_encoder.weights" in str(err.value)


# The release's schedule: diffusers 0.42.1 FlowMatchEulerDiscreteScheduler(1000, shift=3).set_timesteps(4)
# `.timesteps` / `.sigmas` (fp32 tensors), printed with .tolist() once and written here.
RELEASE_TIMESTEPS = (1000.0, 857.6923217773438, 602.1505737304688, 8.928571701049805)
RELEASE_SIGMAS = (1.0, 0.857692301273346, 0.602150559425354, 0.008928571827709675, 0.0)


def test_sampler_is_the_release_schedule_bit_for_bit():
    cfg = LiveAvatarConfig.from_preset("liveavatar-14b")
    assert cfg.timesteps == RELEASE_TIMESTEPS and cfg.sigmas == RELEASE_SIGMAS  # exact, not approx
    assert torch.tensor(cfg.timesteps, dtype=torch.float32).tolist() == list(RELEASE_TIMESTEPS)
    # what a float64 schedule gives at step 2 (602.15054 -> fp32 602.15051) is one fp32 ulp off the release
    t64 = 1000 + (cfg._sigma_range()[1] * 1000 - 1000) * 2 / 3
    sigma64 = 3 * (t64 / 1000) / (1 + 2 * (t64 / 1000))
    assert float(torch.tensor(sigma64 * 1000, dtype=torch.float32)) != RELEASE_TIMESTEPS[2]


@pytest.mark.parametrize("steps, shift", [(1, 3.0), (2, 1.0), (4, 3.0), (4, 5.0), (7, 3.0), (50, 3.0)])
def test_sampler_equals_diffusers_scheduler(steps, shift):
    """Against the scheduler itself where diffusers is installed (it is not a project dependency)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    cfg = LiveAvatarConfig(num_steps=steps, sample_shift=shift)
    assert cfg.timesteps == tuple(sched.timesteps.tolist()) and cfg.sigmas == tuple(sched.sigmas.tolist())


def test_tiny_keeps_the_structure():
    tiny = LiveAvatarConfig.from_preset("tiny")
    full = LiveAvatarConfig.from_preset("liveavatar-14b")
    same = ("motion_buckets", "audio_prepend_frames", "ref_rope_frame", "patch_size", "latent_channels",
            "audio_tokens", "timesteps", "sigmas", "block_frames")
    assert {k: getattr(tiny, k) for k in same} == {k: getattr(full, k) for k in same}
    assert tiny.audio_inject_layers[0] == 0 and tiny.audio_inject_layers[-1] == tiny.num_layers - 1
    tiny_model = build_liveavatar(tiny, device="meta")
    assert len(tiny_model.state_dict()) == 4 * 27 + 3 * 12 + 18 + 12 + 6


@pytest.mark.parametrize("change, message", [
    ({"num_heads": 7}, "not divisible"),
    ({"audio_inject_layers": (0, 40)}, "audio_inject_layers"),
    ({"audio_inject_layers": (4, 0)}, "audio_inject_layers"),
    ({"motion_buckets": (1, 3, 16)}, "multiple of its downsampling"),
    ({"ring_frames": 10}, "whole number of blocks"),
])
def test_config_rejects_inconsistent_values(change, message):
    with pytest.raises(ValueError, match=message):
        LiveAvatarConfig.from_preset("liveavatar-14b").replace(**change)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="nope"):
        LiveAvatarConfig.from_preset("nope")


def test_meta_build_allocates_nothing():
    model = build_liveavatar("liveavatar-14b", device="meta", dtype=torch.bfloat16)
    assert model.patch_embedding.weight.dtype == torch.bfloat16
    assert model.patch_embedding.weight.device.type == "meta"
