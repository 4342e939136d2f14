// strata's dashboard: the job list, a job page following the job's watch
// stream (server-sent events), and a sweep page. Plain JavaScript, no
// library: charts are SVG drawn here.
"use strict";

const PHASES = [
  ["data", "#9ca3af"],
  ["forward", "#2563eb"],
  ["backward", "#7c3aed"],
  ["all_reduce", "#f59e0b"],
  ["optimizer", "#10b981"],
];
const STAGE_PARTS = [
  ["forward", "#2563eb"],
  ["backward", "#7c3aed"],
  ["tp_comm", "#f59e0b"],
  ["wait", "#fca5a5"],
];

const app = document.getElementById("app");

// ------------------------------------------------------------ helpers ---

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function el(tag, attrs, html) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (html !== undefined) e.innerHTML = html;
  return e;
}

function fmt(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(+x)) return "–";
  x = +x;
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e6 || a < 1e-3) return x.toExponential(2);
  return +x.toPrecision(digits) + "";
}

function count(x) {
  if (x === null || x === undefined) return "–";
  const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [v, u] of units) if (Math.abs(x) >= v) return (x / v).toFixed(x / v >= 100 ? 0 : 1) + u;
  return String(Math.round(x));
}

function duration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(r).padStart(2, "0")}s`;
  return `${r}s`;
}

function when(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleString();
}

function bytes(b) {
  return count(b) + "B";
}

function stateBadge(s, id) {
  return `<span class="state ${esc(s)}"${id ? ` id="${id}"` : ""}>${esc(s)}</span>`;
}

function progress(done, total) {
  const pct = total ? Math.min(100, (100 * done) / total) : 0;
  return `<span class="bar"><span style="width:${pct.toFixed(1)}%"></span></span>${done}/${total}`;
}

async function getJson(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${url}: ${r.status} ${await r.text()}`);
  return r.json();
}

function setConn(text) {
  document.getElementById("conn").textContent = text;
}

function table(headers, rows) {
  const head = headers
    .map((h) => `<th class="${h.startsWith("#") ? "num" : ""}">${esc(h.replace(/^#/, ""))}</th>`)
    .join("");
  const body = rows
    .map((r) => "<tr>" + r.map((c, i) =>
      `<td class="${headers[i].startsWith("#") ? "num" : ""}${c && c.wrap ? " wrap" : ""}">${c && c.html !== undefined ? c.html : esc(c)}</td>`,
    ).join("") + "</tr>")
    .join("");
  return `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
}

// ------------------------------------------------------------- charts ---

// Colours of a mixture's sources in the loss chart.
const SOURCE_COLORS = ["#d97706", "#0891b2", "#65a30d", "#c026d3", "#475569", "#e11d48"];

// A line chart in SVG. `series`: [{name, color, points: [[x, y]], dash,
// markers}]. Long series are thinned to keep each bucket's extremes.
function thin(points, max) {
  if (points.length <= max) return points;
  const out = [];
  const size = points.length / (max / 2);
  for (let i = 0; i < points.length; i += size) {
    const chunk = points.slice(Math.floor(i), Math.floor(i + size));
    if (!chunk.length) continue;
    let lo = chunk[0], hi = chunk[0];
    for (const p of chunk) {
      if (p[1] < lo[1]) lo = p;
      if (p[1] > hi[1]) hi = p;
    }
    if (lo[0] <= hi[0]) out.push(lo, hi); else out.push(hi, lo);
  }
  out.push(points[points.length - 1]);
  return out;
}

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || mag * 10;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function drawChart(box, spec) {
  const W = 520, H = 250, L = 58, R = 12, T = 10, B = 34;
  const all = spec.series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]) && (!spec.yLog || p[1] > 0));
  let svg;
  if (!all.length) {
    svg = `<svg viewBox="0 0 ${W} ${H}" data-points="0"><text x="${W / 2}" y="${H / 2}" text-anchor="middle" class="tick">no data yet</text></svg>`;
  } else {
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let ys = all.map((p) => (spec.yLog ? Math.log10(p[1]) : p[1]));
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; }
    const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => T + (1 - ((spec.yLog ? Math.log10(y) : y) - y0) / (y1 - y0)) * (H - T - B);
    const parts = [];
    for (const t of niceTicks(x0, x1, 6)) {
      parts.push(`<line class="grid" x1="${sx(t)}" x2="${sx(t)}" y1="${T}" y2="${H - B}"/>`);
      parts.push(`<text class="tick" x="${sx(t)}" y="${H - B + 14}" text-anchor="middle">${esc(count(t))}</text>`);
    }
    for (const t of niceTicks(y0, y1, 5)) {
      const v = spec.yLog ? Math.pow(10, t) : t;
      parts.push(`<line class="grid" x1="${L}" x2="${W - R}" y1="${sy(v)}" y2="${sy(v)}"/>`);
      parts.push(`<text class="tick" x="${L - 5}" y="${sy(v) + 4}" text-anchor="end">${esc(fmt(v, 3))}</text>`);
    }
    parts.push(`<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>`);
    parts.push(`<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`);
    parts.push(`<text class="tick" x="${(L + W - R) / 2}" y="${H - 4}" text-anchor="middle">${esc(spec.xLabel || "step")}</text>`);
    for (const s of spec.series) {
      const pts = thin(s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]) && (!spec.yLog || p[1] > 0)), 1200);
      if (!pts.length) continue;
      if (s.markers || pts.length === 1) {
        for (const p of pts) parts.push(`<circle cx="${sx(p[0]).toFixed(1)}" cy="${sy(p[1]).toFixed(1)}" r="2.6" fill="${s.color}"/>`);
      }
      if (pts.length > 1 && !s.markersOnly) {
        const d = pts.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
        parts.push(`<path d="${d}" fill="none" stroke="${s.color}" stroke-width="1.6"${s.dash ? ' stroke-dasharray="5 4"' : ""}/>`);
      }
    }
    svg = `<svg viewBox="0 0 ${W} ${H}" data-points="${spec.series[0].points.length}">${parts.join("")}</svg>`;
  }
  const legend = spec.series.length > 1
    ? `<div class="legend">${spec.series.map((s) => `<span><i style="background:${s.color}"></i>${esc(s.name)}</span>`).join("")}</div>`
    : "";
  box.innerHTML = `<h3>${esc(spec.title)}</h3>${svg}${legend}`;
  box.dataset.points = String(spec.series[0].points.length);
}

// ----------------------------------------------------------- overview ---

async function overview() {
  document.getElementById("where").textContent = "jobs";
  const draw = async () => {
    let o;
    try {
      o = await getJson("/api/overview");
      setConn(`updated ${new Date().toLocaleTimeString()}`);
    } catch (e) {
      setConn(`cannot reach the coordinator: ${e.message}`);
      return;
    }
    const rows = o.jobs.map((j) => [
      { html: `<a href="/jobs/${encodeURIComponent(j.id)}">${esc(j.id)}</a>` },
      j.name,
      { html: stateBadge(j.state) + (j.waiting ? ` <span class="muted">${esc(j.waiting)}</span>` : "") },
      j.layout.text,
      { html: progress(j.steps_done, j.steps_total) },
      fmt(j.last_loss),
      j.tokens_per_s === null || j.tokens_per_s === undefined ? "–" : count(j.tokens_per_s),
      j.finished_unix_ms && j.started_unix_ms
        ? `took ${duration((j.finished_unix_ms - j.started_unix_ms) / 1000)}`
        : j.eta_s === null || j.eta_s === undefined ? "–" : duration(j.eta_s),
      j.attempts.length,
      when(j.submitted_unix_ms),
    ]);
    let html = `<div class="facts"><span><b>launcher</b> ${esc(o.launcher)}</span>
      <span><b>slots</b> ${o.slots_leased} of ${o.slots} leased</span>
      <span><b>queue</b> ${o.queue_length}</span>
      <span><b>jobs</b> ${o.jobs.length}</span></div>`;
    html += `<h2>Jobs</h2>`;
    html += o.jobs.length
      ? table(["job", "name", "state", "layout tp·pp·dp", "progress", "#loss", "#tokens/s", "#ETA (or took)", "#attempts", "submitted"], rows)
      : `<p class="muted">No jobs yet: <code>strata submit RECIPE.toml</code>.</p>`;
    if (o.sweeps.length) {
      html += `<h2>Sweeps</h2>` + table(["sweep", "name", "state", "points ended", "submitted"], o.sweeps.map((s) => [
        { html: `<a href="/sweeps/${encodeURIComponent(s.id)}">${esc(s.id)}</a>` },
        s.name,
        { html: stateBadge(s.state) },
        { html: progress(s.points_ended, s.points) },
        when(s.submitted_unix_ms),
      ]));
    }
    app.innerHTML = html;
    app.dataset.jobs = String(o.jobs.length);
  };
  await draw();
  setInterval(draw, 2000);
}

// ---------------------------------------------------------------- job ---

function jobPage(id) {
  document.getElementById("where").innerHTML = `<a href="/">jobs</a> / ${esc(id)}`;
  app.innerHTML = `
    <h1><span id="job-name"></span> <span id="job-state-box"></span></h1>
    <div id="job-facts" class="facts"></div>
    <div id="job-note"></div>
    <div class="charts">
      <div class="chart" id="chart-loss"></div>
      <div class="chart" id="chart-lr"></div>
      <div class="chart" id="chart-tps"></div>
      <div class="chart" id="chart-phases"></div>
    </div>
    <h2>Last step by pipeline stage <span class="muted">(tensor rank 0 of replica 0 of each stage)</span></h2>
    <div id="stages" class="stages"></div>
    <h2>Ranks</h2><div id="ranks-summary"></div><div id="ranks"></div>
    <h2>Attempts</h2><div id="attempts"></div>
    <h2>Checkpoints</h2><div id="checkpoints"></div>
    <h2>Recipe</h2><pre id="recipe"></pre>`;
  const steps = [];
  let job = null;
  let pending = false;
  // The ranks' page shown, and its order.
  const rankPage = { offset: 0, order: "rank" };
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      drawJob(job, steps);
    });
  };
  // A long history comes thinned to about this many steps; every event
  // carries the last step sent as its id, so a reconnect resumes after it.
  const es = new EventSource(`/api/jobs/${encodeURIComponent(id)}/events?points=2000`);
  es.addEventListener("job", (e) => {
    job = Object.assign(job || {}, JSON.parse(e.data));
    redraw();
  });
  es.addEventListener("steps", (e) => {
    for (const s of JSON.parse(e.data)) {
      if (!steps.length || s.step > steps[steps.length - 1].step) steps.push(s);
    }
    redraw();
  });
  es.addEventListener("end", () => {
    es.close();
    setConn("the job has ended");
    details();
  });
  es.onopen = () => setConn("following the job");
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) setConn("stream closed");
    else setConn("reconnecting…");
  };
  const details = async () => {
    try {
      const d = await getJson(`/api/jobs/${encodeURIComponent(id)}`);
      job = Object.assign(job || {}, d);
      if (rankPage.offset || rankPage.order !== "rank") {
        d.ranks = await getJson(`/api/jobs/${encodeURIComponent(id)}/ranks?offset=${rankPage.offset}&order=${rankPage.order}`);
      }
      drawDetails(d, rankPage, details);
      redraw();
    } catch (e) {
      app.querySelector("#job-note").innerHTML = `<p class="error">${esc(e.message)}</p>`;
    }
  };
  details();
  const timer = setInterval(() => {
    if (job && ["succeeded", "failed", "cancelled"].includes(job.state) && es.readyState === EventSource.CLOSED) {
      clearInterval(timer);
      return;
    }
    details();
  }, 3000);
}

function drawJob(job, steps) {
  if (!job) return;
  document.getElementById("job-name").textContent = `${job.name} (${job.id})`;
  document.getElementById("job-state-box").innerHTML = stateBadge(job.state, "job-state");
  document.title = `${job.name}: ${job.state} · strata`;
  const last = steps[steps.length - 1];
  let eta = null;
  if (last && !["succeeded", "failed", "cancelled"].includes(job.state) && last.tokens_per_s > 0 && last.step > 0) {
    eta = ((job.steps_total - last.step) * (last.tokens / last.step)) / last.tokens_per_s;
  }
  const facts = [
    ["layout tp·pp·dp", `${job.layout.text} · ${job.microbatches} microbatches`],
    ["progress", progress(last ? last.step : job.steps_done, job.steps_total)],
    ["tokens", count(last ? last.tokens : job.tokens_done)],
    ["loss", fmt(last ? last.loss : job.last_loss)],
    ["held-out loss", fmt(lastEval(steps))],
    ["tokens/s", last ? count(last.tokens_per_s) : "–"],
    ["MFU", last && last.peak_flops && job.flops_per_token
      ? `${fmt((100 * job.flops_per_token * last.tokens_per_s) / last.peak_flops, 3)}%`
      : "–"],
    ["ETA", duration(eta)],
    ["attempts", job.attempts_total ?? (job.attempts || []).length],
  ];
  if (job.parent) facts.push(["branched from", `<a href="/jobs/${encodeURIComponent(job.parent.job)}">${esc(job.parent.job)}</a> at step ${job.parent.step}`]);
  document.getElementById("job-facts").innerHTML = facts.map(([k, v]) => `<span><b>${esc(k)}</b> ${v}</span>`).join("");
  let note = "";
  if (job.waiting) note += `<p class="warn">waiting: ${esc(job.waiting)}</p>`;
  if (job.failure_reason) note += `<p class="${job.state === "failed" ? "error" : "warn"}">${esc(job.failure_reason)}</p>`;
  for (const e of job.checkpoint_errors || []) note += `<p class="warn">checkpoint: ${esc(e)}</p>`;
  document.getElementById("job-note").innerHTML = note;

  const train = steps.map((s) => [s.step, s.loss]);
  const evals = steps.filter((s) => s.eval_loss !== null && s.eval_loss !== undefined).map((s) => [s.step, s.eval_loss]);
  const loss = [{ name: "training loss", color: "#2563eb", points: train }];
  if (evals.length) loss.push({ name: "held-out loss", color: "#dc2626", points: evals, markers: true });
  // A mixture: each source's training loss beside the step's.
  const names = [];
  for (const s of steps) for (const x of s.sources || []) if (!names.includes(x.name)) names.push(x.name);
  names.forEach((name, i) => {
    const points = [];
    for (const s of steps) {
      const x = (s.sources || []).find((y) => y.name === name);
      if (x && x.loss !== null && x.loss !== undefined) points.push([s.step, x.loss]);
    }
    loss.push({ name, color: SOURCE_COLORS[i % SOURCE_COLORS.length], points, dash: true });
  });
  drawChart(document.getElementById("chart-loss"), { title: "loss", series: loss });
  drawChart(document.getElementById("chart-lr"), {
    title: "learning rate",
    series: [{ name: "lr", color: "#059669", points: steps.map((s) => [s.step, s.lr]) }],
  });
  drawChart(document.getElementById("chart-tps"), {
    title: "tokens per second",
    series: [{ name: "tokens/s", color: "#7c3aed", points: steps.map((s) => [s.step, s.tokens_per_s]) }],
  });
  drawChart(document.getElementById("chart-phases"), {
    title: "step time by phase, seconds (rank 0)",
    series: PHASES.map(([p, c]) => ({ name: p.replace("_", " "), color: c, points: steps.map((s) => [s.step, s.times[p]]) })),
  });
  drawStages(last);
}

function lastEval(steps) {
  for (let i = steps.length - 1; i >= 0; i--) if (steps[i].eval_loss !== null && steps[i].eval_loss !== undefined) return steps[i].eval_loss;
  return null;
}

function drawStages(last) {
  const box = document.getElementById("stages");
  if (!last || !last.stages || !last.stages.length) {
    box.innerHTML = `<p class="muted">No step yet.</p>`;
    return;
  }
  const totals = last.stages.map((g) => STAGE_PARTS.reduce((a, [p]) => a + (g[p] || 0), 0));
  const widest = Math.max(...totals, 1e-9);
  let html = last.stages.map((g, i) => {
    const parts = STAGE_PARTS.map(([p, c]) => `<span title="${p}: ${fmt(g[p])} s" style="width:${(100 * (g[p] || 0)) / widest}%;background:${c}"></span>`).join("");
    return `<div class="stage-row"><span class="label">stage ${g.stage}</span><span class="split">${parts}</span><span class="total">${fmt(totals[i], 3)} s</span><span class="muted">bubble ${fmt(100 * g.bubble, 3)}%</span></div>`;
  }).join("");
  html += `<div class="legend">${STAGE_PARTS.map(([p, c]) => `<span><i style="background:${c}"></i>${p.replace("_", " ")}</span>`).join("")}<span>1F1B's bubble for equal microbatches: ${fmt(100 * last.bubble_theory, 3)}%</span></div>`;
  box.innerHTML = html;
}

// One rank's last step as a bar of its phases and what they leave out
// (waiting for neighbours), scaled to the slowest rank's step.
function rankSplit(s, widest) {
  if (!s) return '<span class="muted">no step yet</span>';
  widest = Math.max(widest || 0, 1e-9);
  const parts = PHASES.map(([p, c]) => [p, c, s[`${p}_s`] || 0]);
  const known = parts.reduce((a, p) => a + p[2], 0);
  parts.push(["other", "#fca5a5", Math.max(0, s.wall_s - known)]);
  const bar = parts.map(([p, c, v]) =>
    `<span title="${p}: ${fmt(v)} s" style="width:${(100 * v) / widest}%;background:${c}"></span>`).join("");
  return `<span class="split rank-split" data-step="${s.step}">${bar}</span>`;
}

// The ranks summed up: counts, step-time quantiles, the worst nodes, the
// stages and the slowest ranks.
function drawRankSummary(sum) {
  const box = document.getElementById("ranks-summary");
  if (!sum) {
    box.innerHTML = "";
    return;
  }
  const q = sum.step_s_quantiles;
  const facts = [
    ["ranks", `${sum.ranks} on ${sum.nodes} nodes`],
    ["registered", sum.registered],
    ["done", sum.done],
    ["steps", sum.min_step === sum.max_step ? sum.max_step : `${sum.min_step}–${sum.max_step}`],
    ["step time p50 / p90 / p99 / max", q ? q.map((x) => fmt(x, 3)).join(" / ") + " s" : "–"],
    ["slowest", (sum.slowest || []).join(", ") || "–"],
  ];
  if ((sum.behind || []).length) facts.push(["furthest behind", sum.behind.join(", ")]);
  let html = `<div class="facts">${facts.map(([k, v]) => `<span><b>${esc(k)}</b> ${esc(v)}</span>`).join("")}</div>`;
  const groups = (rows, what) => table([what, "#ranks", "#steps", "#slowest step s", "#mean step s", "#longest silence", "#done"], rows.map((g) => [
    g.name, g.ranks, g.min_step === g.max_step ? g.max_step : `${g.min_step}–${g.max_step}`,
    fmt(g.max_step_s, 3), fmt(g.mean_step_s, 3), duration(g.max_heartbeat_age_s), g.done,
  ]));
  if ((sum.by_stage || []).length > 1) html += `<h3>By pipeline stage</h3>${groups(sum.by_stage, "stage")}`;
  if ((sum.by_node || []).length) html += `<h3>Nodes, slowest first${sum.nodes > sum.by_node.length ? ` (${sum.by_node.length} of ${sum.nodes})` : ""}</h3>${groups(sum.by_node, "node")}`;
  box.innerHTML = html;
}

function drawDetails(d, page, refresh) {
  document.getElementById("recipe").textContent = d.recipe || "";
  drawRankSummary(d.ranks_summary);
  const p = d.ranks || { total: 0, ranks: [] };
  const ranks = p.ranks || [];
  const box = document.getElementById("ranks");
  if (!ranks.length) {
    box.innerHTML = `<p class="muted">No live processes.</p>`;
  } else {
    const nav = `<p class="pager">ranks ${p.offset + 1}–${p.offset + ranks.length} of ${p.total}, by ${page.order === "slowest" ? "step time, slowest first" : "rank"}
      <button data-go="prev"${p.offset === 0 ? " disabled" : ""}>previous</button>
      <button data-go="next"${p.offset + ranks.length >= p.total ? " disabled" : ""}>next</button>
      <button data-go="order">${page.order === "slowest" ? "by rank" : "slowest first"}</button></p>`;
    box.innerHTML = nav + table(["#rank", "node", "gpu", "collective endpoint", "#step", "#since its step moved", "#since its heartbeat", "busy with", "done", "its last step (phases as above, then waiting)", "#s"], ranks.map((r) => [
      r.rank, r.node, r.gpu ?? "–", r.addr || "not registered", r.step, duration(r.step_age_s), duration(r.heartbeat_age_s), r.activity, r.done ? "yes" : "",
      { html: rankSplit(r.last_step, p.widest_step_s) },
      r.last_step ? fmt(r.last_step.wall_s, 3) : "–",
    ]));
    for (const b of box.querySelectorAll("button[data-go]")) {
      b.onclick = () => {
        const go = b.getAttribute("data-go");
        if (go === "prev") page.offset = Math.max(0, page.offset - p.limit);
        if (go === "next") page.offset += p.limit;
        if (go === "order") {
          page.order = page.order === "slowest" ? "rank" : "slowest";
          page.offset = 0;
        }
        refresh();
      };
    }
  }
  const atts = d.attempts || [];
  const earlier = d.earlier_attempts && d.earlier_attempts.attempts
    ? `<p class="muted">${d.earlier_attempts.attempts} earlier attempts: ${d.earlier_attempts.failed} failed, ${d.earlier_attempts.interrupted} interrupted, ${d.earlier_attempts.steps_lost} steps lost</p>`
    : "";
  const blamed = (d.blamed_nodes || []).map((b) =>
    `<p class="warn">node ${esc(b.node)} is kept out of this job's placements (attempt ${b.attempt}: ${esc(b.reason)})</p>`).join("");
  document.getElementById("attempts").innerHTML = blamed + earlier + (atts.length
    ? table(["#attempt", "started", "ended", "#from step", "#last step", "end", "#steps lost", "cause"], atts.map((a) => [
      a.number, when(a.started_unix_ms), when(a.ended_unix_ms), a.from_step, a.last_step,
      { html: a.end_state ? stateBadge(a.end_state) + (a.interrupted ? ' <span class="muted">interrupted</span>' : "") : stateBadge("running") },
      a.end_state === "succeeded" ? "–" : a.steps_lost, { wrap: true, html: esc(a.cause) },
    ]))
    : `<p class="muted">Not started yet.</p>`);
  const cks = d.checkpoints || [];
  document.getElementById("checkpoints").innerHTML = cks.length
    ? table(["#step", "#tokens", "#size", "#attempt", "written", "#step stall s", "#write s", "where"], cks.map((c) => [
      c.step, count(c.tokens), bytes(c.bytes), c.attempt, when(c.written_unix_ms), fmt(c.stall_s, 3), fmt(c.write_s, 3), c.url,
    ]))
    : `<p class="muted">None yet.</p>`;
}

// -------------------------------------------------------------- sweep ---

async function sweepPage(id) {
  document.getElementById("where").innerHTML = `<a href="/">jobs</a> / sweep ${esc(id)}`;
  const draw = async () => {
    let s;
    try {
      s = await getJson(`/api/sweeps/${encodeURIComponent(id)}`);
      setConn(`updated ${new Date().toLocaleTimeString()}`);
    } catch (e) {
      app.innerHTML = `<p class="error">${esc(e.message)}</p>`;
      return;
    }
    let html = `<h1>${esc(s.name)} (${esc(s.id)}) ${stateBadge(s.state)}</h1>`;
    html += `<div class="facts"><span><b>points</b> ${s.points.length}</span><span><b>at most running</b> ${s.max_concurrent}</span><span><b>submitted</b> ${when(s.submitted_unix_ms)}</span></div>`;
    if (s.reason) html += `<p class="warn">${esc(s.reason)}</p>`;
    if (s.plots && s.plots.length) {
      html += `<h2>Fits</h2><pre>${esc(s.fits_text || "")}</pre>`;
      html += s.plots.map((p) => `<h2>${esc(p.title)}</h2><img class="plot" alt="${esc(p.title)}" src="/api/sweeps/${encodeURIComponent(s.id)}/plots/${encodeURIComponent(p.name)}.svg">`).join("");
    } else if (s.fits_error) {
      html += `<p class="muted">No fits yet: ${esc(s.fits_error)}</p>`;
    }
    html += `<h2>Points</h2>` + table(["#point", "kind", "values", "job", "state", "progress", "#loss", "blocked"], s.points.map((p) => [
      p.index, p.kind + (p.fraction ? ` ${fmt(p.fraction, 3)}` : ""), p.label,
      { html: p.job ? `<a href="/jobs/${encodeURIComponent(p.job)}">${esc(p.job)}</a>` : "–" },
      { html: p.state ? stateBadge(p.state) : "" },
      { html: p.steps_total ? progress(p.steps_done, p.steps_total) : "" },
      fmt(p.last_loss), { wrap: true, html: esc(p.blocked) },
    ]));
    html += `<h2>Sweep file</h2><pre>${esc(s.spec)}</pre>`;
    app.innerHTML = html;
    return s.state;
  };
  const first = await draw();
  if (first === "running") {
    const timer = setInterval(async () => {
      if ((await draw()) !== "running") clearInterval(timer);
    }, 5000);
  }
}

// ------------------------------------------------------------- router ---

const path = location.pathname;
let m;
if ((m = path.match(/^\/jobs\/([^/]+)$/))) jobPage(decodeURIComponent(m[1]));
else if ((m = path.match(/^\/sweeps\/([^/]+)$/))) sweepPage(decodeURIComponent(m[1]));
else overview();
