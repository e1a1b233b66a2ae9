"""`make demo-lm` (scripts/demo.sh --lm), shortened: gpt-5m split over three
providers too small for it alone, a sample and a balanced ledger."""

import re
import subprocess
import time

from conftest import SANITIZER_MARKERS
from demo_common import ROOT, alive, demo_env


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
