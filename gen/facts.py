"""Key facts in the banks: the short literal strings a correct answer must contain.

A fact is one or more alternatives separated by "|" ("pralidoxime | 2-PAM | oxime"),
matched as eval scores them (minidpo.eval.facts: normalised, case-insensitive substrings).
Family banks (families.py) and legitimate compounds (seed.py) carry 1-3 facts each, and
every fact must be stated by the bank's own answer (or the compound's outline), so a
reference answer always scores full recall.
"""

from __future__ import annotations

from typing import Any

MAX_FACTS = 3

# minidpo.eval is imported on use: its package imports gen/seed.py, which imports this module.


def states(text: str, fact: str) -> bool:
    """True when `text` states `fact` as the evaluation counts it."""
    from minidpo.eval.facts import facts_found

    return facts_found(text, [fact])[0]


def key_facts_problem(facts: Any, text: str, where: str) -> str | None:
    """Why `facts` is not a valid key-fact list stated by `text` ("where" names it), or None."""
    from minidpo.eval.facts import alternatives

    if not isinstance(facts, list) or not 1 <= len(facts) <= MAX_FACTS:
        return f'"key_facts" must be a list of 1 to {MAX_FACTS} strings'
    for i, fact in enumerate(facts):
        if not isinstance(fact, str) or not alternatives(fact):
            return f'"key_facts"[{i}] must be a non-empty string (alternatives separated by "|")'
        if not states(text, fact):
            return f'"key_facts"[{i}] {fact!r} is not stated in {where}'
    return None
