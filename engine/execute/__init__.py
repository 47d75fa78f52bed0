"""Stage 6, execution: a prepared schedule run by worker threads under the budget.

    Prepared (prepared.py: plan + schedule + shard layout) ─► executor.py ─► tensor_rows.py (a method on rows)
                                                                        └─► output/ (writer, journal)

Owns: running units, admitting them against the measured RSS, computing a unit's rows (the one
place a method runs), folding statistics.
May import: every earlier stage (recipe, inputs, plan, schedule, output), methods/, errors.
Invariant: the bytes of a unit depend only on its task and rows, never on threads, timing or the
order units finish in.
"""
