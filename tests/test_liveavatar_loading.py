"""Loading a release-layout directory (sharded safetensors + index json + config.json + LoRA) strictly."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from runtime.checkpoint import CheckpointError
from runtime.families.liveavatar import (
    LiveAvatarConfig,
    LoraConfig,
    build_liveavatar,
    load_liveavatar,
    randomize_weights,
)
from runtime.families.liveavatar.lora import is_target
from tests.test_liveavatar_forward import _one_thread  # noqa: F401 - autouse: one torch thread

TINY = LiveAvatarConfig.from_preset("tiny")
RANK, ALPHA = 128, 64.0  # the release's LoRA (s2v_causal_sft.yaml)



def _tiny_state(seed=0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in randomize_weights(build_liveavatar(TINY), seed).state_dict().items()}


def _write_trunk(directory, state, shards=4):
    """The Hugging Face layout, written here (not by the code under test): N shards + index json."""
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(directory / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    config = {"_class_name": "WanModel_S2V", "dim": TINY.dim, "num_layers": TINY.num_layers,
              "num_heads": TINY.num_heads, "ffn_dim": TINY.ffn_dim, "audio_inject_layers": list(TINY.audio_inject_layers),
              "enable_framepack": True, "enable_adain": True, "cond_dim": 16, "num_audio_token": 4}
    (directory / "config.json").write_text(json.dumps(config))


def _lora_modules(state) -> list[str]:
    """The PEFT targets of the trunk, found independently: 2-D weights named *.q/k/v/o, *.ffn.0/2."""
    suffixes = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".ffn.0.weight", ".ffn.2.weight")
    return sorted(k.removesuffix(".weight") for k, v in state.items() if k.endswith(suffixes) and v.dim() == 2)


def _lora_state(state, seed=1, prefix="", adapter=".default") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in _lora_modules(state):
        out_f, in_f = state[f"{m}.weight"].shape
        out[f"{prefix}{m}.lora_A{adapter}.weight"] = torch.randn(RANK, in_f, generator=gen) / in_f ** 0.5
        out[f"{prefix}{m}.lora_B{adapter}.weight"] = torch.randn(out_f, RANK, generator=gen) / RANK
    return out


@pytest.fixture()
def release(tmp_path):
    state = _tiny_state()
    trunk = tmp_path / "Wan2.2-S2V-14B"
    trunk.mkdir()
    _write_trunk(trunk, state)
    lora = _lora_state(state)
    save_file(lora, str(tmp_path / "liveavatar.safetensors"))
    return trunk, tmp_path / "liveavatar.safetensors", state, lora


def test_release_dir_is_sharded_like_hugging_face(release):
    trunk = release[0]
    shards = sorted(p.name for p in trunk.glob("*.safetensors"))
    assert shards == [f"diffusion_pytorch_model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert (trunk / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_trunk_loads_exactly(release):
    trunk, _, state, _ = release
    model = load_liveavatar(trunk, config="tiny", dtype=torch.float32)
    got = model.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert not model.training


def test_trunk_loads_from_index_and_from_shard_list(release):
    trunk, _, state, _ = release
    for source in (trunk / "diffusion_pytorch_model.safetensors.index.json", sorted(trunk.glob("*.safetensors"))):
        model = load_liveavatar(source, config="tiny", dtype=torch.float32)
        assert torch.equal(model.state_dict()["blocks.3.ffn.2.weight"], state["blocks.3.ffn.2.weight"])


def test_bf16_load_casts_every_tensor(release):
    model = load_liveavatar(release[0], config="tiny", dtype=torch.bfloat16)
    assert {v.dtype for v in model.state_dict().values()} == {torch.bfloat16}


def test_lora_scale_of_the_release():
    assert LoraConfig().rank == RANK and LoraConfig().alpha == ALPHA
    assert LoraConfig().scale == 0.5
    assert TINY.lora.scale == 0.5


def test_lora_merge_adds_half_of_b_times_a(release):
    trunk, lora_path, state, lora = release
    model = load_liveavatar(trunk, lora_path, config="tiny", dtype=torch.float32)
    got = model.state_dict()
    modules = _lora_modules(state)
    assert len(modules) == TINY.num_layers * 10 + len(TINY.audio_inject_layers) * 4
    assert any(m.startswith("audio_injector.injector.") for m in modules)
    assert any(".cross_attn." in m for m in modules)
    for m in modules:
        a, b = lora[f"{m}.lora_A.default.weight"], lora[f"{m}.lora_B.default.weight"]
        want = state[f"{m}.weight"].double() + 0.5 * (b.double() @ a.double())
        torch.testing.assert_close(got[f"{m}.weight"].double(), want, rtol=1e-6, atol=1e-6)
    untouched = [k for k in state if k.removesuffix(".weight") not in modules]
    assert all(torch.equal(got[k], state[k]) for k in untouched)


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    return {"x": r(1, 16, 3, 8, 8), "t": 600.0, "ref_latent": r(1, 16, 1, 8, 8), "motion_latents": r(1, 16, 19, 8, 8),
            "prompt_embeds": r(1, 6, TINY.text_dim), "audio_features": r(1, TINY.audio_layers, TINY.audio_dim, 12)}


def test_merged_forward_equals_unmerged_lora_oracle(release):
    """Oracle: the base model with each target linear computing W x + b + 0.5 * B (A x), un-merged."""
    trunk, lora_path, _, lora = release
    merged = load_liveavatar(trunk, lora_path, config="tiny", dtype=torch.float32)
    base = load_liveavatar(trunk, config="tiny", dtype=torch.float32)
    modules = dict(base.named_modules())
    for key in lora:
        if ".lora_A." not in key:
            continue
        m = key.split(".lora_A.")[0]
        a, b = lora[key], lora[f"{m}.lora_B.default.weight"]
        modules[m].register_forward_hook(
            lambda mod, args, out, a=a, b=b: out + ALPHA / RANK * F.linear(F.linear(args[0], a), b))
    want = base(**_inputs())
    got = merged(**_inputs())
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert (got - load_liveavatar(trunk, config="tiny", dtype=torch.float32)(**_inputs())).abs().max() > 1e-2


def test_lora_keys_with_peft_prefix_or_without_adapter_name_load_the_same(release, tmp_path):
    trunk, lora_path, state, _ = release
    want = load_liveavatar(trunk, lora_path, config="tiny", dtype=torch.float32).state_dict()
    for prefix, adapter in (("base_model.model.", ".default"), ("", "")):
        path = tmp_path / f"variant{len(prefix)}{len(adapter)}.safetensors"
        save_file(_lora_state(state, prefix=prefix, adapter=adapter), str(path))
        got = load_liveavatar(trunk, path, config="tiny", dtype=torch.float32).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def _rewrite(release, tmp_path, edit):
    _, _, state, _ = release
    state = dict(state)
    edit(state)
    out = tmp_path / "edited"
    out.mkdir()
    _write_trunk(out, state)
    return out


def test_missing_unexpected_and_misshaped_keys_are_each_named(release, tmp_path):
    def edit(state):
        del state["casual_audio_encoder.encoder.padding_tokens"]
        state["blocks.0.norm1.weight"] = torch.ones(TINY.dim)  # the release has no norm1 tensor
        state["frame_packer.proj_4x.weight"] = torch.zeros(TINY.dim, 16, 2, 8, 8)
    with pytest.raises(CheckpointError) as err:
        load_liveavatar(_rewrite(release, tmp_path, edit), config="tiny")
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    for key in ("casual_audio_encoder.encoder.padding_tokens", "blocks.0.norm1.weight", "frame_packer.proj_4x.weight"):
        assert key in msg


def test_wrong_preset_fails_before_reading_tensors(release):
    with pytest.raises(CheckpointError, match="dim: file 64 vs config 5120"):
        load_liveavatar(release[0], config="liveavatar-14b")  # config.json disagrees first
    (release[0] / "config.json").unlink()
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_liveavatar(release[0], config="liveavatar-14b")  # then the headers do


def test_index_naming_a_missing_shard_is_an_error(release):
    (release[0] / "diffusion_pytorch_model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00004"):
        load_liveavatar(release[0], config="tiny")


@pytest.mark.parametrize("case, needle", [
    ("no_base", "blocks.9.self_attn.q"),
    ("not_lora", "blocks.0.self_attn.q.weight"),
    ("unpaired", "blocks.1.ffn.0"),
    ("off_target", "time_embedding.0"),
    ("wrong_rank", "blocks.0.self_attn.k"),
    ("uncovered", "audio_injector.injector.2.o"),
])
def test_bad_lora_files_name_the_key(release, tmp_path, case, needle):
    trunk, _, _, lora = release
    lora = dict(lora)
    a = "blocks.0.self_attn.q.lora_A.default.weight"
    if case == "no_base":  # tiny has blocks 0..3
        lora["blocks.9.self_attn.q.lora_A.default.weight"] = lora[a].clone()
        lora["blocks.9.self_attn.q.lora_B.default.weight"] = lora[a.replace("lora_A", "lora_B")].clone()
    elif case == "not_lora":
        lora["blocks.0.self_attn.q.weight"] = torch.zeros(TINY.dim, TINY.dim)
    elif case == "unpaired":
        del lora["blocks.1.ffn.0.lora_B.default.weight"]
    elif case == "off_target":
        lora["time_embedding.0.lora_A.default.weight"] = torch.zeros(RANK, TINY.freq_dim)
        lora["time_embedding.0.lora_B.default.weight"] = torch.zeros(TINY.dim, RANK)
    elif case == "wrong_rank":
        lora["blocks.0.self_attn.k.lora_A.default.weight"] = torch.zeros(64, TINY.dim)
        lora["blocks.0.self_attn.k.lora_B.default.weight"] = torch.zeros(TINY.dim, 64)
    elif case == "uncovered":
        del lora["audio_injector.injector.2.o.lora_A.default.weight"]
        del lora["audio_injector.injector.2.o.lora_B.default.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(lora, str(path))
    with pytest.raises(CheckpointError) as err:
        load_liveavatar(trunk, path, config="tiny")
    assert needle in str(err.value)


def test_peft_target_matching():
    targets = LoraConfig().targets
    assert is_target("blocks.3.cross_attn.o", targets)
    assert is_target("audio_injector.injector.11.k", targets)
    assert is_target("blocks.39.ffn.2", targets)
    assert not is_target("blocks.3.self_attn.norm_q", targets)
    assert not is_target("time_embedding.0", targets)
    assert not is_target("casual_audio_encoder.encoder.final_linear", targets)
