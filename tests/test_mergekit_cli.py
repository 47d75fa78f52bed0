"""mergekit's command line on `mergeng run`, the runnable examples and the Python API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli, load_tensors
from mergeng.engine.recipe.mergekit_flags import MERGEKIT_OPTIONS, parse_shard_size
from mergeng.cli.tiny_models import TINY, make_llama

ROOT = Path(__file__).resolve().parent.parent
MKVENV = Path("/work/mkvenv/bin/mergekit-yaml")
SMALL = ("--max-unit", "8K", "--workers", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mkcli")
    return {name: make_llama(root / name, TINY, variant=k) for k, name in enumerate(("base", "a"))}


def recipe(folder: Path, models: dict[str, Path], name: str = "r.yml") -> Path:
    path = folder / name
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {models['base']}\n    parameters: {{weight: 0.5}}\n"
                    f"  - model: {models['a']}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    return path


def one_line_error(result, *words: str, exit_code: int = 2) -> str:
    text = result.output.strip()
    assert result.exit_code == exit_code, result.output
    assert len(text.splitlines()) == 1 and text.startswith("error:"), text
    for w in words:
        assert w in text, text
    return text


# -- 1. mergekit-yaml's command line -----------------------------------------------------------

def test_run_takes_the_output_folder_as_second_argument_like_mergekit_yaml(tmp_path, models):
    result = cli("run", recipe(tmp_path, models), tmp_path / "out", *SMALL)
    assert result.exit_code == 0, result.output
    assert len(load_tensors(tmp_path / "out")) == 39


def test_out_path_and_a_different_o_is_one_line_error(tmp_path, models):
    result = cli("run", recipe(tmp_path, models), tmp_path / "one", "-o", tmp_path / "two")
    one_line_error(result, "OUT_PATH", "-o")
    assert not (tmp_path / "one").exists() and not (tmp_path / "two").exists()


def test_out_path_and_the_same_o_are_one_folder(tmp_path, models):
    assert cli("run", recipe(tmp_path, models), tmp_path / "same", "-o", tmp_path / "same", *SMALL).exit_code == 0


@pytest.mark.parametrize("text,size", [("5B", 5 * 10**9), ("5b", 5 * 10**9), ("500M", 5 * 10**8), ("100K", 10**5),
                                       ("1234", 1234), ("5G", 5 * 10**9), ("500MB", 5 * 10**8), ("1.5G", 1_500_000_000)])
def test_shard_size_reads_mergekits_notation_where_b_is_billion(text, size):
    assert parse_shard_size(text) == size


def test_shard_size_5b_writes_one_shard_not_one_per_tensor(tmp_path, models):
    out = tmp_path / "out"
    assert cli("run", recipe(tmp_path, models), out, "--out-shard-size", "5B", *SMALL).exit_code == 0
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert cli("run", recipe(tmp_path, models, "r2.yml"), tmp_path / "out2", "--shard-size", "100K", *SMALL).exit_code == 0
    assert len(json.loads((tmp_path / "out2" / "model.safetensors.index.json").read_text())["weight_map"]) == 39


def test_no_copy_tokenizer_and_no_model_card_leave_those_files_out(tmp_path, models):
    out = tmp_path / "out"
    assert cli("run", recipe(tmp_path, models), out, "--no-copy-tokenizer", "--no-write-model-card", *SMALL).exit_code == 0
    assert not (out / "tokenizer.json").exists() and not (out / "README.md").exists()
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    default = tmp_path / "default"
    assert cli("run", recipe(tmp_path, models, "r2.yml"), default, "--copy-tokenizer", "--write-model-card", *SMALL).exit_code == 0
    assert (default / "tokenizer.json").exists() and (default / "README.md").exists()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory, models) -> Path:
    folder = tmp_path_factory.mktemp("mistral") / "mistral"
    shutil.copytree(models["a"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_models_of_different_architectures_are_refused_without_allow_crimes(tmp_path, models, mistral):
    r = recipe(tmp_path, {"base": models["base"], "a": mistral})
    one_line_error(cli("run", r, tmp_path / "out"), "LlamaForCausalLM", "MistralForCausalLM", "--allow-crimes", str(mistral))
    one_line_error(cli("plan", r), "--allow-crimes")  # plan refuses as well: no run would follow it
    assert cli("run", r, tmp_path / "out", "--allow-crimes", *SMALL).exit_code == 0


def test_a_text_model_into_a_vlm_of_its_language_architecture_is_not_a_crime():
    from mergeng.engine.inputs.architecture_mix import refuse_mixed_architectures

    llava = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": {"model_type": "llama"}}
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    refuse_mixed_architectures({"vlm": llava, "text": llama})
    refuse_mixed_architectures({"unknown": {"model_type": "gpt2"}, "text": llama})  # no `architectures`: not compared
    qwen = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    with pytest.raises(Exception, match="allow-crimes"):
        refuse_mixed_architectures({"vlm": llava, "text": qwen})


@pytest.mark.parametrize("args,flag", [(["--cuda"], "--cuda"), (["--device", "cuda"], "--device cuda"),
                                       (["--device", "mps"], "--device mps"), (["--read-to-gpu"], "--read-to-gpu"),
                                       (["--multi-gpu"], "--multi-gpu"), (["--gpu-rich"], "--gpu-rich")])
def test_gpu_options_are_refused_never_run_silently_on_the_cpu(tmp_path, models, args, flag):
    text = one_line_error(cli("run", recipe(tmp_path, models), tmp_path / "out", *args), flag)
    assert "CPU" in text and "--ram" in text
    assert not (tmp_path / "out").exists()


def test_no_safe_serialization_is_refused(tmp_path, models):
    one_line_error(cli("run", recipe(tmp_path, models), tmp_path / "out", "--no-safe-serialization"), "safetensors")


def test_options_mergeng_does_anyway_are_accepted_with_a_note(tmp_path, models):
    result = cli("run", recipe(tmp_path, models), tmp_path / "out", "--lazy-unpickle", "--low-cpu-memory", "--clone-tensors",
                 "--async-write", "--write-threads", "2", "--transformers-cache", "/tmp/x", "--lora-merge-cache", "/tmp/y",
                 "--lora-merge-dtype", "float16", "--device", "cpu", "--no-cuda", "--safe-serialization",
                 "--trust-remote-code", "--random-seed", "3", "--unsafe-truncate-embeddings", *SMALL)
    assert result.exit_code == 0, result.output
    for flag in ("--lazy-unpickle", "--low-cpu-memory", "--clone-tensors", "--async-write", "--write-threads",
                 "--lora-merge-cache", "--lora-merge-dtype"):
        assert re.search(rf"note: {flag} has no effect", result.output), (flag, result.output)
    assert "--transformers-cache" not in result.output  # it has its meaning: the cache Hub models go to (test_hub.py)


def test_quiet_prints_no_summary_and_verbose_prints_the_plan(tmp_path, models):
    quiet = cli("run", recipe(tmp_path, models), tmp_path / "q", "--quiet", "--lazy-unpickle", *SMALL)
    assert quiet.exit_code == 0 and quiet.output.strip() == "", quiet.output
    verbose = cli("run", recipe(tmp_path, models, "v.yml"), tmp_path / "v", "-v", *SMALL)
    assert verbose.exit_code == 0 and "predicted peak RAM" in verbose.output and "merged" in verbose.output


def test_num_threads_sets_torchs_cpu_threads(tmp_path, models, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert cli("run", recipe(tmp_path, models), tmp_path / "out", "-j", "1", *SMALL).exit_code == 0
    assert calls[:2] == [1, 1]  # set by the option, then for the run's units (and restored after them)
    one_line_error(cli("run", recipe(tmp_path, models), tmp_path / "o2", "--num-threads", "0"), "--num-threads")


def test_version_and_h_on_every_command():
    from mergeng import __version__

    assert cli("--version").output.strip() == f"mergeng {__version__}"
    for command in ([], ["run"], ["plan"], ["moe"], ["lora"], ["lora", "apply"], ["lora", "extract"], ["lora", "merge"], ["demo"], ["examples"],
                    ["verify"], ["fill-missing"], ["methods"]):
        result = cli(*command, "-h")
        assert result.exit_code == 0 and "Usage" in result.output, (command, result.output)


def mergekit_yaml_options() -> list[str]:
    """Every option mergekit-yaml 0.1.5's --help lists (from its own venv)."""
    if not MKVENV.exists():
        pytest.skip("mergekit is not installed in /work/mkvenv")
    done = subprocess.run([str(MKVENV), "--help"], capture_output=True, text=True, timeout=300)
    flags = set()
    for line in done.stdout.splitlines():
        declaration = re.match(r"  (-\S.*?)(?:\s{2,}|$)", line)
        if declaration:
            flags |= set(re.findall(r"--?[a-z][a-z0-9-]*", declaration.group(1)))
    assert "--out-shard-size" in flags and "-v" in flags, done.stdout
    return sorted(flags - {"--help"})


def run_command_flags() -> set[str]:
    import typer

    from mergeng.cli.app import app

    command = typer.main.get_command(app).commands["run"]
    return {flag for param in command.params for flag in [*param.opts, *param.secondary_opts]}


def test_every_mergekit_yaml_option_is_accepted_and_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## mergekit-yaml options", 1)[1].split("\n## ", 1)[0]
    accepted = run_command_flags()
    for flag in mergekit_yaml_options():
        assert flag in accepted, f"mergeng run does not accept {flag}"
        if not flag.startswith("--no-"):
            assert any(flag in key.split(" / ") for key in MERGEKIT_OPTIONS), flag
            assert f"`{flag}" in table or f"/ {flag}`" in table, f"{flag} missing from the README's mergekit-yaml table"
    for key, meaning in MERGEKIT_OPTIONS.items():
        assert f"`{key}`" in table, key


# -- 5. relative model paths and runnable examples --------------------------------------------

def relative_recipe(folder: Path, name: str = "r.yml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("merge_method: linear\nmodels:\n  - model: models/base\n    parameters: {weight: 0.5}\n"
                    "  - model: models/a\n    parameters: {weight: 0.5}\ndtype: float32\n")
    return path


def place(models: dict[str, Path], folder: Path) -> None:
    for name in ("base", "a"):
        shutil.copytree(models[name], folder / "models" / name)


def test_relative_model_paths_are_read_beside_the_recipe_first(tmp_path, models, monkeypatch):
    r = relative_recipe(tmp_path / "recipes")
    place(models, tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)  # no models/ here
    result = cli("plan", r, "--format", "json")
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "recipes" / "models" / "base") in result.output


def test_relative_model_paths_fall_back_to_the_working_directory(tmp_path, models, monkeypatch):
    r = relative_recipe(tmp_path / "recipes")
    place(models, tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    assert cli("run", r, tmp_path / "out", *SMALL).exit_code == 0


def test_a_relative_path_naming_two_different_folders_is_refused_naming_both(tmp_path, models, monkeypatch):
    r = relative_recipe(tmp_path / "recipes")
    place(models, tmp_path / "recipes")
    place(models, tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    one_line_error(cli("run", r, tmp_path / "out"), str(tmp_path / "recipes" / "models" / "base"),
                   str(tmp_path / "work" / "models" / "base"))


def test_a_recipe_in_the_working_directory_is_not_ambiguous(tmp_path, models, monkeypatch):
    place(models, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli("run", relative_recipe(tmp_path), tmp_path / "out", *SMALL).exit_code == 0
    assert cli("run", Path("r.yml"), tmp_path / "out2", *SMALL).exit_code == 0


def test_an_example_recipe_without_its_models_says_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(cli("run", ROOT / "configs" / "linear.yml", tmp_path / "out"), "models/base", "mergeng examples")


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ex") / "examples"
    result = cli("examples", folder)
    assert result.exit_code == 0, result.output
    return folder


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yml")))
def test_every_recipe_in_configs_runs_as_written_after_mergeng_examples(examples, config, tmp_path, monkeypatch):
    monkeypatch.chdir(examples)  # the README: cd into the folder `mergeng examples` wrote
    recipe = ROOT / "configs" / config
    out = tmp_path / "out"
    if config == "moe.yml":
        pytest.importorskip("transformers")  # gate_mode: hidden reads hidden states with transformers
        result = cli("moe", recipe, "-o", out, "--ram", "2G")
    else:
        result = cli("run", recipe, out, "--ram", "2G")
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists() and load_tensors(out)
    assert (examples / config).read_text() == recipe.read_text()  # the copy beside the models is the same recipe


def test_the_example_llava_is_a_model_transformers_loads_and_text_into_vlm_keeps_its_vision_tower(examples, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(examples)
    assert cli("run", "text-into-vlm.yml", tmp_path / "out").exit_code == 0
    merged, base = load_tensors(tmp_path / "out"), load_tensors(examples / "models" / "llava-base")
    assert set(merged) == set(base)
    vision = [n for n in base if n.startswith("vision_tower.")]
    assert vision and all(merged[n].float().equal(base[n].bfloat16().float()) for n in vision)
    llava_logits(examples / "models" / "llava-base")
    llava_logits(tmp_path / "out")


def llava_logits(folder: Path):
    import torch
    from transformers import LlavaForConditionalGeneration

    from mergeng.cli.tiny_models import LLAVA_IMAGE_TOKEN

    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[1] + [LLAVA_IMAGE_TOKEN] * 4 + [5, 6]])
    logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))).logits
    assert torch.isfinite(logits).all()


def test_examples_needs_no_transformers_and_rebuilds_only_its_own_folder(tmp_path):
    folder = tmp_path / "ex"
    code = ("import sys\nfrom mergeng.cli.app import main\n"
            f"sys.argv = ['mergeng', 'examples', {str(folder)!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'transformers' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert cli("examples", folder).exit_code == 0  # an earlier run's folder is rebuilt
    (folder / "models" / "mine").mkdir()
    one_line_error(cli("examples", folder), str(folder / "models" / "mine"))
    one_line_error(cli("examples", tmp_path), str(tmp_path))  # not empty, not made by examples


# -- 6. the Python API --------------------------------------------------------------------------

def test_python_merge_takes_a_path_and_returns_the_runs_figures(tmp_path, models):
    import mergeng

    figures = mergeng.merge(recipe(tmp_path, models), tmp_path / "out", ram="2G", max_unit="8K", workers=1)
    assert figures["peak_rss_bytes"] > 0 and figures["ram_budget_bytes"] == 2 << 30 and not figures["resumed"]
    via_cli = tmp_path / "cli"
    assert cli("run", recipe(tmp_path, models), via_cli, *SMALL).exit_code == 0
    ours, theirs = load_tensors(tmp_path / "out"), load_tensors(via_cli)
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


def test_python_merge_takes_yaml_text_or_a_dict_and_mergekit_option_names(tmp_path, models):
    import mergeng

    text = recipe(tmp_path, models).read_text()
    mergeng.merge(text, tmp_path / "text", out_shard_size="100K", copy_tokenizer=False)
    assert (tmp_path / "text" / "model.safetensors.index.json").exists() and not (tmp_path / "text" / "tokenizer.json").exists()
    as_dict = {"merge_method": "linear", "dtype": "float32",
               "models": [{"model": str(models["base"]), "parameters": {"weight": 0.5}},
                          {"model": str(models["a"]), "parameters": {"weight": 0.5}}]}
    mergeng.merge(as_dict, tmp_path / "dict", random_seed=1, write_model_card=False)
    first, second = load_tensors(tmp_path / "text"), load_tensors(tmp_path / "dict")
    assert all(first[k].equal(second[k]) for k in first) and not (tmp_path / "dict" / "README.md").exists()


def test_python_plan_returns_the_plan_without_writing(tmp_path, models):
    import mergeng
    from mergeng.errors import MergeError

    prepared = mergeng.plan(recipe(tmp_path, models), ram="1G")
    assert len(prepared.plan.tasks) == 39 and prepared.schedule.feasible and prepared.schedule.budget == 1 << 30
    assert not (tmp_path / "merged").exists()
    with pytest.raises(MergeError, match="option 'shrad_size'"):
        mergeng.plan(recipe(tmp_path, models), shrad_size="5B")
    with pytest.raises(MergeError, match="--cuda"):
        mergeng.merge(recipe(tmp_path, models), tmp_path / "gpu", cuda=True)


def test_import_mergeng_stays_light():
    code = "import sys, mergeng\nheavy = [m for m in ('torch', 'typer', 'mergeng.engine') if m in sys.modules]\nassert not heavy, heavy\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_readmes_python_api_example_runs_after_mergeng_examples(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    assert cli("examples", "ex").exit_code == 0
    exec(compile(block, "README.md", "exec"), {})
    assert load_tensors(tmp_path / "merged" / "ties") and not (tmp_path / "merged" / "dict" / "tokenizer.json").exists()
