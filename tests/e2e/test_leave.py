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

from conftest import SANITIZER_MARKERS, query, read_log
from test_market_train import MICRO, balances, ledger_total

grpc = pytest.importorskip("grpc")

STEPS = 160
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
