// modelpress dashboard: vanilla JS, no build step. Talks to /v1 with the key kept in
// sessionStorage; follows jobs live through /v1/jobs/{id}/events/stream (read with fetch,
// since EventSource cannot send an Authorization header).
"use strict";
const $app = document.getElementById("app");
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
let streams = [];  // AbortControllers of the current view's streams

const key = () => sessionStorage.getItem("modelpress-key");
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (v, d = 4) => (v === null || v === undefined) ? "" : (typeof v === "number" ? Number(v.toPrecision(d)).toString() : esc(v));

async function api(path, opts = {}) {
  const r = await fetch(path, {...opts, headers: {"Authorization": "Bearer " + key(), ...(opts.headers || {})}});
  if (r.status === 401) { sessionStorage.removeItem("modelpress-key"); route(); throw new Error("invalid API key"); }
  if (!r.ok) {
    let msg = r.status + "";
    try { const e = (await r.json()).error; msg = `${r.status} ${e.code}: ${e.message}`; } catch (_) {}
    throw new Error(msg);
  }
  return r;
}
const getJSON = async (path) => (await api(path)).json();

// Server-Sent Events over fetch: calls onEvent(kind, data, id); reconnects with Last-Event-ID.
function follow(jobId, onEvent) {
  const ctl = new AbortController();
  streams.push(ctl);
  let last = null;
  (async () => {
    for (let tries = 0; tries < 20 && !ctl.signal.aborted; tries++) {
      try {
        const headers = last ? {"Last-Event-ID": last} : {};
        const r = await api(`/v1/jobs/${jobId}/events/stream`, {headers, signal: ctl.signal});
        const reader = r.body.getReader(); const dec = new TextDecoder();
        let buf = "", ev = {kind: "message", data: [], id: null};
        for (;;) {
          const {value, done} = await reader.read();
          if (done) return;  // the job is finished
          buf += dec.decode(value, {stream: true});
          let i;
          while ((i = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, i).replace(/\r$/, ""); buf = buf.slice(i + 1);
            if (line === "") {
              if (ev.data.length) { if (ev.id) last = ev.id; onEvent(ev.kind, JSON.parse(ev.data.join("\n")), ev.id); }
              ev = {kind: "message", data: [], id: null};
            } else if (!line.startsWith(":")) {
              const j = line.indexOf(":"); const name = line.slice(0, j); const val = line.slice(j + 1).replace(/^ /, "");
              if (name === "event") ev.kind = val; else if (name === "data") ev.data.push(val); else if (name === "id") ev.id = val;
            }
          }
        }
      } catch (e) {
        if (ctl.signal.aborted) return;
        await new Promise((res) => setTimeout(res, 1000 * Math.min(10, tries + 1)));
      }
    }
  })();
}

function stateCell(j) { return `<span class="state state-${esc(j.state)}" data-role="state">${esc(j.state)}</span>`; }
function progressCell(j) { return `<progress max="100" value="${j.progress}" data-role="progress"></progress> <span data-role="pct">${j.progress}%</span> <span class="hint" data-role="stage">${esc(j.stage || "")}</span>`; }
function applySnap(el, s) {
  const st = el.querySelector("[data-role=state]");
  st.textContent = s.state; st.className = `state state-${s.state}`;
  el.querySelector("[data-role=progress]").value = s.progress;
  el.querySelector("[data-role=pct]").textContent = s.progress + "%";
  el.querySelector("[data-role=stage]").textContent = s.stage || "";
}

// ------------------------------------------------------------------------------ views
async function viewJobs() {
  const page = await getJSON("/v1/jobs?limit=50");
  $app.innerHTML = `<h2>Jobs</h2><table id="jobs"><tr><th>Job</th><th>State</th><th>Progress</th><th>Method(s)</th><th>Model</th><th>Created</th></tr>` +
    page.items.map((j) => `<tr id="job-${j.id}"><td><a href="#/jobs/${j.id}">${j.id.slice(0, 12)}</a></td><td>${stateCell(j)}</td><td>${progressCell(j)}</td>` +
      `<td>${esc(j.recipe.map((s) => s.method).join(" → "))}</td><td><a href="#/models/${j.model_id}">${j.model_id.slice(0, 12)}</a></td><td>${new Date(j.created_at).toLocaleString()}</td></tr>`).join("") +
    `</table>` + (page.items.length ? "" : `<p>No jobs yet. <a href="#/submit">Submit one</a>.</p>`);
  page.items.filter((j) => !TERMINAL.has(j.state)).slice(0, 20).forEach((j) =>
    follow(j.id, (kind, d) => { if (kind === "progress") applySnap(document.getElementById("job-" + j.id), d); }));
}

function metricsTable(job) {
  if (!job.metrics.length) return "<p>No metrics yet.</p>";
  const stages = [...new Set(job.metrics.map((m) => m.stage))];
  const names = [...new Set(job.metrics.map((m) => m.name))];
  const val = (s, n) => { const m = job.metrics.find((x) => x.stage === s && x.name === n); return m ? fmt(m.value, 5) + (m.unit ? " " + esc(m.unit) : "") : ""; };
  return `<table id="metrics"><tr><th>Metric</th>${stages.map((s) => `<th>${esc(s)}</th>`).join("")}</tr>` +
    names.map((n) => `<tr><td>${esc(n)}</td>${stages.map((s) => `<td>${val(s, n)}</td>`).join("")}</tr>`).join("") + `</table>`;
}

function gateText(job) {
  if (job.max_ppl_increase === null || job.max_ppl_increase === undefined) return "no quality gate";
  if (job.error && job.error.code === "quality_gate") return `<span class="gate-fail">failed: ${esc(job.error.message)}</span>`;
  if (job.state === "succeeded") return `<span class="gate-ok">passed (perplexity ratio ≤ ${fmt(job.max_ppl_increase)})</span>`;
  return `perplexity ratio must stay ≤ ${fmt(job.max_ppl_increase)}`;
}

async function renderJob(id) {
  const job = await getJSON(`/v1/jobs/${id}`);
  const box = document.getElementById("job-summary");
  if (!box) return job;
  box.innerHTML = `<table id="job-${job.id}"><tr><th>State</th><td>${stateCell(job)}</td></tr><tr><th>Progress</th><td>${progressCell(job)}</td></tr>` +
    `<tr><th>Stages</th><td>${job.recipe.map((s, i) => `${i + 1}. ${esc(s.method)} <span class="hint">${esc(JSON.stringify(s.params))}</span>`).join("<br>")}</td></tr>` +
    `<tr><th>Model</th><td><a href="#/models/${job.model_id}">${job.model_id}</a></td></tr>` +
    `<tr><th>Quality gate</th><td id="gate">${gateText(job)}</td></tr>` +
    (job.error ? `<tr><th>Error</th><td class="error">${esc(job.error.code)}: ${esc(job.error.message)}</td></tr>` : "") +
    `<tr><th>Artifact</th><td>${job.artifact && job.artifact.ready ? `<button id="download">Download (${(job.artifact.bytes / 1e6).toFixed(2)} MB)</button> <span class="hint">sha256 ${job.artifact.sha256}</span>` : "not ready"}</td></tr></table>` +
    `<h3>Before / after</h3>${metricsTable(job)}`;
  const dl = document.getElementById("download");
  if (dl) dl.onclick = async () => {
    const blob = await (await api(`/v1/jobs/${job.id}/artifact`)).blob();
    const a = document.createElement("a"); a.href = URL.createObjectURL(blob); a.download = `${job.id}.tar.gz`; a.click();
  };
  if (!TERMINAL.has(job.state) && !job.cancel_requested) {
    box.insertAdjacentHTML("beforeend", `<p><button id="cancel">Cancel job</button></p>`);
    document.getElementById("cancel").onclick = async () => { await api(`/v1/jobs/${job.id}/cancel`, {method: "POST"}); renderJob(id); };
  }
  return job;
}

async function viewJob(id) {
  $app.innerHTML = `<h2>Job ${esc(id)}</h2><div class="card" id="job-summary"></div><h3>Events</h3><table class="events" id="events"><tr><th>#</th><th>Time</th><th>Kind</th><th>Message</th></tr></table>`;
  await renderJob(id);
  follow(id, (kind, d) => {
    if (kind === "log") {
      document.getElementById("events")?.insertAdjacentHTML("beforeend", `<tr><td>${d.id}</td><td>${new Date(d.ts).toLocaleTimeString()}</td><td>${esc(d.kind)}</td><td>${esc(d.message)}</td></tr>`);
      if (d.kind === "state" || d.kind === "artifact") renderJob(id);
    } else if (kind === "progress") {
      const el = document.getElementById("job-" + id); if (el) applySnap(el, d);
    }
  });
}

async function viewModels() {
  const ms = (await getJSON("/v1/models")).items;
  $app.innerHTML = `<h2>Models</h2><table><tr><th>Name</th><th>Kind</th><th>Type</th><th>Size</th><th>Registered</th></tr>` +
    ms.map((m) => `<tr><td><a href="#/models/${m.id}">${esc(m.name)}</a></td><td>${esc(m.kind)}</td><td>${esc(m.model_type)}</td><td>${m.bytes ? (m.bytes / 1e6).toFixed(1) + " MB" : ""}</td><td>${new Date(m.created_at).toLocaleString()}</td></tr>`).join("") + `</table>`;
}

async function viewModel(id) {
  const [m, comp] = await Promise.all([getJSON(`/v1/models/${id}`), getJSON(`/v1/models/${id}/comparison`)]);
  const rows = [comp.baseline, ...comp.rows].filter(Boolean);
  $app.innerHTML = `<h2>${esc(m.name)}</h2><p class="hint">${esc(m.kind)} · ${esc(m.model_type)} · ${esc(m.architecture)}</p>` +
    `<p><a href="#/submit?model=${m.id}">Submit a job on this model</a></p><h3>Comparison</h3>` +
    `<table id="comparison"><tr><th>Job</th><th>State</th><th>Gate</th><th>Compression</th><th>Perplexity</th><th>Loss</th><th>Size (MB)</th><th>tokens/s</th><th>Pareto</th></tr>` +
    rows.map((r) => `<tr><td>${r.job_id ? `<a href="#/jobs/${r.job_id}">${esc(r.label)}</a>` : esc(r.label)}</td><td>${esc(r.state)}</td><td>${r.gate_passed ? "ok" : "failed"}</td>` +
      `<td>${fmt(r.compression_ratio)}</td><td>${fmt(r.perplexity)}</td><td>${fmt(r.accuracy_loss)}</td><td>${r.bytes ? (r.bytes / 1e6).toFixed(2) : ""}</td><td>${fmt(r.tokens_per_s)}</td><td>${r.pareto ? "★" : ""}</td></tr>`).join("") +
    `</table><h3>Size versus ${esc(comp.quality_metric || "quality")}</h3><div id="plot" class="card">loading…</div>`;
  try {
    const svg = await (await api(`/v1/models/${id}/comparison?format=svg`)).text();
    const doc = new DOMParser().parseFromString(svg, "image/svg+xml");
    doc.querySelectorAll("script").forEach((s) => s.remove());
    const plot = document.getElementById("plot"); plot.textContent = ""; plot.appendChild(document.importNode(doc.documentElement, true));
  } catch (e) { document.getElementById("plot").textContent = "no plot: " + e.message; }
}

// A form field from one JSON Schema property.
function field(name, p, defs) {
  if (p.$ref) p = {...defs[p.$ref.split("/").pop()], ...p};
  if (p.anyOf) { const nn = p.anyOf.find((x) => x.type !== "null"); p = {...(nn.$ref ? defs[nn.$ref.split("/").pop()] : nn), ...p, anyOf: undefined}; }
  const id = `param-${name}`; const dflt = p.default !== undefined && p.default !== null ? p.default : "";
  const label = `<label for="${id}">${esc(name)} <span class="hint">${esc(p.description || "")}</span></label>`;
  if (p.enum) return label + `<select id="${id}" name="${esc(name)}" data-type="enum"><option value=""></option>${p.enum.map((v) => `<option ${v === p.default ? "selected" : ""}>${esc(v)}</option>`).join("")}</select>`;
  if (p.type === "boolean") return label + `<input type="checkbox" id="${id}" name="${esc(name)}" data-type="boolean" ${p.default ? "checked" : ""}>`;
  if (p.type === "number" || p.type === "integer") {
    const lim = ["minimum", "maximum"].map((k) => p[k] !== undefined ? `${k.slice(0, 3)}="${p[k]}"` : "").join(" ");
    return label + `<input type="number" step="${p.type === "integer" ? 1 : "any"}" ${lim} id="${id}" name="${esc(name)}" data-type="${p.type}" value="${esc(dflt)}">`;
  }
  if (p.type === "string") return label + `<input id="${id}" name="${esc(name)}" data-type="string" value="${esc(dflt)}">`;
  return label + `<input id="${id}" name="${esc(name)}" data-type="json" placeholder="JSON" value="${esc(dflt === "" ? "" : JSON.stringify(dflt))}">`;
}

function readParams(form) {
  const out = {};
  form.querySelectorAll("#params [name]").forEach((el) => {
    const t = el.dataset.type;
    if (t === "boolean") { out[el.name] = el.checked; return; }
    if (el.value === "") return;
    out[el.name] = t === "number" ? parseFloat(el.value) : t === "integer" ? parseInt(el.value, 10) : t === "json" ? JSON.parse(el.value) : el.value;
  });
  return out;
}

async function viewSubmit(query) {
  const [methods, models] = await Promise.all([getJSON("/v1/methods"), getJSON("/v1/models")]);
  const want = new URLSearchParams(query).get("model");
  $app.innerHTML = `<h2>Submit a job</h2><form id="submit-form" class="card">` +
    `<label for="model">Model</label><select id="model" required>${models.items.map((m) => `<option value="${m.id}" ${m.id === want ? "selected" : ""}>${esc(m.name)} (${esc(m.model_type)})</option>`).join("")}</select>` +
    `<label for="method">Method</label><select id="method">${methods.items.map((m) => `<option value="${esc(m.name)}">${esc(m.family)} · ${esc(m.name)}</option>`).join("")}</select>` +
    `<p class="hint" id="method-help"></p><div id="params"></div>` +
    `<label for="gate">Quality gate <span class="hint">max perplexity after / before, e.g. 1.2 (optional)</span></label><input id="gate" type="number" step="any" min="1">` +
    `<p><button type="submit" id="submit-button">Submit</button></p><p class="error" id="submit-error"></p></form>`;
  const byName = Object.fromEntries(methods.items.map((m) => [m.name, m]));
  const render = () => {
    const m = byName[document.getElementById("method").value];
    document.getElementById("method-help").textContent = m.description + (m.needs_calibration ? " (uses calibration data)" : "");
    const s = m.params_schema; const defs = s.$defs || {};
    document.getElementById("params").innerHTML = Object.entries(s.properties || {}).map(([n, p]) => field(n, p, defs)).join("");
  };
  document.getElementById("method").onchange = render; render();
  document.getElementById("submit-form").onsubmit = async (e) => {
    e.preventDefault();
    const err = document.getElementById("submit-error"); err.textContent = "";
    try {
      const body = {model_id: document.getElementById("model").value, method: document.getElementById("method").value, params: readParams(e.target)};
      const g = document.getElementById("gate").value; if (g) body.max_ppl_increase = parseFloat(g);
      const job = await (await api("/v1/jobs", {method: "POST", headers: {"Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID ? crypto.randomUUID() : String(Math.random())}, body: JSON.stringify(body)})).json();
      location.hash = `#/jobs/${job.id}`;
    } catch (ex) { err.textContent = ex.message; }
  };
}

function viewLogin() {
  $app.innerHTML = document.getElementById("login").innerHTML;
  document.getElementById("login-form").onsubmit = async (e) => {
    e.preventDefault();
    sessionStorage.setItem("modelpress-key", document.getElementById("api-key").value.trim());
    try { await api("/v1/models"); route(); } catch (ex) { sessionStorage.removeItem("modelpress-key"); viewLogin(); document.getElementById("login-error").textContent = ex.message; }
  };
}

async function route() {
  streams.forEach((c) => c.abort()); streams = [];
  document.getElementById("logout").hidden = !key();
  if (!key()) return viewLogin();
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean);
  try {
    if (parts[0] === "jobs" && parts[1]) await viewJob(parts[1]);
    else if (parts[0] === "models" && parts[1]) await viewModel(parts[1]);
    else if (parts[0] === "models") await viewModels();
    else if (parts[0] === "submit") await viewSubmit(query || "");
    else await viewJobs();
  } catch (e) { $app.innerHTML = `<p class="error">${esc(e.message)}</p>`; }
}

document.getElementById("logout").onclick = () => { sessionStorage.removeItem("modelpress-key"); route(); };
window.addEventListener("hashchange", route);
route();
