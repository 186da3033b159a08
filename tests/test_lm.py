"""paper_repro.core.lm: cache, masks, batching, checkpoints, and the Hugging Face adapter."""
import pytest
import torch

from paper_repro.core.decoding import greedy_decode, reference_decode
from paper_repro.core.lm import (HFCausalLM, KVCache, LMConfig, TransformerLM, load_lm, save_lm, to_hf_llama)
from conftest import tiny_lm


def test_incremental_decoding_matches_full_forward(target):
    x = torch.randint(0, 40, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = target(x)
        cache = target.new_cache(batch_size=3, capacity=2)
        parts = [target(x[:, :4], cache=cache)] + [target(x[:, t:t + 3], cache=cache) for t in range(4, 17, 3)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-10) and cache.length == 17


def test_batch_rows_equal_single_runs(target):
    x = torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = target(x)
        for i in range(4): assert torch.allclose(batched[i], target(x[i:i + 1])[0], atol=1e-10)


def test_left_padded_batch_with_mask_and_positions(target):
    a, b = [5, 6, 7, 8, 9], [3, 4]
    pad = len(a) - len(b)
    tokens = torch.tensor([a, [0] * pad + b])
    positions = torch.tensor([list(range(5)), [0] * pad + list(range(2))])
    mask = torch.ones(2, 5, 5, dtype=torch.bool).tril()
    mask[1, :, :pad] = False
    mask[1, :pad, :pad] = torch.eye(pad, dtype=torch.bool)  # pad rows attend to themselves (ignored)
    with torch.no_grad():
        out = target(tokens, positions=positions, attn_mask=mask)
        assert torch.allclose(out[1, pad:], target(torch.tensor([b]))[0], atol=1e-10)
        assert torch.allclose(out[0], target(torch.tensor([a]))[0], atol=1e-10)


def test_cache_truncate_keep_and_errors():
    c = KVCache(n_layers=2, batch_size=1, n_heads=1, head_dim=2, capacity=1)
    vals = torch.arange(12.).view(1, 1, 6, 2)
    for layer in range(2): c.write(layer, 0, vals, vals)
    c.length = 6
    c.keep([3, 5], start=2)
    assert c.length == 4 and c.k[1, 0, 0, :4, 0].tolist() == [0., 2., 6., 10.]
    c.truncate(1); assert c.length == 1
    with pytest.raises(ValueError, match="cannot truncate"): c.truncate(3)
    with pytest.raises(ValueError, match="strictly increasing"): c.keep([0, 0])
    c.select_batch([0]); assert c.batch_size == 1


def test_input_validation(target):
    with pytest.raises(ValueError, match=r"tokens must be \[batch, T\]"): target(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        target(torch.tensor([[1, 2]]), attn_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache holds batch 2"): target(torch.tensor([[1]]), cache=target.new_cache(2))
    with pytest.raises(ValueError, match="must split into"): LMConfig(vocab_size=10, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="must be positive"): LMConfig(vocab_size=0)


def test_checkpoint_round_trip_and_corruption(tmp_path, target):
    path = tmp_path / "m.pt"
    save_lm(target, path, extra={"name": "t"})
    loaded = load_lm(path, dtype=torch.float64)
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad(): assert torch.equal(loaded(x), target(x))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read LM checkpoint .*m.pt"): load_lm(path)
    torch.save({"some": "dict"}, path)
    with pytest.raises(ValueError, match="not a paper_repro LM checkpoint"): load_lm(path)


def test_hf_conversion_gives_the_same_greedy_tokens_as_transformers_generate(target):
    """Our greedy decode and transformers' own generate (plain and prompt lookup) on the converted weights agree."""
    hf = to_hf_llama(target)
    for prompt in ([1, 2, 3, 1, 2], [7, 8, 9, 10, 11, 7, 8]):
        ours = greedy_decode(target, prompt, 20).tokens
        kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
        theirs = hf.generate(torch.tensor([prompt]), **kw)[0, len(prompt):].tolist()
        lookup = hf.generate(torch.tensor([prompt]), prompt_lookup_num_tokens=3, **kw)[0, len(prompt):].tolist()
        assert ours == theirs == lookup


def test_hf_adapter_runs_the_decoding_core(target, draft_model):
    from paper_repro.core.decoding import DraftModelDrafter, generate
    hf_target, hf_draft = HFCausalLM(to_hf_llama(target)), HFCausalLM(to_hf_llama(draft_model))
    prompt = [4, 5, 6, 4, 5]
    ref = reference_decode(target, prompt, 16)
    assert generate(hf_target, prompt, 16).tokens == ref
    assert generate(hf_target, prompt, 16, DraftModelDrafter(hf_draft, gamma=3)).tokens == ref


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral"])
def test_adapter_on_other_hf_architectures_from_config(arch):
    """A user's own HF model (here tiny, random, built from a config): tree pass = chain passes; spec decoding = greedy."""
    tf = pytest.importorskip("transformers")
    cfg = getattr(tf, f"{arch}Config")(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = HFCausalLM(getattr(tf, f"{arch}ForCausalLM")(cfg).double())
    ctx, nodes = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[7, 8, 9]])
    mask = torch.cat([torch.ones(3, 4, dtype=torch.bool), torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)], 1)
    with torch.no_grad():
        cache = model.new_cache(); model(ctx, cache=cache)
        tree = model(nodes, positions=torch.tensor([4, 5, 4]), cache=cache, attn_mask=mask)[0]
        assert torch.allclose(tree[1], model(torch.tensor([[3, 4, 5, 6, 7, 8]]))[0, -1], atol=1e-8)
        assert torch.allclose(tree[2], model(torch.tensor([[3, 4, 5, 6, 9]]))[0, -1], atol=1e-8)
    from paper_repro.core.decoding import DraftModelDrafter, generate
    ref = reference_decode(model, [1, 2, 3], 12)
    assert generate(model, [1, 2, 3], 12, DraftModelDrafter(model, gamma=3)).tokens == ref


# --- encoder-decoder: embeds input, cross-attention, memory in the cache -------------------------------------------

def _cross_decoder(d_memory=24, seed=0):
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=30, d_model=32, n_layers=2, n_heads=4, d_ff=64, cross_attention=True, d_memory=d_memory)
    return TransformerLM(cfg).double().eval()


def test_cross_attention_incremental_equals_full_and_padding_is_invisible():
    dec = _cross_decoder()
    g = torch.Generator().manual_seed(3)
    states = torch.randn(3, 8, 24, generator=g, dtype=torch.float64)
    lengths = torch.tensor([8, 5, 1])
    x = torch.randint(0, 30, (3, 10), generator=g)
    with torch.no_grad():
        mem = dec.encode_memory(states, lengths)
        full = dec(x, memory=mem)
        cache = dec.new_cache(3, capacity=2, memory=mem)
        steps = torch.cat([dec(x[:, :3], cache=cache)] + [dec(x[:, t:t + 1], cache=cache) for t in range(3, 10)], 1)
        assert torch.allclose(steps, full, atol=1e-10)
        for i, n in enumerate(lengths.tolist()):
            alone = dec(x[i:i + 1], memory=dec.encode_memory(states[i:i + 1, :n]))
            assert torch.allclose(full[i], alone[0], atol=1e-10)
        # the memory really matters: other states give other logits
        assert not torch.allclose(full[0], dec(x[:1], memory=dec.encode_memory(states[1:2]))[0], atol=1e-3)


def test_conditioned_lm_runs_the_core_decoders_row_for_row():
    from paper_repro.core.decoding import batch_greedy_decode, generate
    from paper_repro.core.lm import ConditionedLM
    dec = _cross_decoder(seed=1)
    g = torch.Generator().manual_seed(4)
    states, lengths = torch.randn(3, 6, 24, generator=g, dtype=torch.float64), torch.tensor([6, 2, 4])
    prompts = [[1, 2], [3], [4, 5, 6]]
    with torch.no_grad():
        mem = dec.encode_memory(states, lengths)
        batch = batch_greedy_decode(ConditionedLM(dec, mem), prompts, 7, eos_id=0).tokens
        for i, p in enumerate(prompts):
            single = ConditionedLM(dec, dec.encode_memory(states[i:i + 1, :lengths[i]]))
            ref = generate(single, p, 7, eos_id=0).tokens
            assert batch[i] == ref == reference_decode(single, p, 7, eos_id=0)


def test_embeds_replace_token_embeddings(target):
    x = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(target(embeds=target.embed_tokens(x)), target(x), atol=1e-12)
    with pytest.raises(ValueError, match="exactly one of tokens and embeds"): target(x, embeds=target.embed_tokens(x))
    with pytest.raises(ValueError, match="embeds must be"): target(embeds=torch.zeros(2, 6, 3))


def test_cross_attention_errors_and_checkpoint(tmp_path, target):
    dec = _cross_decoder()
    mem = dec.encode_memory(torch.zeros(2, 4, 24, dtype=torch.float64))
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="cross-attends"): dec(x)
    with pytest.raises(ValueError, match="without cross-attention"): target(x, memory=mem)
    with pytest.raises(ValueError, match="memory holds batch 2"): dec(x[:1], memory=mem)
    with pytest.raises(ValueError, match="memory holds batch 2"): dec.new_cache(3, memory=mem)
    with pytest.raises(ValueError, match=r"states must be \[batch, S>0, 24\]"): dec.encode_memory(torch.zeros(2, 4, 32))
    with pytest.raises(ValueError, match="lengths must lie in"): dec.encode_memory(torch.zeros(2, 4, 24), torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="needs a model built with"): target.encode_memory(torch.zeros(1, 2, 40))
    with pytest.raises(ValueError, match="d_memory=8 needs cross_attention=True"): LMConfig(vocab_size=5, d_memory=8)
    with pytest.raises(ValueError, match="decoder-only"): to_hf_llama(dec)
    save_lm(dec, tmp_path / "dec.pt")
    back = load_lm(tmp_path / "dec.pt", dtype=torch.float64)
    assert back.cfg == dec.cfg
    with torch.no_grad(): assert torch.allclose(back(x, memory=mem), dec(x, memory=mem))
