"""TSV-M, ISO-C and ISO-CTS against their papers' formulas written here (float64), and the engine's
whole-tensor contract: never row-chunked, the SVD's workspace costed, a budget that cannot hold
it refused in one line naming the tensor, rank-deficient task vectors reported."""

from __future__ import annotations

import json

import torch
from helpers import cli, load_tensors, merge
from test_methods_chunking import run_method

from mergeng.methods.registry import get_method


def task_models(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def tsvm_reference(base, xs, weight, lam):
    """Gargiulo et al.: per task the top r/N singular triplets; U and V blocks orthogonalised (polar)."""
    b = base.double()
    taus = [w * (x.double() - b) for w, x in zip(weight, xs)]
    r = min(base.shape)
    k = int(r * (1 / len(xs)))
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k])
    pad = r - k * len(xs)
    u_hat = torch.cat(us + [torch.zeros(base.shape[0], pad, dtype=torch.float64)], 1)
    s_hat = torch.cat(ss + [torch.zeros(pad, dtype=torch.float64)])
    v_hat = torch.cat(vs + [torch.zeros(pad, base.shape[1], dtype=torch.float64)], 0)
    return (b + lam * polar(u_hat) @ torch.diag(s_hat) @ polar(v_hat)).float()


def iso_c_reference(base, xs, lam):
    """Marczak et al.: the summed task vector with every singular value set to their mean."""
    b = base.double()
    m = sum(x.double() - b for x in xs)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (b + lam * s.mean() * u @ vh).float()


def iso_cts_reference(base, xs, lam, fraction):
    """Common subspace (top k_c of the sum) + per task the top d of τ_i − U_c U_cᵀ τ_i, polar, flat spectrum."""
    b = base.double()
    taus = [x.double() - b for x in xs]
    r, n = min(base.shape), len(xs)
    k_c = int(r * fraction)
    k_c = r - round((r - k_c) / n) * n
    d = (r - k_c) // n
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    uc, sc, vc = u[:, :k_c], s[:k_c], vh[:k_c]
    us, ss, vs = [], [], []
    for tau in taus:
        ut, st, vt = torch.linalg.svd(tau - uc @ uc.T @ tau, full_matrices=False)
        us.append(ut[:, :d]), ss.append(st[:d]), vs.append(vt[:d])
    s_hat = torch.cat(ss + [sc])
    return (b + lam * s_hat.mean() * polar(torch.cat(us + [uc], 1)) @ polar(torch.cat(vs + [vc], 0))).float()


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_tsvm_follows_the_formula_with_per_model_weights_before_and_lambda_after():
    base, xs = task_models((24, 18), 3)
    out = run_method("tsvm", base, xs, {"weight": [1.0, 0.5, 2.0], "lambda": 0.7})
    close(out, tsvm_reference(base, xs, [1.0, 0.5, 2.0], 0.7))
    wide, wide_xs = task_models((10, 25), 4, seed=1)  # N does not divide r: zero-padded blocks
    close(run_method("tsvm", wide, wide_xs, {}), tsvm_reference(wide, wide_xs, [1.0] * 4, 1.0))


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vector():
    base, xs = task_models((20, 30), 3, seed=2)
    out = run_method("iso_c", base, xs, {"lambda": 1.5})
    close(out, iso_c_reference(base, xs, 1.5))
    s = torch.linalg.svdvals((out - base).double())
    assert (s.max() - s.min()) / s.max() < 1e-4  # isotropic


def test_iso_cts_combines_common_and_task_subspaces():
    base, xs = task_models((30, 22), 3, seed=3)
    close(run_method("iso_cts", base, xs, {"lambda": 1.2, "common_space_fraction": 0.6}),
          iso_cts_reference(base, xs, 1.2, 0.6))
    close(run_method("iso_cts", base, xs, {}), iso_cts_reference(base, xs, 1.0, 0.8))


def test_vectors_get_the_mean_task_vector_and_may_be_chunked():
    base, xs = task_models((13,), 3, seed=4)
    mean = sum(x - base for x in xs) / 3
    for name in ("tsvm", "iso_c", "iso_cts"):
        assert not get_method(name).needs_whole((13,))
        out = run_method(name, base, xs, {"lambda": 0.9})
        close(out, base + 0.9 * mean)
        assert torch.equal(run_method(name, base, xs, {"lambda": 0.9}, chunk_rows=4), out)


def test_svd_workspace_grows_with_the_tensor():
    small = get_method("tsvm").whole_tensor_cost((64, 64), 3)
    large = get_method("tsvm").whole_tensor_cost((1024, 1024), 3)
    assert large.elements > 4 * 1024 * 1024 and large.flops > 3 * small.flops * 4096 / 64


# --- through the CLI -------------------------------------------------------------------------

def recipe(t, method, extra=""):
    return f"""
merge_method: {method}
base_model: {t['base']}
models:
  - model: {t['a']}
    parameters: {{weight: 1.0}}
  - model: {t['b']}
    parameters: {{weight: 1.0}}
parameters: {{lambda: 1.0}}
dtype: float32
{extra}"""


def test_plan_lists_the_svd_tensors_and_run_never_chunks_them(tmp_path, tiny_models):
    t = tiny_models
    path = tmp_path / "r.yml"
    path.write_text(recipe(t, "iso_c"))
    result = cli("plan", path, "--format", "json", "--max-unit", "20K")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    whole = {w["tensor"] for w in summary["whole_tensors"]}
    two_d = {n for n, info in load_tensors(t["base"]).items() if info.dim() == 2}
    assert whole == two_d
    assert not whole & {c["tensor"] for c in summary["chunked_tensors"]}
    path.write_text(recipe(t, "task_arithmetic"))  # the same cap does cut the same tensors for a row-local method
    chunked = json.loads(cli("plan", path, "--format", "json", "--max-unit", "20K").stdout)["chunked_tensors"]
    assert {c["tensor"] for c in chunked} & two_d
    out = load_tensors(merge(tmp_path, recipe(t, "iso_c"), "--max-unit", "20K"))
    inputs = {k: load_tensors(t[k]) for k in ("base", "a", "b")}
    name = "model.embed_tokens.weight"
    close(out[name], iso_c_reference(inputs["base"][name], [inputs["a"][name], inputs["b"][name]], 1.0))


def test_a_budget_too_small_for_an_svd_is_refused_in_one_line(tmp_path, tiny_models):
    path = tmp_path / "r.yml"
    path.write_text(recipe(tiny_models, "tsvm"))
    needed = json.loads(cli("plan", path, "--format", "json").stdout)["min_ram_bytes"]
    for command in (("plan", path), ("run", path, "-o", tmp_path / "out")):
        result = cli(*command, "--ram", str(needed - (64 << 20)))  # the in-process baseline moves by a few MB
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "takes an SVD of the whole tensor" in lines[0] and "tensor '" in lines[0], result.output
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_rank_deficient_task_vectors_are_reported(tmp_path, tiny_models):
    from safetensors.torch import load_file, save_file

    t = tiny_models
    low = {}
    for k in ("a", "b"):  # a copy of the base whose q_proj moved by a rank-1 change
        folder = tmp_path / f"low_{k}"
        folder.mkdir()
        for f in t["base"].iterdir():
            if f.suffix != ".safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        for f in t["base"].glob("*.safetensors"):
            tensors = load_file(f)
            name = "model.layers.0.self_attn.q_proj.weight"
            if name in tensors:
                g = torch.Generator().manual_seed(ord(k))
                tensors[name] = tensors[name] + 0.1 * torch.outer(torch.randn(tensors[name].shape[0], generator=g),
                                                                  torch.randn(tensors[name].shape[1], generator=g))
            save_file(tensors, folder / f.name, metadata={"format": "pt"})
        low[k] = folder
    path = tmp_path / "r.yml"
    path.write_text(recipe({"base": t["base"], "a": low["a"], "b": low["b"]}, "iso_c", "include: ['*q_proj*']"))
    result = cli("run", path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "numerical rank" in result.output and "q_proj" in result.output
    report = json.loads((tmp_path / "out" / ".mergeng" / "report.json").read_text())
    assert any("model.layers.0.self_attn.q_proj.weight" in w for w in report["method_warnings"])
    strict = cli("run", path, "-o", tmp_path / "strict", "--strict")  # the weights' warning stops a --strict run
    assert strict.exit_code == 1 and "numerical rank" in strict.output and "--strict stops here" in strict.output, strict.output


# --- SVC -------------------------------------------------------------------------------------

def svc_reference(base, tasks, merged, alpha):
    """Per singular direction r of ΔM: γ_r = N / Σ_i max(α, ⟨u_rᵀΔM, u_rᵀτ_i⟩/‖u_rᵀτ_i‖²), S_r ← γ_r·S_r."""
    b = base.double()
    delta = merged.double() - b
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    gamma = []
    for r in range(s.numel()):
        a = u[:, r] @ delta
        coefficients = [float((a @ (u[:, r] @ (x.double() - b))) / (u[:, r] @ (x.double() - b)).square().sum()) for x in tasks]
        gamma.append(len(tasks) / sum(max(alpha, c) for c in coefficients))
    return (b + u @ torch.diag(torch.tensor(gamma, dtype=torch.float64) * s) @ vh).float()


def test_svc_calibrates_the_marked_merge_against_the_task_models():
    base, xs = task_models((12, 9), 3, seed=6)
    merge_ = base + 0.9 * sum(x - base for x in xs)  # an over-counting merge
    out = run_method("svc", base, [xs[0], merge_, xs[1], xs[2]], {"merged": [False, True, False, False], "alpha": 0.2})
    close(out, svc_reference(base, xs, merge_, 0.2))
    vector, vector_xs = task_models((7,), 2, seed=7)
    assert torch.equal(run_method("svc", vector, [vector_xs[0], vector_xs[1]], {"merged": [False, True]}), vector_xs[1])


def test_calibrate_svc_follows_any_task_vector_method_and_refuses_methods_without_a_base():
    from mergeng.errors import MergeError
    from mergeng.methods.svc import with_svc_calibration
    from test_methods_chunking import full_params
    from mergeng.methods.registry import MergeContext
    import pytest

    base, xs = task_models((10, 8), 3, seed=8)
    params = {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.6, 0.7], "lambda": 1.0}
    ties = get_method("ties")
    calibrated = with_svc_calibration(ties)
    assert calibrated.needs_whole((10, 8)) and not calibrated.needs_whole((10,))
    full = {**full_params("ties", params, 3), "calibrate": "svc", "svc_alpha": 0.3}
    out = calibrated(base, xs, full, MergeContext("t", 0, 10, 10))
    merged = run_method("ties", base, xs, params)
    close(out, svc_reference(base, xs, merged, 0.3))
    with pytest.raises(MergeError, match="has no base"):
        with_svc_calibration(get_method("linear"))


def test_an_svd_intermediate_read_in_row_chunks_is_computed_whole_once(tmp_path, tiny_models):
    """A multi-stage recipe whose first stage is ISO-C, read by a row-chunked task arithmetic stage:
    the fused run equals running the stages one after another."""
    t = tiny_models
    stage1 = recipe(t, "iso_c").replace("dtype: float32", "dtype: float32\nname: iso")
    final = f"""merge_method: task_arithmetic
base_model: {t['base']}
models:
  - model: iso
    parameters: {{weight: 0.7}}
  - model: {t['b']}
    parameters: {{weight: 0.3}}
dtype: float32
"""
    fused = load_tensors(merge(tmp_path, stage1 + "---\n" + final, "--max-unit", "20K", name="fused"))
    first = merge(tmp_path, recipe(t, "iso_c"), name="first")
    alone = load_tensors(merge(tmp_path, final.replace("model: iso", f"model: {first}"), name="second"))
    assert fused.keys() == alone.keys()
    for name in alone:
        assert torch.equal(fused[name], alone[name]), name


def test_svd_merges_give_the_same_bytes_for_any_thread_count():
    from mergeng.methods.registry import MergeContext

    base, xs = task_models((160, 96), 3, seed=9)
    before = torch.get_num_threads()
    cases = [("tsvm", {}), ("iso_c", {}), ("iso_cts", {}), ("svc", {"merged": [False, False, True]})]
    try:
        results = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, params in cases:
                method = get_method(name)
                full = {p.name: params.get(p.name, [p.default] * 3 if p.per_model else p.default) for p in method.parameters.values()}
                results[name, threads] = method(base, xs, full, MergeContext("t", 0, 160, 160))
    finally:
        torch.set_num_threads(before)
    for name, _ in cases:
        assert torch.equal(results[name, 1], results[name, 2]), name
    assert torch.get_num_threads() == before


def test_a_lora_input_is_flagged_by_plan_and_its_low_rank_tensors_by_run(tmp_path, tiny_models):
    from mergeng.cli.tiny_models import make_lora_adapter

    t = tiny_models
    adapter = make_lora_adapter(tmp_path / "adapter", rank=2, target_modules=("q_proj",))
    text = f"""
merge_method: tsvm
base_model: {t['base']}
models:
  - model: {t['base']}+{adapter}
  - model: {t['a']}
parameters: {{lambda: 1.0}}
include: ['*layers.0.self_attn.q_proj*', '*layers.0.mlp.up_proj*']
dtype: float32
"""
    path = tmp_path / "r.yml"
    path.write_text(text)
    planned = json.loads(cli("plan", path, "--format", "json").stdout)
    assert any("LoRA adapter" in w and "rank" in w for w in planned["warnings"])
    result = cli("run", path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / ".mergeng" / "report.json").read_text())
    flagged = " ".join(report["method_warnings"])
    assert f"layers.0.self_attn.q_proj.weight': the task vector of model '{t['base']}+{adapter}' has numerical rank 2" in flagged
    assert f"model '{t['a']}'" not in flagged  # full-rank task vectors are not flagged


def test_iso_cts_refuses_a_fraction_that_leaves_a_negative_common_space():
    import pytest

    from mergeng.errors import MergeError

    base, xs = task_models((5, 5), 3, seed=10)  # r = 5: round(5/3)·3 = 6 task directions > 5
    with pytest.raises(MergeError, match="common_space_fraction"):
        run_method("iso_cts", base, xs, {"common_space_fraction": 0.0})


def test_strict_stops_at_a_rank_deficient_tensor(tmp_path, tiny_models):
    from mergeng.cli.tiny_models import make_lora_adapter

    t = tiny_models
    adapter = make_lora_adapter(tmp_path / "adapter", rank=2, target_modules=("q_proj",))
    path = tmp_path / "r.yml"
    path.write_text(f"merge_method: iso_c\nbase_model: {t['base']}\nmodels:\n  - model: {t['base']}+{adapter}\n"
                    f"include: ['*layers.0.self_attn.q_proj*']\ndtype: float32\n")
    # plan's LoRA warning alone stops --strict before any weight is read
    result = cli("run", path, "-o", tmp_path / "out", "--strict")
    assert result.exit_code == 2 and "LoRA adapter" in result.output, result.output


def test_identical_models_are_flagged_as_sharing_directions():
    from mergeng.methods.registry import MergeContext

    base, (a, b) = task_models((20, 16), 2, seed=11)
    for name in ("tsvm", "iso_cts"):
        method = get_method(name)
        params = {p.name: [p.default] * 2 if p.per_model else p.default for p in method.parameters.values()}
        ctx = MergeContext("t", 0, 20, 20, 0, ("x", "y"))
        method(base, [a, a.clone()], params, ctx)
        assert any("share singular directions" in note for note in ctx.notes), name
        ctx = MergeContext("t", 0, 20, 20, 0, ("x", "y"))
        method(base, [a, b], params, ctx)
        assert ctx.notes == [], name


def test_calibrate_svc_on_ties_chunks_vectors_with_their_statistics_and_calibrates_matrices(tmp_path, tiny_models):
    t = tiny_models
    ties = f"""merge_method: ties
base_model: {t['base']}
models:
  - model: {t['a']}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {t['b']}
    parameters: {{weight: 0.7, density: 0.6}}
dtype: float32
"""
    plain = load_tensors(merge(tmp_path, ties, name="plain"))
    calibrated_recipe = ties.replace("dtype: float32", "parameters: {calibrate: svc, svc_alpha: 0.2}\ndtype: float32")
    path = tmp_path / "c.yml"
    path.write_text(calibrated_recipe)
    chunked = {c["tensor"] for c in json.loads(cli("plan", path, "--format", "json", "--max-unit", "256").stdout)["chunked_tensors"]}
    assert "model.norm.weight" in chunked  # a vector cut into row chunks, TIES' statistics passes first
    calibrated = load_tensors(merge(tmp_path, calibrated_recipe, "--max-unit", "256", name="calibrated"))
    inputs = {k: load_tensors(t[k]) for k in ("base", "a", "b")}
    for name, value in calibrated.items():
        if value.dim() == 1:
            assert torch.equal(value, plain[name]), name  # calibration leaves vectors as the method made them
        else:
            close(value, svc_reference(inputs["base"][name], [inputs["a"][name], inputs["b"][name]], plain[name], 0.2))


# --- tsvm's opt-in randomized SVD --------------------------------------------------------------

def decaying(m, n, rate, seed):
    """An m×n matrix with singular values rate**j (a task vector's typical spectrum, fast or slow decay)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    return (u * rate ** torch.arange(min(m, n), dtype=torch.float64)) @ v.T


def test_the_randomized_svd_states_an_error_that_bounds_its_real_one():
    """Against an exact SVD: the stated figure (how much more of τ the sketch's k directions miss than an exact SVD's, at
    most: a guaranteed bound, loose when the spectrum decays slowly) is never below the real excess, and is small on
    a fast-decaying spectrum."""
    from mergeng.methods.registry import MergeContext
    from mergeng.methods.subspace import RESIDUAL_EXCESS, top_svd

    for rate, seed in ((0.9, 1), (0.97, 2), (0.999, 3)):
        tau = decaying(300, 200, rate, seed).float()
        k = 60
        ctx = MergeContext("t", 0, 300, 300)
        u, s, vh = top_svd(tau, k, True, 12345, ctx)
        exact = torch.linalg.svdvals(tau.double())
        norm = float(tau.double().norm())
        approx = tau.double() - (u[:, :k] * s[:k]).double() @ vh[:k].double()
        real = (float(approx.norm()) - float(exact[k:].norm())) / norm
        stated = ctx.figures[RESIDUAL_EXCESS]
        assert 0 <= real <= stated + 1e-6, (rate, real, stated)
        if rate == 0.9:  # a fast decay: the sketch is all but exact, and the figure says so
            assert stated < 1e-3 and torch.allclose(s[:k].double(), exact[:k], rtol=1e-3), rate
    assert stated > 1e-2  # rate 0.999: the spectrum hardly decays; the figure says the sketch may be far off


def test_randomized_tsvm_runs_deterministically_and_reports_its_error(tmp_path, tiny_models):
    t = tiny_models
    path = tmp_path / "r.yml"
    path.write_text(recipe(t, "tsvm", "parameters: {lambda: 1.0, randomized_svd: true}"))
    planned = cli("plan", path)
    assert planned.exit_code == 0 and "randomized_svd" in planned.output, planned.output
    first = merge(tmp_path, path.read_text(), name="first")
    again = merge(tmp_path, path.read_text(), "--workers", "1", "--max-unit", "20K", name="again")
    exact = load_tensors(merge(tmp_path, recipe(t, "tsvm"), name="exact"))
    out, out2 = load_tensors(first), load_tensors(again)
    report = json.loads((first / ".mergeng" / "report.json").read_text())
    figures = report["method_figures"]
    sketched = {n for n, x in out.items() if x.dim() == 2 and min(x.shape) // 2 + 10 < min(x.shape)}  # k = r/2, 2 models
    assert set(figures) == sketched and sketched, figures
    assert all(0 <= f["tsvm randomized SVD: relative residual beyond an exact SVD's"] <= 1 for f in figures.values())
    for name in out:
        assert torch.equal(out[name], out2[name]), name  # same bytes for any worker count or unit cap
        if name not in sketched:  # vectors (mean task vector), or too small to sketch (k + 10 ≥ min(m, n)): exact
            assert torch.equal(out[name], exact[name]), name
