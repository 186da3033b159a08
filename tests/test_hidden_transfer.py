"""paper_repro.decoding.hidden_transfer: upper-layer pass, the drafter's pass, pseudo rows, drafters, training."""
import random

import pytest
import torch

from paper_repro.core.decoding import Draft, DraftModelDrafter, generate, reference_decode
from paper_repro.core.lm import causal_mask
from paper_repro.core.trees import MedusaDrafter, MedusaHeads
from paper_repro.decoding.hidden_transfer import (HiddenTransfer, HiddenTransferDrafter, LayerSkipLM, choose_skip_layers,
                                                  forward_from_layer, load_drafter, pseudo_mask, rank_accuracy,
                                                  save_drafter, train_drafters)
from conftest import tiny_lm

PROMPTS = [[1], [5, 9], [3, 14, 15, 9, 2, 6], list(range(2, 30, 3)), [7] * 12]
PATHS = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1)]


def noisy_transfer(layer, k=3, d=32, seed=0):
    "An untrained-but-not-identity transfer, so pseudo rows differ from copies of the real state."
    torch.manual_seed(seed)
    tr = HiddenTransfer(d, k, layer).double()
    with torch.no_grad():
        tr.weight.add_(0.3 * torch.randn_like(tr.weight)); tr.bias.normal_()
    return tr


def noisy_heads(target, own=True, k=3, seed=0):
    torch.manual_seed(seed)
    h = MedusaHeads(32, 40, k, target.lm_head, own_lm_head=own).double()
    with torch.no_grad(): h.weight.normal_(0, 0.3)
    return h


def brute_force_pseudo_logits(model, transfer, context):
    "Draft logits [k, V] after `context`, no cache: pseudo states appended at layer l as if they were tokens."
    l, n = transfer.layer, len(context)
    h = model.hidden_states(torch.tensor([context]), upto_layer=l)
    seq = torch.cat([h, transfer(h[:, -1])], dim=1)
    out = forward_from_layer(model, seq, l, torch.arange(n + transfer.k))
    return model.lm_head(model.norm(out[0, n:]))


def random_tree(rng, n, max_depth=3):
    parents, depths = [], []
    for _ in range(n):
        p = rng.choice([-1] + [i for i, d in enumerate(depths) if d < max_depth])
        parents.append(p); depths.append(1 if p < 0 else depths[p] + 1)
    return parents


_REFS = {}


def ref_decode(target, prompt, max_new, eos_id=None):
    "reference_decode, memoised: many drafters are checked against the same references."
    key = (id(target), tuple(prompt), max_new, eos_id)
    if key not in _REFS: _REFS[key] = reference_decode(target, prompt, max_new, eos_id=eos_id)
    return _REFS[key]


def check_invariants(res, max_new):
    assert res.new_tokens == sum(s.accepted + s.bonus for s in res.steps) <= max_new
    assert res.target_calls == len(res.steps) + res.prefill_calls
    assert all(0 <= s.accepted <= s.drafted for s in res.steps)


# --- the upper-layer pass --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 1, 2])
def test_forward_from_layer_completes_the_model(target, layer):
    x = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        full = target(x)
        h = target.hidden_states(x, upto_layer=layer)
        assert torch.allclose(target.lm_head(target.norm(forward_from_layer(target, h, layer, torch.arange(11)))), full,
                              atol=1e-12)
        cache = target.new_cache(2, capacity=3)  # forces growth
        target(x[:, :6], cache=cache)
        h = target.hidden_states(x[:, 6:], cache=cache, upto_layer=layer)
        cache.length = 6
        out = forward_from_layer(target, h, layer, torch.arange(6, 11), cache)
        assert cache.length == 11 and torch.allclose(target.lm_head(target.norm(out)), full[:, 6:], atol=1e-12)


def test_forward_from_layer_rejects_bad_input(target):
    h = torch.zeros(1, 3, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="layer must be an int in"): forward_from_layer(target, h, 3, torch.arange(3))
    with pytest.raises(ValueError, match="hidden must be"): forward_from_layer(target, h[0], 1, torch.arange(3))
    with pytest.raises(ValueError, match="positions has shape"): forward_from_layer(target, h, 1, torch.arange(4))
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        forward_from_layer(target, h, 1, torch.arange(3), attn_mask=torch.ones(3, 3))


def test_pseudo_mask_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        T, past, k = rng.randint(1, 6), rng.randint(0, 5), rng.randint(1, 4)
        real = torch.rand(T, past + T) < 0.6
        rows = sorted(rng.sample(range(T), rng.randint(1, T)))
        got = pseudo_mask(real, torch.tensor(rows), k)
        R, S = len(rows), past + T
        want = torch.zeros(T + R * k, S + R * k, dtype=torch.bool)
        want[:T, :S] = real
        for a, r in enumerate(rows):
            for i in range(k):
                want[T + a * k + i, :S] = real[r]
                for j in range(i + 1): want[T + a * k + i, S + a * k + j] = True
        assert torch.equal(got, want)
        assert torch.equal(pseudo_mask(real[None].expand(2, -1, -1), torch.tensor(rows), k), want.expand(2, -1, -1))


# --- the drafter's pass ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer,in_pass", [(1, True), (1, False), (0, True), (2, False)])
def test_drafters_pass_keeps_logits_and_cache_and_pseudo_rows_match_brute_force(layer, in_pass):
    target = tiny_lm(layers=3)
    tr = noisy_transfer(layer)
    d = HiddenTransferDrafter(target, tr, [(0,), (0, 0), (0, 0, 0)], in_pass)
    rng = random.Random(layer)
    for trial in range(4):
        ctx = [rng.randrange(40) for _ in range(rng.randint(2, 9))]
        parents = random_tree(rng, rng.randint(0, 7))
        draft = Draft([rng.randrange(40) for _ in parents], parents)
        c_ref, c_d = target.new_cache(), target.new_cache()
        with torch.no_grad():
            target(torch.tensor([ctx[:-1]]), cache=c_ref)
            out = d.run_target(target, torch.tensor([ctx[:-1]]), None, c_d, None)   # the prefill
            assert torch.allclose(out.logits, target(torch.tensor([ctx[:-1]])), atol=1e-10)
            kept = d.keep_row(out.hidden[0], len(ctx) - 2)
            assert torch.allclose(d.offset_logits(kept), brute_force_pseudo_logits(target, tr, ctx[:-1]), atol=1e-10)
            base = len(ctx) - 1
            tokens = torch.tensor([[ctx[-1]] + draft.tokens])
            pos = torch.tensor([base] + [base + dd for dd in draft.depths()])
            mask = torch.cat([torch.ones(len(draft) + 1, base, dtype=torch.bool), draft.ancestor_mask()], dim=1)
            ref, got = target(tokens, pos, c_ref, mask), d.run_target(target, tokens, pos, c_d, mask)
            assert torch.allclose(ref, got.logits, atol=1e-10) and c_ref.length == c_d.length == base + 1 + len(draft)
            assert torch.allclose(c_ref.k[:, :, :, :c_ref.length], c_d.k[:, :, :, :c_ref.length], atol=1e-10)
            assert torch.allclose(target.lm_head(got.hidden), got.logits, atol=1e-12)
            for node in range(-1, len(draft)):
                path = [ctx[-1]] + [draft.tokens[j] for j in draft.path_to(node)]
                if not in_pass:  # after the pass the core keeps the accepted path only; do the same
                    saved = (c_d.k.clone(), c_d.v.clone(), c_d.length)
                    c_d.keep([base + 1 + j for j in draft.path_to(node)], start=base + 1)
                want = brute_force_pseudo_logits(target, tr, ctx[:-1] + path)
                assert torch.allclose(d.offset_logits(d.keep_row(got.hidden[0], node + 1)), want, atol=1e-10), (trial, node)
                if not in_pass: c_d.k, c_d.v, c_d.length = saved


def test_drafter_rejects_bad_transfer_and_models(target):
    with pytest.raises(ValueError, match="transfer.layer must be an int in"):
        HiddenTransferDrafter(target, HiddenTransfer(32, 2, 2), [(0,)])
    with pytest.raises(TypeError, match="transfer must be a HiddenTransfer"): HiddenTransferDrafter(target, None, [(0,)])
    d = HiddenTransferDrafter(target, noisy_transfer(1), [(0,)])
    with pytest.raises(ValueError, match="built for another target"): generate(tiny_lm(seed=5), [1, 2, 3], 4, d)
    with pytest.raises(ValueError, match="k \\(future offsets\\)"): HiddenTransfer(32, 0, 1)
    with pytest.raises(ValueError, match="k \\(future offsets\\)"): MedusaHeads(32, 40, 0)
    with pytest.raises(ValueError, match="needs the target's lm_head"): MedusaHeads(32, 40, 2, own_lm_head=False)


# --- drafters: losslessness ------------------------------------------------------------------------------------------

def make_drafters(target):
    return {
        "ht_in_pass": lambda: HiddenTransferDrafter(target, noisy_transfer(1), PATHS, True),
        "ht_after_pass": lambda: HiddenTransferDrafter(target, noisy_transfer(1), PATHS, False),
        "ht_layer0": lambda: HiddenTransferDrafter(target, noisy_transfer(0), PATHS, True),
        "medusa": lambda: MedusaDrafter(noisy_heads(target), PATHS),
        "medusa_shared": lambda: MedusaDrafter(noisy_heads(target, own=False), PATHS),
    }


@pytest.mark.parametrize("name", ["ht_in_pass", "ht_after_pass", "ht_layer0", "medusa", "medusa_shared"])
def test_drafters_are_lossless(target, name):
    make = make_drafters(target)[name]
    for prompt in PROMPTS:
        for max_new in (1, 2, 33):
            ref = ref_decode(target, prompt, max_new)
            res = generate(target, prompt, max_new, make())
            assert res.tokens == ref, (prompt, max_new)
            check_invariants(res, max_new)
            assert all(s.drafted <= len(PATHS) for s in res.steps)


def test_lossless_with_eos_inside_accepted_drafts(target):
    prompt = [3, 14, 15, 9, 2, 6]
    full = ref_decode(target, prompt, 40)
    for eos in sorted(set(full[3:20]))[:3]:
        ref = ref_decode(target, prompt, 40, eos_id=eos)
        for make in make_drafters(target).values():
            res = generate(target, prompt, 40, make(), eos_id=eos)
            assert res.tokens == ref and res.stopped_by_eos


@pytest.mark.parametrize("in_pass", [True, False])
def test_a_shallow_tree_needs_fewer_pseudo_rows_and_drafts_the_same(target, in_pass):
    "A depth-1 tree makes the drafter compute one pseudo row per source row; its drafts equal the depth-1 part of the full ones."
    shallow = [(0,), (1,), (2,)]
    full = HiddenTransferDrafter(target, noisy_transfer(1), PATHS, in_pass)
    one = HiddenTransferDrafter(target, noisy_transfer(1), shallow, in_pass)
    assert one.offsets == 1 and full.offsets == 3
    prompt = [3, 14, 15, 9, 2, 6]
    with torch.no_grad():
        logits = {}
        for name, d in (("full", full), ("one", one)):
            out = d.run_target(target, torch.tensor([prompt[:-1]]), None, target.new_cache(), None)
            logits[name] = d.offset_logits(d.keep_row(out.hidden[0], len(prompt) - 2))
        if in_pass: assert one._pseudo.shape[2] == 1 and full._pseudo.shape[2] == 3
        assert logits["one"].shape[0] == 1 and torch.allclose(logits["one"], logits["full"][:1], atol=1e-10)
    res = generate(target, prompt, 30, one)
    assert res.tokens == ref_decode(target, prompt, 30) and all(s.drafted <= 3 for s in res.steps)


def test_one_pass_and_after_pass_draft_the_same(target):
    for prompt in PROMPTS:
        steps = {}
        for in_pass in (True, False):
            res = generate(target, prompt, 30, HiddenTransferDrafter(target, noisy_transfer(1), PATHS, in_pass))
            steps[in_pass] = [(s.drafted, s.accepted) for s in res.steps]
            assert all(s.draft_s >= 0 for s in res.steps)
        assert steps[True] == steps[False]


def test_drafter_reused_across_prompts_stays_lossless(target):
    d = HiddenTransferDrafter(target, noisy_transfer(1), PATHS, True)
    for prompt in [[3, 1, 4, 1, 5], [9], [2, 7], [9]]:
        res = generate(target, prompt, 20, d)
        assert res.tokens == ref_decode(target, prompt, 20)
        if len(prompt) == 1: assert res.steps[0].drafted == 0  # a stale row must not be used for a new prompt


def test_observe_keeps_the_row_of_the_last_accepted_node(target):
    "Propose a known tree, let the target verify it, and check the kept row drafts what the deepest accepted node would."
    prompt = [3, 14, 15, 9, 2, 6]
    cont = reference_decode(target, prompt, 6)
    tr = noisy_transfer(1)
    d = HiddenTransferDrafter(target, tr, PATHS, True)

    class Fixed:  # a known tree whose accepted path is cont[0:2] via nodes 1 -> 3
        needs_hidden, run_target, observe_prefill = True, d.run_target, d.observe_prefill
        def propose(self, context, max_tokens):
            wrong = lambda t: (t + 1) % 40
            return Draft([wrong(cont[0]), cont[0], wrong(cont[1]), cont[1], wrong(cont[2])], [-1, -1, 1, 1, 3]) \
                if len(context) == len(prompt) else Draft.empty()
        def observe(self, context, draft, accepted, logits, hidden=None):
            d.observe(context, draft, accepted, logits, hidden)
            if draft.tokens: self.seen = (accepted, list(context), d.offset_logits(d._kept).clone())
    f = Fixed()
    res = generate(target, prompt, 5, f)
    assert res.tokens == reference_decode(target, prompt, 5)
    accepted, context, logits = f.seen
    assert accepted == 2 and context == prompt + cont[:3]
    with torch.no_grad():  # the accepted node's pseudo rows: the context up to cont[1]; the bonus cont[2] is the next root
        assert torch.allclose(logits, brute_force_pseudo_logits(target, tr, prompt + cont[:2]), atol=1e-10)


def test_drafters_reject_bad_trees(target):
    tr = noisy_transfer(1)
    with pytest.raises(ValueError, match="paths is empty"): HiddenTransferDrafter(target, tr, [])
    with pytest.raises(ValueError, match="bad tree path"): HiddenTransferDrafter(target, tr, [(0,), (0, 0, 0, 0)])  # deeper than k
    with pytest.raises(ValueError, match="bad tree path"): HiddenTransferDrafter(target, tr, [(0, 1)])


# --- training, accuracy, checkpoints ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp_target_and_stream():
    "A tiny target with peaked distributions, and its own greedy continuations: repetitive, so drafters can learn them."
    sharp = tiny_lm(seed=3)
    with torch.no_grad(): sharp.lm_head.weight.mul_(30)
    out = []
    for s in range(8):
        rng = random.Random(s)
        prompt = [rng.randrange(40) for _ in range(4)]
        out += prompt + generate(sharp, prompt, 60).tokens
    return sharp, torch.tensor(out)


def test_training_learns_and_drafts_get_accepted(sharp_target_and_stream):
    target, stream = sharp_target_and_stream
    torch.manual_seed(0)
    models = {"t1": HiddenTransfer(32, 3, 1).double(), "med": MedusaHeads(32, 40, 3, target.lm_head).double()}
    untrained = HiddenTransfer(32, 3, 1).double()
    hist = train_drafters(target, models, stream, steps=20, batch_size=2, seq_len=32, anchors=8, lr=2e-2, progress=False)
    assert all(p.grad is None for p in target.parameters())  # frozen while training
    for n in models: assert sum(h[n] for h in hist[-5:]) < 0.5 * sum(h[n] for h in hist[:5]), n
    mat = {}
    for name, model in [("trained", models["t1"].eval()), ("untrained", untrained)]:
        total = 0.0
        for prompt in [stream[:6].tolist(), stream[70:75].tolist(), [5, 6, 7]]:
            res = generate(target, prompt, 60, HiddenTransferDrafter(target, model, PATHS))
            assert res.tokens == ref_decode(target, prompt, 60)
            total += res.mean_accepted
        mat[name] = total / 3
    assert mat["trained"] > mat["untrained"] + 0.15 and mat["trained"] > 1.5, mat


def test_rank_accuracy_matches_a_direct_count(target):
    heads = noisy_heads(target)
    stream = torch.randint(0, 40, (200,), generator=torch.Generator().manual_seed(0))
    got = rank_accuracy(target, heads, stream, n_windows=2, seq_len=40, width=3, chunk=7)
    hits, n = torch.zeros(3, 3), 0
    with torch.no_grad():
        for w in range(2):
            x = stream[w * 40:(w + 1) * 40][None]
            greedy = target(x)[0].argmax(-1)
            h = target.hidden_states(x)[0]
            for pos in range(40 - 3):
                top = heads(h[pos]).topk(3, dim=-1).indices
                for i in range(3):
                    hits[i] += (top[i] == greedy[pos + i + 1]).double()
                n += 1
    assert torch.allclose(got, (hits / n).float(), atol=1e-6)
    with pytest.raises(ValueError, match="do not fit a stream"): rank_accuracy(target, heads, stream, 10, seq_len=40)


def test_train_drafters_rejects_bad_input(target):
    stream = torch.randint(0, 40, (300,))
    with pytest.raises(ValueError, match="nothing to train"): train_drafters(target, {}, stream, 1)
    with pytest.raises(ValueError, match="can only train"): train_drafters(target, {"x": torch.nn.Linear(2, 2)}, stream, 1)
    with pytest.raises(ValueError, match="leaves fewer than anchors"):
        train_drafters(target, {"t": HiddenTransfer(32, 3, 1).double()}, stream, 1, seq_len=10, anchors=8)


def test_checkpoint_roundtrip(target, tmp_path):
    for model in (noisy_transfer(1), noisy_heads(target), noisy_heads(target, own=False)):
        save_drafter(model, tmp_path / "d.pt", extra={"a": 1})
        back = load_drafter(tmp_path / "d.pt", dtype=torch.float64, lm_head=target.lm_head)
        h = torch.randn(5, 32, dtype=torch.float64)
        assert type(back) is type(model) and torch.allclose(back(h), model(h), atol=2e-2, rtol=1e-2)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read drafter checkpoint"): load_drafter(tmp_path / "bad.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a hidden-transfer drafter checkpoint"): load_drafter(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="can only save"): save_drafter(torch.nn.Linear(2, 2), tmp_path / "x.pt")


# --- the self-speculative baseline -----------------------------------------------------------------------------------

def test_layer_skip_draft_is_a_consistent_causal_lm_and_lossless(target):
    skip = LayerSkipLM(target, [1])
    x = torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        c = skip.new_cache()
        steps = torch.cat([skip(x[:, :5], cache=c)] + [skip(x[:, t:t + 1], cache=c) for t in range(5, 12)], 1)
        assert torch.allclose(steps, skip(x), atol=1e-10) and c.k.shape[0] == 1
        assert torch.allclose(LayerSkipLM(target, [0, 1])(x), target(x), atol=1e-12)
    for prompt in PROMPTS:
        res = generate(target, prompt, 30, DraftModelDrafter(skip, gamma=3))
        assert res.tokens == reference_decode(target, prompt, 30)
    keep, agree = choose_skip_layers(target, torch.randint(0, 40, (200,)), 1, seq_len=40, n_windows=2)
    assert len(keep) == 1 and 0 <= agree <= 1
    assert choose_skip_layers(target, torch.randint(0, 40, (200,)), 2, seq_len=40, n_windows=2) == ([0, 1], 1.0)
    for bad in ([], [1, 0], [2], [0, 0]):
        with pytest.raises(ValueError, match="strictly increasing block indices"): LayerSkipLM(target, bad)
    with pytest.raises(ValueError, match="n_keep must be in"): choose_skip_layers(target, torch.zeros(100, dtype=torch.long), 3)


def test_bench_decoder_is_lossless_on_the_zoo_target():
    from types import SimpleNamespace
    from paper_repro.core.zoo import load_zoo
    from paper_repro.decoding.hidden_transfer import bench_methods
    target = load_zoo("code-target")
    (entry,) = bench_methods(SimpleNamespace(target=target))
    decode = entry.method
    for prompt in ([1], [40, 41, 42, 43, 44, 45, 46, 47]):
        res = decode(prompt, 12)
        assert res.tokens == generate(target, prompt, 12).tokens and len(res.steps) <= 12


def test_train_drafters_equals_one_optimiser_per_model(sharp_target_and_stream):
    "The fit-based loop equals the loop it replaced (one AdamW per model, each clipped by its own norm), bit for bit."
    from paper_repro.core.train import warmup_cosine
    from paper_repro.decoding.hidden_transfer import kl_to_target, offset_targets, teacher_pass, transfer_logits
    target, stream = sharp_target_and_stream

    def fresh():
        torch.manual_seed(0)
        return {"t0": noisy_transfer(0), "t1": noisy_transfer(1, seed=1), "med": noisy_heads(target)}
    new, ref = fresh(), fresh()
    steps, B, L, A, lr, warm = 4, 2, 32, 8, 2e-2, 2
    train_drafters(target, new, stream, steps, batch_size=B, seq_len=L, anchors=A, lr=lr, warmup=warm, progress=False)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0) for n, m in ref.items()}
    gen, k = torch.Generator().manual_seed(0), 3
    target.requires_grad_(False)
    try:
        for step in range(steps):
            starts = torch.randint(0, len(stream) - L, (B,), generator=gen).tolist()
            x = torch.stack([stream[s:s + L] for s in starts])
            anc = torch.randperm(L - k, generator=gen)[:A].sort().values
            logp, resid, cache = teacher_pass(target, x)
            emb = target.embed_tokens(x)
            for name, m in ref.items():
                if isinstance(m, HiddenTransfer):
                    loss = kl_to_target(offset_targets(logp, anc, k), transfer_logits(target, m, resid, cache, anc, emb))
                else:
                    every = torch.arange(L - k)
                    loss = kl_to_target(offset_targets(logp, every, k), m(target.norm(resid[-1])[:, every]))
                for g in opts[name].param_groups: g["lr"] = warmup_cosine(step, steps, warm, lr)
                opts[name].zero_grad(set_to_none=True); loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opts[name].step()
    finally:
        target.requires_grad_(True)
    for name in ref:
        assert all(torch.equal(a, b) for a, b in zip(ref[name].parameters(), new[name].parameters())), name
