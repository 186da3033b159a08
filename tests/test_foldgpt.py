"""FoldGPT (paper_repro.lm.foldgpt): the shared cost/relaxation pieces, the gated model, removal and folding into a
plain core TransformerLM (logits = the intended composition, shared blocks share storage), gates and budget maths."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from paper_repro.core.lm import LMConfig, TransformerLM, causal_mask, count_parameters, rope_cos_sin
from paper_repro.core.train import OptimConfig
from paper_repro.lm.foldgpt import (GateConfig, GatedLM, HealConfig, adjacent_cosine, bench_train, block_flops,
                                    block_influence, budget_penalty, compression_plan, count_flops, distill_loss,
                                    expected_cost, fold, foldgpt_compress, heal, keep_after_removal, lm_flops,
                                    polarization, relaxed_weights, residual_states, share_groups, train_gates)


def tiny_lm(n_layers=4, seed=0, dtype=torch.float32) -> TransformerLM:
    torch.manual_seed(seed)
    m = TransformerLM(LMConfig(48, d_model=16, n_layers=n_layers, n_heads=2, d_ff=32))
    for p in m.parameters():   # larger weights than the 0.02 init, so blocks matter and differ
        nn.init.normal_(p, std=0.3) if p.dim() > 1 else nn.init.uniform_(p, 0.5, 1.5)
    return m.to(dtype).eval()


def tokens(B=2, T=10, seed=1, V=48):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- costs and relaxations -------------------------------------------------------------------------------------------

def test_count_flops_counts_matmuls():
    lin = nn.Linear(8, 4, bias=False)
    assert count_flops(lambda: lin(torch.zeros(3, 8))) == 2 * 3 * 8 * 4
    m = tiny_lm(4)
    per_block, rest = block_flops(m, 12)
    assert len(set(per_block)) == 1 and rest > 0
    assert lm_flops(m, 12) == sum(per_block) + rest
    assert lm_flops(fold(m, [0, 2]), 12) == 2 * per_block[0] + rest
    with pytest.raises(ValueError, match="seq_len"): lm_flops(m, 0)


def test_relaxed_weights():
    logits = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    assert torch.allclose(relaxed_weights(logits, "softmax"), torch.softmax(logits, -1))
    assert torch.allclose(relaxed_weights(logits, "sigmoid"), torch.sigmoid(logits))
    torch.manual_seed(0)
    w = relaxed_weights(logits, "dirichlet")
    assert torch.allclose(w.sum(), torch.tensor(1.0)) and (w > 0).all()
    w[0].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0   # reparameterised: gradients reach the logits
    with pytest.raises(ValueError, match="unknown relaxation 'gumbel'; valid: sigmoid, softmax, dirichlet"):
        relaxed_weights(logits, "gumbel")


def test_budget_maths():
    w = torch.tensor([0.25, 0.75], requires_grad=True)
    cost = expected_cost(w, [4.0, 8.0])
    assert cost.item() == 7.0
    assert torch.isclose(budget_penalty(cost, 5.0), torch.tensor((7 / 5 - 1) ** 2))
    assert budget_penalty(torch.tensor(4.0), 5.0, "hinge") == 0
    assert budget_penalty(torch.tensor(4.0), 5.0, "squared") > 0
    budget_penalty(cost, 5.0).backward()
    assert w.grad[1] > w.grad[0] > 0   # the pricier choice is pushed down harder
    with pytest.raises(ValueError, match="must match"): expected_cost(w, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="budget must be positive"): budget_penalty(cost, 0.0)
    with pytest.raises(ValueError, match="unknown budget mode 'l1'"): budget_penalty(cost, 1.0, "l1")


def test_polarization_prefers_split_gates():
    split, flat = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.full((4,), 0.5)
    assert polarization(split, 1.2) < polarization(flat, 1.2)
    assert torch.isclose(polarization(split, 1.2), torch.tensor(1.2 * 0.5 - 0.5))


# --- depth redundancy -------------------------------------------------------------------------------------------------

def test_residual_states_and_cosine_match_a_naive_loop():
    m, x = tiny_lm(4, dtype=torch.float64), tokens()
    xs = residual_states(m, x)
    for k in range(5):   # the raw residual after k blocks, by the core's own upto_layer
        ref = m.hidden_states(x, upto_layer=k) if k else m.embed_tokens(x)
        assert torch.allclose(xs[k], ref, atol=1e-12)
    cos = adjacent_cosine(m, x)
    naive = [F.cosine_similarity(xs[i], xs[i + 1], dim=-1).mean() for i in range(4)]
    assert torch.allclose(cos, torch.stack(naive).float(), atol=1e-6)
    assert torch.allclose(block_influence(m, x), 1 - cos)


# --- gates -------------------------------------------------------------------------------------------------------------

def test_gated_model_interpolates_between_full_and_removed():
    m, x = tiny_lm(4, dtype=torch.float64), tokens()
    g = GatedLM(m, init_logit=60.0).double()
    assert torch.allclose(g(x), m(x), atol=1e-10)
    with torch.no_grad(): g.gate_logits.copy_(torch.tensor([60.0, -60.0, 60.0, -60.0]))
    assert torch.allclose(g(x), fold(m, [0, 2])(x), atol=1e-10)


def test_train_gates_closes_the_gate_of_a_useless_block():
    m = tiny_lm(4)
    with torch.no_grad():   # block 2 becomes the identity: its attention and MLP outputs are zero
        m.layers[2].self_attn.o_proj.weight.zero_(); m.layers[2].mlp.down_proj.weight.zero_()
    windows = tokens(B=8, T=13, seed=3).view(4, 2, 13)
    gates = train_gates(m, lambda i: windows[i % 4], n_remove=1, seq_len=12, cfg=GateConfig(steps=15, lr=0.2),
                        progress=False)
    assert gates.shape == (4,) and gates.argmin() == 2
    assert all(p.requires_grad for p in m.parameters())   # the frozen weights are released afterwards
    with pytest.raises(ValueError, match="n_remove=4 must be in"):
        train_gates(m, lambda i: windows[0], n_remove=4, seq_len=12)


# --- removal, grouping, folding -------------------------------------------------------------------------------------

def test_keep_after_removal():
    assert keep_after_removal([0.3, 0.1, 0.9, 0.2], 2) == [0, 2]
    assert keep_after_removal([0.5, 0.5, 0.5], 1) == [0, 1]   # a tie removes the later block
    assert keep_after_removal([0.5, 0.1], 0) == [0, 1]
    with pytest.raises(ValueError, match="n_remove=3 must be in"): keep_after_removal([1, 2, 3], 3)


def test_share_groups_are_adjacent_balanced_and_follow_similarity():
    groups = share_groups([0, 1, 3, 4, 5], 3, similarity=[0.1, 0.2, 0.3, 0.9, 0.95, 0.4])
    # first the most similar boundary (block 4 starts the right group: 0.95), then the smallest merge
    assert groups == [[0, 1], [3, 4], [5]]
    assert share_groups([5, 6, 7], 2, similarity=[0] * 6 + [1.0, 0.0]) == [[5, 6], [7]]
    assert share_groups([5, 6, 7], 2, similarity=[0] * 6 + [0.0, 1.0]) == [[5], [6, 7]]
    assert share_groups([0, 1, 2, 3], 2, similarity=[0.0, 0.9, 0.1, 0.8]) == [[0, 1], [2, 3]]
    assert share_groups([0, 1, 2], 3, similarity=[0.0] * 3) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="n_unique=0 must be in"): share_groups([0, 1], 0, [0.0, 0.0])


def manual_composition(model, kept, leader_of, x):
    "Reference: embed, then for each kept block its own norms around its group leader's attention and MLP, head."
    h = model.embed_tokens(x)
    T = x.shape[1]
    cos, sin = rope_cos_sin(torch.arange(T)[None].expand(x.shape[0], T), model.cfg.head_dim, model.cfg.rope_theta, h.dtype)
    mask = causal_mask(T, 0)
    for i in kept:
        own, lead = model.layers[i], model.layers[leader_of[i]]
        h = h + lead.self_attn(own.input_layernorm(h), cos, sin, mask, None, 0, 0)
        h = h + lead.mlp(own.post_attention_layernorm(h))
    return model.lm_head(model.norm(h))


def test_fold_is_a_plain_lm_computing_the_intended_composition():
    m, x = tiny_lm(6, dtype=torch.float64), tokens()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kept, groups, importance = [0, 1, 3, 4, 5], [[0], [1, 3], [4, 5]], [0, 0.2, 0, 0.9, 0.1, 0.3]
    f = fold(m, kept, groups, importance)
    assert type(f) is TransformerLM and f.cfg.n_layers == 5 and len(f.layers) == 5
    leader_of = {0: 0, 1: 3, 3: 3, 4: 5, 5: 5}
    assert torch.allclose(f(x), manual_composition(m, kept, leader_of, x), atol=1e-10)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())   # the source model is untouched


def test_shared_blocks_share_storage_and_keep_private_norms():
    m = tiny_lm(6)
    f = fold(m, [0, 1, 3, 4, 5], [[0], [1, 3], [4, 5]])
    a, b = f.layers[1], f.layers[2]
    assert a.self_attn is b.self_attn and a.mlp is b.mlp
    assert a.mlp.up_proj.weight.data_ptr() == b.mlp.up_proj.weight.data_ptr()
    assert a.input_layernorm is not b.input_layernorm and a.post_attention_layernorm is not b.post_attention_layernorm
    with torch.no_grad(): a.mlp.up_proj.weight.add_(1.0)
    assert torch.equal(a.mlp.up_proj.weight, b.mlp.up_proj.weight)   # one tensor, seen from both blocks
    block = count_parameters(m.layers[0])
    norms = sum(p.numel() for n, p in m.layers[0].named_parameters() if "norm" in n)
    assert count_parameters(f.layers) == 3 * block + 2 * norms
    # a training step moves the shared tensor once, with the gradient of both uses
    loss = f(tokens()).sum()
    loss.backward()
    assert a.mlp.up_proj.weight.grad is b.mlp.up_proj.weight.grad


def test_folded_model_decodes_with_the_core_kv_cache():
    f = fold(tiny_lm(6, dtype=torch.float64), [0, 1, 3, 4], [[0, 1], [3, 4]])
    x = tokens(B=1, T=9)
    full = f(x)
    cache = f.new_cache(1, capacity=16)
    steps = [f(x[:, :5], cache=cache)] + [f(x[:, t:t + 1], cache=cache) for t in range(5, 9)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-10)


def test_fold_rejects_bad_plans():
    m = tiny_lm(4)
    with pytest.raises(ValueError, match="kept must be increasing"): fold(m, [2, 1])
    with pytest.raises(ValueError, match="kept must be increasing"): fold(m, [0, 4])
    with pytest.raises(ValueError, match="must partition"): fold(m, [0, 1, 2], [[0, 1]])


def test_compression_plan():
    assert compression_plan(6, 0.25) == dict(n_unique=4, remove_only=2, fold_remove=1)
    assert compression_plan(6, 0.5) == dict(n_unique=3, remove_only=3, fold_remove=1)
    assert compression_plan(12, 0.25) == dict(n_unique=9, remove_only=3, fold_remove=1)
    assert compression_plan(12, 0.5) == dict(n_unique=6, remove_only=6, fold_remove=3)
    with pytest.raises(ValueError, match="rate must be in"): compression_plan(6, 1.0)
    with pytest.raises(ValueError, match="removal_share"): compression_plan(6, 0.5, removal_share=2)


# --- healing and the whole scheme ---------------------------------------------------------------------------------------

def test_distill_loss_is_zero_against_itself_and_heal_trains_only_the_student():
    m, x = tiny_lm(4), tokens(T=11)
    parts = distill_loss(m, m, x)
    assert parts["kl"].abs() < 1e-5 and parts["tail"] < 1e-10
    assert torch.allclose(distill_loss(m, m, x, HealConfig(distill=False))["loss"], parts["ce"])
    student = fold(m, [0, 2, 3], [[0], [2, 3]])
    teacher_state = {k: v.clone() for k, v in m.state_dict().items()}
    w0 = student.layers[1].mlp.up_proj.weight.clone()
    windows = tokens(B=4, T=11).view(2, 2, 11)
    heal(student, m, lambda i: windows[i % 2], HealConfig(steps=3), progress=False)
    assert not torch.equal(student.layers[1].mlp.up_proj.weight, w0)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in teacher_state.items())


def test_foldgpt_compress_and_bench_train_give_plain_compressed_lms():
    m = tiny_lm(6)
    windows = tokens(B=8, T=13, seed=5).view(4, 2, 13)
    out = foldgpt_compress(m, 0.5, lambda i: windows[i % 4], 12, GateConfig(steps=2), HealConfig(steps=2), progress=False)
    assert type(out) is TransformerLM and out.cfg.n_layers == 5
    assert count_parameters(out.layers) < 0.55 * count_parameters(m.layers)
    ctx = SimpleNamespace(base=lambda: m, batch=lambda i: windows[i % 4], steps=8, seq_len=12,
                          device=torch.device("cpu"), optim=OptimConfig(lr=1e-3))
    bench = bench_train(ctx)
    assert type(bench) is TransformerLM and bench.cfg.n_layers == 5


def test_bench_methods_plug_into_the_lm_bench():
    import dataclasses
    from paper_repro.lm.bench import make_context, train_method
    from paper_repro.lm.foldgpt import bench_methods
    ctx = dataclasses.replace(make_context("ci"), steps=8, d_model=32, n_layers=4, n_heads=2, d_ff=64, seq_len=16)
    (entry,) = bench_methods(ctx)
    assert entry.method.uses_base
    model, wall, tokens = train_method(entry.method, ctx)
    assert type(model) is TransformerLM and model.cfg.n_layers == 3 and tokens > 0
