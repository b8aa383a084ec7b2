"""N-gram counting at scale on two corpora, with collections.Counter (the seed's way) over the
same tokens; for the book corpus also the streamed preprocess stage against the previous
in-memory one.

- zipf (the realistic corpus): a generated text whose words are drawn by Zipf's law over a
  million spellings (--words) with letters beyond ASCII (accents, Greek, Cyrillic), written with
  what preprocess writes for it when it keeps every character (clean: none): word ids int32 up
  to 10**6, character ids uint16 over ~175 symbols. Generated once per size and seed into
  bench/corpora/ (git-ignored), deterministically.
- book: the shipped corpus repeated with variation up to --size: every repetition shuffles the
  order of the lines and the words within each line (deterministic seed), so the vocabulary stays
  the book's (4,580 words, 28 characters) while the number of distinct n-grams grows with size.

Every step runs in a fresh process in a repository-like folder (params.yaml, data/...) and
reports the seconds of its work and its peak RSS (getrusage ru_maxrss). "above idle" subtracts
the peak of a process that only imports the same modules (Prefect alone is ~300 MB). The load
average of the machine is printed beside every figure (the machine may be shared).

    python bench/ngrams.py --size 5MB --max-n 5
    python bench/ngrams.py --size 100MB --max-n 5 --out bench/results/ngrams-cpu-2core.txt
    python bench/ngrams.py --size 1GB --max-n 5 --partitions 32 --skip-single \
        --out bench/results/ngrams-1GB-cpu-2core.txt
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

import numpy as np
import numpy.lib.format as npy_format
import yaml

from seqlm.ngrams import count_ngrams, unpack
from seqlm.text import TOKENIZERS, Vocab

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "mirror" / "timemachine.txt"
RAW, PROCESSED = Path("data/raw/timemachine.txt"), Path("data/processed")   # the stages' paths
PREVIOUS = Path("previous")                  # where the previous preprocess writes its outputs
IN_MEMORY_MAX = 200e6        # the previous preprocess needs ~34x the file in RAM: skipped above


def generate(size: int, path: Path, seed: int = 0) -> int:
    """Write ~size bytes (whole repetitions) of the shipped corpus with shuffled lines and words."""
    lines = [line.split() for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    lines = [words for words in lines if words]
    words = np.array([w for line in lines for w in line], dtype=object)
    lengths = np.array([len(line) for line in lines])
    line_of = np.repeat(np.arange(len(lines)), lengths)
    written, rep = 0, 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < size:
            rng = np.random.default_rng([seed, rep])
            new_line = rng.permutation(len(lines))        # where each line goes
            order = np.lexsort((rng.random(len(words)), new_line[line_of]))
            sep = np.full(len(words), " ", dtype=object)
            sep[np.cumsum(lengths[np.argsort(new_line)]) - 1] = "\n"
            written += handle.write("".join(chain.from_iterable(zip(words[order], sep))))
            rep += 1
    return path.stat().st_size


# -- the realistic corpus: Zipf's law over a million words, beyond ASCII --------------------------

CORPORA = Path(__file__).resolve().parent / "corpora"      # generated corpora (ignores itself)
GENERATOR_VERSION = 1        # part of a corpus's manifest: a change regenerates it
# The letters words are spelled with, by script, and each script's share of the letters: mostly
# ASCII, as in English text, with the accents, Greek and Cyrillic of quoted names and words.
SCRIPTS = [("abcdefghijklmnopqrstuvwxyz", 0.86), ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 0.03),
           ("àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿœšžłńśźżčřůőűğış", 0.06),
           ("αβγδεζηθικλμνξοπρστυφχψωάέήίόύώ", 0.02), ("абвгдежзийклмнопрстуфхцчшщъыьэюяё", 0.02),
           ("0123456789'-", 0.01)]
WORDS_PER_LINE = 12          # a line break after a word with probability 1/12
GENERATE_TOKENS = 4_000_000  # tokens drawn at a time


def zipf_spellings(words: int, rng: np.random.Generator) -> list[str]:
    """`words` distinct spellings, by frequency rank: short for frequent words, ~2.5 + ln(rank)/2
    letters on average, as in text."""
    letters = np.array(list("".join(chars for chars, _ in SCRIPTS)))
    weights = np.concatenate([np.full(len(chars), share / len(chars)) for chars, share in SCRIPTS])
    ranks = np.arange(1, words + 1)
    lengths = np.clip(np.rint(2.5 + 0.5 * np.log(ranks) + rng.normal(0, 1.2, words)), 1, 20)
    drawn = "".join(rng.choice(letters, size=int(lengths.sum()), p=weights / weights.sum()))
    ends = np.cumsum(lengths.astype(np.int64)).tolist()
    spellings, seen = [], set()
    for start, end in zip([0, *ends[:-1]], ends):
        word = drawn[start:end]
        while word in seen:                  # a short word drawn twice: lengthen the second
            word += letters[rng.integers(0, 26)]
        seen.add(word)
        spellings.append(word)
    return spellings


def generate_zipf(size: int, words: int = 1_000_000, exponent: float = 1.0, seed: int = 0,
                  folder: Path | None = None) -> Path:
    """A text of ~`size` UTF-8 bytes whose words are drawn independently by Zipf's law
    (frequency ~ rank**-exponent) over `words` spellings, lines of ~WORDS_PER_LINE words, and
    what preprocess writes for it with every character kept (clean: none): the vocabularies and
    the id arrays (words int32, characters uint16) in `folder`/data/processed, besides
    `folder`/text.txt. Deterministic (seeded); a folder whose manifest matches is reused.

    Independent words are the hard case for counting: text repeats its phrases, so it has fewer
    distinct n-grams per token than this corpus (every 4- and 5-gram here is all but unique)."""
    manifest = {"generator": GENERATOR_VERSION, "size": size, "words": words,
                "exponent": exponent, "seed": seed}
    if folder is None:
        folder = CORPORA / f"zipf-{size}-{words}w-s{exponent:g}-seed{seed}"
        CORPORA.mkdir(exist_ok=True)
        (CORPORA / ".gitignore").write_text("# generated by bench/ngrams.py\n*\n")
    if (folder / "manifest.json").is_file() and \
            json.loads((folder / "manifest.json").read_text()).get("params") == manifest:
        return folder
    processed = folder / PROCESSED
    processed.mkdir(parents=True, exist_ok=True)
    spellings = zipf_spellings(words, np.random.default_rng([seed, 0]))
    encoded = [word.encode() for word in spellings]
    cdf = np.cumsum(np.arange(1, words + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    # Characters: the symbols of the spellings, then " " and "\n".
    symbols = sorted(set("".join(spellings))) + [" ", "\n"]
    symbol_of = {c: i for i, c in enumerate(symbols)}
    char_flat = np.array([symbol_of[c] for c in "".join(spellings)], dtype=np.uint16)
    char_offsets = np.r_[0, np.cumsum([len(w) for w in spellings])]
    byte_offsets = np.r_[0, np.cumsum([len(b) for b in encoded])]
    byte_flat = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    # Pass 1: the text, and the tokens as ranks and symbols (temporary files), with the counts
    # and first appearances the vocabularies are ordered by.
    word_counts, word_first = np.zeros(words, np.int64), np.full(words, -1, np.int64)
    char_counts, char_first = np.zeros(len(symbols), np.int64), np.full(len(symbols), -1, np.int64)
    written = tokens = chars = 0
    with open(folder / "text.txt", "wb") as text, open(folder / "ranks.tmp", "wb") as ranks_out, \
            open(folder / "chars.tmp", "wb") as chars_out:
        for block in range(1 << 40):
            if written >= size:
                break
            rng = np.random.default_rng([seed, 1, block])
            draw = min(GENERATE_TOKENS, size // 2 + 1000)     # a token takes >= 2 bytes
            ranks = np.searchsorted(cdf, rng.random(draw))
            newline = rng.random(draw) < 1 / WORDS_PER_LINE
            nbytes = byte_offsets[ranks + 1] - byte_offsets[ranks] + 1
            keep = int(np.searchsorted(np.cumsum(nbytes), size - written)) + 1
            ranks, newline, nbytes = ranks[:keep], newline[:keep], nbytes[:keep]
            data = _ragged(byte_flat, byte_offsets, ranks, np.where(newline, 10, 32))
            symbols_of = _ragged(char_flat, char_offsets, ranks,
                                 np.where(newline, len(symbols) - 1, len(symbols) - 2))
            text.write(data.tobytes())
            ranks_out.write(ranks.astype(np.int32).tobytes())
            chars_out.write(symbols_of.tobytes())
            for counts, first, values, offset in ((word_counts, word_first, ranks, tokens),
                                                  (char_counts, char_first, symbols_of, chars)):
                counts += np.bincount(values, minlength=len(counts))
                new, at = np.unique(values, return_index=True)
                fresh = first[new] < 0
                first[new[fresh]] = at[fresh] + offset
            written, tokens, chars = written + len(data), tokens + len(ranks), \
                chars + len(symbols_of)

    # The vocabularies (frequency order, ties by first appearance), then pass 2: the ids.
    id_of = {}
    for level, names, counts, first in (("word", spellings, word_counts, word_first),
                                        ("char", symbols, char_counts, char_first)):
        seen = np.flatnonzero(counts)
        seen = seen[np.argsort(first[seen], kind="stable")]
        vocab = Vocab({names[i]: int(counts[i]) for i in seen})
        vocab.save(processed / f"vocab_{level}.parquet")
        id_of[level] = np.array([vocab.token_to_idx.get(name, 0) for name in names],
                                dtype=np.int32 if level == "word" else np.uint16)
    for level, tmp, dtype, count in (("word", "ranks.tmp", np.int32, tokens),
                                     ("char", "chars.tmp", np.uint16, chars)):
        with open(folder / tmp, "rb") as source, \
                open(processed / f"corpus_{level}.npy", "wb") as out:
            npy_format.write_array_header_1_0(out, {"descr": npy_format.dtype_to_descr(
                np.dtype(dtype)), "fortran_order": False, "shape": (count,)})
            source_dtype = np.int32 if level == "word" else np.uint16
            while len(block := np.fromfile(source, source_dtype, count=1 << 24)):
                out.write(id_of[level][block].tobytes())
        (folder / tmp).unlink()
    (folder / "manifest.json").write_text(json.dumps(
        {"params": manifest, "bytes": written, "words": tokens, "chars": chars,
         "distinct_words": int(np.count_nonzero(word_counts)), "symbols": len(symbols)},
        indent=1))
    return folder


def _ragged(flat: np.ndarray, offsets: np.ndarray, items: np.ndarray,
            separators: np.ndarray) -> np.ndarray:
    """The pieces flat[offsets[i]:offsets[i + 1]] of the items, each followed by its separator."""
    lengths = offsets[items + 1] - offsets[items] + 1
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=flat.dtype)
    index = np.arange(len(out), dtype=np.int64) - np.repeat(ends - lengths - offsets[items],
                                                              lengths)
    out[:] = flat[np.minimum(index, len(flat) - 1)]
    out[ends - 1] = separators
    return out


# -- the steps, each run in its own process (cwd: the work folder) ------------------------------

def step_preprocess() -> dict:
    """The preprocess stage (tasks/preprocess.py), as `seqlm stage preprocess` runs it."""
    from seqlm.params import load_params
    from tasks.preprocess import preprocess
    start = time.perf_counter()
    preprocess.fn(load_params())
    seconds = time.perf_counter() - start
    vocabs = {level: Vocab.load(PROCESSED / f"vocab_{level}.parquet") for level in TOKENIZERS}
    return {"s": seconds, "vocab": {lv: len(v) for lv, v in vocabs.items()},
            "tokens": {lv: sum(f for _, f in v.token_freqs) for lv, v in vocabs.items()}}


def step_previous_preprocess() -> dict:
    """The previous stage, faithfully: the whole file, its lines, token lists and a Python
    vocabulary walk in memory; then the same outputs, compared with the streamed ones."""
    start = time.perf_counter()
    text = RAW.read_bytes().decode("utf-8")
    raw = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if raw[-1] == "":
        raw.pop()
    lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in raw]
    PREVIOUS.mkdir(exist_ok=True)
    (PREVIOUS / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for level in TOKENIZERS:
        tokens = [line.split() if level == "word" else list(line) for line in lines]
        vocab = Vocab(tokens)
        vocab.save(PREVIOUS / f"vocab_{level}.parquet")
        np.save(PREVIOUS / f"corpus_{level}.npy",
                np.asarray([vocab[tok] for line in tokens for tok in line], dtype=np.int32))
        del tokens
    seconds = time.perf_counter() - start
    same = all(file_digest(PREVIOUS / path.name) == file_digest(path)
               for path in PROCESSED.iterdir())
    return {"s": seconds, "identical": same}


def step_stage_ngrams() -> dict:
    """The ngrams stage in one task (tasks/ngrams.py, shard_tokens null): counting both levels,
    ranking, Parquet, Zipf plot."""
    from seqlm.params import load_params
    from tasks.ngrams import ngrams
    params = load_params()
    start = time.perf_counter()
    ngrams.fn(params.model_copy(update={"ngrams": params.ngrams.model_copy(
        update={"shard_tokens": None})}))
    return {"s": time.perf_counter() - start, "outputs": outputs_digest()}


def load(level: str) -> tuple[Path, np.ndarray, int]:
    path = PROCESSED / f"corpus_{level}.npy"
    return path, np.load(path, mmap_mode="r"), len(Vocab.load(PROCESSED / f"vocab_{level}.parquet"))


def _task(name: str, *args: object) -> tuple[object, float, float, float]:
    """Run the stage task `name` (tasks/ngrams.py, its function without Prefect) where this is
    called: (its result, seconds, peak RSS of the process that ran it, CPU seconds of that
    process meanwhile: the task's own where the process runs one task at a time)."""
    import tasks.ngrams
    began, cpu = time.perf_counter(), cpu_seconds()
    result = getattr(tasks.ngrams, name).fn(*args)
    return result, time.perf_counter() - began, peak_mb(), cpu_seconds() - cpu


def step_sharded(runner: str, workers: int) -> dict:
    """The sharded ngrams stage as the flow runs it (ngrams.shard_tokens set): the ngrams_shard
    tasks, the ngrams_reduce tasks, then the ngrams task merging the partitions into the Parquet
    tables, each phase waiting for the previous. `local`: Prefect's local runner, i.e. threads
    of this process (as many as `workers`); `dask`: a distributed.LocalCluster of `workers`
    worker processes with one thread each (the flow's Dask runner), every task on a worker."""
    from seqlm.params import load_params
    from tasks.ngrams import shard_plan
    params = load_params()
    plan, partitions = shard_plan(params), params.ngrams.partitions
    phases: dict[str, float] = {}
    phases_cpu: dict[str, float] = {}
    peaks: list[float] = []
    phase_peaks: dict[str, float] = {}     # the local runner's peak only grows: see where it does
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if runner == "local":
            pool = stack.enter_context(cf.ThreadPoolExecutor(workers))

            def run_all(calls: list[tuple]) -> list:
                return [f.result() for f in [pool.submit(_task, *call) for call in calls]]
        else:
            from distributed import Client, LocalCluster
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None))
            client = stack.enter_context(Client(cluster))

            def run_all(calls: list[tuple]) -> list:
                return client.gather([client.submit(_task, *call, pure=False) for call in calls])

        def phase(name: str, calls: list[tuple]) -> list:
            began, cpu = time.perf_counter(), cpu_seconds()
            results = run_all(calls)
            phases[name] = time.perf_counter() - began
            # Local: the tasks share this process; Dask: each worker runs one task at a time.
            phases_cpu[name] = cpu_seconds() - cpu if runner == "local" else \
                sum(task_cpu for *_, task_cpu in results)
            peaks.extend(peak for _, _, peak, _ in results)
            phase_peaks[name] = max((peak for _, _, peak, _ in results), default=0.0)
            return [result for result, *_ in results]

        partials = {level: phase(f"map {level}", [("ngrams_shard", params, level, a, b)
                                                   for a, b in bounds])
                    for level, bounds in plan.items()}
        reduced = {level: phase(f"reduce {level}", [("ngrams_reduce", level, p, paths)
                                                     for p in range(partitions)])
                   for level, paths in partials.items()}
        phase("merge + Parquet", [("ngrams", params, reduced)])
    return {"s": time.perf_counter() - start, "phases": phases, "phases_cpu": phases_cpu,
            "phase_peaks": phase_peaks,
            "tasks": sum(map(len, plan.values())) + 2 * partitions + 1,
            "shards": {level: len(bounds) for level, bounds in plan.items()},
            "task_peak_mb": max(peaks), "outputs": outputs_digest()}


def step_counter(level: str, max_n: int, tokens: int, chunk_tokens: int) -> dict:
    """collections.Counter of n-tuples (the seed's count) vs count_ngrams on the same prefix,
    with the stage's chunks and as one shard (after an untimed warm-up run); then the tables
    compared whole: the same n-grams with the same counts, in the same order of first appearance
    (Counter keeps insertion order), which fixes the ranking (count, then first appearance)."""
    _, ids, vocab_size = load(level)
    prefix = np.array(ids[:tokens])
    ours_s = {}
    # One untimed run first: the process's first large arrays page-fault fresh memory, which
    # later runs reuse (glibc keeps it), so the first timed way would pay for both.
    count_ngrams(prefix, max_n, vocab_size, chunk_tokens)
    for name, chunk in (("chunked", chunk_tokens), ("one_shard", len(prefix))):
        runs = []
        for _ in range(3):               # the median of 3: this machine's load varies
            start = time.perf_counter()
            ours = count_ngrams(prefix, max_n, vocab_size, chunk)
            runs.append(time.perf_counter() - start)
        ours_s[name] = sorted(runs)[1]
    listed, counter_s, equal = prefix.tolist(), {}, True
    for n in range(1, max_n + 1):
        start = time.perf_counter()
        counter = collections.Counter(zip(*(listed[j:len(listed) - n + 1 + j] for j in range(n))))
        counter_s[n] = time.perf_counter() - start
        table = ours.pop(n)
        table = table.take(np.argsort(table.first))              # by first appearance
        grams = np.fromiter(chain.from_iterable(counter), np.int64, len(counter) * n)
        equal &= len(counter) == len(table) and np.array_equal(
            np.fromiter(counter.values(), np.int64, len(counter)), table.counts) and \
            np.array_equal(grams.reshape(-1, n), unpack(table.keys, n, vocab_size))
        del counter, grams, table
    return {"tokens": len(prefix), "ours_s": ours_s, "counter_s": counter_s, "equal": equal}


def step_generate_zipf(size: int, words: int, exponent: str, seed: int) -> dict:
    """generate_zipf in a process of its own: the bench's process stays small, and the peak RSS
    a later step reports is its own (a child starts from its parent's high-water mark)."""
    start = time.perf_counter()
    folder = generate_zipf(size, words, float(exponent), seed)
    return {"folder": str(folder), "s": time.perf_counter() - start}


def step_idle(stages: str) -> dict:
    if stages == "stages":
        import tasks.ngrams, tasks.preprocess  # noqa: E401, F401  (Prefect and the stages)
    return {}


STEPS = {"idle": step_idle, "preprocess": step_preprocess, "previous": step_previous_preprocess,
         "stage-ngrams": step_stage_ngrams, "sharded": step_sharded,
         "counter": step_counter, "generate-zipf": step_generate_zipf}


# -- helpers -------------------------------------------------------------------------------------

def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the Dask workers):
    what a step costs whatever else the machine runs."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def outputs_digest() -> str:
    """One digest of the stage's outputs (data/ngrams and reports/ngrams.json)."""
    files = sorted(Path("data/ngrams").iterdir()) + [Path("reports/ngrams.json")]
    return hashlib.sha256("".join(f"{f.name}:{file_digest(f)}" for f in files).encode()
                          ).hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_step(work: Path, *args: object) -> dict:
    """Run a step in a fresh interpreter in `work`; its last output line is its JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--step", *map(str, args)], cwd=work,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"step {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_size(text: str) -> int:
    number, unit = re.fullmatch(r"([\d.]+)\s*([KMG]?B)?", text.upper()).groups()
    return int(float(number) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}.get(unit or "B", 1))


def machine() -> str:
    """The CPU (with its family and model: machines of one name differ in speed), the cores,
    memory, kernel and the libraries that count."""
    from main_job import cpu_name
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"machine: {cpu_name()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, Linux "
            f"{platform.release()}, {platform.machine()}, Python {platform.python_version()}, "
            f"numpy {np.__version__}")


def load_average() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


class Report:
    """The lines printed, kept for --out."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def row(self, label: str, result: dict, base: float, nbytes: int, extra: str = "") -> None:
        above = result["peak_mb"] - base
        self(f"{label:44s} {result['s']:7.1f} {result['cpu_s']:7.1f} {result['peak_mb']:8.0f} "
             f"{above:11.0f} {above * 1e6 / nbytes:11.2f}x   {result['load']}{extra}")


def timed_step(work: Path, *args: object) -> dict:
    """run_step with the load average when it ended (over its last minute)."""
    result = run_step(work, *args)
    result["load"] = load_average()
    return result


def prepare_zipf(args: argparse.Namespace, work: Path, say: Report) -> int:
    """The realistic corpus, generated (or reused) under bench/corpora; its preprocessed files
    linked into the work folder. Returns its size in bytes."""
    made = run_step(work, "generate-zipf", parse_size(args.size), args.words,
                    repr(args.zipf_exponent), args.seed)
    folder = Path(made["folder"])
    facts = json.loads((folder / "manifest.json").read_text())
    say(f"corpus: {facts['bytes'] / 1e6:.1f} MB of UTF-8 text, words drawn independently by "
        f"Zipf's law (exponent {args.zipf_exponent:g}) over {args.words:,} spellings, seed "
        f"{args.seed} ({folder.relative_to(REPO)}, generated or found in {made['s']:.0f} s)")
    (work / PROCESSED).parent.mkdir(parents=True, exist_ok=True)
    (work / PROCESSED).symlink_to(folder / PROCESSED)
    say(f"corpus: {facts['chars']:,} characters, {facts['words']:,} words; vocabularies "
        f"{facts['symbols'] + 1} characters, {facts['distinct_words'] + 1:,} words (with <unk>); "
        "ids as preprocess writes them keeping every character: words int32, characters uint16")
    return facts["bytes"]


def prepare_book(args: argparse.Namespace, work: Path, say: Report, idle: float,
                 idle_stages: float) -> int:
    """The book corpus generated into the work folder and preprocessed (the rows of the streamed
    and the previous preprocess). Returns its size in bytes."""
    start = time.perf_counter()
    nbytes = generate(parse_size(args.size), work / RAW)
    say(f"corpus: {nbytes / 1e6:.1f} MB, the shipped book with its lines and words shuffled, "
        f"generated in {time.perf_counter() - start:.0f} s")
    pre = timed_step(work, "preprocess")
    tokens, vocab = pre["tokens"], pre["vocab"]
    say(f"corpus: {tokens['char']:,} characters, {tokens['word']:,} words; vocabularies "
        f"{vocab['char']} characters, {vocab['word']:,} words")
    header(say)
    say.row("preprocess, streamed in two passes", pre, idle_stages, nbytes)
    if nbytes <= IN_MEMORY_MAX:
        old = timed_step(work, "previous")
        say.row("preprocess, previous (in memory)", old, idle, nbytes,
                f"   outputs byte-identical: {old['identical']}")
    else:
        say(f"preprocess, previous (in memory): skipped above {IN_MEMORY_MAX / 1e6:.0f} MB "
            f"(~34x the file in RAM)")
    return nbytes


def header(say: Report) -> None:
    say("(s: wall seconds; cpu s: user + system seconds of the step's processes, the Dask "
        "workers included, which the machine's load does not inflate; peak MB: the peak RSS of "
        "the step's process)")
    say(f"{'stage':44s} {'s':>7s} {'cpu s':>7s} {'peak MB':>8s} {'above idle':>11s} "
        f"{'/ file size':>12s}   load average after (1, 5, 15 min)")


def ngram_rows(args: argparse.Namespace, work: Path, say: Report, nbytes: int, idle: float,
               idle_stages: float) -> None:
    """The ngrams stage in one task, sharded on the local runner and on Dask; the outputs
    compared; then Counter against count_ngrams on the first tokens."""
    outputs = {}
    if args.skip_single:
        say("ngrams in one task: skipped (--skip-single; it holds every distinct n-gram)")
    else:
        single = timed_step(work, "stage-ngrams")
        outputs["one task"] = single["outputs"]
        say.row(f"ngrams in one task (n = 1..{args.max_n}, word + char)", single, idle_stages,
                nbytes)
    for runner in args.runners:
        result = timed_step(work, "sharded", runner, args.workers)
        outputs[runner] = result["outputs"]
        label = (f"ngrams sharded, local runner ({args.workers} threads)" if runner == "local"
                 else f"ngrams sharded, Dask ({args.workers} workers)")
        say.row(label, result, idle_stages if runner == "local" else idle, nbytes,
                f"   {result['tasks']} tasks, task peak {result['task_peak_mb']:.0f} MB"
                + (" (every worker)" if runner == "dask" else ""))
        say("  phases, s (cpu s, task peak so far): " + ", ".join(
            f"{name} {sec:.1f} ({result['phases_cpu'][name]:.1f}, "
            f"{result['phase_peaks'][name]:.0f} MB)" for name, sec in result["phases"].items()))
    say(f"(shards of {args.shard_tokens:,} tokens: {result['shards']['word']} word + "
        f"{result['shards']['char']} char; {args.partitions} partitions per level; the Dask "
        f"row's peak is the client's, which holds the scheduler)")
    say(f"outputs (data/ngrams, reports/ngrams.json) identical: "
        f"{len(set(outputs.values())) == 1} ({', '.join(outputs)})")
    report_json = json.loads((work / "reports" / "ngrams.json").read_text())
    for level in ("word", "char"):
        distinct = [report_json[f"{level}_{n}_distinct"] for n in range(1, args.max_n + 1)]
        say(f"distinct {level} n-grams: " + ", ".join(
            f"{n}: {d:,}" for n, d in enumerate(distinct, start=1)) + f" (total {sum(distinct):,})")
    say()

    say(f"collections.Counter of n-tuples (the seed's count) vs count_ngrams, n = 1.."
        f"{args.max_n}, same tokens: the first {args.counter_tokens:,} of each level (Counter "
        f"on all of them would take minutes and GBs). Ours in chunks of "
        f"{args.chunk_tokens:,} tokens as the stage, and as one shard; median of 3 runs "
        f"(Counter: 1 run); 'equal': every n-gram and count of Counter's tables in ours")
    say(f"{'level':6s} {'tokens':>11s} " + " ".join(f"{f'Counter n={n}':>12s}"
                                                  for n in range(1, args.max_n + 1))
        + f" {'Counter all':>12s} {'ours':>8s} {'ratio':>7s} {'1 shard':>8s} {'ratio':>7s} "
          f"{'equal':>6s}   load average after")
    for level in ("word", "char"):
        c = timed_step(work, "counter", level, args.max_n, args.counter_tokens, args.chunk_tokens)
        total = sum(c["counter_s"].values())
        ours, one = c["ours_s"]["chunked"], c["ours_s"]["one_shard"]
        say(f"{level:6s} {c['tokens']:11,d} "
            + " ".join(f"{s:11.1f}s" for s in c["counter_s"].values())
            + f" {total:11.1f}s {ours:7.2f}s {total / ours:6.1f}x {one:7.2f}s "
              f"{total / one:6.1f}x {str(c['equal']):>6s}   {c['load']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="+", choices=("zipf", "book"), default=["zipf", "book"],
                        help="the corpora to measure, one section each (both by default)")
    parser.add_argument("--size", default="5MB", help="corpus size, e.g. 5MB, 100MB, 1GB")
    parser.add_argument("--words", type=int, default=1_000_000,
                        help="zipf: distinct spellings words are drawn from")
    parser.add_argument("--zipf-exponent", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="zipf: the generator's seed")
    parser.add_argument("--max-n", type=int, default=5)
    parser.add_argument("--chunk-tokens", type=int, default=16_000_000,
                        help="single process: tokens per chunk (params ngrams.chunk_tokens)")
    parser.add_argument("--shard-tokens", type=int, default=4_000_000)
    parser.add_argument("--partitions", type=int, default=8, help="params ngrams.partitions")
    parser.add_argument("--skip-single", action="store_true",
                        help="skip the ngrams stage in one task (memory of all distinct n-grams)")
    parser.add_argument("--runners", nargs="+", choices=("local", "dask"),
                        default=["local", "dask"], help="the sharded stage's runners to measure")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--counter-tokens", type=int, default=10_000_000,
                        help="Counter runs on at most this many tokens per level (it is slow)")
    parser.add_argument("--workdir", type=Path, help="kept; default: a temporary folder")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.step:                       # a child process: one step, JSON on the last line
        name, *rest = args.step
        result = STEPS[name](*(int(x) if x.isdigit() else x for x in rest))
        print(json.dumps({**result, "peak_mb": peak_mb(), "cpu_s": cpu_seconds()}))
        return

    say = Report()
    say(f"# bench/ngrams.py --corpus {' '.join(args.corpus)} --size {args.size} --words "
        f"{args.words} --zipf-exponent {args.zipf_exponent:g} --seed {args.seed} --max-n "
        f"{args.max_n} --chunk-tokens {args.chunk_tokens} --shard-tokens {args.shard_tokens} "
        f"--partitions {args.partitions} --runners {' '.join(args.runners)} --workers "
        f"{args.workers} --counter-tokens "
        f"{args.counter_tokens}{' --skip-single' if args.skip_single else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}")
    say(f"# {machine()}")
    say(f"# {load_average()} before (uptime); the machine may be shared: see the load beside "
        "each figure")
    for corpus in args.corpus:
        with tempfile.TemporaryDirectory(prefix="bench-ngrams-") as tmp:
            work = (args.workdir / corpus if args.workdir else Path(tmp)).resolve()
            work.mkdir(parents=True, exist_ok=True)
            say()
            say(f"## {corpus} corpus")
            params = yaml.safe_load((REPO / "params.yaml").read_text())
            params["ngrams"].update(max_n=args.max_n, chunk_tokens=args.chunk_tokens,
                                    shard_tokens=args.shard_tokens, partitions=args.partitions)
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            idle = run_step(work, "idle", "library")["peak_mb"]
            idle_stages = run_step(work, "idle", "stages")["peak_mb"]
            say(f"idle peak RSS: {idle:.0f} MB (numpy, pandas, pyarrow, seqlm), {idle_stages:.0f} "
                f"MB with the stages' modules (Prefect)")
            if corpus == "zipf":
                nbytes = prepare_zipf(args, work, say)
                header(say)
            else:
                (work / RAW).parent.mkdir(parents=True, exist_ok=True)
                nbytes = prepare_book(args, work, say, idle, idle_stages)
            ngram_rows(args, work, say, nbytes, idle, idle_stages)
    say()
    say(f"# {load_average()} after (uptime)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(say.lines) + "\n")


if __name__ == "__main__":
    main()
