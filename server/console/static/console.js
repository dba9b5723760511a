// Flywheel console: reads the public JSON API, renders it, refreshes itself. No build step.
"use strict";

const KEY = "flywheel.adminKey"; // sessionStorage: this tab's session only, never the URL
const REFRESH_MS = 5000;
const HOURS = 48;
const PALETTE = ["#2f5bd3", "#1a7f37", "#c62828", "#b26a00", "#7b3fbf", "#00838f", "#5d4037",
  "#ad1457", "#546e7a", "#9e9d24"];

const $ = (sel) => document.querySelector(sel);
const charts = {};
let timer = null;
let waitingForKey = false;

class AuthError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch { /* not JSON */ }
  if (response.status === 401 || response.status === 403) throw new AuthError(response.status, data);
  if (!response.ok) throw new Error(data?.error?.message || `HTTP ${response.status}`);
  return data;
}

// --- small DOM helpers (text only: nothing from the API is parsed as HTML) -----------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "onclick") node.addEventListener("click", value);
    else if (name === "style") node.style.cssText = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
const pct = (x) => (x === null || x === undefined ? "—" : `${(100 * x).toFixed(1)}%`);
const num = (x, digits = 2) => (typeof x === "number" ? x.toFixed(digits) : "—");
const badge = (text) => el("span", { class: `badge ${text}` }, text);
function when(unix) {
  if (!unix) return "—";
  const seconds = Date.now() / 1000 - unix;
  if (seconds < 90) return `${Math.max(0, Math.round(seconds))} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 129600) return `${Math.round(seconds / 3600)} h ago`;
  return new Date(unix * 1000).toLocaleString();
}
function took(seconds) {
  if (typeof seconds !== "number") return "—";
  return seconds < 120 ? `${Math.round(seconds)} s` : `${Math.round(seconds / 60)} min`;
}
const colours = new Map();
function colour(version) {
  if (!colours.has(version)) {
    const n = parseInt(String(version).replace(/\D+/g, ""), 10);
    colours.set(version, PALETTE[(Number.isNaN(n) ? colours.size : n) % PALETTE.length]);
  }
  return colours.get(version);
}

// --- summary cards ---------------------------------------------------------------------------------
function approvalText(live) {
  if (!live || !live.ratings) return "no thumbs yet";
  const [low, high] = live.interval || [null, null];
  return `${pct(live.approval)} (${pct(low)}–${pct(high)})`;
}
function card(label, value, detail, id) {
  return el("div", { class: "card", id }, el("div", { class: "label" }, label),
    el("div", { class: "value" }, value), el("div", { class: "detail" }, detail));
}
function renderSummary(p) {
  const byId = new Map(p.data.map((v) => [v.id, v]));
  const served = byId.get(p.served);
  const canary = p.canary ? byId.get(p.canary) : null;
  const fraction = canary?.canary?.fraction;
  const replicas = p.replicas || [];
  $("#summary").replaceChildren(
    card("served", p.served || "—", served ? approvalText(served.live) : "", "served"),
    card("canary", p.canary || "none",
      canary ? `${pct(fraction)} of requests · ${approvalText(canary.live)}` : "no rollout running",
      "canary"),
    card("best stored", p.best || "—", p.best ? approvalText(byId.get(p.best)?.live) :
      "needs enough thumbs", "best"),
    card("replicas", String(replicas.length || 1),
      replicas.length ? replicas.map((r) => `${r.id}: ${r.active}${r.canary ? ` + ${r.canary}` : ""}`)
        .join(", ") : "this server (no Redis reports)", "replicas"),
  );
  const banner = $("#banner");
  if (p.regression) {
    const r = p.regression;
    banner.textContent = `Regression: users rate ${r.better} significantly better than the ` +
      `active ${r.active}. Roll back below, or let the worker do it (FLYWHEEL_CANARY__AUTO_ROLLBACK).`;
    banner.className = "banner";
    banner.hidden = false;
  } else if (banner.dataset.kind !== "error") {
    banner.hidden = true;
  }
}

// --- versions table ----------------------------------------------------------------------------
function actionButton(label, action, version, run, cls) {
  return el("button", {
    type: "button", "data-action": action, "data-version": version, class: cls,
    onclick: async (event) => {
      const verb = `${label} ${version}`;
      if (!window.confirm(`${verb}?`)) return;
      event.target.disabled = true;
      try { await run(); showError(null); } catch (error) { handleError(error, verb); }
      await refresh();
    },
  }, label);
}
function actions(v, p) {
  const buttons = [];
  const id = encodeURIComponent(v.id);
  if (v.status === "canary") {
    buttons.push(actionButton("Promote", "promote", v.id,
      () => api("POST", `/v1/policies/${id}/activate`)));
    buttons.push(actionButton("Abort", "abort", v.id,
      () => api("DELETE", `/v1/policies/${id}/canary`), "danger"));
  } else if (v.status === "retired" || v.status === "candidate") {
    // The list is newest first: a version after the served one is older (a rollback).
    const older = p.data.indexOf(v) > p.data.findIndex((x) => x.id === p.served);
    buttons.push(actionButton(older ? "Roll back" : "Activate", "activate", v.id,
      () => api("POST", `/v1/policies/${id}/activate`)));
    if (!p.canary) {
      buttons.push(actionButton("Canary", "canary", v.id,
        () => api("POST", `/v1/policies/${id}/canary`, {})));
    }
  }
  return buttons;
}
function gateText(m) {
  if (!m || m["gate/score_gain"] === undefined) return "—";
  return `gain ${num(m["gate/score_gain"], 3)} (low ${num(m["gate/score_gain_low"], 3)})`;
}
function canaryText(m) {
  if (!m || !m["canary/decision"]) return "—";
  const parts = [m["canary/decision"]];
  for (const [key, value] of Object.entries(m)) {
    if (key.startsWith("canary/") && key !== "canary/decision" && typeof value === "number") {
      parts.push(`${key.slice(7)} ${Number.isInteger(value) ? value : value.toFixed(3)}`);
    }
  }
  if (m["canary/reason"]) parts.push(m["canary/reason"]);
  return parts.join(" · ");
}
// Regenerations, edits and copies of the version's answers (the chat page sends them).
function implicitText(counts) {
  const c = counts || {};
  return `${c.regenerate ?? 0} / ${c.edit ?? 0} / ${c.copy ?? 0}`;
}
function renderVersions(p) {
  const rows = p.data.map((v) => el("tr", { "data-version": v.id },
    el("td", {}, el("span", { class: "swatch", style: `background:${colour(v.id)}` }), v.id,
      v.id === p.served ? el("span", { class: "muted" }, " · served") : null),
    el("td", {}, badge(v.status)),
    el("td", { class: "num approval" }, approvalText(v.live)),
    el("td", { class: "num" }, v.live?.ratings ?? 0),
    el("td", { class: "num implicit" }, implicitText(v.implicit)),
    el("td", { class: "num" }, gateText(v.metrics)),
    el("td", { class: "reason" }, canaryText(v.metrics)),
    el("td", {}, when(v.created_at)),
    el("td", { class: "actions" }, actions(v, p))));
  $("#versions tbody").replaceChildren(...rows);
}

// --- training cycles and reward models -------------------------------------------------------------
function runReason(r) {
  const m = r.metrics || {};
  if (m["cycle/skip_reason"]) return m["cycle/skip_reason"];
  if (Array.isArray(m["gate/reasons"]) && m["gate/reasons"].length) return m["gate/reasons"].join("; ");
  if (r.error) return r.error;
  return m["cycle/release"] || "";
}
function gateDecision(r) {
  const reasons = (r.metrics || {})["gate/reasons"];
  if (!Array.isArray(reasons)) return "—";
  return reasons.length ? "rejected" : "passed";
}
// Consecutive skipped cycles, one item: [run] for any other, [newest, ..., oldest] for skips.
function groupSkips(runs) {
  const items = [];
  for (const r of runs) {
    const last = items[items.length - 1];
    if (r.status === "skipped" && last && last[0].status === "skipped") last.push(r);
    else items.push([r]);
  }
  return items;
}
function skipsRow(group) {
  const newest = group[0], oldest = group[group.length - 1];
  return el("tr", { "data-run": `${oldest.id}-${newest.id}`, class: "skips" },
    el("td", {}, `${oldest.id}–${newest.id}`), el("td", {}, badge("skipped")),
    el("td", {}, [...new Set(group.map((r) => r.trigger))].join(", ")),
    el("td", {}, when(newest.started_at || newest.created_at)),
    ...Array.from({ length: 6 }, () => el("td", { class: "num" }, "—")),
    el("td", { class: "reason" }, `${group.length} cycles skipped; the last: ${runReason(newest)}`));
}
function judgedPairs(m) {
  // A first reward model is judged on held-out pairs and, by cross-validation, the others'.
  if (m["reward/cross_validated_pairs"] === undefined) return m["reward/holdout_pairs"] ?? "—";
  return `${m["reward/judged_pairs"] ?? "—"} (${m["reward/holdout_pairs"] ?? 0} held-out, ` +
    `${m["reward/cross_validated_pairs"]} cross-validated)`;
}
function renderRuns(runs) {
  const rows = groupSkips(runs).map((group) => {
    if (group.length > 1) return skipsRow(group);
    const r = group[0];
    const m = r.metrics || {};
    const seconds = m["cycle/seconds"] ?? (r.finished_at && r.started_at ? r.finished_at - r.started_at : null);
    return el("tr", { "data-run": r.id },
      el("td", {}, r.id), el("td", {}, badge(r.status)), el("td", {}, r.trigger),
      el("td", {}, when(r.started_at || r.created_at)), el("td", { class: "num" }, took(seconds)),
      el("td", {}, r.policy_id || "—"),
      el("td", { class: "num" }, m["reward/accuracy"] === undefined ? "—" :
        `${pct(m["reward/accuracy"])} (${pct(m["reward/accuracy_low"])})`),
      el("td", { class: "num" }, num(m["ppo/kl_ref_final"] ?? m["gate/candidate_kl_ref"], 3)),
      el("td", { class: "num" }, m["gate/score_gain"] === undefined ? "—" :
        `${num(m["gate/score_gain"], 3)} (${num(m["gate/score_gain_low"], 3)})`),
      el("td", {}, gateDecision(r)), el("td", { class: "reason" }, runReason(r)));
  });
  $("#runs tbody").replaceChildren(...rows);
  const models = runs.filter((r) => r.reward_model_id).map((r) => {
    const m = r.metrics || {};
    return el("tr", { "data-reward-model": r.reward_model_id },
      el("td", {}, r.reward_model_id), el("td", {}, r.id),
      el("td", { class: "num" }, `${pct(m["reward/accuracy"])} (${pct(m["reward/accuracy_low"])})`),
      el("td", { class: "num" }, judgedPairs(m)),
      el("td", {}, r.status === "skipped" ? "no (below the floor)" : "yes"));
  });
  $("#reward-models tbody").replaceChildren(...(models.length ? models :
    [el("tr", {}, el("td", { colspan: 5, class: "muted" }, "no reward model trained yet"))]));
}

// --- charts (uPlot) ------------------------------------------------------------------------------
function hourAxis(rows) {
  return [...new Set(rows.map((r) => r.hour))].sort((a, b) => a - b);
}
function drawChart(name, target, series, data, yAxis) {
  const node = $(target);
  if (!data[0].length) {
    charts[name]?.destroy();
    delete charts[name];
    node.replaceChildren(el("div", { class: "empty" }, `no thumbs in the last ${HOURS} h`));
    return;
  }
  const signature = series.map((s) => s.label).join("|");
  const width = Math.max(300, node.clientWidth || 600);
  if (charts[name] && charts[name].signature === signature) {
    charts[name].setData(data);
    return;
  }
  charts[name]?.destroy();
  node.replaceChildren();
  const plot = new uPlot({
    width, height: 240, series: [{}, ...series],
    scales: { x: { time: true } }, axes: [{}, yAxis], legend: { live: true },
  }, data, node);
  plot.signature = signature;
  charts[name] = plot;
  if (!document.body.dataset.chartRendered) {
    // Time from navigation start to the first chart drawn (read by the browser test).
    document.body.dataset.chartRendered = String(Math.round(performance.now()));
    performance.mark("flywheel-first-chart");
  }
}
function renderApproval(page) {
  const rows = page.data;
  const xs = hourAxis(rows);
  const versions = [...new Set(rows.map((r) => r.version))].sort();
  const index = new Map(xs.map((x, i) => [x, i]));
  const data = [xs, ...versions.map((v) => {
    const ys = new Array(xs.length).fill(null);
    for (const r of rows) if (r.version === v) ys[index.get(r.hour)] = r.approval;
    return ys;
  })];
  const series = versions.map((v) => ({
    label: v, stroke: colour(v), width: 2, spanGaps: false, points: { show: true, size: 5 },
    value: (_, y) => (y === null ? "—" : pct(y)),
  }));
  drawChart("approval", "#approval-chart", series, data,
    { values: (_, ticks) => ticks.map((t) => `${Math.round(t * 100)}%`) });
}
function renderVolume(page) {
  const xs = page.data.map((r) => r.hour);
  const data = [xs, page.data.map((r) => r.up), page.data.map((r) => r.down)];
  const series = [
    { label: "up", stroke: "#1a7f37", fill: "rgba(26,127,55,.12)", width: 2 },
    { label: "down", stroke: "#c62828", fill: "rgba(198,40,40,.10)", width: 2 },
  ];
  drawChart("volume", "#volume-chart", series, data, {});
}

// --- errors, the key, the refresh loop ------------------------------------------------------------
function showError(message) {
  const banner = $("#banner");
  if (!message) {
    if (banner.dataset.kind === "error") { banner.hidden = true; banner.dataset.kind = ""; }
    return;
  }
  banner.textContent = message;
  banner.className = "banner error";
  banner.dataset.kind = "error";
  banner.hidden = false;
}
function askForKey(reason) {
  waitingForKey = true;
  $("#key-reason").textContent = reason;
  const dialog = $("#key-dialog");
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
}
function handleError(error, what) {
  if (error instanceof AuthError) {
    if (error.code === "admin_disabled") {
      showError("Admin routes are closed on this server: set FLYWHEEL_ADMIN_KEY to use the console.");
    } else {
      askForKey(sessionStorage.getItem(KEY) ? "That key was refused: enter the admin key." :
        "This server needs its admin key (FLYWHEEL_ADMIN_KEY). It stays in this tab's session only.");
    }
    return;
  }
  showError(`${what}: ${error.message}`);
}

async function refresh() {
  clearTimeout(timer);
  const query = `?hours=${HOURS}`;
  const [policies, runs, approval, volume] = await Promise.allSettled([
    api("GET", "/v1/policies"), api("GET", "/v1/training/runs?limit=50"),
    api("GET", `/v1/history/approval${query}`), api("GET", `/v1/history/feedback${query}`),
  ]);
  const failed = [policies, runs, approval, volume].find((r) => r.status === "rejected");
  if (policies.status === "fulfilled") { renderSummary(policies.value); renderVersions(policies.value); }
  if (runs.status === "fulfilled") renderRuns(runs.value.data);
  if (approval.status === "fulfilled") renderApproval(approval.value);
  if (volume.status === "fulfilled") renderVolume(volume.value);
  if (failed) {
    handleError(failed.reason, failed.reason instanceof TypeError ? "server unreachable" : "refresh");
  } else {
    showError(null);
  }
  $("#forget-key").hidden = !sessionStorage.getItem(KEY);
  $("#refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.refreshed = String(Date.now());
  if (!waitingForKey) timer = setTimeout(refresh, REFRESH_MS);
}

$("#key-form").addEventListener("submit", () => {
  sessionStorage.setItem(KEY, $("#key-input").value.trim());
  $("#key-input").value = "";
  waitingForKey = false;
  refresh();
});
$("#forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  refresh();
});
$("#train-now").addEventListener("click", async (event) => {
  event.target.disabled = true;
  try { await api("POST", "/v1/training/runs"); } catch (error) { handleError(error, "train now"); }
  event.target.disabled = false;
  refresh();
});
window.addEventListener("resize", () => {
  for (const [name, plot] of Object.entries(charts)) {
    const node = $(name === "approval" ? "#approval-chart" : "#volume-chart");
    plot.setSize({ width: Math.max(300, node.clientWidth), height: 240 });
  }
});
document.addEventListener("visibilitychange", () => { if (!document.hidden && !waitingForKey) refresh(); });
refresh();
