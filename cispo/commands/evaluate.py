"""Evaluate a checkpoint or an OpenAI-compatible endpoint on the held-out split: k samples per prompt, avg@k and
pass@k, a per-source breakdown, response lengths, token counts and cost; a JSON report and a printed table.

    cispo eval                                       # the tiny model training starts from
    cispo eval model.path=runs/X/final eval.k=8      # a checkpoint, through vLLM or transformers
    OPENROUTER_API_KEY=... cispo eval endpoint=openrouter_m1 eval.limit=50
    cispo eval endpoint=local_vllm endpoint.model=NAME  # a `vllm serve` on 127.0.0.1:8000

Resumable: each answer is appended to {eval.output_dir}/answers.jsonl as it arrives, keyed by the prompt id,
the sample index and a hash of the settings that shape an answer (what is evaluated, temperature, top_p,
max_tokens, seed); each record also carries a hash of its prompt's messages, and a record whose prompt changed
is not reused. A rerun asks only for what is missing. Grading is redone on every run from the cached answers,
so changing the reward config or eval.grade costs no requests, and eval.k / eval.limit are not in the key:
raising them adds to the answers already there.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from cispo.config import ConfigError
from cispo.eval_config import EvalRunConfig
from cispo.data.load import load_splits
from cispo.data.prompts import prompt_messages
from cispo.sampling.evaluation import length_stats, sampled_metrics
from rewards import RewardScorer, row_source
from rollout.openai_client import ChatRequest, OpenAIClient


@dataclass
class Answer:
    """One sampled answer, as cached in answers.jsonl."""

    key: str  # settings hash
    id: str  # the row's id
    sample: int  # 0 .. k-1
    prompt_sha: str  # hash of the prompt's messages
    answer: str
    reasoning: str | None
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    cost: float | None  # billed, as the endpoint reported it


@dataclass
class EvalResult:
    report: dict
    report_path: Path
    new_answers: int  # asked for in this run
    cached_answers: int  # reused from answers.jsonl


# ---- what is evaluated, and the cache key --------------------------------------------------------------------


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_fingerprint(model_dir: str) -> list | str:
    """Names, sizes and mtimes of a local checkpoint's files (a checkpoint overwritten in place gets a new key);
    a hub name stands for itself."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        return model_dir
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())


def resolve_target(cfg: EvalRunConfig, train_rows: list[dict]) -> dict:
    """What is evaluated: the endpoint, or the checkpoint (model.path=tiny: the warm-started tiny model training
    starts from, built once and cached) with the engine that will run it."""
    if cfg.endpoint.base_url:
        return {"endpoint": cfg.endpoint.base_url, "model": cfg.endpoint.model, "extra_body": cfg.endpoint.extra_body}
    from cispo.start.warm_start import prepare_model
    from rollout import resolve_engine

    model_dir = prepare_model(cfg, train_rows)
    kind = resolve_engine(cfg.rollout, model_dir)
    cfg.rollout.check_engine(kind)  # a rollout knob this engine cannot honour stops here, before any sampling
    return {"checkpoint": model_dir, "files": checkpoint_fingerprint(model_dir), "engine": kind, "dtype": cfg.model.dtype,
            "fp32_lm_head": cfg.model.fp32_lm_head}


def answer_settings(cfg: EvalRunConfig, target: dict) -> dict:
    """Everything that shapes one answer (not k, the data limit, grading, concurrency or prices)."""
    return {"target": target, "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
            "max_tokens": max_tokens(cfg), "seed": cfg.eval.seed}


def max_tokens(cfg: EvalRunConfig) -> int:
    return cfg.eval.max_tokens or cfg.rollout.max_tokens


def endpoint_seed(base: int | None, row_id: str, sample: int) -> int | None:
    """A seed per (prompt, sample), stable across runs and data limits: sample j of two prompts must not share a
    random stream, and a resumed run must send what a fresh one would."""
    if base is None:
        return None
    return (base + int(hashlib.sha256(f"{row_id}\0{sample}".encode()).hexdigest()[:8], 16)) % 2**31


class AnswerCache:
    """answers.jsonl: one JSON line per answer, appended and flushed as each arrives. Lines of other settings
    stay in the file (one output_dir can hold several evaluations); a torn last line (a run killed mid-write)
    is skipped."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.answers: dict[tuple[str, int], Answer] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("key") == key:
                    self.answers[(record["id"], record["sample"])] = Answer(**record)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def get(self, row_id: str, sample: int, prompt_sha: str) -> Answer | None:
        answer = self.answers.get((row_id, sample))
        return answer if answer is not None and answer.prompt_sha == prompt_sha else None

    def add(self, answer: Answer) -> None:
        if self._file is None:
            torn = False
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb") as f:
                    f.seek(-1, 2)
                    torn = f.read(1) != b"\n"
            self._file = open(self.path, "a")
            if torn:
                self._file.write("\n")  # close off a torn last line instead of gluing the next record to it
        self._file.write(json.dumps(asdict(answer)) + "\n")
        self._file.flush()
        self.answers[(answer.id, answer.sample)] = answer

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# ---- sampling ------------------------------------------------------------------------------------------------


@dataclass
class Todo:
    row: int  # index into the evaluated rows
    sample: int


def sample_endpoint(cfg: EvalRunConfig, rows: list[dict], messages: list[list[dict]], shas: list[str],
                    todo: list[Todo], cache: AnswerCache) -> None:
    client = OpenAIClient.from_config(cfg.endpoint)
    requests = [ChatRequest(messages[t.row], max_tokens(cfg), cfg.eval.temperature, cfg.eval.top_p,
                            endpoint_seed(cfg.eval.seed, rows[t.row]["id"], t.sample)) for t in todo]

    def store(i: int, result) -> None:
        t = todo[i]
        cache.add(Answer(cache.key, rows[t.row]["id"], t.sample, shas[t.row], result.answer, result.reasoning,
                         result.finish_reason, result.prompt_tokens, result.completion_tokens, result.cost))

    client.complete_all(requests, store)


def sample_engine(cfg: EvalRunConfig, model_dir: str, kind: str, rows: list[dict], shas: list[str],
                  todo: list[Todo], cache: AnswerCache) -> None:
    """k samples of every prompt that misses any (vLLM shares a prompt's KV cache among its k samples), in
    chunks of eval.batch_prompts prompts; only the missing ones are stored."""
    from transformers import AutoTokenizer

    from cispo.data.prompts import encode_prompts
    from rollout import build_engine
    from rollout.base import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    missing: dict[int, set[int]] = defaultdict(set)
    for t in todo:
        missing[t.row].add(t.sample)
    pending = sorted(missing)
    k = cfg.eval.k
    engine = build_engine(kind, model_dir, cfg.rollout, cfg.model, seed=cfg.eval.seed or 0)
    try:
        for lo in range(0, len(pending), cfg.eval.batch_prompts):
            chunk = pending[lo : lo + cfg.eval.batch_prompts]
            # seed + the chunk's first row: two chunks never share a random stream
            seed = None if cfg.eval.seed is None else cfg.eval.seed + chunk[0]
            sampling = SamplingParams(n=k, max_tokens=max_tokens(cfg), temperature=cfg.eval.temperature,
                                      top_p=cfg.eval.top_p, seed=seed)
            prompt_ids = encode_prompts(tokenizer, [rows[i] for i in chunk], cfg.data)
            seen: dict[int, int] = defaultdict(int)
            for c in engine.generate(prompt_ids, sampling).completions:
                i, j = chunk[c.prompt_index], seen[c.prompt_index]
                seen[c.prompt_index] += 1
                if j in missing[i]:
                    cache.add(Answer(cache.key, rows[i]["id"], j, shas[i], c.text, None, c.finish_reason,
                                     len(prompt_ids[c.prompt_index]), len(c.token_ids), None))
    finally:
        engine.close()


# ---- report --------------------------------------------------------------------------------------------------


def graded_text(answer: Answer, grade: str) -> str:
    """eval.grade=answer: what the endpoint returned as the answer (a local engine's whole response, whose
    thinking the reward strips at reward.think_end); full: the reasoning too, so an answer left there counts."""
    if grade == "full" and answer.reasoning:
        return f"{answer.reasoning}\n{answer.answer}"
    return answer.answer


def summarize(cfg: EvalRunConfig, rows: list[dict], answers: list[list[Answer]], statuses: list[list[str]]) -> dict:
    """The report's metrics: overall and per source; lengths, grades, tokens and cost."""
    k = cfg.eval.k
    correct = [[s == "correct" for s in per_row] for per_row in statuses]
    metrics = sampled_metrics(correct)
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_source[row_source(row)].append(i)
    for source, idx in sorted(by_source.items()):
        metrics[f"eval/{source}/prompts"] = len(idx)
        metrics |= sampled_metrics([correct[i] for i in idx], prefix=f"eval/{source}/")
    flat = [a for per_row in answers for a in per_row]
    all_statuses = [s for per_row in statuses for s in per_row]
    for status in sorted(set(all_statuses)):
        metrics[f"eval/status/{status}"] = all_statuses.count(status) / len(all_statuses)
    metrics |= length_stats([a.completion_tokens for a in flat if a.completion_tokens is not None])
    metrics["eval/truncated_rate"] = sum(a.finish_reason == "length" for a in flat) / len(flat)
    tokens_in = sum(a.prompt_tokens or 0 for a in flat)
    tokens_out = sum(a.completion_tokens or 0 for a in flat)
    metrics["eval/tokens_in"], metrics["eval/tokens_out"] = float(tokens_in), float(tokens_out)
    ep = cfg.endpoint
    if ep.base_url and ep.price_in_per_m is not None and ep.price_out_per_m is not None:
        metrics["eval/cost_usd"] = (tokens_in * ep.price_in_per_m + tokens_out * ep.price_out_per_m) / 1e6
    reported = [a.cost for a in flat if a.cost is not None]
    if reported:
        metrics["eval/cost_reported_usd"] = sum(reported)
    per_prompt = [{"id": row["id"], "source": row_source(row), "correct": sum(c), "k": k}
                  for row, c in zip(rows, correct)]
    return {"metrics": metrics, "per_prompt": per_prompt}


def label(cfg: EvalRunConfig, target: dict) -> str:
    return f"{cfg.endpoint.model} at {cfg.endpoint.base_url}" if cfg.endpoint.base_url else \
        f"{target['checkpoint']} ({target['engine']})"


def format_table(report: dict) -> str:
    m, k = report["metrics"], report["k"]
    ks = [key.split("@")[1] for key in m if key.startswith("eval/pass@")]
    sources = sorted({key.split("/")[1] for key in m if key.endswith("/prompts")})
    head = f"{'source':<14}{'prompts':>8}{f'avg@{k}':>9}" + "".join(f"{f'pass@{j}':>9}" for j in ks)
    s = report["settings"]
    lines = [f"{report['label']}: {report['prompts']} prompts x {k} samples, temperature {s['temperature']}, "
             f"top_p {s['top_p']}, max_tokens {s['max_tokens']}",
             f"answers: {report['answers']['new']} new, {report['answers']['cached']} cached", head]
    for name, prefix, n in [(src, f"eval/{src}/", m[f"eval/{src}/prompts"]) for src in sources] + \
            ([("all", "eval/", report["prompts"])] if len(sources) > 1 else []):
        values = [m[f"{prefix}avg@{k}"]] + [m[f"{prefix}pass@{j}"] for j in ks]
        lines.append(f"{name:<14}{n:>8}" + "".join(f"{v:>9.3f}" for v in values))
    if "eval/len_mean" in m:
        lines.append(f"length (completion tokens): mean {m['eval/len_mean']:.1f}, p50 {m['eval/len_p50']:.0f}, "
                     f"p90 {m['eval/len_p90']:.0f}, max {m['eval/len_max']:.0f}; "
                     f"truncated {m['eval/truncated_rate']:.1%}")
    grades = ", ".join(f"{key.split('/')[-1]} {v:.1%}" for key, v in m.items() if key.startswith("eval/status/"))
    lines.append(f"grades: {grades}")
    tokens = f"tokens: {m['eval/tokens_in']:,.0f} prompt, {m['eval/tokens_out']:,.0f} completion"
    if "eval/cost_usd" in m:
        tokens += f"; estimated cost ${m['eval/cost_usd']:.4f}"
    if "eval/cost_reported_usd" in m:
        tokens += f"; billed ${m['eval/cost_reported_usd']:.4f} (as the endpoint reported)"
    lines.append(tokens)
    lines.append(f"report: {report['path']}")
    return "\n".join(lines)


# ---- the run -------------------------------------------------------------------------------------------------


def evaluate(cfg: EvalRunConfig) -> EvalResult:
    """Sample what the cache lacks, grade everything, write the report; prints the table."""
    start = time.monotonic()
    with RewardScorer(cfg.reward) as scorer:
        train_rows, rows = load_splits(cfg.data, scorer)  # rows checked against their graders before any sampling
        rows = rows[: cfg.eval.limit] if cfg.eval.limit else rows
        ids = [row["id"] for row in rows]
        if len(set(ids)) != len(ids):
            raise ConfigError("data: the held-out rows' ids are not unique; the answer cache is keyed by them")
        messages = [prompt_messages(row, cfg.data) for row in rows]
        shas = [short_hash(m) for m in messages]
        out_dir = Path(cfg.eval.output_dir)
        target = resolve_target(cfg, train_rows)
        settings = answer_settings(cfg, target)
        cache = AnswerCache(out_dir / "answers.jsonl", short_hash(settings))
        todo = [Todo(i, j) for i in range(len(rows)) for j in range(cfg.eval.k)
                if cache.get(ids[i], j, shas[i]) is None]
        try:
            if todo and cfg.endpoint.base_url:  # the client reads the key first: none missing, no request sent
                sample_endpoint(cfg, rows, messages, shas, todo, cache)
            elif todo:
                sample_engine(cfg, target["checkpoint"], target["engine"], rows, shas, todo, cache)
        finally:
            cache.close()
        answers = [[cache.get(ids[i], j, shas[i]) for j in range(cfg.eval.k)] for i in range(len(rows))]
        flat = [a for per_row in answers for a in per_row]
        graded = scorer.score([graded_text(a, cfg.eval.grade) for a in flat],
                              [rows[i] for i in range(len(rows)) for _ in range(cfg.eval.k)],
                              response_lengths=[a.completion_tokens or 0 for a in flat], max_tokens=max_tokens(cfg),
                              truncated=[a.finish_reason == "length" for a in flat])
    statuses = [[r.status for r in graded.results[i * cfg.eval.k : (i + 1) * cfg.eval.k]] for i in range(len(rows))]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", target.get("model") or Path(target["checkpoint"]).name)[-60:]
    path = out_dir / f"report-{slug}-{cache.key}.json"
    report = {"label": label(cfg, target), "path": str(path), "settings": settings, "settings_hash": cache.key,
              "k": cfg.eval.k, "prompts": len(rows), "answers": {"new": len(todo), "cached": len(flat) - len(todo)},
              "elapsed_s": time.monotonic() - start, "config": asdict(cfg)} | summarize(cfg, rows, answers, statuses)
    path.write_text(json.dumps(report, indent=2))
    print(format_table(report), flush=True)
    return EvalResult(report, path, len(todo), len(flat) - len(todo))
