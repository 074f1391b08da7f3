"""The causal LM loss of a training step: transformers' (`train.loss: hf`) or a fused, chunked one (`chunked`).

    loss = (1/N) sum_i [ logsumexp(z_i) - z_i[y_i] ],    z_i = cap(W h_i + b)      over the N labelled tokens

h_i is the decoder's final-norm output at position t, y_i the label at t + 1 (the causal
shift), cap Gemma's tanh softcapping or nothing. transformers computes z for every position
of the batch, upcasts all of it to fp32 and keeps it, with the softmax, for the backward:
about 14 bytes per token x vocab under bf16, 6.9 GiB for 2 x 2048 tokens of a 128k
vocabulary (measured on the CPU, head and loss alone). The chunked loss instead
  1. drops the positions whose label is -100 (prompt tokens, padding, soft prompt) before the
     head, so they cost neither the head's FLOPs nor its memory;
  2. runs head and loss over `train.loss_chunk_tokens` tokens at a time, so the largest tensor
     it makes is one chunk's logits, never the whole batch's (or their gradient).

Backward: the gradient of each chunk is computed in the forward (Liger's approach), not by
recomputing the chunk's logits in a custom backward (torchtune's, unsloth's). The loss is
the last op of the step and a scalar, so d loss / d logits is known as soon as the chunk's
softmax is: computing it there costs one matmul per chunk for the hidden states' gradient
(and one for the head's when it trains), where recomputation would add the logits matmul
again, the largest matmul of a step with a 128k vocabulary. What waits for the backward is
the hidden states' gradient (N x H, the size of what recomputation would keep: the hidden
states themselves) and, only when the head trains, its weight's gradient, which autograd
would allocate anyway. The backward only scales them by the incoming gradient (the token
weight fit() applies, the fp16 loss scale) over N.

The chunked loss calls the model's decoder body and head itself, so it must know everything
the model's forward does to the logits after the head. It knows the plain head and Gemma's
final_logit_softcapping (tanh capping, with its derivative, inside each chunk); models whose
forward does anything else (Cohere's logit_scale, Granite's logits_scaling, MiniCPM's hidden
scaling, custom code) are refused with a message pointing to `train.loss: hf`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from ..config import TrainConfig
from ..data.formats import IGNORE_INDEX
from ..errors import LossError
from ..methods.prompt_tuning import unwrap_base
from ..quant import dequantize_weight, is_4bit_linear

# transformers classes whose forward is `logits = self.lm_head(self.model(...).last_hidden_state)`,
# plus Gemma's tanh softcapping when config.final_logit_softcapping is set, and whose loss is
# `self.loss_function(logits, labels)` and nothing else: read in transformers 5.24, and
# tests/training/test_loss.py re-reads their source, so a release that changes one fails that test
# instead of training on a different loss. Not the MoE classes (Mixtral, Qwen-MoE): with
# output_router_logits they add a router load-balancing loss.
PLAIN_HEAD_CLASSES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MinistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "PhiForCausalLM", "Phi3ForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
    "Starcoder2ForCausalLM", "StableLmForCausalLM", "SmolLM3ForCausalLM",
})  # fmt: skip


# ---------------------------------------------------------------------------- entry point


def compute_causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """The mean loss over the labelled tokens of one micro-batch, as transformers' `model(**batch).loss`.

    Args:
        model: The model fit() trains: a causal LM with the method's layers inside, or a
            SoftPromptModel around one, possibly wrapped by accelerate.
        batch: ``input_ids``, ``labels`` (IGNORE_INDEX where no loss) and ``attention_mask``
            or, packed, ``position_ids``, as collate_batch makes them.
        cfg: ``loss`` (``chunked`` or ``hf``) and ``loss_chunk_tokens``.

    Returns:
        A scalar fp32 tensor; 0 (still attached to the graph) for a batch without labelled tokens.

    Raises:
        LossError: ``chunked`` with a model whose logits it does not know how to compute.
    """
    if cfg.loss == "hf":
        # use_cache=False also matters for packing: with a cache, transformers skips the
        # position_ids-based detection that keeps attention inside each example.
        return model(**batch, use_cache=False).loss
    base = unwrap_base(model)
    check_chunked_loss_supported(base)
    hidden, labels = run_decoder(model, batch)  # (B, T, H), (B, T)
    hidden, targets = select_labelled(hidden, labels)  # (N, H), (N,)
    weight, bias = read_output_head(base)
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return linear_cross_entropy(hidden, weight, bias, targets, cfg.loss_chunk_tokens, softcap)


def check_chunked_loss_supported(base: nn.Module) -> None:
    """Refuse models whose forward computes logits or loss in ways the chunked loss does not reproduce."""
    cls = type(base)
    if cls.__name__ not in PLAIN_HEAD_CLASSES or not cls.__module__.startswith("transformers.models."):
        origin = "custom code" if not cls.__module__.startswith("transformers.") else "transformers"
        raise LossError(
            f"train.loss: chunked computes the logits itself and knows only {', '.join(sorted(PLAIN_HEAD_CLASSES))}; "
            f"this model is {cls.__name__} ({origin}), whose forward may change its logits or loss after the head "
            "(a scale, a cap, an auxiliary loss): set train.loss: hf"
        )
    if base.loss_function is not ForCausalLMLoss:  # config.loss_type, or a loss patched in by another library
        name = getattr(base.loss_function, "__name__", type(base.loss_function).__name__)
        raise LossError(f"this model's loss is {name}, not transformers' ForCausalLMLoss that train.loss: chunked reproduces: set train.loss: hf")


def run_decoder(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The final-norm hidden states (B, T, H) and the labels (B, T) the head would see, for the batch.

    The inputs go through the same preparation as the model's forward: a soft prompt wrapper
    prepends its virtual tokens to the embeddings, the mask and the labels.
    """
    outer = getattr(model, "module", model)  # accelerate's (or DDP's) wrapper
    inputs = outer.build_base_inputs(**batch) if hasattr(outer, "build_base_inputs") else dict(batch)
    labels = inputs.pop("labels")
    decoder = unwrap_base(model).get_decoder()
    # use_cache=False: as in the hf path, it keeps packed examples apart (see compute_causal_lm_loss).
    return decoder(**inputs, use_cache=False).last_hidden_state, labels


def select_labelled(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the positions that predict a labelled token: hidden[:, :-1] predicts labels[:, 1:]. Returns (N, H), (N,)."""
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    return hidden[:, :-1][keep], targets[keep]


def read_output_head(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight (V, H) and bias (V) or None; a frozen 4-bit head is dequantized, as its forward would."""
    head = base.get_output_embeddings()
    if is_4bit_linear(head):
        return dequantize_weight(head), head.bias
    if type(head) is not nn.Linear:
        raise LossError(
            f"train.loss: chunked needs a plain linear output head, but this model's is {type(head).__name__}: set train.loss: hf"
        )
    return head.weight, head.bias


# ---------------------------------------------------------------------------- the math


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_tokens: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """mean_i cross_entropy(cap(hidden_i W^T + b), targets_i), chunk_tokens rows at a time; fp32 scalar.

    Args:
        hidden: (N, H) hidden states of the labelled positions only.
        weight: (V, H) head weight; bias: (V,) or None.
        targets: (N,) token ids, none of them IGNORE_INDEX.
        chunk_tokens: Rows per chunk; the chunk's (chunk_tokens, V) logits are the largest tensor made.
        softcap: Gemma's final_logit_softcapping: logits become softcap * tanh(logits / softcap).
    """
    if hidden.shape[0] == 0:
        # A micro-batch with no labelled token: transformers' mean would be nan; its share of the step is 0.
        return hidden.sum().float() * 0.0
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, softcap)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total += compute_chunk(hidden[start:end], weight, bias, targets[start:end], softcap, with_grad=False)[0].sum()
    return total / hidden.shape[0]


class LinearCrossEntropy(torch.autograd.Function):
    """The chunked loss whose gradients are computed in the forward, chunk by chunk (see the module docstring).

    It keeps the gradients of the loss *sum* and divides by N in the backward, together with
    the incoming gradient: under fp16 autocast that incoming gradient carries the loss scale
    (2^16), and a softmax already divided by N (1/4096) before its fp16 cast would flush its
    small entries to zero, as transformers' path, scaled first, does not.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, softcap):
        n = hidden.shape[0]
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # (N, H)
        # The head's gradient in the weight's dtype, as autograd would give it; accumulated in
        # place so that no second (V, H) tensor is made per chunk.
        grad_weight = torch.zeros_like(weight) if want_weight else None  # (V, H)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None  # (V,)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            h = hidden[start:end]  # (C, H)
            token_losses, grad = compute_chunk(h, weight, bias, targets[start:end], softcap, with_grad=True)  # grad (C, V)
            total += token_losses.sum()
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ weight  # (C, H)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t().to(weight.dtype), h.to(weight.dtype))  # (V, H)
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
            del grad
        ctx.save_for_backward(grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(bias.dtype))
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output / ctx.n  # fp32 scalar: the token weight (and fp16 loss scale) over N
        grads = [None if g is None else g * scale for g in ctx.saved_tensors]
        return (*grads, None, None, None)


def compute_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: its token losses (C,) in fp32 and, with_grad, their gradients by the logits W h + b (C, V).

    The gradient comes back in the head's compute dtype (bf16 under autocast), as autograd's
    would, so the matmuls that use it run at that precision. The softmax is made in place in
    the fp32 logits (torch.logsumexp would allocate a second (C, V) fp32 tensor): the peak is
    the chunk's fp32 logits plus one copy in the compute dtype, 6 bytes per token x vocab
    under bf16 (8 with softcapping, which keeps tanh for its derivative).
    """
    logits = F.linear(hidden, weight, bias)  # (C, V), in the compute dtype
    compute_dtype = logits.dtype
    logits = logits.float()  # as transformers' loss: the softmax in fp32
    tanh = None
    if softcap:
        tanh = logits.div_(softcap).tanh_()  # (C, V)
        logits = tanh * softcap
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)  # (C,)
    row_max = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    exps = logits.sub_(row_max).exp_()  # (C, V), in place
    row_sum = exps.sum(dim=-1, keepdim=True)  # (C, 1)
    lse = (row_max + row_sum.log()).squeeze(1)  # (C,)
    token_losses = lse - target_logits  # (C,): -log p(target)
    if not with_grad:
        return token_losses, None
    grad = exps.div_(row_sum)  # softmax (C, V)
    grad[torch.arange(targets.shape[0], device=targets.device), targets] -= 1.0
    if tanh is not None:
        grad.mul_(tanh.square_().neg_().add_(1.0))  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
        tanh = None  # freed before the cast below
    return token_losses, grad.to(compute_dtype)


# ---------------------------------------------------------------------------- per-token log-probabilities


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_tokens: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """log p(targets_i | hidden_i) under the head, (N,) fp32, chunk_tokens rows at a time: the preference objectives' input.

    The same chunks as `linear_cross_entropy` (no (N, V) logits ever exist), but one value per
    token, so the caller may sum them per sequence, average them or weigh them as its objective
    says; autograd carries its per-token weights back through `TokenLogProbs`.
    """
    if hidden.shape[0] == 0:
        return hidden.sum(-1).float() * 0.0
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return TokenLogProbs.apply(hidden, weight, bias, targets, chunk_tokens, softcap)
    chunks = [compute_chunk(hidden[s : s + chunk_tokens], weight, bias, targets[s : s + chunk_tokens], softcap, with_grad=False)[0]
              for s in range(0, hidden.shape[0], chunk_tokens)]  # fmt: skip
    return -torch.cat(chunks)


class TokenLogProbs(torch.autograd.Function):
    """Per-token log-probs whose hidden-state gradient is computed in the forward, chunk by chunk.

    d log p_i / d h_i = -(softmax_i - onehot_i) W is known once chunk i's softmax is, whatever the
    objective does with log p_i afterwards: the backward only scales row i by its incoming
    gradient. A trainable head (full fine-tuning) needs sum_i g_i (softmax_i - onehot_i)^T h_i,
    which depends on the incoming g: the backward recomputes each chunk's softmax for it (one
    more head matmul per chunk, only then).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, softcap):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # (N, H): d(-log p_i)/d h_i
        losses = []
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            token_losses, grad = compute_chunk(hidden[start:end], weight, bias, targets[start:end], softcap, with_grad=want_hidden)
            losses.append(token_losses)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ weight
            del grad
        recompute = want_weight or want_bias
        ctx.save_for_backward(grad_hidden, hidden if recompute else None, weight if recompute else None, bias if recompute else None, targets if recompute else None)
        ctx.chunk_tokens, ctx.softcap = chunk_tokens, softcap
        return -torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, hidden, weight, bias, targets = ctx.saved_tensors
        scale = -grad_output.float()  # (N,): log p = -loss
        out_hidden = out_weight = out_bias = None
        if grad_hidden is not None:
            out_hidden = (grad_hidden.float() * scale[:, None]).to(grad_hidden.dtype)
        if hidden is not None:
            want_weight, want_bias = ctx.needs_input_grad[1:3]
            out_weight = torch.zeros_like(weight) if want_weight else None
            out_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_bias else None
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                end = min(start + ctx.chunk_tokens, hidden.shape[0])
                h = hidden[start:end]
                _, grad = compute_chunk(h, weight, bias, targets[start:end], ctx.softcap, with_grad=True)
                grad = (grad.float() * scale[start:end, None]).to(grad.dtype)  # (C, V)
                if out_weight is not None:
                    out_weight.addmm_(grad.t().to(weight.dtype), h.to(weight.dtype))
                if out_bias is not None:
                    out_bias += grad.float().sum(0)
            out_bias = out_bias.to(bias.dtype) if out_bias is not None else None
        return out_hidden, out_weight, out_bias, None, None, None
