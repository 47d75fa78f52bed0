"""The output vocabulary of a merge and where each of its rows comes from, as mergekit 0.1.5 does it.

    tokenizer_source / tokenizer: ──► VocabularyPlan: output tokenizer (transformers), padded row count,
                                       per model: output token id -> its own row (or none)
    PlanBuilder, per vocabulary tensor ──► one TensorInfo per model whose RowGather (engine/inputs/source.py)
                                           reads the output rows from that model's rows

Rules (mergekit 0.1.5, `mergekit/tokenizer/`):
- A tokenizer configuration (`tokenizer_source: union|base|MODEL`, or a `tokenizer:` section
  whose `source` defaults to union) makes every vocabulary tensor (embeddings, lm_head: see
  architectures/vocabulary.py) of every model a permutation into the output vocabulary. Without
  one, vocabularies must agree (or --truncate-vocab cuts them: engine/plan/merge_plan.py).
- base = `base_model`, else the first model of the recipe. Its tokenizer is loaded as is (fast).
- `base`: the output vocabulary is the base's tokenizer; `MODEL` (a recipe model or a folder):
  that tokenizer; `union`: the base's tokenizer, then every token of the other models' tokenizers
  (ids below their config's vocab_size) that it lacks, added with `add_tokens` (plain tokens in
  order of the models and of their ids; then the other models' added tokens, with their
  settings, first model wins). mergekit walks the vocabularies in hash order, so its order of
  the appended tokens changes from run to run; mergeng's is the order above, every run.
- `tokens:` keys missing from the output vocabulary are added (`add_tokens`), in recipe order.
- Rows, per vocabulary tensor, over the models of that tensor's merge (base included):
  a model that has the token (id below its vocab_size) keeps its own row, unless the token's
  entry says `force: true`; otherwise the row is the token's default:
    a `tokens:` entry: `source: MODEL` (that model's row of the token), `{kind: model_token,
    model, token | token_id}` (a row of that model, by its own vocabulary), `{kind: zero}`;
    no entry: the one model that has it, else the base if it has it, else the mean of the
    models that have it (summed in model order, then divided), zeros if none has it.
- `pad_to_multiple_of: N` rounds the row count up to a multiple of N; each model's padding rows
  are the mean of its own (permuted) rows; config.json's vocab_size is the padded count.
- Tied embeddings stay tied: a model without lm_head has one vocabulary tensor, permuted once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...architectures.vocabulary import config_vocab_holders
from ...errors import MergeError
from ..inputs.paths import tokenizer_folder
from ..inputs.source import RowGather, TensorInfo

if TYPE_CHECKING:
    from ..recipe.load import Recipe
    from ..inputs.source import ModelSource


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - the test extra installs it
        raise MergeError("a tokenizer configuration (tokenizer_source, tokenizer:, chat_template) needs the "
                         "`transformers` package: pip install 'mergeng[tokenizers]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def load_tokenizer(path: Path, who: str):
    """A folder's tokenizer, as transformers loads it (fast)."""
    from ..inputs.remote_code import remote_code_trusted
    from ..inputs.source import refuse_outside_tokenizer_files

    refuse_outside_tokenizer_files(path, who)  # the files and code it names stay inside the folder
    try:
        tokenizer = _transformers().AutoTokenizer.from_pretrained(str(path), use_fast=True, trust_remote_code=remote_code_trusted())
    except MergeError:
        raise
    except Exception as e:  # noqa: BLE001  transformers raises many kinds; one line names the folder
        raise MergeError(f"{who}: cannot load its tokenizer from {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    template = tokenizer.chat_template  # saved with the output: a template transformers cannot write fails now, not after the merge
    if template is not None and not isinstance(template, str) and not (
            isinstance(template, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in template.items())):
        raise MergeError(f"{who}: the chat_template of {path / 'tokenizer_config.json'} is neither text nor a map of names to "
                         "text; fix it, or choose another tokenizer_source")
    return tokenizer


@dataclass(frozen=True)
class TokenDefault:
    """Where a token's row comes from when a model lacks it (or `force`): model row / model token / zero."""

    kind: str  # "model" (the model's row of this token), "model_token" (a row of the model's own vocabulary), "zero", "none"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class VocabularyPlan:
    tokenizer: Any  # the output tokenizer (transformers), saved by engine/output/files.py
    vocab: dict[str, int]  # output token -> id
    rows: int  # output rows: len(vocab) rounded up to pad_to_multiple_of
    permutations: dict[str, list[int]]  # model -> its row of each output id (-1: it lacks the token)
    original_vocabs: dict[str, dict[str, int]]  # model -> its tokenizer's vocabulary
    tokens: dict[str, TokenDefault]  # the recipe's `tokens:` entries
    base: str
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_by_id(self) -> list[str]:
        out = [""] * len(self.vocab)
        for tok, i in self.vocab.items():
            out[i] = tok
        return out

    def fingerprint(self) -> str:
        """A digest of the output vocabulary and every permutation: what a resumed run must find unchanged."""
        h = hashlib.sha256(json.dumps(sorted(self.vocab.items())).encode())
        for model in sorted(self.permutations):
            h.update(model.encode() + json.dumps(self.permutations[model]).encode())
        h.update(str(self.rows).encode())
        return h.hexdigest()

    def map_inputs(self, out_name: str, labelled: list[tuple[str, TensorInfo]], base_model: str | None) -> list[TensorInfo]:
        """The inputs of one vocabulary tensor's merge, each as a gather of its rows into the output vocabulary."""
        models = [m for m, _ in labelled]
        info_of = dict(labelled)
        for m, info in labelled:
            if m not in self.permutations:
                raise MergeError(f"tensor '{out_name}': model '{m}' has no tokenizer permutation")
            if len({i.shape[1:] for _, i in labelled}) != 1:
                desc = ", ".join(f"{mm} {list(i.shape)}" for mm, i in labelled)
                raise MergeError(f"tensor '{out_name}': shapes differ between models beyond the vocabulary ({desc})")
        perms = {m: self._usable(m, info_of[m]) for m in models}
        n = len(self.vocab)
        defaults: list[tuple[tuple[TensorInfo, int], ...]] = []
        default_of: dict[int, int] = {}  # output id -> index into defaults (absent: zeros)
        self._nowhere: list[str] = []
        for tok, tid in self.vocab.items():
            entry = self.tokens.get(tok)
            present = [m for m in models if perms[m][tid] >= 0]
            if len(present) == len(models) and not (entry and entry.force):
                continue
            terms = self._default_terms(out_name, tok, tid, entry, models, present, perms, info_of, base_model)
            if terms is None:
                continue
            default_of[tid] = len(defaults)
            defaults.append(terms)
        if self._nowhere:
            self._warn(f"tensor '{out_name}': {len(self._nowhere)} token(s) of the output vocabulary are in none of its "
                       f"models' vocabularies (e.g. {self._nowhere[0]!r}): their rows are zeros")
        result = []
        forced = {self.vocab[t] for t, e in self.tokens.items() if e.force and t in self.vocab}
        for m, info in labelled:
            p = perms[m]
            index = []
            for tid in range(n):
                if p[tid] >= 0 and tid not in forced:
                    index.append(p[tid])
                elif tid in default_of:
                    index.append(-2 - default_of[tid])
                else:
                    index.append(-1)
            padded = self.rows > n
            if not padded and self.rows == info.shape[0] and index == list(range(n)):
                result.append(info)  # already in the output order: read as stored
                continue
            index += [-1] * (self.rows - n)
            gather = RowGather(info, index, defaults, mean_from=n if padded else None)
            result.append(replace(info, shape=(self.rows,) + tuple(info.shape[1:]), patch=gather))
        return result

    def _usable(self, model: str, info: TensorInfo) -> list[int]:
        """The model's permutation, with rows past this tensor's row count treated as missing."""
        return [r if r < info.shape[0] else -1 for r in self.permutations[model]]

    def _default_terms(self, out_name, tok, tid, entry, models, present, perms, info_of, base_model):
        """(tensor, row) pairs whose mean is the token's default row; () for zeros; None for no default (zeros, as mergekit)."""
        if entry is None:  # mergekit's assignment: one holder, else the base, else the mean of the holders
            if len(present) == 1:
                entry = TokenDefault("model", present[0])
            elif not present:
                self._nowhere.append(tok)
                return ()
            elif base_model in models and perms[base_model][tid] >= 0:
                entry = TokenDefault("model", base_model)
            else:
                return tuple((info_of[m], perms[m][tid]) for m in present)
        if entry.kind == "zero":
            return ()
        if entry.kind == "none":
            raise MergeError(f"recipe field 'tokenizer.tokens.{tok}': some model lacks this token (or force is set), "
                             f"so it needs a 'source' (a model, {{kind: model_token, ...}} or {{kind: zero}})")
        m = entry.model
        if m not in info_of:
            raise MergeError(f"recipe field 'tokenizer.tokens.{tok}': token {tok!r} takes its row of '{out_name}' from "
                             f"model '{m}', which is not among this tensor's models ({', '.join(info_of)})")
        if entry.kind == "model_token":
            row = entry.token_id
            if row is None:
                vocab = self.original_vocabs.get(m, {})
                if entry.token not in vocab:
                    raise MergeError(f"recipe field 'tokenizer.tokens.{tok}.source.token': {entry.token!r} is not in "
                                     f"the vocabulary of model '{m}'")
                row = vocab[entry.token]
            if not 0 <= row < info_of[m].shape[0]:
                raise MergeError(f"recipe field 'tokenizer.tokens.{tok}.source': token id {row} is out of range for "
                                 f"model '{m}' ({info_of[m].shape[0]} rows in '{info_of[m].name}')")
            return ((info_of[m], row),)
        row = perms[m][tid]
        if row < 0:
            raise MergeError(f"recipe field 'tokenizer.tokens.{tok}.source': model '{m}' does not have token {tok!r}")
        return ((info_of[m], row),)

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)


def tokenizer_settings(recipe: Recipe) -> tuple[str, dict[str, TokenDefault], int | None] | None:
    """(source, token entries, pad_to_multiple_of) when the recipe configures a tokenizer, else None."""
    section = recipe.tokenizer
    if section is None and recipe.tokenizer_source is None:
        return None
    if section is not None and recipe.tokenizer_source is not None:
        raise MergeError("recipe: give either 'tokenizer_source' or a 'tokenizer:' section, not both (as mergekit)")
    if section is None:
        return recipe.tokenizer_source, {}, None
    tokens = {}
    for tok, cfg in (section.tokens or {}).items():
        src = cfg.source
        if src is None:
            tokens[tok] = TokenDefault("none", force=cfg.force)
        elif isinstance(src, str):
            tokens[tok] = TokenDefault("model", src, force=cfg.force)
        elif src.kind == "zero":
            tokens[tok] = TokenDefault("zero", force=cfg.force)
        else:
            tokens[tok] = TokenDefault("model_token", src.model, src.token, src.token_id, force=cfg.force)
    return section.source, tokens, section.pad_to_multiple_of


def config_vocab_size(source: ModelSource) -> int | None:
    holders = config_vocab_holders(source.config)
    return holders[0]["vocab_size"] if holders else None


def build_vocabulary(recipe: Recipe, sources: dict[str, ModelSource], base: str, recipe_dir: Path | None = None) -> VocabularyPlan | None:
    """The output vocabulary and each model's permutation into it, or None without a tokenizer configuration."""
    settings = tokenizer_settings(recipe)
    if settings is None:
        return None
    choice, tokens, pad = settings
    for tok, entry in tokens.items():
        if entry.model is not None and entry.model not in sources:
            raise MergeError(f"recipe field 'tokenizer.tokens.{tok}.source': '{entry.model}' is not a model of the recipe")
    if pad is not None and pad < 1:
        raise MergeError(f"recipe field 'tokenizer.pad_to_multiple_of': must be a positive whole number, got {pad}")
    warnings: list[str] = []
    tokenizers = {base: load_tokenizer(sources[base].path, f"model '{base}'")}
    for m, src in sources.items():
        if m == base:
            continue
        try:
            tokenizers[m] = load_tokenizer(src.path, f"model '{m}'")
        except MergeError as e:  # mergekit: assume the base's tokenizer
            warnings.append(f"{e}; its vocabulary is taken to be the base's ('{base}')")
    sizes = {m: config_vocab_size(sources[m]) or len(t.get_vocab()) for m, t in tokenizers.items()}
    base_tok = tokenizers[base]
    past = [t for t, i in base_tok.get_vocab().items() if i >= sizes[base]]
    if past:
        raise MergeError(f"model '{base}': its tokenizer has {len(past)} token(s) past its vocab_size {sizes[base]} "
                         f"(e.g. {past[0]!r}); mergeng does not strip them (mergekit does, for BPE tokenizers only)")
    if choice == "union":
        out = _union(base, sources, tokenizers, sizes)
    elif choice == "base":
        out = load_tokenizer(sources[base].path, f"model '{base}'")
    elif choice in sources:
        out = load_tokenizer(sources[choice].path, f"model '{choice}'")
    else:
        path = tokenizer_folder(choice, recipe_dir)
        if path is None:
            raise MergeError(f"recipe field 'tokenizer_source': '{choice}' is not 'union', 'base', a model of the recipe or a folder")
        out = load_tokenizer(path, f"tokenizer_source '{choice}'")
    existing = set(out.get_vocab())
    for tok in tokens:
        if tok not in existing:
            out.add_tokens(tok)
            existing.add(tok)
    vocab = out.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise MergeError(f"recipe field 'tokenizer_source': the output tokenizer's ids are not 0..{len(vocab) - 1} "
                         f"without gaps; mergeng cannot give each id an embedding row")
    rows = len(vocab)
    if pad and rows % pad:
        rows = (rows // pad + 1) * pad
    originals = {m: t.get_vocab() for m, t in tokenizers.items()}
    permutations = {}
    for m in sources:
        own = originals.get(m, originals[base])
        size = sizes.get(m) or config_vocab_size(sources[m]) or len(own)
        p = [-1] * len(vocab)
        for tok, tid in vocab.items():
            r = own.get(tok, -1)
            p[tid] = r if 0 <= r < size else -1
        permutations[m] = p
    return VocabularyPlan(out, vocab, rows, permutations, originals, tokens, base, warnings)


def _union(base: str, sources, tokenizers: dict, sizes: dict):
    """The base's tokenizer plus every other model's tokens it lacks (see the module's rules)."""
    out = load_tokenizer(sources[base].path, f"model '{base}'")
    base_vocab = tokenizers[base].get_vocab()
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for m, tok in tokenizers.items():
        decoder = tok.added_tokens_decoder
        for text, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < sizes[m]:
                plain.setdefault(text, None)
        for i in sorted(decoder):
            if i < sizes[m]:
                added.setdefault(decoder[i].content, decoder[i])
    for text in plain:
        if text not in added and text not in base_vocab:
            out.add_tokens(text)
    for info in added.values():
        out.add_tokens(info)
    return out


# -- chat templates -----------------------------------------------------------------------------
# mergekit's named templates, each written for mergeng to render the same text as mergekit's
# (transformers renders with trim_blocks and lstrip_blocks; tests/test_tokenizers.py compares).
NAMED_CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ '<|eot_id|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (system | last).content | trim if system else '' }}{{ '\\n\\n' }}"
        "{% set headings = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'} %}"
        "{% for m in messages %}{% if m['role'] in headings %}"
        "{{ '### ' ~ headings[m['role']] ~ ':\\n' ~ (m['content'] | trim) }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
        "{% for m in turns %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% if m['role'] == 'user' %}"
        "{{ ' [INST] ' ~ (system ~ '\\n\\n' if loop.first and system is defined else '') ~ m['content'] ~ ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' ~ m['content'] ~ eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
        "{% endif %}{% endfor %}"
    ),
    "exaone": (
        "{% for m in messages %}"
        "{% if loop.first and m['role'] != 'system' %}{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
        "{{ '    [|' ~ m['role'] ~ '|]' ~ m['content'] ~ '\\n' }}"
        "{{ '        \\n\\n' if m['role'] == 'user' else '        [|endofturn|]\\n\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"
    ),
}


def resolve_chat_template(recipe: Recipe, sources: dict[str, ModelSource]) -> str | None:
    """The recipe's `chat_template` as the Jinja text to save (None: leave the tokenizer's own), as mergekit reads it:
    `auto` is the template most of the models' tokenizers carry (none: no change), a short name
    without braces is a named template, anything else must be a Jinja template (20+ characters with a brace)."""
    value = recipe.chat_template
    if not value:
        return None
    if value == "auto":
        counts: dict[str, int] = {}
        for m, src in sources.items():
            try:
                template = load_tokenizer(src.path, f"model '{m}'").chat_template
            except MergeError:
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                counts[template.strip()] = counts.get(template.strip(), 0) + 1
        return max(counts, key=counts.get) if counts else None  # ties: the first model's
    if len(value) < 256 and "\n" not in value and "{" not in value and value in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise MergeError(f"recipe field 'chat_template': {value!r} is not 'auto', a named template "
                         f"({', '.join(NAMED_CHAT_TEMPLATES)}) or a Jinja template")
    return value
