"""Batches as a pure function of (seed, step, micro-step, data-parallel rank).

The training tokens are cut into non-overlapping windows of `seq_len + 1` tokens (inputs and
their next-token targets; neighbouring windows share one boundary token). Each epoch visits
every window once, in an order given by a permutation seeded by (seed, epoch). The global batch
of optimizer step s is the next `global_batch` windows of that endless sequence; micro-step m of
data-parallel rank r takes its own contiguous slice. So:

- resuming at step k reproduces exactly the batches of an uninterrupted run (no hidden state);
- a 1-process run with 4 accumulation steps and a 2-process run with 2 see the same windows.

The tokens are any 1-D sequence with len() and slicing: a memory-mapped .bin file, or a
`TokenShards` (data/format.py) joining many shards (llm.c, .npy) end to end, where a window may
cross a shard boundary. A batch is the same function of the same arguments either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptrain.data.format import TokenShards, open_bin
from gptrain.errors import UserError

Tokens = np.ndarray | TokenShards  # what batches and evaluation windows are cut from


def open_tokens(path: Path, dtype: str) -> np.memmap:
    """One flat token file, memory-mapped (kept for callers of the old name: see format.open_bin)."""
    return open_bin(Path(path), dtype)


@dataclass
class BatchLayout:
    micro_batch: int  # sequences per micro-batch per rank
    grad_accum: int  # micro-batches per optimizer step per rank
    dp_world: int = 1  # data-parallel ranks
    dp_rank: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_world


class TrainBatches:
    """Windows of a token sequence, addressed by (step, micro_step) for this rank."""

    def __init__(self, tokens: Tokens, seq_len: int, layout: BatchLayout, seed: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.layout = layout
        self.seed = seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(
                f"the training split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}. "
                "Use more text or a smaller --seq-len."
            )
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        # One permutation is cached: consecutive steps almost always share an epoch.
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_ids(self, step: int, micro_step: int) -> np.ndarray:
        """Global indices (into the endless epoch sequence) of this rank's sequences."""
        L = self.layout
        start = step * L.global_batch + micro_step * L.dp_world * L.micro_batch + L.dp_rank * L.micro_batch
        return np.arange(start, start + L.micro_batch, dtype=np.int64)

    def epoch_of(self, step: int) -> float:
        """Epochs completed at the start of `step`, as a fraction."""
        return step * self.layout.global_batch / self.num_windows

    def rows(self, step: int, micro_step: int, pin_memory: bool = False) -> torch.Tensor:
        """This rank's windows, (micro_batch, seq_len + 1) int64, copied to page-locked memory if asked."""
        positions = self.window_ids(step, micro_step)
        rows = np.empty((len(positions), self.seq_len + 1), dtype=np.int64)
        for i, pos in enumerate(positions):
            epoch, offset = divmod(int(pos), self.num_windows)
            start = int(self.permutation(epoch)[offset]) * self.seq_len
            rows[i] = self.tokens[start : start + self.seq_len + 1]
        batch = torch.from_numpy(rows)
        return batch.pin_memory() if pin_memory else batch

    def get(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs_and_targets(self.rows(step, micro_step))


def inputs_and_targets(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 tokens as (inputs, next-token targets): two views, no copy."""
    return rows[:, :-1], rows[:, 1:]


def eval_windows(tokens: Tokens, seq_len: int, budget_tokens: int) -> int:
    """How many leading non-overlapping val windows the eval budget covers (at least one)."""
    available = (len(tokens) - 1) // seq_len
    if available < 1:
        raise UserError(
            f"the validation split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}. "
            "Prepare with a larger --val-fraction or lower --seq-len."
        )
    return max(1, min(available, budget_tokens // seq_len))


def eval_rows(tokens: Tokens, seq_len: int, window_ids: range | list[int]) -> torch.Tensor:
    """Validation windows `window_ids`, (len(window_ids), seq_len + 1) int64."""
    return torch.from_numpy(
        np.stack([np.asarray(tokens[w * seq_len : w * seq_len + seq_len + 1], dtype=np.int64) for w in window_ids]))


class DevicePrefetcher:
    """Moves the batches of the coming micro-steps to the device ahead of use.

    On CUDA the host batch is pinned as one block and moved with one non-blocking copy, issued one
    micro-step early so it overlaps the current forward/backward; inputs and targets are views of
    the copy on the device. (Copying the two strided host views instead would make CUDA stage each
    through a pageable contiguous temporary.) On CPU it is a pass-through.
    """

    def __init__(self, source: TrainBatches, device: torch.device, grad_accum: int):
        self.source = source
        self.device = device
        self.grad_accum = grad_accum
        self.cuda = device.type == "cuda"
        self._next: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def _load(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cuda:
            return self.source.get(step, micro)
        rows = self.source.rows(step, micro, pin_memory=True)
        return inputs_and_targets(rows.to(self.device, non_blocking=True))

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._next is not None and self._next[0] == (step, micro):
            batch = self._next[1]
        else:
            batch = self._load(step, micro)
        if self.cuda:  # start the following copy now; on CPU loading ahead would only add latency
            nxt = (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)
            self._next = (nxt, self._load(*nxt))
        return batch
