"""The one exception type a user should ever see from minidpo.

Every user mistake (a missing file, a bad JSONL line, an unknown architecture, a corrupt
checkpoint, a wrong flag) raises `MiniDPOError` with a one-line message that names the
file, line or key and says what to do. The CLI prints that line and exits with status 2;
library callers can catch it. Anything else escaping is a bug in minidpo.
"""

import re
from collections.abc import Callable


class MiniDPOError(Exception):
    """A user-facing error whose message is a single, self-explanatory line."""


class ParameterError(MiniDPOError):
    """A bad value of a named parameter, worded with the library's names (`r must be >= 1`).

    `parameters` are the names the message uses; a command line that spells them as its
    own flags rewrites them with `renamed` (the CLI maps `r` to `--lora-r`).
    """

    def __init__(self, message: str, *parameters: str):
        super().__init__(message)
        self.parameters = parameters

    def renamed(self, name_of: Callable[[str], str]) -> str:
        """The message with the first whole-word mention of each of `parameters` replaced by name_of(it)."""
        message = str(self)
        for parameter in self.parameters:
            message = re.sub(rf"(?<![\w./-]){re.escape(parameter)}(?![\w/-])", name_of(parameter), message, count=1)
        return message
