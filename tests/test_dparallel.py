"Tests of paper_repro.dllm.dparallel: complementary masks, the certainty-forcing loss, the teacher data, the student."
import math
from dataclasses import fields, replace

import pytest
import torch

from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.dllm.core import DecodeConfig, OracleLM, denoise_logits, diffusion_generate
from paper_repro.dllm.dparallel import (DISTILL_SPEC, DistillMasks, bench_methods, certainty_forcing_loss, distill_student,
                                        eos_pad, sample_masks, teacher_data)
from paper_repro.dllm.tasks import EOS_ID, MASK_ID, VOCAB_SIZE, pad_prompts

torch.set_num_threads(1)

PROMPTS = [[20, 21, 22, 23], [24], [25, 26], [27, 28, 29]]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TransformerLM(LMConfig(VOCAB_SIZE, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)).double().eval()


@pytest.mark.parametrize("L,Lb", [(16, 4), (32, 8), (8, 8)])
def test_complementary_masks_partition_the_block(L, Lb):
    m = sample_masks(200, L, Lb, torch.Generator().manual_seed(L))
    pos = torch.arange(L)[None]
    in_block = (pos // Lb) == m.block[:, None]
    assert not (m.masked & m.complement).any()                      # disjoint
    assert torch.equal(m.masked | m.complement, in_block)           # together exactly the block
    assert torch.equal(m.hidden, pos >= (m.block[:, None] + 1) * Lb)  # everything after the block, nothing before
    assert set(m.block.tolist()) == set(range(L // Lb))             # every real block is drawn (and only those)
    frac = m.masked.sum() / in_block.sum()
    assert abs(frac.item() - 0.5) < 0.05                            # a fair coin inside the block


def test_each_row_gets_its_own_mask():
    m = sample_masks(64, 32, 8, torch.Generator().manual_seed(1))
    assert len(set(m.block.tolist())) > 1                           # blocks differ between rows
    assert len({tuple(r.tolist()) for r in m.masked}) > 32          # and so do the masks
    for i in range(64):                                             # each row's mask lies in its own block
        assert m.masked[i, m.block[i] * 8:(m.block[i] + 1) * 8].sum() == m.masked[i].sum()


def brute_force_loss(model, prompts, answers, masks, T=0.5, w=2.0):
    "Row by row, position by position: CE and entropy sums over the two passes, each row with its own masks."
    sums = {k: 0.0 for k in ("ce", "ce_rev", "h", "h_rev")}
    counts = dict(sums)
    for i, p in enumerate(prompts):
        for name, scored in (("", masks.masked[i]), ("_rev", masks.complement[i])):
            window = [MASK_ID if (scored[j] or masks.hidden[i, j]) else int(answers[i, j]) for j in range(answers.shape[1])]
            x = torch.tensor([list(p) + window])
            with torch.no_grad():
                logits = denoise_logits(model, x)[0, len(p):]
            for j in range(answers.shape[1]):
                if not scored[j]: continue
                lg, y = logits[j], int(answers[i, j])
                sums["ce" + name] += (torch.logsumexp(lg, 0) - lg[y]).item(); counts["ce" + name] += 1
                if int(lg.argmax()) == y:
                    q = torch.softmax(lg / T, 0)
                    sums["h" + name] += -sum(float(v) * math.log(float(v)) for v in q if v > 0); counts["h" + name] += 1
    parts = {k: sums[k] / max(counts[k], 1) for k in sums}
    return parts["ce"] + parts["ce_rev"] + w * (parts["h"] + parts["h_rev"]), parts


def test_loss_matches_brute_force(tiny):
    g = torch.Generator().manual_seed(3)
    answers = torch.randint(3, VOCAB_SIZE, (4, 8), generator=g)
    answers[1, 5:] = EOS_ID
    masks = sample_masks(4, 8, 4, g)
    ids, valid = pad_prompts(PROMPTS)  # different prompt lengths: left padding must not change any row
    with torch.no_grad():
        got = certainty_forcing_loss(tiny, ids, valid, answers, block_length=4, masks=masks)
    ref, parts = brute_force_loss(tiny, PROMPTS, answers, masks)
    assert got.total.item() == pytest.approx(ref, rel=1e-9)
    for k, v in zip(("ce", "ce_rev", "h", "h_rev"), got[1:]): assert v.item() == pytest.approx(parts[k], rel=1e-9, abs=1e-12)


def test_entropy_term_counts_only_right_predictions(tiny):
    "With labels the model never predicts, the entropy terms vanish; with its own argmax as labels they do not."
    ids, valid = pad_prompts(PROMPTS)
    masks = sample_masks(4, 8, 8, torch.Generator().manual_seed(0))
    noisy = torch.cat([ids, torch.full((4, 8), MASK_ID)], 1)
    with torch.no_grad():
        pred = denoise_logits(tiny, noisy, torch.cat([valid, torch.ones(4, 8, dtype=torch.bool)], 1))[:, 4:].argmax(-1)
        wrong = certainty_forcing_loss(tiny, ids, valid, (pred + 1) % VOCAB_SIZE, block_length=8,
                                       masks=DistillMasks(masks.block, masks.masked | masks.complement,
                                                          masks.masked & False, masks.hidden))
    assert wrong.entropy.item() == 0 and wrong.entropy_complement.item() == 0 and wrong.ce.item() > 0


def test_loss_is_invariant_to_row_order(tiny):
    "Rows carry their own masks: permuting rows (with their masks) leaves the batch loss unchanged."
    g = torch.Generator().manual_seed(5)
    answers = torch.randint(3, VOCAB_SIZE, (4, 16), generator=g)
    masks = sample_masks(4, 16, 4, g)
    ids, valid = pad_prompts(PROMPTS)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = certainty_forcing_loss(tiny, ids, valid, answers, block_length=4, masks=masks)
        b = certainty_forcing_loss(tiny, ids[perm], valid[perm], answers[perm], block_length=4,
                                   masks=DistillMasks(*(m[perm] for m in masks)))
    assert a.total.item() == pytest.approx(b.total.item(), rel=1e-12)


def test_eos_pad():
    x = torch.tensor([[5, 6, EOS_ID, 7, 8], [5, 6, 7, 8, 9], [EOS_ID, 5, EOS_ID, 6, 6]])
    assert eos_pad(x).tolist() == [[5, 6, EOS_ID, EOS_ID, EOS_ID], [5, 6, 7, 8, 9], [EOS_ID] * 5]


def test_teacher_data_reproduces_the_oracle():
    target = torch.randint(30, VOCAB_SIZE, (4, 16), generator=torch.Generator().manual_seed(2))
    target[0, 6] = EOS_ID   # junk after an EOS is padded away
    target[2, 10:] = EOS_ID
    oracle = OracleLM(target, [len(p) for p in PROMPTS])
    data = teacher_data(oracle, PROMPTS, DecodeConfig(gen_length=16, block_length=8, steps=16))
    assert torch.equal(data.answers, eos_pad(target)) and data.answers[0, 6:].eq(EOS_ID).all()
    ids, valid = pad_prompts(PROMPTS)
    assert torch.equal(data.prompts, ids) and torch.equal(data.prompt_valid, valid)


def test_teacher_data_is_the_teachers_greedy_output(tiny):
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=16)
    data = teacher_data(tiny, PROMPTS, cfg, batch_size=3)  # chunks of 3 and 1: batching must not matter
    ref = diffusion_generate(tiny, PROMPTS, cfg).sequences
    assert torch.equal(data.answers, eos_pad(ref))


def test_distill_student_trains_a_copy(tiny):
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=16)
    data = teacher_data(tiny, PROMPTS, cfg)
    before = [p.clone() for p in tiny.parameters()]
    spec = replace(DISTILL_SPEC, steps=3, batch_size=4, block_length=8, warmup=1)
    student = distill_student(tiny, data, spec, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.parameters()))        # the teacher is untouched
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # the student moved
    assert not student.training


def test_distill_student_is_deterministic_and_logs_the_loss_parts(tiny):
    data = teacher_data(tiny, PROMPTS, DecodeConfig(gen_length=16, block_length=8, steps=16))
    spec = replace(DISTILL_SPEC, steps=3, batch_size=4, block_length=8, warmup=1)
    logs = [[], []]
    a, b = (distill_student(tiny, data, spec, seed=4, progress=False, log=log) for log in logs)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())) and logs[0] == logs[1]
    assert [row[0] for row in logs[0]] == [0, 2] and all(len(row) == 6 for row in logs[0])  # every 25 steps and the last
    step, total, ce, ce_c, h, h_c = logs[0][0]
    assert total == pytest.approx(ce + ce_c + spec.entropy_weight * (h + h_c), abs=5e-4)  # the parts are rounded


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="block_length=5"): sample_masks(2, 16, 5)
    with pytest.raises(ValueError, match="p_mask=0"): sample_masks(2, 16, 4, p_mask=0)
    ids, valid = pad_prompts(PROMPTS)
    with pytest.raises(ValueError, match="temperature=0"):
        certainty_forcing_loss(tiny, ids, valid, torch.zeros(4, 8, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="batch size"):
        certainty_forcing_loss(tiny, ids, valid, torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="no prompts"): teacher_data(tiny, [])
    with pytest.raises(ValueError, match="batch_size=0"): teacher_data(tiny, PROMPTS, batch_size=0)


def test_bench_hook_offers_the_student_as_a_per_method_model(tiny):
    from paper_repro.core.bench import paper_entries
    from paper_repro.dllm.bench import DiffusionMethod
    import paper_repro.dllm.dparallel as dparallel
    entries = paper_entries("dllm", tiny, DiffusionMethod, modules=[dparallel])
    assert entries and all(e.paper == "dparallel" and e.paper_headline.value == 8.5 for e in entries)
    methods = [e.method for e in bench_methods(tiny)]
    assert all(m.model is not None and m.model is not tiny for m in methods)  # never the teacher
    assert all(m.config.rule == "entropy_threshold" and m.make_rule is None for m in methods)
    assert next(methods[0].model.parameters()).dtype == torch.float64  # on the benchmark model's device and dtype
