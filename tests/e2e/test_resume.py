"""Resuming is bitwise exact, and the pipeline partition does not change the result.

An interrupted run is simulated with `--stop-after N`: stop after step N,
leaving a checkpoint at N, with the learning-rate schedule still computed for
--steps. `train --resume DIR` then continues in DIR to the end.
"""

import json
import time

import pytest

from conftest import CONFIGS, read_log

GPT_TINY = CONFIGS / "gpt-tiny.json"


def _same_bytes(a, b, name):
    ba, bb = (a / name).read_bytes(), (b / name).read_bytes()
    assert len(ba) == len(bb), f"{name}: {len(ba)} vs {len(bb)} bytes"
    if ba != bb:
        first = next(i for i in range(len(ba)) if ba[i] != bb[i])
        pytest.fail(f"{name} differs between {a} and {b} (first at byte {first})")


def _same_checkpoint(a, b):
    for name in ("model.safetensors", "optimizer.safetensors"):
        _same_bytes(a, b, name)
    sa = json.loads((a / "state.json").read_text())
    sb = json.loads((b / "state.json").read_text())
    assert sa == sb, (sa, sb)


def _step_losses(log, first):
    return {r["step"]: (r["loss"], r["lr"]) for r in read_log(log)
            if "val_loss" not in r and r["step"] >= first}


def _require_stop_after(run_arceus):
    help_text = run_arceus("train", "--help").stdout
    assert "--stop-after" in help_text, (
        "arceus train has no --stop-after flag: this test needs it "
        "(stop after step N as if interrupted, leaving a checkpoint at N)")


def _interrupted_then_resumed(run_arceus, tmp_path, train_args, data, stop, steps,
                              resume_args=()):
    """Returns (full_dir, resumed_dir, full_log, resumed_log)."""
    full, half = tmp_path / "full", tmp_path / "half"
    full_log, half_log, resumed_log = (tmp_path / "full.jsonl", tmp_path / "half.jsonl",
                                       tmp_path / "resumed.jsonl")
    run_arceus("train", *train_args, "--steps", steps, "--out", full, "--log", full_log,
               "--quiet", check=True)
    run_arceus("train", *train_args, "--steps", steps, "--out", half, "--log", half_log,
               "--stop-after", stop, "--quiet", check=True)
    state = json.loads((half / "state.json").read_text())
    assert state["step"] == int(stop), state
    assert [r["step"] for r in read_log(half_log) if "val_loss" not in r] == \
        list(range(1, int(stop) + 1))
    run_arceus("train", "--resume", half, "--data", data, "--log", resumed_log,
               *resume_args, "--quiet", check=True)
    return full, half, full_log, resumed_log


def test_gpt_resume_is_exact(run_arceus, tmp_path, corpus):
    _require_stop_after(run_arceus)
    args = ("--model", GPT_TINY, "--data", corpus, "--batch", "8", "--eval-every", "10",
            "--eval-batches", "2")
    full, half, full_log, resumed_log = _interrupted_then_resumed(
        run_arceus, tmp_path, args, corpus, "10", "20")
    _same_checkpoint(full, half)
    # the resumed steps repeat the uninterrupted run's losses and learning rates
    want = _step_losses(full_log, 11)
    got = _step_losses(resumed_log, 11)
    assert sorted(got) == list(range(11, 21))
    assert got == want


def test_mlp_resume_is_exact_with_micro_batches(run_arceus, tmp_path, small_fashion,
                                                small_mlp_spec):
    _require_stop_after(run_arceus)
    args = ("--model", small_mlp_spec, "--data", small_fashion, "--batch", "32",
            "--micro-batches", "2", "--eval-every", "0")
    # 1024 examples / 32 = 32 steps per epoch: 40 steps cross an epoch boundary
    full, half, full_log, resumed_log = _interrupted_then_resumed(
        run_arceus, tmp_path, args, small_fashion, "25", "40")
    _same_checkpoint(full, half)
    assert _step_losses(resumed_log, 26) == _step_losses(full_log, 26)


def test_mlp_resume_pipeline_is_exact(run_arceus, tmp_path, small_fashion, small_mlp_spec):
    """Interrupted while running as a 3-stage pipeline with 1F1B."""
    _require_stop_after(run_arceus)
    args = ("--model", small_mlp_spec, "--data", small_fashion, "--batch", "32",
            "--micro-batches", "4", "--workers", "local:3", "--eval-every", "0")
    full, half, _, _ = _interrupted_then_resumed(
        run_arceus, tmp_path, args, small_fashion, "7", "15",
        resume_args=("--workers", "local:3"))
    _same_checkpoint(full, half)


def test_sgd_resume_is_exact(run_arceus, tmp_path, small_fashion, small_mlp_spec):
    """The momentum buffer of SGD is saved and restored as well."""
    _require_stop_after(run_arceus)
    args = ("--model", small_mlp_spec, "--data", small_fashion, "--batch", "32",
            "--optimizer", "sgd", "--lr", "0.05", "--eval-every", "0")
    full, half, _, _ = _interrupted_then_resumed(run_arceus, tmp_path, args, small_fashion,
                                                 "6", "12")
    _same_checkpoint(full, half)


def _steps_logged(log):
    """The training steps in a --log so far (complete lines only: the run may
    have been killed while writing one)."""
    text = log.read_text() if log.exists() else ""
    lines = text.splitlines(keepends=True)
    return [json.loads(line)["step"] for line in lines
            if line.endswith("\n") and '"loss"' in line and "val_loss" not in line]


def test_ckpt_every_matches_stop_after(run_arceus, procs, tmp_path, small_fashion, small_mlp_spec):
    """The checkpoint written by --ckpt-every at step N is the same as the one
    --stop-after N leaves. And --checkpoint-every K writes one at every K-th
    step and there only: a run killed between two checkpoints resumes from
    the last multiple of K it completed (not from the start, not from a later
    step), and the resumed run ends bitwise where an uninterrupted one does."""
    _require_stop_after(run_arceus)
    args = ("--model", small_mlp_spec, "--data", small_fashion, "--batch", "32",
            "--eval-every", "0", "--steps", "12", "--quiet")
    a, b = tmp_path / "a", tmp_path / "b"
    run_arceus("train", *args, "--stop-after", "6", "--out", a, check=True)
    run_arceus("train", *args, "--ckpt-every", "3", "--out", b, "--stop-after", "6", check=True)
    _same_checkpoint(a, b)

    every = 5
    long_run = ("--model", small_mlp_spec, "--data", small_fashion, "--batch", "32",
                "--eval-every", "0", "--steps", "5000", "--quiet")
    killed, log = tmp_path / "killed", tmp_path / "killed.jsonl"
    train = procs.start("train", "train", *long_run, "--checkpoint-every", every, "--out", killed,
                        "--log", log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and train.running() and len(_steps_logged(log)) < 2 * every + 2:
        time.sleep(0.005)
    assert train.running(), f"the run ended before it was killed:\n{train.err()[-3000:]}"
    train.kill()
    done = _steps_logged(log)
    n = len(done)
    assert done == list(range(1, n + 1)) and n >= 2 * every + 2, done
    assert (killed / "state.json").exists() or (killed / ".pending" / "state.json").exists(), (
        f"no checkpoint in {killed} after {n} steps with --checkpoint-every {every}")

    # resumed: it goes on from the last multiple of `every` it completed (or,
    # killed while writing that one, from the one before)
    stop = every * (n // every + 1)
    resumed_log = tmp_path / "resumed.jsonl"
    run_arceus("train", "--resume", killed, "--data", small_fashion, "--stop-after", stop,
               "--log", resumed_log, "--quiet", check=True)
    resumed = _steps_logged(resumed_log)
    kept = resumed[0] - 1
    allowed = {every * (n // every)} | ({n - every} if n % every == 0 else set())
    assert kept in allowed, (
        f"killed after step {n} with --checkpoint-every {every}, the run resumed after step {kept}, "
        f"not after {' or '.join(map(str, sorted(allowed)))}")
    assert resumed == list(range(kept + 1, stop + 1)), resumed
    uninterrupted = tmp_path / "uninterrupted"
    run_arceus("train", *long_run, "--stop-after", stop, "--out", uninterrupted, check=True)
    _same_checkpoint(uninterrupted, killed)


@pytest.mark.parametrize("workers,schedule", [("local:2", "1f1b"), ("local:3", "1f1b"),
                                              ("local:3", "gpipe")])
def test_mlp_partition_independent(run_arceus, tmp_path, small_fashion, small_mlp_spec,
                                   workers, schedule):
    """Splitting the MLP into pipeline stages (any schedule) gives the same
    bytes as training it in one stage, given the same micro-batches."""
    args = ("--model", small_mlp_spec, "--data", small_fashion, "--steps", "12",
            "--batch", "32", "--micro-batches", "4", "--eval-every", "0", "--quiet")
    one, many = tmp_path / "one", tmp_path / "many"
    run_arceus("train", *args, "--workers", "local:1", "--out", one, check=True)
    run_arceus("train", *args, "--workers", workers, "--schedule", schedule,
                   "--out", many, check=True)
    _same_checkpoint(one, many)


def test_resumed_run_keeps_the_whole_loss_curve(run_arceus, tmp_path, corpus):
    """curve.safetensors travels with the checkpoint, so loss.svg of a resumed
    run still starts at step 1."""
    import sys
    sys.path.insert(0, str(CONFIGS.parent / "tests" / "ref"))
    import refmodels
    out = tmp_path / "run"
    args = ("--data", corpus, "--batch", "4", "--eval-every", "5", "--eval-batches", "1")
    run_arceus("train", "--model", CONFIGS / "gpt-tiny.json", *args, "--steps", "12",
               "--stop-after", "6", "--out", out, check=True)
    run_arceus("train", "--resume", out, *args, check=True)
    tensors, _ = refmodels.load_safetensors(out / "curve.safetensors")
    assert [int(s) for s in tensors["train"][:, 0].tolist()] == list(range(1, 13))
    assert [int(s) for s in tensors["val"][:, 0].tolist()] == [5, 10, 12]
    assert "<svg" in (out / "loss.svg").read_text()
