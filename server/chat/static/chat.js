// Flywheel chat: conversations through the public /v1 API, with thumbs, rankings and implicit
// signals on the answers. No build step; nothing from the API is parsed as HTML.
"use strict";

const KEY = "flywheel.apiKey"; // sessionStorage: this tab's session only, never the URL
const BROWSER = "flywheel.browserId"; // localStorage: one stable anonymous id per browser

const $ = (sel) => document.querySelector(sel);
let model = null; // the served model's name, from /v1/models
let turns = []; // {user, compare, completionId, answers: [{text, rating, ...}], chosen}
let busy = false;
let editing = null; // the index of the turn whose question is being edited
let asked = 0; // answers asked for and ended, shown on <body> (tests wait for it)

class APIError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

function browserId() {
  let id = localStorage.getItem(BROWSER);
  if (!id) {
    const bytes = crypto.getRandomValues(new Uint8Array(12));
    id = "browser-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    localStorage.setItem(BROWSER, id);
  }
  return id;
}

// --- the API -------------------------------------------------------------------------------------
function headers(json) {
  const out = { Accept: json ? "application/json" : "text/event-stream" };
  const key = sessionStorage.getItem(KEY);
  if (key) out.Authorization = `Bearer ${key}`;
  out["Content-Type"] = "application/json";
  return out;
}

async function send(method, path, body) {
  const response = await fetch(path, {
    method, headers: headers(true), cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) throw new APIError(response.status, data);
  return data;
}

// POST a streamed chat completion; `onChunk` gets each parsed chunk, in order.
async function streamChat(body, onChunk) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(false), cache: "no-store", body: JSON.stringify(body),
  });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch { /* not JSON */ }
    throw new APIError(response.status, data);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the answer stopped before it ended; ask again");
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        onChunk(chunk);
      }
    }
  }
}

// Thumbs, rankings and implicit signals all name the browser in `user`.
const feedback = (body) => send("POST", "/v1/feedback", { ...body, user: browserId() });
const ranking = (body) => send("POST", "/v1/rankings", { ...body, user: browserId() });
const implicit = (body) => send("POST", "/v1/feedback/implicit", { ...body, user: browserId() });

// --- errors and the key --------------------------------------------------------------------------
function showError(message) {
  const banner = $("#banner");
  banner.textContent = message || "";
  banner.hidden = !message;
}

function askForKey(reason) {
  $("#key-reason").textContent = reason;
  const dialog = $("#key-dialog");
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
}

function handleError(error, what) {
  if (error instanceof APIError && error.status === 401) {
    askForKey(sessionStorage.getItem(KEY) ? "That key was refused: enter an API key." :
      "This server needs an API key. It stays in this browser tab's session only.");
  } else if (error instanceof APIError && error.code === "not_your_completion") {
    showError(`${what}: this answer was given to another key; only that key may rate it.`);
  } else {
    showError(`${what}: ${error instanceof TypeError ? "server unreachable" : error.message}`);
  }
}

async function loadModel() {
  try {
    const models = await send("GET", "/v1/models");
    model = models.data[0]?.id ?? null;
    $("#model").textContent = model || "";
    showError(null);
  } catch (error) {
    handleError(error, "loading the model");
  }
  $("#forget-key").hidden = !sessionStorage.getItem(KEY);
}

// --- the conversation ----------------------------------------------------------------------------
// The messages that lead to turn `index`: earlier questions with the answers chosen for them.
function messagesFor(index) {
  const messages = [];
  turns.slice(0, index).forEach((turn) => {
    messages.push({ role: "user", content: turn.user });
    messages.push({ role: "assistant", content: turn.answers[turn.chosen ?? 0]?.text ?? "" });
  });
  messages.push({ role: "user", content: turns[index].user });
  return messages;
}

// Ask for the answers of turn `index` (a new question, or the same one again).
async function ask(index) {
  const turn = turns[index];
  turn.completionId = null;
  turn.chosen = null;
  turn.answers = Array.from({ length: turn.compare ? 2 : 1 }, () => ({ text: "", streaming: true }));
  busy = true;
  render();
  try {
    await streamChat({ model, messages: messagesFor(index), stream: true,
                       n: turn.answers.length, user: browserId() }, (chunk) => {
      turn.completionId = chunk.id;
      for (const choice of chunk.choices) {
        const answer = turn.answers[choice.index];
        if (!answer) continue;
        answer.text += choice.delta?.content ?? "";
        if (answer.textNode) answer.textNode.textContent = answer.text;
      }
    });
    showError(null);
  } catch (error) {
    handleError(error, "asking");
    if (!turn.completionId) {
      turns.splice(index, 1); // nothing was answered: the question goes back to the box
      $("#prompt").value = turn.user;
    }
  } finally {
    for (const answer of turn.answers) answer.streaming = false;
    busy = false;
    render();
    document.body.dataset.asked = String(++asked);
  }
}

// An implicit signal on the answer the conversation went on from; a failure only shows.
function signal(turn, name, index = turn.chosen ?? 0) {
  if (!turn.completionId) return Promise.resolve();
  return implicit({ completion_id: turn.completionId, choice_index: index, signal: name })
    .catch((error) => handleError(error, name));
}

async function regenerate(index) {
  await signal(turns[index], "regenerate");
  turns[index].compare = $("#compare").checked;
  await ask(index);
}

async function rate(turn, index, rating) {
  const answer = turn.answers[index];
  const body = { completion_id: turn.completionId, choice_index: index, rating };
  if (answer.comment) body.comment = answer.comment;
  try {
    await feedback(body);
    answer.rating = rating;
    answer.commenting = true;
    answer.status = rating === "up" ? "Thanks!" : "Thanks: say what was wrong, if you like.";
  } catch (error) {
    handleError(error, "rating");
  }
  render();
}

async function sendComment(turn, index) {
  const answer = turn.answers[index];
  answer.comment = answer.draft?.trim() || null;
  if (!answer.comment || !answer.rating) return;
  try {
    // A later vote of the same rater on the same answer replaces the earlier one.
    await feedback({ completion_id: turn.completionId, choice_index: index,
                     rating: answer.rating, comment: answer.comment });
    answer.commenting = false;
    answer.status = "Comment sent.";
  } catch (error) {
    handleError(error, "commenting");
  }
  render();
}

async function choose(turn, index) {
  const other = 1 - index;
  try {
    await ranking({ completion_id: turn.completionId, ranking: [index, other] });
    turn.chosen = index;
  } catch (error) {
    handleError(error, "choosing");
  }
  render();
}

async function copy(turn, index) {
  const answer = turn.answers[index];
  try { await navigator.clipboard.writeText(answer.text); } catch { /* no clipboard: still a copy */ }
  answer.status = "Copied.";
  copied(turn, index);
  render();
}

function copied(turn, index) {
  const answer = turn.answers[index];
  if (answer.copied) return; // one signal per answer, however often it is copied
  answer.copied = true;
  signal(turn, "copy", index);
}

function edit(index) {
  editing = index;
  $("#prompt").value = turns[index].user;
  $("#send").textContent = "Resend";
  $("#cancel-edit").hidden = false;
  $("#prompt").focus();
}

function stopEditing() {
  editing = null;
  $("#send").textContent = "Send";
  $("#cancel-edit").hidden = true;
}

async function submit() {
  const text = $("#prompt").value.trim();
  if (!text || busy) return;
  if (model === null) await loadModel();
  if (editing !== null) {
    await signal(turns[editing], "edit");
    turns.splice(editing);
    stopEditing();
  }
  $("#prompt").value = "";
  turns.push({ user: text, compare: $("#compare").checked, answers: [] });
  await ask(turns.length - 1);
}

// --- rendering (DOM APIs only) -------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function button(action, label, onclick, attrs = {}) {
  return el("button", { type: "button", "data-action": action, disabled: busy, onclick, ...attrs },
            label);
}

function renderAnswer(turn, index) {
  const answer = turn.answers[index];
  const classes = ["msg", "assistant"];
  if (answer.streaming) classes.push("streaming");
  if (turn.chosen !== null && turn.chosen !== undefined && turn.compare) {
    classes.push(turn.chosen === index ? "chosen" : "not-chosen");
  }
  const text = el("div", { class: "text" }, answer.text);
  answer.textNode = text;
  text.addEventListener("copy", () => copied(turn, index));
  const node = el("div", { class: classes.join(" "), "data-choice": index }, text);
  if (answer.streaming || !turn.completionId) return node;
  node.append(el("div", { class: "actions" },
    button("up", "Good", () => rate(turn, index, "up"),
           { "aria-pressed": String(answer.rating === "up"), title: "Thumbs up: a good answer" }),
    button("down", "Bad", () => rate(turn, index, "down"),
           { "aria-pressed": String(answer.rating === "down"), title: "Thumbs down: a bad answer" }),
    button("copy", "Copy", () => copy(turn, index)),
    turn.compare && turn.chosen === null &&
      button("better", "This one is better", () => choose(turn, index)),
    el("span", { class: "status muted" }, answer.status || "")));
  if (answer.commenting) node.append(renderComment(turn, index));
  return node;
}

function renderComment(turn, index) {
  const answer = turn.answers[index];
  const input = el("input", { class: "comment-input", type: "text", maxlength: "10000",
                              placeholder: "Add a comment (optional)" });
  input.value = answer.draft || "";
  input.addEventListener("input", () => { answer.draft = input.value; });
  const form = el("form", { class: "comment" }, input,
                  el("button", { type: "submit", "data-action": "comment" }, "Send comment"));
  form.addEventListener("submit", (event) => { event.preventDefault(); sendComment(turn, index); });
  return form;
}

function renderTurn(turn, index) {
  const last = index === turns.length - 1;
  const question = el("div", { class: "msg user" }, el("div", { class: "text" }, turn.user));
  if (!busy) question.append(el("div", { class: "actions" }, button("edit", "Edit", () => edit(index))));
  const answers = el("div", { class: turn.compare ? "answers compare" : "answers" },
                     turn.answers.map((_, i) => renderAnswer(turn, i)));
  const node = el("li", { class: "turn", "data-turn": index }, question, answers);
  if (turn.compare && turn.completionId && turn.chosen === null && !busy) {
    node.append(el("p", { class: "muted" }, "Which is better? The conversation goes on from the one you pick."));
  }
  if (last && !busy && turn.completionId) {
    node.append(el("div", { class: "turn-actions" },
                   button("regenerate", "Regenerate", () => regenerate(index))));
  }
  return node;
}

function render() {
  $("#conversation").replaceChildren(...turns.map(renderTurn));
  $("#intro").hidden = turns.length > 0;
  $("#send").disabled = busy;
}

// --- wiring --------------------------------------------------------------------------------------
$("#composer").addEventListener("submit", (event) => { event.preventDefault(); submit(); });
$("#prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
$("#cancel-edit").addEventListener("click", () => { stopEditing(); $("#prompt").value = ""; });
$("#new-chat").addEventListener("click", () => {
  if (busy) return;
  turns = [];
  stopEditing();
  showError(null);
  render();
});
$("#key-form").addEventListener("submit", () => {
  sessionStorage.setItem(KEY, $("#key-input").value.trim());
  $("#key-input").value = "";
  loadModel();
});
$("#forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  loadModel();
});
$("#browser-id").textContent = browserId();
render();
loadModel();
