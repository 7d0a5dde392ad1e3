"""`Conditions`: the condition c of each trajectory (a class label, a prompt and its text embedding, metadata).

A conditional sampler is a policy pi(x_{t+1} | x_t, c): the condition is part of the state. It is drawn once per
trajectory, carried in `Trajectory.condition`, and given to the policy mean mu(x_t, t, c), the value V(x_t, t, c),
a learning energy E(x, c), every reward r(x, c) (as its `context`) and the evaluator. An unconditional run carries
None everywhere and is exactly what it was before conditions existed.

Networks see the condition as one tensor (`Conditions.tensor()`):
- class labels: int64 [B], with `NULL_LABEL` (-1) for "no condition";
- text: float [B, E] prompt embeddings from a text encoder, with the zero vector for "no condition".
"No condition" is what classifier-free guidance evaluates for its unconditional branch and what pretraining
substitutes with probability p_uncond (`Conditions.dropped`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

NULL_LABEL = -1  # the class label of "no condition" (classifier-free guidance's unconditional branch)


@dataclass(frozen=True)
class Conditions:
    """A batch of B conditions, one per trajectory. At least one of `labels` and `prompts` is set.

    Attributes:
        labels: int64 [B] class labels in 0..K-1 (NULL_LABEL: no condition), or None.
        prompts: B prompt strings, or None.
        embeddings: float [B, E] text embeddings of `prompts` (zero rows: no condition), filled by a text encoder;
            None until encoded (or for labels).
        metadata: B dicts of per-prompt metadata (what a rule-based reward checks, e.g. colours and counts), or None.
    """

    labels: torch.Tensor | None = None
    prompts: tuple[str, ...] | None = None
    embeddings: torch.Tensor | None = None
    metadata: tuple[dict, ...] | None = None

    def __post_init__(self) -> None:
        if self.labels is None and self.prompts is None:
            raise ValueError("Conditions need labels or prompts")
        sizes = {name: n for name, n in self._sizes().items() if n is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditions fields differ in batch size: {sizes}")
        if self.labels is not None and (self.labels.dim() != 1 or self.labels.dtype != torch.long):
            raise ValueError(f"labels must be int64 [B], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.embeddings is not None and self.embeddings.dim() != 2:
            raise ValueError(f"embeddings must be [B, E], got {tuple(self.embeddings.shape)}")

    def _sizes(self) -> dict[str, int | None]:
        return {
            "labels": None if self.labels is None else self.labels.shape[0],
            "prompts": None if self.prompts is None else len(self.prompts),
            "embeddings": None if self.embeddings is None else self.embeddings.shape[0],
            "metadata": None if self.metadata is None else len(self.metadata),
        }

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_labels(cls, labels: Sequence[int] | torch.Tensor, device="cpu") -> Conditions:
        return cls(labels=torch.as_tensor(labels, dtype=torch.long, device=device).view(-1))

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> Conditions:
        return cls(prompts=tuple(prompts), metadata=None if metadata is None else tuple(metadata))

    @staticmethod
    def cat(parts: Sequence[Conditions]) -> Conditions:
        """The batches of `parts` one after another (fields set in all of them)."""
        first = parts[0]

        def join(field: str):
            values = [getattr(p, field) for p in parts]
            if any(v is None for v in values):
                return None
            return torch.cat(values) if isinstance(values[0], torch.Tensor) else tuple(x for v in values for x in v)

        return Conditions(**{f: join(f) for f in ("labels", "prompts", "embeddings", "metadata")}) if len(parts) > 1 else first

    # ---- batch operations --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return next(n for n in self._sizes().values() if n is not None)

    def select(self, index: torch.Tensor | Sequence[int]) -> Conditions:
        """Rows `index` (an int64 tensor or a list of row numbers), in that order."""
        index = torch.as_tensor(index, dtype=torch.long).view(-1)
        rows = index.tolist()
        return Conditions(
            labels=None if self.labels is None else self.labels[index.to(self.labels.device)],
            prompts=None if self.prompts is None else tuple(self.prompts[i] for i in rows),
            embeddings=None if self.embeddings is None else self.embeddings[index.to(self.embeddings.device)],
            metadata=None if self.metadata is None else tuple(self.metadata[i] for i in rows),
        )

    def repeat(self, times: int) -> Conditions:
        """The batch `times` times over, [c; c; ...] (the layout of T*B transitions flattened time-major)."""
        return Conditions.cat([self] * times) if times > 1 else self

    def to(self, device) -> Conditions:
        return replace(
            self,
            labels=None if self.labels is None else self.labels.to(device),
            embeddings=None if self.embeddings is None else self.embeddings.to(device),
        )

    def dropped(self, mask: torch.Tensor) -> Conditions:
        """The batch with "no condition" where `mask` [B] (bool) is true: NULL_LABEL labels, zero embeddings.
        Prompts and metadata are kept (rewards still see what was asked)."""
        labels, embeddings = self.labels, self.embeddings
        if labels is not None:
            labels = torch.where(mask.to(labels.device), torch.full_like(labels, NULL_LABEL), labels)
        if embeddings is not None:
            embeddings = embeddings.masked_fill(mask.to(embeddings.device).view(-1, 1), 0.0)
        return replace(self, labels=labels, embeddings=embeddings)

    def null(self) -> Conditions:
        """Every row "no condition" (classifier-free guidance's unconditional branch)."""
        return self.dropped(torch.ones(len(self), dtype=torch.bool))

    # ---- what networks and reports see ---------------------------------------------------------------------------
    def tensor(self) -> torch.Tensor:
        """The network input: text embeddings [B, E] when encoded, else the labels [B]."""
        if self.embeddings is not None:
            return self.embeddings
        if self.labels is not None:
            return self.labels
        raise ValueError("these Conditions hold prompts that no text encoder has embedded yet (embeddings is None)")

    def keys(self) -> list[str]:
        """One name per row for per-condition reports: the prompt, else the label ("class 3")."""
        if self.prompts is not None:
            return list(self.prompts)
        return [f"class {int(k)}" for k in self.labels.tolist()]


def condition_tensor(condition: Conditions | None) -> torch.Tensor | None:
    """`condition.tensor()`, or None for an unconditional batch."""
    return None if condition is None else condition.tensor()
