#!/usr/bin/python3
"""Time PyTorch training steps for an Arceus model spec (the baseline for bench/run.py).

Usage:
  /usr/bin/python3 bench/torch_baseline.py --model configs/gpt-5m.json \
      --data ../shared/data/tinyshakespeare.txt --batch 16 --steps 20 --warmup 5 \
      --torch-threads 1

Runs --steps training steps in total; the first --warmup are not timed. Recipe:
AdamW lr 1e-3 (constant), betas 0.9/0.99, eps 1e-8, weight decay 0.1 on dim>=2
params, grad-norm clipping at 0.5 (as in tests/ref; the clip only costs a norm; it keeps the
work per step equal to a real trainer's).

GPT: char-level vocabulary from the text file; each batch is --batch random
windows of block_size tokens (targets shifted by one).
MLP: --data is the Fashion-MNIST directory (gzip'd IDX files, default
/usr/share/datasets/fashion-mnist); batches are random training images / 255.

Threads: torch.set_num_threads(--torch-threads). The BLAS (OpenBLAS) thread count
is taken from the environment (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS); set it
before starting this script. bench/run.py tries every setting and keeps the best.
The JSON names the BLAS library this process mapped (blas_loaded), which is
the one that decides what those settings mean (OpenBLAS's OpenMP build follows
torch's thread count, its pthread build its own).

Prints one JSON line:
  {"ms_per_step": ..., "tokens_per_s"|"samples_per_s": ..., "params": ..., ...}
ms_per_step (and the rate) use the median over the timed steps; mean and min
are reported alongside.
"""

import argparse
import gzip
import json
import os
import statistics
import struct
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "ref"))
import refmodels as rm  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path):
    """Parse a (possibly gzip'd) IDX file into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise ValueError(f"{path}: not an IDX file")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    arr = np.frombuffer(raw, dtype=np.dtype(dtypes[dtype_code]), offset=4 + 4 * ndim,
                        count=int(np.prod(dims)))
    return arr.reshape(dims)


def find_idx(directory, stem):
    for name in (stem + ".gz", stem):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{stem}[.gz] not found in {directory}")


def load_text(path):
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.int64)
    return torch.from_numpy(data), len(chars)


def loaded_blas():
    """The BLAS shared library this process has mapped (after a first matmul)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return ""
    for key in ("openblas", "libblas", "mkl", "blis"):
        hits = sorted(p for p in paths if key in os.path.basename(p))
        if hits:
            return os.path.realpath(hits[0])
    return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model spec JSON")
    ap.add_argument("--data", default=None,
                    help="text file (GPT) or Fashion-MNIST directory (MLP)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="total steps (incl. warmup)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed leading steps")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup")

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    with open(args.model) as f:
        spec = json.load(f)
    B = args.batch

    if spec["type"] == "gpt":
        if not args.data:
            ap.error("--data (text file) is required for GPT models")
        data, vocab = load_text(args.data)
        if not spec.get("vocab_size"):
            spec["vocab_size"] = vocab
        T = int(spec["block_size"])
        n = len(data) - T - 1
        offs = torch.arange(T)

        def batch():
            ix = torch.from_numpy(rng.integers(0, n, size=B))
            pos = ix[:, None] + offs[None, :]
            return data[pos], data[pos + 1]
        per_step, unit = B * T, "tokens_per_s"
    elif spec["type"] == "mlp":
        d = args.data or FASHION_DIR
        images = read_idx(find_idx(d, "train-images-idx3-ubyte"))
        labels = read_idx(find_idx(d, "train-labels-idx1-ubyte"))
        X = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
        Y = torch.from_numpy(labels.astype(np.int64))

        def batch():
            ix = torch.from_numpy(rng.integers(0, X.shape[0], size=B))
            return X[ix], Y[ix]
        per_step, unit = B, "samples_per_s"
    else:
        ap.error(f"unknown model type {spec.get('type')!r}")

    model = rm.build_model(spec).float()
    model.train()
    opt = rm.configure_optimizer(model, args.lr)

    times = []
    losses = []
    for step in range(args.steps):
        x, y = batch()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = rm.loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        lv = float(loss)  # forces completion (CPU is synchronous anyway)
        dt = time.perf_counter() - t0
        losses.append(lv)
        if step >= args.warmup:
            times.append(dt)

    # The median is the headline number: on a small shared machine a few steps
    # can be slowed down by unrelated processes, which would skew the mean.
    med_s = statistics.median(times)
    mean_s = sum(times) / len(times)
    out = {
        "ms_per_step": round(med_s * 1e3, 3),
        unit: round(per_step / med_s, 2),
        "params": rm.count_params(model),
        "mean_ms_per_step": round(mean_s * 1e3, 3),
        "min_ms_per_step": round(min(times) * 1e3, 3),
        "model": os.path.basename(args.model),
        "batch": B,
        "timed_steps": len(times),
        "torch_threads": torch.get_num_threads(),
        "blas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS",
                                           os.environ.get("OMP_NUM_THREADS", "")),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
        "blas_loaded": loaded_blas(),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
