"""What the market hands the CLI is printed safely: a job's spec comes from
whoever acquired the lease, through a client written from the .proto alone,
so it may hold terminal escapes (clear the screen, recolour, retitle) or
bidirectional overrides (which make text read differently than it is
stored). `arceus jobs` and `arceus job ID` print them as visible escapes."""

import pytest

from conftest import query
from pbwire import acquire
from test_market import call

grpc = pytest.importorskip("grpc")

HOSTILE_SPEC = "gpt \x1b[2J\x1b]0;pwned\x07 \u202etxt.exe\u202c \u2066iso\u2069 caf\u00e9 \x9b"


def test_jobs_print_control_and_bidi_characters_escaped(run_arceus, add_account, procs, tmp_path):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "10")
    alice = add_account(db, "alice")
    market = procs.market(db, "--offline-after", "3600")
    procs.leased_worker(market, alice, 1_000_000)
    call(market.addr, "AcquireLease", acquire(renter, spec=HOSTILE_SPEC))
    stored = query(db, "SELECT spec FROM jobs")[0][0]
    assert "\x1b" in stored, "the market kept a different spec: this test needs another way in"
    job_id = query(db, "SELECT id FROM jobs")[0][0]
    for args in (("jobs",), ("job", str(job_id))):
        p = run_arceus(*args, "--market", market.addr, "--token", renter, check=True)
        out = p.stdout
        for raw in ("\x1b", "\x07", "\x9b", "\u202e", "\u202c", "\u2066", "\u2069"):
            assert raw not in out, f"`arceus {' '.join(args)}` printed {raw!r} raw:\n{out!r}"
        for shown in ("\\x1b[2J", "\\x07", "\\u{202e}txt.exe\\u{202c}", "\\u{2066}iso\\u{2069}", "\\u{009b}"):
            assert shown in out, f"`arceus {' '.join(args)}` does not show {shown!r}:\n{out}"
        assert "café" in out, "ordinary non-ASCII text must stay as it is"
