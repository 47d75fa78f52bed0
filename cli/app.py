"""The `mergeng` command tree: thin typer commands that call the engine and render with rich.

Exit codes: 0 ok, 1 failed while working, 2 bad usage or recipe, 130 interrupted. Errors are
one red line; `--debug` shows the traceback (cli/console.py). The first Ctrl-C stops a merge;
further ones are ignored while the journal is committed and the workers stop, so the exit is
always a clean 130 (cli/execute.py).

This module is the root of the CLI: it defines `app` and the top-level commands and adds the
`lora` group (cli/lora_cmd.py) and the `moe` command (cli/moe_cmd.py). Those modules, and the
shared options, consoles and merge runner they use, never import this one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import MergeError
from . import mergekit_options as mk
from .console import console, fail, out
from .execute import execute, output_folder, run_recipe
from .lora_cmd import lora_app
from .moe_cmd import moe
from .options import (HELP_OPTIONS, AddressOption, DebugOption, DequantizeOption, ExecutorOption, FreshOption, MaxUnitOption, RamOption,
                      ShardSizeOption, StreamOption, StrictOption, TruncateVocabOption, WorkersOption, executor_name, max_unit_bytes,
                      ram_budget, shard_bytes, worker_count)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, context_settings=HELP_OPTIONS,
                  help="Merge language and vision-language models weight by weight under a RAM budget.")


def _print_version(value: bool) -> None:
    if value:
        from ..version import __version__

        out.print(f"mergeng {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit.")):
    """Merge language and vision-language models weight by weight under a RAM budget."""


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit format)."),
    out_path: Optional[Path] = typer.Argument(None, help="Output folder, as mergekit-yaml's OUT_PATH (or -o). Default: ./merged/<recipe stem>.", show_default=False),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", "--out-path", help="Output folder (or the second argument)."),
    ram: Optional[str] = RamOption,
    shard_size: str = ShardSizeOption,
    workers: Optional[int] = WorkersOption,
    fresh: bool = FreshOption,
    intermediate_dir: Optional[Path] = typer.Option(
        None, "--intermediate-dir", "-I", help="Multi-stage recipes: write each named stage to DIR/NAME and read it from "
        "there (mergekit-multi's way). Default: stages are computed in memory, row chunk by row chunk."),
    seed: Optional[int] = typer.Option(None, "--seed", "--random-seed", help="Seed for random methods (DARE, DELLA); overrides the recipe's seed:."),
    strict: bool = StrictOption,
    truncate_vocab: bool = TruncateVocabOption,
    max_unit: Optional[str] = MaxUnitOption,
    executor: str = ExecutorOption,
    address: Optional[str] = AddressOption,
    debug: bool = DebugOption,
    allow_crimes: bool = mk.AllowCrimesOption,
    copy_tokenizer: bool = mk.CopyTokenizerOption,
    write_model_card: bool = mk.WriteModelCardOption,
    trust_remote_code: bool = mk.TrustRemoteCodeOption,
    verbose: int = mk.VerboseOption,
    quiet: bool = mk.QuietOption,
    num_threads: Optional[int] = mk.NumThreadsOption,
    cuda: bool = mk.CudaOption,
    device: Optional[str] = mk.DeviceOption,
    read_to_gpu: bool = mk.ReadToGpuOption,
    multi_gpu: bool = mk.MultiGpuOption,
    gpu_rich: bool = mk.GpuRichOption,
    safe_serialization: bool = mk.SafeSerializationOption,
    low_cpu_memory: bool = mk.LowCpuMemoryOption,
    lazy_unpickle: bool = mk.LazyUnpickleOption,
    clone_tensors: bool = mk.CloneTensorsOption,
    async_write: bool = mk.AsyncWriteOption,
    write_threads: Optional[int] = mk.WriteThreadsOption,
    transformers_cache: Optional[str] = mk.TransformersCacheOption,
    stream: bool = StreamOption,
    dequantize: bool = DequantizeOption,
    no_space_check: bool = typer.Option(False, "--no-space-check", help="Start even when the output's filesystem (or the HF cache's) has less free space than the merge needs."),
    lora_merge_cache: Optional[str] = mk.LoraMergeCacheOption,
    lora_merge_dtype: Optional[str] = mk.LoraMergeDtypeOption,
):
    """Merge the models of RECIPE into a Hugging Face model folder.

    mergekit-yaml's command line works: `mergeng run CONFIG OUT_PATH [options]`; each of its
    options is accepted (see the README's table), GPU options are refused (mergeng computes on
    the CPU within --ram).

    Example: mergeng run configs/linear.yml merged/linear --ram 2G
    """
    flags = mk.MergekitFlags(cuda=cuda, device=device, read_to_gpu=read_to_gpu, multi_gpu=multi_gpu, gpu_rich=gpu_rich,
                             safe_serialization=safe_serialization, low_cpu_memory=low_cpu_memory, lazy_unpickle=lazy_unpickle,
                             clone_tensors=clone_tensors, async_write=async_write, write_threads=write_threads,
                             transformers_cache=transformers_cache, lora_merge_cache=lora_merge_cache,
                             lora_merge_dtype=lora_merge_dtype, num_threads=num_threads)
    run_recipe(recipe, out_path, out_dir, ram=ram, shard_size=shard_size, workers=workers, fresh=fresh, seed=seed,
               strict=strict, truncate_vocab=truncate_vocab, max_unit=max_unit, debug=debug, allow_crimes=allow_crimes,
               copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, verbose=verbose, quiet=quiet, flags=flags,
               intermediate_dir=intermediate_dir, executor=executor, address=address, stream=stream,
               space_check=not no_space_check, trust_remote_code=trust_remote_code, dequantize=dequantize)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit format)."),
    ram: Optional[str] = RamOption,
    shard_size: str = ShardSizeOption,
    workers: Optional[int] = WorkersOption,
    fmt: str = typer.Option("text", "--format", help="text, json, dot (Graphviz) or html (a self-contained page)."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="With --format html: overlay the measured RSS of a finished run in this output folder."),
    strict: bool = StrictOption,
    truncate_vocab: bool = TruncateVocabOption,
    max_unit: Optional[str] = MaxUnitOption,
    executor: str = ExecutorOption,
    address: Optional[str] = AddressOption,
    stream: bool = StreamOption,
    transformers_cache: Optional[str] = mk.TransformersCacheOption,
    dequantize: bool = DequantizeOption,
    trust_remote_code: bool = mk.TrustRemoteCodeOption,
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where `run` will write (default: as run's, ./merged/<recipe stem>): "
                                           "the plan shows the free space there against the output's size."),
    debug: bool = DebugOption,
):
    """Show what a merge will do, reading headers only: tensors, shards, bytes, peak RAM, disk space.

    Example: mergeng plan configs/linear.yml --ram 2G --format json
    """
    from ..engine.inputs.hub import HubOptions
    from ..engine.inputs.remote_code import trusting_remote_code
    from .plan_html import render_html
    from .plan_view import plan_summary, ray_summary, render_dot, render_partitions, render_text, with_estimate

    try:
        with trusting_remote_code(trust_remote_code):
            ray_plan, prepared = _prepare_for_plan(recipe, ram, shard_size, workers, max_unit, executor, address, strict,
                                                   truncate_vocab, HubOptions(transformers_cache, stream), dequantize)
        if not prepared.schedule.feasible and prepared.schedule.binding_whole:
            from ..engine.schedule.scheduler import require_feasible

            require_feasible(prepared.schedule)  # a tensor that needs a whole SVD cannot fit: one line, exit 2
        target = output_folder(recipe, None, out_dir)
        if fmt == "json":
            # plain JSON (rich's highlighter took 38 s on a 92k-tensor plan); a pipe or a terminal gets the same text
            print(json.dumps({**plan_summary(prepared, target), **({"ray": ray_summary(ray_plan)} if ray_plan else {})}, indent=2))
        elif fmt == "dot":
            print(render_dot(prepared))
        elif fmt == "html":
            summary, predicted = with_estimate(prepared, plan_summary(prepared, target))
            print(render_html(prepared, summary, predicted, profile))
        elif fmt == "text":
            render_text(prepared, out, target)
            if ray_plan:
                render_partitions(ray_plan, out)
        else:
            raise MergeError(f"--format: unknown format '{fmt}' (text, json, dot, html)")
    except Exception as e:  # noqa: BLE001
        fail(e, debug)
    if not prepared.schedule.feasible:
        raise typer.Exit(1)


def _prepare_for_plan(recipe, ram, shard_size, workers, max_unit, executor, address, strict, truncate_vocab, hub, dequantize):
    """`plan`'s prepared merge (and the Ray partitions with --executor ray)."""
    from ..engine.run import prepare

    ray_plan = None
    if executor_name(executor, address) == "ray":  # partitions and memory requests from the cluster's nodes
        from ..engine.cluster.plan import plan_on_ray

        ray_plan = plan_on_ray(recipe, ram_budget(ram), shard_bytes(shard_size), worker_count(workers, hub.stream),
                               max_unit_bytes(max_unit), address=address, strict=strict, truncate_vocab=truncate_vocab, hub=hub,
                               dequantize=dequantize)
        return ray_plan, ray_plan.prepared
    return None, prepare(recipe, ram_budget(ram), shard_bytes(shard_size), worker_count(workers, hub.stream),
                         max_unit_bytes(max_unit), strict=strict, truncate_vocab=truncate_vocab, hub=hub, dequantize=dequantize)


@app.command()
def verify(
    out_dir: Path = typer.Argument(..., help="A folder written by `mergeng run`."),
    debug: bool = DebugOption,
):
    """Re-read a merged folder and check every tensor against the journal's checksums and the index.

    Example: mergeng verify merged/my-model
    """
    from ..engine.output.verify import verify_output

    try:
        checked = verify_output(out_dir)
    except Exception as e:  # noqa: BLE001
        fail(e, debug)
    console.print(f"[green]ok:[/green] {checked} chunks match their checksums in {out_dir}", highlight=False)


@app.command("fill-missing")
def fill_missing(
    donor: str = typer.Option(..., "--donor", help="The complete model (e.g. a VLM) whose files and other tensors are kept: a folder or Hub repo ID."),
    part: str = typer.Option(..., "--part", help="The model whose tensors replace the donor's (e.g. a fine-tuned language model): a folder or Hub repo ID."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    ram: Optional[str] = RamOption,
    shard_size: str = ShardSizeOption,
    fresh: bool = FreshOption,
    stream: bool = StreamOption,
    debug: bool = DebugOption,
):
    """Write DONOR with every tensor PART also has replaced by PART's (names aligned across layouts).

    Example: mergeng fill-missing --donor llava-base --part my-llama-finetune -o llava-finetuned
    """
    from ..engine.builders.fill_missing import build_fill_missing_plan, fill_missing_recipe_text
    from ..engine.execute.prepared import prepare_plan
    from ..engine.inputs.hub import HubOptions, using_hub

    try:
        with using_hub(HubOptions(stream=stream)):
            plan = build_fill_missing_plan(donor, part)
        prepared = prepare_plan(plan, fill_missing_recipe_text(donor, part), ram_budget(ram), shard_bytes(shard_size))
        execute(prepared, out_dir, fresh)
    except Exception as e:  # noqa: BLE001
        fail(e, debug)
    replaced = sum(1 for r in plan.report if r["from"] == [str(part)])
    console.print(f"[green]done:[/green] {replaced} of {len(plan.tasks)} tensors from {part}, the rest from {donor}, in {out_dir}", highlight=False)


@app.command()
def methods(fmt: str = typer.Option("table", "--format", help="table or markdown (the docs/methods.md page).")):
    """List every merge method with its parameters, defaults and whether a base model is required."""
    from .methods_view import render_markdown, render_table

    if fmt == "markdown":
        print(render_markdown(), end="")
    else:
        render_table(out)


DEMO_MARKER = ".mergeng-demo"  # written first into a folder the demo builds: "this one is mine to rebuild"
EXAMPLES_MARKER = ".mergeng-examples"
DEMO_MODELS = ("models/base", "models/tuned-a", "models/tuned-b")
MADE_FILES = {"model.safetensors", "model.safetensors.partial", "config.json", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "adapter_config.json", "adapter_model.safetensors"}


@app.command()
def demo(
    folder: Path = typer.Option(Path("mergeng-demo"), "--dir", help="Where to build the tiny models and the merge (a new or empty folder, or an earlier demo's)."),
    ram: str = typer.Option("1G", "--ram", help="RAM budget for the demo merge."),
    debug: bool = DebugOption,
):
    """Build three tiny Llama-shaped models and merge them (no downloads).

    Example: mergeng demo --dir /tmp/mergeng-demo
    """
    from ..engine.run import prepare
    from ..engine.inputs.source import ModelSource
    from .tiny_models import EXAMPLE_MODELS

    try:
        recipes = {"demo.yml": _example_recipes()["demo.yml"]}
        _refuse_foreign_folder(folder, "--dir", "demo", DEMO_MARKER, recipes, DEMO_MODELS)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DEMO_MARKER).write_text("made by `mergeng demo`, which rebuilds this folder\n")
        for name in DEMO_MODELS:
            EXAMPLE_MODELS[name](folder / name)
        recipe_path = folder / "demo.yml"
        recipe_path.write_text(recipes["demo.yml"])
        console.print(f"built tiny models in {folder}/models/ ({', '.join(Path(m).name for m in DEMO_MODELS)}); merging with {recipe_path}",
                      highlight=False, soft_wrap=True)
        prepared = prepare(recipe_path, ram_budget(ram))
        execute(prepared, folder / "merged", fresh=True, done="demo merge done")
        merged = ModelSource(folder / "merged")
    except Exception as e:  # noqa: BLE001
        fail(e, debug)
    console.print(f"{len(merged.tensors)} tensors in {folder / 'merged'}, a folder transformers loads", highlight=False)


@app.command()
def examples(
    folder: Path = typer.Argument(Path("mergeng-examples"), help="Where to write the recipes and models (a new or empty folder, or one this command made)."),
    debug: bool = DebugOption,
):
    """Write every example recipe of configs/ and the tiny models they name (no downloads).

    Then, in FOLDER, each recipe runs as written: mergeng run linear.yml merged/linear
    (moe.yml with `mergeng moe`). The models are tiny Llamas, a LLaVA and a LoRA adapter.

    Example: mergeng examples /tmp/ex && cd /tmp/ex && mergeng run ties.yml merged/ties
    """
    from .tiny_models import EXAMPLE_MODELS

    try:
        recipes = _example_recipes()
        _refuse_foreign_folder(folder, "FOLDER", "examples", EXAMPLES_MARKER, recipes, tuple(EXAMPLE_MODELS))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / EXAMPLES_MARKER).write_text("made by `mergeng examples`, which rebuilds this folder\n")
        for name, make in EXAMPLE_MODELS.items():
            make(folder / name)
        for name, text in recipes.items():
            (folder / name).write_text(text)
    except Exception as e:  # noqa: BLE001
        fail(e, debug)
    console.print(f"wrote {len(recipes)} recipes and {len(EXAMPLE_MODELS)} models into {folder}; "
                  f"e.g. cd {folder} && mergeng run linear.yml merged/linear", highlight=False, soft_wrap=True)


def _example_recipes() -> dict[str, str]:
    """configs/*.yml as installed with the package, by file name."""
    from importlib import resources

    configs = resources.files("mergeng.configs")
    return {f.name: f.read_text() for f in sorted(configs.iterdir(), key=lambda f: f.name) if f.name.endswith(".yml")}


def _refuse_foreign_folder(folder: Path, option: str, command: str, marker: str, recipes: dict[str, str], models: tuple[str, ...]) -> None:
    """`demo` and `examples` write only into a new or empty folder, or one the same command made
    (its marker, its entries only, its recipes unedited): they never overwrite files they did not create."""
    if folder.exists() and not folder.is_dir():
        raise MergeError(f"{option} {folder} is an existing file; choose another {option}")
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not (folder / marker).exists():
        raise MergeError(f"{option} {folder} is not empty and was not made by `mergeng {command}`; choose another {option} "
                         f"(`mergeng {command}` never overwrites files it did not create)")
    made = {Path(m) for m in models}
    made_dirs = {p for m in made for p in m.parents if p != Path(".")}
    expected_top = {marker, "merged", *recipes, *(p.parts[0] for p in made)}
    foreign = [p for p in sorted(folder.iterdir()) if p.name not in expected_top]
    for d in sorted(made_dirs):
        if (folder / d).is_dir():
            foreign += [p for p in sorted((folder / d).iterdir()) if p.relative_to(folder) not in made | made_dirs]
    for m in sorted(made):
        if (folder / m).is_dir():
            foreign += [p for p in sorted((folder / m).iterdir()) if p.name not in MADE_FILES]
    if foreign:
        raise MergeError(f"{option} {folder}: {foreign[0]} was not made by `mergeng {command}`; move it or choose another {option}")
    for name, text in recipes.items():
        recipe = folder / name
        if recipe.exists() and (not recipe.is_file() or recipe.read_text() != text):
            raise MergeError(f"{recipe} was changed since `mergeng {command}` wrote it; move it or choose another {option}")


app.add_typer(lora_app, name="lora")  # mergeng lora apply / extract
app.command("moe")(moe)  # mergeng moe CONFIG -o OUT


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .. import engine

    engine.ONE_SHOT_PROCESS = True  # this process runs one command and exits
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)

