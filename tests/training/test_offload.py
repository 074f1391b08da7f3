"""Activation offload: the hooks see one input per checkpointed layer, offload it one layer late, bring it back one
layer early; gradients are bitwise those without it; the meter splits the step into device and host bytes."""

from __future__ import annotations

import pytest
import torch

from qlora_lite.config import LoRAConfig, ModelConfig, QuantConfig
from qlora_lite.memory import MemoryMeter
from qlora_lite.methods.lora import apply_lora
from qlora_lite.quant import enable_gradient_checkpointing, load_base_model
from qlora_lite.tiny import build_tiny_model
from qlora_lite.training.offload import OFFLOAD_MIN_BYTES, ActivationOffload

LAYERS, HIDDEN, SEQ = 4, 64, 96


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("four-layers")
    build_tiny_model(path, num_layers=LAYERS, vocab_size=256, initializer_range=0.1)
    return path


def load_lora_model(model_dir, store: ActivationOffload | None):
    """The real path: NF4 base, fp32 compute, LoRA on every linear layer, non-reentrant checkpointing (offloaded or not)."""
    model = load_base_model(ModelConfig(name_or_path=str(model_dir)), QuantConfig(compute_dtype="float32"))
    enable_gradient_checkpointing(model, store.checkpoint if store else None)
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, dtype="float32"))  # in place
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at 0; give it values so every gradient is non-trivial
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def batch_ids(micro_batch: int = 2) -> torch.Tensor:
    return torch.randint(4, 256, (micro_batch, SEQ), generator=torch.Generator().manual_seed(1))


def step(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_each_layer_input_is_offloaded_one_layer_late_and_prefetched_one_layer_early(four_layer_dir):
    log: list = []
    store = ActivationOffload(torch.device("cpu"), log=log)
    step(load_lora_model(four_layer_dir, store), batch_ids())
    forward = [("keep", 0)] + [a for i in range(1, LAYERS) for a in (("keep", i), ("offload", i - 1))]
    # The backward recomputes the last layer first: its input never left; each unpack starts the copy back of the layer before it.
    backward = [("unpack", LAYERS - 1)] + [a for i in range(LAYERS - 2, -1, -1) for a in (("prefetch", i), ("unpack", i))]
    assert log == forward + backward
    assert store.entries == {} and store.host_bytes == 0


def test_gradients_are_bitwise_those_without_offload(four_layer_dir):
    plain = step(load_lora_model(four_layer_dir, None), batch_ids())
    offloaded = step(load_lora_model(four_layer_dir, ActivationOffload(torch.device("cpu"))), batch_ids())
    assert len(plain) == LAYERS * 7 * 2  # A and B of 7 projections per layer
    assert plain.keys() == offloaded.keys()
    assert all(torch.equal(plain[k], offloaded[k]) for k in plain)


def test_small_inputs_stay_on_the_device(four_layer_dir):
    log: list = []
    store = ActivationOffload(torch.device("cpu"), min_bytes=2 * SEQ * HIDDEN * 4 + 1, log=log)  # one byte more than a layer input
    step(load_lora_model(four_layer_dir, store), batch_ids())
    assert log == []
    assert OFFLOAD_MIN_BYTES == 1 << 20 and ActivationOffload(torch.device("cpu")).min_bytes == 0  # the CPU copies nothing, so relabels all


def test_meter_splits_device_and_host_and_their_sum_is_the_plain_total(four_layer_dir):
    def metered(store):
        model, ids = load_lora_model(four_layer_dir, store), batch_ids()
        with MemoryMeter(baseline=[model, ids]) as meter:
            meter.start_phase("forward")
            loss = model(input_ids=ids, labels=ids).loss
            meter.start_phase("backward")
            loss.backward()
        return meter

    plain, offloaded = metered(None), metered(ActivationOffload(torch.device("cpu")))
    layer_input = 2 * SEQ * HIDDEN * 4  # micro-batch x seq x hidden, fp32
    assert plain.peak_host_bytes == 0 and plain.peak_device_bytes == plain.peak_bytes
    # All layer inputs but the last wait on the host at the end of the forward.
    assert offloaded.peak_host_bytes == (LAYERS - 1) * layer_input
    # Nothing is copied on the CPU: device + host at every moment is the plain step's total (within 1%: exactly).
    assert abs(offloaded.peak_bytes - plain.peak_bytes) <= 0.01 * plain.peak_bytes and offloaded.peak_bytes == plain.peak_bytes
    # Each one's own peak: they fall at different moments, at most the two inputs of the double buffer apart.
    assert plain.peak_bytes <= offloaded.peak_device_bytes + offloaded.peak_host_bytes <= plain.peak_bytes + 2 * layer_input
    assert offloaded.peak_device_bytes <= plain.peak_device_bytes - layer_input
    assert set(offloaded.phase_peaks) == {"step", "forward", "backward"}
    assert max(offloaded.phase_peaks.values()) == offloaded.peak_device_bytes
