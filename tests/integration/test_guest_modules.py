"""The four example capabilities, run in the real job sandbox on real inputs.

Every run goes through the WASM executor's public API (`WasmExecutor.run`: the
worker processes, limits and guest ABI a job gets) or through the
`anvil-compute run` CLI in a subprocess. Each answer is checked against the
same computation done here in plain Python (word counts, CSV aggregation
without pandas, bilinear resize on known pixels, scikit-learn's prediction with
the same weights); each bad input must end in a non-zero exit and a readable
message on stderr.
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import inspect
import io
import json
import math
import random
import string
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import pytest_asyncio
import wasmtime

from daemon.executors.result import ExecutionResult, RunEnd
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.pool import PoolSettings

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "guest_modules"
DIST = GUEST / "dist"


# -- the sandbox ---------------------------------------------------------------


def module_path(capability: str) -> Path:
    return DIST / (capability.replace(":", "-") + ".wasm")


@dataclass(frozen=True, kw_only=True)
class GuestRun:
    outcome: RunEnd
    message: str
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    outputs: dict[str, bytes]

    @classmethod
    def of(cls, result: ExecutionResult) -> GuestRun:
        return cls(
            outcome=result.outcome,
            message=result.message,
            exit_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
            outputs={f.name: f.path.read_bytes() for f in result.outputs},
        )

    def json(self) -> object:
        assert self.outcome is RunEnd.OK, (self.message, self.stderr.decode(errors="replace"))
        return json.loads(self.stdout)

    def error(self) -> str:
        """The guest's stderr, after checking it failed the documented way (exit 1)."""
        assert self.outcome is RunEnd.NONZERO_EXIT, (self.message, self.stdout[:200])
        assert self.exit_code == 1
        assert self.stdout == b""
        return self.stderr.decode()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def executor(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WasmExecutor]:
    root = tmp_path_factory.mktemp("guest-executor")
    async with WasmExecutor(
        PoolSettings(workers=1, cache_dir=root / "cache"), scratch_dir=root / "scratch"
    ) as ex:
        yield ex


async def run_guest(
    executor: WasmExecutor,
    capability: str,
    inputs: list[bytes],
    params: dict[str, str] | None = None,
    *,
    module: Path | None = None,
) -> GuestRun:
    """Run a module as a job runs: input i at /input/<i>, input 0 on stdin, a fresh /output."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = []
        for i, data in enumerate(inputs):
            paths.append(work / f"input-{i}")
            paths[-1].write_bytes(data)
        (work / "out").mkdir()
        result = await executor.run(
            module or module_path(capability),
            output_dir=work / "out",
            inputs=paths,
            params=params or {},
            program=capability,
        )
        return GuestRun.of(result)


# -- text:wordcount -------------------------------------------------------------

PUNCTUATION = string.punctuation.encode()


def wordcount_in_python(data: bytes, top: int = 10) -> dict[str, object]:
    tokens = data.split()  # ASCII whitespace, as `wc -w`
    counts = Counter(t.strip(PUNCTUATION).lower() for t in tokens)
    counts.pop(b"", None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {
        "lines": data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0),
        "words": len(tokens),
        "bytes": len(data),
        "top": [[w.decode("utf-8", "replace"), n] for w, n in ranked],
    }


def real_text() -> bytes:
    """Prose and code that ship with Python, plus the awkward cases."""
    import json as json_mod

    prose = "\n".join(m.__doc__ or "" for m in (csv, json_mod, inspect, random)) * 3
    source = inspect.getsource(json_mod.decoder) + inspect.getsource(string)
    tricky = (
        'Ünïcödé wörds, ÜNÏCÖDÉ again; l\'été — «quoted» "The" THE the!\r\n'
        "tabs\tand\x0bvertical\x0cfeeds -- ... !!! 42 42.0 (42)\n"
    )
    invalid_utf8 = b"caf\xe9 caf\xe9 \xff\xfe bad\xc3 \xed\xa0\x80x trunc\xf0\x9f\x98"
    # Repeated so the odd words reach `top`, where their JSON encoding shows.
    return (prose + source + tricky * 30).encode() + invalid_utf8 * 40


async def test_wordcount_matches_python_on_real_text(executor: WasmExecutor) -> None:
    data = real_text()
    result = (await run_guest(executor, "text:wordcount", [data], {"top": "40"})).json()
    assert result == wordcount_in_python(data, top=40)


async def test_wordcount_words_cut_by_the_read_buffer(executor: WasmExecutor) -> None:
    # Words straddle the guest's 64 KiB reads, one is longer than a read.
    rng = random.Random(5)
    words = ["".join(rng.choices("abcXYZ,.'", k=rng.randint(1, 9))) for _ in range(60_000)]
    data = (" ".join(words) + " " + "L" * 200_000 + "\nend").encode()
    result = (await run_guest(executor, "text:wordcount", [data], {"top": "10000"})).json()
    assert result == wordcount_in_python(data, top=10_000)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", {"lines": 0, "words": 0, "bytes": 0, "top": []}),
        (b"\n\n", {"lines": 2, "words": 0, "bytes": 2, "top": []}),
        (b"-- !!", {"lines": 1, "words": 2, "bytes": 5, "top": []}),
        (b"b a B\n", {"lines": 1, "words": 3, "bytes": 6, "top": [["b", 2], ["a", 1]]}),
    ],
)
async def test_wordcount_edge_cases(
    executor: WasmExecutor, data: bytes, expected: dict[str, object]
) -> None:
    assert (await run_guest(executor, "text:wordcount", [data])).json() == expected


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"top": "ten"}, "param top: expected an integer, got 'ten'"),
        ({"top": "-1"}, "param top: -1 is outside [0, 10000]"),
        ({"tpo": "3"}, "unknown param 'tpo'"),
    ],
)
async def test_wordcount_rejects_bad_params(
    executor: WasmExecutor, params: dict[str, str], message: str
) -> None:
    run = await run_guest(executor, "text:wordcount", [b"a b"], params)
    assert run.error() == f"text:wordcount: {message}\n"


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--top=1"], []),
        ([], [("ANVIL_PARAM_TOP", "1")]),
        (["--top=1"], [("ANVIL_PARAM_TOP", "7")]),  # argv wins
        (["--top=9", "--top=1"], []),  # the last one wins
    ],
)
def test_sdk_reads_params_from_argv_or_env(
    argv: list[str], env: list[tuple[str, str]], tmp_path: Path
) -> None:
    """The SDK side of the ABI alone (the executor always sets both), on bare wasmtime."""
    data = tmp_path / "0"
    data.write_bytes(b"a a a b b c")
    config = wasmtime.WasiConfig()
    config.argv = ["text:wordcount", *argv]
    config.env = env
    config.stdin_file = str(data)
    config.stdout_file = str(tmp_path / "stdout")
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    store.set_wasi(config)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    module = wasmtime.Module.from_file(engine, str(module_path("text:wordcount")))
    start = linker.instantiate(store, module).exports(store)["_start"]
    assert isinstance(start, wasmtime.Func)
    start(store)  # returns (no proc_exit trap) when main returns 0
    result = json.loads((tmp_path / "stdout").read_bytes())
    assert result == wordcount_in_python(b"a a a b b c", top=1)


# -- data:csv-aggregate ------------------------------------------------------------


def sales_csv(rows: int = 3000, seed: int = 7) -> bytes:
    """A sales ledger with quoted names, commas, quotes and line breaks, CRLF and blank lines."""
    rng = random.Random(seed)
    regions = ["north", "south", "east, inner", 'west "far"', "multi\nline", "Ünï"]
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["id", "region", "product", "amount"])
    for i in range(rows):
        amount = rng.choice(
            [
                str(rng.randint(-50, 500)),
                f"{rng.uniform(-100, 1000):.2f}",
                f" {rng.uniform(0, 1):.6f} ",
                f"{rng.uniform(1, 9):.3e}",
            ]
        )
        writer.writerow([i, rng.choice(regions), f"item {rng.randint(1, 40)}", amount])
        if i % 500 == 0:
            out.write("\r\n")  # blank lines are skipped
    return out.getvalue().encode()


def aggregate_in_python(
    data: bytes, group_by: str, agg: str, column: str
) -> list[tuple[str, float]]:
    rows = [r for r in csv.reader(io.StringIO(data.decode(), newline="")) if r]
    header, body = rows[0], rows[1:]
    g, c = header.index(group_by), header.index(column)
    values: dict[str, list[float]] = {}
    for row in body:
        values.setdefault(row[g], []).append(float(row[c]))

    def reduce(vs: list[float]) -> float:
        total = 0.0
        for v in vs:  # in input order, as the guest sums
            total += v
        return {
            "sum": total,
            "count": float(len(vs)),
            "mean": total / len(vs),
            "min": min(vs),
            "max": max(vs),
        }[agg]

    return [(k, reduce(values[k])) for k in sorted(values, key=lambda k: k.encode())]


@pytest.mark.parametrize("agg", ["sum", "count", "mean", "min", "max"])
async def test_csv_aggregate_matches_python(executor: WasmExecutor, agg: str) -> None:
    data = sales_csv()
    params = {"group_by": "region", "agg": agg, "column": "amount"}
    out = await run_guest(executor, "data:csv-aggregate", [data], params)
    assert out.exit_code == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout.decode(), newline="")))
    header = "count" if agg == "count" else f"{agg}_amount"
    assert rows[0] == ["region", header]
    got = [(group, float(value)) for group, value in rows[1:]]
    assert got == aggregate_in_python(data, "region", agg, "amount")
    if agg == "count":
        assert all(value.isdigit() for _, value in rows[1:])


async def test_csv_aggregate_count_needs_no_column(executor: WasmExecutor) -> None:
    data = b"\xef\xbb\xbfk,v\na,1\nb,2\na,3"  # a byte order mark, no final newline
    out = await run_guest(executor, "data:csv-aggregate", [data], {"group_by": "k", "agg": "count"})
    assert out.stdout == b"k,count\na,2\nb,1\n", out.stderr


@pytest.mark.parametrize(
    ("data", "params", "message"),
    [
        (b"a,b\n1,2\n3\n", {}, "line 3: expected 2 fields, got 1"),
        (b'a,b\n"x\ny",2\n1,2,3\n', {}, "line 4: expected 2 fields, got 3"),
        (b'a,b\n1,2\n"open,2\n', {}, "line 3: unterminated quoted field"),
        (b'a,b\n1,2\n3,x"y"\n', {}, "line 3: quote inside an unquoted field"),
        (b'a,b\n1,2\n"3"x,4\n', {}, "line 3: unexpected character after a closing quote"),
        (b"a,b\n1,2\n3,4\rx\n", {}, "line 3: carriage return not followed by a line feed"),
        (b"a,b\n1,2\n3,four\n", {}, "line 3: column 'b' is not a number: 'four'"),
        (b"a,b\n1,2\n3,nan\n", {}, "line 3: column 'b' is not a number: 'nan'"),
        (b"a,b\n1,\n", {}, "line 2: column 'b' is not a number: ''"),
        (b"", {}, "the input is empty: no header row"),
        (b"a,c\n1,2\n", {}, "param column: no column named 'b' in the header (columns: 'a', 'c')"),
        (b"a,b\n1,2\n", {"agg": "median"}, "param agg: 'median' is not one of sum, count, mean"),
        (b"a,b\n1,2\n", {"agg": None}, "param agg is required"),
        (b"a,b\n1,2\n", {"column": None}, "param column is required for agg=sum"),
        (b"a,b\n1,2\n", {"group_by": None}, "param group_by is required"),
        (b"a,b\n1,2\n", {"colum": "b"}, "unknown param 'colum'"),
    ],
)
async def test_csv_aggregate_rejects_malformed_input(
    executor: WasmExecutor, data: bytes, params: dict[str, str | None], message: str
) -> None:
    merged = {"group_by": "a", "agg": "sum", "column": "b"} | params
    given = {k: v for k, v in merged.items() if v is not None}
    run = await run_guest(executor, "data:csv-aggregate", [data], given)
    assert run.error().startswith(f"data:csv-aggregate: {message}")


# -- image:resize -----------------------------------------------------------------


def pnm(width: int, height: int, samples: list[int], *, channels: int, maxval: int = 255) -> bytes:
    magic = b"P5" if channels == 1 else b"P6"
    fmt = "B" if maxval < 256 else ">H"
    raster = b"".join(struct.pack(fmt, s) for s in samples)
    return magic + b"\n# made by the test\n%d %d\n%d\n" % (width, height, maxval) + raster


def parse_pnm(data: bytes) -> tuple[bytes, int, int, int, list[int]]:
    magic, width, height, maxval, raster = data.split(maxsplit=4)
    fmt = ">H" if int(maxval) > 255 else "B"
    samples = [v[0] for v in struct.iter_unpack(fmt, raster)]
    return magic, int(width), int(height), int(maxval), samples


def resize_in_python(
    samples: list[int], *, size: tuple[int, int], channels: int, out: tuple[int, int], maxval: int
) -> list[int]:
    """The documented bilinear rule (pixel centres aligned), in the documented order."""
    (width, height), (out_w, out_h) = size, out

    def axis(size_in: int, size_out: int) -> list[tuple[int, int, float]]:
        result = []
        for d in range(size_out):
            s = min(max((d + 0.5) * (size_in / size_out) - 0.5, 0.0), float(size_in - 1))
            i0 = math.floor(s)
            result.append((i0, min(i0 + 1, size_in - 1), s - i0))
        return result

    def px(x: int, y: int, ch: int) -> float:
        return float(samples[(y * width + x) * channels + ch])

    result = []
    for y0, y1, fy in axis(height, out_h):
        for x0, x1, fx in axis(width, out_w):
            for ch in range(channels):
                top = px(x0, y0, ch) + (px(x1, y0, ch) - px(x0, y0, ch)) * fx
                bottom = px(x0, y1, ch) + (px(x1, y1, ch) - px(x0, y1, ch)) * fx
                result.append(min(max(math.floor(top + (bottom - top) * fy + 0.5), 0), maxval))
    return result


def photo_like(width: int, height: int, channels: int, maxval: int, seed: int) -> list[int]:
    """Gradients, an edge and noise: every interpolation case shows up."""
    rng = random.Random(seed)
    samples = []
    for y in range(height):
        for x in range(width):
            for ch in range(channels):
                v = (x * 7 + y * 3 + ch * 40) % (maxval + 1)
                v = maxval if x > width // 2 and y < height // 3 else v
                samples.append(min(maxval, max(0, v + rng.randint(-9, 9))))
    return samples


async def test_resize_known_pixels(executor: WasmExecutor) -> None:
    # 2x1 grey [0, 100] -> 4x1: centres at -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
    run = await run_guest(
        executor, "image:resize", [pnm(2, 1, [0, 100], channels=1)], {"width": "4"}
    )
    assert run.json() == {
        "width": 4,
        "height": 2,
        "format": "P5",
        "maxval": 255,
        "output": "resized.pgm",
    }
    assert run.outputs == {"resized.pgm": b"P5\n4 2\n255\n" + bytes([0, 25, 75, 100] * 2)}
    # 2x2 RGB -> 1x1 is the mean of the four pixels, rounded half up.
    rgb = pnm(2, 2, list(range(12)), channels=3)
    run = await run_guest(executor, "image:resize", [rgb], {"width": "1", "height": "1"})
    assert run.outputs["resized.ppm"] == b"P6\n1 1\n255\n" + bytes([5, 6, 7])
    # Same size: every pixel unchanged.
    samples = photo_like(9, 5, 3, 255, seed=1)
    run = await run_guest(
        executor, "image:resize", [pnm(9, 5, samples, channels=3)], {"width": "9", "height": "5"}
    )
    assert parse_pnm(run.outputs["resized.ppm"])[4] == samples


@pytest.mark.parametrize(
    ("image", "params", "out_size"),
    [
        # (width, height, channels, maxval) of the input
        ((37, 23, 3, 255), {"width": "50", "height": "11"}, (50, 11)),
        ((64, 48, 1, 255), {"width": "16"}, (16, 12)),
        ((20, 30, 1, 1000), {"height": "45"}, (30, 45)),
        ((13, 7, 3, 65535), {"width": "5", "height": "19"}, (5, 19)),
    ],
)
async def test_resize_matches_python(
    executor: WasmExecutor,
    image: tuple[int, int, int, int],
    params: dict[str, str],
    out_size: tuple[int, int],
) -> None:
    width, height, channels, maxval = image
    samples = photo_like(width, height, channels, maxval, seed=width)
    data = pnm(width, height, samples, channels=channels, maxval=maxval)
    run = await run_guest(executor, "image:resize", [data], params)
    name = "resized.pgm" if channels == 1 else "resized.ppm"
    assert list(run.outputs) == [name], run.stderr
    magic, out_w, out_h, out_max, out = parse_pnm(run.outputs[name])
    assert (magic, (out_w, out_h), out_max) == (b"P5" if channels == 1 else b"P6", out_size, maxval)
    assert out == resize_in_python(
        samples, size=(width, height), channels=channels, out=out_size, maxval=maxval
    )


@pytest.mark.parametrize(
    ("data", "params", "message"),
    [
        (b"P3\n2 2\n255\n0 0 0 0", {}, "bad PNM header: not a binary PGM or PPM (magic P5 or P6)"),
        (b"GIF89a....", {}, "bad PNM header: not a binary PGM or PPM"),
        (b"P5\n2\n", {}, "bad PNM header: expected the height, a decimal number"),
        (b"P5 2 2\n", {}, "bad PNM header: expected the maxval, a decimal number"),
        (b"P5 0 2 255\n", {}, "bad PNM header: width is 0"),
        (b"P5 2 2 70000\n", {}, "bad PNM header: maxval larger than 65535"),
        (b"P52 2 255\n", {}, "bad PNM header: no whitespace after the magic"),
        (b"P5 2 2 255", {}, "bad PNM header: no whitespace byte before the raster"),
        (b"P5 2 2 255\n\x01\x02\x03", {}, "truncated raster: a 2x2 PGM needs 4 bytes, got 3"),
        (b"P5 2 1 9\n\x01\x0a", {}, "bad raster: a sample exceeds maxval 9"),
        (b"", {}, "bad PNM header: not a binary PGM or PPM"),
        (b"P5 2 1 255\n\x01\x02", {"width": None}, "give param width, height or both"),
        (b"P5 2 1 255\n\x01\x02", {"width": "0"}, "param width: 0 is outside [1, 16384]"),
        (b"P5 1 2 255\n\x01\x02", {"width": "16384"}, "output would be 16384x32768; at most"),
    ],
)
async def test_resize_rejects_bad_images(
    executor: WasmExecutor, data: bytes, params: dict[str, str | None], message: str
) -> None:
    merged = {"width": "3"} | params
    given = {k: v for k, v in merged.items() if v is not None}
    run = await run_guest(executor, "image:resize", [data], given)
    assert run.error().startswith(f"image:resize: {message}")
    assert run.outputs == {}


# -- inference:digits ---------------------------------------------------------------


@pytest.fixture(scope="module")
def train_digits() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_digits", GUEST / "train_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_digits_checked_in_model_agrees_with_scikit_learn(
    executor: WasmExecutor, train_digits: ModuleType
) -> None:
    from sklearn.linear_model import LogisticRegression

    model_bytes = (GUEST / "models" / "digits-logreg.bin").read_bytes()
    model = train_digits.decode_model(model_bytes)
    (layer,) = model.layers
    # scikit-learn's own estimator, carrying exactly the weights in the file.
    clf = LogisticRegression()
    clf.coef_, clf.intercept_ = layer.weights, layer.biases
    clf.classes_ = np.asarray(model.labels)
    split = train_digits.digits_split()
    want = clf.predict(split.x_test * model.input_scale)

    run = await run_guest(
        executor, "inference:digits", [train_digits.images_csv(split.x_test), model_bytes]
    )
    result = run.json()
    assert isinstance(result, dict)
    got = np.asarray(result["predictions"])
    assert result["count"] == len(split.x_test) == 450
    assert (got == want).all()
    assert np.mean(got == split.y_test) >= 0.90


async def test_digits_freshly_trained_mlp_agrees_with_scikit_learn(
    executor: WasmExecutor, train_digits: ModuleType
) -> None:
    split = train_digits.digits_split()
    model, mlp = train_digits.train(split, "mlp")
    want = mlp.predict(split.x_test * train_digits.INPUT_SCALE)
    run = await run_guest(
        executor,
        "inference:digits",
        [train_digits.images_csv(split.x_test), train_digits.encode_model(model)],
    )
    result = run.json()
    assert isinstance(result, dict)
    got = np.asarray(result["predictions"])
    assert (got == want).all()
    assert np.mean(got == split.y_test) >= 0.90


def test_digits_model_round_trips(train_digits: ModuleType) -> None:
    data = (GUEST / "models" / "digits-logreg.bin").read_bytes()
    assert train_digits.encode_model(train_digits.decode_model(data)) == data


@pytest.mark.parametrize(
    ("images", "model_edit", "message"),
    [
        (b"1,2,3\n", None, "line 1: expected 64 comma-separated values, got 3"),
        (b"\n" + b"0," * 63 + b"x\n", None, "line 2: value 64 is not a number"),
        (b"0," * 64 + b"0\n", None, "line 1: more than 64 values"),
        (b"\n \n", None, "input 0 holds no images"),
        (b"0," * 63 + b"0\n", "drop", "input 1 (the model) is missing"),
        (
            b"0," * 63 + b"0\n",
            "magic",
            "bad model: input 1 is not a dense classifier model (magic ANVDENS1)",
        ),
        (b"0," * 63 + b"0\n", "truncate", "bad model: truncated in the biases"),
        (b"0," * 63 + b"0\n", "extend", "bad model: 1 trailing bytes"),
    ],
)
async def test_digits_rejects_bad_input(
    executor: WasmExecutor, images: bytes, model_edit: str | None, message: str
) -> None:
    model = (GUEST / "models" / "digits-logreg.bin").read_bytes()
    inputs = {
        None: [images, model],
        "drop": [images],
        "magic": [images, b"NOTAMODL" + model[8:]],
        "truncate": [images, model[:-4]],
        "extend": [images, model + b"\0"],
    }[model_edit]
    run = await run_guest(executor, "inference:digits", inputs)
    assert run.error() == f"inference:digits: {message}\n"


# -- the Zig examples of GUIDE.md ------------------------------------------------------

# Each example's build command from GUIDE.md, run where the example lives.
ZIG_EXAMPLES = {
    "zig_grep": ["-O", "ReleaseSmall", "main.zig"],  # Zig's std, no libc
    # WASI libc (the one build.py's -O2 already cached) and the C SDK.
    "zig_sdk": ["-O", "ReleaseFast", "-lc", "main.zig", "../../sdk/anvil_guest.c"],
}


@pytest.mark.parametrize("example", sorted(ZIG_EXAMPLES))
async def test_zig_example_builds_and_runs(
    executor: WasmExecutor, tmp_path: Path, example: str
) -> None:
    wasm = tmp_path / "text-grep.wasm"
    zig = [sys.executable, "-m", "ziglang", "build-exe", "-target", "wasm32-wasi"]
    built = await asyncio.to_thread(
        subprocess.run,
        [*zig, "-fstrip", f"-femit-bin={wasm}", *ZIG_EXAMPLES[example]],
        cwd=GUEST / "examples" / example,
        check=False,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert built.returncode == 0, built.stderr
    module = wasmtime.Module(wasmtime.Engine(), wasm.read_bytes())
    assert {i.module for i in module.imports} == {"wasi_snapshot_preview1"}
    assert "_start" in {e.name for e in module.exports}

    text = b"alpha\nbeta gamma\nalphabet\n"
    run = await run_guest(executor, "text:grep", [text], {"needle": "alph"}, module=wasm)
    assert run.json() == {"matches": 2}
    assert run.outputs == {"matches.txt": b"alpha\nalphabet\n"}
    run = await run_guest(executor, "text:grep", [text], {}, module=wasm)
    assert run.error() == "text:grep: param needle is required\n"


# -- the same through `anvil-compute run` ------------------------------------------------

# Registers the run command the way daemon.cli does, should it not be listed yet.
_LAUNCHER = """
import sys
from daemon import cli
if "daemon.commands.run" not in cli.COMMAND_MODULES:
    cli.COMMAND_MODULES = (*cli.COMMAND_MODULES, "daemon.commands.run")
sys.exit(cli.main(sys.argv[1:]))
"""


def anvil_run(
    tmp_path: Path, capability: str, inputs: list[bytes], params: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """`anvil-compute run MODULE --input ... --param k=v` in a subprocess; outputs in tmp/out."""
    args = [str(module_path(capability)), "--output-dir", str(tmp_path / "out")]
    args += ["--cache-dir", str(tmp_path / "cache")]
    for i, data in enumerate(inputs):
        (tmp_path / f"input-{i}").write_bytes(data)
        args += ["--input", str(tmp_path / f"input-{i}")]
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    return subprocess.run(
        [sys.executable, "-c", _LAUNCHER, "run", *args],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )


def test_cli_runs_wordcount(tmp_path: Path) -> None:
    data = real_text()
    proc = anvil_run(tmp_path, "text:wordcount", [data], {"top": "25"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == wordcount_in_python(data, top=25)


def test_cli_runs_csv_aggregate(tmp_path: Path) -> None:
    data = sales_csv(seed=11)
    params = {"group_by": "region", "agg": "mean", "column": "amount"}
    proc = anvil_run(tmp_path, "data:csv-aggregate", [data], params)
    assert proc.returncode == 0, proc.stderr
    header, *rows = csv.reader(io.StringIO(proc.stdout.decode(), newline=""))
    assert header == ["region", "mean_amount"]
    got = [(group, float(value)) for group, value in rows]
    assert got == aggregate_in_python(data, "region", "mean", "amount")


def test_cli_runs_image_resize(tmp_path: Path) -> None:
    samples = photo_like(31, 17, 3, 255, seed=3)
    proc = anvil_run(
        tmp_path,
        "image:resize",
        [pnm(31, 17, samples, channels=3)],
        {"width": "12", "height": "40"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output"] == "resized.ppm"
    _, out_w, out_h, _, out = parse_pnm((tmp_path / "out" / "resized.ppm").read_bytes())
    assert (out_w, out_h) == (12, 40)
    assert out == resize_in_python(samples, size=(31, 17), channels=3, out=(12, 40), maxval=255)


def test_cli_runs_digits(tmp_path: Path, train_digits: ModuleType) -> None:
    from sklearn.linear_model import LogisticRegression

    model_bytes = (GUEST / "models" / "digits-logreg.bin").read_bytes()
    model = train_digits.decode_model(model_bytes)
    clf = LogisticRegression()
    clf.coef_, clf.intercept_ = model.layers[0].weights, model.layers[0].biases
    clf.classes_ = np.asarray(model.labels)
    split = train_digits.digits_split()
    images = split.x_test[:120]
    proc = anvil_run(
        tmp_path, "inference:digits", [train_digits.images_csv(images), model_bytes], {}
    )
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)["predictions"]
    assert predictions == clf.predict(images * model.input_scale).tolist()


def test_cli_reports_a_malformed_row(tmp_path: Path) -> None:
    proc = anvil_run(
        tmp_path,
        "data:csv-aggregate",
        [b"a,b\n1,2\n\n3\n"],
        {"group_by": "a", "agg": "sum", "column": "b"},
    )
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert proc.stderr.startswith(b"data:csv-aggregate: line 4: expected 2 fields, got 1\n")


@pytest.mark.parametrize(
    ("capability", "inputs", "params", "message"),
    [
        ("text:wordcount", [b"a b"], {"top": "ten"}, b"param top: expected an integer"),
        ("image:resize", [b"P5 0 2 255\n"], {"width": "3"}, b"bad PNM header: width is 0"),
        ("inference:digits", [b"0," * 63 + b"0\n"], {}, b"inference:digits: "),
    ],
)
def test_cli_reports_bad_input_of_every_capability(
    tmp_path: Path,
    capability: str,
    inputs: list[bytes],
    params: dict[str, str],
    message: bytes,
) -> None:
    """`anvil-compute run` exits non-zero (1, the guest's own) and shows the guest's reason."""
    proc = anvil_run(tmp_path, capability, inputs, params)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stdout == b""
    assert message in proc.stderr, proc.stderr
