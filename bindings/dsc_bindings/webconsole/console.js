"use strict";
// The web console (issue 19): every datum comes from /api/ (openapi.json), every text is put in
// with textContent (scanner-controlled text stays text), every change sends the CSRF token.
// el, when and fill are dom.js's (shared with the /status page), loaded first.
const $ = (sel) => document.querySelector(sel);
let csrf = "";
const etags = new Map();
const cache = new Map();
let historyCursors = [""];  // the cursor of each page shown so far; the last is the current
let historyNext = "";

function problem(text) {
  const box = $("#alert");
  box.textContent = text; box.hidden = !text;
}
async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = csrf;
  else if (etags.has(path)) headers["If-None-Match"] = etags.get(path);
  let r;
  try {
    r = await fetch(path, {method, headers, cache: "no-store", credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    throw new Error("cannot reach the server (" + e.message + ")");
  }
  if (r.status === 304) { await r.text(); return cache.get(path); }
  const data = await r.json().catch(() => ({error: "HTTP " + r.status}));
  if (!r.ok) {
    const err = new Error(data.error || ("HTTP " + r.status));
    err.status = r.status;
    throw err;
  }
  if (method === "GET" && r.headers.get("ETag")) {
    etags.set(path, r.headers.get("ETag")); cache.set(path, data);
  }
  return data;
}
function confirmed(text) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), {once: true});
    dialog.returnValue = "";
    dialog.showModal();
  });
}
function button(label, action, name) {
  const b = el("button", label); b.type = "button";
  b.setAttribute("aria-label", name || label);
  b.addEventListener("click", action);
  return b;
}
function cell(...children) { const td = el("td"); td.append(...children); return td; }
function jobLink(token) {
  const a = el("a", token, "tok"); a.href = "#job/" + encodeURIComponent(token); return a;
}
function destinations(job) {
  return job.filters.map(f => f.filter + ": " + f.state +
    (f.destinations.length ? " \u2192 " + f.destinations.join(", ") : "")).join("; ");
}
// What a filter delivered (issue 19): the files written, document URLs, Message-IDs.
function delivered(f) {
  if (!f.delivered.length) return el("span", "nothing", "muted");
  const list = el("ul", "", "delivered");
  for (const name of f.delivered) list.append(el("li", name, "tok"));
  if (f.delivered_truncated) list.append(el("li", "\u2026 more in the server's job log", "muted"));
  return list;
}
async function act(text, method, path, body, done) {
  if (!(await confirmed(text))) return;
  try {
    const result = await api(method, path, body);
    problem(""); $("#done").textContent = done(result);
    etags.clear(); refresh();
  } catch (e) { problem(e.message); }
}

// --- sections -------------------------------------------------------------------------------
async function drawActive() {
  const data = await api("GET", "/api/jobs?state=active&limit=500");
  fill("#active-table", data.jobs.map(j => Object.assign([
    cell(jobLink(j.token)), j.state + (j.stalled ? " \u2014 stalled" : ""), when(j.created),
    j.images, j.user, j.device, j.process,
    cell(button("Cancel", () => act("Cancel job " + j.token + "?", "POST",
      "/api/jobs/" + encodeURIComponent(j.token) + "/cancel", undefined,
      () => "job " + j.token + " canceled"), "Cancel job " + j.token))],
    {id: "job-" + j.token})), "no active jobs");
}
function historyPath() {
  const form = new FormData($("#search"));
  const q = new URLSearchParams({state: form.get("state"), limit: "25"});
  if (form.get("q")) q.set("q", form.get("q"));
  const cursor = historyCursors[historyCursors.length - 1];
  if (cursor) q.set("cursor", cursor);
  return "/api/jobs?" + q;
}
async function drawHistory() {
  const data = await api("GET", historyPath());
  historyNext = data.next;
  $("#older").disabled = !data.next; $("#newer").disabled = historyCursors.length < 2;
  $("#history-size").textContent = "(" + data.history_size + " kept)";
  fill("#history-table", data.jobs.map(j => Object.assign([
    cell(jobLink(j.token)), el("td", j.outcome + ": " + j.state +
      (j.reasons.length ? " (" + j.reasons.join(", ") + ")" : ""), j.outcome),
    when(j.completed), j.images, j.user, j.device, destinations(j),
    cell(j.outcome === "failed" || j.outcome === "partial" || j.outcome === "aborted" ?
      button("Retry", () => act("Run the failed filters of job " + j.token + " again?", "POST",
        "/api/jobs/" + encodeURIComponent(j.token) + "/retry", undefined,
        r => "job " + j.token + ": " + r.filters_to_run + " filter(s) run again"),
        "Retry job " + j.token) : "")],
    {id: "job-" + j.token})), "no jobs match");
}
async function drawJob(token) {
  const data = await api("GET", "/api/jobs/" + encodeURIComponent(token));
  const j = data.job;
  $("#job-token").textContent = j.token;
  const facts = $("#job-facts"); facts.replaceChildren();
  for (const [k, v] of [["State", j.state], ["Outcome", j.outcome], ["User", j.user],
      ["Device", j.device], ["Process", j.process], ["Images", j.images],
      ["Reasons", j.reasons.join(", ")]]) facts.append(el("dt", k), el("dd", v));
  fill("#job-filters", j.filters.map(f => [f.filter, f.state, f.reasons.join(", "),
    f.destinations.join(", "), cell(delivered(f))]), "no filters");
  fill("#job-documents", j.documents.map(d => [d.document_id, d.format, d.size]), "no documents");
  const list = $("#job-timeline"); list.replaceChildren();
  for (const t of j.timeline) list.append(el("li", when(t.at) + ": " + t.what));
}
async function drawDevices() {
  const data = await api("GET", "/api/devices");
  fill("#devices-table", data.devices.map(d => [d.address, d.identity || "-",
    when(d.last_contact), d.jobs, d.completed, d.failed]), "no devices yet");
}
async function drawSubscriptions() {
  const data = await api("GET", "/api/subscriptions");
  fill("#subscriptions-table", data.subscriptions.map(s => [cell(el("span", s.id, "tok")),
    s.notify_to, when(s.expires), s.events.join(", ")]), "no subscriptions");
}
async function drawProcesses() {
  let data;
  try { data = await api("GET", "/api/processes"); }
  catch (e) {
    if (e.status === 409) { fill("#processes-table", [], e.message); return; }
    throw e;
  }
  fill("#processes-table", data.processes.map(p => [p.name,
    [...p.shares, ...p.sharepoint_sites, ...p.emails].join(", "),
    p.allow.join(", ") || "everyone",
    cell(button("Edit", () => editProcess(p), "Edit " + p.name),
      button("Delete", () => act("Delete the scan process " + p.name + "? Devices stop " +
        "offering it.", "DELETE", "/api/processes/" + encodeURIComponent(p.name), undefined,
        () => "scan process " + p.name + " deleted"), "Delete " + p.name))]),
    "no scan processes");
}
let editing = "";
function editProcess(p) {
  editing = p.name;
  const f = $("#process-form");
  f.elements["name"].value = p.name; f.elements["name"].readOnly = true;
  f.scan_repository.value = p.scan_repository;
  f.shares.value = p.shares.join("\n"); f.emails.value = p.emails.join("\n");
  f.allow.value = p.allow.join("\n");
  $("#process-form-title").textContent = "Edit " + p.name;
  f.shares.focus();
}
// down (no heartbeat within its lease) is a failure; stopped (a clean stop) is not.
const clusterStates = {up: "succeeded", down: "failed", stopped: "canceled"};
// The instances on the PostgreSQL store (issue 18 point 6); the section exists on it only.
// fails_to_lead is the server's one rule (store/instances.py Leadership: holding the lock
// without a term once an attempt failed, or an earlier version's holder that does not say),
// shown in the failure colour; wording and colour of one answer, never ruled again here.
async function drawCluster() {
  const data = await api("GET", "/api/cluster");
  $("#cluster-self").textContent = "This instance: " + data.instance +
    (data.leader ? " (the leader)" : data.leader_lock ? " (" + data.leadership + ")" : "") +
    ", last heartbeat " + data.heartbeat_age + " s ago" +
    (data.problem ? " \u2014 " + data.problem : "");
  $("#cluster-self").className = data.problem || data.fails_to_lead ? "failed" : "";
  fill("#cluster-table", data.instances.map(i => [i.name, i.address, when(i.started),
    i.heartbeat_age + " s ago", el("td", i.state, clusterStates[i.state]),
    el("td", i.leadership, i.fails_to_lead ? "failed" : ""),
    String(i.leases_held), outboxLag(i.outbox_lag)]), "no instances");
  $("#cluster-outbox").textContent = "Outbox: " + outboxLag(data.outbox) +
    " notification(s) waiting, every subscription";
}
// Rows waiting in the outbox and the age of the oldest (issue 18 point 6).
function outboxLag(lag) {
  return lag.oldest_seconds === null ? String(lag.rows)
    : lag.rows + " (oldest " + lag.oldest_seconds + " s)";
}
async function drawServer() {
  const health = await api("GET", "/api/health");
  const list = $("#health"); list.replaceChildren();
  list.append(el("li", "health: " + health.status, health.status === "ok" ? "succeeded" : "failed"));
  for (const c of health.checks) list.append(el("li", c.name + ": " + (c.ok ? "ok" : c.problem),
    c.ok ? "" : "failed"));
  $("#settings").textContent = JSON.stringify(await api("GET", "/api/settings"), null, 1);
}
const drawers = {active: drawActive, history: drawHistory, devices: drawDevices,
  processes: drawProcesses, subscriptions: drawSubscriptions, cluster: drawCluster,
  server: drawServer};

function current() {
  const hash = decodeURIComponent(location.hash.slice(1)) || "active";
  return hash.startsWith("job/") ? ["job", hash.slice(4)] : [hash in drawers ? hash : "active", ""];
}
let refreshing = false;
async function refresh() {
  if (!csrf || refreshing) return;
  refreshing = true;
  const [name, arg] = current();
  for (const s of document.querySelectorAll("[data-section]")) s.hidden = s.id !== name;
  try {
    if (name === "job") await drawJob(arg); else await drawers[name]();
    $("#live").textContent = "updated " + new Date().toLocaleTimeString();
    if (!$("#alert").dataset.sticky) problem("");
  } catch (e) {
    if (e.status === 401) { csrf = ""; start(); }
    else problem(e.message);
  } finally { refreshing = false; }
}

// --- sign-in ------------------------------------------------------------------------------
function signedIn(s) {
  csrf = s.csrf;
  $("#user").textContent = s.user ? "signed in as " + s.user : "development mode";
  $("#sign-out").hidden = false; $("#nav").hidden = false;
  $("#nav-cluster").hidden = !s.cluster;
  $("#sign-in-section").hidden = true;
  refresh();
}
async function start() {
  try {
    const s = await api("GET", "/api/session");
    if (s.signed_in) return signedIn(s);
    if (s.sign_in === "password") {
      for (const x of document.querySelectorAll("[data-section]")) x.hidden = true;
      $("#sign-in-section").hidden = false; $("#nav").hidden = true;
      $("#sign-in").user.focus();
      return;
    }
    signedIn(await api("POST", "/api/session", {}));
  } catch (e) { problem(e.message); }
}
$("#sign-in").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target;
  try {
    signedIn(await api("POST", "/api/session", {user: f.user.value, password: f.password.value}));
    f.password.value = ""; problem("");
  } catch (e) { problem("Sign-in refused: " + e.message); }
});
$("#sign-out").addEventListener("click", async () => {
  try { await api("DELETE", "/api/session"); } catch (e) { problem(e.message); }
  csrf = ""; $("#sign-out").hidden = true; $("#user").textContent = ""; start();
});
$("#search").addEventListener("submit", (ev) => {
  ev.preventDefault(); historyCursors = [""]; refresh();
});
$("#older").addEventListener("click", () => { historyCursors.push(historyNext); refresh(); });
$("#newer").addEventListener("click", () => { historyCursors.pop(); refresh(); });
let purgeBefore = "";
$("#purge").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  purgeBefore = new Date(ev.target.before.value).toISOString();
  try {
    const r = await api("POST", "/api/history/purge", {before: purgeBefore, dry_run: true});
    $("#purge-preview").textContent = r.count + " job(s) ended before " + when(r.before) +
      " and would be removed.";
    const go = $("#purge-go"); go.hidden = !r.count; go.textContent = "Purge " + r.count + " job(s)";
  } catch (e) { problem(e.message); }
});
$("#purge-go").addEventListener("click", () => act("Remove these jobs from the history, with " +
  "their documents? This cannot be undone.", "POST", "/api/history/purge", {before: purgeBefore},
  r => { $("#purge-go").hidden = true; $("#purge-preview").textContent = "";
         return r.purged + " job(s) purged"; }));
$("#process-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const lines = (t) => t.split("\n").map(s => s.trim()).filter(Boolean);
  const body = {shares: lines(f.shares.value), emails: lines(f.emails.value),
    allow: lines(f.allow.value)};
  if (f.scan_repository.value.trim()) body.scan_repository = f.scan_repository.value.trim();
  try {
    if (editing) await api("PUT", "/api/processes/" + encodeURIComponent(editing), body);
    else await api("POST", "/api/processes", Object.assign({name: f.elements["name"].value}, body));
    $("#done").textContent = "scan process " + (editing || f.elements["name"].value) + " saved";
    problem(""); f.reset(); etags.clear(); refresh();
  } catch (e) { problem(e.message); }
});
$("#process-form").addEventListener("reset", () => {
  editing = ""; $("#process-form").elements["name"].readOnly = false;
  $("#process-form-title").textContent = "New scan process";
});
window.addEventListener("hashchange", () => { historyCursors = [""]; refresh(); });
// Live updates: a poll every 2 s with If-None-Match: while nothing changes, each costs one
// request head and a 304 without a body.
setInterval(refresh, 2000);
start();
