"""`--json` on the market's clients (providers, ledger, jobs, job) and
`ledger --summary`: a renter trains through a real market on two leased
workers, then every client's JSON is parsed with json.loads and checked
against the market's own database: field names, types, exact credits. The
field names are the documented ones (`arceus COMMAND --help`)."""

import json
import re
import sqlite3

import pytest

from test_market_train import BATCH, MICRO, STEPS


def credits(micro):
    sign = "-" if micro < 0 else ""
    micro = abs(micro)
    return f"{sign}{micro // MICRO}.{micro % MICRO:06d}"


def rows_of(db, sql, *args):
    con = sqlite3.connect(str(db))
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def test_clients_print_json_that_matches_the_market(
        run_arceus, add_account, market, leased_worker, tmp_path, small_fashion, small_mlp_spec):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    alice = add_account(db, "alice")
    bob = add_account(db, "bob")
    # --escrow-window 0: the providers' pay is released when the job ends
    market = market(db, "--offline-after", "3600", "--escrow-window", "0")
    wa = leased_worker(market, alice, 400 * MICRO)
    wb = leased_worker(market, bob, 700 * MICRO, gflops=80.5)
    cli = ("--market", market.addr, "--token", renter)

    # before any job: empty lists, still JSON
    assert json.loads(run_arceus("jobs", *cli, "--json", check=True).stdout) == {"jobs": []}

    doc = json.loads(run_arceus("providers", *cli, "--json", check=True).stdout)
    assert list(doc) == ["providers"]
    by_id = {p["id"]: p for p in doc["providers"]}
    assert sorted(by_id) == sorted([wa.id, wb.id])
    b = by_id[wb.id]
    assert set(b) == {"id", "account", "address", "gflops", "speed_gflops", "mem_bytes", "cores",
                      "price_per_tflop", "reliability", "online", "last_heartbeat", "worker", "available",
                      "unavailable_why"}
    assert b["account"] == "bob" and b["address"] == wb.addr and b["gflops"] == 80.5
    assert b["mem_bytes"] == 8 << 30 and b["cores"] == 2 and b["price_per_tflop"] == "700.000000"
    # not observed yet: the market's estimate is the claim; a new account's reliability
    assert b["speed_gflops"] == pytest.approx(80.5)
    assert b["online"] is True and b["reliability"] == 0.5 and isinstance(b["last_heartbeat"], int)
    assert b["worker"] in ("unchecked", "reachable", "unreachable")
    assert b["available"] is True and b["unavailable_why"] == ""

    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", STEPS,
                   "--batch", BATCH, "--eval-every", 0, "--plan", "0,1-2", *cli, "--devices", 2)
    assert p.returncode == 0, p.stderr[-3000:]
    job_id = int(re.search(r"job (\d+)", p.stdout).group(1))

    # jobs and job
    (spent, created, spec), = rows_of(db, "SELECT spent, created, spec FROM jobs WHERE id = ?", job_id)
    jobs = json.loads(run_arceus("jobs", *cli, "--json", check=True).stdout)["jobs"]
    assert jobs == [{"id": job_id, "status": "done", "step": STEPS, "spent": credits(spent),
                     "max_credits": None, "created": created, "spec": spec}]
    doc = json.loads(run_arceus("job", job_id, *cli, "--json", check=True).stdout)
    assert doc["job"] == jobs[0]
    losses = rows_of(db, "SELECT step, loss FROM job_progress WHERE job_id = ? ORDER BY step", job_id)
    assert [(x["step"], x["loss"]) for x in doc["loss"]] == [(s + 1, pytest.approx(v, rel=1e-12)) for s, v in losses]

    # ledgers: every row, and the totals by reason
    for token, name in ((renter, "renter"), (alice, "alice"), (bob, "bob")):
        (acct,), = rows_of(db, "SELECT id FROM accounts WHERE name = ?", name)
        want = rows_of(db, "SELECT id, transfer_id, created, reason, job_id, step, amount FROM ledger "
                           "WHERE account_id = ? ORDER BY id", acct)
        doc = json.loads(run_arceus("ledger", "--market", market.addr, "--token", token, "--json",
                                    check=True).stdout)
        assert doc["account"] == name and doc["rows_total"] == len(want)
        assert [(r["id"], r["transfer"], r["time"], r["reason"], r["job"], r["step"], r["amount"])
                for r in doc["rows"]] == [
            (i, t, c, reason, j or None, s if s is not None and s >= 0 else None, credits(a))
            for i, t, c, reason, j, s, a in want]
        total = sum(a for *_, a in want)
        assert doc["balance"] == credits(total)
        assert doc["pending"] == "0.000000"  # the job is done and the settling window 0
        by_reason = {}
        for *_, reason, _, _, a in want:
            n, c = by_reason.get(reason, (0, 0))
            by_reason[reason] = (n + 1, c + a)
        assert doc["by_reason"] == {r: {"rows": n, "credits": credits(c)} for r, (n, c) in by_reason.items()}

        summary = json.loads(run_arceus("ledger", "--market", market.addr, "--token", token, "--json",
                                        "--summary", check=True).stdout)
        assert "rows" not in summary and summary["by_reason"] == doc["by_reason"]
        text = run_arceus("ledger", "--market", market.addr, "--token", token, "--summary", check=True).stdout
        lines = text.splitlines()
        assert lines[0] == f"ledger of {name}: {len(want)} rows", text
        for r, (n, c) in by_reason.items():
            sign = "+" if c >= 0 else ""
            assert re.search(rf"^  {r}\s+{n}\s+{re.escape(sign + credits(c))}$", text, re.M), text
        assert lines[-2] == f"balance: {credits(total)} credits"
        assert lines[-1] == "pending: 0.000000 credits (held in escrow)"
        assert len(lines) == 4 + len(by_reason)
    # bob's one stage: each step's pay released to it from escrow when the job ended
    assert "release" in doc["by_reason"] and doc["by_reason"]["release"]["rows"] == STEPS

    # bad usage is still refused with one line, nothing on stdout
    p = run_arceus("jobs", *cli, "--json=yes")
    assert p.returncode == 2 and p.stdout == "" and "takes no value" in p.stderr
