"""The same schedule on a Ray cluster (`--executor ray`): one task per output shard.

    Prepared ─► partitions.py (tasks and their memory requests) ─► plan.py (nodes, probes) ─► run.py (tasks, ledger)

Owns: the Ray side only; it reuses run.py's run_merge and the executor unchanged.
May import: everything below it in engine/ (run.py included), errors, version. Ray is imported
lazily, so a missing `[ray]` extra is a one-line error.
Invariant: a cluster run writes the same bytes as a local one.
"""
