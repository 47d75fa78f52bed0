"""Whether code that came with a model may run: only when the user says `--trust-remote-code`.

A model folder may carry Python (`auto_map` in config.json or tokenizer_config.json names
`module.Class`, a `module.py` next to it). mergeng itself never imports it; transformers would,
when asked to load such a tokenizer or config with `trust_remote_code=True`. Every place the
engine calls transformers' `from_pretrained` passes `trust_remote_code=remote_code_trusted()`,
which is False unless a command (or `mergeng.merge(..., trust_remote_code=True)`) entered
`trusting_remote_code(True)` around its work. Invariant: the default is False, in every thread;
nothing an input says can turn it on.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_trusted = False


def remote_code_trusted() -> bool:
    return _trusted


@contextmanager
def trusting_remote_code(trust: bool) -> Iterator[None]:
    """Run a command's work with the user's --trust-remote-code choice (restored afterwards)."""
    global _trusted
    before, _trusted = _trusted, bool(trust)
    try:
        yield
    finally:
        _trusted = before
