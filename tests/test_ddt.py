"""ddt: the decoupled encoder/decoder, encoder sharing through the shared flow sampler (exact when every step is
computed, really reusing z otherwise), the DP schedule against brute force, and the similarity statistic."""
from dataclasses import replace
from itertools import combinations

import pytest
import torch

from paper_repro.generation.core import flow_sample
from paper_repro.generation.ddt import (DDT, SharedEncoder, TrainConfig, build_model, dp_schedule, eval_inputs,
                                        generate, make_model, reuse_cost, sample_shared, schedule, uniform_schedule,
                                        z_similarity)
from paper_repro.generation.dit import DiTConfig, count_params

CFG = DiTConfig(dim=32, heads=2, patch_size=4)


def trained_like(seed: int = 0) -> DDT:
    "A DDT with its zero-initialised gates and head perturbed, so every part of it matters."
    torch.manual_seed(seed)
    m = DDT(CFG, 2, 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ada" in name or "head.linear" in name: p.normal_(0, 0.1)
    return m.eval()


def test_shapes_and_conditioning_path():
    m = trained_like()
    x, t, y = torch.randn(3, 1, 16, 16), torch.rand(3), torch.tensor([0, 4, 9])
    z = m.encode(x, t, y)
    assert z.shape == (3, 16, 32) and m(x, t, y).shape == x.shape
    assert torch.allclose(m(x, t, y), m.decode(x, t, z))
    assert not torch.allclose(m.decode(x, t, z), m.decode(x, t, torch.randn_like(z)))  # the decoder reads z
    assert not torch.allclose(m(x, t, y), m(x, t, torch.tensor([1, 4, 9])))            # y reaches v through z


def test_same_blocks_same_size():
    sit, ddt = build_model("sit", CFG, 6, 2), build_model("ddt", CFG, 6, 2)
    assert len(sit.blocks) == 8 and len(ddt.encoder) == 6 and len(ddt.decoder) == 2
    assert abs(count_params(ddt) - count_params(sit)) / count_params(sit) < 0.03
    with pytest.raises(ValueError, match="arch"): build_model("unet", CFG, 6, 2)
    with pytest.raises(ValueError, match="arch"): TrainConfig(arch="x")


def test_sharing_every_step_is_plain_sampling_and_reuse_is_real():
    m = trained_like()
    noise, y = torch.randn(4, 1, 16, 16), torch.arange(4)
    full, w = sample_shared(m, noise, 6, y, range(6))
    assert torch.equal(full, flow_sample(m, noise, 6, y)) and w.encoder_calls == 6 and w.calls == 6
    shared, w = sample_shared(m, noise, 6, y, [0, 3])
    assert w.encoder_calls == 2 and not torch.allclose(shared, full)
    # by hand: z from step 0 used at steps 0-2, from step 3 at steps 3-5
    x, z = noise.clone(), None
    for i in range(6):
        t = torch.full((4,), i / 6)
        if i in (0, 3): z = m.encode(x, t, y)
        x = x + m.decode(x, t, z) / 6
    assert torch.allclose(shared, x, atol=1e-5)


def test_shared_encoder_errors():
    m = trained_like()
    with pytest.raises(ValueError, match="step 0"): SharedEncoder(m, [1, 2], 4)
    with pytest.raises(ValueError, match="step 0"): SharedEncoder(m, [0, 4], 4)
    w = SharedEncoder(m, [0], 1)
    x = torch.randn(1, 1, 16, 16)
    w(x, torch.zeros(1), None)
    with pytest.raises(RuntimeError, match="more than"): w(x, torch.zeros(1), None)


def test_uniform_schedule():
    assert uniform_schedule(16, 4) == [0, 4, 8, 12] and uniform_schedule(8, 8) == list(range(8))
    assert uniform_schedule(10, 1) == [0]
    with pytest.raises(ValueError): uniform_schedule(4, 5)


@pytest.mark.parametrize("n,seed", [(6, 0), (8, 1), (9, 2)])
def test_dp_schedule_is_optimal_by_brute_force(n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(n, n, generator=g, dtype=torch.float64)
    S = (A + A.T) / 2
    S.fill_diagonal_(1.0)
    for k in range(1, n + 1):
        sched = dp_schedule(S, k)
        assert len(sched) == k and sched[0] == 0 and sched == sorted(set(sched))
        brute = min(reuse_cost(S, (0,) + c) for c in combinations(range(1, n), k - 1))
        assert reuse_cost(S, sched) == pytest.approx(brute, abs=1e-12)
    assert reuse_cost(S, range(n)) == pytest.approx(0.0)


def test_dp_prefers_recomputing_where_z_changes():
    S = torch.ones(8, 8, dtype=torch.float64)
    S[:5, 5:] = S[5:, :5] = 0.0   # z jumps between step 4 and step 5
    assert dp_schedule(S, 2) == [0, 5]
    with pytest.raises(ValueError, match="similarity"): schedule("dp", 8, 2)
    with pytest.raises(ValueError, match="schedule"): schedule("greedy", 8, 2)


def test_z_similarity_is_a_cosine_matrix():
    m = trained_like()
    S = z_similarity(m, torch.randn(3, 1, 16, 16), 5, torch.arange(3))
    assert S.shape == (5, 5) and torch.allclose(S, S.T)
    assert torch.allclose(S.diagonal(), torch.ones(5, dtype=S.dtype)) and bool((S <= 1 + 1e-9).all())


def test_generate_range_and_eval_inputs():
    n, y = eval_inputs(12)
    assert torch.equal(n, eval_inputs(12)[0]) and y.tolist() == [i % 10 for i in range(12)]
    m = make_model(TrainConfig(dim=32, heads=2, encoder_depth=1, decoder_depth=1))
    imgs = generate(m, n, y, 3, batch_size=5, compute=[0])
    assert imgs.shape == (12, 1, 16, 16) and float(imgs.min()) >= 0 and float(imgs.max()) <= 1
