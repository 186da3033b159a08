"""paper_repro.core.hf: every decoder of the collection on Hugging Face causal LMs of every architecture of the
support matrix, token-identical to the model's own `generate(do_sample=False)`; prompt coercion; the README table."""
import functools
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

tf = pytest.importorskip("transformers")

from paper_repro.core.decoding import DraftModelDrafter, batch_greedy_decode, generate
from paper_repro.core.hf import (HF_ARCHITECTURES, METHODS, AttentionPattern, HFCache, HFCausalLM, UnsupportedModel,
                                 as_token_list, as_token_lists, attention_pattern, hf_architecture, support_table,
                                 tiny_hf_model)
from paper_repro.decoding.aded import ADEDDrafter, TrigramMap
from paper_repro.decoding.copyspec import CopySpecDrafter
from paper_repro.decoding.ppd import PPDDrafter, PromptTokens, build_dynamic_trees
from paper_repro.decoding.token_recycling import TokenRecyclingDrafter, default_template

tf.logging.set_verbosity_error()
V, N = 96, 24  # vocabulary of the tiny models; new tokens per decode (the prompts + N run well past the window of 8)
# Logits agree to ~1e-6, not 1e-12: some float64 models still compute attention partly in float32 (Gemma 2's
# softmax, GPT-Neo's scores), which rounds differently when a sequence is split differently (up to ~5e-6 here).
# Tokens agree exactly.
ATOL = 1e-5


def _param(a):
    skip = pytest.mark.skipif(not a.available, reason=f"transformers {tf.__version__} has no {a.model_class}")
    return pytest.param(a.name, id=a.name.replace(" ", ""), marks=skip)

SUPPORTED = [_param(a) for a in HF_ARCHITECTURES if not a.refused]
REFUSED = [_param(a) for a in HF_ARCHITECTURES if a.refused]


def hf_generate(model, prompt, n=N, eos=None):
    "The model's own greedy decode (the reference every method must equal)."
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt):].tolist()


@dataclass
class Case:
    "A tiny model of one architecture, a draft model of the same architecture, prompts, and their references."
    model: object
    target: HFCausalLM
    draft: HFCausalLM
    long: list[int]     # crosses the window
    eos: int            # a token the greedy continuation of `long` produces mid-way
    refs: dict          # (prompt tuple, eos) -> reference tokens

    def ref(self, prompt, eos=None, n=N):
        key = (tuple(prompt), eos, n)
        if key not in self.refs: self.refs[key] = hf_generate(self.model, list(prompt), n, eos)
        return self.refs[key]

    def prompts(self):
        "(prompt, eos) pairs every method is checked on: past the window, stopping at an EOS mid-way, one token."
        return [(self.long, None), (self.long, self.eos), ([5], None)]


@functools.lru_cache(maxsize=None)
def case(name: str) -> Case:
    torch.set_num_threads(1)
    model = tiny_hf_model(name)
    c = Case(model, HFCausalLM(model), HFCausalLM(tiny_hf_model(name, seed=1)),
             torch.randint(3, V, (20,), generator=torch.Generator().manual_seed(0)).tolist(), -1, {})
    full = c.ref(c.long)
    c.eos = full[N // 2]
    assert c.ref(c.long, c.eos)[-1] == c.eos and len(c.ref(c.long, c.eos)) < N  # it really stops mid-way
    return c


def check(c: Case, drafter_factory, prompts=None) -> list:
    "Decode every prompt with a fresh drafter from `drafter_factory`; each must equal the model's own generate."
    results = []
    for prompt, eos in prompts or c.prompts():
        res = generate(c.target, prompt, N, drafter_factory(), eos_id=eos)
        assert res.tokens == c.ref(prompt, eos), (prompt, eos)
        assert res.stopped_by_eos == (eos is not None)
        results.append(res)
    return results


# ---------------------------------------------------------------- every method on every architecture

@pytest.mark.parametrize("name", SUPPORTED)
def test_greedy(name):
    c = case(name)
    check(c, lambda: None)
    with torch.no_grad():  # logit level: our cached, windowed passes equal the model's own full forward
        x = torch.tensor([c.long + c.ref(c.long)])
        cache = c.target.new_cache()
        steps = torch.cat([c.target(x[:, :7], cache=cache)] + [c.target(x[:, t:t + 1], cache=cache) for t in range(7, 20)]
                          + [c.target(x[:, 20:], cache=cache)], dim=1)
        assert torch.allclose(steps, c.model(input_ids=x).logits, atol=ATOL)


@pytest.mark.parametrize("name", SUPPORTED)
def test_chain(name):
    c = case(name)
    check(c, lambda: DraftModelDrafter(c.draft, gamma=3))
    repeated = c.long + c.long[:8]  # prompt lookup finds copies
    [res] = check(c, lambda: CopySpecDrafter(gamma=2, fallback=DraftModelDrafter(c.draft, gamma=2)), [(repeated, None)])
    assert {s.source for s in res.steps} >= {"copy"}


@pytest.mark.parametrize("name", SUPPORTED)
def test_tree(name):
    c = case(name)
    recycling = TokenRecyclingDrafter(V, k=8, template=default_template(20))  # hot across calls, so it accepts
    steps = [s for res in check(c, lambda: recycling) for s in res.steps]
    assert any(s.tree_size > 1 and s.accepted for s in steps)  # trees were verified and (partly) accepted
    trigrams = TrigramMap.from_sequences([c.long + c.ref(c.long)], V, 4)  # the model's own continuation: deep accepts
    check(c, lambda: ADEDDrafter(trigrams, iterations=30))
    acc = np.array([[0.5, 0.15, 0.08, 0.05], [0.35, 0.12, 0.07, 0.04], [0.25, 0.1, 0.06, 0.04]])
    trees, prompt_tokens = build_dynamic_trees(acc, 12), PromptTokens.init_from(c.target, 3)
    check(c, lambda: PPDDrafter(c.target, prompt_tokens, trees, topk=4))
    with torch.no_grad():  # one tree pass = the model's own forward on every root-to-node chain
        ctx, nodes, positions = c.long, [7, 8, 9, 10], [20, 21, 20, 21]  # 7 -> 8, 9 -> 10: siblings, as deep
        tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
        cache = c.target.new_cache()
        c.target(torch.tensor([ctx]), cache=cache)
        mask = torch.cat([torch.ones(4, len(ctx), dtype=torch.bool), tree], dim=1)
        out = c.target(torch.tensor([nodes]), torch.tensor(positions), cache, mask)[0]
        for i, chain in enumerate([[7], [7, 8], [9], [9, 10]]):
            assert torch.allclose(out[i], c.model(input_ids=torch.tensor([ctx + chain])).logits[0, -1], atol=ATOL)
        cache.keep([len(ctx) + 2, len(ctx) + 3], start=len(ctx))  # accept 9 -> 10, then continue
        nxt = c.target(torch.tensor([[11]]), cache=cache)[0, -1]
        assert torch.allclose(nxt, c.model(input_ids=torch.tensor([ctx + [9, 10, 11]])).logits[0, -1], atol=ATOL)


@pytest.mark.parametrize("name", SUPPORTED)
def test_batch(name):
    c = case(name)
    prompts = [c.long, [5], c.long[:11], c.long[3:]]
    out = batch_greedy_decode(c.target, prompts, N).tokens
    assert out == [c.ref(p) for p in prompts]                                 # = the model's own generate
    assert out == [generate(c.target, p, N).tokens for p in prompts]          # = one by one
    assert batch_greedy_decode(c.target, prompts, N, eos_id=c.eos).tokens == [c.ref(p, c.eos) for p in prompts]
    shared = [c.long + [7], c.long + [9, 4, 4]]  # a shared prefix, prefilled once, then ragged suffixes
    assert batch_greedy_decode(c.target, shared, 10, prefix_len=len(c.long)).tokens == [c.ref(p, n=10) for p in shared]


@pytest.mark.parametrize("name", SUPPORTED)
def test_hidden(name):
    c = case(name)
    x = torch.tensor([c.long])
    with torch.no_grad():
        out = c.target(x, return_hidden=True)
        own = c.model(input_ids=x, output_hidden_states=True)
        assert torch.allclose(out.logits, own.logits, atol=ATOL) and out.hidden.shape == (1, 20, 32)
        assert torch.allclose(out.hidden, own.hidden_states[-1], atol=1e-12)  # after the final norm, here
        logits = c.target.lm_head(out.hidden)
        cap = getattr(c.model.config, "final_logit_softcapping", None)
        if cap: logits = torch.tanh(logits / cap) * cap  # Gemma 2 soft-caps after the head
        assert torch.allclose(logits, out.logits, atol=ATOL)
        assert torch.equal(c.target.hidden_states(x), out.hidden)
    assert not c.target.lm_head._forward_pre_hooks  # the capture leaves no hook behind


@pytest.mark.parametrize("name", SUPPORTED)
def test_hidden_states_drive_medusa(name):
    "Medusa heads on the hidden states the verification pass hands over (the hand-off lives in core.trees/decoding)."
    trees = pytest.importorskip("paper_repro.core.trees", reason="needs the hidden-state hand-off of issue 10")
    c = case(name)
    heads = trees.MedusaHeads(c.target.lm_head.in_features, V, 3, lm_head=c.target.lm_head)
    paths = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    steps = [s for res in check(c, lambda: trees.MedusaDrafter(heads, paths)) for s in res.steps]
    assert any(s.accepted for s in steps)


def test_every_method_of_the_table_has_its_test():
    assert all(f"test_{m}" in globals() for m in METHODS)


# ---------------------------------------------------------------- the window really matters in these tests

def _without_window(name):
    a = hf_architecture(name)
    wide = {k: (10 ** 4 if k in ("sliding_window", "window_size") else v) for k, v in a.config.items()}
    return tiny_hf_model(type(a)(a.name, a.model_class, a.config_class, wide, model_kwargs=a.model_kwargs))

WINDOWED = [p for p in SUPPORTED if {"sliding_window", "window_size"} & set(hf_architecture(p.values[0]).config)]

@pytest.mark.parametrize("name", WINDOWED)
def test_the_window_changes_the_reference(name):
    "Without its window the same weights give other logits past the window: the tests above would catch a lost window."
    c = case(name)
    x = torch.tensor([c.long])
    with torch.no_grad():
        windowed, wide = c.model(input_ids=x).logits[0], _without_window(name)(input_ids=x).logits[0]
    assert torch.allclose(windowed[:8], wide[:8], atol=ATOL) and (windowed[8:] - wide[8:]).abs().max() > 1e-4


# ---------------------------------------------------------------- refused models, patterns, the cache

@pytest.mark.parametrize("name", REFUSED)
def test_refused_architectures_say_why(name):
    a = hf_architecture(name)
    with pytest.raises(UnsupportedModel, match="ALiBi biases from a 2-D padding mask"): HFCausalLM(tiny_hf_model(a))


def test_attention_patterns_and_unknown_layer_kinds():
    assert attention_pattern(tf.Qwen2Config(num_hidden_layers=2)) == AttentionPattern({"all": None})  # sliding off
    qwen = attention_pattern(tf.Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    assert qwen.per_kind and qwen.windows == {"full_attention": None, "sliding_attention": 8}
    odd = SimpleNamespace(layer_types=["full_attention", "chunked_attention"], sliding_window=None)
    with pytest.raises(UnsupportedModel, match=r"layers of type \['chunked_attention'\]"): attention_pattern(odd)
    with pytest.raises(UnsupportedModel, match="encoder-decoder"): attention_pattern(SimpleNamespace(is_encoder_decoder=True))
    with pytest.raises(TypeError, match="wraps a transformers causal LM"): HFCausalLM(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown architecture 'Nope'"): hf_architecture("Nope")


def test_cache_keep_nothing_select_batch_and_errors():
    c = case("Llama")
    cache = c.target.new_cache(batch_size=2)
    c.target(torch.tensor([c.long[:6], c.long[6:12]]), cache=cache)
    cache.keep([], start=4)  # a tree step that accepts nothing (this used to build a float index)
    assert cache.length == 4 and all(l.keys.shape[-2] == 4 for l in cache._layers())
    assert cache.positions.tolist() == [[0, 1, 2, 3]] * 2
    cache.select_batch([1])
    assert cache.batch_size == 1 and all(l.keys.shape[0] == 1 for l in cache._layers())
    with torch.no_grad():
        got = c.target(torch.tensor([[c.long[12]]]), cache=cache)[0, -1]
        assert torch.allclose(got, c.model(input_ids=torch.tensor([c.long[6:10] + [c.long[12]]])).logits[0, -1], atol=ATOL)
    with pytest.raises(ValueError, match="cannot truncate"): cache.truncate(9)
    with pytest.raises(ValueError, match="strictly increasing"): cache.keep([3, 2])
    with pytest.raises(ValueError, match="cache holds batch 1"): c.target(torch.tensor([[1], [2]]), cache=cache)


# ---------------------------------------------------------------- prompts and the model's EOS

def test_prompts_in_every_form_users_hold_them():
    ids = [4, 5, 6]
    enc = tf.BatchEncoding({"input_ids": torch.tensor([[0, 0, 4, 5, 6]]), "attention_mask": torch.tensor([[0, 0, 1, 1, 1]])})
    for p in (ids, tuple(ids), torch.tensor(ids), torch.tensor([ids]), np.array(ids), {"input_ids": ids}, enc,
              torch.tensor(ids, dtype=torch.int32), [torch.tensor(4), np.int64(5), 6]):
        assert as_token_list(p, vocab_size=V) == ids
    batch = tf.BatchEncoding({"input_ids": torch.tensor([[0, 7, 8], [1, 2, 3]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])})
    assert as_token_lists(batch) == [[7, 8], [1, 2, 3]] and as_token_lists([[1], torch.tensor([2, 3])]) == [[1], [2, 3]]
    assert as_token_lists(torch.tensor([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]


@pytest.mark.parametrize("bad, err, match", [
    (torch.tensor([1.0, 2.0]), TypeError, "integer token ids, got a torch.float32 tensor"),
    (torch.tensor([True, False]), TypeError, "integer token ids, got a torch.bool tensor"),
    ([1, 2.5], TypeError, r"integer token ids, got 2.5 \(float\) at index 1"),
    ([1, True], TypeError, r"got True \(bool\)"),
    (torch.ones(2, 3, dtype=torch.long), ValueError, "one sequence, got 2 rows"),
    (torch.ones(1, 1, 3, dtype=torch.long), ValueError, "1-D .* or 2-D .* tensor, got shape"),
    ("hello", TypeError, "is text: tokenize it first"),
    ([], ValueError, "prompt is empty"),
    ({"ids": [1]}, TypeError, "without 'input_ids'"),
    ([3, 200], ValueError, r"\[200\] are outside the vocabulary \[0, 96\)"),
    (3, TypeError, "must be a list of token ids"),
])
def test_bad_prompts_are_one_line_errors(bad, err, match):
    with pytest.raises(err, match=match) as e: as_token_list(bad, vocab_size=V)
    assert "\n" not in str(e.value)


def test_bad_batches():
    with pytest.raises(ValueError, match="prompts must be a batch"): as_token_lists([1, 2, 3])
    with pytest.raises(ValueError, match="prompts is empty"): as_token_lists([])
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"): as_token_lists([[1], []])
    with pytest.raises(ValueError, match="nests token ids more than two levels"): as_token_lists([[[1]]])


def test_adapter_generate_takes_tokenizer_output_and_stops_at_the_model_eos():
    c = case("Qwen2")
    enc = tf.BatchEncoding({"input_ids": torch.tensor([c.long])})
    model_eos = c.model.generation_config.eos_token_id
    try:
        c.model.generation_config.eos_token_id = c.eos
        assert c.target.eos_id == c.eos and c.target.eos_ids == (c.eos,)
        own = c.model.generate(enc["input_ids"], max_new_tokens=N, do_sample=False, pad_token_id=0)[0, 20:].tolist()
        res = c.target.generate(enc, N, DraftModelDrafter(c.draft, gamma=3))
        assert res.tokens == own == c.ref(c.long, c.eos) and res.stopped_by_eos
        assert c.target.generate(enc, N, eos_id=None).tokens == c.ref(c.long)  # None: no early stop
        batch = tf.BatchEncoding({"input_ids": torch.tensor([[0] * 15 + c.long[:5], c.long]),
                                  "attention_mask": torch.tensor([[0] * 15 + [1] * 5, [1] * 20])})
        assert c.target.batch_greedy_decode(batch, N).tokens == [c.ref(c.long[:5], c.eos), c.ref(c.long, c.eos)]
        c.model.generation_config.eos_token_id = [c.eos, 3]
        assert c.target.eos_ids == (c.eos, 3) and c.target.eos_id == c.eos
    finally:
        c.model.generation_config.eos_token_id = model_eos
    with pytest.raises(TypeError, match="float32 tensor"): c.target.generate(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="eos_id must be an int, a sequence of ints, None or 'model', got 'eos'"):
        c.target.generate([1], 4, eos_id="eos")


@pytest.mark.parametrize("name", SUPPORTED)
def test_several_eos_ids_stop_where_the_models_own_generate_stops(name):
    c = case(name)
    full = c.ref(c.long)
    eos = [full[N // 2], full[N // 4]]  # a list, as chat models' generation configs give it; the second comes first
    own = c.model.generate(torch.tensor([c.long]), max_new_tokens=N, do_sample=False, pad_token_id=0,
                           eos_token_id=eos)[0, len(c.long):].tolist()
    assert own[-1] in eos and len(own) <= N // 4 + 1  # it stops at whichever comes first
    assert generate(c.target, c.long, N, eos_id=eos).tokens == own
    assert generate(c.target, c.long, N, DraftModelDrafter(c.draft, gamma=3), eos_id=tuple(eos)).tokens == own
    assert batch_greedy_decode(c.target, [c.long, c.long[:9]], N, eos_id=eos).tokens[0] == own
    saved = c.model.generation_config.eos_token_id
    try:
        c.model.generation_config.eos_token_id = eos  # the adapter's default eos: the generation config's, all of them
        res = c.target.generate(c.long, N)
        assert res.tokens == own and res.stopped_by_eos
    finally:
        c.model.generation_config.eos_token_id = saved


HARD_LIMIT = {"GPT-2", "GPT-J", "GPT-Neo", "GPTBigCode", "OPT"}  # positions index a table: the model fails past it


@pytest.mark.parametrize("name", SUPPORTED)
def test_context_length_is_where_the_model_really_fails(name):
    c = case(name)
    cfg = c.model.config
    limit = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions") if getattr(cfg, k, None)), None)
    assert c.target.context_length == (limit if name in HARD_LIMIT else None)
    with torch.no_grad():
        if name in HARD_LIMIT:
            with pytest.raises(IndexError): c.model(input_ids=torch.zeros(1, limit + 1, dtype=torch.long))
            assert c.model(input_ids=torch.zeros(1, limit, dtype=torch.long)).logits.shape[1] == limit
            with pytest.raises(ValueError) as e: generate(c.target, c.long, limit - 19)  # was an IndexError mid-decode
            assert (f"a prompt of 20 tokens + max_new_tokens={limit - 19} = {limit + 1} positions exceeds the model's context "
                    f"length {limit}; at most {limit - 20} new tokens fit after it") == str(e.value)
            with pytest.raises(ValueError, match=f"context length {limit}"): c.target.batch_greedy_decode([c.long], limit)
        else:  # computed positions (rotary, ALiBi): past the configured length nothing fails, and nothing is refused
            far = (limit or 4096) + 8
            assert torch.isfinite(c.target(torch.tensor([c.long[:4]]), positions=torch.arange(far, far + 4))).all()


# ---------------------------------------------------------------- the old import path and the README table

def test_the_adapter_is_still_importable_from_core_lm():
    import paper_repro.core.hf as hf
    import paper_repro.core.lm as lm
    from paper_repro.core.lm import HFCache as OldCache, HFCausalLM as Old
    assert Old is hf.HFCausalLM and OldCache is hf.HFCache
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"): lm.Nope


def test_support_table_lists_what_the_tests_check():
    table = support_table()
    rows = [l for l in table.splitlines() if l.startswith("| ") and "`" in l]
    assert len(rows) == len(HF_ARCHITECTURES)
    for a, row in zip(HF_ARCHITECTURES, rows):
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert cells[0] == a.name and cells[1] == f"`{a.model_class}`"
        assert cells[3:] == (["✓"] * len(METHODS) if not a.refused else [cells[3]] * len(METHODS))
        if a.refused: assert cells[3].startswith("refused (") and a.refused in table
    assert f"transformers {tf.__version__}" in table
    missing = type(HF_ARCHITECTURES[0])("Imaginary", "ImaginaryForCausalLM", "ImaginaryConfig", {})
    assert "not in transformers" in support_table([missing])
