"""paper_repro.lm.multilingual_nmt: the msgid split (test messages unseen in every direction), the target-language
token, the training mixtures, compact weights, batched translation, the scores and the encoder-state pooling."""
import numpy as np
import pytest
import torch

from paper_repro.core.data import load_parallel_corpus
from paper_repro.core.train import round_fp16
from paper_repro.lm.multilingual_nmt import (LANGS, SPECIALS, SYSTEMS, LanguageIdentifier, NMTCodec, NMTTrainConfig,
                                            compact_state, corpus_chrf, direction_pairs, encode_examples,
                                            lang_token, load_compact_state, message_table, nmt_model, off_target,
                                            pivot_translate, pooled_states, retrieval_hits, sentence_chrf,
                                            split_messages, system_examples, train_codec, train_nmt, translate)

TAB = {f"m{i}": {"en": f"open file {i}", "fr": f"ouvrir le fichier {i}", "es": f"abrir el archivo {i}"}
       for i in range(60)}


@pytest.fixture(scope="module")
def codec() -> NMTCodec:
    return train_codec([t for d in TAB.values() for t in d.values()], 320)


def _model(codec, seed=0):
    return nmt_model(codec, d_model=16, layers=1, n_heads=2, d_ff=32, seed=seed).eval()


@pytest.fixture(scope="module")
def corpus_split():
    table = message_table(load_parallel_corpus(None, "all"))
    return table, split_messages(table)


def test_split_holds_test_messages_out_of_every_training_direction(corpus_split):
    table, sp = corpus_split
    assert not set(sp["train"]) & set(sp["test"]) and not set(sp["train"]) & set(sp["dev"])
    assert not set(sp["dev"]) & set(sp["test"]) and len(sp["test"]) > 100 and len(sp["dev"]) > 50
    for m in sp["test"] + sp["dev"]:       # held out: full triples of three distinct strings
        assert set(table[m]) == set(LANGS) and len(set(table[m].values())) == 3
    test_pairs = {(table[m][s], table[m][t]) for m in sp["test"] for s in LANGS for t in LANGS if s != t}
    for system in SYSTEMS:                 # no test (source, target) pair is a training example of any system
        ex = system_examples(table, sp["train"], system, 0.01, seed=0)
        assert not {(a, b) for _, _, a, b in ex} & test_pairs
    assert split_messages(table) == sp     # deterministic (a hash of the msgid, not the catalogue order)


def test_system_examples_mix_directions_and_the_extra_share():
    ex = system_examples(TAB, sorted(TAB), "multilingual")
    assert {e[:2] for e in ex} == {("en", "fr"), ("fr", "en"), ("en", "es"), ("es", "en")} and len(ex) == 240
    plus = system_examples(TAB, sorted(TAB), "multilingual + fr→es", extra_frac=0.05, seed=3)
    extra = [e for e in plus if e[:2] == ("fr", "es")]
    assert len(extra) == 12 and plus[:240] == ex and all(e[2].startswith("ouvrir") for e in extra)
    assert plus == system_examples(TAB, sorted(TAB), "multilingual + fr→es", extra_frac=0.05, seed=3)
    assert {e[:2] for e in system_examples(TAB, sorted(TAB), "single-pair en→es")} == {("en", "es")}
    with pytest.raises(ValueError, match="unknown system"): system_examples(TAB, sorted(TAB), "pivot")
    with pytest.raises(ValueError, match="two different languages"): direction_pairs(TAB, ["m0"], "fr", "fr")


def test_codec_prepends_the_target_token_and_nothing_else(codec):
    for lang in LANGS:
        src = codec.source("ouvrir le fichier 3", lang)
        assert src[0] == codec.tokenizer.special_id(lang_token(lang))
        assert src[1:] == codec.tokenizer.encode("ouvrir le fichier 3")
    seq = codec.target("abrir el archivo 7")
    assert seq[0] == codec.bos_id and seq[-1] == codec.eos_id and codec.text(seq) == "abrir el archivo 7"
    with pytest.raises(ValueError, match="unknown language"): lang_token("de")
    with pytest.raises(ValueError, match="special tokens"):
        NMTCodec(train_codec(["a"], 300).tokenizer.__class__([], ("<eos>",)))
    assert all(s in codec.tokenizer.specials for s in SPECIALS)


def test_encode_examples_drops_only_long_pairs(codec):
    ex = [("en", "fr", "open file 1", "ouvrir le fichier 1"), ("en", "fr", "open file 1 " * 20, "x")]
    assert len(encode_examples(codec, ex)) == 2 and len(encode_examples(codec, ex, max_tokens=10)) == 1


def test_compact_state_stores_tied_tensors_once_and_round_trips(codec):
    m = round_fp16(_model(codec, 0))
    st = compact_state(m)
    assert sum(v.numel() for v in st.values()) == sum(p.numel() for p in m.parameters())
    m2 = load_compact_state(_model(codec, 1), st)
    src = [codec.source("open file 4", "fr")]
    ids, lengths = m.batch_src(src)
    seq = torch.tensor([codec.target("ouvrir")])
    torch.testing.assert_close(m2.decoder(seq, memory=m2.memory(ids, lengths)),
                               m.decoder(seq, memory=m.memory(ids, lengths)), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        load_compact_state(_model(codec), {**st, "extra.weight": torch.zeros(1)})


def test_training_lowers_the_loss_with_bucketed_batches(codec):
    data = encode_examples(codec, system_examples(TAB, sorted(TAB), "multilingual"))
    m = _model(codec).train()
    losses = train_nmt(m, data, NMTTrainConfig(steps=40, batch_size=16, lr=3e-3, warmup=5, pool=4), progress=False)
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    with pytest.raises(ValueError, match="no training examples"): train_nmt(m, [], NMTTrainConfig(steps=1))
    with pytest.raises(ValueError, match="pool"): NMTTrainConfig(pool=0)


def test_translation_is_batched_and_equals_one_at_a_time(codec):
    m = _model(codec, 2)
    texts = ["open file 1", "ouvrir le fichier 22", "abrir", "open file 3 open file 4"]
    out = translate(m, codec, texts, "es", batch_size=3, max_new_tokens=6)
    assert out == [translate(m, codec, [t], "es", max_new_tokens=6)[0] for t in texts]
    mid = translate(m, codec, texts, "en", max_new_tokens=6)
    assert pivot_translate(m, codec, texts, "es", max_new_tokens=6) == translate(m, codec, mid, "es", max_new_tokens=6)
    with pytest.raises(ValueError, match="batch_size"): translate(m, codec, texts, "es", batch_size=0)


def test_pooled_states_ignore_padding_and_the_target_token_position(codec):
    m = _model(codec, 3)
    texts = ["open file 1", "ouvrir le fichier 22 ouvrir le fichier 23", "abrir"]
    batch = pooled_states(m, codec, texts, "en")
    alone = torch.cat([pooled_states(m, codec, [t], "en") for t in texts])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    # the embedding pool leaves the target-language token out: it is the same for every target language
    torch.testing.assert_close(pooled_states(m, codec, texts, "en", "embeddings"),
                               pooled_states(m, codec, texts, "fr", "embeddings"))
    assert not torch.allclose(pooled_states(m, codec, texts, "en"), pooled_states(m, codec, texts, "fr"))
    with pytest.raises(ValueError, match="layer"): pooled_states(m, codec, texts, "en", layer="decoder")


def test_retrieval_hits():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert retrieval_hits(q, q).tolist() == [1.0, 1.0, 1.0]
    assert retrieval_hits(q, q[[1, 0, 2]]).tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="differ"): retrieval_hits(q, q[:2])


def test_scores_and_language_identifier():
    assert sentence_chrf(["abrir el archivo"], ["abrir el archivo"]).tolist() == [100.0]
    assert 0 < sentence_chrf(["abrir archivo"], ["abrir el archivo"])[0] < 100
    assert corpus_chrf(["a b", "c"], ["a b", "c"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="hypotheses"): sentence_chrf(["a"], [])
    texts = [d[l] for d in TAB.values() for l in LANGS]
    lid = LanguageIdentifier().fit(texts, [l for _ in TAB for l in LANGS])
    assert lid.predict(["ouvrir le fichier", "abrir el archivo", "open file", ""]) == ["fr", "es", "en", ""]
    assert off_target(lid, ["ouvrir le fichier", "", "abrir"], "fr").tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown languages"): LanguageIdentifier().fit(["x"], ["de"])
