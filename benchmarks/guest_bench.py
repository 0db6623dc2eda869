"""Guest modules in the job sandbox vs the same work in pure Python, on 50 MB inputs.

    python benchmarks/guest_bench.py [--mb 50]

Runs `text:wordcount` and `data:csv-aggregate` (agg=mean) once each through
the WASM executor (`WasmExecutor.run`: worker process, default job limits,
the guest ABI) and once in pure Python (bytes.split + Counter; csv.reader +
a dict), checks that both give the same answer, and prints the times and the
ratio python / guest (> 1 means the guest is faster). Guest times are end to
end (staging the input, the worker round trip, collecting the result); the
module compile happens in a warm-up run on a tiny input, reported on its own,
as peers cache compiled modules.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import string
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np

from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.pool import PoolSettings

DIST = Path(__file__).resolve().parent.parent / "guest_modules" / "dist"
PUNCTUATION = string.punctuation.encode()
P = ParamSpec("P")
R = TypeVar("R")


def make_text(size: int, seed: int = 1) -> bytes:
    """English-like text: a Zipf-distributed vocabulary, punctuation, capitals, lines."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(30_000)]
    vocab += [w.capitalize() + "," for w in vocab[:3000]] + [w + "." for w in vocab[:3000]]
    ranks = np.minimum(rng.zipf(1.2, size=size // 5), len(vocab)) - 1
    words = [vocab[i] for i in ranks]
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return "\n".join(lines).encode()[:size]


def make_csv(size: int, seed: int = 2) -> bytes:
    rng = np.random.default_rng(seed)
    rows = size // 25  # more than enough; cut to `size` at a line end below
    regions = np.array(["north", "south", "east", "west", '"far, away"', "centre"])
    region = regions[rng.integers(0, len(regions), rows)]
    store = rng.integers(1, 500, rows)
    amount = np.round(rng.gamma(2.0, 50.0, rows), 2)
    body = "\n".join(
        f"{i},{r},store {s},{a}"
        for i, (r, s, a) in enumerate(zip(region, store, amount, strict=True))
    )
    data = ("id,region,store,amount\n" + body + "\n").encode()
    return data[: data.rindex(b"\n", 0, size) + 1]


def wordcount_python(data: bytes, top: int) -> dict[str, object]:
    tokens = data.split()
    counts = Counter(t.strip(PUNCTUATION).lower() for t in tokens)
    counts.pop(b"", None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {
        "lines": data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0),
        "words": len(tokens),
        "bytes": len(data),
        "top": [[w.decode("utf-8", "replace"), n] for w, n in ranked],
    }


def aggregate_python(data: bytes, group_by: str, column: str) -> dict[str, float]:
    reader = csv.reader(io.StringIO(data.decode(), newline=""))
    header = next(reader)
    g, c = header.index(group_by), header.index(column)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in reader:
        if not row:
            continue
        sums[row[g]] = sums.get(row[g], 0.0) + float(row[c])
        counts[row[g]] = counts.get(row[g], 0) + 1
    return {k: sums[k] / counts[k] for k in sorted(sums)}


class Sandbox:
    """The job sandbox: the WASM executor's worker process, limits and guest ABI."""

    def __init__(self, executor: WasmExecutor, scratch: Path) -> None:
        self.executor = executor
        self.scratch = scratch
        self.runs = 0

    async def run(self, capability: str, input_path: Path, params: dict[str, str]) -> bytes:
        self.runs += 1
        out_dir = self.scratch / f"out-{self.runs}"
        out_dir.mkdir()
        result = await self.executor.run(
            DIST / (capability.replace(":", "-") + ".wasm"),
            output_dir=out_dir,
            inputs=[input_path],
            params=params,
            program=capability,
        )
        if not result.succeeded:
            raise RuntimeError(f"{capability}: {result.message}: {result.stderr!r}")
        return result.stdout


async def timed_async(coro: Awaitable[R]) -> tuple[R, float]:
    start = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - start


def timed(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> tuple[R, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


async def bench(size: int) -> None:
    print(f"{'case':<22}{'MB':>6}{'warm-up s':>11}{'guest s':>10}{'python s':>10}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with WasmExecutor(PoolSettings(workers=1), scratch_dir=root / "scratch") as executor:
            sandbox = Sandbox(executor, root)
            tiny = root / "tiny"
            tiny.write_bytes(b"k,v\na,1\n")

            text = make_text(size)
            (root / "text").write_bytes(text)
            # The first run compiles the module in the worker; peers cache it.
            _, warm_s = await timed_async(sandbox.run("text:wordcount", tiny, {}))
            out, guest_s = await timed_async(
                sandbox.run("text:wordcount", root / "text", {"top": "20"})
            )
            want, python_s = timed(wordcount_python, text, 20)
            assert json.loads(out) == want, "text:wordcount disagrees with Python"
            print(
                f"{'text:wordcount':<22}{len(text) / 1e6:>6.1f}{warm_s:>11.3f}"
                f"{guest_s:>10.3f}{python_s:>10.3f}{python_s / guest_s:>7.1f}x"
            )
            del text

            data = make_csv(size)
            (root / "csv").write_bytes(data)
            params = {"group_by": "region", "agg": "mean", "column": "amount"}
            _, warm_s = await timed_async(
                sandbox.run("data:csv-aggregate", tiny, {"group_by": "k", "agg": "count"})
            )
            out, guest_s = await timed_async(
                sandbox.run("data:csv-aggregate", root / "csv", params)
            )
            want_means, python_s = timed(aggregate_python, data, "region", "amount")
            header, *rows = csv.reader(io.StringIO(out.decode()))
            assert header == ["region", "mean_amount"]
            got = {group: float(value) for group, value in rows}
            assert got == want_means, "data:csv-aggregate disagrees with Python"
            print(
                f"{'data:csv-aggregate':<22}{len(data) / 1e6:>6.1f}{warm_s:>11.3f}"
                f"{guest_s:>10.3f}{python_s:>10.3f}{python_s / guest_s:>7.1f}x"
            )
    print("ratio = python / guest, one run each (> 1: the guest is faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mb", type=float, default=50.0, help="input size in MB (default 50)")
    args = parser.parse_args()
    asyncio.run(bench(int(args.mb * 1_000_000)))


if __name__ == "__main__":
    main()
