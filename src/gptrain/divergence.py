"""The divergence guard: a step whose loss or gradient norm is not finite never reaches the weights.

The skip is decided on the device, as PyTorch's GradScaler skips fp16 overflow steps: the optimizer
reads a 0-dim `found_inf` tensor (1.0: skip) inside its step, so the hot loop adds no host
synchronisation. Skipped steps are counted on the device and read at log steps, where N
consecutive ones end the run as `diverged`.
"""

from __future__ import annotations

import torch

from gptrain.distributed.parallelize import full_value


class DivergenceGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_consecutive: int,
                 device: torch.device) -> None:
        self.optimizer, self.scaler = optimizer, scaler
        self.max_consecutive = max_consecutive
        self.consecutive = torch.zeros((), device=device)  # skipped steps in a row, up to the last one
        self.skipped = torch.zeros((), device=device)  # since the last log
        # An optimizer that cannot skip on the device (no fused kernel on this device type): the loop
        # asks the host instead, once per step — slower, but the weights stay safe.
        self.on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    def before_step(self, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Mark this step to be skipped when it is not finite. Returns False when the caller must skip
        `optimizer.step()` itself (optimizers without on-device skipping)."""
        # Under FSDP/TP the norm is a replicated DTensor: its full value is this rank's own copy (no collective).
        grad_norm = full_value(grad_norm.detach())
        bad = (~torch.isfinite(grad_norm) | ~torch.isfinite(step_loss.detach())).float()
        self.skipped += bad
        self.consecutive.add_(1).mul_(bad)
        if self.on_device and not self.scaler.is_enabled():  # fp16: GradScaler sets found_inf itself
            self.optimizer.found_inf = bad
            self.optimizer.grad_scale = None
        return self.on_device or not bool(bad.item())

    def diverged(self) -> int:
        """Consecutive skipped steps when they reach the limit, else 0 (a host read: log steps only)."""
        n = int(self.consecutive.item())
        return n if n >= self.max_consecutive else 0

    def pop_skipped(self) -> int:
        n = int(self.skipped.item())
        self.skipped.zero_()
        return n
