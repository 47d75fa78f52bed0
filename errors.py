"""The one exception type users see, shared by every layer (methods/, architectures/, engine/, cli/).

Anything the user can fix (a recipe field, a model path, a budget) raises `MergeError` with a
one-line message naming what to fix. The CLI prints it in red and exits 2 (bad input) or 1
(failed while working); any other exception is a bug and shows a traceback only with --debug.

It lives at the package root, beside nothing else, so that methods/ and architectures/ can
raise it without depending on engine/. Invariant: this module imports nothing of mergeng, and it
is the only errors module (one class, so one `except MergeError` catches all).
"""


class MergeError(Exception):
    """A problem the user can fix; `exit_code` 2 for bad input, 1 for a failure while running.

    The message is one line whatever it quotes: a control character (a newline in a recipe key or a
    file's JSON) is shown escaped, as Python writes it in a string (`\\n`)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(one_line(str(message)))
        self.exit_code = exit_code


def one_line(message: str) -> str:
    """`message` with its control characters escaped (warnings use it too)."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)
