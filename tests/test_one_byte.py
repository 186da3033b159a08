"""one_byte: the 1-byte code, shared randomness, the SPSA estimate against autograd, the ordered update, and real
gloo workers whose replicas end bit-identical and can be rebuilt from the exchanged bytes alone."""
import math
from dataclasses import asdict

import pytest
import torch

from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.lm.one_byte import (ByteCodec, FP32Codec, ZOConfig, apply_updates, build_lm, get_codec, local_batch,
                                     lm_loss_at, perturbation, perturbation_seed, projected_gradient, replay,
                                     run_local, run_workers, shard, weight_hash, zo_round)

TINY = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=64)


def tiny_lm(seed: int = 0, dtype=torch.float32) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(LMConfig(**TINY)).to(dtype)


# --- the codec -------------------------------------------------------------------------------------------------------

def test_byte_codec_round_trip_error_is_within_its_bound():
    c = ByteCodec()
    g = torch.exp(torch.linspace(c.log_min, c.log_max, 5001, dtype=torch.float64))
    g = torch.cat([g, -g])
    b = c.encode(g)
    assert b.dtype == torch.uint8 and b.shape == g.shape
    rel = (c.decode(b) / g - 1).abs()
    assert rel.max() <= c.max_rel_error() + 1e-12
    assert rel.max() > 0.9 * c.max_rel_error()          # the bound is tight, not vacuous
    assert torch.equal(torch.sign(c.decode(b)), torch.sign(g))


def test_byte_codec_zero_clipping_and_every_byte():
    c = ByteCodec()
    assert c.encode(torch.tensor([0.0])).item() == 0 and c.decode(torch.tensor([0], dtype=torch.uint8)).item() == 0
    big, small = c.decode(c.encode(torch.tensor([1e9, -1e-12])))
    assert big == pytest.approx(math.exp(c.log_max)) and small == pytest.approx(-math.exp(c.log_min))
    every = c.decode(torch.arange(256, dtype=torch.uint8))
    assert torch.all(every[1:128].diff() > 0) and torch.equal(every[129:], -every[1:128])
    assert torch.equal(c.encode(every), torch.arange(256, dtype=torch.uint8).where(every != 0, torch.tensor(0,
                                                                                    dtype=torch.uint8)))


def test_fp32_codec_is_exact_for_float32_values():
    c = FP32Codec()
    x = torch.randn(7).double().float().double()
    b = c.encode(x)
    assert b.dtype == torch.uint8 and b.numel() == 4 * 7 and torch.equal(c.decode(b), x)


def test_codec_errors():
    with pytest.raises(ValueError, match="unknown codec 'int4'"): get_codec("int4")
    with pytest.raises(ValueError, match="finite"): ByteCodec().encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="log_step"): ByteCodec(log_step=0.0)


# --- shared randomness and the estimate ------------------------------------------------------------------------------

def test_seeds_are_deterministic_distinct_and_checked():
    seeds = {perturbation_seed(0, r, k, s) for r in range(5) for k in range(4) for s in range(3)}
    assert len(seeds) == 60 and all(0 <= s < 2 ** 63 for s in seeds)
    assert perturbation_seed(1, 2, 3, 4) == perturbation_seed(1, 2, 3, 4)
    with pytest.raises(ValueError, match="worker=-1"): perturbation_seed(0, 0, -1, 0)


def test_perturbation_uses_its_own_cpu_generator():
    params = [torch.zeros(3, 4), torch.zeros(5, dtype=torch.float64)]
    torch.manual_seed(123)
    z1 = perturbation(params, 99)
    torch.randn(10)  # the global generator's state must not matter
    z2 = perturbation(params, 99)
    ref = torch.Generator().manual_seed(99)
    expected = [torch.randn(3, 4, generator=ref), torch.randn(5, generator=ref).double()]
    for a, b, e in zip(z1, z2, expected):
        assert torch.equal(a, b) and torch.equal(a, e)
    assert z1[1].dtype == torch.float64


def test_projected_gradient_is_the_directional_derivative_in_float64():
    model = tiny_lm(dtype=torch.float64)
    x = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(1))
    before = weight_hash(model)
    g, loss = projected_gradient(model, x, seed=5, eps=1e-6)
    assert weight_hash(model) == before                 # θ is never touched
    params = dict(model.named_parameters())
    ref = lm_loss_at(model, params, x)
    grads = torch.autograd.grad(ref, list(params.values()))
    g_ref = sum((gr * z).sum() for gr, z in zip(grads, perturbation(list(params.values()), 5))).item()
    assert g == pytest.approx(g_ref, rel=1e-6, abs=1e-9)
    assert loss == pytest.approx(ref.item(), abs=1e-8)
    with pytest.raises(ValueError, match="eps"): projected_gradient(model, x, seed=5, eps=0.0)


def test_apply_updates_matches_the_formula_and_is_reproducible():
    a, b = tiny_lm(), tiny_lm()
    theta0 = [p.detach().double().clone() for p in a.parameters()]
    seeds, grads, lr = [3, 4, 5], [0.5, -1.25, 2.0], 1e-2
    apply_updates(a, seeds, grads, lr)
    apply_updates(b, seeds, grads, lr)
    assert weight_hash(a) == weight_hash(b)
    zs = [perturbation(list(a.parameters()), s) for s in seeds]
    for i, p in enumerate(a.parameters()):
        ref = theta0[i] - lr / math.sqrt(3) * sum(g * z[i].double() for g, z in zip(grads, zs))
        torch.testing.assert_close(p.detach().double(), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="2 seeds but 1"): apply_updates(a, [1, 2], [0.1], lr)


def test_shards_are_disjoint_and_batches_stay_inside():
    stream = torch.arange(1000)
    parts = [shard(stream, k, 4) for k in range(4)]
    assert sum(len(p) for p in parts) == 1000 and len(torch.cat(parts).unique()) == 1000
    cfg = ZOConfig(batch_size=6, seq_len=16)
    x = local_batch(parts[2], cfg, seed=7)
    assert x.shape == (6, 17) and bool(((x >= 500) & (x < 750)).all())
    assert torch.equal(x, local_batch(parts[2], cfg, seed=7))
    with pytest.raises(ValueError, match="worker=4"): shard(stream, 4, 4)
    with pytest.raises(ValueError, match="too short"): local_batch(torch.arange(10), cfg, seed=0)


def test_config_errors():
    with pytest.raises(ValueError, match="rounds=0"): ZOConfig(rounds=0)
    with pytest.raises(ValueError, match="eps > 0"): ZOConfig(eps=-1.0)
    with pytest.raises(ValueError, match="unknown codec"): ZOConfig(codec="fp16")
    with pytest.raises(ValueError, match="world_size=0"): run_workers(0, {})
    with pytest.raises(ValueError, match="job lacks"): run_workers(2, dict(runs=[]))


def test_the_quantised_value_is_what_a_round_applies():
    model, ref = tiny_lm(), tiny_lm()
    stream = torch.randint(0, 32, (400,), generator=torch.Generator().manual_seed(0))
    cfg = ZOConfig(samples=2, batch_size=2, seq_len=8, lr=1e-2)
    out = zo_round(model, stream, cfg, round=0, rank=0, world_size=1, exchange=lambda sent: sent[None])
    seeds = [perturbation_seed(0, 0, 0, s) for s in range(2)]
    apply_updates(ref, seeds, ByteCodec().decode(out["bytes"][0]).tolist(), cfg.lr)
    assert weight_hash(model) == weight_hash(ref)
    unq = tiny_lm()
    apply_updates(unq, seeds, out["g"], cfg.lr)          # the official app's pitfall: the raw g
    assert weight_hash(unq) != weight_hash(model)


# --- real processes --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def job():
    model = tiny_lm()
    stream = torch.randint(0, 32, (2000,), generator=torch.Generator().manual_seed(0))
    val = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(1))
    runs = [asdict(ZOConfig(rounds=4, samples=2, batch_size=2, seq_len=16, eval_every=2, codec=c, seed=3))
            for c in ("byte", "fp32")]
    return dict(config=TINY, state={k: v.clone() for k, v in model.state_dict().items()}, stream=stream, val=val,
                runs=runs)


@pytest.fixture(scope="module")
def two_workers(job):
    return run_workers(2, job, timeout_s=120)


def test_gloo_replicas_are_bit_identical_and_replayable(job, two_workers):
    assert len(two_workers) == 2 and all(len(r) == 2 for r in two_workers)
    for i, cfg in enumerate(job["runs"]):
        h0, h1 = two_workers[0][i]["hash"], two_workers[1][i]["hash"]
        assert h0 == h1
        log = two_workers[0][i]["log"]
        b = get_codec(cfg["codec"]).bytes_per_value
        assert log.shape == (4, 2, 2 * b) and log.dtype == torch.uint8
        assert two_workers[1][i]["sent_bytes"] == [2 * b] * 4      # samples × bytes per value, every round
        assert weight_hash(replay(build_lm(job["config"], job["state"]), log, ZOConfig(**cfg))) == h0
        assert [s for s, _ in two_workers[0][i]["curve"]] == [0, 2, 4]
    assert two_workers[0][0]["hash"] != two_workers[0][1]["hash"]   # 1 byte and fp32 apply different values
    assert weight_hash(build_lm(job["config"], job["state"])) != two_workers[0][0]["hash"]


def test_workers_match_their_single_process_simulation(job, two_workers):
    "Two workers in one process, exchanging by hand, end where the gloo workers ended."
    cfg = ZOConfig(**job["runs"][0])
    models = [build_lm(job["config"], job["state"]) for _ in range(2)]
    streams = [shard(job["stream"], k, 2) for k in range(2)]
    codec = get_codec(cfg.codec)
    for r in range(cfg.rounds):
        seeds = [[perturbation_seed(cfg.seed, r, k, s) for s in range(cfg.samples)] for k in range(2)]
        sent = [codec.encode(torch.tensor([projected_gradient(models[0], local_batch(streams[k], cfg, sd), sd,
                                                               cfg.eps)[0] for sd in seeds[k]], dtype=torch.float64))
                for k in range(2)]
        everyone = torch.stack(sent)
        for k in range(2):
            out = zo_round(models[k], streams[k], cfg, r, k, 2, lambda _: everyone)
            assert torch.equal(out["bytes"], everyone)
    assert weight_hash(models[0]) == weight_hash(models[1]) == two_workers[0][0]["hash"]


def test_run_local_is_a_world_of_one(job):
    one = dict(job, runs=job["runs"][:1])
    (res,), = run_local(one)
    assert res["log"].shape[1] == 1
    assert weight_hash(replay(build_lm(job["config"], job["state"]), res["log"], ZOConfig(**one["runs"][0]))) == \
        res["hash"]


def test_a_failing_worker_is_reported_clearly(job):
    bad = dict(job, stream=torch.arange(10))     # a shard too short for one window
    with pytest.raises(RuntimeError, match=r"ZO worker 0 of 1 failed:[\s\S]*too short"):
        run_workers(1, bad, timeout_s=120)
