"""mergekit-yaml 0.1.5's options and what mergeng does with each (the engine's side; cli/mergekit_options.py
declares them on the command line, engine/api.py takes them as keywords).

Every option is accepted: with its meaning where mergeng has one (`--out-shard-size`,
`--copy-tokenizer`, `--allow-crimes`, ...), as a no-op with a note where mergeng does the thing
anyway (`--lazy-unpickle`, `--clone-tensors`, ...), and refused (MergeError, exit 2) where it asks
for a device mergeng does not compute on (`--cuda`, `--device cuda`, ...): mergeng computes on the
CPU within `--ram`, and never runs silently elsewhere than asked. `MERGEKIT_OPTIONS` is the
table the README shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ...errors import MergeError

# mergekit-yaml option -> what mergeng does with it (README's table; tests check every option is here)
MERGEKIT_OPTIONS: dict[str, str] = {
    "CONFIG_FILE OUT_PATH": "`mergeng run CONFIG_FILE OUT_PATH` (or `-o OUT_PATH`; both given and different is an error)",
    "--allow-crimes": "same: models whose config.json `architectures` differ are refused without it (a VLM also counts as its language model's architecture)",
    "--unsafe-truncate-embeddings": "same as `--truncate-vocab`",
    "--transformers-cache": "same: the cache Hub models are fetched into (default: the HF cache, `HF_HUB_CACHE`/`HF_HOME`, shared with transformers)",
    "--lora-merge-cache": "accepted, no effect (note): LoRA adapters are applied at read time, nothing is cached",
    "--lora-merge-dtype": "accepted, no effect (note): LoRA products are computed in float32, the result takes the recipe's `dtype`",
    "--cuda": "refused, exit 2: mergeng computes on the CPU within `--ram` (`--no-cuda` is accepted)",
    "--device": "`cpu` (or `auto`, with a note) accepted; any other device refused, exit 2",
    "--low-cpu-memory": "accepted, no effect (note): `--ram` bounds the process's memory",
    "--out-shard-size": "same as `--shard-size`, same notation: `5B` = 5 billion bytes, `500M`, `100K`, plain bytes (also `5G`, `5GB`, `1.5G`)",
    "--copy-tokenizer": "same (default on); `--no-copy-tokenizer` writes no tokenizer files",
    "--clone-tensors": "accepted, no effect (note): every tensor is written into its own byte range anyway",
    "--trust-remote-code": "same: without it no code a model carries runs (transformers is called with `trust_remote_code=False` where it loads a tokenizer or config); a custom-code model's `*.py` files are copied with a warning either way",
    "--random-seed": "same as `--seed`",
    "--lazy-unpickle": "accepted, no effect (note): `pytorch_model.bin` is always read lazily",
    "--write-model-card": "same (default on); `--no-write-model-card` writes no README.md",
    "--safe-serialization": "accepted (mergeng writes safetensors only); `--no-safe-serialization` refused, exit 2",
    "-v / --verbose": "prints the plan (models, tensors, shards, predicted peak) before the run",
    "--quiet": "same: no progress bar, notes or summary line (warnings and errors are still printed)",
    "--read-to-gpu": "refused, exit 2 (CPU only)",
    "--multi-gpu": "refused, exit 2 (CPU only)",
    "--num-threads / -j": "same: torch's CPU threads for the run (`--workers` sets mergeng's worker threads)",
    "--gpu-rich": "refused, exit 2 (CPU only)",
    "--async-write": "accepted, no effect (note): writes already overlap compute on the worker threads",
    "--write-threads": "accepted, no effect (note): `--workers` sets the threads that read, compute and write",
}


def parse_shard_size(text: str, option: str = "--shard-size") -> int:
    """mergekit's size notation (decimal): `5B` is 5 billion, `500M`, `100K`, or plain bytes; also
    `5G` (= 5B), `2T` and a byte suffix (`5GB`, `500MB`) or a fraction (`1.5G`)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(B?)\s*", str(text).upper())
    if m and m.group(3) and not m.group(2):
        scale = 10**9  # mergekit's B: billion
    else:
        scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)] if m else 0
    size = int(float(m.group(1)) * scale) if m else 0
    if size < 1:
        raise MergeError(f"{option}: cannot read '{text}' as a positive size (mergekit's notation: 5B = 5 billion bytes, 500M, 100K)")
    return size


GPU_REFUSAL = "mergeng computes on the CPU within --ram (no GPU support); drop {flag}"


@dataclass
class MergekitFlags:
    """mergekit-yaml options that need a decision (the rest map onto mergeng options directly)."""
    cuda: bool = False
    device: Optional[str] = None
    read_to_gpu: bool = False
    multi_gpu: bool = False
    gpu_rich: bool = False
    safe_serialization: bool = True
    low_cpu_memory: bool = False
    lazy_unpickle: bool = False
    clone_tensors: bool = False
    async_write: bool = False
    write_threads: Optional[int] = None
    transformers_cache: Optional[str] = None
    lora_merge_cache: Optional[str] = None
    lora_merge_dtype: Optional[str] = None
    num_threads: Optional[int] = None

    def check(self) -> list[str]:
        """Refuse (exit 2) what asks for a device other than the CPU or a pickled output; return
        the notes for options that change nothing here."""
        for flag, given in (("--cuda", self.cuda), ("--gpu-rich", self.gpu_rich), ("--read-to-gpu", self.read_to_gpu),
                            ("--multi-gpu", self.multi_gpu)):
            if given:
                raise MergeError(GPU_REFUSAL.format(flag=flag))
        notes = []
        if self.device is not None:
            device = self.device.strip().lower()
            if device == "auto":
                notes.append("--device auto: mergeng computes on the CPU")
            elif device != "cpu":
                raise MergeError(GPU_REFUSAL.format(flag=f"--device {self.device}"))
        if not self.safe_serialization:
            raise MergeError("--no-safe-serialization: mergeng writes safetensors only; drop the option")
        if self.num_threads is not None and self.num_threads < 1:
            raise MergeError(f"--num-threads: must be 1 or more, got {self.num_threads}")
        if self.write_threads is not None and self.write_threads < 1:
            raise MergeError(f"--write-threads: must be 1 or more, got {self.write_threads}")
        for flag, given, why in (
            ("--low-cpu-memory", self.low_cpu_memory, "--ram bounds the process's memory"),
            ("--lazy-unpickle", self.lazy_unpickle, "pytorch_model.bin is always read lazily"),
            ("--clone-tensors", self.clone_tensors, "every tensor is written into its own byte range anyway"),
            ("--async-write", self.async_write, "writes overlap compute on the worker threads anyway"),
            ("--write-threads", self.write_threads is not None, "--workers sets the threads that read, compute and write"),
            ("--lora-merge-cache", self.lora_merge_cache is not None, "LoRA adapters are applied at read time, nothing is cached"),
            ("--lora-merge-dtype", self.lora_merge_dtype is not None, "LoRA products are computed in float32, the result takes the recipe's dtype"),
        ):
            if given:
                notes.append(f"{flag} has no effect: {why}")
        return notes
