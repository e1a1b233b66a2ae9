"""The market killed (SIGKILL) in the middle of a job and restarted on the
same SQLite file and port.

A renter trains the small MLP across two leased `arceus worker` providers.
Mid-run the market is SIGKILLed; the driver keeps training and queues the
steps it cannot pay; a few seconds later the market comes back on the same
database and port, the driver reports the queued steps (the market pays each
(job, step, stage) once, so a report that reached it before the kill is not
paid twice) and releases the lease. Checks: the run finishes; every step is
paid exactly once per stage; the ledger sums to zero; each balance equals its
usage rows; every ledger row committed before the kill is still there,
unchanged, and no row is duplicated.
"""

import signal
import sqlite3
import subprocess
import time

import pytest

from conftest import SANITIZER_MARKERS, _env
from test_market import add_account
from test_market_train import MICRO, Proc, balances, ledger_total, procs, start_provider  # noqa: F401 (procs: a fixture)

grpc = pytest.importorskip("grpc")

BATCH, STEPS = 32, 1500


def start_market_at(arceus_bin, db, listen, procs):
    m = Proc([str(arceus_bin), "market", "--listen", listen, "--db", str(db), "--offline-after", "3600"],
             r"arceus market: listening on (127\.0\.0\.1:\d+)$", "market")
    procs.append(m)
    return m


def query(db, sql):
    con = sqlite3.connect(str(db), timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_training_survives_a_market_restart_and_pays_every_step_once(
        run_arceus, arceus_bin, procs, tmp_path, small_fashion, small_mlp_spec):
    db = tmp_path / "market.db"
    renter = add_account(run_arceus, db, "renter", "1000")
    alice = add_account(run_arceus, db, "alice")
    bob = add_account(run_arceus, db, "bob")
    market = start_market_at(arceus_bin, db, "127.0.0.1:0", procs)
    pid_a, _ = start_provider(arceus_bin, market, alice, procs, 400 * MICRO)
    pid_b, _ = start_provider(arceus_bin, market, bob, procs, 700 * MICRO)

    out_path, err_path = tmp_path / "train.out", tmp_path / "train.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        train = subprocess.Popen(
            [str(arceus_bin), "train", "--model", str(small_mlp_spec), "--data", str(small_fashion),
             "--steps", str(STEPS), "--batch", str(BATCH), "--eval-every", "0", "--plan", "0,1-2",
             "--market", market.addr, "--token", renter, "--devices", "2"],
            stdout=out, stderr=err, text=True, env=_env())
    try:
        # wait until some steps are paid, then kill the market mid-run
        deadline = time.monotonic() + 120
        paid = 0
        while time.monotonic() < deadline and train.poll() is None:
            paid = query(db, "SELECT COUNT(*) FROM usage")[0][0]
            if paid >= 2 * 50:
                break
            time.sleep(0.05)
        assert train.poll() is None, f"the run ended before the market was killed:\n{err_path.read_text()[-3000:]}"
        assert paid >= 100, f"only {paid} usage rows after 120 s"
        market.proc.send_signal(signal.SIGKILL)
        market.proc.communicate()
        procs.remove(market)
        # what the market had committed when it died
        before = query(db, "SELECT id, transfer_id, account_id, amount, reason, job_id, step FROM ledger ORDER BY id")
        usage_before = query(db, "SELECT COUNT(*) FROM usage")[0][0]
        assert usage_before < 2 * STEPS, "the run was paid in full before the kill: raise STEPS"
        time.sleep(4)
        assert train.poll() is None, f"the run ended while the market was down:\n{err_path.read_text()[-3000:]}"
        market = start_market_at(arceus_bin, db, market.addr, procs)
        rc = train.wait(timeout=300)
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
    out, err = out_path.read_text(), err_path.read_text()
    assert rc == 0, err[-3000:]
    for marker in SANITIZER_MARKERS:
        assert marker not in err, err[-6000:]
    assert "training goes on" in err, err[-3000:]
    assert "is back" in err, err[-3000:]
    assert "gave up" not in err, err[-3000:]
    assert "released: job" in out and " done" in out, out[-2000:]

    # every step paid exactly once per stage
    usage = query(db, "SELECT step, stage, provider_id FROM usage ORDER BY step, stage")
    assert usage == [(s, st, pid) for s in range(STEPS) for st, pid in ((0, pid_a), (1, pid_b))]
    assert ledger_total(db) == 0
    # each balance equals its usage rows
    earned = dict(query(db, "SELECT provider_id, SUM(amount) FROM usage GROUP BY provider_id"))
    total = sum(earned.values())
    bal = balances(db)
    assert bal["alice"] == earned[pid_a] > 0
    assert bal["bob"] == earned[pid_b] > 0
    assert bal["renter"] == 1000 * MICRO - total
    assert query(db, "SELECT status, step, spent FROM jobs") == [("done", STEPS, total)]

    # no committed ledger row lost or changed, none duplicated, none reversed
    after = query(db, "SELECT id, transfer_id, account_id, amount, reason, job_id, step FROM ledger ORDER BY id")
    assert after[:len(before)] == before
    usage_rows = [r for r in after if r[4] == "usage"]
    assert len(usage_rows) == 2 * 2 * STEPS  # two rows per transfer, one transfer per (step, stage)
    assert not [r for r in after if r[4] == "reversal"]
    # each (step, stage) has its own transfer, and the usage rows name them
    transfers = {r[1] for r in usage_rows}
    assert len(transfers) == 2 * STEPS
    assert {t for (t,) in query(db, "SELECT transfer_id FROM usage")} == transfers
