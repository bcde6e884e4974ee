// seekling chat: plain JS, no build step. Talks to /v1/chat/completions (streamed) and keeps the history
// on the server in /api/conversations. Model output is Markdown, sanitised by DOMPurify before display; math
// ($...$, $$...$$, \(...\), \[...\] and a bare \boxed{...}) is typeset by KaTeX. Tools given in the settings
// are offered to the model; its calls are shown, and you answer for the tool.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, list: [], conv: null, controller: null, busy: false };
const SETTINGS = ["temperature", "top_p", "max_tokens"];

// ------------------------------------------------------------------------------------------ server calls
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem("seekling.key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const resp = await fetch(path, { method, headers: headers(), body: body ? JSON.stringify(body) : undefined });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error((data.error && data.error.message) || `${resp.status} ${resp.statusText}`);
  return data;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// ------------------------------------------------------------------------------------------ rendering
// Math is cut out before Markdown sees it (Markdown would eat its backslashes and underscores) and put back as
// placeholders that KaTeX renders into. Code, fenced or inline, is left as it is.
const MATH = /\$\$[\s\S]+?\$\$|\\\[[\s\S]+?\\\]|\\\([\s\S]+?\\\)|\\boxed\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}|\$[^\s$](?:[^$\n]*[^\s$])?\$/g;
const CODE = /(```[\s\S]*?(?:```|$)|`[^`\n]*`)/;

function texOf(src) {
  if (src.startsWith("$$") || src.startsWith("\\[")) return [src.slice(2, -2), true];
  if (src.startsWith("\\(")) return [src.slice(2, -2), false];
  if (src.startsWith("$")) return [src.slice(1, -1), false];
  return [src, false];  // a bare \boxed{...}
}

function markdown(text) {
  const maths = [];
  const protectedText = (text || "").split(CODE).map((part, i) => i % 2 ? part : part.replace(MATH, (m) => {
    maths.push(m);
    return `<span class="math" data-math="${maths.length - 1}"></span>`;
  })).join("");
  const div = document.createElement("div");
  div.innerHTML = DOMPurify.sanitize(marked.parse(protectedText));
  div.querySelectorAll("span.math[data-math]").forEach((el) => {
    const src = maths[Number(el.dataset.math)];
    if (src === undefined) return;
    const [tex, displayMode] = texOf(src);
    // katex.render builds DOM nodes and sets styles through the CSSOM, which the page's CSP allows.
    try { katex.render(tex, el, { displayMode, throwOnError: false }); } catch (e) { el.textContent = src; }
  });
  div.querySelectorAll("pre code").forEach((el) => hljs.highlightElement(el));
  return div;
}

function toolCallBlock(call, answerable) {
  const box = document.createElement("div");
  box.className = "tool-call";
  const name = document.createElement("div");
  name.className = "tool-name";
  name.textContent = "Tool call: " + call.function.name;
  const args = document.createElement("pre");
  args.className = "tool-args";
  try { args.textContent = JSON.stringify(JSON.parse(call.function.arguments || "{}"), null, 2); }
  catch (e) { args.textContent = call.function.arguments; }
  box.append(name, args);
  if (answerable) {
    const result = document.createElement("textarea");
    result.className = "tool-result";
    result.dataset.callId = call.id;
    result.rows = 2;
    result.placeholder = `Result of ${call.function.name} (you answer for the tool)`;
    box.append(result);
  }
  return box;
}

function thinkingBlock(msg, live) {
  const details = document.createElement("details");
  details.className = "thinking";
  details.open = live;
  const summary = document.createElement("summary");
  summary.textContent = live && msg.thought_s == null ? "Thinking…" : `Thought for ${Math.max(1, Math.round(msg.thought_s || 0))} s`;
  const body = document.createElement("div");
  body.className = "reasoning";
  body.textContent = msg.reasoning;
  details.append(summary, body);
  return details;
}

function renderMessage(msg, index, live = false) {
  const wrap = document.createElement("div");
  wrap.className = "msg " + msg.role;
  wrap.dataset.index = index;
  if (msg.role === "assistant" && msg.reasoning) wrap.append(thinkingBlock(msg, live));
  const bubble = document.createElement("div");
  bubble.className = "bubble" + (live ? " cursor" : "");
  if (msg.role === "assistant") bubble.append(markdown(msg.content));
  else bubble.textContent = msg.role === "tool" ? `${toolName(msg.tool_call_id)} → ${msg.content}` : msg.content;
  wrap.append(bubble);
  const answerable = !live && state.conv && index === state.conv.messages.length - 1;
  (msg.tool_calls || []).forEach((c) => wrap.append(toolCallBlock(c, answerable)));
  if (!live) wrap.append(actions(msg, index));
  return wrap;
}

function actions(msg, index) {
  const bar = document.createElement("div");
  bar.className = "actions";
  const last = index === state.conv.messages.length - 1;
  const button = (label, fn) => {
    const b = document.createElement("button");
    b.textContent = label;
    b.onclick = fn;
    bar.append(b);
  };
  if (msg.role === "user") button("Edit", () => startEdit(index));
  if (msg.role === "assistant" && last && msg.tool_calls) button("Send tool results", sendToolResults);
  if (msg.role === "assistant" && last) button("Regenerate", regenerate);
  if (msg.role === "assistant") button("Copy", () => navigator.clipboard && navigator.clipboard.writeText(msg.content));
  return bar;
}

function renderConversation() {
  const box = $("messages");
  box.replaceChildren();
  const conv = state.conv;
  $("chat-title").textContent = conv ? conv.title : "New chat";
  if (!conv || conv.messages.length === 0) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = state.model ? `Chat with ${state.model}` : "Start a conversation";
    box.append(empty);
  } else {
    conv.messages.forEach((m, i) => box.append(renderMessage(m, i)));
  }
  box.scrollTop = box.scrollHeight;
  $("system").value = conv ? conv.system || "" : $("system").value;
  if (conv && conv.settings) {
    SETTINGS.forEach((k) => { if (conv.settings[k] != null) $(k).value = conv.settings[k]; });
    if (conv.settings.thinking != null) $("thinking").checked = conv.settings.thinking;
  }
  renderList();
}

function toolName(callId) {
  for (const m of (state.conv && state.conv.messages) || []) {
    const call = (m.tool_calls || []).find((c) => c.id === callId);
    if (call) return call.function.name;
  }
  return "tool";
}

function renderList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of state.list) {
    const li = document.createElement("li");
    li.textContent = c.title;
    li.title = c.title;
    if (state.conv && state.conv.id === c.id) li.className = "active";
    li.onclick = () => openConversation(c.id);
    ul.append(li);
  }
}

// ------------------------------------------------------------------------------------------ history
async function refreshList() {
  state.list = (await api("GET", "/api/conversations")).data;
  renderList();
}

async function openConversation(id) {
  if (state.busy) return;
  state.conv = await api("GET", "/api/conversations/" + id);
  localStorage.setItem("seekling.last", id);
  renderConversation();
}

function currentSettings() {
  const s = { thinking: $("thinking").checked };
  SETTINGS.forEach((k) => { s[k] = Number($(k).value); });
  return s;
}

function currentTools() {
  const text = $("tools").value.trim();
  if (!text) return null;
  const tools = JSON.parse(text);  // a syntax error is shown to the user by generate()
  if (!Array.isArray(tools)) throw new Error("Tools must be a JSON array of OpenAI tool definitions.");
  return tools;
}

async function save() {
  const c = state.conv;
  const body = { title: c.title, messages: c.messages, system: $("system").value, settings: currentSettings() };
  if (!c.id) Object.assign(c, await api("POST", "/api/conversations", body));
  else await api("PUT", "/api/conversations/" + c.id, body);
  localStorage.setItem("seekling.last", c.id);
  await refreshList();
}

// ------------------------------------------------------------------------------------------ generation
async function send(text) {
  if (!text.trim() || state.busy) return;
  if (!state.conv) state.conv = { id: null, title: text.trim().slice(0, 48), messages: [] };
  state.conv.messages.push({ role: "user", content: text });
  $("input").value = "";
  renderConversation();
  await generate();
}

async function generate() {
  const conv = state.conv;
  const settings = currentSettings();
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  conv.messages.forEach((m) => {
    const out = { role: m.role, content: m.content };
    if (m.tool_calls) out.tool_calls = m.tool_calls;
    if (m.tool_calls && m.reasoning) out.reasoning_content = m.reasoning;  // DeepSeek's rule, within a tool loop
    if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
    messages.push(out);
  });
  const msg = { role: "assistant", content: "", reasoning: "" };
  const box = $("messages");
  let node = renderMessage(msg, conv.messages.length, true);
  box.append(node);
  setBusy(true);
  showError("");
  const started = performance.now();
  let pending = false;
  const redraw = () => {  // at most one redraw per frame while tokens stream in
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      const fresh = renderMessage(msg, conv.messages.length, true);
      node.replaceWith(fresh);
      node = fresh;
      box.scrollTop = box.scrollHeight;
    });
  };
  state.controller = new AbortController();
  try {
    const body = { model: state.model, messages, stream: true, temperature: settings.temperature,
                   top_p: settings.top_p, max_tokens: settings.max_tokens,
                   thinking: { type: settings.thinking ? "enabled" : "disabled" } };
    const tools = currentTools();
    if (tools) body.tools = tools;
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal, body: JSON.stringify(body),
    });
    if (!resp.ok) {
      const data = await resp.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || `${resp.status} ${resp.statusText}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;  // keep-alive comments too
        const chunk = JSON.parse(event.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = (chunk.choices[0] || {}).delta || {};
        if (delta.reasoning_content) msg.reasoning += delta.reasoning_content;
        if (delta.content || delta.tool_calls) {
          if (msg.reasoning && msg.thought_s == null) msg.thought_s = (performance.now() - started) / 1000;
          msg.content += delta.content || "";
        }
        for (const tc of delta.tool_calls || []) {  // OpenAI's stream: the first piece has id and name
          msg.tool_calls = msg.tool_calls || [];
          const call = msg.tool_calls[tc.index] ||
            (msg.tool_calls[tc.index] = { id: tc.id, type: "function", function: { name: "", arguments: "" } });
          if (tc.function && tc.function.name) call.function.name = tc.function.name;
          if (tc.function && tc.function.arguments) call.function.arguments += tc.function.arguments;
        }
        redraw();
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    state.controller = null;
    if (msg.reasoning && msg.thought_s == null) msg.thought_s = (performance.now() - started) / 1000;
    if (msg.content || msg.reasoning || msg.tool_calls) conv.messages.push(msg);
    setBusy(false);
    renderConversation();
    try { await save(); } catch (err) { showError("Could not save the conversation: " + err.message); }
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function sendToolResults() {
  if (state.busy) return;
  const boxes = [...document.querySelectorAll("textarea.tool-result")];
  boxes.forEach((b) => state.conv.messages.push({ role: "tool", tool_call_id: b.dataset.callId, content: b.value }));
  renderConversation();
  await generate();
}

async function regenerate() {
  if (state.busy) return;
  state.conv.messages.pop();
  renderConversation();
  await generate();
}

function startEdit(index) {
  if (state.busy) return;
  const node = document.querySelector(`.msg[data-index="${index}"]`);
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = state.conv.messages[index].content;
  const resend = document.createElement("button");
  resend.className = "primary";
  resend.textContent = "Save & send";
  resend.onclick = async () => {
    state.conv.messages = state.conv.messages.slice(0, index);
    state.conv.messages.push({ role: "user", content: box.value });
    renderConversation();
    await generate();
  };
  const cancel = document.createElement("button");
  cancel.textContent = "Cancel";
  cancel.onclick = renderConversation;
  node.replaceChildren(box, resend, cancel);
  box.focus();
}

function exportConversation() {
  if (!state.conv) return;
  const blob = new Blob([JSON.stringify(state.conv, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = (state.conv.title || "conversation").replace(/[^\w.-]+/g, "_") + ".json";
  a.click();
  URL.revokeObjectURL(a.href);
}

async function deleteConversation() {
  if (!state.conv || state.busy) return;
  if (state.conv.id) {
    if (!confirm(`Delete "${state.conv.title}"?`)) return;
    await api("DELETE", "/api/conversations/" + state.conv.id);
  }
  state.conv = null;
  localStorage.removeItem("seekling.last");
  await refreshList();
  renderConversation();
}

// ------------------------------------------------------------------------------------------ start
async function start() {
  $("api-key").value = localStorage.getItem("seekling.key") || "";
  const defaults = JSON.parse(localStorage.getItem("seekling.settings") || "{}");
  SETTINGS.forEach((k) => { if (defaults[k] != null) $(k).value = defaults[k]; });
  if (defaults.thinking != null) $("thinking").checked = defaults.thinking;
  $("tools").value = localStorage.getItem("seekling.tools") || "";
  try {
    const config = await api("GET", "/api/config");
    state.model = config.model;
    $("max_tokens").max = config.max_tokens_cap;
    await refreshList();
    const last = localStorage.getItem("seekling.last");
    if (last && state.list.some((c) => c.id === last)) await openConversation(last);
    else renderConversation();
    showError("");
  } catch (err) {
    showError(err.message + " — set your API key in Settings.");
    $("settings").hidden = false;
    renderConversation();
  }
}

$("composer").onsubmit = (e) => { e.preventDefault(); send($("input").value); };
$("input").onkeydown = (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send($("input").value); }
};
$("stop").onclick = () => state.controller && state.controller.abort();
$("new-chat").onclick = () => { if (!state.busy) { state.conv = null; renderConversation(); $("input").focus(); } };
$("toggle-settings").onclick = () => { $("settings").hidden = !$("settings").hidden; };
$("export").onclick = exportConversation;
$("delete").onclick = () => deleteConversation().catch((err) => showError(err.message));
$("api-key").onchange = () => { localStorage.setItem("seekling.key", $("api-key").value.trim()); start(); };
[...SETTINGS, "thinking"].forEach((k) => {
  $(k).onchange = () => localStorage.setItem("seekling.settings", JSON.stringify(currentSettings()));
});
$("tools").onchange = () => localStorage.setItem("seekling.tools", $("tools").value);
start();
