"""mkdocs hooks (mkdocs.yml `hooks:`): the generated reference pages and plots, and a nav that leaves out the
optional pages not written yet, so that `mkdocs build --strict` fails on a broken link but not on a guide still to
come."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from mkdocs.structure.files import File


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reference, plots = _load("reference"), _load("plots")

# pages the nav names before they exist (their authors add them); every other nav entry must exist
OPTIONAL = {"guides/lora.md", "guides/rewards.md", "benchmarks/fits.md"}


def _prune(nav, docs_dir: Path):
    out = []
    for item in nav:
        if isinstance(item, dict):
            ((title, value),) = item.items()
            if isinstance(value, list):
                value = _prune(value, docs_dir)
                if value:
                    out.append({title: value})
            elif value not in OPTIONAL or (docs_dir / value).exists():
                out.append(item)
        elif item not in OPTIONAL or (docs_dir / item).exists():
            out.append(item)
    return out


def on_config(config, **kwargs):
    config["nav"] = _prune(config["nav"], Path(config["docs_dir"]))
    return config


def on_files(files, config, **kwargs):
    for path, page in reference.PAGES.items():
        files.append(File.generated(config, path, content=page()))
    for path, image in plots.draw_all(Path(config["docs_dir"])).items():
        files.append(File.generated(config, path, content=image))
    return files
