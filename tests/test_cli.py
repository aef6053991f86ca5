"""The `cispo` command: its help lists the config groups; a user's mistake (a misspelt key, a missing preset, a
value a rule refuses, a model package that does not exist, a missing file) is one line on stderr with exit status 2,
naming the nearest real key or preset, and no traceback; the wheel that `pip install .` builds carries the configs
and trains from anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHORT = ["trainer.steps=2", "data.eval_size=32", "trainer.eval_every=0", "model.warm_start.max_steps=20",
         "model.warm_start.eval_every=20", "model.warm_start.warmup_steps=5", "reward.num_workers=1",
         "logger.plot=false"]


def env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", WANDB_MODE="offline", **extra)


def cispo(*args: str, cwd: Path = REPO, timeout: int = 300, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cispo", *args], cwd=cwd, env=env(**extra), capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error a user sees: exit status 2, one line on stderr, no traceback and no Hydra frame around it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  warnings.warn")]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, lines
    return lines[0]


def test_help_lists_the_commands_and_config_groups():
    top = cispo("--help")
    assert top.returncode == 0
    for command in ("train", "eval", "import-gguf", "filter", "bench"):
        assert f"  {command} " in top.stdout, command
    train = cispo("train", "--help")
    assert train.returncode == 0, train.stderr
    for group in ("model", "algo", "rollout", "reward", "data", "trainer", "logger", "env", "experiment"):
        presets = sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))
        assert f"  {group:<11} {', '.join(presets)}" in train.stdout, group
    evaluation = cispo("eval", "--help")
    assert "endpoint" in evaluation.stdout and "local_vllm, openrouter_m1" in evaluation.stdout


def test_a_misspelt_key_names_the_nearest_one():
    line = one_line_error(cispo("train", "algo.is_weigth_max=3"))
    assert line.startswith("error: algo.is_weigth_max is not a config key; did you mean algo.is_weight_max?"), line
    line = one_line_error(cispo("train", "rollout.server.prot=8300"))
    assert "did you mean rollout.server.port?" in line, line
    line = one_line_error(cispo("eval", "eval.kk=8"))
    assert "did you mean eval.k?" in line, line


def test_a_missing_preset_names_the_nearest_one():
    line = one_line_error(cispo("train", "algo=dapoo"))
    presets = ", ".join(sorted(p.stem for p in (REPO / "configs" / "algo").glob("*.yaml")))
    assert "did you mean algo=dapo?" in line and f"the algo presets are {presets}" in line, line
    # an optional group (experiment) with a missing file: Hydra alone would run the default run instead
    line = one_line_error(cispo("train", "experiment=tiny_tool"))
    assert "did you mean experiment=tiny_tools?" in line, line


def test_a_wrong_type_and_a_refused_value_are_one_line():
    line = one_line_error(cispo("train", "trainer.steps=many"))
    assert line.startswith("error: trainer.steps:") and "Integer" in line, line
    line = one_line_error(cispo("train", "algo.pi_old=engine", "algo.tis_cap=2.0"))
    assert "algo.tis_cap" in line and "algo.pi_old=trainer" in line, line


def test_a_model_package_that_does_not_exist_is_one_line(tmp_path):
    """Found during the run, after the data and the graders are up: still the user's error, still one line."""
    proc = cispo("train", "model.path=gguf:no-such-package", *SHORT, f"trainer.output_dir={tmp_path}",
                 f"model.cache_dir={tmp_path / 'cache'}", "logger.wandb_mode=disabled")
    line = one_line_error(proc)
    assert line.startswith("error: ") and "no-such-package" in line, line


def test_import_gguf_and_bench_errors_are_one_line(tmp_path):
    line = one_line_error(cispo("import-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")))
    assert "missing.gguf" in line, line
    line = one_line_error(cispo("bench", "vs_trll"))
    assert "did you mean `cispo bench vs-trl`?" in line, line
    line = one_line_error(cispo("trian"))
    assert "did you mean `cispo train`?" in line, line
    listing = cispo("bench")
    assert listing.returncode == 0 and "default-run" in listing.stdout and "compare-losses" in listing.stdout


def test_hydra_flags_pass_through_around_the_overrides():
    for args in (["trainer.steps=3", "--cfg", "job"], ["--cfg", "job", "trainer.steps=3"]):
        proc = cispo("train", *args)
        assert proc.returncode == 0 and "\n  steps: 3\n" in proc.stdout, (args, proc.stderr[-2000:])


def test_the_scripts_are_the_same_commands():
    proc = subprocess.run([sys.executable, "scripts/train.py", "algo.is_weigth_max=3"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert "did you mean algo.is_weight_max?" in one_line_error(proc)


@pytest.mark.slow
def test_the_installed_wheel_carries_the_configs_and_trains(tmp_path):
    """`pip install .` (not editable): the wheel holds configs/ as cispo/configs, and `python -m cispo train` run
    from a folder with no checkout composes from it and trains."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("cispo_rl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    assert sorted(n.removeprefix("cispo/configs/") for n in names if n.startswith("cispo/configs/")) == shipped
    assert "cispo/commands/evaluate.py" in names and not any(n.startswith("scripts/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "cispo = cispo.cli:main" in entry_points

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", "import cispo.cli; print(cispo.cli.CONFIGS)"], cwd=work,
                           env=env(PYTHONPATH=str(site)), capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()) == site / "cispo" / "configs"
    run = work / "run"
    proc = cispo("train", *SHORT, f"trainer.output_dir={run}", f"model.cache_dir={tmp_path / 'cache'}", cwd=work,
                 timeout=900, PYTHONPATH=str(site))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out accuracy:" in proc.stdout
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
