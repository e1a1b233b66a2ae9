"""What a tensor-parallel group moves: the leader counts the frame
bytes it exchanges with its members other than its own share, the driver
prints them per step next to the planner's prediction, and the two agree,
for GPT blocks and an MLP's pairs of layers, in-process and over worker
processes, with evaluations between the steps (which are not training
traffic and are not counted)."""

import re

from conftest import CONFIGS
from test_workers import addrs

GPT = CONFIGS / "gpt-tiny.json"
RUN = ("--steps", "6", "--batch", "8", "--micro-batches", "4", "--eval-every", "2",
       "--eval-batches", "1", "--threads", "1")


def _traffic(stdout):
    """{stage: (measured MB, predicted MB)} from the driver's last lines."""
    return {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"stage (\d+) tensor-parallel traffic: ([\d.]+) MB per step \(predicted ([\d.]+) MB\)", stdout)}


def test_in_process_group_moves_what_the_plan_predicts(run_arceus, corpus):
    p = run_arceus("train", "--model", GPT, "--data", corpus, *RUN, "--workers", "local:2",
                   "--plan", "0-3@0+1", check=True)
    assert "tensor-parallel transfer" in p.stdout, p.stdout
    t = _traffic(p.stdout)
    assert list(t) == [0], p.stdout
    measured, predicted = t[0]
    assert predicted > 0.1, p.stdout
    assert abs(measured / predicted - 1) < 0.01, p.stdout


def test_worker_group_moves_what_the_plan_predicts(run_arceus, workers, corpus):
    ws = workers(3)
    p = run_arceus("train", "--model", GPT, "--data", corpus, *RUN, "--workers", addrs(ws),
                   "--plan", "0-1@0+1,2-3@2", check=True)
    t = _traffic(p.stdout)
    assert list(t) == [0], "only the group reports traffic:\n" + p.stdout
    measured, predicted = t[0]
    assert predicted > 0.01, p.stdout
    assert abs(measured / predicted - 1) < 0.01, p.stdout


def test_mlp_group_moves_what_the_plan_predicts(run_arceus, small_mlp_spec, small_fashion):
    """An MLP's group splits its linear layers in pairs: 0-1 over the two
    devices, layer 2 whole with the leader."""
    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", "4", "--batch", "32",
                   "--micro-batches", "4", "--eval-every", "2", "--threads", "1", "--workers", "local:2",
                   "--plan", "0-2@0+1", check=True)
    measured, predicted = _traffic(p.stdout)[0]
    assert predicted > 0.1, p.stdout
    assert abs(measured / predicted - 1) < 0.01, p.stdout
