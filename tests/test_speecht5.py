"SpeechT5: data pipeline, cross-modal VQ, pre-/post-nets on the shared core transformers, incremental TTS, ablation wiring."
import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from paper_repro.core.data import data_path
from paper_repro.core.lm import count_parameters
from paper_repro.speech.features import length_mask
from paper_repro.speech.speecht5 import (BOS, EOS, MASK, SPEAKERS, FinetuneConfig, GumbelVQ, KMeansUnits,
                                         PretrainConfig, SpeechData, SpeechT5, SpeechT5Config,
                                         decoder_sequence, dtw_l1, finetune_asr, finetune_tts, generate_frames,
                                         group_frames, pad_units, pretrain, span_mask,
                                         speaker_index, speech_decoder_loss, strip_specials, swap_with_codes,
                                         speecht5_vocab, synthesize_mels, text_infill, text_pool,
                                         transcribe_dataset, unit_features)

VOCAB = speecht5_vocab()
TINY = dict(d_model=16, n_heads=2, enc_layers=2, dec_layers=2, d_ff=32, r=2, n_units=6, vq_groups=2, vq_vars=4,
            prenet_hidden=16, postnet_channels=8, postnet_layers=3, n_mels=12)


def _model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    m = SpeechT5(SpeechT5Config(vocab_size=len(VOCAB), **{**TINY, **kw})).to(dtype).eval()
    with torch.no_grad():   # larger random weights, so a wrong mask or cache shows up far above rounding error
        for p in m.parameters(): p.normal_(0, 0.3)
    m.speech_dec_prenet.dropout = 0.0   # deterministic decoder pre-net for exactness checks
    return m


def _data(n=6, n_mels=12, seed=1, units=True):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(9, 40, (n,), generator=g)
    mels = [torch.randn(int(L), n_mels, generator=g, dtype=torch.float64) for L in lens]
    texts = text_pool(n, seed)
    spk = torch.randint(0, len(SPEAKERS), (n,), generator=g)
    u = [torch.randint(0, 6, (int(L) // 4,), generator=g) for L in lens] if units else None
    return SpeechData(mels, texts, spk, u)


# ---------------------------------------------------------------- data
def test_vocab_and_sequences():
    assert VOCAB.blank == 0 and VOCAB.tokens[-3:] == [BOS, EOS, MASK]
    seq = decoder_sequence(VOCAB, "red apple")
    assert seq[0] == VOCAB.index[BOS] and seq[-1] == VOCAB.index[EOS]
    assert strip_specials(VOCAB, seq) == "red apple"
    assert strip_specials(VOCAB, seq[1:] + VOCAB.encode("tree")) == "red apple"          # stops at the first </s>
    with pytest.raises(ValueError, match="valid"): speaker_index("en-us", "m7")
    assert speaker_index(*SPEAKERS[5]) == 5


@pytest.mark.parametrize("seed", range(20))
def test_text_infill_masks_spans(seed):
    rng = np.random.default_rng(seed)
    ids = VOCAB.encode(text_pool(1, seed, 2, 3)[0])
    mask = VOCAB.index[MASK]
    out = text_infill(ids, mask, rng, ratio=0.3)
    assert mask in out and mask not in ids
    assert not any(a == b == mask for a, b in zip(out, out[1:]))          # a span is one mask, never two in a row
    kept = [t for t in out if t != mask]
    it = iter(ids); assert all(t in it for t in kept)                     # unmasked tokens keep their order
    assert len(ids) - len(kept) == int(round(0.3 * len(ids)))             # exactly the budget is masked


def test_text_infill_edge_cases():
    rng = np.random.default_rng(0)
    assert text_infill([5, 6, 7], 99, rng, ratio=0.0) == [5, 6, 7]
    with pytest.raises(ValueError, match="ratio"): text_infill([5], 99, rng, ratio=1.0)


def test_span_mask():
    lens = torch.tensor([40, 9, 3, 1])
    for s in range(10):
        m = span_mask(lens, 40, prob=0.1, span=5, generator=torch.Generator().manual_seed(s))
        assert not (m & ~length_mask(lens, 40)).any() and m.any(1).all()
    full = span_mask(torch.tensor([30]), 30, prob=1.0, span=5)
    assert full.all()
    with pytest.raises(ValueError): span_mask(lens, 40, prob=1.5)


def test_kmeans_units_find_clusters_and_are_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0., 0., 0.], [6., 0., 0.], [0., 6., 0.], [0., 0., 6.]])
    x = torch.cat([c + 0.2 * torch.randn(40, 3, generator=g) for c in centres])
    km = KMeansUnits.fit(x, 4, generator=torch.Generator().manual_seed(1))
    ids = km(x).view(4, 40)
    assert all(len(set(r.tolist())) == 1 for r in ids) and len(set(ids[:, 0].tolist())) == 4
    km2 = KMeansUnits.fit(x, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(km.centroids, km2.centroids)
    with pytest.raises(ValueError, match="k"): KMeansUnits.fit(x[:3], 4)
    assert unit_features(torch.randn(23, 20)).shape == (5, 13 * 4)


def test_pad_units_aligns_to_encoder_states():
    out = pad_units([torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7])], torch.tensor([2, 4]), 5)
    assert out.tolist() == [[1, 2, -100, -100, -100], [4, 5, 6, 7, -100]]


# ---------------------------------------------------------------- cross-modal VQ
def test_gumbel_vq_eval_is_nearest_codeword_per_group_and_diversity_matches_brute_force():
    torch.manual_seed(0)
    vq = GumbelVQ(8, groups=2, n_vars=5).double().eval()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    valid = length_mask(torch.tensor([7, 4, 1]), 7)
    codes, ids, div, ppl = vq(x, valid)
    logits = vq.proj(x).view(3, 7, 2, 5)
    for b, t in itertools.product(range(3), range(7)):
        for g in range(2):
            k = int(logits[b, t, g].argmax())
            assert ids[b, t, g] == k
            torch.testing.assert_close(codes[b, t, 4 * g:4 * (g + 1)], vq.codebook[g, k])
    probs = torch.softmax(logits[valid], -1).mean(0)                     # brute force over the valid states only
    ref = sum(float(torch.exp(-(p * torch.log(p)).sum())) for p in probs.detach())
    assert ppl.item() == pytest.approx(ref, rel=1e-6) and div.item() == pytest.approx((10 - ref) / 10, rel=1e-6)


def test_gumbel_vq_training_is_straight_through():
    torch.manual_seed(0)
    vq = GumbelVQ(8, groups=2, n_vars=4).train()
    x = torch.randn(2, 5, 8, requires_grad=True)
    codes, _, div, _ = vq(x)
    rows = codes.view(2, 5, 2, 4)
    for g in range(2):   # the forward value is exactly one codeword per group (hard one-hot)
        d = (rows[:, :, g, None, :] - vq.codebook[g][None, None]).abs().sum(-1)
        assert (d.min(-1).values < 1e-6).all()
    (codes.sum() + div).backward()
    assert x.grad.abs().sum() > 0 and vq.proj.weight.grad.abs().sum() > 0 and vq.codebook.grad.abs().sum() > 0


def test_swap_with_codes():
    states, codes = torch.randn(3, 10, 4), torch.randn(3, 10, 4)
    lens = torch.tensor([10, 6, 2])
    for s in range(5):
        mixed, swap = swap_with_codes(states, codes, lens, 0.3, torch.Generator().manual_seed(s))
        assert swap.sum(1).tolist() == [3, 2, 1]                          # round(0.3 * length) per row
        assert not (swap & ~length_mask(lens, 10)).any()
        assert torch.equal(mixed[swap], codes[swap]) and torch.equal(mixed[~swap], states[~swap])
    mixed, swap = swap_with_codes(states, codes, lens, 0.0)
    assert not swap.any() and torch.equal(mixed, states)
    with pytest.raises(ValueError, match="prob"): swap_with_codes(states, codes, lens, 1.5)


# ---------------------------------------------------------------- model
def test_text_nets_share_one_matrix_and_config_checks():
    m = _model()
    w = m.encoder.embed_tokens.weight
    assert m.decoder.embed_tokens.weight is w and m.decoder.lm_head.weight is w and m.encoder.lm_head.weight is not w
    assert count_parameters(m) < sum(p.numel() for _, p in m.named_parameters(remove_duplicate=False))
    with pytest.raises(ValueError, match="d_model"): SpeechT5Config(vocab_size=10, d_model=0)


def test_encoders_ignore_padding():
    "A clip (or a text) encoded inside a padded batch gives the same states as encoded alone (float64)."
    m, d = _model(), _data()
    mel, flen, _ = d.batch(range(len(d)))
    h, hlen = m.encode_speech(mel, flen)
    for b in range(len(d)):
        alone, alen = m.encode_speech(d.mels[b][None], flen[b:b + 1])
        assert alen[0] == hlen[b]
        torch.testing.assert_close(h[b, :hlen[b]], alone[0], rtol=1e-9, atol=1e-10)
    seqs = [VOCAB.encode(t) for t in d.texts]
    ht, tlen = m.encode_text(seqs)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(ht[b, :len(s)], m.encode_text([s])[0][0], rtol=1e-9, atol=1e-10)
    assert h[0, :hlen[0]].abs().max() > 0.1


def test_mask_embedding_replaces_masked_frames_only():
    m, d = _model(), _data(2)
    mel, flen, _ = d.batch([0, 1])
    S = int(m.subsample.out_lengths(flen).max())
    none = torch.zeros(2, S, dtype=torch.bool)
    h0, _ = m.encode_speech(mel, flen, none)
    torch.testing.assert_close(h0, m.encode_speech(mel, flen)[0])
    one = none.clone(); one[0, 1] = True
    h1, _ = m.encode_speech(mel, flen, one)
    assert (h1[0] - h0[0]).abs().max() > 1e-3 and torch.equal(h1[1], h0[1])


def test_generated_frames_equal_teacher_forcing_on_them():
    "The KV-cached, step-by-step TTS decoder gives exactly what the full teacher-forced pass gives on its own output."
    m, d = _model(), _data(4)
    seqs = [VOCAB.encode(t) for t in d.texts[:4]]
    frames, lens = generate_frames(m, seqs, d.speakers[:4], max_steps=7, threshold=2.0)   # never stops
    assert frames.shape == (4, 14, 12) and lens.tolist() == [14] * 4
    h, hlen = m.encode_text(seqs)
    before, after, stop = m.speech_decode(m.decoder.encode_memory(h, hlen), frames, d.speakers[:4])
    torch.testing.assert_close(before, frames, rtol=1e-9, atol=1e-10)
    mel, L = synthesize_mels(m, seqs, d.speakers[:4], max_steps=7, threshold=2.0)
    torch.testing.assert_close(mel, after, rtol=1e-9, atol=1e-10)
    for b in range(4):   # and a row generated alone equals the same row in the batch
        alone, _ = generate_frames(m, seqs[b:b + 1], d.speakers[b:b + 1], max_steps=7, threshold=2.0)
        torch.testing.assert_close(alone[0], frames[b], rtol=1e-9, atol=1e-10)


def test_generation_stops_at_the_first_stop_flag():
    m, d = _model(), _data(3)
    seqs = [VOCAB.encode(t) for t in d.texts[:3]]
    with torch.no_grad(): m.speech_postnet.stop.bias.fill_(50.0)       # stop flag certain at every frame
    frames, lens = generate_frames(m, seqs, d.speakers[:3], max_steps=9)
    assert frames.shape[1] == 2 and lens.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="max_steps"): generate_frames(m, seqs, d.speakers[:3], max_steps=0)


def test_speech_decoder_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    B, Fr, D = 3, 9, 4
    mel, before, after = (torch.randn(B, Fr, D, generator=g, dtype=torch.float64) for _ in range(3))
    stop = torch.randn(B, Fr + 1, generator=g, dtype=torch.float64)      # predictions may run past the target
    lens = torch.tensor([9, 5, 1])
    out = speech_decoder_loss(torch.cat([before, before[:, :1]], 1), after, stop, mel, lens, stop_weight=3.0)
    l1 = n = bce = 0.0
    for b in range(B):
        for t in range(Fr):
            if t < lens[b]:   # L1 on valid frames only
                l1 += float((before[b, t] - mel[b, t]).abs().sum() + (after[b, t] - mel[b, t]).abs().sum()); n += 1
            y = 1.0 if t >= lens[b] - 1 else 0.0                          # stop from the last frame on, padding too
            p = torch.sigmoid(stop[b, t])
            bce += -float(3.0 * y * torch.log(p) + (1 - y) * torch.log(1 - p))
    assert out["l1"].item() == pytest.approx(l1 / (n * D)) and out["bce"].item() == pytest.approx(bce / (B * Fr))


def test_group_frames():
    x = torch.arange(2 * 5 * 3, dtype=torch.float64).view(2, 5, 3)
    g = group_frames(x, 2)
    assert g.shape == (2, 3, 6) and torch.equal(g[0, 0], torch.cat([x[0, 0], x[0, 1]])) and (g[:, 2, 3:] == 0).all()


def test_greedy_transcription_matches_a_no_cache_loop():
    m, d = _model(seed=2), _data(3)
    got = transcribe_dataset(m, d, VOCAB, beam=1, ctc_weight=0.0, max_new_tokens=6)
    for b in range(3):
        h, hlen = m.encode_speech(d.mels[b][None], torch.tensor([len(d.mels[b])]))
        mem = m.decoder.encode_memory(h, hlen)
        seq = [VOCAB.index[BOS]]
        for _ in range(6):
            nxt = int(m.decoder(torch.tensor([seq]), memory=mem)[0, -1].argmax())
            if nxt == VOCAB.index[EOS]: break
            seq.append(nxt)
        assert got[b] == strip_specials(VOCAB, seq[1:])
    beam = transcribe_dataset(m, d, VOCAB, beam=3, ctc_weight=0.3, max_new_tokens=6)
    assert len(beam) == 3 and all(isinstance(t, str) for t in beam)


# ---------------------------------------------------------------- metrics and schedule
def _brute_dtw(cost):
    "Cheapest monotone path (unit steps right/down/diagonal) from corner to corner: (total, number of cells)."
    N, M = cost.shape
    paths = []
    def walk(i, j, total, steps):
        total, steps = total + cost[i, j], steps + 1
        if (i, j) == (N - 1, M - 1): paths.append((total, steps)); return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < N and j + dj < M: walk(i + di, j + dj, total, steps)
    walk(0, 0, 0.0, 0)
    return min(paths)


@pytest.mark.parametrize("seed", range(6))
def test_dtw_l1_is_the_mean_cost_along_the_cheapest_path(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    cost = (torch.cdist(a.double()[None], b.double()[None], p=1)[0] / 3).numpy()
    total, steps = _brute_dtw(cost)       # random costs: the cheapest path is unique
    assert dtw_l1(a, b) == pytest.approx(total / steps, rel=1e-12)


def test_dtw_l1_ignores_timing_only():
    a = torch.randn(7, 4)
    assert dtw_l1(a, a) == 0.0 and dtw_l1(a, a.repeat_interleave(3, 0)) == pytest.approx(0.0, abs=1e-12)
    assert dtw_l1(a, a + 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError): dtw_l1(a, torch.randn(5, 2))


def test_lr_schedule():
    for cfg in (PretrainConfig(warmup=10), FinetuneConfig(warmup=10)):
        lr_at = lambda step: cfg.schedule()(step, 100, 1.0)
        assert lr_at(0) == pytest.approx(0.1) and lr_at(9) == pytest.approx(1.0)
        assert lr_at(99) == pytest.approx(0.1, abs=0.01) and lr_at(55) < 1.0
        assert cfg.optim().betas == (0.9, 0.98) and cfg.optim().clip_norm == 1.0


# ---------------------------------------------------------------- the ablation is wired as described
def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("variant", ["full", "no_vq", "text_only"])
def test_pretraining_variants_train_what_they_should(variant):
    spec = dict(full={}, no_vq=dict(swap_prob=0.0), text_only=dict(speech=False))[variant]
    m, d = _model(dtype=torch.float32), _data(6)
    d = SpeechData([x.float() for x in d.mels], d.texts, d.speakers, d.units)
    before = {n: _params(getattr(m, n)) for n in ("subsample", "speech_postnet", "quantizer", "unit_head")}
    hist = pretrain(m, d, text_pool(20, 0), VOCAB, PretrainConfig(steps=2, speech_batch=3, text_batch=4, log_every=1,
                                                                    weight_decay=0.0, **spec))
    assert len(hist) == 2 and all(np.isfinite(v) for h in hist for v in h.values())
    changed = {n: any(not torch.equal(a, b) for a, b in zip(ps, _params(getattr(m, n)))) for n, ps in before.items()}
    assert changed["subsample"] == changed["speech_postnet"] == changed["unit_head"] == (variant != "text_only")
    assert changed["quantizer"] == (variant != "no_vq")
    assert ("speech_unit" in hist[0]) == (variant != "text_only") and "text_text" in hist[0]
    with pytest.raises(ValueError, match="nothing to pre-train"):
        pretrain(m, d, [], VOCAB, PretrainConfig(steps=1, speech=False, text=False))
    with pytest.raises(ValueError, match="unit labels"):
        pretrain(m, SpeechData(d.mels, d.texts, d.speakers), [], VOCAB, PretrainConfig(steps=1))


def test_finetuning_lowers_the_loss_on_a_tiny_set():
    m, d = _model(dtype=torch.float32), _data(4, units=False)
    g = torch.Generator().manual_seed(0)   # long enough clips for CTC, one word each
    d = SpeechData([torch.randn(90, 12, generator=g) for _ in range(4)], text_pool(4, 0, 1, 1), d.speakers)
    asr = finetune_asr(copy.deepcopy(m), d, VOCAB, FinetuneConfig(steps=40, batch=4, lr=1e-2, warmup=5,
                                                                    mask_prob=0.0))
    tts = finetune_tts(copy.deepcopy(m), d, VOCAB, FinetuneConfig(steps=40, batch=4, lr=1e-2, warmup=5))
    assert np.mean(asr[-5:]) < 0.5 * np.mean(asr[:5]) and np.mean(tts[-5:]) < 0.8 * np.mean(tts[:5])


# ---------------------------------------------------------------- fit takes the steps of the loops before it
def _pre_fit_lr(step, steps, warmup, peak):
    from paper_repro.core.train import warmup_cosine
    return warmup_cosine(step, steps, warmup, peak, 0.1, decay_after_warmup=True)


def _pre_fit_pretrain(model, speech, texts, vocab, cfg, seed=0):
    "`pretrain` before it moved onto `core.train.fit` (commit d0e4065), kept as the reference."
    from paper_repro.speech.speecht5 import speech_pretrain_losses, text_pretrain_losses
    dev = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    model.train()
    history, acc = [], {}
    for step in range(cfg.steps):
        for g in opt.param_groups: g["lr"] = _pre_fit_lr(step, cfg.steps, cfg.warmup, cfg.lr)
        model.quantizer.temp = cfg.temp[0] * (cfg.temp[1] / cfg.temp[0]) ** (step / max(1, cfg.steps - 1))
        parts, total = {}, 0.0
        if cfg.speech:
            idx = rng.integers(0, len(speech), cfg.speech_batch)
            mel, flen, spk = speech.batch(idx, dev)
            s = speech_pretrain_losses(model, mel, flen, spk, [speech.units[i] for i in idx], cfg, gen)
            total = total + s["total"]
            parts.update({f"speech_{k}": v for k, v in s.items() if k != "total"})
        if cfg.text:
            batch = [texts[i] for i in rng.integers(0, len(texts), cfg.text_batch)]
            t = text_pretrain_losses(model, batch, vocab, cfg, rng, gen)
            total = total + t["total"]
            parts.update({f"text_{k}": v for k, v in t.items() if k != "total"})
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        for k, v in parts.items(): acc[k] = acc.get(k, 0.0) + v.detach()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = (step % cfg.log_every) + 1
            history.append(dict(step=step + 1, **{k: float(v) / n for k, v in acc.items()})); acc = {}
    model.eval()
    return history


def _pre_fit_finetune(model, data, cfg, seed, step_loss):
    "`_finetune` before it moved onto `core.train.fit` (commit d0e4065), kept as the reference."
    dev = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    model.train()
    losses = []
    for step in range(cfg.steps):
        for g in opt.param_groups: g["lr"] = _pre_fit_lr(step, cfg.steps, cfg.warmup, cfg.lr)
        idx = rng.choice(len(data), size=min(cfg.batch, len(data)), replace=False)
        loss = step_loss(idx, dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        losses.append(loss.detach())
    model.eval()
    return torch.stack(losses).tolist()


def _real_size_model_and_data(seed=0):
    "The cpu run's model (default sizes, 50 units, 40 mel bands) and a few random clips with unit labels."
    torch.manual_seed(seed)
    m = SpeechT5(SpeechT5Config(vocab_size=len(VOCAB), n_units=50))
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(40, 90, (10,), generator=g)
    mels = [torch.randn(int(L), 40, generator=g) for L in lens]
    units = [torch.randint(0, 50, (int(L) // 4,), generator=g) for L in lens]
    return m, SpeechData(mels, text_pool(10, 1), torch.randint(0, len(SPEAKERS), (10,), generator=g), units)


def _same_parameters(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()): assert torch.equal(x, y), name


@pytest.mark.parametrize("spec", [dict(), dict(speech=False)])
def test_pretrain_on_fit_takes_the_steps_of_the_pre_fit_loop(spec):
    cfg = PretrainConfig(steps=5, speech_batch=4, text_batch=6, warmup=2, log_every=2, **spec)
    runs = []
    for train in (_pre_fit_pretrain, pretrain):
        m, d = _real_size_model_and_data()
        torch.manual_seed(7)      # the decoder pre-net's dropout draws from the global generator
        runs.append((m, train(m, d, text_pool(30, 2), VOCAB, cfg, seed=3)))
    (old, h_old), (new, h_new) = runs
    assert h_new == h_old and [h["step"] for h in h_new] == [2, 4, 5] and not new.training
    assert new.quantizer.temp == old.quantizer.temp
    _same_parameters(old, new)


@pytest.mark.parametrize("task", ["asr", "tts"])
def test_finetune_on_fit_takes_the_steps_of_the_pre_fit_loop(task):
    from paper_repro.speech.speecht5 import asr_losses, tts_losses
    cfg = FinetuneConfig(steps=5, batch=4, warmup=2, mask_prob=0.1 if task == "asr" else 0.0)
    m0, d = _real_size_model_and_data()
    old, new = copy.deepcopy(m0), copy.deepcopy(m0)
    gen = torch.Generator().manual_seed(3)
    def step_loss(idx, dev):         # what finetune_asr / finetune_tts compute, on the reference model
        mel, flen, spk = d.batch(idx, dev)
        if task == "tts": return tts_losses(old, [d.texts[i] for i in idx], mel, flen, spk, VOCAB)["total"]
        slen = old.subsample.out_lengths(flen)
        mask = span_mask(slen, int(slen.max()), cfg.mask_prob, cfg.mask_span, gen)
        return asr_losses(old, mel, flen, [d.texts[i] for i in idx], VOCAB, cfg.ctc_weight, mask)["total"]
    torch.manual_seed(7)
    l_old = _pre_fit_finetune(old, d, cfg, 3, step_loss)
    torch.manual_seed(7)
    l_new = (finetune_asr if task == "asr" else finetune_tts)(new, d, VOCAB, cfg, seed=3)
    assert l_new == l_old and len(l_new) == 5 and not new.training
    _same_parameters(old, new)


# ---------------------------------------------------------------- committed weights after the SpeechSeq2Seq refactor
# recorded once with the code of commit d0e4065 (SpeechT5 built its own encoder/decoder then) by these same inputs and
# calls: the committed model's outputs in float64, and a tiny model's initialisation under seed 0 with its parameter order
REFERENCE = Path(__file__).parent / "data" / "speecht5_reference.pt"


def _reference_outputs(m: SpeechT5, n_mels: int) -> dict:
    "What `tests/data/speecht5_reference.pt` recorded with the code before SpeechT5 subclassed SpeechSeq2Seq."
    m = m.double().eval()
    m.speech_dec_prenet.dropout = 0.0
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(2, 37, n_mels, generator=g, dtype=torch.float64)
    flen = torch.tensor([37, 23])
    with torch.no_grad():
        hidden, hlen = m.encode_speech(mel, flen)
        mask = torch.zeros(2, hidden.shape[1], dtype=torch.bool)
        mask[:, 2:5] = True
        hmask, _ = m.encode_speech(mel, flen, mask)
        seqs = [decoder_sequence(VOCAB, "red apple"), decoder_sequence(VOCAB, "tree")]
        tok = torch.zeros(2, max(map(len, seqs)), dtype=torch.long)
        for i, s in enumerate(seqs): tok[i, :len(s)] = torch.tensor(s)
        dec = m.decoder(tok, memory=m.decoder.encode_memory(hidden, hlen))
        th, tl = m.encode_text([VOCAB.encode("red apple"), VOCAB.encode("tree")])
        before, after, stop = m.speech_decode(m.decoder.encode_memory(th, tl), mel, torch.tensor([0, 5]))
        return dict(hidden=hidden, hidden_masked=hmask, ctc_logits=m.ctc_logits(hidden), decoder_logits=dec,
                    text_hidden=th, mel_before=before, mel_after=after, stop=stop, units=m.unit_head(hidden))


def test_committed_weights_load_and_match_the_pre_refactor_outputs():
    "data/speecht5.pt (keys `speech_prenet.*`) loads into the SpeechSeq2Seq-based model and computes what it did before."
    ckpt = torch.load(data_path("speecht5.pt"), map_location="cpu", weights_only=True)
    ref = torch.load(REFERENCE, weights_only=True)
    cfg = SpeechT5Config(**ckpt["config"])
    state = ckpt["models"]["SpeechT5"]
    assert any(k.startswith("speech_prenet.") for k in state)          # the committed file's own names
    m = SpeechT5(cfg)
    m.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})   # strict
    assert torch.equal(m.subsample.proj.weight, state["speech_prenet.proj.weight"].float())
    assert [k.replace("speech_prenet.", "subsample.") for k in ref["committed_keys"]] == list(m.state_dict())
    got = _reference_outputs(m, cfg.n_mels)
    for name, want in ref["committed"].items():
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12, msg=lambda s: f"{name}: {s}")
    # saving and loading again uses the new names
    again = SpeechT5(cfg)
    again.load_state_dict(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))


def test_initialisation_and_parameter_order_are_the_pre_refactor_ones():
    "A seed gives the initialisation of before (the cpu run's 'no pre-training' variant is it), parameters in one order."
    ref = torch.load(REFERENCE, weights_only=True)
    tiny = SpeechT5Config(vocab_size=len(VOCAB), d_model=16, n_heads=2, enc_layers=1, dec_layers=1, d_ff=32, r=2,
                          n_units=6, vq_vars=4, prenet_hidden=16, postnet_channels=8, postnet_layers=2)
    torch.manual_seed(0)
    m = SpeechT5(tiny)
    names = [n.replace("subsample.", "speech_prenet.") for n, _ in m.named_parameters()]
    assert names == ref["tiny_param_names"]                            # the order gradient clipping sums norms in
    state = {k.replace("subsample.", "speech_prenet."): v for k, v in m.state_dict().items()}
    assert list(state) == list(ref["tiny_init"])
    for k, v in ref["tiny_init"].items(): assert torch.equal(state[k], v), k


def test_teacher_forced_l1_per_clip_weighs_back_to_the_corpus_mean():
    from paper_repro.speech.speecht5 import teacher_forced_l1
    m, d = _model(), _data(n=5)
    clips = teacher_forced_l1(m, d, VOCAB, batch_size=2, per_clip=True)
    frames = np.array([len(x) for x in d.mels], dtype=np.float64)
    assert clips.shape == (5,) and (clips > 0).all()
    assert float((clips * frames).sum() / frames.sum()) == pytest.approx(teacher_forced_l1(m, d, VOCAB, batch_size=2))
    one = teacher_forced_l1(m, d.subset([3]), VOCAB)                  # a clip's own score does not depend on its batch
    assert clips[3] == pytest.approx(one)
