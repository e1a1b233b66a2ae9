"""The market server and its client commands: `arceus market` on 127.0.0.1
(port 0) over a real SQLite file, `arceus market add-account`, `arceus
providers`, `arceus ledger`, and a foreign gRPC client (python grpcio with
hand-encoded protobuf) for the provider RPCs.

Every market is stopped in teardown (SIGTERM, exit 0 expected) and its stderr
checked for sanitizer reports (the `procs` fixture of conftest.py).
"""

import math
import re
import sqlite3
import time

import pytest

from conftest import TOKEN_RE
from pbwire import acquire, decode, field_bytes, field_double, field_varint, replace, usage

grpc = pytest.importorskip("grpc")

# For tests of the market's bookkeeping on providers registered at placeholder
# addresses where no worker listens: the market leases them without reaching
# their workers first.
NO_WORKER_CHECKS = ("--reach-timeout", "0")


# ---------------------------------------------------------------------------
# Hand-encoded protobuf (proto/arceus.proto, service Market)
# ---------------------------------------------------------------------------

def profile(gflops=150.0, mem=8 << 30, cores=2, price=500000):
    return field_double(1, gflops) + field_varint(2, mem) + field_varint(3, cores) + field_varint(4, price)


def register_request(token, address, prof=None):
    return field_bytes(1, token) + field_bytes(2, address) + field_bytes(3, profile() if prof is None else prof)


def heartbeat_request(token, provider_id):
    return field_bytes(1, token) + field_varint(2, provider_id)


def call(addr, method, req, timeout=30):
    with grpc.insecure_channel(addr) as ch:
        return ch.unary_unary(f"/arceus.Market/{method}")(req, timeout=timeout)


def call_error(addr, method, req):
    with pytest.raises(grpc.RpcError) as e:
        call(addr, method, req)
    return e.value


def register(addr, token, address, prof=None):
    r = decode(call(addr, "RegisterProvider", register_request(token, address, prof)))
    return r[1][0], r.get(2, [0])[0]


def ledger_sum(db):
    con = sqlite3.connect(str(db))
    try:
        total, rows = con.execute("SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM ledger").fetchone()
    finally:
        con.close()
    return total, rows


# ---------------------------------------------------------------------------
# Accounts and tokens
# ---------------------------------------------------------------------------

def test_add_account_prints_token_once_and_stores_only_its_hash(run_arceus, add_account, tmp_path):
    db = tmp_path / "market.db"
    p = run_arceus("market", "add-account", "alice", "--credits", "100", "--db", db, check=True)
    token = TOKEN_RE.search(p.stdout).group(1)
    assert "100.000000 credits" in p.stdout
    assert "shown only now" in p.stderr
    stored = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("market.db"))
    assert token.encode() not in stored
    assert bytes.fromhex(token) not in stored
    # a second account gets another token; a taken name is refused
    assert add_account(db, "bob") != token
    dup = run_arceus("market", "add-account", "alice", "--db", db)
    assert dup.returncode != 0 and "exists" in dup.stderr
    assert "token" not in dup.stdout


@pytest.mark.parametrize("credits", ["-1", "1.0000001", "abc", "1e3", "", "99999999999999"])
def test_add_account_refuses_bad_credits(run_arceus, tmp_path, credits):
    p = run_arceus("market", "add-account", "alice", "--credits", credits, "--db", tmp_path / "m.db")
    assert p.returncode == 2 and "--credits" in p.stderr, p.stderr
    assert "token" not in p.stdout


def test_add_account_refuses_bad_name(run_arceus, tmp_path):
    p = run_arceus("market", "add-account", "a b", "--db", tmp_path / "m.db")
    assert p.returncode != 0 and "name" in p.stderr
    p = run_arceus("market", "add-account", "x" * 64, "--db", tmp_path / "m.db")
    assert p.returncode != 0 and "name" in p.stderr


def test_cli_usage_errors(run_arceus, tmp_path):
    for cmd in ("market", "providers", "ledger"):
        p = run_arceus(cmd, "--help", check=True)
        assert p.stdout.startswith(f"usage: arceus {cmd}"), p.stdout
    p = run_arceus("market", "--db", tmp_path / "m.db")
    assert p.returncode == 2 and "--listen" in p.stderr
    p = run_arceus("market", "--listen", "127.0.0.1:0")
    assert p.returncode == 2 and "--db" in p.stderr
    p = run_arceus("providers", "--market", "127.0.0.1:1")
    assert p.returncode == 2 and "--token" in p.stderr
    p = run_arceus("ledger", "--token", "0" * 64)
    assert p.returncode == 2 and "--market" in p.stderr
    p = run_arceus("ledger", "--market", "127.0.0.1:1", "--token", "0" * 64, timeout=120)
    assert p.returncode == 1 and "unreachable" in p.stderr


# ---------------------------------------------------------------------------
# Providers: authentication, validation, heartbeats, the offline sweep
# ---------------------------------------------------------------------------

def test_register_needs_a_valid_token(run_arceus, add_account, market, tmp_path):
    db = tmp_path / "market.db"
    add_account(db, "alice")
    m = market(db)
    for token, words in (("", "no account token"), ("zz" * 32, "malformed"),
                         ("0" * 64, "unknown account token")):
        e = call_error(m.addr, "RegisterProvider", register_request(token, "127.0.0.1:5001"))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        assert words in e.details(), e.details()
        e = call_error(m.addr, "Heartbeat", heartbeat_request(token, 1))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    # nothing was written
    con = sqlite3.connect(str(db))
    assert con.execute("SELECT COUNT(*) FROM providers").fetchone()[0] == 0
    con.close()
    # the CLI says it clearly too
    p = run_arceus("providers", "--market", m.addr, "--token", "0" * 64)
    assert p.returncode == 1 and "unknown account token" in p.stderr


BAD_REGISTRATIONS = [
    ("127.0.0.1", profile(), "HOST:PORT"),
    ("127.0.0.1:0", profile(), "port"),
    ("127.0.0.1:70000", profile(), "port"),
    ("a,b:5001", profile(), "character"),
    ("host name:5001", profile(), "character"),
    ("h" * 300 + ":1", profile(), "characters"),
    ("127.0.0.1:5001", profile(gflops=0.0), "gflops"),
    ("127.0.0.1:5001", profile(gflops=math.nan), "gflops"),
    ("127.0.0.1:5001", profile(gflops=math.inf), "gflops"),
    ("127.0.0.1:5001", profile(mem=0), "mem_bytes"),
    ("127.0.0.1:5001", profile(mem=1 << 62), "mem_bytes"),
    ("127.0.0.1:5001", profile(cores=0), "cores"),
    ("127.0.0.1:5001", profile(cores=1 << 20), "cores"),
    ("127.0.0.1:5001", profile(price=-1), "price"),
    ("127.0.0.1:5001", b"", "gflops"),
]


def test_register_validates_every_field(run_arceus, add_account, market, tmp_path):
    db = tmp_path / "market.db"
    token = add_account(db, "alice")
    m = market(db)
    for address, prof, words in BAD_REGISTRATIONS:
        e = call_error(m.addr, "RegisterProvider", register_request(token, address, prof))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (address, e)
        assert words in e.details(), (address, e.details())
    # no profile at all, and bytes that are not a message
    e = call_error(m.addr, "RegisterProvider", field_bytes(1, token) + field_bytes(2, "127.0.0.1:5001"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "profile" in e.details()
    e = call_error(m.addr, "RegisterProvider", b"\xff\xff\xff")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in e.details()
    e = call_error(m.addr, "Heartbeat", heartbeat_request(token, 0))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    e = call_error(m.addr, "Heartbeat", heartbeat_request(token, 12345))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    con = sqlite3.connect(str(db))
    assert con.execute("SELECT COUNT(*) FROM providers").fetchone()[0] == 0
    con.close()


def providers_table(run_arceus, addr, token, *extra):
    p = run_arceus("providers", "--market", addr, "--token", token, *extra, check=True)
    return p.stdout


def test_providers_register_list_and_go_offline(run_arceus, add_account, market, tmp_path):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    bob = add_account(db, "bob")
    renter = add_account(db, "carol", "5")
    m = market(db, "--offline-after", "2")

    pid_a, offline_after = register(m.addr, alice, "127.0.0.1:5001",
                                    profile(gflops=181.5, mem=3 << 30, cores=2, price=250000))
    assert pid_a > 0 and offline_after == 2
    pid_b, _ = register(m.addr, bob, "127.0.0.1:5002", profile(gflops=90.0, cores=1, price=1500000))
    assert pid_b != pid_a
    # registering again from the same account and address keeps the id
    assert register(m.addr, alice, "127.0.0.1:5001")[0] == pid_a
    register(m.addr, alice, "127.0.0.1:5001", profile(gflops=181.5, mem=3 << 30, cores=2, price=250000))
    call(m.addr, "Heartbeat", heartbeat_request(alice, pid_a))
    # a provider's heartbeat comes from its own account only
    e = call_error(m.addr, "Heartbeat", heartbeat_request(bob, pid_a))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED

    # any account may list; the renter sees both, with their profiles: the
    # claimed speed, the market's estimate (the claim until observed), and
    # the reliability of a new account
    out = providers_table(run_arceus, m.addr, renter)
    row_a = next(l for l in out.splitlines() if "127.0.0.1:5001" in l)
    assert re.match(rf"^{pid_a}\s+alice\s+127\.0\.0\.1:5001\s+181\.5\s+181\.5\s+3\.0 GiB\s+2\s+0\.250000\s+0\.50\s",
                    row_a), out
    row_b = next(l for l in out.splitlines() if "127.0.0.1:5002" in l)
    assert re.match(rf"^{pid_b}\s+bob\s+127\.0\.0\.1:5002\s+90\.0\s+.*\s1\.500000\s", row_b), out
    # the foreign client reads the same list
    reply = decode(call(m.addr, "ListProviders", field_bytes(1, renter)))
    infos = [decode(b) for b in reply[1]]
    assert sorted(i[1][0] for i in infos) == sorted([pid_a, pid_b])
    assert all(i[6][0] == 1 for i in infos)  # online

    # alice keeps beating, bob goes silent: within a few seconds bob is offline
    deadline = time.time() + 30
    while time.time() < deadline:
        call(m.addr, "Heartbeat", heartbeat_request(alice, pid_a))
        out = providers_table(run_arceus, m.addr, renter)
        if "127.0.0.1:5002" not in out:
            break
        time.sleep(0.5)
    assert "127.0.0.1:5002" not in out, out
    assert "127.0.0.1:5001" in out, out
    everyone = providers_table(run_arceus, m.addr, renter, "--all")
    assert re.search(r"127\.0\.0\.1:5002.*\(offline\)", everyone), everyone
    # a heartbeat brings it back
    call(m.addr, "Heartbeat", heartbeat_request(bob, pid_b))
    assert "127.0.0.1:5002" in providers_table(run_arceus, m.addr, renter)

    # and everyone silent: the list empties
    deadline = time.time() + 30
    while time.time() < deadline and "no providers online" not in out:
        time.sleep(0.5)
        out = providers_table(run_arceus, m.addr, renter)
    assert "no providers online" in out, out
    m.stop()
    assert "marked offline" in m.stderr


# ---------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------

def test_ledger_shows_opening_credit_and_refuses_other_accounts(run_arceus, add_account, market, tmp_path):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice", "100")
    bob = add_account(db, "bob", "0.25")
    m = market(db)

    p = run_arceus("ledger", "--market", m.addr, "--token", alice, check=True)
    assert p.stdout.startswith("ledger of alice\n"), p.stdout
    assert re.search(r"^\d+\s+\d+\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+mint\s+-\s+-\s+\+100\.000000$",
                     p.stdout, re.M), p.stdout
    assert p.stdout.rstrip().endswith("balance: 100.000000 credits\npending: 0.000000 credits (held in escrow)")
    # naming yourself is the same as naming nobody
    assert run_arceus("ledger", "alice", "--market", m.addr, "--token", alice,
                      check=True).stdout == p.stdout
    p = run_arceus("ledger", "--market", m.addr, "--token", bob, check=True)
    assert "+0.250000" in p.stdout and "balance: 0.250000 credits" in p.stdout

    # another account's ledger, or one that does not exist: refused alike
    for other in ("bob", "nobody"):
        p = run_arceus("ledger", other, "--market", m.addr, "--token", alice)
        assert p.returncode == 1, p.stdout
        assert f"may read only its own ledger, not that of {other}" in p.stderr, p.stderr
        assert "0.250000" not in p.stdout
        e = call_error(m.addr, "Ledger", field_bytes(1, alice) + field_bytes(2, other))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    e = call_error(m.addr, "Ledger", field_bytes(1, alice) + field_bytes(2, "x" * 500))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    e = call_error(m.addr, "Ledger", field_bytes(2, "alice"))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED

    # Balance over the foreign client
    r = decode(call(m.addr, "Balance", field_bytes(1, bob)))
    assert r[1][0] == b"bob" and r[2][0] == 250000
    e = call_error(m.addr, "Balance", field_bytes(1, "1" * 64))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED


def test_sigkilled_market_restarts_with_accounts_and_ledger(run_arceus, add_account, market, tmp_path):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice", "100")
    m = market(db)
    # accounts made while the market runs are seen by it
    bob = add_account(db, "bob", "7.5")
    pid, _ = register(m.addr, alice, "127.0.0.1:5001")
    before = run_arceus("ledger", "--market", m.addr, "--token", bob, check=True).stdout
    assert "balance: 7.500000 credits" in before
    m.kill()
    total, rows = ledger_sum(db)
    assert total == 0 and rows == 4

    m2 = market(db)
    assert run_arceus("ledger", "--market", m2.addr, "--token", bob, check=True).stdout == before
    p = run_arceus("ledger", "--market", m2.addr, "--token", alice, check=True)
    assert "balance: 100.000000 credits" in p.stdout
    # the provider re-registers under its old id
    assert register(m2.addr, alice, "127.0.0.1:5001")[0] == pid
    assert "127.0.0.1:5001" in providers_table(run_arceus, m2.addr, bob)
    assert add_account(db, "carol", "1")
    assert m2.stop() == 0
    total, rows = ledger_sum(db)
    assert total == 0 and rows == 6


# ---------------------------------------------------------------------------
# A lost provider's replacement, asked for again
# ---------------------------------------------------------------------------

def account_reliability(db, pid):
    """The reliability of a provider's account (reliability is the account's)."""
    con = sqlite3.connect(str(db))
    try:
        return con.execute("SELECT a.reliability FROM accounts a JOIN providers p ON p.account_id = a.id"
                           " WHERE p.id = ?", (pid,)).fetchone()[0]
    finally:
        con.close()


def test_replace_provider_asked_again_after_a_restart_gets_the_same_answer(run_arceus, add_account, market, tmp_path):
    """A driver whose ReplaceProvider answer was lost (the market died after
    settling the loss, before replying) asks again once the market is back,
    and gets the same answer with nothing done twice: no second contest, no
    second reliability penalty, no second replacement."""
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    owners = [add_account(db, f"owner{i}", "0") for i in range(3)]
    # no worker checks: a loss is confirmed by its heartbeats stopping (1 s here)
    m = market(db, *NO_WORKER_CHECKS, "--offline-after", "3")
    pids = [register(m.addr, tok, f"127.0.0.1:{5001 + i}")[0] for i, tok in enumerate(owners)]
    r = decode(call(m.addr, "AcquireLease", acquire(renter, devices=2)))
    lease = r[3][0].decode()
    leased = [decode(p)[1][0] for p in r[5]]
    spare = next(p for p in pids if p not in leased)
    for step in range(4):
        call(m.addr, "ReportUsage", usage(lease, step, [(i, pid, 0) for i, pid in enumerate(leased)]))
    lost_before = account_reliability(db, leased[1])

    # the spare keeps beating; the lost one does not
    time.sleep(1.5)
    call(m.addr, "Heartbeat", heartbeat_request(owners[pids.index(spare)], spare))
    first = decode(call(m.addr, "ReplaceProvider", replace(lease, leased[1], 2)))
    assert decode(first[1][0])[1] == [spare]
    assert first.get(2, [0]) == [0] and first[4] == [2]  # nothing reversed; its steps 2 and 3 contested
    books = ledger_sum(db)
    lost_after = account_reliability(db, leased[1])
    assert lost_after < lost_before

    m.kill()
    m2 = market(db, *NO_WORKER_CHECKS, "--offline-after", "3")
    again = decode(call(m2.addr, "ReplaceProvider", replace(lease, leased[1], 2)))
    assert again == first
    assert ledger_sum(db) == books
    assert account_reliability(db, leased[1]) == lost_after
    # the replacement works the lease: its redo of step 2 is paid to it
    call(m2.addr, "ReportUsage", usage(lease, 2, [(0, leased[0], 0), (1, spare, 0)]))
    con = sqlite3.connect(str(db))
    try:
        assert con.execute("SELECT step, state FROM usage WHERE provider_id = ?", (spare,)).fetchall() == [(2, "held")]
        assert con.execute("SELECT step, state FROM usage WHERE provider_id = ? AND step >= 2 ORDER BY step",
                           (leased[1],)).fetchall() == [(2, "reversed"), (3, "contested")]
    finally:
        con.close()

    # another checkpoint is another question: refused, as for any provider not in the lease
    e = call_error(m2.addr, "ReplaceProvider", replace(lease, leased[1], 1))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "not in the lease" in e.details()
    e = call_error(m2.addr, "ReplaceProvider", replace(lease, 999, 2))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "not in the lease" in e.details()
    assert ledger_sum(db)[0] == 0


def job_status(db, job_id):
    con = sqlite3.connect(str(db))
    try:
        return con.execute("SELECT status, step FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        con.close()


def test_a_resume_without_enough_providers_marks_the_job_failed_until_resumed_again(add_account, market,
                                                                                    tmp_path):
    """A driver resuming a job asks for more providers than are free: it is
    refused, and the job is marked failed at its checkpoint rather than left
    running without a lease; a later resume that can be served runs it again."""
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    owner = add_account(db, "owner", "0")
    m = market(db, *NO_WORKER_CHECKS)
    pid, _ = register(m.addr, owner, "127.0.0.1:5001")
    r = decode(call(m.addr, "AcquireLease", acquire(renter, devices=1)))
    job, lease = r[1][0], r[3][0].decode()
    for step in range(3):
        call(m.addr, "ReportUsage", usage(lease, step, [(0, pid, 0)]))
    assert job_status(db, job)[0] == "running"

    e = call_error(m.addr, "AcquireLease", acquire(renter, devices=2, resume_job=job, kept_steps=2))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 providers asked for" in e.details()
    assert job_status(db, job) == ("failed", 2)
    # the old driver's lease ended with the resume
    e = call_error(m.addr, "ReportUsage", usage(lease, 3, [(0, pid, 0)]))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED

    r = decode(call(m.addr, "AcquireLease", acquire(renter, devices=1, resume_job=job, kept_steps=2)))
    assert r[1][0] == job
    assert job_status(db, job) == ("running", 2)
    assert ledger_sum(db)[0] == 0
