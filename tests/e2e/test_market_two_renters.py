"""Two renters at once: a market, three `arceus provide` processes and two
renters training at the same time, on a real SQLite file in tmp_path.

A provider's worker hosts one stage at a time, so the market leases each
provider to one live job at a time. With three providers, two renters asking
for two devices each cannot both be served at once: renter A asks for
--devices 2 and renter B for --devices 1, which together take all three
providers. Afterwards, all three are free again for one renter.

Both jobs finish; each provider earns, for every step of the job it was
leased to, its stage's FLOPs (known from the plan) times its price, rounded
per stage and step as ar_store_cost rounds (test_market_train.cost); every
renter is debited what its providers earned; the ledger sums to zero and
every balance equals the sum of its ledger rows.
"""

import re

from conftest import query
from test_market_train import cost

MICRO = 1_000_000
BATCH, STEPS = 64, 40
# the small MLP of conftest: 784-64-32-10; forward 2*B*in*out per linear,
# backward twice that (ar_plan_unit_costs)
LAYERS = [(784, 64), (64, 32), (32, 10)]


def layer_flops(i):
    fin, fout = LAYERS[i]
    return 3 * 2 * BATCH * fin * fout


def micro(price):
    """A price as provide prints it ("0.500000") -> micro-credits per TFLOP."""
    whole, frac = price.split(".")
    return int(whole) * MICRO + int(frac)


def test_three_providers_two_renters_at_once_are_paid_their_flops(
        run_arceus, add_account, procs, tmp_path, small_mlp_spec, small_fashion):
    db = tmp_path / "market.db"
    owners = ["alice", "bob", "carol"]
    tokens = {name: add_account(db, name) for name in owners}
    renter_a = add_account(db, "renter-a", "1000")
    renter_b = add_account(db, "renter-b", "1000")
    # --escrow-window 0: each job's pay is its providers' to spend when it ends
    market = procs.market(db, "--escrow-window", "0")
    prices = {"alice": "400", "bob": "550", "carol": "700"}
    providers = {}
    for name in owners:
        p = procs.provider(market, tokens[name], "--price", prices[name], name=f"provide-{name}")
        providers[p.id] = (name, micro(p.price))
        assert micro(p.price) == int(prices[name]) * MICRO

    base = ("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", STEPS,
            "--batch", BATCH, "--eval-every", 0, "--threads", 1, "--market", market.addr)
    # started together; each waits for its own lease, then both train at once
    a = procs.start("renter-a", *base, "--token", renter_a, "--devices", 2, "--plan", "0,1-2")
    b = procs.start("renter-b", *base, "--token", renter_b, "--devices", 1)
    for r in (a, b):
        rc = r.wait(timeout=300)
        assert rc == 0, f"{r.name} exited {rc}\nstdout:\n{r.out()[-3000:]}\nstderr:\n{r.err()[-3000:]}"
        assert re.search(r"lease \d+ released: job \d+ done", r.out()), r.out()

    # the two jobs, which renter each belongs to, and both done after STEPS steps
    jobs = {renter: (job, status, step, spent) for job, renter, status, step, spent in query(
        db, "SELECT j.id, a.name, j.status, j.step, j.spent FROM jobs j JOIN accounts a ON a.id = j.renter_id")}
    assert set(jobs) == {"renter-a", "renter-b"}, jobs
    assert all(st == "done" and step == STEPS for _, st, step, _ in jobs.values()), jobs
    job_a, job_b = jobs["renter-a"][0], jobs["renter-b"][0]

    # each job's stages and the FLOPs each executes per step, from the plan
    stage_flops = {job_a: [layer_flops(0), layer_flops(1) + layer_flops(2)],
                   job_b: [layer_flops(0) + layer_flops(1) + layer_flops(2)]}
    members = {}
    for job, stage, pid in query(db, "SELECT l.job_id, m.stage, m.provider_id FROM lease_members m "
                                     "JOIN leases l ON l.id = m.lease_id"):
        members[(job, stage)] = pid
    assert sorted(members) == sorted([(job_a, 0), (job_a, 1), (job_b, 0)]), members
    # the two jobs ran on disjoint providers, all three of them
    assert sorted(members.values()) == sorted(providers), (members, providers)

    # usage: one row per job, step and stage, by the leased provider, with the plan's FLOPs
    usage = query(db, "SELECT job_id, step, stage, provider_id, flops, amount FROM usage "
                      "ORDER BY job_id, step, stage")
    expected = [(job, s, st, members[(job, st)], fl, cost(fl, providers[members[(job, st)]][1]))
                for job in sorted(stage_flops) for s in range(STEPS)
                for st, fl in enumerate(stage_flops[job])]
    assert usage == expected

    # each provider earned its stages' FLOPs times its price, over every step of its job
    balances = dict(query(db, "SELECT name, balance FROM accounts"))
    paid = {job: 0 for job in stage_flops}
    for (job, stage), pid in members.items():
        name, price = providers[pid]
        earned = cost(stage_flops[job][stage], price) * STEPS
        assert earned > 0
        assert balances[name] == earned, (name, balances[name], earned)
        paid[job] += earned
    # and each renter paid exactly what its providers earned
    assert balances["renter-a"] == 1000 * MICRO - paid[job_a]
    assert balances["renter-b"] == 1000 * MICRO - paid[job_b]
    assert jobs["renter-a"][3] == paid[job_a] and jobs["renter-b"][3] == paid[job_b]

    # double entry: the ledger sums to zero, every balance is the sum of its rows
    assert query(db, "SELECT COALESCE(SUM(amount), 0) FROM ledger") == [(0,)]
    rows = dict(query(db, "SELECT account_id, SUM(amount) FROM ledger GROUP BY account_id"))
    for acc, balance in query(db, "SELECT id, balance FROM accounts"):
        assert balance == rows.get(acc, 0), (acc, balance, rows.get(acc, 0))
    # every transfer is two rows that cancel
    assert query(db, "SELECT transfer_id FROM ledger GROUP BY transfer_id "
                     "HAVING COUNT(*) != 2 OR SUM(amount) != 0") == []

    # the two leases were live at the same time (unix seconds), and are released now
    (c1, r1), (c2, r2) = query(db, "SELECT created, released FROM leases ORDER BY id")
    assert r1 is not None and r2 is not None
    assert c1 <= r2 and c2 <= r1, ((c1, r1), (c2, r2))
    # all three providers are free again for the next renter

    again = run_arceus(*base, "--token", renter_b, "--devices", 3, "--steps", 1, check=True)
    assert re.search(r"lease \d+ released: job \d+ done", again.stdout), again.stdout
