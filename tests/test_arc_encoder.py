"""paper_repro.lm.arc_encoder: pooling, the pooled-query encoder against a naive float64 reference, splicing, the
loss, cached batched decoding against a naive loop, the split discipline, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from paper_repro.core.lm import LMConfig, TransformerLM, apply_rope, rope_cos_sin
from paper_repro.core.zoo import load_tokenizer
from paper_repro.lm.arc_encoder import (CONT, REC, ARCEncoder, CompressedContextLM, RecordItem, answer, answer_loss,
                                        compressed_loss, decoder_docs, doc_batch, exact_match, group_sizes,
                                        is_reconstruction, item_ids, make_items, open_book_doc, pad_rows,
                                        pooling_matrix, pretrain_batch, splice, split_of, task_batch)

CFG = LMConfig(64, d_model=32, n_layers=3, n_heads=4, d_ff=48, max_seq_len=128)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def tiny_decoder(dtype=torch.float64, vocab=64):
    torch.manual_seed(0)
    cfg = LMConfig(**{**CFG.to_dict(), "vocab_size": vocab})
    return TransformerLM(cfg).to(dtype).eval()


def test_group_sizes_cover_the_context_in_ceil_groups():
    for L in range(1, 60):
        for pf in (1, 2, 3, 4, 8, 16):
            s = group_sizes(L, pf)
            assert sum(s) == L and len(s) == math.ceil(L / pf) and max(s) - min(s) <= 1 and max(s) <= pf


def test_pooling_matrix_mean_pools_each_row():
    lengths = torch.tensor([7, 3, 5])
    P, n_mem = pooling_matrix(lengths, 2, 8)
    assert n_mem.tolist() == [4, 2, 3] and P.shape == (3, 4, 8)
    h = torch.randn(3, 8, 5, dtype=torch.float64)
    pooled = P.double() @ h
    for b, L in enumerate(lengths.tolist()):
        start = 0
        for g, size in enumerate(group_sizes(L, 2)):
            torch.testing.assert_close(pooled[b, g], h[b, start:start + size].mean(0))
            start += size
        assert (P[b, n_mem[b]:] == 0).all() and (P[b, :, L:] == 0).all()


def naive_encode(enc: ARCEncoder, tokens: list[int]) -> torch.Tensor:
    "One unpadded context, pooled attention written out with an explicit softmax (float64)."
    bb = enc.backbone
    x = torch.tensor([tokens])
    L = len(tokens)
    h = bb.hidden_states(x, attn_mask=torch.ones(1, L, L, dtype=torch.bool), upto_layer=bb.cfg.n_layers - 1)[0]
    sizes = group_sizes(L, enc.pooling_factor)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    pooled = torch.stack([h[a:b].mean(0) for a, b in zip(bounds, bounds[1:])])
    blk, at = bb.layers[-1], bb.layers[-1].self_attn
    hd, nh, M = at.head_dim, at.n_heads, len(sizes)
    q = at.q_proj(blk.input_layernorm(pooled)).view(M, nh, hd).transpose(0, 1)[None]
    kin = blk.input_layernorm(h)
    k = at.k_proj(kin).view(L, nh, hd).transpose(0, 1)[None]
    v = at.v_proj(kin).view(L, nh, hd).transpose(0, 1)[None]
    q = apply_rope(q, *rope_cos_sin(torch.arange(M)[None], hd, bb.cfg.rope_theta, q.dtype))
    k = apply_rope(k, *rope_cos_sin(torch.arange(L)[None], hd, bb.cfg.rope_theta, k.dtype))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    y = at.o_proj((w @ v)[0].transpose(0, 1).reshape(M, -1))
    out = pooled + y
    out = out + blk.mlp(blk.post_attention_layernorm(out))
    return enc.projector(bb.norm(out))


@pytest.mark.parametrize("pf", [1, 2, 4])
def test_encoder_matches_naive_reference_and_ignores_padding(pf):
    dec = tiny_decoder()
    enc = ARCEncoder.from_decoder(dec, drop_layers=1, pooling_factor=pf).double()
    g = torch.Generator().manual_seed(pf)
    rows = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (9, 4, 7)]
    ctx, lengths = pad_rows(rows)
    with torch.no_grad():
        mem, n_mem = enc(ctx, lengths)
        for b, r in enumerate(rows):
            ref = naive_encode(enc, r)
            assert n_mem[b] == len(ref)
            torch.testing.assert_close(mem[b, :len(ref)], ref)


def test_encoder_is_bidirectional():
    dec = tiny_decoder()
    enc = ARCEncoder.from_decoder(dec, pooling_factor=1).double()
    a = torch.tensor([[1, 2, 3, 4, 5]])
    b = torch.tensor([[1, 2, 3, 4, 9]])  # only the last token differs
    with torch.no_grad():
        ma, _ = enc(a, torch.tensor([5]))
        mb, _ = enc(b, torch.tensor([5]))
    assert not torch.allclose(ma[0, 0], mb[0, 0])  # the first vector sees the future: no causal mask


def test_from_decoder_copies_the_lower_layers():
    dec = tiny_decoder(torch.float32)
    enc = ARCEncoder.from_decoder(dec, drop_layers=1)
    assert enc.backbone.cfg.n_layers == dec.cfg.n_layers - 1
    sd, ed = dec.state_dict(), enc.backbone.state_dict()
    for k, v in ed.items(): torch.testing.assert_close(v, sd[k])
    with pytest.raises(ValueError, match="drop_layers"): ARCEncoder.from_decoder(dec, drop_layers=3)


def test_splice_layout():
    mem = torch.randn(2, 3, 4)
    text = torch.randn(2, 2, 4)
    special = torch.randn(4)
    x, start = splice(mem, torch.tensor([2, 3]), special, text)
    assert x.shape == (2, 6, 4) and start.tolist() == [3, 4]
    torch.testing.assert_close(x[0, :2], mem[0, :2]); torch.testing.assert_close(x[0, 2], special)
    torch.testing.assert_close(x[0, 3:5], text[0]); torch.testing.assert_close(x[1, :3], mem[1])
    torch.testing.assert_close(x[1, 3], special); torch.testing.assert_close(x[1, 4:6], text[1])


def test_compressed_loss_matches_per_row_reference(tok):
    dec = tiny_decoder(vocab=1024)
    enc = ARCEncoder.from_decoder(dec, pooling_factor=4).double()
    items = make_items("train", 3)
    batch = task_batch(tok, items)
    with torch.no_grad():
        loss = compressed_loss(enc, dec, batch)
        total, count = 0.0, 0
        for it in items:
            c, q, a = item_ids(tok, it)
            mem, n = enc(torch.tensor([c]), torch.tensor([len(c)]))
            x = torch.cat([mem[0, :n[0]], enc.special[CONT][None], dec.embed_tokens(torch.tensor(q + a))])[None]
            logits = dec(embeds=x)[0]
            first = int(n[0]) + len(q)  # position predicting the first answer token
            total += F.cross_entropy(logits[first:first + len(a)], torch.tensor(a), reduction="sum").item()
            count += len(a)
    assert loss.item() == pytest.approx(total / count, rel=1e-9)


def test_gradients_reach_the_encoder_not_the_frozen_decoder(tok):
    from paper_repro.core.train import frozen
    dec = tiny_decoder(torch.float32, vocab=1024)
    enc = ARCEncoder.from_decoder(dec, pooling_factor=2)
    with frozen(dec):
        compressed_loss(enc, dec, task_batch(tok, make_items("train", 2))).backward()
    assert all(p.grad is None for p in dec.parameters())
    assert enc.special.grad is not None and enc.special.grad[CONT].abs().sum() > 0 and enc.special.grad[REC].abs().sum() == 0
    assert enc.backbone.embed_tokens.weight.grad is not None


def naive_arc_decode(dec, enc, tok, item, n):
    "One item, no cache: the whole input is rebuilt and rerun for every new token."
    c, q, _ = item_ids(tok, item)
    mem, m = enc(torch.tensor([c]), torch.tensor([len(c)]))
    x = torch.cat([mem[0, :m[0]], enc.special[CONT][None], dec.embed_tokens(torch.tensor(q))])
    out = []
    for _ in range(n):
        t = int(dec(embeds=x[None])[0, -1].argmax())
        out.append(t)
        if t == tok.eos_id: break
        x = torch.cat([x, dec.embed_tokens(torch.tensor([t]))])
    return tok.decode([t for t in out if t != tok.eos_id])


def test_batched_cached_decoding_equals_naive_loop(tok):
    dec = tiny_decoder(vocab=1024)
    enc = ARCEncoder.from_decoder(dec, pooling_factor=3).double()
    items = make_items("dev", 5, n_records=3) + make_items("dev", 2, n_records=5)  # different context lengths
    with torch.no_grad():
        got = answer("arc", dec, tok, items, encoder=enc, max_new_tokens=5, batch_size=4)
        ref = [naive_arc_decode(dec, enc, tok, it, 5) for it in items]
    assert got == ref


def test_open_and_closed_book_prompts(tok):
    dec = tiny_decoder(vocab=1024)
    items = make_items("dev", 3)
    with torch.no_grad():
        ob = answer("open-book", dec, tok, items, max_new_tokens=3)
        cb = answer("closed-book", dec, tok, items, max_new_tokens=3)
    assert len(ob) == len(cb) == 3
    assert exact_match(["x", items[1].value + " "], items[:2]) == [0.0, 1.0]


def test_compressed_context_lm_refuses_a_mismatched_prefill():
    dec = tiny_decoder()
    lm = CompressedContextLM(dec, torch.randn(2, 3, 32, dtype=torch.float64), torch.tensor([3, 2]),
                             torch.zeros(32, dtype=torch.float64))
    assert lm.prompts([[5], [6, 7]]) == [[0] * 4 + [5], [0] * 3 + [6, 7]]
    with pytest.raises(ValueError, match="contexts are bound"): lm(torch.zeros(3, 4, dtype=torch.long))


def test_splits_are_disjoint_and_deterministic():
    n = {"train": 600, "dev": 300, "test": 300}
    sets = {s: {it.records for it in make_items(s, k)} for s, k in n.items()}
    assert all(len(v) == n[s] for s, v in sets.items())
    assert not (sets["train"] & sets["dev"]) and not (sets["train"] & sets["test"]) and not (sets["dev"] & sets["test"])
    assert all(split_of(r) == s for s, v in sets.items() for r in v)
    assert make_items("test", 5) == make_items("test", 5) and make_items("test", 5, seed=1) != make_items("test", 5)


def test_open_book_doc_masks_exactly_the_answers(tok):
    import random
    it = make_items("train", 1, n_records=3)[0]
    ids, mask = open_book_doc(tok, it, random.Random(0))
    c, _, _ = item_ids(tok, it)
    assert ids[:len(c)] == c and len(ids) == len(mask) and not any(mask[:len(c)])
    text = tok.decode(ids[len(c):])
    asked = [q.split("?")[0] for q in text.split("<eos>") if q]
    assert sorted(asked) == sorted(k for k, _ in it.records)  # every key asked once
    answers = [a for a in tok.decode([t for t, m in zip(ids, mask) if m]).split("<eos>") if a]
    assert answers == [dict(it.records)[k] for k in asked]  # the masked tokens are the values, then <eos>, in order
    docs = decoder_docs(tok, 5, records=(1, 4))
    assert len(docs) == 10 and all(len(d) == len(m) for d, m in docs)


def test_answer_loss_scores_only_the_masked_tokens(tok):
    dec = tiny_decoder(torch.float64, vocab=1024)
    docs = decoder_docs(tok, 2, records=(2, 3))
    ids, mask = doc_batch(docs, tok.eos_id, other_weight=0.0)
    assert ids.shape == mask.shape and (ids[mask.bool() == 0] >= 0).all()
    logits = dec(ids[:, :-1])
    ref = [F.cross_entropy(logits[b, t - 1], ids[b, t]) for b in range(len(docs)) for t in range(1, ids.shape[1])
           if mask[b, t]]
    torch.testing.assert_close(answer_loss(dec, (ids, mask)), torch.stack(ref).mean())
    last_unscored = mask[:, -1] == 0  # the last column is only ever a target: where unscored, it must not count
    assert last_unscored.any()
    other = ids.clone(); other[last_unscored, -1] = 7
    torch.testing.assert_close(answer_loss(dec, (other, mask)), answer_loss(dec, (ids, mask)))
    flip = ids.clone(); flip[mask.bool()] = (ids[mask.bool()] + 1) % 1024
    assert not torch.isclose(answer_loss(dec, (flip, mask)), answer_loss(dec, (ids, mask)))  # targets matter
    ids_w, w = doc_batch(docs, tok.eos_id, other_weight=0.25)
    assert torch.equal(ids_w, ids) and (w[mask.bool()] == 1).all()
    real = torch.tensor([[t < len(d) for t in range(ids.shape[1])] for d, _ in docs])
    assert (w[real & ~mask.bool()] == 0.25).all() and (w[~real] == 0).all()
    ce = F.cross_entropy(logits.reshape(-1, 1024), ids[:, 1:].reshape(-1), reduction="none").view(len(docs), -1)
    torch.testing.assert_close(answer_loss(dec, (ids, w)), (ce * w[:, 1:]).sum() / w[:, 1:].sum())
    with pytest.raises(ValueError, match="other_weight"): doc_batch(docs, tok.eos_id, other_weight=2.0)


def test_reconstruction_schedule_share():
    for ratio in (0.0, 0.2, 0.5, 1.0):
        flags = [is_reconstruction(i, ratio) for i in range(100)]
        assert sum(flags) == round(100 * ratio)
    assert [is_reconstruction(i, 0.2) for i in range(5)] == [False, False, False, False, True]


def test_pretrain_batches():
    stream = torch.arange(1000)
    g = torch.Generator().manual_seed(0)
    rec = pretrain_batch(stream, 4, 10, 5, True, g)
    assert rec.special == REC and torch.equal(rec.text, rec.context)
    cont = pretrain_batch(stream, 4, 10, 5, False, g)
    assert cont.special == CONT and cont.text.shape == (4, 5) and torch.equal(cont.text[:, 0], cont.context[:, -1] + 1)


def test_bad_input_is_refused(tok):
    dec = tiny_decoder()
    enc = ARCEncoder.from_decoder(dec)
    with pytest.raises(ValueError, match="split"): make_items("val", 3)
    with pytest.raises(ValueError, match="pooling_factor"): group_sizes(5, 0)
    with pytest.raises(ValueError, match="reconstruction ratio"): is_reconstruction(0, 1.5)
    with pytest.raises(ValueError, match="method"): answer("rag", dec, tok, [])
    with pytest.raises(ValueError, match="encoder exactly"): answer("arc", dec, tok, [])
    with pytest.raises(ValueError, match="lengths"): enc(torch.zeros(2, 3, dtype=torch.long), torch.tensor([4, 1]))


def test_bench_methods_train_score_and_decode(tok):
    from paper_repro.core.train import OptimConfig
    from paper_repro.lm.arc_encoder import BENCH_PF, bench_methods
    from paper_repro.lm.bench import LMBenchContext, check_decoder, core_kv_bytes_per_token, train_method
    g = torch.Generator().manual_seed(0)
    ctx = LMBenchContext("ci", torch.device("cpu"), 0, tok, torch.randint(0, 1024, (4000,), generator=g),
                         torch.randint(0, 1024, (3, 17), generator=g), 16, 4, 3, 32, 2, 4, 48, OptimConfig(lr=1e-3), 1)
    (entry,) = bench_methods(ctx)
    assert entry.paper_headline.category == "kv_reduction" and entry.method.uses_base
    base_before = {k: v.clone() for k, v in ctx.base().state_dict().items()}
    model, _, tokens = train_method(entry.method, ctx)
    assert tokens == 3 * 4 * 16
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in base_before.items())  # the decoder stays frozen
    assert torch.isfinite(entry.method.loss(model, ctx.val))
    check_decoder(entry.name, entry.method, model, ctx.val[:2, :12], 5)
    assert entry.method.kv_bytes_per_token(model) == core_kv_bytes_per_token(model.decoder) // BENCH_PF
