"""TangleNAS (paper_repro.lm.tanglenas): weight mixing == output mixing for linear layers, one-hot supernet == the
extracted plain core TransformerLM, budget maths, the two searches and the memory measurement."""
import pytest
import torch
import torch.nn.functional as F

from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.core.train import OptimConfig
from paper_repro.lm.foldgpt import lm_flops
from paper_repro.lm.tanglenas import (DECISIONS, Arch, ArchParams, EntangledLM, SearchSpace, arch_costs,
                                      drnas_search, expected_flops, extract, mixed_linear, mixing_cost, prefix_mask,
                                      random_search, saved_bytes, spos_train)

TINY = SearchSpace(vocab_size=40, embed=(8, 16), heads=(1, 2), mlp_ratio=(1, 2), layers=(1, 2))


def f64(w): return {k: v.double() for k, v in w.items()}


def toks(B=2, T=7, seed=0, V=40):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def big_supernet(space=TINY, seed=0) -> EntangledLM:
    torch.manual_seed(seed)
    net = EntangledLM(space).double()
    with torch.no_grad():   # larger weights than the 0.02 init so that mistakes show in the logits
        for p in net.parameters(): p.mul_(15.0) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return net


# --- mixing -------------------------------------------------------------------------------------------------------------

def test_prefix_mask():
    like = torch.zeros(1)
    m = prefix_mask([(2, torch.tensor(0.25)), (4, torch.tensor(0.75))], 5, like)
    assert torch.allclose(m, torch.tensor([1.0, 1.0, 0.75, 0.75, 0.0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_mixing_equals_output_mixing_for_linear_layers(seed):
    g = torch.Generator().manual_seed(seed)
    W, x = torch.randn(12, 10, generator=g, dtype=torch.float64), torch.randn(2, 3, 10, generator=g, dtype=torch.float64)
    wo = torch.softmax(torch.randn(3, generator=g, dtype=torch.float64), 0)
    wi = torch.softmax(torch.randn(2, generator=g, dtype=torch.float64), 0)
    outs, ins = list(zip([4, 8, 12], wo)), list(zip([5, 10], wi))
    a, b = mixed_linear(x, W, outs, ins, "weight"), mixed_linear(x, W, outs, ins, "output")
    assert torch.allclose(a, b, atol=1e-12)
    # and both equal the explicit mixture of padded sub-matrices, W_mix = Σ wo wi pad(W[:o, :i])
    W_mix = sum(po * pi * F.pad(W[:o, :i], (0, 10 - i, 0, 12 - o)) for o, po in outs for i, pi in ins)
    assert torch.allclose(a, x @ W_mix.T, atol=1e-12)
    with pytest.raises(ValueError, match="unknown mixing 'input'; valid: weight, output"):
        mixed_linear(x, W, outs, ins, "input")


def test_one_hot_mixing_is_the_slice():
    W, x = torch.randn(6, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    out = mixed_linear(x, W, [(4, one)], [(3, one)])
    assert torch.allclose(out[:, :4], x[:, :3] @ W[:4, :3].T) and (out[:, 4:] == 0).all()


# --- the supernet ----------------------------------------------------------------------------------------------------------

def test_search_space_validates():
    assert len(SearchSpace().architectures()) == 54
    assert SearchSpace().config(Arch(64, 4, 3, 2)) == LMConfig(1024, d_model=64, n_layers=2, n_heads=4, d_ff=192)
    with pytest.raises(ValueError, match="increasing order"): SearchSpace(embed=(64, 32))
    with pytest.raises(ValueError, match="even size"): SearchSpace(embed=(20,), heads=(4,))
    with pytest.raises(ValueError, match="unknown decision 'width'"): SearchSpace().choices("width")
    with pytest.raises(ValueError, match="not in"): SearchSpace().one_hot(Arch(48, 2, 2, 2))


def test_one_hot_supernet_equals_every_extracted_subnetwork():
    net, x = big_supernet(), toks()
    for arch in TINY.architectures():
        sub = extract(net, arch)
        assert type(sub) is TransformerLM and sub.cfg == TINY.config(arch)
        assert torch.allclose(net(x, f64(TINY.one_hot(arch))), sub.double()(x), atol=1e-9), arch


def test_one_hot_supernet_equals_subnetwork_on_the_paper_space():
    space = SearchSpace(vocab_size=50)
    torch.manual_seed(1)
    net = EntangledLM(space).double()
    x = toks(V=50, T=9)
    for arch in [Arch(32, 4, 2, 2), Arch(64, 2, 3, 3), Arch(96, 4, 4, 4)]:
        assert torch.allclose(net(x, f64(space.one_hot(arch))), extract(net, arch).double()(x), atol=1e-10), arch


def test_soft_weights_mix_and_bad_weights_are_rejected():
    net, x = big_supernet(), toks()
    w = {n: torch.softmax(torch.randn(len(TINY.choices(n)), dtype=torch.float64), 0) for n in DECISIONS}
    out = net(x, w)
    assert out.shape == (2, 7, 40) and torch.isfinite(out).all()
    one_hots = [net(x, f64(TINY.one_hot(a))) for a in TINY.architectures()]
    assert not any(torch.allclose(out, o) for o in one_hots)   # a genuine mixture, not one sub-network
    with pytest.raises(ValueError, match=r"weights\['heads'\] must have shape \(2,\)"):
        net(x, dict(w, heads=torch.ones(3, dtype=torch.float64)))


# --- costs, budget, searches -------------------------------------------------------------------------------------------------

def test_arch_costs_match_the_counter_and_the_expectation():
    costs = arch_costs(TINY, 16)
    for arch in [Arch(8, 1, 1, 1), Arch(16, 2, 2, 2)]:
        with torch.device("meta"): m = TransformerLM(TINY.config(arch))
        assert costs[arch] == lm_flops(m, 16) / 16
    w = {n: torch.softmax(torch.randn(len(TINY.choices(n))), 0) for n in DECISIONS}
    naive = sum(costs[a] * w["embed"][TINY.embed.index(a.embed)] * w["heads"][TINY.heads.index(a.heads)]
                * w["mlp_ratio"][TINY.mlp_ratio.index(a.mlp_ratio)] * w["layers"][TINY.layers.index(a.layers)]
                for a in TINY.architectures())
    assert torch.allclose(expected_flops(TINY, w, costs), naive)
    one = TINY.one_hot(Arch(16, 1, 2, 1))
    assert torch.isclose(expected_flops(TINY, one, costs), torch.tensor(costs[Arch(16, 1, 2, 1)]))


def test_arch_params_relaxations_and_argmax():
    a = ArchParams(TINY)
    with torch.no_grad(): a.logits["embed"].copy_(torch.tensor([0.0, 3.0])); a.logits["layers"].copy_(torch.tensor([2.0, 0.0]))
    assert a.argmax() == Arch(16, 1, 1, 1)
    torch.manual_seed(0)
    w = a.weights("dirichlet")
    assert all(torch.isclose(v.sum(), torch.tensor(1.0)) for v in w.values())
    assert torch.allclose(a.weights("softmax")["embed"], torch.softmax(torch.tensor([0.0, 3.0]), 0))


def windows(n=6, B=2, T=9, seed=3):
    return toks(B=n * B, T=T + 1, seed=seed).view(n, B, T + 1)


def test_drnas_search_updates_logits_and_respects_a_tight_budget():
    torch.manual_seed(0)
    net = EntangledLM(TINY)
    bank, search = windows(), windows(seed=4)
    costs = arch_costs(TINY, 9)
    budget = min(costs.values()) * 1.01   # only the cheapest architectures fit: the penalty pushes towards them
    arch, log = drnas_search(net, lambda i: bank[i % 6], lambda i: search[i % 6], 6, costs, budget,
                             OptimConfig(lr=1e-3), arch_lr=0.3, progress=False)
    assert len(log) == 6 and log[-1]["flops_ratio"] < log[0]["flops_ratio"]
    assert any((p.grad is None) for p in net.parameters())   # the search batch's gradients were cleared
    assert arch.argmax().embed == 8


def test_spos_and_random_search():
    torch.manual_seed(0)
    net = EntangledLM(TINY)
    before = net.layers[0].q_proj.detach().clone()
    bank = windows()
    spos_train(net, lambda i: bank[i % 6], 4, OptimConfig(lr=1e-2), progress=False)
    assert not torch.equal(net.layers[0].q_proj, before)
    costs = arch_costs(TINY, 9)
    budget = sorted(costs.values())[len(costs) // 2]
    best, scores = random_search(net, bank.flatten(0, 1), 5, costs, budget)
    assert len(scores) == 5 and len({s["arch"] for s in scores}) == 5
    assert all(costs[s["arch"]] <= budget for s in scores)
    assert best == min(scores, key=lambda s: s["search_loss"])["arch"]
    with pytest.raises(ValueError, match="no architecture fits the budget"):
        random_search(net, bank.flatten(0, 1), 5, costs, 1.0)


# --- memory ----------------------------------------------------------------------------------------------------------------

def test_saved_bytes_counts_what_autograd_keeps():
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(16, 32)
    _, nbytes = saved_bytes(lambda: (x @ w.T).relu().sum())
    assert nbytes >= 16 * 64 * 4   # at least the relu's output (or mask) and the matmul's inputs
    _, none = saved_bytes(lambda: (x @ w.T.detach()).sum())
    assert none == 0


def test_output_mixing_memory_grows_with_choices_but_weight_mixing_does_not():
    kw = dict(d=16, hidden=64, tokens=256, repeats=1)
    w1, w8 = mixing_cost(1, "weight", **kw), mixing_cost(8, "weight", **kw)
    o8 = mixing_cost(8, "output", **kw)
    assert w8["saved_mb"] < 1.2 * w1["saved_mb"]
    assert o8["saved_mb"] > 2 * w8["saved_mb"]
    with pytest.raises(ValueError, match="k=0 must be in"): mixing_cost(0, "weight", **kw)


def test_bench_methods_plug_into_the_lm_bench():
    import dataclasses
    from paper_repro.lm.bench import make_context, train_method
    from paper_repro.lm.tanglenas import bench_methods
    ctx = dataclasses.replace(make_context("ci"), steps=8, d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=16)
    (entry,) = bench_methods(ctx)
    model, wall, tokens = train_method(entry.method, ctx)
    assert type(model) is TransformerLM and tokens > 0 and not entry.method.uses_base
