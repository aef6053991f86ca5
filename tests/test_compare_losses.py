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


def test_fits_read_the_asymptote_of_each_variant_and_say_which_differ(tmp_path, capsys):
    """Synthetic curves in the runs' own form (step, samples, accuracy): three seeds per variant of sigmoids with
    asymptotes 0.70, 0.60 and 0.80 (each seed's off by N(0, 0.004)), evaluation noise 0.005, 256 samples per step. The
    fits recover each A inside its interval, tell the two apart, predict the late half of each run, and a one-seed
    cell is left unfitted."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("compare_losses", REPO / "scripts" / "compare_losses.py")
    compare = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(compare)
    from cispo.algo.fit import sigmoid

    rng = np.random.default_rng(0)
    steps = np.arange(0, 81, 2)

    def run(A):
        acc = sigmoid(steps * 256.0, A + rng.normal(0, 0.004), 1.5, 3000.0, 0.33) + rng.normal(0, 0.005, len(steps))
        acc[0] = 0.33
        return {"curve": [(int(s), int(s) * 256, float(a)) for s, a in zip(steps, acc)], "diagnostics": {},
                "entropy_last": None, "by_update": {}}

    runs = {compare.Job(v, 3e-5, 16, seed): run(A) for v, A in (("cispo", 0.70), ("dapo", 0.60), ("gspo", 0.80))
            for seed in (0, 1, 2)}
    runs[compare.Job("grpo", 3e-5, 16, 0)] = run(0.65)
    fits = compare.fit_cells(runs, min_samples=0.0, fit_frac=0.5, n_boot=50)
    for variant, A in (("cispo", 0.70), ("dapo", 0.60)):
        f = fits[f"{variant}|3e-05|16"]
        assert f["A_ci"][0] <= A <= f["A_ci"][1] and f["identified"], f
        assert f["C_mid_ci"][0] <= 3000.0 <= f["C_mid_ci"][1]
        assert [s for s in f["late"]] == [0, 1, 2] and max(v["mae"] for v in f["late"].values()) < 0.02
    assert "error" in fits["grpo|3e-05|16"]  # one seed: no bootstrap
    apart = compare.separated(fits)
    assert ("cispo lr 3e-05", "dapo lr 3e-05", "A") in apart and ("gspo lr 3e-05", "cispo lr 3e-05", "A") in apart
    assert not any(p[2] == "C_mid" for p in apart)  # one C_mid for all
    compare.print_fits(fits)
    printed = capsys.readouterr().out
    assert "A: cispo lr 3e-05 > dapo lr 3e-05, intervals apart" in printed and "not fitted" in printed
    cells = compare.summarise(runs, threshold=0.6)
    compare.plot_fits(runs, cells, fits, tmp_path / "fits.png")
    assert (tmp_path / "fits.png").stat().st_size > 0
