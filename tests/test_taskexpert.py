"""taskexpert: the expert bank's fused path against the experts one by one, the gated mixture against a loop over
experts, the memory's read/write chain, the no-memory ablation, the ViT layer taps, and bad-input errors."""
import pytest
import torch

from paper_repro.vision.backbones import patch_tokens, vit
from paper_repro.vision.multitask import MultiTaskDense, render_scenes, scene_tasks
from paper_repro.vision.taskexpert import (METHODS, TASKS, MMoE, ExpertBank, TaskExpert, TrainConfig, build_model,
                                           load_or_train_model, train_model, vit_layer_tokens, weights_file)

torch.manual_seed(0)
TOK = torch.randn(2, 6, 16)


def test_expert_bank_fused_equals_experts_one_by_one():
    bank = ExpertBank(16, 4, 8)
    with torch.no_grad():
        bank.weight.normal_(); bank.bias.normal_()  # per-expert affines differ, so a mix-up would show
    E = bank(TOK)
    assert E.shape == (2, 6, 4, 8)
    for k in range(4): torch.testing.assert_close(E[:, :, k], bank.expert(k, TOK))
    assert not torch.allclose(E[:, :, 0], E[:, :, 1])
    with pytest.raises(ValueError, match="valid: 0 … 3"): bank.expert(4, TOK)
    with pytest.raises(ValueError, match="n_experts=0"): ExpertBank(16, 0, 8)


def test_mmoe_is_the_gate_weighted_sum_of_experts_and_memory():
    mm = MMoE(16, ["a", "b"], 3, 8, reads_memory=True)
    memory = {"a": torch.randn(2, 6, 8), "b": torch.randn(2, 6, 8)}
    feats, gates = mm(TOK, memory)
    E = mm.experts(TOK)
    for t in ("a", "b"):
        w = torch.softmax(mm.gates[t](TOK), -1)
        ref = sum(w[..., k:k + 1] * E[:, :, k] for k in range(3)) + w[..., 3:] * memory[t]
        torch.testing.assert_close(feats[t], ref)
        torch.testing.assert_close(gates[t].sum(-1), torch.ones(2, 6))
    assert not torch.allclose(feats["a"], feats["b"])  # each task assembles its own feature
    with pytest.raises(ValueError, match="reads the memory"): mm(TOK)


def test_a_memory_gate_of_one_passes_the_memory_through():
    mm = MMoE(16, ["a"], 3, 8, reads_memory=True)
    with torch.no_grad():
        mm.gates["a"].weight.zero_(); mm.gates["a"].bias.copy_(torch.tensor([-1e4, -1e4, -1e4, 0.0]))
    mem = {"a": torch.randn(2, 6, 8)}
    torch.testing.assert_close(mm(TOK, mem)[0]["a"], mem["a"])


def test_vit_layer_tokens_end_at_the_encoders_patch_tokens():
    enc = vit(32, 4, 3, 32, 2).eval()
    x = torch.rand(2, 3, 32, 32)
    layers = vit_layer_tokens(enc, x)
    assert [l.shape for l in layers] == [(2, 64, 32)] * 3
    torch.testing.assert_close(layers[-1], patch_tokens(enc, x))


def test_taskexpert_chains_the_memory_and_the_ablation_has_none():
    tasks = scene_tasks(("semseg", "depth"))
    full, moe = TaskExpert(tasks, dim=32, n_experts=3).eval(), TaskExpert(tasks, "moe", dim=32, n_experts=3).eval()
    x = torch.rand(2, 3, 32, 32)
    out = full({"rgb": x})
    assert out["semseg"].shape == (2, 4, 32, 32) and out["depth"].shape == (2, 1, 32, 32)
    feats, gates = full.task_features(x)
    assert len(gates) == 4 and [g["depth"].shape[-1] for g in gates] == [3, 4, 4, 4]
    # the last layer's output is the gated mix of its experts and the previous layer's memory
    layers = vit_layer_tokens(full.encoder, x)
    memory = None
    for tok, m in zip(layers, full.mmoe): memory, _ = m(tok, memory)
    torch.testing.assert_close(feats["depth"], memory["depth"])
    assert len(moe.mmoe) == 1 and not moe.mmoe[0].reads_memory
    assert [g["semseg"].shape[-1] for g in moe.task_features(x)[1]] == [3]
    with pytest.raises(ValueError, match="valid: moe, taskexpert"): TaskExpert(tasks, "dense")
    with pytest.raises(ValueError, match="at least one task"): TaskExpert({})


def test_configs_build_the_right_nets_and_reject_bad_values():
    assert isinstance(build_model(TrainConfig(method="shared", dim=32)), MultiTaskDense)
    single = build_model(TrainConfig(method="single", tasks=("edges",), dim=32))
    assert list(single.heads) == ["edges"]
    assert build_model(TrainConfig(method="moe", dim=32)).variant == "moe"
    assert set(METHODS) == {"single", "shared", "moe", "taskexpert"} and len(TASKS) == 5
    assert weights_file(TrainConfig(method="single", tasks=("depth",), seed=2)) == "taskexpert_single_depth_s2.pt"
    with pytest.raises(ValueError, match="valid: single, shared, moe, taskexpert"): TrainConfig(method="x")
    with pytest.raises(ValueError, match="one task"): TrainConfig(method="single")


def test_training_lowers_the_loss_and_round_trips_through_load_or_train(tmp_path):
    (tmp_path / "data").mkdir(); (tmp_path / "data" / "MANIFEST.json").write_text("{}")
    data = render_scenes(16)
    cfg = TrainConfig(method="taskexpert", tasks=("semseg", "depth"), dim=32, n_experts=2, hidden=16, steps=12,
                      batch_size=8, warmup=2)
    model, loss = load_or_train_model(cfg, data, retrain=True, root=tmp_path)
    assert len(loss) == 12 and sum(loss[-3:]) < sum(loss[:3])
    again, loss2 = load_or_train_model(cfg, None, root=tmp_path)
    assert loss2 == loss
    x = {"rgb": data["rgb"][:2]}
    with torch.no_grad(): torch.testing.assert_close(again(x)["depth"], model(x)["depth"], atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="needs the training scenes"):
        load_or_train_model(cfg, None, retrain=True, root=tmp_path)
