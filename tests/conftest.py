"""Shared fixtures: tiny Llama-shaped models the tests build themselves (no downloads)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# No test reaches the internet: a model reference that is no folder goes to a Hub that refuses at once
# (the discard port), tokens and caches of whoever runs the suite are not seen. Hub tests start their own
# stand-in (tests/hub_server.py) and point HF_ENDPOINT at it.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mergeng-test-hf-")
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(_name, None)

from mergeng.cli.tiny_models import TINY, make_llama


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Three float32 variants (base, a, b) and a bfloat16 set, sharded into several files."""
    root = tmp_path_factory.mktemp("models")
    models = {}
    for k, name in enumerate(("base", "a", "b")):
        models[name] = make_llama(root / name, TINY, variant=k, shard_size=60_000)
        models[name + "_bf16"] = make_llama(root / (name + "_bf16"), TINY, variant=k, dtype="bfloat16")
    return models


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path
