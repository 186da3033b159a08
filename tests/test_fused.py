"""core.fused: the fused inference view computes the eager model's logits and decodes the same tokens."""
import pytest
import torch

from paper_repro.core.decoding import Sampler, batch_greedy_decode, generate, greedy_decode, reference_decode
from paper_repro.core.fused import FusedLM, fused_view
from paper_repro.core.lm import LMConfig, TransformerLM


def tiny(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=128) | kw
    return TransformerLM(LMConfig(**cfg)).to(dtype).eval()


def eager(model):
    model.decode_fused = False
    return model


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_logits_match_eager_prefill_step_and_tree(kv_heads):
    model = tiny(n_kv_heads=kv_heads)
    fast = fused_view(model)
    assert isinstance(fast, FusedLM)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 50, (3, 12), generator=g)
    ce, cf = model.new_cache(3, 4), fast.new_cache(3, 4)  # small capacity: both grow the cache the same way
    with torch.no_grad():
        torch.testing.assert_close(model(toks[:, :8], cache=ce), fast(toks[:, :8], cache=cf), rtol=0, atol=1e-12)
        torch.testing.assert_close(model(toks[:, 8:9], cache=ce), fast(toks[:, 8:9], cache=cf), rtol=0, atol=1e-12)
        # a 3-node tree: nodes 1 and 2 are siblings at depth 1, node 3 a child of node 1
        tree = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
        mask = torch.cat([torch.ones(3, 9, dtype=torch.bool), tree], 1).expand(3, 3, 12)
        pos = torch.tensor([9, 9, 10]).expand(3, 3)
        a = model(toks[:, 9:12], positions=pos, cache=ce, attn_mask=mask, return_hidden=True)
        b = fast(toks[:, 9:12], positions=pos, cache=cf, attn_mask=mask, return_hidden=True)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=1e-12)
        assert ce.length == cf.length == 12
        torch.testing.assert_close(ce.k[:, :, :, :12], cf.k[:, :, :, :12], rtol=0, atol=1e-12)
        # overwrite slots inside the cache (cache_start), as a masked-diffusion dual cache does
        m2 = torch.ones(3, 2, 12, dtype=torch.bool)
        torch.testing.assert_close(model(toks[:, :2], cache=ce, cache_start=4, attn_mask=m2),
                                   fast(toks[:, :2], cache=cf, cache_start=4, attn_mask=m2), rtol=0, atol=1e-12)


def test_protocol_errors_are_the_eager_ones():
    fast = fused_view(tiny())
    with pytest.raises(ValueError, match="tokens must be"): fast(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cache_start needs an explicit attn_mask"):
        fast(torch.zeros(1, 2, dtype=torch.long), cache=fast.new_cache(), cache_start=0)
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        fast(torch.zeros(1, 2, dtype=torch.long), attn_mask=torch.ones(2, 3, dtype=torch.bool))
    class Sub(TransformerLM): pass
    with pytest.raises(ValueError, match="plain TransformerLM, got Sub"):
        FusedLM(Sub(tiny().cfg))


def test_view_is_cached_until_weights_change_and_passes_other_models_through():
    model = tiny()
    fast = fused_view(model)
    assert fused_view(model) is fast and "_fused_view" not in dict(model.named_modules())
    assert set(model.state_dict()) == set(tiny().state_dict())        # the view is not part of the model's state
    with torch.no_grad(): model.layers[0].mlp.up_proj.weight.add_(0.1)
    fresh = fused_view(model)
    assert fresh is not fast
    x = torch.randint(0, 50, (1, 5))
    with torch.no_grad(): torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-12)
    class Sub(TransformerLM): pass
    sub = Sub(model.cfg)
    assert fused_view(sub) is sub
    assert fused_view(eager(model)) is model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoding_is_token_identical_to_eager(dtype):
    fast_model, slow_model = tiny(dtype), eager(tiny(dtype))
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        prompt = torch.randint(0, 50, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()
        a = greedy_decode(fast_model, prompt, 20).tokens
        assert a == greedy_decode(slow_model, prompt, 20).tokens == reference_decode(slow_model, prompt, 20)
        s = Sampler(temperature=1.0, seed=5)
        assert generate(fast_model, prompt, 12, sampler=s).tokens == generate(slow_model, prompt, 12, sampler=s).tokens
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    assert batch_greedy_decode(fast_model, prompts, [5, 9, 7]).tokens == batch_greedy_decode(slow_model, prompts, [5, 9, 7]).tokens


def test_static_greedy_matches_greedy_decode_and_resumes():
    from paper_repro.core.fused import StaticGreedy
    for kv in (None, 2):
        model = tiny(n_kv_heads=kv)
        for prompt in ([7], [1, 2, 3, 4, 5, 6, 7, 8]):
            assert StaticGreedy(model, prompt, 15).run() == greedy_decode(model, prompt, 15).tokens
    s = StaticGreedy(tiny(), [4, 4, 9], 9)
    assert s.run(2) + s.run(7) == greedy_decode(tiny(), [4, 4, 9], 9).tokens and s.cache.length == 3 - 1 + 9


def test_static_greedy_float32_zoo_target_is_token_identical():
    from paper_repro.core.fused import StaticGreedy
    from paper_repro.core.zoo import load_zoo
    target = load_zoo("code-target")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        prompt = torch.randint(0, target.vocab_size, (24,), generator=g).tolist()
        assert StaticGreedy(target, prompt, 24).run() == greedy_decode(target, prompt, 24).tokens


def test_static_greedy_errors():
    from paper_repro.core.fused import StaticGreedy
    with pytest.raises(ValueError, match="non-empty prompt"): StaticGreedy(tiny(), [], 3)
    with pytest.raises(ValueError, match="exceeds the context length 128"): StaticGreedy(tiny(), [1] * 100, 29)
    with pytest.raises(ValueError, match="needs a CUDA model"): StaticGreedy(tiny(), [1], 3, graph=True)
    s = StaticGreedy(tiny(), [1], 3)
    with pytest.raises(ValueError, match="max_new_tokens=4: 1 to 3 left"): s.run(4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_greedy_is_token_identical_to_eager_cuda():
    from paper_repro.core.fused import StaticGreedy
    model = tiny(torch.float32).cuda()
    prompt = [3, 1, 4, 1, 5]
    assert StaticGreedy(model, prompt, 20, graph=True).run() == StaticGreedy(model, prompt, 20).run()
    assert StaticGreedy(model, prompt, 20, graph=True).run() == greedy_decode(model, prompt, 20).tokens


def test_cross_attention_decoder_matches_eager_and_decodes_the_same():
    from paper_repro.core.fused import StaticGreedy
    from paper_repro.core.lm import ConditionedLM
    dec = tiny(cross_attention=True, d_memory=16)
    states = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    memory = dec.encode_memory(states, lengths=torch.tensor([5, 3]))
    toks = torch.randint(0, 50, (2, 6))
    fast = fused_view(dec)
    with torch.no_grad():
        torch.testing.assert_close(dec(toks, memory=memory), fast(toks, memory=memory), rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="pass memory="): fast(toks)
    bound = ConditionedLM(dec, memory)
    view = fused_view(bound)
    assert isinstance(view, ConditionedLM) and isinstance(view.decoder, FusedLM)
    prompts = [[1, 2], [3, 4, 5]]
    slow = ConditionedLM(eager(tiny(cross_attention=True, d_memory=16)), memory)
    assert fused_view(slow) is slow
    assert batch_greedy_decode(bound, prompts, 8).tokens == batch_greedy_decode(slow, prompts, 8).tokens
    with pytest.raises(ValueError, match="without cross-attention"): StaticGreedy(dec, [1], 2)
