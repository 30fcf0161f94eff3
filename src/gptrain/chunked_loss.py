"""The LM head and its cross-entropy, a chunk of tokens at a time, without keeping the logits.

The logits are the largest activation of a GPT with a large vocabulary: gpt2 at batch 32 × 1024
tokens makes 32,768 × 50,304 of them, 3.3 GB in bf16, and cross-entropy's softmax and gradient
add fp32 tensors of twice that size. Autograd keeps them from the forward pass to the backward.

Here the forward pass takes one chunk of tokens at a time: its logits, their log-softmax and loss,
and at once the gradient of the loss with respect to those logits (softmax minus one-hot), which
it turns into the gradients of the hidden states and of the head's weight before the next chunk.
Only those two gradients (tokens × d_model and vocab × d_model) wait for the backward pass, which
scales them by the incoming gradient. The matrix products are the three the plain head runs
(forward, and the two of its backward), in the same precision: under autocast the logits are a
bf16/fp16 product and the softmax is taken in fp32, as `F.cross_entropy` does under autocast.

Costs and limits: the weight's gradient is accumulated over chunks in fp32 (vocab × d_model × 4
bytes). Where no gradient is wanted (evaluation, under `torch.no_grad`) only the loss is computed.
Not for fp16 training: a chunk's weight-gradient product (a sum over its tokens) is made in fp16
before any gradient scaling and can overflow where a scaler could not help (training refuses the
combination; bf16 has fp32's range). Under `torch.compile` the chunk loop is unrolled, so compile
time grows with the number of chunks per micro-batch (the trainer warns above 64).
With a logit soft-cap c (`softcap`), the logits are c·tanh(product / c) before the softmax, and the
gradient of the product is that of the logits times 1 - tanh², computed in the same pass.
The loss is the mean over all tokens. A chunk size too small for the machine's matrix products to run
at full speed slows the head down: on CPU, 1024 and 2048 tokens were equally fast, 512 and 4096 slower.
"""

from __future__ import annotations

import torch

# Tokens per chunk when --loss-chunk-size is left out, on CPU. Measured there (benchmarks/RESULTS.md): steps as
# fast as with the plain head for an 8k vocabulary; for a 50k one, eager steps 17% faster, compiled ones as fast,
# at 44-49% less peak memory.
CPU_LOSS_CHUNK_SIZE = 1024


def resolve_loss_chunk_size(requested: int | None, device: torch.device, tensor_parallel: bool) -> int:
    """--loss-chunk-size, or its default: chunked on CPU; the plain head on CUDA and under tensor parallel
    (whose head weight is split over the ranks). On an H200, compiled gpt2 at batch 32 ran 4.5% slower with
    4096-token chunks and held 1.6 of 16.3 GB less (benchmarks/RESULTS.md): a memory option there, not a
    default."""
    if requested is not None:
        return requested
    return CPU_LOSS_CHUNK_SIZE if device.type == "cpu" and not tensor_parallel else 0


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh; compiled for the CPU as 2·sigmoid(2x) - 1, the same function: Inductor's vectorised CPU tanh
    is slow (see gptrain.model.gelu_tanh, which does the same)."""
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return 2 * torch.sigmoid(2 * x) - 1
    return torch.tanh(x)


def softcap_logits(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """softcap · tanh(logits / softcap): logits smoothly kept within ±softcap."""
    return softcap * _tanh(logits / softcap)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                chunk_size: int, want_grad_hidden: bool, want_grad_weight: bool, softcap: float) -> torch.Tensor:
        n = hidden.size(0)
        # Softmax, loss and the weight's gradient sum in fp32 at least (fp64 inputs stay fp64).
        acc = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = None  # allocated at the first chunk, in the dtype of its products
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad_weight else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            product = h @ weight.t()  # bf16 under autocast: the dtype the gradient products run in too
            logits = product.to(acc)  # the product itself when already fp32
            if softcap:
                capped = _tanh(logits / softcap)
                logits = softcap * capped
            if logits.size(1) > vocab_size:  # padded vocabulary: those ids can never be predicted
                logits[:, vocab_size:] = float("-inf")
            # log_softmax and softmax, not logsumexp and exp: on CPU the fused softmax kernels are fast for any
            # logits, while a plain exp of very negative ones takes a slow path (5x, measured).
            loss = loss - torch.log_softmax(logits, dim=1).gather(1, t.unsqueeze(1)).sum()
            if want_grad_hidden or want_grad_weight:
                # d(sum of losses)/d(logits) = softmax - one_hot(target); the 1/n of the mean comes after.
                grad_logits = torch.softmax(logits, dim=1)
                grad_logits.scatter_add_(1, t.unsqueeze(1), torch.full_like(t, -1, dtype=acc).unsqueeze(1))
                if softcap:  # d(c·tanh(p/c))/dp = 1 - tanh²; the padded columns' gradient is already 0
                    grad_logits = grad_logits * (1 - capped * capped)
                grad_logits = grad_logits.to(product.dtype)
                if want_grad_hidden:
                    if grad_hidden is None:
                        grad_hidden = hidden.new_empty(hidden.shape, dtype=product.dtype)
                    grad_hidden[start:start + chunk_size] = grad_logits @ weight
                if want_grad_weight:
                    grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n = n
        ctx.dtypes = (hidden.dtype, weight.dtype, acc)
        return loss / n

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients are stored values: no second derivative
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in fp32: the low-precision products above hold unscaled gradients (softmax minus one-hot, at
        # most 1 in size); with the mean's 1/n folded in before an fp16 cast, most would fall below fp16's
        # normal range (tests/test_perf_equivalence.py measures it).
        hidden_dtype, weight_dtype, acc = ctx.dtypes
        scale = grad_loss.to(acc) / ctx.n
        return (None if grad_hidden is None else (grad_hidden.to(acc) * scale).to(hidden_dtype),
                None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
                None, None, None, None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 vocab_size: int, chunk_size: int, softcap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, `chunk_size` rows at a time.

    hidden (N, d), weight (V, d) with V ≥ vocab_size (columns from vocab_size on are padding that is
    never predicted), targets (N,) of ids below vocab_size: unlike F.cross_entropy, no ignore_index
    (-100 is out of range). Equal to `F.cross_entropy(masked(hidden @ weight.T), targets)` within
    floating-point rounding, with its first derivatives (a second derivative is an error).
    softcap > 0: the logits are soft-capped first (`softcap_logits`), as GPT.forward's plain head does.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    grad = torch.is_grad_enabled()
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk_size,
                                            grad and hidden.requires_grad, grad and weight.requires_grad,
                                            float(softcap))
