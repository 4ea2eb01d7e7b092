// The approver page: plain JS, no build step. Every value from the API is shown with
// textContent (never innerHTML): request fields come from the agent and are untrusted.
"use strict";

const TOKEN_KEY = "agent-sidecar-approver-token";
const REFRESH_MS = 5000;
const $ = (id) => document.getElementById(id);
let timer = null;
let shown = null;  // what the list shows now: re-render only on change, so a comment being typed survives

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

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

function when(epochSeconds) { return new Date(epochSeconds * 1000).toISOString().replace(".000", ""); }

function fill(node, selector, text) { node.querySelector(selector).textContent = text == null ? "" : String(text); }

function render(approval) {
  const node = $("approval-template").content.firstElementChild.cloneNode(true);
  node.id = approval.id;
  node.classList.add("risk-" + approval.risk);
  const binding = approval.binding;
  fill(node, ".method", binding.method);
  fill(node, ".target", binding.target);
  fill(node, ".approval-id", approval.id);
  fill(node, ".agent", binding.agent);
  fill(node, ".task", binding.task_id || "(no task)");
  fill(node, ".intent", (approval.task && approval.task.intent) || approval.intent || "(none declared)");
  fill(node, ".risk", approval.risk);
  const given = approval.approvals.map((a) => a.approver).join(", ");
  fill(node, ".approvers", approval.approvals.length + " of " + approval.approvers_required +
       (approval.group ? " from group " + approval.group : "") + (given ? " (so far: " + given + ")" : ""));
  fill(node, ".expires", when(approval.expires_at));
  fill(node, ".body-hash", binding.body_sha256);
  const reasons = node.querySelector(".reasons");
  for (const reason of approval.reasons) {
    const item = document.createElement("li");
    item.textContent = reason;
    reasons.appendChild(item);
  }
  const rows = node.querySelector(".recent tbody");
  const recent = (approval.task && approval.task.recent) || [];
  if (recent.length === 0) {
    const row = rows.insertRow();
    const cell = row.insertCell();
    cell.colSpan = 5;
    cell.className = "empty";
    cell.textContent = "no earlier calls in this task";
  }
  for (const call of recent.slice().reverse()) {
    const row = rows.insertRow();
    for (const value of [call.at, call.route, call.method, call.path, call.outcome]) {
      row.insertCell().textContent = value;
    }
  }
  node.querySelector(".approve").addEventListener("click", () => decide(approval.id, "approve", node));
  node.querySelector(".deny").addEventListener("click", () => decide(approval.id, "deny", node));
  return node;
}

async function decide(id, verdict, node) {
  const comment = node.querySelector(".comment").value;
  try {
    const result = await api("/v1/approvals/" + encodeURIComponent(id) + "/" + verdict, {
      method: "POST", body: JSON.stringify({ comment: comment }),
    });
    say(id + " is now " + result.status, true);
  } catch (error) {
    say(verdict + " " + id + " refused: " + error.message, false);
  }
  await load();
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
  const signature = JSON.stringify(data.approvals.map((a) => [a.id, a.status, a.approvals.length]));
  showSignedIn(true);
  if (signature === shown) { return; }
  shown = signature;
  const list = $("approvals");
  list.replaceChildren();
  if (data.approvals.length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Nothing is waiting for approval.";
    list.appendChild(empty);
  }
  for (const approval of data.approvals) { list.appendChild(render(approval)); }
  const wanted = location.hash.slice(1);
  if (wanted && document.getElementById(wanted)) { document.getElementById(wanted).scrollIntoView(); }
}

function showSignedIn(signedIn) {
  $("signin-button").hidden = signedIn;
  $("token").hidden = signedIn;
  $("token-label").hidden = signedIn;
  $("signout-button").hidden = !signedIn;
  $("refresh-button").hidden = !signedIn;
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  if (timer) { clearInterval(timer); timer = null; }
  $("approvals").replaceChildren();
  shown = null;
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
  if (token() && !timer) { timer = setInterval(load, REFRESH_MS); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-button").addEventListener("click", signIn);
  $("signout-button").addEventListener("click", () => { signOut(); say("signed out", true); });
  $("refresh-button").addEventListener("click", load);
  if (token()) { load(); timer = setInterval(load, REFRESH_MS); }
});
