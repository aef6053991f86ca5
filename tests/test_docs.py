"""The docs site: it builds with `mkdocs build --strict`, the configuration reference has every key of the config
dataclasses with its type and default, every field carries a comment (save the listed ones, a list that may only
shrink), and the metric scan behind the metrics reference finds keys written each way the code writes them.

That every key a real run logs is on the metrics page is checked on real runs in tests/test_readme_commands.py
(assert_metrics_documented)."""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cispo.cli import config_keys
from cispo.config import Config
from cispo.eval_config import EvalRunConfig

REPO = Path(__file__).resolve().parents[1]


def load_reference():
    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "docs" / "_gen" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


reference = load_reference()

# fields written without a comment when the reference was first generated: document one and take it off the list.
# A new field must come with its comment: beside it, in a block above it, or named in the block above the adjacent
# fields it belongs with (`count` ... `urls`).
UNDOCUMENTED = {
    "model.trust_remote_code", "model.gradient_checkpointing", "model.tiny.hidden_size", "model.tiny.num_layers",
    "model.tiny.num_kv_heads", "model.tiny.vocab_size", "model.tiny.seed", "model.tiny.num_experts",
    "model.warm_start.enabled", "model.warm_start.target_accuracy", "model.warm_start.max_steps",
    "model.warm_start.batch_size", "model.warm_start.lr", "model.warm_start.warmup_steps",
    "model.warm_start.eval_every", "model.warm_start.eval_problems", "algo.is_weight_min", "algo.clip_high",
    "algo.prompts_per_step", "rollout.temperature", "rollout.top_p", "rollout.gpu_memory_utilization",
    "rollout.tensor_parallel_size", "reward.correct_score", "data.answer_field", "data.tests_field", "data.id_field",
    "trainer.steps", "trainer.lr", "trainer.weight_decay", "trainer.output_dir", "trainer.seed", "logger.project",
    "logger.run_name", "logger.progress", "curriculum.window_patience", "env.max_calls_per_turn", "eval.top_p",
}


def every_key() -> list[str]:
    """The keys of the training and evaluation schemas, enumerated from the dataclasses themselves."""
    return sorted(set(config_keys(Config)) | set(config_keys(EvalRunConfig)))


def test_the_configuration_page_has_every_key_with_its_type_and_default():
    page = reference.configuration_page()
    rows = {m.group(1): m.group(0) for m in re.finditer(r'^\| <a id="([^"]+)"></a>.*$', page, re.M)}
    missing = [k for k in every_key() if "." in k and k not in rows]  # a section is a heading (the next test)
    assert not missing, f"config keys missing from the configuration reference: {missing}"
    assert "`algo.is_weight_max` | `float \\| None` | `5.0` |" in rows["algo.is_weight_max"]
    assert "`rollout.server.port` | `int` | `8200` |" in rows["rollout.server.port"]
    # the comment above a field and the one beside it are both its documentation
    assert "trainer: a forward after generation" in rows["algo.pi_old"]
    assert "e.g. [\"0\", \"2-3\"]" in html.unescape(rows["rollout.server.cpus"])
    # a block over adjacent fields documents each field it names, and only those
    assert "connects to `urls`" in rows["rollout.server.urls"] and "&nbsp;" in rows["rollout.temperature"]


def test_every_config_field_has_a_comment():
    fields = [f for name, cls, _ in reference.schema_sections() for f in reference.config_fields(cls, name + ".")]
    bare = {f.key for f in fields if not f.doc and not f.nested}
    new = sorted(bare - UNDOCUMENTED)
    assert not new, f"config fields without a comment (write one beside the field in its dataclass): {new}"
    done = sorted(UNDOCUMENTED - bare)
    assert not done, f"documented now, or gone: take them off UNDOCUMENTED in tests/test_docs.py: {done}"


def test_every_schema_section_is_on_the_page():
    page = reference.configuration_page()
    for cls in (Config, EvalRunConfig):
        for f in dataclasses.fields(cls):
            assert f"\n## {f.name}\n" in page, f.name


def test_the_metric_scan_reads_each_way_a_key_is_written():
    keys = {m.key for m in reference.scan_metrics()}
    expected = {
        "reward/mean",  # a dict literal's key
        "reward/status/<status>",  # an f-string assigned into a dict
        "eval/pass@<j>",  # an f-string whose prefix is a parameter's default ("eval/")
        "rollout/finish/<r>",  # a dict comprehension's key, with the same prefix rule
        "rollout/session_moves", "loss/clip_frac_<side>_pos_adv", "mismatch/prob_pearson", "async/staleness",
        "sync/probe_diff", "time/step_s", "memory/<name>_peak_gb", "tool/<name>/calls",
    }
    assert expected <= keys, sorted(expected - keys)
    assert not any(" " in k or k.endswith(".py") for k in keys), "a message or a path was taken for a key"
    groups = {reference.group(m) for m in reference.scan_metrics()}
    assert groups <= set(reference.GROUPS), f"metric groups not described in GROUPS: {groups - set(reference.GROUPS)}"
    pattern = reference.metric_pattern("reward/status/<status>")
    assert pattern.match("reward/status/correct") and not pattern.match("reward/mean")


def test_the_site_builds_strict_with_every_key_and_metric(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]' (scripts/setup.sh installs it)")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = (tmp_path / "reference" / "configuration" / "index.html").read_text()
    missing = [k for k in every_key() if f'id="{k}"' not in config]
    assert not missing, f"not on the built configuration page: {missing}"
    metrics = html.unescape((tmp_path / "reference" / "metrics" / "index.html").read_text())
    missing = [m.key for m in reference.scan_metrics() if f"<code>{m.key}</code>" not in metrics]
    assert not missing, f"not on the built metrics page: {missing}"
    for page in ("guides/your-data", "concepts/cispo", "benchmarks/default-run", "reference/cli"):
        assert (tmp_path / page / "index.html").exists(), page
    assert (tmp_path / "benchmarks" / "default_run.png").stat().st_size > 10_000  # drawn from the page's table
