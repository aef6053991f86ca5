"""The adapters-only weight sink of rollout servers (`vllm serve --enable-lora`): the server fleet's LoRA transport,
beside its FileSink (rollout/engines/fleet/file_sink.py), with the same methods (rollout.base.WeightSink, and
`catch_up(server)` / `close()` of the fleet's ServerSink).

A version's adapter is written once as a PEFT folder (rollout.engines.lora) under a new directory, then every server
loads it through vLLM's runtime LoRA route, `POST /v1/load_lora_adapter {"lora_name": ADAPTER_NAME, "lora_path":
<folder>, "load_inplace": true}`, and resets its prefix cache (`POST /reset_prefix_cache`): the prefix cache keys
blocks by adapter id, which an in-place load keeps, so cached blocks of the previous adapter would otherwise
answer for the new one. Requests that are to sample from the policy name the model `ADAPTER_NAME`
(`model_name`); requests naming the base model get the base without the adapter.

Servers must be started with `--enable-lora --max-lora-rank R` (`server_args(spec)`) and the environment variable
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` (vLLM attaches the LoRA routes only then), plus the fleet's own settings.
Written against vLLM 0.32 (`vllm/entrypoints/serve/lora/api_router.py`, `openai/models/serving.py`).

`servers`: objects with `url` and `version` (rollout.engines.fleet.Server), read when a sync is served; a server that
fails to load is reported and left at its old version (the fleet's pool takes it out, as with FileSink).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import httpx
import torch

from rollout.base import SyncReport, _Counted
from rollout.engines.lora import check_adapter_keys, write_folder

ADAPTER_NAME = "cispo-policy"  # the model name of the policy (base + adapter) on every server
RUNTIME_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's max_lora_rank values


def server_args(spec) -> list[str]:
    """The `vllm serve` arguments a server needs to serve adapters of `spec` (cispo.config.LoraConfig)."""
    rank = min(r for r in LORA_RANKS if r >= spec.rank)
    return ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "1", "--max-cpu-loras", "2"]


class ServerLoadError(RuntimeError):
    """No server loaded the adapter."""


class ServerAdapterSink:
    """The adapter of each policy version to every server, by file and vLLM's runtime LoRA route."""

    transport = "adapter-file"
    model_name = ADAPTER_NAME

    def __init__(self, servers: list, spec, base_dir: str, weight_dir: str | None = None, timeout_s: float = 120.0):
        self.servers, self.spec, self.base_dir = servers, spec, str(base_dir)
        base = weight_dir or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
        self.root = Path(tempfile.mkdtemp(prefix="cispo-fleet-adapters-", dir=base))
        self.timeout_s = timeout_s
        self._written: dict[int, tuple[Path, int, int, float]] = {}  # version -> folder, bytes, tensors, write_s
        self._served: tuple[int, Path | None] = (0, None)

    @property
    def served_version(self) -> int:
        return self._served[0]

    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        counted = _Counted(check_adapter_keys(named_tensors, "ServerAdapterSink.write"))
        start = time.perf_counter()
        folder = self.root / f"v{version}"
        shutil.rmtree(folder, ignore_errors=True)
        write_folder(folder, dict(counted), self.spec, self.base_dir)
        if not counted.tensors:
            raise ValueError(f"ServerAdapterSink.write(v{version}): no adapter tensors were given")
        self._written[version] = (folder, counted.bytes, counted.tensors, time.perf_counter() - start)

    def serve(self, version: int) -> SyncReport:
        if version not in self._written:
            raise ValueError(f"ServerAdapterSink.serve(v{version}): no adapter was written for v{version} (write first)")
        folder, size, tensors, write_s = self._written[version]
        start = time.perf_counter()
        errors, loaded = [], 0
        with httpx.Client(timeout=self.timeout_s) as client:
            for s in self.servers:
                try:
                    _load(client, s.url, folder)
                    s.version, loaded = version, loaded + 1
                except httpx.HTTPError as err:
                    errors.append(f"{s.url}: {err}")
        if not loaded:
            raise ServerLoadError(f"no rollout server loaded the adapter of v{version} from {folder} "
                                  f"({'; '.join(errors) or 'no servers'}); servers need --enable-lora and "
                                  "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (server_args, RUNTIME_ENV)")
        self._served = (version, folder)
        for old in [v for v in self._written if v < version]:
            shutil.rmtree(self._written.pop(old)[0], ignore_errors=True)
        return SyncReport(version, self.transport, write_s, time.perf_counter() - start, size, tensors, loaded)

    def probe(self, ids: list[int]) -> dict[str, list[float]]:
        """Each server's log-probabilities of ids[1:] under the adapter it serves (temperature 1)."""
        out = {}
        with httpx.Client(timeout=self.timeout_s) as client:
            for s in self.servers:
                r = client.post(f"{s.url}/v1/completions", json={
                    "model": self.model_name, "prompt": list(map(int, ids)), "max_tokens": 1, "temperature": 1.0,
                    "prompt_logprobs": 0})
                r.raise_for_status()
                entries = r.json()["choices"][0]["prompt_logprobs"][1:]
                out[s.url] = [entry[str(token)]["logprob"] for entry, token in zip(entries, ids[1:], strict=True)]
        return out

    async def catch_up(self, s) -> None:
        """A server that (re)joins loads the served adapter and is labelled with its version (-1 until then)."""
        version, folder = self._served
        if folder is None:
            s.version = version
            return
        s.version = -1
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            for route, body in _load_requests(folder):
                r = await client.post(f"{s.url}{route}", json=body)
                _raise_for(r, route)
        s.version = version

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _load_requests(folder: Path) -> list[tuple[str, dict | None]]:
    return [("/v1/load_lora_adapter", {"lora_name": ADAPTER_NAME, "lora_path": str(folder), "load_inplace": True}),
            ("/reset_prefix_cache", None)]


def _load(client: httpx.Client, url: str, folder: Path) -> None:
    for route, body in _load_requests(folder):
        _raise_for(client.post(f"{url}{route}", json=body), route)


def _raise_for(r: httpx.Response, route: str) -> None:
    if r.status_code != 200:
        raise httpx.HTTPStatusError(f"{route}: {r.status_code} {r.text[:300]}", request=r.request, response=r)
