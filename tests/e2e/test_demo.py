"""`make demo` (scripts/demo.sh): a market, three `arceus provide`
processes and a renter on loopback; the renter trains the Fashion-MNIST MLP
across the three through the market. Runs the script itself (install step
skipped, the binary under test, fewer steps than an epoch) and checks: exit 0,
a plan of three stages on three devices, test accuracy >= 80%, a balanced
ledger, the job listed as done, and no process of the demo left running.
The same over TLS (ARCEUS_DEMO_TLS=1), where a client without the CA is
refused by the demo's market while one with it gets through."""

import os
import re
import subprocess
import time
from pathlib import Path

from conftest import SANITIZER_MARKERS, _env

ROOT = Path(__file__).resolve().parents[2]
STEPS = 200
TLS_STEPS = 60


def alive(pid):
    """Whether pid is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(text):
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and alive(int(d.name)):
            found.append(f"{d.name}: {cmd}")
    return found


def demo_env(arceus_bin, tmp_path, steps=None, **extra):
    env = _env()
    env.update(ARCEUS_BIN=str(arceus_bin), ARCEUS_DEMO_SKIP_DEPS="1", ARCEUS_DEMO_STEPS=str(steps or STEPS),
               ARCEUS_DEMO_OUT=str(tmp_path / "demo"), TMPDIR=str(tmp_path), **extra)
    return env


def test_demo_trains_across_three_providers_and_balances_the_ledger(arceus_bin, tmp_path):
    env = demo_env(arceus_bin, tmp_path)
    t0 = time.monotonic()
    p = subprocess.run([str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    check_demo(out, tmp_path, took)


def test_demo_over_tls_refuses_a_client_without_the_ca(arceus_bin, procs, tmp_path):
    # (fewer steps: the plain demo above checks what training reaches)
    env = demo_env(arceus_bin, tmp_path, steps=TLS_STEPS, ARCEUS_DEMO_TLS="1")
    t0 = time.monotonic()
    # in the background (stopped by the `procs` fixture if the test ends first)
    demo = procs.spawn("demo", [ROOT / "scripts" / "demo.sh"], env=env, cwd=ROOT)
    # while the demo runs: its market, and the CA in its temporary folder
    market = None
    deadline = time.monotonic() + 120
    while market is None and time.monotonic() < deadline and demo.running():
        m = re.search(r"market listening on (127\.0\.0\.1:\d+)", demo.out())
        market = m and m.group(1)
        time.sleep(0.05)
    assert market, demo.out() + demo.err()
    cas = list(tmp_path.glob("arceus-demo.*/tls/ca.pem"))
    assert len(cas) == 1, cas
    (tmp_path / "ca.pem").write_bytes(cas[0].read_bytes())
    # without the CA: refused (the TLS handshake fails), and told why
    plain = subprocess.run([str(arceus_bin), "providers", "--market", market, "--token", "0" * 64],
                           env=_env(), capture_output=True, text=True, timeout=60)
    # with it: through to the market, which refuses the made-up token
    with_ca = subprocess.run([str(arceus_bin), "providers", "--market", market, "--token", "0" * 64,
                              "--tls-ca", str(tmp_path / "ca.pem")],
                             env=_env(), capture_output=True, text=True, timeout=60)
    rc = demo.wait(timeout=240)
    took = time.monotonic() - t0
    out = demo.out() + demo.err()
    assert rc == 0, out[-6000:]
    assert plain.returncode != 0, plain.stdout + plain.stderr
    assert "unreachable" in plain.stderr and "--tls-ca" in plain.stderr, plain.stderr
    assert with_ca.returncode != 0 and "unreachable" not in with_ca.stderr, with_ca.stderr
    assert "token" in with_ca.stderr.lower(), with_ca.stderr
    assert "TLS: a CA and a server certificate" in out, out
    assert re.search(r"market listening on \S+ \(pid \d+, database .*\), TLS$", out, re.M), out
    check_demo(out, tmp_path, took, steps=TLS_STEPS, min_accuracy=60.0)


LM_STEPS = 16
SAMPLE_TOKENS = 120  # (make demo-lm writes 400; sampling is slow under the sanitizers)


def test_demo_lm_splits_gpt5m_over_three_small_providers_and_writes_a_sample(arceus_bin, tmp_path):
    """`scripts/demo.sh --lm --steps 30` (make demo-lm, shortened): gpt-5m
    on the shipped public-domain text, across three providers of 80 MiB
    each, none of which could hold the whole model."""
    env = demo_env(arceus_bin, tmp_path, ARCEUS_DEMO_EVAL_BATCHES="4", ARCEUS_DEMO_SAMPLE_TOKENS=str(SAMPLE_TOKENS))
    t0 = time.monotonic()
    p = subprocess.run([str(ROOT / "scripts" / "demo.sh"), "--lm", "--steps", str(LM_STEPS)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=500)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    (tmp_path / "demo-lm.log").write_text(out)
    why = "\n".join(x for x in out.splitlines() if re.search(r"error|lost|refused", x))
    assert p.returncode == 0, why + "\n...\n" + out[-6000:]
    for marker in SANITIZER_MARKERS:
        assert marker not in out, out[-6000:]

    # three providers of 80 MiB each in the lease
    assert "--max-mem 80M each" in out, out
    leased = re.findall(r"^  provider \d+ \((\w+)\) at \S+: [\d.]+ GFLOP/s, 80 MiB, ", out, re.M)
    assert sorted(leased) == ["ada", "grace", "linus"], out
    # the plan splits the model over the three, each stage within its provider's memory,
    # the stages together more than one provider has
    # (stage, device, layers, params MB, memory MB, ms per micro-batch, micro-batches in flight)
    plan = re.findall(r"^(\d)\s+(127\.0\.0\.1:\d+)\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+\d+$", out, re.M)
    assert [s for s, *_ in plan] == ["0", "1", "2"], out
    assert len({d for _, d, *_ in plan}) == 3, out
    assert plan[0][2].startswith("embedding") and plan[2][2].endswith("head"), out
    mem = [float(m) * 1e6 for *_, m in plan]  # the plan's MB
    assert all(m < 80 * 2**20 for m in mem) and sum(mem) > 80 * 2**20, plan
    assert re.search(rf"^train\s+{LM_STEPS}/{LM_STEPS} \|", out, re.M), out
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/", out, re.M), out

    # it learned something: the loss of a uniform guess over ~80 characters is ~4.4
    val = float(re.search(r"^final val loss ([\d.]+)$", out, re.M).group(1))
    assert val < 3.6, out
    # and it writes: the prompt, then SAMPLE_TOKENS characters of its own
    m = re.search(r'what the model writes, given "(.+?)"', out)
    assert m, out
    after = out[m.end():]
    sample = after[after.index("\n" + m.group(1)) + 1:after.index("\n== the ledger")]
    assert len(sample.strip()) >= SAMPLE_TOKENS * 3 // 4, sample

    # the money balances, per account in a summary
    summaries = re.findall(r"^ledger of (\S+): (\d+) rows?$", out, re.M)
    assert [name for name, _ in summaries] == ["renter", "ada", "grace", "linus"], out
    assert [int(n) for _, n in summaries[1:]] == [LM_STEPS] * 3, out  # one payment per step each
    assert re.search(r"^ledger sum .*: 0\.000000$", out, re.M), out
    assert re.search(rf"^1\s+done\s+{LM_STEPS}\s", out, re.M), out

    pids = [int(x) for x in re.findall(r"\(pid (\d+)", out)]
    assert len(pids) == 4 and not [x for x in pids if alive(x)], out
    assert not list(tmp_path.glob("arceus-demo.*"))
    assert (tmp_path / "demo" / "model.safetensors").exists()
    assert took < 420, f"the demo took {took:.0f} s"


def test_demo_refuses_bad_arguments(tmp_path):
    for args, why in ((["--steps", "x"], "--steps expects"), (["--frob"], "usage"),
                      (["--lm", "--data", str(tmp_path / "none.txt")], "no text to train on")):
        p = subprocess.run([str(ROOT / "scripts" / "demo.sh"), *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env=dict(_env(), ARCEUS_DEMO_SKIP_DEPS="1"))
        assert p.returncode == 2 and why in p.stderr, (args, p.stderr)


def check_demo(out, tmp_path, took, steps=STEPS, min_accuracy=80.0):
    for marker in SANITIZER_MARKERS:
        assert marker not in out, out[-6000:]

    # the lease of three providers, then a plan of three stages on three devices
    assert re.search(r"lease \d+ for job \d+ from market \S+: 3 providers", out), out
    plan = re.findall(r"^(\d)\s+(127\.0\.0\.1:\d+)\s+linear \d", out, re.M)
    assert [s for s, _ in plan] == ["0", "1", "2"], out
    assert len({d for _, d in plan}) == 3, out
    assert re.search(rf"^train\s+{steps}/{steps} \|", out, re.M), out  # the progress lines

    acc = float(re.search(r"^test accuracy ([\d.]+)%", out, re.M).group(1))
    assert acc >= min_accuracy, out

    # the ledger: a summary per account (its rows by reason), not hundreds of rows
    summaries = re.findall(r"^ledger of (\S+): (\d+) rows?$", out, re.M)
    assert [name for name, _ in summaries] == ["renter", "ada", "grace", "linus"], out
    assert int(summaries[0][1]) > steps, out  # the renter paid every step of every stage
    assert re.search(r"^  usage\s+\d+\s+-\d+\.\d{6}$", out, re.M), out
    assert not re.search(r"^\d+\s+\d+\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+usage", out, re.M), out
    # four accounts' balances, and the sum of every row (mint included) zero
    balances = re.findall(r"^balance: ([\d.]+) credits$", out, re.M)
    assert len(balances) == 4, out
    m = re.search(r"renter paid ([\d.]+) credits; providers earned ([\d.]+) credits", out)
    assert m and m.group(1) == m.group(2) and float(m.group(1)) > 0, out
    micro = [int(b.replace(".", "")) for b in balances]
    assert micro[0] + sum(micro[1:]) == 100_000_000, out  # renter + providers = what was minted
    assert re.search(r"^ledger sum .*: 0\.000000$", out, re.M), out

    # the renter's jobs and the job's loss curve
    assert re.search(rf"^1\s+done\s+{steps}\s+{re.escape(m.group(1))}\s", out, re.M), out
    assert re.search(r"curve:\s+[▁▂▃▄▅▆▇█]+$", out, re.M), out

    # everything it started is gone, and so is its temporary folder
    pids = [int(x) for x in re.findall(r"\(pid (\d+)", out)]
    assert len(pids) == 4, out  # the market and three providers
    assert not [x for x in pids if alive(x)], out
    market = re.search(r"market listening on (127\.0\.0\.1:\d+)", out).group(1)
    assert not processes_mentioning(market)
    assert not processes_mentioning(str(tmp_path))
    assert not list(tmp_path.glob("arceus-demo.*"))
    assert (tmp_path / "demo" / "model.safetensors").exists()
    assert took < 180, f"the demo took {took:.0f} s"


def test_demo_nat_needs_root_and_says_so(arceus_bin, tmp_path):
    import pytest
    if os.getuid() != 0:
        pytest.skip("run as root only: it tries the demo as another user")
    env = demo_env(arceus_bin, tmp_path)
    p = subprocess.run(["runuser", "-u", "nobody", "--", "bash", str(ROOT / "scripts" / "demo.sh"), "--nat"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "--nat needs root" in p.stderr, p.stdout + p.stderr


def test_demo_nat_trains_through_the_relay_and_cleans_up(arceus_bin, tmp_path):
    """`make demo-nat`: every edge relayed, the accuracy and a balanced ledger
    printed, and no namespace or process of the demo left."""
    from test_nat import scene_check
    why = scene_check()
    if why:
        import pytest
        pytest.skip(f"the NAT scene cannot be played here: {why}")
    env = demo_env(arceus_bin, tmp_path)
    env["ARCEUS_DEMO_STEPS"] = "100"
    p = subprocess.run([str(ROOT / "scripts" / "demo.sh"), "--nat"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    for marker in SANITIZER_MARKERS:
        assert marker not in out, out[-6000:]
    assert len(re.findall(r"reaches this worker through its relay", out)) == 3, out
    assert re.search(r"a dial of \w+'s worker from the internet: fails", out), out
    edges = re.findall(r"^edge (?:driver|stage \d) -> stage \d \(10\.1\.\d\.2:7001\): (\w+)", out, re.M)
    assert edges == ["relayed"] * 3, out
    acc = float(re.search(r"^test accuracy ([\d.]+)%", out, re.M).group(1))
    assert acc >= 75.0, out
    assert re.search(r"^ledger sum .*: 0\.000000$", out, re.M), out
    scene = re.search(r"namespace (arcdemo\d+)-pub", out).group(1)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert scene not in left, left
    pids = [int(x) for x in re.findall(r"\(pid (\d+)", out)]
    assert len(pids) == 4 and not [x for x in pids if alive(x)], out
