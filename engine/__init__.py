"""The merge machinery, independent of any merge method. The folder tree is the pipeline:

    recipe/ ─► inputs/ ─► plan/ ─► schedule/ ─► execute/ ─► output/        run.py strings them together
    what was   models as   a task per  units under  worker threads  shards,       api.py: mergeng.merge/plan
    asked      headers;    output      --ram, one   run a method    journal,      graph.py: the plan's views
               read_rows   tensor      cost model   on rows         output files
                                     builders/  (multi-stage, MoE, fill-missing, LoRA extraction, core space: other plans)
                                     cluster/   (the same schedule as Ray tasks)

Each package opens with what it owns, what it may import and its invariants. Imports only go
down this list: recipe < inputs < plan < schedule < output < execute < builders < run, graph <
cluster < api (output sits below execute because the executor writes into it; it is never told
about schedules). tests/test_import_structure.py fails on any import against that order, and on
any cycle. Reading order for a newcomer: the packages in that order, each one's __init__ first;
../methods/declaration.py and registry.py after plan/ (merge methods are plain functions);
../architectures/ says what tensor names mean (layer stacks, alignment, vocabulary axes).
"""

# True in a `mergeng` command-line process (set by cli/app.py's entry point): one plan, one run, then exit, so
# what planning made may be frozen out of the garbage collector's sight (engine/run.py, cyclic_gc_paused)
ONE_SHOT_PROCESS = False
