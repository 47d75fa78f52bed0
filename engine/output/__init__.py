"""Stage 5, the output: the sink the executor writes into, and what makes a run resumable.

    units' rows ─► writer.py (shards laid out up front, pwritten in place) ─► model-*.safetensors
                   journal.py (durable chunks, the run's fingerprint)        files.py (config, tokenizer, card)
                   folder.py (refuse an unsafe output, --fresh)              verify.py (re-read and check)

Owns: the one safetensors writer, the journal, the output folder's other files and its safety.
May import: recipe, inputs, plan, errors (never the schedule or the executor: it is told what to write).
Invariant: a chunk is recorded in the journal only after its bytes are durable; a shard keeps its
`.partial` name until all of it is.
"""
