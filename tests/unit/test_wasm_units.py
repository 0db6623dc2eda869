"""The WASM executor's pure parts: limits, LRU, sealing, protocol, classification, staging."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wasmtime import TrapCode

from daemon import exceptions
from daemon.cli import build_parser
from daemon.commands import run as run_command
from daemon.executors import result as results
from daemon.executors import staging
from daemon.executors.result import ExecutionResult, OutputFile, RunEnd, ending
from daemon.executors.wasm import protocol
from daemon.executors.wasm.engine import EngineSettings, engine_key
from daemon.executors.wasm.guest_run import GuestRun, with_outputs
from daemon.executors.wasm.job import job_limits
from daemon.executors.wasm.limits import (
    MAX_OUTPUT_SLACK,
    MIB,
    OUTPUT_FOLDERS,
    WASM_PAGE,
    Limits,
    epoch_ticks,
    memory_exhausted,
    output_fs_bytes,
    output_fs_inodes,
)
from daemon.executors.wasm.lru import LruCache
from daemon.executors.wasm.module_cache import seal, unseal, wasmtime_reason
from daemon.executors.wasm.pool import worker_environment
from daemon.executors.wasm.sandbox import blame_memory, classify_error, classify_trap
from daemon.executors.wasm.worker import read_message, serve
from daemon.jobs.state import JobState

# --- limits ------------------------------------------------------------------


def test_default_limits_match_the_issue() -> None:
    limits = Limits()
    assert limits.stdout_bytes == MIB
    assert limits.stderr_bytes == 64 * 1024
    assert limits.fuel > 0
    assert limits.instances == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"fuel": 0},
        {"fuel": -1},
        {"fuel": True},
        {"timeout_s": 0},
        {"timeout_s": math.inf},
        {"timeout_s": math.nan},
        {"memory_bytes": 1000},
        {"memory_bytes": 5 << 30},
        {"stdout_bytes": -1},
        {"tables": 1.5},
    ],
)
def test_limits_refuse_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(exceptions.InvalidArgument):
        Limits(**bad)  # type: ignore[arg-type]


def test_limit_overrides_keep_defaults_for_none() -> None:
    base = Limits(fuel=10, timeout_s=5, memory_bytes=64 * MIB)
    assert base.with_overrides() == base
    changed = base.with_overrides(fuel=20, timeout_s=1.5, memory_mib=2)
    assert (changed.fuel, changed.timeout_s, changed.memory_bytes) == (20, 1.5, 2 * MIB)
    with pytest.raises(exceptions.InvalidArgument):
        base.with_overrides(memory_mib=0.001)


def test_epoch_ticks_are_never_early() -> None:
    assert epoch_ticks(1.0, 0.01) == 101
    assert epoch_ticks(0.0101, 0.01) == 3
    assert epoch_ticks(0.000001, 0.01) == 2


def test_memory_exhausted_within_one_growth_step_of_the_limit() -> None:
    limit = 32 * MIB
    assert memory_exhausted(limit, limit)
    assert memory_exhausted(limit - MIB, limit)  # within 1/16
    assert not memory_exhausted(limit - 4 * MIB, limit)
    assert memory_exhausted(WASM_PAGE, WASM_PAGE)
    assert not memory_exhausted(0, 2 * WASM_PAGE)


# --- LRU ---------------------------------------------------------------------


def test_lru_evicts_least_recently_used_by_count() -> None:
    lru: LruCache[str, int] = LruCache(max_entries=2, max_bytes=100)
    lru.put("a", 1, 1)
    lru.put("b", 2, 1)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3, 1)
    assert lru.keys() == ["a", "c"]
    assert lru.get("b") is None


def test_lru_evicts_by_bytes_and_skips_oversized_values() -> None:
    lru: LruCache[str, str] = LruCache(max_entries=10, max_bytes=10)
    lru.put("a", "a", 4)
    lru.put("b", "b", 4)
    lru.put("c", "c", 4)
    assert lru.keys() == ["b", "c"]
    assert lru.total_bytes == 8
    lru.put("huge", "h", 11)
    assert "huge" not in lru
    assert lru.keys() == ["b", "c"]
    lru.put("b", "b2", 1)  # replacing updates the size
    assert lru.total_bytes == 5
    assert lru.pop("c") == "c"
    assert len(lru) == 1


# --- sealing -----------------------------------------------------------------


def test_seal_round_trip_and_every_mismatch_refused() -> None:
    secret, key, payload = b"s" * 32, "digest\nengine", b"compiled code"
    blob = seal(secret, key, payload)
    assert unseal(secret, key, blob) == payload
    assert unseal(b"t" * 32, key, blob) is None
    assert unseal(secret, "other\nengine", blob) is None
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0x80
        assert unseal(secret, key, bytes(damaged)) is None
    assert unseal(secret, key, blob[:-1]) is None
    assert unseal(secret, key, b"") is None
    assert unseal(secret, key, payload) is None


def test_engine_key_changes_with_engine_settings() -> None:
    assert engine_key(EngineSettings()) == engine_key(EngineSettings())
    assert engine_key(EngineSettings()) != engine_key(EngineSettings(max_wasm_stack=1 << 16))
    assert "wasmtime 50." in engine_key(EngineSettings())


# --- classification ----------------------------------------------------------


def test_wasmtime_reason_keeps_the_cause_and_drops_the_backtrace() -> None:
    trap = (
        "error while executing at wasm backtrace:\n    0:     0x31 - <unknown>!f\n\n"
        "Caused by:\n    wasm trap: call stack exhausted\n"
    )
    assert wasmtime_reason(trap) == "wasm trap: call stack exhausted"
    parse = "failed to parse WebAssembly module\n\nCaused by:\n    0: bad magic\n"
    assert wasmtime_reason(parse) == "failed to parse WebAssembly module: bad magic"
    assert wasmtime_reason("one line") == "one line"
    assert wasmtime_reason("") == "unknown error"


def test_traps_map_to_typed_outcomes() -> None:
    limits = Limits(fuel=99, timeout_s=2)
    fuel = classify_trap(TrapCode.OUT_OF_FUEL, "x", limits)
    assert fuel.outcome is RunEnd.OUT_OF_FUEL
    assert "99" in fuel.message
    timed = classify_trap(TrapCode.INTERRUPT, "x", limits)
    assert timed.outcome is RunEnd.TIMED_OUT
    assert "2 s" in timed.message
    trap = classify_trap(TrapCode.UNREACHABLE, "wasm trap: unreachable", limits)
    assert (trap.outcome, trap.trap_code) == (RunEnd.TRAPPED, "unreachable")
    assert classify_trap(None, "host", limits).trap_code is None


def test_errors_map_to_typed_outcomes() -> None:
    limits = Limits()
    memory = classify_error("memory minimum size of 9 pages exceeds memory limits", limits, True)
    assert memory.outcome is RunEnd.MEMORY_LIMIT
    table = classify_error("table minimum size of 10 elements exceeds table limits", limits, True)
    assert table.outcome is RunEnd.INVALID_MODULE
    host = classify_error("some host error", limits, False)
    assert host.outcome is RunEnd.TRAPPED


def test_failures_at_the_memory_limit_are_blamed_on_memory() -> None:
    trapped = results.trapped("unreachable", "boom")
    blamed = blame_memory(trapped, 32 * MIB, 32 * MIB)
    assert blamed.outcome is RunEnd.MEMORY_LIMIT
    assert "boom" in blamed.message
    assert blame_memory(trapped, MIB, 32 * MIB) is trapped
    hinted = blame_memory(trapped, 20 * MIB, 32 * MIB)
    assert hinted.outcome is RunEnd.TRAPPED
    assert hinted.message.endswith("(its memory was at 20 MiB of its 32 MiB limit)")


def test_result_messages_are_clear() -> None:
    assert results.ok().succeeded
    assert results.nonzero_exit(3).exit_code == 3
    assert "1 MiB" in results.stream_too_large("stdout", MIB).message
    assert "64 KiB" in results.stream_too_large("stderr", 64 * 1024).message
    assert results.size_text(12) == "12 bytes"
    assert "killed" in results.timed_out(1, killed=True).message
    assert results.invalid_module("x").message == "invalid module: x"
    assert not results.crashed("x").succeeded


def test_outputs_over_their_limits_fail_a_successful_run(tmp_path: Path) -> None:
    files = tuple(OutputFile(name=f"f{i}", path=tmp_path / f"f{i}", size=10) for i in range(3))
    ok = results.ok().with_capture(stdout=b"o", stderr=b"", duration_s=1, fuel_consumed=5)
    assert with_outputs(ok, files, Limits()).outputs == files
    assert with_outputs(ok, files, Limits(output_files=3, output_bytes=30)).outputs == files
    many = with_outputs(ok, files, Limits(output_files=2))
    assert many.outcome is RunEnd.OUTPUT_TOO_LARGE
    assert "more than 2 files in /output (max_output_files)" in many.message
    assert many.stdout == b"o"
    assert many.outputs == ()  # nothing of a failed run is reported, so none is uploaded
    big = with_outputs(ok, files, Limits(output_bytes=29))
    assert big.outcome is RunEnd.OUTPUT_TOO_LARGE
    assert "more than 29 bytes written to /output (max_output_bytes)" in big.message
    assert big.outputs == ()
    failed = with_outputs(results.nonzero_exit(1), files, Limits(output_files=0))
    assert failed.outcome is RunEnd.NONZERO_EXIT
    assert failed.outputs == ()


def test_output_limit_messages_name_the_limit() -> None:
    assert results.output_bytes_exceeded(1 << 30).message.startswith(
        "guest output too large: more than 1 GiB written to /output (max_output_bytes)"
    )
    assert results.output_files_exceeded(1000).message.startswith(
        "guest output too large: more than 1000 files in /output (max_output_files)"
    )
    assert "(max_output_files, plus 64 folders or links)" in (
        results.output_names_exceeded(1000, 64).message
    )
    assert results.size_text(3 << 30) == "3 GiB"
    assert results.size_text((1 << 30) + 1) == "1024 MiB"
    assert results.size_text(1500) == "1500 bytes"


def test_the_output_tmpfs_is_bounded_by_the_limits_plus_at_most_64_mib() -> None:
    page = 4096
    for limits in [
        Limits(),
        Limits(output_bytes=0, output_files=0),
        Limits(output_bytes=1500, output_files=3),
        Limits(output_bytes=(1 << 30) + 1, output_files=100_000),
        Limits(output_bytes=10**12, output_files=10**7),
    ]:
        size = output_fs_bytes(limits, page)
        assert size % page == 0
        assert limits.output_bytes < size <= limits.output_bytes + MAX_OUTPUT_SLACK
        # The files, the folder allowance, the root and a spare: none left = one refused.
        assert output_fs_inodes(limits) == limits.output_files + OUTPUT_FOLDERS + 2
    # Room for a file per name, each wasting most of its last page, and one page more:
    # a full tmpfs means a write past the limit was refused.
    small = Limits(output_bytes=1500, output_files=3)
    assert output_fs_bytes(small, page) == page * (1 + (3 + OUTPUT_FOLDERS + 2) + 1)
    assert output_fs_bytes(Limits(), page) == (1 << 30) + page * (1000 + OUTPUT_FOLDERS + 3)
    # Many files: the slack stops at 64 MiB.
    many = Limits(output_bytes=1 << 30, output_files=10**6)
    assert output_fs_bytes(many, page) == (1 << 30) + MAX_OUTPUT_SLACK


# --- protocol ----------------------------------------------------------------


def _request(tmp_path: Path) -> GuestRun:
    return GuestRun(
        digest="ab" * 32,
        module_path=tmp_path / "m.wasm",
        argv=("guest", "k=v"),
        env=(("k", "v"),),
        inputs=(tmp_path / "a", tmp_path / "b"),
        output_dir=tmp_path / "out",
        limits=Limits(fuel=7, timeout_s=0.25),
    )


def _split(data: bytes) -> tuple[dict[str, object], list[bytes]]:
    message = read_message(io.BytesIO(data))
    assert message is not None
    return message


def test_requests_and_results_round_trip(tmp_path: Path) -> None:
    request = _request(tmp_path)
    head, _ = _split(protocol.message("run", **protocol.request_fields(request)))
    assert protocol.request_from(head) == request  # type: ignore[arg-type]
    no_digest = dataclasses.replace(request, digest=None, inputs=())
    head, _ = _split(protocol.message("run", **protocol.request_fields(no_digest)))
    assert protocol.request_from(head) == no_digest  # type: ignore[arg-type]

    result = (
        results.trapped("stack_overflow", "deep")
        .with_capture(stdout=b"\x00\xffout", stderr=b"err", duration_s=0.5, fuel_consumed=12)
        .with_outputs((OutputFile(name="d/x.txt", path=tmp_path / "out" / "d" / "x.txt", size=3),))
    )
    head, blobs = _split(protocol.result_message(result, digest="cd" * 32, cached=["d1"]))
    assert head["cached"] == ["d1"]
    assert head["digest"] == "cd" * 32
    assert protocol.result_from(head, *blobs) == result  # type: ignore[arg-type]


def test_worker_errors_map_back_to_daemon_errors_only() -> None:
    head, _ = _split(protocol.error_message(exceptions.DigestMismatch("bad bytes")))
    error = protocol.error_from(head)  # type: ignore[arg-type]
    assert type(error) is exceptions.DigestMismatch
    assert str(error) == "bad bytes"
    for name in ["SystemExit", "ErrorCode", "nope"]:
        assert type(protocol.error_from({"error": name, "text": "t"})) is exceptions.AnvilError


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1, 2]", b'{"no": "type"}', b'{"type": "x", "blobs": 7}'],
)
def test_malformed_messages_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_head(payload)


def test_frames_are_bounded_and_truncation_is_detected() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.frame_length(protocol.HEADER.pack(protocol.MAX_FRAME + 1))
    data = protocol.message("x", (b"blob",))
    with pytest.raises(protocol.ProtocolError):
        read_message(io.BytesIO(data[:-1]))
    assert read_message(io.BytesIO(b"")) is None


def _hello(**fields: object) -> bytes:
    return protocol.message(
        "hello",
        cache_dir=None,
        cache_secret=None,
        engine={"max_wasm_stack": 1 << 20, "epoch_tick_s": 0.01, "parallel_compilation": False},
        memory_cache_entries=4,
        memory_cache_bytes=1 << 20,
        max_module_bytes=1 << 20,
        **fields,
    )


def _replies(data: bytes) -> list[dict[str, object]]:
    replies = io.BytesIO(data)
    heads = []
    while (message := read_message(replies)) is not None:
        heads.append(message[0])
    return heads


def test_worker_loop(tmp_path: Path) -> None:
    """hello → ready; a run whose module is garbage → started never sent, a typed result.

    The real worker process: it enters its own mount namespace before anything else.
    """
    module = tmp_path / "m.wasm"
    module.write_bytes(b"garbage")
    request = dataclasses.replace(
        _request(tmp_path), digest=hashlib.sha256(b"garbage").hexdigest(), inputs=()
    )
    bad_digest = protocol.message(
        "run", **{**protocol.request_fields(request), "digest": "00" * 32}
    )
    run = protocol.message("run", **protocol.request_fields(request))
    worker = subprocess.run(
        [sys.executable, "-m", "daemon.executors.wasm.worker"],
        input=_hello(scratch_dir=str(tmp_path / "scratch")) + bad_digest + run,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr.decode()
    heads = _replies(worker.stdout)
    assert [h["type"] for h in heads] == ["ready", "error", "result"]
    assert heads[-1]["outcome"] == "invalid_module"
    assert list((tmp_path / "scratch").iterdir()) == []  # it removed its own folder


def test_a_worker_without_its_own_mount_namespace_answers_hello_with_why(
    tmp_path: Path,
) -> None:
    refused = exceptions.Unavailable("cannot bound /output: unshare(...) refused: ...")
    out = io.BytesIO()
    run = protocol.message("run", **protocol.request_fields(_request(tmp_path)))
    assert serve(io.BytesIO(_hello(scratch_dir=str(tmp_path)) + run), out, refused) == 1
    (head,) = _replies(out.getvalue())
    assert protocol.error_from(head).args == refused.args
    assert isinstance(protocol.error_from(head), exceptions.Unavailable)
    assert list(tmp_path.iterdir()) == []  # it made nothing, ran nothing


# --- staging -----------------------------------------------------------------


def test_params_keep_their_order_and_refuse_bad_names() -> None:
    assert staging.param_pairs({"b": "1", "a": "2"}) == (("b", "1"), ("a", "2"))
    assert staging.param_pairs([("k", "v=w")]) == (("k", "v=w"),)
    for bad in [[("", "v")], [("a=b", "v")], [("a", "v\0")]]:
        with pytest.raises(exceptions.InvalidArgument):
            staging.param_pairs(bad)


def test_stage_inputs_links_them_as_0_1_2(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    a = tmp_path / "src" / "a.txt"
    a.write_text("A")
    target = tmp_path / "staged"
    target.mkdir()
    staged = staging.stage_inputs([a, a], target)
    assert [p.name for p in staged] == ["0", "1"]
    assert os.path.samefile(staged[0], a)
    with pytest.raises(exceptions.InvalidArgument, match="not a readable file"):
        staging.stage_inputs([tmp_path / "src"], tmp_path / "other")


def test_a_fifo_is_staged_by_link_only(tmp_path: Path) -> None:
    fifo = tmp_path / "stream"
    os.mkfifo(fifo)
    (tmp_path / "staged").mkdir()
    (staged,) = staging.stage_inputs([fifo], tmp_path / "staged")
    assert os.path.samefile(staged, fifo)


def test_output_folder_is_made_for_the_guest_and_removed_when_left_empty(
    tmp_path: Path,
) -> None:
    fresh = tmp_path / "jobs" / "j1.out"
    assert staging.open_output_dir(fresh) is True
    assert staging.close_output_dir(fresh, created=True) == ()
    assert not fresh.exists()  # nothing for the caller to clean up

    assert staging.open_output_dir(fresh) is True
    (fresh / "sub").mkdir()
    (fresh / "sub" / "r.txt").write_text("result")
    (outputs,) = staging.close_output_dir(fresh, created=True)
    assert (outputs.name, outputs.size) == ("sub/r.txt", 6)
    assert outputs.path.read_text() == "result"

    given = tmp_path / "given"
    given.mkdir()
    assert staging.open_output_dir(given) is False
    assert staging.close_output_dir(given, created=False) == ()
    assert given.is_dir()  # the caller's folder stays, even empty

    with pytest.raises(exceptions.InvalidArgument, match="not empty"):
        staging.open_output_dir(fresh)
    (tmp_path / "file").write_text("x")
    with pytest.raises(exceptions.InvalidArgument, match="cannot create output folder"):
        staging.open_output_dir(tmp_path / "file" / "out")


def test_params_become_argv_and_env_as_the_guide_says() -> None:
    pairs = (("group_by", "city"), ("n", "3"), ("café", "x"))
    assert staging.guest_argv("data:csv", pairs) == (
        "data:csv",
        "--group_by=city",
        "--n=3",
        "--café=x",
    )
    assert staging.guest_env(pairs) == (
        ("ANVIL_PARAM_GROUP_BY", "city"),
        ("ANVIL_PARAM_N", "3"),
        ("ANVIL_PARAM_CAF__", "x"),  # each byte of 'é' outside [A-Za-z0-9]
    )


def test_collect_outputs_keeps_regular_files_and_removes_links(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "top.txt").write_text("12345")
    (tmp_path / "sub" / "inner.bin").write_bytes(b"\0" * 3)
    (tmp_path / "link").symlink_to("/etc/passwd")
    (tmp_path / "dirlink").symlink_to(tmp_path / "sub")
    found = staging.collect_outputs(tmp_path)
    assert [(f.name, f.size) for f in found] == [("sub/inner.bin", 3), ("top.txt", 5)]
    assert not (tmp_path / "link").exists()
    assert not (tmp_path / "dirlink").is_symlink()


def test_check_empty_dir(tmp_path: Path) -> None:
    staging.check_empty_dir(tmp_path)
    (tmp_path / "x").write_text("")
    with pytest.raises(exceptions.InvalidArgument, match="not empty"):
        staging.check_empty_dir(tmp_path)
    with pytest.raises(exceptions.InvalidArgument, match="does not exist"):
        staging.check_empty_dir(tmp_path / "missing")


# --- the CLI's and the runner's mapping --------------------------------------


@pytest.mark.parametrize(
    ("result", "status"),
    [
        (results.ok(), 0),
        (results.nonzero_exit(9), 9),
        (results.timed_out(1, killed=False), 124),
        (results.out_of_fuel(1), 125),
        (results.invalid_module("x"), 125),
        (results.crashed("x"), 125),
    ],
)
def test_cli_exit_status(result: ExecutionResult, status: int) -> None:
    assert run_command.exit_status(result) == status


def test_cli_params_split_at_the_first_equals_sign() -> None:
    args = build_parser().parse_args(["run", "m.wasm", "--param", "k=v=w", "--param", "e="])
    assert args.params == [("k", "v=w"), ("e", "")]


def test_job_limits_take_the_capabilitys_and_the_jobs_values() -> None:
    defaults = Limits()
    assert job_limits(defaults, fuel=0, memory_mib=0, timeout_s=0) == defaults
    limits = job_limits(defaults, fuel=5, memory_mib=8, timeout_s=2.5)
    assert (limits.fuel, limits.memory_bytes, limits.timeout_s) == (5, 8 * MIB, 2.5)


def test_job_states_from_run_ends() -> None:
    assert ending(results.ok()) == (JobState.SUCCEEDED, "")
    assert ending(results.timed_out(1, killed=True))[0] is JobState.TIMED_OUT
    state, error = ending(results.out_of_fuel(5))
    assert state is JobState.FAILED and "fuel" in error
    exited = results.nonzero_exit(1).with_capture(
        stdout=b"", stderr=b"text:wc: line 7: bad\n", duration_s=0, fuel_consumed=1
    )
    assert ending(exited) == (JobState.FAILED, "text:wc: line 7: bad")
    assert ending(results.nonzero_exit(2)) == (JobState.FAILED, "guest exited with code 2")
    assert ending(results.refused("image missing")) == (JobState.FAILED, "image missing")


def test_results_are_json_safe_over_the_wire() -> None:
    head, _ = _split(protocol.result_message(results.ok(), digest="ab" * 32, cached=[]))
    assert json.loads(json.dumps(head)) == head


def test_workers_inherit_no_daemon_secrets() -> None:
    env = worker_environment(
        {"PATH": "/bin", "PYTHONPATH": "/src", "ANVIL_DATABASE_URL": "postgres://u:pw@h/db"}
    )
    assert env == {"PATH": "/bin", "PYTHONPATH": "/src"}


def test_the_daemon_checks_what_a_worker_says_it_left(tmp_path: Path) -> None:
    """Outputs come from a process that ran guest code: only regular files inside
    the output folder pass, with sizes measured on the daemon's side."""
    from daemon.executors.wasm.executor import checked_outputs

    out = tmp_path / "job.out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "r.txt").write_text("12345")
    (tmp_path / "secret").write_text("s")
    (out / "link").symlink_to(tmp_path / "secret")

    def reported(name: str, size: int = 1) -> tuple[OutputFile, ...]:
        return (OutputFile(name=name, path=Path("/anywhere") / name, size=size),)

    (good,) = checked_outputs(reported("sub/r.txt", size=0), out)
    assert (good.name, good.size, good.path) == ("sub/r.txt", 5, out.resolve() / "sub" / "r.txt")
    for bad in ("../secret", "/etc/passwd", "link", "missing.txt", "sub"):
        with pytest.raises(exceptions.InvalidArgument):
            checked_outputs(reported(bad), out)


def test_empty_dir_removes_everything_inside_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    folder = tmp_path / "folder"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "sub" / "deeper" / "f").write_text("x")
    (folder / "g").write_text("x")
    (folder / "link").symlink_to(outside)
    staging.empty_dir(folder)
    assert list(folder.iterdir()) == []
    assert (outside / "keep").read_text() == "x"
