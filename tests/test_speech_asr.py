"""paper_repro.speech.asr: RNN-T loss vs brute force and gradcheck, CTC and RNN-T decoders, vocabulary, WER/CER."""
import itertools
import math

import pytest
import torch

from paper_repro.speech.asr import (Joiner, LSTMPredictor, Vocab, cer, ctc_greedy_decode, ctc_loss,
                                    ctc_prefix_beam_search, error_counts, rnnt_beam_search, rnnt_greedy_decode,
                                    rnnt_log_likelihood, rnnt_loss, wer)


# ---------------------------------------------------------------- RNN-T loss

def brute_force_rnnt(logits, y, blank=0):
    "log P(y|x) by enumerating every alignment: the U labels placed among the first T+U-1 steps, final step blank."
    lp = torch.log_softmax(logits, -1)
    T, U = lp.shape[0], len(y)
    total = []
    for label_steps in itertools.combinations(range(T + U - 1), U):
        t = u = 0; s = 0.0
        for step in range(T + U):
            if step in label_steps: s = s + lp[t, u, y[u]]; u += 1
            else: s = s + lp[t, u, blank]; t += 1
        total.append(s)
    return torch.logsumexp(torch.stack(total), 0)


@pytest.mark.parametrize("T,U,V,blank", [(1, 0, 3, 0), (1, 2, 3, 0), (3, 2, 4, 0), (4, 3, 3, 2), (2, 4, 5, 1)])
def test_rnnt_loss_matches_brute_force(T, U, V, blank):
    g = torch.Generator().manual_seed(T * 100 + U * 10 + V)
    logits = torch.randn(T, U + 1, V, generator=g, dtype=torch.float64) * 2
    labels = [l for l in range(V) if l != blank]
    y = [labels[int(i)] for i in torch.randint(len(labels), (U,), generator=g)]
    ref = brute_force_rnnt(logits, y, blank)
    ours = rnnt_log_likelihood(logits[None], torch.tensor([y], dtype=torch.long).view(1, U), torch.tensor([T]),
                               torch.tensor([U]), blank)
    torch.testing.assert_close(ours[0], ref, rtol=1e-10, atol=1e-10)


def test_rnnt_loss_batched_with_lengths_equals_per_utterance():
    g = torch.Generator().manual_seed(0)
    B, T, U, V = 3, 5, 4, 5
    logits = torch.randn(B, T, U + 1, V, generator=g, dtype=torch.float64)
    targets = torch.randint(1, V, (B, U), generator=g)
    Tl, Ul = torch.tensor([5, 3, 1]), torch.tensor([4, 2, 0])
    batched = rnnt_loss(logits, targets, Tl, Ul, reduction="none")
    for b in range(B):
        single = rnnt_loss(logits[b:b + 1, :Tl[b], :Ul[b] + 1], targets[b:b + 1, :Ul[b]], Tl[b:b + 1], Ul[b:b + 1],
                           reduction="none")
        torch.testing.assert_close(batched[b], single[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched[b], -brute_force_rnnt(logits[b, :Tl[b], :Ul[b] + 1], targets[b, :Ul[b]].tolist()),
                                   rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rnnt_loss(logits, targets, Tl, Ul), batched.mean())
    torch.testing.assert_close(rnnt_loss(logits, targets, Tl, Ul, reduction="sum"), batched.sum())


def test_rnnt_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 3], [2, 0]])
    Tl, Ul = torch.tensor([4, 2]), torch.tensor([2, 1])
    assert torch.autograd.gradcheck(lambda x: rnnt_loss(x, targets, Tl, Ul, reduction="sum"), (logits,))
    rnnt_loss(logits, targets, Tl, Ul, reduction="sum").backward()
    assert (logits.grad[1, 2:] == 0).all() and (logits.grad[1, :, 2:] == 0).all()   # padding gets no gradient


def test_rnnt_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="targets must be"):
        rnnt_loss(torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.tensor([2]), torch.tensor([2]))
    with pytest.raises(ValueError, match="valid: 'mean', 'sum', 'none'"):
        rnnt_loss(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]), torch.tensor([2]),
                  reduction="avg")


# ---------------------------------------------------------------- CTC

def brute_force_ctc(log_probs, blank=0):
    "Exact probability of every transcript by enumerating all V^T paths."
    T, V = log_probs.shape
    scores = {}
    for path in itertools.product(range(V), repeat=T):
        lab, prev = [], None
        for c in path:
            if c != blank and c != prev: lab.append(c)
            prev = c
        s = float(sum(log_probs[t, c] for t, c in enumerate(path)))
        key = tuple(lab)
        if key in scores:
            m = max(scores[key], s); s = m + math.log(math.exp(scores[key] - m) + math.exp(s - m))
        scores[key] = s
    return scores


def test_ctc_greedy_on_hand_made_posteriors():
    # frames: a a _ a b b _ (blank=0, a=1, b=2) -> "a a b"; second utterance is cut by its length
    frames = [1, 1, 0, 1, 2, 2, 0]
    lp = torch.full((2, 7, 3), -10.0)
    for t, c in enumerate(frames): lp[0, t, c] = 0.0; lp[1, t, c] = 0.0
    assert ctc_greedy_decode(lp, torch.tensor([7, 3])) == [[1, 1, 2], [1]]


@pytest.mark.parametrize("seed", range(4))
def test_ctc_prefix_beam_unpruned_is_exact(seed):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(4, 3, generator=g, dtype=torch.float64) * 1.5, -1)
    ref = brute_force_ctc(lp)
    out = ctc_prefix_beam_search(lp, beam=10_000)
    assert {p for p, _ in out} == set(ref)
    for p, s in out: assert s == pytest.approx(ref[p], abs=1e-9)
    assert out[0][0] == max(ref, key=ref.get)


def test_ctc_prefix_beam_beats_best_path():
    # best path is "_ _" -> "" (0.36), but "a" collects 0.64 from three paths
    lp = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()
    assert ctc_greedy_decode(lp[None]) == [[]]
    best, score = ctc_prefix_beam_search(lp, beam=4)[0]
    assert best == (1,) and math.exp(score) == pytest.approx(0.64)


def test_ctc_prefix_score_hook_changes_ranking():
    lp = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()
    out = ctc_prefix_beam_search(lp, beam=4, prefix_score=lambda prefix, c: -10.0)
    assert out[0][0] == ()


def test_ctc_loss_wraps_torch_with_zero_infinity():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [4, 4, 4]])
    lens, tl = torch.tensor([6, 3]), torch.tensor([3, 3])   # "4 4 4" needs 5 frames: infeasible in 3
    loss = ctc_loss(logits, lens, targets, tl, reduction="none")
    ref = torch.nn.functional.ctc_loss(torch.log_softmax(logits, -1).transpose(0, 1), targets, lens, tl,
                                       reduction="none")
    assert loss[1] == 0 and torch.isinf(ref[1])
    torch.testing.assert_close(loss[0], ref[0])
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()


# ---------------------------------------------------------------- RNN-T decoders

class CountingPredictor:
    "Toy prediction network: its output is the one-hot count of labels emitted so far."
    def __init__(self, n): self.n = n
    def init_state(self, batch_size, device): return torch.full((batch_size,), -1, dtype=torch.long, device=device)
    def step(self, tokens, state):
        new = state + 1                                    # the first call feeds the blank start token
        return torch.nn.functional.one_hot(new.clamp(max=self.n - 1), self.n).double(), new


class ScheduleJoiner:
    "Toy joiner: frame t says how many labels should be out by its end; emit y[u] while u is below that, else blank."
    def __init__(self, y, V, margin=6.0): self.y, self.V, self.margin = y, V, margin
    def __call__(self, enc, pred):
        due, u = enc.argmax(-1), pred.argmax(-1)
        want = torch.where(u < due, torch.tensor(self.y + [0])[u.clamp(max=len(self.y))], torch.zeros_like(u))
        return torch.nn.functional.one_hot(want, self.V).double() * self.margin


@pytest.mark.parametrize("schedule", [[1, 2, 3, 4], [0, 2, 2, 4], [3, 3, 4, 4], [0, 0, 0, 4]])
def test_rnnt_decoders_recover_the_known_answer(schedule):
    y, V = [2, 1, 3, 3], 4
    enc = torch.nn.functional.one_hot(torch.tensor(schedule), 5).double()       # [T, 5]
    pred, joiner = CountingPredictor(6), ScheduleJoiner(y, V)
    tokens, scores = rnnt_greedy_decode(enc[None], None, pred, joiner, max_symbols=4)
    assert tokens == [y]
    for merge in ("sum", "max"):
        hyps = rnnt_beam_search(enc, pred, joiner, beam=3, max_symbols=4, merge=merge)
        assert list(hyps[0].tokens) == y
        assert hyps[0].score >= scores[0].item() - 1e-9


def test_rnnt_greedy_respects_lengths_and_max_symbols():
    y, V = [2, 1, 3, 3], 4
    enc = torch.nn.functional.one_hot(torch.tensor([[4, 4, 4], [1, 2, 4]]), 5).double()
    pred, joiner = CountingPredictor(6), ScheduleJoiner(y, V)
    tokens, _ = rnnt_greedy_decode(enc, torch.tensor([3, 2]), pred, joiner, max_symbols=2)
    assert tokens == [[2, 1, 3, 3], [2, 1]]         # 2 labels per frame at most; utterance 2 stops after 2 frames


def _toy_model(seed, V=3, De=4, D=6):
    torch.manual_seed(seed)
    return LSTMPredictor(V, D).double().eval(), Joiner(De, D, V, D).double().eval(), torch.randn(3, De, dtype=torch.float64) * 2


@pytest.mark.parametrize("seed", range(3))
def test_rnnt_beam_sum_scores_equal_the_loss(seed):
    pred, joiner, enc = _toy_model(seed)
    with torch.no_grad():
        hyps = rnnt_beam_search(enc, pred, joiner, beam=10_000, max_symbols=3, merge="sum")
        for h in hyps[:8]:
            if len(h.tokens) > 3: continue
            y = torch.tensor([list(h.tokens)], dtype=torch.long).view(1, len(h.tokens))
            logits = joiner.lattice(enc[None], pred(y))
            ll = rnnt_log_likelihood(logits, y, torch.tensor([enc.shape[0]]), torch.tensor([len(h.tokens)]))
            assert h.score == pytest.approx(ll.item(), abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_rnnt_beam_not_worse_than_greedy(seed):
    pred, joiner, enc = _toy_model(seed)
    with torch.no_grad():
        tokens, score = rnnt_greedy_decode(enc[None], None, pred, joiner, max_symbols=3)
        exhaustive = rnnt_beam_search(enc, pred, joiner, beam=10_000, max_symbols=3, merge="max")[0]
        small = rnnt_beam_search(enc, pred, joiner, beam=4, max_symbols=3, merge="max")[0]
    # the exhaustive search finds the best alignment, so it can never lose to greedy; a 4-wide beam does not here
    assert exhaustive.score >= score.item() - 1e-9
    assert small.score >= score.item() - 1e-9
    # greedy's score is the log-probability of the alignment it took
    with torch.no_grad():
        y = torch.tensor([tokens[0]], dtype=torch.long).view(1, len(tokens[0]))
        ll = rnnt_log_likelihood(joiner.lattice(enc[None], pred(y)), y, torch.tensor([3]), torch.tensor([len(tokens[0])]))
    assert score.item() <= ll.item() + 1e-9


def test_lstm_predictor_step_matches_forward():
    pred, _, _ = _toy_model(0)
    y = torch.tensor([[1, 2, 2]])
    with torch.no_grad():
        full = pred(y)
        g, st = pred.step(torch.tensor([0]), pred.init_state(1, "cpu"))
        outs = [g]
        for tok in y[0]:
            g, st = pred.step(tok.view(1), st); outs.append(g)
    torch.testing.assert_close(torch.stack(outs, 1), full)


# ---------------------------------------------------------------- vocabulary and metrics

def test_vocab_round_trip_and_errors():
    v = Vocab.from_texts(["hallo wereld", "één twee"], extra=["<nl>", "<en>"])
    assert v.tokens[0] == "<blank>" and v.tokens[1:3] == ["<nl>", "<en>"]
    for text in ["<nl>hallo twee", "één", "<en><nl>"]:
        assert v.decode(v.encode(text)) == text
    targets, lens = v.encode_batch(["hallo", "<en>wereld"])
    assert lens.tolist() == [5, 7] and targets.shape == (2, 7) and targets[0, 5:].eq(0).all()
    with pytest.raises(ValueError, match="'x' of"): v.encode("xyz")
    with pytest.raises(ValueError, match="out of range"): v.decode([len(v)])


def test_vocab_encode_words_looks_up_whole_words():
    v = Vocab(["one", "two", "four", "<eos>", "<sub>"])
    assert v.encode_words(" four one\ttwo ") == [3, 1, 2] and v.encode_words("") == []
    assert v.encode_words("one <eos>") == [1, 4]                                   # allowed unless excluded
    for bad in ("one three", "<blank>", "one <eos>", "onetwo"):
        with pytest.raises(ValueError, match="is not in the vocabulary; valid words: \\['one', 'two', 'four'\\]"):
            v.encode_words(bad, exclude=("<eos>", "<sub>"))


def test_wer_cer_counts():
    assert wer(["a b c"], ["a x c d"]) == pytest.approx(2 / 3)
    assert cer("abcd", "abd") == pytest.approx(1 / 4)
    c = error_counts(["three one four", "nine two"], ["three four four one", "nine"])
    assert (c["substitutions"], c["deletions"], c["insertions"], c["ref_words"]) == (1, 1, 1, 5)
    assert c["wer"] == pytest.approx(3 / 5) == wer(["three one four", "nine two"], ["three four four one", "nine"])
    with pytest.raises(ValueError, match="2 references but 1"): wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="non-empty"): wer([""], ["a"])


# ---------------------------------------------------------------- per-utterance errors (paired bootstrap scores)

def test_item_errors_average_to_corpus_error_rates():
    from paper_repro.speech.asr import item_errors
    refs = ["three one four", "nine two", "five six seven eight"]
    hyps = ["three four four one", "nine", "five six seven eight"]
    e = item_errors(refs, hyps)
    assert e.shape == (3,) and e[2] == 0 and e[0] > e[1] > 0
    assert e.mean() == pytest.approx(wer(refs, hyps))
    assert item_errors(refs, hyps, unit="char").mean() == pytest.approx(cer(refs, hyps))
    other = ["three one four", "nine two", "five"]                       # a better and a worse system, paired
    assert (item_errors(refs, hyps) - item_errors(refs, other)).mean() == pytest.approx(wer(refs, hyps) - wer(refs, other))
    with pytest.raises(ValueError, match="unit='words'; valid: word, char"): item_errors(refs, hyps, unit="words")
    with pytest.raises(ValueError, match="3 references but 2 hypotheses"): item_errors(refs, hyps[:2])
