"""A causal-LM loss that never materialises the full logits (the `finetune` stage's library).

The standard loss computes `lm_head(hidden)` for every position of the batch, in fp32 for
the softmax: batch 4 x 512 tokens x a 128k vocabulary is 1 GiB of logits, then as much
again for their gradient, more than a 4-bit 8B model's MLP activations. Here the loss
projects only the positions that carry a label (prompt tokens are masked out of the labels,
so about half of them on the default data), a chunk at a time, and computes the chunk's
gradient with respect to the hidden states during the forward pass (softmax minus one-hot,
times the head's weight), so no logits are kept for the backward pass. The arithmetic is
the same as the standard loss (the chunk's matmul in the model's dtype, the softmax in fp32),
the approach Liger-Kernel's fused linear cross-entropy takes, written in plain torch so it
runs on a CPU as on a GPU.

`use_chunked_loss(model)` installs it on a causal LM instance, under whatever wraps it (peft,
the Trainer, DDP): the model's own forward still runs and returns the loss, only the logits
are not computed while labels are given.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from qlora.data.chat_template import IGNORE_INDEX

# Logits of one chunk, in fp32: small against a model's activations, large enough for
# matmuls to run at full speed (49k vocabulary: 682 positions; 128k: 261).
CHUNK_BYTES = 128 * 2**20
# Config fields of models that transform the logits before the softmax; the chunked loss
# would skip that transformation, so those models keep their own loss.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling")


def chunk_positions(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over positions of cross_entropy(hidden @ weight.T + bias, target), divided by
    `normalizer`; the gradients are computed in forward, a chunk of positions at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, normalizer: float, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = h @ weight.T
            if bias is not None:
                logits = logits + bias
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(t.shape[0], device=t.device)
            total += (lse - logits[rows, t]).sum()
            # d(loss)/d(logits) = softmax - one_hot(target), computed in place of the logits.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[rows, t] -= 1.0
            grad = grad.div_(normalizer).to(h.dtype)
            grad_hidden[start : start + chunk] = grad @ weight
            if grad_weight is not None:
                grad_weight += grad.T @ h
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype)
        return (
            grad_hidden * scale,
            None if grad_weight is None else grad_weight * scale,
            None if grad_bias is None else grad_bias * scale,
            None,
            None,
            None,
        )


def _loss_without_grad(hidden, weight, bias, targets, normalizer: float, chunk: int):
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = nn.functional.linear(hidden[start : start + chunk], weight, bias).float()
        t = targets[start : start + chunk]
        total += nn.functional.cross_entropy(logits, t, reduction="sum")
    return total / normalizer


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal-LM loss of `head(hidden)` against `labels` (shifted by one inside, as
    transformers' loss does; IGNORE_INDEX positions skipped), averaged over the labelled
    positions, or over `num_items_in_batch` (the Trainer's count across gradient
    accumulation steps) when given."""
    targets = labels[..., 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden = hidden[..., :-1, :].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    if num_items_in_batch is None:
        normalizer = float(max(int(targets.numel()), 1))
    else:
        normalizer = float(num_items_in_batch)
    chunk = chunk_positions(head.out_features)
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, normalizer, chunk)
    return _loss_without_grad(hidden, head.weight, head.bias, targets, normalizer, chunk)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for this model's own, or None when it can."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        # A LoRA-wrapped or quantized head computes more than weight @ hidden.
        return f"its output layer is a {type(head).__name__}, not a plain Linear"
    for field in LOGIT_TRANSFORMS:
        value = getattr(model.config, field, None)
        if value not in (None, 1, 1.0):
            return f"its config transforms the logits ({field}={value})"
    try:
        model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return "it exposes no decoder (get_decoder) to take the hidden states from"
    return None


def use_chunked_loss(model: nn.Module) -> None:
    """Make `model(..., labels=...)` return the chunked loss and no logits. `model` is the
    causal LM itself (peft's `get_base_model()`); call unsupported_reason() first."""
    own_forward = model.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kw):
        if labels is None:  # generation, lm-eval: the logits are the point
            return own_forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw
            )
        num_items = kw.pop("num_items_in_batch", None)
        kw.pop("logits_to_keep", None)
        kw["use_cache"] = False
        hidden = self.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw
        ).last_hidden_state
        loss = linear_cross_entropy(hidden, self.get_output_embeddings(), labels, num_items)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
