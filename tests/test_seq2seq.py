"""paper_repro.core.seq2seq: the bidirectional encoder, teacher forcing after a prompt, batched KV-cached greedy
decoding, and the text EncoderDecoder (padding invariance, cached == recomputed greedy, prompt masking, tying)."""
import pytest
import torch
import torch.nn.functional as F

import paper_repro.speech.seq2seq as speech_seq2seq
from paper_repro.core import seq2seq as core_seq2seq
from paper_repro.core.lm import count_parameters
from paper_repro.core.seq2seq import (EncoderDecoder, EncoderDecoderConfig, attention_greedy_decode, decoder_loss,
                                      padding_attn_mask)

SRC = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]


def _model(seed=0, **kw) -> EncoderDecoder:
    torch.manual_seed(seed)
    cfg = EncoderDecoderConfig(vocab_size=24, d_model=32, enc_layers=2, dec_layers=2, n_heads=2, d_ff=64, **kw)
    return EncoderDecoder(cfg).double().eval()


def _naive_greedy(model, src, prompt, n, eos):
    "Greedy decoding recomputed from scratch at every step: one source, no cache, no batching."
    seq, mem = list(prompt), model.memory(*model.batch_src([src]))
    for _ in range(n):
        tok = int(model.decoder(torch.tensor([seq]), memory=mem)[0, -1].argmax())
        if tok == eos: break
        seq.append(tok)
    return seq[len(prompt):]


def test_speech_names_are_the_core_functions():
    for name in ("padding_attn_mask", "encode", "decoder_loss", "attention_greedy_decode", "_pad_right"):
        assert getattr(speech_seq2seq, name) is getattr(core_seq2seq, name)
    for name in ("padding_attn_mask", "encode", "decoder_loss", "attention_greedy_decode"):
        assert name in speech_seq2seq.__all__


def test_padding_attn_mask_masks_only_keys_past_the_end():
    m = padding_attn_mask(torch.tensor([3, 1]), 4)
    assert m.shape == (2, 4, 4)
    assert m[0, :, :3].all() and not m[0, :, 3].any()
    assert m[1, :, 0].all() and not m[1, :, 1:].any()


@pytest.mark.parametrize("seed", [0, 1])
def test_padded_rows_equal_unpadded_rows(seed):
    model = _model(seed)
    ids, lengths = model.batch_src(SRC)
    assert ids.shape == (4, 6) and lengths.tolist() == [6, 2, 3, 1]
    states = model.encode_src(ids, lengths)
    seqs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 11, 2], [1, 2]]
    rows = model.loss(SRC, seqs, reduction="none")
    for i, s in enumerate(SRC):
        alone = model.encode_src(*model.batch_src([s]))
        torch.testing.assert_close(states[i, :len(s)], alone[0], atol=1e-10, rtol=0)
        torch.testing.assert_close(rows[i], model.loss([s], [seqs[i]], reduction="none")[0], atol=1e-10, rtol=0)
    prompts = [[1]] * 4
    batched = model.generate(SRC, prompts, max_new_tokens=7, eos_id=2)
    assert batched == [model.generate([s], [[1]], 7, 2)[0] for s in SRC]
    # the id written into padding does not matter
    other = _model(seed, pad_id=23)
    other.load_state_dict(model.state_dict())
    real = (torch.arange(6)[None] < lengths[:, None])[..., None]
    torch.testing.assert_close(other.encode_src(*other.batch_src(SRC)) * real, states * real, atol=1e-10, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_batched_greedy_equals_naive_recomputed_greedy(seed):
    model = _model(seed)
    prompts = [[1], [1, 15], [1, 16, 17], [1]]  # prompts of different lengths in one batch
    for eos in (2, int(model.generate(SRC[:1], [[1]], 1, eos_id=0)[0][0])):  # an EOS that fires at once, too
        out = model.generate(SRC, prompts, max_new_tokens=8, eos_id=eos)
        assert out == [_naive_greedy(model, s, p, 8, eos) for s, p in zip(SRC, prompts)]
        assert all(len(o) <= 8 and eos not in o for o in out)


def test_loss_scores_only_the_tokens_after_the_prompt():
    model = _model(0)
    seqs = [[1, 15, 5, 6, 2], [1, 7, 2], [1, 16, 17, 8, 2], [1, 9, 2]]
    n_prompt = [2, 1, 3, 1]
    rows = model.loss(SRC, seqs, n_prompt=n_prompt, reduction="none")
    total, count = 0.0, 0
    for i, (s, q, p) in enumerate(zip(SRC, seqs, n_prompt)):
        logits = model.decoder(torch.tensor([q[:-1]]), memory=model.memory(*model.batch_src([s])))[0]
        nll = F.cross_entropy(logits[p - 1:], torch.tensor(q[p:]), reduction="sum")
        torch.testing.assert_close(rows[i], nll / (len(q) - p), atol=1e-10, rtol=0)
        total, count = total + nll, count + len(q) - p
    torch.testing.assert_close(model.loss(SRC, seqs, n_prompt), total / count, atol=1e-10, rtol=0)
    torch.testing.assert_close(model.loss(SRC, seqs, n_prompt, reduction="sum"), total, atol=1e-10, rtol=0)
    # a prompt token's own prediction is not scored: changing the prompt's *targets* only changes inputs after it
    with_prompt_scored = model.loss(SRC, seqs, n_prompt=1, reduction="none")
    assert not torch.allclose(with_prompt_scored[0], rows[0])
    torch.testing.assert_close(with_prompt_scored[1], rows[1])


def test_gradients_reach_both_transformers_and_tied_embeddings_are_one_parameter():
    model = _model(0).float().train()
    model.loss(SRC, [[1, 5, 2], [1, 6, 2], [1, 7, 2], [1, 8, 2]]).backward()
    assert model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.decoder.layers[0].cross_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.decoder.embed_tokens.weight is model.encoder.embed_tokens.weight
    untied = _model(0, share_embeddings=False)
    tied_out = _model(0, tie_output=True)
    V, d = 24, 32
    assert count_parameters(untied) - count_parameters(_model(0)) == V * d
    assert count_parameters(_model(0)) - count_parameters(tied_out) == V * d
    assert tied_out.decoder.lm_head.weight is tied_out.encoder.embed_tokens.weight


def test_bad_inputs_raise_clear_errors():
    model = _model(0)
    with pytest.raises(ValueError, match="outside"): model.batch_src([[3, 24]])
    with pytest.raises(ValueError, match="empty"): model.batch_src([[3], []])
    with pytest.raises(ValueError, match="src is empty"): model.batch_src([])
    with pytest.raises(ValueError, match="sources for"): model.loss(SRC, [[1, 2]])
    with pytest.raises(ValueError, match="sources for"): model.generate(SRC, [[1]], 3, 2)
    with pytest.raises(ValueError, match="max_new_tokens"): model.generate(SRC[:1], [[1]], 0, 2)
    with pytest.raises(ValueError, match="prompt of at least one token"): model.loss(SRC[:1], [[1, 2]], n_prompt=2)
    with pytest.raises(ValueError, match="unknown reduction"): model.loss(SRC[:1], [[1, 2]], reduction="avg")
    with pytest.raises(ValueError, match="pad_id"): EncoderDecoderConfig(vocab_size=4, pad_id=4)
    with pytest.raises(ValueError, match="enc_layers"): EncoderDecoderConfig(vocab_size=4, enc_layers=0)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        _model(0, max_seq_len=4).batch_src([[3] * 5])
    mem = model.memory(*model.batch_src(SRC))
    with pytest.raises(ValueError, match="prompts for a memory"): attention_greedy_decode(model.decoder, mem, [[1]], 3, 2)
    with pytest.raises(ValueError, match="sequences for a memory"): decoder_loss(model.decoder, mem, [[1, 2]], 1)
