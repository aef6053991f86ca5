"""`cispo bench NAME [ARGS ...]`: the benchmarks and demos of a source checkout, by name.

The benchmarks are scripts of the repository (scripts/bench_*.py, compare_losses.py, demo_tools.py): they start
`scripts/train.py` runs, read the test models and write their tables next to the code, so they are not part of an
installed wheel. `cispo bench` finds the checkout this package runs from, or the one in the current directory (or
above it), and runs the script with the same Python; its arguments, Hydra overrides after `--` included, pass on
unchanged.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

EXTRA = ("compare_losses", "demo_tools")  # not named bench_*, but run and measured the same way


def checkout() -> Path | None:
    """The source checkout: the one this package is imported from (editable install or clone), else the current
    directory or a parent of it."""
    here = Path(__file__).resolve().parents[2]
    for root in (here, *[Path.cwd(), *Path.cwd().parents]):
        if (root / "scripts" / "bench_loss.py").exists() and (root / "cispo" / "cli.py").exists():
            return root
    return None


def benchmarks(root: Path) -> dict[str, Path]:
    scripts = sorted((root / "scripts").glob("bench_*.py")) + [root / "scripts" / f"{n}.py" for n in EXTRA]
    return {p.stem.removeprefix("bench_").replace("_", "-"): p for p in scripts if p.exists()}


def summary(path: Path) -> str:
    """The docstring's first sentence."""
    doc = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0].split())
    return doc.split(". ")[0].rstrip(".") + "."


def main(argv: list[str]) -> int:
    root = checkout()
    if root is None:
        print("error: cispo bench runs the benchmarks of a source checkout (scripts/bench_*.py), and none was found "
              "here or above: run it inside a clone of cispo-rl", file=sys.stderr)
        return 2
    table = benchmarks(root)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, table))
        print("usage: cispo bench NAME [ARGS ...]   (`cispo bench NAME --help` for a benchmark's own options)\n")
        print("\n".join(f"  {name:<{width}}  {summary(path)}" for name, path in table.items()))
        return 0
    name = argv[0].replace("_", "-").removeprefix("bench-")
    if name not in table:
        import difflib

        guess = difflib.get_close_matches(name, list(table), n=1)
        print(f"error: no benchmark {argv[0]!r}" + (f"; did you mean `cispo bench {guess[0]}`?" if guess else "") +
              f" (benchmarks: {', '.join(table)})", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(table[name]), *argv[1:]], cwd=root)
