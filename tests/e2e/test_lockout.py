"""Lock-out: clients that open connections or calls and then stall must not
lock honest clients out of a worker, the market or the dashboard.

The hostile clients come from many source addresses (all of 127.0.0.0/8 is
loopback on Linux: each socket binds its own 127.x.y.z before it connects),
so per-address limits alone do not stop them. A stalled gRPC call is
hand-made HTTP/2: the connection preface, SETTINGS, and a HEADERS frame that
opens a call, then nothing, not even the request message. When the server
ends a stalled stream (a status or RST_STREAM), the same connection opens
another, so the attack is held for as long as the test runs. A slow
dashboard socket sends half a request line and stops.

Meanwhile an honest client (from 127.0.0.1) must get Hello, a market call
and a dashboard page answered within a few seconds each, and the stalled
calls must be ended by the server's deadlines.
"""

import re
import socket
import time

import pytest

from h2stall import StalledCalls, slow_sockets, source_addresses
from pbwire import decode, field_bytes

from test_workers import PROTOCOL_VERSION, hello_request, unary
from test_hostile import OpenPipe, load

# timing under load: run with no other test beside it (see conftest.py)
pytestmark = pytest.mark.alone

grpc = pytest.importorskip("grpc")

HOSTILE = 300  # more source addresses than the old per-server table of peers (256)


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


# ---------------------------------------------------------------------------
# Worker and market
# ---------------------------------------------------------------------------

def test_stalled_calls_from_many_addresses_do_not_lock_out_a_worker(workers):
    w, = workers(1)
    hostile = StalledCalls(w.addr, "/arceus.Worker/Hello", source_addresses(HOSTILE, 10))
    try:
        assert hostile.refused_connect == 0
        time.sleep(1)  # every stalled call has reached the worker
        with grpc.insecure_channel(w.addr) as ch:
            end = time.monotonic() + 8  # past the request deadline (5 s): calls end and are opened again
            while time.monotonic() < end:
                reply, took = timed(lambda: unary(ch, "Hello", hello_request(), timeout=10))
                assert decode(reply)[1] == [PROTOCOL_VERSION] and took < 3, took
                time.sleep(0.5)
        # the worker's deadline ended the stalled calls (and the new ones are held again)
        deadline = time.monotonic() + 15
        while hostile.ended < HOSTILE and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hostile.ended >= HOSTILE, f"only {hostile.ended} stalled calls ended"
    finally:
        hostile.close()
    w.stop()
    assert re.search(r"calls? cancelled \(DEADLINE_EXCEEDED\): no request within the deadline", w.stderr), \
        w.stderr[-3000:]


def test_stalled_calls_from_many_addresses_do_not_lock_out_the_market(add_account, market, tmp_path):
    db = tmp_path / "market.db"
    token = add_account(db, "alice", "100")
    m = market(db)
    hostile = StalledCalls(m.addr, "/arceus.Market/Heartbeat", source_addresses(HOSTILE, 11))
    try:
        assert hostile.refused_connect == 0
        time.sleep(1)
        with grpc.insecure_channel(m.addr) as ch:
            balance = ch.unary_unary("/arceus.Market/Balance")
            end = time.monotonic() + 8
            while time.monotonic() < end:
                reply, took = timed(lambda: balance(field_bytes(1, token), timeout=10))
                assert decode(reply)[2] == [100 * 10 ** 6] and took < 3, (decode(reply), took)
                time.sleep(0.5)
        deadline = time.monotonic() + 15
        while hostile.ended < HOSTILE and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hostile.ended >= HOSTILE, f"only {hostile.ended} stalled calls ended"
    finally:
        hostile.close()


def test_an_idle_pipe_is_cancelled(workers):
    w, = workers(1, "--pipe-idle-timeout", "2")
    with grpc.insecure_channel(w.addr) as ch:
        unary(ch, "Load", load())
        p = OpenPipe(ch)  # sends no frame
        try:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                list(p.call)
            assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert time.monotonic() - t0 < 10
        finally:
            p.close()
        unary(ch, "Hello", hello_request())  # the worker goes on
    w.stop()
    assert "the stream was idle too long" in w.stderr, w.stderr[-3000:]


# ---------------------------------------------------------------------------
# The dashboard
# ---------------------------------------------------------------------------

def still_open(sockets):
    n = 0
    for s in sockets:
        s.setblocking(False)
        try:
            n += s.recv(1) != b""
        except BlockingIOError:
            n += 1  # nothing to read: open
        except OSError:
            pass
    return n


def honest_get(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"GET /api/overview HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else 0


def test_slow_sockets_do_not_take_the_dashboard_down(add_account, market, tmp_path):
    db = tmp_path / "market.db"
    add_account(db, "alice", "100")
    m = market(db, "--http", "127.0.0.1:0")
    port = int(m.url.rstrip("/").rsplit(":", 1)[1])
    held = []
    try:
        # 300 slow sockets from as many addresses, and 64 more from one
        many = slow_sockets("127.0.0.1", port, source_addresses(HOSTILE, 12))
        one = slow_sockets("127.0.0.1", port, ["127.13.0.1"], per_source=64)
        held = many + one
        time.sleep(1)
        for _ in range(5):
            status, took = timed(lambda: honest_get(port))
            assert status == 200 and took < 3, (status, took)
            time.sleep(0.5)
        # one address holds at most 16 connections
        assert still_open(one) <= 16
        # and a slow socket is closed once it has been quiet for 10 s
        time.sleep(11)
        assert still_open(many) == 0
        assert honest_get(port) == 200
    finally:
        for s in held:
            s.close()
