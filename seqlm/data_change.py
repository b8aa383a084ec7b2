"""What changed in the corpus since the last run, for a source that may change
(`download.checksum: null`): its size, the characters new or gone, and how far the character and
word unigram and bigram distributions moved (Jensen-Shannon divergence).

Everything is read from the n-gram tables the ngrams stage writes (`data/ngrams/<level>_<n>
.parquet`: columns token_1..token_n, count, rank). When a run starts, the tables of the last run
are kept aside by hard links (`.seqlm/previous-ngrams/`, no copy: the stage replaces its files,
the links keep the old ones); when the run's ngrams stage has written new ones, the two are
compared. A run whose ngrams stage was cached compares nothing: its corpus did not change.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seqlm.stages import NGRAMS

PREVIOUS = Path(".seqlm/previous-ngrams")
TABLES = (("char", 1), ("char", 2), ("word", 1), ("word", 2))
SHOWN_CHARS = 20                  # characters listed by name in the summary line


def keep_previous(tables: Path = Path(NGRAMS), kept: Path = PREVIOUS) -> bool:
    """Keep the current n-gram tables aside (hard links, or copies across file systems) for the
    comparison after this run's ngrams stage; False when there are none to keep."""
    present = [table_file(tables, level, n) for level, n in TABLES
               if table_file(tables, level, n).is_file()]
    if not present:
        shutil.rmtree(kept, ignore_errors=True)
        return False
    kept.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(dir=kept.parent, prefix=f".{kept.name}-"))
    for path in present:
        try:
            os.link(path, fresh / path.name)
        except OSError:
            shutil.copy2(path, fresh / path.name)
    old = kept.with_name(f".{kept.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        kept.rename(old)
    fresh.rename(kept)
    shutil.rmtree(old, ignore_errors=True)
    return True


def table_file(folder: Path, level: str, n: int) -> Path:
    return folder / f"{level}_{n}.parquet"


def describe(previous: Path = PREVIOUS, current: Path = Path(NGRAMS)) -> dict[str, Any] | None:
    """What changed from the tables in `previous` to those in `current`; None when nothing did
    (or there is nothing to compare)."""
    if not table_file(previous, "char", 1).is_file() or not table_file(current, "char", 1).is_file():
        return None
    before, after = _counts(previous, "char", 1), _counts(current, "char", 1)
    old_chars, new_chars = set(before[0]), set(after[0])
    change: dict[str, Any] = {
        "chars_before": int(before[1].sum()), "chars_after": int(after[1].sum()),
        "chars_new": sorted(new_chars - old_chars), "chars_gone": sorted(old_chars - new_chars),
    }
    if table_file(previous, "word", 1).is_file() and table_file(current, "word", 1).is_file():
        change["words_before"] = int(_counts(previous, "word", 1)[1].sum())
        change["words_after"] = int(_counts(current, "word", 1)[1].sum())
    divergence = {}
    for level, n in TABLES:
        if table_file(previous, level, n).is_file() and table_file(current, level, n).is_file():
            divergence[f"{level}_{n}"] = jensen_shannon(table_file(previous, level, n),
                                                        table_file(current, level, n))
    change["jensen_shannon_bits"] = divergence
    moved = any(value > 0 for value in divergence.values())
    if not moved and change["chars_before"] == change["chars_after"] and \
            change.get("words_before") == change.get("words_after"):
        return None
    return change


def _counts(folder: Path, level: str, n: int) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(table_file(folder, level, n), columns=["token_1", "count"])
    return table.column("token_1").to_pylist(), table.column("count").to_numpy()


def jensen_shannon(before: Path, after: Path) -> float:
    """Jensen-Shannon divergence, in bits (0: the same distribution, 1: nothing in common), of
    the n-gram distributions of two tables (count / total, over the n-grams of either)."""
    tokens = [name for name in pq.read_schema(before).names if name.startswith("token_")]
    old = pq.read_table(before, columns=[*tokens, "count"]).rename_columns([*tokens, "p"])
    new = pq.read_table(after, columns=[*tokens, "count"]).rename_columns([*tokens, "q"])
    both = old.join(new, keys=tokens, join_type="full outer")
    p = _distribution(both.column("p"))
    q = _distribution(both.column("q"))
    m = (p + q) / 2
    return max(0.0, float((_kl_terms(p, m) + _kl_terms(q, m)) / 2))


def _distribution(counts: pa.ChunkedArray) -> np.ndarray:
    values = pc.fill_null(counts, 0).to_numpy().astype(np.float64)
    total = values.sum()
    return values / total if total else values


def _kl_terms(p: np.ndarray, m: np.ndarray) -> float:
    """sum p log2(p / m) over p > 0 (m >= p / 2 > 0 there)."""
    nonzero = p > 0
    return float(np.sum(p[nonzero] * np.log2(p[nonzero] / m[nonzero])))


def metrics(change: dict[str, Any]) -> dict[str, float]:
    """The numbers of a change, as MLflow metrics of the pipeline run."""
    out = {f"data_change.{key}": float(change[key]) for key in
           ("chars_before", "chars_after", "words_before", "words_after") if key in change}
    out["data_change.chars_new"] = float(len(change["chars_new"]))
    out["data_change.chars_gone"] = float(len(change["chars_gone"]))
    out.update({f"data_change.jsd_{name}": value
                for name, value in change["jensen_shannon_bits"].items()})
    return out


def summary(change: dict[str, Any]) -> str:
    """One line for a person: 'corpus changed: 170,580 -> 171,202 characters (+0.36%), ...'."""
    parts = [f"{_sized(change['chars_before'], change['chars_after'])} characters"]
    if "words_before" in change:
        parts.append(f"{_sized(change['words_before'], change['words_after'])} words")
    parts.append(f"characters new: {_chars(change['chars_new'])}, gone: "
                 f"{_chars(change['chars_gone'])}")
    names = {"char_1": "char unigrams", "char_2": "char bigrams", "word_1": "word unigrams",
             "word_2": "word bigrams"}
    divergence = ", ".join(f"{names[name]} {value:.4g}"
                           for name, value in change["jensen_shannon_bits"].items())
    if divergence:
        parts.append(f"Jensen-Shannon divergence (bits, 0 to 1): {divergence}")
    return "corpus changed: " + "; ".join(parts)


def _sized(before: int, after: int) -> str:
    if before == after:
        return f"{after:,} (unchanged)"
    relative = f" ({(after - before) / before:+.2%})" if before else ""
    return f"{before:,} -> {after:,}{relative}"


def _chars(chars: list[str]) -> str:
    if not chars:
        return "none"
    shown = " ".join(repr(c) for c in chars[:SHOWN_CHARS])
    return shown + (f" and {len(chars) - SHOWN_CHARS} more" if len(chars) > SHOWN_CHARS else "")
