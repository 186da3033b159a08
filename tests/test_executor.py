"""`--executor ray` (paper_repro.core.executor): papers fanned out as Ray tasks over a local Ray instance with two
workers, started once for the module (about 10 s; more on a busy machine). Real papers at `ci` scale, then fake
checkouts for a failing paper and for Ctrl-C. Skipped, with the reason, where ray is not installed."""
import _thread
import json
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import nbformat
import pytest

ray = pytest.importorskip("ray", reason="--executor ray needs the ray package: pip install 'paper_repro[ray]'")

from paper_repro.cli import main
from paper_repro.core.catalog import notebook_path
from paper_repro.core.executor import PaperTask, RayExecutor
from paper_repro.core.repro import ResultsLock

from test_cli import fake_paper_notebook

FAST = ("learn2pd", "subtitle_asr", "qwen_audio")  # the three quickest papers at ci scale (about 10 s each)


@pytest.fixture(scope="module")
def cluster():
    """A Ray instance in this process with two CPUs: two tasks at a time. `RayExecutor` uses it (and leaves it up).
    On a machine so loaded that Ray's own processes miss their startup deadline (its raylet waits 30 s for its
    agents) the tests are skipped saying so: that is Ray's startup, not the code under test."""
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20,
                 logging_level="warning")
    except Exception as e:  # Ray raises a bare Exception when its node times out during startup
        if "timed out during startup" not in str(e): raise
        ray.shutdown()
        pytest.skip(f"a local Ray instance could not start here (machine overloaded?): {e}")
    yield ray
    ray.shutdown()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _span(info: dict) -> tuple[float, float]:
    start = datetime.fromisoformat(info["started"]).timestamp()
    return start, start + info["wall_s"]


def test_three_papers_run_as_ray_tasks_and_commit_complete_sets(cluster, tmp_path, capsys):
    code, out, err = cli(capsys, "run", *FAST, "--scale", "ci", "--executor", "ray", "--out-root", str(tmp_path))
    assert code == 0, err
    assert "as Ray tasks (1 CPU each" in out and "3 ok, 0 failed" in out
    spans = []
    for slug in FAST:
        res = tmp_path / "ci" / slug
        info = json.loads((res / "run.json").read_text())
        assert (info["slug"], info["scale"], info["seed"]) == (slug, "ci", 0)
        # the set the worker committed in its scratch folder, whole, and nothing else beside the executed notebook
        on_disk = sorted(p.relative_to(res).as_posix() for p in res.rglob("*") if p.is_file())
        assert on_disk == sorted([*info["files"], "executed.ipynb"])
        assert {"claims.json", "figure.png", "run.json", "table.csv", "table.md"} <= set(info["files"])
        assert all((res / f).stat().st_size > 0 for f in info["files"])
        assert json.loads((res / "claims.json").read_text()) and "scale = \"ci\"" in (res / "executed.ipynb").read_text()
        # provenance says where the set lives and where it ran; the worker's scratch folder is gone
        assert info["parameters"]["out_dir"] == str(res.resolve())   # outside the project root: an absolute path
        assert info["executor"]["name"] == "ray" and not Path(info["executor"]["scratch"]).exists()
        spans.append(_span(info))
    assert not [p.name for p in (tmp_path / "ci").iterdir() if p.name.startswith(".")]   # no staging, no lock left
    # two workers: some two runs overlapped in time (started is rounded to the second)
    spans.sort()
    assert any(later[0] + 1 < earlier[1] for i, earlier in enumerate(spans) for later in spans[i + 1:]), spans


def test_a_failing_paper_is_reported_by_name_and_the_others_finish(cluster, tmp_path, capsys):
    fake_paper_notebook(notebook_path("copyspec", tmp_path), "copyspec")
    fake_paper_notebook(notebook_path("pearl", tmp_path), "pearl", fail=True)
    fake_paper_notebook(notebook_path("ppd", tmp_path), "ppd")
    code, out, err = cli(capsys, "--root", str(tmp_path), "run", "pearl", "copyspec", "ppd", "--scale", "ci",
                         "--device", "cpu", "--executor", "ray")
    assert code == 1
    pearl_nb = tmp_path / "results/ci/pearl/executed.ipynb"
    # the same line the local executor prints (tests/test_cli.py::test_run_keeps_going_after_a_failure)
    assert "FAILED  pearl after " in err
    assert f"ValueError: boom from the fake paper (executed notebook: {pearl_nb})" in err
    assert "Traceback" not in err and "ok      copyspec" in out and "ok      ppd" in out and "2 ok, 1 failed" in out
    assert "boom from the fake paper" in pearl_nb.read_text()
    assert sorted(p.name for p in pearl_nb.parent.iterdir()) == ["executed.ipynb"]   # nothing committed for it
    for slug in ("copyspec", "ppd"):
        res = tmp_path / "results/ci" / slug
        assert json.loads((res / "claims.json").read_text())[0]["id"] == "toy_claim"
        assert json.loads((res / "run.json").read_text())["parameters"]["device"] == "cpu"


def test_a_task_that_cannot_start_on_its_node_is_an_outcome(cluster, tmp_path):
    "A node without the notebook (no shared checkout) fails that paper with a line naming the path; the rest run."
    fake_paper_notebook(notebook_path("copyspec", tmp_path), "copyspec")
    gone = fake_paper_notebook(notebook_path("pearl", tmp_path), "pearl")
    tasks = [PaperTask(s, "ci", "cpu", root=tmp_path) for s in ("copyspec", "pearl")]
    gone.unlink()  # validated on the driver, missing where the task runs
    seen = []
    with ResultsLock(tasks[0].out_dir), ResultsLock(tasks[1].out_dir):
        ok, bad = RayExecutor().run(tasks, seen.append)
    assert ok.ok and not bad.ok and sorted(o.slug for o in seen) == ["copyspec", "pearl"]
    assert bad.error.startswith("FileNotFoundError: node ") and f"has no notebook {gone}" in bad.error
    assert "needs the checkout at the same path" in bad.error and not bad.executed.exists()


def test_ctrl_c_cancels_the_tasks_and_keeps_the_previous_results(cluster, tmp_path, capsys):
    marker = tmp_path / "started.json"
    params = nbformat.v4.new_code_cell('scale = "cpu"\ndevice = "auto"\nseed = 0\nout_dir = None')
    params.metadata["tags"] = ["parameters"]
    body = ("import json, os, time\n"
            f"open({str(marker)!r}, 'w').write(json.dumps(dict(pid=os.getpid(), out_dir=out_dir)))\n"
            "time.sleep(300)")
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    path = notebook_path("copyspec", tmp_path)
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    previous = tmp_path / "results/ci/copyspec/claims.json"
    previous.parent.mkdir(parents=True)
    previous.write_text("[]\n")

    def interrupt_when_running():
        deadline = time.monotonic() + 60
        while not marker.is_file() and time.monotonic() < deadline: time.sleep(0.2)
        _thread.interrupt_main()  # what Ctrl-C does to the driver
    threading.Thread(target=interrupt_when_running, daemon=True).start()
    t0 = time.monotonic()
    code, out, err = cli(capsys, "--root", str(tmp_path), "run", "copyspec", "--scale", "ci", "--executor", "ray")
    assert code == 130 and "interrupted: stopped; previous results are kept" in err
    assert time.monotonic() - t0 < 60 and marker.is_file()
    started = json.loads(marker.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the kernel of the cancelled task is stopped, not left behind
        try: os.kill(started["pid"], 0)
        except ProcessLookupError: break
        time.sleep(0.2)
    else:
        pytest.fail(f"the kernel (pid {started['pid']}) of the cancelled task is still running")
    assert not Path(started["out_dir"]).exists()   # the worker's scratch folder is gone
    assert previous.read_text() == "[]\n" and sorted(p.name for p in previous.parent.iterdir()) == ["claims.json"]
    assert not [p.name for p in previous.parent.parent.iterdir() if p.name.startswith(".")]
