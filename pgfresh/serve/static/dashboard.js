// The pgfresh dashboard: plain JS, no dependencies, served by `pgfresh serve` (works offline).
"use strict";
const $ = (sel) => document.querySelector(sel);
const keyInput = $("#key");
keyInput.value = localStorage.getItem("pgfresh-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("pgfresh-key", keyInput.value.trim()); refresh(); });
const history = [];
let searches = 0;

async function api(path, options = {}) {
  const headers = Object.assign({ "Content-Type": "application/json" }, options.headers || {});
  const key = keyInput.value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
  return body;
}

function say(text) { $("#message").textContent = text || ""; }
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
function fmtBytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "kB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

async function loadStatus() {
  const s = await api("/v1/status");
  const cap = s.capture || {}, rag = s.rag || {}, slot = s.slot || {};
  $("#auth-state").textContent = (s.serve && s.serve.auth) || (s.tenant !== undefined ? "tenant " + s.tenant : "");
  $("#lag-seconds").textContent = cap.lag_seconds === null || cap.lag_seconds === undefined ? "-" : cap.lag_seconds + " s";
  $("#lag-bytes").textContent = fmtBytes(cap.lag_bytes) + " behind, LSN " + (cap.lsn || "-");
  const fr = rag.freshness || {};
  $("#fresh").textContent = (fr.p50_ms ?? "-") + " / " + (fr.p99_ms ?? "-") + " ms";
  $("#fresh-n").textContent = (fr.changes ?? 0) + " changes measured";
  // the newest change searchable now (read on each refresh), not the all-time percentiles above
  const la = rag.latest;
  $("#latest").textContent = la ? la.tbl + " " + la.key : "-";
  $("#latest").dataset.lsn = la ? la.lsn : "";
  $("#latest-sub").textContent = !la ? "nothing indexed" : "LSN " + la.lsn + (la.commit_time === null
    ? ", from the snapshot" : ", searchable " + la.searchable_after_ms + " ms after its commit") +
    ", " + la.indexed_seconds_ago + " s ago";
  $("#slot-wal").textContent = fmtBytes(slot.retained_wal_bytes);
  $("#slot-state").textContent = slot.exists ? (slot.active ? "active" : "inactive") + ", " + slot.wal_status : "no slot";
  $("#docs").textContent = rag.documents ?? "-";
  const c = rag.cache || {};
  $("#cache").textContent = c.hits !== undefined ? "cache " + c.hits + " hits / " + c.misses + " misses" : "";
  // the registry's embedders and cross-encoders: what this server holds, loads, reuses and evicts
  const loaded = (s.serve && s.serve.loaded) || {}, m = loaded.models;
  $("#models").textContent = m ? m.loaded.length + " / " + m.max_loaded : "-";
  $("#models-sub").textContent = m ? m.loads + " loads, " + m.hits + " hits, " + m.evictions + " evictions" +
    (loaded.warm && loaded.warm !== "warm" ? "; " + loaded.warm : "") + (m.loaded.length ? ": " + m.loaded.join(", ") : "") : "";
  const tbody = $("#stages tbody"); tbody.replaceChildren();
  const log = cap.change_log || {};
  for (const [name, seq] of Object.entries(log.consumers || {})) {
    const tr = document.createElement("tr"); cell(tr, name); cell(tr, seq); cell(tr, (log.head || 0) - seq); tbody.appendChild(tr);
  }
  history.push({ t: Date.now(), lag: Number(cap.lag_seconds) || 0, p99: ((la && Number(la.searchable_after_ms)) || 0) / 1000 });
  if (history.length > 240) history.shift();
  drawHistory();
}

function drawHistory() {
  const svg = $("#history"), w = 720, h = 120, pad = 4;
  const max = Math.max(0.001, ...history.map((p) => Math.max(p.lag, p.p99)));
  const line = (key) => history.map((p, i) => {
    const x = pad + (w - 2 * pad) * (history.length > 1 ? i / (history.length - 1) : 0);
    const y = h - pad - (h - 2 * pad) * (p[key] / max);
    return x.toFixed(1) + "," + y.toFixed(1);
  }).join(" ");
  svg.innerHTML = '<polyline fill="none" stroke="#23395b" stroke-width="2" points="' + line("lag") + '"/>' +
    '<polyline fill="none" stroke="#c0392b" stroke-width="2" points="' + line("p99") + '"/>' +
    '<text x="6" y="14" font-size="11">max ' + max.toFixed(3) + ' s</text>';
}

async function loadQuarantine() {
  const tbody = $("#quarantine tbody");
  let items;
  try { items = await api("/v1/quarantine"); } catch (e) { tbody.replaceChildren(); return; }
  tbody.replaceChildren();
  for (const q of items) {
    const tr = document.createElement("tr");
    tr.dataset.id = q.id;
    for (const v of [q.id, q.path, q.tbl, q.key, q.lsn, q.check_name, q.reason]) cell(tr, v);
    const td = cell(tr, "");
    if (!q.released_at) {
      const b = document.createElement("button"); b.textContent = "release"; b.className = "release";
      b.onclick = async () => {
        try { await api("/v1/quarantine/" + q.id + "/release", { method: "POST" }); say("released #" + q.id); }
        catch (e) { say(e.message); }
        loadQuarantine();
      };
      td.appendChild(b);
    } else { td.textContent = "released"; }
    tbody.appendChild(tr);
  }
}

async function loadSlices() {
  const tbody = $("#slices tbody");
  let rows;
  try { rows = await api("/v1/slices"); } catch (e) { tbody.replaceChildren(); return; }
  tbody.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.slice = r.slice; tr.dataset.version = r.version;
    const m = r.metrics || {};
    cell(tr, (r.current ? "* " : "") + r.slice); cell(tr, r.version); cell(tr, r.kind); cell(tr, r.lsn); cell(tr, r.facts);
    cell(tr, [m.new_accuracy, m.forgetting, m.stale_rate].map((x) => x ?? "-").join(" / ")); cell(tr, r.rejected_rounds);
    const td = cell(tr, "");
    if (!r.current) {
      const b = document.createElement("button"); b.textContent = "roll back to v" + r.version; b.className = "rollback";
      b.onclick = async () => {
        try {
          await api("/v1/slices/" + encodeURIComponent(r.slice) + "/rollback", { method: "POST", body: JSON.stringify({ version: r.version }) });
          say("slice " + r.slice + " serves v" + r.version);
        } catch (e) { say(e.message); }
        loadSlices();
      };
      td.appendChild(b);
    } else { td.textContent = "serving"; }
    tbody.appendChild(tr);
  }
}

async function loadReports() {
  const box = $("#reports");
  let reps;
  try { reps = await api("/v1/reports"); } catch (e) { box.textContent = ""; return; }
  box.replaceChildren();
  if (!reps.length) { box.textContent = "no arena results (pgfresh arena --json FILE into serve.reports_dir)"; return; }
  for (const r of reps.slice(0, 5)) {
    const h = document.createElement("h3"); h.textContent = r.file + " (" + new Date(r.modified * 1000).toISOString() + ")"; box.appendChild(h);
    const t = document.createElement("table");
    t.innerHTML = "<thead><tr><th>strategy</th><th>kind</th><th>accuracy</th><th>stale rate</th></tr></thead>";
    const tb = document.createElement("tbody");
    for (const s of r.strategies) { const tr = document.createElement("tr"); for (const v of [s.strategy, s.kind, s.accuracy, s.stale_rate]) cell(tr, v); tb.appendChild(tr); }
    t.appendChild(tb); box.appendChild(t);
  }
}

$("#search-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = { text: $("#search-text").value };
  const tenant = $("#search-tenant").value.trim();
  if (tenant) body.tenant = tenant;
  const tbody = $("#hits tbody"); tbody.replaceChildren();
  const mine = ++searches;  // only the newest search's answer is shown: an older one may arrive later
  try {
    const hits = await api("/v1/search", { method: "POST", body: JSON.stringify(body) });
    if (mine !== searches) return;
    tbody.replaceChildren();
    hits.forEach((h, i) => {
      const tr = document.createElement("tr");
      cell(tr, i + 1); cell(tr, h.tbl); cell(tr, h.key); cell(tr, h.lsn); cell(tr, h.commit_time || "snapshot"); cell(tr, h.text, "doc");
      tbody.appendChild(tr);
    });
    $("#hits").dataset.shown = String(mine);
    say(hits.length ? "" : "no matching document");
  } catch (e) { say(e.message); }
});

async function refresh() {
  try { await loadStatus(); say(""); } catch (e) { say(e.message); }
  await Promise.all([loadQuarantine(), loadSlices(), loadReports()]);
}
refresh();
setInterval(() => loadStatus().catch((e) => say(e.message)), 5000);
