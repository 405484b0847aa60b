"""LiveAvatarEngine.from_pretrained over tiny files written in the release layouts: trunk shards +
index + config.json, liveavatar.safetensors, Wan2.1_VAE.pth (a pickled state dict), a wav2vec2 HF dir."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from runtime.liveavatar.audio_front import tiny_wav2vec2
from runtime.liveavatar.engine import LiveAvatarEngine
from runtime.liveavatar.presets import engine_preset
from runtime.media import synthetic_face
from runtime.models.vae import WanVAE
from tests.test_liveavatar_loading import TINY, _lora_state, _tiny_state, _write_trunk


@pytest.fixture()
def files(tmp_path):
    state = _tiny_state()
    trunk = tmp_path / "Wan2.2-S2V-14B"
    trunk.mkdir()
    _write_trunk(trunk, state)
    save_file(_lora_state(state), str(tmp_path / "liveavatar.safetensors"))
    torch.manual_seed(3)
    vae = WanVAE(engine_preset("tiny").vae)
    torch.save(vae.state_dict(), trunk / "Wan2.1_VAE.pth")
    w2v_dir = tmp_path / "wav2vec2-large-xlsr-53-english"
    w2v = tiny_wav2vec2(TINY.audio_layers, TINY.audio_dim, seed=4)
    w2v.save_pretrained(w2v_dir)
    (w2v_dir / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    paths = (trunk, tmp_path / "liveavatar.safetensors", trunk / "Wan2.1_VAE.pth", w2v_dir)
    return paths, vae, w2v


def test_release_files_load_and_stream(files):
    paths, vae, w2v = files
    e = LiveAvatarEngine.from_pretrained(*paths, device="cpu", dtype=torch.float32, preset="tiny")
    assert all(torch.equal(a, b) for a, b in zip(e.vae.state_dict().values(), vae.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(e.front.model.state_dict().values(), w2v.state_dict().values()))
    e.reset(synthetic_face(64, 64))
    audio = (0.2 * np.sin(np.arange(12000) / 16000 * 2 * np.pi * 200)).astype(np.float32)
    blocks = e.step(audio, 16000) + e.flush()
    assert blocks and blocks[0].frames.shape == (12, 64, 64, 3)  # 3 lead frames + 9 decoded


def test_missing_files_are_all_named(files, tmp_path):
    paths, _, _ = files
    with pytest.raises(FileNotFoundError) as err:
        LiveAvatarEngine.from_pretrained(paths[0], tmp_path / "nope.safetensors", tmp_path / "Wan2.1_VAE.pth",
                                         tmp_path / "w2v", device="cpu", preset="tiny")
    assert all(s in str(err.value) for s in ("nope.safetensors", "Wan2.1_VAE.pth", "w2v"))


def test_wav2vec2_of_other_width_is_refused(files, tmp_path):
    paths, _, _ = files
    tiny_wav2vec2(TINY.audio_layers, 24).save_pretrained(tmp_path / "w2v24")
    with pytest.raises(ValueError, match="hidden states"):
        LiveAvatarEngine.from_pretrained(*paths[:3], tmp_path / "w2v24", device="cpu", preset="tiny")
