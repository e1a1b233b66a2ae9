#!/usr/bin/python3
"""Benchmark Arceus against PyTorch's best setting on the same models, batches and cores.

Usage: /usr/bin/python3 bench/run.py --arceus PATH_TO_BINARY [--quick]
                                    [--models gpt,mlp,gpt25] [--threads N] [--rounds R]

For each model (gpt = configs/gpt-5m.json at batch 16 and gpt25 = configs/gpt-25m.json
at batch 8 on the char-level text, mlp = configs/mlp-fashion.json at batch 128 on
Fashion-MNIST), in the same run:
  * PyTorch (bench/torch_baseline.py) under every thread setting that could be
    its fastest on --threads cores: torch intra-op threads t = 1..N, each with
    the BLAS threads (OMP_NUM_THREADS and OPENBLAS_NUM_THREADS) at 1, t and N.
    Under the OpenMP build of OpenBLAS torch.set_num_threads(t) also caps the
    BLAS at t threads; under the pthread build the BLAS has its own pool; the
    bench does not assume which, it tries them all and keeps the fastest;
  * Arceus: ARCEUS train --model SPEC [--data TEXT] --steps S --batch B
            --threads N --lr 1e-3 --log LOG --eval-every 0
The PyTorch settings and Arceus run one after the other, --rounds times over
(alternating, so a burst of load on the shared machine hits both sides), and
each setting keeps its best round. Both sides are rated alike: the median
time of the steps after the warm-up.

Prints which BLAS the system (/etc/alternatives) and PyTorch (its process's
mapped libraries) use, every setting's figure, a table (tokens/s and samples/s,
Arceus against PyTorch's best, MFU of both against the FMA ceiling of the
cores: --peak-gflops, default 472 for the 2-core bench machine), the load
average, and one JSON summary line. Exits non-zero if a run fails.

Text for the GPT models: first existing of $ARCEUS_TEXT,
<repo>/../shared/data/tinyshakespeare.txt.
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
PEAK_GFLOPS = 472.0  # 2 cores x 512-bit FMA fp32 ceiling of the bench machine

MODELS = {
    # name: (spec, batch, full (steps, warmup), quick (steps, warmup))
    "gpt": ("configs/gpt-5m.json", 16, (30, 5), (8, 2)),
    "mlp": ("configs/mlp-fashion.json", 128, (300, 50), (60, 10)),
    "gpt25": ("configs/gpt-25m.json", 8, (8, 2), (3, 1)),
}


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def system_blas():
    """The system's libblas.so.3 as update-alternatives points it, and its build."""
    links = sorted(glob.glob("/etc/alternatives/libblas.so.3*"))
    if not links:
        return None, "unknown (no /etc/alternatives/libblas.so.3*)"
    target = os.path.realpath(links[0])
    return target, blas_build(target)


def blas_build(path):
    p = path or ""
    if "openblas-openmp" in p:
        return "OpenBLAS, OpenMP build"
    if "openblas-pthread" in p:
        return "OpenBLAS, pthread build"
    if "openblas-serial" in p:
        return "OpenBLAS, serial build"
    if "openblas" in p:
        return "OpenBLAS"
    if "mkl" in p:
        return "MKL"
    if "blis" in p:
        return "BLIS"
    if "atlas" in p:
        return "ATLAS"
    return "reference BLAS" if p else "unknown"


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


def torch_settings(cores):
    """(torch threads, BLAS threads): t = 1..cores, BLAS threads 1, t and cores."""
    out = []
    for t in range(1, cores + 1):
        for b in sorted({1, t, cores}):
            out.append((t, b))
    return out


def setting_name(s):
    return f"torch threads {s[0]}, BLAS threads {s[1]}"


def run_torch(spec_path, data, batch, steps, warmup, setting, timeout):
    torch_threads, blas_threads = setting
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(blas_threads)
    env["OPENBLAS_NUM_THREADS"] = str(blas_threads)
    cmd = [PYTHON, os.path.join(HERE, "torch_baseline.py"), "--model", spec_path,
           "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
           "--torch-threads", str(torch_threads)]
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


def median_step_s(recs, warmup):
    """The median time of one step after the warm-up (the log's step_s: the
    step's forward, backward and update), as PyTorch's side takes the median
    of its steps."""
    dts = [r["step_s"] for r in recs if r["step"] > warmup and "step_s" in r]
    if not dts:
        return None
    return statistics.median(dts)


def run_arceus(binary, spec_path, data, batch, steps, warmup, threads, timeout):
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        return None, f"arceus binary not found or not executable: {binary}"
    with tempfile.TemporaryDirectory(prefix="arceus-bench-") as tmp:
        log = os.path.join(tmp, "log.jsonl")
        cmd = [binary, "train", "--model", spec_path]
        if data:
            cmd += ["--data", data]
        cmd += ["--steps", str(steps), "--batch", str(batch), "--threads", str(threads),
                "--lr", "1e-3", "--log", log, "--eval-every", "0", "--eval-batches", "1",
                "--quiet"]
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
    step_s = median_step_s(recs, warmup)
    if step_s is None or step_s <= 0:
        return None, "arceus log has too few step lines after the warm-up"
    return {"ms_per_step": 1e3 * step_s, "logged_steps": len(recs), "wall_s": wall,
            "last_loss": recs[-1].get("loss")}, None


def fmt_rate(x):
    return "-" if x is None else f"{x:,.0f}"


def fmt_pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arceus", required=True, help="path to the arceus binary")
    ap.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    ap.add_argument("--models", default="gpt,mlp,gpt25",
                    help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--threads", type=int, default=2,
                    help="cores for each side: arceus --threads, PyTorch's settings up to it")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternating rounds of every setting; each keeps its best")
    ap.add_argument("--peak-gflops", type=float, default=PEAK_GFLOPS,
                    help="the FMA ceiling of --threads cores, for MFU")
    ap.add_argument("--timeout", type=int, default=900, help="per-run timeout in seconds")
    args = ap.parse_args()
    if args.threads < 1 or args.rounds < 1:
        ap.error("--threads and --rounds must be positive")

    binary = os.path.abspath(args.arceus)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r} (choose from {', '.join(MODELS)})")
    peak = args.peak_gflops * 1e9

    sys_path, sys_build = system_blas()
    print(f"system BLAS: {sys_build}" + (f" ({sys_path})" if sys_path else ""), flush=True)
    settings = torch_settings(args.threads)
    print(f"load average at start: {load_average()}", flush=True)

    rows, errors = [], []
    torch_blas = None
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
            per_step = batch * spec["block_size"]
        else:
            per_step = batch
        samples_per_step = batch
        params = count_params(spec, vocab)
        fpu = flops_per_unit(spec, params)
        print(f"\n[{m}] {spec_rel} batch={batch} steps={steps} warmup={warmup} "
              f"threads={args.threads} params={params:,} rounds={args.rounds}", flush=True)

        best_torch = {}   # setting -> best ms/step
        best_arceus = None
        for rnd in range(args.rounds):
            for s in settings:
                res, err = run_torch(spec_path, data, batch, steps, warmup, s, args.timeout)
                if err:
                    errors.append(f"{m}: {setting_name(s)}: {err}")
                    continue
                if torch_blas is None and res.get("blas_loaded"):
                    torch_blas = res["blas_loaded"]
                    print(f"PyTorch's BLAS: {blas_build(torch_blas)} ({torch_blas})", flush=True)
                if res.get("params") != params:
                    print(f"[{m}] note: torch reports {res.get('params')} params, "
                          f"formula gives {params}", flush=True)
                ms = res["ms_per_step"]
                print(f"[{m}] round {rnd + 1} {setting_name(s)}: {ms:.1f} ms/step, "
                      f"{fmt_rate(1e3 * per_step / ms)} /s  (load {load_average()})", flush=True)
                if s not in best_torch or ms < best_torch[s]:
                    best_torch[s] = ms
            ares, aerr = run_arceus(binary, spec_path, data, batch, steps, warmup, args.threads,
                                    args.timeout)
            if aerr:
                errors.append(f"{m}: {aerr}")
                print(f"[{m}] round {rnd + 1} arceus: FAILED", flush=True)
                continue
            ms = ares["ms_per_step"]
            print(f"[{m}] round {rnd + 1} arceus --threads {args.threads}: {ms:.1f} ms/step, "
                  f"{fmt_rate(1e3 * per_step / ms)} /s  (load {load_average()})", flush=True)
            if best_arceus is None or ms < best_arceus:
                best_arceus = ms

        print(f"[{m}] PyTorch, each setting's best of {args.rounds}:", flush=True)
        for s in settings:
            if s in best_torch:
                print(f"[{m}]   {setting_name(s)}: {best_torch[s]:.1f} ms/step, "
                      f"{fmt_rate(1e3 * per_step / best_torch[s])} /s", flush=True)
        tbest = min(best_torch, key=best_torch.get) if best_torch else None
        tms = best_torch.get(tbest)
        trate = 1e3 * per_step / tms if tms else None
        arate = 1e3 * per_step / best_arceus if best_arceus else None
        rows.append({
            "model": m, "spec": spec_rel, "batch": batch,
            "unit": "tokens/s" if spec["type"] == "gpt" else "samples/s",
            "arceus": arate, "torch": trate,
            "arceus_samples": arate * samples_per_step / per_step if arate else None,
            "torch_samples": trate * samples_per_step / per_step if trate else None,
            "torch_setting": list(tbest) if tbest else None,
            "torch_settings_ms": {setting_name(s): round(v, 2) for s, v in best_torch.items()},
            "ratio": (arate / trate) if (arate and trate) else None,
            "mfu_arceus": (arate * fpu / peak) if arate else None,
            "mfu_torch": (trate * fpu / peak) if trate else None,
            "flops_per_unit": fpu, "params": params,
        })

    print()
    hdr = (f"{'model':<6} {'tokens/s':>9} {'samples/s':>10} {'PyTorch best':>13} "
           f"{'samples/s':>10} {'ratio':>6} {'MFU arceus':>11} {'MFU torch':>10}  torch setting")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        gpt = r["unit"] == "tokens/s"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        setting = setting_name(r["torch_setting"]) if r["torch_setting"] else "-"
        print(f"{r['model']:<6} {fmt_rate(r['arceus']) if gpt else '':>9} "
              f"{fmt_rate(r['arceus_samples']):>10} "
              f"{(fmt_rate(r['torch']) + ' tok') if gpt else '':>13} "
              f"{fmt_rate(r['torch_samples']):>10} {ratio:>6} "
              f"{fmt_pct(r['mfu_arceus']):>11} {fmt_pct(r['mfu_torch']):>10}  {setting}")
    print(f"(samples/s of a GPT = sequences/s; MFU = rate x FLOPs per unit / "
          f"{args.peak_gflops:.0f} GFLOP/s; GPT FLOPs/token = 6N + 12*L*T*C, "
          f"MLP FLOPs/sample = 6N)")
    for r in rows:
        goal = {"gpt": (1.5, 0.45), "mlp": (1.5, None)}.get(r["model"])
        if not goal or r["ratio"] is None:
            continue
        ok = r["ratio"] >= goal[0] and (goal[1] is None or r["mfu_arceus"] >= goal[1])
        want = f">= {goal[0]}x PyTorch's best" + \
            (f" and >= {100 * goal[1]:.0f}% MFU" if goal[1] else "")
        print(f"{r['model']}: {r['ratio']:.2f}x, {fmt_pct(r['mfu_arceus'])} MFU; goal {want}: "
              f"{'PASS' if ok else 'FAIL'}")
    print(f"load average at end: {load_average()}")
    print(json.dumps({"results": rows, "quick": args.quick, "threads": args.threads,
                      "rounds": args.rounds, "system_blas": sys_path,
                      "system_blas_build": sys_build, "torch_blas": torch_blas,
                      "load_average": load_average()}))

    if errors:
        print(file=sys.stderr)
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
