"""Synthetic tasks of four kinds for the trained tiny MoE. Pure: seeded `random` only.

Every item is a prompt and its exact answer, in characters the model's tokenizer knows:

    kind     prompt                  answer   what it takes
    add      "48+57="                "501"    2-digit addition with carries, the sum
                                              written units first ("105" read backwards:
                                              the order in which carries are made)
    copy     "cpy kqzd="             "kqzd"   copying 4 letters
    shift    "nxt kqzd="             "lrae"   each of 4 letters to the next one (z to a)
    minmax   "dig 482915:max="       "9"      the largest or smallest of 6 digits

The prompts of different kinds look different from the first character on, so the
routers of a model trained on them can send each kind to its own experts.

Minmax items ask about a `context` (the digits) that two queries share. A training
sequence asks both (`Item.more`, after the answer): "dig 482915:max=9;min=1" gives two
answers for one context, twice the training signal for the same length. Evaluation asks
the first query only and stops at ";" (the lm-eval tasks have `until: [";"]`).

Held-out split: an item is held out when the CRC-32 of its context is divisible by
`HELD_OUT_MODULUS` (about 1 context in 8). Training draws only the others
(`training_items`), evaluation only these (`held_out_items`): the two sets share no
context, so no query of an evaluation item was ever trained on, whatever the seeds.

The lm-eval tasks (`lm_eval_tasks/`) read held-out items from `lm_eval_tasks/data/`,
written by `python -m tools.accuracy.tasks` (`write_task_data`).
"""

from __future__ import annotations

import json
import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

Kind = Literal["add", "copy", "shift", "minmax"]
KINDS: tuple[str, ...] = get_args(Kind)
HELD_OUT_MODULUS = 8
LETTERS = string.ascii_lowercase
MINMAX_DIGITS = 6
# Every prompt of a kind has the same length, so each answer token of copy and shift reads
# the prompt at a fixed distance back: what a tiny model learns in minutes. (Reversing a
# word, with the answer token j reading 2j + 1 back, was still at 0 % held-out after
# 1,200 steps while these were at 85-100 %.)
WORD_LENGTH = 4


@dataclass(frozen=True)
class Item:
    """One task item: the model reads `prompt` and must write `answer`.

    `context`: the part of the prompt that decides the held-out split (the whole prompt
    for add, copy and shift). `more`: what a training sequence has after the answer: the
    other queries on the same context with their answers, e.g. ";min=1" ("" for add,
    copy and shift); then end of text."""

    kind: str
    prompt: str
    answer: str
    context: str
    more: str = ""


def is_held_out(context: str) -> bool:
    """True for the contexts kept out of training (CRC-32 divisible by `HELD_OUT_MODULUS`)."""
    return zlib.crc32(context.encode()) % HELD_OUT_MODULUS == 0


def _add(rng: random.Random) -> Item:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    prompt = f"{a}+{b}="
    return Item("add", prompt, f"{a + b:03d}"[::-1], context=prompt)


def _copy(rng: random.Random) -> Item:
    word = "".join(rng.choice(LETTERS) for _ in range(WORD_LENGTH))
    prompt = f"cpy {word}="
    return Item("copy", prompt, word, context=prompt)


def _queries(context: str, answers: dict[str, str], rng: random.Random, kind: str) -> Item:
    """An item on `context` whose queries (keys of `answers`) come in random order."""
    order = rng.sample(list(answers), len(answers))
    first, rest = order[0], order[1:]
    more = "".join(f";{q}={answers[q]}" for q in rest)
    return Item(kind, f"{context}{first}=", answers[first], context=context, more=more)


def _shift(rng: random.Random) -> Item:
    word = "".join(rng.choice(LETTERS) for _ in range(WORD_LENGTH))
    prompt = f"nxt {word}="
    return Item("shift", prompt, "".join(_next_letter(c) for c in word), context=prompt)


def _minmax(rng: random.Random) -> Item:
    digits = "".join(rng.choice(string.digits) for _ in range(MINMAX_DIGITS))
    return _queries(f"dig {digits}:", {"max": max(digits), "min": min(digits)}, rng, "minmax")


_MAKERS: dict[str, Callable[[random.Random], Item]] = {
    "add": _add,
    "copy": _copy,
    "shift": _shift,
    "minmax": _minmax,
}
assert set(_MAKERS) == set(KINDS), (set(_MAKERS), KINDS)


def make_item(kind: str, rng: random.Random) -> Item:
    """One random item of `kind` (held out or not)."""
    if kind not in _MAKERS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    return _MAKERS[kind](rng)


def training_items(rng: random.Random, n: int, mix: tuple[str, ...] = KINDS) -> list[Item]:
    """`n` items for training, kinds drawn from `mix` (a kind listed twice comes twice as
    often), held-out contexts redrawn."""
    items = []
    while len(items) < n:
        item = make_item(rng.choice(mix), rng)
        if not is_held_out(item.context):
            items.append(item)
    return items


def held_out_items(kind: str, n: int, seed: int) -> list[Item]:
    """`n` distinct held-out items of `kind`, the same for the same `seed`."""
    rng = random.Random(f"held-out {kind} {seed}")
    items: dict[str, Item] = {}
    for _ in range(1000 * n):  # a bound, should a kind have few held-out prompts
        if len(items) == n:
            break
        item = make_item(kind, rng)
        if is_held_out(item.context):
            items.setdefault(item.prompt, item)
    if len(items) < n:
        raise ValueError(f"found only {len(items)} distinct held-out {kind} items, not {n}")
    return list(items.values())


def _add_distractors(item: Item, rng: random.Random) -> list[str]:
    gold = int(item.answer[::-1])
    near = (gold + d for d in (-100, -10, -1, 1, 10, 100))
    return [f"{n:03d}"[::-1] for n in near if 0 <= n <= 999]


def _next_letter(letter: str) -> str:
    return LETTERS[(LETTERS.index(letter) + 1) % len(LETTERS)]


def _letters_distractors(item: Item, rng: random.Random) -> list[str]:
    word = item.answer
    swapped = [word[:i] + word[i + 1] + word[i] + word[i + 2 :] for i in range(len(word) - 1)]
    shifted = [word[:i] + _next_letter(word[i]) + word[i + 1 :] for i in range(len(word))]
    return [word[::-1], *swapped, *shifted]


def _minmax_distractors(item: Item, rng: random.Random) -> list[str]:
    digits = item.context.removeprefix("dig ").removesuffix(":")
    return sorted(set(digits)) + [str((int(item.answer) + d) % 10) for d in (1, 2, 3)]


_DISTRACTORS: dict[str, Callable[[Item, random.Random], list[str]]] = {
    "add": _add_distractors,
    "copy": _letters_distractors,
    "shift": _letters_distractors,
    "minmax": _minmax_distractors,
}
assert set(_DISTRACTORS) == set(KINDS), (set(_DISTRACTORS), KINDS)

NUM_CHOICES = 4


def multiple_choice(item: Item, rng: random.Random) -> tuple[list[str], int]:
    """`NUM_CHOICES` distinct answers for `item`, the right one at a random place.

    Returns `(choices, label)`: `choices[label] == item.answer`. The wrong answers are
    near misses of the same kind: off by one, ten or a hundred; two letters swapped or
    one shifted; another value of the same prompt; a count off by one to three. None is a
    prefix of the right answer or starts with it (a prefix never scores below the answer
    it starts)."""
    wrong = sorted(
        {
            w
            for w in _DISTRACTORS[item.kind](item, rng)
            if not (w.startswith(item.answer) or item.answer.startswith(w))
        }
    )
    if len(wrong) < NUM_CHOICES - 1:
        raise ValueError(f"only {len(wrong)} distractors for {item}")
    choices = rng.sample(wrong, NUM_CHOICES - 1)
    label = rng.randrange(NUM_CHOICES)
    choices.insert(label, item.answer)
    return choices, label


# --------------------------------------------------------------------------- #
# The lm-eval data (lm_eval_tasks/data/*.jsonl)
# --------------------------------------------------------------------------- #

EVAL_ITEMS_PER_TASK = 200
MC_ITEMS_PER_KIND = 50
TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
DATA_DIR = TASKS_DIR / "data"


def generation_rows(kind: str) -> list[dict[str, str]]:
    """The rows of `data/{kind}.jsonl`: held-out items (seed 0), `{"prompt", "answer"}`."""
    return [
        {"prompt": it.prompt, "answer": it.answer}
        for it in held_out_items(kind, EVAL_ITEMS_PER_TASK, seed=0)
    ]


def multiple_choice_rows() -> list[dict[str, Any]]:
    """The rows of `data/mc.jsonl`: `MC_ITEMS_PER_KIND` held-out items (seed 2) of every
    kind, `{"kind", "prompt", "choices", "label"}`."""
    rng = random.Random("multiple choice")
    rows = []
    for kind in KINDS:
        for it in held_out_items(kind, MC_ITEMS_PER_KIND, seed=2):
            choices, label = multiple_choice(it, rng)
            rows.append({"kind": kind, "prompt": it.prompt, "choices": choices, "label": label})
    return rows


def task_data() -> dict[str, list[dict[str, Any]]]:
    """File name -> rows, for every file under `data/`."""
    files: dict[str, list[dict[str, Any]]] = {f"{k}.jsonl": generation_rows(k) for k in KINDS}
    files["mc.jsonl"] = multiple_choice_rows()
    return files


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def write_task_data(data_dir: Path = DATA_DIR) -> None:
    """(Re)write the lm-eval data files; the committed files are this function's output."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in task_data().items():
        (data_dir / name).write_text(jsonl(rows))


if __name__ == "__main__":
    write_task_data()
    print(f"wrote {sorted(task_data())} to {DATA_DIR}")
