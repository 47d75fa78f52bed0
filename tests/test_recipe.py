"""Recipe parsing and parameter resolution follow mergekit's semantics (METHODS.md)."""

import pytest

from mergeng.errors import MergeError
from mergeng.engine.recipe.load import gradient_value, is_unset, parse_recipe, resolve_parameter


def recipe(text):
    return parse_recipe(text)


def test_gradient_interpolates_linearly_between_anchor_points():
    assert gradient_value([0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert gradient_value([0.2, 0.5, 0.8], 0.75) == pytest.approx(0.65)  # s=1.5: halfway between 0.5 and 0.8
    assert gradient_value([1.0, 0.0, 0.0, 1.0], 1.0) == pytest.approx(1.0)
    assert gradient_value([3.0], 0.4) == 3.0


def test_first_matching_filter_wins_and_no_match_falls_through_to_lower_level():
    r = recipe("""
merge_method: linear
models:
  - model: a
    parameters:
      weight:
        - filter: self_attn
          value: 0.1
        - filter: mlp
          value: [0.0, 1.0]
parameters:
  weight: 0.7
""")
    levels = [r.models[0].parameters, r.parameters]
    assert resolve_parameter("weight", levels, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.1
    assert resolve_parameter("weight", levels, "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve_parameter("weight", levels, "model.norm.weight", 0.0) == 0.7  # falls through


def test_condition_without_filter_matches_everything():
    r = recipe("""
merge_method: slerp
base_model: a
models: [{model: a}, {model: b}]
parameters:
  t:
    - filter: mlp
      value: 0.9
    - value: 0.3
""")
    assert resolve_parameter("t", [r.parameters], "model.layers.0.mlp.x", 0) == 0.9
    assert resolve_parameter("t", [r.parameters], "lm_head.weight", 0) == 0.3


def test_model_parameters_take_precedence_over_top_level():
    r = recipe("""
merge_method: linear
models:
  - model: a
    parameters: {weight: 2.0}
  - model: b
parameters: {weight: 0.5}
""")
    assert resolve_parameter("weight", [r.models[0].parameters, r.parameters], "x", 0) == 2.0
    assert resolve_parameter("weight", [r.models[1].parameters, r.parameters], "x", 0) == 0.5
    assert is_unset(resolve_parameter("density", [r.models[1].parameters, r.parameters], "x", 0))


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodels:\n  - model: a\n    paramters: {}", "models[0].paramters': unknown field"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: {x: 1}", "models[0].parameters.weight'"),
    ("merge_method: linear\nmodels: [{model: a}]\ndtype: float8", "'dtype': unknown dtype 'float8'"),
    ("merge_method: linear\nslices:\n  - sources:\n      - model: a\n        layer_range: [4, 2]", "slices[0].sources[0].layer_range'"),
    ("merge_method: linear\nmodels: [{model: a}]\n  bad: [", "YAML syntax error at line"),
    ("models: [{model: a}]", "'merge_method': Field required"),
    ("merge_method: linear", "exactly one of 'models', 'slices' or 'modules'"),
])
def test_bad_recipes_give_one_line_errors_naming_the_field(text, message):
    with pytest.raises(MergeError) as e:
        recipe(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
