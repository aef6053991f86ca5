"""The recipe: generate, score, compute advantages, update the policy, sync the engine, log (DESIGN.md §1).

Deviations from the M1 paper, on purpose:
1. pi_old is recomputed by the trainer after generation (not taken from the engine), so the CISPO ratio
   measures staleness only; the engine's own logprobs feed the mismatch metrics and the optional TIS weight.
   `algo.pi_old=engine` takes the paper's way instead: pi_old is the engine's sampling logprobs, one forward per
   token fewer (the mismatch metrics then cover the first mini-batch, whose training forward is pi_old).
2. Groups whose rewards are all equal are left out of the loss and out of its normaliser
   (`algo.drop_zero_variance`, as DAPO's dynamic sampling and ScaleRL do); without refill the batch shrinks.
3. An early stop's forced EOS is not in the loss: it was not sampled from the policy.

Data parallelism (trainer.zero_stage set; cispo/train/distributed.py): every rank runs this same loop. Each rank
generates and grades its share of the step's prompts with its own rollout engine and the results are gathered,
so advantages and metrics are those of the whole batch; each rank trains on its share of every mini-batch with
the loss normaliser of the whole mini-batch; every rank's engine receives the new weights. With one process
(the default run) every collective is the identity.

Server mode (rollout.mode=server; cispo/sampling/pipeline.py, rollout/engines/fleet/): rank 0 alone talks to a fleet of vLLM
servers, which generate each batch (up to algo.max_staleness steps ahead of the update) and receive the
weights after each update; every rank trains on the batch rank 0 broadcasts.

Multi-turn tool use (env.name set; cispo/sampling/tool_rollouts.py): each sample is a trajectory of model turns and tool
results, graded on its final answer; only the model's tokens are loss tokens (cispo.sampling.sampler.episode_sample), so
the loop below is the same. The renderer's self-test runs before the policy and the engine load.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cispo.algo.advantages import group_advantages
from cispo.train.checkpoint import (
    Checkpointer, checkpoint_name, checkpoint_step, export_hf, resolve_resume, trim_metrics,
)
from cispo.config import Config, ConfigError
from cispo.sampling.curriculum import Curriculum
from cispo.sampling.dynamic import FilledBatch
from cispo.train.collective import Dist
from cispo.data.load import load_splits
from cispo.data.prompts import PromptStream, encode_prompts
from cispo.train.distributed import build_policy, init_distributed
from cispo.train.update import update_policy
from cispo.model.gguf import GGUF_PREFIX
from cispo.model.lora import check_lora
from cispo.logging import RunLogger
from cispo.manifest import write_run_manifest
from cispo.phases import PhaseMonitor
from cispo.sampling.inflight import InFlight
from cispo.sampling.pipeline import Pipelined, Synchronous
from cispo.sampling.tool_rollouts import check_config as check_env_config, check_env_renderer
from cispo.sampling.sampler import EngineSampler, episode_sample
from cispo.model.tiny_model import check_cache_dir
from cispo.start.warm_start import prepare_model
from rewards import RewardScorer
from rollout import build_engine, resolve_engine
from rollout.engines.adapter_sink import make_sink


PROMPTS_LOG = "prompts.jsonl"
SAMPLES_LOG = "samples.jsonl"


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path  # the final policy in HF format
    eval_before: dict
    eval_after: dict


@dataclass
class RunState:
    """Trainer state that a resumed run restores, besides the policy, optimizer, prompt stream and RNG."""

    eval_before: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.eval_before = dict(state["eval_before"])


def train(cfg: Config) -> TrainResult:
    dist = start_processes(cfg)
    started = time.perf_counter()
    say = (lambda text: print(text, flush=True)) if dist.is_main else (lambda text: None)  # noqa: E731
    run_dir = open_run_dir(cfg, dist)
    scorer = RewardScorer(cfg.reward)
    with scorer:
        splits = load_splits(cfg.data, scorer)  # every row checked here: bad rows stop the run or are counted
        train_rows, eval_rows = splits
        with dist.local_rank0_first():  # builds / warm-starts the tiny model once per node (a cached file)
            model_dir = prepare_model(cfg, train_rows)
        check_env_renderer(cfg, model_dir)  # env.name set: the chat template's turn boundaries, self-tested
        kind = resolve_engine(cfg.rollout, model_dir)
        cfg.rollout.check_engine(kind)  # a rollout knob the resolved engine cannot honour stops the run here
        check_lora(cfg, kind, model_dir)  # model.lora.* the engine cannot serve, or the model lacks, stops it too
        _, tokenizer, updater = build_policy(model_dir, cfg, dist)
        stream = PromptStream(train_rows, cfg.data.seed)
        curriculum = Curriculum(cfg.curriculum, stream, cfg.rollout.max_tokens)
        rollouts = start_rollouts(cfg, kind, model_dir, run_dir, scorer, tokenizer, dist, curriculum, eval_rows, say)
        say(f"rollout engine ready ({time.perf_counter() - started:.0f} s since the run started)")
        run = RunState()
        # what a checkpoint restores besides the policy, the optimizer and the RNG: register more trainer state
        # here (objects with state_dict() -> JSON-serialisable data, and load_state_dict())
        stateful = {"stream": stream, "run": run, "curriculum": curriculum, "rollouts": rollouts}
        checkpoints = Checkpointer(run_dir / "checkpoints", cfg.trainer.keep_last, dist)
        resume = resolve_resume(cfg.trainer.resume, run_dir)
        start = checkpoint_step(resume) if resume else 0
        logger = open_logger(cfg, run_dir, dist, start)
        if resume:  # last before the loop: the RNG states continue from the moment the checkpoint was taken
            checkpoints.load(resume, updater, stateful)
        rollouts.start(updater, start)  # the engines get the weights of step `start` (resumed, or servers)
        try:
            if not resume:
                run.eval_before = evaluate_before(rollouts, eval_rows, logger, say, splits.report.metrics() | {
                    "time/startup_s": time.perf_counter() - started})
            eval_after = run.eval_before
            monitor = PhaseMonitor(say)  # memory/<phase>_peak_gb (rank 0's in the log); a line every 10 s
            for step in range(start + 1, cfg.trainer.steps + 1):
                tick = time.perf_counter()
                metrics, batch = rl_step(cfg, step, rollouts, updater, monitor)
                metrics["time/step_s"] = time.perf_counter() - tick
                if dist.is_main:
                    log_batch(cfg, run_dir, step, batch, tokenizer)
                if due(cfg.trainer.eval_every, step) or step == cfg.trainer.steps:
                    tick = time.perf_counter()
                    eval_after = rollouts.evaluate(eval_rows)
                    metrics |= eval_after | {"time/eval_s": time.perf_counter() - tick}
                logger.log(step, metrics)
                if due(cfg.trainer.save_every, step) or (cfg.trainer.save_every and step == cfg.trainer.steps):
                    with rollouts.paused():  # batches generated ahead are saved with it (cispo.sampling.pipeline)
                        checkpoints.save(step, updater, stateful, tokenizer)
                if due(cfg.trainer.export_every, step):
                    export_hf(updater, run_dir / "hf" / checkpoint_name(step), tokenizer)
        finally:
            rollouts.close()
            logger.finish()
    final = export_hf(updater, run_dir / "final", tokenizer)
    dist.close()
    return TrainResult(run_dir, final, run.eval_before, eval_after)


def start_processes(cfg: Config):
    """What stops a run before any work (the cache dir, the env knobs, the ranks), the process group and the
    seeds; returns the Dist (one process: plain torch; under a launcher: DeepSpeed ZeRO)."""
    if cfg.model.path == "tiny" or cfg.model.path.startswith(GGUF_PREFIX):
        check_cache_dir(cfg.model.cache_dir)
    check_env_config(cfg)  # env.name set: the knobs multi-turn rollouts cannot honour stop the run here
    dist = init_distributed(cfg.trainer)
    seed_everything(cfg.trainer.seed, cfg.trainer.threads)
    if cfg.algo.prompts_per_step < dist.world_size or cfg.data.eval_size < dist.world_size:
        raise ConfigError(f"algo.prompts_per_step and data.eval_size must be >= the number of ranks "
                          f"({dist.world_size})")
    return dist


def open_run_dir(cfg: Config, dist) -> Path:
    """trainer.output_dir, with the resolved config and the run manifest (package and library versions, git
    commit) written into it by rank 0."""
    run_dir = Path(dist.broadcast_object(cfg.trainer.output_dir))  # a ${now:...} may differ between ranks
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        write_run_manifest(cfg, run_dir)
    return run_dir


def open_logger(cfg: Config, run_dir: Path, dist, start: int):
    """Rank 0's RunLogger (a NoLogger elsewhere). Resuming at step `start`: the logs lose the rows of later steps,
    and the plot keeps the steps before."""
    if not dist.is_main:
        return NoLogger()
    history = trim_metrics(run_dir / "metrics.jsonl", start) if start else []
    if start:
        trim_metrics(run_dir / PROMPTS_LOG, start)
        trim_metrics(run_dir / SAMPLES_LOG, start)
    logger = RunLogger(cfg.logger, run_dir, asdict(cfg), total_steps=cfg.trainer.steps)
    logger.history = history + logger.history
    return logger


def evaluate_before(rollouts, eval_rows: list[dict], logger, say, extra: dict) -> dict:
    """The held-out metrics before RL, logged at step 0 with `extra` (the data report, the start-up time)."""
    say(f"held-out evaluation before RL ({len(eval_rows)} problems) ...")
    tick = time.perf_counter()
    metrics = rollouts.evaluate(eval_rows)
    say(f"held-out accuracy before RL: {metrics['eval/accuracy']:.3f}")
    logger.log(0, metrics | extra | {"time/eval_s": time.perf_counter() - tick})
    return metrics


def start_rollouts(cfg: Config, kind: str, model_dir: str, run_dir: Path, scorer, tokenizer, dist, curriculum,
                   eval_rows: list[dict], say) -> Synchronous | Pipelined:
    """The rollout engines and when they generate: one engine per rank, synchronous (rollout.mode=colocated), or
    rank 0's fleet of servers generating ahead of the update (server), batch by batch or continuously with
    in-flight weight updates (rollout.server.in_flight)."""
    say(f"starting the rollout engine ({kind}) ...")
    if cfg.rollout.mode == "colocated":
        engine = build_engine(kind, model_dir, cfg.rollout, cfg.model, cfg.trainer.seed)  # one per rank
        sink = make_sink(engine, cfg.model)  # EngineSink, or AdapterSink (the adapter only) with model.lora.rank
        return Synchronous(EngineSampler(cfg, engine, sink, scorer, tokenizer, dist), sink, curriculum,
                           cfg.algo.prompts_per_step)
    sampler = sink = None
    if dist.is_main:  # rank 0 alone talks to the servers
        from rollout.engines.fleet import build as start_fleet

        fleet = start_fleet(model_dir, cfg.rollout, cfg.model, cfg.trainer.seed, log_dir=run_dir / "servers")
        sink = fleet.sink
        sampler = EngineSampler(cfg, fleet, sink, scorer, tokenizer, Dist())
    probe = encode_prompts(tokenizer, eval_rows[:1], cfg.data)[0]
    if cfg.rollout.server.in_flight != "off":
        return InFlight(sampler, sink, curriculum, target=cfg.algo.prompts_per_step, steps=cfg.trainer.steps,
                        max_staleness=cfg.algo.max_staleness, max_off_policy_steps=cfg.algo.max_off_policy_steps,
                        sample_rounds=cfg.curriculum.sample_rounds, seed=cfg.rollout.seed, dist=dist, probe=probe)
    return Pipelined(sampler, sink, curriculum, target=cfg.algo.prompts_per_step, steps=cfg.trainer.steps,
                     max_staleness=cfg.algo.max_staleness, dist=dist, probe=probe)


def rl_step(cfg: Config, step: int, rollouts: Synchronous | Pipelined, updater,
            monitor: PhaseMonitor) -> tuple[dict, FilledBatch]:
    """One RL step: the step's metrics, and the batch it trained on."""
    algo = cfg.algo
    started = time.perf_counter()
    with monitor.phase("rollout", f"step {step}"):
        filled = rollouts.next(step)  # dynamic sampling refills zero-variance groups (cispo.sampling.curriculum)
    generated = time.perf_counter()
    adv = group_advantages(torch.tensor([[e.score for e in group] for group in filled.groups]).view(-1, algo.group_size),
                           std_norm=algo.adv_std_norm, level=algo.adv_norm)
    samples = [episode_sample(e, float(adv.adv[g, k]), g)  # under its own prompt, its loss mask
               for g, group in enumerate(filled.groups) if not (algo.drop_zero_variance and adv.zero_variance[g])
               for k, e in enumerate(group)]
    with rollouts.updating(), monitor.phase("update", f"step {step}"):  # pi_old and the updates
        stats = update_policy(cfg, step, updater, samples)
    bookkeeping = rollouts.finish(filled)  # before the new weights can start the next batch: retired prompts stay out
    updated = time.perf_counter()
    with monitor.phase("sync", f"step {step}"):
        rollouts.publish(updater, step)
    # the step's wall time by phase: rollouts (generation and grading; in server mode, the wait for them),
    # pi_old, the updates, the weight sync
    phases = {"time/rollout_s": generated - started, "time/update_s": updated - generated - stats["time/old_logp_s"],
              "time/sync_s": time.perf_counter() - updated}
    return filled.metrics | bookkeeping | stats | phases | monitor.metrics() | {
        "adv/zero_variance_frac": adv.zero_variance.float().mean().item(),
        "train/samples": len(samples),
    }, filled


def log_batch(cfg: Config, run_dir: Path, step: int, batch: FilledBatch, tokenizer) -> None:
    """prompts.jsonl, and samples.jsonl when logger.samples is set."""
    log_prompts(run_dir / PROMPTS_LOG, step, batch)
    if cfg.logger.samples:
        log_samples(run_dir / SAMPLES_LOG, step, batch, tokenizer, cfg.logger.samples)


def log_prompts(path: Path, step: int, batch: FilledBatch) -> None:
    """One line per step in prompts.jsonl: the ids of the prompts the step trained on, and the policy version
    (RL steps trained) that generated their samples."""
    versions = [e.version for group in batch.groups for e in group]
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "version": min(versions, default=step - 1),
                            "ids": [row["id"] for row in batch.rows]}) + "\n")


def log_samples(path: Path, step: int, batch: FilledBatch, tokenizer, count: int) -> None:
    """The step's first `count` responses in samples.jsonl, one per line: the prompt id, the decoded response,
    its score and grade."""
    episodes = [(row, e) for row, group in zip(batch.rows, batch.groups) for e in group][:count]
    with path.open("a") as f:
        for row, e in episodes:
            f.write(json.dumps({"step": step, "id": row["id"], "score": e.score, "status": e.result.status,
                                "response": tokenizer.decode(e.trajectory.token_ids)}) + "\n")


def due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


class NoLogger:
    """Ranks other than 0 log nothing."""

    def __init__(self):
        self.history: list = []

    def log(self, step: int, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
