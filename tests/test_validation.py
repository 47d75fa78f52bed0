"""Nothing wrong in silence: what a recipe says that mergeng ignores is a warning, what it cannot honour an error.

Every test here names one case of engine/recipe/validation.py (and the shape/vocabulary rules of
merge_plan.py); each failed before those checks existed.
"""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

import torch
from conftest import write_recipe
from helpers import cli, load_tensors
from mergeng.errors import MergeError
from mergeng.engine.plan.merge_plan import build_plan, open_sources
from mergeng.engine.recipe.load import load_recipe, parse_recipe
from mergeng.cli.tiny_models import LlamaShape, make_llama


def plan_of(tmp_path: Path, text: str, truncate_vocab: bool = False):
    path = write_recipe(tmp_path, text)
    recipe = load_recipe(path)
    return build_plan(recipe, open_sources(recipe, path.parent), truncate_vocab=truncate_vocab)


def error_of(tmp_path: Path, text: str, truncate_vocab: bool = False) -> str:
    with pytest.raises(MergeError) as e:
        plan_of(tmp_path, text, truncate_vocab)
    assert "\n" not in str(e.value)
    return str(e.value)


def ties(m, top="", a="weight: 1.0", b="weight: 1.0"):
    return f"""merge_method: ties
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters: {{{a}}}
  - model: {m['b']}
    parameters: {{{b}}}
{top}"""


def task(plan, name):
    return next(t for t in plan.tasks if t.output.name == name)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, tiny_models):
    """Models that do not fit the tiny Llama: other vocab, other kv width, other names, no config, custom code."""
    root = tmp_path_factory.mktemp("odd")
    m = {"vocab300": make_llama(root / "vocab300", LlamaShape(vocab_size=300), variant=1),
         "wide_kv": make_llama(root / "wide_kv", LlamaShape(num_key_value_heads=4), variant=1)}
    other = root / "other_names"
    other.mkdir()
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(3, 5), "transformer.h.1.attn.c_attn.weight": torch.zeros(3, 5)},
              other / "model.safetensors")
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    m["other_names"] = other
    m["no_config"] = root / "no_config"
    shutil.copytree(tiny_models["a"], m["no_config"])
    (m["no_config"] / "config.json").unlink()
    m["custom"] = root / "custom"
    shutil.copytree(tiny_models["base"], m["custom"])
    cfg = json.loads((m["custom"] / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig"}
    (m["custom"] / "config.json").write_text(json.dumps(cfg))
    (m["custom"] / "configuration_tiny.py").write_text("# custom code\n")
    return m


# -- 1. unknown parameter names and keys ------------------------------------------------------------

def test_misspelt_parameters_are_warnings_naming_where_they_are_with_a_did_you_mean(tmp_path, tiny_models):
    plan = plan_of(tmp_path, ties(tiny_models, "parameters:\n  densty: 0.2\n  normalise: true\n",
                                  b="weight: 1.0, lamda: 2"))
    w = "\n".join(plan.warnings)
    assert "'parameters.densty': unknown parameter, ignored (did you mean 'density'?)" in w
    assert "'parameters.normalise': unknown parameter, ignored (did you mean 'normalize'?)" in w
    assert "'models[1].parameters.lamda': unknown parameter, ignored (did you mean 'lambda'?)" in w


def test_parameters_of_other_methods_and_global_parameters_per_model_are_ignored_with_a_warning(tmp_path, tiny_models):
    m = tiny_models
    plan = plan_of(tmp_path, f"""merge_method: slerp
base_model: {m['base']}
models:
  - model: {m['base']}
  - model: {m['a']}
    parameters: {{weight: 0.3, t: 0.9}}
parameters: {{t: 0.5}}
""")
    w = "\n".join(plan.warnings)
    assert "'models[1].parameters.weight': ignored by method slerp (it takes: t)" in w
    assert "'models[1].parameters.t': ignored: 't' is a global parameter of slerp" in w
    linear = plan_of(tmp_path, f"merge_method: linear\nmodels: [{{model: {m['a']}}}, {{model: {m['b']}}}]\nparameters: {{t: 0.5}}\n")
    assert any("'parameters.t': ignored by method linear" in x for x in linear.warnings)


def test_unknown_keys_are_warnings_with_a_did_you_mean_instead_of_errors(tmp_path, tiny_models):
    m = tiny_models
    plan = plan_of(tmp_path, f"""merge_method: linear
models:
  - model: {m['a']}
    note: first
  - model: {m['b']}
dype: bfloat16
""")
    assert "recipe field 'dype': unknown key, ignored; did you mean 'dtype'?" in plan.warnings
    assert "recipe field 'models[0].note': unknown key, ignored" in plan.warnings


def test_unknown_keys_in_slices_and_sources_are_warnings_too():
    recipe = parse_recipe("""merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
        note: from the model card
    residual_weight: 0.5
""")
    assert recipe.parse_warnings == ["recipe field 'slices[0].residual_weight': unknown key, ignored",
                                     "recipe field 'slices[0].sources[0].note': unknown key, ignored"]
    with pytest.raises(MergeError, match="'slices\\[0\\].sources\\[0\\].layer_rnage': unknown field; did you mean 'layer_range'"):
        parse_recipe("merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2], layer_rnage: [0, 3]}\n")


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {source: union, pad_to_multiple: 64}", "'tokenizer.pad_to_multiple': unknown field"),
    ("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {tokens: {x: {source: {kind: zero}, forse: true}}}", "'tokenizer.tokens.x.forse': unknown field"),
    ("merge_method: linear\nmodels: [{model: a}]\nmodules: {}", "exactly one of 'models', 'slices' or 'modules'"),
    ("merge_method: linear\nmodels: [{model: a}]\nexlude: ['lm_head*']", "'exlude': unknown field; did you mean 'exclude'?"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: {filer: mlp, value: 1}}}]", "models[0].parameters.weight"),
])
def test_keys_whose_absence_would_change_the_merge_stay_errors(text, message):
    with pytest.raises(MergeError) as e:
        parse_recipe(text)
    assert message in str(e.value) and "\n" not in str(e.value)


# -- 2. values ----------------------------------------------------------------------------------

def test_numbers_written_as_strings_and_booleans_as_numbers_are_read_as_mergekit_reads_them(tmp_path, tiny_models):
    m = tiny_models
    plan = plan_of(tmp_path, f"""merge_method: linear
models:
  - model: {m['a']}
    parameters: {{weight: 1e-1}}
  - model: {m['b']}
    parameters: {{weight: [1e-1, 1]}}
parameters: {{normalize: 0}}
""")
    params = task(plan, "model.norm.weight").params
    assert params["weight"] == [pytest.approx(0.1), pytest.approx(0.1)] and params["normalize"] is False
    karcher = plan_of(tmp_path, f"merge_method: karcher\nmodels: [{{model: {m['a']}}}, {{model: {m['b']}}}]\n"
                                f"parameters: {{max_iter: 3.0, tol: 1e-6, }}\n")
    assert task(karcher, "model.norm.weight").params == {"max_iter": 3, "tol": pytest.approx(1e-6)}


@pytest.mark.parametrize("text, message", [
    ("merge_method: karcher\nmodels: [{model: A}, {model: B}]\nparameters: {max_iter: 2.5}", "parameter 'max_iter' must be a whole number, got 2.5"),
    ("merge_method: linear\nmodels: [{model: A}, {model: B}]\nparameters: {normalize: 0.5}", "parameter 'normalize' must be true or false"),
])
def test_values_that_do_not_fit_the_parameter_type_are_one_line_errors(tmp_path, tiny_models, text, message):
    text = text.replace("A", str(tiny_models["a"])).replace("B", str(tiny_models["b"]))
    assert message in error_of(tmp_path, text)


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: []}", "'models[0].parameters.weight': an empty list"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: [{filter: mlp, value: []}]}}]", "'models[0].parameters.weight[0].value': an empty list"),
    ("merge_method: linear\nmodels: []", "'models': empty"),
    ("merge_method: passthrough\nslices: []", "'slices': empty"),
])
def test_empty_lists_are_one_line_errors_naming_the_field(text, message):
    with pytest.raises(MergeError) as e:
        parse_recipe(text)
    assert message in str(e.value) and "\n" not in str(e.value)


# -- 3. filters ---------------------------------------------------------------------------------

def test_a_filter_matching_no_tensor_is_a_warning_with_a_did_you_mean(tmp_path, tiny_models):
    m = tiny_models
    plan = plan_of(tmp_path, f"""merge_method: linear
models:
  - model: {m['a']}
    parameters:
      weight:
        - filter: self_atn
          value: 0.2
        - value: 1.0
  - model: {m['b']}
""")
    assert ("recipe field 'models[0].parameters.weight[0].filter': filter 'self_atn' matches no tensor name, "
            "so this value never applies; did you mean 'self_attn'?") in plan.warnings
    assert not any("weight[1]" in w for w in plan.warnings)


# -- 4. shapes ----------------------------------------------------------------------------------

def test_same_named_tensors_of_different_shapes_are_an_error_not_a_silent_cut_or_copy(tmp_path, tiny_models, odd_models):
    text = ties({"base": tiny_models["base"], "a": tiny_models["a"], "b": odd_models["wide_kv"]})
    msg = error_of(tmp_path, text)
    assert "tensor 'model.layers.0.self_attn.k_proj.weight': shapes differ between models" in msg
    assert "[32, 64]" in msg and "[64, 64]" in msg


def test_a_model_contributing_no_tensor_is_an_error_naming_it(tmp_path, tiny_models, odd_models):
    text = f"merge_method: linear\nmodels: [{{model: {tiny_models['a']}}}, {{model: {odd_models['other_names']}}}]\n"
    msg = error_of(tmp_path, text)
    assert f"model '{odd_models['other_names']}': none of its tensors matches" in msg


# -- 5. vocabulary ------------------------------------------------------------------------------

def test_different_vocabulary_sizes_are_an_error_suggesting_truncate_vocab(tmp_path, tiny_models, odd_models):
    msg = error_of(tmp_path, ties({"base": tiny_models["base"], "a": tiny_models["a"], "b": odd_models["vocab300"]}))
    assert "tensor 'model.embed_tokens.weight': vocabulary sizes differ between models" in msg
    assert "300" in msg and "256" in msg and "--truncate-vocab" in msg


def test_truncate_vocab_keeps_the_base_rows_and_says_so_in_warnings_and_report(tmp_path, tiny_models, odd_models):
    plan = plan_of(tmp_path, ties({"base": tiny_models["base"], "a": tiny_models["a"], "b": odd_models["vocab300"]}),
                   truncate_vocab=True)
    assert task(plan, "model.embed_tokens.weight").output.shape == (256, 64)
    assert any("'model.embed_tokens.weight': vocabulary cut to its first 256 rows" in w for w in plan.warnings)
    assert any("'lm_head.weight'" in w for w in plan.warnings)
    entry = next(r for r in plan.report if r["tensor"] == "lm_head.weight")
    assert "vocabulary cut to 256 rows" in entry["reason"]


def test_without_a_base_the_output_vocabulary_is_the_smallest_and_the_config_says_so(tmp_path, tiny_models, odd_models):
    big, small = odd_models["vocab300"], tiny_models["a"]
    text = f"merge_method: linear\nmodels: [{{model: {small}}}, {{model: {big}}}]\n"
    plan = plan_of(tmp_path, text, truncate_vocab=True)
    assert task(plan, "lm_head.weight").output.shape == (256, 64)
    assert plan.config["vocab_size"] == 256
    assert json.loads((big / "config.json").read_text())["vocab_size"] == 300


def test_a_tokenizer_larger_than_the_output_embedding_is_an_error(tmp_path, tiny_models, odd_models):
    big, small = odd_models["vocab300"], tiny_models["a"]
    msg = error_of(tmp_path, f"merge_method: linear\nmodels: [{{model: {big}}}, {{model: {small}}}]\n", truncate_vocab=True)
    assert "has a vocabulary of 300 but the output embedding has 256 rows" in msg
    # with a tokenizer configuration the embeddings are permuted into that tokenizer's vocabulary instead
    # (tests/test_tokenizers.py); a tokenizer_source that is no model and no folder stays an error
    msg = error_of(tmp_path, f"merge_method: linear\nmodels: [{{model: {small}}}, {{model: {small}}}]\ntokenizer_source: no/such\n")
    assert "recipe field 'tokenizer_source'" in msg and "no/such" in msg


def test_truncated_merge_runs_and_writes_the_new_vocab_size(tmp_path, tiny_models, odd_models):
    big, small = odd_models["vocab300"], tiny_models["a"]
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels: [{{model: {small}}}, {{model: {big}}}]\n"
                                    f"dtype: float32\n")
    assert cli("run", recipe, "-o", tmp_path / "no").exit_code == 2
    result = cli("run", recipe, "-o", tmp_path / "out", "--truncate-vocab")
    assert result.exit_code == 0, result.output
    got, a, b = load_tensors(tmp_path / "out"), load_tensors(small), load_tensors(big)
    torch.testing.assert_close(got["model.embed_tokens.weight"], (b["model.embed_tokens.weight"][:256] + a["model.embed_tokens.weight"]) / 2)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 256
    report = json.loads((tmp_path / "out" / ".mergeng" / "report.json").read_text())
    assert any("vocabulary cut" in w for w in report["warnings"])


# -- 6. slices ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["include: ['model.*']", "exclude: ['lm_head*']", "fill_from: a", "missing: base"])
def test_models_form_options_with_slices_are_errors(key):
    text = f"merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n{key}\n"
    with pytest.raises(MergeError) as e:
        parse_recipe(text)
    assert f"'{key.split(':')[0]}': not supported with slices" in str(e.value)


# -- 7. ranges ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, params, message", [
    ("ties", "weight: 1.0, density: 1.5", "parameter 'density' must be in (0, 1] for ties, got 1.5"),
    ("dare_ties", "weight: 1.0, density: 0", "parameter 'density' must be in (0, 1] for dare_ties, got 0.0"),
    ("breadcrumbs", "weight: 1.0, gamma: -0.1", "parameter 'gamma' must be in [0, 1] for breadcrumbs"),
    ("della", "weight: 1.0, density: 0.9, epsilon: 0.15", "density ± epsilon must lie in (0, 1) for della"),
])
def test_meaningless_parameter_values_are_errors_naming_parameter_and_model(tmp_path, tiny_models, method, params, message):
    m = tiny_models
    text = f"merge_method: {method}\nbase_model: {m['base']}\nmodels:\n  - model: {m['a']}\n    parameters: {{{params}}}\n"
    msg = error_of(tmp_path, text)
    assert message in msg and f"model '{m['a']}'" in msg


def test_slerp_t_outside_unit_interval_is_legal_extrapolation(tmp_path, tiny_models):
    m = tiny_models
    plan = plan_of(tmp_path, f"merge_method: slerp\nbase_model: {m['base']}\nmodels: [{{model: {m['base']}}}, {{model: {m['a']}}}]\nparameters: {{t: 1.5}}\n")
    assert task(plan, "model.norm.weight").params["t"] == 1.5 and not plan.warnings


# -- 8. config ----------------------------------------------------------------------------------

def test_a_donor_without_config_json_is_a_warning_saying_what_to_do(tmp_path, tiny_models, odd_models):
    plan = plan_of(tmp_path, f"merge_method: linear\nmodels: [{{model: {odd_models['no_config']}}}, {{model: {tiny_models['a']}}}]\n")
    assert any("no config.json" in w and "add config.json from the original model" in w for w in plan.warnings)
    recipe = tmp_path / "no-config.yml"
    recipe.write_text(f"merge_method: linear\nmodels: [{{model: {odd_models['no_config']}}}, {{model: {tiny_models['a']}}}]\n")
    result = cli("run", recipe, "-o", tmp_path / "merged")
    assert result.exit_code == 0 and "no config.json" in result.output
    assert not (tmp_path / "merged" / "config.json").exists()  # never a fake "{}"
    assert cli("run", recipe, "-o", tmp_path / "strict", "--strict").exit_code == 2


def test_the_donor_config_is_deep_copied_before_the_layer_count_changes(tmp_path, tiny_models):
    nested = tmp_path / "nested"
    shutil.copytree(tiny_models["a"], nested)
    cfg = json.loads((nested / "config.json").read_text())
    cfg["text_config"] = {"num_hidden_layers": cfg.pop("num_hidden_layers"), "vocab_size": cfg["vocab_size"]}
    (nested / "config.json").write_text(json.dumps(cfg))
    plan = plan_of(tmp_path, f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {nested}\n        layer_range: [0, 2]\n")
    assert plan.config["text_config"]["num_hidden_layers"] == 2
    assert plan.sources[str(nested)].config["text_config"]["num_hidden_layers"] == 4


def test_custom_code_is_copied_to_the_output_and_said_in_a_warning(tmp_path, tiny_models, odd_models):
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels: [{{model: {odd_models['custom']}}}, {{model: {tiny_models['a']}}}]\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "configuration_tiny.py").read_text() == "# custom code\n"
    report = json.loads((tmp_path / "out" / ".mergeng" / "report.json").read_text())
    assert any("custom code (auto_map" in w and "trust_remote_code" in w for w in report["warnings"])


# -- 9. plan shows every warning ----------------------------------------------------------------

def test_plan_text_and_json_show_every_warning(tmp_path, tiny_models):
    m = tiny_models
    recipe = write_recipe(tmp_path, ties(m, "dype: bfloat16\nparameters: {densty: 0.5}\n"))
    text = cli("plan", recipe).output
    summary = json.loads(cli("plan", recipe, "--format", "json").stdout)
    assert len(summary["warnings"]) == 2
    flat = " ".join(text.split())
    for w in summary["warnings"]:
        assert " ".join(w.split()) in flat
    strict = cli("run", recipe, "-o", tmp_path / "o", "--strict")
    assert strict.exit_code == 2 and "--strict" in strict.output


@pytest.mark.parametrize("text, field", [
    ("merge_method: sce\nbase_model: a\nselect_topk: 0.5\nmodels: [{model: a}, {model: b}]", "select_topk"),
    ("merge_method: multislerp\nint8_mask: true\nmodels: [{model: a}, {model: b}]", "int8_mask"),
    ("merge_method: linear\nmodels:\n  - model: a\n    weight: 0.5", "models[0].weight"),
])
def test_a_merge_parameter_outside_parameters_is_ignored_as_mergekit_ignores_it_and_said(text, field):
    """Published recipes put method parameters beside merge_method; mergekit ignored them, so the published
    models were made without them: the recipe runs as its author ran it, with a warning (--strict refuses)."""
    recipe = parse_recipe(text)
    said = [w for w in recipe.parse_warnings if f"'{field}'" in w]
    assert len(said) == 1 and "ignored as mergekit ignores it" in said[0] and "parameters:" in said[0]
    assert not recipe.parameters or field.split(".")[-1] not in recipe.parameters
