"""paper_repro.lm.sharedllm: the context tree against a naive node-by-node reference, chunk-level positions, the
upper model's injection, cached decoding with the tree built once, the baselines, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from paper_repro.core.decoding import batch_greedy_decode
from paper_repro.core.lm import LMConfig, TransformerLM, apply_rope, rope_cos_sin
from paper_repro.lm.sharedllm import (FullContextLM, Layout, SharedLLM, TreeConfig, memory_bytes, streaming_logits,
                                      target_nll, train_context_model, window_nll)

V = 61


def tiny(seed=0, layers=3):
    torch.manual_seed(seed)
    return TransformerLM(LMConfig(V, d_model=32, n_layers=layers, n_heads=2, d_ff=48)).double().eval()


def shared(policy="cosine", depth=2, keep=2, seed=0, cls=SharedLLM):
    model = cls(tiny(seed), TreeConfig(chunk_len=16, depth=depth, keep=keep, n_layers=2, policy=policy))
    with torch.no_grad():   # a live injection: zero output projections would hide every bug
        for xa in model.cross: xa.o_proj.weight.normal_(0, 0.3)
    return model


def lower_states(model, tokens):
    "Reference lower model: the normed input of each injected block, via the core's own hidden_states."
    base = model.base
    return [base.layers[j].input_layernorm(base.hidden_states(tokens[None], upto_layer=j) if j else
                                           base.embed_tokens(tokens[None]))[0] for j in range(model.tree.n_layers)]


def naive_tree(model, context, query):
    """Node-by-node reference: walk each chunk's tree with Python recursion, encode every preserved node on its own,
    subsample, then project and rotate per chunk. Returns k, v `[M, B, H, S, hd]`."""
    t, M = model.tree, model.tree.n_layers
    q = model.base.hidden_states(query, upto_layer=1)[:, -1]
    per_layer_k, per_layer_v = [[] for _ in range(M)], [[] for _ in range(M)]
    for b in range(context.shape[0]):
        chunks = context[b].split(t.chunk_len)
        n = len(chunks)
        rows = [[] for _ in range(M)]
        for i, node in enumerate(chunks):
            kept = []
            for level in range(1, t.depth + 1):
                left, right = node.split(len(node) // 2)
                if level == t.depth: kept += [left, right]; break
                h = [model.base.hidden_states(c[None], upto_layer=1)[0, -1] for c in (left, right)]
                if t.policy == "right": pick = 1
                else: pick = int(F.cosine_similarity(h[1], q[b], dim=0) > F.cosine_similarity(h[0], q[b], dim=0))
                kept.append((left, right)[1 - pick]); node = (left, right)[pick]
            for seq in kept:
                stride = len(seq) // t.keep
                idx = [stride * (k + 1) - 1 for k in range(t.keep)]
                for j, s in enumerate(lower_states(model, seq)): rows[j].append((i, s[idx]))
        for j in range(M):
            states = torch.cat([s for _, s in rows[j]])
            pos = torch.tensor([i - n for i, s in rows[j] for _ in range(len(s))])
            k, v = model.cross[j].project(states[None])
            cos, sin = rope_cos_sin(pos[None], model.cfg.head_dim, model.cfg.rope_theta, torch.float64)
            per_layer_k[j].append(apply_rope(k, cos, sin)[0]); per_layer_v[j].append(v[0])
    return (torch.stack([torch.stack(k) for k in per_layer_k]), torch.stack([torch.stack(v) for v in per_layer_v]))


@pytest.mark.parametrize("policy,depth,keep", [("cosine", 2, 2), ("right", 2, 2), ("cosine", 3, 1), ("cosine", 1, 4)])
def test_tree_matches_naive_reference(policy, depth, keep):
    model = shared(policy, depth, keep)
    g = torch.Generator().manual_seed(1)
    context, query = torch.randint(0, V, (3, 48), generator=g), torch.randint(0, V, (3, 5), generator=g)
    with torch.no_grad():
        mem = model.build_tree(context, query)
        k, v = naive_tree(model, context, query)
    assert mem.k.shape == (2, 3, 2, 3 * keep * (depth + 1), 16) and bool(mem.mask.all())
    torch.testing.assert_close(mem.k, k, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mem.v, v, rtol=1e-10, atol=1e-10)


def test_selection_follows_the_query():
    "The cosine policy expands different halves for different queries; the right policy never looks at the query."
    model = shared("cosine", depth=2, keep=2)
    g = torch.Generator().manual_seed(2)
    context = torch.randint(0, V, (1, 16), generator=g).repeat(12, 1)
    queries = torch.randint(0, V, (12, 4), generator=g)
    with torch.no_grad():
        trees = model.build_tree(context, queries).k
        assert len({tuple(t.flatten().round(decimals=8).tolist()) for t in trees.unbind(1)}) == 2
        model.tree = TreeConfig(16, 2, 2, 2, "right")
        trees = model.build_tree(context, queries).k
        assert torch.equal(trees[:, :1].expand_as(trees), trees)


def test_chunk_positions_are_relative_to_the_running_text():
    """Keys are rotated by (chunk - n): a chunk prepended in front leaves the others' distances unchanged, and the
    same chunk one step further back is its keys rotated by one more position."""
    model = shared()
    g = torch.Generator().manual_seed(3)
    context, query = torch.randint(0, V, (1, 32), generator=g), torch.randint(0, V, (1, 4), generator=g)
    with torch.no_grad():
        two = model.build_tree(context, query)
        three = model.build_tree(torch.cat([context[:, :16], context], 1), query)
    per_chunk = 2 * 3
    torch.testing.assert_close(three.k[:, :, :, per_chunk:], two.k, rtol=1e-10, atol=1e-10)
    cos, sin = rope_cos_sin(torch.full((1, per_chunk), -1), 16, model.cfg.rope_theta, torch.float64)
    first = two.k[:, :, :, :per_chunk]
    torch.testing.assert_close(three.k[:, :, :, :per_chunk], apply_rope(first.flatten(0, 1), cos, sin).view_as(first))


def test_zero_output_projection_starts_as_the_base_model():
    model = SharedLLM(tiny(), TreeConfig(16, 2, 2, 2))
    x = torch.randint(0, V, (2, 64 + 12))
    lay = Layout(4, 16, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(target_nll(model, x, lay), window_nll(model.base, x, lay, window=11))
        mem = model.build_tree(*lay.split(x)[:2])
        torch.testing.assert_close(model(x[:, -12:], memory=mem), model.base(x[:, -12:]))


def test_injection_changes_only_the_first_layers():
    "With memory the first M blocks differ from the base; their absence of effect elsewhere: M = 0 layers is refused."
    model = shared()
    x = torch.randint(0, V, (2, 32 + 8))
    with torch.no_grad():
        mem = model.build_tree(x[:, :32], x[:, 32:36])
        assert not torch.allclose(model(x[:, 32:], memory=mem), model.base(x[:, 32:]))
        torch.testing.assert_close(model(x[:, 32:], memory=None), model.base(x[:, 32:]))


def test_incremental_decoding_equals_full_forward():
    model = shared()
    x = torch.randint(0, V, (2, 32 + 10), generator=torch.Generator().manual_seed(4))
    lm = model.bind(x[:, :32], x[:, 32:36])
    with torch.no_grad():
        full = lm(x[:, 32:])
        cache = lm.new_cache(2, capacity=4)
        steps = [lm(x[:, 32:36], cache=cache)] + [lm(x[:, 36 + i:37 + i], cache=cache) for i in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_generation_with_the_cached_tree_equals_rebuilding_it_every_step():
    model = shared()
    g = torch.Generator().manual_seed(5)
    context, query = torch.randint(0, V, (3, 32), generator=g), torch.randint(0, V, (3, 5), generator=g)
    with torch.no_grad():
        fast = batch_greedy_decode(model.bind(context, query), query.tolist(), 8).tokens
        for b in range(3):
            seq = query[b:b + 1]
            for _ in range(8):   # rebuild the tree from the same query and run the whole running text again
                memory = model.build_tree(context[b:b + 1], query[b:b + 1])
                seq = torch.cat([seq, model(seq, memory=memory)[:, -1:].argmax(-1)], 1)
            assert seq[0, 5:].tolist() == fast[b]


def test_full_context_keeps_every_position():
    model = shared(cls=FullContextLM)
    x = torch.randint(0, V, (2, 48))
    with torch.no_grad():
        mem = model.build_tree(x, None)
        ref = [s for s in lower_states(model, x[0, 16:32])]   # chunk 1 of row 0, encoded on its own
        k, v = model.cross[1].project(ref[1][None])
    assert mem.k.shape[3] == 48
    torch.testing.assert_close(mem.v[1, 0, :, 16:32], v[0])
    tree = shared().build_tree(x, x[:, :4])
    assert memory_bytes(mem) == memory_bytes(tree) * 48 // 18   # 3 chunks × 6 kept vs 3 × 16


def test_streaming_equals_full_attention_when_the_window_covers_everything():
    base = tiny()
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(streaming_logits(base, x, window=64, sinks=2, block=8), base(x))
        short = streaming_logits(base, x, window=8, sinks=2, block=8)
    torch.testing.assert_close(short[:, :16], base(x)[:, :16])   # nothing evicted yet
    assert not torch.allclose(short[:, -8:], base(x)[:, -8:])


def test_training_moves_only_the_injection_weights():
    model = SharedLLM(tiny().float(), TreeConfig(16, 2, 2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lay = Layout(2, 16, 4, 4)
    stream = torch.randint(0, V, (500,))
    hist = train_context_model(model, stream, lay, steps=3, batch_size=2, progress=False)
    assert len(hist.frame()) == 3 and all(p.requires_grad for p in model.parameters())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("cross") for k in changed)
    assert any(k.startswith("cross.") and k.endswith("o_proj.weight") for k in changed)


def test_bad_input_is_refused():
    model = shared()
    with pytest.raises(ValueError, match="multiple of chunk_len"): model.build_tree(torch.zeros(1, 20, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="query must be"): model.build_tree(torch.zeros(1, 16, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert model.build_tree(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)) is None
    with pytest.raises(ValueError, match="examples must be"): Layout(2, 16, 4, 4).split(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the base"): SharedLLM(tiny(), TreeConfig(16, 2, 2, n_layers=4))
    with pytest.raises(ValueError, match="policy"): TreeConfig(policy="left")
    with pytest.raises(ValueError, match="equal leaves"): TreeConfig(chunk_len=20, depth=3)
    with pytest.raises(ValueError, match="exceeds the leaf"): TreeConfig(chunk_len=16, depth=2, keep=5)
    mem = model.build_tree(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="memory holds batch"): model(torch.zeros(1, 3, dtype=torch.long), memory=mem)
    with pytest.raises(ValueError, match="window"): window_nll(model.base, torch.zeros(1, 24, dtype=torch.long), Layout(1, 16, 4, 4), window=2)


def test_bench_hooks_on_a_tiny_context():
    from types import SimpleNamespace
    from paper_repro.core.train import OptimConfig
    from paper_repro.lm.sharedllm import bench_generate, bench_kv_bytes_per_token, bench_layout, bench_loss, bench_train
    layout, tree = bench_layout(64)
    assert (layout.total, tree.chunk_len, tree.compression) == (65, 16, 4.0)   # 2-token leaves keep 1 each
    base = tiny().float()
    stream = torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(6))
    ctx = SimpleNamespace(seq_len=64, n_layers=3, steps=2, optim=OptimConfig(lr=1e-3), warmup=1, seed=0,
                          device=torch.device("cpu"), base=lambda: base,
                          batch=lambda step: torch.stack([stream[s:s + 65] for s in (step, step + 100)]))
    model = bench_train(ctx)
    x = ctx.batch(7)
    with torch.no_grad():
        loss = bench_loss(model, x)
        # at the zero-initialised start the running text is the base on its own: check the bookkeeping by hand
        fresh = SharedLLM(base, tree)
        ref = torch.cat([base(x[:, :32]), base(x[:, 32:64])], 1)
        torch.testing.assert_close(bench_loss(fresh, x), F.cross_entropy(ref.reshape(-1, V), x[:, 1:].reshape(-1)))
        out = bench_generate(model, x[:, :40], 5)
    assert torch.isfinite(loss) and out.shape == (2, 5)
    assert bench_kv_bytes_per_token(model) == 2 * 2 * 32 * 4 // 4
    with pytest.raises(ValueError, match="too short"): bench_layout(16)
