"Tests of paper_repro.dllm.tasks: vocabulary, generator determinism and validity, ParallelBench's exact scorers."
import random

import pytest
import torch

from paper_repro.dllm.tasks import (EOS_ID, GEN_LENGTH, LATIN_SQUARES, MASK_ID, PROMPT_LENGTH, SUDOKUS, TASKS, accuracy, answer_text,
                                    batch_answers, decode, encode, make_example, pad_prompts, sample_examples,
                                    sudoku_solutions)


def test_vocabulary_round_trip_and_errors():
    assert decode(encode("hello42+")) == "hello42+"
    with pytest.raises(ValueError, match="not in the dllm vocabulary"): encode("Z")
    with pytest.raises(ValueError, match="outside the vocabulary"): decode([10_000])
    assert answer_text(encode("ab") + [EOS_ID, *encode("zz")]) == "ab"   # everything after the first EOS is ignored
    assert answer_text(encode("ab") + [MASK_ID]) is None


def test_generators_are_deterministic_and_their_references_score_right():
    a, b = sample_examples(TASKS, 300, seed=5), sample_examples(TASKS, 300, seed=5)
    assert [(e.prompt, e.answer) for e in a] == [(e.prompt, e.answer) for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in sample_examples(TASKS, 300, seed=6)]
    assert {e.task for e in a} == set(TASKS)
    for e in a:
        assert len(e.answer) == GEN_LENGTH and e.score(e.answer), (e.task, decode(e.prompt), decode(e.answer))
        assert e.prompt[-1] == encode(["<sep>"])[0] and len(e.prompt) == PROMPT_LENGTH  # one fixed prompt layout


def test_unknown_task_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'copyy'; valid: copy"): make_example("copyy", random.Random(0))
    with pytest.raises(ValueError, match="list length n=0"): make_example("copy", random.Random(0), n=0)
    with pytest.raises(ValueError, match="digits=9 must be in 1..7"): make_example("add", random.Random(0), digits=9)
    with pytest.raises(ValueError, match="does not fit gen_length=8"): make_example("repeat_each", random.Random(0), n=6, gen_length=8)
    with pytest.raises(ValueError, match="tasks is empty"): sample_examples([], 3)


def _ex(task, n=6, seed=0):
    return make_example(task, random.Random(seed), n=n)


def test_exact_tasks_hand_made():
    e = _ex("sort")
    x = e.info["input"]
    assert e.score(encode("".join(sorted(x)))) and not e.score(encode(x[::-1] if x != x[::-1] else x + "a"))
    e = _ex("reverse")
    assert e.score(encode(e.info["input"][::-1])) and not e.score(encode(e.info["input"][::-1][:-1]))
    e = _ex("repeat_each")
    assert e.score(encode("".join(c + c for c in e.info["input"])))
    e = _ex("replace_index")
    i, new, x = e.info["index"], e.info["letter"], e.info["input"]
    assert e.score(encode(x[:i] + new + x[i + 1:]))
    j = (i + 1) % len(x)
    assert not e.score(encode(x[:j] + new + x[j + 1:]))  # right letter, wrong index
    e = make_example("add", random.Random(3), digits=3)
    total = e.info["a"] + e.info["b"]
    assert e.info["target"] == f"{total:04d}" and e.score(encode(f"{total:04d}"))
    assert not e.score(encode(f"{total + 1:04d}")) and not e.score(encode(str(total) + "0"))


def test_random_tasks_hand_made():
    e = _ex("shuffle")
    x = e.info["input"]
    assert e.score(encode(x[1:] + x[0])) and not e.score(encode(x)) and not e.score(encode(x[1:] + "z" if "z" not in x else x[1:] + "y"))
    e = _ex("replace_random")
    x, new = e.info["input"], e.info["letter"]
    assert all(e.score(encode(x[:i] + new + x[i + 1:])) for i in range(len(x)))
    assert not e.score(encode(new + new + x[2:])) and not e.score(encode(x)) and not e.score(encode(new + x[1:] + new))
    e = _ex("insert_random")
    x, new = e.info["input"], e.info["letter"]
    assert all(e.score(encode(x[:i] + new + x[i:])) for i in range(len(x) + 1))
    other = next(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in x and c != new)
    assert not e.score(encode(other + x)) and not e.score(encode(x)) and not e.score(encode(new + x[1:]))
    e = _ex("remove_random")
    x = e.info["input"]
    assert all(e.score(encode(x[:i] + x[i + 1:])) for i in range(len(x)))
    assert not e.score(encode(x)) and not e.score(encode(x[2:])) and not e.score(encode(x[1:][::-1]))


def test_puzzles():
    assert len(LATIN_SQUARES) == 576 and len(SUDOKUS) == 288
    e = make_example("latin", random.Random(0))
    assert e.score(encode("1234214334124321")) and not e.score(encode("1234214334124312"))  # last column breaks
    assert not e.score(encode("123421433412432")) and not e.score(encode("1234123412341234"))
    for seed in range(20):
        s = make_example("sudoku", random.Random(seed))
        assert s.info["puzzle"].count(".") == 4 and sudoku_solutions(s.info["puzzle"]) == [s.info["target"]]
        other = next(g for g in LATIN_SQUARES if g != s.info["target"])
        assert s.score(encode(s.info["target"])) and not s.score(encode(other))


def test_padding_and_accuracy():
    ids, valid = pad_prompts([[4, 5, 6], [7]])
    assert ids.tolist() == [[4, 5, 6], [EOS_ID, EOS_ID, 7]] and valid.sum().item() == 4
    exs = sample_examples("copy", 4, seed=0)
    ans = batch_answers(exs)
    assert accuracy(exs, ans) == 1.0
    ans[0, 0] = MASK_ID
    assert accuracy(exs, ans) == 0.75
    with pytest.raises(ValueError, match="different generation windows"):
        batch_answers([exs[0], make_example("copy", random.Random(0), gen_length=40)])
    with pytest.raises(ValueError, match="no prompts"): pad_prompts([])
