"""bench/gpu_check.sh --dry: the one-shot GPU check rehearsed on the CPU, every section, then with
sections made to hang, fail at import and crash. No wheel folder and no network are needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def _run(out: Path, *extra, env=None, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    env.pop("JAX_PLATFORMS", None)  # the check sets it per section
    return subprocess.run(["bash", "bench/gpu_check.sh", str(out), "--dry", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


def _summary_rows(md: str) -> dict[str, list[str]]:
    """section -> [status, wall/limit, figures] from the markdown table."""
    lines = md.splitlines()
    head = lines.index("| section | status | wall s / limit s | figures |")
    assert lines[head + 1] == "|---|---|---|---|"
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert len(cells) == 4, line
        rows[cells[0]] = cells[1:]
    return rows


def _check_out(out: Path, report: dict) -> None:
    files = _files(out)
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), files  # no deeper than two folders
    assert report["wall_s"] <= report["budget_s"]
    rows = _summary_rows((out / "gpu_check.md").read_text())
    assert list(rows) == list(report["sections"])
    for name, r in report["sections"].items():
        assert rows[name][0] == r["status"].replace("|", "/")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_limits_fit_the_budget():
    assert sum(s.limit_s for s in gpu_check.SECTIONS) + 10 <= gpu_check.BUDGET_S
    assert sum(s.dry_limit_s for s in gpu_check.SECTIONS) <= gpu_check.DRY_BUDGET_S
    # gpu_check.sh: 25 s install + the python run's hard stop (470 - install - 5) fits the device's 480 s
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "TOTAL_S=470" in text and "INSTALL_S=25" in text


def test_sections_needing_a_broken_import_are_not_run():
    report = {"sections": {"preflight": {"status": "ok", "figures": {"imports": {
        "flax.nnx": "AttributeError: module 'jax.experimental.hijax' has no attribute 'HiPrimitive'", "jax": "ok"}}}}}
    why = gpu_check._not_runnable(gpu_check.BY_NAME["step7b"], report)
    assert why.startswith("not run: needs flax.nnx (AttributeError") and "HiPrimitive" in why
    assert gpu_check._not_runnable(gpu_check.BY_NAME["attention"], report) is None


def test_the_real_run_refuses_without_wheels(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(tmp_path / "none")}
    r = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "no wheels in" in r.stderr and "--make-wheels" in r.stderr
    assert not _files(tmp_path / "out")


@pytest.mark.slow
def test_rehearsal_every_section(tmp_path):
    out = tmp_path / "out"
    r = _run(out)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["finished"] and report["dry"]
    statuses = {n: s["status"] for n, s in report["sections"].items()}
    assert statuses == {s.name: "ok" for s in gpu_check.SECTIONS}, "\n".join(
        f"{n}: {s['status']}: {s.get('error')}" for n, s in report["sections"].items() if s["status"] != "ok")
    fig = {n: s["figures"] for n, s in report["sections"].items()}
    assert fig["preflight"]["backend"] == "cpu"
    assert all(v.startswith("ok") for v in fig["preflight"]["imports"].values()), fig["preflight"]["imports"]
    assert fig["flash"]["parity_ok"] is True and set(fig["flash"]["rel_err_vs_reference"]) == {"loss", "dq", "dk", "dv"}
    for impl in ("flash", "cudnn", "blockwise"):
        row = fig["attention"][impl]
        assert "error" not in row, row
        assert _positive(row["forward_tflops"]) and _positive(row["forward_backward_tflops"])
        assert row["rel_err_vs_reference"] < 2e-2  # against the dense reference, never against itself
    assert fig["target"]["core_count"] == "132" and (out / "gpu_target_config.pbtxt").is_file()
    for name in ("step7b", "step05b"):
        f = fig[name]
        assert _positive(f["step_s"]) and _positive(f["planned_peak_bytes"]) and _positive(f["measured_peak_bytes"])
        assert _positive(f["roofline"]["step_s"]) and sum(f["roofline"]["shares"].values()) == pytest.approx(1.0)
        assert _positive(f["measured_over_roofline"])
    assert _positive(fig["torch"]["ratios"]["loss_tokens_per_s"])
    assert set(fig["offload"]["measured"]) == {"offload", "full"} and _positive(fig["offload"]["offload_over_full_step"])
    _check_out(out, report)
    assert sorted(p.name for p in _files(out)) == ["gpu_check.json", "gpu_check.md", "gpu_target_config.pbtxt",
                                                    "logs.tar.gz"]
    assert "| offload | ok |" in r.stdout  # the summary is printed


@pytest.mark.slow
def test_a_hang_a_failed_import_and_a_crash_cost_their_sections_only(tmp_path):
    out = tmp_path / "out"
    faults = "flash:hang,attention:import,step05b:crash"
    r = _run(out, "--sections", "preflight", "flash", "attention", "target", "step05b", "--limit", "flash=8",
             env={"GPU_CHECK_FAULTS": faults})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    s = report["sections"]
    assert s["preflight"]["status"] == "ok" and s["preflight"]["figures"]["backend"] == "cpu"
    assert s["target"]["status"] == "ok" and s["target"]["figures"]["core_count"] == "132"
    # the hang: killed at its limit with what it had measured, and its own child killed with it
    assert s["flash"]["status"] == "timed out after 8 s" and s["flash"]["wall_s"] < 8 + 10
    assert s["flash"]["figures"]["self_check"]["why"].startswith("skipped")
    pid = s["flash"]["figures"]["fault_grandchild_pid"]
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text(), "the hung section's child outlived it"
    assert s["attention"]["status"] == "import failed" and "gpu_check_injected_fault" in s["attention"]["error"]
    # the crash: the figure recorded before it survives
    assert s["step05b"]["status"] == "crashed (signal 11: SIGSEGV)"
    assert s["step05b"]["figures"]["command"].startswith("python -m bench.throughput")
    assert report["finished"]
    _check_out(out, report)
