"Cache-aware streaming Conformer: the streamed output must equal the masked full pass."
import numpy as np
import pytest
import torch

from paper_repro.speech.features import length_mask
from paper_repro.speech.stateful_conformer import (AttContext, CausalConv1d, ConformerEncoder, EncoderConfig,
                                                   StreamingASR, context_mask, stream_encode)

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _encoder(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_mels=12, d=24, heads=4, layers=3, kernel=5, dropout=0.0, max_rel=8)
    enc = ConformerEncoder(EncoderConfig(**{**cfg, **kw})).double().eval()
    with torch.no_grad():   # large random weights, so a wrong cache or mask shows up far above rounding error
        for p in enc.parameters(): p.normal_(0, 0.3)
    return enc


def _feats(lengths, n_mels=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    f = torch.randn(len(lengths), int(lengths.max()), n_mels, generator=g, dtype=torch.float64)
    return f * length_mask(lengths, f.shape[1])[..., None], lengths


@pytest.mark.parametrize("left,right", [(0, 0), (3, 0), (4, 1), (5, 2), (16, 3), (2, 7)])
@pytest.mark.parametrize("lengths", [[8], [1], [37, 80, 5, 64], [123, 9]])
def test_streamed_equals_masked_full_pass(left, right, lengths):
    enc = _encoder()
    feats, lens = _feats(lengths)
    ctx = AttContext(left, right)
    with torch.no_grad():
        full, flen = enc(feats, lens, ctx)
        streamed, slen = stream_encode(enc, feats, lens, ctx)
    assert torch.equal(flen, slen)
    m = length_mask(flen, full.shape[1])
    assert full.abs()[m].max() > 0.1          # not trivially zero
    torch.testing.assert_close(streamed[m], full[m], rtol=1e-9, atol=1e-10)


def test_each_utterance_streams_as_if_alone():
    "Batching must not leak across rows: a row streamed in a padded batch equals it streamed alone."
    enc = _encoder(seed=3, subsampling=4)
    feats, lens = _feats([50, 13, 31])
    ctx = AttContext(6, 2)
    with torch.no_grad():
        batch, blen = stream_encode(enc, feats, lens, ctx)
        for b in range(3):
            alone, alen = stream_encode(enc, feats[b:b + 1, :lens[b]], lens[b:b + 1], ctx)
            torch.testing.assert_close(batch[b, :blen[b]], alone[0, :alen[0]], rtol=1e-9, atol=1e-10)


def test_cache_matters_and_context_is_limited():
    "Negative controls: streaming without history differs; a frame beyond the chunk does not change earlier outputs."
    enc = _encoder()
    feats, lens = _feats([96])
    ctx = AttContext(8, 1)
    with torch.no_grad():
        full, _ = enc(feats, lens, ctx)
        nohist, _ = enc(feats, lens, AttContext(0, 1))
        assert (full - nohist).abs().max() > 1e-3
        # change feature frames from encoder frame 6 on (chunk 3 = frames 6, 7): frames 0..5 must not move
        f2 = feats.clone(); f2[:, 6 * 8:] += 1.0
        out2, _ = enc(f2, lens, ctx)
        torch.testing.assert_close(out2[:, :6], full[:, :6], rtol=0, atol=1e-12)
        assert (out2[:, 6:] - full[:, 6:]).abs().max() > 1e-3
        # the offline model (unlimited context) does see the future
        off, _ = enc(feats, lens, AttContext(None, None))
        off2, _ = enc(f2, lens, AttContext(None, None))
        assert (off2[:, :6] - off[:, :6]).abs().max() > 1e-3


def test_context_mask_matches_brute_force():
    for left, right in [(0, 0), (3, 1), (5, 4), (None, 2), (2, None), (None, None)]:
        ctx, T = AttContext(left, right), 13
        m = context_mask(T, ctx)
        for i in range(T):
            for j in range(T):
                if right is None: ok = True; start = i
                else: C = right + 1; ok = j // C <= i // C; start = (i // C) * C
                if left is not None: ok = ok and j >= start - left
                assert bool(m[i, j]) == ok, (left, right, i, j)


def test_causal_conv_step_equals_forward():
    torch.manual_seed(0)
    conv = CausalConv1d(3, 4, kernel=3, stride=2).double()
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    full = conv(x)
    cache, outs = conv.init_cache(2, "cpu", torch.float64), []
    for s in range(0, 24, 6):
        y, cache = conv.step(x[..., s:s + 6], cache); outs.append(y)
    torch.testing.assert_close(torch.cat(outs, -1), full)
    with pytest.raises(ValueError, match="multiple of the stride"): conv.step(x[..., :5], cache)


def test_state_size_is_constant():
    enc = _encoder()
    ctx = AttContext(4, 1)
    s = enc.init_state(2, ctx)
    feats, _ = _feats([16 * 5, 16 * 5])
    sizes = []
    with torch.no_grad():
        for c in range(5):
            _, s = enc.stream_step(feats[:, c * 16:(c + 1) * 16], s)
            sizes.append(s.numel())
    assert len(set(sizes)) == 1 and s.offset == 10


def test_bad_inputs():
    enc = _encoder()
    with pytest.raises(ValueError, match="left context"): AttContext(-1, 0)
    with pytest.raises(ValueError, match="right context"): AttContext(4, 1.5)
    with pytest.raises(ValueError, match="finite left and right"): enc.init_state(1, AttContext(None, 2))
    with pytest.raises(ValueError, match="finite left and right"): enc.init_state(1, AttContext(4, None))
    s = enc.init_state(1, AttContext(4, 1))
    with pytest.raises(ValueError, match="a chunk is 16 feature frames"): enc.stream_step(torch.zeros(1, 15, 12), s)
    with pytest.raises(ValueError, match="feats must be"): enc(torch.zeros(1, 8, 5), torch.tensor([8]), AttContext())
    with pytest.raises(ValueError, match="power of 2"): ConformerEncoder(EncoderConfig(subsampling=6))
    model = StreamingASR(DIGITS, EncoderConfig(n_mels=12, d=24, layers=1))
    assert model.vocab.encode_words("three one") == [4, 2]
    with pytest.raises(ValueError, match="not in the vocabulary"): model.vocab.encode_words("three eleven")
    enc_out = torch.zeros(1, 4, 24)
    with pytest.raises(ValueError, match="valid: 'ctc', 'rnnt'"): model.decode(enc_out, torch.tensor([4]), "attn")
    with pytest.raises(ValueError, match="ctc_weight"):
        model.loss(enc_out, torch.tensor([4]), torch.tensor([[1]]), torch.tensor([1]), 1.5)


def test_hybrid_loss_weights_and_decoders_agree_on_streaming():
    torch.manual_seed(0)
    model = StreamingASR(DIGITS, EncoderConfig(n_mels=12, d=24, layers=2, dropout=0.0)).double().eval()
    feats, lens = _feats([64, 40])
    ctx = AttContext(4, 1)
    tg, tl = model.targets(["one two", "nine"], "cpu")
    with torch.no_grad():
        enc, elen = model.encoder(feats, lens, ctx)
        senc, _ = stream_encode(model.encoder, feats, lens, ctx)
        parts = model.loss(enc, elen, tg, tl, 0.3)
        assert torch.isclose(parts["total"], 0.3 * parts["ctc"] + 0.7 * parts["rnnt"])
        assert model.loss(enc, elen, tg, tl, 1.0)["rnnt"] == 0 and model.loss(enc, elen, tg, tl, 0.0)["ctc"] == 0
        for d in ("ctc", "rnnt"):
            assert model.decode(enc, elen, d) == model.decode(senc, elen, d)


class _NoiseCorpus:
    "What `train_asr` reads of a SpeechCorpus (lengths, records, padded batches), with noise for audio."
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.waves = [torch.randn(int(L), generator=g) * 0.1 for L in torch.randint(2000, 6000, (n,), generator=g)]
        self.lengths = np.array([len(w) for w in self.waves])
        self.records = [dict(text=" ".join(DIGITS[int(d)] for d in torch.randint(0, 10, (int(k),), generator=g)))
                        for k in torch.randint(1, 4, (n,), generator=g)]

    def __len__(self) -> int: return len(self.waves)

    def batch(self, idx, device="cpu"):
        out = torch.zeros(len(idx), int(self.lengths[list(idx)].max()))
        for r, i in enumerate(idx): out[r, :len(self.waves[i])] = self.waves[i]
        return out.to(device), torch.tensor(self.lengths[list(idx)]).to(device)


def _pre_fit_train_asr(model, corpus, contexts, cfg, dev_corpus=None, seed=0):
    "The training loop of this notebook before it moved onto `core.train.fit` (commit d0e4065), kept as the reference."
    from paper_repro.core.train import warmup_cosine
    from paper_repro.speech.features import spec_augment
    from paper_repro.speech.stateful_conformer import _batch_features, evaluate_asr, length_buckets
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.steps, cfg.warmup, floor=0.1))
    texts = [r["text"] for r in corpus.records]
    history, batches, step = [], [], 0
    eval_ctx = contexts[0]
    while step < cfg.steps:
        if not batches: batches = length_buckets(corpus.lengths, cfg.batch, g)
        idx = batches.pop()
        model.train()
        feats, flen = _batch_features(model, corpus, idx, dev)
        if cfg.spec_augment:
            feats = spec_augment(feats, flen, n_freq_masks=2, freq_width=12, n_time_masks=2, time_width=20,
                                 time_frac=0.05, generator=g)
        ctx = contexts[int(torch.randint(len(contexts), (1,), generator=g))]
        enc, elen = model.encoder(feats, flen, ctx)
        tg, tl = model.targets([texts[i] for i in idx], dev)
        loss = model.loss(enc, elen, tg, tl, cfg.ctc_weight)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step(); sched.step(); step += 1
        if dev_corpus is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            history.append(dict(step=step, train_loss=float(loss.detach()), **evaluate_asr(model, dev_corpus, eval_ctx)))
    model.eval()
    return history


@pytest.mark.parametrize("spec_augment", [False, True])
def test_train_asr_on_fit_takes_the_steps_of_the_pre_fit_loop(spec_augment):
    "The notebook's encoder and settings (multi-latency, dropout on), a few steps: bit-identical parameters and history."
    from paper_repro.speech.stateful_conformer import StreamingTrainConfig, train_asr
    corpus, dev = _NoiseCorpus(20, 0), _NoiseCorpus(6, 1)
    enc = EncoderConfig(n_mels=80, d=96, heads=4, layers=4, ff_mult=2, kernel=9, subsampling=8, dropout=0.05)
    cfg = StreamingTrainConfig(steps=7, batch=6, lr=1e-3, warmup=3, eval_every=3, spec_augment=spec_augment)
    contexts = [AttContext(16, r) for r in (0, 1, 3, 7)]
    runs = []
    for train in (_pre_fit_train_asr, train_asr):
        torch.manual_seed(0)
        m = StreamingASR(DIGITS, enc)
        runs.append((m, train(m, corpus, contexts, cfg, dev, seed=5)))
    (old, h_old), (new, h_new) = runs
    assert h_new == h_old and [h["step"] for h in h_new] == [3, 6, 7] and not new.training
    for (name, a), b in zip(old.named_parameters(), new.parameters()): assert torch.equal(a, b), name
    assert train_asr(new, corpus, contexts[:1], StreamingTrainConfig(steps=2, batch=6)) == []    # no dev corpus
