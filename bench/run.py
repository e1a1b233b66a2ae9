#!/usr/bin/python3
"""Benchmark Arceus against PyTorch on the same models, batch sizes and cores.

Usage: /usr/bin/python3 bench/run.py --arceus PATH_TO_BINARY [--quick]
                                    [--models gpt,mlp] [--threads 2]

For each model (gpt = configs/gpt-5m.json on the char-level text, mlp =
configs/mlp-fashion.json on Fashion-MNIST), in the same run and one after the
other:
  * PyTorch: bench/torch_baseline.py with torch 1 intra-op thread and
    OPENBLAS_NUM_THREADS=--threads (the fastest PyTorch setting on 2 cores);
  * Arceus:  ARCEUS train --model SPEC [--data TEXT] --steps N --batch B
             --threads T --lr 1e-3 --log LOG --eval-every 0
    The steady-state rate comes from the JSON lines of LOG (elapsed_s between
    the first logged step >= warmup and the last step).
Prints a table (rates, arceus/torch ratio, MFU against the 2-core FMA ceiling of
472 GFLOP/s) and one JSON summary line. Exits non-zero if the Arceus binary is
missing or fails (the PyTorch numbers are still printed).

Text for the GPT model: first existing of $ARCEUS_TEXT,
<repo>/../shared/data/tinyshakespeare.txt.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
PEAK_FLOPS = 472e9  # 2 cores x AVX-512 FMA fp32 ceiling of the bench machine

MODELS = {
    # name: (spec, batch, full (steps, warmup), quick (steps, warmup))
    "gpt": ("configs/gpt-5m.json", 16, (30, 5), (8, 2)),
    "mlp": ("configs/mlp-fashion.json", 128, (300, 50), (60, 10)),
}


def find_text():
    cands = []
    if os.environ.get("ARCEUS_TEXT"):
        cands.append(os.environ["ARCEUS_TEXT"])
    cands.append(os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"))
    for c in cands:
        if os.path.isfile(c):
            return os.path.abspath(c)
    return None


def text_vocab(path):
    with open(path, "r", encoding="utf-8") as f:
        return len(set(f.read()))


def flops_per_unit(spec, params):
    """Training FLOPs per token (GPT: 6N + 12*L*T*C) or per sample (MLP: 6N)."""
    if spec["type"] == "gpt":
        return 6 * params + 12 * spec["n_layer"] * spec["block_size"] * spec["n_embd"]
    return 6 * params


def count_params(spec, vocab=None):
    if spec["type"] == "gpt":
        V = vocab or spec["vocab_size"]
        C, L, T = spec["n_embd"], spec["n_layer"], spec["block_size"]
        per_layer = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + \
            (4 * C * C + 4 * C) + (4 * C * C + C)
        return V * C + T * C + L * per_layer + 2 * C
    dims = [spec["inputs"]] + list(spec.get("hidden", [])) + [spec["classes"]]
    return sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(len(dims) - 1))


def run_torch(spec_path, data, batch, steps, warmup, threads, timeout):
    env = dict(os.environ)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [PYTHON, os.path.join(HERE, "torch_baseline.py"), "--model", spec_path,
           "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
           "--torch-threads", "1"]
    if data:
        cmd += ["--data", data]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "torch baseline timed out"
    if p.returncode != 0:
        return None, f"torch baseline failed (rc={p.returncode}): {p.stderr.strip()[-2000:]}"
    for line in reversed(p.stdout.strip().splitlines()):
        try:
            return json.loads(line), None
        except json.JSONDecodeError:
            continue
    return None, "torch baseline printed no JSON"


def parse_log(path):
    recs = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(r, dict) or "val_loss" in r or "accuracy" in r:
                continue
            if "step" in r and "elapsed_s" in r:
                recs.append(r)
    return recs


def steady_rate(recs, warmup, per_step):
    """Units/s from elapsed_s between the first step >= warmup and the last step."""
    if not recs:
        return None
    recs = sorted(recs, key=lambda r: r["step"])
    last = recs[-1]
    start = next((r for r in recs if r["step"] >= warmup), None)
    if start is not None and last["step"] > start["step"] and \
            last["elapsed_s"] > start["elapsed_s"]:
        return (last["step"] - start["step"]) * per_step / \
            (last["elapsed_s"] - start["elapsed_s"])
    # Too few logged steps after warmup: fall back to the whole run / logged rate.
    if len(recs) >= 2 and last["elapsed_s"] > recs[0]["elapsed_s"]:
        return (last["step"] - recs[0]["step"]) * per_step / \
            (last["elapsed_s"] - recs[0]["elapsed_s"])
    for key in ("tokens_per_s", "samples_per_s"):
        if key in last:
            return float(last[key])
    return None


def run_arceus(binary, spec_path, data, batch, steps, warmup, threads, per_step, timeout):
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        return None, f"arceus binary not found or not executable: {binary}"
    with tempfile.TemporaryDirectory(prefix="arceus-bench-") as tmp:
        log = os.path.join(tmp, "log.jsonl")
        cmd = [binary, "train", "--model", spec_path]
        if data:
            cmd += ["--data", data]
        cmd += ["--steps", str(steps), "--batch", str(batch), "--threads", str(threads),
                "--lr", "1e-3", "--log", log, "--eval-every", "0"]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"arceus timed out after {timeout}s: {' '.join(cmd)}"
        except OSError as e:
            return None, f"arceus could not start: {e}"
        wall = time.time() - t0
        if p.returncode != 0:
            tail = (p.stderr or p.stdout or "").strip()[-2000:]
            return None, f"arceus failed (rc={p.returncode}): {' '.join(cmd)}\n{tail}"
        if not os.path.exists(log):
            return None, f"arceus wrote no log file ({log})"
        recs = parse_log(log)
    rate = steady_rate(recs, warmup, per_step)
    if rate is None:
        return None, "arceus log has no usable step lines"
    return {"rate": rate, "logged_steps": len(recs), "wall_s": wall,
            "last_loss": recs[-1].get("loss")}, None


def fmt_rate(x):
    return "-" if x is None else f"{x:,.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arceus", required=True, help="path to the arceus binary")
    ap.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    ap.add_argument("--models", default="gpt,mlp", help="comma list of: gpt, mlp")
    ap.add_argument("--threads", type=int, default=2,
                    help="cores for each side (arceus --threads; OpenBLAS threads for torch)")
    ap.add_argument("--timeout", type=int, default=900, help="per-run timeout in seconds")
    args = ap.parse_args()

    binary = os.path.abspath(args.arceus)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r} (choose from {', '.join(MODELS)})")

    rows, errors = [], []
    for m in models:
        spec_rel, batch, full, quick = MODELS[m]
        steps, warmup = quick if args.quick else full
        spec_path = os.path.join(REPO, spec_rel)
        with open(spec_path) as f:
            spec = json.load(f)
        data = None
        vocab = None
        if spec["type"] == "gpt":
            data = find_text()
            if data is None:
                errors.append(f"{m}: no text data ($ARCEUS_TEXT or ../shared/data/tinyshakespeare.txt)")
                continue
            vocab = spec.get("vocab_size") or text_vocab(data)
            per_step, unit = batch * spec["block_size"], "tokens/s"
        else:
            per_step, unit = batch, "samples/s"
        params = count_params(spec, vocab)
        fpu = flops_per_unit(spec, params)
        print(f"[{m}] {spec_rel} batch={batch} steps={steps} warmup={warmup} "
              f"threads={args.threads} params={params:,}", flush=True)

        tres, terr = run_torch(spec_path, data, batch, steps, warmup, args.threads, args.timeout)
        if terr:
            errors.append(f"{m}: {terr}")
        trate = None
        if tres:
            trate = tres.get("tokens_per_s", tres.get("samples_per_s"))
            if tres.get("params") != params:
                print(f"[{m}] note: torch reports {tres.get('params')} params, "
                      f"formula gives {params}", flush=True)
            print(f"[{m}] torch:  {tres['ms_per_step']:.1f} ms/step, {fmt_rate(trate)} {unit}",
                  flush=True)

        ares, aerr = run_arceus(binary, spec_path, data, batch, steps, warmup, args.threads,
                                per_step, args.timeout)
        arate = None
        if aerr:
            errors.append(f"{m}: {aerr}")
            print(f"[{m}] arceus: FAILED", flush=True)
        else:
            arate = ares["rate"]
            print(f"[{m}] arceus: {1e3 * per_step / arate:.1f} ms/step, {fmt_rate(arate)} "
                  f"{unit} ({ares['logged_steps']} logged steps)", flush=True)

        rows.append({
            "model": m, "unit": unit, "arceus": arate, "torch": trate,
            "ratio": (arate / trate) if (arate and trate) else None,
            "mfu_arceus": (arate * fpu / PEAK_FLOPS) if arate else None,
            "mfu_torch": (trate * fpu / PEAK_FLOPS) if trate else None,
            "flops_per_unit": fpu, "params": params,
        })

    print()
    hdr = f"{'model':<6} {'unit':<10} {'arceus':>10} {'torch':>10} {'ratio':>7} " \
          f"{'MFU arceus':>11} {'MFU torch':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        ma = "-" if r["mfu_arceus"] is None else f"{100 * r['mfu_arceus']:.1f}%"
        mt = "-" if r["mfu_torch"] is None else f"{100 * r['mfu_torch']:.1f}%"
        print(f"{r['model']:<6} {r['unit']:<10} {fmt_rate(r['arceus']):>10} "
              f"{fmt_rate(r['torch']):>10} {ratio:>7} {ma:>11} {mt:>10}")
    print(f"(MFU = rate x FLOPs/unit / {PEAK_FLOPS / 1e9:.0f} GFLOP/s; "
          "GPT FLOPs/token = 6N + 12*L*T*C, MLP FLOPs/sample = 6N)")
    print(json.dumps({"results": rows, "quick": args.quick, "threads": args.threads}))

    if errors:
        print(file=sys.stderr)
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
