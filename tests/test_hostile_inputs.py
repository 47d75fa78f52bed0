"""Files from strangers: an index may name only files inside its model's own folder, however the name is
spelled; the user's own links are followed. Each refusal is one line (exit 2) naming the index and the file."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import write_recipe
from helpers import cli


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "/etc/passwd",
                                  "C:\\\\models\\\\x.safetensors", "https://example.com/x.safetensors", "~/x.safetensors",
                                  "a//b.safetensors"])
def test_an_index_naming_a_file_outside_the_model_is_refused(tmp_path, tiny_models, name):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["base"], model)
    outside = tmp_path / "outside.safetensors"
    first = sorted(model.glob("model-*.safetensors"))[0]
    shutil.copy(first, outside)  # a real file is there to be reached: only the rule stops it
    index = json.loads((model / "model.safetensors.index.json").read_text())
    victim = next(k for k, v in index["weight_map"].items() if v == first.name)
    index["weight_map"][victim] = name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "not inside the model's folder" in result.output and name in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_links_the_user_made_are_followed(tmp_path, tiny_models):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_models["base"].iterdir():  # every file a link to the original: the user's own arrangement
        (model / f.name).symlink_to(f)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
