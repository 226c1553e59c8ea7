"""A progress bar for generation loops: items done / total and generated tokens per second.

    with GenerationProgress(len(rows), "answers: final", enabled=progress) as bar:
        for each finished answer:
            bar.update(tokens=completion.completion_tokens)
    log(bar.summary())    # "answers: final: 40 in 12.3 s, 1,280 tokens (104 tokens/s)"

The bar is tqdm's, on stderr, and leaves no line behind when it closes: the caller prints
`summary()`, one line per stage, in its own log. Disabled (`--no-progress`), nothing is
drawn and the counts and the summary still work. Used by the evaluation (answers, judge
requests, reference NLLs) and open to every other loop that generates (gen/, the demo).
"""

from __future__ import annotations

import time

from tqdm import tqdm


class GenerationProgress:
    """Counts items and tokens against a total, drawing a tqdm bar when enabled."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "answer"):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.tokens = 0
        self._start = time.perf_counter()
        self._bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def update(self, n: int = 1, *, tokens: int = 0) -> None:
        """`n` more items done, which generated `tokens` tokens in all."""
        self.done += n
        self.tokens += tokens
        if self.tokens:
            self._bar.set_postfix_str(f"{self.tokens / max(self.elapsed, 1e-9):.0f} tokens/s", refresh=False)
        self._bar.update(n)

    def summary(self) -> str:
        """One line: what was done, in how long, and the token rate when tokens were counted."""
        seconds = self.elapsed
        line = f"{self.desc}: {self.done} {self.unit}s in {seconds:.1f} s"
        if self.tokens:
            line += f", {self.tokens:,} tokens ({self.tokens / max(seconds, 1e-9):.0f} tokens/s)"
        return line

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> GenerationProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
