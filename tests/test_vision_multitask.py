"""The multi-task harness: scene tensors, task losses/metrics, Δm%, gradient cosine, the baseline model."""
import math

import pytest
import torch

from paper_repro.core.train import OptimConfig, fit
from paper_repro.vision import multitask as mt


@pytest.fixture(scope="module")
def scenes():
    return mt.render_scenes(4, seed=3, size=16)


def test_splits_are_disjoint_and_deterministic():
    s = mt.scene_splits(2, 2, 2, size=16)
    again = mt.render_scenes(2, seed=mt.SPLIT_OFFSETS["test"], size=16)
    assert torch.equal(s["test"]["rgb"], again["rgb"])
    assert not torch.equal(s["train"]["rgb"], s["test"]["rgb"])


def test_depth_background_is_zero_and_masked(scenes):
    assert (scenes["depth"][~scenes["valid"]] == 0).all()
    assert torch.isfinite(scenes["depth"]).all() and (scenes["depth"][scenes["valid"]] > 0).all()
    # the pointmap's depth agrees with the depth map: every object pixel has a non-zero world point
    assert (scenes["pointmap"].norm(dim=1)[scenes["valid"]] > 0).all()


def test_batches_cover_an_epoch_without_repeats(scenes):
    draw = mt.batches_from({"i": torch.arange(10)}, batch_size=3, seed=0)
    epoch = torch.cat([draw(k)["i"] for k in range(3)])
    assert len(epoch.unique()) == 9  # 3 batches of 3 from 10 rows: no row twice, the tenth dropped
    assert not torch.equal(draw(0)["i"], draw(3)["i"])  # a new permutation in the next epoch
    with pytest.raises(ValueError, match="differ in length"):
        mt.batches_from({"a": torch.zeros(3), "b": torch.zeros(4)}, 1)


def _perfect(d):
    return {"semseg": torch.nn.functional.one_hot(d["semantic"], 4).permute(0, 3, 1, 2).float() * 20,
            "depth": d["depth"].clamp_min(1e-3).log()[:, None], "normals": d["normals"],
            "edges": (d["edges"] * 40 - 20)[:, None], "pointmap": d["pointmap"]}


def test_metrics_rank_a_perfect_prediction_above_a_noisy_one(scenes):
    tasks = mt.scene_tasks(list(mt.SCENE_TASKS))
    good = _perfect(scenes)
    g = torch.Generator().manual_seed(0)
    bad = {k: torch.randn(v.shape, generator=g) for k, v in good.items()}  # pure noise
    for name, t in tasks.items():
        better = t.metric(good[name], scenes) > t.metric(bad[name], scenes)
        assert better == t.higher_is_better, name
        assert t.loss(good[name], scenes) < t.loss(bad[name], scenes), name


def test_multitask_loss_is_the_weighted_sum(scenes):
    tasks = mt.scene_tasks(["semseg", "depth"])
    g = torch.Generator().manual_seed(1)
    preds = {"semseg": torch.randn(4, 4, 16, 16, generator=g), "depth": torch.randn(4, 1, 16, 16, generator=g)}
    out = mt.multitask_loss(preds, scenes, tasks, weights={"depth": 3.0})
    assert torch.isclose(out["loss"], out["loss_semseg"] + 3 * out["loss_depth"])
    with pytest.raises(ValueError, match="unknown tasks"):
        mt.multitask_loss(preds, scenes, tasks, weights={"edges": 1.0})


def test_evaluate_is_independent_of_batch_size(scenes):
    tasks = mt.scene_tasks(["semseg", "edges", "normals"])
    torch.manual_seed(0)
    model = mt.MultiTaskDense(tasks, img_size=16, depth=1, dim=16, heads=2, hidden=8).eval()
    a = mt.evaluate_tasks(model, scenes, tasks, batch_size=1)
    b = mt.evaluate_tasks(model, scenes, tasks, batch_size=4)
    for k in tasks: assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), k


def test_delta_m_by_hand():
    tasks = mt.scene_tasks(["semseg", "depth", "normals"])
    multi, single = {"semseg": 0.6, "depth": 0.15, "normals": 22.0}, {"semseg": 0.5, "depth": 0.2, "normals": 20.0}
    assert math.isclose(mt.delta_m(multi, single, tasks), 100 * (0.2 + 0.25 - 0.1) / 3)
    with pytest.raises(ValueError, match="undefined"):
        mt.delta_m({"semseg": 1.0}, {"semseg": 0.0}, tasks)


def test_gradient_cosine_detects_a_known_conflict():
    w = torch.zeros(3, requires_grad=True)
    target_a, target_b = torch.tensor([1.0, 0, 0]), torch.tensor([-1.0, 0, 0])  # pulling w opposite ways
    losses = {"a": ((w - target_a) ** 2).sum(), "b": ((w - target_b) ** 2).sum(), "c": w[1] * 1.0}
    cos = mt.task_gradient_cosine(losses, [w])
    assert math.isclose(cos.loc["a", "b"], -1.0, abs_tol=1e-9) and math.isclose(cos.loc["a", "c"], 0.0, abs_tol=1e-9)
    assert math.isclose(cos.loc["a", "a"], 1.0)


def test_naive_multitask_model_learns(scenes):
    tasks = mt.scene_tasks(["semseg", "depth"])
    torch.manual_seed(0)
    model = mt.MultiTaskDense(tasks, img_size=16, depth=1, dim=16, heads=2, hidden=8)
    before = mt.evaluate_tasks(model, scenes, tasks)
    fit(model, mt.multitask_loss_fn(tasks), mt.batches_from(scenes, 4), steps=40, optim=OptimConfig(lr=3e-3),
        progress=False)
    after = mt.evaluate_tasks(model, scenes, tasks)
    assert after["depth"] < before["depth"] and after["semseg"] > before["semseg"]
    out = model(scenes)
    assert out["semseg"].shape == (4, 4, 16, 16) and out["depth"].shape == (4, 1, 16, 16)
