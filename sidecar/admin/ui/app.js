// The approver page: plain JS, no build step. Every value from the API is shown with
// textContent (never innerHTML): request fields come from the agent and are untrusted.
//
// The queue is ordered by expiry (soonest first) with a live countdown and a pending count.
// Each card shows the held call's body as the sidecar kept it (masked, bounded, pretty-printed)
// with the amount, records and payee-like fields set apart above it.
// A critical-risk call needs a comment and a second, explicit confirmation. A comment being
// typed survives the 5-second refresh, new held calls arriving, and a reload of the tab.
"use strict";

const TOKEN_KEY = "agent-sidecar-approver-token";
const DRAFTS_KEY = "agent-sidecar-comment-drafts";
const REFRESH_MS = 5000;
const $ = (id) => document.getElementById(id);
let timer = null;
let ticker = null;
const cards = new Map();  // approval id -> {node, signature}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function drafts() {
  try { return JSON.parse(sessionStorage.getItem(DRAFTS_KEY) || "{}") || {}; } catch (error) { return {}; }
}

function keepDraft(id, text) {
  const all = drafts();
  if (text) { all[id] = text; } else { delete all[id]; }
  sessionStorage.setItem(DRAFTS_KEY, JSON.stringify(all));
}

function say(text, ok) {
  const message = $("message");
  message.textContent = text;
  message.className = ok ? "message ok" : "message";
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ cache: "no-store" }, options, {
    headers: Object.assign({ "Authorization": "Bearer " + token(), "Content-Type": "application/json" },
                           (options && options.headers) || {}),
  }));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.detail || body.title || ("HTTP " + response.status));
    error.status = response.status;
    throw error;
  }
  return body;
}

// "2026-01-01 12:00:00 UTC": to the second, no milliseconds.
function when(epochSeconds) {
  return new Date(Math.round(epochSeconds) * 1000).toISOString().replace("T", " ").replace(".000Z", " UTC");
}

// "in 14 min 5 s", "in 45 s", "expired 3 min ago".
function countdown(epochSeconds) {
  const left = Math.round(epochSeconds - Date.now() / 1000);
  const span = Math.abs(left);
  const hours = Math.floor(span / 3600);
  const minutes = Math.floor((span % 3600) / 60);
  const seconds = span % 60;
  const text = hours ? hours + " h " + minutes + " min" : minutes ? minutes + " min " + seconds + " s" : seconds + " s";
  return left >= 0 ? "expires in " + text : "expired " + text + " ago";
}

// "08:10:34" of an ISO timestamp or epoch seconds (UTC); the full value is the cell's title.
function clockTime(at) {
  const date = typeof at === "number" ? new Date(at * 1000) : new Date(String(at));
  return isNaN(date.getTime()) ? String(at) : date.toISOString().slice(11, 19);
}

function bytes(count) { return count === 1 ? "1 byte" : count + " bytes"; }

// 5000 as "5000", 1234.5 as "1234.5"; never in exponent form for the amounts approvers read.
function numberText(value) {
  return Number.isInteger(value) ? String(value) : String(Number(value.toFixed(6)));
}

// The values set apart: the measures (amount, records, ...), then the highlighted fields.
function keyValues(body) {
  if (!body) { return []; }
  const pairs = [];
  for (const [name, value] of Object.entries(body.measures || {})) {
    pairs.push({ label: name, title: "measured by the route: " + name, value: numberText(value), kind: "measure" });
  }
  for (const item of body.highlights || []) {
    pairs.push({ label: item.path.replace(/^\$\./, ""), title: item.path + (item.why === "reason"
      ? " (named by the policy's reasons)" : " (approvals.highlight_fields)"), value: item.value, kind: item.why });
  }
  return pairs;
}

// The body as the sidecar kept it: the measured and highlighted values set apart, then the
// pretty-printed body (masked fields already replaced server-side), or why it is not shown.
function showBody(node, body) {
  const values = node.querySelector(".values");
  const note = node.querySelector(".body-note");
  const text = node.querySelector(".body-text");
  const masked = node.querySelector(".masked-note");
  const tell = (message) => { note.textContent = message; note.hidden = false; };
  if (!body) { tell("Body not recorded (held before this sidecar kept body previews)."); return; }
  const pairs = keyValues(body);
  for (const pair of pairs) {
    const term = document.createElement("dt");
    term.textContent = pair.label;
    term.title = pair.title;
    const value = document.createElement("dd");
    value.textContent = pair.value;
    value.className = "value-" + pair.kind;
    values.append(term, value);
  }
  values.hidden = pairs.length === 0;
  if (body.kind === "empty" || body.size === 0) {
    tell("No body.");
  } else if (body.kind === "opaque") {
    tell("The body is neither JSON nor a form: only its size and hash are shown.");
  } else if (body.text == null) {
    tell("Body previews are off (approvals.body_preview_bytes is 0): only its size and hash are shown.");
  } else {
    text.textContent = body.text + (body.truncated ? "\n\u2026 (cut: the whole body is " + bytes(body.size) + ")" : "");
    text.hidden = false;
  }
  if ((body.masked || []).length) {
    masked.textContent = "Masked: " + body.masked.map((path) => path.replace(/^\$\./, "")).join(", ");
    masked.hidden = false;
  }
}

function fill(node, selector, text) { node.querySelector(selector).textContent = text == null ? "" : String(text); }

function isCritical(approval) { return approval.risk === "critical"; }

function render(approval) {
  const node = $("approval-template").content.firstElementChild.cloneNode(true);
  node.id = approval.id;
  node.dataset.expiresAt = String(approval.expires_at);
  node.classList.add("risk-" + approval.risk);
  const binding = approval.binding;
  fill(node, ".risk", approval.risk);
  fill(node, ".method", binding.method);
  fill(node, ".target", binding.target);
  const clock = node.querySelector(".countdown");
  clock.textContent = countdown(approval.expires_at);
  clock.title = "expires " + when(approval.expires_at);
  fill(node, ".approval-id", approval.id);
  fill(node, ".agent", binding.agent);
  fill(node, ".task", binding.task_id || "(no task)");
  fill(node, ".intent", (approval.task && approval.task.intent) || approval.intent || "(none declared)");
  const given = approval.approvals.map((a) => a.approver).join(", ");
  fill(node, ".approvers", approval.approvals.length + " of " + approval.approvers_required +
       (approval.group ? " from group " + approval.group : "") + (given ? " (so far: " + given + ")" : ""));
  const body = approval.body;
  fill(node, ".body-hash", body ? bytes(body.size) + ", sha256 " + body.sha256 + (body.content_type ? ", " + body.content_type : "")
                                : "sha256 " + binding.body_sha256);
  showBody(node, body);
  const reasons = node.querySelector(".reasons");
  for (const reason of approval.reasons) {
    const item = document.createElement("li");
    item.textContent = reason;
    reasons.appendChild(item);
  }
  const rows = node.querySelector(".recent tbody");
  const recent = (approval.task && approval.task.recent) || [];
  fill(node, ".recent-count", recent.length);
  if (recent.length === 0) {
    const row = rows.insertRow();
    const cell = row.insertCell();
    cell.colSpan = 5;
    cell.className = "empty";
    cell.textContent = "no earlier calls in this task";
  }
  for (const call of recent.slice().reverse()) {
    const row = rows.insertRow();
    const at = row.insertCell();
    at.textContent = clockTime(call.at);
    at.title = String(call.at);
    for (const value of [call.route, call.method, call.path, call.outcome]) {
      row.insertCell().textContent = value;
    }
  }
  const comment = node.querySelector(".comment");
  comment.value = drafts()[approval.id] || "";
  comment.addEventListener("input", () => keepDraft(approval.id, comment.value));
  if (isCritical(approval)) {
    node.querySelector(".required").hidden = false;
    comment.required = true;
  }
  node.querySelector(".approve").addEventListener("click", () => ask(approval, "approve", node));
  node.querySelector(".deny").addEventListener("click", () => ask(approval, "deny", node));
  node.querySelector(".confirm-no").addEventListener("click", () => confirmation(node, null));
  return node;
}

// Critical risk: a comment first, then a second, explicit step naming what is decided.
function ask(approval, verdict, node) {
  if (!isCritical(approval)) { decide(approval.id, verdict, node); return; }
  const comment = node.querySelector(".comment");
  if (!comment.value.trim()) {
    say("a comment is required to " + verdict + " a critical-risk call", false);
    comment.focus();
    return;
  }
  const binding = approval.binding;
  const values = keyValues(approval.body).slice(0, 4).map((pair) => pair.label + " " + pair.value).join(", ");
  const text = (verdict === "approve" ? "Approve " : "Deny ") + binding.method + " " + binding.target +
    (values ? " [" + values + "]" : "") + " (critical risk" + (verdict === "approve" && approval.approvers_required > 1
      ? ", " + approval.approvers_required + " approvers needed" : "") + ")?";
  confirmation(node, { text: text, verdict: verdict, run: () => decide(approval.id, verdict, node) });
}

function confirmation(node, question) {
  const box = node.querySelector(".confirm");
  const yes = node.querySelector(".confirm-yes");
  node.querySelector(".verdicts").hidden = question !== null;
  box.hidden = question === null;
  if (question === null) { yes.onclick = null; return; }
  node.querySelector(".confirm-text").textContent = question.text;
  yes.textContent = question.verdict === "approve" ? "Yes, approve" : "Yes, deny";
  yes.className = "confirm-yes verdict-" + question.verdict;
  yes.onclick = () => { confirmation(node, null); question.run(); };
  yes.focus();
}

async function decide(id, verdict, node) {
  const comment = node.querySelector(".comment").value;
  try {
    const result = await api("/v1/approvals/" + encodeURIComponent(id) + "/" + verdict, {
      method: "POST", body: JSON.stringify({ comment: comment }),
    });
    keepDraft(id, "");
    node.querySelector(".comment").value = "";
    say(id + " is now " + result.status, true);
  } catch (error) {
    say(verdict + " " + id + " refused: " + error.message, false);
  }
  await load();
}

function signature(approval) {
  return JSON.stringify([approval.status, approval.approvals.length, approval.expires_at,
                         ((approval.task && approval.task.recent) || []).length]);
}

// Update the list in place: unchanged cards (and the comment being typed in one) are kept.
function show(approvals) {
  const list = $("approvals");
  const ordered = approvals.slice().sort((a, b) => a.expires_at - b.expires_at || (a.id < b.id ? -1 : 1));
  const focused = document.activeElement;
  const caret = focused && focused.classList && focused.classList.contains("comment")
    ? { id: focused.closest("article").id, start: focused.selectionStart, end: focused.selectionEnd } : null;
  const wanted = new Set(ordered.map((a) => a.id));
  for (const [id, card] of cards) {
    if (!wanted.has(id)) { card.node.remove(); cards.delete(id); }
  }
  const empty = list.querySelector(":scope > .empty");
  if (empty) { empty.remove(); }
  let previous = null;
  for (const approval of ordered) {
    let card = cards.get(approval.id);
    const current = signature(approval);
    if (!card || card.signature !== current) {
      const node = render(approval);
      const open = card && card.node.querySelector(".history").open;
      if (open) { node.querySelector(".history").open = true; }
      if (card) { card.node.replaceWith(node); }
      card = { node: node, signature: current };
      cards.set(approval.id, card);
    }
    const after = previous ? previous.nextSibling : list.firstChild;
    if (after !== card.node) { list.insertBefore(card.node, after); }
    previous = card.node;
  }
  if (ordered.length === 0) {
    const note = document.createElement("p");
    note.className = "empty";
    note.textContent = "Nothing is waiting for approval.";
    list.appendChild(note);
  }
  if (caret && cards.has(caret.id)) {  // the comment being typed keeps its focus and caret
    const input = cards.get(caret.id).node.querySelector(".comment");
    if (document.activeElement !== input) {
      input.focus();
      input.setSelectionRange(caret.start, caret.end);
    }
  }
  const pending = $("pending");
  pending.hidden = false;
  pending.textContent = ordered.length + " pending";
}

function tick() {
  for (const clock of document.querySelectorAll("#approvals .countdown")) {
    clock.textContent = countdown(Number(clock.closest("article").dataset.expiresAt));
  }
}

async function load() {
  if (!token()) { return; }
  let data;
  try {
    data = await api("/v1/approvals");
  } catch (error) {
    say("cannot list approvals: " + error.message, false);
    if (error.status === 401) { signOut(); }
    return;
  }
  $("who").textContent = "signed in as " + data.approver.subject +
    (data.approver.groups.length ? " (" + data.approver.groups.join(", ") + ")" : "");
  showSignedIn(true);
  const first = cards.size === 0;
  show(data.approvals);
  const wanted = location.hash.slice(1);
  if (first && wanted && document.getElementById(wanted)) { document.getElementById(wanted).scrollIntoView(); }
}

function showSignedIn(signedIn) {
  $("signin-button").hidden = signedIn;
  $("token").hidden = signedIn;
  $("token-label").hidden = signedIn;
  $("signout-button").hidden = !signedIn;
  $("refresh-button").hidden = !signedIn;
}

function start() {
  if (!timer) { timer = setInterval(load, REFRESH_MS); }
  if (!ticker) { ticker = setInterval(tick, 1000); }
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(DRAFTS_KEY);
  if (timer) { clearInterval(timer); timer = null; }
  if (ticker) { clearInterval(ticker); ticker = null; }
  $("approvals").replaceChildren();
  cards.clear();
  $("pending").hidden = true;
  $("who").textContent = "not signed in";
  showSignedIn(false);
}

async function signIn() {
  const value = $("token").value.trim();
  if (!value) { say("paste an approver token first", false); return; }
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  say("", false);
  await load();
  if (token()) { start(); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-button").addEventListener("click", signIn);
  $("signout-button").addEventListener("click", () => { signOut(); say("signed out", true); });
  $("refresh-button").addEventListener("click", load);
  if (token()) { load(); start(); }
});
