"""scripts/demo_tools.py end to end at the smallest size (one seed, one RL step, a 2-step warm start, 4 held-out
products, the HF engine): the table and summary.json hold accuracy with and without the tool, before and after
RL. The full demo (3 seeds, 40 steps) is the README's command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_tools_at_minimal_size(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "demo_tools.py"), "--seeds", "0", "--steps", "1", "--eval-size", "4",
           "--out", str(tmp_path), "--", "rollout.engine=hf", "reward.num_workers=1", "trainer.eval_every=0",
           "model.warm_start.max_steps=2", "model.warm_start.eval_every=1", "model.warm_start.batch_size=4",
           "model.warm_start.eval_problems=4", "model.warm_start.warmup_steps=1", "algo.prompts_per_step=2",
           "algo.group_size=2", "algo.updates_per_step=1", "logger.plot=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["seed"] == 0 and run["warm_start"]["steps"] == 2 and summary["steps"] == 1
    for kind in ("with_tool", "without_tool"):
        assert set(run[kind]) == {"before", "after"} and all(v in (0, 0.25, 0.5, 0.75, 1) for v in run[kind].values())
    assert [step for step, _ in run["curve"]] == [0, 1]
    assert (tmp_path / "seed0" / "final" / "config.json").exists()
    assert "tool:before" in proc.stdout and "no-tool:after" in proc.stdout and "mean: with_tool_before" in proc.stdout
