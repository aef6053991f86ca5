"""The generated reference pages: configuration (from the config dataclasses and their `#` comments) and metrics
(from the code that emits them). mkdocs runs them at build time (docs/_gen/hooks.py), so the pages cannot drift
from the code; tests/test_docs.py checks that nothing the code defines or logs is missing from them.

Run alone to print a page: `python docs/_gen/reference.py configuration|metrics`.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ---- configuration -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Field:
    key: str  # dotted, e.g. rollout.server.port
    type: str  # as written in the source
    default: str  # as it reads on the command line (null, true, [a, b])
    doc: str  # the field's comments: the block above it, then the one beside it
    section: str  # the `# --- name ---` heading it sits under, if any
    nested: bool  # a section of its own (a dataclass)


def comments_of(path: Path) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


HEADING = re.compile(r"^-{2,}\s*(.*?)\s*-*$")


def field_comments(path: Path, cls_name: str) -> dict[str, tuple[str, str, str]]:
    """For each field of the class: (annotation as written, its comments, its section heading)."""
    source = path.read_text()
    lines = source.splitlines()
    comments = comments_of(path)
    tree = ast.parse(source)
    (cls,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls_name]
    out, section, block = {}, "", ""
    prev_end = cls.body[0].end_lineno if cls.body and isinstance(cls.body[0], ast.Expr) else cls.lineno
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            if hasattr(node, "end_lineno"):
                prev_end = node.end_lineno
            continue
        above, line = [], node.lineno - 1
        while line > prev_end and lines[line - 1].strip().startswith("#"):
            text = comments[line]
            heading = HEADING.match(text)
            if heading:  # `# --- data parallelism (...) ---`: a heading for the fields below, not their doc
                section = heading.group(1)
                break
            above.insert(0, text)
            line -= 1
        beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        name = node.target.id
        if above:
            block = " ".join(above)
        elif beside or node.lineno != prev_end + 1:
            block = ""  # a comment of its own, or a blank line: the block above the fields before it has ended
        # a block comment over several adjacent fields documents each one it names (`count` ... `urls`)
        shared = block if not above and not beside and re.search(rf"\b{name}\b", block) else ""
        doc = " — ".join(t for t in (" ".join(above) or shared, " ".join(beside)) if t)
        out[name] = (ast.unparse(node.annotation), doc, section)
        prev_end = node.end_lineno
    return out


def as_override(value) -> str:
    """A default as it is written in an override or a yaml file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(as_override(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {as_override(v)}" for k, v in value.items()) + "}"
    return repr(value)


def source_file(cls: type) -> Path:
    """The file that defines a class: a module of the cispo/config/ package, rewards/config.py, ..."""
    return Path(sys.modules[cls.__module__].__file__).resolve()


def source_of(cls: type) -> str:
    """That file as the page names it, relative to the repository."""
    path = source_file(cls)
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def config_fields(cls: type, prefix: str) -> list[Field]:
    """Every key of a config dataclass and of the sections nested in it, in source order."""
    written = field_comments(source_file(cls), cls.__name__)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        annotation, doc, section = written[f.name]
        nested = dataclasses.is_dataclass(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = as_override(f.default)
        elif nested:
            default = "(section)"
        else:
            default = as_override(f.default_factory())
        out.append(Field(prefix + f.name, annotation, default, doc, section, nested))
        if nested:
            out += config_fields(hints[f.name], prefix + f.name + ".")
    return out


def schema_sections() -> list[tuple[str, type, str]]:
    """(section key, its dataclass, which commands read it), in the order of the page."""
    from cispo.config import Config
    from cispo.eval_config import EvalRunConfig

    hints = typing.get_type_hints(Config)
    eval_hints = typing.get_type_hints(EvalRunConfig)
    both = {f.name for f in dataclasses.fields(EvalRunConfig)}
    out = [(f.name, hints[f.name], "train, eval" if f.name in both else "train") for f in dataclasses.fields(Config)]
    out += [(f.name, eval_hints[f.name], "eval") for f in dataclasses.fields(EvalRunConfig) if f.name not in hints]
    return out


def all_config_keys() -> list[str]:
    return [f.key for name, cls, _ in schema_sections() for f in config_fields(cls, name + ".")]


def cell(text: str) -> str:
    """Text for a table cell: pipes escaped, and angle brackets outside `code` shown as written, not taken for HTML."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def preset_summary(path: Path) -> str:
    """The header comment of a preset file, up to its first blank or non-comment line."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        out.append(text)
    return " ".join(out)


def class_doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())  # dataclass's own signature: none


def section_tables(key: str, cls: type, used: str, level: str) -> list[str]:
    """One heading and table per dataclass: its own keys, then each nested section under a heading of its own."""
    fields_ = [f for f in config_fields(cls, key + ".") if f.key.count(".") == key.count(".") + 1]
    hints = typing.get_type_hints(cls)
    lines = ["", f"{level} {key}", "", f"`{cls.__name__}` in `{source_of(cls)}`; {used}.", ""]
    if class_doc(cls):
        lines += [cell(class_doc(cls)), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    section = ""
    for f in fields_:
        if f.section and f.section != section:
            lines.append(f"| **{cell(f.section)}** | | | |")
        section = f.section
        meaning = cell(f.doc) or "&nbsp;"
        if f.nested:
            meaning = f"the `{f.key}.*` keys: [below](#{f.key.replace('.', '')})"
            meaning += f". {cell(f.doc)}" if f.doc else ""
        lines.append(f'| <a id="{f.key}"></a>`{f.key}` | `{cell(f.type)}` | `{cell(f.default)}` | {meaning} |')
    for f in fields_:
        if f.nested:
            lines += section_tables(f.key, hints[f.key.rpartition(".")[2]], "a section of " + key, level + "#")
    return lines


def configuration_page() -> str:
    configs = ROOT / "configs"
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses (the modules of `cispo/config/`, `rewards/config.py`, "
        "`cispo/eval_config.py`) each time the docs are built: every key, its type, its default and the comments "
        "written beside it in the source, which is the one place a default or its meaning is stated. The yaml "
        "files under `configs/` only pick presets.",
        "",
        "Set any key on the command line as `SECTION.KEY=VALUE` (`cispo train algo.is_weight_max=4`), pick a "
        "preset as `GROUP=NAME` (`cispo train algo=dapo`). A misspelt key stops the run before anything is "
        "built and names the nearest real one. A value is checked against the rules in the dataclass's "
        "`__post_init__`, which name the key and the fix.",
        "",
        "The presets (`GROUP=NAME`) are [at the end](#presets).",
    ]
    for name, cls, used in schema_sections():
        lines += section_tables(name, cls, f"read by `cispo {used.replace(', ', '` and `cispo ')}`", "##")
    lines += ["", "## Presets", "", "Each file of `configs/GROUP/`, with the comment at its top.", "",
              "| group | preset | what it sets |", "|---|---|---|"]
    for group in sorted(p for p in configs.iterdir() if p.is_dir()):
        for preset in sorted(group.glob("*.yaml")):
            lines.append(f"| `{group.name}` | `{group.name}={preset.stem}` | {cell(preset_summary(preset))} |")
    return "\n".join(lines) + "\n"


# ---- metrics -----------------------------------------------------------------------------------------------

METRIC_SOURCES = ("cispo", "rollout", "rewards")
KEY = re.compile(r"^[a-z][a-z0-9_]*/[A-Za-z0-9_@<>./-]*[A-Za-z0-9_>]$")

GROUPS = {
    "train": "The update: samples and tokens trained on, optimizer steps, learning rate, gradient norm.",
    "loss": "The objective over the step's tokens: its value and entropy, the IS ratio and the share of tokens "
            "clipped or masked (`*_pos_adv` / `*_neg_adv`: among tokens of positive / negative advantage).",
    "mismatch": "Trainer against engine: how far the rollout engine's sampling logprobs are from the trainer's "
                "pi_old (M1 reported a probability correlation of 0.987 -> 0.997 after its LM-head fix).",
    "adv": "Advantages: the share of groups whose rewards were all equal (they leave the loss by default).",
    "reward": "Grades of the step's samples: mean and std of the reward, the share of each grader status, "
              "per-source means and the graders' own figures.",
    "rollout": "Generation: response lengths and their percentiles, truncation and early stop, throughput; with "
               "multi-turn tools, turns per trajectory, how trajectories finished and the share of tool tokens.",
    "tool": "Multi-turn tool calls: calls, errors and time, in total and per tool.",
    "eval": "Held-out evaluation (greedy accuracy, boxed-answer rate, with `trainer.eval_k` avg@k / pass@k), and "
            "the report of `cispo eval`.",
    "time": "Wall-clock seconds of each phase of a step.",
    "memory": "Peak resident memory of each phase of a step (cispo/phases.py).",
    "sync": "Weight syncs from the trainer to the engines or servers: time, bandwidth, and the probe that checks "
            "the served policy moved.",
    "async": "Generation ahead of the update (`algo.max_staleness`): the staleness of the trained samples, the "
             "queue, and who waited for whom.",
    "curriculum": "The staged output window and the prompts retired once solved.",
    "data": "The dataset as loaded: rows trained on, held out and skipped (by reason).",
    "moe": "Mixture-of-experts models: router load and entropy per layer, the auxiliary loss and routing drift.",
    "sampling": "Dynamic sampling (`curriculum.sample_rounds`): generation rounds of the step, prompts generated, "
                "the share whose rewards differed, the groups kept and whether the batch was filled.",
    "staleness": "Tokens sampled by an older policy than pi_old (rollout servers with `algo.max_staleness`): their "
                 "share, and how far their sampling logprobs are from pi_old's.",
    "trust": "Where the tokens that leave the trust region [1 - clip_low, 1 + clip_high] are and how much of the "
             "gradient they carry: the tokens on which CISPO and PPO's clip disagree; per update of the step, how "
             "far the policy has moved from pi_old.",
}


@dataclasses.dataclass
class Metric:
    key: str  # `<name>` marks a part filled in at run time
    where: str  # module:function
    note: str  # the comment on its line, if any


def string_defaults(fn: ast.AST) -> dict[str, str]:
    """A function's parameters whose default is a string (a metric prefix such as prefix="eval/")."""
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {}
    args = fn.args
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    return {a.arg: d.value for a, d in pairs if isinstance(d, ast.Constant) and isinstance(d.value, str)}


def render(node: ast.AST, defaults: dict[str, str]) -> str | None:
    """The key a string node spells, with `<expr>` for what is filled in at run time."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            elif isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) and v.value.id in defaults:
                parts.append(defaults[v.value.id])
            else:
                parts.append(f"<{ast.unparse(v.value)}>")
        return "".join(parts)
    return None


def emitted_nodes(tree: ast.AST):
    """(node, enclosing function) for every string that becomes a metric key: a dict literal's key, a dict
    comprehension's key, a subscript assigned to (`m[key] = ...`)."""
    def walk(node, fn):
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            if isinstance(child, ast.Dict):
                for key in child.keys:
                    if key is not None:
                        yield key, inner
            elif isinstance(child, ast.DictComp):
                yield child.key, inner
            elif isinstance(child, (ast.Assign, ast.AugAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                for t in targets:
                    for sub in ast.walk(t):
                        if isinstance(sub, ast.Subscript):
                            yield sub.slice, inner
            yield from walk(child, inner)
    yield from walk(tree, None)


DOCS: dict[str, str] = {}  # module:function -> its docstring, on one line (filled by scan_metrics)


def scan_metrics() -> list[Metric]:
    found: dict[str, Metric] = {}
    for package in METRIC_SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            tree = ast.parse(source)
            comments = comments_of(path)
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node, fn in emitted_nodes(tree):
                key = render(node, string_defaults(fn) if fn else {})
                if key is None or not KEY.match(key):
                    continue
                where = f"{module}:{fn.name}" if fn else module
                if fn and ast.get_docstring(fn):
                    DOCS[where] = " ".join(ast.get_docstring(fn).split())
                if key in found:
                    if where not in found[key].where.split(", "):
                        found[key].where += f", {where}"
                    continue
                found[key] = Metric(key, where, comments.get(node.lineno, ""))
    order = list(GROUPS)
    return sorted(found.values(), key=lambda m: (order.index(group(m)) if group(m) in order else len(order), m.key))


def group(metric: Metric) -> str:
    return metric.key.split("/")[0]


def metric_pattern(key: str) -> re.Pattern:
    """A documented key as a pattern of logged keys: `<name>` stands for one or more characters."""
    return re.compile("^" + re.sub(r"\\<[^>]*\\>|<[^>]*>", ".+", re.escape(key)) + "$")


def metrics_page() -> str:
    metrics = scan_metrics()
    lines = [
        "# Metrics reference",
        "",
        "Generated each time the docs are built, from the code that emits the metrics: every string that becomes a "
        "key of a metrics dict in `cispo/`, `rollout/` and `rewards/` (a dict literal's key, a dict "
        "comprehension's key, `metrics[key] = ...`). A part in `<angle brackets>` is filled in at run time "
        "(`reward/status/<status>` is `reward/status/correct`, `reward/status/wrong`, ...). Every step's metrics go "
        "to `metrics.jsonl` in the run directory and to W&B; the held-out evaluations add theirs to the step they "
        "ran after.",
        "",
        "The tests run real training (the default run, the tool presets) and fail when a key it logged matches "
        "nothing on this page.",
    ]
    for name in dict.fromkeys(group(m) for m in metrics):
        members = [m for m in metrics if group(m) == name]
        intro = GROUPS.get(name, "Not described yet: add a line for this group to GROUPS in docs/_gen/reference.py.")
        lines += ["", f"## {name}/", "", intro, "", "| key | emitted by |", "|---|---|"]
        for m in members:
            where = ", ".join(f"`{w}`" for w in m.where.split(", "))
            note = f" ({cell(m.note)})" if m.note else ""
            lines.append(f"| `{m.key}`{note} | {where} |")
        functions = dict.fromkeys(w for m in members for w in m.where.split(", ") if w in DOCS)
        if functions:
            lines += ["", "From the docstrings of the code that emits them:", ""]
            lines += [f"- `{w}`: {cell(DOCS[w])}" for w in functions]
    return "\n".join(lines) + "\n"


PAGES = {"reference/configuration.md": configuration_page, "reference/metrics.md": metrics_page}

if __name__ == "__main__":
    print(PAGES[f"reference/{sys.argv[1]}.md"]())
