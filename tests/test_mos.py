"""paper_repro.lm.mos: the shared-pool layer (PoolView, PooledLinear, attach_pools, materialise) and Mixture of Shards
(index lists, shard assembly, LoRA as its degenerate case, merging)."""
import copy

import pytest
import torch

from paper_repro.core.decoding import batch_greedy_decode
from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.lm.mos import (PROJECTIONS, MoSConfig, PooledLinear, ShardPool, add_mos, attach_pools, lora_parameters,
                                materialise, projection_shape, shard_indices, trainable_parameters)

CFG = LMConfig(vocab_size=50, d_model=32, n_layers=4, n_heads=4, d_ff=48)


def tiny(dtype=torch.float32) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(CFG).to(dtype)


def randomise_pools(model):
    with torch.no_grad():
        for pool in model.shared_pools.values(): pool.A.normal_(); pool.B.normal_(std=0.05)


MOS = MoSConfig(rank=4, pool_rank=2, shards=4, private=2)


def test_lora_is_the_degenerate_case_with_nothing_shared():
    a, b = shard_indices(MoSConfig.lora(3), n_layers=4)
    assert torch.equal(a, b)                                   # paired, as LoRA's A and B
    assert a.flatten().unique().numel() == 12                  # every layer its own shards
    model = add_mos(tiny(torch.float64), MoSConfig.lora(3))
    randomise_pools(model)
    assert trainable_parameters(model) == lora_parameters(CFG, 3)
    for j, block in enumerate(model.layers):                   # ΔW_j = (α/r)·B_jᵀA_j from layer j's own rows
        q = block.self_attn.q_proj
        pool = model.shared_pools["q_proj"]
        rows = slice(3 * j, 3 * j + 3)
        expected = q.view.scale * pool.B[rows].t() @ pool.A[rows]
        assert torch.allclose(q.weight - q.base_weight, expected)


@pytest.mark.parametrize("cfg", [MOS, MoSConfig(rank=2, pool_rank=1, shards=2, private=1),
                                 MoSConfig(rank=2, pool_rank=2, shards=1, private=0)])
def test_trainable_parameters_equal_lora_of_the_pool_rank(cfg):
    model = add_mos(tiny(), cfg)
    assert trainable_parameters(model) == lora_parameters(CFG, cfg.pool_rank)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "shared_pools" not in n)


def test_index_lists_follow_the_four_strategies():
    L, p = 4, MOS.private
    a, b = shard_indices(MOS, L, "q_proj")
    assert a.shape == b.shape == (L, MOS.rank * MOS.shards)
    for idx in (a, b):
        for j in range(L):
            row = idx[j].tolist()
            assert row[:p] == list(range(j * p, j * p + p))               # privatised shards come first
            assert all(i >= L * p for i in row[p:])                       # the rest are public
            assert len(set(row)) == len(row)                              # no shard twice in one layer
        assert len({tuple(r) for r in idx[:, p:].tolist()}) > 1          # subset selection: layers differ
    assert not torch.equal(a, b)                                          # pair dissociation
    same = shard_indices(MoSConfig(rank=4, pool_rank=2, shards=4, private=2, subset_selection=False), L)[0]
    assert all(torch.equal(same[0, p:], same[j, p:]) for j in range(L))
    paired = shard_indices(MoSConfig(rank=4, pool_rank=2, shards=4, private=2, pair_dissociation=False), L)
    assert torch.equal(*paired)
    assert torch.equal(shard_indices(MOS, L, "q_proj")[0], a)            # the draw is fixed by the seed
    assert not torch.equal(shard_indices(MOS, L, "k_proj")[0], a)        # and differs between projection types


def test_vector_sharding_concatenates_shards_into_rank_vectors():
    model = add_mos(tiny(torch.float64), MOS)
    randomise_pools(model)
    view = model.layers[2].mlp.down_proj.view
    pool = model.shared_pools["down_proj"]
    A, B = view.factors()
    d_in, d_out = projection_shape(CFG, "down_proj")
    assert A.shape == (MOS.rank, d_in) and B.shape == (MOS.rank, d_out)
    l = MOS.shards
    for i in range(MOS.rank):                                             # naive: loop over shards
        assert torch.equal(A[i], torch.cat([pool.A[view.idx_a[i * l + k]] for k in range(l)]))
        assert torch.equal(B[i], torch.cat([pool.B[view.idx_b[i * l + k]] for k in range(l)]))
    assert torch.allclose(view(), MOS.scale * B.t() @ A)


def test_an_untrained_adapter_is_the_base_model_and_leaves_it_alone():
    base = tiny()
    before = copy.deepcopy(base.state_dict())
    model = add_mos(copy.deepcopy(base), MOS)
    x = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(x), base(x))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_merged_equals_unmerged_in_float64_and_decodes_the_same():
    model = add_mos(tiny(torch.float64), MOS)
    randomise_pools(model)
    merged = materialise(model)
    assert type(merged) is TransformerLM and not any(isinstance(m, PooledLinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(TransformerLM(CFG).state_dict())
    x = torch.randint(0, 50, (3, 9))
    assert torch.allclose(merged(x), model(x), atol=1e-12, rtol=0)
    assert not torch.allclose(merged(x), tiny(torch.float64)(x))          # the update is really there
    prompts = torch.randint(0, 50, (2, 5))
    assert batch_greedy_decode(model, prompts, 6).tokens == batch_greedy_decode(merged, prompts, 6).tokens


def test_gradients_reach_only_the_shards_in_use_and_sum_over_sharing_layers():
    model = add_mos(tiny(torch.float64), MoSConfig(rank=2, pool_rank=2, shards=2, private=0))
    randomise_pools(model)
    model(torch.randint(0, 50, (2, 6))).sum().backward()
    pool = model.shared_pools["v_proj"]
    used = torch.zeros(pool.A.shape[0], dtype=torch.bool)
    for block in model.layers: used[block.self_attn.v_proj.view.idx_a] = True
    assert (pool.A.grad[~used] == 0).all() and (pool.A.grad[used] != 0).any()
    assert all(p.grad is None for n, p in model.named_parameters() if "shared_pools" not in n)


def test_bad_input_is_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="rank must be a positive int"): MoSConfig(rank=0, pool_rank=1)
    with pytest.raises(ValueError, match="private"): MoSConfig(rank=1, pool_rank=1, private=5)
    with pytest.raises(ValueError, match="each must be one of"): MoSConfig(rank=1, pool_rank=1, targets=("qkv",))
    with pytest.raises(ValueError, match="public shards"): shard_indices(MoSConfig(rank=8, pool_rank=1), 2)
    with pytest.raises(ValueError, match="must divide"): ShardPool(4, 32, 48, shards=5)
    with pytest.raises(ValueError, match="MoSConfig"): add_mos(tiny(), {"rank": 2})
    model = add_mos(tiny(), MOS)
    with pytest.raises(ValueError, match="already has shared pools"):
        attach_pools(model, {}, lambda *a: None, ["q_proj"])
    assert set(PROJECTIONS) == set(MOS.targets)


def tiny_bench_context():
    from paper_repro.core.train import OptimConfig
    from paper_repro.core.zoo import load_tokenizer
    from paper_repro.lm.bench import LMBenchContext
    torch.manual_seed(0)
    return LMBenchContext("ci", torch.device("cpu"), 0, load_tokenizer(), torch.randint(0, 1024, (4000,)),
                          torch.randint(0, 1024, (2, 17)), seq_len=16, batch_size=2, steps=4, d_model=32, n_layers=3,
                          n_heads=4, d_ff=48, optim=OptimConfig(lr=1e-3), warmup=1)


def test_bench_methods_adapt_the_base_and_return_a_merged_plain_model():
    from paper_repro.lm.bench import LMBenchMethod, greedy_tokens
    from paper_repro.lm.mos import bench_methods
    ctx = tiny_bench_context()
    (entry,) = bench_methods(ctx)
    assert isinstance(entry.method, LMBenchMethod) and entry.method.uses_base and entry.paper_headline is None
    base_state = copy.deepcopy(ctx.base().state_dict())
    model = entry.method.train(ctx)
    assert type(model) is TransformerLM and sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in ctx.base().parameters())
    assert all(torch.equal(base_state[k], v) for k, v in ctx.base().state_dict().items())   # the base is untouched
    assert not all(torch.equal(base_state[k], v) for k, v in model.state_dict().items())    # the adapter was merged in
    assert greedy_tokens(model, ctx.val[:, :5], 3).shape == (2, 3)
