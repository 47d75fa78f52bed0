"""mergeng: merge models weight by weight under a RAM budget.

The repository root is the `mergeng` package: engine/, methods/, architectures/, cli/ and
configs/ install as mergeng.engine, mergeng.methods, ... (see pyproject.toml).

Python API (engine/api.py; imported on first use, so `import mergeng` stays light):

    import mergeng
    prepared = mergeng.plan("configs/linear.yml", ram="2G")     # headers only
    figures = mergeng.merge("configs/linear.yml", "merged/linear", ram="2G", shard_size="500M")
"""

# absolute, not relative: test runners import this file under its folder's name (e.g. "main"), or
# as a bare `__init__` when that name is not an identifier; `mergeng` itself is always installed
from mergeng.version import __version__

__all__ = ["merge", "plan", "__version__"]


def merge(recipe, out, ram=None, **options) -> dict:
    """Merge `recipe` (a path, YAML text or a dict) into the folder `out` within `ram` (e.g. "2G")
    and return the run's figures (peak_rss_bytes, predicted_peak_bytes, ...). See engine/api.py."""
    from .engine.api import merge as _merge

    return _merge(recipe, out, ram, **options)


def plan(recipe, ram=None, **options):
    """Validate and schedule `recipe` without reading weights; returns engine.run.Prepared
    (.plan, .schedule.predicted_peak, .schedule.feasible, .layout). See engine/api.py."""
    from .engine.api import plan as _plan

    return _plan(recipe, ram, **options)
