"""Short training runs: they learn, log, and leave a complete checkpoint."""

import json
import math
import re
import xml.etree.ElementTree as ET

import pytest

from conftest import CONFIGS, read_log

CKPT_FILES = ("model.safetensors", "spec.json", "optimizer.safetensors", "state.json",
              "loss.svg")


def _step_lines(log):
    return [r for r in log if "loss" in r and "val_loss" not in r]


def _eval_lines(log):
    return [r for r in log if "val_loss" in r]


def _check_svg(path):
    text = path.read_text()
    assert "<svg" in text
    root = ET.fromstring(text)  # well-formed XML
    assert root.tag.endswith("svg"), root.tag


# ---------------------------------------------------------------------------
# MLP on Fashion-MNIST
# ---------------------------------------------------------------------------

def test_mlp_learns(mlp_run):
    out = mlp_run["proc"].stdout + mlp_run["proc"].stderr
    m = re.search(r"test accuracy\s+([0-9.]+)%", out)
    assert m, f"no 'test accuracy' line in:\n{out[-2000:]}"
    assert float(m.group(1)) > 70.0, m.group(0)


def test_mlp_log(mlp_run):
    log = read_log(mlp_run["log"])
    steps = _step_lines(log)
    assert [r["step"] for r in steps] == list(range(1, 61))
    for r in steps:
        for key in ("step", "loss", "lr", "samples_per_s", "elapsed_s"):
            assert key in r, f"{key} missing from {r}"
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["lr"] > 0 and r["samples_per_s"] > 0 and r["elapsed_s"] >= 0
    elapsed = [r["elapsed_s"] for r in steps]
    assert elapsed == sorted(elapsed)
    assert steps[-1]["loss"] < steps[0]["loss"]
    evals = _eval_lines(log)
    assert [r["step"] for r in evals] == [30, 60], evals
    for r in evals:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["val_loss"])
    assert evals[-1]["accuracy"] > 0.70
    # the summary's number is the last evaluation's
    m = re.search(r"test accuracy\s+([0-9.]+)%", mlp_run["proc"].stdout + mlp_run["proc"].stderr)
    assert abs(float(m.group(1)) - 100 * evals[-1]["accuracy"]) < 0.01


def test_mlp_lr_schedule(mlp_run):
    """Linear warm-up over 20 steps to the MLP default 3e-3, then cosine decay towards 1e-4."""
    import refmodels
    steps = _step_lines(read_log(mlp_run["log"]))
    for r in steps:
        want = refmodels.lr_at(r["step"] - 1, 3e-3, 1e-4, 20, 60)
        assert abs(r["lr"] - want) <= 1e-6 * max(1.0, want / 1e-3), (r["step"], r["lr"], want)


def test_mlp_checkpoint_files(mlp_run):
    out = mlp_run["out"]
    for name in CKPT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    spec = json.loads((out / "spec.json").read_text())
    assert spec["type"] == "mlp" and spec["hidden"] == [512, 512]
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == 60
    _check_svg(out / "loss.svg")


# ---------------------------------------------------------------------------
# gpt-tiny on a small text
# ---------------------------------------------------------------------------

def test_gpt_log(gpt_run):
    log = read_log(gpt_run["log"])
    steps = _step_lines(log)
    assert [r["step"] for r in steps] == list(range(1, 21))
    for r in steps:
        for key in ("step", "loss", "lr", "tokens_per_s", "elapsed_s"):
            assert key in r, f"{key} missing from {r}"
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    evals = _eval_lines(log)
    assert [r["step"] for r in evals] == [10, 20], evals
    for r in evals:
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0


def test_gpt_starts_near_uniform(gpt_run, corpus):
    """The initial loss of a freshly initialised model is about ln(vocab)."""
    vocab = len(set(corpus.read_bytes()))
    first = _step_lines(read_log(gpt_run["log"]))[0]["loss"]
    assert abs(first - math.log(vocab)) < 0.3, (first, math.log(vocab))


def test_gpt_checkpoint_files(gpt_run, corpus):
    out = gpt_run["out"]
    for name in CKPT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    spec = json.loads((out / "spec.json").read_text())
    alphabet = sorted(set(corpus.read_bytes()))
    assert spec["type"] == "gpt"
    assert spec["vocab"] == alphabet
    assert spec["vocab_size"] == len(alphabet)
    assert json.loads((out / "state.json").read_text())["step"] == 20
    _check_svg(out / "loss.svg")


def test_gpt_learns(run_arceus, tmp_path, corpus):
    """A slightly longer run with a higher learning rate brings the loss
    well below the uniform baseline."""
    log = tmp_path / "log.jsonl"
    run_arceus("train", "--model", CONFIGS / "gpt-tiny.json",
               "--data", corpus, "--steps", "60", "--batch", "8", "--lr", "1e-2",
               "--warmup", "5", "--eval-every", "0", "--eval-batches", "2",
               "--log", log, "--quiet", check=True)
    vocab = len(set(corpus.read_bytes()))
    evals = _eval_lines(read_log(log))
    assert evals and evals[-1]["val_loss"] < math.log(vocab) - 0.5, evals


def test_quiet_is_quiet(run_arceus, tmp_path, corpus):
    p = run_arceus("train", "--model", CONFIGS / "gpt-tiny.json", "--data", corpus,
                   "--steps", "2", "--batch", "4", "--eval-batches", "1", "--quiet",
                   check=True)
    assert p.stdout == "" and p.stderr == "", (p.stdout, p.stderr)


def test_zero_steps(run_arceus, tmp_path, small_fashion, small_mlp_spec):
    """--steps 0 is accepted by the option parser: it must then either be
    refused with an error, or keep its promise of a checkpoint (of the
    initial model) without NaN summaries."""
    out = tmp_path / "zero"
    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", "0",
                   "--batch", "8", "--out", out)
    if p.returncode != 0:
        assert p.stderr.splitlines()[-1].startswith("arceus") and "--steps" in p.stderr
        return
    assert "nan" not in p.stdout.lower(), p.stdout
    for name in ("model.safetensors", "spec.json", "state.json"):
        assert (out / name).is_file(), f"{name} missing although the summary names {out}"


def test_local_pipeline_prints_plan_and_bubble(run_arceus, corpus):
    p = run_arceus("train", "--model", CONFIGS / "gpt-tiny.json", "--data", corpus, "--steps", "3",
                   "--batch", "8", "--micro-batches", "4", "--workers", "local:2", "--eval-batches", "1",
                   check=True)
    assert "predicted bubble" in p.stdout, p.stdout
    assert p.stdout.count("bubble") >= 3, p.stdout  # the plan, then each stage's measured bubble
    assert "theory 20.0%" in p.stdout, p.stdout     # (S-1)/(M+S-1) = 1/5


# ---------------------------------------------------------------------------
# The thread count does not change a result
# ---------------------------------------------------------------------------

# Models whose products are cut into several blocks and column slices and
# run on both threads, whose attention has a sequence and head size off the
# kernels' blocks, and which use dropout: every kernel's parallel path.
WIDE_GPT = {"type": "gpt", "vocab_size": 0, "block_size": 70, "n_layer": 2, "n_head": 3,
            "n_embd": 96, "dropout": 0.1}
WIDE_MLP = {"type": "mlp", "inputs": 784, "hidden": [1100, 300], "classes": 10,
            "activation": "gelu", "dropout": 0.1}


@pytest.mark.parametrize("model,args", [
    ("mlp-fashion.json", ("--batch", "128", "--steps", "8")),
    ("gpt-tiny.json", ("--batch", "8", "--steps", "6")),
    (WIDE_MLP, ("--batch", "100", "--steps", "4")),
    (WIDE_GPT, ("--batch", "8", "--steps", "4")),
], ids=["mlp-fashion", "gpt-tiny", "wide-mlp", "wide-gpt"])
def test_one_and_two_threads_train_the_same_bits(run_arceus, tmp_path, fashion_dir, corpus, model, args):
    """--threads 1 and --threads 2 give bitwise the same weights and losses:
    every kernel's sums have a fixed order and split, whatever the threads
    (a replay of a stage on another machine depends on it)."""
    if isinstance(model, dict):
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps(model))
        is_mlp = model["type"] == "mlp"
    else:
        spec = CONFIGS / model
        is_mlp = model.startswith("mlp")
    data = fashion_dir if is_mlp else corpus
    runs = []
    for threads in ("1", "2"):
        out, log = tmp_path / f"t{threads}", tmp_path / f"t{threads}.jsonl"
        run_arceus("train", "--model", spec, "--data", data, *args, "--eval-every", "0",
                   "--eval-batches", "1", "--threads", threads, "--out", out, "--log", log, "--quiet",
                   check=True)
        runs.append(((out / "model.safetensors").read_bytes(), [r["loss"] for r in _step_lines(read_log(log))]))
    assert runs[0][1] == runs[1][1], "the losses differ between 1 and 2 threads"
    assert runs[0][0] == runs[1][0], "the weights differ between 1 and 2 threads"


def test_every_sgemm_kernel_trains_the_same_bits(run_arceus, tmp_path, corpus, monkeypatch):
    """The AVX-512, AVX2 and portable product kernels compute each element as
    the same chain of fused multiply-adds: a machine without AVX-512 (a
    verifier replaying a provider's step) gets the provider's bits."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(WIDE_GPT))
    runs = {}
    for kernel in ("avx512", "avx2", "portable"):
        monkeypatch.setenv("ARCEUS_SGEMM_KERNEL", kernel)
        out, log = tmp_path / kernel, tmp_path / f"{kernel}.jsonl"
        run_arceus("train", "--model", spec, "--data", corpus, "--batch", "4", "--steps", "3",
                   "--eval-every", "0", "--eval-batches", "1", "--threads", "2", "--out", out,
                   "--log", log, "--quiet", check=True)
        runs[kernel] = ((out / "model.safetensors").read_bytes(),
                        [r["loss"] for r in _step_lines(read_log(log))])
    for kernel in ("avx2", "portable"):
        assert runs[kernel][1] == runs["avx512"][1], f"the losses differ with the {kernel} kernel"
        assert runs[kernel][0] == runs["avx512"][0], f"the weights differ with the {kernel} kernel"
