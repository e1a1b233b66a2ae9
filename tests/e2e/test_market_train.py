"""Training through the market: a real `arceus market` over a
SQLite file in tmp_path, providers that are `arceus worker` processes
requiring a lease (registered through python grpcio with hand-encoded
protobuf), and `arceus train --market ... --token ... --devices N`.

Checks the money: each provider earns its stage's FLOPs per step x steps x
its price (rounded per stage and step as ar_store_cost rounds), the FLOPs
being those the lease's plan fixed; the renter is debited the same total,
which the market's escrow holds (pending for the providers) until the job's
settling window has passed, and the ledger sums to zero. A lease the budget
cannot cover is refused up front with the estimate and costs nothing; a
worker that requires a lease refuses a Load without its token.

Every process is stopped in teardown (SIGTERM, exit 0 expected) and its
stderr checked for sanitizer reports (the `procs` fixture of conftest.py).
"""

import json
import re
import sqlite3

import pytest

from pbwire import field_bytes, field_varint
from test_market import call_error

grpc = pytest.importorskip("grpc")

MICRO = 1_000_000
BATCH, STEPS = 128, 12
# the small MLP of conftest: 784-64-32-10; forward 2*B*in*out per linear,
# backward twice that (ar_plan_unit_costs)
LAYERS = [(784, 64), (64, 32), (32, 10)]


def layer_flops(i):
    fin, fout = LAYERS[i]
    return 3 * 2 * BATCH * fin * fout


def cost(flops, price):
    """ar_store_cost: micro-credits for flops at price micro-credits/TFLOP."""
    return (flops * price + 500_000_000_000) // 1_000_000_000_000


def balances(db):
    con = sqlite3.connect(str(db))
    try:
        return dict(con.execute("SELECT name, balance FROM accounts").fetchall())
    finally:
        con.close()


def ledger_total(db):
    con = sqlite3.connect(str(db))
    try:
        return con.execute("SELECT COALESCE(SUM(amount), 0) FROM ledger").fetchone()[0]
    finally:
        con.close()


def test_renter_trains_on_two_leased_providers_and_pays_their_flops(
        run_arceus, add_account, market, leased_worker, tmp_path, small_fashion, small_mlp_spec):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    alice = add_account(db, "alice")
    bob = add_account(db, "bob")
    market = market(db, "--offline-after", "3600")
    # same speed: the cheaper one ranks first and holds stage 0
    price_a, price_b = 400 * MICRO, 700 * MICRO
    pid_a = leased_worker(market, alice, price_a).id
    pid_b = leased_worker(market, bob, price_b).id

    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", STEPS,
                   "--batch", BATCH, "--eval-every", 0, "--plan", "0,1-2",
                   "--market", market.addr, "--token", renter, "--devices", 2)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    # the lease is printed before the plan
    assert out.index("lease ") < out.index("stage"), out
    assert f"provider {pid_a} (alice)" in out and f"provider {pid_b} (bob)" in out, out
    assert "400.000000 credits/TFLOP" in out and "estimate" in out, out
    assert re.search(r"lease \d+ released: job \d+ done", out), out

    flops_a = layer_flops(0)
    flops_b = layer_flops(1) + layer_flops(2)
    # the plan the lease fixed, as the driver printed it
    assert f"units 0-0, {flops_a} FLOPs per step" in out and f"units 1-2, {flops_b} FLOPs per step" in out, out
    earn_a = cost(flops_a, price_a) * STEPS
    earn_b = cost(flops_b, price_b) * STEPS
    assert earn_a > 0 and earn_b > 0
    # paid into escrow: pending for the providers until the job's window passes
    bal = balances(db)
    assert bal["alice"] == 0 and bal["bob"] == 0
    assert bal["escrow"] == earn_a + earn_b
    assert bal["renter"] == 100 * MICRO - earn_a - earn_b
    assert ledger_total(db) == 0
    for tok, earned in ((alice, earn_a), (bob, earn_b)):
        led = run_arceus("ledger", "--market", market.addr, "--token", tok, check=True).stdout
        assert "balance: 0.000000 credits" in led, led
        assert f"pending: {earned // MICRO}.{earned % MICRO:06d} credits (held in escrow)" in led, led

    con = sqlite3.connect(str(db))
    try:
        usage = con.execute("SELECT step, stage, provider_id, flops FROM usage ORDER BY step, stage").fetchall()
        job = con.execute("SELECT status, step, spent FROM jobs").fetchall()
        released = con.execute("SELECT released FROM leases").fetchall()
    finally:
        con.close()
    assert usage == [(s, st, pid, fl) for s in range(STEPS)
                     for st, pid, fl in ((0, pid_a, flops_a), (1, pid_b, flops_b))]
    assert job == [("done", STEPS, earn_a + earn_b)]
    assert len(released) == 1 and released[0][0]  # released (a time)

    # the renter's own ledger through the market agrees
    led = run_arceus("ledger", "--market", market.addr, "--token", renter, check=True)
    assert "renter" in led.stdout


def test_lease_the_budget_cannot_cover_is_refused_with_the_estimate(
        run_arceus, add_account, market, leased_worker, tmp_path, small_fashion, small_mlp_spec):
    db = tmp_path / "market.db"
    poor = add_account(db, "poor", "0.001")
    rich = add_account(db, "rich", "1000")
    alice = add_account(db, "alice")
    market = market(db, "--offline-after", "3600")
    leased_worker(market, alice, 700 * MICRO)
    before = balances(db)

    base = ("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", STEPS, "--batch", BATCH,
            "--eval-every", 0, "--market", market.addr, "--devices", 1)
    p = run_arceus(*base, "--token", poor)
    assert p.returncode == 1
    assert "lease refused: estimated cost" in p.stderr and "exceeds the balance" in p.stderr, p.stderr
    # a cap below the estimate is refused the same way, however rich the renter
    p = run_arceus(*base, "--token", rich, "--max-credits", "0.000001")
    assert p.returncode == 1
    assert "lease refused: estimated cost" in p.stderr and "exceeds max credits" in p.stderr, p.stderr
    # more providers than are online
    p = run_arceus(*base[:-1], 3, "--token", rich)
    assert p.returncode == 1 and "3 providers asked for, 1 online" in p.stderr, p.stderr

    assert balances(db) == before
    assert ledger_total(db) == 0
    con = sqlite3.connect(str(db))
    try:
        assert con.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 0
        assert con.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
    finally:
        con.close()


def test_worker_requiring_a_lease_refuses_a_load_without_its_token(
        run_arceus, add_account, market, leased_worker, worker, tmp_path, small_fashion, small_mlp_spec):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    market = market(db, "--offline-after", "3600")
    w = leased_worker(market, alice, 500 * MICRO)

    base = ("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", 2, "--batch", 32,
            "--eval-every", 0)
    p = run_arceus(*base, "--workers", w.addr)
    assert p.returncode == 1
    assert "Load needs the lease token" in p.stderr, p.stderr

    # a LoadRequest with a token the market does not know (field 13)
    spec = small_mlp_spec.read_text()
    load = (field_bytes(1, spec) + field_varint(2, 0) + field_varint(3, 3) + field_varint(4, 32) + field_varint(5, 1)
            + field_varint(8, 1) + field_bytes(13, "ab" * 32))
    with grpc.insecure_channel(w.addr) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/arceus.Worker/Load")(load, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown or released lease token" in e.value.details()

    # CheckLease itself: the worker's question, asked with a bad lease token
    err = call_error(market.addr, "CheckLease", field_bytes(1, alice) + field_bytes(2, "cd" * 32) + field_varint(3, 1))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED

    # a plain worker (no market) still takes a Load without any token
    plain = worker()
    p = run_arceus(*base, "--workers", plain.addr)
    assert p.returncode == 0, p.stderr[-3000:]


def test_the_estimate_is_the_price_and_a_cap_of_exactly_it_covers_the_run(
        run_arceus, add_account, market, leased_worker, tmp_path, small_fashion, small_mlp_spec):
    """The lease fixes the FLOPs of each stage, so the estimate is exactly what
    the run costs: a --max-credits of exactly the estimate is accepted and
    covers every step, one micro-credit less is refused up front, and with
    the settling window 0 the providers are paid when the job ends."""
    steps = 40
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    alice = add_account(db, "alice")
    bob = add_account(db, "bob")
    market = market(db, "--offline-after", "3600", "--escrow-window", "0")
    # bob: fast and dear, ranked first (more speed per credit); alice: slow and cheap
    price_b, price_a = 700 * MICRO, 400 * MICRO
    leased_worker(market, bob, price_b, gflops=1000.0)
    leased_worker(market, alice, price_a, gflops=150.0)
    f_b, f_a = layer_flops(0), layer_flops(1) + layer_flops(2)
    per_step = cost(f_b, price_b) + cost(f_a, price_a)
    estimate = per_step * steps
    credits = lambda micro: f"{micro // MICRO}.{micro % MICRO:06d}"  # noqa: E731

    base = ("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", steps, "--batch", BATCH,
            "--eval-every", 0, "--plan", "0,1-2", "--market", market.addr, "--token", renter, "--devices", 2)
    p = run_arceus(*base, "--max-credits", credits(estimate - 1))
    assert p.returncode == 1
    assert f"estimated cost {credits(estimate)} credits" in p.stderr and "exceeds max credits" in p.stderr, p.stderr
    p = run_arceus(*base, "--max-credits", credits(estimate))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"estimate {credits(estimate)} credits" in p.stdout, p.stdout
    assert re.search(rf"lease \d+ released: job \d+ done, {re.escape(credits(estimate))} credits spent", p.stdout), \
        p.stdout

    bal = balances(db)
    assert bal["bob"] == cost(f_b, price_b) * steps
    assert bal["alice"] == cost(f_a, price_a) * steps
    assert bal["renter"] == 100 * MICRO - estimate
    assert bal["escrow"] == 0
    assert ledger_total(db) == 0
    con = sqlite3.connect(str(db))
    try:
        assert con.execute("SELECT status, step FROM jobs").fetchall() == [("cancelled", 0), ("done", steps)]
    finally:
        con.close()


def test_stages_commit_digests_that_the_market_keeps(
        run_arceus, add_account, market, leased_worker, tmp_path, small_fashion, small_mlp_spec):
    """Every stage commits SHA-256 digests of its step in its NORM record and
    the driver forwards them with the payment: the market keeps one row per
    step and stage, and the digests chain (what stage 0 sent is what stage 1
    received, in both directions; the state changes every step)."""
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    market = market(db, "--offline-after", "3600")
    leased_worker(market, alice, 400 * MICRO)
    leased_worker(market, bob, 700 * MICRO)
    steps = 4
    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", steps,
                   "--batch", 32, "--micro-batches", 2, "--eval-every", 0, "--plan", "0,1-2",
                   "--market", market.addr, "--token", renter, "--devices", 2)
    assert p.returncode == 0, p.stderr[-3000:]
    con = sqlite3.connect(str(db))
    try:
        rows = con.execute("SELECT step, stage, digests FROM stage_digests ORDER BY step, stage").fetchall()
    finally:
        con.close()
    assert [(s, st) for s, st, _ in rows] == [(s, st) for s in range(steps) for st in (0, 1)], rows
    d = {(s, st): [h[64 * k:64 * (k + 1)] for k in range(5)] for s, st, h in rows}
    state, act_in, act_out, grad_in, grad_out = range(5)
    for s in range(steps):
        assert d[s, 0][act_out] == d[s, 1][act_in], s
        assert d[s, 1][grad_out] == d[s, 0][grad_in], s
        assert d[s, 0][act_in] != d[s, 0][act_out]
        if s:
            for st in (0, 1):
                assert d[s, st][state] != d[s - 1, st][state], (s, st)
