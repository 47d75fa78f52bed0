"""Tokenizers and vocabularies as mergekit 0.1.5 does them (engine/plan/tokenizer_merge.py, RowGather in engine/inputs/source.py).

Models whose tokenizers differ (tests/vocab_models.py): added tokens, a reordered vocabulary, a
larger vocabulary, tied embeddings. Outputs are checked against formulas written here (the
output vocabulary computed by hand, each row the linear merge of the models' rows of that token
or of mergekit's default for a token a model lacks), and, where mergekit is installed in its own
venv, against mergekit itself.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli, load_tensors, load_with_transformers, merge
from vocab_models import BASE_WORDS, vocab_models

from mergeng.errors import MergeError
from mergeng.engine.plan.merge_plan import build_plan, open_sources
from mergeng.engine.recipe.load import parse_recipe
from mergeng.engine.inputs.source import RowGather, read_rows

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from mergekit_reference import mergekit_available, run_mergekit  # noqa: E402

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TEXT = "w5 zebra <|im_start|> w70 w59 nope </s>"


@pytest.fixture(scope="module")
def vm(tmp_path_factory) -> dict[str, Path]:
    return vocab_models(tmp_path_factory.mktemp("vocab"))


def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def by_id(vocab: dict[str, int]) -> list[str]:
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def linear_recipe(models: list[tuple[Path, float]], extra: str, base: Path | None = None) -> str:
    lines = ["merge_method: linear", "dtype: float32"] + ([f"base_model: {base}"] if base else []) + ["models:"]
    lines += [f"  - model: {m}\n    parameters: {{weight: {w}}}" for m, w in models]
    return "\n".join(lines) + "\n" + extra


def expected_rows(models: list[tuple[Path, float]], out_tokens: list[str], tensor: str, base: Path | None,
                  overrides: dict[str, dict] | None = None) -> torch.Tensor:
    """mergekit's rows, by hand: each model's row of each output token (its own, else the token's default),
    then the normalized linear merge."""
    overrides = overrides or {}
    own = {}
    for m, _ in models:
        vocab = tokenizer(m).get_vocab()
        weights = load_tensors(m)[tensor]
        own[m] = (vocab, weights)
    rows = []
    for tok in out_tokens:
        have = [m for m, _ in models if tok in own[m][0]]
        entry = overrides.get(tok)
        if entry is not None:
            default = entry["row"]()
        elif len(have) == 1:
            default = own[have[0]][1][own[have[0]][0][tok]]
        elif not have:
            default = torch.zeros(own[models[0][0]][1].shape[1])
        elif base in have:
            default = own[base][1][own[base][0][tok]]
        else:
            default = sum(own[m][1][own[m][0][tok]] for m in have) / len(have)
        total = torch.zeros_like(default)
        for m, w in models:
            forced = entry is not None and entry.get("force")
            row = own[m][1][own[m][0][tok]] if tok in own[m][0] and not forced else default
            total = total + w * row
        rows.append(total / sum(w for _, w in models))
    return torch.stack(rows)


# -- the output vocabulary and its rows, against formulas -----------------------------------------

def test_union_appends_the_other_models_tokens_and_each_row_follows_the_default_rules(tmp_path, vm):
    models = [(vm["base"], 0.5), (vm["added"], 0.3), (vm["larger"], 0.2)]
    out = merge(tmp_path, linear_recipe(models, "tokenizer_source: union\n", vm["base"]))
    tok = tokenizer(out)
    expected_order = BASE_WORDS + [f"w{i}" for i in range(60, 80)] + ["<|im_start|>", "<|im_end|>", "zebra"]
    assert by_id(tok.get_vocab()) == expected_order
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 83
    got = load_tensors(out)
    for name in VOCAB_TENSORS:
        assert got[name].shape == (83, 64)
        torch.testing.assert_close(got[name], expected_rows(models, expected_order, name, vm["base"]), rtol=1e-5, atol=1e-6)
    assert tok(TEXT)["input_ids"] == [5, 82, 80, 70, 59, 3, 2]
    assert tok.convert_ids_to_tokens(80) == "<|im_start|>" and tok.added_tokens_decoder[80].special
    load_with_transformers(out)
    from transformers import AutoModelForCausalLM

    generated = AutoModelForCausalLM.from_pretrained(out).generate(torch.tensor([[1, 5, 80]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7) and int(generated.max()) < 83


def test_a_token_only_some_models_have_is_their_mean_when_the_base_lacks_it(tmp_path, vm):
    # zebra & <|im_*|> are in `added` and `tied_added`... here: in `added` and a copy of it, not in the base
    twin = tmp_path / "twin"
    shutil.copytree(vm["added"], twin)
    models = [(vm["base"], 1.0), (vm["added"], 1.0), (twin, 2.0)]
    out = merge(tmp_path, linear_recipe(models, "tokenizer_source: union\n", vm["base"]))
    order = by_id(tokenizer(out).get_vocab())
    assert order[60:] == ["<|im_start|>", "<|im_end|>", "zebra"]
    got = load_tensors(out)["model.embed_tokens.weight"]
    torch.testing.assert_close(got, expected_rows(models, order, "model.embed_tokens.weight", vm["base"]), rtol=1e-5, atol=1e-6)
    # the base's row of zebra is the mean of the two models that have it, so the merge is that mean too
    a = load_tensors(vm["added"])["model.embed_tokens.weight"][62]
    torch.testing.assert_close(got[62], a, rtol=1e-5, atol=1e-6)


def test_tokenizer_source_base_permutes_a_reordered_vocabulary_by_token(tmp_path, vm):
    models = [(vm["base"], 0.25), (vm["reordered"], 0.75)]
    out = merge(tmp_path, linear_recipe(models, "tokenizer_source: base\n", vm["base"]))
    tok = tokenizer(out)
    assert by_id(tok.get_vocab()) == BASE_WORDS
    got = load_tensors(out)
    for name in VOCAB_TENSORS:
        torch.testing.assert_close(got[name], expected_rows(models, BASE_WORDS, name, vm["base"]), rtol=1e-5, atol=1e-6)
    # without the permutation the rows would be the reordered model's rows by id: they are not
    raw = 0.25 * load_tensors(vm["base"])[VOCAB_TENSORS[0]] + 0.75 * load_tensors(vm["reordered"])[VOCAB_TENSORS[0]]
    assert not torch.allclose(got[VOCAB_TENSORS[0]], raw)


def test_tokenizer_source_a_model_takes_its_vocabulary_and_fills_what_others_lack(tmp_path, vm):
    models = [(vm["base"], 0.5), (vm["reordered"], 0.25), (vm["larger"], 0.25)]
    out = merge(tmp_path, linear_recipe(models, f"tokenizer_source: {vm['larger']}\n", vm["base"]))
    order = by_id(tokenizer(out).get_vocab())
    assert order == BASE_WORDS + [f"w{i}" for i in range(60, 80)]
    got = load_tensors(out)
    for name in VOCAB_TENSORS:
        torch.testing.assert_close(got[name], expected_rows(models, order, name, vm["base"]), rtol=1e-5, atol=1e-6)


def tokens_section(vm, source: str = "base") -> str:
    return f"""tokenizer:
  source: {source}
  tokens:
    w5: {{source: {vm['reordered']}, force: true}}
    "<|im_start|>": {{source: {{kind: model_token, model: {vm['added']}, token: "<|im_end|>"}}}}
    newtok: {{source: {{kind: zero}}}}
    w7: {{source: {{kind: model_token, model: {vm['reordered']}, token_id: 9}}, force: true}}
"""


def test_token_overrides_add_tokens_and_force_their_rows(tmp_path, vm):
    models = [(vm["base"], 0.5), (vm["added"], 0.25), (vm["reordered"], 0.25)]
    out = merge(tmp_path, linear_recipe(models, tokens_section(vm), vm["base"]))
    order = by_id(tokenizer(out).get_vocab())
    assert order == BASE_WORDS + ["<|im_start|>", "newtok"]
    name = "model.embed_tokens.weight"
    added, reordered = load_tensors(vm["added"])[name], load_tensors(vm["reordered"])[name]
    re_vocab = tokenizer(vm["reordered"]).get_vocab()
    overrides = {
        "w5": {"force": True, "row": lambda: reordered[re_vocab["w5"]]},
        "<|im_start|>": {"row": lambda: added[61]},
        "newtok": {"row": lambda: torch.zeros(64)},
        "w7": {"force": True, "row": lambda: reordered[9]},
    }
    got = load_tensors(out)[name]
    torch.testing.assert_close(got, expected_rows(models, order, name, vm["base"], overrides), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[5], reordered[re_vocab["w5"]])  # forced: every model's row is the source's
    assert (got[61] == 0).all()


def test_pad_to_multiple_of_pads_with_each_models_mean_row_and_sets_vocab_size(tmp_path, vm):
    models = [(vm["base"], 0.5), (vm["added"], 0.3), (vm["larger"], 0.2)]
    extra = "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n"
    out = merge(tmp_path, linear_recipe(models, extra, vm["base"]))
    assert len(tokenizer(out).get_vocab()) == 83
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128
    got = load_tensors(out)
    for name in VOCAB_TENSORS:
        assert got[name].shape == (128, 64)
        # linear is linear: the merge of each model's mean row is the mean of the merged rows
        torch.testing.assert_close(got[name][83:], got[name][:83].mean(0).expand(45, 64), rtol=1e-5, atol=1e-6)
    load_with_transformers(out)


def test_chunked_runs_give_the_same_bytes_as_whole_tensors(tmp_path, vm):
    models = [(vm["base"], 0.5), (vm["added"], 0.3), (vm["larger"], 0.2)]
    text = linear_recipe(models, "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n", vm["base"]).replace(
        "merge_method: linear", "merge_method: task_arithmetic")
    whole = merge(tmp_path, text, name="whole")
    chunked = merge(tmp_path, text, "--max-unit", "8K", name="chunked")
    from mergeng.engine.run import prepare

    (tmp_path / "r.yml").write_text(text)
    prepared = prepare(tmp_path / "r.yml", max_unit_bytes=8 << 10)
    rows = dict(zip([t.output.name for t in prepared.plan.tasks], prepared.schedule.chunk_rows))
    assert all(rows[name] < 128 for name in VOCAB_TENSORS)  # the gathered embeddings really were chunked
    a, b = load_tensors(whole), load_tensors(chunked)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_gather_reads_any_row_range_as_the_whole_and_groups_runs_into_few_reads(vm, monkeypatch):
    recipe = parse_recipe(linear_recipe([(vm["base"], 0.5), (vm["reordered"], 0.5)],
                                        "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n", vm["base"]))
    plan = build_plan(recipe, open_sources(recipe, None))
    task = next(t for t in plan.tasks if t.output.name == "lm_head.weight")
    info = task.inputs[0]
    assert isinstance(info.patch, RowGather) and info.shape == (64, 64)
    whole = read_rows(info)
    for a, b in [(0, 1), (3, 17), (59, 64), (60, 64), (10, 60)]:
        torch.testing.assert_close(read_rows(info, a, b), whole[a:b], rtol=0, atol=0)
    calls = []
    import mergeng.engine.inputs.source as source

    real = source.read_rows
    monkeypatch.setattr(source, "read_rows", lambda i, a, b, *rest, **kw: calls.append(b - a) or real(i, a, b, *rest, **kw))
    reordered = next(i for m, i in task.all_inputs if m == str(vm["reordered"]))
    reordered.patch.read(10, 30)
    assert sum(calls) == 20  # a chunk reads only the source rows its output rows need ...
    vocab = tokenizer(vm["reordered"]).get_vocab()
    needed = sorted(vocab[w] for w in BASE_WORDS[10:30])
    runs = 1 + sum(1 for x, y in zip(needed, needed[1:]) if y != x + 1)
    assert len(calls) == runs < 20  # ... in one read per contiguous run of source rows, not one per row
    base_info = next(i for m, i in task.all_inputs if m == str(vm["base"]))
    calls.clear()
    read_rows(base_info, 0, 60)
    assert calls == [60]  # the base's own rows are one run


def test_tied_embeddings_stay_tied(tmp_path, vm):
    models = [(vm["tied_base"], 0.5), (vm["tied_added"], 0.5)]
    out = merge(tmp_path, linear_recipe(models, "tokenizer_source: union\n", vm["tied_base"]))
    got = load_tensors(out)
    assert "lm_head.weight" not in got and got["model.embed_tokens.weight"].shape == (63, 64)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 63
    model, _ = load_with_transformers(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_different_vocabularies_without_a_tokenizer_configuration_stay_an_error(tmp_path, vm):
    recipe = tmp_path / "r.yml"
    recipe.write_text(linear_recipe([(vm["base"], 0.5), (vm["larger"], 0.5)], "", vm["base"]))
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "vocabulary sizes differ" in result.output and "--truncate-vocab" in result.output


@pytest.mark.parametrize("extra, message", [
    ("tokenizer_source: union\ntokenizer: {source: base}\n", "either 'tokenizer_source' or a 'tokenizer:' section"),
    ("tokenizer: {source: base, tokens: {w5: {force: true}}}\n", "'tokenizer.tokens.w5': some model lacks this token (or force is set), so it needs a 'source'"),
    ("tokenizer: {source: base, tokens: {zz: {source: {kind: model_token, model: MODEL, token: nope}}}}\n", "'nope' is not in the vocabulary"),
    ("tokenizer: {source: base, tokens: {zz: {source: {kind: model_token, model: MODEL, token_id: 999}}}}\n", "token id 999 is out of range"),
    ("tokenizer: {source: base, tokens: {zz: {source: elsewhere}}}\n", "'elsewhere' is not a model of the recipe"),
    ("tokenizer: {source: base, pad_to_multiple_of: 0}\n", "pad_to_multiple_of': must be a positive"),
    ("tokenizer_source: base\nchat_template: nonsense\n", "'chat_template': 'nonsense' is not 'auto', a named template"),
])
def test_tokenizer_mistakes_are_one_line_errors_before_any_weight_is_read(vm, extra, message):
    recipe = parse_recipe(linear_recipe([(vm["base"], 0.5), (vm["added"], 0.5)], extra.replace("MODEL", str(vm["added"])), vm["base"]))
    with pytest.raises(MergeError) as e:
        build_plan(recipe, open_sources(recipe, None))
    assert message in str(e.value)


# -- chat templates -------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w5 w6"}]


def test_a_named_chat_template_is_saved_with_the_built_tokenizer(tmp_path, vm):
    out = merge(tmp_path, linear_recipe([(vm["base"], 0.5), (vm["added"], 0.5)], "tokenizer_source: union\nchat_template: chatml\n", vm["base"]))
    text = tokenizer(out).apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nw5 w6<|im_end|>\n<|im_start|>assistant\n"


def test_an_inline_chat_template_without_a_tokenizer_configuration_resaves_the_donors_tokenizer(tmp_path, vm):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    out = merge(tmp_path, linear_recipe([(vm["base"], 0.5), (vm["base"], 0.5)], f"chat_template: {json.dumps(template)}\n"))
    tok = tokenizer(out)
    assert tok.apply_chat_template(CHAT, tokenize=False) == "[system] be brief\n[user] w5 w6\n"
    assert by_id(tok.get_vocab()) == BASE_WORDS


def test_auto_takes_the_template_most_models_carry(tmp_path, vm):
    models = {}
    for name, template in (("x", "{{ 'one' }}{# padding to be long enough #}"), ("y", "{{ 'two' }}{# padding to be long enough #}"),
                           ("z", "{{ 'two' }}{# padding to be long enough #}")):
        models[name] = tmp_path / name
        shutil.copytree(vm["base"], models[name])
        tok = tokenizer(models[name])
        tok.chat_template = template
        tok.save_pretrained(str(models[name]))
    out = merge(tmp_path, linear_recipe([(models[k], 1.0) for k in "xyz"], "tokenizer_source: base\nchat_template: auto\n"))
    assert tokenizer(out).apply_chat_template(CHAT, tokenize=False) == "two"


# -- parity with mergekit 0.1.5 -------------------------------------------------------------------

PARITY = {
    "union": ("tokenizer_source: union\n", [("base", 0.5), ("added", 0.3), ("larger", 0.2)]),
    "union_reordered": ("tokenizer_source: union\n", [("base", 0.5), ("reordered", 0.2), ("added", 0.3)]),
    "base": ("tokenizer_source: base\n", [("base", 0.25), ("reordered", 0.5), ("added", 0.25)]),
    "model": ("tokenizer_source: {larger}\n", [("base", 0.5), ("reordered", 0.25), ("larger", 0.25)]),
    "tokens_force": (None, [("base", 0.5), ("added", 0.25), ("reordered", 0.25)]),
    "pad64": ("tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n", [("base", 0.5), ("added", 0.3), ("larger", 0.2)]),
    "chatml": ("tokenizer_source: base\nchat_template: chatml\n", [("base", 0.5), ("added", 0.5)]),
}


@pytest.mark.skipif(mergekit_available() is None, reason="mergekit-yaml not installed (see benchmarks/mergekit_reference.py)")
@pytest.mark.parametrize("case", sorted(PARITY))
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_same_vocabulary_rows_and_encoding_as_mergekit(tmp_path, vm, case, method):
    extra, weights = PARITY[case]
    # mergekit 0.1.5 crashes (KeyError) on `source: base` with tokens the base lacks: its base tokenizer is the
    # output tokenizer object, so the added tokens land in the base's own vocabulary past its vocab_size
    extra = tokens_section(vm, "union") if extra is None else extra.format(**{k: v for k, v in vm.items()})
    models = [(vm[k], w) for k, w in weights]
    text = linear_recipe(models, extra, vm["base"]).replace("merge_method: linear", f"merge_method: {method}")
    ours = merge(tmp_path, text, name="ours")
    (tmp_path / "theirs.yml").write_text(text)
    run_mergekit(tmp_path / "theirs.yml", tmp_path / "theirs")
    theirs = tmp_path / "theirs"
    tok_a, tok_b = tokenizer(ours), tokenizer(theirs)
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    assert set(va) == set(vb)
    # mergekit appends other models' plain tokens in hash order (a new order each run); everything else is fixed
    added_anywhere = {t for m, _ in weights for t in tokenizer(vm[m]).added_tokens_encoder}
    in_models = {t for m, _ in weights for t in tokenizer(vm[m]).get_vocab()}
    hash_ordered = {t for t in va if t in in_models - set(tokenizer(vm["base"]).get_vocab()) - added_anywhere} \
        if "tokenizer:\n  source: union" in extra or "tokenizer_source: union" in extra else set()
    assert {t: i for t, i in va.items() if t not in hash_ordered} == {t: i for t, i in vb.items() if t not in hash_ordered}
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == json.loads((theirs / "config.json").read_text())["vocab_size"]
    a, b = load_tensors(ours), load_tensors(theirs)
    assert set(a) == set(b)
    order = torch.tensor([vb[t] for t in by_id(va)])
    for name in a:
        x, y = a[name], b[name]
        if name in VOCAB_TENSORS:
            assert x.shape == y.shape, name
            y = torch.cat([y[order], y[len(va):]])  # their rows in our token order (padding rows: a mean, order-free)
        err = float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-12))
        assert err <= 1e-4, f"{case}/{method}: {name} relative error {err:.2e}"
    ids_a, ids_b = tok_a(TEXT)["input_ids"], tok_b(TEXT)["input_ids"]
    assert tok_a.convert_ids_to_tokens(ids_a) == tok_b.convert_ids_to_tokens(ids_b)
    if not hash_ordered:
        assert ids_a == ids_b
    if "chat" in case:
        assert tok_a.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
            tok_b.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    load_with_transformers(ours)


SLICES = """merge_method: passthrough
dtype: float32
slices:
  - sources: [{{model: {base}, layer_range: [0, 2]}}]
  - sources: [{{model: {added}, layer_range: [2, 4]}}]
tokenizer_source: union
"""


def test_slices_take_embeddings_from_the_first_slice_and_lm_head_from_the_last_each_in_the_union(tmp_path, vm):
    recipe = parse_recipe(SLICES.format(**vm))
    plan = build_plan(recipe, open_sources(recipe, None))
    assert any("'model.embed_tokens.weight': 3 token(s) of the output vocabulary are in none of its models'" in w
               for w in plan.warnings)
    out = merge(tmp_path, SLICES.format(**vm))
    got, base, added = load_tensors(out), load_tensors(vm["base"]), load_tensors(vm["added"])
    embed, head = got["model.embed_tokens.weight"], got["lm_head.weight"]
    assert embed.shape == head.shape == (63, 64)
    torch.testing.assert_close(embed[:60], base["model.embed_tokens.weight"])
    assert (embed[60:] == 0).all()  # the base (the only model of the first slice) lacks them: zeros, as mergekit
    torch.testing.assert_close(head, added["lm_head.weight"])


@pytest.mark.skipif(mergekit_available() is None, reason="mergekit-yaml not installed (see benchmarks/mergekit_reference.py)")
def test_slices_with_a_union_vocabulary_as_mergekit(tmp_path, vm):
    ours = merge(tmp_path, SLICES.format(**vm), name="ours")
    (tmp_path / "theirs.yml").write_text(SLICES.format(**vm))
    run_mergekit(tmp_path / "theirs.yml", tmp_path / "theirs")
    assert tokenizer(ours).get_vocab() == tokenizer(tmp_path / "theirs").get_vocab()
    a, b = load_tensors(ours), load_tensors(tmp_path / "theirs")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_a_built_vocabulary_is_saved_even_with_no_copy_tokenizer(tmp_path, vm):
    text = linear_recipe([(vm["base"], 0.5), (vm["added"], 0.5)], "tokenizer_source: union\n", vm["base"])
    out = merge(tmp_path, text, "--no-copy-tokenizer")
    assert len(tokenizer(out).get_vocab()) == 63  # mergekit saves the tokenizer it built whatever --copy-tokenizer says
    plain = merge(tmp_path, linear_recipe([(vm["base"], 0.5), (vm["base"], 0.5)], ""), "--no-copy-tokenizer", name="plain")
    assert not (plain / "tokenizer.json").exists()


def test_plan_shows_the_output_vocabulary_and_what_each_model_lacks(tmp_path, vm):
    recipe = tmp_path / "union.yml"
    recipe.write_text(linear_recipe([(vm["base"], 0.5), (vm["added"], 0.5)], "tokenizer_source: union\n", vm["base"]))
    result = cli("plan", recipe)
    assert result.exit_code == 0 and "output vocabulary:" in result.output, result.output
    summary = json.loads(cli("plan", recipe, "--format", "json").output)
    assert summary["vocabulary"]["tokens"] > 0 and set(summary["vocabulary"]["lacking"]) == {str(vm["base"]), str(vm["added"])}
