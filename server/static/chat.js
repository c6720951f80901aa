// The chat page: one prompt to one or two served names, both answers streamed side by side through the
// public OpenAI routes (/v1/...), and the admin routes (/admin/models) for loading, swapping and
// unloading checkpoints. Plain DOM, no framework, no build step; all text goes in through textContent.
"use strict";

const DEFAULT_PAIR = ["gemma3-270m-awq", "gemma3-270m-awq-opt"];
const NONE = "";
const $ = (id) => document.getElementById(id);

// Keys live in this tab's session storage only (gone when the tab closes), never in a cookie.
const keys = {
  get api() { return sessionStorage.getItem("lape-awq-api-key") || ""; },
  set api(value) { sessionStorage.setItem("lape-awq-api-key", value); },
  get admin() { return sessionStorage.getItem("lape-awq-admin-key") || ""; },
  set admin(value) { sessionStorage.setItem("lape-awq-admin-key", value); },
};

let config = { api_key_required: false, admin: "open" };
let modelsListed = false; // after the first listing, a reload keeps the user's choices
const panes = [
  { element: $("pane-a"), select: $("model-a"), history: [] },
  { element: $("pane-b"), select: $("model-b"), history: [] },
];

// --- talking to the server -----------------------------------------------------------------------------

/** A readable message for a refused request: the status and the server's own words. */
async function describeError(response) {
  let text = await response.text();
  try {
    const body = JSON.parse(text);
    text = (body.error && body.error.message) || body.detail || text;
  } catch (_) { /* not JSON: keep the text */ }
  const hints = {
    401: "check the key",
    403: "admin routes are disabled on this server",
    404: "unknown name: reload the models",
    413: "the request is too large",
    429: "the server is busy, try again",
    503: "the model is still loading",
  };
  const hint = hints[response.status] ? ` (${hints[response.status]})` : "";
  return `${response.status} ${response.statusText}: ${text || "no message"}${hint}`;
}

function headers(key) {
  const out = { "Content-Type": "application/json" };
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

/** JSON from `path`, or an Error carrying describeError's message. */
async function requestJson(path, key, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers(key) });
  } catch (error) {
    throw new Error(`the server did not answer (${error.message})`);
  }
  if (!response.ok) throw new Error(await describeError(response));
  return response.json();
}

function setStatus(element, message, isError = false) {
  element.textContent = message;
  element.classList.toggle("error", isError);
}

// --- models --------------------------------------------------------------------------------------------

async function loadModels() {
  if (config.api_key_required && !keys.api) {
    setStatus($("status"), "This server needs an API key: enter it above.", true);
    return;
  }
  let models;
  try {
    models = (await requestJson("/v1/models", keys.api)).data;
  } catch (error) {
    setStatus($("status"), `Listing models failed: ${error.message}`, true);
    return;
  }
  const names = models.map((m) => m.id);
  const previous = panes.map((p) => p.select.value);
  const wanted = DEFAULT_PAIR.every((n) => names.includes(n)) ? DEFAULT_PAIR : names.slice(0, 2);
  panes.forEach((pane, i) => {
    pane.select.replaceChildren();
    if (i > 0) pane.select.append(new Option("(none)", NONE));
    for (const model of models) {
      const label = `${model.id} · ${model.quant_method || "float"} · ${model.state || "ready"}`;
      pane.select.append(new Option(label, model.id));
    }
    const valid = previous[i] === NONE ? i > 0 : names.includes(previous[i]);
    pane.select.value = modelsListed && valid ? previous[i] : wanted[i] || NONE;
  });
  modelsListed = true;
  showPanes();
  setStatus($("status"), `${names.length} model${names.length === 1 ? "" : "s"} served.`);
}

function showPanes() {
  for (const pane of panes) {
    const name = pane.select.value;
    pane.element.hidden = !name;
    pane.element.querySelector(".pane-title").textContent = name;
  }
  $("panes").classList.toggle("single", panes.filter((p) => p.select.value).length < 2);
}

function newChat() {
  for (const pane of panes) {
    pane.history = [];
    pane.element.querySelector(".messages").replaceChildren();
  }
  setStatus($("status"), "New chat.");
}

// --- chat ----------------------------------------------------------------------------------------------

function addMessage(pane, role, text) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  message.append(body, meta);
  pane.element.querySelector(".messages").append(message);
  return message;
}

function samplingParameters() {
  const params = {
    temperature: Number($("temperature").value),
    max_tokens: Math.round(Number($("max-tokens").value)),
  };
  if ($("seed").value !== "") params.seed = Math.round(Number($("seed").value));
  return params;
}

/** Yields every parsed `data:` event of a server-sent-event stream; UTF-8 split across reads stays whole. */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
    if (done) return;
  }
}

/** Streams one answer into `pane`; the message's data-state ends as "done" or "error". */
async function answer(pane, params) {
  const model = pane.select.value;
  const message = addMessage(pane, "assistant", "");
  const [text, meta] = [message.querySelector(".text"), message.querySelector(".meta")];
  message.dataset.state = "streaming";
  meta.textContent = "waiting…";
  const started = performance.now();
  let firstToken = null;
  let tokens = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(keys.api),
      body: JSON.stringify({
        model,
        messages: pane.history,
        stream: true,
        stream_options: { include_usage: true },
        ...params,
      }),
    });
    if (!response.ok) throw new Error(await describeError(response));
    const checkpoint = response.headers.get("x-lape-awq-checkpoint") || "?";
    const method = response.headers.get("x-lape-awq-quant-method") || "?";
    message.dataset.checkpoint = checkpoint;
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        if (firstToken === null) firstToken = performance.now();
        text.textContent += delta.content;
      }
      if (event.usage) tokens = event.usage.completion_tokens;
    }
    const ended = performance.now();
    const parts = [];
    if (firstToken !== null) parts.push(`TTFT ${((firstToken - started) / 1000).toFixed(2)} s`);
    if (tokens !== null) {
      parts.push(`${tokens} tokens`);
      if (tokens > 1 && firstToken !== null && ended > firstToken) {
        parts.push(`${((tokens - 1) / ((ended - firstToken) / 1000)).toFixed(1)} tok/s`);
      }
    }
    parts.push(`${method} · ${checkpoint}`);
    meta.textContent = parts.join(" · ");
    pane.history.push({ role: "assistant", content: text.textContent });
    message.dataset.state = "done";
  } catch (error) {
    message.classList.add("error");
    text.textContent = error.message;
    meta.textContent = model;
    pane.history.pop(); // the unanswered question leaves this pane's history
    message.dataset.state = "error";
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  const active = panes.filter((p) => p.select.value);
  if (!prompt) return;
  if (!active.length) {
    setStatus($("status"), "Pick a model first (Reload models).", true);
    return;
  }
  const params = samplingParameters();
  if (!(params.temperature >= 0) || !(params.max_tokens >= 1)) {
    setStatus($("status"), "Temperature must be >= 0 and max tokens >= 1.", true);
    return;
  }
  $("prompt").value = "";
  $("send").disabled = true;
  setStatus($("status"), "Answering…");
  for (const pane of active) {
    pane.history.push({ role: "user", content: prompt });
    addMessage(pane, "user", prompt);
  }
  await Promise.all(active.map((pane) => answer(pane, params)));
  $("send").disabled = false;
  setStatus($("status"), "Done.");
  $("prompt").focus();
}

// --- admin ---------------------------------------------------------------------------------------------

async function adminCall(method, path, body) {
  return requestJson(path, keys.admin, { method, body: body ? JSON.stringify(body) : undefined });
}

async function adminList() {
  const status = $("admin-status");
  try {
    const { data, draining } = await adminCall("GET", "/admin/models");
    const rows = data.map((m) => {
      const row = document.createElement("tr");
      for (const value of [m.id, m.state, m.quant_method, m.checkpoint_path || m.checkpoint]) {
        const cell = document.createElement("td");
        cell.textContent = value === undefined || value === null ? "" : String(value);
        row.append(cell);
      }
      const cell = document.createElement("td");
      const unload = document.createElement("button");
      unload.type = "button";
      unload.textContent = "Unload";
      unload.addEventListener("click", () => adminAct("unload", m.id));
      cell.append(unload);
      row.append(cell);
      return row;
    });
    $("admin-models").querySelector("tbody").replaceChildren(...rows);
    setStatus(status, `${data.length} served, ${draining.length} draining.`);
  } catch (error) {
    setStatus(status, error.message, true);
  }
}

async function adminAct(action, name) {
  const status = $("admin-status");
  const checkpoint = $("admin-checkpoint").value.trim();
  name = name || $("admin-name").value.trim();
  if (!name || (action === "load" && !checkpoint)) {
    setStatus(status, "Give a name and a checkpoint path (a swap without a path reloads the current one).", true);
    return;
  }
  const verbs = { load: "Loading", swap: "Swapping", unload: "Unloading" };
  setStatus(status, `${verbs[action]} ${name}… (a checkpoint takes a minute or two to start)`);
  for (const button of document.querySelectorAll("#admin button")) button.disabled = true;
  try {
    const path = `/admin/models${action === "load" ? "" : `/${encodeURIComponent(name)}`}`;
    if (action === "load") await adminCall("POST", path, { name, checkpoint });
    else if (action === "swap") await adminCall("POST", `${path}/swap`, checkpoint ? { checkpoint } : {});
    else await adminCall("DELETE", path);
    await loadModels();
    await adminList();
    setStatus(status, `${name}: ${action} done.`);
  } catch (error) {
    setStatus(status, error.message, true);
  } finally {
    for (const button of document.querySelectorAll("#admin button")) button.disabled = false;
  }
}

// --- start ---------------------------------------------------------------------------------------------

async function start() {
  try {
    config = await requestJson("/chat/config", "");
  } catch (error) {
    setStatus($("status"), `The server's page settings failed: ${error.message}`, true);
  }
  $("api-key-field").hidden = !config.api_key_required;
  $("admin-key-field").hidden = config.admin !== "key";
  $("api-key").value = keys.api;
  $("admin-key").value = keys.admin;
  $("api-key").addEventListener("change", () => { keys.api = $("api-key").value.trim(); loadModels(); });
  $("admin-key").addEventListener("change", () => { keys.admin = $("admin-key").value.trim(); });
  $("reload-models").addEventListener("click", loadModels);
  $("new-chat").addEventListener("click", newChat);
  for (const pane of panes) pane.select.addEventListener("change", showPanes);
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    // isComposing: Enter that ends a Hangul IME composition must not send.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("admin-refresh").addEventListener("click", adminList);
  $("admin-load").addEventListener("click", () => adminAct("load"));
  $("admin-swap").addEventListener("click", () => adminAct("swap"));
  if (config.admin === "disabled") {
    $("admin").hidden = true;
  }
  await loadModels();
}

start();
