"""`fill-missing`: a donor model with every tensor that a part model also has replaced by the part's.

Typical use: put a fine-tuned text model back into the VLM it came from. Names are aligned as
in merges (architectures/alignment.py), so `model.layers.3...` of the part replaces
`language_model.model.layers.3...` of the donor. The donor's config, tokenizer and processor
files are kept. The plan is made of copy tasks, so it streams, obeys --ram and resumes.
"""

from __future__ import annotations

from pathlib import Path

from ...architectures.alignment import align
from ...errors import MergeError
from ..plan.merge_plan import MergePlan, PlanBuilder
from ..recipe.load import Recipe
from ..inputs.paths import open_source


def fill_missing_recipe_text(donor: str | Path, part: str | Path) -> str:
    return f"# mergeng fill-missing\nmerge_method: passthrough\nbase_model: {donor}\nmodels:\n  - model: {donor}\nfill_from: {part}\n"


def build_fill_missing_plan(donor_path: str | Path, part_path: str | Path) -> MergePlan:
    """DONOR's tensors, those PART also has taken from PART; either a folder or a Hub repo ID."""
    donor_label, part_label = str(donor_path), str(part_path)
    if donor_label == part_label:
        raise MergeError("--donor and --part are the same folder")
    sources = {donor_label: open_source(donor_label, None), part_label: open_source(part_label, None)}
    recipe = Recipe(merge_method="passthrough", models=[{"model": donor_label}], base_model=donor_label)
    builder = PlanBuilder(recipe, sources)
    donor_shapes = {n: i.shape for n, i in sources[donor_label].tensors.items()}
    part_shapes = {n: i.shape for n, i in sources[part_label].tensors.items()}
    aligned = align(part_shapes, donor_shapes)
    tasks, report = [], []
    for name, shape in donor_shapes.items():
        if name in aligned:
            if part_shapes[aligned[name]] != shape:
                raise MergeError(f"tensor '{name}': donor {list(shape)} vs part {list(part_shapes[aligned[name]])} ('{aligned[name]}')")
            tasks.append(builder.copy_task(name, part_label, aligned[name]))
            report.append({"tensor": name, "action": "copied", "from": [part_label], "reason": "replaced by the part"})
        else:
            tasks.append(builder.copy_task(name, donor_label, name))
            report.append({"tensor": name, "action": "copied", "from": [donor_label], "reason": "only the donor has it"})
    used = set(aligned.values())
    dropped = [{"model": part_label, "tensor": n, "reason": "no counterpart in the donor"} for n in part_shapes if n not in used]
    if not used:
        raise MergeError(f"no tensor of '{part_label}' matches a tensor of '{donor_label}' (names and shapes)")
    warnings = [f"{len(dropped)} tensor(s) of the part have no counterpart in the donor"] if dropped else []
    renamed = {o: n for o, n in aligned.items() if o != n}
    return MergePlan(recipe, sources, tasks, dict(sources[donor_label].config), donor_label, warnings, report, dropped,
                     {part_label: renamed} if renamed else {})
