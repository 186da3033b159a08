"""code_var: the patch tokenizer, the block-causal VAR on core.lm (one teacher-forced pass equals cached scale-by-scale
decoding), the refiner's one-pass prefix read, CoDe's hand-over and its KV-cache accounting."""
import pytest
import torch

from paper_repro.generation.code_var import (ROLES, SCALES, PatchVQ, SampleConfig, VAR, VARConfig, block_causal_mask,
                                             cache_bytes, collaborative_decode, decode_scales, new_cache, next_inputs,
                                             scale_offsets, teacher_inputs, var_loss)


def models(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    tok = PatchVQ(32)
    with torch.no_grad(): tok.msvq.vq.codebook.weight.normal_(0, 0.5)
    large = VAR(VARConfig(codebook_size=32, d_model=32, n_layers=2, n_heads=2, d_ff=64))
    small = VAR(VARConfig(codebook_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    return tok.to(dtype), large.to(dtype).eval(), small.to(dtype).eval()


def test_offsets_and_block_causal_mask():
    assert scale_offsets(SCALES) == [0, 1, 5, 14, 30, 66, 130]
    M = block_causal_mask((1, 2, 3))
    level = torch.tensor([0] + [1] * 4 + [2] * 9)
    assert torch.equal(M, level[None, :] <= level[:, None])
    assert M[1:5, 1:5].all() and not M[1, 5:].any()   # a scale sees all of itself, nothing finer


def test_tokenizer_round_trip_improves_with_scales():
    torch.manual_seed(0)
    tok = PatchVQ(64)
    x = torch.rand(6, 1, 16, 16)
    assert torch.allclose(tok.images(tok.features(x)), x, atol=1e-6)      # patch features are exact
    f = tok.features(x).permute(0, 2, 3, 1).reshape(-1, 4)
    tok.msvq.vq.kmeans_init(f, iters=5, gen=torch.Generator().manual_seed(0))
    codes = tok.encode(x)
    assert [tuple(c.shape) for c in codes] == [(6, s, s) for s in SCALES]
    errs = [float(((tok.decode(codes[:k]) - x) ** 2).mean()) for k in range(1, 7)]
    assert errs[-1] < errs[0]
    with pytest.raises(ValueError, match="last scale"): PatchVQ(8, img_size=16, patch=4)


def test_teacher_forcing_equals_cached_scale_by_scale_decoding():
    tok, large, _ = models(dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    codes, cache = decode_scales(large, tok, y, [], 6, SampleConfig(), torch.Generator().manual_seed(0))
    assert cache.length == 130
    full = large.logits(large.embed(y, teacher_inputs(tok, codes), 0), 0)
    cache2, parts = new_cache(large, 3, 130), []
    for k in range(6):
        st = large.offsets[k]
        parts.append(large.logits(large.embed(y if k == 0 else None, next_inputs(tok, codes[:k]) if k else None, st),
                                  st, cache2))
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-10)


def test_refiner_one_pass_prefix_matches_stepwise_and_continues():
    tok, large, small = models(dtype=torch.float64)
    y = torch.tensor([4, 5])
    drafted, _ = decode_scales(large, tok, y, [], 3, SampleConfig(), torch.Generator().manual_seed(1))
    # the refiner from the drafted prefix (one pass) = the refiner fed the same prefix scale by scale
    a, ca = decode_scales(small, tok, y, drafted, 6, SampleConfig(), torch.Generator().manual_seed(2))
    cache = new_cache(small, 2, 130)
    for k in range(3):
        st = small.offsets[k]
        small.logits(small.embed(y if k == 0 else None, next_inputs(tok, drafted[:k]) if k else None, st), st, cache)
    b, cb = decode_scales(small, tok, y, drafted, 6, SampleConfig(), torch.Generator().manual_seed(2), cache=cache)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and ca.length == cb.length == 130
    assert all(torch.equal(u, v) for u, v in zip(a[:3], drafted))


def test_collaborative_decode_endpoints_and_cache_accounting():
    tok, large, small = models()
    y = torch.arange(4)
    gen = lambda: torch.Generator().manual_seed(7)
    alone = collaborative_decode(large, small, tok, y, 6, gen=gen())
    ref, _ = decode_scales(large, tok, y, [], 6, SampleConfig(), gen())
    assert all(torch.equal(u, v) for u, v in zip(alone.codes, ref)) and set(alone.cache_bytes) == {"drafter"}
    assert set(collaborative_decode(large, small, tok, y, 0, gen=gen()).cache_bytes) == {"refiner"}
    code4 = collaborative_decode(large, small, tok, y, 4, gen=gen())
    assert all(torch.equal(u, v) for u, v in zip(code4.codes[:4], alone.codes[:4]))
    assert code4.images.shape == (4, 1, 16, 16)
    per_slot = lambda m: 2 * m.cfg.n_layers * m.cfg.d_model * 4  # k and v, float32
    assert code4.cache_bytes["drafter"] == 4 * 30 * per_slot(large)
    assert code4.cache_bytes["refiner"] == 4 * 130 * per_slot(small)
    assert alone.peak_cache_bytes == 4 * 130 * per_slot(large)
    with pytest.raises(ValueError, match="n_draft"): collaborative_decode(large, small, tok, y, 7)


def test_guidance_doubles_rows_and_changes_samples():
    tok, large, small = models()
    y = torch.arange(3)
    plain = collaborative_decode(large, small, tok, y, 3, SampleConfig(), torch.Generator().manual_seed(0))
    guided = collaborative_decode(large, small, tok, y, 3, SampleConfig(cfg=2.0), torch.Generator().manual_seed(0))
    assert guided.cache_bytes["drafter"] == 2 * plain.cache_bytes["drafter"]
    assert any(not torch.equal(u, v) for u, v in zip(plain.codes, guided.codes))


def test_var_loss_trains():
    tok, large, _ = models()
    large.train()
    x, y = torch.rand(8, 1, 16, 16), torch.arange(8)
    opt = torch.optim.AdamW(large.parameters(), 3e-3)
    first = var_loss(large, tok, x, y).item()
    for _ in range(15):
        loss = var_loss(large, tok, x, y)
        opt.zero_grad(); loss.backward(); opt.step()
    assert loss.item() < first - 0.3
    assert set(ROLES) == {"large", "small"}
