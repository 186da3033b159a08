"""generation.dit: patchify round trip, adaLN-Zero identity at init, per-token conditioning, masks, and the net under
the shared flow-matching loss and sampler."""
import pytest
import torch

from paper_repro.core.train import OptimConfig, fit
from paper_repro.generation.core import flow_matching_loss, flow_sample
from paper_repro.generation.dit import (DiT, DiTBlock, DiTConfig, ImageHead, PatchTokens, SelfAttention, patchify,
                                        run_blocks, sincos_pos_embed_2d, unpatchify)


def tiny(**kw) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(**{**dict(dim=32, depth=2, heads=2), **kw}))


@pytest.mark.parametrize("shape,p", [((2, 1, 16, 16), 2), ((1, 3, 8, 12), 4), ((2, 2, 6, 6), 1)])
def test_unpatchify_inverts_patchify(shape, p):
    x = torch.randn(shape)
    tokens = patchify(x, p)
    assert tokens.shape == (shape[0], (shape[2] // p) * (shape[3] // p), shape[1] * p * p)
    assert torch.equal(unpatchify(tokens, p, shape[2:]), x)


def test_patch_order_is_row_major_channels_first():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    t = patchify(x, 2)
    assert torch.equal(t[0, 2], x[0, :, 2:4, 0:2].reshape(-1))  # grid row 1, column 0


def test_patchify_errors():
    with pytest.raises(ValueError, match="divide"): patchify(torch.randn(1, 1, 5, 4), 2)
    with pytest.raises(ValueError, match="tile"): unpatchify(torch.randn(1, 3, 4), 2, (4, 4))


def test_sincos_embedding_rows_and_columns():
    pe = sincos_pos_embed_2d((3, 5), 8)
    assert pe.shape == (15, 8)
    assert torch.equal(pe[0, :4], pe[4, :4])       # same row
    assert torch.equal(pe[0, 4:], pe[5, 4:])       # same column
    assert len(torch.unique(pe, dim=0)) == 15
    with pytest.raises(ValueError, match="divisible by 4"): sincos_pos_embed_2d((2, 2), 6)


def test_adaln_zero_block_is_identity_at_init_for_both_condition_shapes():
    blk = DiTBlock(16, 2)
    x = torch.randn(3, 7, 16)
    assert torch.equal(blk(x, torch.randn(3, 16)), x)
    assert torch.equal(blk(x, torch.randn(3, 7, 16)), x)
    torch.nn.init.normal_(blk.ada[-1].weight, std=0.2)
    assert not torch.allclose(blk(x, torch.randn(3, 16)), x)


def test_per_token_condition_equals_broadcast_vector():
    torch.manual_seed(1)
    blk = DiTBlock(16, 2)
    torch.nn.init.normal_(blk.ada[-1].weight, std=0.2)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    assert torch.allclose(blk(x, c), blk(x, c[:, None].expand(2, 5, 16)), atol=1e-6)


def test_condition_shape_error():
    with pytest.raises(ValueError, match="condition must be"): DiTBlock(16, 2)(torch.randn(2, 5, 16), torch.randn(2, 4, 16))


def test_attention_matches_naive_softmax_and_respects_mask():
    torch.manual_seed(2)
    attn = SelfAttention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    s = (q @ k.transpose(-1, -2)) / 2.0
    s = s.masked_fill(~mask, float("-inf"))
    ref = attn.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(attn(x, mask), ref, atol=1e-10)
    x2 = x.clone(); x2[:, 3:] = torch.randn(2, 2, 8, dtype=torch.float64)
    assert torch.allclose(attn(x, mask)[:, :3], attn(x2, mask)[:, :3], atol=1e-10)  # causal: the past ignores the future


def test_dit_shapes_zero_output_at_init_and_stacked_pieces():
    net = tiny()
    x, t, y = torch.randn(4, 1, 16, 16), torch.rand(4), torch.tensor([0, 3, 9, 10])
    out = net(x, t, y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    torch.nn.init.normal_(net.head.linear.weight, std=0.1)
    torch.nn.init.normal_(net.head.ada[-1].weight, std=0.1)
    c = net.condition(t, y)
    by_hand = net.head(run_blocks(list(net.blocks), net.tokens(x), c), c)
    assert torch.allclose(net(x, t, y), by_hand)
    assert not torch.allclose(net(x, t, y), net(x, t, torch.tensor([1, 3, 9, 10])))  # labels matter once trained


def test_config_errors():
    with pytest.raises(ValueError, match="must divide"): DiTConfig(img_size=16, patch_size=3)
    with pytest.raises(ValueError, match="divisible by heads"): DiTConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="images must be"): tiny().tokens(torch.randn(1, 1, 8, 8))


def test_trains_under_flow_matching_and_samples():
    net = tiny()
    x1, y1 = torch.rand(16, 1, 16, 16), torch.randint(0, 10, (16,))
    before = flow_matching_loss(net, x1, y1, torch.Generator().manual_seed(0)).item()
    fit(net, lambda m, b: flow_matching_loss(m, x1, y1), lambda i: None, 40, OptimConfig(lr=3e-3), progress=False)
    after = flow_matching_loss(net, x1, y1, torch.Generator().manual_seed(0)).item()
    assert after < 0.8 * before
    noise = torch.randn(3, 1, 16, 16)
    a = flow_sample(net, noise, 5, torch.arange(3))
    assert a.shape == noise.shape and torch.equal(a, flow_sample(net, noise, 5, torch.arange(3)))  # deterministic
