// The page of `fastserve serve`: a chat over /v1/chat/completions (streamed) and a live view of
// /v1/status. No framework, no build step. Text from the model, the server or localStorage is
// put in the page with textContent, or through renderMarkdown, which escapes it before adding
// the few tags it knows.
"use strict";

(() => {
  const STORE = { apiKey: "fastserve.apiKey", conversation: "fastserve.conversation",
                  temperature: "fastserve.temperature", maxTokens: "fastserve.maxTokens" };
  const STATUS_EVERY_MS = 2000;
  const $ = (id) => document.getElementById(id);

  // -- markdown ----------------------------------------------------------------------------

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;

  // Inline spans of one line: `code`, [links](https://...), **bold**, *italic*, _italic_.
  // The line is escaped first; code and links become numbered slots (NUL-delimited; NUL is
  // removed from the source) so that no later rule rewrites inside them.
  function inline(line) {
    const slots = [];
    const slot = (html) => `\u0000${slots.push(html) - 1}\u0000`;
    let s = escapeHtml(line);
    s = s.replace(/`([^`]+)`/g, (_, code) => slot(`<code>${code}</code>`));
    s = s.replace(/\[([^\]]+)\]\(([^()\s]+)\)/g, (all, label, url) =>
      SAFE_URL.test(url) ? slot(`<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`) : all);
    s = s.replace(/\*\*(?=\S)([^*]*?\S)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^\w*])\*(?=\S)([^*]*?\S)\*(?![\w*])/g, "$1<em>$2</em>");
    s = s.replace(/(^|[^\w])_(?=\S)([^_]*?\S)_(?!\w)/g, "$1<em>$2</em>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => slots[Number(i)]);
  }

  // Paragraphs, headings, bulleted and numbered lists of the text outside code fences.
  function blocks(lines) {
    const out = [];
    let para = [];
    let list = null;  // {ordered, items}
    const flushPara = () => {
      if (para.length) out.push(`<p>${para.map(inline).join("<br>")}</p>`);
      para = [];
    };
    const flushList = () => {
      if (!list) return;
      const tag = list.ordered ? "ol" : "ul";
      out.push(`<${tag}>${list.items.map((item) => `<li>${inline(item)}</li>`).join("")}</${tag}>`);
      list = null;
    };
    for (const line of lines) {
      if (!line.trim()) { flushPara(); flushList(); continue; }
      const item = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/.exec(line);
      if (item) {
        flushPara();
        const ordered = /\d/.test(item[1]);
        if (list && list.ordered !== ordered) flushList();
        list = list || { ordered, items: [] };
        list.items.push(item[2]);
        continue;
      }
      const heading = /^(#{1,6})\s+(.*)$/.exec(line);
      if (heading) {
        flushPara(); flushList();
        const level = Math.min(5, heading[1].length + 2);  // h3..h5: the page has h1 and h2
        out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
        continue;
      }
      if (list && /^\s/.test(line)) {  // an indented line goes on with the last item
        list.items[list.items.length - 1] += " " + line.trim();
        continue;
      }
      flushList();
      para.push(line);
    }
    flushPara(); flushList();
    return out.join("");
  }

  // Markdown -> HTML in which every character of `source` is escaped. A fence still open (the
  // answer is streaming) is a code block up to the end.
  function renderMarkdown(source) {
    const out = [];
    let text = [];
    let code = null;  // lines of the open fence
    for (const line of source.replace(/\u0000/g, "").split("\n")) {
      if (/^\s*```/.test(line)) {
        if (code === null) {
          out.push(blocks(text)); text = []; code = [];
        } else {
          out.push(`<pre><code>${escapeHtml(code.join("\n"))}</code></pre>`); code = null;
        }
      } else if (code !== null) {
        code.push(line);
      } else {
        text.push(line);
      }
    }
    out.push(code !== null ? `<pre><code>${escapeHtml(code.join("\n"))}</code></pre>` : blocks(text));
    return out.join("");
  }

  // -- settings kept in the browser ---------------------------------------------------------

  const stored = (key) => { try { return localStorage.getItem(key) || ""; } catch { return ""; } };
  const store = (key, value) => { try { localStorage.setItem(key, value); } catch { /* private mode */ } };

  function authHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.message === "string") {
        return response.status === 401 ? `${body.error.message} (the API key field, top right)` : body.error.message;
      }
    } catch { /* not JSON */ }
    return `HTTP ${response.status}`;
  }

  // -- the conversation ---------------------------------------------------------------------

  const ROLES = new Set(["system", "user", "assistant"]);
  let conversation = loadConversation();  // [{role, content, note?, error?}]
  let controller = null;                  // AbortController of the answer streaming now
  let modelId = "";

  function loadConversation() {
    try {
      const saved = JSON.parse(stored(STORE.conversation) || "[]");
      if (!Array.isArray(saved)) return [];
      return saved.filter((m) => m && ROLES.has(m.role) && typeof m.content === "string")
        .map((m) => ({ role: m.role, content: m.content,
                       ...(typeof m.note === "string" ? { note: m.note } : {}), ...(m.error ? { error: true } : {}) }));
    } catch {
      return [];
    }
  }

  const save = () => store(STORE.conversation, JSON.stringify(conversation));

  function bubble(message) {
    const el = document.createElement("div");
    el.className = `msg ${message.role}`;
    fill(el, message);
    return el;
  }

  function fill(el, message) {
    if (message.role === "assistant") {
      el.innerHTML = renderMarkdown(message.content);  // escaped by renderMarkdown
    } else {
      el.textContent = message.content;
    }
    if (message.note) {
      const note = document.createElement("span");
      note.className = message.error ? "note error" : "note";
      note.textContent = message.note;
      el.append(note);
    }
  }

  function showConversation() {
    const box = $("messages");
    if (!conversation.length) {
      const empty = document.createElement("p");
      empty.className = "empty";
      empty.textContent = modelId ? `Ask ${modelId} something.` : "Ask something.";
      box.replaceChildren(empty);
      return;
    }
    box.replaceChildren(...conversation.map(bubble));
    box.scrollTop = box.scrollHeight;
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  function requestBody(messages) {
    const body = { model: modelId, stream: true,
                   messages: messages.filter((m) => !m.error && m.content !== "").map(({ role, content }) => ({ role, content })) };
    const temperature = $("temperature").value.trim();
    const maxTokens = $("max-tokens").value.trim();
    if (temperature !== "") body.temperature = Number(temperature);
    if (maxTokens !== "") body.max_tokens = Number(maxTokens);
    return body;
  }

  // The SSE of /v1/chat/completions, one `data: ...` event at a time.
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data) yield data;
      }
    }
  }

  async function send(text) {
    if (controller) return;
    $("chat-error").hidden = true;
    conversation.push({ role: "user", content: text });
    const answer = { role: "assistant", content: "" };
    const history = conversation.slice();
    conversation.push(answer);
    save();
    showConversation();
    const el = $("messages").lastElementChild;
    el.classList.add("streaming");
    let deltas = 0;
    controller = new AbortController();
    setBusy(true);
    try {
      if (!modelId) await loadModel();
      const response = await fetch("/v1/chat/completions", {
        method: "POST", signal: controller.signal,
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(requestBody(history)),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const data of events(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the server ended the answer with an error");
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && typeof choice.delta.content === "string" && choice.delta.content) {
          answer.content += choice.delta.content;
          el.dataset.deltas = String(++deltas);
          fill(el, answer);
          const box = $("messages");
          box.scrollTop = box.scrollHeight;
        }
        if (choice.finish_reason === "length") answer.note = "(cut at max tokens)";
      }
    } catch (err) {
      if (err.name === "AbortError") {
        answer.note = "(stopped)";
      } else {
        answer.note = String(err.message || err);
        answer.error = answer.content === "";
      }
    } finally {
      controller = null;
      el.classList.remove("streaming");
      el.dataset.done = "1";
      fill(el, answer);
      save();
      setBusy(false);
    }
  }

  function stop() {
    if (controller) controller.abort();
  }

  function newConversation() {
    stop();
    conversation = [];
    save();
    showConversation();
    $("input").focus();
  }

  async function loadModel() {
    try {
      const response = await fetch("/health");
      if (response.ok) modelId = (await response.json()).model || "";
    } catch { /* the status panel says the server is unreachable */ }
    $("model").textContent = modelId;
  }

  // -- the cluster view ---------------------------------------------------------------------

  const bytes = (n) => {
    for (const [unit, size] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
      if (n >= size) return `${(n / size).toFixed(1)} ${unit}`;
    }
    return `${n} B`;
  };
  const rate = (x) => (x >= 100 ? x.toFixed(0) : x.toFixed(1));

  function cell(text, sub) {
    const td = document.createElement("td");
    td.textContent = text;
    if (sub) {
      const span = document.createElement("span");
      span.className = "sub";
      span.textContent = sub;
      td.append(span);
    }
    return td;
  }

  function row(cells, className) {
    const tr = document.createElement("tr");
    if (className) tr.className = className;
    tr.append(...cells);
    return tr;
  }

  let lastSample = null;  // {t, tokens}: the rate of generation between two polls

  function showStatus(s) {
    const now = performance.now();
    let live = null;
    if (lastSample && now > lastSample.t) live = ((s.tokens_generated - lastSample.tokens) * 1000) / (now - lastSample.t);
    lastSample = { t: now, tokens: s.tokens_generated };

    if (s.model && !modelId) { modelId = s.model; $("model").textContent = modelId; }
    $("layout").textContent = `Layout: ${s.plan || s.layout || "?"}`;
    const kvHeld = (s.kv_tokens || 0) + ((s.prompt_cache && s.prompt_cache.kv_tokens) || 0);
    const facts = [
      ["generating", !s.active_sessions && !s.queue_length ? "idle"
        : live === null ? "…" : `${rate(Math.max(0, live))} tokens/s`],
      ["per session", `${rate(s.decode_tokens_per_s || 0)} tokens/s (mean)`],
      ["sessions", `${s.active_sessions} active · ${s.queue_length} waiting · max ${s.max_sessions}`],
      ["tokens", `${s.tokens_generated} generated · ctx ${s.ctx}`],
      ["scheduler", `${s.scheduler} · mean batch ${(s.mean_decode_batch || 0).toFixed(1)}`],
      ["up", `${s.uptime_s} s`],
    ];
    $("summary").replaceChildren(...facts.flatMap(([k, v]) => {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      return [dt, dd];
    }));
    const budget = s.kv_budget_tokens || 0;
    $("kv-bar").style.width = budget ? `${Math.min(100, (100 * kvHeld) / budget)}%` : "0";
    $("kv-text").textContent = `KV ${kvHeld} / ${budget} tokens`;

    $("machines").tBodies[0].replaceChildren(...(s.machines || []).map((m) => {
      const holds = m.layers ? `layers ${m.layers[0]}–${m.layers[1] - 1} (${m.layers[1] - m.layers[0]})`
        : m.share !== null && m.share !== undefined ? `${Math.round(100 * m.share)}% of each layer` : "nothing";
      const where = m.address || (m.host ? "host" : "");
      return row([cell(m.name, where), cell(holds, m.in_use ? "" : m.why),
                  cell(m.in_use ? rate(m.tokens_per_s) : "–", m.in_use ? `${m.tokens} tokens` : ""),
                  cell(m.in_use ? bytes(m.kv_bytes) : "–", m.in_use && m.kv_budget_bytes ? `of ${bytes(m.kv_budget_bytes)}` : "")],
                 m.in_use ? "" : "idle");
    }));

    const sessions = s.sessions || [];
    $("sessions").tBodies[0].replaceChildren(...(sessions.length ? sessions.map((x) => row([
      cell(x.id), cell(x.state), cell(String(x.prompt_tokens)), cell(`${x.generated} / ${x.max_tokens}`),
      cell(`${Number(x.age_s).toFixed(1)} s`),
    ])) : [row([Object.assign(cell("none"), { colSpan: 5 })], "idle")]));
  }

  async function pollStatus() {
    try {
      const response = await fetch("/v1/status", { headers: authHeaders(), cache: "no-store" });
      if (!response.ok) throw new Error(await errorMessage(response));
      showStatus(await response.json());
      $("status-error").hidden = true;
      $("status-time").textContent = new Date().toLocaleTimeString();
    } catch (err) {
      $("status-error").textContent = err instanceof TypeError ? "the server does not answer" : err.message;
      $("status-error").hidden = false;
    } finally {
      setTimeout(pollStatus, STATUS_EVERY_MS);
    }
  }

  // -- wiring -------------------------------------------------------------------------------

  function keep(id, key) {
    const input = $(id);
    input.value = stored(key);
    input.addEventListener("change", () => store(key, input.value.trim()));
    input.addEventListener("input", () => store(key, input.value.trim()));
  }

  function start() {
    keep("api-key", STORE.apiKey);
    keep("temperature", STORE.temperature);
    keep("max-tokens", STORE.maxTokens);
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("input").value.trim();
      if (!text || controller) return;
      $("input").value = "";
      send(text);
    });
    $("input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", newConversation);
    setBusy(false);
    showConversation();
    loadModel().then(() => { if (!conversation.length) showConversation(); });  // the model's name
    pollStatus();
  }

  start();
})();
