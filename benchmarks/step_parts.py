"""The parts of one training step of a GPT, each timed alone (forward + backward), against the whole step.

    python benchmarks/step_parts.py --device cuda                     # the gpt2 bench shape: batch 32 × 1024
    python benchmarks/step_parts.py --device cpu --batch 2 --seq-len 256 --n-layers 6 --d-model 384 \
        --n-heads 6 --vocab 8192 --precision fp32                   # the CPU reference shape, smaller batch

What a step is made of, per layer: four linear layers (qkv, out_proj, fc_in, fc_out) and causal
attention; once per step: the tied LM head and the cross-entropy over the padded vocabulary. Each
part runs forward and backward on random tensors of the step's shapes, in the training precision,
and is timed alone (median of several repetitions after a warm-up). Their sum over the model is what
a step would take if nothing else cost anything (no LayerNorm, GELU, residual adds, casts, optimizer),
so the gap to a measured step time is the cost of everything else, and each part's FLOP/s says how
close it comes to the matrix-product peak. Attention is timed with every SDPA backend this device
offers (flash, cuDNN, memory-efficient, math), since a faster backend is a candidate optimisation, and
the LM head with its loss is timed whole, the plain way and chunked (--loss-chunk-size), with its peak
memory on CUDA.

This is a diagnostic for the ≥ 50% GPU MFU target: it tells which part to work on. It runs on CPU too
(a dry run of the script, and the CPU reference's own breakdown).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from gptrain.bench import fmt_flops
from gptrain.chunked_loss import chunked_linear_cross_entropy
from gptrain.model import SDPA_BACKENDS, attention_kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fn, inputs: list[torch.Tensor], device: torch.device, reps: int) -> float:
    """Median seconds of out = fn(*inputs) forward and backward, from a fixed random output gradient
    (a scalar output gets none), so that no reduction of ours is timed with the part."""
    out = fn(*inputs)
    grad = torch.randn_like(out) if out.dim() else None
    del out

    def once() -> None:
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)

    for _ in range(2):  # warm-up: kernel selection, allocator
        once()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def compare_head_and_loss(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunks: list[int],
                          device: torch.device, reps: int) -> dict[str, tuple[float, int | None]]:
    """Seconds and (CUDA) peak memory of the head and its loss: the plain way, then chunked."""
    vocab = w.size(0)  # all of it real here: no padding to mask

    def plain(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, w)
        return F.cross_entropy(logits.float() if logits.dtype != torch.float32 else logits, targets)

    variants = {"plain": plain}
    for c in chunks:
        variants[f"chunked, {c} tokens"] = partial(chunked_linear_cross_entropy, targets=targets, vocab_size=vocab,
                                                   chunk_size=c)
    out = {}
    for name, fn in variants.items():
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        sec = time_fwd_bwd(fn, [h, w], device, reps)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
        out[name] = (sec, peak)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--n-layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50304, help="the padded vocabulary (gpt2: 50257 → 50304)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--loss-chunks", type=lambda v: [int(c) for c in v.split(",")], default=[4096, 8192],
                    help="chunk sizes of the chunked head + loss to time against the plain one (comma list)")
    ap.add_argument("--step-ms", type=float, default=None, help="a measured step time to compare the sum with")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.precision]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        from gptrain.host_memory import reuse_freed_memory

        reuse_freed_memory()  # as the trainer does on CPU: no fresh pages faulted in for every tensor
        print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    B, T, L, d, H, V = args.batch, args.seq_len, args.n_layers, args.d_model, args.n_heads, args.vocab
    M = B * T  # tokens per step
    print(f"batch {B} × {T} tokens, {L} layers, d_model {d}, {H} heads, vocab {V}, {args.precision}\n")

    def rand(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    rows: list[tuple[str, int, float, float]] = []  # name, times per step, seconds, flops
    x = rand(M, d)
    for name, n_in, n_out in (("qkv", d, 3 * d), ("out_proj", d, d), ("fc_in", d, 4 * d), ("fc_out", 4 * d, d)):
        a = x if n_in == d else rand(M, n_in)
        w = rand(n_out, n_in)
        sec = time_fwd_bwd(F.linear, [a, w], device, args.reps)
        rows.append((name, L, sec, 6.0 * M * n_in * n_out))
        del a, w

    q, k, v = (rand(B, H, T, d // H) for _ in range(3))
    # Causal: half the full-context products are computed (fwd QK and PV, bwd four products).
    attn_flops = 12.0 * B * H * T * T * (d // H) / 2
    attention: dict[str, float] = {}
    for name in SDPA_BACKENDS:
        try:
            with attention_kernels(name):
                attention[name] = time_fwd_bwd(causal_attention, [q, k, v], device, args.reps)
        except RuntimeError as e:  # this backend does not run these shapes / dtype on this device
            print(f"attention backend {name}: not available here ({str(e).splitlines()[0][:100]})")
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()
    default_sec = time_fwd_bwd(causal_attention, [rand(B, H, T, d // H) for _ in range(3)], device, args.reps)
    rows.append(("attention (SDPA's choice)", L, default_sec, attn_flops))

    h = rand(M, d)
    w_vocab = rand(V, d)
    targets = torch.randint(0, V, (M,), device=device)
    sec = time_fwd_bwd(F.linear, [h, w_vocab], device, args.reps)
    rows.append(("lm_head", 1, sec, 6.0 * M * d * V))
    logits = rand(M, V)
    sec = time_fwd_bwd(lambda z: F.cross_entropy(z.float() if dtype != torch.float32 else z, targets), [logits],
                       device, args.reps)
    rows.append(("cross-entropy (fp32)", 1, sec, 0.0))
    del logits
    head_and_loss = compare_head_and_loss(h, w_vocab, targets, args.loss_chunks, device, args.reps)
    del h, w_vocab

    total = sum(n * s for _, n, s, _ in rows)
    print(f"{'part':<28} {'× per step':>10} {'ms each':>9} {'ms per step':>12} {'share':>7} {'FLOP/s':>9}")
    for name, n, s, flops in rows:
        rate = fmt_flops(flops / s) if flops else "-"
        print(f"{name:<28} {n:>10} {s * 1e3:9.3f} {n * s * 1e3:12.2f} {n * s / total:7.1%} {rate:>9}")
    print(f"{'sum of the parts':<28} {'':>10} {'':>9} {total * 1e3:12.2f}")
    if args.step_ms:
        print(f"measured step {args.step_ms:.2f} ms: everything else (norms, GELU, adds, casts, optimizer, "
              f"launches) {args.step_ms - total * 1e3:.2f} ms = {1 - total * 1e3 / args.step_ms:.1%} of the step")
    print(f"\nLM head + cross-entropy forward and backward together (--loss-chunk-size), {args.precision}:")
    for name, (sec, peak) in head_and_loss.items():
        memory = f", peak memory {peak / 2**30:.2f} GiB above the inputs" if peak is not None else ""
        print(f"  {name:<22} {sec * 1e3:9.3f} ms{memory}")
    if attention:
        print(f"\nattention fwd+bwd per layer by SDPA backend: SDPA's own choice {default_sec * 1e3:.3f} ms; " + ", ".join(
            f"{n} {s * 1e3:.3f} ms" for n, s in sorted(attention.items(), key=lambda kv: kv[1])))


if __name__ == "__main__":
    main()
