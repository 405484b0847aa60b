"""A real batch dimension: each row of a batched forward equals that row run alone."""
import torch

from runtime import EngineConfig, build_dit
from runtime.models.ops import Ops
from runtime.session import KVRing, plan_block


def test_batched_block_forward_equals_rows_alone():
    cfg = EngineConfig.from_preset("tiny")
    torch.manual_seed(0)
    dit = build_dit(cfg)
    d, F, (h, w) = cfg.dit, cfg.cache.block_frames, cfg.latent_hw
    g = torch.Generator().manual_seed(1)
    B = 3
    x = torch.randn(B, d.in_dim, F, h, w, generator=g)
    feats = torch.randn(B, d.audio_pack * F, d.audio_feature_dim, generator=g)
    prompt = torch.randn(B, 5, d.text_dim, generator=g)
    t = torch.tensor([[1000.0] * F, [936.0] * F, [624.0] * F])

    def run(rows):
        ring = KVRing.allocate(cfg, len(rows), "cpu", torch.float32)
        out = None
        for b in range(2):  # two blocks, so the second attends to the first one's cached K/V
            out = dit.forward_block(x[rows], dit.time_mod(t[rows]), dit.audio_cond(feats[rows]),
                                    dit.text_kv(prompt[rows]), ring.k, ring.v, plan_block(b, cfg.cache, len(rows)),
                                    Ops)
        return out, ring

    batched, ring = run([0, 1, 2])
    for r in range(B):
        alone, ring_alone = run([r])
        torch.testing.assert_close(batched[r:r + 1], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ring.k[:, r:r + 1], ring_alone.k, rtol=1e-5, atol=1e-5)
    # rows really differ (audio, text and timestep all per row)
    assert (batched[0] - batched[1]).abs().max() > 1e-2
