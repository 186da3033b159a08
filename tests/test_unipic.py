"""unipic: patch tokens, the shared backbone's three sequence layouts (causal understanding, bidirectional MAR slots),
the mask hiding what it covers, the decoupled vs single encoder, the MAR loss and sampler, batches and errors."""
import pytest
import torch

from paper_repro.core.lm import TransformerLM
from paper_repro.core.train import OptimConfig, fit
from paper_repro.generation.unipic import (TASKS, VARIANTS, DiffusionHead, UniPic, UniPicConfig, classify,
                                           digit_batches, edit_images, generate_images, mar_loss, mar_sample,
                                           multitask_loss, patchify, random_masks, reveal_schedule, task_loss,
                                           train_unipic, unpatchify)

TINY = dict(d_model=16, n_layers=2, n_heads=2, d_ff=32, head_width=16, head_depth=1)


def tiny(decoupled: bool = True, seed: int = 0) -> UniPic:
    torch.manual_seed(seed)
    return UniPic(UniPicConfig(decoupled=decoupled, **TINY)).eval()


def test_patchify_round_trip_and_layout():
    x = torch.rand(3, 1, 16, 16)
    t = patchify(x)
    assert t.shape == (3, 16, 16) and t.min() >= -1 and t.max() <= 1
    assert torch.equal(t[1, 6], x[1, 0, 4:8, 8:12].reshape(-1) * 2 - 1)   # patch (row 1, col 2)
    assert torch.allclose(unpatchify(t), x)
    with pytest.raises(ValueError, match="divisible by patch"):
        patchify(torch.rand(1, 1, 10, 10))


def test_backbone_is_the_core_transformer_and_encoders_decouple():
    d, s = tiny(True), tiny(False)
    assert isinstance(d.backbone, TransformerLM)
    assert d.understanding_encoder is d.und_encoder and d.und_encoder is not d.gen_encoder
    assert s.und_encoder is None and s.understanding_encoder is s.gen_encoder
    n_enc = sum(p.numel() for p in d.gen_encoder.parameters())
    assert sum(p.numel() for p in d.parameters()) - sum(p.numel() for p in s.parameters()) == n_enc


def test_understanding_is_causal_next_token_prediction():
    m = tiny()
    x = torch.rand(2, 1, 16, 16)
    ref = m.understand_logits(x)
    emb = torch.cat([m._task("understand", 2), m.und_encoder(patchify(x))], 1)
    assert torch.allclose(ref, m.backbone(embeds=emb)[:, -1, :10])   # default (causal) mask, last position


def test_mar_slots_hide_masked_values_and_attend_both_ways():
    m = tiny()
    x = patchify(torch.rand(2, 1, 16, 16))
    pre = m.prefix("generate", torch.tensor([1, 2]))
    known = torch.zeros(2, 16, dtype=torch.bool); known[:, 10:] = True
    z = m.mar_condition(pre, x, known)
    y = x.clone(); y[:, :10] = torch.randn(2, 10, 16)
    assert torch.equal(z, m.mar_condition(pre, y, known))                 # masked values never reach the backbone
    y = x.clone(); y[:, 15] += 1.0                                          # a *later* known patch ...
    assert not torch.allclose(z[:, 0], m.mar_condition(pre, y, known)[:, 0])   # ... moves slot 0: bidirectional
    # the prefix matters: another class, another condition
    assert not torch.allclose(z, m.mar_condition(m.prefix("generate", torch.tensor([5, 6])), x, known))


def test_prefix_shapes_and_errors():
    m = tiny()
    assert m.prefix("generate", torch.tensor([0, 9])).shape == (2, 2, 16)
    assert m.prefix("edit", torch.rand(2, 1, 16, 16)).shape == (2, 17, 16)
    with pytest.raises(ValueError, match="task='understand' has no slots"):
        m.prefix("understand", torch.tensor([0]))
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 16, 16\]"):
        m.understand_logits(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="task='caption'; valid: understand, generate, edit"):
        task_loss(m, "caption", {})
    with pytest.raises(ValueError, match="variant='both'"):
        train_unipic("both", UniPicConfig(**TINY), 1)


def test_random_masks_counts():
    masks = random_masks(500, 16, torch.Generator().manual_seed(0))
    n = masks.sum(1)
    assert n.min() >= 1 and n.max() == 16 and masks.shape == (500, 16)
    assert abs(n.float().mean().item() - 8.5) < 0.6       # uniform on 1..16


def test_reveal_schedule_uncovers_every_slot_once():
    for s in range(1, 17):
        r = reveal_schedule(16, s)
        assert len(r) == s and sum(r) == 16 and min(r) >= 1
    assert reveal_schedule(16, 4) == [2, 3, 5, 6]          # cosine: few first, many last
    with pytest.raises(ValueError, match="steps must be an int in"):
        reveal_schedule(16, 17)


def test_mar_sample_is_deterministic_in_its_generator_and_in_range():
    m = tiny()
    pre = m.prefix("generate", torch.tensor([3, 4, 5]))
    a = mar_sample(m, pre, steps=3, ddim_steps=4, gen=torch.Generator().manual_seed(0))
    b = mar_sample(m, pre, steps=3, ddim_steps=4, gen=torch.Generator().manual_seed(0))
    c = mar_sample(m, pre, steps=3, ddim_steps=4, gen=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 16, 16) and a.abs().max() <= 1.0 + 1e-5
    assert generate_images(m, torch.tensor([0]), steps=2, ddim_steps=2).shape == (1, 1, 16, 16)
    assert edit_images(m, torch.rand(2, 1, 16, 16), steps=2, ddim_steps=2).shape == (2, 1, 16, 16)


def test_batches_pair_each_source_with_the_next_class():
    x = torch.rand(40, 1, 16, 16)
    y = torch.arange(40) % 10
    x[:, 0, 0, 0] = y.float() / 10                      # mark each image with its class
    draw = digit_batches(x, y, TASKS, 8, torch.Generator().manual_seed(0))
    b = draw(0)
    assert set(b) == set(TASKS)
    src, tgt = b["edit"]["source"][:, 0, 0, 0], b["edit"]["target"][:, 0, 0, 0]
    assert torch.allclose(((src * 10).round() + 1) % 10, (tgt * 10).round())
    assert set(digit_batches(x, y, ("generate",), 4)(0)) == {"generate"}
    with pytest.raises(ValueError, match="valid: understand"):
        digit_batches(x, y, ("draw",), 4)


def test_losses_train_through_core_fit():
    torch.manual_seed(0)
    m = UniPic(UniPicConfig(**TINY))
    x = torch.rand(16, 1, 16, 16); y = torch.arange(16) % 10
    batch = digit_batches(x, y, TASKS, 8, torch.Generator().manual_seed(0))(0)
    out = multitask_loss(m, batch)
    assert set(out) == {"loss", *TASKS} and torch.isclose(out["loss"], sum(out[t] for t in TASKS))
    torch.manual_seed(1); before = task_loss(m, "understand", batch["understand"]).item()
    hist = fit(m, multitask_loss, lambda i: batch, 20, OptimConfig(lr=3e-3), progress=False)
    assert len(hist.loss) == 20 and set(hist.parts) == set(TASKS)
    assert task_loss(m.eval(), "understand", batch["understand"]).item() < before
    assert classify(m, x).shape == (16,)
    with pytest.raises(ValueError, match="batch tasks"):
        multitask_loss(m, {})


def test_head_rejects_mismatched_inputs():
    h = DiffusionHead(16, 8, 16, 1)
    with pytest.raises(ValueError, match="must agree"):
        h(torch.randn(4, 16), torch.zeros(3, dtype=torch.long), torch.randn(4, 8))
    assert set(VARIANTS) == {"joint_decoupled", "joint_single_encoder", "understand_only", "generate_only", "edit_only"}
