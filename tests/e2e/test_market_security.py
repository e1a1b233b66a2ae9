"""The market's doors, tried by hostile parties with real processes: a real
`arceus market` over SQLite in tmp_path, real `arceus worker` / `arceus
provide` / `arceus train` processes, and foreign clients in python grpcio
with hand-encoded protobuf (pbwire).

- A provider that got a Load replays everything it received against every
  Market call: nothing it holds moves money, ends, replaces or reports on
  the renter's lease (only the renter's lease token does, and it never
  leaves the driver).
- One account registers at most --max-providers-per-account providers.
- A provider's advertised address is one renters may be sent to: no
  link-local (cloud metadata), multicast, unspecified or system-port
  address, names checked by what they resolve to.
- A provider whose worker the market cannot reach is not leased until it
  can.
- A provider's worker sends a Load's activations only to the members of
  the Load's lease.
- `arceus provide` refuses every Load until it is registered with its
  market.
- Strangers sending oversized messages at once make the market hold no
  more than its gRPC resource quota.

Every process is stopped at teardown and its stderr checked for sanitizer
reports (the fixtures of test_provide.py).
"""

import re
import socket
import sqlite3
import threading
from concurrent import futures

import pytest

from h2stall import send_oversized
from pbwire import acquire, decode, field_bytes, field_double, field_f32, field_varint, hand_over, replace, usage
from test_market import profile, register_request
from conftest import wait_for
from test_market_train import balances, ledger_total
from test_workers import MLP_SPEC, PROTOCOL_VERSION

grpc = pytest.importorskip("grpc")
C = grpc.StatusCode
MICRO = 1_000_000
MIB = 1 << 20
HEX64 = re.compile(rb"^[0-9a-f]{64}$")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def market_call(addr, method, req, timeout=30):
    with grpc.insecure_channel(addr) as ch:
        return ch.unary_unary(f"/arceus.Market/{method}")(req, timeout=timeout)


def market_status(addr, method, req):
    """(status code, details) of a Market call; OK when it succeeded."""
    try:
        market_call(addr, method, req)
        return C.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def register(addr, token, address, prof=None):
    return decode(market_call(addr, "RegisterProvider", register_request(token, address, prof)))[1][0]


def load_request(ticket, count=1, nxt=None, tp_members=(), units=(0, 2)):
    """A LoadRequest of the small MLP's units [units) (both, by default) as
    stage 0 of `count`."""
    opt = field_varint(1, 0) + field_f32(2, 0.9) + field_f32(3, 0.99) + field_f32(4, 1e-8)
    m = (field_bytes(1, MLP_SPEC) + field_varint(2, units[0]) + field_varint(3, units[1]) + field_varint(4, 4) +
         field_varint(5, 1) + field_varint(6, 1) + field_varint(7, 0) + field_varint(8, count) +
         field_varint(9, 7) + field_bytes(10, opt))
    if nxt is not None:
        m += field_bytes(11, nxt)
    if ticket is not None:
        m += field_bytes(13, ticket)
    if tp_members:
        # a tensor-parallel leader of the MLP's 6 hidden units: its own share
        # first (no address), then each member's, by worker address
        n = len(tp_members) + 1
        cuts = [6 * k // n for k in range(n + 1)]
        addresses = [""] + list(tp_members)
        for k in range(n):
            share = field_varint(6, cuts[k]) + field_varint(6, cuts[k + 1])
            m += field_bytes(14, (field_bytes(1, addresses[k]) if addresses[k] else b"") + share)
    return m


def worker_status(addr, req):
    with grpc.insecure_channel(addr) as ch:
        try:
            ch.unary_unary("/arceus.Worker/Load")(req, timeout=60)
            return C.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""


def strings_in(msg, depth=0):
    """Every length-delimited value of a protobuf message, nested ones too."""
    out = []
    if depth > 3:
        return out
    try:
        fields = decode(msg)
    except (ValueError, IndexError):
        return out
    for values in fields.values():
        for v in values:
            if isinstance(v, (bytes, bytearray)) and len(v) > 0:
                out.append(bytes(v))
                out.extend(strings_in(bytes(v), depth + 1))
    return out


# ---------------------------------------------------------------------------
# A provider replays everything its Load carried
# ---------------------------------------------------------------------------

class HostileWorker:
    """A provider's 'worker' that answers Hello like an arceus worker and, on
    Load, replays every secret-looking string of the request against every
    Market call while the renter's lease is live, then accepts the Load.
    (Pipe is not served: the renter's run then fails, which is fine.)"""

    def __init__(self, market_addr, own_token, own_pid_box):
        self.market = market_addr
        self.own_token = own_token
        self.own_pid = own_pid_box
        self.loads = []
        self.results = []  # (method, secret, code, details)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "Hello": grpc.unary_unary_rpc_method_handler(self.hello),
            "Load": grpc.unary_unary_rpc_method_handler(self.load),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("arceus.Worker", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.addr = f"127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.server.start()

    def hello(self, req, ctx):
        return (field_varint(1, PROTOCOL_VERSION) + field_bytes(2, self.addr) + field_bytes(3, "pipeline") +
                field_bytes(3, "mlp") + field_double(4, 50.0) + field_varint(5, 8 << 30) + field_varint(6, 1))

    def replay(self, secret):
        pid = self.own_pid[0]
        s = secret.decode()
        rich = [(0, pid, 1 << 59)]
        calls = [
            ("ReportUsage", usage(s, 0, rich)),
            ("ReportUsage", usage(s, 1, [(0, pid, 1 << 59), (1, pid, 1 << 59)])),
            ("ReportProgress", field_bytes(1, s) + field_varint(2, 1) + field_varint(3, 2) +
             field_bytes(5, "samples")),
            ("ReplaceProvider", replace(s, pid, 0)),
            ("HandOver", hand_over(s, pid, 0)),
            ("ReleaseLease", field_bytes(1, s) + field_bytes(2, "cancelled")),
            ("AcquireLease", acquire(s)),
            ("Balance", field_bytes(1, s)),
            ("Ledger", field_bytes(1, s)),
            ("ListJobs", field_bytes(1, s)),
            ("ListProviders", field_bytes(1, s)),
            ("Heartbeat", field_bytes(1, s) + field_varint(2, pid)),
        ]
        for method, req in calls:
            code, details = market_status(self.market, method, req)
            with self.lock:
                self.results.append((method, s, code, details))

    def load(self, req, ctx):
        with self.lock:
            self.loads.append(req)
        secrets = {v for v in strings_in(req) if HEX64.match(v)}
        for secret in sorted(secrets):
            self.replay(secret)
        return field_varint(1, 100)

    def stop(self):
        self.server.stop(0).wait()


def test_a_provider_replaying_what_its_load_carried_cannot_move_money(run_arceus, add_account, procs, tmp_path,
                                                                     small_mlp_spec, small_fashion):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    mallory = add_account(db, "mallory")
    market = procs.market(db)
    pid_box = [0]
    hostile = HostileWorker(market.addr, mallory, pid_box)
    try:
        pid_box[0] = register(market.addr, mallory, hostile.addr, profile(gflops=500.0, price=0))
        p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", 2, "--batch", 32,
                       "--eval-every", 0, "--threads", 1, "--market", market.addr, "--token", renter,
                       "--devices", 1, timeout=180)
    finally:
        hostile.stop()
    assert hostile.loads, f"the renter's driver never sent a Load\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    # the provider received a secret (its ticket) and replayed it everywhere
    replayed = {s for _, s, _, _ in hostile.results}
    assert replayed, "the Load carried no secret to replay"
    succeeded = [(m, code) for m, _, code, _ in hostile.results if code == C.OK]
    assert not succeeded, f"a provider's replay succeeded: {succeeded}"
    # and the renter paid nothing for work that was never done
    bal = balances(db)
    assert bal["renter"] == 100 * MICRO, bal
    assert bal["mallory"] == 0, bal
    assert ledger_total(db) == 0
    # the driver's lease token itself was never in the Load
    con = sqlite3.connect(str(db))
    try:
        leases = con.execute("SELECT COUNT(*) FROM leases").fetchone()[0]
    finally:
        con.close()
    assert leases >= 1


# ---------------------------------------------------------------------------
# Registrations
# ---------------------------------------------------------------------------

def test_one_account_registers_at_most_16_providers_by_default(run_arceus, add_account, procs, tmp_path):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    bob = add_account(db, "bob")
    market = procs.market(db)
    ports = [free_port() for _ in range(17)]
    ids = [register(market.addr, alice, f"127.0.0.1:{port}") for port in ports[:16]]
    assert len(set(ids)) == 16
    code, details = market_status(market.addr, "RegisterProvider",
                                  register_request(alice, f"127.0.0.1:{ports[16]}"))
    assert code == C.FAILED_PRECONDITION, (code, details)
    assert "16 providers registered" in details and "--max-providers-per-account" in details, details
    # a provider that restarts registers its address again: not a new one
    assert register(market.addr, alice, f"127.0.0.1:{ports[3]}") == ids[3]
    # another account has its own room
    register(market.addr, bob, f"127.0.0.1:{ports[16]}")
    con = sqlite3.connect(str(db))
    try:
        assert con.execute("SELECT COUNT(*) FROM providers").fetchone()[0] == 17
    finally:
        con.close()


def test_the_operator_sets_the_limit(run_arceus, add_account, procs, tmp_path):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    market = procs.market(db, "--max-providers-per-account", "2")
    register(market.addr, alice, f"127.0.0.1:{free_port()}")
    register(market.addr, alice, f"127.0.0.1:{free_port()}")
    code, details = market_status(market.addr, "RegisterProvider",
                                  register_request(alice, f"127.0.0.1:{free_port()}"))
    assert code == C.FAILED_PRECONDITION and "2 providers registered" in details, (code, details)
    p = run_arceus("market", "--listen", "127.0.0.1:0", "--db", db, "--max-providers-per-account", "0")
    assert p.returncode == 2 and "--max-providers-per-account" in p.stderr, p.stderr


BAD_ADDRESSES = [
    ("169.254.169.254:8080", "link-local"),       # the cloud metadata service
    ("169.254.169.254:80", "port 80"),
    ("[fe80::1]:5001", "link-local"),
    ("[::ffff:169.254.169.254]:5001", "link-local"),
    ("[fd00:ec2::254]:5001", "metadata"),
    ("0.0.0.0:5001", "unspecified"),
    ("[::]:5001", "unspecified"),
    ("224.0.0.1:5001", "multicast"),
    ("[ff02::1]:5001", "multicast"),
    ("255.255.255.255:5001", "reserved"),
    ("127.0.0.1:22", "port 22"),
    ("localhost:22", "port 22"),
    ("127.0.0.1:0", "port"),
    ("fe80::1:5001", "brackets"),
]


def test_registration_refuses_addresses_renters_must_not_be_sent_to(run_arceus, add_account, procs, tmp_path):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    market = procs.market(db)
    for address, words in BAD_ADDRESSES:
        code, details = market_status(market.addr, "RegisterProvider", register_request(alice, address))
        assert code == C.INVALID_ARGUMENT, (address, code, details)
        assert words in details, (address, details)
    con = sqlite3.connect(str(db))
    try:
        assert con.execute("SELECT COUNT(*) FROM providers").fetchone()[0] == 0
    finally:
        con.close()
    # a market on loopback takes loopback workers (names are checked by what
    # they resolve to: the unit tests; not dialled here, where gRPC's
    # resolver of names leaves a c-ares allocation behind at exit)
    for address in (f"127.0.0.1:{free_port()}", f"[::1]:{free_port()}"):
        register(market.addr, alice, address)


# ---------------------------------------------------------------------------
# Reachability
# ---------------------------------------------------------------------------

def provider_column(run_arceus, market, token, pid):
    out = run_arceus("providers", "--market", market.addr, "--token", token, "--all", check=True).stdout
    row = next((line.split() for line in out.splitlines() if line.split()[:1] == [str(pid)]), None)
    assert row, out
    return row


def test_a_provider_the_market_cannot_reach_is_not_leased_until_it_can(run_arceus, add_account, procs, tmp_path):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    alice = add_account(db, "alice")
    market = procs.market(db)
    addr = f"127.0.0.1:{free_port()}"
    pid = register(market.addr, alice, addr)  # nothing listens there yet
    assert "unreachable" in provider_column(run_arceus, market, renter, pid)
    code, details = market_status(market.addr, "AcquireLease", acquire(renter, devices=1))
    assert code == C.RESOURCE_EXHAUSTED, (code, details)
    assert "1 more the market cannot reach" in details, details
    # nothing was leased, nothing spent
    assert balances(db)["renter"] == 100 * MICRO

    # its worker comes up: a later lease checks it again (after a wait that
    # grows with the failures: 2 s here) and takes it
    w = procs.start("worker", "worker", "--listen", addr, "--threads", "1", "--market", market.addr, "--token", alice,
              "--provider-id", pid)
    w.wait_stdout(re.compile(r"arceus worker: listening on"))

    def leased():
        code, _ = market_status(market.addr, "AcquireLease", acquire(renter, devices=1))
        return code == C.OK
    wait_for("a lease of the provider", leased, 30)
    assert "leases 1 providers" in market.err()
    assert "direct" in provider_column(run_arceus, market, renter, pid)


# ---------------------------------------------------------------------------
# Loads
# ---------------------------------------------------------------------------

def lease_one(market, renter):
    """A lease of one provider by the renter: (lease token, what its Load carries)."""
    reply = decode(market_call(market.addr, "AcquireLease", acquire(renter, devices=1)))
    lease = reply[3][0].decode()
    member = decode(reply[5][0])
    # the member's ticket (LeasedProvider.ticket); a build without tickets
    # gave its providers the lease token itself
    ticket = member[7][0].decode() if 7 in member else lease
    return lease, ticket


def test_a_load_sends_only_to_the_members_of_its_lease(run_arceus, add_account, procs, tmp_path):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    alice = add_account(db, "alice")
    market = procs.market(db)
    addr = f"127.0.0.1:{free_port()}"
    pid = register(market.addr, alice, addr)
    w = procs.start("worker", "worker", "--listen", addr, "--threads", "1", "--market", market.addr, "--token", alice,
              "--provider-id", pid)
    w.wait_stdout(re.compile(r"arceus worker: listening on"))
    lease, ticket = lease_one(market, renter)

    # the next stage at the cloud metadata address, or at any worker not in the lease
    for nxt in ("169.254.169.254:80", f"127.0.0.1:{free_port()}"):
        code, details = worker_status(addr, load_request(ticket, count=2, nxt=nxt))
        assert code == C.PERMISSION_DENIED, (nxt, code, details)
        assert "not a member of the lease" in details, details
    # a tensor-parallel member elsewhere
    code, details = worker_status(addr, load_request(ticket, tp_members=("169.254.169.254:8080",)))
    assert code == C.PERMISSION_DENIED and "not a member of the lease" in details, (code, details)
    # the lease's own Load is served
    code, details = worker_status(addr, load_request(ticket))
    assert code == C.OK, (code, details)


def test_a_ticket_opens_its_own_providers_worker_only(run_arceus, add_account, procs, tmp_path):
    """Two providers of one account leased together: each ticket opens its own
    provider's worker, not the other's; the lease token opens neither."""
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    alice = add_account(db, "alice")
    market = procs.market(db)
    addrs, workers = [], []
    for k in range(2):
        addr = f"127.0.0.1:{free_port()}"
        pid = register(market.addr, alice, addr)
        w = procs.start(f"worker{k}", "worker", "--listen", addr, "--threads", "1", "--market", market.addr,
                  "--token", alice, "--provider-id", pid)
        w.wait_stdout(re.compile(r"arceus worker: listening on"))
        addrs.append(addr)
        workers.append(w)
    reply = decode(market_call(market.addr, "AcquireLease", acquire(renter, devices=2)))
    lease = reply[3][0].decode()
    members = [decode(m) for m in reply[5]]
    by_addr = {m[3][0].decode(): m[7][0].decode() for m in members}
    # each member's units of the two-layer model (LeasedProvider.first_unit, last_unit)
    units = {m[3][0].decode(): (m.get(9, [0])[0], m[10][0]) for m in members}
    assert len(set(by_addr.values())) == 2 and lease not in by_addr.values()
    a, b = addrs
    assert worker_status(a, load_request(by_addr[b], units=units[a]))[0] == C.UNAUTHENTICATED
    assert worker_status(a, load_request(lease, units=units[a]))[0] == C.UNAUTHENTICATED
    # its own ticket, but units it is not paid for: refused
    code, details = worker_status(a, load_request(by_addr[a], units=units[b]))
    assert code == C.PERMISSION_DENIED and "not the ones the lease pays this provider for" in details, details
    assert worker_status(a, load_request(by_addr[a], units=units[a]))[0] == C.OK
    # released, the lease's tickets open nothing
    market_call(market.addr, "ReleaseLease", field_bytes(1, lease) + field_bytes(2, "cancelled"))
    code, details = worker_status(b, load_request(by_addr[b]))
    assert code == C.UNAUTHENTICATED and "unknown or released" in details, (code, details)


def test_provide_refuses_every_load_until_it_is_registered(run_arceus, add_account, procs, tmp_path):
    """`arceus provide` starts its worker before it can register (the market
    is away): until the market has registered it, no Load is served, with or
    without a token."""
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    market_port = free_port()
    listen = f"127.0.0.1:{free_port()}"
    p = procs.start("provide", "provide", "--market", f"127.0.0.1:{market_port}", "--token", alice, "--listen", listen,
              "--max-threads", "1", "--heartbeat", "1")
    wait_for("provide to find the market away", lambda: "market unreachable" in p.err(), 60)
    for ticket in (None, "ab" * 32):
        code, details = worker_status(listen, load_request(ticket))
        assert code in (C.UNAVAILABLE, C.UNAUTHENTICATED), (ticket, code, details)
        assert "not registered" in details, details
    # the market comes up: provide registers, and a Load then needs a ticket
    procs.market(db, listen=f"127.0.0.1:{market_port}")
    wait_for("provide to register", lambda: "serving on" in p.out(), 60)
    code, details = worker_status(listen, load_request(None))
    assert code == C.UNAUTHENTICATED and "Load needs the lease token" in details, (code, details)


def test_oversized_messages_at_once_are_bounded_by_the_markets_memory_quota(procs, tmp_path):
    # Every Market request is at most 64 KiB, the market's gRPC limit; gRPC
    # (1.51) still takes a larger message whole before refusing it. What
    # several at once may make the market hold is bounded by its resource
    # quota (2 x 64 KiB + 64 MiB): past it gRPC cancels streams. Three
    # strangers send 200 MiB each (and hold nothing themselves).
    from test_worker_security import peak_rss_kib
    market = procs.market(str(tmp_path / "m.db"))
    base = peak_rss_kib(market.proc.pid)
    ends = [None] * 3

    def attack(i):
        ends[i] = send_oversized(market.addr, "/arceus.Market/Heartbeat", 200 * MIB)

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    grown_mib = (peak_rss_kib(market.proc.pid) - base) / 1024
    print(f"calls ended by {ends}; the market's peak memory grew by {grown_mib:.0f} MiB")
    # the quota, and what the sanitizer build keeps of freed memory (its
    # quarantine, 256 MiB) and its shadow, against 600 MiB sent
    assert grown_mib < 400, f"the market's peak memory grew by {grown_mib:.0f} MiB ({ends})"
    code, details = market_status(market.addr, "Balance", field_bytes(1, "0" * 64))
    assert code == C.UNAUTHENTICATED, (code, details)  # still serving
