"Cache-aware streaming Conformer: the streamed output must equal the masked full pass."
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
