"""The LM head and its cross-entropy over a padded vocabulary, in the two forms the model can take them.

    python benchmarks/head_loss_forms.py --device cuda             # gpt2 at batch 32: 32,768 tokens, 50,257 → 50,304
    python benchmarks/head_loss_forms.py --device cpu --tokens 2048 --d-model 256 --precision fp32   # a dry run

`masked`: -inf written in place into the padding columns, then cross_entropy over all of them (what
gptrain.model.GPT does). `sliced`: cross_entropy over a strided view of the real columns. Compiled, the
in-place -inf becomes a kernel that writes all the logits back, which the view avoids; whether that pays
is what this measures. Each is timed forward and backward, eager and compiled, as training runs it (fp32
weights, autocast to the precision), with its peak memory on CUDA, and checked against the other: same
loss and gradients. Measured on an H200 (benchmarks/RESULTS.md), the view is slower in both modes
(compiled 1.18×, a compiled gpt2 step 6.6% slower): the model keeps the mask.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from step_parts import DTYPES, sync, time_fwd_bwd


def masked(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    logits = F.linear(h, w)
    logits[:, vocab:] = float("-inf")
    return F.cross_entropy(logits, targets)


def sliced(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w)[:, :vocab], targets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", choices=list(DTYPES))
    ap.add_argument("--tokens", type=int, default=32 * 1024)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--padded-vocab", type=int, default=50304)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.precision]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    torch.manual_seed(0)
    h = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    w = (0.02 * torch.randn(args.padded_vocab, args.d_model, device=device)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    print(f"{args.tokens} tokens, d_model {args.d_model}, vocab {args.vocab} padded to {args.padded_vocab}, "
          f"{args.precision}, {device}")

    results = {}
    for mode in ("eager", "compile"):
        for form in (masked, sliced):
            fn = torch.compile(form) if mode == "compile" else form

            def run(h: torch.Tensor, w: torch.Tensor, fn=fn) -> torch.Tensor:
                with autocast:
                    return fn(h, w, targets, args.vocab)

            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            sec = time_fwd_bwd(run, [h, w], device, args.reps)
            peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
            h.grad = w.grad = None
            loss = run(h, w)
            loss.backward()
            sync(device)
            results[(mode, form.__name__)] = (sec, peak, loss.item(), h.grad.clone(), w.grad.clone())
            memory = f", peak {peak / 2**30:.2f} GiB above the inputs" if peak is not None else ""
            print(f"{mode:<8} {form.__name__:<7} {sec * 1e3:9.3f} ms{memory}")
    for mode in ("eager", "compile"):
        a, b = results[(mode, "masked")], results[(mode, "sliced")]
        print(f"{mode}: sliced / masked time {b[0] / a[0]:.3f}; loss difference {abs(a[2] - b[2]):.2e}, "
              f"largest gradient difference {max((a[3] - b[3]).abs().max().item(), (a[4] - b[4]).abs().max().item()):.2e}")


if __name__ == "__main__":
    main()
