"""Tensor parallelism in-process: a GPT block's heads and MLP units
split over a group of ranks (`--plan "0-3@0+1"` with `--workers local:N`), and
an MLP model's linear layers in pairs (the first by output columns, the
second by input rows), alone and combined with a pipeline, train like one
device: every step's loss within 1e-5 (relative) and the final weights
within 1e-5.

The one exception is the key bias of the attention: softmax ignores a shift
common to every key, so its gradient is pure rounding noise, which AdamW
turns into steps of +-lr whatever its size. It does not change the model's
output, and it is left out of the weight comparison."""

import json
import sys

import pytest

from conftest import CONFIGS, REPO, read_log

sys.path.insert(0, str(REPO / "tests" / "ref"))
import refmodels  # noqa: E402

RUN = ("--steps", "20", "--batch", "8", "--micro-batches", "4", "--eval-every", "0",
       "--eval-batches", "1", "--threads", "1")


def _losses(log):
    return [r["loss"] for r in read_log(log) if "loss" in r and "val_loss" not in r]


def _weights_close(a, b, C):
    ta, _ = refmodels.load_safetensors(a)
    tb, _ = refmodels.load_safetensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        x, y = ta[name].double(), tb[name].double()
        if name.endswith("attn.c_attn.bias"):  # drop the key bias (see above)
            x = x[list(range(C)) + list(range(2 * C, 3 * C))]
            y = y[list(range(C)) + list(range(2 * C, 3 * C))]
        d = (x - y).abs().max().item()
        assert d <= 1e-5, (name, d)


@pytest.mark.parametrize("workers,plan", [
    ("local:2", "0-3@0+1"),              # one stage, a group of 2
    ("local:3", "0-3@0+1+2"),            # a group of 3: 8 heads as 3+3+2
    ("local:3", "0-1@0+1,2-3@2"),        # a group of 2, then a pipeline stage
])
def test_tensor_parallel_matches_one_device(run_arceus, tmp_path, corpus, workers, plan):
    args = ("--model", CONFIGS / "gpt-tiny.json", "--data", corpus, *RUN)
    run_arceus("train", *args, "--out", tmp_path / "one", "--log", tmp_path / "one.jsonl", check=True)
    p = run_arceus("train", *args, "--workers", workers, "--plan", plan, "--out", tmp_path / "tp",
                   "--log", tmp_path / "tp.jsonl", check=True)
    assert "heads" in p.stdout and "hidden units" in p.stdout, p.stdout  # the printed plan
    one, tp = _losses(tmp_path / "one.jsonl"), _losses(tmp_path / "tp.jsonl")
    assert len(one) == len(tp) == 20
    for s, (a, b) in enumerate(zip(one, tp)):
        assert abs(a - b) <= 1e-5 * abs(a), (s, a, b)
    _weights_close(tmp_path / "one" / "model.safetensors", tmp_path / "tp" / "model.safetensors", 32)


MLP_RUN = ("--steps", "20", "--batch", "32", "--micro-batches", "4", "--eval-every", "10",
           "--threads", "1", "--lr", "0.01")


@pytest.fixture(scope="session")
def mlp4_relu(tmp_path_factory):
    """Four linear layers with ReLU: two pairs to split (784-48-32-16-10)."""
    path = tmp_path_factory.mktemp("spec") / "mlp4.json"
    path.write_text(json.dumps({"type": "mlp", "inputs": 784, "hidden": [48, 32, 16], "classes": 10,
                                "activation": "relu", "dropout": 0.0}))
    return path


def mlp_matches_one_device(run_arceus, tmp_path, model, data, workers, plan):
    """Train on one device and as planned: losses and weights within 1e-5."""
    args = ("--model", model, "--data", data, *MLP_RUN)
    run_arceus("train", *args, "--out", tmp_path / "one", "--log", tmp_path / "one.jsonl", check=True)
    p = run_arceus("train", *args, "--workers", workers, "--plan", plan, "--out", tmp_path / "tp",
                   "--log", tmp_path / "tp.jsonl", check=True)
    one, tp = _losses(tmp_path / "one.jsonl"), _losses(tmp_path / "tp.jsonl")
    assert len(one) == len(tp) == 20
    for s, (a, b) in enumerate(zip(one, tp)):
        assert abs(a - b) <= 1e-5 * abs(a), (s, a, b)
    _weights_close(tmp_path / "one" / "model.safetensors", tmp_path / "tp" / "model.safetensors", 0)
    return p


@pytest.mark.parametrize("workers,plan", [
    ("local:2", "0-2@0+1"),           # the pair 0-1 on 2 ranks, layer 2 whole with the leader
    ("local:3", "0-2@0+1+2"),         # 64 hidden units as 22+21+21
    ("local:3", "0-1@0+1,2-2@2"),     # a group, then a pipeline stage
])
def test_mlp_tensor_parallel_matches_one_device(run_arceus, tmp_path, small_mlp_spec, small_fashion,
                                                workers, plan):
    p = mlp_matches_one_device(run_arceus, tmp_path, small_mlp_spec, small_fashion, workers, plan)
    assert "hidden units" in p.stdout, p.stdout


def test_mlp_two_pairs_relu(run_arceus, tmp_path, mlp4_relu, small_fashion):
    mlp_matches_one_device(run_arceus, tmp_path, mlp4_relu, small_fashion, "local:3", "0-3@0+1+2")


def test_tensor_parallel_checkpoint_resumes_on_one_device_and_back(run_arceus, tmp_path, corpus):
    args = ("--model", CONFIGS / "gpt-tiny.json", "--data", corpus, *RUN)
    run_arceus("train", *args, "--out", tmp_path / "one", check=True)
    # trained split over a group, resumed on one device
    run_arceus("train", *args, "--workers", "local:2", "--plan", "0-3@0+1", "--stop-after", "10",
               "--out", tmp_path / "a", check=True)
    run_arceus("train", "--resume", tmp_path / "a", "--data", corpus, "--threads", "1",
               "--eval-batches", "1", check=True)
    _weights_close(tmp_path / "one" / "model.safetensors", tmp_path / "a" / "model.safetensors", 32)
    # and the reverse
    run_arceus("train", *args, "--stop-after", "10", "--out", tmp_path / "b", check=True)
    run_arceus("train", "--resume", tmp_path / "b", "--data", corpus, "--threads", "1",
               "--eval-batches", "1", "--workers", "local:4", "--plan", "0-1@0+1+2,2-3@3", check=True)
    _weights_close(tmp_path / "one" / "model.safetensors", tmp_path / "b" / "model.safetensors", 32)


def test_bad_group_plans(run_arceus, tmp_path, corpus, small_mlp_spec, small_fashion):
    def err(*extra, data=corpus, model=CONFIGS / "gpt-tiny.json"):
        p = run_arceus("train", "--model", model, "--data", data, "--steps", "1", *extra)
        assert p.returncode != 0
        return p.stderr.strip().splitlines()[-1]
    assert "used twice" in err("--workers", "local:2", "--plan", "0-3@0+0")
    assert "no device" in err("--workers", "local:2", "--plan", "0-3@0+5")
    assert "no transformer block" in err("--workers", "local:3", "--plan", "0-0@0+1,1-3@2")
    assert "no pair of linear layers" in err("--workers", "local:3", "--plan", "0-1,2-2@1+2",
                                             data=small_fashion, model=small_mlp_spec)
