"""The merge machinery, independent of any merge method.

    recipe ──► plan (one task per output tensor) ──► schedule (units under --ram) ──► executor ──► shards + journal

Reading order for a newcomer (each module opens with why it exists and its invariants):
 1. recipe_schema.py, recipe.py, validation.py    what a recipe says, and what is refused or warned
 2. tensor_info.py, source.py                     models on disk: headers, and the one way bytes are read
    (../architectures/ says what tensor names mean: layer stacks, alignment, vocabulary axes)
 3. ../methods/declaration.py, registry.py        merge methods are plain functions; then linear.py, task_vectors.py
 4. tensor_task.py, merge_plan.py                 recipe + headers -> TensorTasks (modules.py, tokenizer_merge.py,
                                                  output_config.py: VLM modules, vocabularies, config.json)
 5. cost_model.py                                 the bytes every unit holds: the one cost model
 6. scheduler.py                                  the order policy and chunk sizes (read its header first)
 7. tensor_rows.py, statistics.py                 how a unit's rows are computed
 8. executor.py, writer.py, journal.py            running units, writing shards in place, resuming
 9. run.py, api.py                                plan / run end to end, the Python API
10. builders/                                     other inputs made into plans: multi-stage recipes, MoE,
                                                  fill-missing, LoRA extraction (lora.py: adapters as sources)
11. ray_partitions.py, ray_cluster.py, ray_run.py the same schedule on a Ray cluster
"""
