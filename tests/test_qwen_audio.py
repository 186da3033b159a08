"""paper_repro.speech.qwen_audio: tag prefixes, targets, timestamp parsing and scoring, clips, model and training."""
import itertools

import pytest

from paper_repro.speech.corpus import LANGS, espeak_available
from paper_repro.speech.qwen_audio import (EOT, LANG_NAMES, NOTIMESTAMPS, SCHEMES, SOA, SOT, TASKS, TIMESTAMPS,
                                           UNKNOWN, ClipInfo, Phrase, TaskExample, build_vocab, caption_text,
                                           candidate_phrases, clip_tasks, decode_output, encode_example,
                                           example_tokens, parse_timestamps, reference, score_task, select_phrases,
                                           special_tokens, task_prompt, time_token, time_tokens, timestamp_errors,
                                           timestamp_target)

PHRASE = Phrase("open file", "datei öffnen", "ouvrir le fichier")
CLIPS = [ClipInfo("de", "zwei rot", "f2", 210, 65, (0.118, 0.563), (0.402, 0.84)),
         ClipInfo("en", "open file", "m3", 140, 35, (0.1, 0.52), (0.4, 0.9), PHRASE)]
TEXTS = ["zwei rot open file datei öffnen ouvrir le fichier", *LANG_NAMES.values(),
         *(caption_text(v, s, p) for v in ("m3", "f2") for s in (140, 175, 210) for p in (35, 50, 65))]


def chars_of(tokens):
    "Split word tokens into characters, as the decoder emits them."
    return [c for t in tokens for c in ([t] if t.startswith("<|") else list(t))]


# ---- prefixes -----------------------------------------------------------------------------------------------------
def test_hierarchical_prefix_has_qwen_audio_slots():
    p = task_prompt("hierarchical", "transcribe", "de")
    assert p == [SOT, "<|de|>", "<|transcribe|>", "<|de|>", NOTIMESTAMPS]
    assert task_prompt("hierarchical", "timestamps", "de") == p[:-1] + [TIMESTAMPS]
    assert task_prompt("hierarchical", "translate", "en", "fr") == [SOA, "<|en|>", "<|translate|>", "<|fr|>",
                                                                   NOTIMESTAMPS]
    assert task_prompt("hierarchical", "language_id", "nl")[:2] == [SOA, UNKNOWN]     # the language is the question
    assert task_prompt("hierarchical", "caption", "nl") == [SOA, "<|nl|>", "<|caption|>", "<|en|>", NOTIMESTAMPS]


def test_prefixes_identify_the_task_except_none():
    """Within each scheme but 'none', the (task, output language) → prefix map is injective over the tasks a clip of
    each language supports; 'none' gives every task the same prefix; all prefixes encode with the vocabulary."""
    vocab = build_vocab(TEXTS)
    for scheme in ("hierarchical", "flat"):
        for lang in LANGS:
            combos = [("transcribe", None), ("timestamps", None), ("language_id", None), ("caption", None)]
            if lang == "en": combos += [("translate", "de"), ("translate", "fr")]
            prompts = [tuple(task_prompt(scheme, t, lang, l)) for t, l in combos]
            assert len(set(prompts)) == len(prompts), (scheme, lang)
            for p in prompts:
                assert len(vocab.encode("".join(p))) == len(p)           # each tag is one token
    assert {tuple(task_prompt("none", t, "en", "de")) for t in TASKS} == {(SOT,)}
    # language ID must not leak the answer; transcription gets the language it is asked for
    for lang in LANGS:
        assert f"<|{lang}|>" not in task_prompt("hierarchical", "language_id", lang)[:2]


def test_bad_prefix_inputs_name_the_valid_values():
    with pytest.raises(ValueError, match="valid: hierarchical, flat, none, single"): task_prompt("tree", "caption", "en")
    with pytest.raises(ValueError, match="valid: transcribe"): task_prompt("flat", "summarise", "en")
    with pytest.raises(ValueError, match="valid: en, de, nl, fr"): task_prompt("flat", "caption", "es")
    with pytest.raises(ValueError, match="text_lang in de, fr"): task_prompt("hierarchical", "translate", "en", "nl")
    with pytest.raises(ValueError, match="English"): task_prompt("hierarchical", "translate", "de", "fr")


# ---- vocabulary and targets -----------------------------------------------------------------------------------------
def test_vocab_appends_special_tokens_after_characters():
    vocab = build_vocab(TEXTS)
    specials = special_tokens()
    assert vocab.tokens[0] == "<blank>" and vocab.tokens[-len(specials):] == specials
    assert all(len(t) == 1 for t in vocab.tokens[1:-len(specials)])
    assert len(set(specials)) == len(specials)
    with pytest.raises(ValueError, match="delimiters"): build_vocab(["a<b"])


def test_time_tokens_round_to_the_nearest_bin_and_clip():
    tt = time_tokens()
    assert tt[0] == "<|0.00|>" and tt[1] == "<|0.04|>" and tt[-1] == "<|4.00|>" and len(tt) == 101
    for t in [0.0, 0.019, 0.021, 0.5, 1.239, 3.98, 7.0]:
        tok = time_token(t)
        assert tok in tt and abs(float(tok[2:-2]) - min(t, 4.0)) <= 0.02 + 1e-9
    with pytest.raises(ValueError, match="finite"): time_token(float("nan"))


def test_timestamp_targets_round_trip_through_the_parser():
    words, starts, ends = ["zwei", "rot", "und", "blau"], [0.1, 0.52, 1.01, 1.5], [0.43, 0.9, 1.3, 2.05]
    toks = timestamp_target(words, starts, ends)
    w, s, e = parse_timestamps(chars_of(toks))
    assert w == words
    assert all(abs(a - b) <= 0.02 + 1e-9 for a, b in zip(s + e, starts + ends))
    with pytest.raises(ValueError, match="one start and end per word"): timestamp_target(["a"], [0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="ends"): timestamp_target(["a"], [0.5], [0.3])


def test_parser_skips_malformed_output():
    t = ["<|0.12|>", "z", "w", "<|0.20|>",        # a word
         "<|0.24|>", "<|0.28|>", "a", "<|0.40|>",  # an unclosed time then a word: the second time reopens
         "<|0.50|>", "x", " ", "y", "<|0.60|>",    # a 'word' with a space: dropped
         EOT, "q", "<|0.70|>",                     # another special token resets; a dangling word is dropped
         "<|0.80|>", "b"]                          # unclosed at the end
    assert parse_timestamps(t) == (["zw", "a"], [0.12, 0.28], [0.2, 0.4])
    assert parse_timestamps([]) == ([], [], [])


def test_timestamp_errors_against_brute_force():
    """Matched words are the longest common subsequence's; their errors are |Δstart| and |Δend|."""
    ref = (["a", "b", "c", "d"], [0.0, 1.0, 2.0, 3.0], [0.5, 1.5, 2.5, 3.5])
    hyp = (["a", "x", "c", "d", "e"], [0.04, 1.0, 2.08, 2.96, 4.0], [0.5, 1.5, 2.4, 3.5, 4.5])
    errs = timestamp_errors(*ref, *hyp)
    assert sorted(round(x, 6) for x in errs) == sorted([0.04, 0.0, 0.08, 0.1, 0.04, 0.0])
    assert timestamp_errors(*ref, [], [], []) == []


def test_references_and_examples():
    de, en = CLIPS
    assert reference(de, "transcribe") == ["zwei rot"]
    assert reference(de, "language_id") == ["german"]
    assert reference(de, "caption") == ["female, fast, high pitch"]
    assert reference(en, "translate", "fr") == ["ouvrir le fichier"]
    assert len(clip_tasks(de)) == 4 and len(clip_tasks(en)) == 6
    with pytest.raises(ValueError, match="gettext"): reference(de, "translate", "de")
    with pytest.raises(ValueError, match="no caption bin"): caption_text("m1", 140, 35)
    vocab = build_vocab(TEXTS)
    for scheme, (t, l) in itertools.product(SCHEMES, clip_tasks(en)):
        ex = TaskExample(1, t, l)
        ids, n = encode_example(vocab, en, ex, scheme)
        prompt, target = example_tokens(en, ex, scheme)
        assert n == len(prompt) and ids[-1] == vocab.index[EOT]
        assert decode_output(vocab, ids[n:]) == chars_of(target[:-1])


def test_decode_output_stops_at_end_of_text_and_checks_ids():
    vocab = build_vocab(TEXTS)
    ids = vocab.encode("rot") + [vocab.index[EOT]] + vocab.encode("zwei")
    assert decode_output(vocab, ids) == ["r", "o", "t"]
    with pytest.raises(ValueError, match="out of range"): decode_output(vocab, [len(vocab)])


# ---- scoring ----------------------------------------------------------------------------------------------------------
def test_scores_of_perfect_and_wrong_outputs():
    de, en = CLIPS
    ts = [TaskExample(0, "timestamps"), TaskExample(1, "timestamps")]
    perfect = [chars_of(reference(CLIPS[e.clip], "timestamps")) for e in ts]
    s = score_task("timestamps", CLIPS, ts, perfect)
    assert s["WER"] == 0 and s["matched words"] == 1 and s["timestamp error (ms)"] <= 20
    # shifting every time token by one bin adds exactly 40 ms minus the rounding already there
    shifted = [[time_token(float(t[2:-2]) + 0.04) if t.startswith("<|") else t for t in p] for p in perfect]
    s2 = score_task("timestamps", CLIPS, ts, shifted)
    assert s2["timestamp error (ms)"] > s["timestamp error (ms)"] + 20
    tr = [TaskExample(1, "translate", "de"), TaskExample(1, "translate", "fr")]
    assert score_task("translate", CLIPS, tr, [list("datei öffnen"), list("ouvrir le fichier")])["exact match"] == 1
    assert score_task("translate", CLIPS, tr, [list("datei"), list("fermer")])["exact match"] == 0
    lid = [TaskExample(0, "language_id"), TaskExample(1, "language_id")]
    assert score_task("language_id", CLIPS, lid, [list("german"), list("dutch")])["accuracy"] == 0.5
    cap = [TaskExample(0, "caption")]
    c = score_task("caption", CLIPS, cap, [list("female, slow, high pitch")])
    assert (c["accuracy"], c["gender acc."], c["rate acc."], c["pitch acc."]) == (0, 1, 0, 1)
    asr = [TaskExample(0, "transcribe")]
    assert score_task("transcribe", CLIPS, asr, [list("zwei rot")]) == {"WER": 0.0, "CER": 0.0}
    with pytest.raises(ValueError, match="every example must be"): score_task("transcribe", CLIPS, lid, [[], []])
    with pytest.raises(ValueError, match="one output per example"): score_task("caption", CLIPS, cap, [])


# ---- gettext phrases ----------------------------------------------------------------------------------------------------
def test_phrases_are_speakable_and_deterministic():
    pool = candidate_phrases()
    assert len(pool) > 100 and len({p.en for p in pool}) == len(pool)
    for p in pool:
        assert p.en.replace(" ", "").isascii() and p.en.replace(" ", "").isalpha() and len(p.en.split()) <= 2
        assert p.de != p.en and p.fr != p.en and "<" not in p.de + p.fr
    assert select_phrases(12, 3) == select_phrases(12, 3) != select_phrases(12, 4)
    with pytest.raises(ValueError, match="n must be in"): select_phrases(0)


# ---- clips, model, inference and training (fake corpora: no espeak-ng needed) ------------------------------------------
import random

import numpy as np
import torch

from paper_repro.speech.corpus import CorpusSpec, SpeechCorpus
from paper_repro.speech.qwen_audio import (ClipSet, QwenAudioTrainConfig, batch_loss, corpus_specs, encode_clips,
                                           evaluate, run_examples, sample_task_batch, train_model)
from paper_repro.speech.seq2seq import Seq2SeqConfig, SpeechSeq2Seq, attention_greedy_decode


def fake_corpus(kind, texts, seed=0, lang="de"):
    """A SpeechCorpus of random 'speech' (noise bursts where the words are) with exact metadata, built without espeak."""
    rng = np.random.default_rng(seed)
    spec = CorpusSpec(kind="texts", n=len(texts), texts=tuple((lang, t) for t in texts)) if kind == "texts" else \
        CorpusSpec(kind="words", n=len(texts), langs=(lang,))
    records, pieces = [], []
    for i, text in enumerate(texts):
        n = int(rng.integers(4000, 9000))
        x = (rng.standard_normal(n) * 3000).astype(np.int16)
        words = text.split()
        starts = [0.05 + 0.2 * k for k in range(len(words))]
        records.append(dict(id=f"x{i}", lang=lang, text=text, item=str(i), voice=lang, variant=["m3", "f2"][i % 2],
                            speed=[140, 175, 210][i % 3], pitch=[35, 50, 65][i % 3], speed_factor=1.0, snr_db=None,
                            gain_db=0.0, word_starts=starts, word_ends=[s + 0.15 for s in starts]))
        pieces.append(x)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return SpeechCorpus(spec, seed, records, np.concatenate(pieces), offsets, "fake")


@pytest.fixture(scope="module")
def setup():
    clips = ClipSet([fake_corpus("words", ["zwei rot", "rot", "zwei zwei rot", "rot zwei"], lang="de"),
                     fake_corpus("texts", ["open file", "open file"], seed=1, lang="en")], [PHRASE])
    vocab = build_vocab(TEXTS)
    torch.manual_seed(0)
    model = SpeechSeq2Seq(Seq2SeqConfig(len(vocab), n_mels=16, d_model=32, enc_layers=1, dec_layers=1, n_heads=2,
                                        d_ff=64)).eval()
    return clips, vocab, model


def test_clipset_joins_corpora_and_tasks(setup):
    clips, _, _ = setup
    assert len(clips) == 6 and clips.clips[4].phrase == PHRASE and clips.clips[0].phrase is None
    exs = clips.examples()
    assert len(exs) == 6 * 4 + 2 * 2
    assert {(e.task, e.text_lang) for e in exs if e.clip == 5} == set(clip_tasks(clips.clips[5]))
    assert all(e.task == "caption" for e in clips.examples(["caption"]))
    wave, lens = clips.batch([5, 0])
    assert wave.shape == (2, int(lens.max())) and lens[0] == len(clips.corpora[1].samples(1))
    with pytest.raises(ValueError, match="valid: transcribe"): clips.examples(["dance"])
    specs = corpus_specs(10, 5, [PHRASE])
    assert specs[0].speed_factors == specs[1].speed_factors == (1.0,)       # caption bins stay exact
    assert specs[1].texts == (("en", "open file"),)


def test_cached_features_give_the_models_encoding(setup):
    """encode_clips (front-end features computed once, cached, re-padded) equals SpeechSeq2Seq.encode on raw audio."""
    clips, _, model = setup
    idx = [3, 0, 5, 1]
    with torch.no_grad():
        h1, l1 = model.encode(*clips.batch(idx))
        h2, l2 = encode_clips(model, clips, idx)
        h3, _ = encode_clips(model, clips, idx)          # from the cache
    assert torch.equal(l1, l2)
    for r, n in enumerate(l1.tolist()):
        assert torch.allclose(h1[r, :n], h2[r, :n], atol=1e-4) and torch.equal(h2, h3)


def naive_greedy(model, vocab, clips, ex, scheme, max_new=12):
    "Reference decoder: full forward pass per step (no KV cache, batch of one), float64."
    prompt_ids, n = encode_example(vocab, clips.clips[ex.clip], ex, scheme)
    seq = prompt_ids[:n]
    hidden, hlen = encode_clips(model, clips, [ex.clip])
    mem = model.decoder.encode_memory(hidden, hlen)
    for _ in range(max_new):
        nxt = int(model.decoder(torch.tensor([seq]), memory=mem)[0, -1].argmax())
        if nxt == vocab.index[EOT]: break
        seq.append(nxt)
    return decode_output(vocab, seq[n:])


def test_batched_inference_equals_a_naive_decoder(setup):
    clips, vocab, model = setup
    m = SpeechSeq2Seq(model.cfg).double().eval()
    torch.manual_seed(1)
    with torch.no_grad():     # large random weights, so the outputs are long and differ between prompts
        for p in m.parameters(): p.normal_(0, 0.5)
    exs = [e for e in clips.examples() if e.clip in (0, 4)]
    for scheme in ("hierarchical", "flat", "none"):
        outs = run_examples(m, vocab, clips, exs, scheme, max_new_tokens=12, batch_size=3)
        assert outs == [naive_greedy(m, vocab, clips, e, scheme) for e in exs]
        if scheme == "none":         # one prefix for every task: the same output for every task of a clip
            for c in (0, 4):
                assert len({tuple(o) for e, o in zip(exs, outs) if e.clip == c}) == 1
        else:
            assert len({tuple(o) for e, o in zip(exs, outs) if e.clip == 4}) > 1


def test_batch_loss_uses_ctc_only_on_transcription_rows(setup):
    clips, vocab, model = setup
    cap = [TaskExample(0, "caption"), TaskExample(4, "translate", "fr")]
    out = batch_loss(model, vocab, clips, cap, "hierarchical", ctc_weight=0.3)
    assert float(out["ctc"].detach()) == 0.0 and torch.allclose(out["total"], 0.7 * out["att"])
    mixed = cap + [TaskExample(1, "transcribe")]
    out2 = batch_loss(model, vocab, clips, mixed, "hierarchical", ctc_weight=0.3)
    assert float(out2["ctc"].detach()) > 0
    with pytest.raises(ValueError, match="ctc_weight"): batch_loss(model, vocab, clips, cap, "flat", ctc_weight=1.0)


def test_task_uniform_sampling():
    by_task = {"transcribe": [TaskExample(i, "transcribe") for i in range(50)], "caption": [TaskExample(0, "caption")],
               "translate": []}
    batch = sample_task_batch(by_task, 4000, random.Random(0))
    share = sum(e.task == "caption" for e in batch) / len(batch)
    assert 0.45 < share < 0.55 and not any(e.task == "translate" for e in batch)
    with pytest.raises(ValueError, match="no examples"): sample_task_batch({"caption": []}, 2, random.Random(0))


def test_data_matched_single_task_sees_as_many_examples_of_its_task():
    from dataclasses import asdict
    from paper_repro.speech.qwen_audio import data_matched
    cfg = QwenAudioTrainConfig(steps=2500, batch=16, warmup=100, eval_every=250)
    dm = data_matched(cfg, len(TASKS))
    assert (dm.steps, dm.warmup, dm.eval_every) == (500, 20, 50)
    assert {k: v for k, v in asdict(dm).items() if k not in ("steps", "warmup", "eval_every")} == \
        {k: v for k, v in asdict(cfg).items() if k not in ("steps", "warmup", "eval_every")}
    # the multi-task model's uniform task sampling gives each task about as many examples as dm's whole run
    by_task = {t: [TaskExample(0, t)] for t in TASKS}
    rng = random.Random(0)
    counts = {t: 0 for t in TASKS}
    for _ in range(cfg.steps):
        for e in sample_task_batch(by_task, cfg.batch, rng): counts[e.task] += 1
    assert all(abs(n / (dm.steps * dm.batch) - 1) < 0.05 for n in counts.values()), counts
    assert data_matched(QwenAudioTrainConfig(steps=4, warmup=100, eval_every=2), 5).steps == 1     # never zero steps
    with pytest.raises(ValueError, match="n_tasks"): data_matched(cfg, 0)


def test_training_learns_the_prefix(setup):
    """A few dozen steps on two clips: the tagged model learns to give each task its own answer for the same audio."""
    clips, vocab, _ = setup
    torch.manual_seed(0)
    m = SpeechSeq2Seq(Seq2SeqConfig(len(vocab), n_mels=16, d_model=32, enc_layers=1, dec_layers=1, n_heads=2, d_ff=64))
    exs = [e for e in clips.examples(["language_id", "caption", "transcribe"]) if e.clip in (0, 4)]
    hist = train_model(m, vocab, clips, exs, "hierarchical",
                       QwenAudioTrainConfig(steps=80, batch=8, lr=1e-2, warmup=5, eval_every=40), seed=0)
    assert [h["step"] for h in hist] == [40, 80] and hist[-1]["att"] < 0.2
    res = evaluate(m, vocab, clips, exs, "hierarchical", ("language_id", "caption", "transcribe"))
    assert res["language_id"]["accuracy"] == 1 and res["caption"]["accuracy"] == 1 and res["transcribe"]["WER"] == 0
    with pytest.raises(ValueError, match="unknown scheme"):
        train_model(m, vocab, clips, exs, "tree", QwenAudioTrainConfig())


def test_example_stats_sum_to_the_headline_metric_and_bootstrap():
    from paper_repro.speech.qwen_audio import HEADLINE, example_stats, paired_bootstrap
    de, en = CLIPS
    cases = {
        "transcribe": ([TaskExample(0, "transcribe"), TaskExample(1, "transcribe")],
                       [list("zwei rot rot"), list("open")]),
        "timestamps": ([TaskExample(0, "timestamps"), TaskExample(1, "timestamps")],
                       [chars_of(timestamp_target(["zwei"], [0.2], [0.5])),
                        chars_of(timestamp_target(["open", "file"], [0.1, 0.6], [0.4, 0.9]))]),
        "translate": ([TaskExample(1, "translate", "de"), TaskExample(1, "translate", "fr")],
                      [list("datei öffnen"), list("fermer")]),
        "language_id": ([TaskExample(0, "language_id"), TaskExample(1, "language_id")], [list("german"), list("x")]),
        "caption": ([TaskExample(0, "caption"), TaskExample(1, "caption")],
                    [list("female, fast, high pitch"), list("male, slow, low pitch")]),
    }
    for task, (exs, outs) in cases.items():
        st = [example_stats(task, CLIPS[e.clip], e, o) for e, o in zip(exs, outs)]
        metric = sum(n for n, _ in st) / sum(d for _, d in st)
        assert metric == pytest.approx(score_task(task, CLIPS, exs, outs)[HEADLINE[task][0]]), task
    # bootstrap: identical sides give zero; a uniformly better side gives a positive interval
    same = [(1.0, 1.0), (0.0, 1.0)] * 20
    assert paired_bootstrap(same, same, True) == (0.0, 0.0, 0.0)
    good, bad = [(1.0, 1.0)] * 30, [(0.0, 1.0)] * 15 + [(1.0, 1.0)] * 15
    d, lo, hi = paired_bootstrap(good, bad, True)
    assert d == pytest.approx(0.5) and 0 < lo <= d <= hi
    assert paired_bootstrap(bad, good, False)[0] == pytest.approx(0.5)   # lower is better: B's higher value loses
    with pytest.raises(ValueError, match="equally long"): paired_bootstrap(good, bad[:3], True)


def _pre_fit_train_model(model, vocab, clips, examples, scheme, cfg, seed=0, eval_fn=None):
    "The training loop of this notebook before it moved onto `core.train.fit` (commit d0e4065), kept as the reference."
    from paper_repro.core.train import warmup_cosine
    by_task = {t: [ex for ex in examples if ex.task == t] for t in TASKS}
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.steps, cfg.warmup))
    history = []
    model.train()
    for step in range(1, cfg.steps + 1):
        loss = batch_loss(model, vocab, clips, sample_task_batch(by_task, cfg.batch, rng), scheme, cfg.ctc_weight)
        opt.zero_grad(set_to_none=True)
        loss["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step(); sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec = dict(step=step, **{k: float(v.detach()) for k, v in loss.items()})
            if eval_fn is not None: rec["eval"] = eval_fn(step)
            history.append(rec)
    model.eval()
    return history


def test_train_model_on_fit_takes_the_steps_of_the_pre_fit_loop(setup):
    "The notebook's model size and optimiser settings, a few steps: bit-identical parameters and history."
    clips, vocab, _ = setup
    cfg = QwenAudioTrainConfig(steps=7, batch=16, lr=2e-3, warmup=3, eval_every=3, clip_norm=0.5)
    exs = clips.examples()
    runs = []
    for train in (_pre_fit_train_model, train_model):
        torch.manual_seed(0)
        m = SpeechSeq2Seq(Seq2SeqConfig(len(vocab), n_mels=40, d_model=80, enc_layers=3, dec_layers=2, n_heads=4,
                                        d_ff=192))
        ev = lambda step: evaluate(m, vocab, clips, exs[:6], "hierarchical", ("transcribe", "language_id"))
        hist = train(m, vocab, clips, exs, "hierarchical", cfg, seed=3, eval_fn=ev)
        runs.append((m, hist))
    (old, h_old), (new, h_new) = runs
    assert h_new == h_old and [h["step"] for h in h_new] == [3, 6, 7] and not new.training
    for (name, a), b in zip(old.named_parameters(), new.parameters()): assert torch.equal(a, b), name


def test_tasks_won_counts_wins_with_a_bootstrap_interval():
    from paper_repro.speech.qwen_audio import ratio_estimate, tasks_won
    perfect = {"language_id": [(1.0, 1.0)] * 20, "caption": [(1.0, 1.0)] * 20, "transcribe": [(0.0, 3.0)] * 20}
    poor = {"language_id": [(0.0, 1.0)] * 20, "caption": [(1.0, 1.0)] * 10 + [(0.0, 1.0)] * 10,
            "transcribe": [(3.0, 3.0)] * 20}
    w = tasks_won(perfect, poor, n_boot=200)
    assert (w.value, w.low, w.high, w.method, w.n) == (3.0, 3.0, 3.0, "bootstrap", 60)
    assert tasks_won(poor, perfect, n_boot=200).value == 0.0          # lower WER is better: poor wins nothing
    mixed = {**poor, "caption": [(0.0, 1.0)] + [(1.0, 1.0)] * 11 + [(0.0, 1.0)] * 8}   # 11 vs 10, not item by item
    m = tasks_won(mixed, poor, n_boot=500)
    assert m.value == 3.0 and m.low < 3.0                              # ties win; the near tie is not sure
    ts = {"timestamps": [(0.0, 0.0)] * 5}                              # nothing matched: undefined, counts as worst
    assert tasks_won(ts, {"timestamps": [(10.0, 2.0)] * 5}, n_boot=100).value == 0.0
    with pytest.raises(ValueError, match="same non-empty tasks"): tasks_won(perfect, {"caption": poor["caption"]})
    assert ratio_estimate([(30.0, 2.0), (10.0, 2.0)], n_boot=200).value == pytest.approx(10.0)
    with pytest.raises(ValueError, match="undefined"): ratio_estimate([(0.0, 0.0), (0.0, 0.0)])
