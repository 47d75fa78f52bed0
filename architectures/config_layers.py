"""What a config.json says about each layer, rewritten for a frankenmerge's layers.

A `slices` merge makes output layer k from source layer s_k (`layer_sources[k]`). The donor's
config describes its n layers in three ways, and each is rewritten for the new len(layer_sources):

    layer counts      num_hidden_layers, n_layer, num_layers, ...     n              -> len(layer_sources)
    per-layer lists   layer_types, no_rope_layers, per-layer heads   [v_0 .. v_n-1]  -> [v_s0, v_s1, ...]
    layer indices     mlp_only_layers, attn_layer_indices            [i, j] (< n)    -> [k : s_k in {i, j}]

They are found in the config that holds the language layer count: the top level, else a nested
text config (`text_config`, `language_config`, ...). A layer count's names are
`num_hidden_layers`, the names transformers' config class maps onto it (`attribute_map`: count_aliases.py's
table, else the installed transformers; it is never required) and LAYER_COUNT_NAMES, when they hold n. A
per-layer list is any list of n entries, a per-layer string (`hybrid_override_pattern`) any
string of n characters under a name with `pattern` in it; a layer-index list holds distinct
ascending layer numbers, fewer than n (or exactly 0..n-1), under a name with `layer`, `idx`
or `ind` in it. Invariant: after `relayer_config` every one of them
describes the output's layers, so the config never contradicts itself.
"""

from __future__ import annotations

from ..errors import MergeError
from .count_aliases import COUNT_ALIASES, WITHOUT_ALIAS, WRITTEN_FROM

LAYER_COUNT_NAMES = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_blocks", "decoder_layers", "num_decoder_layers")
NESTED_TEXT_CONFIGS = ("text_config", "language_config", "llm_config", "text_decoder_config", "decoder_config")
INDEX_WORDS = ("layer", "idx", "ind")
NOT_PER_LAYER = ("architectures", "eos_token_id", "bos_token_id", "pad_token_id", "suppress_tokens",
                 "begin_suppress_tokens")


def _count_aliases(model_type: str | None) -> set[str]:
    """The names transformers' config class for `model_type` maps onto num_hidden_layers: from the table
    written from transformers (count_aliases.py), else asked of the installed transformers (empty without it)."""
    if not model_type:
        return set()
    if model_type in COUNT_ALIASES or model_type in WITHOUT_ALIAS or installed_transformers() == WRITTEN_FROM:
        return set(COUNT_ALIASES.get(model_type, ()))  # (a type the table's transformers lacks: it has none either)
    try:
        from transformers import CONFIG_MAPPING
        cls = CONFIG_MAPPING[model_type]
    except Exception:  # noqa: BLE001 - transformers absent, or a model type it does not know
        return set()
    return {v for k, v in getattr(cls, "attribute_map", {}).items() if k == "num_hidden_layers"}


def installed_transformers() -> str | None:
    """"transformers X.Y.Z" as installed, read from its metadata (importing it costs a second), or None."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"transformers {version('transformers')}"
    except PackageNotFoundError:
        return None


def layer_count_keys(holder: dict, layers: int, stack: str = "") -> list[str]:
    """The keys of `holder` that state the layer count `layers` of `stack`. In an encoder-decoder the other
    side's counts are left alone even when equal (Whisper's encoder_layers, T5's num_layers beside
    num_decoder_layers: the encoder's), so cutting one side never resizes the other."""
    names = set(LAYER_COUNT_NAMES) | _count_aliases(holder.get("model_type"))
    keys = [k for k, v in holder.items() if k in names and type(v) is int and v == layers]
    side = encoder_decoder_side(holder, stack)
    if side == "decoder":
        keys = [k for k in keys if "encoder" not in k and not (k == "num_layers" and "num_decoder_layers" in holder)]
    elif side == "encoder":
        keys = [k for k in keys if "decoder" not in k]
    return keys


def encoder_decoder_side(holder: dict, stack: str) -> str | None:
    """"encoder" or "decoder" when `stack` is one side of an encoder-decoder config (T5, Whisper, BART)."""
    if not (holder.get("is_encoder_decoder") or any("decoder" in k for k in holder) and any("encoder" in k for k in holder)):
        return None
    last = stack.lower().rsplit(".", 2)
    for side in ("decoder", "encoder"):
        if any(side in part for part in last):
            return side
    return None


def language_config(config: dict, layers: int, stack: str = "") -> tuple[str, dict] | None:
    """(path, dict) of the config that describes the language stack's `layers`: the one that states the
    count (the top level, else a nested text config), else a top level without nested text configs."""
    if layer_count_keys(config, layers, stack):
        return "", config
    for key in NESTED_TEXT_CONFIGS:
        nested = config.get(key)
        if isinstance(nested, dict) and layer_count_keys(nested, layers, stack):
            return key + ".", nested
    if not any(isinstance(config.get(key), dict) for key in NESTED_TEXT_CONFIGS):
        return "", config  # a count the config derives from its per-layer lists (nemotron_h's layers_block_type)
    return None


def is_layer_index_list(key: str, value, layers: int) -> bool:
    """Distinct ascending layer numbers under a name that says so (`layer`, `idx`, `ind`): fewer than n,
    or all n of them ([0, 1, .., n-1] reads as "every layer")."""
    return (any(w in key.lower() for w in INDEX_WORDS) and isinstance(value, list) and 0 < len(value) and all(type(v) is int and 0 <= v < layers for v in value)
            and value == sorted(set(value)) and (len(value) < layers or value == list(range(layers))))


def _prefix_kinds(h: dict, n: int) -> list[bool]:  # deepseek-style: the first k layers are dense
    return [i < h["first_k_dense_replace"] for i in range(n)]


def _restate_prefix(h: dict, kinds: list[bool]) -> dict | None:
    k = kinds.count(True)
    return {"first_k_dense_replace": k} if kinds == [True] * k + [False] * (len(kinds) - k) else None


def _period_rule(period: str, offset: str):
    """Jamba-style: layer i is of the kind when i % period == offset."""
    def kinds(h: dict, n: int) -> list[bool]:
        return [i % h[period] == h[offset] for i in range(n)]

    def restate(h: dict, kinds_: list[bool]) -> dict | None:
        for p in [h[period], *range(1, len(kinds_) + 1)]:
            for o in range(p):
                if kinds_ == [i % p == o for i in range(len(kinds_))]:
                    return {period: p, offset: o}
        return None
    return kinds, restate


def _interval_kinds(h: dict, n: int) -> list[bool]:  # ernie-style: every interval-th layer within [start, end]
    return [(i + 1) % h["moe_layer_interval"] == 0 and h["moe_layer_start_index"] <= i <= h["moe_layer_end_index"]
            for i in range(n)]


def _restate_interval(h: dict, kinds: list[bool]) -> dict | None:
    n, interval = len(kinds), h["moe_layer_interval"]
    for start in range(n):
        for end in range(start, n):
            values = {"moe_layer_interval": interval, "moe_layer_start_index": start, "moe_layer_end_index": end}
            if _interval_kinds(values, n) == kinds:
                return values
    return None


def _cycle_kinds(h: dict, n: int) -> list:  # recurrent-gemma: block_types repeated in a cycle
    return [h["block_types"][i % len(h["block_types"])] for i in range(n)]


def _restate_cycle(h: dict, kinds: list) -> dict:
    period = next(p for p in range(1, len(kinds) + 1) if all(kinds[i] == kinds[i % p] for i in range(len(kinds))))
    return {"block_types": kinds[:period]}


SEGMENTS = ("n_input_layers", "n_recurrent_layers", "n_output_layers")


def _segment_kinds(h: dict, n: int) -> list[int]:  # dory: input layers, then recurrent, then output
    bounds = [h[SEGMENTS[0]], h[SEGMENTS[0]] + h[SEGMENTS[1]]]
    return [sum(i >= b for b in bounds) for i in range(n)]


def _restate_segments(h: dict, kinds: list[int]) -> dict | None:
    return {k: kinds.count(j) for j, k in enumerate(SEGMENTS)} if kinds == sorted(kinds) else None


# Keys that give each layer its kind by arithmetic, not by a per-layer list: (keys, kind of each
# of n layers, a restatement of a sequence of kinds as key values, or None when none exists).
ARITHMETIC_KINDS = (
    (("first_k_dense_replace",), _prefix_kinds, _restate_prefix),
    (("attn_layer_period", "attn_layer_offset"), *_period_rule("attn_layer_period", "attn_layer_offset")),
    (("expert_layer_period", "expert_layer_offset"), *_period_rule("expert_layer_period", "expert_layer_offset")),
    (("moe_layer_interval", "moe_layer_start_index", "moe_layer_end_index"), _interval_kinds, _restate_interval),
    (("block_types",), _cycle_kinds, _restate_cycle),
    (SEGMENTS, _segment_kinds, _restate_segments),
)


def _stated_per_layer(holder: dict, kinds: list, layers: int, keys: tuple[str, ...]) -> bool:
    """Whether a per-layer list of the config partitions the layers as `kinds` does (e.g. bailing's
    `mlp_layer_types` beside the `first_k_dense_replace` it was derived from)."""
    same = [[kinds[i] == kinds[j] for j in range(layers)] for i in range(layers)]
    return any(isinstance(v, list) and len(v) == layers and k not in keys and len(set(map(str, v))) > 1
               and [[v[i] == v[j] for j in range(layers)] for i in range(layers)] == same
               for k, v in holder.items())


def restate_layer_kinds(holder: dict, layer_sources: list[int], layers: int, path: str = "") -> list[str]:
    """Keep keys that set layer kinds by arithmetic true of the output's layers: unchanged when the
    output's kinds follow from them as they are, restated when another value states them, and
    refused (MergeError) when no value can: the config would describe another model."""
    changes = []
    for keys, kinds_of, restate in ARITHMETIC_KINDS:
        if not all(isinstance(holder.get(k), (int, list)) and not isinstance(holder.get(k), bool) for k in keys):
            continue
        source = kinds_of(holder, layers)
        if _stated_per_layer(holder, source, layers, keys):
            continue  # a per-layer list says the same (it is rewritten layer by layer): it is what the model reads
        wanted = [source[s] for s in layer_sources]
        if kinds_of(holder, len(layer_sources)) == wanted:
            continue
        values = restate(holder, wanted)
        if values is None:
            raise MergeError(f"config.json: {', '.join(path + k for k in keys)} give(s) each layer its kind by arithmetic, "
                             f"and these slices (layers {','.join(map(str, layer_sources))}) order the kinds in a way no "
                             f"value of them can state; choose slices that keep the pattern")
        for k, v in values.items():
            if holder[k] != v:
                changes.append(f"{path}{k}: {holder[k]} -> {v}")
                holder[k] = v
    return changes


def relayer_config(config: dict, layer_sources: list[int], layers: int, stack: str = "") -> list[str]:
    """Rewrite `config` in place for output layers taken from `layer_sources` of a `layers`-layer donor
    (of layer stack `stack`, e.g. `decoder.block`); returns one line per key changed, e.g.
    "layer_types: 4 entries -> 6 (from layers 0,1,2,1,2,3)"."""
    found = language_config(config, layers, stack)
    if found is None:
        return []
    path, holder = found
    new = len(layer_sources)
    changes = []
    taken = ",".join(map(str, layer_sources))
    changes += restate_layer_kinds(holder, layer_sources, layers, path)
    side = encoder_decoder_side(holder, stack)
    if "num_decoder_layers" in holder and holder["num_decoder_layers"] is None and side is not None:
        # T5: a null decoder count means "as many as num_layers", the encoder's: stated, so one side moves alone
        holder["num_decoder_layers"] = new if side == "decoder" else layers
        changes.append(f"{path}num_decoder_layers: null -> {holder['num_decoder_layers']}")
    for key in layer_count_keys(holder, layers, stack):
        holder[key] = new
        changes.append(f"{path}{key}: {layers} -> {new}")
    for key, value in list(holder.items()):
        if key in NOT_PER_LAYER or key.endswith("token_id"):
            continue
        if is_layer_index_list(key, value, layers):
            listed = set(value)
            holder[key] = [k for k, s in enumerate(layer_sources) if s in listed]
            changes.append(f"{path}{key}: layers {value} -> {holder[key]}")
        elif isinstance(value, dict) and value and "layer" in key and all(str(k).isdigit() and int(k) < layers for k in value):
            holder[key] = {str(k): value[str(s)] for k, s in enumerate(layer_sources) if str(s) in value}
            changes.append(f"{path}{key}: layers {sorted(map(int, value))} -> {sorted(map(int, holder[key]))}")
        elif isinstance(value, list) and len(value) == layers:
            holder[key] = [value[s] for s in layer_sources]
            changes.append(f"{path}{key}: {layers} entries -> {new} (from layers {taken})")
        elif isinstance(value, str) and len(value) == layers and "pattern" in key:
            holder[key] = "".join(value[s] for s in layer_sources)
            changes.append(f"{path}{key}: '{value}' -> '{holder[key]}' (from layers {taken})")
    return changes
