"""Tools and tool environments (rollout/env/tools.py, rollout/env/environment.py): schemas from signatures, the two tool-call
formats with malformed calls answered rather than raised, the calculator refusing anything but arithmetic, and
ToolEnv's limits (calls per turn, output truncation, timeouts) on the tiny model's tokenizer."""

from __future__ import annotations

import asyncio
import time

import pytest

from cispo.config import TinyModelConfig
from cispo.model.tiny_model import build_tokenizer
from rollout.env.environment import ENVS, Limits, ToolEnv, make_env, register_env
from rollout.env.tools import TOOLS, calculator, make_tool, parse_tool_calls, register_tool, tool_schema


def weather(city: str, days: int = 3, metric: bool | None = None, tags: list[str] | None = None) -> str:
    """Forecast for a city.

    More text that is not the description.

    Args:
        city: the city's name
        days (int): how many days ahead
    """
    return f"{city}: sunny for {days} days"


def test_schema_from_signature_and_docstring():
    assert tool_schema(weather) == {"type": "function", "function": {
        "name": "weather", "description": "Forecast for a city.",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "the city's name"},
            "days": {"type": "integer", "description": "how many days ahead"},
            "metric": {"type": "boolean"}, "tags": {"type": "array"}}}}}


TOOLS_HERE = {t.name: t for t in (make_tool(weather), make_tool(calculator))}
CALC = '{"name": "calculator", "arguments": {"expression": "1+2"}}'


@pytest.mark.parametrize("text, want", [
    ("no call, an answer: 3", []),
    (f"<tool_call>\n{CALC}\n</tool_call>", [("calculator", {"expression": "1+2"}, None)]),
    (f'think <tool_call>{CALC}</tool_call> and <tool_call>{{"name": "weather", "arguments": {{"city": "Oslo"}}}}'
     '</tool_call>', [("calculator", {"expression": "1+2"}, None), ("weather", {"city": "Oslo"}, None)]),
    ('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2\\"}"}</tool_call>',
     [("calculator", {"expression": "2"}, None)]),  # arguments as a JSON string (OpenAI's wire form)
    ("<tool_call>{not json}</tool_call>", [("", {}, "not valid JSON")]),
    ('<tool_call>{"arguments": {}}</tool_call>', [("", {}, "must be a JSON object")]),
    ('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', [("rm", {}, "unknown tool 'rm'")]),
    ('<tool_call>{"name": "weather", "arguments": [1]}</tool_call>', [("weather", {}, "must be a JSON object")]),
    ('<tool_call>{"name": "weather", "arguments": {"days": 2}}</tool_call>',
     [("weather", {"days": 2}, "missing argument(s) ['city']")]),
    ('<tool_call>{"name": "weather", "arguments": {"city": "x", "days": true}}</tool_call>',
     [("weather", {"city": "x", "days": True}, "'days' must be integer")]),
    ('<tool_call>{"name": "weather", "arguments": {"city": "x", "when": 1}}</tool_call>',
     [("weather", {"city": "x", "when": 1}, "unknown argument(s) ['when']")]),
    (f"<tool_call>{CALC}", [("", {}, "without </tool_call>")]),
])
def test_hermes_calls(text, want):
    got = parse_tool_calls(text, "hermes", TOOLS_HERE)
    assert [(c.name, c.arguments) for c in got] == [(n, a) for n, a, _ in want]
    for c, (_, _, err) in zip(got, want):
        assert (c.error is None) if err is None else (err in c.error), c.error


def test_minimax_calls_one_json_object_per_line():
    text = (f'Let me compute.\n<tool_calls>\n{CALC}\n\n{{"name": "weather", "arguments": {{"city": "Rome"}}}}\n'
            '{"name": oops}\n</tool_calls>')
    got = parse_tool_calls(text, "minimax", TOOLS_HERE)
    assert [(c.name, c.arguments, c.error) for c in got[:2]] == [
        ("calculator", {"expression": "1+2"}, None), ("weather", {"city": "Rome"}, None)]
    assert "not valid JSON" in got[2].error
    assert "empty" in parse_tool_calls("<tool_calls>\n</tool_calls>", "minimax", TOOLS_HERE)[0].error
    assert parse_tool_calls(f"<tool_call>{CALC}</tool_call>", "minimax", TOOLS_HERE) == []  # the other format
    with pytest.raises(ValueError, match="format"):
        parse_tool_calls("", "xml", TOOLS_HERE)


@pytest.mark.parametrize("expr, want", [("(3 + 4) * 12", "84"), ("7 / 2", "3.5"), ("-3 // 2", "-2"),
                                        ("2 ** 10 % 1000", "24"), ("1.5e3", "1500")])
def test_calculator_values(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("expr, why", [
    ("__import__('os').system('echo hi')", "unsupported"), ("x + 1", "unsupported"), ("(1).real", "unsupported"),
    ("[1] * 10", "unsupported"), ("'a' * 3", "unsupported"), ("True + 1", "unsupported"), ("1 / 0", "division"),
    ("9 ** 9 ** 9", "exponent"), ("(99 ** 99) ** 99", "digits"), ("1" * 201, "longer"), ("2 +", "not an"),
    ("(-8) ** 0.5", "real number"), ("lambda: 1", "unsupported"),
])
def test_calculator_refuses_everything_but_arithmetic(expr, why):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=why):
        calculator(expr)
    assert time.perf_counter() - start < 0.5


def test_tool_and_env_tables_take_additions():
    @register_tool("shout_test")
    def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper()

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_tool("shout_test")(weather)

        @register_env("shout_test")
        def shout_env(**options):
            return ToolEnv(["shout_test"], **options)

        env = make_env("shout_test")
        assert set(env.tools) == {"shout_test"}
        step = asyncio.run(env.step('<tool_call>{"name": "shout_test", "arguments": {"text": "hi"}}</tool_call>'))
        assert step.observation == [{"role": "tool", "name": "shout_test", "content": "HI"}] and not step.done
    finally:
        TOOLS.pop("shout_test", None)
        ENVS.pop("shout_test", None)
    with pytest.raises(ValueError, match="unknown environment 'nope'.*calculator"):
        make_env("nope")


def call(name: str, **args) -> str:
    import json

    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def test_tool_env_episode_answers_every_call_and_never_raises():
    seen = []
    env = make_env("calculator", reward=lambda text, row: seen.append((text, row)) or float("84" in text))
    first = asyncio.run(env.reset({"prompt": "What is (3 + 4) * 12?"}))
    assert [m["role"] for m in first] == ["system", "user"] and first[1]["content"] == "What is (3 + 4) * 12?"
    assert '"name": "calculator"' in first[0]["content"] and "<tool_call>" in first[0]["content"]
    step = asyncio.run(env.step(call("calculator", expression="3 + 4") + "\n<tool_call>{bad</tool_call>"
                                + call("calculator", expression="1/0") + call("calculator", expr="1")))
    assert not step.done and step.reward == 0.0
    assert [m["content"] for m in step.observation] == [
        "7", "error: the tool call is not valid JSON (Expecting property name enclosed in double quotes at char 1)",
        "error: ValueError: division by zero", "error: tool 'calculator': unknown argument(s) ['expr']; "
        "missing argument(s) ['expression']"]
    end = asyncio.run(env.step("The answer is 84."))
    assert end.done and end.reward == 1.0 and end.observation is None
    assert seen == [("The answer is 84.", {"prompt": "What is (3 + 4) * 12?"})]


def test_tool_env_limits():
    tok = build_tokenizer(TinyModelConfig().vocab_size)

    def long_text(n: int) -> str:
        """Many words."""
        return "step by step " * n

    def slow(seconds: float) -> str:
        """Sleep."""
        time.sleep(seconds)
        return "woke"

    async def slow_async(seconds: float) -> str:
        """Sleep without a thread."""
        await asyncio.sleep(seconds)
        return "woke"

    limits = Limits(max_calls_per_turn=2, max_output_tokens=10, tool_timeout_s=0.2)
    env = ToolEnv([long_text, slow, slow_async], limits=limits, tokenizer=tok)
    out = asyncio.run(env.step(call("long_text", n=100) + call("long_text", n=1) + call("long_text", n=1)))
    first, short, over = (m["content"] for m in out.observation)
    assert first.endswith("... [truncated]") and len(tok.encode(first.removesuffix("... [truncated]"))) <= 10
    assert short == "step by step " and over.startswith("error: at most 2 tool calls per turn")
    start = time.perf_counter()
    out = asyncio.run(env.step(call("slow", seconds=0.6) + call("slow_async", seconds=30.0)))
    assert [m["content"] for m in out.observation] == ["error: tool 'slow' timed out after 0.2 s",
                                                       "error: tool 'slow_async' timed out after 0.2 s"]
    assert time.perf_counter() - start < 3  # asyncio.run also waits for the abandoned thread (0.6 s)
    no_tok = ToolEnv([long_text], limits=limits)  # no tokenizer: 4 characters a token
    text = asyncio.run(no_tok.step(call("long_text", n=100))).observation[0]["content"]
    assert text == ("step by step " * 4)[:40] + "... [truncated]"


def test_env_modules_import_no_stack():
    import subprocess
    import sys

    code = ("import sys, rollout.env.environment, rollout.env.tools, rollout.env.render, rollout.trajectory; "
            "print(' '.join(m for m in ('torch', 'transformers', 'vllm', 'cispo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_tool_env_counts_calls_errors_and_seconds_per_tool():
    def nap(seconds: float) -> str:
        """Sleep."""
        time.sleep(seconds)
        return "ok"

    env = ToolEnv(["calculator", nap], limits=Limits(max_calls_per_turn=3))
    asyncio.run(env.step(call("calculator", expression="1+1") + call("calculator", expression="1/0")
                         + call("nap", seconds=0.2) + call("calculator", expression="2")))  # the 4th is over the cap
    asyncio.run(env.step(call("nope") + "<tool_call>{bad</tool_call>"))
    s = env.stats
    assert s.calls == {"calculator": 3, "nap": 1, "invalid": 2}
    assert s.errors == {"calculator": 2, "nap": 0, "invalid": 2}  # 1/0, the one over the cap; unknown, bad JSON
    assert 0.2 <= s.seconds["nap"] < 1.0 and s.seconds["calculator"] < 0.2


def test_tool_env_prompt_from_chat_messages_and_without_tool_descriptions():
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2*3?"}]}
    described = asyncio.run(make_env("calculator", system_prompt="You can call the calculator.").reset(row))
    assert [m["role"] for m in described] == ["system", "user"] and described[1]["content"] == "What is 2*3?"
    assert described[0]["content"].startswith("Be brief.\n\nYou can call the calculator.\n\n# Tools")
    bare = asyncio.run(make_env("calculator", describe_tools=False).reset({"prompt": "What is 2*3?"}))
    assert bare == [{"role": "user", "content": "What is 2*3?"}]


@pytest.mark.parametrize("fmt", ["hermes", "minimax"])
def test_calls_written_in_a_format_parse_back(fmt):
    from rollout.env.tools import format_tool_calls

    calls = [("calculator", {"expression": "3 * 4"}), ("calculator", {"expression": "7"})]
    parsed = parse_tool_calls("Let me compute.\n" + format_tool_calls(calls, fmt), fmt, TOOLS)
    assert [(c.name, c.arguments, c.error) for c in parsed] == [(n, a, None) for n, a in calls]
