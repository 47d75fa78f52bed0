"""The example recipes in configs/ are valid recipes (schema, methods and parameters)."""

from pathlib import Path

import pytest

from mergeng.engine.recipe.load import load_recipe
from mergeng.methods.registry import get_method

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yml") if p.name != "moe.yml"), ids=lambda p: p.name)
def test_example_recipe_is_valid(path):
    recipe = load_recipe(path)
    method = get_method(recipe.merge_method)
    given = set(recipe.parameters) | {k for m in recipe.models or [] for k in m.parameters}
    assert given <= set(method.parameters), f"{path.name}: parameters {given - set(method.parameters)} unknown to {method.name}"


def test_example_moe_config_is_valid():
    from mergeng.engine.builders.moe import parse_moe_config

    config = parse_moe_config((CONFIGS / "moe.yml").read_text(), "moe.yml")
    assert config.gate_mode == "hidden" and len(config.experts) == 2
