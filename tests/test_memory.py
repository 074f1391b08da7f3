"""Parameter accounting matches PEFT and the formulas; device memory is reported and labelled."""

from __future__ import annotations

import pytest
import torch

from qlora_lite.config import LoRAConfig, ModelConfig, QuantConfig
from qlora_lite.memory import build_memory_report, bytes_by_dtype, count_parameters, format_memory_report, get_device_memory
from qlora_lite.methods.lora import apply_lora
from qlora_lite.quant import load_base_model

peft = pytest.importorskip("peft")

# Parameters of the tiny fixtures: vocab 256, hidden 64, 2 layers, intermediate 128, kv width 32, untied head.
EMBED = 256 * 64
HEAD = 256 * 64
LINEAR_PER_LAYER = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3  # q, o, k, v, gate, up, down
NORMS = 64 * (2 * 2 + 1)
QWEN_BIASES_PER_LAYER = 64 + 32 + 32


def load(model_dir, four_bit):
    return load_base_model(ModelConfig(name_or_path=str(model_dir)), QuantConfig(load_in_4bit=four_bit, compute_dtype="float32"))


@pytest.mark.parametrize("four_bit", [False, True])
def test_counts_match_formula_and_peft(tiny_model_dir, four_bit):
    model = load(tiny_model_dir, four_bit)
    frozen_expected = EMBED + HEAD + 2 * LINEAR_PER_LAYER + NORMS
    if "qwen2" in str(tiny_model_dir):
        frozen_expected += 2 * QWEN_BIASES_PER_LAYER
    assert count_parameters(model).frozen == frozen_expected
    apply_lora(model, LoRAConfig(r=8, alpha=16))
    counts = count_parameters(model)
    lora_expected = 8 * 2 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert counts.trainable == lora_expected
    assert counts.frozen == frozen_expected

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)} if four_bit else {}
    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, **kwargs),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainable, total = reference.get_nb_trainable_parameters()  # what print_trainable_parameters prints
    assert (counts.trainable, counts.total) == (trainable, total)


def test_bytes_by_dtype_4bit_is_half_a_byte_per_weight_plus_constants(tiny_llama_dir):
    model = load(tiny_llama_dir, True)
    by_dtype = bytes_by_dtype(model)
    linear_weights = 2 * LINEAR_PER_LAYER
    assert by_dtype["nf4/fp4 (packed uint8)"] == linear_weights // 2
    # double quant: one uint8 scale per 64-weight block, plus fp32 second-level scales and two 256-entry codebooks per layer
    assert linear_weights // 64 <= by_dtype["quant constants"] <= linear_weights // 64 + 14 * (4 * 8 + 2 * 1024 + 4)
    assert by_dtype["float32"] == (EMBED + HEAD + NORMS) * 4


def test_report_labels_cpu_rss_and_formats(tiny_llama_dir):
    model = load(tiny_llama_dir, True)
    report = build_memory_report(model, torch.device("cpu"))
    mem = report["device_memory"]
    assert mem["kind"] == "cpu process RSS"
    assert 0.01 < mem["rss_gib"] <= mem["peak_rss_gib"] < 24
    text = format_memory_report(report)
    assert "CPU process RSS" in text and f"frozen {report['params']['frozen']:,}" in text
    assert get_device_memory(torch.device("cpu"))["kind"] == "cpu process RSS"


# ---------------------------------------------------------------------------- MemoryMeter

N = 1000
MB4 = N * N * 4  # one fp32 1000x1000 tensor


def test_meter_matches_hand_count_of_matmul_relu_sum_backward():
    from qlora_lite.memory import MemoryMeter

    x = torch.randn(N, N)
    w = torch.randn(N, N, requires_grad=True)
    with MemoryMeter(baseline=[x, w]) as meter:
        loss = torch.relu(x @ w).sum()
        loss.backward()
    # Forward: x, w, y = x @ w, r = relu(y) -> 4 x MB4 while relu runs (16,000,000 B); y dies after it.
    # Backward, inside ReluBackward: x, w, r (saved by relu), grad_y = threshold_backward(grad, r),
    # plus the 4-byte loss and its 4-byte ones_like seed (the sum's backward only expands it, a view).
    # Then r is released and grad_w = x.T @ grad_y is made while r is gone: 16,000,008 is the peak.
    assert meter.baseline_bytes == 2 * MB4
    assert meter.peak_bytes == 4 * MB4 + 8
    assert meter.peak_transient_bytes == 2 * MB4 + 8
    alive = sorted((a.op, a.nbytes) for a in meter.allocations_at_peak())
    assert alive == [("aten.ones_like.default", 4), ("aten.relu.default", MB4), ("aten.sum.default", 4), ("aten.threshold_backward.default", MB4)]
    # After the block: x, w, w.grad and the loss.
    assert meter.end_bytes == 3 * MB4 + 4
    assert [a.op for a in meter.allocations if not a.is_baseline].count("aten.mm.default") == 2  # y and grad_w
    # Each 4 MB storage lives alone or with one other: at most 2 x MB4 of them at once, at most 1 x of relu's.
    assert meter.peak_transient_bytes_where(lambda a: a.nbytes == MB4) == 2 * MB4
    assert meter.peak_transient_bytes_where(lambda a: a.op == "aten.relu.default") == MB4
    assert meter.peak_transient_bytes_where(lambda a: a.op == "aten.mm.default") == MB4  # y dies before grad_w is made


def test_meter_counts_a_storage_once_whatever_its_views():
    from qlora_lite.memory import MemoryMeter

    with MemoryMeter() as meter:
        a = torch.zeros(N, N)  # one new storage
        views = [a.view(-1), a.t(), a[1:], a.T.contiguous().T, a.unsqueeze(0).expand(3, N, N)]
        a.add_(1).mul_(2)  # in place: no new storage
    # a.T.contiguous() makes one new copy (4 MB); .T of it is a view.
    assert meter.peak_bytes == 2 * MB4
    assert len([x for x in meter.allocations]) == 2
    assert all(v.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() for v in views[:3])


def test_meter_baseline_is_counted_once_and_an_unregistered_input_joins_it_from_the_start():
    from qlora_lite.memory import MemoryMeter

    w = torch.randn(N, N)
    other = torch.randn(N, N)  # alive before the block, not registered
    with MemoryMeter(baseline=[w, {"again": w}, [w.view(-1)]]) as meter:
        assert meter.baseline_bytes == MB4  # w, its dict and its view: one storage
        first = torch.ones(N, N) * 2  # ones and their product: 2 x MB4 at this moment, then ones die
        del first
        second = other + w  # `other` is found here: it was alive at the moment above too
    assert meter.found_baseline_bytes == MB4
    assert meter.baseline_bytes == 2 * MB4
    # The peak is the first moment (w + other + ones + product), not the second (w + other + second).
    assert meter.peak_bytes == 4 * MB4
    assert meter.peak_transient_bytes == 2 * MB4
    assert {a.op for a in meter.allocations_at_peak()} == {"aten.ones.default", "aten.mul.Tensor"}
    assert second.shape == (N, N)


def test_meter_freed_storages_leave_the_live_count_and_after_the_block_nothing_changes():
    from qlora_lite.memory import MemoryMeter

    with MemoryMeter() as meter:
        a = torch.empty(N, N)
        b = a.view(-1)
        del a
        assert meter.live_bytes == MB4  # the view keeps the storage alive
        del b
        assert meter.live_bytes == 0
        c = torch.empty(2 * N, N)
        assert meter.live_bytes == 2 * MB4
    assert (meter.peak_bytes, meter.end_bytes) == (2 * MB4, 2 * MB4)
    del c
    assert meter.live_bytes == 2 * MB4  # the meter stopped counting at the end of the block
    assert [a.freed is not None for a in meter.allocations] == [True, False]


def test_meter_sees_the_recomputation_of_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    from qlora_lite.memory import MemoryMeter

    x = torch.randn(N, N, requires_grad=True)
    w = torch.randn(N, N)
    with MemoryMeter(baseline=[x, w]) as meter:
        loss = checkpoint(lambda t: torch.relu(t @ w), x, use_reentrant=False).sum()
        assert meter.live_bytes == 2 * MB4 + 4  # the forward kept nothing but the loss: relu's output is not saved
        loss.backward()
    ops = [a.op for a in meter.allocations]
    assert ops.count("aten.relu.default") == 2  # once in the forward, once recomputed in the backward
    # The peak is in the recomputation: y = x @ w and r = relu(y) again, next to the loss and its seed.
    assert meter.peak_transient_bytes == 2 * MB4 + 8
    assert sorted(a.op for a in meter.allocations_at_peak()) == ["aten.mm.default", "aten.ones_like.default", "aten.relu.default", "aten.sum.default"]
    seed = next(a for a in meter.allocations if a.op == "aten.ones_like.default")  # backward() starts here
    assert all(a.born > seed.born for a in meter.allocations_at_peak() if a.op == "aten.relu.default")


def test_meter_on_a_bitsandbytes_linear4bit_forward_backward():
    import bitsandbytes as bnb
    from torch import nn

    from qlora_lite.memory import MemoryMeter, quant_constants

    d_in, d_out, tokens = 1024, 2048, 512
    dense = nn.Linear(d_in, d_out, bias=False)
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)._quantize("cpu")
    layer.support_avx512bf16_for_cpu = False  # as quant.keep_4bit_layout does
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
    packed = d_in * d_out // 2
    constants = sum(t.untyped_storage().nbytes() for t in quant_constants(layer.weight.quant_state))
    assert d_in * d_out // 64 <= constants < d_in * d_out // 64 + 4096  # one uint8 scale per block + fp32 scales and codebooks

    def measure(baseline):
        x.grad = None
        with MemoryMeter(baseline=baseline) as meter:
            y = layer(x)  # (tokens, d_out) bf16, kept alive here
            y.float().sum().backward()
        return meter

    meter = measure([layer, x])
    assert meter.baseline_bytes == packed + constants + x.numel() * 2
    # The least a backward needs at once: y, its gradient (bf16) and the dense bf16 weight. bitsandbytes
    # 0.50 on the CPU also holds the fp32 dequantized weight it casts from (and its fp32 block scales).
    floor = 2 * tokens * d_out * 2 + d_in * d_out * 2
    assert floor <= meter.peak_transient_bytes <= floor + d_in * d_out * 4 + d_in * d_out // 64 * 4 + 64
    packed_records = [a for a in meter.allocations if a.shape == tuple(layer.weight.shape) and a.dtype == "uint8"]
    assert [a.op for a in packed_records] == ["baseline"]  # its views (weight.t()) never counted again

    # Unregistered, the 4-bit weight is found as an input and counted once, in the baseline, not as transient.
    unregistered = measure([x])
    assert unregistered.found_baseline_bytes >= packed
    assert unregistered.peak_transient_bytes == meter.peak_transient_bytes


def test_meter_baseline_of_a_module_and_its_optimizer_is_weights_grads_and_adam_state():
    from torch import nn

    from qlora_lite.memory import MemoryMeter

    layer = nn.Linear(100, 100, bias=False)
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.randn(3, 100)).sum().backward()
    optimizer.step()
    meter = MemoryMeter(baseline=[layer, optimizer])
    # weight, its grad, exp_avg, exp_avg_sq: 4 x 100 x 100 fp32, plus Adam's fp32 `step` scalar; the weight and
    # grad reached both through the module and the optimizer's param groups count once.
    assert meter.baseline_bytes == 4 * 100 * 100 * 4 + 4
    assert meter.peak_bytes == meter.baseline_bytes and meter.peak_transient_bytes == 0


def test_the_meter_counts_fsdp2_sharded_parameters_by_their_local_shards(tmp_path):
    """fully_shard under the meter made DTensor parameters, whose wrapper storage has no data pointer: it crashed."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from qlora_lite import MemoryMeter

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        layer = torch.nn.Linear(64, 64)
        with MemoryMeter(device="cpu") as meter:
            fully_shard(layer)
            layer(torch.ones(2, 64)).sum().backward()
        # one process: its shard is the whole 64 x 64 fp32 weight (16 KiB) copied once, plus what the step made
        assert 64 * 64 * 4 <= meter.peak_device_bytes < 1 << 20
    finally:
        dist.destroy_process_group()
