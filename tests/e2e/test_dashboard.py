"""The market's web dashboard: `arceus market --http` over a real
SQLite file, three real `arceus provide` processes and a renter training the
small MLP across them through the market, all on 127.0.0.1.

- the JSON API: the overview is public; account endpoints refuse a missing,
  malformed or unknown token (401) and another account's job or ledger
  (403); each account sees its own jobs, ledger and earnings only;
- the page in headless Chromium (Debian's `chromium`): the job page's loss
  curve gains points as training proceeds, its plan shows three devices, the
  ledger page shows the renter's debit; a screenshot of the job page is left
  in build/artifacts/dashboard-job.png.

Every process is stopped at the end (SIGTERM, exit 0 expected) and its stderr
checked for sanitizer reports (a conftest.Procs owned by the module fixture).
"""

import json
import re
import shutil
import sqlite3
import subprocess
import tempfile
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import PROVIDER_READY, Procs, create_account, wait_for

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "build" / "artifacts"
STEPS = 600  # long enough to watch the curve grow; under the API's 1000-point thinning


def get(url, token=None, method="GET"):
    """(status, headers, body bytes) of one HTTP request."""
    req = urllib.request.Request(url, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get_json(url, token=None):
    status, _, body = get(url, token)
    return status, json.loads(body)


@pytest.fixture(scope="module")
def dashboard(arceus_bin, run_arceus, tmp_path_factory, small_mlp_spec, small_fashion):
    """A market with its dashboard, three providers and a renter training
    STEPS steps of the small MLP across them (started, not waited for)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    db = tmp / "market.db"
    tokens = {name: create_account(run_arceus, db, name, credits)
              for name, credits in (("renter", "100"), ("ada", "0"), ("grace", "0"), ("linus", "0"))}
    procs = Procs(arceus_bin, tmp)  # module-wide: stopped and checked below
    try:
        # --escrow-window 0: the providers' pay is theirs to spend when the job ends
        m = procs.market(db, "--http", "127.0.0.1:0", "--offline-after", "3600", "--escrow-window", "0")
        providers = [procs.start("provide", "provide", "--market", m.addr, "--token", tokens[name],
                                 "--listen", "127.0.0.1:0", "--max-threads", "1", "--price", price)
                     for name, price in (("ada", "1"), ("grace", "1.5"), ("linus", "2"))]
        for p in providers:  # started together, each measuring its speed
            p.wait_stdout(PROVIDER_READY)
        train = procs.start("train", "train", "--model", small_mlp_spec, "--data", small_fashion,
                            "--market", m.addr, "--token", tokens["renter"], "--devices", "3", "--plan", "0,1,2",
                            "--micro-batches", "4", "--batch", "32", "--steps", STEPS, "--eval-every", "50",
                            "--threads", "1")
        yield {"url": m.url, "tokens": tokens, "db": db, "train": train, "procs": procs, "tmp": tmp}
        # the run ends by itself; then everything stops cleanly
        train.wait(timeout=300)
        assert train.proc.returncode == 0, train.err()[-3000:]
    finally:
        procs.stop_all()


def job_of(dashboard):
    """The renter's job as the API gives it, once it has reported a few steps and its plan."""
    url, tok = dashboard["url"], dashboard["tokens"]["renter"]

    def ready():
        status, jobs = get_json(url + "api/jobs", tok)
        assert status == 200, jobs
        if not jobs["jobs"]:
            return None
        status, j = get_json(url + f"api/jobs/{jobs['jobs'][0]['id']}", tok)
        return j if status == 200 and j["plan"] and len(j["loss"]) >= 3 else None
    return wait_for("the renter's job to report its plan and a few steps", ready)


def test_http_address_errors_are_one_clear_line(run_arceus, tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        for http, rc, says in ((taken, 1, "cannot serve there: Address already in use"),
                               ("nonsense", 2, "--http expects HOST:PORT"),
                               ("127.0.0.1:99999", 2, "a port 0..65535"),
                               ("[::1:80", 2, "--http [::1:80")):
            p = run_arceus("market", "--listen", "127.0.0.1:0", "--db", tmp_path / "m.db", "--http", http, timeout=60)
            assert p.returncode == rc, (http, p.stderr)
            assert says in p.stderr and p.stderr.count("\n") == 1, (http, p.stderr)
            assert "listening" not in p.stdout  # it never said it was ready


# ---- headless Chromium -------------------------------------------------------------------


def chromium(*args, timeout=90):
    exe = shutil.which("chromium")
    if not exe:
        pytest.fail("Debian's chromium is not installed (scripts/install-deps.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="arceus-chromium-") as profile:
        # root in a container: no sandbox; a throwaway profile; no GPU
        p = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--hide-scrollbars",
                            "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


class Elements(HTMLParser):
    """Start tags of a DOM dump, with their attributes, and each element's text by id."""

    def __init__(self, html):
        super().__init__()
        self.tags, self.text, self._open = [], {}, []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag not in ("br", "img", "input", "link", "meta"):
            self._open.append(a.get("id"))

    def handle_endtag(self, tag):
        if self._open and tag not in ("br", "img", "input", "link", "meta"):
            self._open.pop()

    def handle_data(self, data):
        for i in self._open:
            if i:
                self.text[i] = self.text.get(i, "") + data

    def find(self, tag=None, **attrs):
        def match(a):
            for k, v in attrs.items():
                k = k.rstrip("_").replace("_", "-")
                if k == "class":
                    if v not in (a.get("class") or "").split():
                        return False
                elif a.get(k) != v:
                    return False
            return True
        return [a for t, a in self.tags if (tag is None or t == tag) and match(a)]


def loss_points(dom):
    charts = Elements(dom).find("svg", id="loss-chart")
    assert len(charts) == 1, dom[-3000:]
    return int(charts[0]["data-points"])


def test_job_page_in_chromium_grows_its_curve_shows_the_plan_and_the_ledger_the_debit(dashboard):
    url, tok = dashboard["url"], dashboard["tokens"]["renter"]
    job = job_of(dashboard)
    jid = job["job"]["id"]
    page = f"{url}#/job/{jid}?token={tok}"

    first = Elements(chromium("--dump-dom", page))
    n1 = int(first.find("svg", id="loss-chart")[0]["data-points"])
    assert n1 >= 3
    devices = first.find("div", class_="device")
    assert len(devices) == 3, devices
    # the three leased providers, each once, and their addresses on the page
    _, provs = get_json(url + "api/providers", tok)
    assert sorted(int(d["data-provider"]) for d in devices) == sorted(p["id"] for p in provs["providers"])
    for p in provs["providers"]:
        assert p["address"] in first.text["plan"]
    # the plan's links, one row each, with the compression on each
    assert len(first.find("tr", class_="link-row")) == 3, first.text["plan"][-2000:]
    assert "MB/s down" in first.text["plan"] and "none" in first.text["plan"]
    assert "renter" in first.text["who"]

    # more steps later: more points
    wait_for("training to go on", lambda: get_json(url + f"api/jobs/{jid}", tok)[1]["job"]["step"] >= n1 + 30)
    second = chromium("--dump-dom", page)
    n2 = loss_points(second)
    assert n2 > n1, (n1, n2)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard-job.png"
    shot.unlink(missing_ok=True)
    chromium(f"--screenshot={shot}", "--window-size=1400,1500", page)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000

    # the ledger page shows what the renter paid: the sum of its usage rows in the database
    ledger = Elements(chromium("--dump-dom", f"{url}#/ledger?token={tok}"))
    assert ledger.text["ledger-account"] == "renter"
    paid_text = re.search(r"(-\d+\.\d{6})", ledger.text["ledger-paid"]).group(1)
    con = sqlite3.connect(str(dashboard["db"]))
    try:
        rid, = con.execute("SELECT id FROM accounts WHERE name = 'renter'").fetchone()
        at_most, = con.execute("SELECT -SUM(amount) FROM ledger WHERE account_id = ? AND reason = 'usage'",
                               (rid,)).fetchone()
    finally:
        con.close()
    paid = -int(paid_text.replace(".", ""))
    assert 0 < paid <= at_most  # the page was read before the database, while the renter kept paying
    rows = ledger.find("tr", class_="ledger-row")
    debits = [r for r in rows if r["data-reason"] == "usage"]
    assert debits and all(r["data-amount"].startswith("-") for r in debits)


def test_json_api_refuses_without_a_token_and_to_another_account(dashboard):
    url, toks = dashboard["url"], dashboard["tokens"]
    job = job_of(dashboard)
    jid = job["job"]["id"]

    # public: the overview, and the page's files (no other origin anywhere)
    status, o = get_json(url + "api/overview")
    assert status == 200
    assert o["providers_online"] == 3 and o["providers"] == 3
    assert o["gflops_online"] > 0 and o["jobs_running"] == 1
    assert re.fullmatch(r"\d+\.\d{6}", o["credits_moved"])
    status, headers, body = get(url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for path in ("", "app.js", "style.css", "favicon.svg"):
        status, _, text = get(url + path)
        assert status == 200, path
        text = text.decode()
        # the only absolute URL is the SVG namespace: nothing is fetched from elsewhere
        assert set(re.findall(r"https?://[^\s\"'`)]+", text)) <= {"http://www.w3.org/2000/svg"}, path
    assert get(url + "nothing.js")[0] == 404

    # account endpoints: 401 without a token, with a malformed one, with an unknown one
    for path in ("api/me", "api/jobs", f"api/jobs/{jid}", "api/ledger", "api/providers"):
        for token in (None, "abc", "0" * 64):
            status, body = get_json(url + path, token)
            assert status == 401, (path, token, body)
            assert body["error"]
    # another account's job and ledger: 403; no such job: 404
    status, body = get_json(url + f"api/jobs/{jid}", toks["ada"])
    assert status == 403 and "another account" in body["error"]
    status, body = get_json(url + "api/ledger?account=renter", toks["ada"])
    assert status == 403
    assert get_json(url + "api/jobs/999999", toks["renter"])[0] == 404
    assert get_json(url + "api/jobs/x1", toks["renter"])[0] == 404
    assert get_json(url + f"api/jobs/{jid}?since=-1", toks["renter"])[0] == 400
    assert get(url + "api/ledger", toks["renter"], method="POST")[0] == 405

    # each account sees its own: a provider's account has no jobs, a ledger of earnings only, and
    # the earnings of its own provider only
    earning = 0
    for name in ("ada", "grace", "linus"):
        assert get_json(url + "api/jobs", toks[name]) == (200, {"jobs": []})
        status, me = get_json(url + "api/me", toks[name])
        assert status == 200 and me["account"] == name
        status, lg = get_json(url + "api/ledger", toks[name])
        assert status == 200 and lg["account"] == name
        # what its providers earned: held in escrow (pending), then released to it
        assert not [r for r in lg["rows"] if r["reason"] == "usage"]
        released = [r for r in lg["rows"] if r["reason"] == "release"]
        assert all(r["job"] == jid and not r["amount"].startswith("-") for r in released)
        # (training goes on between the two calls, and escrow only grows until the job ends:
        # /api/me, read first, shows at most what the ledger shows; both equal at the end, below)
        assert re.fullmatch(r"\d+\.\d{6}", me["pending"]) and float(me["pending"]) <= float(lg["pending"])
        earning += bool(released) or lg["pending"] != "0.000000"
        status, provs = get_json(url + "api/providers", toks[name])
        mine = [p for p in provs["providers"] if p["mine"]]
        assert len(mine) == 1 and mine[0]["account"] == name and mine[0]["work_paid"] > 0
        assert all("earned" not in p and "earnings" not in p for p in provs["providers"] if not p["mine"])
    # (stages 1 and 2 are so small that a step of theirs may cost under half a micro-credit: paid 0,
    # no ledger row, depending on which provider the market put there)
    assert earning >= 1

    # the renter's job as training goes on: losses by step, validation, the plan, the timeline
    tok = toks["renter"]
    wait_for("the first evaluation", lambda: get_json(url + f"api/jobs/{jid}", tok)[1]["val_loss"])
    status, j = get_json(url + f"api/jobs/{jid}", tok)
    assert status == 200
    steps = [p[0] for p in j["loss"]]
    assert steps == list(range(1, len(steps) + 1))  # completed steps, none missing
    assert all(p[1] > 0 for p in j["loss"])
    assert j["val_loss"][0][0] % 50 == 0
    live = j["live"]
    assert live["total_steps"] == STEPS and live["unit"] == "samples" and live["items_per_s"] > 0
    plan = j["plan"]
    assert [(s["first_unit"], s["last_unit"]) for s in plan["stages"]] == [(0, 1), (1, 2), (2, 3)]
    assert plan["micro_batches"] == 4 and plan["schedule"] == "1f1b"
    assert [len(s["members"]) for s in plan["stages"]] == [1, 1, 1]
    # its links as the driver measured them (loopback: fast, never compressed by auto)
    links = plan["links"]
    assert [l["stage"] for l in links] == [0, 1, 2] and links[0]["from"] == "driver"
    assert [l["to"] for l in links] == [s["members"][0]["device"] for s in plan["stages"]]
    assert all(l["down_mb_s"] > 1 and l["up_mb_s"] > 1 and 0 < l["rtt_ms"] < 1000 for l in links), links
    assert all(l["compress"] == "none" and l["predicted_mb"][0] > 0 for l in links), links
    assert all(len(t["busy"]) == 3 and len(t["idle"]) == 3 for t in j["timeline"])
    # since=N: only the steps after N
    n = len(j["loss"])
    status, later = get_json(url + f"api/jobs/{jid}?since={n}", tok)
    assert status == 200 and all(p[0] > n for p in later["loss"])

    # at the end: done, the last loss at the last step, the renter debited what the job spent
    dashboard["train"].wait(timeout=300)
    status, j = get_json(url + f"api/jobs/{jid}", tok)
    assert j["job"]["status"] == "done" and j["job"]["step"] == STEPS
    assert j["loss"][-1][0] == STEPS and j["live"]["step"] == STEPS
    assert j["val_loss"][-1][0] == STEPS
    status, lg = get_json(url + "api/ledger?limit=5", tok)
    con = sqlite3.connect(str(dashboard["db"]))
    try:
        ids = [r for r, in con.execute("SELECT l.id FROM ledger l JOIN accounts a ON a.id = l.account_id"
                                       " WHERE a.name = 'renter' ORDER BY l.id")]
    finally:
        con.close()
    assert lg["rows_total"] == len(ids) > STEPS  # (a stage whose step costs under half a micro-credit pays 0)
    assert [r["id"] for r in lg["rows"]] == ids[::-1][:5]  # the newest first
    assert lg["totals"]["paid"] == "-" + j["job"]["spent"]
    assert lg["totals"]["minted"] == "100.000000"
    # and each provider earned what its ledger says, the three together what the renter paid
    earned = 0
    for name in ("ada", "grace", "linus"):
        _, provs = get_json(url + "api/providers", toks[name])
        _, lg = get_json(url + "api/ledger", toks[name])
        mine, = [p for p in provs["providers"] if p["mine"]]
        assert mine["earned"] == lg["totals"]["earned"] == lg["balance"]
        assert lg["pending"] == "0.000000"  # released at the job's end
        assert get_json(url + "api/me", toks[name])[1]["pending"] == "0.000000"
        assert mine["earnings"][-1][1] == pytest.approx(float(mine["earned"]))
        earned += int(mine["earned"].replace(".", ""))
    assert earned == int(j["job"]["spent"].replace(".", ""))
