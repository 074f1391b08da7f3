"""qlora-lite: QLoRA fine-tuning on one consumer GPU, small enough to read in an afternoon.

The public API: every name below is importable from `qlora_lite` itself, and notebooks, benchmarks
and users import it from here (a test keeps them so), so that a move inside a wing breaks nobody.

    from qlora_lite import load_recipe, fit, merge_adapter, open_switcher

    cfg = load_recipe("recipes/tiny-demo.yaml", ["train.max_steps=50"])
    summary = fit(cfg)                                     # trains; writes output_dir/adapter
    merge_adapter(summary["adapter_dir"], "merged/")       # a plain Hugging Face model
    switcher = open_switcher({"demo": summary["adapter_dir"]})
    print(switcher.generate("rot13(HELLO)", adapter="demo"))

Names are imported on first use (PEP 562), so `import qlora_lite` (and `qlora-lite --help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it, grouped as the README's "Python API" table lists them.
_API: dict[str, str] = {
    # the run, end to end
    "load_recipe": "config", "fit": "training.fit", "plan_memory": "planner", "merge_adapter": "export.merge",
    "export_gguf": "export.gguf", "open_switcher": "generate", "AdapterSwitcher": "generate",
    "GenerationSettings": "generate", "inspect_prompt": "methods.inspect_prompt", "QloraLiteError": "errors",
    # recipes
    "RecipeConfig": "config", "ModelConfig": "config", "QuantConfig": "config", "LoRAConfig": "config",
    "PromptConfig": "config", "SelectiveConfig": "config", "BottleneckConfig": "config", "DataConfig": "config",
    "TrainConfig": "config", "DistConfig": "config", "ObjectiveConfig": "config", "config_to_dict": "config", "save_config": "config",
    "build_config": "config",
    # models and methods
    "load_base_model": "quant", "load_tokenizer": "quant", "pick_device": "quant", "resolve_compute_dtype": "quant",
    "enable_gradient_checkpointing": "quant", "keep_4bit_layout": "quant",
    "attach_method": "methods.table", "load_method": "methods.table", "save_method": "methods.table",
    "get_method": "methods.table", "apply_lora": "methods.lora", "lora_layers": "methods.lora",
    "save_adapter": "methods.lora", "load_adapter": "methods.lora", "build_peft_config": "methods.lora",
    # data
    "load_records": "data.records", "tokenize_example": "data.tokenizing", "prepare_datasets": "data.cache",
    "collate_batch": "data.batching", "select_micro_batch": "data.batching", "pack_examples": "data.batching",
    "plan_epoch": "data.batching", "padding_fraction": "data.batching", "GROUP_WINDOW_MICRO_BATCHES": "data.batching",
    "IGNORE_INDEX": "data.formats",
    # training's pieces
    "compute_causal_lm_loss": "training.loss", "build_optimizer": "training.optim", "evaluate_loss": "training.evaluate",
    "compute_objective": "training.objectives", "get_objective": "training.objectives",
    "ActivationOffload": "training.offload", "apply_tiled_mlp": "training.tiled_mlp", "apply_lean_rms_norm": "training.rms_norm",
    # generation
    "build_prompt_ids": "generate", "generate_answer": "generate", "generate_ids": "generate",
    # memory and the planner
    "build_memory_report": "memory", "format_memory_report": "memory", "MemoryMeter": "memory",
    "format_peak_breakdown": "memory", "quant_constants": "memory", "bytes_by_dtype": "memory", "iter_held_tensors": "memory",
    "read_rss_bytes": "memory", "read_peak_rss_bytes": "memory", "read_available_ram_bytes": "memory", "GIB": "planner", "format_plan": "planner",
    "parse_bytes": "planner", "read_model_config": "planner", "read_device_memory_bytes": "planner",
    "search_largest": "planner", "choose_mlp_tile_tokens": "activations",
    # files, tiny models and the demo
    "ShardWriter": "safetensors_io", "CheckpointReader": "safetensors_io", "write_tensors": "safetensors_io",
    "build_tiny_model": "tiny", "build_tokenizer": "tiny", "build_sentencepiece_tokenizer": "tiny",
    "ensure_gguf_base": "gguf_base", "read_gguf_config": "gguf_base", "read_gguf_source": "gguf_base", "measure_round_trip": "gguf_base",
    "find_gguf_file": "gguf_base",
    "ensure_demo_base": "demo", "make_demo_records": "demo", "make_pretraining_text": "demo",
    "format_demo_prompt": "demo", "DEMO_BASE_SPEC": "demo", "make_demo_pairs": "demo", "write_demo_pairs": "demo",
}  # fmt: skip
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'qlora_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
