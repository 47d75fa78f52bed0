"""Llama-shaped model folders made from scratch, for the demo, the tests and the benchmarks.

There is no model hub here, so the project builds its own inputs: random weights in a
Llama/Mistral/Qwen layout with a config.json that transformers loads, a small word-level
tokenizer and a generation config. Variants are the same base plus seeded noise, like
fine-tunes of one model. Tensors stream through the shard writer, so a ~1B model is built
without holding it in memory; a build that fails or is interrupted deletes its unfinished
`.partial` shards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..engine.inputs.dtypes import dtype_name
from ..engine.recipe.schema import RECIPE_DTYPES
from ..engine.output.writer import ShardLayout, ShardWriter
from ..engine.plan.tensor_task import OutputTensor


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 256
    tie_word_embeddings: bool = False


TINY = LlamaShape()
BENCH_1B = LlamaShape(2048, 20, 32, 4, 5632, 32000)
LLAMA3_70B = LlamaShape(8192, 80, 64, 8, 28672, 128256)


def llama_tensors(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    h, kv = shape.hidden_size, shape.hidden_size // shape.num_attention_heads * shape.num_key_value_heads
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (shape.intermediate_size, h)),
            (p + "mlp.up_proj.weight", (shape.intermediate_size, h)),
            (p + "mlp.down_proj.weight", (h, shape.intermediate_size)),
        ]
    names.append(("model.norm.weight", (h,)))
    if not shape.tie_word_embeddings:
        names.append(("lm_head.weight", (shape.vocab_size, h)))
    return names


def llama_config(shape: LlamaShape, dtype: str) -> dict:
    cfg = asdict(shape)
    cfg.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype=dtype,
    )
    return cfg


def _tensor(name: str, shape: tuple[int, ...], seed: int, variant: int, noise: float) -> torch.Tensor:
    """Deterministic per tensor name: variant k = variant 0 + k-seeded noise."""
    key = sum(ord(c) * 31**i for i, c in enumerate(name)) % (2**31)
    base_gen = torch.Generator().manual_seed(seed * 1_000_003 + key)
    if len(shape) == 1:
        value = 1.0 + 0.1 * torch.randn(shape, generator=base_gen)
    else:
        value = torch.randn(shape, generator=base_gen) * (1.0 / shape[-1] ** 0.5)
    if variant:
        noise_gen = torch.Generator().manual_seed(seed * 1_000_003 + key + 7919 * variant)
        value += noise * value.abs().mean() * torch.randn(shape, generator=noise_gen)
    return value


def write_tokenizer(out: Path, vocab_size: int) -> None:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, min(vocab_size, 200)):
        vocab[f"w{i}"] = i
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for c, i in list(vocab.items())[:4]
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 256,
    }, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2))


def make_sparse_llama(out: str | Path, shape: LlamaShape, *, dtype: str = "bfloat16", shard_size: int = 5 * 10**9) -> Path:
    """A model folder whose shards are headers followed by holes: full-size files that take no disk.

    For planning tests at 70B scale; reading them yields zeros."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = RECIPE_DTYPES[dtype]
    layout = ShardLayout([OutputTensor(n, torch_dtype, s) for n, s in llama_tensors(shape)], shard_size)
    writer = ShardWriter(layout, out)
    writer.open()  # header written, file truncated to its full size
    for shard in layout.shards:
        writer.finish_shard(shard)
    writer.write_index()
    (out / "config.json").write_text(json.dumps(llama_config(shape, dtype_name(torch_dtype)), indent=2))
    return out


def make_llama(out: str | Path, shape: LlamaShape = TINY, *, seed: int = 0, variant: int = 0,
               noise: float = 0.05, dtype: str = "float32", shard_size: int | None = None) -> Path:
    """Write a Llama-shaped model folder; `variant` > 0 adds seeded noise to variant 0's weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = RECIPE_DTYPES[dtype]
    _write_model(out, llama_tensors(shape), lambda name, s: _tensor(name, s, seed, variant, noise), dtype, shard_size)
    (out / "config.json").write_text(json.dumps(llama_config(shape, dtype_name(torch_dtype)), indent=2))
    write_tokenizer(out, shape.vocab_size)
    return out


# -- the models the example recipes in configs/ name (mergeng examples) --------------------------

@dataclass(frozen=True)
class ClipShape:
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    image_size: int = 28
    patch_size: int = 14


TINY_CLIP = ClipShape()
LLAVA_IMAGE_TOKEN = 255  # the last id of TINY's vocabulary
LLAVA_LANGUAGE_PREFIX = "language_model."  # the `language_model.model.*` layout transformers loads


def clip_tensors(shape: ClipShape) -> list[tuple[str, tuple[int, ...]]]:
    """A CLIP vision tower as LLaVA holds it (`vision_tower.vision_model.*`)."""
    h, inter = shape.hidden_size, shape.intermediate_size
    positions = (shape.image_size // shape.patch_size) ** 2 + 1
    p = "vision_tower.vision_model."
    names: list[tuple[str, tuple[int, ...]]] = [
        (p + "embeddings.class_embedding", (h,)),
        (p + "embeddings.patch_embedding.weight", (h, 3, shape.patch_size, shape.patch_size)),
        (p + "embeddings.position_embedding.weight", (positions, h)),
        (p + "pre_layrnorm.weight", (h,)), (p + "pre_layrnorm.bias", (h,)),
    ]
    for i in range(shape.num_hidden_layers):
        q = f"{p}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            names += [(f"{q}self_attn.{proj}.weight", (h, h)), (f"{q}self_attn.{proj}.bias", (h,))]
        names += [(q + "layer_norm1.weight", (h,)), (q + "layer_norm1.bias", (h,)),
                  (q + "mlp.fc1.weight", (inter, h)), (q + "mlp.fc1.bias", (inter,)),
                  (q + "mlp.fc2.weight", (h, inter)), (q + "mlp.fc2.bias", (h,)),
                  (q + "layer_norm2.weight", (h,)), (q + "layer_norm2.bias", (h,))]
    names += [(p + "post_layernorm.weight", (h,)), (p + "post_layernorm.bias", (h,))]
    return names


def llava_tensors(text: LlamaShape, vision: ClipShape) -> list[tuple[str, tuple[int, ...]]]:
    """(output name, name its values are drawn under, shape): the language model's values are those
    of the text Llama of the same shape, so `make_llama(variant=k)` is a fine-tune of it."""
    projector = [("multi_modal_projector.linear_1.weight", (text.hidden_size, vision.hidden_size)),
                 ("multi_modal_projector.linear_1.bias", (text.hidden_size,)),
                 ("multi_modal_projector.linear_2.weight", (text.hidden_size, text.hidden_size)),
                 ("multi_modal_projector.linear_2.bias", (text.hidden_size,))]
    language = [(LLAVA_LANGUAGE_PREFIX + n, s) for n, s in llama_tensors(text)]
    return clip_tensors(vision) + projector + language


def llava_config(text: LlamaShape, vision: ClipShape, dtype: str) -> dict:
    text_config = llama_config(text, dtype)
    del text_config["architectures"]
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": LLAVA_IMAGE_TOKEN, "image_seq_length": (vision.image_size // vision.patch_size) ** 2,
        "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "text_config": text_config,
        "vision_config": {**asdict(vision), "model_type": "clip_vision_model", "hidden_act": "quick_gelu",
                          "layer_norm_eps": 1e-5, "projection_dim": vision.hidden_size, "num_channels": 3},
        "tie_word_embeddings": text.tie_word_embeddings, "torch_dtype": dtype,
    }


def _write_model(out: Path, specs: list[tuple[str, tuple[int, ...]]], values, dtype: str, shard_size: int | None) -> None:
    """Stream `values(name, shape)` into shards (no half-written `.partial` shard stays behind)."""
    torch_dtype = RECIPE_DTYPES[dtype]
    layout = ShardLayout([OutputTensor(n, torch_dtype, s) for n, s in specs], shard_size or 5 * 10**9)
    writer = ShardWriter(layout, out)
    for shard in layout.shards:  # rebuilt from scratch (the writer would keep a finished shard)
        writer.final_path(shard).unlink(missing_ok=True)
    writer.open()
    try:
        for name, s in specs:
            writer.write_rows(name, 0, values(name, s).to(torch_dtype))
        for shard in layout.shards:
            writer.finish_shard(shard)
    except BaseException:
        writer.discard()
        raise
    writer.write_index()


def make_llava(out: str | Path, text: LlamaShape = TINY, vision: ClipShape = TINY_CLIP, *, seed: int = 0, variant: int = 0,
               noise: float = 0.05, dtype: str = "float32") -> Path:
    """A LLaVA folder (CLIP vision tower, projector, Llama language model) that transformers loads,
    written without transformers; its language model holds `make_llama(text, seed=seed)`'s values."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def values(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _tensor(name.removeprefix(LLAVA_LANGUAGE_PREFIX), shape, seed, variant, noise)

    _write_model(out, llava_tensors(text, vision), values, dtype, None)
    (out / "config.json").write_text(json.dumps(llava_config(text, vision, dtype_name(RECIPE_DTYPES[dtype])), indent=2))
    write_tokenizer(out, text.vocab_size)
    return out


def make_lora_adapter(out: str | Path, shape: LlamaShape = TINY, *, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                      target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) for a Llama of `shape`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (rows, cols) in [(n, s) for n, s in llama_tensors(shape) if len(s) == 2]:
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in target_modules:
            key = f"base_model.model.{module}"
            tensors[key + ".lora_A.weight"] = _tensor(key + ".A", (rank, cols), seed, 0, 0.0)
            tensors[key + ".lora_B.weight"] = _tensor(key + ".B", (rows, rank), seed, 0, 0.0) * 0.1
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": list(target_modules), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "base_model_name_or_path": None,
    }, indent=2))
    return out


# Every model folder the recipes in configs/ name, relative to the recipes' folder, and how to make it.
EXAMPLE_MODELS = {
    "models/base": lambda p: make_llama(p, variant=0),
    "models/tuned-a": lambda p: make_llama(p, variant=1),
    "models/tuned-b": lambda p: make_llama(p, variant=2),
    "adapters/my-lora": lambda p: make_lora_adapter(p),
    "adapters/other-lora": lambda p: make_lora_adapter(p, rank=6, alpha=6.0, seed=1, target_modules=("q_proj", "o_proj")),
    "models/llava-base": lambda p: make_llava(p, variant=0),
    "models/llava-tuned": lambda p: make_llava(p, variant=2),
    "models/llama-finetune": lambda p: make_llama(p, variant=1),
}
