"""Mixing architectures is refused, as mergekit refuses it, unless `--allow-crimes`.

A model's architecture is its config.json's `architectures[0]`. Two models mix architectures
when those differ, with one exception: a vision-language model (a config with `text_config`)
also counts as the architecture of its language model, so a text-only model whose `model_type`
is the VLM's `text_config.model_type` (a Llama fine-tune into a LLaVA) is not a crime — its
tensors are aligned onto the VLM's language model by prefix. Models without `architectures` in
their config (or without config.json) are not compared: mergekit then infers the architecture
from the tensors, and mergeng's checks on names and shapes do the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import MergeError


@dataclass(frozen=True)
class Architecture:
    name: str             # architectures[0], e.g. LlamaForCausalLM
    model_type: str       # config model_type, e.g. llama
    text_model_type: str  # a VLM's text_config.model_type, "" for a text model


def architecture_of(config: dict) -> Architecture | None:
    names = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(names, list) or not names:
        return None
    text = config.get("text_config")
    text_type = str(text.get("model_type", "")) if isinstance(text, dict) else ""
    return Architecture(str(names[0]), str(config.get("model_type", "")), text_type)


def compatible(a: Architecture, b: Architecture) -> bool:
    """Same architecture, or a text model and a VLM whose language model has its model_type."""
    if a.name == b.name:
        return True
    for vlm, text in ((a, b), (b, a)):
        if vlm.text_model_type and not text.text_model_type and text.model_type == vlm.text_model_type:
            return True
    return False


def refuse_mixed_architectures(configs: dict[str, dict], allow_crimes: bool = False) -> None:
    """`configs`: each model's config.json by label. One line naming two models that mix architectures."""
    if allow_crimes:
        return
    known = [(label, arch) for label, cfg in configs.items() if (arch := architecture_of(cfg)) is not None]
    for i, (label_a, a) in enumerate(known):
        for label_b, b in known[i + 1:]:
            if not compatible(a, b):
                raise MergeError(f"model '{label_a}' is {a.name} but model '{label_b}' is {b.name}: mixing architectures "
                                 "is refused (as by mergekit); add --allow-crimes to merge them anyway")
