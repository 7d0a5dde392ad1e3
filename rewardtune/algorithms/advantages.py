"""Advantage normalisations of the policy-gradient baseline that use the condition of each chain.

- Per-condition normalisation (DDPO's per-prompt stat tracking, ddpo-pytorch `stat_tracking.py`): each condition
  keeps a bounded buffer of its recent returns; a chain's advantage is its return standardised by its condition's
  buffer once the buffer holds `min_count` returns, and by the whole batch's before that. Without it a prompt that
  is easy for the sampler (high rewards throughout) would dominate the batch's positive advantages.
- Group-relative advantages (GRPO; Flow-GRPO): the batch is drawn as groups of `group_size` chains under the same
  condition, and each return is standardised within its group: A = (G - mean_group) / (std_group + eps).

Both act on the soft returns G_t [T, B] of `policy_gradient.soft_returns`, per time t (the running costs differ by t).
With several processes the per-condition buffers are updated from every rank's returns (gathered), so every rank
standardises with the same statistics; groups never span ranks.
"""

from __future__ import annotations

from collections import deque

import torch

from rewardtune.agreement import gather_objects

EPS = 1e-6  # added to standard deviations (a group whose chains all pass a pass/fail reward has std 0)


def group_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """(G - mean) / (std + EPS) within consecutive groups of `group_size` chains: returns [T, B] -> [T, B].

    Raises:
        ValueError: B is not a multiple of group_size, or group_size < 2.
    """
    T, B = returns.shape
    if group_size < 2 or B % group_size:
        raise ValueError(f"group advantages need groups of >= 2 chains that divide the batch; got {group_size} for {B}")
    grouped = returns.view(T, B // group_size, group_size)
    mean = grouped.mean(2, keepdim=True)
    std = grouped.std(2, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + EPS)).view(T, B)


class PerConditionStats:
    """Bounded per-condition buffers of returns [T] (DDPO's per-prompt stat tracking).

    Args:
        buffer_size: returns kept per condition (the oldest are dropped).
        min_count: a condition's own statistics are used once its buffer holds this many returns; before that the
            batch's (all conditions', all ranks') statistics are.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 2 or not 2 <= min_count <= buffer_size:
            raise ValueError(f"need 2 <= min_count <= buffer_size, got min_count {min_count}, buffer_size {buffer_size}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def normalize(self, keys: list[str], returns: torch.Tensor) -> torch.Tensor:
        """Fold this batch's returns (every rank's) into the buffers, then standardise returns [T, B] of chains with
        conditions `keys` (B names): [T, B]."""
        local = returns.detach().double().cpu().T  # [B, T]
        everyone = gather_objects((list(keys), local), returns.device)
        all_rows = torch.cat([rows for _, rows in everyone])  # [B_total, T]
        batch_mean, batch_std = all_rows.mean(0), all_rows.std(0, unbiased=False)
        for rank_keys, rows in everyone:
            for key, row in zip(rank_keys, rows):
                self.buffers.setdefault(key, deque(maxlen=self.buffer_size)).append(row)
        out = torch.empty_like(local)
        for i, key in enumerate(keys):
            buffer = self.buffers[key]
            if len(buffer) >= self.min_count:
                stacked = torch.stack(list(buffer))
                mean, std = stacked.mean(0), stacked.std(0, unbiased=False)
            else:
                mean, std = batch_mean, batch_std
            out[i] = (local[i] - mean) / (std + EPS)
        return out.T.to(returns.dtype).to(returns.device)

    def state_dict(self) -> dict:
        return {key: torch.stack(list(buffer)) for key, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {key: deque(list(rows), maxlen=self.buffer_size) for key, rows in state.items()}
