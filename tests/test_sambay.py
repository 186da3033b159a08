"""paper_repro.lm.sambay: the selective scan (chunked vs sequential), Mamba and GMU, the YOCO/SambaY layouts and
their decoding state (incremental == full forward), phone books, and input validation."""
import pytest
import torch
import torch.nn.functional as F

from paper_repro.core.lm import LMConfig, TransformerLM, count_parameters
from paper_repro.lm.sambay import (GMU, HybridCache, HybridConfig, HybridLM, Mamba, PhonebookSpec, build_layout,
                                   cache_nbytes, filled_cache, greedy_generate, layer_kinds, linear_scan, mixed_batch,
                                   phonebook_batch, retrieval_correct, selective_scan, selective_scan_reference,
                                   selective_step, window_mask)


def scan_inputs(b=2, T=29, d=6, n=3, seed=0, dtype=torch.float64, decay=4.0, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return (r(b, T, d), F.softplus(r(b, T, d)) * dt_scale, -torch.rand(d, n, generator=g, dtype=dtype) * decay,
            r(b, T, n), r(b, T, n), r(d), r(b, d, n))


@pytest.mark.parametrize("chunk", [1, 3, 8, 29, 100])
def test_chunked_scan_equals_sequential_float64(chunk):
    u, dl, A, B, C, D, h0 = scan_inputs()
    y_ref, h_ref = selective_scan_reference(u, dl, A, B, C, D, h0)
    y, h = selective_scan(u, dl, A, B, C, D, h0, chunk=chunk)
    assert torch.allclose(y, y_ref, atol=1e-12, rtol=0) and torch.allclose(h, h_ref, atol=1e-12, rtol=0)


def test_reference_scan_is_the_recurrence():
    u, dl, A, B, C, D, _ = scan_inputs(b=1, T=3, d=1, n=1)
    a = torch.exp(dl[0, :, 0] * A[0, 0]); x = dl[0, :, 0] * B[0, :, 0] * u[0, :, 0]
    h1 = x[0]; h2 = a[1] * h1 + x[1]
    y, _ = selective_scan_reference(u, dl, A, B, C, None)
    assert torch.allclose(y[0, :2, 0], torch.stack([C[0, 0, 0] * h1, C[0, 1, 0] * h2]))


def test_linear_scan_matches_loop():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 13, 2, generator=g, dtype=torch.float64), torch.randn(3, 13, 2, generator=g, dtype=torch.float64)
    decay, h = linear_scan(a, b)
    hs, prod = torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)
    for t in range(13):
        hs, prod = a[:, t] * hs + b[:, t], prod * a[:, t]
        assert torch.allclose(h[:, t], hs) and torch.allclose(decay[:, t], prod)


def test_scan_is_stable_when_channels_forget_fast():
    u, dl, A, B, C, D, h0 = scan_inputs(dtype=torch.float32, decay=16.0, dt_scale=50.0)  # exp(ΔA) far below 1e-38
    y, h = selective_scan(u, dl, A, B, C, D, h0, chunk=29)
    y_ref, _ = selective_scan_reference(*(t.double() for t in (u, dl, A, B, C, D, h0)))
    assert torch.isfinite(y).all() and torch.allclose(y.double(), y_ref, atol=1e-4)


def test_step_equals_scan():
    u, dl, A, B, C, D, h0 = scan_inputs()
    y_ref, h_ref = selective_scan_reference(u, dl, A, B, C, D, h0)
    h, ys = h0, []
    for t in range(u.shape[1]):
        y, h = selective_step(u[:, t], dl[:, t], A, B[:, t], C[:, t], D, h)
        ys.append(y)
    assert torch.allclose(torch.stack(ys, 1), y_ref, atol=1e-12) and torch.allclose(h, h_ref, atol=1e-12)


def test_scan_rejects_bad_shapes():
    u, dl, A, B, C, D, h0 = scan_inputs()
    with pytest.raises(ValueError, match="A must be"): selective_scan(u, dl, A[:2], B, C)
    with pytest.raises(ValueError, match="B must be"): selective_scan(u, dl, A, B[:, :3], C)
    with pytest.raises(ValueError, match="h0 must be"): selective_scan(u, dl, A, B, C, D, h0[:1])
    with pytest.raises(ValueError, match="chunk"): selective_scan(u, dl, A, B, C, chunk=0)


def test_mamba_prefill_in_pieces_equals_full_and_memory_is_ungated():
    torch.manual_seed(0)
    m = Mamba(8, d_state=3, chunk=4).double()
    x = torch.randn(2, 17, 8, dtype=torch.float64)
    full, mem, _ = m(x)
    outs, state = [], None
    for s, e in ((0, 5), (5, 6), (6, 7), (7, 17)):
        o, _, state = m(x[:, s:e], state); outs.append(o)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-10)
    z = m.in_proj(x).chunk(2, -1)[1]
    assert torch.allclose(m.out_proj(mem * F.silu(z)), full)  # the memory is the scan output before the gate


def test_gmu_is_gated_memory():
    torch.manual_seed(0)
    g, x, m = GMU(6, 12), torch.randn(2, 5, 6), torch.randn(2, 5, 12)
    assert torch.allclose(g(x, m), g.out_proj(F.silu(g.in_proj(x)) * m))
    with pytest.raises(ValueError, match="memory must be"): g(x, m[:, :4])


def test_layer_kinds():
    assert layer_kinds(HybridConfig(10, "sambay")) == ["mamba", "swa", "mamba", "swa", "mamba", "full", "gmu", "cross"]
    assert layer_kinds(HybridConfig(10, "yoco")) == ["mamba", "swa", "mamba", "swa", "mamba", "full", "cross", "cross"]
    k12 = layer_kinds(HybridConfig(10, "sambay", n_layers=12))
    assert k12[6:8] == ["mamba", "full"] and k12[8:] == ["gmu", "cross", "gmu", "cross"] and k12.count("full") == 1


@pytest.mark.parametrize("kw, match", [(dict(layout="mamba"), "layout"), (dict(n_layers=6), "divisible by 4"),
                                       (dict(window=0), "window"), (dict(d_model=30, n_heads=4), "heads")])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match): HybridConfig(10, **kw)


def test_window_mask_brute_force():
    m = window_mask(7, 3, 2, 8, 3)
    for i in range(3):
        for j in range(8):
            q, k = 7 + i, 2 + j
            assert bool(m[i, j]) == (q - 3 < k <= q)


def tiny(layout, window=3, seed=0):
    torch.manual_seed(seed)
    if layout == "transformer": return TransformerLM(LMConfig(40, 16, 2, 2, 24)).double().eval()
    return HybridLM(HybridConfig(40, layout, d_model=16, n_layers=8, n_heads=2, d_ff=24, window=window, d_state=3,
                                 chunk=4)).double().eval()


@pytest.mark.parametrize("layout", ["yoco", "sambay"])
@pytest.mark.parametrize("prefill", [1, 4, 11])
def test_incremental_decoding_equals_full_forward(layout, prefill):
    model, x = tiny(layout), torch.randint(0, 40, (3, 21), generator=torch.Generator().manual_seed(prefill))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, capacity=2)
        steps = [model(x[:, :prefill], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(prefill, 21)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-10)
    assert cache.length == 21 and cache.swa.length < 2 * 3 and cache.kv.length == 21


@pytest.mark.parametrize("layout", ["yoco", "sambay"])
def test_chunked_prefill_equals_full_forward(layout):
    model, x = tiny(layout), torch.randint(0, 40, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_cache(2)
        parts = [model(x[:, s:s + 5], cache=cache) for s in range(0, 23, 5)]
        assert torch.allclose(torch.cat(parts, 1), model(x), atol=1e-10)


def test_the_window_bounds_what_sliding_attention_sees():
    "A change more than `window` tokens back reaches the output only through the Mamba and full-attention layers."
    model = tiny("sambay")
    for layer in model.layers:  # silence every mixer but the sliding-window ones
        if layer.kind in ("mamba", "gmu"): layer.mixer.out_proj.weight.data.zero_()
        if layer.kind in ("full", "cross"): layer.mixer.o_proj.weight.data.zero_()
    x = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    y = x.clone(); y[0, 2] = (x[0, 2] + 1) % 40
    with torch.no_grad(): a, b = model(x), model(y)
    # 2 sliding layers of window 3 reach 2·(3-1) = 4 tokens back: position 2 affects at most positions 2..6
    assert torch.allclose(a[0, 7:], b[0, 7:]) and not torch.allclose(a[0, 2:7], b[0, 2:7])


@pytest.mark.parametrize("layout", ["transformer", "yoco", "sambay"])
def test_greedy_generate_equals_full_forward_argmax(layout):
    model, prompts = tiny(layout), torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    out = greedy_generate(model, prompts, 9)
    seq = prompts
    for _ in range(9):
        with torch.no_grad(): seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 5:])
    with pytest.raises(ValueError, match="max_new_tokens"): greedy_generate(model, prompts, 0)


def test_hybrid_forward_rejects_positions_masks_and_batch_mismatch():
    model = tiny("sambay")
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="positions"): model(x, positions=torch.arange(3))
    with pytest.raises(ValueError, match="attn_mask"): model(x, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch"): model(x, cache=model.new_cache(3))
    with pytest.raises(ValueError, match="tokens"): model(torch.zeros(2, 0, dtype=torch.long))


def test_cache_bytes_growth_per_token():
    t, s = tiny("transformer").float(), tiny("sambay").float()
    grow = lambda m: cache_nbytes(filled_cache(m, 4, 200)) - cache_nbytes(filled_cache(m, 4, 100))
    assert grow(t) == 100 * 2 * 2 * 4 * 16 * 4         # tokens · (k, v) · layers · batch · d · bytes
    assert grow(s) == 100 * 2 * 1 * 4 * 16 * 4         # one shared layer: the sliding window and states are constant
    with pytest.raises(ValueError, match="cache must be"): cache_nbytes(object())


@pytest.mark.parametrize("layout", ["transformer", "sambay"])
def test_filled_cache_decodes(layout):
    model = tiny(layout).float()
    cache = filled_cache(model, 2, 50, room=4)
    with torch.no_grad(): out = model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert out.shape == (2, 1, 40) and torch.isfinite(out).all() and cache.length == 51


SPEC = PhonebookSpec(names=tuple(range(100, 160)), digits=tuple(range(10)), sep=20, newline=21)


def test_phonebook_layout_and_answers():
    books, answer = phonebook_batch(SPEC, 5, 83, 3, torch.Generator().manual_seed(0))
    assert books.shape == answer.shape == (5, 83) and answer.sum(1).eq(3 * 2).all()
    for book in books.tolist():
        body = book[83 - (83 // 5) * 5:]
        entries = [body[i:i + 5] for i in range(0, len(body), 5)]
        table = {e[0]: e[2:4] for e in entries[:-3]}
        assert len(table) == len(entries) - 3  # names unique within a book
        for q in entries[-3:]: assert q[1] == 20 and q[4] == 21 and table[q[0]] == q[2:4]
    # the positions marked are those whose next token is a queried digit
    nxt = books[:, 1:][answer[:, :-1]]
    assert ((nxt >= 0) & (nxt < 10)).all()
    with pytest.raises(ValueError, match="entries"): phonebook_batch(SPEC, 1, 20, 3, torch.Generator())


def test_retrieval_correct_oracle_and_constant():
    books, answer = phonebook_batch(SPEC, 4, 60, 2, torch.Generator().manual_seed(1))
    class Oracle(torch.nn.Module):
        device = torch.device("cpu")
        def forward(self, x):  # puts all mass on the true next token
            nxt = torch.cat([books[:, 1:x.shape[1] + 1]], 1)
            return F.one_hot(nxt, 200).float()
    class Constant(Oracle):
        def forward(self, x): return torch.zeros(*x.shape, 200)
    assert retrieval_correct(Oracle(), books, answer, 2).all()
    assert not retrieval_correct(Constant(), books, answer, 2).any()


def test_mixed_batch_is_deterministic_and_mixed():
    code = 200 + torch.arange(5000) % 50  # no phone-book token in the code stream
    a, b = mixed_batch(code, SPEC, 3, 8, 64), mixed_batch(code, SPEC, 3, 8, 64)
    assert torch.equal(a, b) and a.shape == (8, 65) and not torch.equal(a, mixed_batch(code, SPEC, 4, 8, 64))
    assert (a[4:] == SPEC.sep).any(1).all() and not (a[:4] == SPEC.sep).any()
    with pytest.raises(ValueError, match="phonebook_share"): mixed_batch(code, SPEC, 0, 8, 64, phonebook_share=2.0)


def test_layouts_match_parameters_at_the_cpu_shape():
    shape = dict(d_model=64, n_layers=8, n_heads=4, d_ff=176, window=32, d_state=4, chunk=32)
    counts = {k: count_parameters(build_layout(k, 1024, **shape)) for k in ("transformer", "yoco", "sambay")}
    assert all(abs(c / counts["transformer"] - 1) <= 0.15 for c in counts.values())
    with pytest.raises(ValueError, match="layout"): build_layout("mamba", 1024, **shape)


def test_select_batch_keeps_rows():
    model, x = tiny("sambay"), torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.new_cache(3); model(x[:, :8], cache=cache); cache.select_batch([2, 0])
        step = model(x[[2, 0], 8:9], cache=cache)
        assert torch.allclose(step[:, 0], model(x[[2, 0]])[:, -1], atol=1e-10)


def tiny_bench_context(n_layers=6):
    from paper_repro.core.train import OptimConfig
    from paper_repro.core.zoo import load_tokenizer
    from paper_repro.lm.bench import LMBenchContext
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 1000, (3000,), generator=g)
    return LMBenchContext("ci", torch.device("cpu"), 0, load_tokenizer(), stream, stream[:2 * 33].view(2, 33), 32, 2,
                          2, 32, n_layers, 2, 88, OptimConfig(lr=1e-3), 1)


@pytest.mark.parametrize("n_layers", [4, 6])
def test_bench_shape_matches_parameters(n_layers):
    from paper_repro.lm.sambay import bench_shape
    ctx = tiny_bench_context(n_layers)
    base = count_parameters(TransformerLM(ctx.base_config()))
    for layout in ("yoco", "sambay"):
        shape = bench_shape(ctx, layout)
        assert shape["n_layers"] == 8
        assert abs(count_parameters(HybridLM(HybridConfig(1024, layout, **shape))) / base - 1) < 0.05


def test_bench_methods_train_and_decode():
    from paper_repro.lm.sambay import bench_methods
    ctx = tiny_bench_context()
    entries = bench_methods(ctx)
    assert [e.name for e in entries] == ["SambaY (GMU)", "YOCO (Samba self-decoder)"]
    assert entries[0].paper_headline.value == 10.0 and entries[0].paper_headline.category == "decode_speedup"
    m = entries[0].method
    model = m.train(ctx)
    assert isinstance(model, HybridLM) and ctx.tokens_drawn == 2 * 2 * 32
    out = m.generate(model, ctx.val[:, :8], 5)
    assert out.shape == (2, 5) and m.kv_bytes_per_token(model) == 2 * 32 * 4
