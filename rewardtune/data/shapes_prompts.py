"""The shapes benchmark's prompt splits as files a `[conditions]` table can point at.

`write_prompt_files(directory)` writes `split_prompts(held_out_fraction, seed)` (`data/shapes.py`) as:
- `train.txt` and `held_out.txt`: one caption per line (`kind = "prompt_file"`);
- `train.jsonl` and `held_out.jsonl`: one JSON object per line, {"prompt": caption} plus the metadata keys
  (`METADATA_KEYS`: category, objects, count, relation) at top level (`kind = "jsonl"`, GenEval's layout), which the
  `shapes` reward needs.
Lines keep `all_scenes` order. recipes/prompts/shapes/ holds the files of the default split (held-out fraction
0.25, seed 0), written by scripts/make_shapes_prompts.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from rewardtune.data.shapes import split_prompts


def write_prompt_files(directory: str | Path, held_out_fraction: float = 0.25, seed: int = 0) -> dict[str, Path]:
    """Write the four files into `directory` (created if missing); return them by name ("train.txt", ...)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, held_out = split_prompts(held_out_fraction, seed)
    written = {}
    for split, prompts in (("train", train), ("held_out", held_out)):
        text = directory / f"{split}.txt"
        text.write_text("".join(f"{caption}\n" for caption, _ in prompts), encoding="utf-8")
        lines = directory / f"{split}.jsonl"
        records = [json.dumps({"prompt": caption, **metadata}) for caption, metadata in prompts]
        lines.write_text("".join(f"{record}\n" for record in records), encoding="utf-8")
        written[text.name], written[lines.name] = text, lines
    return written
