"""Tensor parallelism over worker processes: a group of
`arceus worker`s on 127.0.0.1 shares a stage's GPT blocks by heads and MLP
hidden units (`--plan "0-3@0+1"`), alone and combined with a pipeline, and
trains like one device: every step's loss within 1e-5 (relative), final
weights within 1e-5 (the attention's key bias aside: see
test_tensor_parallel.py). Checkpoints move between a group and one device
both ways, each worker holds only its share, and a member that dies is
named by the driver."""

import re

import pytest

from conftest import CONFIGS
from test_tensor_parallel import MLP_RUN, RUN, _losses, _weights_close, mlp_matches_one_device
from test_workers import addrs, kill_mid_run

GPT = CONFIGS / "gpt-tiny.json"  # 8 heads, 32 wide: 128 hidden units per block


@pytest.mark.parametrize("n,plan", [
    (2, "0-3@0+1"),            # one stage on a group of 2
    (3, "0-3@0+1+2"),          # a group of 3: 8 heads as 3+3+2, 128 units as 43+43+42
    (3, "0-1@0+1,2-3@2"),      # a group of 2, then a plain pipeline stage
    (3, "0-1@2,2-3@0+1~speed"),  # a plain stage, then a group holding the head, split by speed
])
def test_group_of_workers_matches_one_device(run_arceus, workers, tmp_path, corpus, n, plan):
    args = ("--model", GPT, "--data", corpus, *RUN)
    run_arceus("train", *args, "--out", tmp_path / "one", "--log", tmp_path / "one.jsonl", check=True)
    ws = workers(n)
    p = run_arceus("train", *args, "--workers", addrs(ws), "--plan", plan, "--out", tmp_path / "tp",
                   "--log", tmp_path / "tp.jsonl", check=True)
    assert "heads" in p.stdout and "parameters held" in p.stdout, p.stdout
    one, tp = _losses(tmp_path / "one.jsonl"), _losses(tmp_path / "tp.jsonl")
    assert len(one) == len(tp) == 20
    for s, (a, b) in enumerate(zip(one, tp)):
        assert abs(a - b) <= 1e-5 * abs(a), (s, a, b)
    _weights_close(tmp_path / "one" / "model.safetensors", tmp_path / "tp" / "model.safetensors", 32)


@pytest.mark.parametrize("n,plan", [
    (2, "0-2@0+1"),            # an MLP's first two linear layers on a group of 2
    (3, "0-2@0+1+2"),          # 64 hidden units as 22+21+21
    (3, "0-1@0+1,2-2@2"),      # a group, then a plain pipeline stage
])
def test_mlp_group_of_workers_matches_one_device(run_arceus, workers, tmp_path, small_mlp_spec,
                                                 small_fashion, n, plan):
    ws = workers(n)
    p = mlp_matches_one_device(run_arceus, tmp_path, small_mlp_spec, small_fashion, addrs(ws), plan)
    held = _held(p.stdout)
    assert len(held) == plan.count("+") + 1, p.stdout  # the group's members
    # 784-64-32-10: each rank holds its units' rows of layer 0 (and bias) and columns of layer 1
    if n == 2:
        assert held[ws[1].addr] == 32 * (784 + 1) + 32 * 32, held


def test_mlp_group_checkpoint_resumes_on_one_device(run_arceus, workers, tmp_path, small_mlp_spec,
                                                    small_fashion):
    args = ("--model", small_mlp_spec, "--data", small_fashion, *MLP_RUN)
    run_arceus("train", *args, "--out", tmp_path / "one", check=True)
    ws = workers(2)
    run_arceus("train", *args, "--workers", addrs(ws), "--plan", "0-2@0+1", "--stop-after", "10",
               "--out", tmp_path / "a", check=True)
    run_arceus("train", "--resume", tmp_path / "a", "--data", small_fashion, "--threads", "1", check=True)
    _weights_close(tmp_path / "one" / "model.safetensors", tmp_path / "a" / "model.safetensors", 0)


def _held(stdout):
    """{address: parameters held} from the driver's group lines."""
    return {m.group(1): int(m.group(2)) for m in
            re.finditer(r"^stage \d+ (?:leader|rank)\s+(\S+): .*?, (\d+) parameters held$", stdout, re.M)}


def test_each_worker_holds_only_its_share(run_arceus, workers, tmp_path, corpus):
    """A group of 3 over all of gpt-tiny (2 blocks of 8 heads, 128 hidden
    units): each rank holds exactly its heads' and units' slices; the leader
    holds the unsplit parts (embeddings, LayerNorms, projection biases,
    final norm) and its own share; nothing is held twice. The optimizer
    state (m, v) follows the parameters one for one."""
    ws = workers(3)
    p = run_arceus("train", "--model", GPT, "--data", corpus, *RUN, "--steps", "2", "--workers",
                   addrs(ws), "--plan", "0-3@0+1+2", check=True)
    held = _held(p.stdout)
    assert len(held) == 3, p.stdout
    total = int(re.search(r"^model: gpt, (\d+) parameters", p.stdout, re.M).group(1))
    assert sum(held.values()) == total, (held, total)  # nothing held twice, nothing missing
    C, blocks, hd = 32, 2, 4  # width, blocks, head size

    def share(heads, units):  # QKV rows + bias + projection columns; MLP rows + bias + columns
        return blocks * (heads * hd * (3 * C + 3 + C) + units * (2 * C + 1))

    # 8 heads as 3+3+2, 128 hidden units as 43+43+42
    r1, r2, leader = held[ws[1].addr], held[ws[2].addr], held[ws[0].addr]
    assert r1 == share(3, 43) and r2 == share(2, 42), held
    assert leader == total - share(8, 128) + share(3, 43), held
    print(f"\nparameters held of {total}: leader {leader}, ranks {r1} and {r2}")


def test_group_checkpoint_resumes_on_one_device_and_back(run_arceus, workers, tmp_path, corpus):
    """Save from a group gathers whole tensors; Restore scatters them."""
    args = ("--model", GPT, "--data", corpus, *RUN)
    run_arceus("train", *args, "--out", tmp_path / "one", check=True)
    ws = workers(3)
    run_arceus("train", *args, "--workers", addrs(ws), "--plan", "0-1@0+1,2-3@2", "--stop-after", "10",
               "--out", tmp_path / "a", check=True)
    run_arceus("train", "--resume", tmp_path / "a", "--data", corpus, "--threads", "1",
               "--eval-batches", "1", check=True)
    _weights_close(tmp_path / "one" / "model.safetensors", tmp_path / "a" / "model.safetensors", 32)
    # and the reverse: one device, then a group of fresh workers
    run_arceus("train", *args, "--stop-after", "10", "--out", tmp_path / "b", check=True)
    ws2 = workers(2)
    run_arceus("train", "--resume", tmp_path / "b", "--data", corpus, "--threads", "1",
               "--eval-batches", "1", "--workers", addrs(ws2), "--plan", "0-3@0+1", check=True)
    _weights_close(tmp_path / "one" / "model.safetensors", tmp_path / "b" / "model.safetensors", 32)


def test_dead_member_is_named_and_the_driver_stops(arceus_bin, workers, tmp_path, corpus):
    ws = workers(3)
    out, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    cmd = [str(arceus_bin), "train", "--model", str(GPT), "--data", str(corpus), "--steps", "100000",
           "--batch", "8", "--micro-batches", "4", "--eval-every", "0", "--threads", "1",
           "--workers", addrs(ws), "--plan", "0-1@0+1,2-3@2", "--out", str(out), "--log", str(log)]
    returncode, err = kill_mid_run(cmd, log, ws[1])  # the group's rank
    assert returncode > 0, err[-3000:]
    assert f"tensor-parallel rank 2 ({ws[1].addr})" in err, err[-3000:]
    assert not (out / "state.json").exists(), "a checkpoint was written for a failed run"
    # the leader and the last stage keep serving: they exit 0 on SIGTERM (teardown)


def test_group_refusals(run_arceus, workers, corpus):
    ws = workers(2)
    p = run_arceus("train", "--model", GPT, "--data", corpus, "--steps", "1", "--workers", addrs(ws),
                   "--plan", "0-0@0+1,1-3@0")
    assert p.returncode != 0 and "used twice" in p.stderr, p.stderr
