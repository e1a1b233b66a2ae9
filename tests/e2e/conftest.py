"""Shared fixtures for the end-to-end tests of the `arceus` binary.

The binary comes from $ARCEUS_BIN (default: bin/arceus in the repository).
In CI it is the AddressSanitizer + UBSan build, so every run is checked for
sanitizer reports and for death by a signal, and the workloads are small.

Commands that run to completion go through `run_arceus`. Long-lived
processes (markets, workers, providers, a driver in the background) are
started through a `Procs` group, which owns them and stops them when the
test ends, however it ends:

    procs                      Procs for this test (function scope)
    procs.start(name, *args)   `arceus ARGS...` in the background -> Proc
    procs.spawn(name, argv)    any command in the background -> Proc
    market(db, *extra, listen="127.0.0.1:0")
                               `arceus market`, ready: .addr, .port (.url with --http)
    worker(*extra)             `arceus worker --listen 127.0.0.1:0 --threads 1 EXTRA...`
    workers(n, *extra)         n of them, as a list
    provider(market, token, *extra, heartbeat=1)
                               `arceus provide`, registered: .id, .addr, .gflops, .gib, .price
    leased_worker(market, token, price, gflops=150.0)
                               a provider registered over gRPC whose `arceus worker`
                               requires a lease: .id (the provider id), .addr
    relay(to, delay_ms, rate_mbit, up_delay_ms=None, up_rate_mbit=None)
                               bench/wan_relay in front of `to` (an emulated WAN
                               link, one-way delay and rate cap per direction): .addr
    add_account(db, name, credits=None) -> the account token
    wait_for(what, fn, timeout=90)      poll fn() until truthy, or fail

(`market`, `worker`, `provider`, `leased_worker` and `relay` are procs.market etc.)

Every Proc writes stdout and stderr to files beside the test (tmp_path):
polled, so no test can hang on a full pipe. At teardown each process still
running gets SIGTERM and must exit 0 within 60 s; a process stopped with
SIGSTOP by the test is killed; no process may have died from a signal the
test did not send it (Proc.kill, Proc.stop), and none may have a sanitizer
report in its stderr. A module-scoped fixture can own processes with
`Procs(arceus_bin, directory)` and call `stop_all()` itself.
"""

import gzip
import json
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import sys
import time
from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "alone: measures time or pace, so `make e2e` runs it after the parallel part, with "
        "no other test beside it")


REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
FASHION = Path("/usr/share/datasets/fashion-mnist")

# tests/ref/refmodels.py: PyTorch twins of the engine's models.
sys.path.insert(0, str(REPO / "tests" / "ref"))

SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error",
                     "UndefinedBehaviorSanitizer", "ThreadSanitizer")

# Generous: the ASan build on two busy cores is many times slower than release.
DEFAULT_TIMEOUT = 300


def _binary_path():
    p = os.environ.get("ARCEUS_BIN")
    path = Path(p) if p else REPO / "bin" / "arceus"
    if not path.is_absolute():
        path = (REPO / path).resolve()
    return path


@pytest.fixture(scope="session")
def arceus_bin():
    path = _binary_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"arceus binary not found or not executable: {path} "
                    "(build it with make, or set ARCEUS_BIN)")
    return path


def assert_no_crash(proc):
    """The process exited by itself (no signal) and no sanitizer spoke."""
    assert proc.returncode >= 0, (
        f"arceus died from signal {-proc.returncode}\nstderr:\n{proc.stderr[-4000:]}")
    for marker in SANITIZER_MARKERS:
        assert marker not in proc.stderr, f"sanitizer report ({marker}):\n{proc.stderr[-6000:]}"


def _env():
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:" + env.get("ASAN_OPTIONS", "")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    env.setdefault("LSAN_OPTIONS", "")
    # audits by replay draw at random (from the OS) and a passed one releases
    # escrow early: the tests of money count what escrow holds, so runs audit
    # only where a test asks (--audit-rate, test_audit.py)
    env.setdefault("ARCEUS_AUDIT_RATE", "0")
    return env


class Runner:
    def __init__(self, binary):
        self.binary = binary

    def __call__(self, *args, timeout=DEFAULT_TIMEOUT, cwd=None, check=False, env=None):
        """Run `arceus ARGS...`; returns the CompletedProcess (text mode).
        `env` changes the tests' environment: a variable set to None is removed.

        Always asserts the process was not killed by a signal and that no
        sanitizer report appeared; with check=True also that it exited 0.
        """
        cmd = [str(self.binary)] + [str(a) for a in args]
        run_env = _env()
        for k, v in (env or {}).items():
            if v is None:
                run_env.pop(k, None)
            else:
                run_env[k] = v
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                                  timeout=timeout, cwd=cwd, env=run_env)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n"
                        f"stderr so far:\n{(e.stderr or b'')[-2000:]!r}")
        assert_no_crash(proc)
        if check:
            assert proc.returncode == 0, (
                f"{' '.join(cmd)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
        return proc


@pytest.fixture(scope="session")
def run_arceus(arceus_bin):
    return Runner(arceus_bin)


# ---------------------------------------------------------------------------
# Waiting, ports, accounts, the market's database
# ---------------------------------------------------------------------------

TOKEN_RE = re.compile(r"^token: ([0-9a-f]{64})$", re.M)


def wait_for(what, fn, timeout=90, interval=0.1):
    """Poll fn() until it returns something truthy, and return that; fail
    the test after `timeout` seconds, naming `what` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(name="wait_for")
def wait_for_fixture():
    """wait_for(what, fn, timeout=90): see conftest.wait_for."""
    return wait_for


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process
    that must be told its address before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_account(run_arceus, db, name, credits=None):
    """`arceus market add-account NAME [--credits N] --db DB`; returns the token."""
    args = ["market", "add-account", name, "--db", db]
    if credits is not None:
        args += ["--credits", credits]
    p = run_arceus(*args, check=True)
    m = TOKEN_RE.search(p.stdout)
    assert m, p.stdout
    return m.group(1)


@pytest.fixture
def add_account(run_arceus):
    """add_account(db, name, credits=None) -> the new account's token."""
    return lambda db, name, credits=None: create_account(run_arceus, db, name, credits)


def query(db, sql, *args):
    """Rows of one SQL query on the market's database (read while it runs)."""
    con = sqlite3.connect(str(db), timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

class Proc:
    """A process started by a Procs group, its stdout and stderr in files.

    .proc is the subprocess.Popen; .name names it in messages and files;
    .addr (and .port) are set by the factories once it listens."""

    def __init__(self, name, argv, directory, env=None, cwd=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.out_path = Path(directory) / f"{name}.out"
        self.err_path = Path(directory) / f"{name}.err"
        self.signals = set()  # sent by the test: a death by one of them is expected
        self.addr = None
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=_env() if env is None else env, cwd=cwd)

    def __repr__(self):
        return f"<{self.name} pid {self.proc.pid}{' ' + self.addr if self.addr else ''}>"

    @property
    def port(self):
        return int(self.addr.rsplit(":", 1)[1])

    def out(self):
        return self.out_path.read_text(errors="replace")

    def err(self):
        return self.err_path.read_text(errors="replace")

    # the whole stderr so far (as `.stderr` of a finished CompletedProcess)
    stderr = property(err)

    def running(self):
        return self.proc.poll() is None

    def wait_stdout(self, regex, timeout=90):
        """Wait until stdout matches `regex` (a pattern or a string, multi-line);
        return the match. Fails at once if the process exits first."""
        if isinstance(regex, str):
            regex = re.compile(regex, re.M)

        def seen():
            m = regex.search(self.out())
            if m:
                return m
            if self.proc.poll() is not None:
                m = regex.search(self.out())  # it may have printed it just before exiting
                if m:
                    return m
                pytest.fail(f"{self.name} exited {self.proc.returncode} before printing {regex.pattern!r}\n"
                            f"stdout:\n{self.out()[-3000:]}\nstderr:\n{self.err()[-3000:]}")
            return None
        return wait_for(f"{self.name} to print {regex.pattern!r}", seen, timeout, interval=0.05)

    def wait(self, timeout=300):
        """Wait for the process to exit by itself; its exit code. Fails the
        test after `timeout` seconds (the teardown then stops it)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout}s\nstderr:\n{self.err()[-3000:]}")

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Send `sig` (unless it has exited) and wait for the exit; its exit code.
        Killed, and the test failed, if it is still running after `timeout` s."""
        if self.proc.poll() is None:
            self.signals.add(sig)
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signals.add(signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.name} did not stop within {timeout}s of signal {sig}\n{self.err()[-3000:]}")

    def kill(self, sig=signal.SIGKILL):
        """Send `sig` on purpose (a death by it is expected); wait for the
        exit unless it is SIGSTOP (the process then stays, stopped, until
        the teardown kills it)."""
        if self.proc.poll() is None:
            self.signals.add(sig)
            self.proc.send_signal(sig)
        if sig != signal.SIGSTOP:
            self.proc.wait()
        return self.proc.returncode

    def problems(self, was_running):
        """What the teardown holds against this process (it has exited)."""
        found = []
        rc = self.proc.returncode
        if was_running and rc != 0:
            found.append(f"{self.name} exited {rc} on SIGTERM:\n{self.err()[-3000:]}")
        elif rc < 0 and -rc not in self.signals:
            found.append(f"{self.name} died from signal {-rc}:\n{self.err()[-3000:]}")
        err = self.err()
        for marker in SANITIZER_MARKERS:
            if marker in err:
                found.append(f"sanitizer report ({marker}) in {self.name}:\n{err[-6000:]}")
                break
        return found


MARKET_READY = re.compile(r"^arceus market: listening on (127\.0\.0\.1:(\d+))$", re.M)
DASHBOARD_READY = re.compile(r"^arceus market: dashboard on (http://127\.0\.0\.1:(\d+)/)$", re.M)
WORKER_READY = re.compile(r"arceus worker: listening on (\S+:\d+)")
RELAY_READY = re.compile(r"^wan_relay: listening on (127\.0\.0\.1:\d+)", re.M)


def wan_relay_path():
    """bench/wan_relay, the emulated WAN link: $WAN_RELAY_BIN (make e2e sets
    it), else beside the arceus binary's build, else the release build."""
    p = os.environ.get("WAN_RELAY_BIN")
    candidates = [Path(p)] if p else []
    candidates += [_binary_path().parent / "bench" / "wan_relay", REPO / "build" / "release" / "bench" / "wan_relay"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail("bench/wan_relay is not built (make build/release/bench/wan_relay, or set WAN_RELAY_BIN)")
PROVIDER_READY = re.compile(r"^arceus provide: provider (\d+) serving on (127\.0\.0\.1:(\d+)) "
                            r"\(([\d.]+) GFLOP/s, ([\d.]+) GiB, price ([\d.]+)\)$", re.M)


class Procs:
    """The processes one test (or one module fixture) started; stop_all()
    stops them and asserts they ended well (see the module docstring)."""

    def __init__(self, binary, directory):
        self.binary = binary
        self.directory = Path(directory)
        self.started = []
        self._names = {}

    def _unique(self, name):
        n = self._names.get(name, 0) + 1
        self._names[name] = n
        return name if n == 1 else f"{name}-{n}"

    def spawn(self, name, argv, env=None, cwd=None):
        """Start any command in the background."""
        p = Proc(self._unique(name), argv, self.directory, env=env, cwd=cwd)
        self.started.append(p)
        return p

    def start(self, name, *args, env=None):
        """Start `arceus ARGS...` in the background."""
        return self.spawn(name, [self.binary, *args], env=env)

    def market(self, db, *extra, listen="127.0.0.1:0", name="market", timeout=90):
        """`arceus market --listen LISTEN --db DB EXTRA...`, once it listens.
        .addr is its gRPC address; with --http in EXTRA, .url its dashboard."""
        m = self.start(name, "market", "--listen", listen, "--db", db, *extra)
        ready = m.wait_stdout(MARKET_READY, timeout)
        if ready.group(2) == "0":
            pytest.fail(f"{m.name} says it listens on port 0: {ready.group(0)!r}")
        m.addr = ready.group(1)
        m.url = m.wait_stdout(DASHBOARD_READY, timeout).group(1) if "--http" in map(str, extra) else None
        return m

    def worker(self, *extra, name="worker", timeout=90):
        """`arceus worker --listen 127.0.0.1:0 --threads 1 EXTRA...`, once it listens."""
        w = self.start(name, "worker", "--listen", "127.0.0.1:0", "--threads", "1", *extra)
        w.addr = w.wait_stdout(WORKER_READY, timeout).group(1)
        return w

    def provider(self, market, token, *extra, heartbeat=1, name="provide", timeout=90):
        """`arceus provide --market M --token T --max-threads 1 --when always --on-battery yes
        [--heartbeat S] EXTRA...`,
        once registered: .id, .addr, .gflops, .gib, .price (as printed)."""
        beat = ("--heartbeat", heartbeat) if heartbeat is not None else ()
        # whatever the machine running the tests is doing (someone typing, a
        # laptop on battery), its providers compute: a test of the owner's
        # rules gives its own --when and --on-battery after these
        p = self.start(name, "provide", "--market", market.addr, "--token", token, "--max-threads", "1",
                       "--when", "always", "--on-battery", "yes", *beat, *extra)
        m = p.wait_stdout(PROVIDER_READY, timeout)
        p.id, p.addr = int(m.group(1)), m.group(2)
        p.gflops, p.gib, p.price = float(m.group(4)), float(m.group(5)), m.group(6)
        return p

    def leased_worker(self, market, token, price, gflops=150.0, name="worker", timeout=90, env=None):
        """A provider registered with the market through gRPC (a profile of
        `gflops` at `price` micro-credits per TFLOP), then its `arceus worker`
        started there (with `env`, e.g. a test build's ARCEUS_FAULT),
        requiring a lease for that provider: .id, .addr."""
        import grpc
        from pbwire import decode, field_bytes, field_double, field_varint
        addr = f"127.0.0.1:{free_port()}"
        profile = (field_double(1, gflops) + field_varint(2, 8 << 30) + field_varint(3, 2) +
                   field_varint(4, price))
        req = field_bytes(1, token) + field_bytes(2, addr) + field_bytes(3, profile)
        with grpc.insecure_channel(market.addr) as ch:
            pid = decode(ch.unary_unary("/arceus.Market/RegisterProvider")(req, timeout=30))[1][0]
        w = self.start(name, "worker", "--listen", addr, "--threads", "1", "--market", market.addr,
                       "--token", token, "--provider-id", pid, env=env)
        w.addr = w.wait_stdout(WORKER_READY, timeout).group(1)
        w.id = pid
        return w

    def relay(self, to, delay_ms, rate_mbit, up_delay_ms=None, up_rate_mbit=None, name="relay", timeout=30):
        """bench/wan_relay listening on 127.0.0.1 and forwarding to `to` through
        an emulated link: `delay_ms` one way and `rate_mbit` each way (the up
        direction, replies, may differ); .addr is where to connect."""
        argv = [wan_relay_path(), "--listen", "127.0.0.1:0", "--to", to, "--delay-ms", delay_ms,
                "--rate-mbit", rate_mbit]
        if up_delay_ms is not None:
            argv += ["--up-delay-ms", up_delay_ms]
        if up_rate_mbit is not None:
            argv += ["--up-rate-mbit", up_rate_mbit]
        r = self.spawn(name, argv)
        r.addr = r.wait_stdout(RELAY_READY, timeout).group(1)
        return r

    def stop_all(self):
        """Stop every process still running (the last started first) and
        assert that each ended well."""
        problems = []
        for p in reversed(self.started):
            was_running = p.proc.poll() is None
            if was_running and signal.SIGSTOP in p.signals:
                p.signals.add(signal.SIGKILL)  # stopped on purpose: it cannot answer SIGTERM
                p.proc.kill()
                was_running = False
            if was_running:
                p.proc.send_signal(signal.SIGTERM)
            try:
                p.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.signals.add(signal.SIGKILL)
                p.proc.kill()
                p.proc.wait()
                problems.append(f"{p.name} did not stop within 60 s of SIGTERM:\n{p.err()[-3000:]}")
                continue
            problems += p.problems(was_running)
        self.started = []
        assert not problems, "\n".join(problems)


@pytest.fixture
def procs(arceus_bin, tmp_path):
    """The processes this test starts; all stopped and checked at teardown."""
    group = Procs(arceus_bin, tmp_path)
    yield group
    group.stop_all()


@pytest.fixture
def market(procs):
    """market(db, *extra, listen="127.0.0.1:0", name="market") -> a listening market."""
    return procs.market


@pytest.fixture
def worker(procs):
    """worker(*extra, name="worker") -> a listening `arceus worker --threads 1`."""
    return procs.worker


@pytest.fixture
def workers(procs):
    """workers(n, *extra) -> a list of n listening workers, each `arceus worker --threads 1 EXTRA...`."""
    return lambda n, *extra: [procs.worker(*extra) for _ in range(n)]


@pytest.fixture
def provider(procs):
    """provider(market, token, *extra, heartbeat=1, name="provide") -> a registered `arceus provide`."""
    return procs.provider


@pytest.fixture
def relay(procs):
    """relay(to, delay_ms, rate_mbit, up_delay_ms=None, up_rate_mbit=None) -> a wan_relay (.addr)."""
    return procs.relay


@pytest.fixture
def leased_worker(procs):
    """leased_worker(market, token, price, gflops=150.0) -> a worker that requires a lease."""
    return procs.leased_worker


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

_WORDS = ("the a one that this every some no old young quick slow bright dark "
          "king queen fox dog cat bird sea ship river city garden night morning "
          "sees loves finds keeps sings hears follows remembers leaves builds "
          "and but so then while when where because under over near beyond").split()


def make_corpus_text(n_chars=6000, seed=0):
    """Deterministic lowercase English-like text: letters, space, ',', '.',
    and newlines between short paragraphs."""
    rng = random.Random(seed)
    parts = []
    size = 0
    while size < n_chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 11))]
        s = " ".join(words)
        if rng.random() < 0.3:
            k = rng.randint(1, len(words) - 1)
            s = " ".join(words[:k]) + ", " + " ".join(words[k:])
        s += "."
        s += "\n" if rng.random() < 0.2 else " "
        parts.append(s)
        size += len(s)
    return "".join(parts)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A ~6 KB text file; its 10% validation split is ~600 characters,
    far more than the 17 a gpt-tiny window needs."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus_text())
    return path


def write_idx(path, array_bytes, dims, magic):
    """Write a (gzipped if path ends in .gz) IDX file."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)
    data = header + array_bytes
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=1)
    Path(path).write_bytes(data)


def read_idx(path):
    """Read a gzip IDX file -> (dims, raw payload bytes)."""
    raw = gzip.open(path).read()
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return dims, raw[4 + 4 * ndim:]


@pytest.fixture(scope="session")
def fashion_dir():
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found at {FASHION} (Debian's dataset-fashion-mnist)")
    return FASHION


@pytest.fixture(scope="session")
def small_fashion(tmp_path_factory, fashion_dir):
    """The first 1024 training and 256 test examples of Fashion-MNIST, as
    gzip IDX files: quick to load for tests that only need real-looking data."""
    out = tmp_path_factory.mktemp("fashion-small")
    for split, n in (("train", 1024), ("t10k", 256)):
        dims, payload = read_idx(fashion_dir / f"{split}-images-idx3-ubyte.gz")
        write_idx(out / f"{split}-images-idx3-ubyte.gz", payload[:n * dims[1] * dims[2]],
                  (n, dims[1], dims[2]), 0x00000803)
        _, payload = read_idx(fashion_dir / f"{split}-labels-idx1-ubyte.gz")
        write_idx(out / f"{split}-labels-idx1-ubyte.gz", payload[:n], (n,), 0x00000801)
    return out


@pytest.fixture(scope="session")
def small_mlp_spec(tmp_path_factory):
    """A small MLP (784-64-32-10, gelu): three linear layers, so it can be
    split into up to three pipeline stages."""
    path = tmp_path_factory.mktemp("spec") / "mlp-small.json"
    path.write_text(json.dumps({"type": "mlp", "inputs": 784, "hidden": [64, 32],
                                "classes": 10, "activation": "gelu", "dropout": 0.0}))
    return path


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# Shared training runs (session-scoped: each trains once for all tests)
# ---------------------------------------------------------------------------

GPT_ARGS = ("--steps", "20", "--batch", "8", "--eval-every", "10", "--eval-batches", "2")
MLP_ARGS = ("--steps", "60", "--batch", "128", "--eval-every", "30")


@pytest.fixture(scope="session")
def gpt_run(tmp_path_factory, run_arceus, corpus):
    """gpt-tiny trained 20 steps on the corpus, with --out and --log."""
    d = tmp_path_factory.mktemp("gpt-run")
    out, log = d / "ckpt", d / "train.jsonl"
    proc = run_arceus("train", "--model", CONFIGS / "gpt-tiny.json", "--data", corpus,
                      *GPT_ARGS, "--out", out, "--log", log, check=True)
    return {"out": out, "log": log, "proc": proc}


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory, run_arceus, fashion_dir):
    """configs/mlp-fashion.json trained 60 steps on Fashion-MNIST."""
    d = tmp_path_factory.mktemp("mlp-run")
    out, log = d / "ckpt", d / "train.jsonl"
    proc = run_arceus("train", "--model", CONFIGS / "mlp-fashion.json", "--data", fashion_dir,
                      *MLP_ARGS, "--out", out, "--log", log, check=True)
    return {"out": out, "log": log, "proc": proc}


class Ticker:
    """A fake input a test keeps moving: `tick()` now and then every
    `interval` seconds on a background thread, from the `with` until the
    block ends."""

    interval = 0.5

    def tick(self):
        raise NotImplementedError

    def _run(self):
        while True:
            self.tick()
            if self._done.wait(self.interval):
                return

    def __enter__(self):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
