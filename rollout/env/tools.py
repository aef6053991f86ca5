"""Tools for multi-turn rollouts: typed Python functions, their JSON schemas, and the parsing of tool calls.

A tool is a plain (sync or async) function with type hints and a docstring; `tool_schema` turns its signature
into the OpenAI-style function schema that goes into the system prompt (`tools_system_prompt`). `TOOLS` is the
table a run looks tools up in: `@register_tool()` adds one from any module (built in: the calculator, here, and
`python`, a program run in the code grader's sandbox, rollout/env/python_tool.py).

Tool calls are parsed from the assistant's text in one of two formats (`parse_tool_calls`):
  hermes   Hermes / Qwen2.5 / Qwen3: each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
           several blocks per message allowed
  minimax  MiniMax-M1: one `<tool_calls>...</tool_calls>` block holding one JSON object per line
A malformed call (bad JSON, no name, unknown tool, arguments that do not fit the schema, an unclosed tag) becomes
a ToolCall with `error` set: the environment answers it with that message, nothing raises.

Decisions: `arguments` may also be a JSON string holding an object (OpenAI's wire form); a missing `arguments`
is {}. Argument types are checked shallowly (JSON type of each top-level argument), bool is not an integer.
The calculator evaluates + - * / // % ** and unary signs on numbers by walking `ast` (no eval); exponents above
MAX_EXPONENT , results beyond MAX_DIGITS digits and expressions longer than 200 characters are
refused, so no call can take unbounded time or memory.
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

FORMATS = ("hermes", "minimax")
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
PY_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
            "object": (dict,)}


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)
    error: str | None = None  # set: the call is malformed and is answered with this message


TOOLS: dict[str, Tool] = {}


def register_tool(name: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator: add `fn` to TOOLS under `name` (default: the function's name)."""

    def register(fn: Callable) -> Callable:
        tool = make_tool(fn, name)
        if TOOLS.get(tool.name, tool).fn is not fn:
            raise ValueError(f"a tool named {tool.name!r} is already registered ({TOOLS[tool.name].fn.__qualname__})")
        TOOLS[tool.name] = tool
        return fn

    return register


def make_tool(fn: Callable, name: str | None = None) -> Tool:
    schema = tool_schema(fn)
    if name:
        schema["function"]["name"] = name
    return Tool(schema["function"]["name"], fn, schema)


def tool_schema(fn: Callable) -> dict:
    """The function schema of `fn` from its signature and docstring: the docstring's first paragraph is the
    description; lines `name: text` under an `Args:` heading describe the parameters. A parameter without a
    default is required; `X | None` is typed as X."""
    hints = typing.get_type_hints(fn)
    doc = inspect.getdoc(fn) or ""
    head, _, args_doc = doc.partition("Args:")
    described = dict(re.findall(r"^\s*(\w+)\s*(?:\([^)]*\))?:\s*(.+)$", args_doc, re.M))
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        prop = {"type": _json_type(hints.get(p.name, str))}
        if p.name in described:
            prop["description"] = described[p.name].strip()
        properties[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    description = " ".join(head.strip().split("\n\n")[0].split())
    return {"type": "function", "function": {
        "name": fn.__name__, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


def _json_type(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    return JSON_TYPES.get(typing.get_origin(hint) or hint, "string")


def check_arguments(tool: Tool, arguments: dict) -> str | None:
    """None when `arguments` fits the tool's schema, else what is wrong (for the model to read)."""
    params = tool.schema["function"]["parameters"]
    unknown = sorted(set(arguments) - set(params["properties"]))
    missing = [k for k in params["required"] if k not in arguments]
    if unknown or missing:
        problems = [f"unknown argument(s) {unknown}"] if unknown else []
        problems += [f"missing argument(s) {missing}"] if missing else []
        return f"tool {tool.name!r}: " + "; ".join(problems)
    for key, value in arguments.items():
        want = params["properties"][key]["type"]
        if not isinstance(value, PY_TYPES[want]) or (isinstance(value, bool) and want in ("integer", "number")):
            return f"tool {tool.name!r}: argument {key!r} must be {want}, got {type(value).__name__}"
    return None


def parse_tool_calls(text: str, fmt: str, tools: dict[str, Tool]) -> list[ToolCall]:
    """The tool calls in one assistant message, in order; [] when there are none (the message is an answer)."""
    if fmt == "hermes":
        open_tag, close_tag, per_line = "<tool_call>", "</tool_call>", False
    elif fmt == "minimax":
        open_tag, close_tag, per_line = "<tool_calls>", "</tool_calls>", True
    else:
        raise ValueError(f"tool-call format must be one of {FORMATS}, got {fmt!r}")
    calls = []
    for block in re.split(re.escape(open_tag), text)[1:]:
        body, closed, _ = block.partition(close_tag)
        if not closed:
            calls.append(ToolCall("", error=f"{open_tag} without {close_tag}"))
            continue
        items = [line for line in body.splitlines() if line.strip()] if per_line else [body]
        calls += [_parse_one(item, tools) for item in items] or [ToolCall("", error=f"empty {open_tag} block")]
    return calls


def _parse_one(item: str, tools: dict[str, Tool]) -> ToolCall:
    try:
        obj = json.loads(item)
    except json.JSONDecodeError as err:
        return ToolCall("", error=f"the tool call is not valid JSON ({err.msg} at char {err.pos})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall("", error='a tool call must be a JSON object {"name": ..., "arguments": {...}}')
    name, args = obj["name"], obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return ToolCall(name, error=f"tool {name!r}: arguments must be a JSON object")
    if name not in tools:
        return ToolCall(name, args, error=f"unknown tool {name!r}; the tools are {sorted(tools)}")
    return ToolCall(name, args, error=check_arguments(tools[name], args))


def format_tool_calls(calls: list[tuple[str, dict]], fmt: str) -> str:
    """(name, arguments) calls written in `fmt`'s syntax, as a model would write them; parse_tool_calls reads
    them back."""
    objects = [json.dumps({"name": name, "arguments": args}, ensure_ascii=False) for name, args in calls]
    if fmt == "hermes":
        return "\n".join(f"<tool_call>\n{obj}\n</tool_call>" for obj in objects)
    if fmt == "minimax":
        return "<tool_calls>\n" + "\n".join(objects) + "\n</tool_calls>"
    raise ValueError(f"tool-call format must be one of {FORMATS}, got {fmt!r}")


def tools_system_prompt(tools: list[Tool], fmt: str) -> str:
    """Instructions and schemas for the system message (Hermes' wording; MiniMax-M1's call syntax for minimax)."""
    schemas = "\n".join(json.dumps(t.schema, ensure_ascii=False) for t in tools)
    call = '{"name": <function-name>, "arguments": <args-json-object>}'
    how = (f"For each function call, return a json object with function name and arguments within "
           f"<tool_call></tool_call> XML tags:\n<tool_call>\n{call}\n</tool_call>" if fmt == "hermes" else
           f"To call functions, write one json object per line within <tool_calls></tool_calls> XML tags:\n"
           f"<tool_calls>\n{call}\n...\n</tool_calls>")
    return (f"# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
            f"function signatures within <tools></tools> XML tags:\n<tools>\n{schemas}\n</tools>\n\n{how}")


# --- the calculator -------------------------------------------------------------------------------------------

MAX_EXPONENT = 100
MAX_DIGITS = 1000  # no intermediate value may exceed 10**MAX_DIGITS in magnitude
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def safe_arithmetic(expression: str) -> int | float:
    """The value of an arithmetic expression on int/float literals; ValueError for anything else."""
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression ({err.msg})") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
            if abs(left) > 1 and right * math.log10(abs(left)) > MAX_DIGITS:
                raise ValueError(f"the result would have more than {MAX_DIGITS} digits")
        try:
            value = _BINARY[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as err:
            raise ValueError(str(err)) from None
        if isinstance(value, complex):
            raise ValueError("the result is not a real number")
        if isinstance(value, int) and value.bit_length() > MAX_DIGITS * 3.33:
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")
        return value
    raise ValueError(f"unsupported syntax: {ast.dump(node)[:60]}")


@register_tool()
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (+ - * / // % ** and parentheses) and return its value.

    Args:
        expression: the expression, e.g. "(3 + 4) * 12"
    """
    value = safe_arithmetic(expression)
    return str(int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**53 else value)

