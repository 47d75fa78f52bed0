"""mergeng: merge models weight by weight under a RAM budget.

The repository root is the `mergeng` package: engine/, methods/, architectures/, cli/ and
configs/ install as mergeng.engine, mergeng.methods, ... (see pyproject.toml).
"""

__version__ = "0.1.0"
