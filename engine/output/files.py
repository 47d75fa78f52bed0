"""The non-weight files of a merged model folder: config, tokenizer, model card, recipe.

A config with `auto_map` names custom modeling code: the donor's `*.py` files are copied next
to it, or the output would not load (build_plan warns about it). The code is copied, never run;
the names an auto_map gives were checked to lie inside the donor's folder when its config.json
and tokenizer_config.json were read (engine/inputs/source.py refuse_outside_code).

Tokenizer: with a tokenizer configuration (plan.vocabulary, engine/plan/tokenizer_merge.py) the
output tokenizer is saved with transformers' `save_pretrained`; without one the donor's
tokenizer files are copied as they are, unless a `chat_template` is set, in which case the
donor's tokenizer is loaded and saved again with it (as mergekit). Generation and processor
files are copied from the donor either way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...errors import MergeError
from ..inputs.paths import tokenizer_folder
from ..inputs.source import refuse_outside_tokenizer_files
from ..plan.hub_inputs import input_identity
from ..plan.merge_plan import MergePlan

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "preprocessor_config.json", "processor_config.json",
)

GENERATION_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json")

OUTPUT_FILES = ("config.json", "README.md", "mergeng_recipe.yml", "model.safetensors.index.json")


def tokenizer_donor(plan: MergePlan) -> Path:
    """Folder whose tokenizer and generation files are copied: tokenizer_source, else base, else first.
    The code its tokenizer_config.json's auto_map names must lie inside it (it is copied as it is)."""
    donor = _tokenizer_donor(plan)
    refuse_outside_tokenizer_files(donor, "tokenizer donor")
    return donor


def _tokenizer_donor(plan: MergePlan) -> Path:
    choice = plan.recipe.tokenizer_source or (plan.recipe.tokenizer.source if plan.recipe.tokenizer else None)
    if choice in (None, "base", "union"):
        return plan.sources[plan.config_donor].path
    if choice in plan.sources:
        return plan.sources[choice].path
    path = tokenizer_folder(choice, None)
    if path is None:
        raise MergeError(f"recipe field 'tokenizer_source': '{choice}' is not 'base', a model of the recipe or a folder")
    return path


def write_output_files(plan: MergePlan, out_dir: Path, recipe_text: str, *, copy_tokenizer: bool = True,
                       write_model_card: bool = True) -> None:
    """`copy_tokenizer=False`: no tokenizer files copied from the donor (generation and processor files are
    still copied; a tokenizer built by a tokenizer configuration is still saved, as mergekit does);
    `write_model_card=False`: no README.md."""
    out_dir = Path(out_dir)
    if plan.config:  # a donor without config.json gives none (a warning), never a fake "{}"
        (out_dir / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    donor = tokenizer_donor(plan)
    tokenizer = plan.vocabulary.tokenizer if plan.vocabulary is not None else None
    if copy_tokenizer and tokenizer is None and plan.chat_template is not None:
        from ..plan.tokenizer_merge import load_tokenizer

        tokenizer = load_tokenizer(donor, "tokenizer donor")
    if tokenizer is not None and (copy_tokenizer or plan.vocabulary is not None):
        # a built vocabulary is saved whatever --copy-tokenizer says (as mergekit): the embeddings follow its ids
        if plan.chat_template is not None:
            tokenizer.chat_template = plan.chat_template
        try:
            tokenizer.save_pretrained(str(out_dir))
        except (OSError, MergeError):
            raise
        except Exception as e:  # noqa: BLE001  transformers refusing what a donor's files hold: one line, the merge is kept
            raise MergeError(f"tokenizer donor {donor}: transformers cannot save its tokenizer ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); the weights are written: fix the donor's tokenizer "
                             "files and run the same command again, or add --no-copy-tokenizer", exit_code=1) from None
    for name in GENERATION_FILES if tokenizer is not None or not copy_tokenizer else TOKENIZER_FILES:
        if (donor / name).exists():
            shutil.copyfile(donor / name, out_dir / name)
    if "auto_map" in plan.config:
        for code in sorted(plan.sources[plan.config_donor].path.glob("*.py")):
            shutil.copyfile(code, out_dir / code.name)
    (out_dir / "mergeng_recipe.yml").write_text(recipe_text)
    if write_model_card:
        (out_dir / "README.md").write_text(model_card(plan, recipe_text))


def model_card(plan: MergePlan, recipe_text: str) -> str:
    r = plan.recipe
    inputs = "\n".join(f"- `{m}`" + (f" (`{input_identity(src)}`)" if input_identity(src) else "")
                       + (" (base)" if m == r.base_model else "") for m, src in plan.sources.items())
    return f"""---
library_name: transformers
tags:
- mergeng
- merge
---
# {r.name or "Merged model"}

This model was merged with [mergeng](https://github.com/) using the **{r.merge_method}** method.

## Inputs
{inputs}

## Recipe
```yaml
{recipe_text.strip()}
```
"""
