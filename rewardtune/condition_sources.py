"""Condition sources: where the condition c of each trajectory comes from (the recipe's `[conditions]` table).

A conditional sampler draws one condition per trajectory (`rewardtune.conditions.Conditions`); a source says
which conditions exist, how training draws them, and which ones evaluation goes through. `kind` picks one of:

    [conditions]                      # class labels
    kind = "labels"
    num_classes = 10                  # int >= 2
    distribution = "uniform"          # "uniform": labels drawn uniformly; "data": the labels of each real batch
    class_names = ["zero", "one", ...]  # optional, num_classes distinct names for reports ([] = "class k")

    [conditions]                      # prompts written in the recipe
    kind = "prompts"
    prompts = ["a photo of a cat", "a photo of a dog"]

    [conditions]                      # a text file, one prompt per line (the format of DDPO and Flow-GRPO)
    kind = "prompt_file"
    path = "prompts.txt"              # relative to the recipe's folder

    [conditions]                      # JSON lines with per-prompt metadata (GenEval's format)
    kind = "jsonl"
    path = "metadata.jsonl"

Prompt files. Lines are stripped of surrounding whitespace; an empty (or whitespace-only) line is an error naming
the file and the line, except the empty string after a final newline. Files are read as UTF-8 (a byte-order mark
is skipped).

JSON lines. Each line is one object with a non-empty string "prompt". Every other top-level key is metadata
(GenEval: `{"tag": "color_attr", "include": [...], "exclude": [...], "prompt": "..."}`); metadata may instead, or
as well, sit in a nested "metadata" object, but one key may not be in both. When the reward declares the metadata
keys it reads (`metadata_keys` of `build_condition_source`), any other key is an error naming file, line and key,
so a misspelt field cannot silently drop a check. Malformed JSON, a line that is not an object and a missing or
empty prompt are errors naming the line.

Duplicates. A prompt listed twice is kept once, at its first occurrence, and the order of first occurrences is
kept, so every prompt has the same probability under `sample`. In a JSON-lines file the repeats must carry the
same metadata as the first occurrence (otherwise one of them would be dropped silently: an error).

Held-out prompts (prompt kinds only; for evaluation on prompts the sampler was not trained on):
    held_out = 0.1        # a fraction in [0, 1) of the prompts, chosen with `split_seed` (default 0); at least one
                          # prompt is held out and at least one is kept for training
    held_out_path = "test.txt"   # or: a second file of the same format as `path` (prompt_file and jsonl only);
                                 # it may share no prompt with the training file
Both splits keep the order of the file. `split_seed` matters only with `held_out` > 0. How many conditions go in a
group (GRPO's group size) is an [algorithm] setting, not a [conditions] one.

Balanced draws (jsonl only):
    balance_by = "category"   # a metadata key every training prompt has: training draws a value of it uniformly,
                              # then a prompt uniformly among those with that value ("" = every prompt equally)
A prompt set is rarely balanced (GenEval-style sets have many more two-object than single-object prompts); with
`balance_by` each value of the key gets the same share of the training trajectories, whatever its prompt count.
Evaluation follows the same balance (`PromptSource.evaluation_counts`): each value gets the same share of the
samples of a split, spread equally over its prompts, so the metrics weigh the mixture training optimises and a
category of 3 held-out prompts is measured on as many samples as one of 132. Without `balance_by` evaluation goes
through every prompt equally often.

All randomness comes from the `torch.Generator` passed to `sample` and `sample_groups`, so a resumed run draws the
same conditions. Errors in the table are `RecipeError`s naming the key ("conditions.path: ...").
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rewardtune.conditions import Conditions
from rewardtune.errors import RecipeError

Split = Literal["train", "held_out"]

# ---------------------------------------------------------------------------------------------------------------------
# option tables
# ---------------------------------------------------------------------------------------------------------------------
REQUIRED = object()  # the default of an option the table must set


@dataclass(frozen=True)
class Option:
    """One key of a table: its type (bool, int, float, str, or list for a list of strings) and its default."""

    type: type
    default: object = REQUIRED


TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list of strings"}


def validate_options(table: str, options: Mapping, kinds: Mapping[str, Mapping[str, Option]]) -> dict:
    """`options` (a TOML table with a `kind`) checked against `kinds[kind]`, with defaults filled in.

    Args:
        table: the table's name in messages ("conditions", "text_encoder").
        options: the table as parsed from TOML.
        kinds: kind -> {key: Option}.
    Returns:
        {"kind": kind, key: value, ...} for every key of the kind (the resolved table; TOML-serialisable).
    Raises:
        RecipeError: a missing or unknown kind, an unknown or missing key, or a value of the wrong type.
    """
    if not isinstance(options, Mapping):
        raise RecipeError(f"[{table}] must be a table, got {type(options).__name__}")
    kind = options.get("kind")
    if kind is None:
        raise RecipeError(f"{table}.kind: missing (one of {', '.join(kinds)})")
    if kind not in kinds:
        raise RecipeError(f"{table}.kind: unknown kind {kind!r}{suggest(str(kind), kinds)} (one of {', '.join(kinds)})")
    spec = kinds[kind]
    for key in options:
        if key != "kind" and key not in spec:
            raise RecipeError(
                f"{table}.{key}: unknown key for kind {kind!r}{suggest(key, spec)} (keys: {', '.join(spec)})"
            )
    resolved = {"kind": kind}
    for key, option in spec.items():
        if key not in options:
            if option.default is REQUIRED:
                raise RecipeError(f"{table}.{key}: missing (kind {kind!r} needs it)")
            resolved[key] = option.default
            continue
        resolved[key] = checked_type(f"{table}.{key}", options[key], option.type)
    return resolved


def checked_type(where: str, value, expected: type):
    """`value` if it has the `expected` type (an int is a float too; a bool is no number), else a RecipeError."""
    fits = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
    }[expected]
    if not fits:
        raise RecipeError(f"{where}: expected {TYPE_NAMES[expected]}, got {value!r} ({type(value).__name__})")
    return float(value) if expected is float else list(value) if expected is list else value


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


HELD_OUT = {"held_out": Option(float, 0.0), "split_seed": Option(int, 0)}
CONDITION_KINDS: dict[str, dict[str, Option]] = {
    "labels": {
        "num_classes": Option(int),
        "distribution": Option(str, "uniform"),
        "class_names": Option(list, []),
    },
    "prompts": {"prompts": Option(list), **HELD_OUT},
    "prompt_file": {"path": Option(str), **HELD_OUT, "held_out_path": Option(str, "")},
    "jsonl": {"path": Option(str), **HELD_OUT, "held_out_path": Option(str, ""), "balance_by": Option(str, "")},
}


def resolve_condition_options(options: Mapping) -> dict:
    """The `[conditions]` table checked and with its defaults filled in (what a resolved recipe holds)."""
    return validate_options("conditions", options, CONDITION_KINDS)


# ---------------------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------------------
class ConditionSource:
    """The conditions of a run, split into train and held-out, with the draws training and evaluation need.

    Subclasses set `kind`, `from_data`, `num_classes` and implement `split(name)`: every condition of a split,
    one row each, in a fixed order.
    """

    kind: str
    from_data: bool = False
    num_classes: int | None = None
    weights: torch.Tensor | None = None  # float64 [num_train] draw probabilities (None: uniform)

    def split(self, name: Split) -> Conditions | None:
        """Every condition of split `name` (one row each, fixed order), or None for an empty split."""
        raise NotImplementedError

    @property
    def train_keys(self) -> tuple[str, ...]:
        """The training conditions' names: prompts, or class names ("class k" when unnamed)."""
        return tuple(self.split("train").keys())

    @property
    def held_out_keys(self) -> tuple[str, ...]:
        """The held-out conditions' names (empty without a held-out split)."""
        held_out = self.split("held_out")
        return () if held_out is None else tuple(held_out.keys())

    def sample(self, n: int, generator: torch.Generator) -> Conditions:
        """n training conditions drawn with replacement, uniformly (or with `weights`).

        Args:
            n: how many (one per trajectory).
            generator: the only source of randomness (CPU or the device's generator).
        Returns:
            Conditions with n rows; labels, if any, on the CPU.
        """
        return self.split("train").select(self.draw(n, generator))

    def sample_groups(self, num_groups: int, group_size: int, generator: torch.Generator) -> Conditions:
        """num_groups training conditions drawn as `sample` does, each repeated group_size times in a row.

        Row g * group_size + j is member j of group g (the layout GRPO's group advantages read).
        """
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        index = self.draw(num_groups, generator).repeat_interleave(group_size)  # [num_groups * group_size]
        return self.split("train").select(index)

    def evaluation_conditions(self, split: Split, per_condition: int) -> Conditions:
        """Every condition of `split` in its fixed order, each `per_condition` times in a row.

        Row i * per_condition + j is sample j of condition i, so a per-condition metric is a reshape to
        [num_conditions, per_condition]. A balanced prompt source (`balance_by`) repeats its conditions unequally
        instead (`PromptSource.evaluation_counts`); the repeats of one condition are still adjacent.
        """
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
        if per_condition < 1:
            raise ValueError(f"per_condition must be >= 1, got {per_condition}")
        rows = self.split(split)
        if rows is None:
            raise ValueError(f"this {self.kind!r} source has no held-out conditions (held_out_keys is empty)")
        return rows.select(torch.arange(len(rows)).repeat_interleave(self.evaluation_counts(rows, per_condition)))

    def evaluation_counts(self, rows: Conditions, per_condition: int) -> torch.Tensor:
        """How many evaluation samples each row of a split gets: int64 [len(rows)], `per_condition` each."""
        return torch.full((len(rows),), per_condition, dtype=torch.int64)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n row numbers of the training split, with replacement, uniform or with probabilities `weights`: int64 [n]
        on the CPU."""
        if self.from_data:
            raise ValueError(
                "these labels come with the data (distribution = 'data'): draw them with data.sample_conditioned"
            )
        if self.weights is not None:
            weights = self.weights.to(generator.device)
            return torch.multinomial(weights, n, replacement=True, generator=generator).cpu()
        size = len(self.split("train"))
        return torch.randint(0, size, (n,), generator=generator, device=generator.device).cpu()


class LabelSource(ConditionSource):
    """Class labels 0..num_classes-1, drawn uniformly or taken from the data (`from_data`).

    Args:
        num_classes: K >= 2.
        class_names: K names for reports, or empty ("class k").
        from_data: the trainer takes each batch's labels from `data.sample_conditioned`; `sample` then refuses.
    """

    kind = "labels"

    def __init__(self, num_classes: int, *, class_names: Sequence[str] = (), from_data: bool = False) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_names and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = tuple(class_names)
        self.from_data = from_data
        self._all = Conditions.from_labels(torch.arange(num_classes))

    def split(self, name: Split) -> Conditions | None:
        return self._all if name == "train" else None

    @property
    def train_keys(self) -> tuple[str, ...]:
        return self.class_names or tuple(self._all.keys())


class PromptSource(ConditionSource):
    """Prompts (with optional per-prompt metadata), split into train and held-out.

    Args:
        train: the training prompts, one row each, no repeats.
        held_out: the held-out prompts, or None.
        kind: the table's kind ("prompts", "prompt_file" or "jsonl"), for messages.
        balance_by: a metadata key of every training prompt; training then draws each of its values equally often
            (`balanced_weights`). "" draws every prompt equally often.
    Raises:
        ValueError: no training prompt; `balance_by` without metadata, or a prompt without that key.
    """

    def __init__(
        self, train: Conditions, held_out: Conditions | None = None, *, kind: str = "prompts", balance_by: str = ""
    ) -> None:
        if train.prompts is None or len(train) == 0:
            raise ValueError("a prompt source needs at least one training prompt")
        self.kind = kind
        self._splits = {"train": train, "held_out": held_out}
        self.balance_by = balance_by
        self.weights = balanced_weights(train, balance_by) if balance_by else None
        if balance_by and held_out is not None:
            value_groups(held_out, balance_by)  # the held-out prompts need the key too (evaluation balances them)

    def split(self, name: Split) -> Conditions | None:
        return self._splits[name]

    def evaluation_counts(self, rows: Conditions, per_condition: int) -> torch.Tensor:
        """Evaluation samples per row [len(rows)]: `per_condition` each, or with `balance_by` the split's
        per_condition * len(rows) samples shared equally between the V values of the key and then between the n_v
        prompts of each value, rounded up: ceil(per_condition * len(rows) / (V * n_v)).

        Balanced evaluation measures the mixture that training optimises, and gives a category of 3 prompts as
        many samples as one of 400: its accuracy is the same expectation as under equal repeats, at a far smaller
        variance.
        """
        if not self.balance_by:
            return super().evaluation_counts(rows, per_condition)
        rows_per_value, num_values = value_groups(rows, self.balance_by)
        total = per_condition * len(rows)
        return torch.tensor([-(-total // (num_values * n)) for n in rows_per_value], dtype=torch.int64)


def balanced_weights(conditions: Conditions, key: str) -> torch.Tensor:
    """Draw probabilities [N] (float64, summing to 1) that give each value of metadata `key` the same total and split
    it equally among the rows that have it: p_i = 1 / (V * n_v(i)), V values, n_v rows with row i's value.

    Raises:
        ValueError: the conditions have no metadata, or a row lacks `key` (naming the first such prompt).
    """
    counts, num_values = value_groups(conditions, key)
    return torch.tensor([1.0 / (num_values * n) for n in counts], dtype=torch.float64)


def value_groups(conditions: Conditions, key: str) -> tuple[list[int], int]:
    """(n_v for each row: how many rows share its value of metadata `key`; V: how many values there are). Values
    are compared as JSON (any JSON value may be a category).

    Raises:
        ValueError: the conditions have no metadata, or a row lacks `key` (naming the first such prompt).
    """
    if conditions.metadata is None:
        raise ValueError(f"balance_by = {key!r} needs prompts with metadata (a jsonl file)")
    values = []
    for prompt, meta in zip(conditions.prompts, conditions.metadata):
        if key not in meta:
            raise ValueError(f"balance_by = {key!r}: the prompt {prompt!r} has no metadata key {key!r}")
        values.append(json.dumps(meta[key], sort_keys=True))
    counts = Counter(values)
    return [counts[v] for v in values], len(counts)


# ---------------------------------------------------------------------------------------------------------------------
# building from a [conditions] table
# ---------------------------------------------------------------------------------------------------------------------
def build_condition_source(
    options: Mapping, *, base_dir: Path, data=None, metadata_keys: Collection[str] | None = None
) -> ConditionSource:
    """The source a `[conditions]` table describes (see the module docstring).

    Args:
        options: the table as parsed from TOML.
        base_dir: the folder relative paths are read from (the recipe's).
        data: the run's data source; `distribution = "data"` needs its `sample_conditioned`, and its
            `num_classes`, when it has that attribute, must equal `num_classes` (None: the data have no labels).
        metadata_keys: the JSON-lines metadata keys the reward reads (any other is an error), or None to accept any.
    Raises:
        RecipeError: naming the key, and for files the file and line.
    """
    opts = resolve_condition_options(options)
    if opts["kind"] == "labels":
        return build_label_source(opts, data)
    if opts["kind"] == "prompts":
        if not opts["prompts"]:
            raise RecipeError("conditions.prompts: the list is empty")
        for i, prompt in enumerate(opts["prompts"]):
            if not prompt.strip():
                raise RecipeError(f"conditions.prompts: prompt {i} is empty")
        rows = [(prompt.strip(), None) for prompt in opts["prompts"]]
        return split_rows(unique_rows(rows, where="conditions.prompts:"), None, opts)
    train = read_prompt_rows(opts, "path", base_dir, metadata_keys)
    held_out = read_prompt_rows(opts, "held_out_path", base_dir, metadata_keys) if opts["held_out_path"] else None
    return split_rows(train, held_out, opts)


def build_label_source(opts: dict, data) -> LabelSource:
    num_classes, names = opts["num_classes"], opts["class_names"]
    if num_classes < 2:
        raise RecipeError(f"conditions.num_classes: must be >= 2, got {num_classes}")
    if names and len(names) != num_classes:
        raise RecipeError(f"conditions.class_names: {len(names)} names for num_classes = {num_classes}")
    if len(set(names)) != len(names):
        raise RecipeError("conditions.class_names: the names must be distinct")
    if opts["distribution"] not in ("uniform", "data"):
        raise RecipeError(f"conditions.distribution: must be 'uniform' or 'data', got {opts['distribution']!r}")
    from_data = opts["distribution"] == "data"
    if from_data:
        if data is None or not callable(getattr(data, "sample_conditioned", None)):
            raise RecipeError(
                "conditions.distribution: 'data' needs data that come with labels (sample_conditioned); "
                f"{type(data).__name__} has none, use distribution = 'uniform'"
            )
        data_classes = getattr(data, "num_classes", None)
        if hasattr(data, "num_classes") and data_classes is None:
            raise RecipeError(
                f"conditions.distribution: 'data' needs class labels, and these {type(data).__name__} data have "
                "none; use distribution = 'uniform'"
            )
        if data_classes is not None and data_classes != num_classes:
            raise RecipeError(f"conditions.num_classes: {num_classes}, but the data have {data_classes} classes")
    return LabelSource(num_classes, class_names=names, from_data=from_data)


Row = tuple[str, "dict | None"]  # (prompt, metadata or None)


def split_rows(train: list[Row], held_out: list[Row] | None, opts: dict) -> PromptSource:
    """The source of `train` rows, with `held_out` rows or a seeded `held_out` fraction of `train` held out."""
    fraction = opts["held_out"]
    if not 0.0 <= fraction < 1.0:
        raise RecipeError(f"conditions.held_out: a fraction in [0, 1), got {fraction}")
    if fraction > 0 and held_out is not None:
        raise RecipeError("conditions.held_out: set held_out (a fraction) or held_out_path (a file), not both")
    if held_out is not None:
        shared = sorted({prompt for prompt, _ in train} & {prompt for prompt, _ in held_out})
        if shared:
            raise RecipeError(
                f"conditions.held_out_path: {len(shared)} prompt(s) are also training prompts, e.g. {shared[0]!r}"
            )
    elif fraction > 0:
        num_held = max(1, round(fraction * len(train)))
        if num_held >= len(train):
            raise RecipeError(
                f"conditions.held_out: {fraction} of {len(train)} prompts leaves none for training"
            )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(opts["split_seed"]))
        chosen = set(order[:num_held].tolist())
        held_out = [row for i, row in enumerate(train) if i in chosen]
        train = [row for i, row in enumerate(train) if i not in chosen]
    held_out_rows = rows_to_conditions(held_out) if held_out else None
    try:
        return PromptSource(
            rows_to_conditions(train), held_out_rows, kind=opts["kind"], balance_by=opts.get("balance_by", "")
        )
    except ValueError as err:
        raise RecipeError(f"conditions.balance_by: {err}") from None


def rows_to_conditions(rows: list[Row]) -> Conditions:
    metadata = None if rows[0][1] is None else [meta for _, meta in rows]
    return Conditions.from_prompts([prompt for prompt, _ in rows], metadata)


def unique_rows(rows: Sequence[Row], *, where: str, lines: Sequence[int] | None = None) -> list[Row]:
    """`rows` with repeated prompts kept once (first occurrence, order kept); repeats with other metadata: error."""
    first: dict[str, int] = {}
    kept: list[Row] = []
    for i, (prompt, meta) in enumerate(rows):
        if prompt not in first:
            first[prompt] = i
            kept.append((prompt, meta))
        elif rows[first[prompt]][1] != meta:
            at = (lambda j: f"line {lines[j]}") if lines else (lambda j: f"prompt {j}")
            raise RecipeError(f"{where} {at(i)} repeats the prompt of {at(first[prompt])} with other metadata")
    return kept


def read_lines(path: Path, label: str) -> list[str]:
    """The lines of a prompt file (UTF-8, a byte-order mark skipped, the final newline dropped), every one non-empty.

    Raises:
        RecipeError: "<label> line N is empty", "<label> line N is not UTF-8 text", "<label> is empty", or an
            unreadable file.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise RecipeError(f"{label}: cannot read it ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise RecipeError(f"{label} line {line} is not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the final newline
        lines.pop()
    if not lines:
        raise RecipeError(f"{label} is empty")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise RecipeError(f"{label} line {number} is empty")
    return lines


def read_prompt_rows(opts: dict, key: str, base_dir: Path, metadata_keys: Collection[str] | None) -> list[Row]:
    """The unique rows of the file `opts[key]` (a prompt file or JSON lines, as `opts["kind"]` says)."""
    name = opts[key]
    where = f"conditions.{key}"
    path = Path(name).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    if not path.is_file():
        raise RecipeError(f"{where}: {name} does not exist ({path})")
    rows = []
    for number, line in enumerate(read_lines(path, f"{where}: {name}"), start=1):
        if opts["kind"] == "jsonl":
            rows.append(parse_jsonl_line(line, f"{where}: {name} line {number}", metadata_keys))
        else:
            rows.append((line.strip(), None))
    return unique_rows(rows, where=f"{where}: {name}", lines=range(1, len(rows) + 1))


def parse_jsonl_line(line: str, at: str, metadata_keys: Collection[str] | None) -> Row:
    """(prompt, metadata) of one JSON line; `at` ("conditions.path: x.jsonl line 3") prefixes errors."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise RecipeError(f"{at}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise RecipeError(f"{at}: expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecipeError(f"{at}: needs a non-empty string \"prompt\", got {prompt!r}")
    metadata = {k: v for k, v in record.items() if k not in ("prompt", "metadata")}
    nested = record.get("metadata", {})
    if not isinstance(nested, dict):
        raise RecipeError(f"{at}: \"metadata\" must be an object, got {type(nested).__name__}")
    for key, value in nested.items():
        if key in metadata:
            raise RecipeError(f"{at}: metadata key {key!r} is both at top level and in \"metadata\"")
        metadata[key] = value
    if metadata_keys is not None:
        for key in metadata:
            if key not in metadata_keys:
                known = ", ".join(sorted(metadata_keys)) or "none"
                hint = suggest(key, metadata_keys)
                raise RecipeError(f"{at}: metadata key {key!r} is not read by the reward{hint} (it reads: {known})")
    return prompt.strip(), metadata
