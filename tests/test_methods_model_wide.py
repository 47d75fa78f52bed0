"""pcb and localize_stitch: statistics over the whole model, against the papers' arithmetic written here.

The references flatten every merged tensor of each model into one vector per task (as the authors'
code does) and apply PCB_merge's arithmetic (duguodong7/pcb-merging: clamp by sorted position,
min-max normalisation, exp/tanh balancing, Σ score·λ·T̃ / Σ score) or the dataless
Localize-and-Stitch (a global top-k threshold per task, strict `>`, masks averaged where they
overlap). mergeng computes the same statistics by integer-histogram passes over row chunks
(engine/plan/model_statistics.py); the tests check the result whatever the chunking, budget and
workers, the resume of an interrupted run (the model-wide pass is not redone), the plan, and the
one-line refusals.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from helpers import cli, disk_full_after, load_tensors, merge

from mergeng.cli.tiny_models import LlamaShape, make_llama
from mergeng.methods.registry import MergeContext, get_method

SHAPE = LlamaShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=48, vocab_size=64)
NAMES = ("base", "a", "b", "c")
CHUNKED = ("--max-unit", "8K", "--workers", "1")  # 16 of the 21 tensors in row chunks (132 merge units)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model_wide")
    for k, name in enumerate(NAMES):
        make_llama(root / name, SHAPE, variant=k, noise=0.1)
    return root


def recipe(models: Path, method: str, params: dict, own: dict | None = None, extra: str = "") -> str:
    own = own or {}
    entries = "\n".join(f"  - model: {models / m}" + (f"\n    parameters: {json.dumps(own[m])}" if m in own else "")
                        for m in NAMES[1:])
    return (f"merge_method: {method}\nbase_model: {models / 'base'}\nmodels:\n{entries}\n"
            f"parameters: {json.dumps(params)}\ndtype: float32\n{extra}")


def flat(models: Path) -> tuple[list[tuple[str, torch.Size]], torch.Tensor, torch.Tensor]:
    """(names and shapes, base as one vector, task vectors [N, P]) over every tensor of the models."""
    tensors = {m: load_tensors(models / m) for m in NAMES}
    names = sorted(tensors["base"])
    base = torch.cat([tensors["base"][n].reshape(-1) for n in names])
    tasks = torch.stack([torch.cat([tensors[m][n].reshape(-1) for n in names]) - base for m in NAMES[1:]])
    return [(n, tensors["base"][n].shape) for n in names], base, tasks


def unflat(layout, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, shape in layout:
        size = shape.numel()
        out[name] = vector[start:start + size].view(shape)
        start += size
    return out


# --- the references --------------------------------------------------------------------------

def clamp_by_position(x: torch.Tensor, low_ratio: float, high_ratio: float) -> torch.Tensor:
    """Each row clamped to its values at sorted positions int(d·low) and int(d·(1 − high) − 1)."""
    d = x.shape[1]
    ordered = torch.sort(x, dim=1).values
    return torch.clamp(x, ordered[:, int(d * low_ratio)].unsqueeze(1), ordered[:, int(d * (1 - high_ratio) - 1)].unsqueeze(1))


def minmax(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    return (x - low) / (high - low)


def pcb_reference(tasks: torch.Tensor, density: float, weights: list[float]) -> torch.Tensor:
    """The PCB delta (PCB_merge's arithmetic, per-task `lams` on the clamped vectors)."""
    n = tasks.shape[0]
    magnitudes = clamp_by_position(tasks.abs(), 1e-4, 1e-4)
    clamped = torch.sign(tasks) * magnitudes
    intra = torch.exp(n * minmax(magnitudes) ** 2)
    inter = torch.tanh(tasks * tasks.sum(0))
    scores = minmax(clamp_by_position(intra * inter, 1 - density, 0))
    weighted = clamped * torch.tensor(weights).unsqueeze(1)
    return (weighted * scores).sum(0) / torch.clamp(scores.sum(0), min=1e-12)


def localize_stitch_reference(tasks: torch.Tensor, density: float) -> torch.Tensor:
    """The dataless Localize-and-Stitch delta: k-th largest |τ_i| over the model, strict >, masks averaged."""
    k = int(density * tasks.shape[1])
    masks = torch.stack([(t.abs() > torch.topk(t.abs(), k).values.min()).float() for t in tasks])
    count = masks.sum(0)
    share = torch.where(count > 0, masks / count, torch.zeros_like(masks))
    return (share * tasks).sum(0)


def expected(models: Path, delta_of, lam: float = 1.0) -> dict[str, torch.Tensor]:
    layout, base, tasks = flat(models)
    return unflat(layout, base + lam * delta_of(tasks))


def close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


# --- equal to the papers' arithmetic, through `mergeng run` -----------------------------------

@pytest.mark.parametrize("params, own, weights", [
    ({"density": 0.2, "lambda": 0.9}, {"a": {"weight": 1.2}, "b": {"weight": 0.7}}, [1.2, 0.7, 1.0]),
    ({"density": 0.8, "weight": 0.5}, {}, [0.5, 0.5, 0.5]),  # mergekit PR #432's recipe: a top-level weight for all
], ids=["per-model-weight", "pr432-top-level-weight"])
def test_pcb_equals_pcb_merge_over_the_whole_model(tmp_path, models, params, own, weights):
    out = merge(tmp_path, recipe(models, "pcb", params, own))
    lam = params.get("lambda", 1.0)
    reference = expected(models, lambda t: pcb_reference(t, params["density"], weights), lam)
    ours = load_tensors(out)
    close(ours, reference)
    base = load_tensors(models / "base")
    moved = max(float((ours[n] - base[n]).abs().max()) for n in ours)
    assert moved > 1e-3  # a real delta (PR #432's divisor leaves ~the base model)
    # statistics per tensor instead of per model would be another method: it must differ here
    per_tensor, inputs = {}, [load_tensors(models / m) for m in NAMES[1:]]
    for name, x in base.items():
        tasks = torch.stack([other[name].reshape(-1) - x.reshape(-1) for other in inputs])
        if tasks.shape[1] >= 2:
            per_tensor[name] = x + lam * pcb_reference(tasks, params["density"], weights).view(x.shape)
    assert max(float((per_tensor[n] - ours[n]).abs().max()) for n in per_tensor) > 1e-4


@pytest.mark.parametrize("density, lam", [(0.1, 1.0), (0.35, 0.8)])
def test_localize_stitch_equals_the_dataless_reference(tmp_path, models, density, lam):
    out = merge(tmp_path, recipe(models, "localize_stitch", {"density": density, "lambda": lam}))
    close(load_tensors(out), expected(models, lambda t: localize_stitch_reference(t, density), lam))


@pytest.mark.parametrize("method, params", [("pcb", {"density": 0.3}), ("localize_stitch", {"density": 0.2})])
def test_bytes_do_not_depend_on_chunking_budget_or_workers(tmp_path, models, method, params):
    text = recipe(models, method, params)
    whole = merge(tmp_path, text, name="whole")
    planned = json.loads(cli("plan", tmp_path / "whole.yml", "--format", "json", *CHUNKED).stdout)
    assert planned["chunked_tensors"], "--max-unit 2K should cut tensors into row chunks"
    runs = [merge(tmp_path, text, *CHUNKED, name="chunked"),
            merge(tmp_path, text, "--max-unit", "3K", "--workers", "3", name="threads"),
            merge(tmp_path, text, "--ram", "8G", "--workers", "2", name="budget")]
    reference = (whole / "model.safetensors").read_bytes()
    for out in runs:
        assert (out / "model.safetensors").read_bytes() == reference, out.name


# --- resume --------------------------------------------------------------------------------------

def profile(out: Path) -> dict:
    return json.loads((out / ".mergeng" / "profile.json").read_text())


def journaled_passes(out: Path) -> int:
    db = sqlite3.connect(out / ".mergeng" / "journal.sqlite")
    try:
        return db.execute("SELECT COUNT(*) FROM model_stats").fetchone()[0]
    finally:
        db.close()


def test_an_interrupted_run_resumes_without_redoing_the_model_wide_pass(tmp_path, models, monkeypatch):
    text = recipe(models, "pcb", {"density": 0.25}, {"b": {"weight": 0.6}})
    clean = merge(tmp_path, text, *CHUNKED, name="clean")
    assert profile(clean)["model_statistics"] == {"passes": 6, "units_total": profile(clean)["model_statistics"]["units_total"],
                                                  "units_run": profile(clean)["model_statistics"]["units_total"],
                                                  "passes_reused": 0}
    out = tmp_path / "out"
    (tmp_path / "again.yml").write_text(text)
    free_space = disk_full_after(monkeypatch, 30)
    result = cli("run", tmp_path / "again.yml", "-o", out, *CHUNKED)
    assert result.exit_code == 1 and "disk full" in result.output and "Traceback" not in result.output
    free_space()
    assert journaled_passes(out) == 6
    assert cli("run", tmp_path / "again.yml", "-o", out, *CHUNKED).exit_code == 0
    assert (out / "model.safetensors").read_bytes() == (clean / "model.safetensors").read_bytes()
    figures = profile(out)["model_statistics"]
    assert figures["units_run"] == 0 and figures["passes_reused"] == 6


def test_a_changed_input_is_refused_and_fresh_recomputes_the_statistics(tmp_path, models):
    local = tmp_path / "models"
    shutil.copytree(models, local)
    text = recipe(local, "localize_stitch", {"density": 0.2})
    out = merge(tmp_path, text, name="out")
    make_llama(local / "c", SHAPE, variant=7, noise=0.1)  # another fine-tune in the same place
    refused = cli("run", tmp_path / "out.yml", "-o", out)
    assert refused.exit_code == 2 and "changed" in refused.output and "--fresh" in refused.output
    assert cli("run", tmp_path / "out.yml", "-o", out, "--fresh").exit_code == 0
    figures = profile(out)["model_statistics"]
    assert figures["units_run"] == figures["units_total"] > 0 and figures["passes_reused"] == 0
    close(load_tensors(out), expected(local, lambda t: localize_stitch_reference(t, 0.2)))


# --- plan ----------------------------------------------------------------------------------------

def test_plan_shows_the_model_wide_pass_its_units_and_bytes(tmp_path, models):
    path = tmp_path / "pcb.yml"
    path.write_text(recipe(models, "pcb", {"density": 0.2}))
    summary = json.loads(cli("plan", path, "--format", "json", *CHUNKED).stdout)
    wide = summary["model_statistics"]
    model_bytes = sum(t.numel() * 4 for t in load_tensors(models / "base").values())
    assert wide["method"] == "pcb" and wide["passes"] == 6 and wide["tensors"] == len(load_tensors(models / "base"))
    assert wide["read_bytes"] == 6 * 4 * model_bytes  # every pass reads the base and the three models
    assert summary["read_bytes"] == wide["read_bytes"] + 4 * model_bytes  # ... and the merge reads them once more
    assert wide["units"] >= 6 * wide["tensors"] and wide["state_bytes"] > 0
    text = cli("plan", path, *CHUNKED).output
    assert "model-wide statistics first (pcb): 6 passes" in " ".join(text.split())
    plain = json.loads(cli("plan", path.with_name("pcb.yml"), "--format", "json").stdout)
    assert plain["model_statistics"]["units"] == 6 * plain["model_statistics"]["tensors"]  # one chunk per tensor


# --- refusals: one line, exit 2 --------------------------------------------------------------------

def one_line_refusal(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for w in words:
        assert w in result.output, result.output


@pytest.mark.parametrize("method, params, words", [
    ("pcb", {"density": 0.0}, ("density", "(0, 1]")),
    ("localize_stitch", {"density": 1.5}, ("density", "(0, 1]")),
    ("pcb", {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.1}]}, ("one value over the whole model",)),
    ("localize_stitch", {"density": "many"}, ("density",)),
])
def test_bad_parameters_are_one_line(tmp_path, models, method, params, words):
    path = tmp_path / "bad.yml"
    path.write_text(recipe(models, method, params))
    one_line_refusal(cli("run", path, "-o", tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()


def test_ray_and_in_memory_stages_are_refused_in_one_line(tmp_path, models):
    path = tmp_path / "pcb.yml"
    path.write_text(recipe(models, "pcb", {"density": 0.2}))
    one_line_refusal(cli("run", path, "-o", tmp_path / "out", "--executor", "ray"), "--executor ray", "whole model")
    stages = (f"name: first\n{recipe(models, 'localize_stitch', {'density': 0.2})}---\n"
              f"name: second\nmerge_method: linear\nmodels:\n  - model: first\n  - model: {models / 'a'}\ndtype: float32\n")
    staged = tmp_path / "stages.yml"
    staged.write_text(stages)
    one_line_refusal(cli("run", staged, "-o", tmp_path / "out2"), "localize_stitch", "last stage")


# --- the methods on their own: tensors of every rank, edge densities ------------------------------

def run_model_wide(name: str, tensors: dict[str, tuple], params: dict, chunk_rows: int | None) -> dict[str, torch.Tensor]:
    """The engine's order, emulated: each model-wide pass over every tensor's row chunks, then the merges."""
    method = get_method(name)
    labels = tuple(NAMES[1:len(next(iter(tensors.values()))[1]) + 1])

    def chunks(base):
        rows = base.shape[0] if base.dim() else 1
        step = chunk_rows or rows
        return rows, [(a, min(rows, a + step)) for a in range(0, rows, step)]

    def part(x, a, b):
        return x if x.dim() == 0 else x[a:b].clone()

    stats: dict = {}
    for index in range(method.model_passes):
        folded: dict = {}
        for tensor, (base, xs) in tensors.items():
            rows, ranges = chunks(base)
            for a, b in ranges:
                ctx = MergeContext(tensor, a, b, rows, 0, labels, model_stats=stats)
                for key, value in method.model_statistics_pass(index, part(base, a, b), [part(x, a, b) for x in xs], params, ctx).items():
                    folded[key] = folded[key] + value if key in folded else value
        stats = {**stats, **folded}
    out = {}
    for tensor, (base, xs) in tensors.items():
        rows, ranges = chunks(base)
        pieces = [method(part(base, a, b), [part(x, a, b) for x in xs], params,
                         MergeContext(tensor, a, b, rows, 0, labels, model_stats=stats)) for a, b in ranges]
        out[tensor] = pieces[0] if base.dim() == 0 else torch.cat(pieces)
    return out


def small_model(seed: int = 0, untouched: bool = False) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (9, 7), "v": (13,), "s": (), "t": (5, 3, 2)}
    out = {}
    for name, shape in shapes.items():
        base = torch.randn(shape, generator=g)
        xs = [base + 0.3 * torch.randn(shape, generator=g) for _ in range(3)]
        if untouched:
            xs[1] = base.clone()
        out[name] = (base, xs)
    return out


def flat_small(tensors: dict[str, tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.cat([b.reshape(-1) for b, _ in tensors.values()])
    tasks = torch.stack([torch.cat([xs[i].reshape(-1) for _, xs in tensors.values()]) for i in range(3)]) - base
    return base, tasks


def unflat_small(tensors: dict[str, tuple], vector: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, (base, _) in tensors.items():
        out[name] = vector[start:start + base.numel()].view(base.shape)
        start += base.numel()
    return out


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_pcb_on_tensors_of_every_rank_any_chunking(density):
    tensors = small_model()
    params = {"weight": [1.0, 0.8, 1.3], "density": density, "lambda": 1.0}
    whole = run_model_wide("pcb", tensors, params, None)
    base, tasks = flat_small(tensors)
    close(whole, unflat_small(tensors, base + pcb_reference(tasks, density, params["weight"])))
    for chunk in (1, 2, 4):
        got = run_model_wide("pcb", tensors, params, chunk)
        assert all(torch.equal(got[n], whole[n]) for n in whole), f"chunk_rows={chunk}"


@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_localize_stitch_on_tensors_of_every_rank_any_chunking(density):
    tensors = small_model(1)
    params = {"density": density, "lambda": 1.0}
    whole = run_model_wide("localize_stitch", tensors, params, None)
    base, tasks = flat_small(tensors)
    if int(density * tasks.shape[1]) == 0:  # k = 0 keeps nothing
        expected_delta = torch.zeros_like(base)
    else:
        expected_delta = localize_stitch_reference(tasks, density)
    close(whole, unflat_small(tensors, base + expected_delta))
    for chunk in (1, 3):
        got = run_model_wide("localize_stitch", tensors, params, chunk)
        assert all(torch.equal(got[n], whole[n]) for n in whole), f"chunk_rows={chunk}"


def test_pcb_with_an_untouched_model_stays_finite():
    """A task vector of zeros: the reference divides 0 by 0 (NaN); here that task scores 0 and the others merge."""
    tensors = small_model(2, untouched=True)
    out = run_model_wide("pcb", tensors, {"weight": [1.0] * 3, "density": 0.3, "lambda": 1.0}, 2)
    assert all(torch.isfinite(t).all() for t in out.values())
    assert any(not torch.equal(out[n], tensors[n][0]) for n in out)


def test_the_cost_model_counts_the_phase_and_its_state(tmp_path, models):
    from mergeng.engine.run import prepare
    from mergeng.engine.schedule.cost_model import RESERVE_BYTES, model_statistics_footprint, row_cost
    from mergeng.engine.schedule.scheduler import make_schedule

    path = tmp_path / "pcb.yml"
    path.write_text(recipe(models, "pcb", {"density": 0.2}))
    tasks = prepare(path).plan.tasks
    budget, unit_cap = 1 << 30, 8 << 10
    s = make_schedule(tasks, budget, 0, 2, unit_cap)
    histograms = model_statistics_footprint(tasks[0]).state  # one tensor's probe: every model's histograms
    assert s.model_state_bytes == histograms > 3 * 2 * 2 * (1 << 14) * 8  # ≥ h0 and h1 per selection and model
    assert s.work_budget == budget - RESERVE_BYTES - s.model_state_bytes
    phase = s.model_units()
    per_pass = [sum(1 for u in phase if u.pass_index == p) for p in range(-6, 0)]
    assert len(set(per_pass)) == 1 and per_pass[0] > len(tasks)  # every pass: every tensor's row chunks
    for u in phase:  # rows of inputs + the pass's histogram partial
        assert u.live_bytes >= u.rows * row_cost(tasks[u.task], False) + model_statistics_footprint(tasks[u.task]).partial
    assert not make_schedule(tasks, s.min_budget - 1, 0, 2, unit_cap).feasible
    assert make_schedule(tasks, s.min_budget, 0, 2, unit_cap).feasible
    assert s.predicted_peak >= s.model_state_bytes + max(u.live_bytes for u in phase)


def test_only_the_merged_tensors_count_and_the_others_are_copied(tmp_path, models):
    """The paper's 'selected parameters': tensors left out by `exclude` are copied and count in no statistic."""
    text = recipe(models, "localize_stitch", {"density": 0.15}, extra="exclude: ['*embed_tokens*', 'lm_head*']\n")
    ours = load_tensors(merge(tmp_path, text))
    base = load_tensors(models / "base")
    kept = [n for n in sorted(base) if "embed_tokens" not in n and not n.startswith("lm_head")]
    flat_base = torch.cat([base[n].reshape(-1) for n in kept])
    inputs = [load_tensors(models / m) for m in NAMES[1:]]
    tasks = torch.stack([torch.cat([x[n].reshape(-1) for n in kept]) for x in inputs]) - flat_base
    close({n: ours[n] for n in kept}, unflat([(n, base[n].shape) for n in kept], flat_base + localize_stitch_reference(tasks, 0.15)))
    for n in set(base) - set(kept):
        assert torch.equal(ours[n], base[n])
