"""The output's config.json: the donor's, deep-copied, with what the merge changed written in.

Invariant: the donor's own config (ModelSource.config) is never modified; every key that the
merge changes (dtype, layer count, vocabulary size) is set consistently wherever the config
holds it (top level or nested `text_config`). A `slices` merge rewrites every key that describes
the layers (architectures/config_layers.py), so the config never contradicts the new layers;
`config_changes` lists what differs from the donor's config, for `plan` to show.
"""

from __future__ import annotations

import copy

from ...architectures.config_layers import relayer_config
from ...architectures.layout import find_layer_stacks, language_stack, main_layers
from ...architectures.vocabulary import config_vocab_holders
from ..recipe.schema import RECIPE_DTYPES
from ..recipe.load import Recipe
from ..inputs.source import ModelSource
from .config_check import LateCheck, check_config
from .tensor_task import TensorTask
from .vocabulary import output_vocab_rows, vocab_rows


def output_config(recipe: Recipe, donor: ModelSource, tasks: list[TensorTask], layers: int | None,
                  warnings: list[str], late: list[LateCheck]) -> dict:
    """The donor's config.json (a deep copy: nested `text_config` included) with dtype, layer count and vocab size updated.

    A donor without config.json gives an empty config: a warning (an error with --strict), not
    a refusal, since plain tensor files (no transformers model) still merge. A re-layered config is
    checked against transformers' config class (config_check.py: now, or in a child process added to `late`)."""
    if not donor.config:
        warnings.append(f"model '{donor.label}': no config.json, so the output has none and transformers "
                        f"cannot load it (the config comes from the base model, else the first); add config.json "
                        f"from the original model to {donor.path}")
    config = copy.deepcopy(donor.config)
    quantization = getattr(donor, "quantization", None)
    if quantization is not None and config.pop("quantization_config", None) is not None:
        written = recipe.out_dtype or recipe.dtype or config.get("torch_dtype") or "bfloat16"
        warnings.append(f"model '{donor.label}' is {quantization.describe()}: read dequantized, the output is written as "
                        f"{written} without quantization_config (writing {quantization.name} back is not supported yet)")
    out_dtype = recipe.out_dtype or recipe.dtype
    if out_dtype:
        config["torch_dtype"] = str(RECIPE_DTYPES[out_dtype]).removeprefix("torch.")
        if "dtype" in config:
            config["dtype"] = config["torch_dtype"]
    if layers is not None:
        set_layers(config, recipe, donor, layers)
        check_config(config, warnings, late)
    rows = output_vocab_rows(tasks)
    donor_rows = vocab_rows(donor)
    if rows is not None and donor_rows is not None and rows != donor_rows:
        for holder in config_vocab_holders(config):
            holder["vocab_size"] = rows
    return config


def slice_layer_sources(recipe: Recipe, layers: int) -> list[int] | None:
    """The donor layer each output layer of the language stack is cut from (a slice's first source,
    as `PlanBuilder.slices_form` names them): from `slices`, or a `modules:` recipe's sliced text decoder."""
    from ..recipe.modules import VISION_NAMES

    candidates = [recipe.slices] + [m.slices for name, m in (recipe.modules or {}).items() if name not in VISION_NAMES]
    for slices in candidates:
        if slices:
            sources = [i for sl in slices for i in range(*sl.sources[0].layer_range)]
            if len(sources) == layers:
                return sources
    return None


def set_layers(config: dict, recipe: Recipe, donor: ModelSource, layers: int) -> None:
    """The layer count, per-layer lists and layer indices of a sliced language stack; without a
    per-layer account of the slices (or a count the config states), only `num_hidden_layers`."""
    stacks = find_layer_stacks(list(donor.tensors))
    stack = language_stack(stacks, donor.config)
    before = main_layers(stacks, stack, donor.config) if stack else None
    sources = slice_layer_sources(recipe, layers)
    # an encoder-decoder with both sides stored: cutting one side leaves the other side's counts alone
    paired = stack if any("encoder" in p for p in stacks) and any("decoder" in p for p in stacks) else ""
    if before and sources and relayer_config(config, sources, before, paired):
        return  # a config that states no count derives it from the per-layer lists just rewritten
    holder = config if "num_hidden_layers" in config or "text_config" not in config else config["text_config"]
    holder["num_hidden_layers"] = layers


def config_changes(before: dict, after: dict, path: str = "") -> list[str]:
    """One line per key whose value differs between the donor's config and the output's, e.g.
    `layer_types: 4 entries -> 6` or `text_config.num_hidden_layers: 32 -> 48`."""
    lines = []
    for key in dict.fromkeys([*before, *after]):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            lines += config_changes(old, new, f"{path}{key}.")
        else:
            lines.append(f"{path}{key}: {_short(old)} -> {_short(new)}")
    return lines


def _short(value) -> str:
    if isinstance(value, list) and len(value) > 8:
        return f"{len(value)} entries"
    return "(absent)" if value is None else str(value)
