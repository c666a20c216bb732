"""Data loader for the wideep_* lm-eval tasks: local JSONL files, no dataset hub."""

import json
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).parent / "data"


def load_jsonl(file: str, **metadata) -> datasets.DatasetDict:
    """`data/{file}` as the `test` split (lm-eval's `custom_dataset` hook)."""
    rows = [json.loads(line) for line in (DATA_DIR / file).read_text().splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
