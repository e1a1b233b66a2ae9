"""Checkpoints written by `arceus train` load in PyTorch (tests/ref/refmodels.py)
and give the loss `arceus eval` reports on the same data."""

import json

import numpy as np
import pytest
import torch

import refmodels
from conftest import read_idx, read_log

REL_TOL = 1e-5


def _load(out):
    spec = json.loads((out / "spec.json").read_text())
    tensors, _meta = refmodels.load_safetensors(out / "model.safetensors")
    model_spec = {k: v for k, v in spec.items() if k != "vocab"}
    model = refmodels.build_model(model_spec)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, spec, tensors


def _eval(run_arceus, *args):
    p = run_arceus("eval", *args, check=True)
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, p.stdout
    r = json.loads(lines[0])
    assert set(r) >= {"loss", "accuracy", "count"}, r
    return r


def _close(a, b):
    return abs(a - b) <= REL_TOL * abs(b)


def _lm_batches(corpus, vocab, block_size, batches, batch):
    data = corpus.read_bytes()
    index = {b: i for i, b in enumerate(vocab)}
    tokens = np.array([index[b] for b in data], dtype=np.int64)
    train_count = len(tokens) * 9 // 10
    T = block_size
    xs, ys = [], []
    for i in range(batches * batch):
        s = train_count + i * T
        assert s + T + 1 <= len(tokens), "corpus too short for the requested windows"
        xs.append(tokens[s:s + T])
        ys.append(tokens[s + 1:s + T + 1])
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def test_gpt_checkpoint_in_torch(run_arceus, gpt_run, corpus):
    out = gpt_run["out"]
    model, spec, tensors = _load(out)
    assert spec["vocab"] == sorted(set(corpus.read_bytes()))
    # every parameter is in the file and nothing else (tied head: no lm_head)
    assert set(tensors) == set(dict(model.named_parameters()))
    batches, batch = 2, 4
    r = _eval(run_arceus, "--ckpt", out, "--data", corpus, "--batches", batches,
              "--batch", batch)
    x, y = _lm_batches(corpus, spec["vocab"], spec["block_size"], batches, batch)
    with torch.no_grad():
        logits = model(x)
        loss = float(refmodels.loss_fn(logits, y))
        acc = float((logits.argmax(-1) == y).float().mean())
    assert r["count"] == batches * batch * spec["block_size"], r
    assert _close(r["loss"], loss), (r["loss"], loss)
    assert abs(r["accuracy"] - acc) <= 1.0 / r["count"] + 1e-6, (r["accuracy"], acc)


def test_gpt_eval_whole_split(run_arceus, gpt_run, corpus):
    """--batches 0 reads every whole window of the validation split."""
    out = gpt_run["out"]
    model, spec, _ = _load(out)
    T = spec["block_size"]
    n = len(corpus.read_bytes())
    val = n - n * 9 // 10
    windows = (val - 1) // T
    r = _eval(run_arceus, "--ckpt", out, "--data", corpus, "--batches", 0, "--batch", 4)
    assert r["count"] == windows * T, (r, windows)
    x, y = _lm_batches(corpus, spec["vocab"], T, windows, 1)
    with torch.no_grad():
        loss = float(refmodels.loss_fn(model(x), y))
    assert _close(r["loss"], loss), (r["loss"], loss)


def _fashion_test(fashion_dir, n):
    dims, images = read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
    _, labels = read_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz")
    px = dims[1] * dims[2]
    x = np.frombuffer(images[:n * px], dtype=np.uint8).reshape(n, px).astype(np.float32) / 255
    y = np.frombuffer(labels[:n], dtype=np.uint8).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("batches,batch", [(2, 4), (3, 50)])
def test_mlp_checkpoint_in_torch(run_arceus, mlp_run, fashion_dir, batches, batch):
    out = mlp_run["out"]
    model, spec, tensors = _load(out)
    assert set(tensors) == set(dict(model.named_parameters()))
    r = _eval(run_arceus, "--ckpt", out, "--data", fashion_dir, "--batches", batches,
              "--batch", batch)
    x, y = _fashion_test(fashion_dir, batches * batch)
    with torch.no_grad():
        logits = model(x)
        loss = float(refmodels.loss_fn(logits, y))
        acc = float((logits.argmax(-1) == y).float().mean())
    assert r["count"] == batches * batch, r
    assert _close(r["loss"], loss), (r["loss"], loss)
    assert abs(r["accuracy"] - acc) < 1e-6, (r["accuracy"], acc)


def test_mlp_eval_default_data_matches_training_summary(run_arceus, mlp_run):
    """eval with the default data set and the whole split reproduces the final
    evaluation of the training run."""
    log = [r for r in read_log(mlp_run["log"]) if "val_loss" in r]
    r = _eval(run_arceus, "--ckpt", mlp_run["out"], "--batches", 0, "--batch", 1000)
    assert r["count"] == 10000
    assert abs(r["accuracy"] - log[-1]["accuracy"]) < 1e-6
    assert abs(r["loss"] - log[-1]["val_loss"]) <= 1e-5 * abs(r["loss"]) + 1e-6


def test_optimizer_state_shapes(mlp_run):
    """optimizer.safetensors holds the AdamW moments m.NAME and v.NAME, shaped
    like the parameters; second moments are non-negative."""
    params, _ = refmodels.load_safetensors(mlp_run["out"] / "model.safetensors")
    opt, _ = refmodels.load_safetensors(mlp_run["out"] / "optimizer.safetensors")
    assert set(opt) == {f"{m}.{n}" for m in "mv" for n in params}, sorted(opt)
    for name, p in params.items():
        for m in "mv":
            t = opt[f"{m}.{name}"]
            assert tuple(t.shape) == tuple(p.shape), (name, t.shape, p.shape)
            assert torch.isfinite(t).all()
        assert (opt[f"v.{name}"] >= 0).all()
        assert opt[f"m.{name}"].abs().sum() > 0
