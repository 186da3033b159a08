"""paper_repro.lm.masa: matrix atoms shared across layers (weights, parameter counts, gradients into shared atoms),
the repeat-all-over and low-rank baselines, and materialisation into a plain TransformerLM."""
import pytest
import torch

from paper_repro.core.decoding import batch_greedy_decode
from paper_repro.core.lm import LMConfig, TransformerLM, count_parameters
from paper_repro.lm.masa import (AtomDictionary, AtomView, LowRankView, MASAConfig, attention_parameters, low_rank_lm,
                                 masa_lm, rank_for_budget)
from paper_repro.lm.mos import PooledLinear, materialise

CFG = LMConfig(vocab_size=40, d_model=32, n_layers=6, n_heads=4, d_ff=48)
D2 = CFG.d_model ** 2


def build(mcfg, dtype=torch.float64):
    torch.manual_seed(0)
    return masa_lm(CFG, mcfg).to(dtype)


def test_layer_weight_is_the_coefficient_weighted_sum_of_shared_atoms():
    model = build(MASAConfig(atoms=3))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        atoms = model.shared_pools[name].atoms
        for block in model.layers:
            lin = getattr(block.self_attn, name)
            c = lin.view.coefficients
            naive = sum(c[s] * atoms[s] for s in range(3))
            assert torch.allclose(lin.weight, naive, atol=1e-15)
            assert lin.view.pool is model.shared_pools[name]           # one dictionary, not a copy per layer


@pytest.mark.parametrize("S", [1, 2, 6])
def test_parameter_counts(S):
    mha = TransformerLM(CFG)
    L = CFG.n_layers
    assert attention_parameters(mha) == 4 * L * D2
    model = build(MASAConfig(atoms=S))
    assert attention_parameters(model) == 4 * S * D2 + 4 * L * S
    assert count_parameters(model) == count_parameters(mha) - 4 * L * D2 + 4 * S * D2 + 4 * L * S
    gqa = TransformerLM(LMConfig(**{**CFG.to_dict(), "n_kv_heads": 1}))
    assert attention_parameters(gqa) == L * (2 * D2 + 2 * CFG.d_model * CFG.head_dim)


def test_a_third_of_the_atoms_saves_two_thirds_of_attention():
    saving = 1 - attention_parameters(build(MASAConfig(atoms=2))) / attention_parameters(TransformerLM(CFG))
    L = CFG.n_layers
    assert saving == pytest.approx(2 / 3 - (4 * L * 2) / (4 * L * D2))   # two thirds, less the 4·L·S coefficients
    assert 0.66 < saving < 2 / 3


def test_shared_atoms_get_the_sum_of_every_layers_gradient():
    model = build(MASAConfig(atoms=2, targets=("v_proj",)))
    x = torch.randint(0, 40, (2, 7))
    model(x).square().mean().backward()
    # the same loss with each layer's materialised v_proj weight as a leaf
    plain = materialise(model)
    for block in plain.layers: block.self_attn.v_proj.weight.requires_grad_(True)
    plain(x).square().mean().backward()
    expected = sum(blk.self_attn.v_proj.view.coefficients[:, None, None].detach() * pl.self_attn.v_proj.weight.grad
                   for blk, pl in zip(model.layers, plain.layers))
    assert torch.allclose(model.shared_pools["v_proj"].atoms.grad, expected, atol=1e-12)


def test_repeat_all_over_is_masa_with_fixed_one_hot_coefficients():
    model = build(MASAConfig(atoms=2, coefficients="repeat"))
    q = [b.self_attn.q_proj for b in model.layers]
    assert all(torch.equal(q[j].weight, q[j % 2].weight) for j in range(CFG.n_layers))
    assert not torch.equal(q[0].weight, q[1].weight)
    assert all(not lin.view.coefficients.requires_grad for lin in q)
    assert attention_parameters(model) == 4 * 2 * D2


def test_low_rank_baseline_fits_its_budget():
    budget = attention_parameters(build(MASAConfig(atoms=2)))
    r = rank_for_budget(CFG, budget)
    model = low_rank_lm(CFG, r)
    assert attention_parameters(model) <= budget < attention_parameters(low_rank_lm(CFG, r + 1))
    lin = model.layers[0].self_attn.k_proj
    assert torch.allclose(lin.weight, lin.view.U @ lin.view.V)


@pytest.mark.parametrize("mcfg", [MASAConfig(atoms=2), MASAConfig(atoms=3, coefficients="repeat")])
def test_materialised_model_gives_the_same_logits_and_decodes_the_same(mcfg):
    model = build(mcfg)
    plain = materialise(model)
    assert type(plain) is TransformerLM and not any(isinstance(m, PooledLinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(TransformerLM(CFG).state_dict())
    x = torch.randint(0, 40, (3, 11))
    assert torch.allclose(plain(x), model(x), atol=1e-12, rtol=0)
    prompts = torch.randint(0, 40, (2, 4))
    assert batch_greedy_decode(model, prompts, 5).tokens == batch_greedy_decode(plain, prompts, 5).tokens


def test_bad_input_is_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="atoms must be a positive int"): MASAConfig(atoms=0)
    with pytest.raises(ValueError, match="coefficients='mean'; valid: learned, repeat"):
        MASAConfig(atoms=2, coefficients="mean")
    with pytest.raises(ValueError, match="each must be one of"): MASAConfig(atoms=2, targets=("w_qkv",))
    with pytest.raises(ValueError, match="coefficients must have shape"): AtomView(AtomDictionary(3, 4, 4), torch.ones(2))
    with pytest.raises(ValueError, match="rank must be a positive int"): LowRankView(4, 4, 0)
    with pytest.raises(ValueError, match="MASAConfig"): masa_lm(CFG, {"atoms": 2})


def test_bench_methods_train_a_shared_model_that_decodes_through_its_materialised_weights():
    from paper_repro.core.train import OptimConfig
    from paper_repro.core.zoo import load_tokenizer
    from paper_repro.lm.bench import LMBenchContext, LMBenchMethod, greedy_tokens
    from paper_repro.lm.masa import bench_methods
    torch.manual_seed(0)
    ctx = LMBenchContext("ci", torch.device("cpu"), 0, load_tokenizer(), torch.randint(0, 1024, (4000,)),
                         torch.randint(0, 1024, (2, 17)), seq_len=16, batch_size=2, steps=3, d_model=32, n_layers=6,
                         n_heads=4, d_ff=48, optim=OptimConfig(lr=1e-3), warmup=1)
    (entry,) = bench_methods(ctx)
    assert isinstance(entry.method, LMBenchMethod) and entry.paper_headline.category == "param_reduction"
    assert entry.paper_headline.value == pytest.approx(1.28, abs=0.01)
    model = entry.method.train(ctx)
    assert ctx.tokens_drawn == 3 * 2 * 16                                           # trained on the budget
    assert attention_parameters(model) == 4 * 2 * 32 ** 2 + 4 * 6 * 2              # S = L/3 = 2
    prompts = ctx.val[:, :5]
    assert torch.equal(entry.method.generate(model, prompts, 4), greedy_tokens(model, prompts, 4))
