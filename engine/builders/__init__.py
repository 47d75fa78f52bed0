"""What turns inputs other than one recipe into the pipeline's plan (engine/plan/merge_plan.py's
TensorTasks), which then runs on the one scheduler, executor and writer:

- stages.py        multi-stage recipes (mergekit-multi): each stage's plan becomes a source whose
                   tensors are computed on read, so the output's plan reads them in memory
- moe.py           mergekit-moe configs: experts stacked from dense models (moe_gates.py: routers)
- fill_missing.py  a fine-tuned language model put back into its vision-language model
- lora_extract.py  a PEFT adapter from a fine-tune by per-tensor SVD (the one builder that runs
                   its own loop: its outputs' shapes are known only after each SVD)
- core_space.py    `merge_method: core_space`: LoRA adapters merged in their core space; each
                   core_space task becomes its base tensor read through the merged low-rank
                   update (engine/run.py calls it on every plan), or the update is written out
                   as one PEFT adapter (`mergeng lora merge`)

May import: every pipeline stage (recipe, inputs, plan, schedule, output, execute), methods/,
architectures/, errors, version. The pipeline never imports a builder; only the entry points
(engine/run.py, engine/api.py) and the plan's views (engine/graph.py) know them.
"""
