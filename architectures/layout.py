"""Where the repeated layer stacks are, read from tensor names alone (no per-architecture table).

A layer stack is a name prefix followed by a layer index: `<prefix>.<N>.<rest>`, e.g.
`model.layers.12.mlp.up_proj.weight` is layer 12 of stack `model.layers`. Every prefix that
carries numbered children with more than one index is a stack; a model has one (Llama) or
several (a VLM's vision and language towers). The language stack — the one `slices` select
from — is the stack whose layer count matches the config's `num_hidden_layers` (top level or
under `text_config`), else the largest. A DeepSeek-V3-style model stores its multi-token-prediction
layers (`num_nextn_predict_layers`) after its main layers in the same stack: layers
num_hidden_layers .. num_hidden_layers + k - 1, which `main_layers` leaves out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class LayerName:
    stack: str
    index: int
    rest: str


def parse_layer_name(name: str, stacks: dict[str, int]) -> LayerName | None:
    """The stack, layer index and suffix of `name`, or None if it is outside every stack."""
    m = _LAYER.match(name)
    if m and m["prefix"] in stacks:
        return LayerName(m["prefix"], int(m["index"]), m["rest"])
    return None


def find_layer_stacks(names: list[str]) -> dict[str, int]:
    """{stack prefix: layer count} for every outermost numbered prefix with at least two layers."""
    indices: dict[str, set[int]] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            indices.setdefault(m["prefix"], set()).add(int(m["index"]))
    return {prefix: max(idx) + 1 for prefix, idx in indices.items() if len(idx) > 1}


def config_layer_count(config: dict) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg.get("num_hidden_layers"), int):
            return cfg["num_hidden_layers"]
    return None


def prediction_layers(config: dict) -> int:
    """How many multi-token-prediction layers follow the main layers (DeepSeek-V3's `num_nextn_predict_layers`)."""
    for cfg in (config, config.get("text_config") or {}):
        k = cfg.get("num_nextn_predict_layers")
        if isinstance(k, int) and k > 0:
            return k
    return 0


def main_layers(stacks: dict[str, int], stack: str, config: dict) -> int:
    """The layers of `stack` a frankenmerge selects from: all of them, less trailing prediction layers."""
    count, want, extra = stacks[stack], config_layer_count(config), prediction_layers(config)
    return want if extra and want is not None and count == want + extra else count


def language_stack(stacks: dict[str, int], config: dict) -> str | None:
    """The stack `slices` refer to: matching the config's layer count (with its prediction layers or
    without), else the largest."""
    if not stacks:
        return None
    want = config_layer_count(config)
    extra = prediction_layers(config)
    matching = [p for p, n in stacks.items() if n == want or (extra and want is not None and n == want + extra)]
    candidates = matching or list(stacks)
    return max(candidates, key=lambda p: (stacks[p], "language" in p or p.startswith("model.")))
