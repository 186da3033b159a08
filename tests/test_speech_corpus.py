"""paper_repro.speech.corpus: espeak-ng wrapper, timestamps, augmentation, determinism, cache."""
import json

import numpy as np
import pytest

import paper_repro.speech.corpus as sc
from paper_repro.speech.corpus import (CorpusSpec, EspeakNotFoundError, add_noise, apply_gain, build_corpus,
                                       cache_path, digit_words, layout_words, speed_perturb, synthesize, trim_silence)

needs_espeak = pytest.mark.skipif(not sc.espeak_available(),
                                  reason="espeak-ng is not installed (sudo apt-get install espeak-ng, or make test)")
SMALL = CorpusSpec(kind="digits", n=6, langs=("en", "de"), min_words=2, max_words=4)


def test_missing_binary_gives_install_instructions(monkeypatch):
    monkeypatch.setattr(sc, "ESPEAK_EXE", "espeak-ng-definitely-not-installed")
    assert not sc.espeak_available()
    with pytest.raises(EspeakNotFoundError, match="sudo apt-get install espeak-ng.*make test"):
        synthesize("hello")
    with pytest.raises(RuntimeError, match="espeak-ng-definitely-not-installed"):
        build_corpus(SMALL, 0, cache=False)


def test_spec_validation_names_valid_values():
    with pytest.raises(ValueError, match="valid: digits, words, sentences, texts"): CorpusSpec(kind="numbers")
    with pytest.raises(ValueError, match="valid: en, de, nl, fr"): CorpusSpec(langs=("es",))
    with pytest.raises(ValueError, match="min_words"): CorpusSpec(min_words=4, max_words=2)
    with pytest.raises(ValueError, match="texts"): CorpusSpec(kind="texts")
    with pytest.raises(ValueError, match="valid: en, de, nl, fr"): digit_words("12", "xx")


def test_layout_timestamps_are_exact():
    clips = [np.full(100, 0.5, np.float32), np.full(37, -0.5, np.float32), np.full(5, 0.25, np.float32)]
    wa = layout_words(clips, ["a", "b", "c"], [0.01, 0.002], edge_s=0.005, sample_rate=1000)
    assert wa.starts == [0.005, 0.115, 0.154] and wa.ends == [0.105, 0.152, 0.159]
    for clip, s, e in zip(clips, wa.starts, wa.ends):
        np.testing.assert_array_equal(wa.audio[round(s * 1000):round(e * 1000)], clip)
    assert len(wa.audio) == 164 and not wa.audio[105:115].any()
    with pytest.raises(ValueError, match="one pause between words"): layout_words(clips, ["a", "b", "c"], [], 0, 1000)


def test_trim_silence():
    x = np.zeros(100, np.float32); x[10] = 0.004; x[20:30] = 1.0; x[40] = -0.5
    assert len(trim_silence(x)) == 21                      # 0.004 is below 1% of the peak
    assert len(trim_silence(np.zeros(5, np.float32))) == 0


@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
def test_noise_hits_the_snr(snr):
    rng = np.random.default_rng(0)
    x = (np.sin(np.arange(32000) * 0.05) * 0.2).astype(np.float32)
    y = add_noise(x, snr, rng)
    got = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert y.shape == x.shape and abs(got - snr) < 0.1


def test_speed_and_gain():
    x = (np.sin(np.arange(16000) * 0.05) * 0.5).astype(np.float32)
    for f in (0.9, 1.1, 1.25):
        y, scale = speed_perturb(x, f)
        assert abs(len(y) - len(x) * scale) <= 1 and abs(scale - 1 / f) < 1e-2
    assert speed_perturb(x, 1.0)[1] == 1.0
    with pytest.raises(ValueError, match="valid: 0.5..2.0"): speed_perturb(x, 3.0)
    g = apply_gain(x, 20.0)
    assert g.max() <= 1.0 and g.min() >= -1.0 and np.isclose(apply_gain(x, -6.0).max(), 0.5 * 10 ** (-6 / 20), rtol=1e-5)


@needs_espeak
def test_synthesize_basic_and_bad_voice():
    x = synthesize("seven", "en-us", speed=175)
    assert x.dtype == np.float32 and 0.5 < len(x) / 16000 < 1.5 and np.abs(x).max() > 0.05
    slow = synthesize("seven", "en-us", speed=120)
    assert len(trim_silence(slow)) > len(trim_silence(x))
    with pytest.raises(ValueError, match="valid voices"): synthesize("x", "xx-yy")
    with pytest.raises(ValueError, match="valid variants"): synthesize("x", "en-us", "nobody")
    with pytest.raises(ValueError, match="valid: 0..99"): synthesize("x", pitch=120)


@needs_espeak
def test_corpus_is_deterministic_with_sane_timestamps(tmp_path):
    a = build_corpus(SMALL, seed=3, cache=False)
    b = build_corpus(SMALL, seed=3, cache=False, workers=1)
    c = build_corpus(SMALL, seed=4, cache=False)
    assert a.records == b.records and np.array_equal(a.audio_i16, b.audio_i16)
    assert a.texts != c.texts or not np.array_equal(a.audio_i16, c.audio_i16)
    for i in range(len(a)):
        u = a[i]
        assert u.words == digit_words(u.item, u.lang) and 2 <= len(u.words) <= 4
        s, e = np.array(u.word_starts), np.array(u.word_ends)
        assert len(s) == len(e) == len(u.words)
        assert (s < e).all() and (s[1:] >= e[:-1]).all() and s[0] >= 0 and e[-1] <= u.duration + 1e-9
        # the speech sits inside the word spans: the pauses between words hold only the added noise
        x = u.audio.numpy()
        sr = a.sample_rate
        inside = np.concatenate([x[round(st * sr):round(en * sr)] for st, en in zip(s, e)])
        outside_mask = np.ones(len(x), bool)
        for st, en in zip(s, e): outside_mask[round(st * sr):round(en * sr)] = False
        assert np.mean(inside.astype(np.float64) ** 2) > 3 * np.mean(x[outside_mask].astype(np.float64) ** 2)
    wave, lens = a.batch([0, 1])
    assert wave.shape == (2, int(lens.max())) and lens.tolist() == a.lengths[:2].tolist()


@needs_espeak
def test_cache_hit_stale_and_corrupt_are_handled(tmp_path):
    fresh = build_corpus(SMALL, seed=0, cache_dir=tmp_path)
    path = cache_path(SMALL, 0, tmp_path)
    assert fresh.cache_status == "built" and path.exists()
    hit = build_corpus(SMALL, seed=0, cache_dir=tmp_path)
    assert hit.cache_status == "hit" and np.array_equal(hit.audio_i16, fresh.audio_i16) and hit.records == fresh.records
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text()); meta["espeak"] = "0.0-old"; side.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="stale"):
        stale = build_corpus(SMALL, seed=0, cache_dir=tmp_path)
    assert stale.cache_status == "rebuilt (stale)" and np.array_equal(stale.audio_i16, fresh.audio_i16)
    raw = bytearray(path.read_bytes()); raw[len(raw) // 2] ^= 0xFF; path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="corrupt"):
        corrupt = build_corpus(SMALL, seed=0, cache_dir=tmp_path)
    assert corrupt.cache_status == "rebuilt (corrupt)" and np.array_equal(corrupt.audio_i16, fresh.audio_i16)
    assert build_corpus(SMALL, seed=0, cache_dir=tmp_path).cache_status == "hit"
    assert cache_path(SMALL, 1, tmp_path) != path                 # the seed is part of the key


@needs_espeak
def test_other_kinds_and_languages():
    words = build_corpus(CorpusSpec(kind="words", n=4, langs=("nl", "fr"), min_words=1, max_words=2, snr_db=None,
                                    gain_db=(0.0, 0.0), speed_factors=(1.0,)), 0, cache=False)
    assert all(r["lang"] in ("nl", "fr") for r in words.records)
    texts = build_corpus(CorpusSpec(kind="texts", n=3, texts=(("de", "guten morgen"), ("en", "hello there"))), 0,
                         cache=False)
    assert texts.texts == ["guten morgen", "hello there", "guten morgen"]
    assert texts[1].voice in sc.LANG_VOICES["en"]
    whole = build_corpus(CorpusSpec(kind="sentences", n=2, langs=("fr",), per_word=False), 0, cache=False)
    assert whole[0].word_starts == [] and whole[0].text in sc.SENTENCES["fr"]
