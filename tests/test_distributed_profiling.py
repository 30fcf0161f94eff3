"""The profiler (--use-profiler) and activation checkpointing in one process."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fast_overrides

from gptrain.config import build_config
from gptrain.profiling import op_kind, readable_name, time_by_kind
from gptrain.trainer import train


def test_profiler_writes_traces_and_summarises_a_step(byte_dataset, tmp_path, capsys):
    cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{
        "train.run_name": "prof", "train.num_steps": 6, "profile.enabled": True, "profile.wait": 1,
        "profile.warmup": 1, "profile.active": 2, "profile.repeat": 1}))
    res = train(cfg, explicit)
    assert res.status == "finished"
    traces = list((tmp_path / "prof" / "profile").glob("rank0*.pt.trace.json"))
    assert len(traces) == 1  # one cycle, one trace per rank
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"gptrain/data", "gptrain/forward", "gptrain/backward", "gptrain/optimizer"} <= names
    assert sum(1 for e in events if str(e.get("name", "")).startswith("ProfilerStep#")) == 2  # the active steps
    out = capsys.readouterr().out
    assert "profile (rank 0, 2 recorded steps" in out
    for part in ("data", "forward", "backward", "optimizer"):
        assert f"  {part} " in out
    # "by kind: matrix products 41%, other 30%, ... (of 12.34 ms of operator time)": shares of one total.
    by_kind = next(line for line in out.splitlines() if line.startswith("  by kind: "))
    shares = dict((k.rsplit(" ", 1)[0], int(k.rsplit(" ", 1)[1].rstrip("%")))
                  for k in by_kind.split(": ", 1)[1].split(" (of ")[0].split(", "))
    assert shares["matrix products"] > 0 and "optimizer and clipping" in shares  # listed when its time is > 0
    assert abs(sum(shares.values()) - 100) <= len(shares)  # each share rounded to a whole percent


@pytest.mark.parametrize("name, kind", [
    # CUDA kernels as they appear in traces (H100/H200, torch 2.x)
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, "
     "cutlass::bfloat16_t>>(Flash_fwd_params)", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
     "kernel__5x_cublas", "matrix products"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNT", "matrix products"),
    ("triton_per_fused_add_native_layer_norm_0", "compiled kernels"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
     "(at::native::ADAM_MODE)1, false>, float*, double, double, double, double, double, bool, float*, float*>",
     "optimizer and clipping"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"),
    # CPU operators
    ("aten::addmm", "matrix products"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_fused_adamw_", "optimizer and clipping"),
    ("aten::_foreach_norm", "optimizer and clipping"),
    ("gloo:all_reduce", "communication"),
    ("Torch-Compiled Region: 0/0", "compiled kernels"),
    (readable_name("## Call CompiledFxGraph fx6tuhl5g7fagvwwyjfuyybgjuydbtedwftazb7g42c5l32rhadb ##"),
     "compiled kernels"),
    ("aten::gelu", "other"),
    ("aten::broadcast_tensors", "other"),
])
def test_profile_summary_names_the_kind_of_each_kernel(name, kind):
    assert op_kind(name) == kind


def test_time_by_kind_adds_every_event_once():
    kinds = time_by_kind([("aten::mm", 3.0), ("aten::addmm", 2.0), ("aten::gelu", 1.5), ("flash_bwd", 4.0)])
    assert kinds["matrix products"] == 5.0 and kinds["attention"] == 4.0 and kinds["other"] == 1.5
    assert sum(kinds.values()) == 10.5 and kinds["communication"] == 0.0


def test_activation_checkpointing_keeps_the_numbers_and_saves_activations(byte_dataset, tmp_path):
    """full/selective recompute in backward: same loss curve, fewer tensors kept for backward."""
    from gptrain.distributed.parallelize import apply_activation_checkpointing
    from gptrain.model import GPT

    curves = {}
    for ac in ("none", "full", "selective"):
        cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{
            "train.run_name": f"ac-{ac}", "train.num_steps": 6, "parallel.ac": ac, "train.eval_every": 0,
            "model.vocab_size": 257}))  # the byte dataset's: the logits must not outweigh the blocks' activations
        train(cfg, explicit)
        rows = [json.loads(line) for line in (tmp_path / f"ac-{ac}" / "metrics.jsonl").read_text().splitlines()]
        curves[ac] = [r["train/loss"] for r in rows if "train/loss" in r]
    assert curves["full"] == curves["none"] and curves["selective"] == curves["none"]

    saved = {}
    for ac in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = GPT(cfg.model)
        if ac != "none":
            apply_activation_checkpointing(model, ac)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randint(0, 200, (4, 32))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, x)
        loss.backward()
        saved[ac] = total
        assert set(model.state_dict()) == set(GPT(cfg.model).state_dict())  # names unchanged by the wrapper
    # Inside a checkpointed block nothing is saved through autograd's hooks (selective AC keeps its matmul
    # outputs in its own cache; benchmarks/activation_checkpointing.py measures real peak memory).
    assert saved["full"] < 0.6 * saved["none"] and saved["selective"] < 0.6 * saved["none"]


def test_cuda_summary_counts_kernels_once_and_derives_backward(tmp_path):
    """The CUDA branch of the summary, on events shaped like torch.profiler's (no GPU needed):
    a CPU operator carries its kernels' device time too, and a range or compiled graph has a GPU-side
    twin (a user annotation spanning its kernels), so only kernel events are counted; the ranges are
    read from their CPU side; backward is the step's kernel time minus what the main thread's ranges
    launched. Kernel names as an H200 profile of a compiled gpt2 step showed them (cuBLAS nvjet, cuDNN)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from gptrain.config import ProfileConfig
    from gptrain.profiling import Profiler

    def event(key, device_type=DeviceType.CPU, device_us=0.0, self_device_us=0.0, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, cpu_time_total=1.0, self_cpu_time_total=1.0,
                               device_time_total=device_us, self_device_time_total=self_device_us,
                               is_user_annotation=annotation)

    kernel = DeviceType.CUDA
    events = [
        event("gptrain/data", device_us=100), event("gptrain/forward", device_us=10_000),
        event("gptrain/backward", device_us=50), event("gptrain/optimizer", device_us=1_000),
        # The ranges' and the compiled graphs' twins on the GPU timeline (spans, not kernels): left out.
        event("gptrain/forward", kernel, 30_000, 30_000, annotation=True),
        event("gptrain/optimizer", kernel, 3_000, 3_000, annotation=True),
        event("## Call CompiledFxGraph fdbq5zl3abcdef ##", kernel, 25_000, 25_000, annotation=True),
        event("aten::mm", device_us=5_000, self_device_us=5_000),  # a CPU op: its kernels are counted below
        event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", kernel, 20_000, 20_000),
        event("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", kernel, 5_000, 5_000),
        event("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>", kernel, 8_200, 8_200),
        event("triton_poi_fused_gelu_3", kernel, 6_000, 6_000),
        event("multi_tensor_apply_kernel<FusedAdamMathFunctor>", kernel, 900, 900),
        event("Memcpy HtoD (Pinned -> Device)", kernel, 100, 100),
    ]
    prof = Profiler(ProfileConfig(enabled=True), tmp_path, 0, torch.device("cuda"))
    prof.prof = SimpleNamespace(key_averages=lambda: events)
    prof.recorded_steps = 1
    lines = prof.summary().splitlines()
    assert "CUDA time" in lines[0]
    part = {ln.split()[0]: float(ln.split()[1]) for ln in lines[1:5]}
    assert part == {"data": 0.1, "forward": 10.0, "backward": pytest.approx(40.2 - 11.1), "optimizer": 1.0}
    assert lines[5].startswith("  top kernels by self time: nvjet_sm90") and "aten::mm" not in lines[5]
    assert "compiled graph" not in lines[5]
    assert lines[6] == ("  by kind: matrix products 50%, attention 33%, compiled kernels 15%, optimizer and "
                        "clipping 2%, copies 0% (of 40.20 ms of kernel time)")


# --------------------------------------------------------------------------- profiling


def test_cuda_summary_keeps_checkpoint_time_out_of_the_step(tmp_path):
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from gptrain.config import ProfileConfig
    from gptrain.profiling import Profiler

    def event(key, device_type=DeviceType.CPU, us=0.0):
        return SimpleNamespace(key=key, device_type=device_type, cpu_time_total=1.0, self_cpu_time_total=1.0,
                               device_time_total=us, self_device_time_total=us)

    events = [event("gptrain/data", us=1_000), event("gptrain/forward", us=9_000), event("gptrain/backward", us=10),
              event("gptrain/optimizer", us=2_000), event("gptrain/checkpoint", us=50_000),
              event("sm90_xmma_gemm", DeviceType.CUDA, 30_000)]
    prof = Profiler(ProfileConfig(enabled=True), tmp_path, 0, torch.device("cuda"))
    prof.prof = SimpleNamespace(key_averages=lambda: events)
    prof.recorded_steps = 1
    lines = {ln.split()[0]: ln for ln in prof.summary().splitlines()[1:6]}
    # backward = kernel time − what data/forward/optimizer launched (the checkpoint is not part of a step)
    assert lines["backward"].split()[1] == "18.00"
    assert lines["forward"].endswith("ms (30%)")  # 9 of a 30 ms step (data 1 + forward 9 + backward 18 + optim 2)
    assert lines["checkpoint"].split()[1:] == ["50.00", "ms"]  # shown, without a share
