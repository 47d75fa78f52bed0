"""Stage 4, the schedule: the plan's tasks cut into units and ordered so peak RSS stays under --ram.

    tasks ─► cost_model.py (bytes each unit holds: the one cost model) ─► scheduler.py (order, chunk sizes)
             memory.py (sizes, budgets, the OS's RSS)                      timeline.py (predicted memory over time)

Owns: what every unit costs, the order policy (read scheduler.py's header first), feasibility.
May import: recipe, inputs, plan, methods/, errors.
Invariant: the schedule is static: made from headers before the first unit runs, the same for
the same plan, budget and options, so `plan` prints what `run` does.
"""
