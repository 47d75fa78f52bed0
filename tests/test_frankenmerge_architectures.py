"""A `slices` frankenmerge of any architecture: the output config describes the new layers.

The classic frankenmerge of an n-layer model, layers [0, n-1) then [1, n) (2n-2 layers), of one
architecture for each kind of config difference; `benchmarks/frankenmerge_sweep.py` runs it on
every causal LM transformers builds.
"""

import json

import pytest

from causal_lm_models import check_frankenmerge, frankenmerge_recipe, make_causal_lm
from helpers import cli, merge
from mergeng.architectures.config_layers import relayer_config
from mergeng.engine.plan.output_config import config_changes

ARCHITECTURES = {
    "llama": "num_hidden_layers only",
    "gpt2": "layer count named n_layer (attribute_map)",
    "bart": "decoder of an encoder-decoder: decoder_layers",
    "qwen3": "layer_types, a per-layer list",
    "gemma3_text": "layer_types validated against the count",
    "laguna": "per-layer head counts (num_attention_heads_per_layer)",
    "axk1": "mlp_layer_types: dense first layer, then sparse",
    "nemotron_h": "no count key: derived from layers_block_type",
    "bamba": "layer indices: attn_layer_indices",
    "roberta": "masked-LM head: lm_head.dense is hidden-sized, lm_head.decoder is the vocabulary",
    "moshi": "vocabulary tensors of different row counts in one model (its tokenizer still fits)",
    "deepseek_v3": "dense layers first by arithmetic: first_k_dense_replace",
    "gemma4_unified_text": "per-layer overrides keyed by layer index: per_layer_config {'3': {...}}",
    "gemma4_text": "per-layer embeddings packed outside the stack: embed_tokens_per_layer (columns), per_layer_model_projection (rows)",
    "xlm": "one layer in four sibling stacks: transformer.attentions.N, ffns.N, layer_norm1.N, layer_norm2.N",
}


@pytest.fixture(scope="session")
def tiny_causal_lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_lms")
    return {name: (root / name, make_causal_lm(root / name, name, 4)) for name in ARCHITECTURES}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_frankenmerge_loads_with_the_new_layer_count_and_a_consistent_config(tmp_path, tiny_causal_lms, architecture):
    pytest.importorskip("transformers")
    src, layers = tiny_causal_lms[architecture]
    out = merge(tmp_path, frankenmerge_recipe(src, layers))
    check_frankenmerge(src, out, layers)


def test_per_layer_lists_are_taken_from_each_output_layers_source_layer():
    config = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "no_rope_layers": [1, 0, 1, 1],
              "num_attention_heads_per_layer": [2, 4, 8, 16], "hybrid_override_pattern": "M*-E"}
    relayer_config(config, [0, 1, 2, 1, 2, 3], 4)
    assert config == {"num_hidden_layers": 6, "layer_types": ["a", "b", "c", "b", "c", "d"],
                      "no_rope_layers": [1, 0, 1, 0, 1, 1], "num_attention_heads_per_layer": [2, 4, 8, 4, 8, 16],
                      "hybrid_override_pattern": "M*-*-E"}


def test_layer_index_lists_name_the_output_layers_cut_from_the_layers_they_named():
    config = {"num_hidden_layers": 4, "mlp_only_layers": [0, 3], "attn_layer_indices": [1], "full_attn_idxs": [0, 1, 2, 3]}
    relayer_config(config, [0, 1, 2, 1, 2, 3], 4)
    assert config["mlp_only_layers"] == [0, 5]
    assert config["attn_layer_indices"] == [1, 3]
    assert config["full_attn_idxs"] == [0, 1, 2, 3, 4, 5]


def test_lists_that_are_not_about_layers_are_left_alone():
    config = {"n_layer": 4, "eos_token_id": [1, 2, 3, 4], "architectures": ["A", "B", "C", "D"], "L_bp_cycles": [2],
              "rope_scaling": {"mrope_section": [1, 2, 3, 4]}, "hidden_act": "gelu"}
    relayer_config(config, [0, 1, 2, 1, 2, 3], 4)
    assert config == {"n_layer": 6, "eos_token_id": [1, 2, 3, 4], "architectures": ["A", "B", "C", "D"],
                      "L_bp_cycles": [2], "rope_scaling": {"mrope_section": [1, 2, 3, 4]}, "hidden_act": "gelu"}


def test_every_name_of_the_layer_count_is_updated_in_the_language_config_only():
    config = {"model_type": "llava", "text_config": {"num_hidden_layers": 4, "num_layers": 4, "layer_types": list("abcd")},
              "vision_config": {"num_hidden_layers": 4, "layer_types": list("wxyz")}}
    relayer_config(config, [0, 1, 2, 1, 2, 3], 4)
    assert config["text_config"] == {"num_hidden_layers": 6, "num_layers": 6, "layer_types": list("abcbcd")}
    assert config["vision_config"] == {"num_hidden_layers": 4, "layer_types": list("wxyz")}


def test_plan_config_changes_list_each_key_the_frankenmerge_rewrote(tmp_path, tiny_causal_lms):
    src, layers = tiny_causal_lms["qwen3"]
    out = merge(tmp_path, frankenmerge_recipe(src, layers))
    before = json.loads((src / "config.json").read_text())
    changes = config_changes(before, json.loads((out / "config.json").read_text()))
    assert "num_hidden_layers: 4 -> 6" in changes
    assert any(c.startswith("layer_types: ") for c in changes)


def test_plan_says_which_config_keys_a_frankenmerge_changes(tmp_path, tiny_causal_lms):
    src, layers = tiny_causal_lms["qwen3"]
    recipe = tmp_path / "franken.yml"
    recipe.write_text(frankenmerge_recipe(src, layers))
    result = cli("plan", recipe)
    assert result.exit_code == 0 and "config.json changes:" in result.output
    assert f"num_hidden_layers: {layers} -> {2 * layers - 2}" in result.output.replace("\n", " ")
    summary = json.loads(cli("plan", recipe, "--format", "json").output)
    assert any(line.startswith("layer_types:") for line in summary["config_changes"])


def test_layer_kinds_set_by_arithmetic_are_restated_or_refused():
    from mergeng.errors import MergeError

    # deepseek-style: layers 0-2 dense; a frankenmerge of layers 0,1,2,1,2,3 has five dense layers first
    config = {"num_hidden_layers": 4, "first_k_dense_replace": 3}
    relayer_config(config, [0, 1, 2, 1, 2, 3], 4)
    assert config == {"num_hidden_layers": 6, "first_k_dense_replace": 5}
    # a dense layer after a MoE one cannot be said with a prefix count
    with pytest.raises(MergeError, match="first_k_dense_replace"):
        relayer_config({"num_hidden_layers": 4, "first_k_dense_replace": 1}, [0, 1, 0, 1], 4)
    # a per-layer list beside the count it was derived from is what the model reads: rewritten, no refusal
    config = {"num_hidden_layers": 4, "first_k_dense_replace": 2, "mlp_layer_types": ["dense", "dense", "sparse", "sparse"]}
    relayer_config(config, [0, 1, 2, 1, 2, 3], 4)
    assert config["mlp_layer_types"] == ["dense", "dense", "sparse", "dense", "sparse", "sparse"]
    # jamba-style period/offset: experts on odd layers stay on odd layers when the slices keep parity
    config = {"num_hidden_layers": 4, "expert_layer_period": 2, "expert_layer_offset": 1}
    relayer_config(config, [0, 1, 2, 3, 2, 3], 4)
    assert config["expert_layer_period"] == 2 and config["expert_layer_offset"] == 1
    config = {"num_hidden_layers": 4, "expert_layer_period": 2, "expert_layer_offset": 1}
    relayer_config(config, [1, 0, 1, 0], 4)  # odd, even, odd, even: now offset 0
    assert (config["expert_layer_period"], config["expert_layer_offset"]) == (2, 0)
    # a cycle of block types is restated as the cycle the output's layers follow
    config = {"num_hidden_layers": 4, "block_types": ["recurrent", "recurrent", "attention"]}
    relayer_config(config, [0, 1, 2, 1, 2, 3], 4)
    assert config["block_types"] == ["recurrent", "recurrent", "attention", "recurrent", "attention"]  # layer 5: the cycle's first
    # segments (input, recurrent, output layers) stay counts while the slices keep their order
    config = {"num_hidden_layers": 4, "n_input_layers": 1, "n_recurrent_layers": 2, "n_output_layers": 1}
    relayer_config(config, [0, 1, 2, 1, 2, 3], 4)
    assert (config["n_input_layers"], config["n_recurrent_layers"], config["n_output_layers"]) == (1, 4, 1)
    with pytest.raises(MergeError, match="n_input_layers"):
        relayer_config({"num_hidden_layers": 4, "n_input_layers": 1, "n_recurrent_layers": 2, "n_output_layers": 1}, [0, 3, 0, 3], 4)


def test_a_config_transformers_would_refuse_is_said_at_plan_time(tmp_path):
    """dory's config.json states its layer segments doubled (one per attention and mlp block), which
    no rule here rewrites: the plan says transformers refuses the result instead of leaving it to a load."""
    pytest.importorskip("transformers")
    src = tmp_path / "dory"
    layers = make_causal_lm(src, "dory", 4)
    recipe = tmp_path / "franken.yml"
    recipe.write_text(frankenmerge_recipe(src, layers))
    result = cli("plan", recipe)
    assert result.exit_code == 0 and "refuses the re-layered config" in result.output.replace("\n", " ")
    assert cli("run", recipe, "-o", tmp_path / "out", "--strict").exit_code == 2
    # without --strict, run asks transformers in a thread beside the merge: the answer still reaches its
    # output and report.json, in the place the plan gives it
    ran = cli("run", recipe, "-o", tmp_path / "out")
    assert ran.exit_code == 0 and "refuses the re-layered config" in ran.output.replace("\n", " ")
    report = json.loads((tmp_path / "out" / ".mergeng" / "report.json").read_text())
    planned = json.loads(cli("plan", recipe, "--format", "json").output)["warnings"]
    assert report["warnings"] == planned and any("refuses the re-layered config" in w for w in planned)
    good = tmp_path / "llama.yml"
    llama = tmp_path / "llama"
    good.write_text(frankenmerge_recipe(llama, make_causal_lm(llama, "llama", 4)))
    assert "refuses" not in cli("plan", good).output


def deepseek_with_prediction_layer(folder) -> int:
    """A tiny DeepSeek-V3 whose stack ends with a multi-token-prediction layer, stored as DeepSeek stores it:
    layer num_hidden_layers, a copy of a decoder layer plus enorm, hnorm, eh_proj and shared_head."""
    import torch
    from safetensors.torch import load_file, save_file

    layers = make_causal_lm(folder, "deepseek_v3", 4)
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    gen = torch.Generator().manual_seed(7)
    for name in [n for n in tensors if n.startswith(f"model.layers.{layers - 1}.")]:
        tensors[name.replace(f"layers.{layers - 1}.", f"layers.{layers}.")] = torch.randn(tensors[name].shape, generator=gen)
    h = config["hidden_size"]
    for key, shape in (("enorm.weight", (h,)), ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)),
                       ("shared_head.norm.weight", (h,)), ("shared_head.head.weight", (config["vocab_size"], h))):
        tensors[f"model.layers.{layers}.{key}"] = torch.randn(shape, generator=gen)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    return layers


def test_a_deepseek_frankenmerge_keeps_its_prediction_layer_after_the_new_last_layer(tmp_path):
    """The MTP layer (layer 4 of 4 main layers) is never one of the slices' layers: it follows the output's six
    layers as layer 6, whole; the config counts six main layers and still one prediction layer; transformers
    loads the result and runs it. A slice that reaches the MTP layer is refused in one line."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    src = tmp_path / "ds"
    layers = deepseek_with_prediction_layer(src)
    stored = load_file(src / "model.safetensors")
    out = merge(tmp_path, frankenmerge_recipe(src, layers))
    got = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_nextn_predict_layers"]) == (6, 1)
    mtp = {n.removeprefix("model.layers.4."): v for n, v in stored.items() if n.startswith("model.layers.4.")}
    assert {n.removeprefix("model.layers.6."): v for n, v in got.items() if n.startswith("model.layers.6.")}.keys() == mtp.keys()
    for rest, value in mtp.items():
        assert torch_equal(got[f"model.layers.6.{rest}"], value), rest
    assert not any(n.startswith("model.layers.7.") for n in got)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    import torch

    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    reach = tmp_path / "reach.yml"
    reach.write_text(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {src}, layer_range: [0, 5]}}]\n")
    result = cli("plan", reach)
    assert result.exit_code == 2 and "multi-token-prediction" in result.output
    assert len(result.output.strip().splitlines()) == 1
    whole = tmp_path / "whole.yml"  # an ordinary merge keeps the prediction layer where it is
    whole.write_text(f"merge_method: linear\nmodels:\n  - model: {src}\n    parameters: {{weight: 1.0}}\ndtype: float32\n")
    assert cli("run", whole, "-o", tmp_path / "whole").exit_code == 0
    kept = load_file(tmp_path / "whole" / "model.safetensors")
    assert set(kept) == set(stored)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.float(), b.float())


@pytest.mark.parametrize("kind", ["t5", "whisper"])
def test_cutting_an_encoder_decoders_decoder_leaves_its_encoder_count_alone(tmp_path, kind):
    """T5's num_layers and Whisper's encoder_layers size the encoder: a decoder frankenmerge (4 -> 6 layers) must
    not rewrite them (before, the encoder grew two randomly initialised layers at load, in silence)."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    if kind == "t5":
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=None,
                                       num_heads=4, decoder_start_token_id=0)
        model, stack, encoder_key, decoder_key = transformers.T5ForConditionalGeneration(config), "decoder.block", "num_layers", "num_decoder_layers"
    else:
        config = transformers.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                                            max_source_positions=16, max_target_positions=32, pad_token_id=1, bos_token_id=2,
                                            eos_token_id=3, decoder_start_token_id=2)
        model, stack, encoder_key, decoder_key = transformers.WhisperForConditionalGeneration(config), "model.decoder.layers", "encoder_layers", "decoder_layers"
    src = tmp_path / kind
    model.save_pretrained(src)
    recipe = (f"merge_method: passthrough\nslices:\n  - sources: [{{model: {src}, layer_range: [0, 3]}}]\n"
              f"  - sources: [{{model: {src}, layer_range: [1, 4]}}]\n")
    out = merge(tmp_path, recipe)
    written = json.loads((out / "config.json").read_text())
    assert (written[encoder_key], written[decoder_key]) == (4, 6)
    loaded, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert len(getattr(loaded.get_decoder(), "block" if kind == "t5" else "layers")) == 6
    assert len(getattr(loaded.get_encoder(), "block" if kind == "t5" else "layers")) == 4
    del stack


@pytest.mark.parametrize("max_unit", [None, "2K"])
def test_per_layer_embedding_blocks_follow_their_layers(tmp_path, tiny_causal_lms, max_unit):
    """Gemma4/Gemma3n text: output block k of embed_tokens_per_layer (columns) and per_layer_model_projection (rows)
    is block s_k of the input, for layers 0,1,2,1,2,3; the same bytes whether or not the rows are chunked."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    src, layers = tiny_causal_lms["gemma4_text"]
    stored = load_file(src / "model.safetensors")
    args = ["--max-unit", max_unit] if max_unit else []
    out = merge(tmp_path, frankenmerge_recipe(src, layers), *args)
    got = load_file(out / "model.safetensors")
    sources = [0, 1, 2, 1, 2, 3]
    for name, dim in (("model.embed_tokens_per_layer.weight", 1), ("model.per_layer_model_projection.weight", 0)):
        width = stored[name].shape[dim] // layers
        want = [stored[name].narrow(dim, s * width, width) for s in sources]
        import torch

        assert torch.equal(got[name], torch.cat(want, dim)), name
