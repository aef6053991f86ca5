"""Mixture-of-experts support for the policy update: routing capture, routing replay, router metrics, aux loss.

Routing replay (GSPO's "Routing Replay"; R3, arXiv 2510.11370, does the same with the rollout engine's choices):
a weight update flips some tokens' top-k experts, a discrete jump in log pi on top of the smooth effect of the
update, and the jump lands in the importance ratio pi / pi_old. Replay records the experts each token used in
the pi_old pass and forces them in the training forwards, so the ratio sees the update only. Only the *choice*
is replayed: the router logits are recomputed and the expert weights are the softmax of the fresh logits
gathered at the recorded experts, so the router still gets gradient.

    store = RoutingStore()
    with routing(model, mb, store, record=True):          # pi_old pass (no grad)
        ...forward...
    with routing(model, mb, store, replay=True) as cap:   # training forward (and its backward)
        ...forward...; loss = loss + coef * cap.aux_loss(); loss.backward()
    meter.add(cap.stats)                                   # meter = RoutingMeter(model); meter.metrics()

`routing` hooks the router modules (transformers' `*TopKRouter`: MiniMax, Mixtral, Qwen2/3-MoE, OLMoE, ...;
softmax over the experts, top-k, optional renormalisation). On a dense model it does nothing and yields an empty
capture, so callers need no branch. Records are kept per sample on the CPU, so the training micro-batches may
group the samples differently from the pi_old pass.

Gradient checkpointing recomputes the forward during backward: with replay on, run the backward inside the
`with` block, or the recomputed forward routes afresh and the gradients belong to a different network.

This module imports torch only.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_LAYOUT: list[tuple[Tensor, int]] = []  # (index of the packed tokens in the padded rows, padded row count)


@contextlib.contextmanager
def token_layout(index: Tensor, total: int) -> Iterator[None]:
    """Declare that the router inputs of the forward inside are a padded layout of `total` rows whose packed tokens
    sit at `index` (cispo.model.minimax.packed_forward). Capture and replay then see packed tokens only."""
    _LAYOUT.append((index, total))
    try:
        yield
    finally:
        _LAYOUT.pop()


def _packed_rows(n: int) -> Tensor | None:
    if _LAYOUT and _LAYOUT[-1][1] == n:
        return _LAYOUT[-1][0]
    return None


# ---------------------------------------------------------------------------------------------------------------
# finding the routers


def unwrap_model(model):
    """The Hugging Face model inside a DeepSpeed engine, a DDP wrapper or a wrapper holding it as `.model`
    (cispo.model.policy.PolicyLogprobs)."""
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif not hasattr(model, "config") and isinstance(getattr(model, "model", None), torch.nn.Module):
            model = model.model
        else:
            return model


def sample_lengths(position_ids: Tensor) -> list[int]:
    """Token count of each sample of a packed row [1, S] or [S] (a sample starts where its position is 0)."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        raise ValueError("packed position ids must start at 0 and restart at 0 for each sample")
    return [b - a for a, b in zip(starts, starts[1:] + [pos.numel()])]


def moe_routers(model) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router) of every top-k softmax router of `model`, in layer order."""
    out = []
    for name, module in unwrap_model(model).named_modules():
        if type(module).__name__.endswith("TopKRouter") and all(
            hasattr(module, a) for a in ("top_k", "num_experts", "weight")
        ):
            found = re.search(r"layers\.(\d+)\.", name)
            out.append((int(found.group(1)) if found else len(out), module))
    return out


def _looks_moe(model) -> bool:
    config = getattr(unwrap_model(model), "config", None)
    return any((getattr(config, k, None) or 0) > 1 for k in ("num_local_experts", "num_experts", "n_routed_experts"))


# ---------------------------------------------------------------------------------------------------------------
# what a forward routed


@dataclass
class RoutingStore:
    """The experts each token of each sample used in a recorded forward: experts[sample] = [layers, T, top_k],
    on the CPU (uint8 up to 256 experts). T counts every token of the sample (prompt and response)."""

    experts: dict[int, Tensor] = field(default_factory=dict)

    def put(self, sample_ids: Sequence[int], lengths: Sequence[int], per_layer: Sequence[Tensor], num_experts: int):
        dtype = torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 32768 else torch.int32
        stacked = torch.stack([t.detach() for t in per_layer]).to("cpu", dtype)  # [L, S, k]
        for sid, chunk in zip(sample_ids, stacked.split(list(lengths), dim=1)):
            self.experts[sid] = chunk.clone()

    def get(self, sample_ids: Sequence[int]) -> Tensor | None:
        """[L, S, k] int64 for these samples laid end to end, or None unless every one was recorded."""
        if not sample_ids or any(s not in self.experts for s in sample_ids):
            return None
        return torch.cat([self.experts[s] for s in sample_ids], dim=1).long()

    def __len__(self) -> int:
        return len(self.experts)

    def clear(self) -> None:
        self.experts.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.experts.values())


@dataclass
class RoutingStats:
    """Detached per-layer routing statistics of one or more forwards; add them up with +."""

    layers: list[int]  # decoder layer index of each router
    counts: Tensor  # [L, E] float64, top-k assignments per expert
    entropy_sum: Tensor  # [L] float64, summed per-token entropy (nats) of the router distribution
    changed: Tensor  # [L] float64, tokens whose top-k set differs from the recorded one
    tokens: int = 0
    ref_tokens: int = 0  # tokens that had a recorded routing to compare with
    changed_any: int = 0  # of those, tokens whose top-k set differs in at least one layer
    aux_sum: float = 0.0  # aux loss * tokens, summed (token-weighted mean over forwards)

    @classmethod
    def zeros(cls, layers: list[int], num_experts: int) -> "RoutingStats":
        L = len(layers)
        return cls(list(layers), torch.zeros(L, num_experts, dtype=torch.float64), torch.zeros(L, dtype=torch.float64),
                   torch.zeros(L, dtype=torch.float64))

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        return RoutingStats(
            self.layers, self.counts + other.counts, self.entropy_sum + other.entropy_sum, self.changed + other.changed,
            self.tokens + other.tokens, self.ref_tokens + other.ref_tokens, self.changed_any + other.changed_any,
            self.aux_sum + other.aux_sum,
        )

    def to_list(self) -> list[float]:
        """All numbers as one flat list, for an element-wise sum over ranks (Dist.sum); see from_list."""
        head = [float(self.tokens), float(self.ref_tokens), float(self.changed_any), float(self.aux_sum)]
        return head + self.counts.flatten().tolist() + self.entropy_sum.tolist() + self.changed.tolist()

    def from_list(self, values: list[float]) -> "RoutingStats":
        """Stats of this shape holding `values` (to_list's layout)."""
        L, E = self.counts.shape
        v = torch.tensor(values[4:], dtype=torch.float64)
        return RoutingStats(self.layers, v[: L * E].view(L, E), v[L * E : L * E + L], v[L * E + L :],
                            int(values[0]), int(values[1]), int(values[2]), values[3])


class RoutingCapture:
    """What one forward routed, per router (packed tokens only, padding dropped):
    logits [T, E] (attached to the graph when the forward had grad), fresh [T, k] the router's own top-k,
    used [T, k] the experts the forward ran (= fresh unless replayed). `stats` is filled when the block exits."""

    def __init__(self, routers: list[tuple[int, torch.nn.Module]]):
        self.layers = [layer for layer, _ in routers]
        self.top_k = [int(r.top_k) for _, r in routers]
        self.num_experts = [int(r.num_experts) for _, r in routers]
        self.logits: list[Tensor | None] = [None] * len(routers)
        self.fresh: list[Tensor | None] = [None] * len(routers)
        self.used: list[Tensor | None] = [None] * len(routers)
        self.stats: RoutingStats | None = None
        self._aux: Tensor | None = None
        self._rows: list[tuple[Tensor, int] | None] = [None] * len(routers)  # padded layout of the first call

    @property
    def ran(self) -> bool:
        return bool(self.layers) and all(t is not None for t in self.logits)

    def aux_loss(self) -> Tensor:
        """The load-balancing loss of this forward (differentiable; 0 on a dense model)."""
        if not self.ran:
            return torch.zeros(())
        if self._aux is None:
            self._aux = load_balancing_loss(self.logits, self.top_k[0], self.used)
        return self._aux

    def _finish(self, reference: Tensor | None) -> None:
        if not self.ran:
            return
        with torch.no_grad():
            stats = RoutingStats.zeros(self.layers, max(self.num_experts))
            E = stats.counts.shape[1]
            stats.counts = torch.stack([torch.bincount(u.reshape(-1).cpu(), minlength=E).double() for u in self.used])
            stats.entropy_sum = torch.stack([_entropy(lg).sum().cpu() for lg in self.logits]).double()
            stats.tokens = int(self.logits[0].shape[0])
            if reference is not None:
                diff = torch.stack([_set_differs(f.cpu(), reference[i]) for i, f in enumerate(self.fresh)])  # [L, T]
                stats.changed, stats.changed_any = diff.sum(1).double(), int(diff.any(0).sum())
                stats.ref_tokens = stats.tokens
            stats.aux_sum = float(self.aux_loss().detach()) * stats.tokens
        self.stats = stats


def _entropy(logits: Tensor) -> Tensor:
    logp = F.log_softmax(logits.detach().float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _set_differs(a: Tensor, b: Tensor) -> Tensor:
    """[T] whether the top-k expert sets of two [T, k] index tensors differ (order within a row ignored)."""
    return (a.sort(-1).values != b.to(a.dtype).sort(-1).values).any(-1)


def _hook(cap: RoutingCapture, i: int, forced: Tensor | None, module, args, output):
    logits, scores, indices = output
    rows = _packed_rows(logits.shape[0])
    first = cap._rows[i]
    if rows is None and first is not None and first[1] == logits.shape[0]:
        rows = first[0]  # gradient checkpointing's recompute, run after packed_forward's layout block has closed
    take = (lambda t: t[rows]) if rows is not None else (lambda t: t)
    used = indices
    if forced is not None:
        want = forced[i].to(indices.device)
        if rows is not None:
            used = indices.clone()
            used[rows] = want
        else:
            used = want
        if used.shape != indices.shape:
            raise ValueError(
                f"routing replay: the record has {want.shape[0]} tokens, layer {cap.layers[i]}'s forward "
                f"{take(indices).shape[0]}"
            )
        probs = F.softmax(logits.float(), dim=-1)
        weights = probs.gather(-1, used)
        if getattr(module, "norm_topk_prob", True):
            weights = weights / weights.sum(-1, keepdim=True)
        output = (logits, weights.to(scores.dtype), used)
    # the same ops on every call: a checkpoint recompute must save as many tensors as the forward did
    packed_logits = take(logits)
    if cap.logits[i] is None:  # a second call is gradient checkpointing's recompute: same tokens, already seen
        cap.logits[i], cap.fresh[i], cap.used[i] = packed_logits, take(indices).detach(), take(used).detach()
        cap._rows[i] = (rows, logits.shape[0]) if rows is not None else None
    return output


@contextlib.contextmanager
def routing(model, mb=None, store: RoutingStore | None = None, *, record: bool = False, replay: bool = False):
    """Capture (and optionally record or replay) the routing of the forwards run inside the block.

    mb: the packed micro-batch (anything with `sample_ids` and `position_ids` [1, S]); needed to record or replay.
    store: the per-sample record. record=True writes this forward's choices into it; replay=True makes the forward
        use the recorded experts. Without either, a store that holds these samples serves as the reference for
        the `moe/routing_changed_*` metrics.
    Yields a RoutingCapture. A dense model gets an empty one, and record/replay are no-ops on it."""
    if record and replay:
        raise ValueError("routing: record and replay are exclusive")
    routers = moe_routers(model)
    cap = RoutingCapture(routers)
    if not routers:
        if replay and _looks_moe(model):
            raise NotImplementedError(
                f"routing replay: {type(unwrap_model(model)).__name__} has experts but no top-k softmax router this "
                "module knows (transformers' *TopKRouter); set model.routing_replay=false"
            )
        yield cap
        return
    if (record or replay) and (mb is None or store is None):
        raise ValueError("routing: record and replay need the micro-batch and a RoutingStore")
    if mb is not None and not mb.sample_ids:  # an empty pass that only keeps the ranks in step: nothing to route
        yield cap
        return
    lengths = None
    if mb is not None:
        lengths = sample_lengths(mb.position_ids)
        if len(lengths) != len(mb.sample_ids):
            raise ValueError(f"routing: {len(lengths)} samples in the packed row, {len(mb.sample_ids)} sample ids")
    reference = store.get(mb.sample_ids) if (store is not None and mb is not None and not record) else None
    if replay and reference is None:
        raise KeyError("routing replay: some samples of this micro-batch have no recorded routing (record them "
                       "in the pi_old pass)")
    handles = [
        router.register_forward_hook(lambda m, a, o, i=i: _hook(cap, i, reference if replay else None, m, a, o))
        for i, (_, router) in enumerate(routers)
    ]
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()
    cap._finish(reference)
    if record and cap.ran:
        store.put(mb.sample_ids, lengths, cap.fresh, max(cap.num_experts))


# ---------------------------------------------------------------------------------------------------------------
# aux loss and metrics (pure)


def load_balancing_loss(
    router_logits: Sequence[Tensor], top_k: int, selected: Sequence[Tensor] | None = None
) -> Tensor:
    """Switch-Transformer load-balancing loss over all layers' tokens, as transformers computes it
    (`load_balancing_loss_func`): E * sum_e f_e * P_e, where f_e = top-k assignments to expert e per token
    (summing to top_k) and P_e = mean router probability of e. Minimum top_k when perfectly balanced.

    router_logits: per layer [T, E]. selected: per layer [T, k], the experts actually used (replayed ones);
    None = each layer's own top-k. The gradient flows through P_e only, as in the paper."""
    E = router_logits[0].shape[-1]
    counts = torch.zeros(E, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros(E, dtype=torch.float32, device=router_logits[0].device)
    rows = 0
    for i, logits in enumerate(router_logits):
        probs = F.softmax(logits.float(), dim=-1)
        chosen = selected[i] if selected is not None else torch.topk(probs, top_k, dim=-1).indices
        counts = counts + torch.bincount(chosen.reshape(-1), minlength=E).float()
        prob_sum = prob_sum + probs.sum(0)
        rows += probs.shape[0]
    return E * torch.sum((counts / rows) * (prob_sum / rows))


def routing_metrics(stats: Iterable[RoutingStats | None]) -> dict[str, float]:
    """Metrics of the forwards summed in `stats` (empty when there are none, e.g. on a dense model):
    moe/load_cv/layer{i}: coefficient of variation (std / mean) of the expert loads; 0 = balanced.
    moe/load_max_share/layer{i}: the busiest expert's share of the assignments; 1/E = balanced.
    moe/router_entropy/layer{i}: mean per-token entropy (nats) of the router distribution; at most ln E.
    moe/load_cv, moe/router_entropy: means over layers; moe/load_max_share: max over layers.
    moe/routing_changed_frac: (token, layer) pairs whose top-k set differs from the recorded pi_old routing;
    moe/routing_changed_any_layer_frac: tokens that differ in at least one layer (both only when a record was
    there to compare with); moe/aux_loss: token-weighted mean of the forwards' load-balancing losses."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return {}
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    if total.tokens == 0:
        return {}
    out: dict[str, float] = {}
    loads = total.counts / total.counts.sum(1, keepdim=True).clamp_min(1)
    cv = loads.std(1, unbiased=False) / loads.mean(1)
    share = loads.max(1).values
    entropy = total.entropy_sum / total.tokens
    for k, layer in enumerate(total.layers):
        out[f"moe/load_cv/layer{layer}"] = float(cv[k])
        out[f"moe/load_max_share/layer{layer}"] = float(share[k])
        out[f"moe/router_entropy/layer{layer}"] = float(entropy[k])
    out["moe/load_cv"] = float(cv.mean())
    out["moe/load_max_share"] = float(share.max())
    out["moe/router_entropy"] = float(entropy.mean())
    out["moe/aux_loss"] = total.aux_sum / total.tokens
    if total.ref_tokens:
        out["moe/routing_changed_frac"] = float(total.changed.sum()) / (total.ref_tokens * len(total.layers))
        out["moe/routing_changed_any_layer_frac"] = total.changed_any / total.ref_tokens
    return out


class RoutingMeter:
    """Sums the routing stats of an update's forwards; `metrics(reduce=dist.sum)` sums them over ranks first
    (every rank must call it; ranks with no forwards contribute zeros). Empty on a dense model."""

    def __init__(self, model):
        routers = moe_routers(model)
        experts = max((int(r.num_experts) for _, r in routers), default=0)
        self.total = RoutingStats.zeros([i for i, _ in routers], experts)

    def add(self, stats: RoutingStats | None) -> None:
        if stats is not None:
            self.total = self.total + stats

    def metrics(self, reduce: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
        if not self.total.layers:
            return {}
        total = self.total.from_list(reduce(self.total.to_list())) if reduce is not None else self.total
        return routing_metrics([total])
