"""Speed changes must not change what is computed: the loss curve stays the reference's within fp tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptrain.chunked_loss import chunked_linear_cross_entropy
from gptrain.model import GPT, ModelConfig, gelu_tanh


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=100, max_position_embeddings=16, n_layers=2, n_heads=2, d_model=32, pad_vocab_multiple=64)
    base.update(kw)
    return ModelConfig(**base)


def reference_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The straightforward computation: cross-entropy over the real vocabulary's logits only."""
    T = idx.size(1)
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(T))
    for block in model.blocks.values():
        x = block(x)
    weight = model.lm_head.weight[: model.cfg.vocab_size]
    logits = F.linear(model.ln_f(x), weight)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def foreach_adamw(model: GPT) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, foreach=True)


def train_losses(loss_fn, steps: int = 6, make_optimizer=foreach_adamw) -> tuple[list[float], GPT]:
    torch.manual_seed(0)
    model = GPT(small())
    opt = make_optimizer(model)
    batch = torch.randint(0, 100, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):  # one batch, memorised: the curve must fall
        loss = loss_fn(model, batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def test_in_place_pad_mask_gives_the_reference_loss_curve():
    """Padding columns masked in place (no extra B·T·V pass) = cross-entropy over the real vocabulary."""
    fast, fast_model = train_losses(lambda m, x, y: m(x, y))
    ref, ref_model = train_losses(reference_loss)
    assert fast_model.tok_emb.weight.shape[0] == 128  # the padding is really there
    assert max(abs(a - b) for a, b in zip(fast, ref, strict=True)) < 1e-5, (fast, ref)
    assert fast[-1] < fast[0]  # and it trains
    for (name, a), b in zip(fast_model.state_dict().items(), ref_model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_padding_rows_get_no_gradient_from_the_head():
    torch.manual_seed(0)
    model = GPT(small())
    x = torch.randint(0, 100, (2, 16))
    model(x, torch.randint(0, 100, (2, 16))).backward()
    grad = model.tok_emb.weight.grad
    assert torch.count_nonzero(grad[100:]) == 0 and torch.count_nonzero(grad[:100]) > 0


def test_padded_logits_are_minus_inf_under_bf16_autocast_too():
    model = GPT(small())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 100, (1, 8)))
    assert logits.dtype == torch.bfloat16
    assert torch.isneginf(logits[..., 100:]).all() and torch.isfinite(logits[..., :100]).all()


def test_chunked_loss_is_cross_entropy_with_its_gradients():
    """Chunks of one token, of a size that does not divide the tokens, of all of them and of more give
    F.cross_entropy's mean loss over the real vocabulary and its gradients (fp64: exact to rounding);
    the padding rows of the weight get none."""
    torch.manual_seed(0)
    n, d, padded, vocab = 37, 16, 64, 50
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(padded, d, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, vocab, (n,))
    t[0] = vocab - 1  # the last real id, next to the padding
    ref = F.cross_entropy(h @ w[:vocab].t(), t)
    ref_grads = torch.autograd.grad(ref * 3.0, (h, w))  # an outer factor, as gradient accumulation makes
    for chunk in (1, 5, 37, 100):
        loss = chunked_linear_cross_entropy(h, w, t, vocab, chunk)
        grads = torch.autograd.grad(loss * 3.0, (h, w))
        assert loss.dtype == torch.float64 and abs(loss.item() - ref.item()) < 1e-12, chunk
        for g, r in zip(grads, ref_grads, strict=True):
            assert torch.allclose(g, r, rtol=0, atol=1e-12), chunk
        assert torch.count_nonzero(grads[1][vocab:]) == 0
    with torch.no_grad():  # no gradients computed or kept
        loss = chunked_linear_cross_entropy(h, w, t, vocab, 5)
    assert loss.grad_fn is None and abs(loss.item() - ref.item()) < 1e-12
    for needs in ("hidden", "weight"):  # one input wanting a gradient: it gets the reference one
        h1, w1 = h.detach().requires_grad_(needs == "hidden"), w.detach().requires_grad_(needs == "weight")
        (g,) = torch.autograd.grad(chunked_linear_cross_entropy(h1, w1, t, vocab, 5) * 3.0, h1 if needs == "hidden" else w1)
        assert torch.allclose(g, ref_grads[0 if needs == "hidden" else 1], rtol=0, atol=1e-12), needs
    # The gradients are stored values: asking for a second derivative is an error, not a silent zero.
    (g,) = torch.autograd.grad(chunked_linear_cross_entropy(h, w, t, vocab, 5), h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_loss_under_autocast_keeps_fp32_gradients_and_the_scale(dtype):
    """Under autocast the logits are a low-precision product and the softmax fp32, as F.cross_entropy under
    autocast; the gradients come back in fp32 with the outer factor (here fp16's gradient-scaler 2**16)."""
    torch.manual_seed(0)
    h = torch.randn(40, 32, requires_grad=True)
    w = (0.1 * torch.randn(128, 32)).requires_grad_()
    t = torch.randint(0, 100, (40,))
    with torch.autocast("cpu", dtype=dtype):
        logits = F.linear(h, w)
        logits[:, 100:] = float("-inf")
        ref = F.cross_entropy(logits, t)
        loss = chunked_linear_cross_entropy(h, w, t, 100, 16)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-5
    ref_grads = torch.autograd.grad(ref, (h, w))
    grads = torch.autograd.grad(loss * 2.0**16, (h, w))
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        assert torch.allclose(g / 2.0**16, r, rtol=0, atol=0.01 * r.abs().max().item())


def test_chunked_loss_keeps_fp16_gradients_in_range():
    """The fp16 products hold softmax minus one-hot, unscaled; the mean's 1/n is applied in fp32 afterwards.
    Folded in before the fp16 cast it would push most of them (about 1/(n·V)) below fp16's normal range:
    1.3% error in the gradients against 0.07% (measured; F.cross_entropy with a 2**16 gradient scaler: 0.07%)."""
    torch.manual_seed(0)
    n, d, vocab = 4096, 32, 2048
    h = torch.randn(n, d, requires_grad=True)
    w = (0.02 * torch.randn(vocab, d)).requires_grad_()
    t = torch.randint(0, vocab, (n,))
    exact = torch.autograd.grad(F.cross_entropy(h.double() @ w.double().t(), t), (h, w))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_linear_cross_entropy(h, w, t, vocab, 1024)
    grads = torch.autograd.grad(loss * 2.0**16, (h, w))
    for g, e in zip(grads, exact, strict=True):
        assert (g.double() / 2.0**16 - e).abs().max() < 0.003 * e.abs().max()


def test_chunked_loss_gives_the_plain_loss_curve():
    """GPT.loss_chunk_size (--loss-chunk-size) trains on the plain head's curve within fp32 rounding."""
    def chunked(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.loss_chunk_size = 7  # 64 tokens: nine chunks, the last one short
        loss = model(x, y)
        assert type(loss.grad_fn).__name__ == "_ChunkedLinearCrossEntropyBackward"  # the chunked path ran
        return loss

    plain, plain_model = train_losses(lambda m, x, y: m(x, y), 10)
    chunk, chunk_model = train_losses(chunked, 10)
    assert chunk[-1] < 0.8 * chunk[0]
    assert max(abs(a - b) for a, b in zip(plain, chunk, strict=True)) < 1e-5, (plain, chunk)
    for (name, a), b in zip(plain_model.named_parameters(), chunk_model.parameters(), strict=True):
        if a.dim() >= 2:  # as in the fused-AdamW test: the qkv key bias's zero gradient is rounding noise
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_compiled_training_follows_the_eager_loss_curve(byte_dataset, tmp_path):
    """--compile (one process: the whole model as one graph) trains on the eager curve within fp tolerance,
    with the plain head and with --loss-chunk-size (its autograd function traced into the graph)."""
    import json

    from conftest import fast_overrides

    from gptrain.config import build_config
    from gptrain.trainer import Trainer

    curves = {}
    for compile_, chunk in ((False, 0), (True, 0), (True, 50)):
        extra = {"train.compile": compile_, "train.loss_chunk_size": chunk, "train.run_name": f"c{compile_:d}{chunk}",
                 "model.n_layers": 1, "train.num_steps": 4, "train.log_every": 1, "train.eval_every": 0,
                 "train.sample_tokens": 0}
        cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **extra))
        trainer = Trainer.from_config(cfg, explicit)
        assert trainer.raw_model.loss_chunk_size == chunk
        run_dir = trainer.fit().run_dir
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[compile_, chunk] = [r["train/loss"] for r in rows if "train/loss" in r]
    eager = curves[False, 0]
    assert len(eager) == 4
    for key in ((True, 0), (True, 50)):
        assert max(abs(a - b) for a, b in zip(eager, curves[key], strict=True)) < 1e-4, curves


def test_compiled_cpu_gelu_is_the_tanh_gelu_in_its_sigmoid_form():
    """Compiled on CPU, gelu_tanh is traced as x·sigmoid(2z) (Inductor's CPU tanh is slow): the same function
    and gradient as PyTorch's tanh GELU, exactly so in fp64."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.compile(gelu_tanh, backend=record, fullgraph=True)(x)
    traced = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.sigmoid in traced and F.gelu not in traced, traced
    ref = F.gelu(x, approximate="tanh")
    (grad,) = torch.autograd.grad((y * x.cos()).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref * x.cos()).sum(), x)
    assert torch.allclose(y, ref, rtol=0, atol=1e-14)
    assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-13)
    assert torch.equal(gelu_tanh(x), ref)  # eager: PyTorch's own fused kernel


def test_fused_adamw_on_cpu_follows_the_foreach_curve():
    """build_optimizer uses the fused AdamW kernel on CPU (one pass over all parameters); it must train
    on the same curve as the multi-tensor foreach implementation, within fp32 rounding."""
    from gptrain.config import OptimConfig
    from gptrain.optim import build_optimizer

    opt_cfg = OptimConfig(lr=3e-3, weight_decay=0.1)
    built = build_optimizer(GPT(small()), opt_cfg, torch.device("cpu"))
    assert built.defaults["fused"] is True

    def foreach_twin(model: GPT) -> torch.optim.Optimizer:
        """build_optimizer's groups and settings, through the foreach implementation."""
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in build_optimizer(model, opt_cfg, torch.device("cpu")).param_groups]
        return torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps,
                                 foreach=True)

    def model_loss(model, x, y):
        return model(x, y)

    fused, fused_model = train_losses(model_loss, 10, lambda m: build_optimizer(m, opt_cfg, torch.device("cpu")))
    foreach, foreach_model = train_losses(model_loss, 10, foreach_twin)
    assert fused[-1] < 0.8 * fused[0]  # it trains
    assert max(abs(a - b) / b for a, b in zip(fused, foreach, strict=True)) < 1e-5, (fused, foreach)
    for (name, a), b in zip(fused_model.named_parameters(), foreach_model.parameters(), strict=True):
        # Weight matrices only: the key part of the qkv bias gets a mathematically zero gradient (softmax
        # ignores a shift shared by all keys), so Adam's normalised update of it is rounding noise.
        if a.dim() >= 2:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), name


def test_pinned_attention_backend_is_the_one_that_runs_and_keeps_the_loss_curve():
    """--attention-backend math: the math path runs (no flash kernel in the trace) and training follows
    the default curve (CPU flash) within fp32 rounding."""
    def with_backend(backend: str):
        def loss_fn(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            model.set_attention_backend(backend)
            return model(x, y)
        return loss_fn

    auto, _ = train_losses(with_backend("auto"))
    math_, model = train_losses(with_backend("math"))
    assert max(abs(a - b) for a, b in zip(auto, math_, strict=True)) < 1e-5, (auto, math_)
    x = torch.randint(0, 100, (2, 16))
    for backend, flash_runs in (("auto", True), ("math", False)):
        model.set_attention_backend(backend)
        with torch.profiler.profile() as prof:
            model(x, x).backward()
        names = {e.key for e in prof.key_averages()}
        assert any("flash_attention" in n for n in names) == flash_runs, (backend, sorted(names))


def test_attention_backend_and_default_loss_chunks_reach_the_model(byte_dataset, tmp_path):
    """--attention-backend reaches every block; --loss-chunk-size left out is chunked on CPU, and the run's
    environment.json records the value used."""
    import json

    from conftest import fast_overrides

    from gptrain.chunked_loss import CPU_LOSS_CHUNK_SIZE, resolve_loss_chunk_size
    from gptrain.config import build_config
    from gptrain.trainer import Trainer

    cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{
        "train.attention_backend": "math", "train.num_steps": 2, "train.eval_every": 0, "train.sample_tokens": 0}))
    trainer = Trainer.from_config(cfg, explicit)
    assert [b.attn.backend for b in trainer.raw_model.blocks.values()] == ["math", "math"]
    assert trainer.raw_model.loss_chunk_size == CPU_LOSS_CHUNK_SIZE
    result = trainer.fit()
    assert result.status == "finished"
    assert json.loads((result.run_dir / "environment.json").read_text())["loss_chunk_size"] == CPU_LOSS_CHUNK_SIZE
    # Elsewhere the default is the plain head: CUDA (not measured there yet) and tensor parallel (a split head).
    assert resolve_loss_chunk_size(None, torch.device("cuda"), tensor_parallel=False) == 0
    assert resolve_loss_chunk_size(None, torch.device("cpu"), tensor_parallel=True) == 0
    assert resolve_loss_chunk_size(256, torch.device("cuda"), tensor_parallel=False) == 256


def test_compiling_many_loss_chunks_is_warned_about(byte_dataset, tmp_path, capsys):
    """torch.compile unrolls the chunk loop: many chunks per micro-batch mean a long compilation."""
    from conftest import fast_overrides

    from gptrain.config import build_config
    from gptrain.trainer import Trainer

    for chunk, warned in ((1, True), (2, False)):  # 4 × 32 tokens per micro-batch: 128 chunks, then 64 (the limit)
        cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{
            "train.compile": True, "train.loss_chunk_size": chunk, "train.run_name": f"chunks{chunk}"}))
        Trainer.from_config(cfg, explicit)
        out = capsys.readouterr().out
        assert ("chunks per micro-batch (4 × 32 tokens), and --compile unrolls them all" in out) == warned, out
        assert ("makes 128 chunks" in out) == warned
