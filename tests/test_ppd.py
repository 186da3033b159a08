"""paper_repro.decoding.ppd: prompt tokens, grouped truncations, sparse trees, the drafters, losslessness."""
import itertools
import random

import numpy as np
import pytest
import torch

from paper_repro.core.decoding import Draft, Sampler, generate, reference_decode, verify_tree
from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.core.trees import MedusaDrafter, MedusaHeads
from paper_repro.decoding.ppd import (DynamicTrees, PPDDrafter, PromptTokens, PromptTree, _layout, build_dynamic_trees,
                                      distill_batch, distill_loss, group_inputs, offset_accuracy, path_probs,
                                      prompt_logits, static_tree, train_ppd, tree_stats, verify_latency,
                                      choose_tree_size)

from conftest import tiny_lm

ACC = np.array([[0.5, 0.15, 0.08, 0.05], [0.35, 0.12, 0.07, 0.04], [0.25, 0.1, 0.06, 0.04]])


@pytest.fixture(scope="module")
def prompts():
    torch.manual_seed(3)
    return PromptTokens(40, torch.randn(3, 32))


def extended_copy(model, pt):
    "Brute force: the same model with its vocabulary extended by the prompt embeddings."
    cfg = model.cfg
    ext = TransformerLM(LMConfig(vocab_size=cfg.vocab_size + pt.n_tokens, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                 n_heads=cfg.n_heads, d_ff=cfg.d_ff)).double().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["embed_tokens.weight"] = torch.cat([state["embed_tokens.weight"], pt.embeddings.detach().double()])
    state["lm_head.weight"] = torch.cat([state["lm_head.weight"], torch.zeros(pt.n_tokens, cfg.d_model).double()])
    ext.load_state_dict(state)
    return ext


# ---------------------------------------------------------------- prompt tokens

def test_prompt_tokens_equal_an_extended_vocabulary_and_leave_no_hooks(target, prompts):
    ext = extended_copy(target, prompts)
    ids = torch.tensor([[1, 40, 41, 42, 5], [42, 3, 41, 40, 0]])
    with torch.no_grad():
        plain = target(ids.clamp(max=39))
        with prompts.attached(target):
            hooked = target(ids)
        assert torch.allclose(hooked, ext(ids)[..., :40], atol=1e-12)
        assert torch.equal(target(ids.clamp(max=39)), plain)   # detached: the model is unchanged
    assert not target.embed_tokens._forward_hooks and not target.embed_tokens._forward_pre_hooks


def test_prompt_tokens_get_gradients_and_reject_bad_input(target):
    pt = PromptTokens.init_from(target, 2)
    assert pt.ids == [40, 41] and pt.num_parameters == 64
    assert torch.allclose(pt.embeddings[0], target.embed_tokens.weight.float().mean(0))
    with pt.attached(target):
        target(torch.tensor([[3, 40, 41]])).sum().backward()
    assert pt.embeddings.grad is not None and pt.embeddings.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="made for vocab 50"): PromptTokens(50, torch.randn(2, 32)).attach(target)
    with pytest.raises(ValueError, match="n_tokens must be a positive int"): PromptTokens.init_from(target, 0)
    with pytest.raises(ValueError, match="embeddings must be"): PromptTokens(40, torch.randn(32))
    with pytest.raises(ValueError, match="cannot find the input embedding"): PromptTokens(40, torch.randn(2, 32)).attach(torch.nn.Linear(2, 2))


def test_input_embedding_is_found_on_hf_style_models():
    emb = torch.nn.Embedding(40, 32)
    class Inner(torch.nn.Module):
        def get_input_embeddings(self): return emb
    class Adapter(torch.nn.Module):   # the shape of HFCausalLM: .model.get_input_embeddings()
        vocab_size = 40
        def __init__(self): super().__init__(); self.model = Inner()
    pt = PromptTokens(40, torch.randn(3, 32))
    with pt.attached(Adapter()):
        out = emb(torch.tensor([[1, 41]]))
    assert torch.allclose(out[0, 1], pt.embeddings[1]) and torch.allclose(out[0, 0], emb.weight[1])
    assert not emb._forward_hooks


# ---------------------------------------------------------------- grouped truncations and training

def test_grouped_truncations_match_one_forward_each(target, prompts):
    stream = torch.randint(0, 40, (400,), generator=torch.Generator().manual_seed(0))
    b = distill_batch(target, stream, 2, 10, 5, 3, torch.Generator().manual_seed(1), min_context=1)
    assert b.teacher.shape == (2, 5, 3, 40) and b.greedy.shape == (2, 5, 4) and b.hidden.shape == (2, 5, 32)
    assert all(len(set(row)) == 5 for row in b.cuts.tolist())   # distinct truncation points
    with torch.no_grad():
        student = prompt_logits(target, prompts, b)
        for r, k in itertools.product(range(2), range(5)):
            ctx = b.window[r, :int(b.cuts[r, k])].tolist()
            g = reference_decode(target, ctx, 4)
            assert b.greedy[r, k].tolist() == g
            full = target(torch.tensor([ctx + g[:3]]))[0]
            assert torch.allclose(b.teacher[r, k], full[len(ctx):len(ctx) + 3], atol=1e-10)
            assert torch.allclose(b.hidden[r, k], target.hidden_states(torch.tensor([ctx]))[0, -1], atol=1e-10)
            with prompts.attached(target):
                assert torch.allclose(student[r, k], target(torch.tensor([ctx + prompts.ids]))[0, -3:], atol=1e-10)


def test_group_inputs_layout_and_bad_input():
    window = torch.arange(4)[None]
    tokens, positions, mask = group_inputs(window, torch.tensor([[2, 4]]), torch.tensor([[[7, 8], [9, 6]]]))
    assert tokens.tolist() == [[0, 1, 2, 3, 7, 8, 9, 6]] and positions.tolist() == [[0, 1, 2, 3, 2, 3, 4, 5]]
    assert mask[0, 5].tolist() == [True, True, False, False, True, True, False, False]
    assert mask[0, 6].tolist() == [True, True, True, True, False, False, True, False]
    with pytest.raises(ValueError, match="cuts must lie in"): group_inputs(window, torch.tensor([[0]]), torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cuts must be"): group_inputs(window, torch.tensor([2]), torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="n_cuts"):
        distill_batch(tiny_lm(), torch.arange(100) % 40, 1, 10, 20, 3, torch.Generator())


def test_distill_loss_is_the_weighted_kl():
    s, t = torch.randn(2, 3, 4, 7), torch.randn(2, 3, 4, 7)
    loss, kl = distill_loss(s, t, decay=0.8)
    q, p = t.softmax(-1), s.softmax(-1)
    ref = (q * (q.log() - p.log())).sum(-1).mean((0, 1))
    assert torch.allclose(kl, ref, atol=1e-6)
    assert torch.isclose(loss, (ref * 0.8 ** torch.arange(4.)).sum() / 4, atol=1e-6)
    assert distill_loss(t, t)[0].abs() < 1e-6


def test_training_lowers_the_loss_and_leaves_the_target_frozen(target):
    stream = torch.tensor(([1, 2, 3, 4, 5, 6, 7, 8] * 60))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    med = MedusaHeads(target.cfg.d_model, target.vocab_size, 3, target.lm_head)
    pt, hist = train_ppd(target, stream, 25, batch_size=2, length=16, n_cuts=6, medusa=med, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["medusa_loss"] < hist[0]["medusa_loss"]
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in target.parameters())   # flags restored
    acc = offset_accuracy(target, stream, pt, med, n_batches=1, batch_size=2, length=16, n_cuts=6, topk=5)
    assert acc["ppd"].shape == (3, 5) and (acc["ppd"].sum(1) <= 1 + 1e-9).all()
    frozen = pt.embeddings.detach().clone()
    _, hist2 = train_ppd(target, stream, 2, batch_size=2, length=16, n_cuts=6, medusa=med, prompts=pt,
                         train_prompts=False, progress=False)
    assert torch.equal(pt.embeddings, frozen) and "loss" not in hist2[0] and "medusa_loss" in hist2[0]
    with pytest.raises(ValueError, match="medusa has 2 heads"):
        train_ppd(target, stream, 1, medusa=MedusaHeads(target.cfg.d_model, target.vocab_size, 2, target.lm_head), progress=False)
    with pytest.raises(ValueError, match="steps must be"): train_ppd(target, stream, 0)
    with pytest.raises(ValueError, match="nothing to train"): train_ppd(target, stream, 1, train_prompts=False)


def test_train_ppd_equals_one_optimiser_each(target):
    "The fit-based loop equals the two-optimiser loop it replaced (own lr, own clipping), bit for bit."
    from paper_repro.core.train import warmup_cosine
    stream = torch.tensor(([1, 2, 3, 4, 5, 6, 7, 8] * 60))
    steps, kw = 3, dict(batch_size=2, length=16, n_cuts=6)
    med_new = MedusaHeads(target.cfg.d_model, target.vocab_size, 3, target.lm_head)
    med_ref = MedusaHeads(target.cfg.d_model, target.vocab_size, 3, target.lm_head)
    pt_new, _ = train_ppd(target, stream, steps, medusa=med_new, progress=False, **kw)
    pt_ref = PromptTokens.init_from(target, 3)
    opts = [(torch.optim.AdamW([pt_ref.embeddings], lr=1e-2, weight_decay=0.0), 1e-2, [pt_ref.embeddings]),
            (torch.optim.AdamW(med_ref.parameters(), lr=1e-3, weight_decay=0.0), 1e-3, list(med_ref.parameters()))]
    gen = torch.Generator().manual_seed(0)
    target.requires_grad_(False)
    try:
        for step in range(steps):
            for opt, base, _ in opts:
                for g in opt.param_groups: g["lr"] = warmup_cosine(step, steps, 0, base)
            b = distill_batch(target, stream, kw["batch_size"], kw["length"], kw["n_cuts"], 3, gen)
            losses = [distill_loss(prompt_logits(target, pt_ref, b), b.teacher)[0], distill_loss(med_ref(b.hidden), b.teacher)[0]]
            for (opt, _, params), loss in zip(opts, losses):
                opt.zero_grad(set_to_none=True); loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    finally:
        target.requires_grad_(True)
    assert torch.equal(pt_new.embeddings, pt_ref.embeddings)
    assert all(torch.equal(a, b) for a, b in zip(med_new.parameters(), med_ref.parameters()))



# ---------------------------------------------------------------- sparse trees

@pytest.mark.parametrize("size", [5, 8, 13, 24, 40])
def test_dynamic_trees_fit_the_budget(size):
    dt = build_dynamic_trees(ACC, size)
    assert len(dt.trees) == 4 and dt.n_prompt == 3
    for s, t in enumerate(dt.trees):
        assert t.size <= size and t.depth <= s and t.n_prompt == 3
    mat, pi, E = tree_stats(dt.trees, ACC)
    assert abs(mat - dt.expected_mat) < 1e-12 and abs(pi.sum() - 1) < 1e-9 and (pi > -1e-12).all()
    with pytest.raises(ValueError, match="size must be an int >= m \\+ 2"): build_dynamic_trees(ACC, 4)


def test_bigger_budgets_never_expect_less():
    mats = [build_dynamic_trees(ACC, s).expected_mat for s in (5, 8, 16, 32)]
    assert all(b >= a - 1e-9 for a, b in zip(mats, mats[1:])) and mats[0] > 1


def simulate_mat(trees, acc, steps, rng):
    "Brute force: run the state machine with independent per-level acceptance (rank r right w.p. acc[j, r])."
    m = len(trees) - 1
    total, state = 0, m
    for _ in range(steps):
        tree = trees[state]
        truth = [rng.choice(acc.shape[1] + 1, p=np.r_[acc[j], 1 - acc[j].sum()]) for j in range(m)]
        best, end = 0, m   # the root ends the step with its m prompt tokens
        for path, n in zip(tree.paths, tree.prompts):
            if all(truth[j] == r for j, r in enumerate(path)) and len(path) > best: best, end = len(path), n
        total += best + 1
        state = end
    return total / steps


def test_expected_mat_matches_simulation():
    rng = np.random.default_rng(1)
    for size in (8, 20):
        dt = build_dynamic_trees(ACC, size)
        assert abs(simulate_mat(dt.trees, ACC, 6000, rng) - dt.expected_mat) < 0.05


def test_prompt_tree_validation_and_static_tree():
    with pytest.raises(ValueError, match="before its parent"): PromptTree(((0, 1),), (0,), 3)
    with pytest.raises(ValueError, match="appears twice"): PromptTree(((0,), (0,)), (0, 0), 3)
    with pytest.raises(ValueError, match="carries 4 prompt tokens"): PromptTree(((0,),), (4,), 3)
    with pytest.raises(ValueError, match="paths but"): PromptTree(((0,),), (), 3)
    t = PromptTree(((0,), (1,), (0, 0)), (3, 0, 1), 3)
    assert t.size == 1 + 3 + 3 + 4 and t.depth == 2 and t.parents() == [-1, -1, 0]
    assert np.allclose(path_probs(t, ACC), [0.5, 0.15, 0.5 * 0.35])
    st = static_tree(ACC, 10)
    assert st.size == 10 and st.n_prompt == 0 and len(st.paths) == 9


def test_layout_respects_the_depth_limit():
    t = PromptTree(((0,), (1,), (0, 0)), (3, 1, 2), 3)
    ids = [40, 41, 42]
    owners = [(0, 3)] + [(len(p), n) for p, n in zip(t.paths, t.prompts)]   # (depth, prompt tokens) incl. the root
    for limit in range(0, 6):
        lay = _layout(t, limit, ids)
        depth = []
        for p in lay.parents: depth.append(1 if p < 0 else depth[p] + 1)
        assert max(depth, default=0) <= limit
        expected = sum(len(p) <= limit for p in t.paths) + sum(max(0, min(n, limit - d)) for d, n in owners if d <= limit)
        assert len(lay.parents) == expected
    full = _layout(t, 5, ids)
    assert len(full.parents) == t.size - 1 and full.prompt_rows[-1] == [3, 4, 5]
    assert [full.tokens[i] for i in full.prompt_rows[2]] == [40, 41] and full.parents[full.prompt_rows[2][1]] == full.prompt_rows[2][0]


# ---------------------------------------------------------------- the drafters: losslessness

class OracleGuesses(PPDDrafter):
    "Rank-0 guesses are the true greedy continuation: exercises full-depth acceptance and state changes."
    def __init__(self, *a, greedy, prompt_len, **k):
        super().__init__(*a, **k)
        self.greedy, self.n0 = greedy, prompt_len
    def _next_guesses(self, layout, node, logits):
        out = super()._next_guesses(layout, node, logits)
        done = self.seen - self.n0 + 1   # the next root is emitted; guesses start after it
        for level, row in enumerate(out):
            true = self.greedy[done + level] if done + level < len(self.greedy) else 0
            out[level] = [true] + [t for t in row if t != true][:len(row) - 1]
        return out
    def observe(self, context, draft, accepted, logits):
        self.seen = len(context) - 1
        super().observe(context, draft, accepted, logits)


PROMPTS = [[3], [3, 14, 15, 9, 2, 6], [7, 7, 7, 7], list(range(1, 30))]


@pytest.mark.parametrize("size", [5, 9, 16, 30])
def test_ppd_is_lossless(target, prompts, size):
    trees = build_dynamic_trees(ACC, size)
    for prompt in PROMPTS:
        for n in (1, 2, 3, 7, 30):
            res = generate(target, prompt, n, PPDDrafter(target, prompts, trees, topk=4))
            assert res.tokens == reference_decode(target, prompt, n), (size, prompt, n)
            assert res.new_tokens == sum(s.accepted + s.bonus for s in res.steps)
    assert not target.embed_tokens._forward_hooks and not target.embed_tokens._forward_pre_hooks


def test_prompt_tokens_are_attached_only_during_the_drafters_passes(target, prompts):
    d = PPDDrafter(target, prompts, build_dynamic_trees(ACC, 9), topk=4)
    d.propose([1, 2], 5)
    assert not target.embed_tokens._forward_hooks   # proposing attaches nothing
    during = []
    probe = target.norm.register_forward_hook(lambda m, a, o: during.append(bool(target.embed_tokens._forward_hooks)))
    try:
        res = generate(target, [3, 1, 4, 1], 12, d)
    finally:
        probe.remove()
    assert res.tokens == reference_decode(target, [3, 1, 4, 1], 12)
    assert len(during) == 1 + len(res.steps) and all(during)   # the prefill and every verification pass
    assert not target.embed_tokens._forward_hooks and not target.embed_tokens._forward_pre_hooks


def test_ppd_with_oracle_guesses_accepts_full_trees(target, prompts):
    trees = build_dynamic_trees(ACC, 24)
    for prompt in PROMPTS:
        ref = reference_decode(target, prompt, 60)
        d = OracleGuesses(target, prompts, trees, topk=4, greedy=ref, prompt_len=len(prompt))
        res = generate(target, prompt, 60, d)
        assert res.tokens == ref
        # every step after the first accepts as deep as its state's tree allows
        assert max(s.accepted for s in res.steps) == 3 and res.mean_accepted > 2.0
        assert res.steps[0].accepted == 0   # the first step only collects guesses


def test_ppd_under_sampling_is_exact(target, prompts):
    trees = build_dynamic_trees(ACC, 12)
    for seed in range(3):
        s = Sampler(temperature=1.0, seed=seed)
        assert generate(target, [2, 5, 9], 30, PPDDrafter(target, prompts, trees, topk=4), sampler=s).tokens == \
               reference_decode(target, [2, 5, 9], 30, sampler=s)


def test_ppd_eos_and_reuse_across_prompts(target, prompts):
    trees = build_dynamic_trees(ACC, 12)
    d = PPDDrafter(target, prompts, trees, topk=4)
    ref = reference_decode(target, [1, 2, 3], 30)
    eos = ref[10]
    res = generate(target, [1, 2, 3], 30, d, eos_id=eos)
    assert res.tokens == reference_decode(target, [1, 2, 3], 30, eos_id=eos) and res.stopped_by_eos
    res2 = generate(target, [4, 5], 20, d)   # the same drafter on a new prompt: stale guesses are dropped
    assert res2.tokens == reference_decode(target, [4, 5], 20) and res2.steps[0].drafted == 3


def test_drafters_reject_bad_input(target, prompts):
    trees = build_dynamic_trees(ACC, 12)
    with pytest.raises(ValueError, match="trees use guess rank .* but topk=2"): PPDDrafter(target, prompts, trees, topk=2)
    with pytest.raises(ValueError, match="topk must be an int"): PPDDrafter(target, prompts, trees, topk=0)
    with pytest.raises(ValueError, match="built for 2 prompt tokens"):
        PPDDrafter(target, prompts, build_dynamic_trees(ACC[:2], 12), topk=4)
    with pytest.raises(ValueError, match="n_heads must be"): MedusaHeads(target.cfg.d_model, target.vocab_size, 0, target.lm_head)


def test_medusa_baseline_is_lossless(target):
    torch.manual_seed(0)
    heads = MedusaHeads(target.cfg.d_model, target.vocab_size, 3, target.lm_head)
    torch.nn.init.normal_(heads.weight, std=0.3)  # untrained but not the identity
    assert heads(torch.randn(5, 32, dtype=torch.float64)).shape == (5, 3, 40)
    for size in (2, 8, 20):
        tree = static_tree(ACC, size)
        for prompt in PROMPTS[:3]:
            for n in (1, 4, 33):
                res = generate(target, prompt, n, MedusaDrafter(heads, tree.paths, warm_start=False))
                assert res.tokens == reference_decode(target, prompt, n)
                assert res.steps[0].drafted == 0   # cold, like PPD: the first step is a plain one
    assert not target.norm._forward_hooks


# ---------------------------------------------------------------- hardware awareness

def test_latency_and_choice(target):
    lat = verify_latency(target, [1, 4, 8], context_len=8, repeats=2)
    assert set(lat) == {1, 4, 8} and all(v > 0 for v in lat.values())
    size, rate = choose_tree_size({4: 1.0, 8: 1.5, 16: 3.0}, {8: 2.0, 16: 3.0, 32: 4.0})
    assert size == 8 and set(rate) == {8, 16}
    with pytest.raises(ValueError, match="no tree size"): choose_tree_size({1: 1.0}, {8: 2.0})
    with pytest.raises(ValueError, match="sizes must be positive"): verify_latency(target, [0])


def test_bench_methods_with_the_committed_prompt_tokens():
    from paper_repro.core.bench import BenchModels
    from paper_repro.core.zoo import load_zoo
    from paper_repro.decoding.ppd import bench_methods
    try:
        t = load_zoo("code-target", dtype=torch.float64)
        entries = bench_methods(BenchModels(t, None, None))
    except Exception as e:  # the checkpoint is produced by the cpu run of the notebook
        pytest.skip(f"committed PPD checkpoint not available: {e}")
    (entry,) = entries
    name = entry.name
    prompt = [5, 17, 300, 42, 9, 77, 12]
    res = generate(t, prompt, 24, entry.method.make())
    assert res.tokens == reference_decode(t, prompt, 24) and name.startswith("PPD")


def test_checkpoint_round_trip_is_byte_stable(tmp_path):
    from paper_repro.core.data import register_file
    from paper_repro.decoding.ppd import load_ppd, save_ppd
    pt = PromptTokens(40, torch.randn(3, 32))
    (tmp_path / "data").mkdir()
    save_ppd(tmp_path / "data" / "ppd_a.pt", pt, ACC, 12, extra=dict(steps=5))
    save_ppd(tmp_path / "data" / "ppd_b.pt", pt, ACC, 12, extra=dict(steps=5))
    a, b = (tmp_path / "data" / "ppd_a.pt").read_bytes(), (tmp_path / "data" / "ppd_b.pt").read_bytes()
    assert a == b   # same content, same bytes: retraining does not churn the manifest
    register_file("ppd_a.pt", "test", "none", "none", root=tmp_path)
    saved = load_ppd("ppd_a.pt", root=tmp_path)
    assert torch.equal(saved["prompts"].embeddings, pt.embeddings) and saved["tree_size"] == 12
    assert np.allclose(saved["accuracy"], ACC) and saved["extra"] == dict(steps=5)
    torch.save({"format": "other"}, tmp_path / "data" / "bad.pt")
    register_file("bad.pt", "test", "none", "none", root=tmp_path)
    with pytest.raises(ValueError, match="not a PPD checkpoint"): load_ppd("bad.pt", root=tmp_path)
