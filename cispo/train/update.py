"""The policy update of one RL step: pi_old for every sample, then `algo.updates_per_step` optimizer steps over
mini-batches of prompt groups (DESIGN.md §1, §3).

Where pi_old comes from is decided once, in `take_pi_old`, which with `PiOld` makes every write of `old_logp`:
- algo.pi_old=trainer: a forward-only pass over every mini-batch but the first. The first trains on the weights
  pi_old is taken from, so its pi_old is its own training forward's logp, detached, taken chunk by chunk as the
  LM head computes it (`PiOld.take`, from the grad hint). That saves one forward per step for 1 / updates_per_step
  of the tokens; the training forward's logp equals a forward-only pass's bit for bit, so the update is the same
  (tests/test_update.py).
- algo.pi_old=engine: each sample's rollout_logp, and no pass at all; the mismatch/* metrics then compare the first
  mini-batch's training forward with the engine's logprobs.

Each mini-batch (`train_mini_batch`) owns its MoE routing (recorded in the first, replayed in the others with
model.routing_replay; cispo.model.moe), the load-balancing loss and the backward. The grad hint that lets the LM
head compute its gradients in the forward pass (cispo.model.logprobs.token_logprobs) computes d loss / d logp of
each chunk of loss tokens from that chunk's `loss_inputs`; `LossHint` keeps those values for the trust/* metrics,
which so need no autograd pass of their own (the same numbers bit for bit: tests/test_update.py). Everything
measured lands in one `StepStats`, whose `gather` makes the metrics of all ranks.

Data parallelism: each rank computes pi_old for, and trains on, its share of every mini-batch (`updater.dist`;
all of it in one process), with the aggregation coefficients of the whole mini-batch; every rank runs the same
number of passes (cispo.algo.batch.even) and calls the same collectives.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from cispo.algo.batch import MicroBatch, Sample, even, micro_batches, split_groups
from cispo.algo.corrections import active as active_corrections, correction_weight, needs_sequences
from cispo.algo.loss import (
    LossOut, logp_grad, loss_knobs, loss_metrics, mismatch_metrics, policy_loss, sequence_ids, takes_sequences,
    trust_region_metrics,
)
from cispo.config import AlgoConfig, Config
from cispo.model.logprobs import TokenLogprobs
from cispo.model.moe import RoutingMeter, RoutingStore, routing
from cispo.model.policy import micro_batch_logprobs, model_device, shares_prompts
from cispo.train.collective import Dist
from cispo.train.optim import lr_lambda, update_position


def update_policy(cfg: Config, step: int, updater, samples: list[Sample]) -> dict:
    """pi_old for every sample, then up to `algo.updates_per_step` optimizer steps over mini-batches of prompt
    groups (fewer when fewer groups are left), at the learning rates of RL step `step` (cispo.train.optim).
    Returns the step's metrics over all ranks (module docstring)."""
    algo, dist = cfg.algo, updater.dist
    samples = [s for s in samples if s.loss_len > 0]
    if not samples:
        return {"train/updates": 0, "time/old_logp_s": 0.0}
    minis = split_groups(samples, algo.updates_per_step)
    shares = [dist.shard_groups(samples, mini) for mini in minis]
    passes = Passes.of(cfg, updater.model, dist, samples)
    pi_old = take_pi_old(passes, shares, algo.pi_old)
    schedule = lr_lambda(cfg.trainer, cfg.trainer.steps * algo.updates_per_step)
    stats = StepStats(mismatch_in_training=algo.pi_old == "engine")
    for j, (mini, share) in enumerate(zip(minis, shares)):
        train_mini_batch(cfg, passes, updater, j, mini, share, pi_old, stats)
        position = update_position(step, j, len(minis), algo.updates_per_step)  # the schedule runs over RL steps
        stats.norms.append(updater.step(cfg.trainer.lr * schedule(position)))
    mine = [samples[i] for i in sorted(i for share in shares for i in share)]
    return stats.gather(dist, mine, algo, version=step - 1) | passes.meter.metrics(reduce=dist.sum) | {
        "train/lr": updater.lr,
        "time/old_logp_s": pi_old.seconds,
    }


@dataclass
class Passes:
    """What every forward of one update shares: the policy, this rank's view of the step's samples and how they are
    packed, the LM head's options, the loss's knobs, and the MoE routing record and meter (no-ops on a dense
    model)."""

    policy: torch.nn.Module  # a causal LM, or the DeepSpeed engine around the policy
    dist: Dist
    samples: list[Sample]
    tokens_per_micro: int
    head: dict  # temperature, fp32_head (cispo.model.policy.micro_batch_logprobs)
    share_prompts: bool  # a group's prompt packed once (cispo/model/attention.py)
    knobs: dict  # the algo fields the loss names (cispo.algo.loss.loss_knobs), read once per step
    store: RoutingStore  # pi_old's experts per sample (recorded, replayed)
    meter: RoutingMeter  # the routing metrics of every forward

    @classmethod
    def of(cls, cfg: Config, policy, dist, samples: list[Sample]) -> Passes:
        return cls(policy, dist, samples, cfg.trainer.max_tokens_per_micro,
                   dict(temperature=cfg.rollout.temperature, fp32_head=cfg.model.fp32_lm_head),
                   shares_prompts(policy), loss_knobs(cfg.algo.loss, asdict(cfg.algo)), RoutingStore(),
                   RoutingMeter(policy))

    def micro_batches(self, indices: list[int], loss_agg: str | None = None,
                      norm_over: list[int] | None = None) -> list[MicroBatch]:
        """The micro-batches of the samples `indices` (coefficients over `norm_over`; none for loss_agg=None),
        padded with empty passes to the count of the rank with the most."""
        mbs = micro_batches(self.samples, indices, self.tokens_per_micro, loss_agg, norm_over=norm_over,
                            share_prompts=self.share_prompts)
        return even(mbs, self.dist)


# ---- pi_old: every write of old_logp -----------------------------------------------------------------------------

@dataclass
class PiOld:
    """Where the step's pi_old comes from, as `take_pi_old` decided it. reuse: the mini-batch whose pi_old is its
    own training forward's logp (None: every sample has its pi_old before the first update)."""

    samples: list[Sample]
    reuse: int | None
    seconds: float  # the forward-only passes

    def expect(self, j: int, mb: MicroBatch) -> bool:
        """Whether micro-batch `mb` of mini-batch j takes pi_old from its training forward; if so, its old_logp [N]
        is made here and filled by `take` during the forward."""
        if j != self.reuse:
            return False
        mb.old_logp = torch.zeros_like(mb.rollout_logp)
        return True

    def take(self, mb: MicroBatch, rows: slice, logp: Tensor) -> None:
        """The forward's logp [C] of the loss tokens `rows` is their pi_old."""
        mb.old_logp[rows] = logp.detach()

    def keep(self, j: int, mb: MicroBatch) -> None:
        """After mini-batch j's forward: the pi_old it took, into its samples (for the metrics)."""
        if j == self.reuse:
            keep_old_logp(self.samples, mb, mb.old_logp)


def take_pi_old(passes: Passes, shares: list[list[int]], mode: str) -> PiOld:
    """Every sample's log pi_old but the reused mini-batch's, before any update: with mode (algo.pi_old) "engine"
    its rollout_logp; with "trainer" a forward-only pass over this rank's share of every mini-batch but the first
    (module docstring), its MoE routing recorded."""
    samples = passes.samples
    if mode == "engine":
        for s in samples:
            s.old_logp = s.rollout_logp
        return PiOld(samples, None, 0.0)
    started = time.perf_counter()
    with torch.no_grad():
        for mb in passes.micro_batches(sorted(i for share in shares[1:] for i in share)):
            with routing(passes.policy, mb, passes.store, record=True):
                logps = micro_batch_logprobs(passes.policy, mb, **passes.head).logp
            keep_old_logp(samples, mb, logps)
    return PiOld(samples, 0, time.perf_counter() - started)


def keep_old_logp(samples: list[Sample], mb: MicroBatch, logp: Tensor) -> None:
    """Each sample of micro-batch `mb` gets its share of the flat logp [N] as its old_logp (on CPU)."""
    for i, lp in zip(mb.sample_ids, mb_split(logp, mb.lengths)):
        samples[i].old_logp = lp.cpu()


# ---- training ----------------------------------------------------------------------------------------------------

def train_mini_batch(cfg: Config, passes: Passes, updater, j: int, mini: list[int], share: list[int], pi_old: PiOld,
                     stats: StepStats) -> None:
    """Forward and backward of this rank's `share` of mini-batch j (coefficients over all of `mini`), gradients
    accumulated for one optimizer step. MoE: the routing is recorded in the first mini-batch and replayed in the
    others with model.routing_replay; the load-balancing loss (model.moe_aux_loss_coef) adds each micro-batch's
    token share of the mini-batch's."""
    algo, policy, device = cfg.algo, passes.policy, model_device(passes.policy)
    mini_tokens = sum(len(passes.samples[i].prompt_ids) + len(passes.samples[i].response_ids) for i in mini)
    total = 0.0
    for mb in passes.micro_batches(share, algo.loss_agg, norm_over=mini):
        # backward inside the block: a gradient-checkpointing recompute must see the same routing
        with routing(policy, mb, passes.store, record=j == 0, replay=cfg.model.routing_replay and j > 0) as cap:
            mb = mb.to(device)
            hint = LossHint(mb, algo, passes.knobs, pi_old if pi_old.expect(j, mb) else None)
            tl = micro_batch_logprobs(policy, mb, **passes.head, grad_hint=hint if hint.chunked else None)
            hint.whole(tl.logp)
            out = policy_loss(tl.logp, **loss_inputs(mb, algo, passes.knobs))
            loss = out.loss
            if cfg.model.moe_aux_loss_coef and mb.sample_ids:  # token share of the mini-batch's aux loss
                aux = cap.aux_loss().to(loss.device)
                loss = loss + cfg.model.moe_aux_loss_coef * (mb.num_tokens / mini_tokens) * aux
            updater.backward(loss)
        passes.meter.add(cap.stats)
        pi_old.keep(j, mb)
        total += out.loss.item()
        if mb.sample_ids:  # not an empty pass that only keeps the ranks in step
            stats.add(j, mb, out, tl, hint.grad)
    stats.losses.append(total)


class LossHint:
    """The grad hint of one training forward (cispo.model.logprobs.token_logprobs): the loss's gradient on each
    chunk of loss tokens, d loss / d logp [C], from that chunk's loss inputs. It keeps them (`grad` [N]): the
    per-token gradient of the whole loss, as the loss is a sum of per-token terms. `pi_old` set: this forward's
    logp is the micro-batch's pi_old, taken before each chunk's gradient.

    Not `chunked`: a token's term depends on its whole response (a sequence-level loss or correction,
    `sequence_level`), which a chunk may cut. The forward then gets no hint (autograd's backward), and `whole`
    takes pi_old and the gradient from the whole micro-batch's logp after it."""

    def __init__(self, mb: MicroBatch, algo: AlgoConfig, knobs: dict, pi_old: PiOld | None):
        self.mb, self.algo, self.knobs, self.pi_old = mb, algo, knobs, pi_old
        self._grad, self._seen = torch.zeros_like(mb.adv), 0
        self.chunked = not sequence_level(algo)

    def whole(self, logp: Tensor) -> None:
        """After the forward, when not `chunked`: the forward's logp [N] is pi_old (with `pi_old` set), and the
        gradient is the whole micro-batch's."""
        if self.chunked:
            return
        if self.pi_old is not None:
            self.pi_old.take(self.mb, slice(None), logp)
        self._grad = logp_grad(logp, **loss_inputs(self.mb, self.algo, self.knobs))
        self._seen = len(self._grad)

    def __call__(self, logp: Tensor, rows: slice) -> Tensor:
        if self.pi_old is not None:
            self.pi_old.take(self.mb, rows, logp)
        grad = logp_grad(logp, **loss_inputs(self.mb, self.algo, self.knobs, rows))
        self._grad[rows] = grad
        self._seen += len(grad)
        return grad

    @property
    def grad(self) -> Tensor:
        """d loss / d logp [N] of every loss token of the micro-batch."""
        if self._seen != len(self._grad):
            raise RuntimeError(f"the policy's forward asked the grad hint for {self._seen} of {len(self._grad)} loss "
                               "tokens: it must pass grad_hint to cispo.model.logprobs.token_logprobs")
        return self._grad


def loss_inputs(mb: MicroBatch, algo: AlgoConfig, knobs: dict, rows: slice = slice(None)) -> dict:
    """`policy_loss`'s arguments besides logp, for the loss tokens `rows` of a micro-batch; `knobs` are the algo
    fields the loss names (cispo.algo.loss.loss_knobs). The train/inference corrections on (tis_cap,
    algo.corrections) make the tis_weight; a sequence-level loss or correction gets each token's response
    (seq_ids), whose rows must then hold whole responses."""
    corrections = active_corrections(algo.tis_cap, algo.corrections)
    seq = sequence_ids(mb.lengths, len(mb.adv), mb.adv.device)[rows] if sequence_level(algo) else None
    weight = correction_weight(corrections, mb.old_logp[rows], mb.rollout_logp[rows], seq, vars(algo))
    return dict(old_logp=mb.old_logp[rows], adv=mb.adv[rows], coef=mb.coef[rows], tis_weight=weight, seq_ids=seq,
                loss=algo.loss, **knobs)


def sequence_level(algo: AlgoConfig) -> bool:
    """Whether the loss (cispo.algo.loss.takes_sequences) or a correction on (cispo.algo.corrections) weighs a
    token by its whole response."""
    return takes_sequences(algo.loss) or needs_sequences(active_corrections(algo.tis_cap, algo.corrections))


# ---- metrics -----------------------------------------------------------------------------------------------------

@dataclass
class StepStats:
    """What one update measures on this rank: per token of each micro-batch that has samples, and per optimizer
    step. `gather` turns it into the step's metrics over every rank (every rank must call it)."""

    mismatch_in_training: bool  # algo.pi_old=engine: mismatch/* compares the first mini-batch's training forward
    outs: list[LossOut] = field(default_factory=list)
    entropy: list[Tensor] = field(default_factory=list)  # [N] per micro-batch
    grads: list[Tensor] = field(default_factory=list)  # [N] d loss / d log pi (LossHint.grad), for trust/*
    updates: list[Tensor] = field(default_factory=list)  # [N] the optimizer step the tokens trained in
    fresh: list[Tensor] = field(default_factory=list)  # [N] mismatch_in_training: the training forward's logp
    fresh_rollout: list[Tensor] = field(default_factory=list)  # [N] and the engine's
    fresh_versions: list[Tensor] = field(default_factory=list)  # [N] and the versions that sampled them
    losses: list[float] = field(default_factory=list)  # per optimizer step: this rank's share of the loss
    norms: list[float] = field(default_factory=list)  # per optimizer step: the gradient norm before clipping

    def add(self, j: int, mb: MicroBatch, out: LossOut, tl: TokenLogprobs, grad: Tensor) -> None:
        """Micro-batch `mb` of mini-batch j: its loss results, logprobs and loss gradient [N]."""
        if self.mismatch_in_training and j == 0:
            self.fresh.append(tl.logp.detach())
            self.fresh_rollout.append(mb.rollout_logp)
            self.fresh_versions.append(token_versions(mb.versions, len(mb.rollout_logp)))
        self.outs.append(out)
        self.entropy.append(tl.entropy)
        self.grads.append(grad)
        self.updates.append(torch.full_like(out.ratio, j))

    def gather(self, dist: Dist, samples: list[Sample], algo: AlgoConfig, version: int) -> dict:
        """loss/*, trust/*, mismatch/*, staleness/* and train/* over every rank's tokens; `samples`: this rank's,
        with pi_old; `version`: the policy pi_old is (RL steps trained)."""
        cat = functools.partial(global_cat, dist)
        losses = dist.sum(self.losses)  # each rank's share of each mini-batch loss
        old = cat([s.old_logp for s in samples])
        if self.mismatch_in_training:
            pairs = cat(self.fresh), cat(self.fresh_rollout), cat(self.fresh_versions)
        else:
            pairs = old, cat([s.rollout_logp for s in samples]), cat([token_versions(s.versions, s.loss_len)
                                                                      for s in samples])
        metrics = mismatch_metrics(*pairs, version=version)
        tokens = LossOut.cat(self.outs, cat)  # flags travel as 0/1 floats, which loss_metrics reads
        trust = trust_region_metrics(tokens.ratio, tokens.adv, cat(self.grads), cat(self.updates), algo.clip_low,
                                     algo.clip_high)
        return metrics | loss_metrics([tokens]) | trust | {
            "loss/value": sum(losses) / len(losses),
            "loss/entropy": cat(self.entropy).mean().item(),
            "train/grad_norm": sum(self.norms) / len(self.norms),
            "train/updates": len(self.norms),
            "train/tokens": int(old.numel()),
        }


def token_versions(versions: Tensor | None, n: int) -> Tensor:
    """The policy version of each of n loss tokens [n]; -1 where unknown (a sample made without versions, counted
    as the current policy's)."""
    return versions if versions is not None else torch.full((n,), -1, dtype=torch.long)


def global_cat(dist: Dist, tensors: list[Tensor]) -> Tensor:
    """This rank's per-token values and all other ranks', concatenated."""
    return dist.cat(torch.cat([t.detach().float().cpu() for t in tensors]) if tensors else torch.zeros(0))


def mb_split(values: Tensor, lengths: list[int]) -> list[Tensor]:
    """Split a micro-batch's flat per-token values [N] back into one tensor per sample (none for an empty pass)."""
    return list(values.detach()[: sum(lengths)].split(lengths))
