"""From a recipe and its models' headers to one task per output tensor (no weight is read).

    Recipe + ModelSources ──► [TensorTask: output name/dtype/shape, base + inputs, parameters]

`models` form: every tensor of the base (else first) model is merged from the same name in
each input. `slices` form: output layers are the slices' layers renumbered in order; tensors
outside the layer stack come from the first slice's sources when they look like input
embeddings and from the last slice's otherwise (mergekit's pre/post weights). Parameters are
resolved here, once per tensor and model, so later stages only see plain numbers.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...architectures.alignment import align
from ..inputs.layer_blocks import LayerBlocks, packed_dim
from ...architectures.layout import find_layer_stacks, language_stack, main_layers, parse_layer_name, prediction_layers
from ...architectures.vocabulary import is_vocab_tensor
from ...methods.registry import MergeMethod, get_method
from ...methods.svc import with_svc_calibration
from ..recipe.schema import RECIPE_DTYPES
from ...errors import MergeError
from ..inputs.lora import open_model
from .config_check import LateCheck
from .output_config import output_config
from ..recipe.load import Parameters, Recipe, is_unset, resolve_parameter
from ..recipe.validation import check_ranges, coerce_parameter, parameter_warnings, unmatched_filter_warnings
from ..inputs.source import ModelSource, TensorInfo
from .tensor_task import TensorTask
from .tokenizer_merge import VocabularyPlan, build_vocabulary, resolve_chat_template, tokenizer_settings
from .vocabulary import check_tokenizer_source
from .tensor_task import OutputTensor


@dataclass
class MergePlan:
    recipe: Recipe
    sources: dict[str, ModelSource]  # by the model string the recipe uses
    tasks: list[TensorTask]
    config: dict  # output config.json
    config_donor: str  # model whose config, tokenizer and generation files are copied
    warnings: list[str] = field(default_factory=list)
    report: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    alignments: dict[str, dict[str, str]] = field(default_factory=dict)
    modules: dict[str, int] = field(default_factory=dict)  # `modules:` recipes: tensors each module covers
    vocabulary: VocabularyPlan | None = None  # the output tokenizer and permutations (tokenizer_source / tokenizer:)
    chat_template: str | None = None  # the output tokenizer's chat template (recipe `chat_template`, resolved)
    stages: list[dict] = field(default_factory=list)  # a multi-stage recipe's stages, output last (engine/builders/stages.py)
    quantized_output: dict = field(default_factory=dict)  # what is written quantized (engine/builders/requantize.py)
    late_checks: list[LateCheck] = field(default_factory=list)  # warnings still being computed (config_check.py)

    def settle_warnings(self) -> list[str]:
        """`warnings`, with those of checks still running in child processes (config_check.py) waited for and added last."""
        while self.late_checks:
            self.warnings += self.late_checks.pop(0).join()
        return self.warnings


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def open_sources(recipe: Recipe, recipe_dir: Path | None) -> dict[str, ModelSource]:
    """One source per model string; 'BASE+ADAPTER[+...]' opens a LoRA overlay (engine/inputs/lora.py)."""
    return {m: open_model(m, recipe_dir) for m in recipe.model_paths()}


def resolve_params(method: MergeMethod, output_name: str, t: float, global_levels: list[Parameters],
                   inputs: list[tuple[str, str, Parameters]]) -> dict[str, Any]:
    """Resolve every declared parameter; `inputs` is (model, input tensor name, model params) per non-base input.

    Values are coerced to the method's types and checked against its ranges (engine/recipe/validation.py)."""
    values: dict[str, Any] = {}
    for p in method.parameters.values():
        if p.per_model:
            per: list[Any] = []
            for model, tensor_name, own in inputs:
                v = resolve_parameter(p.name, [own, *global_levels], tensor_name, t)
                if is_unset(v):
                    if p.required:
                        raise MergeError(f"recipe: parameter '{p.name}' is required for model '{model}' (method {method.name})")
                    v = p.default
                per.append(coerce_parameter(p.name, v, p.type, f"model '{model}'"))
            values[p.name] = per
        else:
            v = resolve_parameter(p.name, global_levels, output_name, t)
            if is_unset(v):
                if p.required:
                    raise MergeError(f"recipe field 'parameters.{p.name}': required by method {method.name}")
                v = p.default
            values[p.name] = coerce_parameter(p.name, v, p.type, "recipe field 'parameters'")
            if p.type is tuple:
                check_model_names(method.name, p.name, values[p.name], [m for m, _, _ in inputs], output_name)
    check_ranges(method.name, values, lambda i: (f"model '{inputs[i][0]}' (tensor '{output_name}')" if i is not None
                                                 else f"recipe field 'parameters' (tensor '{output_name}')"))
    return values


def check_model_names(method: str, name: str, names: tuple[str, ...], models: list[str], tensor: str) -> None:
    """A ModelNames parameter (e.g. CABS' pruning_order) lists each non-base model of the tensor once, or is empty."""
    if not names:
        return
    where = f"recipe field 'parameters.{name}' (method {method}, tensor '{tensor}')"
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MergeError(f"{where}: names model '{repeated[0]}' more than once")
    unknown = [n for n in names if n not in models]
    if unknown:
        raise MergeError(f"{where}: '{unknown[0]}' is not one of the models merged besides the base ({', '.join(models)})")
    left_out = [m for m in models if m not in names]
    if left_out:
        raise MergeError(f"{where}: model '{left_out[0]}' is not listed; list every model besides the base, in the order wanted")


def with_calibration(method: MergeMethod, parameters: Parameters) -> MergeMethod:
    """The recipe's method, followed by a calibration when top-level `parameters.calibrate` asks for one (svc)."""
    if "calibrate" not in parameters:
        return method
    value = parameters["calibrate"]
    if value != "svc":
        raise MergeError(f"recipe field 'parameters.calibrate': unknown calibration {value!r} (known: svc)")
    return with_svc_calibration(method)


def sibling_stacks(stack: str, stacks: dict[str, int]) -> list[str]:
    """The stacks `slices` cut together: `stack` and every stack beside it (same parent, same layer
    count) that numbers the same layers in parts, e.g. XLM's `transformer.attentions.N`,
    `transformer.ffns.N`, `transformer.layer_norm1.N`."""
    parent = stack.rsplit(".", 1)[0] if "." in stack else ""
    return [stack] + sorted(s for s, n in stacks.items()
                            if s != stack and n == stacks[stack] and (s.rsplit(".", 1)[0] if "." in s else "") == parent)


class PlanBuilder:
    """Turns a recipe's models or slices into tasks; also lends `copy_task` to commands that make their own plans."""

    def __init__(self, recipe: Recipe, sources: dict[str, ModelSource], truncate_vocab: bool = False):
        self.recipe = recipe
        self.sources = sources
        self.method = with_calibration(get_method(recipe.merge_method), recipe.parameters)
        self.truncate_vocab = truncate_vocab  # the user allows vocabularies of different sizes to be cut
        self.truncated: dict[str, str] = {}  # output name -> how its vocabulary rows were cut
        self.warnings: list[str] = []
        self.report: list[dict] = []  # what happened to each output tensor
        self.dropped: list[dict] = []  # input tensors with no place in the output, and why
        self.alignments: dict[str, dict[str, str]] = {}  # model -> {output name: its tensor name} where they differ
        self.partially_missing: dict[str, list[str]] = {}  # model -> merged tensors it lacks
        self.stacks = {m: find_layer_stacks(list(s.tensors)) for m, s in sources.items()}
        # set by engine/recipe/modules.py when this builder makes one module of a `modules:` recipe
        self.only: set[str] | None = None  # the output tensors this builder makes (None: all)
        self.outer_levels: list[Parameters] = []  # parameter levels below this recipe's own
        self.slice_stack: str | None = None  # the layer stack `slices` cut (None: the language stack)
        self.module_sizes: dict[str, int] = {}  # `modules:` recipes: tensors each module covers
        # a tokenizer configuration: every vocabulary tensor's inputs are gathered into the output vocabulary
        self.vocabulary: VocabularyPlan | None = None

    def output_dtype(self, infos: list[TensorInfo]) -> torch.dtype:
        if not infos[0].dtype.is_floating_point:
            return infos[0].dtype
        name = self.recipe.out_dtype or self.recipe.dtype
        return RECIPE_DTYPES[name] if name else infos[0].dtype

    def task(self, out_name: str, t: float, base: tuple[str, str] | None, inputs: list[tuple[str, str, Parameters]],
             global_levels: list[Parameters]) -> TensorTask:
        """One task; `base` is (model, tensor name), inputs (model, tensor name, model params)."""
        method = self.method
        base_info = self.sources[base[0]].tensors[base[1]] if base else None
        infos = [self.sources[m].tensors[n] for m, n, _ in inputs]
        first = base_info or (infos[0] if infos else None)
        if self.vocabulary is not None and is_vocab_tensor(out_name) and first is not None and first.dtype.is_floating_point:
            labelled = ([(base[0], base_info)] if base_info else []) + [(m, i) for (m, _, _), i in zip(inputs, infos)]
            mapped = self.vocabulary.map_inputs(out_name, labelled, base[0] if base else self.recipe.base_model)
            base_info, infos = (mapped[0], mapped[1:]) if base_info else (None, mapped)
        all_infos = ([base_info] if base_info else []) + infos
        if not all_infos[0].dtype.is_floating_point:  # integer buffers: copied, never averaged
            first = all_infos[0]
            method = get_method("passthrough")
            return TensorTask(OutputTensor(out_name, first.dtype, first.shape), None, (first,),
                              ((base or inputs[0])[0],), {"scale": [1.0]}, method)
        n = len(inputs)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = f"{method.min_models}" if method.max_models == method.min_models else f"at least {method.min_models}"
            raise MergeError(f"merge_method {method.name}: needs {want} model(s) besides the base, tensor '{out_name}' has {n}")
        shape = self._merged_shape(out_name, base, base_info, inputs, infos)
        params = resolve_params(method, out_name, t, [*global_levels, *self.outer_levels], inputs)
        return TensorTask(OutputTensor(out_name, self.output_dtype(all_infos), shape), base_info, tuple(infos),
                          tuple(m for m, _, _ in inputs), params, method, base[0] if base else None)

    def _merged_shape(self, out_name, base, base_info, inputs, infos) -> tuple[int, ...]:
        """The one shape all inputs share; only vocabulary rows may differ, and only with --truncate-vocab.

        Truncating keeps the base's rows (every model must have at least as many: mergekit cuts the
        others to the base) or, without a base, the smallest row count (mergekit's common submatrix)."""
        labelled = ([(base[0], base_info)] if base_info else []) + [(m, i) for (m, _, _), i in zip(inputs, infos)]
        shapes = {i.shape for _, i in labelled}
        if len(shapes) == 1:
            return labelled[0][1].shape
        desc = ", ".join(f"{m} {list(i.shape)}" for m, i in labelled)
        vocab = any(is_vocab_tensor(i.name) for _, i in labelled) or is_vocab_tensor(out_name)
        if not vocab or len({s[1:] for s in shapes}) != 1 or any(len(s) < 2 for s in shapes):
            raise MergeError(f"tensor '{out_name}': shapes differ between models ({desc})")
        sizes = ", ".join(f"{m} {i.shape[0]}" for m, i in labelled)
        if not self.truncate_vocab:
            raise MergeError(f"tensor '{out_name}': vocabulary sizes differ between models ({sizes}); merge models that "
                             f"share a tokenizer, or pass --truncate-vocab to keep the rows they have in common "
                             f"(what mergekit does without a tokenizer section)")
        if base_info is not None:
            short = [m for m, i in labelled if i.shape[0] < base_info.shape[0]]
            if short:
                raise MergeError(f"tensor '{out_name}': model '{short[0]}' has fewer vocabulary rows than the base "
                                 f"({sizes}); --truncate-vocab keeps the base's rows, so every model needs at least as many")
            shape = base_info.shape
        else:
            shape = (min(s[0] for s in shapes),) + next(iter({s[1:] for s in shapes}))
        self.truncated[out_name] = f"vocabulary cut to {shape[0]} rows ({sizes})"
        self.warnings.append(f"tensor '{out_name}': vocabulary cut to its first {shape[0]} rows (--truncate-vocab; {sizes})")
        return shape

    def layer_t(self, model: str, name: str) -> float:
        stacks = self.stacks[model]
        layer = parse_layer_name(name, stacks)
        if layer is None:
            return 0.0
        n = stacks[layer.stack]
        return layer.index / (n - 1) if n > 1 else 1.0

    # -- models form -------------------------------------------------------------------------
    def copy_task(self, out_name: str, model: str, tensor: str) -> TensorTask:
        info = self.sources[model].tensors[tensor]
        if self.vocabulary is not None and is_vocab_tensor(out_name) and info.dtype.is_floating_point:
            info = self.vocabulary.map_inputs(out_name, [(model, info)], model)[0]
        return TensorTask(OutputTensor(out_name, self.output_dtype([info]), info.shape), None, (info,), (model,),
                          {"scale": [1.0]}, get_method("passthrough"))

    def selected(self, name: str) -> bool:
        r = self.recipe
        if r.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in r.include):
            return False
        return not (r.exclude and any(fnmatch.fnmatchcase(name, p) for p in r.exclude))

    def models_form(self) -> tuple[list[TensorTask], str]:
        r = self.recipe
        listed = [m.model for m in r.models]
        params_of = {m.model: m.parameters for m in r.models}
        rename_of = {m.model: m.rename for m in r.models}
        base = r.base_model
        if self.method.base == "required" and not base:
            raise MergeError(f"recipe field 'base_model': method {self.method.name} needs a base model")
        order = listed + ([base] if base and base not in listed else [])
        donor = base or order[0]
        if self.method.base == "none":
            others, base = order, None
        else:
            others = [m for m in order if m != base]
        reference = {n: i.shape for n, i in self.sources[donor].tensors.items()}
        aligned = {}  # model -> {output name: that model's tensor name}
        for m in dict.fromkeys(order + [r.fill_from or donor]):
            names = {n: i.shape for n, i in self.sources[m].tensors.items()}
            aligned[m] = align(names, reference, rename_of.get(m))
            if not aligned[m]:
                raise MergeError(f"model '{m}': none of its tensors matches a tensor of '{donor}' by name or by a prefix "
                                 f"rename; is it the same architecture? (a `rename:` on the model maps its names)")
            renamed = {o: n for o, n in aligned[m].items() if o != n}
            if renamed:
                self.alignments[m] = renamed
        fill = r.fill_from or donor
        tasks = []
        for name in self.sources[donor].tensors:
            if self.only is not None and name not in self.only:
                continue
            if not self.selected(name):
                if name not in aligned[fill]:
                    raise MergeError(f"tensor '{name}': not selected for merging and missing from fill_from model '{fill}'")
                tasks.append(self.copy_task(name, fill, aligned[fill][name]))
                self.report.append({"tensor": name, "action": "copied", "from": [fill], "reason": "not selected by include/exclude"})
                continue
            have = [m for m in others if name in aligned[m]]
            lacking = [m for m in others if m not in have]
            if lacking:
                if r.missing == "error":
                    raise MergeError(f"tensor '{name}' is missing from model(s) {', '.join(lacking)} (missing: error)")
                if r.missing == "base" or not have or len(have) < self.method.min_models:
                    tasks.append(self.copy_task(name, donor, name))
                    self.report.append({"tensor": name, "action": "copied", "from": [donor],
                                        "reason": f"missing from {', '.join(lacking)}"})
                    continue
                for m in lacking:
                    self.partially_missing.setdefault(m, []).append(name)
            t = self.layer_t(donor, name)
            inputs = [(m, aligned[m][name], params_of.get(m, {})) for m in have]
            tasks.append(self.task(name, t, (base, name) if base else None, inputs, [r.parameters]))
            reasons = (["partial: " + ", ".join(lacking) + " lack it"] if lacking else []) + \
                ([self.truncated[name]] if name in self.truncated else [])
            self.report.append({"tensor": name, "action": "merged", "from": ([base] if base else []) + have,
                                "reason": "; ".join(reasons)})
        for m, names in self.partially_missing.items():
            self.warnings.append(f"{len(names)} tensor(s) are missing from '{m}' (e.g. '{names[0]}'): merged from the models that have them")
        for m in order:
            used = set(aligned[m].values())
            for n in self.sources[m].tensors:
                if n not in used:
                    self.dropped.append({"model": m, "tensor": n, "reason": f"no counterpart in the output layout of '{donor}'"})
        if self.dropped:
            self.warnings.append(f"{len(self.dropped)} input tensor(s) have no place in the output (see the report), e.g. "
                                 f"'{self.dropped[0]['tensor']}' of {self.dropped[0]['model']}")
        return tasks, donor

    # -- slices form -------------------------------------------------------------------------
    def slices_form(self) -> tuple[list[TensorTask], str, int]:
        r = self.recipe
        first_model = r.slices[0].sources[0].model
        donor = r.base_model or first_model
        stack = self.slice_stack or language_stack(self.stacks[donor], self.sources[donor].config)
        if stack is None:
            raise MergeError(f"recipe field 'slices': model '{donor}' has no numbered layer stack to slice")
        cut_stacks = sibling_stacks(stack, self.stacks[donor])
        tasks: list[TensorTask] = []
        out_layer = 0
        for si, sl in enumerate(r.slices):
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
            if len(lengths) != 1:
                raise MergeError(f"recipe field 'slices[{si}].sources': layer ranges must have the same length, got {[list(s.layer_range) for s in sl.sources]}")
            n = lengths.pop()
            for s in sl.sources:
                have = self.stacks[s.model].get(stack, 0)
                main = main_layers(self.stacks[s.model], stack, self.sources[s.model].config) if have else 0
                if main < s.layer_range[1] <= have:
                    raise MergeError(f"recipe field 'slices[{si}].sources': layer_range {list(s.layer_range)} reaches layer {main} of "
                                     f"model '{s.model}', its multi-token-prediction layer (num_nextn_predict_layers); slices select "
                                     f"among its {main} main layers, and the prediction layers are kept after the output's last layer")
                if s.layer_range[1] > have:
                    raise MergeError(f"recipe field 'slices[{si}].sources': layer_range {list(s.layer_range)} is beyond model '{s.model}', which has {have} layers")
            base = sl.base_model or r.base_model
            base_src = next((s for s in sl.sources if s.model == base), None) if self.method.base != "none" else None
            if self.method.base == "required" and base_src is None:
                raise MergeError(f"recipe field 'slices[{si}]': method {self.method.name} needs base_model among the slice's sources")
            others = [s for s in sl.sources if s is not base_src]
            first = sl.sources[0]
            for j in range(n):
                t = j / (n - 1) if n > 1 else 1.0
                for cut in cut_stacks:
                    prefix = f"{cut}.{first.layer_range[0] + j}."
                    for name in self.sources[first.model].tensors:
                        if not name.startswith(prefix):
                            continue
                        rest = name[len(prefix):]

                        def src_name(s, rest=rest, j=j, cut=cut):
                            return f"{cut}.{s.layer_range[0] + j}.{rest}"
                        for s in sl.sources:
                            if src_name(s) not in self.sources[s.model].tensors:
                                raise MergeError(f"tensor '{src_name(s)}' is missing from model '{s.model}' (slices[{si}])")
                        out_name = f"{cut}.{out_layer + j}.{rest}"
                        inputs = [(s.model, src_name(s), s.parameters) for s in others]
                        base_ref = (base_src.model, src_name(base_src)) if base_src else None
                        tasks.append(self.task(out_name, t, base_ref, inputs, [sl.parameters, r.parameters]))
                        self._report_slice_task(out_name, base_ref, inputs)
            out_layer += n
        tasks += self._prediction_layer_tasks(cut_stacks, stack, out_layer)
        tasks += self._non_layer_tasks(cut_stacks, stack)
        return tasks, donor, out_layer

    def _prediction_layer_tasks(self, cut_stacks: list[str], stack: str, out_layer: int) -> list[TensorTask]:
        """A DeepSeek-V3-style model's multi-token-prediction layers, trained on its last layer's output, follow
        the output's last layer: those of the last slice's models (merged as the last slice merges), renumbered."""
        sl = self.recipe.slices[-1]
        first = sl.sources[0]
        config = self.sources[first.model].config
        extra = prediction_layers(config)
        main = main_layers(self.stacks[first.model], stack, config) if stack in self.stacks[first.model] else 0
        if not extra or self.stacks[first.model].get(stack, 0) != main + extra:
            return []
        base = sl.base_model or self.recipe.base_model
        base_src = next((s for s in sl.sources if s.model == base), None) if self.method.base != "none" else None
        others = [s for s in sl.sources if s is not base_src]
        tasks = []
        for k in range(extra):
            for cut in cut_stacks:
                prefix = f"{cut}.{main + k}."
                for name in [n for n in self.sources[first.model].tensors if n.startswith(prefix)]:
                    rest = name[len(prefix):]
                    for s in sl.sources:
                        src_main = main_layers(self.stacks[s.model], stack, self.sources[s.model].config)
                        if f"{cut}.{src_main + k}.{rest}" not in self.sources[s.model].tensors:
                            raise MergeError(f"tensor '{cut}.{src_main + k}.{rest}' (a multi-token-prediction layer) is missing "
                                             f"from model '{s.model}' (slices[{len(self.recipe.slices) - 1}])")
                    def src(s, rest=rest, cut=cut, k=k):
                        return f"{cut}.{main_layers(self.stacks[s.model], stack, self.sources[s.model].config) + k}.{rest}"
                    out_name = f"{cut}.{out_layer + k}.{rest}"
                    inputs = [(s.model, src(s), s.parameters) for s in others]
                    base_ref = (base_src.model, src(base_src)) if base_src else None
                    tasks.append(self.task(out_name, 1.0, base_ref, inputs, [sl.parameters, self.recipe.parameters]))
                    self._report_slice_task(out_name, base_ref, inputs)
        self.warnings.append(f"model '{first.model}': its {extra} multi-token-prediction layer(s) (layers {main}.."
                             f"{main + extra - 1}) follow the output's {out_layer} layers as layers {out_layer}..{out_layer + extra - 1}")
        return tasks

    def _layer_block_task(self, name: str, dim: int, stack: str) -> TensorTask:
        """A tensor packing one block per layer (Gemma3n/Gemma4's per-layer embeddings): output block k is block s_k
        of the model that gave output layer k (engine/inputs/layer_blocks.py)."""
        blocks, widths, others = [], set(), set()
        for si, sl in enumerate(self.recipe.slices):
            if len(sl.sources) != 1:
                raise MergeError(f"recipe field 'slices[{si}].sources': tensor '{name}' packs one block per layer, which a "
                                 "frankenmerge can only restate from single-model slices; merge the models first, then slice")
            s = sl.sources[0]
            info = self.sources[s.model].tensors.get(name)
            layers = main_layers(self.stacks[s.model], stack, self.sources[s.model].config)
            if info is None or len(info.shape) != 2 or info.shape[dim] % layers:
                raise MergeError(f"tensor '{name}' of model '{s.model}' does not pack {layers} per-layer blocks along dim {dim}")
            widths.add(info.shape[dim] // layers)
            others.add(info.shape[1 - dim])
            blocks += [(info, layer) for layer in range(*s.layer_range)]
        if len(widths) != 1 or len(others) != 1:
            raise MergeError(f"tensor '{name}': its per-layer blocks differ in size between the slices' models")
        width = widths.pop()
        gather = LayerBlocks(blocks, dim, width)
        first = blocks[0][0]
        info = TensorInfo(name, first.file, first.offset, torch.float32, gather.shape, gather)
        model = self.recipe.slices[0].sources[0].model
        self.report.append({"tensor": name, "action": "restated per layer", "from": list(dict.fromkeys(
            s.model for sl in self.recipe.slices for s in sl.sources)), "reason": f"one block per layer along dim {dim}"})
        return TensorTask(OutputTensor(name, self.output_dtype([first]), gather.shape), None, (info,), (model,),
                          {"scale": [1.0]}, get_method("passthrough"))

    def _non_layer_tasks(self, cut_stacks: list[str], stack: str = "") -> list[TensorTask]:
        r = self.recipe
        tasks = []
        donor_model = r.slices[0].sources[0].model
        for name in self.sources[donor_model].tensors:
            if self.only is not None and name not in self.only:
                continue
            if any(name.startswith(cut + ".") for cut in cut_stacks):
                continue
            dim = packed_dim(name)
            if dim is not None and stack:
                tasks.append(self._layer_block_task(name, dim, stack))
                continue
            sl = r.slices[0] if "embed" in name else r.slices[-1]
            base = sl.base_model or r.base_model
            base_src = next((s for s in sl.sources if s.model == base), None) if self.method.base != "none" else None
            others = [s for s in sl.sources if s is not base_src]
            inputs = [(s.model, name, s.parameters) for s in others]
            for s in sl.sources:
                if name not in self.sources[s.model].tensors:
                    raise MergeError(f"tensor '{name}' is missing from model '{s.model}'")
            base_ref = (base_src.model, name) if base_src else None
            tasks.append(self.task(name, 0.0, base_ref, inputs, [sl.parameters, r.parameters]))
            self._report_slice_task(name, base_ref, inputs)
        return tasks

    def _report_slice_task(self, out_name: str, base_ref, inputs) -> None:
        models = ([base_ref[0]] if base_ref else []) + [m for m, _, _ in inputs]
        self.report.append({"tensor": out_name, "action": "merged", "from": list(dict.fromkeys(models)),
                            "reason": self.truncated.get(out_name, "")})


def lora_rank_warnings(method: MergeMethod, sources: dict[str, ModelSource], base_model: str | None) -> list[str]:
    """An SVD merge of a base-plus-LoRA input: its task vectors may have the adapter's low rank (unstable).
    Not core_space: it merges the adapters' factors, never their low-rank full-size task vectors."""
    if method.whole_tensor is None or method.name == "core_space":
        return []
    lora = [label for label, src in sources.items() if label != base_model and getattr(src, "adapter", None) is not None]
    if not lora:
        return []
    return [f"model '{lora[0]}'{f' (and {len(lora) - 1} more)' if len(lora) > 1 else ''} is a model plus a LoRA adapter: "
            f"where the adapter applies its task vector may have the adapter's low rank, and {method.name} merges "
            f"rank-deficient task vectors unstably (the run names each such tensor)"]


def build_plan(recipe: Recipe, sources: dict[str, ModelSource], truncate_vocab: bool = False) -> MergePlan:
    """`truncate_vocab`: the user allows embeddings of different vocabulary sizes to be cut (see `_merged_shape`).

    `plan.warnings` lists, in this order, the recipe's ignored keys, its ignored parameters, what
    the plan changes or leaves out (missing, dropped, truncated tensors), filters matching no
    tensor, and the output config's custom code."""
    builder = PlanBuilder(recipe, sources, truncate_vocab)
    warnings = [*recipe.parse_warnings, *parameter_warnings(recipe, builder.method)]
    if tokenizer_settings(recipe) is not None:
        from ..recipe.modules import modules_donor

        donor = modules_donor(recipe) if recipe.modules is not None else recipe.base_model or recipe.model_paths()[0]
        builder.vocabulary = build_vocabulary(recipe, sources, donor)
    sliced: dict[str, int] = {}  # modules form: new layer count of each sliced stack
    if recipe.models is not None:
        tasks, donor = builder.models_form()
        layers = None
    elif recipe.slices is not None:
        tasks, donor, layers = builder.slices_form()
    else:
        from ..recipe.modules import plan_modules

        tasks, donor, sliced = plan_modules(builder)
        language = language_stack(builder.stacks[donor], sources[donor].config)
        layers = sliced.pop(language, None)
    tasks.sort(key=lambda task: natural_key(task.output.name))
    names = {t.output.name for t in tasks} | {i.name for t in tasks for _, i in t.all_inputs}
    warnings += builder.warnings + unmatched_filter_warnings(recipe, names)
    if builder.vocabulary is not None:
        warnings += builder.vocabulary.warnings
    late: list[LateCheck] = []
    config = output_config(recipe, sources[donor], tasks, layers, warnings, late)
    if sliced:  # a sliced vision tower: its layer count lives in the vision config
        from ..recipe.modules import set_vision_layers

        set_vision_layers(config, sliced, warnings)
    if builder.vocabulary is None:
        check_tokenizer_source(recipe, sources, donor, tasks)
    warnings += lora_rank_warnings(builder.method, sources, recipe.base_model)
    if "auto_map" in config:
        warnings.append(f"model '{donor}' uses custom code (auto_map in config.json): its *.py files are copied "
                        f"to the output, and loading it needs trust_remote_code=True")
    return MergePlan(recipe, sources, tasks, config, donor, warnings, builder.report, builder.dropped, builder.alignments,
                     builder.module_sizes, builder.vocabulary, resolve_chat_template(recipe, sources), late_checks=late)
