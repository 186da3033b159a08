"""The grouped-query attention extension of paper_repro.core.lm (LMConfig.n_kv_heads, added for MASA's GQA
baseline): the default is unchanged multi-head attention, GQA matches a naive float64 reference, the KV cache holds
only the key/value heads, and cached decoding equals a full forward pass."""
import math

import pytest
import torch
import torch.nn.functional as F

from paper_repro.core.lm import LMConfig, TransformerLM, apply_rope, causal_mask, rope_cos_sin
from paper_repro.core.zoo import load_zoo

CFG = LMConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48)


def build(n_kv_heads=None, dtype=torch.float64):
    torch.manual_seed(0)
    return TransformerLM(LMConfig(**{**CFG.to_dict(), "n_kv_heads": n_kv_heads})).to(dtype)


def test_default_is_multi_head_attention_unchanged():
    assert CFG.n_kv_heads is None and CFG.kv_heads == CFG.n_heads
    a, b = build(None), build(CFG.n_heads)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    x = torch.randint(0, 40, (2, 7))
    assert torch.equal(a(x), b(x))
    zoo = load_zoo("code-draft")                                  # an existing checkpoint loads as before
    assert zoo.cfg.n_kv_heads is None and zoo.new_cache(1, 4).k.shape[2] == zoo.cfg.n_heads


def naive_attention(attn, x, cfg):
    "Grouped-query attention written out: each key/value head repeated for its group of query heads, float64."
    B, T, _ = x.shape
    hd, h, g = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    q = (x @ attn.q_proj.weight.t()).view(B, T, h, hd).transpose(1, 2)
    k = (x @ attn.k_proj.weight.t()).view(B, T, g, hd).transpose(1, 2)
    v = (x @ attn.v_proj.weight.t()).view(B, T, g, hd).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.arange(T)[None], hd, cfg.rope_theta, x.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(~causal_mask(T, 0), float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, -1) @ attn.o_proj.weight.t()


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_grouped_query_attention_matches_a_naive_reference(n_kv):
    model = build(n_kv)
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (n_kv * CFG.head_dim, CFG.d_model)
    x = torch.randn(2, 6, CFG.d_model, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(6)[None].expand(2, 6), CFG.head_dim, CFG.rope_theta, x.dtype)
    ours = attn(x, cos, sin, causal_mask(6, 0), None, 0, 0)
    assert torch.allclose(ours, naive_attention(attn, x, model.cfg), atol=1e-12)


def test_cache_holds_key_value_heads_and_cached_decoding_equals_full_forward():
    model = build(1)
    cache = model.new_cache(2, capacity=16)
    assert cache.k.shape == (CFG.n_layers, 2, 1, 16, CFG.head_dim)
    x = torch.randint(0, 40, (2, 9))
    full = model(x)
    steps = [model(x[:, :5], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(5, 9)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-12)


def test_bad_kv_heads_are_rejected():
    for bad in (0, 3, -1):
        with pytest.raises(ValueError, match="n_kv_heads"): LMConfig(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=bad)


def test_hf_conversion_keeps_grouped_query_attention():
    pytest.importorskip("transformers")
    from paper_repro.core.lm import to_hf_llama
    model = build(2, dtype=torch.float32)
    x = torch.randint(0, 40, (1, 8))
    assert torch.allclose(to_hf_llama(model)(x).logits, model(x), atol=1e-5)
