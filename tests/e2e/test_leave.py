"""A graceful leave: a device whose owner wants it back leaves mid-run
without costing anyone anything.

The leaving device says so in its stage's next NORM record; the driver
finishes the step, fetches every stage's state, gives the leaver's place to
another device (a spare worker, or a free provider the market hands the
place over to) and goes on from the same step: the log shows the move, no
step is logged twice, and the final weights are bitwise those of an
undisturbed run with the same seed. Through the market the leaver was paid
for every step it did, nothing is reversed and its reliability stays. With
no device to take the place, the run keeps its state as a checkpoint and
stops saying so; resumed, it still ends bitwise where the undisturbed run
does.

Leaves: `arceus worker` on SIGTERM; `arceus provide` whose owner comes back
(its --when idle detector reading a test's input directory), on SIGTERM,
and asked by `arceus provide --leave`.
"""

import json
import os
import signal
import time

import pytest

from conftest import SANITIZER_MARKERS, Ticker, query, read_log, wait_for
from pbwire import acquire, decode, field_bytes, field_varint, hand_over, usage
from test_market import NO_WORKER_CHECKS, call, call_error, register
from test_market_train import balances, ledger_total

grpc = pytest.importorskip("grpc")

STEPS = 300
BATCH = 32


@pytest.fixture(scope="module")
def common(small_mlp_spec, small_fashion):
    return ["--model", small_mlp_spec, "--data", small_fashion, "--steps", str(STEPS), "--batch", str(BATCH),
            "--micro-batches", "2", "--eval-every", "0", "--threads", "1", "--seed", "7"]


@pytest.fixture(scope="module")
def reference(run_arceus, common, tmp_path_factory):
    """The same run undisturbed, in one process."""
    out = tmp_path_factory.mktemp("reference")
    run_arceus("train", *common, "--out", out, check=True)
    return (out / "model.safetensors").read_bytes()


def steps_logged(log):
    if not log.exists():
        return []
    return [r["step"] for r in read_log(log) if "loss" in r]


def wait_for_step(train, log, n, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and train.running() and len(steps_logged(log)) < n:
        time.sleep(0.01)
    assert train.running(), f"the run ended before step {n}:\n{train.err()[-3000:]}"
    assert len(steps_logged(log)) >= n, f"step {n} not reached in {timeout} s"


def finish(train, timeout=300):
    rc = train.wait(timeout)
    err = train.err()
    for marker in SANITIZER_MARKERS:
        assert marker not in err, err[-6000:]
    return rc, train.out(), err


def moves(log):
    return [r for r in read_log(log) if r.get("event") == "stage_left"]


def check_nothing_redone(log, steps=STEPS):
    """Every step logged once, in order, and no loss recovery."""
    assert steps_logged(log) == list(range(1, steps + 1))
    assert not [r for r in read_log(log) if r.get("event") == "stage_lost"]


# ---------------------------------------------------------------------------
# Workers of one's own
# ---------------------------------------------------------------------------

def test_a_worker_stopped_by_sigterm_hands_its_stage_to_a_spare(procs, tmp_path, common, reference):
    ws = [procs.worker() for _ in range(3)]
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    train = procs.start("train", "train", *common, "--workers", ",".join(w.addr for w in ws), "--spares", "1",
                        "--plan", "0-0,1-2", "--out", out, "--log", log)
    wait_for_step(train, log, 20)
    ws[1].proc.send_signal(signal.SIGTERM)
    assert ws[1].wait(60) == 0, ws[1].err()[-3000:]  # it left by itself, once its stage had moved
    assert "left: the driver moved its stage" in ws[1].err(), ws[1].err()[-3000:]
    rc, stdout, err = finish(train)
    assert rc == 0, err[-3000:]
    (move,) = moves(log)
    assert move["stage"] == 1 and move["from"] == ws[1].addr and move["to"] == ws[2].addr, move
    assert f"stage 1 ({ws[1].addr}) is leaving (its owner wants the machine back, or it is stopping): moving it " \
           f"after step {move['step']}" in stdout, stdout[-3000:]
    assert (f"stage 1 moved from {ws[1].addr} to {ws[2].addr} after step {move['step']}: nothing is redone"
            in stdout), stdout[-3000:]
    assert 20 <= move["step"] < STEPS
    check_nothing_redone(log)
    assert (out / "model.safetensors").read_bytes() == reference


def test_without_a_spare_the_run_keeps_its_state_and_stops(run_arceus, procs, tmp_path, common, reference):
    ws = [procs.worker() for _ in range(2)]
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    train = procs.start("train", "train", *common, "--workers", ",".join(w.addr for w in ws), "--plan", "0-0,1-2",
                        "--out", out, "--log", log)
    wait_for_step(train, log, 20)
    ws[1].proc.send_signal(signal.SIGTERM)
    assert ws[1].wait(60) == 0, ws[1].err()[-3000:]
    rc, _, err = finish(train)
    assert rc == 1, err[-3000:]
    done = json.loads((out / "state.json").read_text())["step"]
    assert (f"stage 1 ({ws[1].addr}) is leaving and there is no spare worker to take its place (give more "
            f"--workers and --spares N); checkpoint of step {done} in {out}") in err, err[-3000:]
    assert steps_logged(log) == list(range(1, done + 1))
    # resumed (here in one process), it ends where the undisturbed run does
    run_arceus("train", "--resume", out, "--data", common[3], "--threads", "1", check=True)
    assert (out / "model.safetensors").read_bytes() == reference


# ---------------------------------------------------------------------------
# Providers through the market
# ---------------------------------------------------------------------------

# 3 s without keyboard or mouse and the owner is away
IDLE = ("--when", "idle", "--idle-after", "0.05", "--check-every", "0.1")


def idle_inputs(d):
    """A machine at rest: one input device, no interrupts, no power supply."""
    (d / "input").mkdir(parents=True)
    (d / "ps").mkdir()
    (d / "interrupts").write_text("           CPU0\n  0:         40   IO-APIC    2-edge      timer\n")
    (d / "input" / "event0").write_text("")
    return ("--input-dir", d / "input", "--interrupts", d / "interrupts", "--power-supply-dir", d / "ps")


def available(run_arceus, market, token):
    p = run_arceus("providers", "--market", market.addr, "--token", token, "--json", check=True)
    return {x["id"]: x["available"] for x in json.loads(p.stdout)["providers"]}


class Owner(Ticker):
    """The owner at the keyboard: a key pressed now and every half second
    until they leave (the test ends), as the idle detector sees it."""

    def __init__(self, event):
        self.event = event

    def tick(self):
        os.utime(self.event)


def member(db, stage):
    (pid,), = query(db, "SELECT provider_id FROM lease_members WHERE stage = ?", stage)
    return pid


def paid_steps(db, pid):
    """(step, stage) of every usage row of provider pid"""
    return query(db, "SELECT step, stage FROM usage WHERE provider_id = ? ORDER BY step", pid)


def check_paid(db, pid, stage, steps):
    """Provider pid was paid for exactly `steps` at `stage`, nothing of it
    reversed: its balance is the sum of those payments (released from escrow
    when the job ended: the markets here settle at once)."""
    assert paid_steps(db, pid) == [(s, stage) for s in steps]
    assert query(db, "SELECT COUNT(*) FROM usage WHERE provider_id = ? AND state != 'released'", pid) == [(0,)]
    (earned,), = query(db, "SELECT COALESCE(SUM(amount), 0) FROM usage WHERE provider_id = ?", pid)
    (owner,), = query(db, "SELECT a.name FROM accounts a JOIN providers p ON p.account_id = a.id WHERE p.id = ?",
                      pid)
    assert earned > 0 and balances(db)[owner] == earned


def reliability_kept(db):
    """No account lost reliability: none below a new account's (a leave is no loss)."""
    (low,), = query(db, "SELECT MIN(reliability) FROM accounts WHERE system = 0")
    return low >= 0.5


def test_providers_leave_when_their_owner_returns_and_on_sigterm(run_arceus, add_account, procs, tmp_path, common,
                                                                 reference):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1000")
    owners = [add_account(db, f"p{i}") for i in range(4)]
    market = procs.market(db, "--offline-after", "3600", "--escrow-window", "0")
    # two cheap providers computing only while their owner is away, and two
    # dear ones (free, to take their places)
    cheap = [procs.provider(market, owners[i], *IDLE, *idle_inputs(tmp_path / f"in{i}"), "--price", "5000",
                            "--control", tmp_path / f"p{i}.sock", name=f"cheap{i}") for i in range(2)]
    dear = [procs.provider(market, owners[2 + i], "--price", str(100000 + 20000 * i), name=f"dear{i}")
            for i in range(2)]
    by_id = {p.id: p for p in cheap + dear}
    wait_for("every provider available", lambda: all(available(run_arceus, market, renter).values()), 30)

    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    train = procs.start("train", "train", *common, "--plan", "0-0,1-2", "--market", market.addr, "--token", renter,
                        "--devices", "2", "--out", out, "--log", log)
    wait_for_step(train, log, 20)
    first, second = member(db, 1), member(db, 0)
    assert {first, second} == {p.id for p in cheap}
    # the owner of stage 1's machine comes back: it leaves, and stays (leased to no one)
    with Owner(tmp_path / f"in{cheap.index(by_id[first])}" / "input" / "event0"):
        by_id[first].wait_stdout("left: the renter moved its stage", 60)
        (m1,) = wait_for("the first move", lambda: moves(log) or None, 60)
        wait_for_step(train, log, m1["step"] + 20)
        # stage 0's provider is stopped (SIGTERM): it leaves too, then exits
        by_id[second].proc.send_signal(signal.SIGTERM)
        assert by_id[second].wait(60) == 0, by_id[second].err()[-3000:]
        rc, stdout, err = finish(train)
        assert rc == 0, err[-3000:]
        assert by_id[first].running()
        assert not available(run_arceus, market, renter)[first]
    leaver_out = by_id[first].out()
    assert "leaving: its owner is active" in leaver_out, leaver_out
    assert "leased to no one until its owner's rules let it compute again" in leaver_out, leaver_out
    assert "leaving: stopping: SIGTERM; the renter's driver is asked" in by_id[second].out(), by_id[second].out()

    m1, m2 = moves(log)
    assert (m1["stage"], m1["from"]) == (1, by_id[first].addr) and m1["to"] in {p.addr for p in dear}, m1
    assert (m2["stage"], m2["from"]) == (0, by_id[second].addr) and m2["to"] in {p.addr for p in dear}, m2
    assert m1["to"] != m2["to"] and 20 <= m1["step"] < m2["step"] < STEPS
    assert "takes its place" in stdout and "released: job 1 done" in stdout, stdout[-3000:]
    check_nothing_redone(log)
    assert (out / "model.safetensors").read_bytes() == reference

    # the money: each leaver paid for every step it did, the newcomers for
    # the rest, nothing reversed; reliability untouched; the ledger whole
    check_paid(db, first, 1, range(0, m1["step"]))
    check_paid(db, second, 0, range(0, m2["step"]))
    came = {p.id for p in dear if p.addr == m1["to"]}.pop(), {p.id for p in dear if p.addr == m2["to"]}.pop()
    check_paid(db, came[0], 1, range(m1["step"], STEPS))
    check_paid(db, came[1], 0, range(m2["step"], STEPS))
    assert query(db, "SELECT COUNT(*) FROM ledger WHERE reason = 'reversal'") == [(0,)]
    assert reliability_kept(db)
    assert ledger_total(db) == 0
    assert query(db, "SELECT status, step FROM jobs") == [("done", STEPS)]
    assert query(db, "SELECT COUNT(*) FROM lease_replacements") == [(0,)]
    assert sorted(query(db, "SELECT leaver_id, stage, step FROM lease_handovers")) == sorted(
        [(first, 1, m1["step"]), (second, 0, m2["step"])])


def test_asked_to_leave_with_no_provider_free_the_run_keeps_its_state_and_stops(
        run_arceus, add_account, procs, tmp_path, common, reference):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1000")
    owners = [add_account(db, f"p{i}") for i in range(2)]
    market = procs.market(db, "--offline-after", "3600", "--escrow-window", "0")
    socks = [tmp_path / f"p{i}.sock" for i in range(2)]
    ps = [procs.provider(market, owners[i], "--price", "5000", "--control", socks[i], name=f"p{i}")
          for i in range(2)]
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    train = procs.start("train", "train", *common, "--plan", "0-0,1-2", "--market", market.addr, "--token", renter,
                        "--devices", "2", "--out", out, "--log", log)
    wait_for_step(train, log, 20)
    leaver = member(db, 1)
    i = [p.id for p in ps].index(leaver)
    asked = run_arceus("provide", "--leave", "--control", socks[i], timeout=120)
    assert asked.returncode == 0, asked.stderr
    said = asked.stdout
    assert "leaving: stopping: arceus provide --leave; the renter's driver is asked to move its stage" in said, said
    assert "left: the renter moved its stage" in said and said.rstrip().endswith("arceus provide: stopped"), said
    assert ps[i].wait(60) == 0
    rc, _, err = finish(train)
    assert rc == 1, err[-3000:]
    done = json.loads((out / "state.json").read_text())["step"]
    assert (f"stage 1 ({ps[i].addr}) is leaving and no free provider at the market can take its place; "
            f"checkpoint of step {done} in {out}") in err, err[-3000:]
    assert steps_logged(log) == list(range(1, done + 1))
    # paid for every step it did, nothing reversed, reliability untouched
    check_paid(db, leaver, 1, range(0, done))
    assert query(db, "SELECT COUNT(*) FROM ledger WHERE reason = 'reversal'") == [(0,)]
    assert reliability_kept(db)
    assert query(db, "SELECT status, step FROM jobs") == [("failed", done)]
    assert query(db, "SELECT COUNT(*) FROM leases WHERE released IS NULL") == [(0,)]
    # asked again, there is no one there to ask
    again = run_arceus("provide", "--leave", "--control", socks[i])
    assert again.returncode == 1 and f"no provider answers on {socks[i]}" in again.stderr, again.stderr


# ---------------------------------------------------------------------------
# HandOver: the leaver's word, and no money moves
# ---------------------------------------------------------------------------

def heartbeat(token, pid, leaving):
    return (field_bytes(1, token) + field_varint(2, pid) + field_varint(3, int(leaving)) +
            field_bytes(4, "leaving: stopping" if leaving else "") + field_varint(5, int(leaving)))


def test_hand_over_takes_the_leavers_word_and_moves_no_money(add_account, market, tmp_path):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    owners = [add_account(db, f"owner{i}", "0") for i in range(3)]
    m = market(db, *NO_WORKER_CHECKS)
    pids = [register(m.addr, tok, f"127.0.0.1:{5001 + i}")[0] for i, tok in enumerate(owners)]
    owner_of = dict(zip(pids, owners))
    r = decode(call(m.addr, "AcquireLease", acquire(renter, devices=2)))
    lease = r[3][0].decode()
    members = [decode(p) for p in r[5]]
    leased = [x[1][0] for x in members]
    ticket = members[1][7][0].decode()
    spare = next(p for p in pids if p not in leased)
    for step in range(4):
        call(m.addr, "ReportUsage", usage(lease, step, [(i, pid, 0) for i, pid in enumerate(leased)]))
    rows = query(db, "SELECT * FROM ledger")

    # the renter's word alone hands nothing over: the provider must have said it
    e = call_error(m.addr, "HandOver", hand_over(lease, leased[1], 4))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "has not said it is leaving" in e.details()
    # nor does another account's heartbeat say it for the provider
    e = call_error(m.addr, "Heartbeat", heartbeat(owners[0], leased[1], True))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    call(m.addr, "Heartbeat", heartbeat(owner_of[leased[1]], leased[1], True))
    # the provider's ticket is not the lease's token; bad numbers are refused
    for req, code in ((hand_over(ticket, leased[1], 4), grpc.StatusCode.UNAUTHENTICATED),
                      (hand_over(lease, leased[1], -1), grpc.StatusCode.INVALID_ARGUMENT),
                      (hand_over(lease, leased[1], 1 << 62), grpc.StatusCode.INVALID_ARGUMENT),
                      (hand_over(lease, leased[1], 4, 1 << 60), grpc.StatusCode.INVALID_ARGUMENT),
                      (hand_over(lease, 999, 4), grpc.StatusCode.INVALID_ARGUMENT),
                      (b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT)):
        assert call_error(m.addr, "HandOver", req).code() == code
    # asking for more memory than the free provider offers finds no one, and changes nothing
    assert decode(call(m.addr, "HandOver", hand_over(lease, leased[1], 4, 16 << 30))).get(1) is None
    assert query(db, "SELECT provider_id FROM lease_members ORDER BY stage") == [(p,) for p in leased]

    first = decode(call(m.addr, "HandOver", hand_over(lease, leased[1], 4)))
    got = decode(first[1][0])
    assert got[1] == [spare] and got[7][0] != ticket.encode()
    assert query(db, "SELECT provider_id FROM lease_members ORDER BY stage") == [(leased[0],), (spare,)]
    # not a loss: no money moved, the leaver is online, as reliable as before
    assert query(db, "SELECT * FROM ledger") == rows
    assert query(db, "SELECT p.online, a.reliability FROM providers p JOIN accounts a ON a.id = p.account_id"
                     " WHERE p.id = ?", leased[1]) == [(1, 0.5)]
    # asked again (its answer lost): the same answer, nothing done twice
    assert decode(call(m.addr, "HandOver", hand_over(lease, leased[1], 4))) == first
    # the newcomer is paid for the steps from here; the leaver, no longer a member, is not
    call(m.addr, "ReportUsage", usage(lease, 4, [(0, leased[0], 0), (1, spare, 0)]))
    e = call_error(m.addr, "ReportUsage", usage(lease, 5, [(0, leased[0], 0), (1, leased[1], 0)]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT

    # the other member leaves too: no provider is free (a leaving one is not)
    call(m.addr, "Heartbeat", heartbeat(owner_of[leased[0]], leased[0], True))
    assert decode(call(m.addr, "HandOver", hand_over(lease, leased[0], 5))).get(1) is None
    assert query(db, "SELECT provider_id FROM lease_members ORDER BY stage") == [(leased[0],), (spare,)]
    # back, and no longer leaving: it may be leased again, and handed over no more
    call(m.addr, "Heartbeat", heartbeat(owner_of[leased[0]], leased[0], False))
    e = call_error(m.addr, "HandOver", hand_over(lease, leased[0], 5))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert query(db, "SELECT COUNT(*) FROM ledger WHERE reason = 'reversal'") == [(0,)]
    assert ledger_total(db) == 0
