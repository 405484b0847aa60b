"""The engine with the TAEHV decoder: same block contract, streaming, scheduled and release loading."""
import numpy as np
import pytest
import torch

from runtime import Engine

from .test_release_loading import _write_release


@pytest.fixture(scope="module")
def engines():
    return (Engine.from_pretrained("micro", device="cpu", seed=3),
            Engine.from_pretrained("micro", device="cpu", seed=3, decoder="taehv"))


IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
AUDIO = (np.random.default_rng(1).standard_normal(40000) * 0.2).clip(-1, 1).astype(np.float32)


def _frames(eng, chunks=None):
    eng.reset(IMAGE, seed=9)
    blocks = []
    for part in np.array_split(AUDIO, chunks or 1):
        blocks += eng.step(part)
    blocks += eng.flush()
    return blocks


def test_taehv_keeps_the_block_contract_and_chunking_invariance(engines):
    wan, tae = engines
    assert tae.taehv is not None and tae.decoder_model is tae.taehv and wan.decoder_model is wan.vae
    a, b = _frames(tae), _frames(tae, chunks=37)
    assert [x.num_frames for x in a] == [9] + [12] * (len(a) - 1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.frames, y.frames)
    w = _frames(wan)
    assert len(w) == len(a)
    assert any((x.frames != y.frames).any() for x, y in zip(w, a))  # really another decoder


def test_scheduled_engine_with_taehv_equals_eager(engines):
    _, tae = engines
    ref = _frames(tae)
    with Engine.from_pretrained("micro", device="cpu", seed=3, decoder="taehv", mode="eager") as eager:
        got = _frames(eager, chunks=5)
    for x, y in zip(ref, got):
        np.testing.assert_array_equal(x.frames, y.frames)


def test_release_directory_with_taew2_1(tmp_path, engines):
    _, tae = engines
    _write_release(tmp_path, tae)
    torch.save({f"encoder.{k}": v for k, v in {"0.weight": torch.zeros(1)}.items()}
               | tae.taehv.state_dict(), tmp_path / "taew2_1.pth")
    loaded = Engine.from_pretrained(str(tmp_path), device="cpu", config="micro", decoder="taehv")
    for x, y in zip(_frames(tae), _frames(loaded)):
        np.testing.assert_array_equal(x.frames, y.frames)


def test_unknown_decoder_is_named():
    with pytest.raises(ValueError, match="unknown decoder 'tiny'"):
        Engine.from_pretrained("micro", device="cpu", decoder="tiny")
