"""paper_repro.core.repro: validation, result files, claims."""
import json

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from paper_repro.core.repro import check_scale, resolve_device, start_run, validate_claim


def test_unknown_scale_and_device_fail_clearly():
    with pytest.raises(ValueError, match=r"unknown scale 'huge'; valid scales: ci, cpu, gpu"): check_scale("huge")
    with pytest.raises(ValueError, match=r"unknown device 'tpu'; valid devices"): resolve_device("tpu")
    with pytest.raises(ValueError, match="valid scales"): start_run("x", scale="fast")


def test_run_writes_all_result_files(tmp_path):
    run = start_run("demo", scale="ci", device="cpu", seed=3, out_dir=tmp_path, extra=1)
    run.save_table(pd.DataFrame({"method": ["a"], "v": [1.23456]}))
    fig, ax = plt.subplots(); ax.plot([1, 2]); run.save_fig(fig); plt.close(fig)
    run.record_claim("c1", "s", "m", "u", 2.0, 3.0, True, "toy", holds=True, note="n")
    run.record_claim("c1", "s", "m", "u", 2.0, 4.0, True, "toy", holds=True)  # same id replaces
    info = run.finish()
    assert {p.name for p in tmp_path.iterdir()} == {"table.csv", "table.md", "figure.png", "claims.json", "run.json"}
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert len(claims) == 1 and claims[0]["our_value"] == 4.0
    run_json = json.loads((tmp_path / "run.json").read_text())
    assert run_json["seed"] == 3 and run_json["parameters"]["extra"] == 1 and run_json["wall_s"] >= 0
    assert set(run_json["versions"]) == {"python", "torch", "paper_repro"} and info["slug"] == "demo"
    assert "| method | v |" in (tmp_path / "table.md").read_text()


def test_must_hold_claim_raises_after_recording(tmp_path):
    run = start_run("demo", scale="ci", device="cpu", out_dir=tmp_path)
    with pytest.raises(AssertionError, match="must hold"):
        run.record_claim("lossless", "s", "m", "u", None, 0.5, True, "toy", holds=False, must_hold=True)
    assert json.loads((tmp_path / "claims.json").read_text())[0]["holds"] is False


@pytest.mark.parametrize("bad, msg", [({"id": "BadId"}, "snake_case"), ({"our_value": True}, "must be a number"),
                                      ({"holds": "yes"}, "holds"), ({"our_value": float("nan")}, "finite")])
def test_claim_validation(bad, msg):
    claim = dict(id="ok", statement="s", metric="m", unit="u", paper_value=None, our_value=1.0, higher_is_better=True,
                 setting="x", holds=True, note="")
    validate_claim(claim)
    with pytest.raises(ValueError, match=msg): validate_claim({**claim, **bad})
    with pytest.raises(ValueError, match="missing field"): validate_claim({k: v for k, v in claim.items() if k != "note"})
