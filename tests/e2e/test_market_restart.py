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

import time

import pytest

from conftest import SANITIZER_MARKERS, query
from test_market_train import MICRO, balances, ledger_total

grpc = pytest.importorskip("grpc")

BATCH, STEPS = 32, 1500


def test_training_survives_a_market_restart_and_pays_every_step_once(
        add_account, procs, tmp_path, small_fashion, small_mlp_spec):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1000")
    alice = add_account(db, "alice")
    bob = add_account(db, "bob")
    market = procs.market(db, "--offline-after", "3600", "--escrow-window", "0")
    pid_a = procs.leased_worker(market, alice, 400 * MICRO).id
    pid_b = procs.leased_worker(market, bob, 700 * MICRO).id

    train = procs.start("train", "train", "--model", small_mlp_spec, "--data", small_fashion,
                        "--steps", STEPS, "--batch", BATCH, "--eval-every", "0", "--plan", "0,1-2",
                        "--market", market.addr, "--token", renter, "--devices", "2")
    # wait until some steps are paid, then kill the market mid-run
    deadline = time.monotonic() + 120
    paid = 0
    while time.monotonic() < deadline and train.running():
        paid = query(db, "SELECT COUNT(*) FROM usage")[0][0]
        if paid >= 2 * 50:
            break
        time.sleep(0.05)
    assert train.running(), f"the run ended before the market was killed:\n{train.err()[-3000:]}"
    assert paid >= 100, f"only {paid} usage rows after 120 s"
    market.kill()
    # what the market had committed when it died
    before = query(db, "SELECT id, transfer_id, account_id, amount, reason, job_id, step FROM ledger ORDER BY id")
    usage_before = query(db, "SELECT COUNT(*) FROM usage")[0][0]
    assert usage_before < 2 * STEPS, "the run was paid in full before the kill: raise STEPS"
    time.sleep(4)
    assert train.running(), f"the run ended while the market was down:\n{train.err()[-3000:]}"
    market = procs.market(db, "--offline-after", "3600", "--escrow-window", "0", listen=market.addr)
    rc = train.wait(timeout=300)
    out, err = train.out(), train.err()
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
