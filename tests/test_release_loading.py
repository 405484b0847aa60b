"""Release-layout loading: tiny checkpoints with the real file names and key layout go through the
same code path as the real LiveTalk files (Engine.from_pretrained on a directory)."""
import numpy as np
import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.checkpoint import CheckpointError, save_state_dict


def _write_release(root, source: Engine, shard_bytes=None):
    (root / "LiveTalk-1.3B-V0.1").mkdir(parents=True)
    save_state_dict(source.dit.state_dict(), root / "LiveTalk-1.3B-V0.1" / "model.safetensors",
                    shard_bytes=shard_bytes)
    (root / "Wan2.1-T2V-1.3B").mkdir()
    torch.save(source.vae.state_dict(), root / "Wan2.1-T2V-1.3B" / "Wan2.1_VAE.pth")
    source.audio_encoder.model.save_pretrained(root / "wav2vec2-base-960h")


@pytest.fixture(scope="module")
def source():
    return Engine.from_pretrained("micro", device="cpu", seed=11)


@pytest.mark.parametrize("shard_bytes", [None, 50_000])
def test_release_directory_loads_and_streams_like_the_source(tmp_path, source, shard_bytes):
    _write_release(tmp_path, source, shard_bytes)
    loaded = Engine.from_pretrained(str(tmp_path), device="cpu", config="micro")
    for a, b in ((source.dit, loaded.dit), (source.vae, loaded.vae)):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), k
    torch.testing.assert_close(loaded.vae.latent_std, source.vae.latent_std)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    audio = (np.random.default_rng(1).standard_normal(30000) * 0.2).clip(-1, 1).astype(np.float32)
    out = []
    for eng in (source, loaded):
        eng.reset(image, seed=5)
        out.append(np.concatenate([b.frames for b in eng.step(audio) + eng.flush()]))
    np.testing.assert_array_equal(out[0], out[1])


def test_wrong_shapes_name_the_keys(tmp_path, source):
    _write_release(tmp_path, source)
    with pytest.raises(CheckpointError, match="LiveTalk DiT checkpoint does not match"):
        Engine.from_pretrained(str(tmp_path), device="cpu", config=EngineConfig.from_preset("tiny"))


def test_missing_files_are_named(tmp_path, source):
    _write_release(tmp_path, source)
    (tmp_path / "Wan2.1-T2V-1.3B" / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE"):
        Engine.from_pretrained(str(tmp_path), device="cpu", config="micro")
    with pytest.raises(FileNotFoundError, match="not a preset name"):
        Engine.from_pretrained(str(tmp_path / "nowhere"), device="cpu")


# ---- family 2: finding the release files under one directory (runtime.families.liveavatar.loading.find_release) ----

def _liveavatar_names(root):
    """Empty files with the Live Avatar release names (find_release reads names, never contents)."""
    trunk = root / "ckpt" / "Wan2.2-S2V-14B"
    trunk.mkdir(parents=True)
    (trunk / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    (trunk / "Wan2.1_VAE.pth").write_bytes(b"")
    (root / "ckpt" / "liveavatar.safetensors").write_bytes(b"")
    (root / "wav2vec2-large-xlsr-53-english").mkdir()
    (root / "wav2vec2-large-xlsr-53-english" / "config.json").write_text("{}")
    return trunk


def test_find_release_locates_every_file_at_any_depth(tmp_path):
    from runtime.families.liveavatar.loading import find_release

    trunk = _liveavatar_names(tmp_path)
    files = find_release(tmp_path)
    assert files.trunk == trunk and files.vae == trunk / "Wan2.1_VAE.pth"
    assert files.lora == tmp_path / "ckpt" / "liveavatar.safetensors"
    assert files.wav2vec == tmp_path / "wav2vec2-large-xlsr-53-english"


def test_find_release_lists_what_is_missing_and_the_layout(tmp_path):
    from runtime.families.liveavatar.loading import find_release

    trunk = _liveavatar_names(tmp_path)
    (trunk / "Wan2.1_VAE.pth").unlink()
    (tmp_path / "ckpt" / "liveavatar.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        find_release(tmp_path)
    msg = str(err.value)
    assert "no liveavatar.safetensors, no Wan2.1_VAE.pth" in msg and "index" not in msg.split("(expected")[0]
    assert "Wan2.2-S2V-14B/" in msg and "wav2vec2-large-xlsr-53-english/" in msg  # the expected layout
    with pytest.raises(CheckpointError, match="not a directory"):
        find_release(tmp_path / "nowhere")


def test_find_release_refuses_two_candidates(tmp_path):
    from runtime.families.liveavatar.loading import find_release

    _liveavatar_names(tmp_path)
    (tmp_path / "liveavatar.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="several liveavatar.safetensors"):
        find_release(tmp_path)
