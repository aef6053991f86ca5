"""scripts/compare_losses.py end to end at the smallest size: two variants that are one loss written two ways
(DAPO, and CISPO with the Eq. 7 mask and DAPO's normaliser) run as real `scripts/train.py` processes, and the
summary must show them as one run, with the diagnostics and the per-update ratio rows that the README reads.
A short warm start (to 0.15) gives the groups the mixed rewards without which no update, and no diagnostic, runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_one_loss_written_two_ways_gives_one_run(tmp_path):
    out = tmp_path / "compare"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_losses.py"), "--variants", "dapo", "cispo+mask+token_batch",
         "--lrs", "1e-3", "--updates", "2", "--seeds", "0", "--steps", "2", "--eval-every", "1", "--jobs", "2",
         "--out", str(out), f"model.cache_dir={tmp_path / 'cache'}", "model.warm_start.target_accuracy=0.15",
         "model.warm_start.eval_problems=100",
         "algo.prompts_per_step=8", "algo.drop_zero_variance=false", "data.eval_size=16"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    dapo, cispo = (summary["runs"][f"{v}-lr0.001-u2-seed0"] for v in ("dapo", "cispo+mask+token_batch"))
    assert [s for s, _, _ in dapo["curve"]] == [0, 1, 2]
    assert dapo["curve"][-1][1] == 2 * 8 * json.loads((out / "dapo-lr0.001-u2-seed0" / "config.json").read_text()
                                                      )["algo"]["group_size"]  # samples counted per step
    assert dapo == cispo  # the same gradient, so the same curve, diagnostics and per-update ratios
    assert len(dapo["by_update"]) == 4  # per update: its exit share and mean |log r|
    assert dapo["by_update"]["update_01_exit_frac"] > 0  # the second update sees tokens outside the region...
    assert dapo["diagnostics"]["trust/exit_grad_share_neg_adv"] == 0  # ...and the mask drops their gradient
    assert dapo["entropy_last"] is not None
    cells = summary["cells"]
    assert set(cells) == {"dapo|0.001|2", "cispo+mask+token_batch|0.001|2"}
    assert cells["dapo|0.001|2"]["seeds"] == 1
    assert "cispo+mask+token_batch" in proc.stdout and "steps to 0.6" in proc.stdout
    assert (out / "accuracy.png").stat().st_size > 0


def test_summary_of_runs_that_never_updated(capsys):
    """A run whose groups all had one reward trains nothing and logs no entropy: the table shows '-' for it."""
    spec = importlib.util.spec_from_file_location("compare_losses", REPO / "scripts" / "compare_losses.py")
    compare = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))  # its dataclass looks here
    spec.loader.exec_module(compare)
    run = {"curve": [(0, 0, 0.0), (1, 64, 0.0)], "diagnostics": {}, "entropy_last": None, "by_update": {}}
    cells = compare.summarise({compare.Job("dapo", 1e-3, 2, s): run for s in (0, 1)}, threshold=0.6)
    cell = cells["dapo|0.001|2"]
    assert cell["entropy_last"] is None and cell["reached"] == 0 and cell["seeds"] == 2
    compare.print_tables(cells, 0.6)
    assert capsys.readouterr().out.splitlines()[2].split()[-1] == "-"
