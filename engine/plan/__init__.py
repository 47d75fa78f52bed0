"""Stage 3, the plan: recipe + headers ─► one TensorTask per output tensor; no weight is read.

    Recipe, {label: ModelSource} ─► merge_plan.py ─► MergePlan(tasks, config, vocabulary, warnings, report)
                                    tensor_task.py (TensorTask, OutputTensor), output_config.py (config.json),
                                    vocabulary.py + tokenizer_merge.py (the output vocabulary),
                                    statistics.py (how a tensor's whole-tensor statistics are folded)

Owns: which inputs, method and parameter values make each output tensor, and everything the
merge changes besides weights (config.json, vocabulary), with every dropped tensor or ignored
filter said as a warning.
May import: recipe, inputs, methods/, architectures/, errors.
Invariant: a plan is a pure function of the recipe and the headers (same inputs, same plan).
"""
