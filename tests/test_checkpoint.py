import json

import pytest
import torch

from runtime import EngineConfig, build_dit
from runtime.checkpoint import CheckpointError, load_into, read_state_dict, save_state_dict, strip_prefix


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(1)
    return build_dit(EngineConfig.from_preset("tiny")).state_dict()


def _fresh():
    return build_dit(EngineConfig.from_preset("tiny"), device="meta")


def _assert_same(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_single_file_round_trip(tmp_path, tiny_state):
    path = tmp_path / "model.safetensors"
    save_state_dict(tiny_state, path)
    _assert_same(load_into(_fresh(), read_state_dict(path)), tiny_state)
    # A directory holding one safetensors file works too.
    _assert_same(load_into(_fresh(), read_state_dict(tmp_path)), tiny_state)


def test_sharded_round_trip(tmp_path, tiny_state):
    save_state_dict(tiny_state, tmp_path / "model.safetensors", shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same(load_into(_fresh(), read_state_dict(tmp_path)), tiny_state)


def test_pth_loaded_with_weights_only(tmp_path, tiny_state):
    path = tmp_path / "model.pth"
    torch.save({"state_dict": tiny_state}, path)
    _assert_same(load_into(_fresh(), read_state_dict(path)), tiny_state)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        read_state_dict(path)


def test_strict_errors_name_every_bad_key(tiny_state):
    bad = dict(tiny_state)
    del bad["blocks.3.self_attn.q.weight"]
    bad["blocks.0.extra.weight"] = torch.zeros(3)
    bad["head.head.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        load_into(_fresh(), bad, what="LiveTalk DiT")
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    assert "blocks.3.self_attn.q.weight" in msg
    assert "blocks.0.extra.weight" in msg
    assert "head.head.bias: checkpoint (7,)" in msg


def test_dtype_and_prefix(tmp_path, tiny_state):
    prefixed = {"model." + k: v for k, v in tiny_state.items()}
    model = load_into(_fresh(), strip_prefix(prefixed, "model."), dtype=torch.bfloat16)
    assert model.head.head.weight.dtype == torch.bfloat16


def test_missing_shard_is_named(tmp_path, tiny_state):
    save_state_dict(tiny_state, tmp_path / "model.safetensors", shard_bytes=200_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing: .*model-00002"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize("name", ["../../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_index_shard_names_outside_the_directory_are_refused_before_opening(tmp_path, tiny_state, name,
                                                                           monkeypatch):
    save_state_dict(tiny_state, tmp_path / "model.safetensors", shard_bytes=200_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = name
    index_path.write_text(json.dumps(index))
    opened = []
    import runtime.checkpoint as ckpt
    real = ckpt.load_file
    monkeypatch.setattr(ckpt, "load_file", lambda path, device="cpu": opened.append(path) or real(path, device=device))
    with pytest.raises(CheckpointError, match="plain file names") as err:
        read_state_dict(tmp_path)
    assert repr(name) in str(err.value) and opened == []


def test_truncated_safetensors_names_the_file(tmp_path, tiny_state):
    path = tmp_path / "model.safetensors"
    save_state_dict(tiny_state, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        read_state_dict(tmp_path)


def test_truncated_pth_names_the_file(tmp_path, tiny_state):
    path = tmp_path / "vae.pth"
    torch.save(tiny_state, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"vae\.pth: not a readable checkpoint"):
        read_state_dict(path)


def test_integer_and_bool_tensors_in_a_float_model_are_named(tiny_state):
    bad = dict(tiny_state)
    bad["blocks.0.self_attn.q.weight"] = bad["blocks.0.self_attn.q.weight"].to(torch.int32)
    bad["head.head.bias"] = bad["head.head.bias"] > 0
    with pytest.raises(CheckpointError, match="2 of the wrong dtype") as err:
        load_into(_fresh(), bad, what="LiveTalk DiT")
    assert "blocks.0.self_attn.q.weight: torch.int32 (model torch.float32)" in str(err.value)
    assert "head.head.bias: torch.bool" in str(err.value)


def test_non_finite_weights_are_named(tiny_state):
    bad = dict(tiny_state)
    bad["blocks.1.ffn.0.weight"] = torch.full_like(bad["blocks.1.ffn.0.weight"], float("nan"))
    inf = bad["head.head.weight"].clone()
    inf[0, 0] = float("inf")
    bad["head.head.weight"] = inf
    with pytest.raises(CheckpointError, match="2 with NaN or Inf") as err:
        load_into(_fresh(), bad)
    assert "blocks.1.ffn.0.weight" in str(err.value) and "head.head.weight" in str(err.value)
    load_into(_fresh(), tiny_state)  # the clean state still loads
