"""The package version, in a module of its own.

Anything that stamps the version (`mergeng --version`, the resume fingerprint, the MoE routers'
digest) reads it from here, never from the package root: the root's `merge`/`plan` wrappers
import engine/api.py, so an engine module importing the root would close a cycle.
Invariant: this module imports nothing; pyproject.toml's `version` says the same number.
"""

__version__ = "0.1.0"
