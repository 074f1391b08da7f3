"""Long context end to end: the planner's per-token slope is the meter's, no T x T tensor in a 16k-token step, a fit
with offload and tiles follows the plain one, and a step that cannot fit is refused before loading."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from qlora_lite import cli
from qlora_lite.activations import choose_mlp_tile_tokens
from qlora_lite.config import load_recipe
from qlora_lite.errors import ConfigError, PlanError
from qlora_lite.memory import MemoryMeter
from qlora_lite.methods.table import attach_method
from qlora_lite.planner import GIB, plan_long_context, plan_memory, read_model_config
from qlora_lite.quant import enable_gradient_checkpointing, load_base_model
from qlora_lite.tiny import build_tiny_model
from qlora_lite.training import setup
from qlora_lite.training.fit import fit
from qlora_lite.training.loss import compute_causal_lm_loss
from qlora_lite.training.offload import ActivationOffload
from qlora_lite.training.rms_norm import apply_lean_rms_norm
from qlora_lite.training.tiled_mlp import apply_tiled_mlp
from tests.helpers import read_metrics, recipe_overrides

RECIPE_8B = "recipes/llama3.1-8b-alpaca.yaml"
HIDDEN, INTERMEDIATE = 256, 688


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """Widths where per-token bytes dominate: hidden 256 (4 heads of 64), one kv head, intermediate 688, 2 layers, 16k context."""
    path = tmp_path_factory.mktemp("wide")
    build_tiny_model(path, hidden_size=HIDDEN, num_heads=4, num_kv_heads=1, intermediate_size=INTERMEDIATE, num_layers=2, vocab_size=512, max_position_embeddings=16384)
    return path


def recipe_for(model_dir, seq: int, long: bool, *extra: str):
    flag = str(long).lower()
    overrides = [f"model.name_or_path={model_dir}", "quant.compute_dtype=bfloat16", "lora.dropout=0", "train.micro_batch_size=1",
                 f"train.max_seq_len={seq}", f"model.activation_offload={flag}", f"model.tiled_mlp={flag}", "data.path=unused.jsonl", *extra]  # fmt: skip
    return load_recipe(None, overrides)


def metered_step(model_dir, seq: int, long: bool) -> MemoryMeter:
    """One bf16-autocast step as fit() runs it (NF4, LoRA all-linear, lean norms, chunked loss), every token labelled."""
    cfg = recipe_for(model_dir, seq, long)
    model = load_base_model(cfg.model, cfg.quant, torch.device("cpu"), str(model_dir))
    apply_lean_rms_norm(model)
    store = ActivationOffload(torch.device("cpu")) if long else None
    enable_gradient_checkpointing(model, store.checkpoint if store else None)
    if long:
        apply_tiled_mlp(model, choose_mlp_tile_tokens(model.config))
    model = attach_method(model, cfg, None).train()
    ids = torch.randint(4, 512, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}  # as collate_batch makes it
    with MemoryMeter(baseline=[model, batch]) as meter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compute_causal_lm_loss(model, batch, cfg.train)
        loss.backward()
    return meter


def planned_device_bytes(model_dir, seq: int, long: bool) -> int:
    plan = plan_memory(recipe_for(model_dir, seq, long), read_model_config(str(model_dir)), vram_bytes=1 << 50)
    return plan.total_bytes - plan.cuda_context_bytes  # a CPU has no CUDA context


@pytest.mark.parametrize("long", [False, True], ids=["plain", "offload-and-tiles"])
def test_planner_per_token_slope_is_the_meters_at_8k_tokens(wide_model_dir, long):
    measured = {seq: metered_step(wide_model_dir, seq, long).peak_device_bytes for seq in (4096, 8192)}
    planned = {seq: planned_device_bytes(wide_model_dir, seq, long) for seq in (4096, 8192)}
    measured_slope, planned_slope = (measured[8192] - measured[4096]) / 4096, (planned[8192] - planned[4096]) / 4096
    assert abs(planned_slope / measured_slope - 1) < 0.05, (measured_slope, planned_slope)
    assert abs(planned[8192] / measured[8192] - 1) < 0.10  # the whole device peak, weights and constants included
    # what offload and tiles save per token at these widths: 13.3 KiB -> 5.2 KiB measured
    assert measured_slope < (6 if long else 14) * 1024


def test_no_t_by_t_tensor_in_a_16k_token_step(wide_model_dir):
    seq = 16384
    meter = metered_step(wide_model_dir, seq, long=True)
    largest = max(a.nbytes for a in meter.allocations if not a.is_baseline)
    # O(T): nothing larger than one fp32 hidden vector per token; a T x T mask would be 256 MiB even as booleans
    assert largest <= seq * HIDDEN * 4 < seq * seq
    # packed examples under sdpa do get a 4-D mask from transformers: the planner counts it (compute dtype + bool)
    packed = plan_memory(recipe_for(wide_model_dir, seq, True, "data.packing=true"), read_model_config(str(wide_model_dir)), vram_bytes=1 << 50)
    assert packed.mask_bytes == seq * seq * 3
    flash = recipe_for(wide_model_dir, seq, True, "data.packing=true", "model.attn_implementation=flash_attention_2")
    assert plan_memory(flash, read_model_config(str(wide_model_dir)), vram_bytes=1 << 50).mask_bytes == 0


def test_a_fit_with_offload_and_tiles_follows_the_plain_fit(tiny_llama_dir, tmp_path, capsys):
    common = {"lora.dtype": "float32", "train.optimizer": "adamw", "train.max_steps": 4, "train.batching": "random"}
    losses = {}
    for long in (False, True):
        folder = tmp_path / str(long)
        folder.mkdir()
        flag = {"model.activation_offload": long, "model.tiled_mlp": long}
        fit(load_recipe(None, recipe_overrides(folder, tiny_llama_dir, **common, **flag)))
        losses[long] = [m["loss"] for m in read_metrics(folder / "run") if "loss" in m and "step" in m]
    assert "long context: activation offload (on the CPU nothing moves: there is no other memory), MLP in tiles of 64 tokens" in capsys.readouterr().out
    assert len(losses[True]) == len(losses[False]) == 4
    assert max(abs(a - b) for a, b in zip(losses[True], losses[False])) < 1e-5


def test_llama_8b_at_131072_tokens_fits_24_gib_with_offload_and_is_refused_without():
    cfg = load_recipe(RECIPE_8B, ["train.micro_batch_size=1", "train.max_seq_len=131072"])
    config = read_model_config(cfg.model.name_or_path)
    long = plan_long_context(cfg, config, 24 * GIB, available_ram_bytes=64 * GIB)
    assert long.activation_offload and long.mlp_tile_tokens == 4096
    assert long.host_ram_bytes == 131072 * 31 * 4096 * 2  # every layer's input but the last, bf16
    plan = plan_memory(cfg, config, 24 * GIB)
    assert plan.step_fits and plan.total_bytes < 20 * GIB and plan.longest_context_offloaded == 131072
    assert 50_000 < plan.longest_context < 65_536  # without offload, the MLP tiled where needed
    off = load_recipe(RECIPE_8B, ["train.micro_batch_size=1", "train.max_seq_len=131072", "model.activation_offload=false"])
    with pytest.raises(PlanError) as err:
        plan_long_context(off, config, 24 * GIB)
    message = str(err.value)
    assert "\n" not in message and "train.max_seq_len 131,072 at micro-batch 1 needs an estimated" in message
    assert f"the longest that fits is {plan.longest_context:,} tokens" in message and "set model.activation_offload=auto" in message
    with pytest.raises(PlanError, match=r"keeps 31\.0 GiB of layer inputs in pinned host memory .* 16\.0 GiB of RAM available"):
        plan_long_context(cfg, config, 24 * GIB, available_ram_bytes=16 * GIB)
    # on the CPU nothing is refused, and auto offload stays off (no other memory to move to)
    assert plan_long_context(off, config, None).activation_offload is False
    assert plan_long_context(cfg, config, None).activation_offload is False


def test_a_run_too_long_for_its_gpu_stops_before_loading(monkeypatch, capsys):
    cfg = load_recipe(RECIPE_8B, ["train.micro_batch_size=1", "train.max_seq_len=131072", "model.activation_offload=false"])
    monkeypatch.setattr(setup, "read_device_memory_bytes", lambda device: 24 * GIB)
    run = SimpleNamespace(cfg=cfg, device=torch.device("cuda"), base_path=cfg.model.name_or_path, world=SimpleNamespace(size=1, is_main=True))
    with pytest.raises(PlanError, match="lower train.max_seq_len"):
        setup.resolve_long_context(run)


def test_plan_prints_the_longest_context_with_and_without_offload(capsys):
    assert cli.main(["plan", RECIPE_8B, "train.micro_batch_size=1", "train.max_seq_len=131072"]) == 0
    out = capsys.readouterr().out
    plan = plan_memory(load_recipe(RECIPE_8B, ["train.micro_batch_size=1", "train.max_seq_len=131072"]), vram_bytes=24 * GIB)
    assert f"longest context at micro-batch 1: {plan.longest_context:,} tokens without activation offload, 131,072 with it" in out
    assert "pinned host RAM        31.00 GiB" in out and "MLP in tiles of 4096 tokens" in out
    assert cli.main(["plan", RECIPE_8B, "train.max_seq_len=131072", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["host_ram_bytes"] == 0  # micro-batch 2 does not fit even offloaded: auto stays off


@pytest.mark.parametrize("override, words", [
    ("model.activation_offload=maybe", "model.activation_offload must be auto, true or false"),
    ("model.tiled_mlp=sometimes", "model.tiled_mlp must be auto, true or false"),
])  # fmt: skip
def test_bad_long_context_settings_are_one_line(override, words):
    with pytest.raises(ConfigError, match=words):
        load_recipe(RECIPE_8B, [override])


def test_offload_needs_gradient_checkpointing():
    with pytest.raises(ConfigError, match="set model.gradient_checkpointing=true, or model.activation_offload=false"):
        load_recipe(RECIPE_8B, ["model.activation_offload=true", "model.gradient_checkpointing=false"])


def test_a_model_the_planner_cannot_build_trains_with_the_settings_as_set(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    cfg = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"model.tiled_mlp": True}))

    def cannot_build(*args, **kwargs):
        raise ValueError("no meta build for this architecture")

    monkeypatch.setattr(setup, "plan_long_context", cannot_build)
    run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), base_path=str(tiny_llama_dir), world=SimpleNamespace(size=1, is_main=True))
    long = setup.resolve_long_context(run)
    assert (long.activation_offload, long.mlp_tile_tokens) == (False, 64)
    assert "the planner cannot plan this model (ValueError)" in capsys.readouterr().out
