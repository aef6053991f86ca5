"""Benchmark the reward graders: math verifications/s and code test runs/s with 1 and 2 workers, and the
sandbox's overhead per run (sandboxed vs bare subprocess of the same program, medians, interleaved).

    PYTHONPATH=. .venv/bin/python scripts/bench_rewards.py [--out bench_rewards.json] [--quick]

Math mixes: "fast-path" is the default training run's shape (short integer/decimal answers, decided in
the trainer process without math-verify, so the worker count does not matter); "sympy-heavy" is twelve
answer forms (fractions, surds, intervals, sets, equations, degrees, polynomials, matrices, ...) that all
go through math-verify in the worker pool. Each repetition uses fresh golds, so per-worker gold caches
only help within a group, as in training. About 30 % of the answers are wrong.
Goals: math scales >= 1.7x from 1 to 2 workers; the sandbox adds <= 0.2 s per run. On a shared machine
only ratios measured side by side mean much: the 1- and 2-worker scorers run the same batches in turn.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewards import RewardConfig, RewardScorer  # noqa: E402
from rewards.code_drivers import DRIVER  # noqa: E402
from rewards.sandbox import Sandbox, SandboxLimits  # noqa: E402

THINK = "<think>" + "Let me work through this step by step. " * 12 + "</think>\n"


def sympy_item(rng: random.Random) -> tuple[str, str, str]:
    """(gold, right answer, wrong answer) in one of twelve forms, picked at random."""
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    forms = [
        (f"\\frac{{{a}}}{{{a + b}}}", f"\\frac{{{2 * a}}}{{{2 * (a + b)}}}", f"\\frac{{{a + 1}}}{{{a + b}}}"),
        (f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}", f"{a + 1}\\sqrt{{{b}}}"),
        (f"({a}, {a + b}]", f"({a},{a + b}]", f"[{a},{a + b}]"),
        (f"\\{{{a}, {a + b}, {a + 2 * b}\\}}", f"\\{{{a + 2 * b}, {a}, {a + b}\\}}", f"\\{{{a}, {a + b}\\}}"),
        (f"y = {a}x + {b}", f"y = {b} + {a}x", f"y = {a}x - {b}"),
        (f"{a}^\\circ", f"{a}", f"{a + 1}^\\circ"),
        (f"x^2 + {a + b}x + {a * b}", f"(x+{a})(x+{b})", f"(x+{a})(x-{b})"),
        (f"\\begin{{pmatrix}} {a} & {b} \\\\ {b} & {a} \\end{{pmatrix}}",
         f"\\begin{{pmatrix}}{a}&{b}\\\\{b}&{a}\\end{{pmatrix}}",
         f"\\begin{{pmatrix}}{b}&{a}\\\\{a}&{b}\\end{{pmatrix}}"),
        (f"\\frac{{{a}}}{{4}}", f"{a / 4}", f"{a / 4 + 1}"),
        (f"{a}\\pi", f"\\pi \\cdot {a}", f"{a + 1}\\pi"),
        (f"{a} + {b}i", f"{b}i + {a}", f"{a} - {b}i"),
        (f"\\frac{{\\sqrt{{{b}}}}}{{{a}}}", f"\\frac{{\\sqrt{{{b}}}}}{{{a}}}", f"\\frac{{{a}}}{{\\sqrt{{{b}}}}}"),
    ]
    return forms[rng.randrange(len(forms))]


def fast_item(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 999)
    if rng.random() < 0.2:
        return f"{n}.5", f"{n}.50", f"{n}.25"
    return str(n), str(n), str(n + 1)


def math_batch(make, prompts: int, group: int, seed: int) -> tuple[list[str], list[dict]]:
    rng = random.Random(seed)
    responses, rows = [], []
    for _ in range(prompts):
        gold, right, wrong = make(rng)
        for _ in range(group):
            answer = wrong if rng.random() < 0.3 else right
            responses.append(f"{THINK}So the answer is $\\boxed{{{answer}}}$.")
            rows.append({"answer": gold})
    return responses, rows


def host_cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def children_sched() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) so far, summed over this process's
    children (the grader workers), from /proc/<pid>/schedstat."""
    me = os.getpid()
    with open(f"/proc/{me}/task/{me}/children") as f:
        pids = f.read().split()
    run = wait = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                fields = f.read().split()
            run, wait = run + int(fields[0]), wait + int(fields[1])
        except OSError:
            pass
    return run / 1e9, wait / 1e9


def side_by_side(scorers: dict[int, RewardScorer], batches: list[tuple[list[str], list[dict]]]) -> dict:
    """Score each batch with every scorer (1 and 2 workers), alternating which goes first, so that both see
    the same load on a shared machine. Per worker count: median items/s; CPU milliseconds per item in this
    process and in the workers; and the share of the workers' runnable time spent waiting for a CPU.
    Linux shares CPU time fairly between sessions (autogroups), so when other sessions keep every CPU busy,
    a second worker in this session gets no more CPU: the wait share shows when that is what happened."""
    stats: dict[int, dict[str, list[float]]] = {w: {"rate": [], "parent": [], "worker": [], "wait": []}
                                                for w in scorers}
    for r, (responses, rows) in enumerate(batches):
        for w in sorted(scorers, reverse=r % 2 == 1):
            start, cpu0, (run0, wait0) = time.perf_counter(), time.process_time(), children_sched()
            batch = scorers[w].score(responses, rows)
            run1, wait1 = children_sched()
            stats[w]["rate"].append(len(responses) / (time.perf_counter() - start))
            stats[w]["parent"].append(1000 * (time.process_time() - cpu0) / len(responses))
            stats[w]["worker"].append(1000 * (run1 - run0) / len(responses))
            stats[w]["wait"].append((wait1 - wait0) / max(run1 - run0 + wait1 - wait0, 1e-9))
            assert batch.metrics["reward/status/error"] == 0.0, batch.metrics
    return {f"{w}w": {"per_s": statistics.median(st["rate"]), "runs": st["rate"],
                      "parent_cpu_ms_per_item": statistics.median(st["parent"]),
                      "worker_cpu_ms_per_item": statistics.median(st["worker"]),
                      "worker_cpu_wait_share": statistics.median(st["wait"])} for w, st in stats.items()}


def bench_math(make, prompts: int, group: int, repeats: int) -> dict:
    with RewardScorer(RewardConfig(num_workers=1)) as one, RewardScorer(RewardConfig(num_workers=2)) as two:
        for w, scorer in ((1, one), (2, two)):
            # Warm-up: starts the pool and runs every answer form once per worker (sympy imports lazily).
            scorer.score(*math_batch(make, 24 * w, 1, seed=-1))
        return side_by_side({1: one, 2: two}, [math_batch(make, prompts, group, seed=r) for r in range(repeats)])


SOLUTION = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums))\n"


def code_batch(samples: int, tests: int) -> tuple[list[str], list[dict]]:
    rng = random.Random(0)
    rows = []
    for _ in range(samples):
        inputs = [" ".join(str(rng.randint(0, 99)) for _ in range(5)) + "\n" for _ in range(tests)]
        rows.append({"source": "code", "tests": {"inputs": inputs,
                                                 "outputs": [f"{sum(map(int, i.split()))}\n" for i in inputs]}})
    return [f"```python\n{SOLUTION}```"] * samples, rows


def bench_code(samples: int, tests: int, repeats: int, uid_base: int) -> dict:
    responses, rows = code_batch(samples, tests)
    with RewardScorer(RewardConfig(num_workers=1, code_uid_base=uid_base)) as one, \
            RewardScorer(RewardConfig(num_workers=2, code_uid_base=uid_base + 1)) as two:
        for w, scorer in ((1, one), (2, two)):
            scorer.score(responses[:w], rows[:w])  # warm-up: starts the pool
        result = side_by_side({1: one, 2: two}, [(responses, rows)] * repeats)
    for w in ("1w", "2w"):  # test runs per second, not samples
        result[w]["per_s"] *= tests
        result[w]["runs"] = [rate * tests for rate in result[w]["runs"]]
    return result


def bench_overhead(n: int, uid: int | None) -> dict:
    """The same program and input, sandboxed vs a bare subprocess, alternating."""
    python = RewardConfig().code_python
    argv = [python, "-I", "-c", DRIVER, "stdio"]
    sandbox = Sandbox(SandboxLimits(10.0, 1024, 8, 1 << 20, 64), uid=uid, reap_orphans=True)
    stdin = b"1 2 3 4 5\n"
    sandboxed, bare = [], []
    with tempfile.TemporaryDirectory() as workdir:
        Path(workdir, "solution.py").write_text(SOLUTION)
        for _ in range(n):
            start = time.perf_counter()
            run = sandbox.run(argv, stdin=stdin, files={"solution.py": SOLUTION.encode()})
            sandboxed.append(time.perf_counter() - start)
            assert run.stdout == b"15\n", run
            start = time.perf_counter()
            out = subprocess.run(argv, input=stdin, capture_output=True, cwd=workdir, check=True)
            bare.append(time.perf_counter() - start)
            assert out.stdout == b"15\n"
    med_s, med_b = statistics.median(sandboxed), statistics.median(bare)
    return {"sandboxed_median_s": med_s, "bare_median_s": med_b, "overhead_s": med_s - med_b, "runs": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_rewards.json")
    p.add_argument("--quick", action="store_true", help="smaller batches (a smoke run)")
    p.add_argument("--uid-base", type=int, default=RewardConfig().code_uid_base,
                   help="first spare uid for the code workers (needs 3 unused uids)")
    args = p.parse_args()
    scale = 4 if args.quick else 1
    repeats = 2 if args.quick else 3
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                "loadavg_at_start": os.getloadavg()}, "math": {}, "code": {}}
    busy0, total0 = host_cpu_jiffies()
    for name, make, prompts in (("fast-path", fast_item, 256), ("sympy-heavy", sympy_item, 64)):
        result["math"][name] = bench_math(make, prompts // scale, 4, repeats)
        print(f"math {name} done", file=sys.stderr)
    busy1, total1 = host_cpu_jiffies()
    result["machine"]["host_cpu_busy_during_math"] = (busy1 - busy0) / max(total1 - total0, 1)
    result["code"] = bench_code(16 // scale, 4, repeats, args.uid_base)
    print("code done", file=sys.stderr)
    uid = args.uid_base if os.geteuid() == 0 else None
    result["sandbox_overhead"] = bench_overhead(10 if args.quick else 30, uid)
    m, c, o = result["math"], result["code"], result["sandbox_overhead"]
    rows = [
        ("math fast-path mix, in-process (verif/s)", m["fast-path"]["1w"]["per_s"], m["fast-path"]["2w"]["per_s"]),
        ("math sympy-heavy mix (verif/s)", m["sympy-heavy"]["1w"]["per_s"], m["sympy-heavy"]["2w"]["per_s"]),
        ("code test runs (runs/s)", c["1w"]["per_s"], c["2w"]["per_s"]),
    ]
    print(f"\n{'':42s}{'1 worker':>10s}{'2 workers':>11s}{'ratio':>8s}")
    for label, one, two in rows:
        print(f"{label:42s}{one:10.1f}{two:11.1f}{two / one:8.2f}")
    s1, s2 = m["sympy-heavy"]["1w"], m["sympy-heavy"]["2w"]
    print(f"sympy-heavy CPU per verification: workers {s1['worker_cpu_ms_per_item']:.1f} ms (1w) / "
          f"{s2['worker_cpu_ms_per_item']:.1f} ms (2w), trainer process {s1['parent_cpu_ms_per_item']:.2f} / "
          f"{s2['parent_cpu_ms_per_item']:.2f} ms; workers waited for a CPU {100 * s1['worker_cpu_wait_share']:.0f}%"
          f" / {100 * s2['worker_cpu_wait_share']:.0f}% of their runnable time")
    print(f"machine: load average at start {result['machine']['loadavg_at_start'][0]:.1f}, all CPUs busy "
          f"{100 * result['machine']['host_cpu_busy_during_math']:.0f}% during the math runs (every process)")
    print(f"\nsandbox per run (median of {o['runs']}): sandboxed {o['sandboxed_median_s'] * 1000:.0f} ms, bare "
          f"{o['bare_median_s'] * 1000:.0f} ms, overhead {o['overhead_s'] * 1000:.0f} ms (goal <= 200 ms)")
    result["summary"] = {"math_sympy_scaling": rows[1][2] / rows[1][1], "code_scaling": rows[2][2] / rows[2][1],
                         "sandbox_overhead_s": o["overhead_s"]}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
