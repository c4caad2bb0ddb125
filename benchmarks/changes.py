"""What changed: the time to snapshot a workspace and to report on it, as a session does.

A workspace like a mid-sized project: 10,000 files in nested directories, mostly source-like
text of a few kilobytes, a few binaries and one log over the size kept (about 40 MB in all).
Each run takes a snapshot, edits 20 files (other ones each run) and reports. The files are
written once, before the runs, so the page cache is warm, as it is for a workspace the user was
just working in. Prints the medians, in seconds and in files per second.

Then the same through the service, as a user sees it: a session started on that workspace and
one on a workspace of one file, side by side (start -> running; the snapshot is taken while the
sandbox is prepared), and `GET .../changes` once 20 files were edited.

    .venv/bin/python benchmarks/changes.py [--runs 7] [--files 10000] [--runtime bwrap]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from codestation import changes
from cold_start import project, served

WORDS = ["def", "return", "self", "value", "index", "items", "result", "config", "path"]


def source(rng: random.Random, size: int) -> bytes:
    lines, total = [], 0
    while total < size:
        indent = "    " * rng.randrange(4)
        line = f"{indent}{' '.join(rng.choices(WORDS, k=rng.randrange(2, 10)))}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()


def build(root: Path, files: int, rng: random.Random) -> list[Path]:
    """The workspace; returns its text files."""
    texts = []
    for i in range(files):
        where = root / f"pkg{i % 20}" / f"mod{i % 7}" / f"sub{i % 3}"
        where.mkdir(parents=True, exist_ok=True)
        if i % 500 == 0:
            (where / f"asset{i}.png").write_bytes(rng.randbytes(rng.randrange(20_000, 200_000)))
            continue
        path = where / f"file{i}.py"
        path.write_bytes(source(rng, int(rng.lognormvariate(7.8, 0.8))))
        texts.append(path)
    (root / "build.log").write_bytes(source(rng, 3 << 20))  # over max_file_size: hashed only
    return texts


def edit(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[len(lines) // 2] = "    changed = True\n"
    path.write_text("".join(lines))


def timed(fn: object, *args: object) -> float:
    begin = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--runtime", choices=["docker", "bwrap"], default="bwrap")
    parser.add_argument("--json", type=Path, help="Also write the figures here, as JSON.")
    args = parser.parse_args()

    rng = random.Random(42)
    with tempfile.TemporaryDirectory(prefix="changes-bench-") as tmp:
        root = Path(tmp, "workspace")
        texts = build(root, args.files, rng)
        rng.shuffle(texts)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"workspace: {args.files + 1} files, {size / 1e6:.1f} MB", flush=True)
        # Files stamped within 2 s of a snapshot are compared by content (racily clean): a
        # workspace the agent starts on was, as a rule, last written longer ago than that.
        time.sleep(2.5)
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        takes, reports = [], []
        stored = 0
        for i in range(args.runs + 1):  # the first is a warm-up
            store = Path(tmp, "snapshots", str(i))
            took = timed(changes.take, fd, store)
            stored = sum(p.stat().st_size for p in store.iterdir())
            for path in texts[20 * i : 20 * (i + 1)]:  # files not edited before
                edit(path)
            begin = time.perf_counter()
            found = changes.report(fd, store)
            reported = time.perf_counter() - begin
            if found.modified != 20 or found.partial:
                raise RuntimeError(f"unexpected report: {found}")
            changes.discard(store)
            if i:
                takes.append(took)
                reports.append(reported)
                print(f"run {i}: take {took:.3f} s, report {reported:.3f} s", flush=True)
        os.close(fd)
        mt, mr = statistics.median(takes), statistics.median(reports)
        entries = args.files + 1
        print(f"\nmedian over {args.runs} runs ({entries} files, {size / 1e6:.1f} MB)")
        print(f"  take:   {mt:.3f} s  ({entries / mt:,.0f} files/s, {size / mt / 1e6:.0f} MB/s)")
        print(f"  report: {mr:.3f} s  ({entries / mr:,.0f} files/s), 20 files modified")
        print(f"  ratio report/take: {mr / mt:.2f}   snapshot on disk: {stored / 1e6:.1f} MB")
        figures = {"changes take s": round(mt, 3), "changes report s": round(mr, 3)}
        figures |= through_the_service(root, texts[20 * (args.runs + 1) :], args)
    if args.json:
        args.json.write_text(json.dumps(figures))


def through_the_service(big: Path, texts: list[Path], args: argparse.Namespace) -> dict[str, float]:
    with served("changes-service-", args.runtime) as service, service.client() as client:
        small = project(service.tmp, "small")
        client.start(str(small), wait=True).stop()  # warm-up
        on_big, on_small, reports = [], [], []
        for i in range(args.runs):
            begin = time.monotonic()
            session = client.start(str(big), wait=True)
            on_big.append(time.monotonic() - begin)
            for path in texts[20 * i : 20 * (i + 1)]:
                edit(path)
            begin = time.monotonic()
            found = session.changes()
            reports.append(time.monotonic() - begin)
            if found.modified != 20:
                raise RuntimeError(f"unexpected report: {found.modified} modified")
            session.stop()
            begin = time.monotonic()
            client.start(str(small), wait=True).stop()
            on_small.append(time.monotonic() - begin)
            said = f"big {on_big[-1]:.2f} s, one file {on_small[-1]:.2f} s"
            print(f"run {i + 1}: start {said}; changes {reports[-1]:.3f} s", flush=True)
    big_start, small_start = statistics.median(on_big), statistics.median(on_small)
    print(f"\nthrough the service ({args.runtime}), median over {args.runs} runs")
    print(f"  (a) start -> running, 10,000-file workspace: {big_start:.2f} s")
    print(f"  (b) start -> running, one-file workspace:    {small_start:.2f} s")
    print(f"  ratio a/b: {big_start / small_start:.2f}")
    print(f"  GET .../changes, 20 files modified: {statistics.median(reports):.3f} s")
    return {
        "start on the big workspace ratio": round(big_start / small_start, 2),
        "GET changes s": round(statistics.median(reports), 3),
    }


if __name__ == "__main__":
    main()
