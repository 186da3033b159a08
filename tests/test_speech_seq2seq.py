"""paper_repro.speech.seq2seq: subsampling, bidirectional encoder, teacher forcing, CTC prefix scores, beam search."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from paper_repro.speech.seq2seq import (ConvSubsampling, CTCPrefixScorer, Seq2SeqConfig, SpeechSeq2Seq, decoder_loss,
                                        attention_decode, attention_greedy_decode, encode, joint_beam_search,
                                        padding_attn_mask)
from paper_repro.core.lm import LMConfig, TransformerLM


def _collapse(path, blank=0):
    out, prev = [], None
    for s in path:
        if s != prev and s != blank: out.append(s)
        prev = s
    return out


def _brute_prefix(lp, h):
    "Sum over all alignments of lp [T, V] whose collapsed output starts with h."
    T, V = lp.shape
    tot = 0.0
    for path in itertools.product(range(V), repeat=T):
        if _collapse(path)[:len(h)] == list(h):
            tot += lp[torch.arange(T), torch.tensor(path)].sum().exp().item()
    return tot


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ctc_prefix_scores_equal_brute_force_and_padding_changes_nothing(seed):
    g = torch.Generator().manual_seed(seed)
    T, V = 5, 4
    lp = torch.randn(2, T + 2, V, generator=g, dtype=torch.float64).log_softmax(-1)
    lengths = torch.tensor([T + 2, T])       # row 1 is padded by two frames
    scorer = CTCPrefixScorer(lp, lengths)
    alone = CTCPrefixScorer(lp[1:, :T])
    rows = torch.tensor([1])
    st, st_alone = scorer.initial_state(rows), alone.initial_state(torch.tensor([0]))
    hyp = []
    for c in (2, 2, 3):                      # a repeat needs a blank in between: [2, 2] is its own case
        cands = torch.tensor([[1, 2, 3]])
        psi, new = scorer.extend(st, rows, torch.tensor([hyp[-1] if hyp else -1]), cands)
        psi_a, new_a = alone.extend(st_alone, torch.tensor([0]), torch.tensor([hyp[-1] if hyp else -1]), cands)
        assert torch.allclose(psi, psi_a, atol=1e-12)
        for j, cand in enumerate([1, 2, 3]):
            ref = _brute_prefix(lp[1, :T], hyp + [cand])
            assert math.isclose(psi[0, j].exp().item(), ref, rel_tol=1e-9, abs_tol=1e-300)
        hyp.append(c)
        st, st_alone = new[:, [1, 2, 3].index(c)], new_a[:, [1, 2, 3].index(c)]
        full = -F.ctc_loss(lp[1:, :T].transpose(0, 1), torch.tensor([hyp]), torch.tensor([T]), torch.tensor([len(hyp)]),
                           reduction="sum", zero_infinity=False)
        assert math.isclose(scorer.final(st).item(), full.item(), rel_tol=1e-9) or (full.isinf() and scorer.final(st).isinf())


def test_conv_subsampling_lengths_and_padding():
    torch.manual_seed(0)
    sub = ConvSubsampling(8, 16, factor=4).double()
    feats, lens = torch.randn(2, 21, 8, dtype=torch.float64), torch.tensor([21, 13])
    feats[1, 13:] = 0
    out, olen = sub(feats, lens)
    assert olen.tolist() == [6, 4] and out.shape == (2, 6, 16)
    alone, alen = sub(feats[1:, :13], lens[1:])
    assert torch.allclose(out[1, :4], alone[0], atol=1e-12) and alen.tolist() == [4]
    assert sub.out_lengths(torch.tensor([1, 2, 3, 4, 5])).tolist() == [1, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="power of two"): ConvSubsampling(8, 16, factor=3)


def test_encoder_is_bidirectional_and_ignores_padding():
    torch.manual_seed(0)
    enc = TransformerLM(LMConfig(vocab_size=7, d_model=16, n_layers=2, n_heads=2, d_ff=32)).double().eval()
    x, lens = torch.randn(2, 6, 16, dtype=torch.float64), torch.tensor([6, 4])
    h = encode(enc, x, lens)
    assert torch.allclose(h[1, :4], encode(enc, x[1:, :4], lens[1:])[0], atol=1e-12)
    x2 = x.clone(); x2[0, 5] += 1.0          # a later frame changes an earlier state: bidirectional
    assert not torch.allclose(encode(enc, x2, lens)[0, 0], h[0, 0])
    assert padding_attn_mask(lens, 6)[1].sum().item() == 6 * 4
    with pytest.raises(ValueError, match="lengths must be"): encode(enc, x, torch.tensor([0, 4]))


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(vocab_size=8, n_mels=16, d_model=32, enc_layers=2, dec_layers=2, d_ff=64)
    return SpeechSeq2Seq(cfg).double().eval()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    wlen = torch.tensor([3000, 2000, 1000])
    return torch.randn(3, 3000, generator=g, dtype=torch.float64) * (torch.arange(3000)[None] < wlen[:, None]), wlen


def test_decoder_loss_scores_only_the_tokens_after_the_prompt():
    model = _model()
    wave, wlen = _batch()
    h, hl = model.encode(wave, wlen)
    mem = model.decoder.encode_memory(h, hl)
    seqs, n_prompt = [[6, 5, 1, 2, 7], [6, 3, 7], [6, 1, 1, 4, 2, 7]], [2, 1, 3]
    per_row = decoder_loss(model.decoder, mem, seqs, n_prompt, reduction="none")
    for i, (s, p) in enumerate(zip(seqs, n_prompt)):
        logits = model.decoder(torch.tensor([s[:-1]]), memory=mem.select([i]))[0]
        ref = F.cross_entropy(logits[p - 1:], torch.tensor(s[p:]))
        assert torch.allclose(per_row[i], ref, atol=1e-10)
    total = decoder_loss(model.decoder, mem, seqs, n_prompt)
    n_scored = sum(len(s) - p for s, p in zip(seqs, n_prompt))
    assert torch.allclose(total, (per_row * torch.tensor([3, 2, 3.])).sum() / n_scored)
    with pytest.raises(ValueError, match="prompt of at least one token"): decoder_loss(model.decoder, mem, seqs, [0, 1, 1])
    with pytest.raises(ValueError, match="prompt of at least one token"): decoder_loss(model.decoder, mem, seqs, [5, 1, 1])
    with pytest.raises(ValueError, match="unknown reduction"): decoder_loss(model.decoder, mem, seqs, 1, reduction="avg")
    out = model.loss(wave, wlen, seqs, n_prompt, ctc_weight=0.3)
    assert torch.allclose(out["total"], 0.3 * out["ctc"] + 0.7 * out["att"])


def test_beam_one_without_ctc_is_greedy_and_batch_equals_alone():
    model = _model(1)
    wave, wlen = _batch(1)
    prompts = [[6], [6, 5], [6]]                     # two prompt lengths: decoded in two groups
    greedy = model.transcribe(wave, wlen, prompts, eos_id=7, max_new_tokens=5)
    h, hl = model.encode(wave, wlen)
    mem = model.decoder.encode_memory(h, hl)
    assert greedy == attention_greedy_decode(model.decoder, mem, prompts, 5, 7)
    assert greedy == joint_beam_search(model.decoder, mem, prompts, 7, beam=1, ctc_weight=0.0, max_new_tokens=5)
    joint = model.transcribe(wave, wlen, prompts, eos_id=7, max_new_tokens=5, beam=3, ctc_weight=0.4)
    for i in range(3):
        n = int(wlen[i])
        assert model.transcribe(wave[i:i + 1, :n], wlen[i:i + 1], prompts[i:i + 1], 7, 5, beam=3,
                                ctc_weight=0.4) == joint[i:i + 1]


def test_wide_beam_finds_the_exhaustive_best_joint_score():
    model = _model(2)
    wave, wlen = _batch(2)
    wave, wlen = wave[:1, :2000], torch.tensor([2000])
    h, hl = model.encode(wave, wlen)
    mem = model.decoder.encode_memory(h, hl)
    lp = F.log_softmax(model.ctc_logits(h), -1)
    lam, L, eos, prompt = 0.4, 3, 7, [6]
    tokens = [1, 2, 3, 4, 5, 6]                       # every output token but the blank and the end
    scorer = CTCPrefixScorer(lp)

    def joint(seq, ended):
        ids = prompt + seq + ([eos] if ended else [])
        logits = model.decoder(torch.tensor([ids[:-1]]), memory=mem)[0].log_softmax(-1)
        att = logits[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][len(prompt) - 1:].sum().item()
        st, last, psi = scorer.initial_state(torch.tensor([0])), -1, 0.0
        for c in seq:
            p, new = scorer.extend(st, torch.tensor([0]), torch.tensor([last]), torch.tensor([[c]]))
            st, last, psi = new[:, 0], c, p[0, 0].item()
        if ended: psi = scorer.final(st).item()
        return (1 - lam) * att + lam * psi

    cands = [(joint(list(s), True), list(s)) for n in range(L) for s in itertools.product(tokens, repeat=n)]
    cands += [(joint(list(s), False), list(s)) for s in itertools.product(tokens, repeat=L)]
    best = max(cands)[1]
    got = joint_beam_search(model.decoder, mem, [prompt], eos, beam=len(tokens) ** L + 50, ctc_log_probs=lp,
                            ctc_lengths=hl, ctc_weight=lam, max_new_tokens=L, ctc_beam=8)
    assert got == [best]


def test_bad_arguments_raise_clear_errors():
    model = _model()
    wave, wlen = _batch()
    h, hl = model.encode(wave, wlen)
    mem = model.decoder.encode_memory(h, hl)
    with pytest.raises(ValueError, match="beam must be at least 1"): joint_beam_search(model.decoder, mem, [[6]] * 3, 7, beam=0)
    with pytest.raises(ValueError, match="ctc_weight must be in"): joint_beam_search(model.decoder, mem, [[6]] * 3, 7, ctc_weight=2)
    with pytest.raises(ValueError, match="needs ctc_log_probs"): joint_beam_search(model.decoder, mem, [[6]] * 3, 7, ctc_weight=0.5)
    with pytest.raises(ValueError, match="2 prompts"): joint_beam_search(model.decoder, mem, [[6]] * 2, 7, ctc_weight=0)
    with pytest.raises(ValueError, match="eos_id=9"): joint_beam_search(model.decoder, mem, [[6]] * 3, 9, ctc_weight=0)
    with pytest.raises(ValueError, match="ctc_vocab must be"): Seq2SeqConfig(vocab_size=8, ctc_vocab=9)
    with pytest.raises(ValueError, match="log_probs must be"): CTCPrefixScorer(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="needs the CTC head's ctc_logits"):
        attention_decode(model.decoder, mem, [[6]] * 3, 7, ctc_weight=0.5)


def test_attention_decode_is_greedy_or_joint_beam():
    "The one greedy-or-beam dispatch: greedy iff beam 1 and λ 0, else the joint beam search over the CTC log-softmax."
    model = _model(3)
    wave, wlen = _batch(3)
    h, hl = model.encode(wave, wlen)
    mem, logits = model.decoder.encode_memory(h, hl), model.ctc_logits(h)
    prompts = [[6]] * 3
    assert attention_decode(model.decoder, mem, prompts, 7, 5) == attention_greedy_decode(model.decoder, mem, prompts, 5, 7)
    assert attention_decode(model.decoder, mem, prompts, 7, 5, beam=1, ctc_weight=0.0, ctc_logits=logits) == \
        attention_greedy_decode(model.decoder, mem, prompts, 5, 7)          # unused logits change nothing
    for beam, lam in ((3, 0.0), (1, 0.4), (3, 0.4)):
        want = joint_beam_search(model.decoder, mem, prompts, 7, beam=beam, ctc_log_probs=F.log_softmax(logits, -1),
                                 ctc_lengths=hl, ctc_weight=lam, max_new_tokens=5, length_bonus=0.1)
        assert attention_decode(model.decoder, mem, prompts, 7, 5, beam=beam, ctc_weight=lam, ctc_logits=logits,
                                ctc_lengths=hl, length_bonus=0.1) == want
        assert model.transcribe(wave, wlen, prompts, 7, 5, beam=beam, ctc_weight=lam, length_bonus=0.1) == want


def test_model_without_front_end_and_frame_mask():
    "frontend=False reads features only; subsample_last changes the module order, not the function; masks replace frames."
    cfg = Seq2SeqConfig(vocab_size=8, n_mels=16, d_model=16, enc_layers=1, dec_layers=1, n_heads=2, d_ff=32)
    bare = SpeechSeq2Seq(cfg, frontend=False, subsample_last=True).double()
    assert bare.frontend is None and list(dict(bare.named_children())) == ["encoder", "decoder", "subsample"]
    assert list(dict(SpeechSeq2Seq(cfg).named_children())) == ["frontend", "subsample", "encoder", "decoder"]
    with pytest.raises(ValueError, match="no log-mel front end"): bare.encode(torch.zeros(1, 800), torch.tensor([800]))
    feats, flen = torch.randn(2, 30, 16, dtype=torch.float64), torch.tensor([30, 17])
    h, hl = bare.encode_features(feats, flen)
    x, xl = bare.subsample(feats, flen)
    assert torch.equal(h, encode(bare.encoder, x, xl)) and torch.equal(hl, xl)
    mask = torch.zeros(2, x.shape[1], dtype=torch.bool)
    mask[:, 1:3] = True
    vec = torch.randn(16, dtype=torch.float64)
    hm, _ = bare.encode_features(feats, flen, mask, vec)
    assert torch.equal(hm, encode(bare.encoder, torch.where(mask[..., None], vec, x), xl))
    with pytest.raises(ValueError, match="needs the mask_embed"): bare.encode_features(feats, flen, mask)
