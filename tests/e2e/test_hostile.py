"""Hostile input to the processes: for each gRPC entry point of the worker
(Hello, Load, Pipe, Save, Restore) and of the market, a table of malformed
requests (truncated, oversized, negative, wrong type, wrong shape, huge
counts, overlong strings, out-of-range numbers) sent by a foreign client
(python grpcio, hand-encoded protobuf). Each must get a clear status (the
code, and a message naming the problem), and after each the process must
still serve a valid request; the fixtures check the processes' stderr for
sanitizer reports when they stop. Then the limits: gRPC message sizes, Pipe
streams and calls open per client, and the worker's --max-mem. Last, every
rpc of proto/arceus.proto must have rows here, and no table may shrink.

The readers of files and frames have their own tables in
tests/unit/test_hostile.c; fuzz/ fuzzes the same code.
"""

import json
import math
import re
import socket
import struct
import threading

import pytest

from conftest import REPO, wait_for
from test_market import NO_WORKER_CHECKS, profile, register
from pbwire import (acquire, decode, field_bytes, field_double, field_f32, field_varint, hand_over, replace, usage,
                    varint)
from test_workers import MLP_SPEC, frame, hello_request, load_session, pipe, unary, with_session

grpc = pytest.importorskip("grpc")
C = grpc.StatusCode

# Rows sent per table by the tests that ran, printed by
# test_zz_every_entry_point_has_its_table_of_hostile_rows.
ROWS = {}


def expect_status(call, code, words, what):
    """call() must fail with `code` and a message containing every one of `words`."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    err = e.value
    assert err.code() == code, f"{what}: {err.code()} {err.details()!r}, expected {code}"
    for w in words:
        assert w in (err.details() or ""), f"{what}: {err.details()!r} lacks {w!r}"


def mlp(**over):
    spec = {"type": "mlp", "inputs": 8, "hidden": [6], "classes": 3, "activation": "relu",
            "dropout": 0.0}
    spec.update(over)
    return json.dumps(spec)


def load(spec=MLP_SPEC, first=0, last=2, rows=4, mbs=1, schedule=1, index=0, count=1, seed=7,
         opt=None, nxt=None, threads=None, raw_extra=b""):
    """A LoadRequest; every field can be set out of range."""
    if opt is None:
        opt = field_varint(1, 0) + field_f32(2, 0.9) + field_f32(3, 0.99) + field_f32(4, 1e-8)
    m = (field_bytes(1, spec) + field_varint(2, first) + field_varint(3, last) +
         field_varint(4, rows) + field_varint(5, mbs) + field_varint(6, schedule) +
         field_varint(7, index) + field_varint(8, count) + field_varint(9, seed) +
         field_bytes(10, opt))
    if nxt is not None:
        m += field_bytes(11, nxt)
    if threads is not None:
        m += field_varint(12, threads)
    return m + raw_extra


def opt(kind=0, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.0):
    return (field_varint(1, kind) + field_f32(2, beta1) + field_f32(3, beta2) + field_f32(4, eps) +
            field_f32(5, wd))


def chunk(data):
    return field_bytes(1, data)


def safetensors(header, data=b""):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


U32 = (1 << 32) - 1
GPT = json.dumps({"type": "gpt", "vocab_size": 5, "block_size": 8, "n_layer": 2, "n_head": 2,
                  "n_embd": 8, "dropout": 0.0, "vocab": [10, 32, 97, 98, 99]})


def share(address, h0, h1, u0, u1):
    """A TpShare: heads [h0, h1) and hidden units [u0, u1) on a worker."""
    return (field_bytes(1, address) + field_varint(2, h0) + field_varint(3, h1) + field_varint(4, u0) +
            field_varint(5, u1))

# (what, request, code, words in the message)
HELLO_ROWS = [
    ("not protobuf", b"\xff\xff\xff", C.INVALID_ARGUMENT, ["malformed HelloRequest"]),
    ("truncated varint", b"\x08", C.INVALID_ARGUMENT, ["malformed HelloRequest"]),
    ("string cut short", field_varint(1, 1) + b"\x12\x10ab", C.INVALID_ARGUMENT,
     ["malformed HelloRequest"]),
    ("version of wrong type", field_bytes(1, "one"), C.INVALID_ARGUMENT, ["malformed HelloRequest"]),
    ("version 0", field_varint(1, 0), C.FAILED_PRECONDITION, ["version 0"]),
    ("version 2^32-1", field_varint(1, U32), C.FAILED_PRECONDITION, [f"version {U32}"]),
    ("version 2^64-1", field_varint(1, (1 << 64) - 1), C.FAILED_PRECONDITION, ["version"]),
]

LOAD_ROWS = [
    ("not protobuf", b"\xff\xff\xff", C.INVALID_ARGUMENT, ["malformed LoadRequest"]),
    ("truncated", load()[:-5], C.INVALID_ARGUMENT, ["malformed LoadRequest"]),
    ("spec of wrong wire type", field_varint(1, 5), C.INVALID_ARGUMENT, ["malformed LoadRequest"]),
    ("empty", b"", C.INVALID_ARGUMENT, ["malformed JSON"]),
    ("spec not JSON", load("not json"), C.INVALID_ARGUMENT, ["malformed JSON"]),
    ("spec of 100 KB", load(" " * 100000 + MLP_SPEC), C.INVALID_ARGUMENT,
     ["spec_json of 100", "the limit is 65536"]),
    ("spec key unknown", load(mlp(bogus=1)), C.INVALID_ARGUMENT, ["bogus"]),
    ("spec number as string", load(mlp(inputs="8")), C.INVALID_ARGUMENT, ['"inputs" must be a number']),
    ("spec negative size", load(mlp(classes=-3)), C.INVALID_ARGUMENT, ['"classes" must be an integer']),
    ("spec huge size", load(mlp(inputs=1e300)), C.INVALID_ARGUMENT, ['"inputs" must be an integer']),
    ("spec 17 hidden layers", load(mlp(hidden=[4] * 17)), C.INVALID_ARGUMENT, ["at most 16"]),
    ("spec vocab of 300", load(json.dumps({"type": "gpt", "vocab": list(range(256)) + [1] * 44})),
     C.INVALID_ARGUMENT, ["vocab"]),
    ("spec of 64 TB", load(mlp(inputs=1 << 24, hidden=[1 << 20], classes=1 << 20)),
     C.RESOURCE_EXHAUSTED, ["needs about", "--max-mem"]),
    ("empty unit range", load(first=1, last=1), C.INVALID_ARGUMENT, ["units [1, 1) out of range"]),
    ("units past the model", load(first=0, last=9), C.INVALID_ARGUMENT, ["units [0, 9)", "has 2"]),
    ("units 2^32-1", load(first=0, last=U32), C.INVALID_ARGUMENT, ["out of range"]),
    ("no micro-batches", load(mbs=0), C.INVALID_ARGUMENT, ["0 micro-batches"]),
    ("2^32-1 micro-batches", load(mbs=U32), C.INVALID_ARGUMENT, ["micro-batches"]),
    ("rows 0", load(rows=0), C.INVALID_ARGUMENT, ["of 0 rows"]),
    ("rows 2^21", load(rows=1 << 21), C.INVALID_ARGUMENT, ["of 2097152 rows"]),
    ("65 stages", load(count=65, nxt="127.0.0.1:1"), C.INVALID_ARGUMENT, ["of 65"]),
    ("stage index past the count", load(index=3, count=2), C.INVALID_ARGUMENT, ["stage 3 of 2"]),
    ("schedule 7", load(schedule=7), C.INVALID_ARGUMENT, ["schedule 7"]),
    ("optimizer kind 9", load(opt=opt(kind=9)), C.INVALID_ARGUMENT, ["out of range"]),
    ("beta1 NaN", load(opt=opt(beta1=math.nan)), C.INVALID_ARGUMENT, ["optimizer settings", "nan"]),
    ("beta2 1.5", load(opt=opt(beta2=1.5)), C.INVALID_ARGUMENT, ["optimizer settings"]),
    ("eps negative", load(opt=opt(eps=-1.0)), C.INVALID_ARGUMENT, ["optimizer settings"]),
    ("weight decay infinite", load(opt=opt(wd=math.inf)), C.INVALID_ARGUMENT, ["optimizer settings"]),
    ("threads 5000", load(threads=5000), C.INVALID_ARGUMENT, ["out of range"]),
    # slow links: warm-up and compression (fields 17-20)
    ("extra warm-up past the micro-batches", load(mbs=2, raw_extra=field_varint(17, 3)), C.INVALID_ARGUMENT,
     ["3 extra warm-up"]),
    ("extra warm-up 2^32-1", load(raw_extra=field_varint(17, U32)), C.INVALID_ARGUMENT, ["extra warm-up"]),
    ("compress_up 3 (auto is no codec)", load(raw_extra=field_varint(18, 3)), C.INVALID_ARGUMENT,
     ["compression 3/0/0"]),
    ("compress_down 2^32-1", load(raw_extra=field_varint(19, U32)), C.INVALID_ARGUMENT, ["compression"]),
    ("compress_tp 9", load(raw_extra=field_varint(20, 9)), C.INVALID_ARGUMENT, ["compression 0/0/9"]),
    ("next_worker missing", load(count=2), C.INVALID_ARGUMENT, ["next_worker must be given"]),
    ("next_worker on the last stage", load(nxt="127.0.0.1:1"), C.INVALID_ARGUMENT,
     ["next_worker must be given"]),
    ("next_worker of 1000 characters", load(count=2, nxt="h" * 995 + ":5001"), C.INVALID_ARGUMENT,
     ["longer than 255"]),
    # a next stage through the relay (next_relay_pass, field 21): a pass of
    # its form, to a worker whose market named a relay, with a next_worker
    ("relay pass without a next_worker", load(raw_extra=field_bytes(21, "1.1.9:" + "0" * 64)),
     C.INVALID_ARGUMENT, ["next_relay_pass is not a relay pass, or there is no next_worker"]),
    ("relay pass that is not one", load(count=2, nxt="127.0.0.1:1", raw_extra=field_bytes(21, "a@evil:80/x")),
     C.INVALID_ARGUMENT, ["next_relay_pass is not a relay pass"]),
    ("relay pass of 1000 characters", load(count=2, nxt="127.0.0.1:1", raw_extra=field_bytes(21, "1" * 1000)),
     C.INVALID_ARGUMENT, ["next_relay_pass is not a relay pass"]),
    ("relay pass to a worker without a relay", load(count=2, nxt="127.0.0.1:1",
                                                    raw_extra=field_bytes(21, "1.1.9:" + "0" * 64)),
     C.INVALID_ARGUMENT, ["has no relay to reach next_worker"]),
    # tensor-parallel roles (a GPT of 2 heads, 32 hidden units)
    ("rank and leader at once", load(GPT, 1, 2, raw_extra=field_bytes(14, share("", 0, 1, 0, 16)) +
                                     field_bytes(14, share("127.0.0.1:1", 1, 2, 16, 32)) +
                                     field_bytes(15, share("", 0, 1, 0, 16))),
     C.INVALID_ARGUMENT, ["not both"]),
    ("rank's heads past the model", load(GPT, 1, 2, raw_extra=field_bytes(15, share("", 0, 9, 0, 16))),
     C.INVALID_ARGUMENT, ["heads [0, 9)", "2 heads"]),
    ("rank's hidden units 2^32-1", load(GPT, 1, 2, raw_extra=field_bytes(15, share("", 0, 1, 0, U32))),
     C.INVALID_ARGUMENT, ["do not fit"]),
    ("group of one", load(GPT, 1, 2, raw_extra=field_bytes(14, share("", 0, 2, 0, 32))),
     C.INVALID_ARGUMENT, ["group of 1 members"]),
    ("group with a gap", load(GPT, 1, 2, raw_extra=field_bytes(14, share("", 0, 1, 0, 16)) +
                              field_bytes(14, share("127.0.0.1:1", 1, 2, 20, 32))),
     C.INVALID_ARGUMENT, ["does not continue"]),
    ("member address of 1000 characters", load(GPT, 1, 2, raw_extra=field_bytes(14, share("", 0, 1, 0, 16)) +
                                                field_bytes(14, share("h" * 995 + ":5001", 1, 2, 16, 32))),
     C.INVALID_ARGUMENT, ["longer than 255"]),
]

RESTORE_ROWS = [
    # (what, chunks, code, words): after a valid Load
    ("not a Chunk", [b"\xff\xff\xff"], C.INVALID_ARGUMENT, ["malformed Chunk"]),
    ("no chunks", [], C.INVALID_ARGUMENT, ["Restore"]),
    ("not safetensors", [chunk(b"hello")], C.INVALID_ARGUMENT, ["Restore", "too short"]),
    ("header length 2^63", [chunk(struct.pack("<Q", 1 << 63) + b"{}")], C.INVALID_ARGUMENT,
     ["100 MiB"]),
    ("2^40 elements claimed", [chunk(safetensors(
        {"fc.0.weight": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}, b"\0" * 4))],
     C.INVALID_ARGUMENT, ["shape needs"]),
    ("tensor of the wrong shape", [chunk(safetensors(
        {"fc.0.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))],
     C.INVALID_ARGUMENT, ["fc.0"]),
    ("more than the stage's state", [chunk(b"\0" * (1 << 20))] * 66, C.INVALID_ARGUMENT,
     ["larger than the stage state"]),
]


def test_worker_hello_and_load_tables(workers):
    w, = workers(1)
    with grpc.insecure_channel(w.addr) as ch:
        for what, req, code, words in HELLO_ROWS:
            expect_status(lambda: unary(ch, "Hello", req), code, words, f"Hello {what}")
            unary(ch, "Hello", hello_request())
        # Save and Restore before any Load
        expect_status(lambda: list(ch.unary_stream("/arceus.Worker/Save")(b"", timeout=30)),
                      C.FAILED_PRECONDITION, ["stage not loaded"], "Save before Load")
        expect_status(lambda: ch.stream_unary("/arceus.Worker/Restore")(iter([chunk(b"x")]), timeout=30),
                      C.FAILED_PRECONDITION, ["stage not loaded"], "Restore before Load")
        for what, req, code, words in LOAD_ROWS:
            expect_status(lambda: unary(ch, "Load", req), code, words, f"Load {what}")
            unary(ch, "Hello", hello_request())
        assert decode(unary(ch, "Load", load()))[1] == [8 * 6 + 6 + 6 * 3 + 3]
    ROWS["Hello"] = len(HELLO_ROWS)
    ROWS["Load"] = len(LOAD_ROWS)
    ROWS["Save/Restore before Load"] = 2


def test_worker_restore_table(workers):
    w, = workers(1)
    with grpc.insecure_channel(w.addr) as ch:
        session = load_session(ch, load())
        save_req = field_bytes(1, session)
        saved = list(ch.unary_stream("/arceus.Worker/Save")(save_req, timeout=30))
        restore = ch.stream_unary("/arceus.Worker/Restore")
        for what, chunks, code, words in RESTORE_ROWS:
            # the first chunk carries the session (Chunk.session, field 2)
            chunks = [chunks[0] + field_bytes(2, session)] + chunks[1:] if chunks else []
            expect_status(lambda: restore(iter(chunks), timeout=60), code, words, f"Restore {what}")
            unary(ch, "Hello", hello_request())
        # the state saved before is restored whole: nothing above changed it
        r = decode(restore(iter([saved[0] + field_bytes(2, session)] + saved[1:]), timeout=60))
        assert r[1][0] == sum(len(decode(c)[1][0]) for c in saved)
        assert list(ch.unary_stream("/arceus.Worker/Save")(save_req, timeout=30)) == saved
    ROWS["Restore"] = len(RESTORE_ROWS)


def audit_rows(session):
    """(what, request, code, words) for Worker.Audit on a stage whose Load
    asked for digests (LoadRequest.commit_digests, field 23) and ran no step."""
    req = lambda s=session, step=0: field_bytes(1, s) + field_varint(2, step)  # noqa: E731
    return [
        ("not protobuf", b"\xff\xff\xff", C.INVALID_ARGUMENT, ["malformed AuditRequest"]),
        ("request of 2 KiB", req() + field_bytes(9, b"\0" * 2048), C.RESOURCE_EXHAUSTED, ["the limit is"]),
        ("no session", field_varint(2, 0), C.UNAUTHENTICATED, ["the call carries no session"]),
        ("another session", req("ab" * 32), C.UNAUTHENTICATED, ["not the session of the stage loaded here"]),
        ("a step never run", req(step=5), C.NOT_FOUND, ["step 5"]),
        ("step 2^64-1", req(step=(1 << 64) - 1), C.NOT_FOUND, ["no step 18446744073709551615"]),
    ]


def test_worker_audit_table(workers):
    w, = workers(1)
    with grpc.insecure_channel(w.addr) as ch:
        audit = lambda req: list(ch.unary_stream("/arceus.Worker/Audit")(req, timeout=30))  # noqa: E731
        expect_status(lambda: audit(field_varint(2, 0)), C.FAILED_PRECONDITION, ["stage not loaded"],
                      "Audit before Load")
        # a Load that did not ask for digests keeps nothing to audit
        session = load_session(ch, load())
        expect_status(lambda: audit(field_bytes(1, session)), C.FAILED_PRECONDITION,
                      ["keeps no steps for audits"], "Audit of a stage without digests")
        session = load_session(ch, load(raw_extra=field_varint(23, 1)))
        rows = audit_rows(session)
        for what, req, code, words in rows:
            expect_status(lambda: audit(req), code, words, f"Audit {what}")
            unary(ch, "Hello", hello_request())
    ROWS["Audit"] = len(rows) + 2


def pipe_rows():
    f32 = lambda n: b"\0" * (4 * n)  # noqa: E731
    act = frame(1, nmb=1, rows=1, dtype=0, shape=(1, 8), payload=f32(8))
    return [
        ("not protobuf", [b"\xff\xff\xff"], ["bad frame", "truncated"]),
        ("unknown kind", [frame(99)], ["unknown frame kind 99"]),
        ("negative kind", [frame(-1)], ["unknown frame kind -1"]),
        ("unknown dtype", [frame(1, nmb=1, rows=1, dtype=9, shape=(1, 8), payload=f32(8))],
         ["unknown dtype 9"]),
        ("shape and payload disagree", [frame(1, nmb=1, rows=1, dtype=0, shape=(10,), payload=f32(3))],
         ["shape gives 40 bytes but the payload has 12"]),
        ("five dimensions", [frame(1, nmb=1, dtype=0, shape=(1, 1, 1, 1, 1), payload=f32(1))],
         ["more than 4 dimensions"]),
        ("negative dimension", [frame(1, nmb=1, dtype=0, shape=(-1,))], ["bad or oversized shape"]),
        ("2^40 elements claimed", [frame(1, nmb=1, dtype=0, shape=(1 << 40,))], ["oversized"]),
        ("over --max-frame-mb 1", [frame(1, nmb=1, dtype=0, shape=(1 << 19,))],
         ["exceeds the 1048576 byte limit"]),
        ("micro-batch past the count", [act.replace(field_varint(4, 1), field_varint(4, 1) +
                                                    field_varint(3, 5))], ["micro-batch 5"]),
        ("targets not whole int32", [frame(9) + field_bytes(9, b"\0" * 6)], ["not whole int32"]),
        ("payload cut short", [frame(9) + varint(10 << 3 | 2) + varint(100) + b"\0" * 10],
         ["truncated frame"]),
        ("257 coalesced frames", [frame(9) + field_bytes(15, frame(9)) * 257],
         ["more than 256 frames"]),
        ("bad coalesced frame", [frame(9) + field_bytes(15, frame(42))], ["unknown frame kind 42"]),
    ]


def test_worker_pipe_table(workers):
    w, = workers(1, "--max-frame-mb", "1")
    rows = pipe_rows()
    with grpc.insecure_channel(w.addr) as ch:
        session = load_session(ch, load())
        for what, frames, words in rows:
            expect_status(lambda: pipe(ch, frames), C.INVALID_ARGUMENT, words, f"Pipe {what}")
            unary(ch, "Hello", hello_request())
        # a message over the gRPC limit (max frame 1 MiB -> 17 MiB messages) is
        # refused by gRPC before it is read whole
        big = frame(9) + field_bytes(10, b"\0" * (18 << 20))
        expect_status(lambda: pipe(ch, [big]), C.RESOURCE_EXHAUSTED, ["message larger than max"],
                      "Pipe message of 18 MiB")
    # the next client is served: a SYNC frame comes back
    with grpc.insecure_channel(w.addr) as ch:
        replies = pipe(ch, [with_session(frame(9, step=5), session)])
        assert decode(replies[0])[1] == [9]
    ROWS["Pipe"] = len(rows) + 1


# ---------------------------------------------------------------------------
# The market
# ---------------------------------------------------------------------------

def progress(lease, step=1, total=10, items_per_s=1.0, unit="samples", eta=1.0, wall=1.0, val=None,
             timings=(), plan=None):
    """A ReportProgressRequest: timings as (stage, busy s, idle s), val as (step, loss)."""
    m = (field_bytes(1, lease) + field_varint(2, step) + field_varint(3, total) + field_double(4, items_per_s) +
         field_bytes(5, unit) + field_double(6, eta) + field_double(10, wall))
    if val is not None:
        m += field_varint(7, 1) + field_varint(8, val[0]) + field_double(9, val[1])
    for stage, busy, idle in timings:
        m += field_bytes(11, field_varint(1, stage) + field_double(2, busy) + field_double(3, idle))
    if plan is not None:
        m += field_bytes(12, plan)
    return m


def plan_stage(stage, first, last, device="127.0.0.1:5001"):
    """A PlanStage of one member."""
    return field_bytes(1, field_varint(1, stage) + field_varint(2, first) + field_varint(3, last) +
                       field_bytes(4, "linear") + field_bytes(6, field_bytes(2, device)))


def plan_link(stage=0, src="driver", to="127.0.0.1:5001", down=2.5, compress="int8", moved=0.5):
    """A PlanLink (JobPlan field 6): the link into `stage`."""
    return field_bytes(6, field_varint(1, stage) + field_bytes(2, src) + field_bytes(3, to) +
                       field_double(4, down) + field_double(5, 2.5) + field_double(6, 40.0) +
                       field_bytes(7, compress) + field_double(8, 0.6) + field_double(9, 0.6) +
                       field_double(10, moved) + field_double(11, 0.6) + field_double(12, 2.1) +
                       field_double(13, 2.1))


def market_rows(token, other, pid, lease):
    """(method, what, request, code, words)"""
    reg = lambda address="127.0.0.1:5001", prof=None, tok=token: (  # noqa: E731
        field_bytes(1, tok) + field_bytes(2, address) + field_bytes(3, profile() if prof is None else prof))
    bad_acquire = ["AcquireLease arguments out of range"]
    return [
        ("RegisterProvider", "not protobuf", b"\xff\xff\xff", C.INVALID_ARGUMENT, ["malformed"]),
        ("RegisterProvider", "truncated", reg()[:-3], C.INVALID_ARGUMENT, ["malformed"]),
        ("RegisterProvider", "token of wrong wire type", field_varint(1, 7), C.INVALID_ARGUMENT,
         ["malformed"]),
        ("RegisterProvider", "no token", reg(tok=""), C.UNAUTHENTICATED, ["no account token"]),
        ("RegisterProvider", "token of 10,000 characters", reg(tok="a" * 10000), C.UNAUTHENTICATED,
         ["malformed account token"]),
        ("RegisterProvider", "token not hex", reg(tok="z" * 64), C.UNAUTHENTICATED,
         ["malformed account token"]),
        ("RegisterProvider", "unknown token", reg(tok="0" * 64), C.UNAUTHENTICATED,
         ["unknown account token"]),
        ("RegisterProvider", "address of 300 characters", reg(address="h" * 295 + ":5001"),
         C.INVALID_ARGUMENT, ["1..255 characters"]),
        ("RegisterProvider", "address with a space", reg(address="a b:5001"), C.INVALID_ARGUMENT,
         ["not allowed"]),
        ("RegisterProvider", "port 99999", reg(address="host:99999"), C.INVALID_ARGUMENT,
         ["out of range"]),
        ("RegisterProvider", "no port", reg(address="host"), C.INVALID_ARGUMENT, ["not HOST:PORT"]),
        ("RegisterProvider", "gflops NaN", reg(prof=profile(gflops=math.nan)), C.INVALID_ARGUMENT,
         ["gflops"]),
        ("RegisterProvider", "gflops infinite", reg(prof=profile(gflops=math.inf)), C.INVALID_ARGUMENT,
         ["gflops"]),
        ("RegisterProvider", "gflops negative", reg(prof=profile(gflops=-1.0)), C.INVALID_ARGUMENT,
         ["gflops"]),
        ("RegisterProvider", "memory 2^63", reg(prof=profile(mem=1 << 63)), C.INVALID_ARGUMENT,
         ["mem_bytes"]),
        ("RegisterProvider", "cores 2^32-1", reg(prof=profile(cores=U32)), C.INVALID_ARGUMENT,
         ["cores"]),
        ("RegisterProvider", "price negative", reg(prof=profile(price=-1)), C.INVALID_ARGUMENT,
         ["price"]),
        ("Heartbeat", "provider id -1", field_bytes(1, token) + field_varint(2, -1),
         C.INVALID_ARGUMENT, ["not a provider id"]),
        ("Heartbeat", "provider id 2^62", field_bytes(1, token) + field_varint(2, 1 << 62),
         C.NOT_FOUND, []),
        ("Heartbeat", "another account's provider", field_bytes(1, other) + field_varint(2, pid),
         C.PERMISSION_DENIED, []),
        ("ListProviders", "token of wrong wire type", field_double(1, 1.0), C.INVALID_ARGUMENT,
         ["malformed"]),
        ("Ledger", "account of 1000 characters", field_bytes(1, token) + field_bytes(2, "x" * 1000),
         C.INVALID_ARGUMENT, ["longer than"]),
        ("Ledger", "another account", field_bytes(1, token) + field_bytes(2, "bob"),
         C.PERMISSION_DENIED, []),
        ("Balance", "not protobuf", b"\x0a\xff", C.INVALID_ARGUMENT, ["malformed"]),
        ("AcquireLease", "no devices", acquire(token, devices=0), C.INVALID_ARGUMENT, bad_acquire),
        ("AcquireLease", "65 devices", acquire(token, devices=65), C.INVALID_ARGUMENT, bad_acquire),
        ("AcquireLease", "2^32-1 devices", acquire(token, devices=U32), C.INVALID_ARGUMENT, bad_acquire),
        ("AcquireLease", "negative steps", acquire(token, est_steps=-1), C.INVALID_ARGUMENT, bad_acquire),
        ("AcquireLease", "2^62 steps", acquire(token, est_steps=1 << 62), C.INVALID_ARGUMENT,
         bad_acquire),
        ("AcquireLease", "negative budget", acquire(token, max_credits=-1), C.INVALID_ARGUMENT,
         bad_acquire),
        ("AcquireLease", "no FLOPs", acquire(token, flops=0), C.INVALID_ARGUMENT, bad_acquire),
        ("AcquireLease", "2^62 FLOPs", acquire(token, flops=1 << 62), C.INVALID_ARGUMENT, bad_acquire),
        ("AcquireLease", "spec of 5000 characters", acquire(token, spec="s" * 5000), C.INVALID_ARGUMENT,
         bad_acquire),
        ("AcquireLease", "memory 2^63", acquire(token, min_mem=1 << 63), C.INVALID_ARGUMENT,
         bad_acquire),
        ("AcquireLease", "no model (a driver older than plans)", acquire(token, model=None),
         C.FAILED_PRECONDITION, ["prices every step from the model itself"]),
        ("AcquireLease", "model spec of 20,000 bytes", acquire(token, model="{" + " " * 20000 + "}"),
         C.INVALID_ARGUMENT, ["model_spec of 20002 bytes"]),
        ("AcquireLease", "model not JSON", acquire(token, model="{mlp"), C.INVALID_ARGUMENT, ["model spec"]),
        ("AcquireLease", "micro-batches of 2^31 rows", acquire(token, mb_rows=1 << 31), C.INVALID_ARGUMENT,
         ["rows"]),
        ("AcquireLease", "schedule 7", acquire(token, schedule=7), C.INVALID_ARGUMENT, ["schedule 7"]),
        ("AcquireLease", "a split of 65 stages", acquire(token, stage_units=[1] * 65), C.INVALID_ARGUMENT,
         ["a split of 65 stages"]),
        ("AcquireLease", "a split not covering the model", acquire(token, stage_units=[5]), C.INVALID_ARGUMENT,
         ["not covered once"]),
        ("ReportUsage", "lease token not hex", usage("q" * 64), C.UNAUTHENTICATED, ["lease token"]),
        ("ReportUsage", "lease token of 10,000 characters", usage("a" * 10000), C.UNAUTHENTICATED,
         ["lease token"]),
        ("ReportUsage", "unknown lease", usage("0" * 64), C.UNAUTHENTICATED, ["unknown or released"]),
        ("ReportUsage", "negative step", usage(lease, step=-1, stages=((0, pid, 10 ** 9),)),
         C.INVALID_ARGUMENT, ["step -1"]),
        ("ReportUsage", "FLOPs not the plan's (the renter's price)", usage(lease, stages=((0, pid, 1),)),
         C.INVALID_ARGUMENT, ["differ from the lease's plan"]),
        ("ReportUsage", "65 stages", usage(lease, stages=[(i, pid, 1) for i in range(65)]),
         C.INVALID_ARGUMENT, ["65 stages"]),
        ("ReportUsage", "a provider not in the lease", usage(lease, stages=((0, pid + 99, 0),)),
         C.INVALID_ARGUMENT, ["not the lease's at that stage"]),
        ("ReportUsage", "stage 2^32-1", usage(lease, stages=((U32, pid, 10 ** 9),)),
         C.INVALID_ARGUMENT, ["out of range"]),
        ("ReportUsage", "negative FLOPs", usage(lease, stages=((0, pid, -5),)), C.INVALID_ARGUMENT,
         ["out of range"]),
        ("ReportUsage", "2^62 FLOPs", usage(lease, stages=((0, pid, 1 << 62),)), C.INVALID_ARGUMENT,
         ["out of range"]),
        ("ReleaseLease", "status unknown", field_bytes(1, lease) + field_bytes(2, "bogus"),
         C.INVALID_ARGUMENT, ['"bogus"']),
        ("ReleaseLease", "status of 10,000 characters", field_bytes(1, lease) + field_bytes(2, "d" * 10000),
         C.INVALID_ARGUMENT, ["status"]),
        ("ReleaseLease", "negative step", field_bytes(1, lease) + field_bytes(2, "done") +
         field_varint(3, -5), C.INVALID_ARGUMENT, ["step -5"]),
        ("CheckLease", "provider not the caller's", field_bytes(1, other) + field_bytes(2, lease) +
         field_varint(3, pid), C.PERMISSION_DENIED, ["not one of this account's"]),
        ("CheckLease", "lease token malformed", field_bytes(1, token) + field_bytes(2, "x" * 300) +
         field_varint(3, pid), C.PERMISSION_DENIED, ["malformed lease token"]),
        ("ListJobs", "token of wrong wire type", field_varint(1, 1), C.INVALID_ARGUMENT, ["malformed"]),
        ("GetJob", "job -1", field_bytes(1, token) + field_varint(2, -1), C.NOT_FOUND, ["no job -1"]),
        ("GetJob", "job 2^63-1", field_bytes(1, token) + field_varint(2, (1 << 63) - 1), C.NOT_FOUND,
         ["no job"]),
        ("GetJob", "another account's job", field_bytes(1, token) + field_varint(2, 1),
         C.PERMISSION_DENIED, []),
        ("Balance", "request of 100 KB", field_bytes(1, token) + field_bytes(15, b"\0" * 100000),
         C.RESOURCE_EXHAUSTED, ["Balance request of 100", "the limit is 65536"]),
        ("ReplaceProvider", "not protobuf", b"\xff\xff\xff", C.INVALID_ARGUMENT, ["malformed"]),
        ("ReplaceProvider", "unknown lease", replace("0" * 64, pid, 0), C.UNAUTHENTICATED, ["unknown or released"]),
        ("ReplaceProvider", "lease token not hex", replace("q" * 64, pid, 0), C.UNAUTHENTICATED, ["lease token"]),
        ("ReplaceProvider", "negative kept steps", replace(lease, pid, -1), C.INVALID_ARGUMENT, ["kept_steps -1"]),
        ("ReplaceProvider", "2^62 kept steps", replace(lease, pid, 1 << 62), C.INVALID_ARGUMENT, ["out of range"]),
        ("ReplaceProvider", "reason of 1000 characters", replace(lease, pid, 0, "r" * 1000), C.INVALID_ARGUMENT,
         ["1000 characters out of range"]),
        ("ReplaceProvider", "a provider not in the lease", replace(lease, pid + 99, 0), C.INVALID_ARGUMENT,
         ["not in the lease"]),
        ("HandOver", "not protobuf", b"\xff\xff\xff", C.INVALID_ARGUMENT, ["malformed"]),
        ("HandOver", "unknown lease", hand_over("0" * 64, pid, 0), C.UNAUTHENTICATED, ["unknown or released"]),
        ("HandOver", "lease token not hex", hand_over("q" * 64, pid, 0), C.UNAUTHENTICATED, ["lease token"]),
        ("HandOver", "the provider's account token", hand_over(token, pid, 0), C.UNAUTHENTICATED,
         ["unknown or released"]),
        ("HandOver", "negative step", hand_over(lease, pid, -1), C.INVALID_ARGUMENT, ["step -1"]),
        ("HandOver", "2^62 steps", hand_over(lease, pid, 1 << 62), C.INVALID_ARGUMENT, ["out of range"]),
        ("HandOver", "2^62 bytes of memory", hand_over(lease, pid, 0, 1 << 62), C.INVALID_ARGUMENT,
         ["min_mem_bytes"]),
        ("HandOver", "a provider not in the lease", hand_over(lease, pid + 99, 0), C.INVALID_ARGUMENT,
         ["not in the lease"]),
        ("HandOver", "a member that did not say it is leaving", hand_over(lease, pid, 0), C.FAILED_PRECONDITION,
         ["has not said it is leaving"]),
        ("ReportProgress", "not protobuf", b"\xff\xff\xff", C.INVALID_ARGUMENT, ["malformed"]),
        ("ReportProgress", "unknown lease", progress("0" * 64), C.UNAUTHENTICATED, ["unknown or released"]),
        ("ReportProgress", "negative step", progress(lease, step=-1), C.INVALID_ARGUMENT, ["out of range"]),
        ("ReportProgress", "2^62 total steps", progress(lease, total=1 << 62), C.INVALID_ARGUMENT, ["out of range"]),
        ("ReportProgress", "throughput NaN", progress(lease, items_per_s=math.nan), C.INVALID_ARGUMENT,
         ["out of range"]),
        ("ReportProgress", "ETA infinite", progress(lease, eta=math.inf), C.INVALID_ARGUMENT, ["out of range"]),
        ("ReportProgress", "wall time negative", progress(lease, wall=-1.0), C.INVALID_ARGUMENT, ["out of range"]),
        ("ReportProgress", "unit of 10,000 characters", progress(lease, unit="u" * 10000), C.INVALID_ARGUMENT,
         ["out of range"]),
        ("ReportProgress", "validation loss NaN", progress(lease, val=(1, math.nan)), C.INVALID_ARGUMENT,
         ["validation loss out of range"]),
        ("ReportProgress", "65 stage timings", progress(lease, timings=[(i, 1.0, 0.0) for i in range(65)]),
         C.INVALID_ARGUMENT, ["65 stage timings"]),
        ("ReportProgress", "stage 2^32-1 timing", progress(lease, timings=[(U32, 1.0, 0.0)]), C.INVALID_ARGUMENT,
         ["timing", "out of range"]),
        ("ReportProgress", "busy time NaN", progress(lease, timings=[(0, math.nan, 0.0)]), C.INVALID_ARGUMENT,
         ["stage 0 timing"]),
        ("ReportProgress", "plan of no stages", progress(lease, plan=field_varint(2, 4) + field_bytes(3, "1f1b")),
         C.INVALID_ARGUMENT, ["plan: 0 stages"]),
        ("ReportProgress", "plan stages out of order", progress(lease, plan=plan_stage(1, 0, 1) + field_varint(2, 4)),
         C.INVALID_ARGUMENT, ["plan: stage 0", "out of order or range"]),
        ("ReportProgress", "plan member address of 1000 characters",
         progress(lease, plan=plan_stage(0, 0, 1, "h" * 995 + ":5001") + field_varint(2, 4)), C.INVALID_ARGUMENT,
         ["plan: stage 0 member 0"]),
        ("ReportProgress", "plan link compressed as zip",
         progress(lease, plan=plan_stage(0, 0, 1) + field_varint(2, 4) + plan_link(compress="zip")),
         C.INVALID_ARGUMENT, ["plan: link 0", "compression zip"]),
        ("ReportProgress", "plan link MB/s NaN",
         progress(lease, plan=plan_stage(0, 0, 1) + field_varint(2, 4) + plan_link(down=math.nan)),
         C.INVALID_ARGUMENT, ["plan: link 0"]),
        ("ReportProgress", "plan link moved 1e300 MB",
         progress(lease, plan=plan_stage(0, 0, 1) + field_varint(2, 4) + plan_link(moved=1e300)),
         C.INVALID_ARGUMENT, ["plan: link 0"]),
        ("ReportProgress", "plan link from a page's markup",
         progress(lease, plan=plan_stage(0, 0, 1) + field_varint(2, 4) + plan_link(src="<script>x</script>")),
         C.INVALID_ARGUMENT, ["plan: link 0 from"]),
        ("ReportProgress", "plan of more links than stages",
         progress(lease, plan=plan_stage(0, 0, 1) + field_varint(2, 4) + plan_link() + plan_link(stage=1)),
         C.INVALID_ARGUMENT, ["plan: 2 links for 1 stages"]),
        ("ReportAudit", "unknown lease", audit_report("0" * 64, pid), C.UNAUTHENTICATED, ["unknown or released"]),
        ("ReportAudit", "step -1", audit_report(lease, pid, step=(1 << 64) - 1), C.INVALID_ARGUMENT,
         ["step -1", "out of range"]),
        ("ReportAudit", "stage 5000", audit_report(lease, pid, stage=5000), C.INVALID_ARGUMENT,
         ["stage 5000"]),
        ("ReportAudit", "a pass with evidence", audit_report(lease, pid, material=b"x"), C.INVALID_ARGUMENT,
         ["evidence with a pass"]),
        ("ReportAudit", "a failure without evidence", audit_report(lease, pid, passed=False), C.INVALID_ARGUMENT,
         ["a failure without evidence"]),
        ("ReportAudit", "a pass for a provider not in the lease", audit_report(lease, pid + 1000),
         C.INVALID_ARGUMENT, ["not the lease's member"]),
        ("NoSuchMethod", "unknown method", b"", C.UNIMPLEMENTED, []),
    ]


def audit_report(lease, pid, stage=0, step=0, passed=True, material=b""):
    """A ReportAuditRequest: by default a pass of the member's step 0."""
    return (field_bytes(1, lease) + field_varint(2, pid) + field_varint(3, stage) + field_varint(4, step) +
            (field_varint(5, 1) if passed else b"") + (field_bytes(6, material) if material else b""))


def test_market_table(add_account, market, tmp_path):
    db = tmp_path / "market.db"
    token = add_account(db, "alice", "100")
    other = add_account(db, "bob", "100")
    m = market(db, *NO_WORKER_CHECKS)
    pid, _ = register(m.addr, token, "127.0.0.1:5001")
    with grpc.insecure_channel(m.addr) as ch:
        call = lambda method, req: ch.unary_unary(f"/arceus.Market/{method}")(req, timeout=30)  # noqa: E731
        lease = decode(call("AcquireLease", acquire(other)))[3][0].decode()
        rows = market_rows(token, other, pid, lease)
        for method, what, req, code, words in rows:
            expect_status(lambda: call(method, req), code, words, f"{method} {what}")
            assert decode(call("Balance", field_bytes(1, token)))[1] == [b"alice"]
        # the lease survived the bad reports and is released normally
        call("ReleaseLease", field_bytes(1, lease) + field_bytes(2, "cancelled"))
    ROWS["Market"] = len(rows)


def http_raw(host, port, request, timeout=30):
    """Send raw bytes, return (status code, body) of the reply (0 when the
    server closed without one)."""
    data = b""
    with socket.create_connection((host, port), timeout=timeout) as c:
        try:
            c.sendall(request)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before reading it all
        try:
            while chunk_ := c.recv(65536):
                data += chunk_
        except ConnectionResetError:
            pass
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return (int(m.group(1)) if m else 0), data.partition(b"\r\n\r\n")[2]


def test_market_dashboard_table(add_account, market, tmp_path):
    db = tmp_path / "market.db"
    token = add_account(db, "alice", "100")
    port = int(re.search(r":(\d+)/$", market(db, "--http", "127.0.0.1:0").url).group(1))
    # (the market is stopped, SIGTERM and exit 0, and checked by the `procs` fixture)
    auth = f"Authorization: Bearer {token}\r\n".encode()

    def req(path, headers=b"", method=b"GET", body=b""):
        return (method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers +
                (b"Content-Length: %d\r\n" % len(body) if body else b"") + b"\r\n" + body)

    rows = [
        ("not HTTP", b"GARBAGE\r\n\r\n", (0, 400)),  # closed without a reply, or 400
        ("request line of 100 KB", req(b"/" + b"a" * 100000), (414,)),
        ("header of 100 KB", req(b"/api/me", b"X-Pad: " + b"p" * 100000 + b"\r\n"), (431, 413, 400)),
        ("token of 10,000 characters", req(b"/api/me", b"Authorization: Bearer " + b"a" * 10000 + b"\r\n"),
         (401,)),
        ("token not hex", req(b"/api/me", b"Authorization: Bearer " + b"z" * 64 + b"\r\n"), (401,)),
        ("not a bearer token", req(b"/api/me", b"Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l\r\n"),
         (401,)),
        ("job id 2^70", req(b"/api/jobs/1180591620717411303424", auth), (404,)),
        ("job id negative", req(b"/api/jobs/-1", auth), (404,)),
        ("job id not a number", req(b"/api/jobs/1%00", auth), (404,)),
        ("since not a number", req(b"/api/jobs/1?since=abc", auth), (400, 404)),
        ("since 1e400", req(b"/api/jobs/1?since=1e400", auth), (400, 404)),
        ("unknown API", req(b"/api/" + b"x" * 500, auth), (404,)),
        ("path outside the page", req(b"/../../etc/passwd"), (404,)),
        ("POST with a body", req(b"/api/me", auth, b"POST", b"x" * 1000), (405,)),
        # answered from the headers; the body is never read
        ("GET with a body", req(b"/api/me", auth, b"GET", b"x" * 1000), (200, 400, 413)),
    ]
    for what, raw, codes in rows:
        status, body = http_raw("127.0.0.1", port, raw)
        assert status in codes, f"{what}: {status} {body[:200]!r}, expected {codes}"
        if status == 401:
            assert b"token" in body, (what, body)
        status, body = http_raw("127.0.0.1", port, req(b"/api/overview"))
        assert status == 200, (what, status)
    ROWS["Market dashboard (HTTP)"] = len(rows)


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

class OpenPipe:
    """A Pipe stream held open: its request iterator blocks until closed."""

    def __init__(self, ch):
        self.done = threading.Event()
        self.call = ch.stream_stream("/arceus.Worker/Pipe")(self._frames(), timeout=60)

    def _frames(self):
        self.done.wait(60)
        return
        yield  # noqa: unreachable: makes this a generator

    def close(self):
        self.done.set()
        self.call.cancel()


def test_pipe_streams_per_client_are_limited(workers):
    w, = workers(1, "--max-pipes", "2")
    with grpc.insecure_channel(w.addr) as ch:
        session = load_session(ch, load())
        held = [OpenPipe(ch), OpenPipe(ch)]
        # the third is refused at once, without a handler thread, naming the limit
        expect_status(lambda: pipe(ch, [frame(9)]), C.RESOURCE_EXHAUSTED,
                      ["2 /arceus.Worker/Pipe calls open from ipv4:127.0.0.1", "limit per client"],
                      "third Pipe")
        unary(ch, "Hello", hello_request())  # other calls go on
        for p in held:
            p.close()
    # closed streams no longer count: a new client's Pipe is served
    with grpc.insecure_channel(w.addr) as ch:
        assert decode(pipe(ch, [with_session(frame(9, step=1), session)])[0])[1] == [9]
    ROWS["limits: Pipe streams"] = 1


def test_calls_per_client_are_limited(workers):
    # 64 calls at once from one host (here Pipes, each waiting for the stage)
    w, = workers(1, "--max-pipes", "200")
    with grpc.insecure_channel(w.addr) as ch:
        unary(ch, "Load", load())
        held = [OpenPipe(ch) for _ in range(64)]
        expect_status(lambda: unary(ch, "Hello", hello_request()), C.RESOURCE_EXHAUSTED,
                      ["64 calls open from ipv4:127.0.0.1", "limit per client"], "65th call")
        for p in held:
            p.close()

    # the worker counts a call closed once gRPC tells it the call was cancelled,
    # which on a busy machine may come a moment after the client closed it
    def hello_again():
        with grpc.insecure_channel(w.addr) as ch:
            try:
                return unary(ch, "Hello", hello_request()) is not None
            except grpc.RpcError as e:
                assert e.code() == C.RESOURCE_EXHAUSTED, e
                return False
    wait_for("a call once the 64 were closed", hello_again, timeout=20)
    ROWS["limits: calls per client"] = 1


def test_load_over_max_mem_is_refused_before_allocating(workers, run_arceus):
    w, = workers(1, "--max-mem", "1M")
    fashion = json.dumps({"type": "mlp", "inputs": 784, "hidden": [512, 512], "classes": 10,
                          "activation": "relu", "dropout": 0.0})
    with grpc.insecure_channel(w.addr) as ch:
        # 669,706 parameters x 4 copies x 4 bytes is 10.7 MB before activations
        expect_status(lambda: unary(ch, "Load", load(fashion, 0, 3, rows=32)), C.RESOURCE_EXHAUSTED,
                      ["Load of units 0-2", "needs about 1", "MB; this worker allows 1.0 MB",
                       "--max-mem"], "Load over --max-mem")
        # the one unit that fits is loaded
        unary(ch, "Load", load())
    for bad in ("0", "-5", "12X", "5P", ""):
        p = run_arceus("worker", "--listen", "127.0.0.1:0", "--max-mem", bad, check=False)
        assert p.returncode == 2 and "--max-mem expects a size" in p.stderr, (bad, p.stderr)
    p = run_arceus("worker", "--listen", "127.0.0.1:0", "--max-pipes", "0", check=False)
    assert p.returncode == 2 and "max-pipes" in p.stderr
    ROWS["limits: --max-mem"] = 1
    ROWS["worker CLI limit flags"] = 6


def proto_methods(service):
    """The rpc names of `service` in proto/arceus.proto."""
    text = (REPO / "proto" / "arceus.proto").read_text()
    body = re.search(r"^service %s \{(.*?)^\}" % service, text, re.M | re.S)
    assert body, f"no service {service} in proto/arceus.proto"
    return re.findall(r"^\s*rpc (\w+)\(", body.group(1), re.M)


# The least each table must hold: the row counts when these floors were set.
# A row taken out (or a table emptied by mistake) makes the file weaker
# without any test failing, except test_zz_every_entry_point_has_its_table_of_hostile_rows.
MIN_ROWS = {"Hello": 7, "Load": 38, "Save/Restore before Load": 2, "Restore": 7, "Pipe": 15,
            "Market": 77, "Market dashboard (HTTP)": 15}


def worker_rows_by_method():
    """{Worker rpc: hostile rows sent to it} (the limits tests aside)."""
    return {"Hello": len(HELLO_ROWS), "Load": len(LOAD_ROWS), "Save": 1, "Restore": len(RESTORE_ROWS) + 1,
            "Pipe": len(pipe_rows()) + 1, "Audit": len(audit_rows("s")) + 2}


def test_zz_every_entry_point_has_its_table_of_hostile_rows(capsys):
    """Every rpc of the Worker and Market services in proto/arceus.proto
    has hostile rows in this file (a new rpc without them fails here), no
    table is smaller than its floor in MIN_ROWS, no two rows of a table
    share a name, and every table that ran in this session sent all its
    rows. Runs last in this file, and prints how many rows each table had."""
    worker = worker_rows_by_method()
    market = market_rows("a" * 64, "b" * 64, 1, "c" * 64)
    per_market_method = {}
    for method, *_ in market:
        per_market_method[method] = per_market_method.get(method, 0) + 1
    missing = [f"Worker.{m}" for m in proto_methods("Worker") if not worker.get(m)]
    missing += [f"Market.{m}" for m in proto_methods("Market") if not per_market_method.get(m)]
    assert not missing, f"entry points of proto/arceus.proto with no hostile rows: {missing}"
    unknown = sorted(set(per_market_method) - set(proto_methods("Market")) - {"NoSuchMethod"})
    assert not unknown, f"market rows for methods that proto/arceus.proto does not have: {unknown}"

    sizes = {"Hello": len(HELLO_ROWS), "Load": len(LOAD_ROWS), "Save/Restore before Load": 2,
             "Restore": len(RESTORE_ROWS), "Pipe": len(pipe_rows()) + 1, "Audit": len(audit_rows("s")) + 2,
             "Market": len(market)}
    for table, rows in (("Hello", HELLO_ROWS), ("Load", LOAD_ROWS), ("Restore", RESTORE_ROWS),
                        ("Pipe", pipe_rows()), ("Market", [(m, w) for m, w, *_ in market])):
        names = [r[:2] if table == "Market" else r[0] for r in rows]
        twice = sorted({str(n) for n in names if names.count(n) > 1})
        assert not twice, f"{table}: rows named twice: {twice}"
    for table, floor in MIN_ROWS.items():
        size = ROWS.get(table, sizes.get(table))
        if size is not None:
            assert size >= floor, f"the {table} table has {size} rows, fewer than its floor of {floor}"
    # a table that ran sent every row it has
    for table, size in sizes.items():
        if table in ROWS:
            assert ROWS[table] == size, f"the {table} test sent {ROWS[table]} rows of {size}"

    with capsys.disabled():
        shown = {**sizes, **ROWS}
        print("\nhostile-input rows:", ", ".join(f"{k} {v}" for k, v in shown.items()),
              f"(total {sum(shown.values())})")
