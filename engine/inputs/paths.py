"""Where a folder a recipe names lies: the one rule for model and LoRA adapter paths.

An absolute path is taken as it is; a relative one is looked up beside the recipe (relative to
its folder) first, then in the working directory. A relative path that names a folder in both
places, two different folders, is refused: which one was meant is not ours to guess.

Everything that opens a recipe's model folder (merge_plan, lora, moe, the CLI's output checks)
resolves it here; this module imports only the error type, so any of them may use it.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import MergeError


def resolve_folder(what: str, path: str | Path, recipe_dir: Path | None, hint: str) -> Path:
    """`what` names the path in messages (e.g. "model 'a'"); `hint` says what such a folder holds."""
    given = Path(path)
    beside = recipe_dir / given if recipe_dir is not None and not given.is_absolute() else None
    if beside is not None and beside.is_dir():
        if given.is_dir() and given.resolve() != beside.resolve():
            raise MergeError(f"{what}: two folders have this path, {beside} beside the recipe and {given.absolute()} "
                             "in the working directory; write the path of the one you mean")
        return beside
    if given.is_dir():
        return given
    where = f"beside the recipe ({beside}) or " if beside is not None else ""
    raise MergeError(f"{what}: folder not found {where}in the working directory; {hint}")


def resolve_model_path(model: str, recipe_dir: Path | None) -> Path:
    """A recipe's model folder (beside the recipe first, then the working directory)."""
    return resolve_folder(f"model '{model}'", model, recipe_dir, "model paths are local folders (for the recipes in "
                          "configs/, `mergeng examples DIR` makes the models they name)")
