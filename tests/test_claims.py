"""The claims standard (paper_repro.core.claims): the record's schema, the outcome rules, the interval helpers, and
every committed ledger checked against them."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from paper_repro.core.catalog import load_claims
from paper_repro.core.claims import (CLAIM_FIELDS, KINDS, MIN_SEEDS, Estimate, claim_counts, decide, holding_summary,
                                     make_claim, over_repeats, over_seeds, paired_bootstrap, validate_claim)
from paper_repro.core.repro import project_root

ROOT = project_root()
LEDGERS = sorted((ROOT / "results").glob("cpu/**/*claims.json"))


def _claim(**kw):
    base = dict(id="c", kind="ablation", statement="s", metric="m", unit="u", our_value=1.5, threshold=1.0,
                higher_is_better=True, setting="toy", source="paper, Table 2")
    return make_claim(**{**base, **kw})


def test_record_has_every_field_and_only_those():
    c = _claim()
    assert list(c) == list(CLAIM_FIELDS)
    assert c["outcome"] == "holds" and c["spread_kind"] == "exact" and c["interval"] is None and c["n"] == 1


@pytest.mark.parametrize("kw, msg", [
    (dict(kind="claim"), "kind='claim'; valid: headline, ablation, invariant"),
    (dict(kind="headline", paper_value=None), "paper's number"),
    (dict(kind="headline", paper_value=2.0, source=" "), "paper's number"),
    (dict(kind="ablation", source=""), "needs its source"),
    (dict(threshold=None), "exactly one of threshold"),
    (dict(holds=True), "exactly one of threshold"),
    (dict(our_value=float("nan")), "finite"),
    (dict(our_value=True), "finite number"),
    (dict(our_value=Estimate(1.5, 1.2, 1.8, 0.1, "seeds", 3), threshold=None), "needs the threshold"),
    (dict(our_value=Estimate(1.5, 1.2, 1.8, 0.1, "seeds", 3), holds=True), "pass threshold, not holds"),
])
def test_make_claim_refuses(kw, msg):
    with pytest.raises(ValueError, match=msg): _claim(**kw)


def test_outcomes_follow_the_interval():
    est = lambda lo, hi, method="repeats", n=3: Estimate((lo + hi) / 2, lo, hi, (hi - lo) / 4, method, n)
    assert _claim(our_value=est(1.1, 1.3))["outcome"] == "holds"
    assert _claim(our_value=est(0.9, 1.3))["outcome"] == "inconclusive"
    assert _claim(our_value=est(0.7, 0.9))["outcome"] == "fails"
    assert _claim(our_value=est(0.7, 0.9), higher_is_better=False)["outcome"] == "holds"
    assert _claim(our_value=est(1.1, 1.3, "seeds", MIN_SEEDS - 1))["outcome"] == "inconclusive"
    assert _claim(our_value=1.0)["outcome"] == "fails"             # strictly beyond the threshold
    assert _claim(threshold=None, holds=False)["outcome"] == "fails"


def test_a_holding_claim_under_randomness_records_its_interval():
    c = _claim(our_value=over_seeds([1.4, 1.5, 1.6]))
    assert c["outcome"] == "holds" and c["spread_kind"] == "seeds" and c["n"] == 3
    assert c["interval"][0] > c["threshold"] and c["spread"] == pytest.approx(0.1)
    for drop in ("interval", "spread", "threshold"):
        with pytest.raises(ValueError, match="records its interval, spread and threshold"):
            validate_claim({**c, drop: None})
    with pytest.raises(ValueError, match="does not follow from the interval"):
        validate_claim({**c, "interval": [0.5, 2.0]})              # a straddling interval cannot hold
    with pytest.raises(ValueError, match="holds=True disagrees"):
        validate_claim({**c, "outcome": "inconclusive"})
    with pytest.raises(ValueError, match="exact claim has no interval"):
        validate_claim({**_claim(), "interval": [1.0, 2.0]})


def test_t_interval_matches_scipy():
    x = [0.31, 0.35, 0.29, 0.40]
    e = over_repeats(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert (e.low, e.high) == pytest.approx((lo, hi), rel=1e-12)


def test_paired_bootstrap_against_a_brute_force_loop():
    rng = np.random.default_rng(0)
    a, b = rng.random(30), rng.random(30)
    e = paired_bootstrap(a, b, statistic="ratio_of_means", n_boot=500, seed=7)
    draw = np.random.default_rng(7).integers(0, 30, size=(500, 30))
    boots = [a[i].mean() / b[i].mean() for i in draw]
    assert e.value == pytest.approx(a.mean() / b.mean())
    assert (e.low, e.high) == pytest.approx(tuple(np.quantile(boots, [0.025, 0.975])), rel=1e-12)
    with pytest.raises(ValueError, match="statistic='median'"): paired_bootstrap(a, b, statistic="median")
    with pytest.raises(ValueError, match="needs one score list"): paired_bootstrap(a, b, statistic="mean")


def test_decide_rejects_a_bad_threshold():
    with pytest.raises(ValueError, match="threshold=nan"): decide(1.0, float("nan"), True)


def test_counts_are_headline_only():
    h = _claim(kind="headline", paper_value=2.0, id="h")
    i = _claim(kind="invariant", id="i", threshold=None, holds=True)
    a = _claim(id="a", our_value=0.5)
    counts = claim_counts([h, i, a])
    assert counts == dict(headline=1, holds=1, fails=0, inconclusive=0, ablation=1, ablation_holds=0, invariant=1,
                          invariant_holds=1)
    assert holding_summary([h, i, a]) == "1 of 1 headline claim holds"
    assert i["must_hold"] and not h["must_hold"]


@pytest.mark.parametrize("path", LEDGERS, ids=[str(p.relative_to(ROOT)) for p in LEDGERS])
def test_committed_ledgers_meet_the_standard(path):
    "Every committed cpu-scale claims file validates, and none has a headline claim that is also its own invariant."
    claims = load_claims(path)
    assert claims, f"{path} is empty"
    assert {c["kind"] for c in claims} <= set(KINDS)
    for c in claims:
        if c["kind"] == "invariant": assert c["must_hold"], f"{c['id']}: an invariant is asserted"
