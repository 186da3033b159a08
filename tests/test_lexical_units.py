"""paper_repro.decoding.lexical_units: unit marking, data rebuilding, fine-tuning, LUD decoding (lossy by design)."""
import random

import pytest
import torch

from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.decoding.lexical_units import (LUDTrainConfig, add_pad_token, build_lud_batch, finetune_lud, lud_generate,
                                                lud_loss, mark_units, token_confidence)
from conftest import tiny_lm


@pytest.fixture(scope="module")
def lud():
    """The tiny float64 target with a [PAD] id appended (id 40), its output sharpened so that its confidences spread over
    (0, 1) like a trained model's (a random one is near-uniform: every confidence would sit near 1/40)."""
    model, pad = add_pad_token(tiny_lm())
    with torch.no_grad(): model.lm_head.weight.mul_(25)
    return model, pad


def brute_units(conf, alpha, k):
    "Units by enumerating every run explicitly."
    out, runs, start = [0] * len(conf), [], None
    for t, c in enumerate(list(conf) + [-1.0]):
        if c >= alpha and start is None: start = t
        if c < alpha and start is not None: runs.append((start, t)); start = None
    for s, e in runs:
        pos = s
        while e - pos >= 2:
            n = min(k, e - pos)
            out[pos] = n
            pos += n
    return out


@pytest.mark.parametrize("seed", range(6))
def test_mark_units_matches_brute_force(seed):
    rng = random.Random(seed)
    conf = [rng.choice([0.1, 0.5, 0.8, 0.95, 1.0]) for _ in range(300)]
    for alpha in (0.5, 0.8, 1.0):
        for k in (2, 3, 4, 7):
            got = mark_units(torch.tensor(conf), alpha, k).tolist()
            assert got == brute_units(conf, alpha, k)
            # every token of a unit is confident, and units never overlap
            covered = [False] * len(conf)
            for s, n in enumerate(got):
                if n:
                    assert 2 <= n <= k and all(c >= alpha for c in conf[s:s + n]) and not any(covered[s:s + n])
                    covered[s:s + n] = [True] * n


def test_mark_units_rejects_bad_parameters():
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"): mark_units(torch.zeros(3), 1.5, 4)
    with pytest.raises(ValueError, match="k must be an int >= 2"): mark_units(torch.zeros(3), 0.5, 1)
    with pytest.raises(ValueError, match="LUDTrainConfig.steps must be >= 1"): LUDTrainConfig(steps=0)


def test_add_pad_token_keeps_the_model():
    base = tiny_lm()
    model, pad = add_pad_token(base)
    assert pad == base.vocab_size and model.vocab_size == base.vocab_size + 1
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad(): assert torch.allclose(model(x)[..., :pad], base(x), atol=1e-12)


def test_token_confidence_is_the_teacher_forced_probability():
    base = tiny_lm()
    stream = torch.randint(0, 40, (23,), generator=torch.Generator().manual_seed(0))
    conf = token_confidence(base, stream, seq_len=5, batch_size=2)
    assert conf[0] == 0
    with torch.no_grad():
        for t in (1, 4, 5, 6, 11, 22):  # inside and at the edges of the 5-prediction windows
            s = (t - 1) // 5 * 5
            p = base(stream[None, s:t]).softmax(-1)[0, -1, stream[t]]
            assert abs(float(p) - float(conf[t])) < 1e-6


def rand_windows(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 40, (B, L + 1), generator=g)
    lens = torch.zeros(B, L + 1, dtype=torch.long)
    for b in range(B):
        t = 0
        while t < L + 1:
            if torch.rand(1, generator=g) < 0.3:
                n = int(torch.randint(2, 5, (1,), generator=g))
                lens[b, t] = n
                t += n
            else:
                t += 1
    return torch.stack([toks, lens], -1)


@pytest.mark.parametrize("stop_pad", [True, False])
def test_rebuilt_batch_matches_decoding_inputs(lud, stop_pad):
    """Every [PAD] row computes exactly what the decoding-time input (context + [PAD]s) computes, and real tokens are
    unaffected by the placeholders: training and decoding see the same thing."""
    model, pad = lud
    L, k = 16, 4
    windows = rand_windows(3, L, seed=1)
    batch = build_lud_batch(windows, pad, k, stop_pad)
    assert batch.n_real == L and batch.is_pad.any()
    with torch.no_grad():
        logits = model(batch.tokens, positions=batch.positions, attn_mask=batch.mask)
        for b in range(3):
            toks, lens = windows[b, :, 0], windows[b, :, 1].tolist()
            assert torch.allclose(logits[b, :L], model(toks[None, :L])[0], atol=1e-12)
            assert batch.targets[b, :L].tolist() == toks[1:].tolist()
            # the expected placeholders, from the definition
            expected = []
            for s in range(1, L):
                n = min(lens[s], L + 1 - s)
                if n < 2: continue
                last = n if (stop_pad and n == lens[s] < k and s + n <= L) else n - 1
                expected += [(s, j) for j in range(1, last + 1)]
            rows = batch.is_pad[b].nonzero().flatten().tolist()
            assert len(rows) == len(expected)
            for r, (s, j) in zip(rows, expected):
                assert batch.positions[b, r] == s + j - 1 and batch.targets[b, r] == toks[s + j]
                at_decode = model(torch.cat([toks[:s], torch.full((j,), pad)])[None])[0, -1]
                assert torch.allclose(logits[b, r], at_decode, atol=1e-12)
            # batch padding: no target, attends to itself only
            for r in range(L + len(rows), batch.tokens.shape[1]):
                assert batch.targets[b, r] == -100 and batch.mask[b, r].sum() == 1


def test_lud_loss_and_finetune():
    model, pad = add_pad_token(tiny_lm())  # a fresh copy: fine-tuning changes it
    stream = torch.randint(0, 40, (400,), generator=torch.Generator().manual_seed(0))
    unit_len = mark_units(torch.rand(400, generator=torch.Generator().manual_seed(1)), 0.5, 4)
    batch = build_lud_batch(torch.stack([stream[:33], unit_len[:33]], 1)[None], pad, 4)
    total, real, on_pads = lud_loss(model, batch)
    n_real, n_pad = batch.n_real, int(batch.is_pad.sum())
    assert torch.isclose(total, (real * n_real + on_pads * n_pad) / (n_real + n_pad))
    cfg = LUDTrainConfig(alpha=0.5, steps=3, batch_size=2, seq_len=32, warmup=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, log = finetune_lud(model, stream, unit_len, pad, cfg, teacher=tiny_lm(), progress=False)
    assert not out.training and log[-1]["step"] == 2 and log[-1]["pads"] > 0
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    with pytest.raises(ValueError, match="needs the base model as `teacher`"):
        finetune_lud(model, stream, unit_len, pad, cfg, progress=False)
    with pytest.raises(ValueError, match="stream has 400 tokens but unit_len 399"):
        finetune_lud(model, stream, unit_len[:-1], pad, cfg, teacher=tiny_lm(), progress=False)


def greedy_no_pad(model, prompt, n, pad, eos=None):
    seq, out = list(prompt), []
    with torch.no_grad():
        while len(out) < n:
            logits = model(torch.tensor([seq]))[0, -1]
            logits[pad] = float("-inf")
            out.append(int(logits.argmax())); seq.append(out[-1])
            if out[-1] == eos: break
    return out


def lud_no_cache(model, prompt, n, k, beta, pad, eos=None):
    "LUD from its definition, recomputing the whole sequence every step (no KV cache)."
    seq, out, steps = list(prompt), [], 0
    with torch.no_grad():
        while len(out) < n:
            kk = min(k, n - len(out))
            logits = model(torch.tensor([seq + [pad] * (kk - 1)]))[0, -kk:]
            logits[:, pad] = float("-inf")
            conf, tok = logits.softmax(-1).max(-1)
            m = 0
            while m < kk and conf[m] >= beta: m += 1
            new = tok[:max(1, m)].tolist()
            if eos in new: new = new[:new.index(eos) + 1]
            seq += new; out += new; steps += 1
            if eos in new: break
    return out, steps


PROMPTS = [[5], [3, 14, 15, 9, 2, 6], [7, 7, 7, 7, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11]]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.7])
def test_lud_generate_matches_the_no_cache_definition(lud, k, beta):
    model, pad = lud
    for prompt in PROMPTS:
        for n in (1, 2, 7, 19):
            res = lud_generate(model, prompt, n, k=k, beta=beta)
            ref, steps = lud_no_cache(model, prompt, n, k, beta, pad)
            assert res.tokens == ref and len(res.steps) == steps and res.new_tokens == n
            assert res.new_tokens == sum(s.accepted + s.bonus for s in res.steps)
            assert res.target_calls == len(res.steps) + (len(prompt) > 1)
            assert all(s.accepted <= s.drafted <= k - 1 for s in res.steps) and not res.lossless


def test_acceptance_thresholds_bracket_the_behaviour(lud):
    model, pad = lud
    prompt = PROMPTS[1]
    off = lud_generate(model, prompt, 30, k=4, beta=1.01)  # no parallel token can be accepted
    assert off.tokens == greedy_no_pad(model, prompt, 30, pad) and off.mean_accepted == 1.0
    assert off.tokens == [t for t in off.tokens if t != pad]
    all_in = lud_generate(model, prompt, 30, k=4, beta=0.0)   # everything accepted: k tokens per step
    assert [s.accepted + s.bonus for s in all_in.steps] == [4] * 7 + [2]
    mid = lud_generate(model, prompt, 30, k=4, beta=0.5)
    assert 1.2 < mid.mean_accepted < 3.0  # the model's confidences straddle 0.5 (precondition of the test)
    assert pad not in mid.tokens and pad not in all_in.tokens  # [PAD] is never emitted


def test_eos_stops_inside_a_parallel_step(lud):
    model, pad = lud
    prompt = PROMPTS[1]
    free = lud_generate(model, prompt, 30, k=4, beta=0.0).tokens
    eos = free[5]                                # emitted as a parallel token of the second step
    first = free.index(eos)
    res = lud_generate(model, prompt, 30, k=4, beta=0.0, eos_id=eos)
    ref, _ = lud_no_cache(model, prompt, 30, 4, 0.0, pad, eos=eos)
    assert res.tokens == ref == free[:first + 1] and res.stopped_by_eos
    assert res.new_tokens == sum(s.accepted + s.bonus for s in res.steps)


def test_lud_generate_rejects_bad_input(lud):
    model, pad = lud
    with pytest.raises(ValueError, match="k must be a positive int"): lud_generate(model, [1], 5, k=0)
    with pytest.raises(ValueError, match="beta must be >= 0"): lud_generate(model, [1], 5, beta=-0.1)
    with pytest.raises(ValueError, match="beta must be >= 0"): lud_generate(model, [1], 5, beta=float("nan"))
    with pytest.raises(ValueError, match=r"prompt token ids \[40\] are \[PAD\]"): lud_generate(model, [1, pad], 5)
    with pytest.raises(ValueError, match=r"prompt token ids \[99\]"): lud_generate(model, [99], 5)
    with pytest.raises(ValueError, match="prompt is empty"): lud_generate(model, [], 5)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"): lud_generate(model, [1], 0)
    with pytest.raises(ValueError, match=r"pad_id 41 is outside \[0, 41\)"): lud_generate(model, [1], 5, pad_id=41)


def test_committed_checkpoint_decodes():
    from paper_repro.decoding.lexical_units import load_lud, lud_card
    from paper_repro.core.zoo import load_zoo
    card = lud_card()
    model = load_lud()
    assert model.vocab_size == load_zoo("code-target").vocab_size + 1 == card["pad_id"] + 1
    res = lud_generate(model, [10, 20, 30, 40], 12, k=card["k"], beta=card["alpha"])
    assert res.new_tokens == 12 and card["pad_id"] not in res.tokens and not res.lossless


def test_save_lud_registers_and_does_not_rewrite_identical_weights(tmp_path):
    import copy
    from paper_repro.decoding.lexical_units import load_lud, lud_card, save_lud
    (tmp_path / "data").mkdir()
    model, pad = add_pad_token(TransformerLM(LMConfig(64, 32, 1, 2, 64)))
    first = save_lud(model, LUDTrainConfig(), pad, seed=0, root=tmp_path)
    again = save_lud(copy.deepcopy(model), LUDTrainConfig(), pad, seed=0, root=tmp_path)
    assert again["sha256"] == first["sha256"] and "paper-repro run lexical_units" in first["rebuild"]
    other = save_lud(model, LUDTrainConfig(alpha=0.5), pad, seed=0, root=tmp_path)
    assert other["sha256"] != first["sha256"] and lud_card(tmp_path)["alpha"] == 0.5
    assert torch.equal(load_lud(root=tmp_path).lm_head.weight, model.lm_head.weight.half().float())
