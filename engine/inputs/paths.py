"""Where a model a recipe names lies: the one rule for model and LoRA adapter references.

An absolute path is taken as it is; a relative one is looked up beside the recipe (relative to
its folder) first, then in the working directory. A relative path that names a folder in both
places, two different folders, is refused: which one was meant is not ours to guess. A reference
that is no existing folder and reads as a Hub repo ID (`org/name[@revision]`) is a Hub model:
its snapshot folder in the HF cache (engine/inputs/hub.py).

Everything that opens a recipe's model folder (merge_plan, lora, moe, the CLI's output checks)
resolves it here; this module imports only the error type, so any of them may use it.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import MergeError
from .hub import HubNotFound, HubSnapshot, open_snapshot, parse_hub_ref
from .quantized import quantized_view
from .source import ModelSource


def find_folder(what: str, path: str | Path, recipe_dir: Path | None) -> Path | None:
    """The folder `path` names (beside the recipe first, then the working directory), or None; a
    relative path naming two different folders is refused."""
    given = Path(path)
    beside = recipe_dir / given if recipe_dir is not None and not given.is_absolute() else None
    if beside is not None and beside.is_dir():
        if given.is_dir() and given.resolve() != beside.resolve():
            raise MergeError(f"{what}: two folders have this path, {beside} beside the recipe and {given.absolute()} "
                             "in the working directory; write the path of the one you mean")
        return beside
    return given if given.is_dir() else None


def not_found(what: str, path: str | Path, recipe_dir: Path | None, hint: str, hub: str = "") -> MergeError:
    given = Path(path)
    beside = recipe_dir / given if recipe_dir is not None and not given.is_absolute() else None
    where = f"beside the recipe ({beside}) or " if beside is not None else ""
    return MergeError(f"{what}: folder not found {where}in the working directory{hub}; {hint}")


def resolve_model_path(model: str, recipe_dir: Path | None) -> Path:
    """A recipe's model folder (beside the recipe first, then the working directory, else a Hub snapshot)."""
    return locate_model(model, recipe_dir)[0]


def locate_model(model: str, recipe_dir: Path | None, what: str | None = None,
                 hint: str = "model paths are local folders or Hub repo IDs (for the recipes in configs/, "
                             "`mergeng examples DIR` makes the models they name)") -> tuple[Path, HubSnapshot | None]:
    """A model reference -> (its folder, the Hub snapshot behind it or None for a local folder)."""
    what = what or f"model '{model}'"
    folder = find_folder(what, model, recipe_dir)
    if folder is not None:
        return folder, None
    ref = parse_hub_ref(model)
    if ref is None:
        raise not_found(what, model, recipe_dir, hint)
    try:
        snapshot = open_snapshot(ref, what)
    except HubNotFound as e:  # neither here nor there: say both
        raise not_found(what, model, recipe_dir, hint, f", nor on the Hub: {str(e).removeprefix(f'{what}: ')}") from None
    return snapshot.path, snapshot


def tokenizer_folder(choice: str, recipe_dir: Path | None) -> Path | None:
    """`tokenizer_source: FOLDER_OR_REPO` that names no model of the recipe: a folder (the working
    directory's, then beside the recipe), else a Hub repo's snapshot (its small files fetched); None if neither."""
    for candidate in (Path(choice), (recipe_dir / choice) if recipe_dir else None):
        if candidate is not None and candidate.is_dir():
            return candidate
    ref = parse_hub_ref(choice)
    return open_snapshot(ref, f"recipe field 'tokenizer_source' ('{choice}')").path if ref is not None else None


def open_source(model: str, recipe_dir: Path | None, label: str | None = None) -> ModelSource:
    """The model a reference names, opened (headers only): a local folder or a Hub snapshot."""
    path, snapshot = locate_model(model, recipe_dir)
    source = ModelSource(path, label=label or model, remote=snapshot)
    source.tensors, source.quantization = quantized_view(source.tensors, source.config, source.label)
    return source
