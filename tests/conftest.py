"Shared fixtures: tiny float64 models (ties between logits are then practically impossible)."
import pytest
import torch

from paper_repro.core.lm import LMConfig, TransformerLM

# tiny models: one thread is faster than two, and leaves the other core to a parallel job
torch.set_num_threads(1)


def tiny_lm(vocab=40, d=32, layers=2, heads=4, seed=0):
    torch.manual_seed(seed)
    return TransformerLM(LMConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_ff=2 * d)).double().eval()


@pytest.fixture(scope="session")
def target():
    return tiny_lm()


@pytest.fixture(scope="session")
def draft_model():
    return tiny_lm(d=16, layers=1, heads=2, seed=1)
