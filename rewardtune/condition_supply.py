"""`ConditionSupply`: where a conditional run's conditions come from, for training and for evaluation.

A recipe's `[conditions]` table names a condition source (`condition_sources.build_condition_source`: class labels, a
prompt list, a prompt file, a JSONL file with metadata, a held-out split) and, for prompts, a `text_encoder` table
(`text_encoders.build_text_encoder`). The supply joins them with the data:

- the data batch of an iteration comes with its own conditions when the data have them (`sample_conditioned`: the
  digits' classes, the shapes benchmark's captions), which a conditional energy and DDPM pretraining need;
- the rollouts' conditions are those same conditions when the source draws from the data
  (`distribution = "data"`), and otherwise a fresh draw from the source's training split;
- prompts are embedded by the frozen text encoder before any network sees them.

Every draw takes an explicit generator, so a resumed run draws what the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rewardtune.conditions import Conditions
from rewardtune.errors import RecipeError
from rewardtune.nets.conditioning import Conditioning


@dataclass
class ConditionSupply:
    """A run's condition source, its text encoder (None for class labels) and what its networks take.

    Attributes:
        source: draws `Conditions` (`sample(n, generator)`, `evaluation_conditions(split, per_condition)`) and says
            whether rollouts take the data's own conditions (`from_data`).
        encoder: a frozen `text_encoders.TextEncoder` that fills in prompt embeddings, or None.
        conditioning: what the networks take (`Conditioning`: class labels or text embeddings).
    """

    source: object
    encoder: torch.nn.Module | None
    conditioning: Conditioning

    def encode(self, condition: Conditions | None, device) -> Conditions | None:
        """The conditions with their prompts embedded (when the run has a text encoder), on `device`."""
        if condition is None:
            return None
        if self.encoder is not None and condition.prompts is not None and condition.embeddings is None:
            self.encoder.to(device)
            condition = self.encoder.encode_conditions(condition)
        return condition.to(device)

    def embed_training_prompts(self) -> int:
        """Embed every training prompt now, into the text encoder's cache (a run fills it over its first iterations
        anyway; a benchmark fills it first so that it times the iterations that follow). Returns the cache's size (0
        without a text encoder)."""
        if self.encoder is None:
            return 0
        train = self.source.split("train")  # every condition source has its splits
        if train is not None and train.prompts is not None:
            self.encoder.encode(list(train.prompts))
        return self.encoder.cache_size

    def real_batch(self, data, n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, Conditions | None]:
        """n data points and their conditions (None when the data have none)."""
        if hasattr(data, "sample_conditioned"):
            real, condition = data.sample_conditioned(n, generator, device=device)
            return real, self.encode(condition, device)
        return data.sample(n, generator, device=device), None

    def rollout_conditions(
        self, n: int, generator: torch.Generator, real_condition: Conditions | None, device, group_size: int = 1
    ) -> Conditions:
        """The conditions of the n chains of an iteration: the data batch's own (`from_data`), n draws from the
        source's training split, or n / group_size draws each repeated for `group_size` consecutive chains (GRPO)."""
        if getattr(self.source, "from_data", False):
            if group_size > 1:
                raise RecipeError("group advantages draw their own conditions; set [conditions] distribution = \"uniform\"")
            if real_condition is None:
                raise RecipeError("[conditions] draws conditions from the data, but the data have none")
            return real_condition
        if group_size > 1:
            if n % group_size:
                raise RecipeError(f"train.batch_size = {n} is not a multiple of algorithm.group_size = {group_size}")
            return self.encode(self.source.sample_groups(n // group_size, group_size, generator), device)
        return self.encode(self.source.sample(n, generator), device)

    def evaluation_conditions(self, split: str, per_condition: int, device) -> Conditions:
        """Every condition of `split` ("train" or "held_out"), `per_condition` times each, in a fixed order."""
        return self.encode(self.source.evaluation_conditions(split, per_condition), device)


def build_condition_supply(options: dict | None, data, base_dir: Path) -> ConditionSupply | None:
    """The supply of a recipe's `[conditions]` table (None for an unconditional recipe).

    Raises:
        RecipeError: a bad table (unknown key, missing file, an empty prompt line, ...) or prompts without a
            `text_encoder`.
    """
    if options is None:
        return None
    from rewardtune.condition_sources import build_condition_source

    options = dict(options)
    encoder_options = options.pop("text_encoder", None)
    metadata_keys = None
    source = build_condition_source(options, base_dir=base_dir, data=data, metadata_keys=metadata_keys)
    if getattr(source, "num_classes", None):
        if encoder_options is not None:
            raise RecipeError("conditions.text_encoder applies to prompts; class labels need no text encoder")
        return ConditionSupply(source, None, Conditioning(num_classes=int(source.num_classes)))
    if encoder_options is None:
        raise RecipeError("[conditions] with prompts needs a text_encoder table, e.g. text_encoder = { kind = \"hash\" }")
    from rewardtune.text_encoders import build_text_encoder

    encoder = build_text_encoder(dict(encoder_options))
    return ConditionSupply(source, encoder, Conditioning(text_dim=int(encoder.embedding_dim)))


def check_metadata(supply: ConditionSupply | None, reward) -> None:
    """The prompts' metadata may hold only the keys the reward reads (`reward.metadata_keys`, when it declares them):
    a misspelt key would otherwise silently drop a check.

    Raises:
        RecipeError: naming the key, the prompt and the keys the reward reads.
    """
    allowed = getattr(reward, "metadata_keys", None)
    if supply is None or allowed is None:
        return
    for split in ("train", "held_out"):
        condition = supply.source.split(split) if hasattr(supply.source, "split") else None
        for prompt, metadata in zip(condition.prompts or (), condition.metadata or ()) if condition is not None else ():
            unknown = sorted(set(metadata or {}) - set(allowed))
            if unknown:
                raise RecipeError(
                    f"[conditions] prompt {prompt!r} has metadata key {unknown[0]!r}, which reward "
                    f"{getattr(reward, 'name', '') or type(reward).__name__!r} does not read (it reads: "
                    f"{', '.join(sorted(allowed))})"
                )
