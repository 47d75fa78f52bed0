"""mergekit-yaml's command-line options declared for `mergeng run`: typer options only.

What each option means here (accepted, a no-op with a note, or refused for asking for a GPU),
the size notation and the README's table live in engine/recipe/mergekit_flags.py, which the Python
API shares; this module only puts them on the command line.
"""

from __future__ import annotations

from typing import Optional

import typer

from ..engine.recipe.mergekit_flags import MergekitFlags, parse_shard_size  # noqa: F401  (used by cli/app.py)

PANEL = "mergekit-yaml options"


def _flag(name: str, help: str, default: bool = False, hidden: bool = False):
    return typer.Option(default, f"--{name}/--no-{name}", help=help, rich_help_panel=PANEL, hidden=hidden)


# Options shared by `run` and `moe` (typer reads them from the command's signature).
CopyTokenizerOption = _flag("copy-tokenizer", "Copy the tokenizer into the output.", default=True)
WriteModelCardOption = _flag("write-model-card", "Write README.md (a model card with the recipe).", default=True)
AllowCrimesOption = _flag("allow-crimes", "Allow models of different architectures (config.json `architectures`).")
TrustRemoteCodeOption = _flag("trust-remote-code", "Let transformers run code a model carries (a custom tokenizer or config class named by auto_map). Off: none runs; custom *.py files are copied either way.")
VerboseOption = typer.Option(0, "--verbose", "-v", count=True, help="Print the plan (models, tensors, shards, predicted peak) before the run.", rich_help_panel=PANEL)
QuietOption = _flag("quiet", "No progress bar, notes or summary line; warnings and errors are still printed.")
NumThreadsOption = typer.Option(None, "--num-threads", "-j", help="torch's CPU threads for the run.", rich_help_panel=PANEL)
CudaOption = _flag("cuda", "Refused: mergeng computes on the CPU within --ram.")
DeviceOption = typer.Option(None, "--device", help="Only cpu (or auto): mergeng computes on the CPU within --ram.", rich_help_panel=PANEL)
ReadToGpuOption = _flag("read-to-gpu", "Refused: mergeng computes on the CPU within --ram.")
MultiGpuOption = _flag("multi-gpu", "Refused: mergeng computes on the CPU within --ram.")
GpuRichOption = typer.Option(False, "--gpu-rich", help="Refused: mergeng computes on the CPU within --ram.", rich_help_panel=PANEL)
SafeSerializationOption = _flag("safe-serialization", "Accepted: mergeng writes safetensors only (--no-safe-serialization is refused).", default=True)
LowCpuMemoryOption = _flag("low-cpu-memory", "No effect: --ram bounds the process's memory.")
LazyUnpickleOption = _flag("lazy-unpickle", "No effect: pytorch_model.bin is always read lazily.")
CloneTensorsOption = _flag("clone-tensors", "No effect: every tensor is written into its own byte range.")
AsyncWriteOption = _flag("async-write", "No effect: writes overlap compute on the worker threads.")
WriteThreadsOption = typer.Option(None, "--write-threads", help="No effect: --workers sets the worker threads.", rich_help_panel=PANEL)
TransformersCacheOption = typer.Option(None, "--transformers-cache", help="The cache Hub models are fetched into (default: the HF cache, HF_HUB_CACHE).", rich_help_panel=PANEL)
LoraMergeCacheOption = typer.Option(None, "--lora-merge-cache", help="No effect: adapters are applied at read time.", rich_help_panel=PANEL)
LoraMergeDtypeOption = typer.Option(None, "--lora-merge-dtype", help="No effect: LoRA products are computed in float32.", rich_help_panel=PANEL)


def set_num_threads(n: Optional[int]) -> None:
    """mergekit's --num-threads: torch's intra-op CPU threads (default: the cores shared among --workers)."""
    from ..engine.execute.executor import pin_threads

    pin_threads(n)
    if n is not None:
        import torch

        torch.set_num_threads(n)
