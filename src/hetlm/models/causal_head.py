"""``SparseCausalLM`` with the output head and cross-entropy fused, in chunks (SFT's objective).

``SparseCausalLM`` already projects only the target positions (response tokens) onto the
vocabulary. In instruction data a large share of the tokens are still response tokens, and with
a 32k+ vocabulary their ``[targets, vocab]`` float32 logits, the log-softmax autograd keeps and
the gradient of both are the largest tensors of the step. Here the head and the loss run chunk by
chunk inside one autograd function that computes the gradient as it goes (``softmax - one-hot``
times the head weight): no ``[targets, vocab]`` tensor outlives its chunk and nothing is
recomputed, so the step takes the same arithmetic as the unfused head with a fraction of its
memory. The loss is the same sum (to float rounding); under autocast the matmuls run in the
autocast dtype as ``nn.Linear`` would, the softmax in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from hetlm.models.causal_lm import SparseCausalLM, decoder_and_head, predicting

# Logits per chunk: 8M float32 values = 32 MB (256 target positions at a 32k vocabulary, 64 at
# Llama-3's 128k). The chunk's transient tensors (logits, their gradient, 16-bit copies) are a few
# of those; measured on the SFT benchmark, 1024 positions at 32k kept ~250 MB more peak memory
# than 256, at the same speed.
CHUNK_LOGITS = 8 * 1024 * 1024
# On a GPU the chunk is what keeps the matmuls large enough to fill the card: 64M logits
# (2,048 positions at 32k, 256 MB fp32) are a few hundred MB of transients, small beside a GPU's
# memory, and 8x fewer kernel launches per micro-batch than the CPU size.
CHUNK_LOGITS_CUDA = 64 * 1024 * 1024


def chunk_for(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Target positions per chunk for a vocabulary on a device, at least 16."""
    logits = CHUNK_LOGITS_CUDA if torch.device(device).type == "cuda" else CHUNK_LOGITS
    return max(16, logits // max(1, vocab_size))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """(summed cross-entropy of ``hidden @ weight.T`` against ``targets``, correct top-1)."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = hidden.device.type
        dtype = (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        )
        with torch.autocast(device, enabled=False):
            w = weight.detach().to(dtype)
            h = hidden.detach().to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros_like(w, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            for start in range(0, h.shape[0], chunk):
                hc, yc = h[start : start + chunk], targets[start : start + chunk]
                logits = (hc @ w.T).float()  # [c, vocab]
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, yc[:, None])[:, 0]
                loss += (lse - picked).sum()
                correct += (logits.argmax(-1) == yc).sum()
                # d(sum of losses)/d(logits) = softmax - one-hot, in place of the logits
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(len(yc), device=grad.device), yc] -= 1.0
                grad = grad.to(dtype)
                grad_h[start : start + chunk] = grad @ w
                if grad_w is not None:
                    grad_w += (grad.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor | None):
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        dh = (grad_h.float() * grad_loss).to(hidden_dtype)
        dw = (grad_w * grad_loss).to(weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


class FusedSparseCausalLM(SparseCausalLM):
    """``SparseCausalLM`` (same inputs and outputs) with the fused, chunked head + loss; falls
    back to the plain head when it is not a bias-free ``nn.Linear``."""

    def __init__(self, model: nn.Module, chunk: int | None = None) -> None:
        super().__init__(model)
        self.chunk = chunk  # None: chunk_for(the vocabulary size)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, head = decoder_and_head(self.model)
        if not isinstance(head, nn.Linear) or head.bias is not None:
            return super().forward(input_ids, labels, attention_mask, target_index)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        states, wanted = predicting(hidden, labels, target_index)
        chunk = self.chunk or chunk_for(head.weight.shape[0], head.weight.device)
        return _FusedLinearCrossEntropy.apply(states, head.weight, wanted, chunk)
