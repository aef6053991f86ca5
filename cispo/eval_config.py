"""The schema of scripts/evaluate.py (configs/eval.yaml): what to evaluate, how to sample it, and the endpoint.

The model, rollout, reward and data sections are the training schema's (cispo/config/), so a checkpoint is
evaluated with the engine and grader settings it was trained with."""

from __future__ import annotations

from dataclasses import dataclass, field

from cispo.config import ConfigError, DataConfig, ModelConfig, RolloutConfig, _one_of, _positive
from rewards.config import RewardConfig


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat-completions endpoint to evaluate (a `vllm serve`, OpenRouter); see configs/endpoint/.

    The API key is never part of a config: `api_key_env` names the environment variable that holds it."""

    base_url: str | None = None  # e.g. https://openrouter.ai/api/v1; None = evaluate model.path with a local engine
    model: str = ""  # the endpoint's name for the model, e.g. minimax/minimax-m1
    api_key_env: str | None = None  # e.g. OPENROUTER_API_KEY; None = send no key (a local server)
    concurrency: int = 8  # requests in flight
    timeout_s: float = 600.0  # per request: a long reasoning answer takes minutes
    # retries of one request on 408, 409, 429, 5xx, timeouts and dropped connections (the openai SDK's backoff:
    # 0.5 s doubling to 8 s with jitter; a Retry-After above two minutes fails the request instead of stalling)
    max_retries: int = 6
    price_in_per_m: float | None = None  # USD per 1M prompt tokens, for the cost estimate; None = not priced
    price_out_per_m: float | None = None  # USD per 1M completion tokens (reasoning tokens are completion tokens)
    extra_body: dict = field(default_factory=dict)  # merged into every request, e.g. {reasoning: {effort: high}}

    def __post_init__(self):
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint.base_url must start with http:// or https://, got {self.base_url!r}")
        if self.base_url is not None and not self.model:
            raise ConfigError("endpoint.model must name the endpoint's model, e.g. endpoint.model=minimax/minimax-m1")
        # the value is not echoed: a key pasted here by mistake must not end up in the error output
        if self.api_key_env is not None and not self.api_key_env.isidentifier():
            raise ConfigError("endpoint.api_key_env must be the NAME of an environment variable (letters, digits, _), "
                              "not the key itself")
        _positive("endpoint.concurrency", self.concurrency)
        _positive("endpoint.timeout_s", self.timeout_s)
        if self.max_retries < 0:
            raise ConfigError(f"endpoint.max_retries must be >= 0, got {self.max_retries}")
        for name in ("price_in_per_m", "price_out_per_m"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"endpoint.{name} must be >= 0 or null")


@dataclass
class EvalConfig:
    """Sampled evaluation (scripts/evaluate.py). M1 reports avg@k at temperature 1.0, top_p 0.95."""

    k: int = 4  # samples per prompt: avg@k, and pass@j for j = 1, 2, 4, ... <= k
    temperature: float = 1.0  # also the trainer's sampled evaluation (trainer.eval_k)
    top_p: float = 0.95
    max_tokens: int | None = None  # response budget (reasoning included); None = rollout.max_tokens
    seed: int | None = 0  # each (prompt, sample) gets a seed derived from this one; None = unseeded
    limit: int | None = None  # evaluate the first N held-out rows only
    grade: str = "answer"  # answer: the final answer only | full: the reasoning, then the answer
    output_dir: str = "evals"  # answers.jsonl (the cache a rerun resumes from) and the reports
    batch_prompts: int = 64  # local engines: prompts per generate call; each call's answers are cached together

    def __post_init__(self):
        _positive("eval.k", self.k)
        _positive("eval.batch_prompts", self.batch_prompts)
        _one_of("eval.grade", self.grade, {"answer", "full"})
        if self.temperature < 0:
            raise ConfigError("eval.temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"eval.top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_tokens", "limit"):
            if getattr(self, name) is not None:
                _positive(f"eval.{name}", getattr(self, name))


@dataclass
class EvalRunConfig:
    """configs/eval.yaml: a checkpoint (model.path, run by rollout.engine) or an endpoint (endpoint.base_url)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
