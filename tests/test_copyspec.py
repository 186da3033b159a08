"""paper_repro.decoding.copyspec: the copy index, the drafter, losslessness."""
import random

import pytest

from paper_repro.core.decoding import DraftModelDrafter, generate, reference_decode
from paper_repro.decoding.copyspec import CopyIndex, CopySpecDrafter


def brute_force_lookup(tokens, gamma, n):
    "First earlier occurrence of the last gamma tokens, by scanning."
    key = tokens[-gamma:]
    for end in range(gamma, len(tokens)):
        if tokens[end - gamma:end] == key: return tokens[end:end + n]
    return []


@pytest.mark.parametrize("gamma", [1, 2, 3, 5])
def test_index_matches_brute_force_incrementally(gamma):
    rng = random.Random(gamma)
    tokens, idx = [], CopyIndex(gamma)
    for _ in range(400):
        tokens.append(rng.randrange(6))
        if rng.random() < 0.5: idx.update(tokens)  # updates may skip steps
        else: continue
        assert idx.lookup(tokens, 7) == brute_force_lookup(tokens, gamma, 7)


def test_index_resets_on_a_new_sequence():
    idx = CopyIndex(2)
    idx.update([1, 2, 3, 1, 2]); assert idx.lookup([1, 2, 3, 1, 2], 2) == [3, 1]
    idx.update([9, 9, 1, 2]); assert idx.lookup([9, 9, 1, 2], 2) == []  # old entries forgotten
    with pytest.raises(ValueError, match="gamma must be a positive int"): CopyIndex(0)
    with pytest.raises(ValueError, match="number_copy must be a positive int"): CopySpecDrafter(number_copy=0)


def test_drafter_copies_and_falls_back():
    class Fallback:
        def __init__(self): self.seen = 0
        def propose(self, context, max_tokens):
            from paper_repro.core.decoding import Draft
            return Draft.chain([0], source="fallback")
        def observe(self, *a): self.seen += 1
    fb = Fallback()
    d = CopySpecDrafter(gamma=2, number_copy=3, fallback=fb)
    assert d.propose([5, 6, 7, 8, 5, 6], 10).tokens == [7, 8, 5]
    assert d.propose([5, 6, 7, 8, 5, 6], 2).tokens == [7, 8]      # respects the budget
    miss = d.propose([5, 6, 7, 8, 5, 6, 1], 10)
    assert miss.source == "fallback"
    d.observe([], miss, 0, None); assert fb.seen == 1


@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_copyspec_is_lossless_on_repetitive_prompts(target, gamma):
    prompts = [[1, 2, 3, 4, 5, 6] * 4, [7, 3, 9, 7, 3, 9, 7, 3], [11]]
    for prompt in prompts:
        ref = reference_decode(target, prompt, 40)
        res = generate(target, prompt, 40, CopySpecDrafter(gamma=gamma, number_copy=6))
        assert res.tokens == ref
        assert res.new_tokens == sum(s.accepted + s.bonus for s in res.steps)


def test_copyspec_with_draft_model_fallback_is_lossless(target, draft_model):
    prompt = [2, 4, 6, 8, 2, 4, 6, 8, 2, 4]
    ref = reference_decode(target, prompt, 40)
    res = generate(target, prompt, 40, CopySpecDrafter(3, 10, fallback=DraftModelDrafter(draft_model, gamma=4)))
    assert res.tokens == ref
    assert set(res.accepted_by_source()) <= {"copy", "draft_model"}


def test_copies_are_accepted_when_the_model_repeats(target):
    """A greedy tiny model falls into a loop; once it has, every copy draft is accepted (MAT well above 1)."""
    prompt = [3, 1, 4, 1, 5]
    res = generate(target, prompt, 120, CopySpecDrafter(gamma=2, number_copy=8))
    greedy = reference_decode(target, prompt, 120)
    assert res.tokens == greedy
    assert len(set(greedy[-40:])) < 10  # the fixture model does loop (precondition of this test)
    assert res.accepted_by_source().get("copy", 0) >= 30 and res.mean_accepted > 1.5
