"""Small helpers the tests share: load a model folder's tensors, run the CLI, load with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergeng.cli.app import app


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def merge(tmp_path: Path, recipe_text: str, *extra: str, name: str = "out") -> Path:
    """Write a recipe, run `mergeng run` on it into tmp_path/name, assert success, return the folder."""
    recipe = tmp_path / f"{name}.yml"
    recipe.write_text(recipe_text)
    out = tmp_path / name
    result = cli("run", recipe, "-o", out, *extra)
    assert result.exit_code == 0, result.output
    return out


def load_with_transformers(folder: Path):
    """Load a merged folder as a causal LM; assert nothing missing/unexpected; return finite logits."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all()
    return model, logits


def layer_t(name: str, layers: int) -> float:
    """mergekit's layer position: k/(n-1) inside the stack, 0 outside."""
    import re

    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) / (layers - 1) if m else 0.0


def gradient(values: list[float], t: float) -> float:
    s = t * (len(values) - 1)
    i = int(s)
    j = min(i + 1, len(values) - 1)
    return values[i] * (1 - (s - i)) + values[j] * (s - i)


def disk_full_after(monkeypatch, writes: int):
    """Make os.pwrite fail with ENOSPC (a full disk) after `writes` calls; returns what frees the space again."""
    import errno
    import os

    real_pwrite, calls = os.pwrite, {"n": 0}

    def pwrite_until_full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite_until_full)
    return lambda: monkeypatch.setattr(os, "pwrite", real_pwrite)
