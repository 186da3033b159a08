"""Tests of paper_repro.lm.table_seq2seq: typed tables, disjoint pools, linearisation, sqlite execution accuracy,
the task templates (checked against independent evaluations), masked pretraining pairs (restoring the sentinels
gives back the unmasked text), the tokenizer and a tiny encoder-decoder's training and decoding."""
import re

import numpy as np
import pytest
import torch

from paper_repro.core.train import OptimConfig, fit
from paper_repro.lm.table_seq2seq import (LABELS, SCHEMAS, TASKS, Column, Example, Pairs, Schema, Table,
                                          answer_string, context_facts, context_segments, context_sentences,
                                          evaluate, example_pairs, execution_match, linearize, make_example,
                                          make_examples, mask_table, predict, pretraining_pairs, random_table, render,
                                          run_sql, schema, score, segments_text, seq2seq_loss, table_model,
                                          table_pools, table_segments, to_sqlite, train_tokenizer)


@pytest.fixture(scope="module")
def pools():
    return table_pools(dict(pretrain=60, train=30, dev=6, test=12), seed=0)


@pytest.fixture(scope="module")
def tok(pools):
    ex = [e for t in TASKS for e in make_examples(t, pools["train"], 60, seed=0)]
    texts = [linearize(x, context_sentences(x, context_facts(x, np.random.default_rng(0)))) for x in pools["pretrain"]]
    return train_tokenizer(texts + [e.source + " " + e.target for e in ex], 1024)


def test_columns_and_schemas_reject_bad_input():
    with pytest.raises(ValueError, match="valid: text, int, date"): Column("x", "float")
    with pytest.raises(ValueError, match="pool"): Column("x", "text", ("a",))
    with pytest.raises(ValueError, match="low < high"): Column("x", "int", low=3, high=3)
    with pytest.raises(ValueError, match="valid: employees"): schema("people")
    with pytest.raises(ValueError, match="valid: name, dept"): SCHEMAS[0].column("wage")


def test_random_tables_are_typed_deterministic_and_keyed():
    for s in SCHEMAS:
        a, b = (random_table(s, 4, np.random.default_rng(3)) for _ in range(2))
        assert a == b
        assert len({r[0] for r in a.rows}) == 4                                # unique keys
        for j, c in enumerate(s.columns):
            vals = [r[j] for r in a.rows]
            if c.kind == "int":
                assert all(isinstance(v, int) and c.low <= v <= c.high for v in vals) and len(set(vals)) == 4
            elif c.kind == "date":
                assert all(re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", v) and c.low <= int(v[:4]) <= c.high for v in vals)
            else:
                assert set(vals) <= set(c.pool)
    with pytest.raises(ValueError, match="n_rows"): random_table(SCHEMAS[0], 1, np.random.default_rng(0))


def test_pools_are_disjoint_even_up_to_row_order(pools):
    fps = {k: [t.fingerprint() for t in v] for k, v in pools.items()}
    assert {k: len(v) for k, v in pools.items()} == dict(pretrain=60, train=30, dev=6, test=12)
    all_fps = [f for v in fps.values() for f in v]
    assert len(all_fps) == len(set(all_fps))                                   # every table in exactly one pool
    assert not set(fps["test"]) & (set(fps["pretrain"]) | set(fps["train"]) | set(fps["dev"]))
    t = pools["test"][0]
    assert Table(t.schema, tuple(reversed(t.rows))).fingerprint() == t.fingerprint()
    assert table_pools(dict(pretrain=60, train=30, dev=6, test=12), seed=0) == pools   # deterministic
    with pytest.raises(ValueError, match="valid: pretrain, train, dev, test"): table_pools(dict(val=3), seed=0)


def test_render_and_linearize():
    assert render(42) == "42" and render("paris") == "'paris'" and render(np.int64(7)) == "7"
    with pytest.raises(ValueError, match="valid: int or str"): render(2.5)
    with pytest.raises(ValueError, match="quote"): render("o'neil")
    t = Table(SCHEMAS[0], (("alice", "sales", 42, "2019-04"), ("bob", "legal", 30, "2020-01")))
    assert linearize(t) == ("table : employees col : name | dept | salary | hired row 1 : 'alice' | 'sales' | 42 | "
                            "'2019-04' row 2 : 'bob' | 'legal' | 30 | '2020-01'")
    assert linearize(t, ["'bob' has salary 30 ."]).endswith(" row 2 : 'bob' | 'legal' | 30 | '2020-01' context : "
                                                              "'bob' has salary 30 .")


def test_sqlite_database_and_execution_match():
    t = Table(SCHEMAS[0], (("alice", "sales", 42, "2019-04"), ("bob", "legal", 30, "2020-01"),
                           ("carol", "sales", 55, "2018-07")))
    conn = to_sqlite(t)
    assert run_sql(conn, "SELECT * FROM employees") == list(t.rows)            # a real table, types kept
    gold = "SELECT name FROM employees WHERE dept = 'sales'"
    assert execution_match("SELECT name FROM employees WHERE dept = 'sales' ORDER BY salary DESC", gold, t)  # set
    assert execution_match("SELECT name FROM employees WHERE salary > 40", gold, t)  # another query, same rows
    assert not execution_match("SELECT name FROM employees WHERE dept = 'legal'", gold, t)
    ordered = "SELECT name FROM employees ORDER BY salary DESC"
    assert not execution_match("SELECT name FROM employees ORDER BY salary ASC", ordered, t)   # order matters here
    for broken in ("SELEC name FROM employees", "SELECT nme FROM employees", "", "SELECT name FROM people"):
        assert not execution_match(broken, gold, t)
    assert run_sql(conn, "DELETE FROM employees") is None and len(run_sql(conn, "SELECT * FROM employees")) == 3
    with pytest.raises(ValueError, match="gold query fails"): execution_match(gold, "SELECT x FROM employees", t)


def _read(table: Table, key: str, col: str):
    "An independent cell lookup (plain Python, no sqlite)."
    return {r[0]: r for r in table.rows}[key][table.header.index(col)]


def test_task_examples_against_independent_evaluation(pools):
    rng = np.random.default_rng(0)
    for _ in range(300):
        t = pools["train"][int(rng.integers(len(pools["train"])))]
        e = make_example("qa", t, rng)
        m = re.fullmatch(r"what is the (\w+) of '(\w+)' \?", e.question)
        if m: assert e.target == render(_read(t, m[2], m[1]))
        m = re.fullmatch(r"how many rows have (\w+) above (-?\d+) \?", e.question)
        if m: assert e.target == str(sum(_read(t, r[0], m[1]) > int(m[2]) for r in t.rows))
        m = re.fullmatch(r"which (\w+) has the (highest|lowest) (\w+) \?", e.question)
        if m:
            pick = max if m[2] == "highest" else min
            assert e.target == render(pick(t.rows, key=lambda r: _read(t, r[0], m[3]))[0])
        f = make_example("fact", t, rng)
        m = re.fullmatch(r"the (\w+) of '(\w+)' is (.+)", f.question)
        if m: truth = render(_read(t, m[2], m[1])) == m[3]
        else:
            a, rel, col, b = re.fullmatch(r"'(\w+)' has a (higher|lower) (\w+) than '(\w+)'", f.question).groups()
            truth = (_read(t, a, col) > _read(t, b, col)) == (rel == "higher")
        assert f.target == LABELS[0 if truth else 1]
        s = make_example("sql", t, rng)
        assert s.target == s.sql and run_sql(to_sqlite(t), s.sql) is not None
    facts = make_examples("fact", pools["train"], 600, seed=1)
    assert 0.42 < np.mean([f.target == "entailed" for f in facts]) < 0.58
    with pytest.raises(ValueError, match="valid: sql, qa, fact"): make_example("nli", pools["train"][0], rng)


def _unmask(src, tgt) -> str:
    "Fill each sentinel of the source with the text the target gives it."
    fill, k = {}, None
    for s in tgt:
        if isinstance(s, int): k = s
        else: fill[k] = fill.get(k, "") + s
    return "".join(s if isinstance(s, str) else fill[s] for s in src)


def test_masked_pretraining_pairs_restore_the_table_and_context(pools):
    for i, t in enumerate(pools["pretrain"][:40]):
        rng = np.random.default_rng(i)
        src, tgt = mask_table(t, rng)
        facts = context_facts(t, np.random.default_rng(i))            # the same draw mask_table made first
        assert _unmask(src, tgt) == linearize(t, context_sentences(t, facts))
        sent = [s for s in src if isinstance(s, int)]
        assert sent == list(range(len(sent))) and sent                    # numbered in reading order, at least one
        assert [s for s in tgt if isinstance(s, int)] == sent
    with pytest.raises(ValueError, match="p must be"): mask_table(pools["pretrain"][0], np.random.default_rng(0), p=0)


def test_tokenizer_segments_specials_and_targets(tok, pools):
    t = pools["test"][0]
    facts = context_facts(t, np.random.default_rng(0))
    segs = table_segments(t) + [" context :"] + context_segments(t, facts)
    assert tok.encode_segments(segs) == tok.encode(segments_text(segs))   # segment-wise encoding = whole-string
    src, tgt = mask_table(t, np.random.default_rng(0))
    ids = tok.encode_segments(src)
    assert tok.sentinel_id(0) in ids and all(i < tok.vocab_size for i in ids)
    assert len({tok.eos_id, tok.bos_id, *(tok.sentinel_id(k) for k in range(8))}) == 10
    with pytest.raises(ValueError, match="out of range"): tok.sentinel_id(8)
    e = make_example("sql", t, np.random.default_rng(0))
    seq = tok.target_ids(e.target)
    assert seq[0] == tok.bos_id and seq[-1] == tok.eos_id and tok.decode(seq[1:]) == e.target
    # a value is one token sequence wherever it stands: in the table, the question and the SQL
    key = render(t.rows[0][0])
    assert tok.encode(" " + key)[1:] == tok.encode(f"= {key}")[2:]


def test_pairs_batches_are_deterministic_and_task_filtered(tok, pools):
    p = example_pairs(tok, make_examples("sql", pools["train"], 10, seed=0)) + \
        example_pairs(tok, make_examples("fact", pools["train"], 10, seed=0))
    assert len(p) == 20 and len(p.only("fact")) == 10 and set(p.only("sql").task) == {"sql"}
    draw = p.batches(4, seed=3)
    assert draw(5) == p.batches(4, seed=3)(5) and draw(5) != draw(6)
    with pytest.raises(ValueError, match="no pairs of task 'qa'"): p.only("qa")
    pre = pretraining_pairs(tok, pools["pretrain"], 6, seed=0)
    assert len(pre) == 6 and all(s[0] == tok.bos_id and s[-1] == tok.eos_id for s in pre.tgt)


def test_tiny_model_learns_and_decodes_in_batches(tok, pools):
    torch.manual_seed(0)
    exs = make_examples("fact", pools["train"][:4], 8, seed=0)
    pairs = example_pairs(tok, exs)
    m = table_model(tok, d_model=32, n_heads=2, d_ff=64)
    with torch.no_grad(): before = float(seq2seq_loss(m, (pairs.src, pairs.tgt)))
    fit(m, seq2seq_loss, lambda i: (pairs.src, pairs.tgt), 30, OptimConfig(lr=3e-3), progress=False)
    with torch.no_grad(): after = float(seq2seq_loss(m.eval(), (pairs.src, pairs.tgt)))
    assert after < 0.5 * before
    preds = predict(m, tok, exs, max_new_tokens=4, batch_size=3)               # batched: 3 + 3 + 2
    one = [predict(m, tok, [e], max_new_tokens=4)[0] for e in exs]
    assert preds == one                                                        # batching changes nothing
    assert np.mean([score(e, p) for e, p in zip(exs, preds)]) >= 0.75
    assert evaluate(m, tok, {"fact": exs}, max_new_tokens=4)["fact"] == [score(e, p) for e, p in zip(exs, preds)]
