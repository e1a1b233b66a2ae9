"""`arceus jobs` and `arceus job ID`: a renter trains through a real
market on two leased `arceus worker` processes; the driver reports each
step's loss with its usage, and the renter lists its jobs and reads one job's
status, step, credits spent and loss curve (a text sparkline). Another
account's job is refused; an unknown one is not found."""

import re
import sqlite3

from test_market_train import BATCH, MICRO, STEPS

SPARK = "▁▂▃▄▅▆▇█"


def test_jobs_and_job_show_status_spent_and_the_loss_curve(
        run_arceus, add_account, market, leased_worker, tmp_path, small_fashion, small_mlp_spec):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    other = add_account(db, "other", "5")
    alice = add_account(db, "alice")
    bob = add_account(db, "bob")
    market = market(db, "--offline-after", "3600")
    leased_worker(market, alice, 400 * MICRO)
    leased_worker(market, bob, 700 * MICRO)

    cli = ("--market", market.addr, "--token", renter)
    p = run_arceus("jobs", *cli, check=True)
    assert p.stdout.strip() == "no jobs"

    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", STEPS,
                   "--batch", BATCH, "--eval-every", 0, "--plan", "0,1-2", *cli, "--devices", 2)
    assert p.returncode == 0, p.stderr[-3000:]
    job_id = int(re.search(r"job (\d+)", p.stdout).group(1))

    con = sqlite3.connect(str(db))
    try:
        spent = con.execute("SELECT spent FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        losses = con.execute("SELECT step, loss FROM job_progress WHERE job_id = ? ORDER BY step",
                             (job_id,)).fetchall()
    finally:
        con.close()
    assert [s for s, _ in losses] == list(range(STEPS))
    assert all(0 < x < 10 for _, x in losses)
    spent_text = f"{spent // MICRO}.{spent % MICRO:06d}"

    p = run_arceus("jobs", *cli, check=True)
    lines = p.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATUS", "STEP", "CREDITS"], p.stdout
    row = lines[1].split()
    assert row[:4] == [str(job_id), "done", str(STEPS), spent_text], p.stdout
    assert re.match(r"\d{4}-\d\d-\d\d", row[4]), p.stdout

    p = run_arceus("job", job_id, *cli, check=True)
    out = p.stdout
    assert re.search(r"status:\s+done", out), out
    assert re.search(rf"step:\s+{STEPS}\b", out), out
    assert f"spent:    {spent_text} credits" in out, out
    curve = re.search(r"curve:\s+(\S+)", out).group(1)
    assert len(curve) == STEPS and set(curve) <= set(SPARK), out
    # the highest loss gets the tallest bar, the lowest the shortest
    values = [x for _, x in losses]
    assert curve[values.index(max(values))] == "█" and curve[values.index(min(values))] == "▁", out
    assert f"{values[0]:.4f}" in out and f"{values[-1]:.4f}" in out, out

    # another account's job is refused, an unknown one is not found
    p = run_arceus("job", job_id, "--market", market.addr, "--token", other)
    assert p.returncode == 1 and "belongs to another account" in p.stderr, p.stderr
    p = run_arceus("jobs", "--market", market.addr, "--token", other, check=True)
    assert p.stdout.strip() == "no jobs"
    p = run_arceus("job", 999, *cli)
    assert p.returncode == 1 and "no job 999" in p.stderr, p.stderr
    p = run_arceus("job", "x1", *cli)
    assert p.returncode == 2 and "expects a job id" in p.stderr, p.stderr
