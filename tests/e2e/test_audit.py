"""Audits by replay, end to end (docs/DESIGN.md, "Audits by replay").

A renter's driver replays drawn stage-steps of its providers and compares
the digests they committed. The test build's workers can cheat
(ARCEUS_FAULT: skip-update, noise, zero-grad, stale, on every step): the
driver catches the cheat, the market replays the evidence itself before it
moves money, the cheat's held earnings go back to the renter, and the run
finishes on an honest replacement with the same weights as a run that never
met a cheat. An honest run with audits on every step sees no failure, with a
verifier (the driver) at another thread count than its providers.
"""

import json
import re

import pytest

from conftest import _env, query
from test_market_train import MICRO, ledger_total

pytest.importorskip("grpc")

STEPS = 24
RUN = ["--steps", str(STEPS), "--batch", "32", "--micro-batches", "2", "--eval-every", "0", "--seed", "7",
       "--compress", "none"]
CHEATS = ["skip-update", "noise", "zero-grad", "stale"]


@pytest.fixture(scope="module")
def reference(run_arceus, small_mlp_spec, small_fashion, tmp_path_factory):
    """The same training in one process, no providers, no audits."""
    out = tmp_path_factory.mktemp("reference")
    run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, *RUN, "--threads", "1", "--out", out,
               "--checkpoint-every", "0", check=True)
    return (out / "model.safetensors").read_bytes()


def audits(log):
    (a,) = [json.loads(x) for x in log.read_text().splitlines() if '"audits"' in x]
    return a


def test_an_honest_run_audited_every_step_sees_no_failure(run_arceus, workers, tmp_path, small_mlp_spec,
                                                          small_fashion, reference):
    ws = workers(3)
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    # the verifier (this driver) runs 2 threads, the providers 1: the kernels'
    # results do not depend on the thread count
    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, *RUN, "--threads", "2",
                   "--workers", ",".join(w.addr for w in ws), "--plan", "0,1,2", "--audit-rate", "1",
                   "--out", out, "--log", log, "--checkpoint-every", "0", check=True)
    a = audits(log)
    # every stage at every step whose state after came in (all but the last)
    assert (a["passed"], a["failed"], a["skipped"]) == (3 * (STEPS - 1), 0, 0), p.stdout[-2000:]
    assert f"audits: {3 * (STEPS - 1)} passed, 0 failed" in p.stdout
    assert (out / "model.safetensors").read_bytes() == reference


def test_no_audits_no_digests(run_arceus, workers, tmp_path, small_mlp_spec, small_fashion, reference):
    ws = workers(2)
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, *RUN, "--threads", "1",
                   "--workers", ",".join(w.addr for w in ws), "--audit-rate", "0", "--out", out, "--log", log,
                   "--checkpoint-every", "0", check=True)
    assert "audits:" not in p.stdout and '"audits"' not in log.read_text()
    assert (out / "model.safetensors").read_bytes() == reference


# no --audit-rate and no ARCEUS_AUDIT_RATE (conftest sets it to 0): the default
DEFAULT_RATE = {"ARCEUS_AUDIT_RATE": None}


def test_workers_the_renter_names_are_not_audited_by_default(run_arceus, workers, tmp_path, small_mlp_spec,
                                                             small_fashion):
    ws = workers(2)
    log = tmp_path / "log.jsonl"
    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, *RUN, "--threads", "1",
                   "--workers", ",".join(w.addr for w in ws), "--audit-seed", "5", "--log", log,
                   "--checkpoint-every", "0", check=True, env=DEFAULT_RATE)
    assert "audits:" not in p.stdout and '"audits"' not in log.read_text(), p.stdout[-2000:]
    usage = " ".join(run_arceus("train", "--help", check=True).stdout.split())  # unwrapped
    assert "0.05 on a --market lease, 0 on --workers" in usage, usage


def test_a_leased_run_is_audited_by_default(run_arceus, add_account, procs, tmp_path, small_mlp_spec,
                                            small_fashion):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1000")
    owners = [add_account(db, f"p{i}") for i in range(2)]
    market = procs.market(db, "--offline-after", "3600")
    for i, t in enumerate(owners):
        procs.leased_worker(market, t, (400 + 100 * i) * MICRO)
    log = tmp_path / "log.jsonl"
    # audits on: the run logs their count and prints it, however few were drawn
    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, *RUN, "--threads", "1",
                   "--market", market.addr, "--token", renter, "--devices", "2", "--audit-seed", "5",
                   "--checkpoint-every", "0", "--log", log, env=DEFAULT_RATE)
    assert p.returncode == 0, p.stderr[-3000:]
    assert audits(log)["failed"] == 0
    assert re.search(r"audits: \d+ passed, 0 failed", p.stdout), p.stdout[-2000:]


@pytest.mark.parametrize("cheat", CHEATS)
def test_a_cheating_provider_is_caught_repaid_and_replaced(cheat, run_arceus, add_account, procs, tmp_path,
                                                           small_mlp_spec, small_fashion, reference):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1000")
    owners = [add_account(db, f"p{i}") for i in range(4)]
    market = procs.market(db, "--offline-after", "3600", "--escrow-window", "0")
    # the cheat is cheap, so it is leased; the dearest stays free to replace it
    ps = [procs.leased_worker(market, t, (400 + 100 * i) * MICRO,
                              env={**_env(), "ARCEUS_FAULT": cheat} if i == 1 else None)
          for i, t in enumerate(owners)]
    bad = ps[1].id
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, *RUN, "--threads", "1",
                   "--plan", "0,1,2", "--market", market.addr, "--token", renter, "--devices", "3",
                   "--audit-rate", "0.5", "--audit-seed", "11", "--checkpoint-every", "5", "--out", out,
                   "--log", log)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"stage \d \(127\.0\.0\.1:\d+\) failed an audit of step \d+", p.stdout), p.stdout[-3000:]
    assert "the market confirmed stage" in p.stdout, p.stdout[-3000:]
    assert "released: job 1 done" in p.stdout, p.stdout[-3000:]
    # the run went back to the start (the cheat never passed an audit) and
    # finished on honest providers: the weights of a run without a cheat
    assert (out / "model.safetensors").read_bytes() == reference
    (stage, failed_step), = query(db, "SELECT stage, step FROM audit_failures WHERE provider_id = ?", bad)
    assert failed_step < STEPS
    (evidence,), = query(db, "SELECT evidence FROM audit_failures")
    assert json.loads(evidence)["provider"] == bad
    # the cheat's earnings went back to the renter: nothing released but
    # honest work an audit verified (stale's first step has nothing stale to
    # send), its account unreliable; the ledger sums to zero
    kept = query(db, "SELECT step, amount FROM usage WHERE provider_id = ? AND state != 'reversed'", bad)
    assert all(step == 0 for step, _ in kept) and (cheat == "stale" or not kept), kept
    assert query(db, "SELECT a.balance, a.reliability FROM accounts a JOIN providers p ON p.account_id = a.id"
                     " WHERE p.id = ?", bad) == [(sum(a for _, a in kept), 0.0)]
    assert query(db, "SELECT COUNT(*) FROM usage WHERE provider_id = ? AND state = 'reversed'", bad)[0][0] > 0
    assert ledger_total(db) == 0
    assert query(db, "SELECT COUNT(*) FROM usage WHERE state IN ('held', 'contested')") == [(0,)]
    assert query(db, "SELECT balance FROM accounts WHERE name = 'escrow'") == [(0,)]
    # the renter paid exactly the work not reversed; its claim held
    (spent,), = query(db, "SELECT SUM(amount) FROM usage WHERE state != 'reversed'")
    assert query(db, "SELECT balance FROM accounts WHERE name = 'renter'") == [(1000 * MICRO - spent,)]
    assert query(db, "SELECT false_claims FROM accounts WHERE name = 'renter'") == [(0,)]
    (now,), = query(db, "SELECT provider_id FROM lease_members WHERE stage = ?", stage)
    assert now != bad
