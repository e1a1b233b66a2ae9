"""The money findings, each tried by a hostile client (python grpcio with
hand-encoded protobuf, pbwire) against a real `arceus market` over SQLite,
with real `arceus worker` processes where the market must reach them:

- the renter sets its own price: a report naming 1 FLOP per stage is refused,
  a step costs the FLOPs the lease's plan fixed, at the leased prices;
- the renter claws back everything: a healthy provider reported lost is not
  taken for lost (the market's own Hello reaches it), nothing is reversed and
  the claim counts against the renter; a provider really lost gives back
  only the steps that were redone and paid to another;
- a finished job resumed from step 0 reverses nothing;
- reputation is free to wreck: false loss claims cost the providers nothing
  and, after a few, cost the renter its claims and leases; and free to
  reset: a penalty belongs to the account (a new address spelling keeps it),
  and a new account starts below an established one;
- claims at price 0 win every lease: once renters' drivers have observed a
  provider far slower than it claimed, it loses rank (with hand-made
  progress reports, and with a real training run).

Each of these fails on a build whose market believes whatever it is told.
"""

import sqlite3
import struct
import time

import pytest

from conftest import CONFIGS
from pbwire import acquire, decode, field_bytes, field_double, field_varint, replace, usage
from test_market import call, call_error, heartbeat_request, profile, register
from test_market_train import BATCH, balances, cost, layer_flops, ledger_total

grpc = pytest.importorskip("grpc")
C = grpc.StatusCode
MICRO = 1_000_000

# the small MLP of conftest (784-64-32-10): three units, priced for
# micro-batches of BATCH rows as test_market_train runs it
SMALL_MLP = ('{"type": "mlp", "inputs": 784, "hidden": [64, 32], "classes": 10, '
             '"activation": "gelu", "dropout": 0.0}')


# the FLOPs each lease member is paid for per step (LeasedProvider.flops_per_step)
FLOPS = {}


STEP_FLOPS = sum(layer_flops(i) for i in range(3))


def lease_of(m, renter, **kw):
    """(job id, lease token, [member provider ids by stage]) of a new lease
    (of SMALL_MLP unless kw says otherwise); FLOPS gets each member's FLOPs
    per step."""
    kw = {"model": SMALL_MLP, "mb_rows": BATCH, "flops": STEP_FLOPS, **kw}
    r = decode(call(m.addr, "AcquireLease", acquire(renter, **kw)))
    members = [decode(p) for p in r[5]]
    for p in members:
        FLOPS[p[1][0]] = p.get(6, [0])[0]
    return r[1][0], r[3][0].decode(), [p[1][0] for p in members]


def pay(m, lease, members, steps):
    """Each step reported with every member's FLOPs as its lease gave them."""
    for step in steps:
        call(m.addr, "ReportUsage", usage(lease, step, [(i, pid, FLOPS[pid]) for i, pid in enumerate(members)]))


def release(m, lease, status="done", step=0):
    call(m.addr, "ReleaseLease", field_bytes(1, lease) + field_bytes(2, status) + field_varint(3, step))


def query(db, sql, *args):
    con = sqlite3.connect(str(db))
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def reversals(db):
    return query(db, "SELECT COUNT(*) FROM ledger WHERE reason = 'reversal' AND amount > 0")[0][0]


def listed(m, token):
    """{provider id: (claimed GFLOP/s, reliability, speed the market estimates or None)} of ListProviders."""
    out = {}
    for p in decode(call(m.addr, "ListProviders", field_bytes(1, token) + field_varint(2, 1))).get(1, []):
        f = decode(p)
        dbl = lambda n: struct.unpack("<d", f[n][0])[0] if n in f else 0.0  # noqa: E731
        claimed = struct.unpack("<d", decode(f[4][0])[1][0])[0]
        out[f[1][0]] = (claimed, dbl(5), dbl(11) if 11 in f else None)  # speed_gflops
    return out


def replace_when_confirmed(m, lease, lost, kept, timeout=60):
    """ReplaceProvider, asked again while the market cannot confirm the loss
    yet (ABORTED: the provider's heartbeats have not stopped)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return decode(call(m.addr, "ReplaceProvider", replace(lease, lost, kept)))
        except grpc.RpcError as e:
            if e.code() != C.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# ---------------------------------------------------------------------------
# The renter sets its own price
# ---------------------------------------------------------------------------

def test_a_step_costs_what_the_lease_fixed_not_what_the_renter_reports(add_account, market, tmp_path):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    m = market(db, "--reach-timeout", "0")
    price = {}
    for tok, port, p in ((alice, 5001, 400 * MICRO), (bob, 5002, 700 * MICRO)):
        price[register(m.addr, tok, f"127.0.0.1:{port}", profile(price=p))[0]] = p
    # the renter's own split: one layer, then two
    _, lease, members = lease_of(m, renter, devices=2, est_steps=200, stage_units=(1, 2))
    before = balances(db)["renter"]

    # 1 FLOP per stage, as the hostile renter reported it: refused, nothing paid
    e = call_error(m.addr, "ReportUsage", usage(lease, 0, [(0, members[0], 1), (1, members[1], 1)]))
    assert e.code() == C.INVALID_ARGUMENT and "the lease's plan, which fixes them" in e.details(), e.details()
    # nor may a report leave a stage out: every stage of a step is paid
    e = call_error(m.addr, "ReportUsage", usage(lease, 0, [(0, members[0], 0)]))
    assert e.code() == C.INVALID_ARGUMENT and "every stage of a step is paid" in e.details(), e.details()
    assert balances(db)["renter"] == before

    # 200 steps: each paid the plan's FLOPs at the leased prices, once
    assert [FLOPS[p] for p in members] == [layer_flops(0), layer_flops(1) + layer_flops(2)]
    per_step = (cost(layer_flops(0), price[members[0]]) +
                cost(layer_flops(1) + layer_flops(2), price[members[1]]))
    assert per_step > 0
    pay(m, lease, members, range(200))
    pay(m, lease, members, range(200))  # again: already paid
    # 0 FLOPs stands for the plan's
    call(m.addr, "ReportUsage", usage(lease, 200, [(0, members[0], 0), (1, members[1], 0)]))
    assert balances(db)["renter"] == before - 201 * per_step
    assert query(db, "SELECT spent FROM jobs") == [(201 * per_step,)]
    assert ledger_total(db) == 0


def test_a_driver_that_sends_no_model_is_refused_with_a_clear_message(add_account, market, tmp_path):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    m = market(db, "--reach-timeout", "0")
    register(m.addr, add_account(db, "alice"), "127.0.0.1:5001")
    e = call_error(m.addr, "AcquireLease", acquire(renter, model=None))
    assert e.code() == C.FAILED_PRECONDITION, e.details()
    assert "prices every step from the model itself" in e.details() and "upgrade arceus" in e.details()
    assert query(db, "SELECT COUNT(*) FROM leases") == [(0,)]


# ---------------------------------------------------------------------------
# The renter claws back everything
# ---------------------------------------------------------------------------

def test_a_healthy_provider_reported_lost_is_not_clawed_back(add_account, market, leased_worker, tmp_path):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    m = market(db, "--offline-after", "3600")
    leased_worker(m, alice, 400 * MICRO)
    leased_worker(m, bob, 700 * MICRO)
    job, lease, members = lease_of(m, renter, devices=2, est_steps=20)
    pay(m, lease, members, range(10))
    books = balances(db)
    spent = query(db, "SELECT spent FROM jobs")
    assert spent[0][0] > 0 and books["renter"] == 100 * MICRO - spent[0][0]

    # both healthy: the market's own Hello reaches them, at any checkpoint
    for lost, kept in ((members[1], 0), (members[0], 5)):
        e = call_error(m.addr, "ReplaceProvider", replace(lease, lost, kept))
        assert e.code() == C.FAILED_PRECONDITION, e.details()
        assert "answered the market's Hello" in e.details() and "nothing was reversed" in e.details()
    assert balances(db) == books
    assert query(db, "SELECT spent FROM jobs") == spent
    assert reversals(db) == 0
    assert query(db, "SELECT COUNT(*) FROM usage WHERE state != 'held'") == [(0,)]
    # still members, still online, reliability untouched; the renter has two false claims
    assert sorted(p for (p,) in query(db, "SELECT provider_id FROM lease_members")) == sorted(members)
    assert query(db, "SELECT COUNT(*) FROM providers WHERE online = 1") == [(2,)]
    assert query(db, "SELECT name, reliability FROM accounts WHERE name IN ('alice', 'bob') ORDER BY name") == \
        [("alice", 0.5), ("bob", 0.5)]
    assert query(db, "SELECT false_claims, confirmed_claims FROM accounts WHERE name = 'renter'") == [(2, 0)]
    # and the lease goes on: the next step is paid as before
    pay(m, lease, members, [10])
    assert ledger_total(db) == 0


def test_a_lost_provider_gives_back_only_what_is_redone_by_another(add_account, market, leased_worker, tmp_path):
    """Provider B really dies after 10 paid steps; the job goes back to its
    checkpoint at 6. Only the steps the replacement redoes (6 and 7) are
    reversed, each as it is paid to the replacement; B's steps 8 and 9 were
    never redone and stay B's."""
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    owners = [add_account(db, n) for n in ("a", "b", "c")]
    # a third of --offline-after without a heartbeat is a stopped heart (2 s)
    m = market(db, "--offline-after", "6", "--escrow-window", "0")
    ws, owner_of = {}, {}
    for i, tok in enumerate(owners):
        w = leased_worker(m, tok, (400 + 100 * i) * MICRO)
        ws[w.id], owner_of[w.id] = w, tok
    # (the workers take a while to start: each beats now, so all are online)
    for pid, tok in owner_of.items():
        call(m.addr, "Heartbeat", heartbeat_request(tok, pid))
    job, lease, members = lease_of(m, renter, devices=2, est_steps=20)
    spare = next(p for p in ws if p not in members)
    pay(m, lease, members, range(10))
    lost = members[1]
    ws[lost].kill()
    # the spare beats, so it is online to take the place
    call(m.addr, "Heartbeat", heartbeat_request(owner_of[spare], spare))
    books = balances(db)
    r = replace_when_confirmed(m, lease, lost, 6)
    took = decode(r[1][0])
    assert took[1] == [spare] and took[6] == [FLOPS[lost]]  # its place, its FLOPs
    FLOPS[spare] = took[6][0]
    assert r.get(2, [0]) == [0] and r[4] == [4]  # nothing reversed now; steps 6-9 contested
    assert balances(db) == books and reversals(db) == 0

    # the redo of steps 6 and 7 by the replacement reverses those two, no more
    pay(m, lease, [members[0], spare], [6, 7])
    assert reversals(db) == 2
    release(m, lease, "done", 8)
    # B keeps steps 0-5 and 8-9 (released at the job's end), C has 6-7
    price = dict(query(db, "SELECT id, price_per_tflop FROM providers"))
    flops = query(db, "SELECT flops FROM usage WHERE stage = 1 LIMIT 1")[0][0]
    each = {p: cost(flops, price[p]) for p in (lost, spare)}
    bal = balances(db)
    name = dict(query(db, "SELECT p.id, a.name FROM providers p JOIN accounts a ON a.id = p.account_id"))
    assert bal[name[lost]] == 8 * each[lost] and bal[name[spare]] == 2 * each[spare]
    assert query(db, "SELECT COUNT(*) FROM usage WHERE state IN ('held', 'contested')") == [(0,)]
    assert ledger_total(db) == 0


# ---------------------------------------------------------------------------
# A finished job resumed from step 0
# ---------------------------------------------------------------------------

def test_a_finished_job_resumed_from_step_0_reverses_nothing(add_account, market, tmp_path):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    m = market(db, "--reach-timeout", "0")
    for i, n in enumerate(("alice", "bob")):
        register(m.addr, add_account(db, n), f"127.0.0.1:{5001 + i}")
    job, lease, members = lease_of(m, renter, devices=2, est_steps=20)
    pay(m, lease, members, range(10))
    release(m, lease, "done", 10)
    books, spent = balances(db), query(db, "SELECT spent FROM jobs")
    assert spent[0][0] > 0 and books["renter"] == 100 * MICRO - spent[0][0]
    assert query(db, "SELECT status, step FROM jobs") == [("done", 10)]

    # a resume the market cannot serve (3 providers, 2 exist): refused, and nothing moved
    e = call_error(m.addr, "AcquireLease", acquire(renter, devices=3, resume_job=job, kept_steps=0))
    assert e.code() in (C.RESOURCE_EXHAUSTED, C.INVALID_ARGUMENT), e.details()
    assert balances(db) == books and reversals(db) == 0
    assert query(db, "SELECT status, step FROM jobs") == [("done", 10)]
    # one it can serve: a new lease on the job, and still nothing reversed
    _, lease2, members2 = lease_of(m, renter, devices=2, resume_job=job, kept_steps=0)
    assert balances(db) == books and reversals(db) == 0
    assert query(db, "SELECT spent FROM jobs") == spent
    release(m, lease2, "done", 10)
    assert ledger_total(db) == 0


# ---------------------------------------------------------------------------
# Reputation: free to wreck, free to reset
# ---------------------------------------------------------------------------

def test_false_loss_claims_cost_the_claimant_not_the_providers(add_account, market, leased_worker, tmp_path):
    db = tmp_path / "market.db"
    poor = add_account(db, "poor", "0.000001")
    m = market(db, "--offline-after", "3600")
    # priced so that the poor renter's lease costs nothing up front
    for n in ("alice", "bob", "carol", "dave"):
        leased_worker(m, add_account(db, n), 1)
    start = {p: rel for p, (_, rel, _) in listed(m, poor).items()}
    refused_at = None
    for rnd in range(10):
        try:
            _, lease, members = lease_of(m, poor, devices=2, est_steps=1)
        except grpc.RpcError as e:
            assert e.code() == C.FAILED_PRECONDITION and "found false" in e.details(), e.details()
            refused_at = rnd
            break
        for lost in members:
            e = call_error(m.addr, "ReplaceProvider", replace(lease, lost, 0))
            assert e.code() == C.FAILED_PRECONDITION, e.details()
        release(m, lease, "cancelled", 0)
    # three false claims, and the account may make no more (the fourth is
    # refused before it is checked), nor lease
    assert refused_at == 2
    assert query(db, "SELECT false_claims FROM accounts WHERE name = 'poor'") == [(3,)]
    # every provider as it was: online, as reliable as before
    after = listed(m, poor)
    assert {p: rel for p, (_, rel, _) in after.items()} == start
    assert query(db, "SELECT COUNT(*) FROM providers WHERE online = 1") == [(4,)]


def test_reliability_belongs_to_the_account_and_a_new_one_starts_below_an_established_one(
        add_account, market, tmp_path):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1000")
    veteran, shady = add_account(db, "veteran"), add_account(db, "shady")
    # no worker checks: a loss is confirmed by stopped heartbeats (2 s here)
    m = market(db, "--reach-timeout", "0", "--offline-after", "6", "--escrow-window", "0")
    vet = register(m.addr, veteran, "127.0.0.1:5001")[0]
    # the veteran earns its record: 60 steps paid by someone else, settled
    _, lease, members = lease_of(m, renter, devices=1, est_steps=60)
    assert members == [vet]
    pay(m, lease, members, range(60))
    release(m, lease, "done", 60)
    rel = {p: r for p, (_, r, _) in listed(m, renter).items()}
    assert rel[vet] > 0.75

    # a newcomer starts below it
    newbie = register(m.addr, add_account(db, "newbie"), "127.0.0.1:5002")[0]
    rel = {p: r for p, (_, r, _) in listed(m, renter).items()}
    assert rel[newbie] == 0.5 < rel[vet]

    # shady's provider is lost (it stops beating): its account pays for it
    bad = register(m.addr, shady, "127.0.0.1:5003")[0]
    call(m.addr, "Heartbeat", heartbeat_request(veteran, vet))
    _, lease, members = lease_of(m, renter, devices=3, est_steps=5)
    assert bad in members
    pay(m, lease, members, range(3))
    replace_when_confirmed(m, lease, bad, 0)
    penalised = {p: r for p, (_, r, _) in listed(m, renter).items()}[bad]
    assert penalised == pytest.approx(0.4)
    # back at the same worker, its address spelled another way: still the account's record
    again = register(m.addr, shady, "localhost:5003")[0]
    assert again != bad
    rel = {p: r for p, (_, r, _) in listed(m, renter).items()}
    assert rel[again] == pytest.approx(0.4) and rel[bad] == pytest.approx(0.4)
    assert ledger_total(db) == 0


# ---------------------------------------------------------------------------
# Claims at price 0
# ---------------------------------------------------------------------------

def progress(lease, step, busy, wall):
    """ReportProgressRequest: one stage's busy time after `step` steps."""
    timing = field_varint(1, 0) + field_double(2, busy) + field_double(3, wall - busy)
    return (field_bytes(1, lease) + field_varint(2, step) + field_varint(3, 100) + field_double(4, 1000.0) +
            field_bytes(5, "samples") + field_double(6, 1.0) + field_double(10, wall) + field_bytes(11, timing))


def test_a_provider_far_slower_than_it_claims_loses_rank(add_account, market, tmp_path):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1000")
    m = market(db, "--reach-timeout", "0", "--offline-after", "3600")
    # the liar claims the most speed the market takes, for nothing
    liar = register(m.addr, add_account(db, "liar"), "127.0.0.1:5001", profile(gflops=1e9, price=0))[0]
    honest = register(m.addr, add_account(db, "honest"), "127.0.0.1:5002",
                      profile(gflops=50.0, price=400 * MICRO))[0]
    _, lease, members = lease_of(m, renter, devices=1, est_steps=40)
    assert members == [liar]  # before anything is observed, the claim is all there is
    pay(m, lease, members, range(20))
    # the renter's driver saw 10 steps of the whole model take 0.5 s of its busy time
    call(m.addr, "ReportProgress", progress(lease, 10, 0.5, 0.55))
    call(m.addr, "ReportProgress", progress(lease, 20, 1.0, 1.1))
    release(m, lease, "done", 20)

    # observed, it is far slower than it claimed: the honest one ranks first
    _, lease, members = lease_of(m, renter, devices=1, est_steps=40)
    assert members == [honest]
    release(m, lease, "cancelled", 0)
    seen = listed(m, renter)
    observed = STEP_FLOPS * 10 / 0.5 / 1e9
    assert seen[liar][2] == pytest.approx(observed, rel=0.25)
    assert seen[honest][2] == pytest.approx(50.0)  # not observed: its claim


def test_a_real_run_observes_the_liar_and_the_next_lease_goes_to_an_honest_provider(
        run_arceus, add_account, market, leased_worker, tmp_path, corpus):
    """The same with real processes: the renter's driver reports each stage's
    busy time as it trains (ReportProgress), and that is what the market
    ranks by next."""
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1000")
    m = market(db, "--offline-after", "3600")
    liar = leased_worker(m, add_account(db, "liar"), 0, gflops=1e9)
    honest = leased_worker(m, add_account(db, "honest"), 400 * MICRO, gflops=50.0)
    args = ("train", "--model", CONFIGS / "gpt-tiny.json", "--data", corpus, "--steps", 200, "--batch", 8,
            "--eval-every", 0, "--threads", 1, "--market", m.addr, "--token", renter, "--devices", 1)
    p = run_arceus(*args, check=True)
    assert f"provider {liar.id} (liar)" in p.stdout, p.stdout
    seen = listed(m, renter)
    assert 0 < seen[liar.id][2] < 1e3, seen  # GFLOP/s observed: nothing like the 1e9 claimed
    p = run_arceus(*args, check=True)
    assert f"provider {honest.id} (honest)" in p.stdout, p.stdout
