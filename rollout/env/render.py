"""Token-exact turns: the tokens an environment appends at a turn boundary, from the model's own chat template.

Generated ids are never re-encoded. After a model turn the trajectory gets, as environment tokens, exactly what
the chat template puts between the end of the assistant's content and the start of the next assistant's content.
For ChatML (Qwen, SmolLM2, the tiny model) and a Qwen-style tool message that is

    <|im_end|>\\n<|im_start|>user\\n<tool_response>\\n...\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n

less what the engine already generated: the stop token `<|im_end|>` when the turn ended on it. A turn cut by
max_tokens did not emit it, so the environment closes that turn with it.

`TemplateRenderer` derives both halves from the tokenizer's template by rendering placeholder conversations:
  close   = what follows the assistant content in [user, assistant]                    e.g. "<|im_end|>\\n"
  opening = render([user, assistant] + tool msgs, generation prompt) minus render([user, assistant])
The boundary text `close (less the stop token's text, when generated) + opening` is encoded on its own. That is
exact when the template renders a conversation as the concatenation of its messages (prefix-stable) and the
text boundaries fall on special tokens. `check_renderer` proves both on a short tool conversation against
`apply_chat_template` of the whole, and names the template when they fail. Templates that rewrite earlier turns
(Qwen3 drops the <think> part of all but the last assistant turn) fail the check by design: a trajectory keeps
what the model saw, which such a template would not show it at inference. Register another renderer then.

`RENDERERS` maps a name to a factory `(tokenizer) -> renderer`; "template" is the built-in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rollout.env.tools import format_tool_calls

_USER = {"role": "user", "content": "ping"}
_MARK = "\x00ASSISTANT\x00"  # placeholder content, found again in the rendered text


@dataclass
class TemplateRenderer:
    tokenizer: object
    stop_id: int | None = None  # the token a finished turn ends with (default: the tokenizer's EOS)
    _close: str = field(init=False, default="")

    def __post_init__(self):
        if self.stop_id is None:
            self.stop_id = self.tokenizer.eos_token_id
        head = self._text([_USER, {"role": "assistant", "content": _MARK}])
        if _MARK not in head:
            raise ValueError(f"chat template {self.name}: the assistant's content does not appear verbatim "
                             "in its rendering; register a renderer for it (rollout.env.render.RENDERERS)")
        self._close = head.split(_MARK, 1)[1]

    @property
    def name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__

    def _text(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, messages: list[dict]) -> list[int]:
        """The prompt ids of a conversation's first messages, with the assistant's generation prompt."""
        return self.encode(self._text(messages, generation_prompt=True))

    def turn_boundary(self, generated: list[int], observation: list[dict]) -> list[int]:
        """Environment ids to append after the generated ids of a turn, showing `observation` (messages) and
        opening the next assistant turn."""
        base = [_USER, {"role": "assistant", "content": _MARK}]
        before, after = self._text(base), self._text(base + list(observation), generation_prompt=True)
        if not after.startswith(before):
            raise ValueError(f"chat template {self.name}: adding messages changes the rendering of the earlier ones "
                             "(not prefix-stable); register a renderer for it (rollout.env.render.RENDERERS)")
        close = self._close
        if generated and generated[-1] == self.stop_id:
            stop_text = self.tokenizer.decode([self.stop_id])
            if not close.startswith(stop_text):
                raise ValueError(f"chat template {self.name}: the turn ends on {stop_text!r}, which the template "
                                 f"does not put after an assistant message ({close!r})")
            close = close[len(stop_text):]
        return self.encode(close + after[len(before):])

    def closing(self, generated: list[int]) -> list[int]:
        """What the template puts after the last assistant turn (to compare a trajectory with a rendering)."""
        stop_text = self.tokenizer.decode([self.stop_id])
        ended = bool(generated) and generated[-1] == self.stop_id
        return self.encode(self._close[len(stop_text):] if ended else self._close)


RENDERERS: dict[str, Callable[[object], object]] = {"template": TemplateRenderer}


def make_renderer(tokenizer, name: str = "template"):
    if name not in RENDERERS:
        raise ValueError(f"unknown renderer {name!r}: the registered ones are {sorted(RENDERERS)}")
    return RENDERERS[name](tokenizer)


def self_test_conversation(fmt: str = "hermes") -> list[dict]:
    """A short tool conversation, its calls in `fmt`'s syntax (rollout.env.tools.FORMATS): reasoning in <think> tags and
    one call, then a turn of text and two calls answered by two results in a row, then the answer. (The reasoning
    catches templates that drop the <think> part of earlier turns, as Qwen3's does.)"""
    def calc(expression: str) -> tuple[str, dict]:
        return "calculator", {"expression": expression}

    return [
        {"role": "system", "content": "You can use tools."},
        {"role": "user", "content": "What is (3 + 4) * 12?"},
        {"role": "assistant", "content": "<think>The sum first.</think>\n" + format_tool_calls([calc("3 + 4")], fmt)},
        {"role": "tool", "name": "calculator", "content": "7"},
        {"role": "assistant", "content": "Now times 12.\n" + format_tool_calls([calc("7 * 12"), calc("84")], fmt)},
        {"role": "tool", "name": "calculator", "content": "84"},
        {"role": "tool", "name": "calculator", "content": "84"},
        {"role": "assistant", "content": "The answer is 84."},
    ]


SELF_TEST_CONVERSATION = self_test_conversation("hermes")


def check_renderer(renderer, tokenizer, conversation: list[dict] = SELF_TEST_CONVERSATION) -> list[int]:
    """Render `conversation` turn by turn as a rollout would (prompt, each assistant turn as generated ids ending
    in the stop token, the environment's boundary ids after it) and require the ids to equal
    `apply_chat_template` of the whole conversation. Returns the ids; ValueError naming the template if not."""
    first = next(k for k, m in enumerate(conversation) if m["role"] == "assistant")
    ids = renderer.prompt(conversation[:first])
    k, generated = first, []
    while k < len(conversation):
        generated = renderer.encode(conversation[k]["content"]) + [renderer.stop_id]
        ids += generated
        k += 1
        observation = []
        while k < len(conversation) and conversation[k]["role"] != "assistant":
            observation.append(conversation[k])
            k += 1
        if observation and k < len(conversation):
            ids += renderer.turn_boundary(generated, observation)
    ids += renderer.closing(generated)
    whole = tokenizer.encode(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)
    if ids != whole:
        at = next((i for i, (a, b) in enumerate(zip(ids, whole)) if a != b), min(len(ids), len(whole)))
        raise ValueError(
            f"chat template of {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}: the turn-by-turn "
            f"ids differ from apply_chat_template of the whole conversation at token {at} (turn by turn "
            f"{tokenizer.decode(ids[at:at + 12])!r}, whole {tokenizer.decode(whole[at:at + 12])!r}); multi-turn "
            "rollouts with this template would train on contexts the model never sees. Register a renderer for it "
            "(rollout.env.render.RENDERERS).")
    return ids
