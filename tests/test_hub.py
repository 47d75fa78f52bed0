"""Models by their Hub names, against a stand-in of the Hub the suite starts itself (tests/hub_server.py):
the same bytes as on local folders whether fetched, streamed or read offline from the cache; plans read
headers only; only the shards the plan reads are fetched; every failure is one line and resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_recipe
from helpers import cli
from hub_server import FakeHub

from mergeng.cli.tiny_models import LLAMA3_70B, LlamaShape, make_llama, make_sparse_llama

RECIPE = """merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.7}}
dtype: bfloat16
"""


def weights_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def hub(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    server = FakeHub(root / "server")
    for name in ("base", "a", "b"):
        server.add_repo(f"org/{name}", tiny_models[name])
    # a repo that also ships a consolidated copy of its weights beside the shards (the index does not list it)
    shutil.copytree(tiny_models["base"], root / "with-consolidated")
    shutil.copyfile(next(tiny_models["base"].glob("*.safetensors")), root / "with-consolidated" / "consolidated.safetensors")
    server.add_repo("org/base-consolidated", root / "with-consolidated")
    server.add_repo("org/gated", tiny_models["a"], gated=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hf(hub, tmp_path, monkeypatch):
    """This test's HF cache, and the stand-in as the Hub; the server's faults and log reset."""
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub.ignore_range = hub.wrong_range = False
    hub.drop_after = None
    hub.log.clear()
    return tmp_path / "hf" / "hub"


@pytest.fixture(scope="module")
def local_output(tiny_models, tmp_path_factory):
    """The reference: the same recipe on local folders."""
    root = tmp_path_factory.mktemp("local")
    recipe = write_recipe(root, RECIPE.format(base=tiny_models["base"], a=tiny_models["a"], b=tiny_models["b"]))
    result = cli("run", recipe, "-o", root / "out", "--ram", "1G")
    assert result.exit_code == 0, result.output
    return weights_bytes(root / "out")


def hub_recipe(tmp_path: Path, base="org/base", a="org/a", b="org/b") -> Path:
    return write_recipe(tmp_path, RECIPE.format(base=base, a=a, b=b), name="hub.yml")


def weight_gets(hub: FakeHub) -> list[tuple[str, str, str | None]]:
    return [r for r in hub.requests("GET") if r[1].startswith("/cdn/")]


def test_a_recipe_of_repo_ids_merges_to_the_same_bytes_as_local_folders(hub, hf, tmp_path, local_output):
    out = tmp_path / "out"
    result = cli("run", hub_recipe(tmp_path), "-o", out, "--ram", "1G")
    assert result.exit_code == 0, result.output
    assert weights_bytes(out) == local_output
    # fetched into the HF cache as huggingface_hub lays it out (blobs + snapshot links), shared with transformers
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache("org/a", "model.safetensors.index.json", cache_dir=hf)
    assert isinstance(cached, str) and Path(cached).exists()
    assert any((hf / "models--org--a" / "blobs").iterdir())
    report = json.loads((out / ".mergeng" / "report.json").read_text())
    commit = hub.repos["org/a"].refs["main"]
    assert report["inputs"]["org/a"] == f"org/a@{commit}"
    assert f"org/a@{commit}" in (out / "README.md").read_text()
    profile = json.loads((out / ".mergeng" / "profile.json").read_text())
    assert profile["hub"]["inputs"]["org/a"] == f"org/a@{commit}" and profile["hub"]["hub_files_fetched"] > 0


def test_plan_reads_headers_only_and_says_what_it_will_fetch(hub, hf, tmp_path):
    result = cli("plan", hub_recipe(tmp_path), "--format", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert {h["model"] for h in summary["hub"]} == {"org/base", "org/a", "org/b"}
    for h in summary["hub"]:
        assert h["commit"] == hub.repos[h["repo"]].refs["main"]
        assert h["cached_bytes"] == 0 and h["fetch_bytes"] == h["bytes"] > 0
    gets = weight_gets(hub)
    assert gets, "headers are read by ranged requests"
    for _, _, rng in gets:  # every weight-file request is a ranged header read, never the file
        assert rng is not None and (rng == "bytes=0-7" or rng.startswith("bytes=8-"))
    assert not any((hf / "models--org--a" / "blobs").glob("*")) or all(
        p.stat().st_size < 50_000 for p in (hf / "models--org--a" / "blobs").iterdir())  # only json files cached


def test_plan_states_what_the_cache_will_fetch_against_its_free_space(hub, hf, tmp_path):
    summary = json.loads(cli("plan", hub_recipe(tmp_path), "--format", "json", "-o", tmp_path / "out").output)
    cache = summary["disk"]["cache"]
    assert cache["needed_bytes"] == sum(h["fetch_bytes"] for h in summary["hub"]) > 0
    assert cache["folder"].startswith(str(hf)) and cache["free_bytes"] > 0 and cache["fits"]
    assert summary["disk"]["output"]["folder"] == str(tmp_path / "out")


def test_a_typo_in_the_recipe_fails_before_any_weight_byte_is_fetched(hub, hf, tmp_path):
    recipe = write_recipe(tmp_path, RECIPE.format(base="org/base", a="org/a", b="org/b").replace("ties", "tise"))
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "tise" in result.output
    assert not [r for r in weight_gets(hub) if r[2] is None]


def test_only_the_shards_the_index_lists_are_fetched_never_a_consolidated_copy(hub, hf, tmp_path):
    recipe = write_recipe(tmp_path, "merge_method: linear\nmodels:\n  - model: org/base-consolidated\n"
                                    "    parameters: {weight: 1.0}\ndtype: float32\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    snapshot = next((hf / "models--org--base-consolidated" / "snapshots").iterdir())
    assert not (snapshot / "consolidated.safetensors").exists()
    assert len(list(snapshot.glob("model-*.safetensors"))) == 15


def test_a_slice_fetches_only_the_shards_holding_its_layers(hub, hf, tmp_path, tiny_models):
    recipe = write_recipe(tmp_path, "merge_method: passthrough\nslices:\n  - sources:\n"
                                    "      - model: org/base\n        layer_range: [0, 1]\ndtype: float32\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    index = json.loads((tiny_models["base"] / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for name, f in index.items() if "layers." not in name or "layers.0." in name}
    snapshot = next((hf / "models--org--base" / "snapshots").iterdir())
    fetched = {p.name for p in snapshot.glob("model-*.safetensors")}
    assert fetched == needed and len(fetched) < 15


def test_stream_writes_no_input_byte_to_disk_and_gives_the_same_bytes(hub, hf, tmp_path, local_output):
    out = tmp_path / "out"
    result = cli("run", hub_recipe(tmp_path), "-o", out, "--ram", "1G", "--stream")
    assert result.exit_code == 0, result.output
    assert weights_bytes(out) == local_output
    weights = [p for p in hf.rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    blobs = [p for p in hf.rglob("blobs/*") if p.stat().st_size > 60_000]
    assert not weights and not blobs, (weights, blobs)
    assert all(rng is not None for _, _, rng in weight_gets(hub))  # only ranged reads
    profile = json.loads((out / ".mergeng" / "profile.json").read_text())
    assert profile["hub"]["stream"] and profile["hub"]["hub_bytes_read"] > 0
    assert profile["hub"]["hub_bytes_fetched"] < 100_000  # config and tokenizer files only (the weights are 4 MB)


def test_a_server_that_ignores_range_is_an_error_never_a_wrong_merge(hub, hf, tmp_path):
    hub.ignore_range = True
    result = cli("run", hub_recipe(tmp_path), "-o", tmp_path / "out", "--stream")
    assert result.exit_code != 0
    assert "HTTP 200, not 206" in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_a_server_that_answers_other_bytes_is_refused(hub, hf, tmp_path):
    hub.wrong_range = True
    result = cli("plan", hub_recipe(tmp_path))
    assert result.exit_code != 0 and "Content-Range" in result.output


def test_a_dropped_connection_is_retried_then_one_line_then_the_same_command_resumes(hub, hf, tmp_path, local_output):
    recipe, out = hub_recipe(tmp_path), tmp_path / "out"
    assert cli("plan", recipe, "--stream").exit_code == 0  # headers are small: read before the faults begin
    hub.drop_after = 1000  # every larger ranged read is cut after 1000 bytes
    result = cli("run", recipe, "-o", out, "--ram", "1G", "--stream")
    assert result.exit_code == 1
    assert "run the same command again to resume" in result.output and "Traceback" not in result.output
    hub.drop_after = None
    result = cli("run", recipe, "-o", out, "--ram", "1G", "--stream")
    assert result.exit_code == 0, result.output
    assert weights_bytes(out) == local_output


def test_a_branch_moved_since_the_interrupted_run_is_read_at_the_commit_it_read(hub, hf, tmp_path, tiny_models, local_output):
    server = hub
    server.add_repo("org/moving", tiny_models["a"], branch="main")
    recipe, out = hub_recipe(tmp_path, a="org/moving"), tmp_path / "out"
    assert cli("plan", recipe, "--stream").exit_code == 0
    server.drop_after = 1000
    failed = cli("run", recipe, "-o", out, "--ram", "1G", "--stream")
    assert failed.exit_code == 1 and (out / ".mergeng").is_dir(), failed.output
    server.drop_after = None
    server.move_branch("org/moving", tiny_models["b"])
    from mergeng.engine.run import hub_pins
    first = list(server.repos["org/moving"].commits)[0]
    assert hub_pins(out)["org/moving"] == first  # the journal pins the commit the interrupted run read
    result = cli("run", recipe, "-o", out, "--ram", "1G", "--stream")
    assert result.exit_code == 0, result.output
    assert "now points to" in result.output and "resuming the interrupted run at the commit it read" in result.output
    assert weights_bytes(out) == local_output
    fresh = cli("run", recipe, "-o", out, "--ram", "1G", "--stream", "--fresh")
    assert fresh.exit_code == 0, fresh.output
    assert weights_bytes(out) != local_output  # --fresh merges what the branch holds now


def test_revisions_tags_and_commits_resolve(hub, hf, tmp_path, local_output):
    commit = hub.repos["org/a"].refs["main"]
    hub.tag("org/b", "v1.0", hub.repos["org/b"].refs["main"])
    out = tmp_path / "out"
    result = cli("run", hub_recipe(tmp_path, a=f"org/a@{commit}", b="org/b@v1.0"), "-o", out, "--ram", "1G")
    assert result.exit_code == 0, result.output
    assert weights_bytes(out) == local_output


@pytest.mark.parametrize("model, expected", [
    ("org/nope", "no repo org/nope on"),
    ("org/a@no-such-branch", "has no revision 'no-such-branch'"),
    ("org/gated", "gated repo"),
])
def test_bad_references_are_one_line_before_any_download(hub, hf, tmp_path, model, expected):
    result = cli("run", hub_recipe(tmp_path, a=model), "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not [r for r in weight_gets(hub) if r[2] is None]
    if model == "org/gated":
        assert "HF_TOKEN" in result.output


def test_a_gated_repo_is_read_with_a_token(hub, hf, tmp_path, monkeypatch, local_output):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    out = tmp_path / "out"
    result = cli("run", hub_recipe(tmp_path, a="org/gated"), "-o", out, "--ram", "1G", "--stream")
    assert result.exit_code == 0, result.output
    assert weights_bytes(out) == local_output


def test_an_endpoint_that_does_not_answer_is_one_line(hf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    result = cli("plan", hub_recipe(tmp_path))
    assert result.exit_code == 2 and "does not answer" in result.output and "HF_HUB_OFFLINE" in result.output


def test_transformers_cache_is_where_models_are_fetched(hub, hf, tmp_path, local_output):
    cache = tmp_path / "elsewhere"
    out = tmp_path / "out"
    result = cli("run", hub_recipe(tmp_path), "-o", out, "--ram", "1G", "--transformers-cache", cache)
    assert result.exit_code == 0, result.output
    assert (cache / "models--org--a" / "snapshots").is_dir() and not hf.exists()
    assert weights_bytes(out) == local_output


def _mergeng(*args, env) -> subprocess.CompletedProcess:
    code = "import sys; from mergeng.cli.app import main; sys.argv[0] = 'mergeng'; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def test_offline_runs_from_the_cache_alone_and_a_missing_file_is_one_line(hub, hf, tmp_path, local_output):
    recipe = hub_recipe(tmp_path)
    assert cli("run", recipe, "-o", tmp_path / "online", "--ram", "1G").exit_code == 0  # fills the cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    before = len(hub.log)
    done = _mergeng("run", recipe, "-o", tmp_path / "offline", "--ram", "1G", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert weights_bytes(tmp_path / "offline") == local_output and len(hub.log) == before
    missing = _mergeng("plan", hub_recipe(tmp_path, a="org/base-consolidated"), env=env)
    assert missing.returncode == 2
    assert "HF_HUB_OFFLINE=1" in missing.stdout + missing.stderr and "Traceback" not in missing.stdout + missing.stderr


def test_a_hub_base_with_a_hub_lora_adapter(hub, hf, tmp_path, tiny_models):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import torch

    adapter = tmp_path / "adapter"
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_models["base"]),
                                peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(adapter)
    hub.add_repo("org/adapter", adapter)
    text = "merge_method: linear\nmodels:\n  - model: {m}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    local = write_recipe(tmp_path, text.format(m=f"{tiny_models['base']}+{adapter}"), name="local.yml")
    remote = write_recipe(tmp_path, text.format(m="org/base+org/adapter"), name="remote.yml")
    assert cli("run", local, "-o", tmp_path / "l").exit_code == 0
    result = cli("run", remote, "-o", tmp_path / "r", "--stream")
    assert result.exit_code == 0, result.output
    assert weights_bytes(tmp_path / "l") == weights_bytes(tmp_path / "r")


def test_a_missing_local_folder_that_reads_as_a_repo_id_names_both(tmp_path):
    recipe = write_recipe(tmp_path, "merge_method: linear\nmodels:\n  - model: models/typo\n    parameters: {weight: 1.0}\n")
    result = cli("plan", recipe)
    assert result.exit_code == 2
    assert "folder not found" in result.output and "nor on the Hub" in result.output and "models/typo" in result.output


def test_a_path_never_goes_to_the_hub(tmp_path):
    recipe = write_recipe(tmp_path, "merge_method: linear\nmodels:\n  - model: ./models/typo\n    parameters: {weight: 1.0}\n")
    result = cli("plan", recipe)
    assert result.exit_code == 2 and "folder not found" in result.output
    assert "nor on the Hub" not in result.output and "does not answer" not in result.output


def test_a_header_is_read_exactly_its_length_then_itself(hub, hf, tmp_path):
    many = make_llama(tmp_path / "many", LlamaShape(16, 80, 2, 1, 16, 32), variant=0)
    header = int.from_bytes((many / "model.safetensors").read_bytes()[:8], "little")
    assert header > 64 * 1024
    hub.add_repo("org/many", many)
    recipe = write_recipe(tmp_path, "merge_method: linear\nmodels:\n  - model: org/many\n    parameters: {weight: 1.0}\n")
    result = cli("plan", recipe, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tensors"] == 80 * 9 + 3
    ranges = [r for _, _, r in weight_gets(hub)]
    assert ranges == ["bytes=0-7", f"bytes=8-{8 + header - 1}"]


def test_plan_of_three_70b_repos_answers_in_seconds_fetching_no_weight_byte(hub, hf, tmp_path):
    """Sparse files of Llama-3-70B's shapes (headers, then holes): the plan reads each shard's header only."""
    import time

    for k in range(3):
        hub.add_repo(f"big/llama70b-{k}", make_sparse_llama(tmp_path / f"m{k}", LLAMA3_70B))
    hub.log.clear()
    recipe = write_recipe(tmp_path, "merge_method: ties\nbase_model: big/llama70b-0\nmodels:\n"
                          + "".join(f"  - model: big/llama70b-{k}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for k in (1, 2))
                          + "dtype: bfloat16\n")
    start = time.perf_counter()
    result = cli("plan", recipe, "--ram", "64G", "--format", "json")
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["tensors"] == 80 * 9 + 3 and sum(h["fetch_bytes"] for h in summary["hub"]) > 3 * 130 * 10**9
    gets = weight_gets(hub)
    assert gets and all(rng is not None for _, _, rng in gets)
    header_bytes = sum(8 + int.from_bytes(p.open("rb").read(8), "little") for k in range(3)
                       for p in (tmp_path / f"m{k}").glob("*.safetensors"))
    fetched = sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for _, _, r in gets)
    assert fetched == header_bytes  # exactly the headers: not one weight byte
    assert seconds < 60, seconds
