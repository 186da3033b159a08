"""Bad requests to every public decoder fail before any model work, with a one-line error that names the bad value and
the valid ones (issue 11 §1): prompt dtype and shape, the budget against the model's context length, a drafter whose
vocabulary differs from the target's, a non-integer gamma, dllm requests; and several EOS ids stop decoding at any."""
import math

import pytest
import torch

from paper_repro.core.decoding import (DraftModelDrafter, Sampler, batch_greedy_decode, check_count, check_eos,
                                       check_max_new_tokens, check_same_vocab, context_length, generate, greedy_decode,
                                       reference_decode)
from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.decoding.aded import ADEDDrafter, TrigramMap
from paper_repro.decoding.batchllm import naive_schedule, run_schedule
from paper_repro.decoding.copyspec import CopyIndex, CopySpecDrafter
from paper_repro.decoding.lexical_units import lud_generate
from paper_repro.decoding.pearl import SequentialDraft, ThreadDraft, pearl_generate
from paper_repro.decoding.token_recycling import TokenRecyclingDrafter, default_template
from paper_repro.dllm.core import DecodeConfig, OracleLM, check_dllm_request, diffusion_generate
from paper_repro.dllm.tasks import EOS_ID, MASK_ID, VOCAB_SIZE
from conftest import tiny_lm

PROMPT = [3, 14, 15, 9, 2, 6]


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def lud_model():
    return tiny_lm(vocab=41)  # id 40 plays [PAD]


@pytest.fixture(scope="module")
def dllm():
    torch.manual_seed(0)
    return TransformerLM(LMConfig(VOCAB_SIZE, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128)).double().eval()


def entry_points(target, draft_model, lud_model):
    "Every batch-1 decoder of the collection as `decode(prompt, max_new_tokens)`."
    return {
        "generate": lambda p, n: generate(target, p, n),
        "greedy_decode": lambda p, n: greedy_decode(target, p, n),
        "reference_decode": lambda p, n: reference_decode(target, p, n),
        "draft model": lambda p, n: generate(target, p, n, DraftModelDrafter(draft_model, gamma=3)),
        "token recycling": lambda p, n: generate(target, p, n, TokenRecyclingDrafter(40, k=4, template=default_template(8))),
        "copyspec": lambda p, n: generate(target, p, n, CopySpecDrafter(gamma=2)),
        "pearl": lambda p, n: pearl_generate(target, draft_model, p, n, gamma=2),
        "lud": lambda p, n: lud_generate(lud_model, p, n, k=2),
        "batch_greedy_decode": lambda p, n: batch_greedy_decode(target, [p], n),
        "run_schedule": lambda p, n: run_schedule(target, [p], [n], naive_schedule(1, 1)),
    }

ENTRY_POINTS = ["generate", "greedy_decode", "reference_decode", "draft model", "token recycling", "copyspec", "pearl",
                "lud", "batch_greedy_decode", "run_schedule"]


# ---------------------------------------------------------------- prompts

@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_fractional_and_bool_prompts_are_refused_not_truncated(name, target, draft_model, lud_model):
    decode = entry_points(target, draft_model, lud_model)[name]
    assert decode(torch.tensor(PROMPT), 3)  # an integer tensor is fine
    with pytest.raises(TypeError) as e: decode(torch.tensor([3.0, 14.7]), 3)
    assert "integer token ids" in one_line(e) and "float32" in str(e.value)
    with pytest.raises(TypeError) as e: decode(torch.tensor([True, False]), 3)
    assert "torch.bool" in one_line(e)
    with pytest.raises(TypeError) as e: decode([3, 14.7], 3)
    assert "14.7 (float)" in one_line(e)


@pytest.mark.parametrize("name", [n for n in ENTRY_POINTS if n not in ("batch_greedy_decode", "run_schedule")])
def test_several_rows_where_one_sequence_is_expected(name, target, draft_model, lud_model):
    decode = entry_points(target, draft_model, lud_model)[name]
    with pytest.raises(ValueError) as e: decode(torch.tensor([PROMPT, PROMPT]), 3)
    assert "one sequence, got 2 rows" in one_line(e) and "batch_greedy_decode" in str(e.value)
    assert decode(torch.tensor([PROMPT]), 3)  # one row is one sequence


# ---------------------------------------------------------------- the budget

@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("bad", [True, 2.0, 0, "4"])
def test_max_new_tokens_must_be_a_positive_int(name, bad, target, draft_model, lud_model):
    decode = entry_points(target, draft_model, lud_model)[name]
    with pytest.raises(ValueError) as e: decode(PROMPT, bad)
    msg = one_line(e)  # run_schedule lists its bad budgets
    assert f"max_new_tokens must be a positive int, got {bad!r}" in msg or (name == "run_schedule" and f"[{bad!r}]" in msg)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_budget_beyond_the_context_length_names_both_numbers(name, target, draft_model, lud_model):
    decode = entry_points(target, draft_model, lud_model)[name]
    assert context_length(target) == target.cfg.max_seq_len == 4096
    with pytest.raises(ValueError) as e: decode(PROMPT, 10**15)  # was a petabyte-sized cache allocation
    msg = one_line(e)
    assert f"max_new_tokens={10**15}" in msg and "context length 4096" in msg and "at most 4090 new tokens" in msg


def test_the_context_check_is_exact():
    small = TransformerLM(LMConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=12)).double()
    assert len(greedy_decode(small, PROMPT, 6).tokens) == 6  # 6 + 6 = 12 positions: fits
    with pytest.raises(ValueError, match=r"6 tokens \+ max_new_tokens=7 = 13 positions exceeds the model's context "
                                         r"length 12; at most 6 new tokens fit after it"):
        greedy_decode(small, PROMPT, 7)
    with pytest.raises(ValueError, match="the prompt alone fills it"): greedy_decode(small, list(range(12)), 1)
    with pytest.raises(ValueError, match="context length 12"): batch_greedy_decode(small, [[1], PROMPT], [4, 7])
    assert check_max_new_tokens(5, 10**9) == 5  # no limit known: only the type is checked


# ---------------------------------------------------------------- drafters meeting a target

def test_a_drafter_with_another_vocabulary_is_refused_up_front(target):
    other = tiny_lm(vocab=50, d=16, layers=1, heads=2, seed=1)
    for drafter in (DraftModelDrafter(other, gamma=3), TokenRecyclingDrafter(50, k=4, template=default_template(8)),
                    CopySpecDrafter(gamma=2, fallback=DraftModelDrafter(other)),
                    ADEDDrafter(TrigramMap.from_sequences([list(range(3, 50))], 50, 4), iterations=10)):
        with pytest.raises(ValueError) as e: generate(target, PROMPT, 8, drafter)
        assert "vocabulary of 50 tokens but the target TransformerLM has 40" in one_line(e)
    for draft in (other, SequentialDraft(other), ThreadDraft(other)):
        with pytest.raises(ValueError) as e: pearl_generate(target, draft, PROMPT, 8, gamma=2)
        assert "vocabulary of 50 tokens" in one_line(e)
    check_same_vocab(target, CopySpecDrafter())  # copies from the context: no vocabulary of its own
    assert generate(target, PROMPT, 8, CopySpecDrafter(fallback=DraftModelDrafter(tiny_lm(seed=2)))).new_tokens == 8


@pytest.mark.parametrize("bad", [2.5, True, 0, "3"])
def test_gamma_must_be_an_int_in_range(bad, target, draft_model):
    with pytest.raises(ValueError) as e: DraftModelDrafter(draft_model, gamma=bad)
    assert f"gamma must be a positive int, got {bad!r}" in one_line(e)
    with pytest.raises(ValueError) as e: CopyIndex(bad)
    assert "gamma must be a positive int" in one_line(e)
    with pytest.raises(ValueError) as e: pearl_generate(target, draft_model, PROMPT, 8, gamma=bad)
    assert f"gamma must be an int in [1, 16], got {bad!r}" in one_line(e)


def test_check_count_names_the_type_of_what_is_not_an_int():
    assert check_count("k", 3) == 3 and type(check_count("k", torch.tensor(3).numpy()[()])) is int
    with pytest.raises(ValueError, match=r"got True \(bool\)"): check_count("gamma", True)
    with pytest.raises(ValueError, match=r"got 2.5 \(float\)"): check_count("gamma", 2.5)
    with pytest.raises(ValueError, match=r"k must be an int >= 0, got -1$"): check_count("k", -1, lo=0)
    with pytest.raises(ValueError, match="max_draft must be an int >= 0"):
        generate(tiny_lm(), PROMPT, 4, max_draft=-1)


# ---------------------------------------------------------------- several EOS ids

def test_decoding_stops_at_any_of_several_eos_ids(target, draft_model):
    full = reference_decode(target, PROMPT, 30)
    a, b = full[12], full[7]  # b comes first
    first = min(full.index(a), full.index(b))
    want = full[:first + 1]
    assert reference_decode(target, PROMPT, 30, eos_id=[a, b]) == want
    for res in (greedy_decode(target, PROMPT, 30, eos_id=[a, b]),
                generate(target, PROMPT, 30, DraftModelDrafter(draft_model, gamma=4), eos_id=(b, a)),
                generate(target, PROMPT, 30, Oracle(full, len(PROMPT)), eos_id=torch.tensor([a, b])),
                pearl_generate(target, draft_model, PROMPT, 30, gamma=3, eos_id=[a, b])):
        assert res.tokens == want and res.stopped_by_eos
    assert batch_greedy_decode(target, [PROMPT, PROMPT[:2]], 30, eos_id=[a, b]).tokens[0] == want
    assert greedy_decode(target, PROMPT, 30, eos_id=[]).tokens == full  # no EOS id: never stops early
    assert greedy_decode(target, PROMPT, 30, eos_id=b).tokens == full[:full.index(b) + 1]


class Oracle:
    "Drafts the known continuation: a whole step can hold both EOS ids, and the cut is at the first."
    def __init__(self, cont, n0): self.cont, self.n0 = cont, n0
    def propose(self, context, max_tokens):
        from paper_repro.core.decoding import Draft
        done = len(context) - self.n0
        return Draft.chain(self.cont[done:done + max_tokens])
    def observe(self, *a): pass


@pytest.mark.parametrize("bad, err, match", [
    (2.5, TypeError, "eos_id must be an int, a sequence of ints or None, got 2.5"),
    (True, TypeError, "got True"),
    ([1, "2"], TypeError, r"got \[1, '2'\]"),
    ([3, 40], ValueError, r"eos_id 40 is outside the vocabulary \[0, 40\)"),
    (-1, ValueError, r"eos_id -1 is outside the vocabulary"),
])
def test_bad_eos_ids(bad, err, match, target):
    with pytest.raises(err, match=match) as e: greedy_decode(target, PROMPT, 4, eos_id=bad)
    one_line(e)
    assert check_eos(None) == frozenset() and check_eos([5, 5, 7]) == {5, 7}


# ---------------------------------------------------------------- dllm

def test_dllm_prompts_outside_the_vocabulary_or_fractional(dllm):
    with pytest.raises(ValueError) as e: diffusion_generate(dllm, [[3, 4], [5, VOCAB_SIZE + 3]])
    assert f"[{VOCAB_SIZE + 3}] are outside the vocabulary [0, {VOCAB_SIZE})" in one_line(e)
    with pytest.raises(TypeError) as e: diffusion_generate(dllm, [[3, 4.5]])
    assert "4.5 (float)" in one_line(e)
    with pytest.raises(TypeError) as e: diffusion_generate(dllm, torch.tensor([[3.0, 4.0]]))
    assert "float32 tensor" in one_line(e)
    with pytest.raises(ValueError) as e: diffusion_generate(dllm, torch.tensor([3, 4]))
    assert "prompts tensor must be [B, P]" in one_line(e)


def test_dllm_mask_and_eos_ids_must_be_in_the_vocabulary(dllm):
    small = DecodeConfig(gen_length=8, block_length=8, steps=8)
    for name in ("mask_id", "eos_id"):
        cfg = DecodeConfig(gen_length=8, block_length=8, steps=8, **{name: VOCAB_SIZE + 1})
        with pytest.raises(ValueError) as e: diffusion_generate(dllm, [[3, 4]], cfg)
        assert f"DecodeConfig.{name}={VOCAB_SIZE + 1} is outside the model's vocabulary [0, {VOCAB_SIZE})" in one_line(e)
    assert diffusion_generate(dllm, [[3, 4]], small).sequences.shape == (1, 8)


def test_dllm_generation_beyond_the_checkpoint_context(dllm):
    assert context_length(dllm) == 128
    cfg = DecodeConfig(gen_length=120, block_length=120, steps=120)
    with pytest.raises(ValueError) as e: diffusion_generate(dllm, [[3] * 5, [3] * 10], cfg)
    msg = one_line(e)
    assert "10 tokens + gen_length=120 = 130 positions exceeds the model's context length 128" in msg
    assert "at most 118 new tokens" in msg
    res = diffusion_generate(dllm, [[3] * 8], DecodeConfig(gen_length=120, block_length=120, steps=1))
    assert res.sequences.shape == (1, 120)  # 8 + 120 = 128: fits exactly
    # a model without a limit (the oracle) is not refused
    oracle = OracleLM(torch.full((1, 200), 7), [3])
    assert diffusion_generate(oracle, [[1, 2, 3]], DecodeConfig(gen_length=200, block_length=200, steps=1)).nfe == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(rule="threshold", threshold=1.5), r"threshold=1.5: rule='threshold' compares it with a confidence: it must be in \[0, 1\]"),
    (dict(rule="threshold", threshold=-0.1), "threshold=-0.1: must be a finite number >= 0"),
    (dict(steps=2.5), "steps=2.5: must be a positive integer"),
    (dict(block_length=True), "block_length=True: must be a positive integer"),
    (dict(gen_length=32.0, block_length=32, steps=32), "gen_length=32.0: must be a positive integer"),
    (dict(cache_refresh=True), "cache_refresh=True: must be an integer >= 0"),
    (dict(mask_id=True), "mask_id=True: must be an integer >= 0"),
    (dict(seed=1.5), "seed=1.5: must be an integer >= 0"),
])
def test_dllm_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match) as e: DecodeConfig(**kwargs)
    one_line(e)


def test_dllm_thresholds_that_are_valid_stay_valid():
    assert DecodeConfig(rule="threshold", threshold=1.0).threshold == 1.0
    assert DecodeConfig(rule="entropy_threshold", threshold=2.5).threshold == 2.5  # an entropy (nats) may exceed 1
    assert DecodeConfig(rule="topk", threshold=0.9).rule == "topk"


def test_check_dllm_request_pads_ragged_prompts(dllm):
    ids, valid = check_dllm_request(dllm, [[3, 4, 5], [6]], DecodeConfig(gen_length=8, block_length=8, steps=8))
    assert ids.tolist() == [[3, 4, 5], [EOS_ID, EOS_ID, 6]] and valid.tolist() == [[True] * 3, [False, False, True]]
    t_ids, t_valid = check_dllm_request(dllm, torch.tensor([[3, 4], [5, 6]]), DecodeConfig())
    assert t_ids.tolist() == [[3, 4], [5, 6]] and bool(t_valid.all())
    assert MASK_ID < VOCAB_SIZE and not math.isnan(DecodeConfig().threshold)
