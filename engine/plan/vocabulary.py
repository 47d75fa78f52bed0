"""Vocabulary sizes of models and of the output, and whether a tokenizer fits the output embedding.

A model's vocabulary size is its embedding rows (architectures/vocabulary.py says which
tensors are vocabulary-indexed), else its config's `vocab_size`.
"""

from __future__ import annotations

from ...architectures.vocabulary import config_vocab_holders, is_vocab_tensor
from ...errors import MergeError
from ..recipe.load import Recipe
from ..inputs.source import ModelSource
from .tensor_task import TensorTask


def output_vocab_rows(tasks: list[TensorTask]) -> int | None:
    rows = [t.output.shape[0] for t in tasks if is_vocab_tensor(t.output.name) and len(t.output.shape) >= 2]
    return min(rows) if rows else None


def vocab_rows(source: ModelSource) -> int | None:
    """A model's vocabulary size: its embedding rows, else its config's `vocab_size`."""
    rows = [i.shape[0] for n, i in source.tensors.items() if is_vocab_tensor(n) and len(i.shape) >= 2]
    if rows:
        return max(rows)
    holders = config_vocab_holders(source.config)
    return holders[0]["vocab_size"] if holders else None


def check_tokenizer_source(recipe: Recipe, sources: dict[str, ModelSource], donor: str, tasks: list[TensorTask]) -> None:
    """Without a tokenizer configuration the donor's tokenizer files are copied: they must not produce
    ids past the output embedding (generation would index out of range).

    With one (tokenizer_source, `tokenizer:`), engine/plan/tokenizer_merge.py builds the output
    vocabulary and every embedding is permuted into it, so there is nothing to check here."""
    if recipe.tokenizer_source is not None or recipe.tokenizer is not None:
        return
    donor_tensors = sources[donor].tensors
    if all(t.output.name in donor_tensors and donor_tensors[t.output.name].shape[:1] == t.output.shape[:1]
           for t in tasks if is_vocab_tensor(t.output.name)):
        return  # every embedding keeps the donor's rows: its tokenizer fits the output as it fits the donor
    tokens = vocab_rows(sources[donor])
    rows = output_vocab_rows(tasks)
    if tokens is not None and rows is not None and tokens > rows:
        raise MergeError(f"tokenizer (from the base, else the first model): '{donor}' has a vocabulary of {tokens} but "
                         f"the output embedding has {rows} rows; give a tokenizer configuration (tokenizer_source: "
                         f"union, base or a model) so embeddings are permuted into one vocabulary")
