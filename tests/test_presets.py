"""Every preset composes onto the schema and validates: each experiment (and each value of a sweep), each data
preset; the staged-window presets build their OutputWindow; the paper sweep really launches one job per loss;
the dataset presets' field mappings read local copies laid out like the hub sets."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cispo.cli import register_configs
from cispo.config import Config
from cispo.sampling.curriculum import OutputWindow
from cispo.data.load import load_splits
from cispo.data.prompts import prompt_messages

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DATA = Path(__file__).parent / "data"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
DATA_PRESETS = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml"))

register_configs()


def compose_config(overrides: list[str], hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


def to_config(overrides: list[str]) -> Config:
    return OmegaConf.to_object(compose_config(overrides))


def sweep_values(experiment: str) -> list[list[str]]:
    """The override lists of an experiment's Hydra sweep (hydra.sweeper.params), or [[]] when it has none."""
    params = compose_config([f"experiment={experiment}"], hydra_config=True).hydra.sweeper.params or {}
    runs = [[]]
    for key, values in params.items():
        runs = [run + [f"{key}={v.strip()}"] for run in runs for v in str(values).split(",")]
    return runs


def test_the_expected_presets_exist():
    assert {"m1_40k", "m1_80k", "paper_cispo_vs_dapo", "tiny_cispo", "tiny_window"} <= set(EXPERIMENTS)
    assert {"arithmetic", "dapo_math_17k", "deepscaler", "gsm8k", "code_contests"} <= set(DATA_PRESETS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment):
    for sweep in sweep_values(experiment):
        cfg = to_config([f"experiment={experiment}", *sweep])
        assert isinstance(cfg, Config)
        window = OutputWindow.from_config(cfg.curriculum, cfg.rollout.max_tokens)
        assert window.windows[-1] <= cfg.rollout.max_tokens < cfg.rollout.max_model_len


@pytest.mark.parametrize("preset", DATA_PRESETS)
def test_data_preset_composes(preset):
    assert to_config([f"data={preset}"]).data.source


def test_m1_presets_carry_the_published_settings():
    m1_40k, m1_80k = to_config(["experiment=m1_40k"]), to_config(["experiment=m1_80k"])
    for cfg in (m1_40k, m1_80k):
        assert cfg.algo.loss == "cispo" and cfg.algo.is_weight_min is None and cfg.algo.updates_per_step == 16
        assert tuple(cfg.trainer.adam_betas) == (0.9, 0.95) and cfg.trainer.adam_eps == 1e-15
        assert cfg.model.fp32_lm_head and cfg.rollout.early_stop_k == 3000 and cfg.rollout.temperature == 1.0
        assert cfg.curriculum.sample_rounds > 1  # dynamic sampling
    assert m1_40k.rollout.max_tokens == 40000 and m1_40k.curriculum.windows == []
    assert m1_80k.curriculum.windows == [40000, 48000, 56000, 64000, 72000, 80000]
    assert m1_80k.rollout.max_tokens == 80000


def test_paper_sweep_differs_only_in_the_loss():
    runs = sweep_values("paper_cispo_vs_dapo")
    assert runs == [["algo=cispo"], ["algo=dapo"], ["algo=grpo"]]
    cfgs = [to_config(["experiment=paper_cispo_vs_dapo", *run]) for run in runs]
    assert [c.algo.loss for c in cfgs] == ["cispo", "dapo", "grpo"]
    assert {c.model.path for c in cfgs} == {"Qwen/Qwen2.5-32B"}
    assert {c.data.source for c in cfgs} == {"open-r1/DAPO-Math-17k-Processed"}
    for field in ("group_size", "prompts_per_step", "updates_per_step"):
        assert len({getattr(c.algo, field) for c in cfgs}) == 1
    for other in cfgs[1:]:
        assert (other.rollout, other.reward, other.curriculum, other.data, other.model) == \
            (cfgs[0].rollout, cfgs[0].reward, cfgs[0].curriculum, cfgs[0].data, cfgs[0].model)
        assert other.trainer.lr == cfgs[0].trainer.lr and other.trainer.steps == cfgs[0].trainer.steps


def test_paper_sweep_launches_one_job_per_loss(tmp_path):
    """Hydra's own sweeper (no training): a stand-in task that records each job's loss."""
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import hydra
        from cispo.cli import register_configs
        register_configs()

        @hydra.main(version_base=None, config_path={str(CONFIGS)!r}, config_name="train")
        def main(cfg):
            with open({str(tmp_path / "jobs.txt")!r}, "a") as f:
                f.write(cfg.algo.loss + "\\n")

        main()
    """))
    out = subprocess.run([sys.executable, str(app), "experiment=paper_cispo_vs_dapo",
                          f"trainer.output_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "jobs.txt").read_text().split() == ["cispo", "dapo", "grpo"]


def test_tiny_window_starts_small_and_ends_at_the_rollout_budget():
    cfg = to_config(["experiment=tiny_window"])
    window = OutputWindow.from_config(cfg.curriculum, cfg.rollout.max_tokens)
    assert window.max_tokens == 4 and window.windows[-1] == cfg.rollout.max_tokens


# ---- the dataset presets' mappings, on local copies laid out like the hub sets ---------------------------------


def test_dapo_preset_mapping_on_dapo_and_aime_layouts():
    data = to_config(["data=dapo_math_17k", f"data.source={DATA / 'dapo_style.parquet'}",
                      f"data.eval_source={DATA / 'aime_style.jsonl'}"]).data
    splits = load_splits(data)
    assert [r["prompt"] for r in splits.train] == ["What is 7*6?", "What is 100/4?", "What is 9+10?", "What is 3^3?"]
    assert [r["answer"] for r in splits.train] == ["42", "25", "19", "27"]
    assert splits.train[0]["id"] == "9a9b6eb4-0000"
    # the AIME layout: problem / answer / id, and its prompts are left as they are
    assert [(r["prompt"], r["answer"], r["id"]) for r in splits.eval] == [("Find 12*12.", "144", "60"),
                                                                            ("Find 99+1.", "100", "61")]
    (message,) = prompt_messages(splits.train[0], data)
    assert message["content"] == "What is 7*6?\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def test_gsm8k_preset_mapping_on_a_local_directory_with_splits():
    data = to_config(["data=gsm8k", f"data.source={DATA / 'hub_style'}", "data.subset=null"]).data
    splits = load_splits(data)
    assert [r["answer"] for r in splits.train] == ["7", "11", "15", "22"]
    assert [r["answer"] for r in splits.eval] == ["7", "8"]
    assert splits.eval[0]["prompt"].startswith("Ann has 2 pens")


def test_code_contests_preset_mapping(tmp_path):
    rows = ['{"name": "1_A. Sum", "description": "Print a+b.", '
            '"private_tests": {"input": ["1 2\\n"], "output": ["3\\n"]}}',
            '{"name": "2_B. Echo", "description": "Echo.", "private_tests": {"input": ["x\\n"], "output": ["x\\n"]}}',
            '{"name": "3_C. None", "description": "No tests.", "private_tests": {"input": [], "output": []}}']
    path = tmp_path / "cc.jsonl"
    path.write_text("\n".join(rows) + "\n")
    data = to_config(["data=code_contests", f"data.source={path}", "data.eval_split=null", "data.eval_size=1"]).data
    splits = load_splits(data)
    assert splits.report.metrics()["data/skipped/tests"] == 1  # no private tests: skipped and counted
    assert {r["id"] for r in splits.train + splits.eval} == {"1_A. Sum", "2_B. Echo"}
    assert all(r["source"] == "code" and r["tests"]["inputs"] for r in splits.train + splits.eval)
