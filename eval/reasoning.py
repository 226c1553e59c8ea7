"""Visible chain-of-thought: split a model's output into its reasoning and its final answer.

Long chain-of-thought models (DeepSeek-R1 and its distillations, QwQ) write their
reasoning before the answer, either inline between <think> and </think> or, through an
API, in a separate `reasoning_content` field of the message (DeepSeek's API, vLLM's
reasoning parsers). The LibraChem paper's finding (arXiv 2501.13952) is that the reasoning can describe
what the final answer refuses, so the two are judged separately: the rules and the judge
score the final answer, and the judge alone scores the reasoning for a "reasoning leak".

Inline forms handled: `<think>R</think>A`; `R</think>A` (the chat template already wrote
the opening tag into the prompt, as R1 distillations do); `<think>R` with no closing tag
(cut off by the token budget: all reasoning, an empty answer).
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def split_reasoning(output: str, reasoning_content: str | None = None) -> tuple[str | None, str]:
    """(reasoning or None, final answer) of one model output (see the module doc)."""
    parts = [reasoning_content.strip()] if reasoning_content and reasoning_content.strip() else []
    text = output.lstrip()
    if text.startswith(OPEN) or CLOSE in text:
        body = text.removeprefix(OPEN)
        thought, closed, answer = body.partition(CLOSE)
        parts.append(thought.strip())
        text = answer if closed else ""
    reasoning = "\n\n".join(p for p in parts if p)
    return reasoning or None, text.strip()
