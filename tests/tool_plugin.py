"""A tool registered from outside the `rollout` package, the way a user's own module is: a run names it in
env.modules (as "tests.tool_plugin").

    reverse   the text, backwards
"""

from __future__ import annotations

from rollout.env.tools import register_tool


@register_tool()
def reverse(text: str) -> str:
    """Reverse a piece of text.

    Args:
        text: the text to reverse
    """
    return text[::-1]
