"""Preprocess and n-gram counting at scale: the streamed preprocess stage against the previous
in-memory one, single-process and sharded counting, and collections.Counter (the seed's way)
over the same tokens.

The corpus is the shipped one repeated with variation up to --size: every repetition shuffles the
order of the lines and the words within each line (deterministic seed), so the vocabulary stays
the book's while the number of distinct n-grams keeps growing with the size, as in real text.

Every step runs in a fresh process in a repository-like folder (params.yaml, data/raw/...) and
reports the seconds of its work and its peak RSS (getrusage ru_maxrss). "above idle" subtracts
the peak of a process that only imports the same modules (Prefect alone is ~300 MB).

    python bench/ngrams.py --size 5MB --max-n 5
    python bench/ngrams.py --size 100MB --max-n 5 --out bench/results/ngrams-cpu-2core.txt
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
import yaml

from seqlm.ngrams import count_ngrams
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


def _task(name: str, *args: object) -> tuple[object, float, float]:
    """Run the stage task `name` (tasks/ngrams.py, its function without Prefect) where this is
    called: (its result, seconds, peak RSS of the process that ran it)."""
    import tasks.ngrams
    began = time.perf_counter()
    result = getattr(tasks.ngrams, name).fn(*args)
    return result, time.perf_counter() - began, peak_mb()


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
    peaks: list[float] = []
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
            began = time.perf_counter()
            results = run_all(calls)
            phases[name] = time.perf_counter() - began
            peaks.extend(peak for _, _, peak in results)
            return [result for result, _, _ in results]

        partials = {level: phase(f"map {level}", [("ngrams_shard", params, level, a, b)
                                                   for a, b in bounds])
                    for level, bounds in plan.items()}
        reduced = {level: phase(f"reduce {level}", [("ngrams_reduce", level, p, paths)
                                                     for p in range(partitions)])
                   for level, paths in partials.items()}
        phase("merge + Parquet", [("ngrams", params, reduced)])
    return {"s": time.perf_counter() - start, "phases": phases,
            "tasks": sum(map(len, plan.values())) + 2 * partitions + 1,
            "shards": {level: len(bounds) for level, bounds in plan.items()},
            "task_peak_mb": max(peaks), "outputs": outputs_digest()}


def step_counter(level: str, max_n: int, tokens: int, chunk_tokens: int) -> dict:
    """collections.Counter of n-tuples (the seed's count) vs count_ngrams on the same prefix,
    with the stage's chunks and as one shard."""
    _, ids, vocab_size = load(level)
    prefix = np.array(ids[:tokens])
    ours_s = {}
    for name, chunk in (("chunked", chunk_tokens), ("one_shard", len(prefix))):
        runs = []
        for _ in range(3):               # the median of 3: this machine's load varies
            start = time.perf_counter()
            ours = count_ngrams(prefix, max_n, vocab_size, chunk)
            runs.append(time.perf_counter() - start)
        ours_s[name] = sorted(runs)[1]
    listed, counter_s = prefix.tolist(), {}
    for n in range(1, max_n + 1):
        start = time.perf_counter()
        counter = collections.Counter(zip(*(listed[j:len(listed) - n + 1 + j] for j in range(n))))
        counter_s[n] = time.perf_counter() - start
        if len(counter) != len(ours[n]) or max(counter.values()) != ours[n].counts.max():
            raise AssertionError(f"{level} {n}-grams: Counter and count_ngrams disagree")
        del counter
    return {"tokens": len(prefix), "ours_s": ours_s, "counter_s": counter_s}


def step_idle(stages: str) -> dict:
    if stages == "stages":
        import tasks.ngrams, tasks.preprocess  # noqa: E401, F401  (Prefect and the stages)
    return {}


STEPS = {"idle": step_idle, "preprocess": step_preprocess, "previous": step_previous_preprocess,
         "stage-ngrams": step_stage_ngrams, "sharded": step_sharded,
         "counter": step_counter}


# -- helpers -------------------------------------------------------------------------------------

def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"machine: {model}, nproc {os.cpu_count()}, {memory:.0f} GiB RAM, "
            f"{platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="5MB", help="corpus size, e.g. 5MB, 100MB, 1GB")
    parser.add_argument("--max-n", type=int, default=5)
    parser.add_argument("--chunk-tokens", type=int, default=16_000_000,
                        help="single process: tokens per chunk (params ngrams.chunk_tokens)")
    parser.add_argument("--shard-tokens", type=int, default=4_000_000)
    parser.add_argument("--partitions", type=int, default=8, help="params ngrams.partitions")
    parser.add_argument("--skip-single", action="store_true",
                        help="skip the ngrams stage in one task (memory of all distinct n-grams)")
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
        print(json.dumps({**result, "peak_mb": peak_mb()}))
        return

    with tempfile.TemporaryDirectory(prefix="bench-ngrams-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        report: list[str] = []

        def say(line: str = "") -> None:
            print(line, flush=True)
            report.append(line)

        say(f"# bench/ngrams.py --size {args.size} --max-n {args.max_n} --chunk-tokens "
            f"{args.chunk_tokens} --shard-tokens {args.shard_tokens} --partitions "
            f"{args.partitions} --workers {args.workers} --counter-tokens {args.counter_tokens}"
            f"{' --skip-single' if args.skip_single else ''}, {time.strftime('%Y-%m-%d')}")
        say(f"# {machine()}")
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["ngrams"].update(max_n=args.max_n, chunk_tokens=args.chunk_tokens,
                                shard_tokens=args.shard_tokens, partitions=args.partitions)
        (work / RAW).parent.mkdir(parents=True, exist_ok=True)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        start = time.perf_counter()
        nbytes = generate(parse_size(args.size), work / RAW)
        say(f"corpus: {nbytes / 1e6:.1f} MB generated in {time.perf_counter() - start:.0f} s")
        idle = run_step(work, "idle", "library")["peak_mb"]
        idle_stages = run_step(work, "idle", "stages")["peak_mb"]
        say(f"idle peak RSS: {idle:.0f} MB (numpy, pandas, pyarrow, seqlm), {idle_stages:.0f} MB "
            f"with the stages' modules (Prefect)")
        say()

        pre = run_step(work, "preprocess")
        tokens, vocab = pre["tokens"], pre["vocab"]
        say(f"corpus: {tokens['char']:,} characters, {tokens['word']:,} words; vocabularies "
            f"{vocab['char']} characters, {vocab['word']:,} words")
        say(f"{'stage':44s} {'s':>7s} {'peak MB':>8s} {'above idle':>11s} {'/ file size':>12s}")

        def row(label: str, result: dict, base: float, extra: str = "") -> None:
            above = result["peak_mb"] - base
            say(f"{label:44s} {result['s']:7.1f} {result['peak_mb']:8.0f} {above:11.0f} "
                f"{above * 1e6 / nbytes:11.2f}x{extra}")

        row("preprocess, streamed in two passes", pre, idle_stages)
        if nbytes <= IN_MEMORY_MAX:
            old = run_step(work, "previous")
            row("preprocess, previous (in memory)", old, idle,
                f"   outputs byte-identical: {old['identical']}")
        else:
            say(f"preprocess, previous (in memory): skipped above {IN_MEMORY_MAX / 1e6:.0f} MB "
                f"(~34x the file in RAM)")
        outputs = {}
        if args.skip_single:
            say("ngrams in one task: skipped (--skip-single; it holds every distinct n-gram)")
        else:
            single = run_step(work, "stage-ngrams")
            outputs["one task"] = single["outputs"]
            row(f"ngrams in one task (n = 1..{args.max_n}, word + char)", single, idle_stages)
        phases = {}
        for runner in ("local", "dask"):
            result = run_step(work, "sharded", runner, args.workers)
            outputs[runner] = result["outputs"]
            phases[runner] = result["phases"]
            label = (f"ngrams sharded, local runner ({args.workers} threads)" if runner == "local"
                     else f"ngrams sharded, Dask ({args.workers} workers)")
            row(label, result, idle_stages if runner == "local" else idle,
                f"   {result['tasks']} tasks, task peak {result['task_peak_mb']:.0f} MB"
                + (" (every worker)" if runner == "dask" else ""))
        say(f"(shards of {args.shard_tokens:,} tokens: {result['shards']['word']} word + "
            f"{result['shards']['char']} char; {args.partitions} partitions per level; the Dask "
            f"row's peak is the client's, which holds the scheduler)")
        say("phases, s: " + "; ".join(f"{runner}: " + ", ".join(
            f"{name} {sec:.1f}" for name, sec in by_phase.items())
            for runner, by_phase in phases.items()))
        say(f"outputs (data/ngrams, reports/ngrams.json) identical: "
            f"{len(set(outputs.values())) == 1} ({', '.join(outputs)})")
        report_json = json.loads((work / "reports" / "ngrams.json").read_text())
        for level in ("word", "char"):
            say(f"distinct {level} n-grams: " + ", ".join(
                f"{n}: {report_json[f'{level}_{n}_distinct']:,}" for n in range(1, args.max_n + 1))
                + f" (total {sum(report_json[f'{level}_{n}_distinct'] for n in range(1, args.max_n + 1)):,})")
        say()

        say(f"collections.Counter of n-tuples (the seed's count) vs count_ngrams, n = 1.."
            f"{args.max_n}, same tokens: the first {args.counter_tokens:,} of each level (Counter "
            f"on all of them would take minutes and GBs). Ours in chunks of "
            f"{args.chunk_tokens:,} tokens as the stage, and as one shard; median of 3 runs "
            f"(Counter: 1 run)")
        say(f"{'level':6s} {'tokens':>11s} " + " ".join(f"{f'Counter n={n}':>12s}"
                                                      for n in range(1, args.max_n + 1))
            + f" {'Counter all':>12s} {'ours':>8s} {'ratio':>7s} {'1 shard':>8s} {'ratio':>7s}")
        for level in ("word", "char"):
            c = run_step(work, "counter", level, args.max_n, args.counter_tokens,
                         args.chunk_tokens)
            total = sum(c["counter_s"].values())
            ours, one = c["ours_s"]["chunked"], c["ours_s"]["one_shard"]
            say(f"{level:6s} {c['tokens']:11,d} "
                + " ".join(f"{s:11.1f}s" for s in c["counter_s"].values())
                + f" {total:11.1f}s {ours:7.2f}s {total / ours:6.1f}x {one:7.2f}s "
                  f"{total / one:6.1f}x")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
