"""scripts/bench_vs_trl.py end to end at the smallest size: the cispo-rl side (a scripts/train.py run with the HF
engine on W1, random weights) always, without making the TRL environment; the TRL side too where that
environment already exists with the pins the script would make it with (making it takes minutes)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--workloads", "W1", "--steps", "2", "--pairs", "1", "--prompts", "4", "--group-size", "4", "--updates", "2",
         "--no-warm-start"]


def bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "vs_trl.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_vs_trl.py"), *SMALL, *args,
                           "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_runs(w1: dict, systems: list[str]) -> None:
    assert [r["system"] for r in w1["runs"]] == systems
    for run in w1["runs"]:
        assert len(run["batches"]) == 2
        for b in run["batches"]:
            assert b["completions"] == 16 and b["tokens"] == 16 * 16  # EOS held off: the whole 16-token budget
            assert all(b[k] > 0 for k in ("step_s", "generate_s", "pi_old_s", "update_s"))
        assert run["median"]["completions_per_s"] > 0 and run["median"]["tokens_per_s"] > 0


def test_cispo_side_figures(tmp_path):
    venv = tmp_path / "trl-venv"
    report, table = bench(tmp_path, "--systems", "hf", "--trl-venv", str(venv))
    assert not venv.exists()  # the TRL environment is made only when trl runs
    w1 = report["workloads"]["W1"]
    assert 0.86e6 < w1["params"] < 0.88e6 and w1["max_tokens"] == 16 and w1["prompts_used"] == 8
    check_runs(w1, ["hf"])
    hf = w1["summary"]["hf"]
    assert hf["tokens_per_s"] == pytest.approx(16 * hf["completions_per_s"])
    assert "ratio_vs_trl" not in hf
    assert report["versions"]["cispo-rl"]["transformers"] and "trl" not in report["versions"]
    assert "\nhf " in table


def trl_ready() -> bool:
    spec = importlib.util.spec_from_file_location("bench_vs_trl", REPO / "scripts" / "bench_vs_trl.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    marker = Path(module.DEFAULT_TRL_VENV).expanduser() / "bench_vs_trl.json"
    return marker.exists() and json.loads(marker.read_text()) == module.trl_pins()


@pytest.mark.skipif(not trl_ready(), reason="no TRL environment (scripts/bench_vs_trl.py makes it on first use)")
def test_trl_side_against_cispo(tmp_path):
    report, table = bench(tmp_path, "--systems", "trl,hf")
    w1 = report["workloads"]["W1"]
    check_runs(w1, ["trl", "hf"])
    assert report["versions"]["trl"]["trl"].startswith("1.16.")
    hf = w1["summary"]["hf"]
    assert hf["ratio_vs_trl"] == pytest.approx(hf["completions_per_s"] / w1["summary"]["trl"]["completions_per_s"])
    assert "\ntrl " in table
