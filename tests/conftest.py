"Shared fixtures: tiny float64 models (ties between logits are then practically impossible)."
from pathlib import Path

import pytest
import torch

from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.core.claims import make_claim

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


# a valid claim and a file helper for the catalogue / CLI tests
CLAIM = make_claim(id="speedup", kind="headline", statement="faster than greedy", metric="speed-up over greedy",
                   unit="x", paper_value=2.0, source="toy paper, Table 1", our_value=1.5, threshold=1.0,
                   higher_is_better=True, setting="toy")


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
