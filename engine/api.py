"""The Python API: `mergeng.merge(recipe, out, ram=...)` and `mergeng.plan(recipe, ram=...)`.

A recipe is a path (a `pathlib.Path`, or a `str` without a newline), YAML text (a `str` with a
newline), a dict, or a list of dicts (a multi-stage recipe's documents, as `---`-separated YAML). Model paths in a recipe file are relative to its folder first, then to the
working directory; in text or a dict, to the working directory. Options take the CLI's names
with underscores (`shard_size`, `workers`, `seed`, `strict`, `truncate_vocab`, `allow_crimes`,
`copy_tokenizer`, `write_model_card`, `fresh`, `max_unit`, `stream`, `trust_remote_code`: let
transformers run code a model carries) or mergekit's `MergeOptions` names
(`out_shard_size`, `random_seed`, `unsafe_truncate_embeddings`, `cuda`, ...) with the same
meaning as on the command line; an unknown option is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MergeError

ALIASES = {"out_shard_size": "shard_size", "random_seed": "seed", "unsafe_truncate_embeddings": "truncate_vocab"}
PLAN_OPTIONS = {"shard_size", "workers", "max_unit", "seed", "strict", "truncate_vocab", "allow_crimes", "stream",
                "trust_remote_code"}
MERGE_OPTIONS = PLAN_OPTIONS | {"fresh", "copy_tokenizer", "write_model_card", "space_check"}


def plan(recipe: str | Path | dict, ram: int | str | None = None, **options: Any):
    """Validate and schedule a merge, reading headers only; returns `engine.run.Prepared`:
    `.plan` (tasks, sources, warnings, report), `.schedule` (`predicted_peak`, `budget`,
    `feasible`), `.layout` (output shards) and `.recipe_text`."""
    from .inputs.remote_code import trusting_remote_code

    with trusting_remote_code(bool(options.get("trust_remote_code", False))):
        prepared, _ = _prepare(recipe, ram, options, PLAN_OPTIONS)
    return prepared


def merge(recipe: str | Path | dict, out: str | Path, ram: int | str | None = None, **options: Any) -> dict:
    """Run a merge into `out` (resuming an interrupted run of the same recipe); returns the run's
    figures, as in `OUT/.mergeng/profile.json`: peak_rss_bytes, predicted_peak_bytes,
    ram_budget_bytes, resumed, units_total, units_run, timeline, ..."""
    from .inputs.remote_code import trusting_remote_code
    from .run import run_merge

    with trusting_remote_code(bool(options.get("trust_remote_code", False))):
        prepared, given = _prepare(recipe, ram, options, MERGE_OPTIONS, out)
        return run_merge(prepared, Path(out), given.get("fresh", False), copy_tokenizer=given.get("copy_tokenizer", True),
                         write_model_card=given.get("write_model_card", True), space_check=given.get("space_check", True))


def _prepare(recipe, ram, options: dict, allowed: set[str], out: str | Path | None = None):
    from .execute.prepared import default_workers
    from .inputs.hub import HubOptions
    from .recipe.mergekit_flags import MergekitFlags, parse_shard_size
    from .schedule.memory import parse_size
    from .run import prepare_recipe, prepare_stages
    from .schedule.scheduler import MAX_UNIT_BYTES
    from .output.writer import DEFAULT_SHARD_SIZE

    given: dict[str, Any] = {}
    flags = {}
    for name, value in options.items():
        key = ALIASES.get(name, name)
        if key in allowed:
            given[key] = value
        elif key in MergekitFlags.__dataclass_fields__:
            flags[key] = value
        else:
            raise MergeError(f"option '{name}': unknown (options: {', '.join(sorted(allowed | set(ALIASES)))})")
    mergekit = MergekitFlags(**flags)
    mergekit.check()  # cuda=True, device="cuda", ... are refused as on the command line
    from .run import hub_pins

    hub = HubOptions(mergekit.transformers_cache, bool(given.get("stream", False)), hub_pins(out) if out is not None and not given.get("fresh") else {})
    shard_size = given.get("shard_size", DEFAULT_SHARD_SIZE)
    max_unit = given.get("max_unit", MAX_UNIT_BYTES)
    parsed, text, folder = load_recipe_input(recipe)
    prepare = prepare_stages if isinstance(parsed, list) else prepare_recipe
    prepared = prepare(
        parsed, text, folder, parse_size(ram, "ram") if isinstance(ram, str) else ram,
        parse_shard_size(shard_size) if isinstance(shard_size, str) else shard_size,
        given["workers"] if given.get("workers") is not None else default_workers(bool(given.get("stream", False))),
        parse_size(max_unit, "max_unit") if isinstance(max_unit, str) else max_unit,
        seed=given.get("seed"), strict=given.get("strict", False), truncate_vocab=given.get("truncate_vocab", False),
        allow_crimes=given.get("allow_crimes", False), hub=hub)
    return prepared, given


def load_recipe_input(recipe: str | Path | dict | list):
    """(Recipe, or a multi-stage recipe's stages; its YAML text; the folder model paths are relative to first)."""
    import yaml

    from .recipe.load import parse_recipe
    from .builders.stages import is_multi_stage, read_stages

    folder = None
    if isinstance(recipe, (dict, list)):  # a list of dicts: a multi-stage recipe's documents
        if isinstance(recipe, list) and not all(isinstance(d, dict) for d in recipe):
            raise MergeError("recipe: a list must hold one dict per stage (a multi-stage recipe's documents)")
        text = yaml.safe_dump(recipe, sort_keys=False) if isinstance(recipe, dict) else yaml.safe_dump_all(recipe, sort_keys=False)
        origin = f"recipe {type(recipe).__name__}"
    elif isinstance(recipe, str) and "\n" in recipe:
        text, origin = recipe, "recipe text"
    elif isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if path.is_dir():
            raise MergeError(f"recipe {path} is a folder; give the path of the recipe's YAML file")
        if not path.is_file():
            raise MergeError(f"recipe not found: {path} (a recipe is a path, YAML text with a newline, or a dict)")
        text, origin, folder = path.read_text(), str(path), path.parent
    else:
        raise MergeError(f"recipe: expected a path, YAML text, a dict or a list of dicts, got {type(recipe).__name__}")
    if is_multi_stage(text):
        return read_stages(text, origin), text, folder
    return parse_recipe(text, origin), text, folder
