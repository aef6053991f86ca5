"""Plots drawn at build time from the tables on the benchmark pages, so a figure and its plot have one source: the
page's markdown table. Each entry names the page, the column that starts the table, and the PNG written beside it."""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def table(markdown: str, first_header: str) -> list[list[str]]:
    """The rows of the first table whose header row starts with `first_header` (cells stripped, no header)."""
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise ValueError(f"no table starting with column {first_header!r}")


def numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"[-+]?\d[\d,]*\.?\d*", text)]


def png(fig) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out.getvalue()


def default_run(markdown: str) -> bytes:
    rows = table(markdown, "seed")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [f"seed {r[0]}\n{r[1]} thread{'s' if r[1] != '1' else ''}" for r in rows]
    before = [numbers(r[3])[0] for r in rows]
    after = [numbers(r[3])[1] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], before, width=0.4, label="before RL (after the warm start)", color="#9fa8da")
    ax.bar([i + 0.2 for i in x], after, width=0.4, label="after 240 CISPO steps", color="#3949ab")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("The default run: the tiny model on 2-digit additions", fontsize=10)
    return png(fig)


def long_budgets(markdown: str) -> bytes:
    rows = [r for r in table(markdown, "response tokens") if not r[0].startswith("slope")]
    tokens = [numbers(r[0])[0] / 1000 for r in rows]
    fig, (mem, time) = plt.subplots(1, 2, figsize=(9, 3.2))
    for col, name in ((1, "pi_old forward"), (2, "update, no checkpointing"), (3, "update, checkpointing")):
        seconds = [numbers(r[col])[0] for r in rows]
        gb = [numbers(r[col])[1] for r in rows]
        mem.plot(tokens, gb, marker="o", label=name)
        time.plot(tokens, seconds, marker="o", label=name)
    mem.set(xlabel="response tokens (thousands)", ylabel="peak resident above the model, GB",
            title="memory: linear in length")
    time.set(xlabel="response tokens (thousands)", ylabel="seconds", title="time: quadratic (attention)")
    for ax in (mem, time):
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
    mem.legend(fontsize=8)
    return png(fig)


# page -> (PNG path, how to draw it from the page's markdown)
PLOTS = {
    "benchmarks/default-run.md": ("benchmarks/default_run.png", default_run),
    "benchmarks/long.md": ("benchmarks/long_budgets.png", long_budgets),
}


def draw_all(docs_dir: Path) -> dict[str, bytes]:
    return {out: draw((docs_dir / page).read_text()) for page, (out, draw) in PLOTS.items()}
