"""A stranger on the network against a worker: it can neither crash it,
read its stage, change it, nor guess its secrets faster than a few a minute.

The stranger is a foreign client (python grpcio, hand-encoded protobuf from
proto/arceus.proto) that has no worker secret, no lease and no session.
Where the stranger must be another host than the legitimate driver (the
failed-authentication limiter counts per host), its connections go through
a forwarder that dials the worker from another loopback address
(127.0.0.2, 127.0.0.3): the worker then sees that address as the peer.
"""

import json
import random
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import _env
from h2stall import send_oversized
from pbwire import decode, field_bytes, field_varint
from test_hostile import load
from test_workers import MLP_SPEC, frame, hello_request, load_session, pipe, unary, with_session

grpc = pytest.importorskip("grpc")
C = grpc.StatusCode

TOKEN = "correct-horse-battery-42"   # a worker secret of 24 characters
MIB = 1 << 20


def status_of(call):
    """The status code of call(), or OK."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return C.OK, ""


class Forwarder:
    """127.0.0.1:PORT -> target, dialled from `source` (another loopback
    address): the worker sees the client as host `source`."""

    def __init__(self, target, source):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.source = source
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopping = threading.Event()
        self.sockets = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                down, _ = self.listener.accept()
            except OSError:
                continue
            up = socket.socket()
            up.bind((self.source, 0))
            up.connect(self.target)
            self.sockets += [down, up]
            for a, b in ((down, up), (up, down)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                data = a.recv(1 << 16)
                if not data:
                    break
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.stopping.set()
        self.listener.close()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
        for t in self.threads:
            t.join(10)


@pytest.fixture
def forwarders():
    made = []

    def make(target, source="127.0.0.2"):
        f = Forwarder(target, source)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class PeakRss:
    """Samples a process's resident memory every 20 ms while in the block."""

    def __init__(self, pid):
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def _run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.02)

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(10)


def save(ch, session=None, timeout=30):
    req = field_bytes(1, session) if session is not None else b""
    return list(ch.unary_stream("/arceus.Worker/Save")(req, timeout=timeout))


def restore(ch, state, session=None, timeout=60):
    """Restore `state` (bytes) in chunks of 1 MiB, the first with the session."""
    chunks = [field_bytes(1, state[i:i + MIB]) for i in range(0, len(state), MIB)] or [b""]
    if session is not None:
        chunks[0] += field_bytes(2, session)
    return ch.stream_unary("/arceus.Worker/Restore")(iter(chunks), timeout=timeout)


def state_of(chunks):
    return b"".join(decode(c)[1][0] if 1 in decode(c) else b"" for c in chunks)


def scrambled(state, seed=1):
    """The same safetensors state with random weights (moments kept)."""
    n = struct.unpack("<Q", state[:8])[0]
    header = json.loads(state[8:8 + n])
    body = bytearray(state[8 + n:])
    rng = random.Random(seed)
    for name, t in header.items():
        if name == "__metadata__" or name.startswith(("m.", "v.")):
            continue
        a, b = t["data_offsets"]
        body[a:b] = struct.pack(f"<{(b - a) // 4}f", *(rng.uniform(-1, 1) for _ in range((b - a) // 4)))
    return state[:8 + n] + bytes(body)


# ---------------------------------------------------------------------------
# Crash by message size
# ---------------------------------------------------------------------------

def test_a_200_mib_hello_is_refused_and_not_copied(workers):
    w, = workers(1)
    base = rss_kib(w.proc.pid)
    hello = hello_request() + field_bytes(15, b"\0" * (200 * MIB))
    with grpc.insecure_channel(w.addr, options=[("grpc.max_send_message_length", -1)]) as ch:
        with PeakRss(w.proc.pid) as peak:
            code, details = status_of(lambda: unary(ch, "Hello", hello, timeout=120))
        # gRPC (1.51) holds a message whole before anyone may look at its
        # size; nothing more may be made of it: no flat copy, no decoding
        # (which kept three more copies of it, 3.5x in all)
        grown_mib = (peak.peak - base) / 1024
        assert grown_mib < 1.6 * 200, f"the worker grew by {grown_mib:.0f} MiB for a 200 MiB Hello"
        assert code == C.RESOURCE_EXHAUSTED, (code, details)
        assert "the limit is 4096" in details, details
        unary(ch, "Hello", hello_request())  # still serving


def peak_rss_kib(pid):
    """The process's peak resident memory so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def test_oversized_messages_at_once_are_bounded_by_the_servers_memory_quota(workers):
    # gRPC (1.51) takes a message whole before any size limit applies, and
    # its flow control lets a message in as fast as it comes: three strangers
    # sending 300 MiB Hellos at once used to make a worker hold all 900 MiB.
    # The server's resource quota (twice its largest message, 17 MiB here,
    # plus 64 MiB) bounds what its connections may hold: past it gRPC cancels
    # streams to free memory. The senders hold nothing (h2stall).
    w, = workers(1, "--max-frame-mb", "16")
    with grpc.insecure_channel(w.addr) as ch:
        unary(ch, "Hello", hello_request())
    base = peak_rss_kib(w.proc.pid)
    ends = [None] * 3

    def attack(i):
        # Restore: its first chunk may take 60 s to come (a slow link), so
        # the message arrives whole however loaded this machine is
        ends[i] = send_oversized(w.addr, "/arceus.Worker/Restore", 300 * MIB)

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    grown_mib = (peak_rss_kib(w.proc.pid) - base) / 1024
    print(f"calls ended by {ends}; the worker's peak memory grew by {grown_mib:.0f} MiB")
    # the quota (98 MiB) and what the sanitizer build keeps of freed memory
    # (its quarantine, 256 MiB) and its shadow, against 900 MiB sent
    assert grown_mib < 450, f"the worker's peak memory grew by {grown_mib:.0f} MiB ({ends})"
    assert all(e is not None and e != "timeout" for e in ends), ends
    with grpc.insecure_channel(w.addr) as ch:
        unary(ch, "Hello", hello_request())  # still serving


def test_every_worker_method_has_its_own_receive_limit(workers):
    w, = workers(1)
    with grpc.insecure_channel(w.addr) as ch:
        code, details = status_of(lambda: unary(ch, "Load", load(" " * MIB + MLP_SPEC)))
        assert code == C.RESOURCE_EXHAUSTED and "the limit is 131072" in details, (code, details)
        session = load_session(ch, load())
        code, details = status_of(lambda: save(ch, session + "x" * 65536))
        assert code == C.RESOURCE_EXHAUSTED and "the limit is 1024" in details, (code, details)
        big_chunk = field_bytes(1, b"\0" * (2 * MIB)) + field_bytes(2, session)
        code, details = status_of(lambda: ch.stream_unary("/arceus.Worker/Restore")(iter([big_chunk]), timeout=60))
        assert code == C.RESOURCE_EXHAUSTED and "Restore request of" in details, (code, details)
        # the stage is untouched and still served
        assert save(ch, session)


# ---------------------------------------------------------------------------
# Undefined behaviour: an empty first Restore chunk
# ---------------------------------------------------------------------------

def test_a_restore_whose_first_chunk_is_empty(workers):
    w, = workers(1)
    with grpc.insecure_channel(w.addr) as ch:
        session = load_session(ch, load())
        saved = state_of(save(ch, session))
        # an empty chunk (with the session) first, then the state
        chunks = [field_bytes(2, session)] + [field_bytes(1, saved[i:i + MIB]) for i in range(0, len(saved), MIB)]
        r = decode(ch.stream_unary("/arceus.Worker/Restore")(iter(chunks), timeout=60))
        assert r[1][0] == len(saved)
        assert state_of(save(ch, session)) == saved
    assert w.stop() == 0
    assert "runtime error" not in w.stderr, w.stderr[-4000:]


# ---------------------------------------------------------------------------
# Model corruption and theft
# ---------------------------------------------------------------------------

RUN = ("--steps", "40", "--batch", "32", "--micro-batches", "4", "--eval-every", "20", "--threads", "1")


def test_a_stranger_cannot_overwrite_or_read_a_stage_mid_run(run_arceus, arceus_bin, workers, forwarders,
                                                              tmp_path, small_mlp_spec, small_fashion):
    ws = workers(2, "--token", TOKEN)
    via = [forwarders(w.addr) for w in ws]
    attempts = {"saved": 0, "restored": 0, "refused": 0}
    stop = threading.Event()

    def attack():
        # without an account, a secret or a session: read a stage, then
        # write it back with random weights, again and again
        chans = [grpc.insecure_channel(f.addr) for f in via]
        try:
            while not stop.is_set():
                for ch in chans:
                    try:
                        state = state_of(save(ch, timeout=10))
                        attempts["saved"] += 1
                        if state:
                            restore(ch, scrambled(state), timeout=10)
                            attempts["restored"] += 1
                    except grpc.RpcError as e:
                        if e.code() in (C.UNAUTHENTICATED, C.RESOURCE_EXHAUSTED):
                            attempts["refused"] += 1
                time.sleep(0.01)
        finally:
            for ch in chans:
                ch.close()

    thief = threading.Thread(target=attack, daemon=True)
    thief.start()
    try:
        p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, *RUN,
                       "--workers", ",".join(w.addr for w in ws), "--plan", "0-1,2", "--worker-token", TOKEN,
                       "--out", tmp_path / "workers")
    finally:
        stop.set()
        thief.join(60)
    assert p.returncode == 0, p.stderr[-3000:]
    assert attempts["saved"] == 0 and attempts["restored"] == 0, attempts
    assert attempts["refused"] > 0, attempts
    # the model is exactly the one a single process trains
    run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, *RUN, "--out", tmp_path / "one",
               check=True)
    assert ((tmp_path / "one" / "model.safetensors").read_bytes() ==
            (tmp_path / "workers" / "model.safetensors").read_bytes())
    # after the job the stages are still loaded, and still the driver's only
    for f in via:
        with grpc.insecure_channel(f.addr) as ch:
            for session in (None, "", "0" * 64):
                code, _ = status_of(lambda: save(ch, session))
                assert code in (C.UNAUTHENTICATED, C.RESOURCE_EXHAUSTED), code


def test_sessions_bind_save_restore_and_pipe_to_their_load(workers, forwarders):
    w, = workers(1, "--token", TOKEN)
    req = load(raw_extra=field_bytes(13, TOKEN))
    # the driver on 127.0.0.1; strangers on two other hosts (fewer than 5
    # failures each, so the limiter stays out of it)
    strangers = [grpc.insecure_channel(forwarders(w.addr, src).addr) for src in ("127.0.0.2", "127.0.0.3")]
    with grpc.insecure_channel(w.addr) as ch:
        first = load_session(ch, req)
        assert re.fullmatch(r"[0-9a-f]{64}", first), first
        saved = save(ch, first)
        wrong = ("0" if first[0] != "0" else "1") + first[1:]
        for what, session in (("none", None), ("empty", ""), ("one character off", wrong),
                              ("a prefix", first[:32])):
            code, details = status_of(lambda: save(strangers[0], session))
            assert code == C.UNAUTHENTICATED and "session" in details, (what, code, details)
        code, details = status_of(lambda: restore(strangers[1], b"\0" * 64, session=wrong))
        assert code == C.UNAUTHENTICATED, (code, details)
        code, details = status_of(lambda: pipe(strangers[1], [frame(9, step=1)]))
        assert code == C.UNAUTHENTICATED and "no session" in details, (code, details)
        assert save(ch, first) == saved  # nothing changed
        # a new Load ends the first session; the second one works
        second = load_session(ch, req)
        assert second != first
        code, _ = status_of(lambda: save(strangers[1], first))
        assert code == C.UNAUTHENTICATED
        assert save(ch, second) == saved  # the same seed: the same initial state
        assert decode(pipe(ch, [with_session(frame(9, step=3), second)])[0])[1] == [9]
    for s in strangers:
        s.close()


def test_an_idle_stage_is_freed_and_its_session_ends(workers):
    w, = workers(1, "--idle-timeout", "2")
    with grpc.insecure_channel(w.addr) as ch:
        session = load_session(ch, load())
        assert save(ch, session)  # a Save counts as use: the 2 s start again
        time.sleep(5)
        code, details = status_of(lambda: save(ch, session))
        assert code == C.FAILED_PRECONDITION and "not loaded" in details, (code, details)
    assert w.stop() == 0
    assert "the stage is freed" in w.stderr, w.stderr[-3000:]


# ---------------------------------------------------------------------------
# Secrets: length, and guesses rate-limited per host
# ---------------------------------------------------------------------------

def test_short_worker_secrets_are_refused(run_arceus):
    p = run_arceus("worker", "--listen", "127.0.0.1:0", "--token", "fifteen-chars!!", timeout=60)
    assert p.returncode == 2 and "16 to 255" in p.stderr, p.stderr[-2000:]
    env = dict(_env(), ARCEUS_WORKER_TOKEN="too-short-12")
    q = subprocess.run([str(run_arceus.binary), "worker", "--listen", "127.0.0.1:0"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert q.returncode == 2 and "16 to 255" in q.stderr, q.stderr[-2000:]


def test_failed_authentications_are_rate_limited_per_host(workers, forwarders):
    w, = workers(1, "--token", TOKEN)
    guesser, other = forwarders(w.addr, "127.0.0.2"), forwarders(w.addr, "127.0.0.3")
    with grpc.insecure_channel(guesser.addr) as ch:
        for i in range(5):
            code, details = status_of(lambda: unary(ch, "Load", load(raw_extra=field_bytes(13, f"guess-{i:02d}-abcdefghij"))))
            assert code == C.UNAUTHENTICATED, (i, code, details)
        # blocked: even the right secret is refused now, so a guess is never confirmed
        for _ in range(3):
            code, details = status_of(lambda: unary(ch, "Load", load(raw_extra=field_bytes(13, TOKEN))))
            assert code == C.RESOURCE_EXHAUSTED and "too many failed authentications" in details, (code, details)
        unary(ch, "Hello", hello_request())  # Hello needs no secret: still answered
    # another host is not held up: it loads with the secret, and its own
    # wrong sessions count against it alone
    with grpc.insecure_channel(other.addr) as ch:
        session = load_session(ch, load(raw_extra=field_bytes(13, TOKEN)))
        for _ in range(5):
            assert status_of(lambda: save(ch, "f" * 64))[0] == C.UNAUTHENTICATED
        code, details = status_of(lambda: save(ch, session))
        assert code == C.RESOURCE_EXHAUSTED, (code, details)
    with grpc.insecure_channel(w.addr) as ch:  # 127.0.0.1, the driver's host
        assert save(ch, session)
    assert w.stop() == 0
    # logged per burst: the first failure and the block, not every attempt
    lines = [ln for ln in w.stderr.splitlines() if "127.0.0.2" in ln]
    assert len(lines) == 2, "\n".join(lines)
    assert "5 failed authentications from ipv4:127.0.0.2" in lines[1], lines
