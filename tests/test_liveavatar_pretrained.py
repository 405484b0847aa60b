"""Engine.from_pretrained(DIR) over tiny files written in the release layout: Wan2.2-S2V-14B/ (trunk shards +
index + config.json + Wan2.1_VAE.pth, a pickled state dict), liveavatar.safetensors, a wav2vec2 HF dir."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from runtime.checkpoint import CheckpointError
from runtime.engine import Engine
from runtime.families.liveavatar.audio_front import tiny_wav2vec2
from runtime.families.liveavatar.presets import engine_preset
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
    return tmp_path, vae, w2v


def _load(root, **kw):
    return Engine.from_pretrained(str(root), device="cpu", dtype=torch.float32, config="liveavatar-tiny",
                                  mode="eager", **kw)


def test_release_files_load_and_stream(files):
    root, vae, w2v = files
    with _load(root) as e:
        assert e.family.name == "liveavatar"
        assert all(torch.equal(a, b) for a, b in zip(e.family.vae.state_dict().values(), vae.state_dict().values()))
        assert all(torch.equal(a, b) for a, b in zip(e.family.front.model.state_dict().values(),
                                                     w2v.state_dict().values()))
        with e.open(synthetic_face(64, 64)) as s:
            audio = (0.2 * np.sin(np.arange(12000) / 16000 * 2 * np.pi * 200)).astype(np.float32)
            blocks = s.step(audio, 16000) + s.flush()
    assert blocks and blocks[0].frames.shape == (12, 64, 64, 3)  # 3 lead frames + 9 decoded


def test_wav2vec2_inside_the_trunk_directory_is_found(files):
    root, _, _ = files
    (root / "wav2vec2-large-xlsr-53-english").rename(root / "Wan2.2-S2V-14B" / "wav2vec2-large-xlsr-53-english")
    with _load(root) as e:
        assert e.family.name == "liveavatar"


def test_missing_files_are_all_named(files):
    root, _, _ = files
    (root / "liveavatar.safetensors").unlink()
    (root / "Wan2.2-S2V-14B" / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match="not a Live Avatar release directory") as err:
        _load(root)
    assert all(s in str(err.value) for s in ("liveavatar.safetensors", "Wan2.1_VAE.pth"))


def test_a_directory_with_only_the_audio_encoder_is_recognised_as_family_2(tmp_path):
    """Any part of the release picks family 2, whose error then lists every missing part."""
    tiny_wav2vec2(TINY.audio_layers, TINY.audio_dim).save_pretrained(tmp_path / "wav2vec2-large-xlsr-53-english")
    with pytest.raises(CheckpointError, match="no trunk index .* no liveavatar.safetensors, no Wan2.1_VAE.pth"):
        _load(tmp_path)


def test_wav2vec2_of_other_width_is_refused(files):
    root, _, _ = files
    tiny_wav2vec2(TINY.audio_layers, 24).save_pretrained(root / "wav2vec2-large-xlsr-53-english")
    with pytest.raises(ValueError, match="hidden states"):
        _load(root)
