"""Where the CLI writes, and how a failure becomes one line and an exit code.

`out` (stdout) carries results a user may pipe (tables, JSON, dot); `console` (stderr) carries
notes, warnings, progress and errors. `fail` is the one error policy of every command: a
MergeError prints one red line and exits with its code (2 bad input, 1 failed while working),
an OSError the machine raised prints one line and exits 1, anything else is a bug: one line
naming it, exit 1, and the traceback only with --debug. Imports nothing of the commands.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import MergeError

console = Console(stderr=True)
out = Console()


def fail(e: BaseException, debug: bool) -> None:
    if debug or isinstance(e, typer.Exit):
        raise e
    if isinstance(e, MergeError):
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)  # e.g. 'mergeng[ray]' is text
        raise typer.Exit(e.exit_code)
    if isinstance(e, OSError) and e.strerror:  # the machine said no (permissions, a full or read-only disk)
        where = f"{e.filename}: " if e.filename else ""
        console.print(f"[red]error:[/red] {where}{e.strerror}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[red]internal error:[/red] {type(e).__name__}: {e} (run again with --debug for the traceback)", highlight=False, soft_wrap=True)
    raise typer.Exit(1)
