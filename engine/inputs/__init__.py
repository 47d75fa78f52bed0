"""Stage 2, the inputs: the models a recipe names, as headers, and the one way their bytes are read.

    "org/model" or ./folder ─► paths.py ─► source.py: ModelSource (config.json, headers) ─► read_rows()
                                           torch_bin.py (.bin as headers), lora.py (adapters applied on read)

Owns: where a model reference lies, safetensors/.bin headers (TensorInfo), dtype tables and byte
sizes, `read_rows` (every weight byte the engine reads passes through it), LoRA adapters as
sources, the architecture-mixing check. Hub and quantized sources belong here.
May import: recipe, methods/, architectures/, errors.
Invariant: opening a source reads headers only; `read_rows` returns float32 rows (or the asked
dtype) and never holds more than the rows asked for.
"""
