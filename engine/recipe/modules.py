"""mergekit's `modules:` recipes: each part of a vision-language model merged on its own terms.

    modules:
      text_decoder:          {slices: [...]}            the language model, e.g. a frankenmerge
      vision_tower:          {models: [...]}            the vision encoder, e.g. a linear merge
      multi_modal_projector: {models: [...], parameters: {...}}

A module name is mapped onto the tensors of the output's donor (the recipe's base model, else
the text decoder's first model) from their names: the projector is what sits under
`multi_modal_projector`, `mm_projector` or a vision tower's `merger`; the vision tower is the
rest of what sits under `visual`, `vision_tower`, `vision_model` or `vision_encoder`; the text
decoder (also `language_model`) is everything else. A module's `tensors:` (glob patterns)
overrides the mapping. `plan` shows how many tensors each module covers.

Each module is planned by its own PlanBuilder, restricted to its tensors: its `models` or
`slices` (a module's slices cut the module's own layer stack), its `merge_method` and
`base_model` (mergeng extensions; default: the recipe's), and parameters resolved as mergekit
does: slice source or model, slice, module, then the top level. Invariants: modules cover
disjoint tensors; a tensor no module covers is copied from the donor with a warning; the
layer count of a sliced text decoder goes to the language model's config key, that of a
sliced vision tower to the vision config's.
"""

from __future__ import annotations

import fnmatch

from ...architectures.layout import find_layer_stacks, language_stack
from ...errors import MergeError
from .schema import Module, Recipe

PROJECTOR_MARKERS = ("multi_modal_projector", "mm_projector", "merger")
VISION_MARKERS = ("visual", "vision_tower", "vision_model", "vision_encoder")
TEXT_NAMES = ("text_decoder", "language_model", "text_model")
VISION_NAMES = ("vision_tower", "vision_model", "visual")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "projector")


def module_of(name: str) -> str:
    """'text_decoder', 'vision_tower' or 'multi_modal_projector' for a tensor name."""
    parts = name.split(".")
    if any(p in PROJECTOR_MARKERS for p in parts):
        return "multi_modal_projector"
    if any(p in VISION_MARKERS for p in parts):
        return "vision_tower"
    return "text_decoder"


def module_tensors(recipe: Recipe, names: list[str]) -> dict[str, list[str]]:
    """The donor's tensor names each module of the recipe covers (disjoint; a name no module covers is left out)."""
    covered: dict[str, list[str]] = {}
    taken: dict[str, str] = {}
    for module_name, module in recipe.modules.items():
        if module.tensors is not None:
            mine = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in module.tensors)]
        else:
            kind = _kind(module_name)
            mine = [n for n in names if module_of(n) == kind]
        for n in mine:
            if n in taken:
                raise MergeError(f"recipe field 'modules.{module_name}': tensor '{n}' is also in module '{taken[n]}'; "
                                 f"give the modules disjoint `tensors:` patterns")
            taken[n] = module_name
        if not mine:
            raise MergeError(f"recipe field 'modules.{module_name}': matches no tensor of the output's donor "
                             f"(e.g. '{names[0]}'); name the tensors it covers with `tensors: [glob, ...]`")
        covered[module_name] = mine
    return covered


def _kind(module_name: str) -> str:
    if module_name in TEXT_NAMES:
        return "text_decoder"
    if module_name in VISION_NAMES:
        return "vision_tower"
    if module_name in PROJECTOR_NAMES:
        return "multi_modal_projector"
    raise MergeError(f"recipe field 'modules.{module_name}': unknown module (known: text_decoder, vision_tower, "
                     f"multi_modal_projector); say which tensors it covers with `tensors: [glob, ...]`")


def module_recipe(recipe: Recipe, module: Module) -> Recipe:
    """The recipe one module is planned with."""
    return Recipe(merge_method=module.merge_method or recipe.merge_method, models=module.models, slices=module.slices,
                  base_model=module.base_model or recipe.base_model, parameters=module.parameters, dtype=recipe.dtype,
                  out_dtype=recipe.out_dtype, seed=recipe.seed, name=recipe.name)


def modules_donor(recipe: Recipe) -> str:
    """Whose layout and config the output takes: the base model, else the text decoder's first model."""
    if recipe.base_model:
        return recipe.base_model
    modules = recipe.modules
    first = next((modules[n] for n in TEXT_NAMES if n in modules), next(iter(modules.values())))
    return first.models[0].model if first.models else first.slices[0].sources[0].model


def plan_modules(builder) -> tuple[list, str, dict[str, int]]:
    """(tasks, donor, {stack: new layer count} of sliced modules) for a `modules:` recipe.

    `builder` is the recipe's PlanBuilder (engine/plan/merge_plan.py, which calls this); each module
    gets a builder of its own, of the same class, sharing its sources, and its warnings, report
    and dropped tensors are gathered into `builder`'s. The class comes with `builder`, so this
    module never imports the planner that imports it."""
    recipe, sources = builder.recipe, builder.sources
    donor = modules_donor(recipe)
    names = list(sources[donor].tensors)
    covered = module_tensors(recipe, names)
    stacks = find_layer_stacks(names)
    tasks, layers = [], {}
    for module_name, module in recipe.modules.items():
        sub = type(builder)(module_recipe(recipe, module), sources, builder.truncate_vocab)
        sub.vocabulary = builder.vocabulary  # the output vocabulary every embedding is gathered into
        sub.only = set(covered[module_name])
        sub.outer_levels = [recipe.parameters]
        if module.slices is not None:
            sub.slice_stack = _module_stack(module_name, covered[module_name], stacks, sources[donor].config)
            module_tasks, _, count = sub.slices_form()
            layers[sub.slice_stack] = count
        else:
            module_tasks, _ = sub.models_form()
        tasks += module_tasks
        builder.warnings += [w for w in sub.warnings if w not in builder.warnings]
        builder.report += sub.report
        builder.dropped += [d for d in sub.dropped if d not in builder.dropped]
        for m, renamed in sub.alignments.items():
            builder.alignments.setdefault(m, {}).update(renamed)
    made = {t.output.name for t in tasks}
    left = [n for n in names if n not in made]
    for n in left:
        tasks.append(builder.copy_task(n, donor, n))
        builder.report.append({"tensor": n, "action": "copied", "from": [donor], "reason": "in no module of the recipe"})
    if left:
        builder.warnings.append(f"{len(left)} tensor(s) of '{donor}' are in no module of the recipe (e.g. '{left[0]}'): "
                                f"copied from '{donor}'")
    builder.module_sizes = {m: len(c) for m, c in covered.items()}  # shown by `plan`
    return tasks, donor, layers


def _module_stack(module_name: str, covered: list[str], stacks: dict[str, int], config: dict) -> str:
    """The layer stack a module's slices cut: the language stack for the text decoder, else the
    module's longest stack."""
    mine = {s: n for s, n in stacks.items() if any(c.startswith(s + ".") for c in covered)}
    if module_name in TEXT_NAMES:
        stack = language_stack(mine, config)
        if stack:
            return stack
    if not mine:
        raise MergeError(f"recipe field 'modules.{module_name}.slices': the module has no numbered layer stack to slice")
    return max(mine, key=lambda s: mine[s])


def set_vision_layers(config: dict, sliced: dict[str, int], warnings: list[str]) -> None:
    """Write a sliced vision stack's new layer count into the vision config (`depth` or `num_hidden_layers`)."""
    vision = config.get("vision_config")
    for stack, count in sliced.items():
        key = next((k for k in ("depth", "num_hidden_layers", "num_layers") if isinstance(vision, dict) and k in vision), None)
        if key is None:
            warnings.append(f"slices of '{stack}' give {count} layers, but config.json has no vision layer count to update")
            continue
        vision[key] = count
