"""paper_repro.core.zoo: committed models load, match their card, and training is deterministic."""
import pytest
import torch

from paper_repro.core.data import DataError
from paper_repro.core.lm import LMConfig, count_parameters
from paper_repro.core.zoo import ZOO, ZooSpec, load_tokenizer, load_zoo, sample_batch, train_lm, zoo_card


def test_zoo_models_load_and_match_the_card():
    card = zoo_card()
    tok = load_tokenizer()
    assert tok.vocab_size == card["tokenizer"]["vocab_size"]
    for name in ZOO:
        model = load_zoo(name)
        assert count_parameters(model) == card[name]["parameters"]
        assert model.vocab_size == tok.vocab_size and card[name]["val_perplexity"] > 1
    assert 5e6 <= card["code-target"]["parameters"] <= 10e6 and card["code-draft"]["parameters"] <= 1.5e6


def test_unknown_zoo_model():
    with pytest.raises(ValueError, match="unknown zoo model 'gpt5'; valid: code-target, code-draft"): load_zoo("gpt5")


def test_training_is_deterministic():
    stream = torch.randint(0, 64, (5000,), generator=torch.Generator().manual_seed(0))
    spec = ZooSpec("t", "t.pt", LMConfig(64, 32, 1, 2, 64), steps=3, batch_size=2, warmup=1)
    a, b = train_lm(spec, stream, seed=5, progress=False), train_lm(spec, stream, seed=5, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = train_lm(spec, stream, seed=6, progress=False)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_batches_are_windows_of_the_stream():
    stream = torch.arange(100)
    x = sample_batch(stream, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == (4, 11) and torch.all(x[:, 1:] - x[:, :-1] == 1)
