/* The Arceus market dashboard: routes (#/, #/jobs, #/job/ID, #/providers,
 * #/ledger), each drawn from the market's JSON API and refreshed every
 * second. Charts are SVG drawn here. Text from the API is always inserted
 * as text (textContent), never as HTML.
 *
 * The account token: pasted into the bar at the top, or given once in the
 * address as #token=T (or #/job/3?token=T); it is kept in sessionStorage
 * (this tab only), taken out of the address, and sent as
 * "Authorization: Bearer T". */
"use strict";

const TOKEN_KEY = "arceus-token";
const REFRESH_MS = 1000;
const STAGE_COLORS = ["#4f46e5", "#0e9f6e", "#e8590c", "#0b7dc1", "#c026d3", "#ca8a04", "#dc2626", "#0d9488"];
const SVG_NS = "http://www.w3.org/2000/svg";

/* ---- small DOM helpers ---- */

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

/* ---- formatting ---- */

function fmtInt(n) { return Math.round(n).toLocaleString("en-US"); }

function fmtNum(x, digits) {
  if (!isFinite(x)) return "–";
  return x.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/* credits arrive as exact text ("12.345678"): shown as they are */
function fmtCredits(text) { return text + " cr"; }

function fmtDuration(s) {
  if (!isFinite(s) || s < 0) return "–";
  if (s < 10) return fmtNum(s, 1) + " s";
  s = Math.round(s);
  if (s < 60) return s + " s";
  const m = Math.floor(s / 60), r = s % 60;
  if (m < 60) return m + " min " + String(r).padStart(2, "0") + " s";
  const h = Math.floor(m / 60);
  return h + " h " + String(m % 60).padStart(2, "0") + " min";
}

function fmtTime(unix) {
  const d = new Date(unix * 1000);
  return d.toLocaleString("en-GB", { hour12: false, year: "numeric", month: "short", day: "2-digit",
                                     hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function fmtAgo(unix, now) {
  const s = Math.max(0, Math.round(now - unix));
  return s < 90 ? s + " s ago" : fmtDuration(s) + " ago";
}

function fmtBytes(b) {
  if (b >= 2 ** 30) return fmtNum(b / 2 ** 30, 1) + " GiB";
  return fmtNum(b / 2 ** 20, 0) + " MiB";
}

function badge(status) { return el("span", { class: "badge " + status }, status); }

/* ---- the token and the API ---- */

const session = { token: sessionStorage.getItem(TOKEN_KEY) || "", me: null };

/* #token=T or #/route?token=T: keep T in sessionStorage, drop it from the address */
function takeTokenFromAddress() {
  const hash = location.hash;
  const m = hash.match(/[#?&]token=([0-9a-fA-F]{64})/);
  if (!m) return;
  setToken(m[1]);
  let rest = hash.replace(/[?&]?token=[0-9a-fA-F]{64}/, "");
  if (rest === "#" || rest === "") rest = "#/";
  history.replaceState(null, "", location.pathname + location.search + rest);
}

function setToken(t) {
  session.token = t;
  session.me = null;
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path) {
  const headers = {};
  if (session.token) headers["Authorization"] = "Bearer " + session.token;
  const r = await fetch(path, { headers, cache: "no-store" });
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) throw new ApiError(r.status, (body && body.error) || r.statusText);
  return body;
}

/* ---- charts ---- */

/* Round tick values covering [lo, hi], about n of them. */
function ticks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(f => f * mag).find(s => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function tickText(v, span) {
  const abs = Math.abs(v);
  if (abs >= 1e6) return fmtNum(v / 1e6, 1) + "M";
  if (abs >= 1e4) return fmtNum(v / 1e3, 0) + "k";
  const digits = span >= 20 ? 0 : span >= 2 ? 1 : span >= 0.2 ? 2 : 3;
  return fmtNum(v, digits);
}

/* A line chart: series [{name, color, points: [[x, y]...], dots}], axes with
 * ticks and labels. Returns the <svg>; data-points is the number of points
 * of the first series (the end-to-end test reads it). */
function lineChart(opts) {
  /* drawn at the width it is shown at, so that text keeps its size */
  const W = opts.width || Math.max(480, Math.min(1240, main.clientWidth - 44)), H = opts.height || 320;
  const m = { l: 58, r: 18, t: 16, b: 42 };
  const all = opts.series.flatMap(s => s.points);
  const s = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", id: opts.id,
                         "aria-label": opts.label || "", "data-points": opts.series[0].points.length });
  if (all.length === 0) {
    s.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, opts.empty || "no data yet"));
    return s;
  }
  let x0 = opts.xMin !== undefined ? opts.xMin : Math.min(...all.map(p => p[0]));
  let x1 = opts.xMax !== undefined ? Math.max(opts.xMax, ...all.map(p => p[0])) : Math.max(...all.map(p => p[0]));
  let y0 = Math.min(...all.map(p => p[1])), y1 = Math.max(...all.map(p => p[1]));
  if (opts.yZero) y0 = Math.min(0, y0);
  if (x1 <= x0) x1 = x0 + 1;
  const pad = (y1 - y0) * 0.06 || Math.abs(y1) * 0.1 || 1;
  y0 = opts.yZero ? y0 : y0 - pad;
  y1 = y1 + pad;
  const X = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
  const Y = y => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
  for (const t of ticks(y0, y1, 5)) {
    if (t < y0 || t > y1) continue;
    s.append(svg("line", { class: "gridline", x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }));
    s.append(svg("text", { x: m.l - 8, y: Y(t) + 4, "text-anchor": "end" }, tickText(t, y1 - y0)));
  }
  for (const t of ticks(x0, x1, 7)) {
    if (t < x0 || t > x1) continue;
    s.append(svg("line", { class: "axis", x1: X(t), x2: X(t), y1: H - m.b, y2: H - m.b + 5 }));
    s.append(svg("text", { x: X(t), y: H - m.b + 19, "text-anchor": "middle" },
                 opts.xFormat ? opts.xFormat(t) : tickText(t, x1 - x0)));
  }
  s.append(svg("line", { class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
  s.append(svg("line", { class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }));
  s.append(svg("text", { x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle" }, opts.xLabel || ""));
  s.append(svg("text", { x: 14, y: (m.t + H - m.b) / 2, "text-anchor": "middle",
                         transform: `rotate(-90 14 ${(m.t + H - m.b) / 2})` }, opts.yLabel || ""));
  for (const ser of opts.series) {
    if (ser.points.length === 0) continue;
    /* at most ~2 points per pixel column: a long run stays cheap to draw */
    const stride = Math.max(1, Math.floor(ser.points.length / (2 * (W - m.l - m.r))));
    const pts = ser.points.filter((p, i) => i % stride === 0 || i === ser.points.length - 1);
    const d = pts.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join("");
    s.append(svg("path", { d, fill: "none", stroke: ser.color, "stroke-width": ser.width || 1.8,
                           "stroke-linejoin": "round", class: "series", "data-name": ser.name }));
    if (ser.dots) {
      for (const p of pts) s.append(svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3.5, fill: "#fff",
                                                    stroke: ser.color, "stroke-width": 2 }));
    }
  }
  return s;
}

/* ---- the page frame ---- */

const main = document.getElementById("main");
const statusLine = document.getElementById("status");
let timer = null;
let current = null; /* the view being shown: {name, arg, state} */

function setStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "err" : "";
}

function route() {
  const h = location.hash.replace(/^#/, "") || "/";
  const parts = h.split("?")[0].split("/").filter(Boolean);
  if (parts.length === 0) return { name: "overview" };
  if (parts[0] === "job" && parts[1]) return { name: "job", arg: parts[1] };
  if (["jobs", "providers", "ledger"].includes(parts[0])) return { name: parts[0] };
  return { name: "overview" };
}

async function renderAccount() {
  const box = document.getElementById("account");
  box.replaceChildren();
  if (session.token && !session.me) {
    try { session.me = await api("/api/me"); }
    catch (e) {
      if (e.status === 401) { setToken(""); setStatus("that token was refused: " + e.message, true); }
    }
  }
  if (session.me) {
    box.append(el("span", { class: "who", id: "who" }, session.me.account),
               el("span", { class: "bal", title: "spendable; " + session.me.pending + " cr pending in escrow" },
                  fmtCredits(session.me.balance)),
               el("button", { onclick: () => { setToken(""); show(); } }, "Sign out"));
  } else {
    const input = el("input", { type: "password", placeholder: "paste your account token", "aria-label": "account token" });
    const go = () => { if (input.value.trim()) { setToken(input.value.trim()); show(); } };
    input.addEventListener("keydown", e => { if (e.key === "Enter") go(); });
    box.append(input, el("button", { onclick: go }, "Sign in"));
  }
}

function markNav(name) {
  for (const a of document.querySelectorAll("#nav a")) {
    const v = a.dataset.view;
    a.classList.toggle("active", v === name || (name === "job" && v === "jobs"));
  }
}

function needToken(title) {
  return el("div", { class: "card signin" },
    el("h1", {}, title),
    el("p", {}, "This page belongs to an account. Paste its token (arceus market add-account printed it) " +
                "in the bar at the top; it stays in this tab only."));
}

/* Show the current route now, then refresh it every REFRESH_MS. */
async function show() {
  clearTimeout(timer);
  const r = route();
  markNav(r.name);
  if (!current || current.name !== r.name || current.arg !== r.arg) {
    current = { name: r.name, arg: r.arg, state: {} };
    main.replaceChildren();
  }
  await renderAccount();
  const view = current;
  try {
    await VIEWS[view.name](view);
    if (view === current) setStatus("updated " + new Date().toLocaleTimeString("en-GB", { hour12: false }));
  } catch (e) {
    if (view === current) {
      if (e.status === 401) {
        main.replaceChildren(needToken("Sign in"));
      } else if (e.status === 403 || e.status === 404) {
        main.replaceChildren(el("div", { class: "card signin" }, el("h1", {}, e.status === 403 ? "Not yours" : "Not found"),
                                el("p", { id: "refusal" }, e.message)));
      }
      setStatus(e.message, true);
    }
  }
  if (view === current) timer = setTimeout(show, REFRESH_MS);
}

function stat(label, value, unit, note, id) {
  return el("div", { class: "card stat", id },
    el("div", { class: "label" }, label),
    el("div", { class: "value" }, value, unit ? el("small", {}, unit) : null),
    note ? el("div", { class: "note" }, note) : null);
}

/* ---- views ---- */

const VIEWS = {
  async overview() {
    const o = await api("/api/overview");
    const parts = [
      el("h1", {}, "Overview"),
      el("p", { class: "sub" }, "The market right now: who rents out compute, what trains on it, and the credits that moved."),
      el("div", { class: "grid stats" },
        stat("Providers online", fmtInt(o.providers_online), "of " + fmtInt(o.providers), "silent for " + o.offline_after_s + " s: offline", "providers-online"),
        stat("Combined speed", fmtNum(o.gflops_online, 1), "GFLOP/s", "measured sgemm, online providers", "gflops"),
        stat("Jobs running", fmtInt(o.jobs_running), "of " + fmtInt(o.jobs), "jobs ever leased", "jobs-running"),
        stat("Credits moved", o.credits_moved, "cr", fmtInt(o.work_paid) + " stage-steps paid to providers", "credits-moved")),
    ];
    if (session.me) {
      const jobs = (await api("/api/jobs")).jobs.slice(0, 5);
      parts.push(el("div", { class: "card" }, el("h2", {}, "Your latest jobs"), jobsTable(jobs)));
    } else {
      parts.push(el("div", { class: "card" }, el("h2", {}, "Your account"),
        el("p", { class: "sub", style: "margin:0" }, "Sign in with your account token (top right) to follow your jobs' training, your providers' earnings and your ledger.")));
    }
    main.replaceChildren(...parts);
  },

  async jobs() {
    if (!session.token) throw new ApiError(401, "sign in to see your jobs");
    const jobs = (await api("/api/jobs")).jobs;
    main.replaceChildren(el("h1", {}, "Jobs"), el("p", { class: "sub" }, "Your training jobs, newest first."),
                         el("div", { class: "card" }, jobsTable(jobs)));
  },

  async job(view) {
    if (!session.token) throw new ApiError(401, "sign in to see this job");
    const st = view.state;
    /* the training losses arrive once; later polls ask only for new ones */
    const since = st.loss ? (st.loss.length ? st.loss[st.loss.length - 1][0] : 0) : 0;
    const j = await api(`/api/jobs/${encodeURIComponent(view.arg)}` + (since ? `?since=${since}` : ""));
    st.loss = (st.loss || []).concat(j.loss);
    if (!st.providers || !st.providersAt || Date.now() - st.providersAt > 10000) {
      st.providers = new Map((await api("/api/providers")).providers.map(p => [p.id, p]));
      st.providersAt = Date.now();
    }
    if (view !== current) return;
    drawJob(j, st);
  },

  async providers() {
    if (!session.token) throw new ApiError(401, "sign in to see the providers");
    const [ps, o] = [(await api("/api/providers")).providers, await api("/api/overview")];
    const now = o.time;
    const mine = ps.filter(p => p.mine);
    const rows = ps.map(p => el("tr", { class: "provider-row" },
      el("td", { title: p.online && !p.available ? "not leased now: " + p.unavailable_why : "" },
        el("span", { class: "dot" + (p.online ? (p.available ? " on" : " away") : "") }),
        !p.online ? "offline" : p.available ? "online" : "unavailable: " + p.unavailable_why),
      el("td", { class: "num" }, p.id),
      el("td", {}, p.account, p.mine ? el("span", { class: "badge running", style: "margin-left:6px" }, "yours") : null),
      el("td", { class: "mono" }, p.address),
      el("td", {}, el("span", { class: "badge edge " + (p.reach || "unchecked"), title: {
        direct: "the market dials its worker", relayed: "reached through the market's relay only (behind NAT)",
        unreachable: "the market cannot reach its worker: not leased", unchecked: "not checked yet" }[p.reach] || "" },
        p.reach || "unchecked")),
      el("td", { class: "num", title: "claimed " + fmtNum(p.gflops, 1) + " GFLOP/s" }, fmtNum(p.speed_gflops, 1)),
      el("td", { class: "num" }, fmtBytes(p.mem_bytes)),
      el("td", { class: "num" }, p.cores),
      el("td", { class: "num" }, p.price_per_tflop),
      el("td", {}, el("div", { class: "rel" }, el("div", { class: "bar" }, el("span", { style: `width:${(p.reliability * 100).toFixed(0)}%` })), fmtNum(p.reliability, 2))),
      el("td", {}, fmtAgo(p.last_heartbeat, now)),
      el("td", { class: "num" }, p.mine ? fmtCredits(p.earned) : "–")));
    const parts = [el("h1", {}, "Providers"),
      el("p", { class: "sub" }, "Machines rented out through this market, at the speed renters observed (their claim until then). Earnings are shown for your own providers only: held in escrow, then yours to spend.")];
    if (mine.length) {
      const series = mine.map((p, i) => ({ name: "provider " + p.id, color: STAGE_COLORS[i % STAGE_COLORS.length],
                                           points: p.earnings }));
      const t0 = Math.min(...mine.flatMap(p => p.earnings.map(e => e[0])), now);
      parts.push(el("div", { class: "card" }, el("h2", {}, "Your earnings over time"),
        el("div", { class: "legend-row" }, series.map(s => el("span", {}, el("i", { style: `background:${s.color}` }), s.name))),
        lineChart({ id: "earnings-chart", series, xLabel: "time (UTC)", yLabel: "credits earned", yZero: true,
                    xFormat: t => new Date(t * 1000).toISOString().slice(11, 19), empty: "nothing earned yet", xMin: t0 })));
    }
    parts.push(el("div", { class: "card" }, el("table", {},
      el("thead", {}, el("tr", {}, ["status", "id", "account", "worker", "reach", "GFLOP/s observed", "memory", "cores", "cr/TFLOP", "reliability", "last seen", "earned"]
        .map((h, i) => el("th", { class: [1, 5, 6, 7, 8, 11].includes(i) ? "num" : "" }, h)))),
      el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 12, class: "empty" }, "no providers registered"))))));
    main.replaceChildren(...parts);
  },

  async ledger() {
    if (!session.token) throw new ApiError(401, "sign in to see your ledger");
    const l = await api("/api/ledger?limit=200");
    const rows = l.rows.map(r => el("tr", { class: "ledger-row", "data-reason": r.reason, "data-amount": r.amount },
      el("td", { class: "num" }, r.id),
      el("td", {}, fmtTime(r.time)),
      el("td", {}, r.reason),
      el("td", { class: "num" }, r.job > 0 ? el("a", { href: `#/job/${r.job}` }, r.job) : "–"),
      el("td", { class: "num" }, r.step >= 0 ? r.step : "–"),
      el("td", { class: "num " + (r.amount.startsWith("-") ? "neg" : "pos") }, (r.amount.startsWith("-") ? "" : "+") + r.amount)));
    main.replaceChildren(
      el("h1", {}, "Ledger of ", el("span", { id: "ledger-account" }, l.account)),
      el("p", { class: "sub" }, "Every credit that moved in or out of this account: each transfer is two rows, one per side."),
      el("div", { class: "grid stats" },
        stat("Balance", l.balance, "cr", "yours to spend", "ledger-balance"),
        stat("Pending", l.pending, "cr", "earned, held in escrow until audits verify it or its job settles", "ledger-pending"),
        stat("Paid for training", l.totals.paid, "cr", "usage debited to your jobs", "ledger-paid"),
        stat("Earned by your providers", l.totals.earned, "cr", "released from escrow", "ledger-earned"),
        stat("Minted to you", l.totals.minted, "cr", l.totals.reversed !== "0.000000" ? "reversals " + l.totals.reversed + " cr" : null)),
      el("div", { class: "card" },
        el("h2", {}, `Latest ${l.rows.length} of ${fmtInt(l.rows_total)} rows`),
        el("table", {}, el("thead", {}, el("tr", {}, ["row", "time", "reason", "job", "step", "credits"]
            .map((h, i) => el("th", { class: [0, 3, 4, 5].includes(i) ? "num" : "" }, h)))),
          el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 6, class: "empty" }, "no rows yet"))))));
  },
};

function jobsTable(jobs) {
  if (!jobs.length) return el("div", { class: "empty" }, "no jobs yet");
  return el("table", {},
    el("thead", {}, el("tr", {}, ["job", "status", "steps", "spent", "created", "what"].map((h, i) =>
      el("th", { class: [0, 2, 3].includes(i) ? "num" : "" }, h)))),
    el("tbody", {}, jobs.map(j => el("tr", { class: "job-row" },
      el("td", { class: "num" }, el("a", { href: `#/job/${j.id}` }, "#" + j.id)),
      el("td", {}, badge(j.status)),
      el("td", { class: "num" }, fmtInt(j.step)),
      el("td", { class: "num" }, fmtCredits(j.spent)),
      el("td", {}, fmtTime(j.created)),
      el("td", {}, j.spec)))));
}

/* ---- the job page ---- */

function drawJob(j, st) {
  const job = j.job, live = j.live, plan = j.plan;
  const total = live ? live.total_steps : 0;
  const done = job.step;
  const pct = total > 0 ? Math.min(100, 100 * done / total) : 0;
  const lastLoss = st.loss.length ? st.loss[st.loss.length - 1][1] : NaN;
  const lastVal = j.val_loss.length ? j.val_loss[j.val_loss.length - 1][1] : NaN;
  const running = job.status === "running";

  const head = el("div", { class: "jobhead" },
    el("div", {}, el("h1", {}, `Job #${job.id} `, badge(job.status)),
      el("p", { class: "sub", style: "margin-bottom:0" }, job.spec)),
    el("dl", { class: "kv" }, el("dt", {}, "started"), el("dd", {}, fmtTime(job.created)),
      el("dt", {}, "spent"), el("dd", { id: "job-spent" }, fmtCredits(job.spent) +
        (job.max_credits !== "0.000000" ? " of " + fmtCredits(job.max_credits) : ""))));

  const progress = el("div", { class: "progress" },
    el("div", { class: "bar" }, el("span", { style: `width:${pct.toFixed(1)}%` })),
    el("div", { class: "legend" }, el("span", {}, `step ${fmtInt(done)}` + (total ? ` of ${fmtInt(total)}` : "")),
      el("span", {}, total ? fmtNum(pct, 1) + "%" : "")));

  const stats = el("div", { class: "grid stats" },
    stat("Step", fmtInt(done), total ? "/ " + fmtInt(total) : "", null, "job-step"),
    stat("Train loss", fmtNum(lastLoss, 4), "", isFinite(lastVal) ? "validation " + fmtNum(lastVal, 4) : "no evaluation yet", "job-loss"),
    stat(live && live.unit === "tokens" ? "Tokens/s" : "Samples/s", live ? fmtInt(live.items_per_s) : "–", "", live ? "recent, measured by the driver" : "waiting for the first report", "job-rate"),
    stat(running ? "ETA" : "Finished", running ? (live ? fmtDuration(live.eta_s) : "–") : job.status, "",
         live ? "training time so far " + fmtDuration(live.wall_s) : null, "job-eta"));

  const lossCard = el("div", { class: "card" }, el("h2", {}, "Loss"),
    el("div", { class: "legend-row" }, el("span", {}, el("i", { style: "background:var(--train)" }), "train"),
      el("span", {}, el("i", { style: "background:var(--val)" }), "validation")),
    lineChart({ id: "loss-chart", label: "loss curves", xLabel: "step", yLabel: "loss", xMin: 0, xMax: total || undefined,
                empty: "no steps reported yet",
                series: [{ name: "train", color: "var(--train)", points: st.loss },
                         { name: "validation", color: "var(--val)", points: j.val_loss, dots: true, width: 2.4 }] }));

  main.replaceChildren(head, progress, stats, lossCard, planCard(plan, st.providers), timelineCard(j.timeline, plan, total));
}

function stageColor(i) { return STAGE_COLORS[i % STAGE_COLORS.length]; }

/* The plan: the model's units as a strip coloured by stage, then the devices
 * along the pipeline, each with its layers (and heads and hidden units for a
 * member of a tensor-parallel group). */
function planCard(plan, providers) {
  const card = el("div", { class: "card", id: "plan" }, el("h2", {}, "Plan"));
  if (!plan) { card.append(el("div", { class: "empty" }, "the plan arrives with the driver's first report")); return card; }
  const units = plan.stages[plan.stages.length - 1].last_unit;
  card.append(el("div", { class: "units", title: "the model's layers, coloured by stage" },
    plan.stages.map((s, i) => el("span", { style: `flex:${s.last_unit - s.first_unit};background:${stageColor(i)}` },
      `stage ${i}: ${s.layers}`))));
  const flow = el("div", { class: "pipeline" });
  plan.stages.forEach((s, i) => {
    const lead = s.members[0];
    /* the edge into this stage: dialled directly, or through the market's relay */
    const edge = lead.edge || "direct";
    if (i) flow.append(el("div", { class: "arrow edge-" + edge, title: `stage ${i - 1} → stage ${i}: ${edge}` }, "→"));
    const p = providers && providers.get(lead.provider_id);
    flow.append(el("div", { class: "device", style: `--stage-color:${stageColor(i)}`, "data-stage": i, "data-provider": lead.provider_id },
      el("div", { class: "stage" }, `stage ${i}` + (s.members.length > 1 ? ` · group of ${s.members.length}` : "")),
      el("div", { class: "layers" }, s.layers),
      el("div", { class: "addr mono" }, lead.device,
        el("span", { class: "badge edge " + edge, style: "margin-left:6px", title: edge === "relayed" ?
          "reached through the market's relay: nobody can dial this provider directly" : "dialled directly" }, edge)),
      el("div", { class: "meta" },
        lead.provider_id ? `provider ${lead.provider_id}` + (p ? ` (${p.account}, ${fmtNum(p.gflops, 1)} GFLOP/s)` : "") : "",
        el("br"), (s.last_unit - s.first_unit === 1 ? `unit ${s.first_unit}` : `units ${s.first_unit}–${s.last_unit - 1}`) +
          ` of ${units} · predicted ${fmtNum(s.predicted_ms, 2)} ms per micro-batch`),
      s.members.length > 1 ? s.members.map(m => el("div", { class: "member" },
        el("span", { class: "mono" }, m.device), m.share ? ": " + m.share : "")) : null));
  });
  card.append(flow, el("p", { class: "sub", style: "margin:12px 0 0" },
    `${plan.stages.length} stages, ${plan.micro_batches} micro-batches per step, schedule ${plan.schedule}; predicted bubble ${fmtNum(100 * plan.predicted_bubble, 1)}%`));
  if (plan.links && plan.links.length) card.append(linksTable(plan.links));
  return card;
}

/* The links along the pipeline: each one's bandwidth each way and round trip
 * as the driver measured them, the compression on it, and the megabytes per
 * step it carries each way, predicted and moved (as sent; as float32). */
function linksTable(links) {
  const mb = x => fmtNum(x, 3);
  const measured = l => l.down_mb_s > 0;
  const rows = links.map(l => el("tr", { class: "link-row", "data-stage": l.stage },
    el("td", { class: "mono" }, `${l.from} → ${l.to}`),
    el("td", { class: "num" }, measured(l) ? fmtNum(l.down_mb_s, 2) : "–"),
    el("td", { class: "num" }, measured(l) ? fmtNum(l.up_mb_s, 2) : "–"),
    el("td", { class: "num" }, measured(l) ? fmtNum(l.rtt_ms, 1) : "–"),
    el("td", {}, l.compress),
    el("td", { class: "num" }, `${mb(l.predicted_mb[0])} / ${mb(l.predicted_mb[1])}`),
    el("td", { class: "num" }, l.moved_mb[0] + l.moved_mb[1] > 0
      ? `${mb(l.moved_mb[0])} / ${mb(l.moved_mb[1])}` : "–"),
    el("td", { class: "num" }, l.moved_mb[0] + l.moved_mb[1] > 0
      ? `${mb(l.moved_raw_mb[0])} / ${mb(l.moved_raw_mb[1])}` : "–")));
  return el("table", { class: "links", style: "margin-top:12px" },
    el("thead", {}, el("tr", {}, ["link", "MB/s down", "MB/s up", "RTT ms", "compression", "predicted MB/step down / up",
      "moved MB/step down / up", "as float32"].map((h, i) => el("th", { class: i && i !== 4 ? "num" : "" }, h)))),
    el("tbody", {}, rows));
}

/* The pipeline over time, per stage: between two samples of the driver's
 * report, the share of the time the stage computed (busy, coloured) and
 * waited (idle, grey); at the right, the stage's measured bubble since the
 * start next to the theory (S-1)/(M+S-1). */
function timelineCard(timeline, plan, total) {
  const card = el("div", { class: "card", id: "timeline" }, el("h2", {}, "Pipeline timeline"));
  if (!timeline || timeline.length < 2) {
    card.append(el("div", { class: "empty" }, "busy and idle time appear after the first seconds of training"));
    return card;
  }
  const S = timeline[timeline.length - 1].busy.length;
  const last = timeline[timeline.length - 1];
  const theory = plan ? plan.predicted_bubble : NaN;
  const W = Math.max(640, Math.min(1240, main.clientWidth - 44)), rowH = 34, gap = 14, m = { l: 92, r: 210, t: 8, b: 38 };
  const H = m.t + S * (rowH + gap) - gap + m.b;
  const x0 = 0, x1 = Math.max(total || 0, last.step);
  const X = x => m.l + (x - x0) / (x1 - x0 || 1) * (W - m.l - m.r);
  const s = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, id: "timeline-chart", "data-stages": S });
  let bubbleSum = 0;
  for (let k = 0; k < S; k++) {
    const y = m.t + k * (rowH + gap);
    s.append(svg("rect", { x: m.l, y, width: X(last.step) - m.l, height: rowH, fill: "var(--idle)", rx: 3 }));
    for (let i = 1; i < timeline.length; i++) {
      const a = timeline[i - 1], b = timeline[i];
      const dt = b.wall_s - a.wall_s;
      if (!(dt > 0) || b.step <= a.step || k >= a.busy.length) continue;
      const f = Math.max(0, Math.min(1, (b.busy[k] - a.busy[k]) / dt));
      const h = f * rowH;
      s.append(svg("rect", { x: X(a.step), y: y + rowH - h, width: Math.max(0.5, X(b.step) - X(a.step)), height: h,
                             fill: stageColor(k), opacity: 0.85 },
                   svg("title", {}, `steps ${a.step}–${b.step}: busy ${fmtNum(100 * f, 0)}%, idle ${fmtNum(100 * (1 - f), 0)}%`)));
    }
    const busyAll = last.wall_s > 0 ? last.busy[k] / last.wall_s : 0;
    const bubble = 1 - busyAll;
    bubbleSum += bubble;
    s.append(svg("text", { x: m.l - 10, y: y + rowH / 2 + 4, "text-anchor": "end", class: "title" }, `stage ${k}`));
    s.append(svg("text", { x: W - m.r + 12, y: y + rowH / 2 - 3, class: "title", "data-bubble": bubble.toFixed(4) },
                 `bubble ${fmtNum(100 * bubble, 1)}%`));
    s.append(svg("text", { x: W - m.r + 12, y: y + rowH / 2 + 13 },
                 `busy ${fmtDuration(last.busy[k])}, idle ${fmtDuration(last.idle[k])}`));
  }
  for (const t of ticks(x0, x1, 8)) {
    if (t > x1) continue;
    s.append(svg("text", { x: X(t), y: H - m.b + 18, "text-anchor": "middle" }, tickText(t, x1 - x0)));
  }
  s.append(svg("text", { x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle" }, "step (coloured: share of the time computing; grey: waiting)"));
  card.append(s, el("p", { class: "sub", style: "margin:10px 0 0", id: "bubble-summary" },
    `measured bubble ${fmtNum(100 * bubbleSum / S, 1)}% on average over ${S} stages` +
    (isFinite(theory) ? ` · theory (S-1)/(M+S-1) = ${fmtNum(100 * theory, 1)}%` : "") +
    ` · ${fmtDuration(last.wall_s)} of training steps measured`));
  return card;
}

/* ---- start ---- */

takeTokenFromAddress();
window.addEventListener("hashchange", () => { takeTokenFromAddress(); show(); });
show();
