"""Tiny vision-language models built with transformers (random weights, save_pretrained)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

IMAGE_TOKEN = 299


def llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=4)


def make_llava(path: Path, seed: int) -> Path:
    """LLaVA in the `language_model.model.*` layout transformers saves."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    LlavaForConditionalGeneration(llava_config()).save_pretrained(path)
    return path


def to_new_llava_layout(src: Path, dst: Path) -> Path:
    """The same checkpoint in the `model.language_model.*` layout (transformers loads both)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    renamed = {}
    for name, value in tensors.items():
        if name.startswith("language_model.model."):
            name = "model.language_model." + name[len("language_model.model."):]
        elif name.startswith("language_model.lm_head."):
            name = name[len("language_model."):]
        else:
            name = "model." + name
        renamed[name] = value
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(src / "config.json", dst / "config.json")
    return dst


def make_text_llama_for_llava(path: Path, seed: int) -> Path:
    """A text-only Llama shaped like the LLaVA's language model (as if fine-tuned from it)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(llava_config().text_config).save_pretrained(path)
    return path


def make_qwen2_vl(path: Path, seed: int) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293,
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    return path


def save_as_bin(src: Path, dst: Path) -> Path:
    """The same weights as a zip-pickle pytorch_model.bin (what older checkpoints ship)."""
    dst.mkdir(parents=True, exist_ok=True)
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    shutil.copyfile(src / "config.json", dst / "config.json")
    return dst


def llava_forward(folder: Path) -> torch.Tensor:
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 5, 6]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.isfinite(logits).all()
    return logits


def qwen2_vl_forward(folder: Path) -> torch.Tensor:
    from transformers import Qwen2VLForConditionalGeneration

    model, info = Qwen2VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[1, 292, 290, 293, 5, 6]])  # one image token: a 2x2 patch grid merged 2x2
    pixels = torch.randn(4, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    token_types = (ids == 290).int()  # 1 marks image tokens (what the processor returns)
    logits = model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 2, 2]]),
                   mm_token_type_ids=token_types).logits
    assert torch.isfinite(logits).all()
    return logits


def config_of(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
