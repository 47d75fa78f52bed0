"""Tiny Llama models whose tokenizers differ (added tokens, a reordered vocabulary, a larger vocabulary), for tests.

Each is engine/tiny_models.make_llama with as many embedding rows as tokens, and a word-level
tokenizer built with the `tokenizers` library and saved by transformers (no JSON edited by hand).
"""

from __future__ import annotations

import random
from pathlib import Path

from mergeng.cli.tiny_models import LlamaShape, make_llama

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
BASE_WORDS = SPECIALS + [f"w{i}" for i in range(4, 60)]


def write_word_tokenizer(out: Path, words: list[str], added: list[tuple[str, bool]] = ()) -> None:
    """A WordLevel tokenizer: `words` at ids 0.., then `added` tokens (content, special) via add_tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", model_max_length=256)
    for content, special in added:
        tok.add_tokens([AddedToken(content, special=special, normalized=not special)], special_tokens=special)
    tok.save_pretrained(str(out))


def make_vocab_model(out: Path, words: list[str], added: list[tuple[str, bool]] = (), variant: int = 0,
                     tie: bool = False) -> Path:
    shape = LlamaShape(vocab_size=len(words) + len(added), tie_word_embeddings=tie)
    make_llama(out, shape, variant=variant, shard_size=40_000)
    write_word_tokenizer(out, words, list(added))
    return out


def vocab_models(root: Path) -> dict[str, Path]:
    """base (60 tokens), added (+2 special, +1 plain added token), reordered (base's tokens shuffled),
    larger (+20 words in its model vocabulary), tied_base/tied_added (tied embeddings)."""
    shuffled = BASE_WORDS[:4] + random.Random(0).sample(BASE_WORDS[4:], len(BASE_WORDS) - 4)
    extra = [("<|im_start|>", True), ("<|im_end|>", True), ("zebra", False)]
    return {
        "base": make_vocab_model(root / "base", BASE_WORDS),
        "added": make_vocab_model(root / "added", BASE_WORDS, extra, variant=1),
        "reordered": make_vocab_model(root / "reordered", shuffled, variant=2),
        "larger": make_vocab_model(root / "larger", BASE_WORDS + [f"w{i}" for i in range(60, 80)], variant=3),
        "tied_base": make_vocab_model(root / "tied_base", BASE_WORDS, tie=True),
        "tied_added": make_vocab_model(root / "tied_added", BASE_WORDS, extra, variant=1, tie=True),
    }
