/* The CodeShell web page: a streamed multi-turn chat (conversations kept in localStorage) and
 * a fill-in-the-middle playground, both over this server's OpenAI API. No framework, no CDN. */
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "codeshell.conversations.v1";
const KEY_STORE = "codeshell.apiKey";
let MODEL = null;
let controller = null;  // AbortController of the request in flight

// ---- server access ------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_STORE);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function describeError(resp) {
  let msg = `HTTP ${resp.status}`;
  try { const j = await resp.json(); msg = (j.error && (j.error.message || j.error)) || msg; } catch (_) { /* not JSON */ }
  if (resp.status === 503) {
    const after = resp.headers.get("Retry-After");
    return `The server is busy${after ? ` — try again in ${after} s` : ""}. (${msg})`;
  }
  if (resp.status === 401) return "This server needs an API key: click the API key button to set it.";
  return msg;
}

function banner(text, kind = "error") {
  const b = $("banner");
  if (!text) { b.hidden = true; return; }
  b.textContent = text;
  b.className = `banner ${kind}`;
  b.hidden = false;
}

/* POST a streaming request; calls onData(json) for each SSE `data:` event until [DONE]. */
async function streamSSE(path, body, onData) {
  controller = new AbortController();
  const resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                   signal: controller.signal });
  if (!resp.ok) throw new Error(await describeError(resp));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message || j.error);
        onData(j);
      }
    }
  }
}

async function loadModel() {
  try {
    const h = await fetch("/health").then((r) => r.json());
    $("status").textContent = h.status === "ok" ? "ready" : h.status;
    $("status").className = `status ${h.status === "ok" ? "ok" : "warn"}`;
    if (h.status === "loading") { setTimeout(loadModel, 1500); }
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) { banner(await describeError(r)); return; }
    MODEL = (await r.json()).data[0].id;
    $("model").textContent = MODEL;
  } catch (e) {
    $("status").textContent = "offline";
    $("status").className = "status warn";
    banner(`Cannot reach the server: ${e.message}`);
  }
}

// ---- conversations --------------------------------------------------------------------------------
let convs = JSON.parse(localStorage.getItem(STORE) || "[]");
let current = null;

function save() { localStorage.setItem(STORE, JSON.stringify(convs.slice(0, 100))); }

function newConversation() {
  current = { id: Date.now().toString(36), title: "New chat", messages: [] };
  convs.unshift(current);
  save(); renderList(); renderMessages();
  $("chat-input").focus();
}

function renderList() {
  const ul = $("conversations");
  ul.innerHTML = "";
  for (const c of convs) {
    const li = document.createElement("li");
    li.className = c === current ? "active" : "";
    const open = document.createElement("button");
    open.className = "conv"; open.textContent = c.title;
    open.onclick = () => { current = c; renderList(); renderMessages(); document.body.classList.remove("show-sidebar"); };
    const del = document.createElement("button");
    del.className = "del"; del.textContent = "✕"; del.title = "Delete conversation";
    del.onclick = () => {
      convs = convs.filter((x) => x !== c); save();
      if (current === c) { current = convs[0] || null; if (!current) return newConversation(); }
      renderList(); renderMessages();
    };
    li.append(open, del);
    ul.append(li);
  }
}

function messageNode(m) {
  const div = document.createElement("div");
  div.className = `msg ${m.role}`;
  const body = document.createElement("div");
  body.className = "body";
  if (m.role === "assistant") body.innerHTML = CSMarkdown.render(m.content || "");
  else body.textContent = m.content;
  div.append(body);
  return div;
}

function renderMessages() {
  const box = $("messages");
  box.innerHTML = "";
  if (!current || !current.messages.length) {
    box.innerHTML = '<p class="empty">Ask CodeShell to write, explain or fix code.</p>';
    return;
  }
  for (const m of current.messages) box.append(messageNode(m));
  box.scrollTop = box.scrollHeight;
}

function busy(on) {
  $("send").disabled = on; $("regen").disabled = on; $("stop").hidden = !on;
  $("play-run").disabled = on;
}

async function answer() {
  const msgs = current.messages.map(({ role, content }) => ({ role, content }));
  const reply = { role: "assistant", content: "" };
  current.messages.push(reply);
  const box = $("messages");
  const node = messageNode(reply);
  node.classList.add("streaming");
  box.append(node);
  const body = node.querySelector(".body");
  busy(true); banner(null);
  try {
    await streamSSE("/v1/chat/completions", {
      model: MODEL, messages: msgs, stream: true,
      temperature: +$("chat-temp").value, max_tokens: +$("chat-max").value,
    }, (j) => {
      const d = j.choices && j.choices[0] && j.choices[0].delta;
      if (d && d.content) {
        reply.content += d.content;
        body.innerHTML = CSMarkdown.render(reply.content);
        box.scrollTop = box.scrollHeight;
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") {
      banner(e.message);
      if (!reply.content) current.messages.pop();
    }
  } finally {
    node.classList.remove("streaming");
    busy(false); controller = null; save(); renderMessages();
  }
}

async function send(text) {
  if (!text.trim() || controller) return;
  if (!current) newConversation();
  current.messages.push({ role: "user", content: text });
  if (current.title === "New chat") current.title = text.slice(0, 40);
  $("chat-input").value = "";
  renderList(); renderMessages(); save();
  await answer();
}

async function regenerate() {
  if (!current || controller) return;
  while (current.messages.length && current.messages[current.messages.length - 1].role === "assistant") {
    current.messages.pop();
  }
  if (!current.messages.length) return;
  renderMessages();
  await answer();
}

// ---- playground -----------------------------------------------------------------------------------
let lastCompletion = "";

async function complete() {
  if (controller) return;
  const prefix = $("play-prefix").value, suffix = $("play-suffix").value, lang = $("play-lang").value;
  const out = $("play-result");
  lastCompletion = "";
  $("play-accept").disabled = true;
  const show = () => {
    out.innerHTML = CSMarkdown.highlight(prefix, lang) +
      `<mark class="fim">${CSMarkdown.escape(lastCompletion)}</mark>` + CSMarkdown.highlight(suffix, lang);
  };
  show();
  busy(true); banner(null);
  try {
    await streamSSE("/v1/completions", {
      model: MODEL, prompt: prefix, suffix, stream: true,
      temperature: +$("play-temp").value, max_tokens: +$("play-max").value,
    }, (j) => { if (j.choices && j.choices[0]) { lastCompletion += j.choices[0].text; show(); } });
    out.classList.add("done");
    $("play-accept").disabled = false;
  } catch (e) {
    if (e.name !== "AbortError") banner(e.message);
  } finally {
    busy(false); controller = null;
  }
}

// ---- wiring ---------------------------------------------------------------------------------------
function showView(name) {
  for (const b of document.querySelectorAll(".tabs button")) b.setAttribute("aria-selected", b.dataset.view === name);
  $("view-chat").hidden = name !== "chat";
  $("view-play").hidden = name !== "play";
}

document.addEventListener("click", (ev) => {
  const btn = ev.target.closest(".copy");
  if (!btn) return;
  const code = btn.parentElement.querySelector("code").textContent;
  (navigator.clipboard ? navigator.clipboard.writeText(code) : Promise.reject()).then(
    () => { btn.textContent = "Copied"; setTimeout(() => { btn.textContent = "Copy"; }, 1200); },
    () => { btn.textContent = "Copy failed"; });
});

$("chat-form").addEventListener("submit", (ev) => { ev.preventDefault(); send($("chat-input").value); });
$("chat-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send($("chat-input").value); }
});
$("stop").onclick = () => controller && controller.abort();
$("regen").onclick = regenerate;
$("new-chat").onclick = newConversation;
$("menu").onclick = () => document.body.classList.toggle("show-sidebar");
for (const b of document.querySelectorAll(".tabs button")) b.onclick = () => showView(b.dataset.view);
$("play-run").onclick = complete;
$("play-accept").onclick = () => {
  $("play-prefix").value += lastCompletion;
  $("play-accept").disabled = true;
};
for (const id of ["play-prefix", "play-suffix"]) {
  $(id).addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); complete(); }
  });
}
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && controller) controller.abort(); });
$("key").onclick = () => {
  const k = prompt("API key for this server (leave empty for none):", localStorage.getItem(KEY_STORE) || "");
  if (k === null) return;
  if (k) localStorage.setItem(KEY_STORE, k); else localStorage.removeItem(KEY_STORE);
  banner(null); loadModel();
};

current = convs[0] || null;
renderList(); renderMessages();
loadModel();
