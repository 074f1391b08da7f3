"""Tiled MLP: the same outputs and gradients as the whole MLP (fp32, within 1e-6 relative), its intermediates one tile at a time."""

from __future__ import annotations

import torch

from qlora_lite.config import LoRAConfig, ModelConfig, QuantConfig
from qlora_lite.memory import MemoryMeter
from qlora_lite.methods.lora import apply_lora
from qlora_lite.activations import choose_mlp_tile_tokens
from qlora_lite.quant import enable_gradient_checkpointing, load_base_model
from qlora_lite.training.tiled_mlp import apply_tiled_mlp, find_mlps

SEQ, TILE, HIDDEN, INTERMEDIATE = 200, 48, 64, 128  # 200 tokens: 4 full tiles and one of 8


def load_lora_model(model_dir, dropout: float = 0.0):
    model = load_base_model(ModelConfig(name_or_path=str(model_dir)), QuantConfig(compute_dtype="float32"))
    enable_gradient_checkpointing(model)
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, dtype="float32"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def grads_of(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_tiled_mlp_matches_the_whole_mlp_on_the_4bit_lora_path(tiny_model_dir):
    ids = torch.randint(4, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    loss, whole = grads_of(load_lora_model(tiny_model_dir), ids)
    tiled_model = load_lora_model(tiny_model_dir)
    assert apply_tiled_mlp(tiled_model, TILE) == 2  # both decoder layers
    tiled_loss, tiled = grads_of(tiled_model, ids)
    assert abs(tiled_loss - loss) <= 1e-6 * abs(loss)
    assert whole.keys() == tiled.keys() and len(whole) == 2 * 7 * 2
    assert max(relative_error(tiled[k], whole[k]) for k in whole) < 1e-6


def test_tiling_twice_retiles_instead_of_nesting(tiny_llama_dir):
    model = load_lora_model(tiny_llama_dir)
    apply_tiled_mlp(model, 64)
    apply_tiled_mlp(model, TILE)
    mlp = find_mlps(model)[0]
    assert mlp.forward.args[1] is mlp._untiled_forward and mlp.forward.args[2] == TILE


def test_mlp_intermediates_exist_for_one_tile_at_a_time(tiny_llama_dir):
    ids = torch.randint(4, 256, (1, SEQ), generator=torch.Generator().manual_seed(3))

    def largest_intermediate(tile: int | None) -> int:
        model = load_lora_model(tiny_llama_dir)
        if tile:
            apply_tiled_mlp(model, tile)
        with MemoryMeter(baseline=[model, ids]) as meter:
            model(input_ids=ids, labels=ids).loss.backward()
        # tokens x intermediate: the weights' own shapes (dequantized, 128 x 64) are not the MLP's activations
        return max(a.nbytes for a in meter.allocations if not a.is_baseline and INTERMEDIATE in a.shape and HIDDEN not in a.shape)

    assert largest_intermediate(None) == SEQ * INTERMEDIATE * 4  # (1, 200, 128) fp32
    assert largest_intermediate(TILE) == TILE * INTERMEDIATE * 4  # one tile's (48, 128)


def test_dropout_draws_the_same_masks_in_the_backward_recompute(tiny_llama_dir):
    # With dropout the tiled gradient is the gradient of the tiled forward itself: a finite difference along the
    # gradient agrees with it only if the backward's recompute saw the forward's masks.
    ids = torch.randint(4, 256, (1, SEQ), generator=torch.Generator().manual_seed(3))
    model = load_lora_model(tiny_llama_dir, dropout=0.3)
    apply_tiled_mlp(model, TILE)
    model.gradient_checkpointing_disable()  # one forward per evaluation: each draws masks from the seed set before it
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_at(seed: int = 7):
        torch.manual_seed(seed)
        return model(input_ids=ids, labels=ids).loss

    loss_at().backward()
    direction = [p.grad.clone() for p in params]
    norm = sum((d * d).sum() for d in direction).sqrt()
    eps = 1e-3
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d, alpha=eps / norm)
        up = loss_at().item()
        for p, d in zip(params, direction):
            p.add_(d, alpha=-2 * eps / norm)
        down = loss_at().item()
    assert abs((up - down) / (2 * eps) - norm.item()) < 0.02 * norm.item()


def test_the_tile_is_the_hidden_size():
    class Config:
        hidden_size, intermediate_size = 4096, 14336

    assert choose_mlp_tile_tokens(Config) == 4096
    Config.hidden_size = 32
    assert choose_mlp_tile_tokens(Config) == 64
