"""`qlora-lite train` under torchrun, with probes for tests/training/test_distributed.py.

Started as `torchrun --standalone --nproc_per_node 2 tests/dist_worker.py train RECIPE ...` with
QLORA_LITE_PROBE_DIR set. Probes, chosen by QLORA_LITE_PROBE (comma-separated):
- `seed`: rank 1 replaces its freshly attached adapter with other random values (another seed),
  which training must overwrite with rank 0's;
- `writes`: ranks other than 0 record every file they create, write, rename or delete under
  output_dir (there must be none);
- `dump`: after training every rank saves its own adapter tensors (whole, also under FSDP);
- `alone`: accelerate is built without `cpu=True`, so each rank sees one process (a misconfigured launch);
- `device`: rank 1 says it runs on cuda:0 (processes on different devices);
- `whole`: the base loads whole before FSDP shards it (the path layer-by-layer loading replaced), to compare with;
- `shards`: once the engine is built, every rank saves the bytes of its own shards (parameters, buffers and
  the 4-bit weights' quantization constants), as they are before the first step.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import sys
from pathlib import Path

import torch

RANK = int(os.environ.get("RANK", 0))
PROBES = set(filter(None, os.environ.get("QLORA_LITE_PROBE", "").split(",")))
PROBE_DIR = Path(os.environ.get("QLORA_LITE_PROBE_DIR", "."))


def output_dir(argv: list[str]) -> str:
    return next(os.path.abspath(a.partition("=")[2]) for a in argv if a.startswith("output_dir="))


def reseed_adapter_on_rank_1() -> None:
    import qlora_lite.training.fit as fit_module

    attach = fit_module.attach_method

    def attach_other_seed(model, cfg, tokenizer):
        model = attach(model, cfg, tokenizer)
        if RANK == 1:
            generator = torch.Generator().manual_seed(1234)
            for param in model.parameters():
                if param.requires_grad:
                    param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        return model

    fit_module.attach_method = attach_other_seed


def record_writes(out: str) -> list[str]:
    """Wrap the file-system calls fit() writes through; returns the list they fill."""
    import qlora_lite.methods.folder as folder

    writes: list[str] = []

    def note(path) -> None:
        if os.path.abspath(str(path)).startswith(out):
            writes.append(os.path.abspath(str(path)))

    def wrap(owner, name, path_arg=0, when=lambda *a, **k: True):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if args and when(*args, **kwargs):
                note(args[path_arg])
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    writing = lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    wrap(builtins, "open", when=writing)
    wrap(io, "open", when=writing)
    for name in ("replace", "rename", "mkdir", "makedirs", "unlink", "remove", "rmdir"):
        wrap(os, name)
    wrap(shutil, "rmtree")
    wrap(folder, "save_file", path_arg=1)
    return writes


def dump_adapters(modules: list) -> None:
    from safetensors.torch import save_file

    from qlora_lite.methods.lora import lora_state_dict

    state = lora_state_dict(modules[-1].model)
    # full_tensor() gathers a DTensor: every rank calls it, in the same order
    whole = {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).contiguous() for name, t in sorted(state.items())}
    save_file(whole, str(PROBE_DIR / f"rank{RANK}.safetensors"))


def dump_shards() -> None:
    """Wrap fit's build_engine: right after it, this rank's local shards as raw bytes (uint8), by name."""
    import qlora_lite.training.fit as fit_module
    from safetensors.torch import save_file

    from qlora_lite.memory import quant_constants

    build = fit_module.build_engine

    def local_bytes(tensor) -> torch.Tensor:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.detach().contiguous().view(-1).view(torch.uint8).clone()

    def build_and_dump(run, model):
        engine = build(run, model)
        found = {}
        for name, tensor in [*engine.module.named_parameters(), *engine.module.named_buffers()]:
            found[name] = local_bytes(tensor)
        # Under FSDP2 a 4-bit weight's QuantState lives on its Linear4bit (bitsandbytes puts it back on the gathered weight).
        for name, module in engine.module.named_modules():
            state = getattr(module, "quant_state", None)
            for i, constant in enumerate(quant_constants(state) if state is not None else []):
                found[f"{name}.quant_constant{i}"] = local_bytes(constant)
        save_file(found, str(PROBE_DIR / f"shards{RANK}.safetensors"))
        return engine

    fit_module.build_engine = build_and_dump


def main() -> int:
    argv = sys.argv[1:]
    from qlora_lite import cli
    from qlora_lite.training import objective

    modules: list = []
    init = objective.TrainingModule.__init__

    def keep(self, model, train_cfg, objective_cfg=None):
        init(self, model, train_cfg, objective_cfg)
        modules.append(self)

    objective.TrainingModule.__init__ = keep
    if "seed" in PROBES:
        reseed_adapter_on_rank_1()
    if "whole" in PROBES:
        import qlora_lite.training.fit as fit_module

        fit_module.loads_run_layer_by_layer = lambda run: False
    if "shards" in PROBES:
        dump_shards()
    if "alone" in PROBES:
        from qlora_lite.training import setup

        original = setup.Accelerator

        def accelerator_without_cpu(*args, cpu=False, **kwargs):
            return original(*args, **kwargs)

        setup.Accelerator = accelerator_without_cpu
    if "device" in PROBES and RANK == 1:
        from qlora_lite.training import setup

        setup.describe_device = lambda device: ("localhost", "cuda:0")
    writes = record_writes(output_dir(argv)) if "writes" in PROBES and RANK != 0 else None
    code = cli.main(argv)
    if writes is not None:
        (PROBE_DIR / f"writes{RANK}.json").write_text(json.dumps(writes))
    if "dump" in PROBES and code == 0:
        dump_adapters(modules)
    return code


if __name__ == "__main__":
    sys.exit(main())
