"""Write the shapes benchmark's default prompt split (held-out fraction 0.25, seed 0) into recipes/prompts/shapes/:
train.txt, held_out.txt (one prompt per line) and train.jsonl, held_out.jsonl (prompt plus metadata).
Usage: python3 scripts/make_shapes_prompts.py"""

from pathlib import Path

from rewardtune.data.shapes_prompts import write_prompt_files

directory = Path(__file__).resolve().parents[1] / "recipes" / "prompts" / "shapes"
for path in write_prompt_files(directory).values():
    lines = path.read_text(encoding="utf-8").count("\n")
    print(f"{path.relative_to(directory.parents[2])}: {lines} prompts")
