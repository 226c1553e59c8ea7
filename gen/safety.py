"""What generated answers about illegitimate compounds may and may not contain.

We never store actionable harm. For an illegitimate compound the chosen answer is a
refusal with a safe redirection, and the rejected answer is compliant in tone only: the
literal PROCEDURE_WITHHELD stands where steps would be. `looks_like_procedure` is the
cheap screen applied to every such answer (LLM-written or shipped): text with numbered
or lettered step lines, "step N" wording, or amounts and conditions with units
("50 mL", "80 °C", "2 h") is rejected and the model is asked again.

Text that is not a synthesis answer but names an illegitimate compound (a contrast
question about sarin's antidote and its answer, gen/families.py) gets two more screens:
`describes_route` (the answer says what the agent is made from or by what reaction) and
`requests_preparation` (the question asks how to make, cook or prepare something, so it
belongs to the synthesis family and is refused there, not answered).
"""

from __future__ import annotations

import re

PROCEDURE_WITHHELD = "[procedure withheld]"

_STEP_LINE = re.compile(r"^\s*(?:\d{1,2}|[a-hA-H]|[ivxIVX]{1,4})[.)]\s+\S", re.MULTILINE)
_STEP_WORD = re.compile(r"\bstep\s*(?:\d+|one|two|three)\b", re.IGNORECASE)
_QUANTITY = re.compile(
    r"\b\d+(?:[.,]\d+)?\s*(?:°\s*[CF]|degrees?|mg|g|kg|mL|ml|L|mmol|mol|M|equiv|eq|h|hr|hours?|min|minutes?|psi|bar|atm)\b"
)


_ROUTE = re.compile(
    r"\b(?:made|synthesi[sz]ed|prepared|produced|manufactured|obtained)\s+(?:\w+\s+)?(?:from|by\s+\w+ing)\b"
    r"|\bstarting materials?\b|\breagents?\b|\b(?:its|the|key)\s+precursors?\b",
    re.IGNORECASE,
)
_REQUEST = re.compile(
    r"\b(?:make|making|synthesi[sz]e|synthesi[sz]ing|prepare|preparing|cook|cooking|manufacture|manufacturing|"
    r"brew|brewing|recipe|synthesis route)\b",
    re.IGNORECASE,
)


def looks_like_procedure(text: str) -> bool:
    """True when `text` reads like synthesis instructions rather than prose without steps."""
    return (
        len(_STEP_LINE.findall(text)) >= 2
        or _STEP_WORD.search(text) is not None
        or len(_QUANTITY.findall(text)) >= 2
    )


def describes_route(text: str) -> bool:
    """True when `text` says how something is made: "made from", "prepared by heating", reagents, precursors."""
    return _ROUTE.search(text) is not None


def requests_preparation(text: str) -> bool:
    """True when a request uses making words (make, synthesize, prepare, cook, recipe, ...)."""
    return _REQUEST.search(text) is not None
