"Subtitle ASR: the verbatim → subtitle rules, the token layout, and the masked multi-target model (four variants)."
import numpy as np
import pytest
import sacrebleu
import torch

from paper_repro.speech.subtitle_asr import (ADVERBS, ARCHS, FILLERS, NUMBERS, SPECIALS, ScriptConfig, SubtitleASR,
                                             SubtitleASRConfig, SubtitleClip, SubtitleTrainConfig, collate, condense,
                                             ids_to_text, lexicon, make_script, make_scripts, script_corpus_spec,
                                             subtitle_bleu, subtitle_vocab, train_subtitle_asr,
                                             transcribe_and_subtitle)


# ---------------------------------------------------------------- verbatim -> subtitle rules
def test_condense_each_rule():
    assert condense("euh ik ehm heb allee drie honden".split()) == "ik heb 3 honden".split()      # fillers, digits
    assert condense("ik euh ik ik heb twaalf katten".split()) == "ik heb 12 katten".split()       # false starts
    assert condense("ge hebt ne hond".split()) == "je hebt een hond".split()                     # dialect
    assert condense("gij ziet op dit moment heel veel vogels".split()) == "jij ziet nu veel vogels".split()
    assert condense("wij hebben eigenlijk gewoon tien boeken".split()) == "wij hebben 10 boeken".split()
    assert condense("we we uh actually have at the moment fifty dogs".split(), "en") == "we have now 50 dogs".split()


def test_condense_optional_edits_follow_their_probabilities():
    words = "wij hebben eigenlijk op dit moment vier honden".split()
    rng = np.random.default_rng(0)
    assert condense(words, rng=rng, p_shorten=0.0, p_drop=0.0) == "wij hebben eigenlijk op dit moment 4 honden".split()
    assert condense(words, rng=rng, p_shorten=1.0, p_drop=1.0) == "wij hebben nu 4 honden".split()
    kept = sum("eigenlijk" in condense(words, rng=rng, p_drop=0.7) for _ in range(2000)) / 2000
    assert abs(kept - 0.3) < 0.05


@pytest.mark.parametrize("lang", ["nl", "en"])
def test_scripts_properties(lang):
    scripts = make_scripts(500, lang, seed=3)
    lex = set(lexicon(lang))
    for s in scripts:
        v, sub = s.verbatim.split(), s.subtitle.split()
        assert set(v) <= lex and set(sub) <= lex and sub
        assert not set(sub) & set(FILLERS[lang]) and not set(sub) & set(NUMBERS[lang])
        assert all(a != b for a, b in zip(sub, sub[1:]))                       # no repetition survives
        assert len(sub) <= len(v)
    # with every optional edit applied, the subtitle is the deterministic rule output, and the rules are idempotent
    full = make_scripts(300, lang, seed=4, cfg=ScriptConfig(p_shorten=1.0, p_drop=1.0))
    for s in full:
        assert s.subtitle.split() == condense(s.verbatim.split(), lang)
        assert condense(s.subtitle.split(), lang) == s.subtitle.split()
    # every phenomenon occurs
    text = " ".join(s.verbatim for s in scripts).split()
    assert set(text) & set(FILLERS[lang]) and set(text) & set(ADVERBS[lang]) and set(text) & set(NUMBERS[lang])
    assert any(s.verbatim.split()[0] == s.verbatim.split()[1] for s in scripts)


def test_scripts_are_seeded():
    assert make_scripts(50, "nl", 1) == make_scripts(50, "nl", 1)
    assert make_scripts(50, "nl", 1) != make_scripts(50, "nl", 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="valid: nl, en"): condense(["a"], "fr")
    with pytest.raises(ValueError, match="p_drop"): condense(["a"], "nl", p_drop=1.5)
    with pytest.raises(ValueError, match="p_repeat"): ScriptConfig(p_repeat=-0.1)
    with pytest.raises(ValueError, match="at least 1"): make_scripts(0)
    v = subtitle_vocab("nl")
    with pytest.raises(ValueError, match="not in the vocabulary"): v.encode_words("ik heb xylofoon", SPECIALS)
    with pytest.raises(ValueError, match="not in the vocabulary"): v.encode_words("ik <eos>", SPECIALS)
    with pytest.raises(ValueError, match="at least one script"): script_corpus_spec([])
    with pytest.raises(ValueError, match="references but"): subtitle_bleu(["a b"], [])
    with pytest.raises(ValueError, match="valid: verbatim, pooled, shared, cascade"): _cfg("dual")
    with pytest.raises(ValueError, match="ctc_weight"): _cfg("cascade", ctc_weight=1.2)
    with pytest.raises(ValueError, match="sub_ctc_weight"): _cfg("cascade", sub_ctc_weight=-0.1)


# ---------------------------------------------------------------- tokens, corpus spec, metrics
def test_vocab_layout_and_round_trip():
    v = subtitle_vocab("nl")
    assert v.blank == 0 and v.tokens[-len(SPECIALS):] == list(SPECIALS)
    s = make_scripts(20, "nl", 0)
    for x in s:
        assert ids_to_text(v.encode_words(x.subtitle, SPECIALS), v) == x.subtitle
    ids = v.encode_words(s[0].verbatim, SPECIALS)
    assert ids_to_text([v.index["<verbatim>"], 0, *ids, v.index["<eos>"]], v) == s[0].verbatim
    spec = script_corpus_spec(s[:3], variants=(None,), speeds=(175,), pitches=(50,))
    assert spec.kind == "texts" and spec.n == 3 and spec.texts[1] == ("nl", s[1].verbatim)


def test_bleu_is_sacrebleu_corpus_bleu():
    refs, hyps = ["ik heb 3 honden", "het kost 20 euro"], ["ik heb 3 katten", "het kost 20 euro"]
    assert subtitle_bleu(refs, hyps) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert subtitle_bleu(refs, refs) == pytest.approx(100.0)


# ---------------------------------------------------------------- the model
VOCAB = subtitle_vocab("nl")


def _cfg(arch, **kw):
    sizes = dict(n_mels=12, d_model=16, enc_layers=2, enc2_layers=1, dec_layers=1, n_heads=2, d_ff=32, subsample=2)
    return SubtitleASRConfig.for_vocab(arch, VOCAB, **{**sizes, **kw})


def _model(arch, seed=0, **kw):
    torch.manual_seed(seed)
    m = SubtitleASR(_cfg(arch, **kw)).double().eval()
    with torch.no_grad():   # larger random weights: a wrong mask shows up far above rounding error
        for p in m.parameters(): p.normal_(0, 0.2)
    return m


def _batch(lengths=(17, 9, 13, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    clips = [torch.randn(n, 12, generator=g, dtype=torch.float64) for n in lengths]
    s = make_scripts(len(lengths), "nl", seed)
    return (clips, [VOCAB.encode_words(x.verbatim, SPECIALS)[:3] for x in s],
            [VOCAB.encode_words(x.subtitle, SPECIALS)[:3] for x in s])


def _loss(model, clips, verb, sub):
    feats, flen = collate([SubtitleClip(f, None, None) for f in clips])
    return model.loss(feats, flen, verb, sub)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_uses_only_the_targets_that_exist(arch):
    "Batch loss with mixed rows == each term computed on its own rows alone (padding and absent targets are invisible)."
    m = _model(arch)
    clips, verb, sub = _batch()
    v = [verb[0], None, verb[2], None]          # rows 0, 2: verbatim only; rows 1, 3: subtitle only
    s = [None, sub[1], None, sub[3]]
    out = _loss(m, clips, v, s)
    lam = m.cfg.ctc_weight
    ref_v = _loss(m, [clips[0], clips[2]], [verb[0], verb[2]], [None, None])
    if arch == "pooled":   # a subtitle-only row is trained exactly like a verbatim row with that text
        ref_s = _loss(m, [clips[1], clips[3]], [sub[1], sub[3]], [None, None])
        torch.testing.assert_close(out["att_subtitle"], torch.zeros((), dtype=torch.float64))
    else:
        ref_s = _loss(m, [clips[1], clips[3]], [None, None], [sub[1], sub[3]])
        assert float(ref_v["att_subtitle"]) == 0.0 and float(ref_v["ctc_subtitle"]) == 0.0
        assert float(ref_s["ctc"]) == 0.0 and float(ref_s["att_verbatim"]) == 0.0
    if arch == "verbatim":
        torch.testing.assert_close(out["total"], ref_v["total"], rtol=1e-10, atol=1e-12)
        assert float(ref_s["total"]) == 0.0
    elif arch == "pooled":   # per-token means over the union of rows: compare with all four rows as verbatim
        ref = _loss(m, clips, [verb[0], sub[1], verb[2], sub[3]], [None] * 4)
        torch.testing.assert_close(out["total"], ref["total"], rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(out["ctc"], ref_v["ctc"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out["att_verbatim"], ref_v["att_verbatim"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out["att_subtitle"], ref_s["att_subtitle"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out["ctc_subtitle"], ref_s["ctc_subtitle"], rtol=1e-10, atol=1e-12)
        mu = m.cfg.sub_ctc_weight
        assert mu > 0 and float(ref_s["ctc_subtitle"].detach()) > 0
        torch.testing.assert_close(out["total"], lam * ref_v["ctc"] + (1 - lam) * ref_v["att_verbatim"] +
                                   mu * ref_s["ctc_subtitle"] + (1 - mu) * ref_s["att_subtitle"], rtol=1e-10, atol=1e-12)
    assert float(out["total"].detach()) > 0


def _grads(m, clips, v, s):
    m.zero_grad(set_to_none=True)
    _loss(m, clips, v, s)["total"].backward()
    norm = lambda mod: sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)
    return norm


def test_cascade_subtitle_rows_train_encoder_one_but_not_the_verbatim_heads():
    m = _model("cascade")
    clips, verb, sub = _batch()
    norm = _grads(m, clips, [None] * 4, sub)
    assert norm(m.sub_decoder) > 0 and norm(m.sub_encoder) > 0 and norm(m.sub_ctc) > 0
    assert norm(m.asr.encoder.layers) > 0 and norm(m.asr.subsample) > 0      # subtitle audio shapes encoder 1
    assert norm(m.asr.decoder) == 0 and norm(m.asr.encoder.lm_head) == 0     # ... but not the verbatim heads
    norm = _grads(m, clips, verb, [None] * 4)
    assert norm(m.sub_decoder) == 0 and norm(m.sub_encoder) == 0 and norm(m.sub_ctc) == 0 and norm(m.asr.decoder) > 0


def test_shared_subtitle_decoder_reads_encoder_one():
    m = _model("shared")
    assert not hasattr(m, "sub_encoder")
    clips, _, _ = _batch()
    feats, flen = collate([SubtitleClip(f, None, None) for f in clips])
    h, hl = m.encode_features(feats, flen)
    assert m.subtitle_states(h, hl) is h
    c = _model("cascade")
    h, hl = c.encode_features(feats, flen)
    assert c.subtitle_states(h, hl).shape == h.shape and not torch.allclose(c.subtitle_states(h, hl), h)


def _brute_greedy(decoder, memory_states, hl, start, eos, n):
    "Greedy decoding by full recomputation (no cache), one row at a time."
    out = []
    for b in range(memory_states.shape[0]):
        mem = decoder.encode_memory(memory_states[b:b + 1, :int(hl[b])])
        toks = [start]
        for _ in range(n):
            nxt = int(decoder(torch.tensor([toks]), memory=mem)[0, -1].argmax())
            if nxt == eos: break
            toks.append(nxt)
        out.append(toks[1:])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_transcribe_greedy_matches_brute_force(arch):
    m = _model(arch, seed=2)
    clips, _, _ = _batch((11, 5, 8))
    feats, flen = collate([SubtitleClip(f, None, None) for f in clips])
    # λ = 0: greedy
    verb, sub = transcribe_and_subtitle(m, feats, flen, beam=1, ctc_weight=0.0, sub_beam=1, max_new_tokens=6)
    with torch.no_grad():
        h, hl = m.encode_features(feats, flen)
        c = m.cfg
        assert verb == _brute_greedy(m.asr.decoder, h, hl, c.verbatim_id, c.eos_id, 6)
        if m.has_subtitle_branch:
            assert sub == _brute_greedy(m.sub_decoder, m.subtitle_states(h, hl), hl, c.subtitle_id, c.eos_id, 6)
        else:
            assert sub == verb
    assert any(len(v) for v in verb)


def test_transcribe_joint_beam_runs_and_stays_in_vocabulary():
    m = _model("cascade", seed=3)
    clips, _, _ = _batch((15, 7))
    feats, flen = collate([SubtitleClip(f, None, None) for f in clips])
    verb, sub = transcribe_and_subtitle(m, feats, flen, beam=3, ctc_weight=0.3, sub_beam=2, max_new_tokens=5)
    assert len(verb) == len(sub) == 2
    specials = {VOCAB.index[s] for s in SPECIALS}
    for v in verb: assert all(1 <= t < len(VOCAB) and t not in specials for t in v)   # CTC: no specials but eos
    for s in sub: assert len(s) <= 5


def test_training_reduces_the_loss_and_skips_subtitles_for_verbatim_only():
    torch.manual_seed(0)
    clips, verb, sub = _batch((10, 12, 8, 9, 11, 7))
    vclips = [SubtitleClip(f.float(), v, None) for f, v in zip(clips[:3], verb[:3])]
    sclips = [SubtitleClip(f.float(), None, s) for f, s in zip(clips[3:], sub[3:])]
    cfg = SubtitleTrainConfig(steps=60, n_verbatim=3, n_subtitle=3, lr=3e-3, warmup=5)
    m = SubtitleASR(_cfg("cascade"))
    hist = train_subtitle_asr(m, vclips, sclips, cfg, seed=0)
    assert [h["step"] for h in hist] == [50, 60] and hist[-1]["total"] < hist[0]["total"] and hist[-1]["att_subtitle"] > 0
    assert not m.training
    v = SubtitleASR(_cfg("verbatim"))
    hist = train_subtitle_asr(v, vclips, sclips, SubtitleTrainConfig(steps=3, n_verbatim=3, warmup=1), seed=0)
    assert all(h["att_subtitle"] == 0 for h in hist)
    with pytest.raises(ValueError, match="at least one verbatim clip"): train_subtitle_asr(v, [], sclips, cfg)


def test_attention_only_subtitle_branch():
    "sub_ctc_weight = 0: no subtitle CTC head, no subtitle CTC loss, attention-only subtitle decoding."
    m = _model("cascade", sub_ctc_weight=0.0)
    assert not hasattr(m, "sub_ctc")
    clips, verb, sub = _batch()
    out = _loss(m, clips, [None] * 4, sub)
    assert float(out["ctc_subtitle"]) == 0.0
    torch.testing.assert_close(out["total"], out["att_subtitle"], rtol=1e-12, atol=1e-12)
    feats, flen = collate([SubtitleClip(f, None, None) for f in clips])
    _, s_beam = transcribe_and_subtitle(m, feats, flen, beam=1, ctc_weight=0.3, sub_beam=1, max_new_tokens=5)
    _, s_greedy = transcribe_and_subtitle(m, feats, flen, beam=1, ctc_weight=0.0, sub_beam=1, max_new_tokens=5)
    assert s_beam == s_greedy    # the subtitle branch ignores λ when it has no CTC head


def _pre_fit_train_subtitle_asr(model, verbatim_clips, subtitle_clips, cfg, seed=0):
    "The training loop of this notebook before it moved onto `core.train.fit` (commit d0e4065), kept as the reference."
    from paper_repro.core.train import warmup_cosine
    if model.cfg.arch == "verbatim": subtitle_clips = []
    dev = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.steps, cfg.warmup, floor=0.1, decay_after_warmup=True))
    history, acc = [], {}
    model.train()
    for step in range(cfg.steps):
        batch = [verbatim_clips[i] for i in rng.choice(len(verbatim_clips), min(cfg.n_verbatim, len(verbatim_clips)),
                                                        replace=False)]
        if subtitle_clips:
            batch += [subtitle_clips[i] for i in rng.choice(len(subtitle_clips),
                                                             min(cfg.n_subtitle, len(subtitle_clips)), replace=False)]
        feats, flen = collate(batch, dev)
        out = model.loss(feats, flen, [c.verbatim for c in batch], [c.subtitle for c in batch])
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step(); sched.step()
        for k, v in out.items(): acc[k] = acc.get(k, 0.0) + v.detach()
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            n = (step % 50) + 1
            history.append(dict(step=step + 1, **{k: float(v) / n for k, v in acc.items()})); acc = {}
    model.eval()
    return history


@pytest.mark.parametrize("sizes, steps", [
    (dict(n_mels=40, d_model=64, enc_layers=3, enc2_layers=2, dec_layers=1, n_heads=4, d_ff=128, subsample=8), 6),
    (dict(n_mels=12, d_model=16, enc_layers=1, enc2_layers=1, dec_layers=1, n_heads=2, d_ff=32, subsample=2), 53)])
def test_training_on_fit_takes_the_steps_of_the_pre_fit_loop(sizes, steps):
    "The notebook's model (a few steps) and a tiny one (two log intervals): bit-identical parameters and history."
    g = torch.Generator().manual_seed(0)
    s = make_scripts(30, "nl", 4)
    feats = [torch.randn(int(n), sizes["n_mels"], generator=g) for n in torch.randint(30, 90, (30,), generator=g)]
    vclips = [SubtitleClip(f, VOCAB.encode_words(x.verbatim, SPECIALS), None) for f, x in zip(feats[:10], s)]
    sclips = [SubtitleClip(f, None, VOCAB.encode_words(x.subtitle, SPECIALS)) for f, x in zip(feats[10:], s[10:])]
    cfg = SubtitleTrainConfig(steps=steps, n_verbatim=4, n_subtitle=6, lr=3e-3, warmup=3, clip_norm=0.5)
    runs = []
    for train in (_pre_fit_train_subtitle_asr, train_subtitle_asr):
        torch.manual_seed(0)
        m = SubtitleASR(SubtitleASRConfig.for_vocab("cascade", VOCAB, **sizes))
        runs.append((m, train(m, vclips, sclips, cfg, seed=2)))
    (old, h_old), (new, h_new) = runs
    assert h_new == h_old and len(h_new) == (2 if steps > 50 else 1)
    for (name, a), b in zip(old.named_parameters(), new.parameters()): assert torch.equal(a, b), name


def test_bleu_diff_bootstrap_is_a_difference_of_sacrebleu_corpus_scores():
    from paper_repro.speech.subtitle_asr import bleu_diff_bootstrap, make_scripts, subtitle_bleu
    s = make_scripts(60, "nl", seed=3)
    refs, verb = [x.subtitle for x in s], [x.verbatim for x in s]
    d = bleu_diff_bootstrap(refs, refs, verb, n_boot=300, seed=0)
    assert d.value == pytest.approx(subtitle_bleu(refs, refs) - subtitle_bleu(refs, verb))
    assert d.method == "bootstrap" and d.n == 60 and 0 < d.low <= d.value <= d.high
    swapped = bleu_diff_bootstrap(refs, verb, refs, n_boot=300, seed=0)
    assert swapped.value == pytest.approx(-d.value) and swapped.high < 0
    with pytest.raises(ValueError, match="one hypothesis per reference"): bleu_diff_bootstrap(refs, verb[:5], refs)
