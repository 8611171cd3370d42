// homellm web app: plain JS, no build step, no dependencies.
// Safety: every piece of user or model text reaches the page through textContent or
// createTextNode (never innerHTML), and links only with an http(s) href; the server's
// Content-Security-Policy forbids inline script as a second wall.
"use strict";

const $ = (id) => document.getElementById(id);
const S = {
  me: null, csrf: "", models: [], defaultModel: null,
  conv: null, turns: [], context: null, list: [],
  streaming: null,            // {id, controller, stopping}
  view: "chat",               // the view shown: chat, arena, leaderboard or evals (by address)
  arena: { battle: null, streaming: null, texts: { a: "", b: "" }, finish: {} },
  collect: { info: null, task: null, tree: null },   // the Contribute and Moderate views
};

// ---------------------------------------------------------------- HTTP
async function api(method, path, body, extraHeaders) {
  const opts = { method, headers: { "X-CSRF-Token": S.csrf, ...(extraHeaders || {}) },
                 credentials: "same-origin" };
  if (body !== undefined) {
    if (typeof body === "string") opts.body = body;
    else { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const msg = data && data.error ? data.error.message : `${method} ${path}: HTTP ${r.status}`;
    if (r.status === 401 && data && data.error && data.error.code === "invalid_api_key" &&
        path !== "/api/key-login") setTimeout(() => start().catch(showError), 0);  // key forgotten (restart)
    const err = new Error(msg); err.status = r.status; throw err;
  }
  return data;
}

function showError(e) { $("error").textContent = e ? (e.message || String(e)) : ""; }

function el(tag, cls, text) {
  const n = document.createElement(tag);
  if (cls) n.className = cls;
  if (text !== undefined && text !== null) n.textContent = text;
  return n;
}

// ---------------------------------------------------------------- code highlighting
// One regex pass: comments, strings, numbers and keywords become spans (text via textContent).
// Linear in the code: a block comment with no end runs to the end of the code (as an
// editor shows it) instead of being searched for again from every "/*", and the comment
// markers a language does not have are left out of its pattern rather than retried.
const KEYWORDS = new Set(("if else elif for while do return def class function const let var " +
  "import from as export new try catch except finally raise throw with yield async await " +
  "lambda pass break continue in is not and or None True False null true false undefined " +
  "struct enum fn pub use mod impl match static void int float double char bool string " +
  "public private protected package func go select case switch default type interface " +
  "self this super print echo").split(" "));
const TOKEN_REST = String.raw`|("(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|\`(?:\\.|[^\`\\])*\`)|\b(\d+(?:\.\d+)?(?:e[+-]?\d+)?|0x[0-9a-f]+)\b|\b([A-Za-z_][A-Za-z0-9_]*)\b`;
const TOKEN_CACHE = new Map();

function tokenPattern(lang) {
  const l = (lang || "").toLowerCase();
  const hash = !/^(c|cpp|c\+\+|js|javascript|ts|typescript|java|go|rust|css|json)$/.test(l);
  const dashes = /^(sql|lua|haskell|hs)$/.test(l);
  const key = `${hash}${dashes}`;
  if (!TOKEN_CACHE.has(key)) {
    const comments = [String.raw`\/\/[^\n]*`, String.raw`\/\*(?:[^*]|\*(?!\/))*(?:\*\/|$)`];
    if (hash) comments.push(String.raw`#[^\n]*`);
    if (dashes) comments.push(String.raw`--[^\n]*`);
    TOKEN_CACHE.set(key, `(${comments.join("|")})` + TOKEN_REST);
  }
  return TOKEN_CACHE.get(key);
}

function highlight(code, lang) {
  const out = document.createDocumentFragment();
  let last = 0, m;
  const re = new RegExp(tokenPattern(lang), "gi");
  while ((m = re.exec(code)) !== null) {
    let cls = null;
    if (m[1] !== undefined) cls = "tok-com";
    else if (m[2] !== undefined) cls = "tok-str";
    else if (m[3] !== undefined) cls = "tok-num";
    else if (m[4] !== undefined) cls = KEYWORDS.has(m[4]) ? "tok-kw" : null;
    if (cls === null) continue;
    if (m.index > last) out.appendChild(document.createTextNode(code.slice(last, m.index)));
    out.appendChild(el("span", cls, m[0]));
    last = m.index + m[0].length;
  }
  if (last < code.length) out.appendChild(document.createTextNode(code.slice(last)));
  return out;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard API (plain http on another host): a hidden textarea
    const t = el("textarea"); t.value = text; document.body.appendChild(t); t.select();
    try { document.execCommand("copy"); } catch (e2) { /* nothing more to try */ }
    t.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1200);
}

function codeBlock(code, lang) {
  const wrap = el("div", "codeblock");
  const pre = el("pre"), c = el("code");
  if (lang) c.dataset.lang = lang;
  c.appendChild(highlight(code, lang));
  pre.appendChild(c);
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => copyText(code, copy));
  wrap.appendChild(pre);
  if (lang) wrap.appendChild(el("span", "lang", lang));
  wrap.appendChild(copy);
  return wrap;
}

// ---------------------------------------------------------------- markdown (safe subset)
// Blocks: ``` fences, | tables |, # headings, - * + and 1. lists, > quotes, paragraphs.
// Inline: `code`, **bold**, *italic* / _italic_, [text](http(s) url), bare line breaks.
// Every pattern here runs in time linear in the text: code spans are found by one scan (a
// backtracking regex for them took minutes on a run of 10,000 backticks), and each regex
// alternative below stops at the first character that ends it, never backtracking over
// what another start could match again.
const INLINE = /\*\*([^*]+?)\*\*|__([^_]+?)__|\*([^*\s][^*]*?)\*|\b_([^_\s][^_]*?)_\b|\[([^\[\]]+)\]\(([^()\s]+)\)/g;
const CODE_MARK = /\uE000(\d+)\uE001/g;   // a code span's place in the text (private-use marks)

// CommonMark code spans: a run of N backticks opens, the next run of exactly N closes; an
// opener with no closer is plain text. Each run is looked at once, so this is linear.
// Returns the text with each span replaced by a mark and the spans' contents in `codes`.
function takeCodeSpans(text, codes) {
  const runs = [];   // [start, length] of every maximal run of backticks
  for (let i = text.indexOf("`"); i >= 0; i = text.indexOf("`", i)) {
    let j = i;
    while (j < text.length && text.charCodeAt(j) === 96) j++;
    runs.push([i, j - i]);
    i = j;
  }
  if (!runs.length) return text;
  const next = new Array(runs.length).fill(-1), lastOfLength = new Map();
  for (let r = runs.length - 1; r >= 0; r--) {   // the next run of the same length
    const n = runs[r][1];
    if (lastOfLength.has(n)) next[r] = lastOfLength.get(n);
    lastOfLength.set(n, r);
  }
  let out = "", at = 0;
  for (let r = 0; r < runs.length;) {
    const c = next[r];
    if (c < 0) { r++; continue; }
    const [open, n] = runs[r], close = runs[c][0];
    let code = text.slice(open + n, close).replace(/\n/g, " ");
    if (code.length > 2 && code[0] === " " && code[code.length - 1] === " " && code.trim()) code = code.slice(1, -1);
    out += text.slice(at, open) + "\uE000" + codes.length + "\uE001";
    codes.push(code);
    at = close + n;
    r = c + 1;
  }
  return out + text.slice(at);
}

function inline(text, parent, codes) {
  if (codes === undefined) {   // the outer call: code spans first (they bind tightest)
    codes = [];
    text = takeCodeSpans(text.replace(/[\uE000\uE001]/g, "\uFFFD"), codes);
  }
  let last = 0, m;
  const re = new RegExp(INLINE.source, "g");   // own lastIndex: inline() recurses
  const addLines = (s) => {
    s.split("\n").forEach((line, i) => {
      if (i) parent.appendChild(el("br"));
      if (line) parent.appendChild(document.createTextNode(line));
    });
  };
  const addText = (s) => {
    let at = 0, c;
    const marks = new RegExp(CODE_MARK.source, "g");
    while ((c = marks.exec(s)) !== null) {
      if (c.index > at) addLines(s.slice(at, c.index));
      parent.appendChild(el("code", null, codes[+c[1]]));
      at = c.index + c[0].length;
    }
    if (at < s.length) addLines(s.slice(at));
  };
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) addText(text.slice(last, m.index));
    if (m[1] !== undefined || m[2] !== undefined) {
      const b = el("strong"); inline(m[1] !== undefined ? m[1] : m[2], b, codes); parent.appendChild(b);
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const i = el("em"); inline(m[3] !== undefined ? m[3] : m[4], i, codes); parent.appendChild(i);
    } else if (m[5] !== undefined) {
      if (/^https?:\/\//i.test(m[6])) {
        const a = el("a"); inline(m[5], a, codes);
        a.href = m[6]; a.target = "_blank"; a.rel = "noopener noreferrer nofollow";
        parent.appendChild(a);
      } else addText(m[0]);
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) addText(text.slice(last));
}

// GitHub tables: | a | b | then | --- | :-: |, then rows.
const TABLE_RULE = /^\s*\|(\s*:?-+:?\s*\|)+\s*$/;  // GFM: hyphens, optional colons
const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());

const MAX_QUOTE_DEPTH = 8;   // deeper "> > >" stays text: nesting costs a pass over the text per level

function markdown(src, depth = 0) {
  const root = document.createDocumentFragment();
  const lines = src.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  const isBlockStart = (l) => /^\s*(```|#{1,6}\s|>|[-*+]\s|\d+[.)]\s)/.test(l);
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = /^\s*```\s*([\w+#.-]*)/.exec(line))) {
      const body = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) body.push(lines[i++]);
      i++;  // the closing fence (or the end of a reply still streaming)
      root.appendChild(codeBlock(body.join("\n"), m[1]));
    } else if (/^\s*\|.*\|\s*$/.test(line) && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
      const table = el("table"), head = el("tr");
      for (const cell of cells(line)) { const th = el("th"); inline(cell, th); head.appendChild(th); }
      table.appendChild(el("thead")).appendChild(head);
      const tbody = table.appendChild(el("tbody"));
      i += 2;
      while (i < lines.length && /^\s*\|.*\|\s*$/.test(lines[i])) {
        const tr = el("tr");
        for (const cell of cells(lines[i++])) { const td = el("td"); inline(cell, td); tr.appendChild(td); }
        tbody.appendChild(tr);
      }
      const wrap = el("div", "table-wrap"); wrap.appendChild(table); root.appendChild(wrap);
    } else if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
      const h = el("h" + Math.min(4, m[1].length)); inline(m[2], h); root.appendChild(h); i++;
    } else if (/^\s*>/.test(line) && depth < MAX_QUOTE_DEPTH) {
      const q = el("blockquote"), body = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) body.push(lines[i++].replace(/^\s*>\s?/, ""));
      q.appendChild(markdown(body.join("\n"), depth + 1)); root.appendChild(q);
    } else if ((m = /^\s*([-*+]|\d+[.)])\s+/.exec(line))) {
      const ordered = /\d/.test(m[1]);
      const list = el(ordered ? "ol" : "ul");
      if (ordered) { const n = parseInt(m[1], 10); if (n !== 1) list.start = n; }
      const item = ordered ? /^\s*\d+[.)]\s+(.*)$/ : /^\s*[-*+]\s+(.*)$/;
      while (i < lines.length && item.test(lines[i])) {
        const li = el("li"); inline(item.exec(lines[i])[1], li); list.appendChild(li); i++;
      }
      root.appendChild(list);
    } else if (!line.trim()) {
      i++;
    } else {
      const body = [];
      while (i < lines.length && lines[i].trim() && !(body.length && isBlockStart(lines[i]))) body.push(lines[i++]);
      const p = el("p"); inline(body.join("\n"), p); root.appendChild(p);
    }
  }
  return root;
}

// ---------------------------------------------------------------- messages
function renderMessages() {
  if (S.view !== "chat") return;   // the chat's parts exist only in its view (showView)
  const box = $("messages");
  box.replaceChildren();
  for (const turn of S.turns) box.appendChild(renderTurn(turn));
  box.scrollTop = box.scrollHeight;
  renderContext();
}

function renderTurn(turn) {
  const m = turn.message;
  const div = el("div", "msg " + m.role);
  div.dataset.id = m.id;
  div.dataset.role = m.role;
  const body = el("div", "body");
  fillBody(body, m);
  div.appendChild(body);
  const meta = el("div", "meta");
  if (turn.sibling_ids.length > 1) {
    const prev = el("button", "prev", "<"), next = el("button", "next", ">");
    prev.type = next.type = "button";
    prev.disabled = turn.index === 0 || !!S.streaming;
    next.disabled = turn.index === turn.sibling_ids.length - 1 || !!S.streaming;
    prev.addEventListener("click", () => selectMessage(turn.sibling_ids[turn.index - 1]));
    next.addEventListener("click", () => selectMessage(turn.sibling_ids[turn.index + 1]));
    meta.append(prev, el("span", "pos", `${turn.index + 1}/${turn.sibling_ids.length}`), next);
  }
  if (m.role === "user") {
    const edit = el("button", "edit", "Edit");
    edit.type = "button"; edit.disabled = !!S.streaming;
    edit.addEventListener("click", () => startEdit(div, turn));
    meta.appendChild(edit);
    if (turn === S.turns[S.turns.length - 1] && !S.streaming) {  // no reply yet (it failed)
      const answer = el("button", "answer", "Get a reply");
      answer.type = "button";
      answer.addEventListener("click", () => generate(m.id));
      meta.appendChild(answer);
    }
  } else {
    const streamingThis = S.streaming && S.streaming.id === m.id;
    if (!streamingThis) {
      if (m.finish_reason === "stopped") meta.appendChild(el("span", "badge stopped", "stopped"));
      else if (m.finish_reason === "error") meta.appendChild(el("span", "badge", "failed"));
      else if (m.incomplete) meta.appendChild(el("span", "badge", "incomplete"));
      else if (m.finish_reason === "length") meta.appendChild(el("span", "badge", "max tokens"));
      const regen = el("button", "regenerate", "Regenerate");
      regen.type = "button"; regen.disabled = !!S.streaming;
      regen.addEventListener("click", () => generate(m.parent_id));
      const rating = turn.rating ? turn.rating.value : 0;
      const up = el("button", "thumb up" + (rating === 1 ? " on" : ""), "▲ good");
      const down = el("button", "thumb down" + (rating === -1 ? " on" : ""), "▼ bad");
      up.type = down.type = "button";
      up.title = "Good reply"; down.title = "Bad reply";
      up.setAttribute("aria-pressed", String(rating === 1));
      down.setAttribute("aria-pressed", String(rating === -1));
      up.addEventListener("click", () => rate(turn, rating === 1 ? 0 : 1));
      down.addEventListener("click", () => rate(turn, rating === -1 ? 0 : -1));
      meta.append(regen, up, down);
      const info = [];
      if (m.model) info.push(m.model);
      if (m.timings && m.timings.predicted_per_second) info.push(`${m.timings.predicted_per_second} tok/s`);
      if (info.length) meta.appendChild(el("span", "info", info.join(" · ")));
      if (rating) {
        const cbox = el("div", "comment-box");
        const input = el("input", "comment");
        input.placeholder = "Optional comment"; input.value = (turn.rating && turn.rating.comment) || "";
        const save = el("button", "save-comment", "Save comment"); save.type = "button";
        save.addEventListener("click", () => rate(turn, rating, input.value));
        cbox.append(input, save);
        div.appendChild(meta);
        div.appendChild(cbox);
        return div;
      }
    }
  }
  div.appendChild(meta);
  return div;
}

function fillBody(body, m) {
  body.replaceChildren();
  if (m.role === "user") body.textContent = m.content;
  else body.appendChild(markdown(m.content));
  if (S.streaming && S.streaming.id === m.id) body.classList.add("cursor");
  else body.classList.remove("cursor");
}

function renderContext() {
  const c = S.context;
  $("context-use").textContent = c && c.used != null
    ? `${c.used}${c.ctx ? " / " + c.ctx : ""} tokens` : "";
}

function startEdit(div, turn) {
  const body = div.querySelector(".body");
  const box = el("div", "edit-box");
  const ta = el("textarea", "edit-text"); ta.value = turn.message.content; ta.rows = 3;
  const row = el("div", "row");
  const save = el("button", "primary save-edit", "Save & submit"), cancel = el("button", "cancel-edit", "Cancel");
  save.type = cancel.type = "button";
  save.addEventListener("click", async () => {
    const text = ta.value.trim();
    if (!text) return;
    try {
      const r = await api("POST", `/api/messages/${turn.message.id}/edit`, { content: text });
      applyDetail(r);
      await generate(r.message.id);
    } catch (e) { showError(e); }
  });
  cancel.addEventListener("click", renderMessages);
  row.append(save, cancel);
  box.append(ta, row);
  body.replaceWith(box);
  ta.focus();
}

async function selectMessage(id) {
  try { applyDetail(await api("POST", `/api/messages/${id}/select`)); } catch (e) { showError(e); }
}

async function rate(turn, value, comment) {
  try {
    const keep = comment !== undefined ? comment : (turn.rating && turn.rating.comment) || null;
    const r = await api("PUT", `/api/messages/${turn.message.id}/rating`, { value, comment: value ? keep : null });
    turn.rating = r.rating;
    renderMessages();
  } catch (e) { showError(e); }
}

// ---------------------------------------------------------------- conversations
function applyDetail(d) {
  S.conv = d.conversation; S.turns = d.turns; S.context = d.context;
  $("conv-title").textContent = S.conv.title || "New chat";
  $("export-one").href = `/api/conversations/${S.conv.id}/export`;
  $("export-one").hidden = false;
  fillSettings();
  renderMessages();
  markActive();
}

async function loadList() {
  const q = $("search").value.trim();
  const ul = $("conversations");
  try {
    if (q) {
      const r = await api("GET", `/api/search?q=${encodeURIComponent(q)}`);
      ul.replaceChildren(...r.hits.map((h) => listItem({ id: h.conversation_id, title: h.title }, h.snippet)));
      ul.dataset.mode = "search";
    } else {
      const r = await api("GET", "/api/conversations");
      S.list = r.conversations;
      ul.replaceChildren(...S.list.map((c) => listItem(c)));
      ul.dataset.mode = "all";
    }
    markActive();
  } catch (e) { showError(e); }
}

function listItem(c, snippet) {
  const li = el("li");
  li.dataset.id = c.id;
  const open = el("button", "open", c.title || "Untitled");
  open.type = "button"; open.title = c.title || "";
  if (snippet && snippet !== c.title) open.appendChild(el("span", "snippet", snippet));
  open.addEventListener("click", () => openConversation(c.id));
  const ren = el("button", "tool rename", "✎"), del = el("button", "tool delete", "✕");
  ren.type = del.type = "button"; ren.title = "Rename"; del.title = "Delete";
  ren.addEventListener("click", () => {
    const input = el("input", "rename-input"); input.value = c.title || "";
    let finished = false;   // Enter, then the blur of the removed input: once
    const done = async (keep) => {
      if (finished) return;
      finished = true;
      if (keep && input.value.trim() !== (c.title || "")) {
        try {
          const r = await api("PATCH", `/api/conversations/${c.id}`, { title: input.value });
          if (S.conv && S.conv.id === c.id) applyDetail(r);
        } catch (e) { showError(e); }
      }
      loadList();
    };
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") { ev.preventDefault(); done(true); }
      if (ev.key === "Escape") done(false);
    });
    input.addEventListener("blur", () => done(true), { once: true });
    li.replaceChildren(input); input.focus(); input.select();
  });
  del.addEventListener("click", async () => {
    if (del.dataset.armed !== "1") {  // two clicks: no modal dialog
      del.dataset.armed = "1"; del.textContent = "Delete?"; del.classList.add("armed");
      setTimeout(() => { del.dataset.armed = ""; del.textContent = "✕"; }, 3000);
      return;
    }
    try {
      await api("DELETE", `/api/conversations/${c.id}`);
      if (S.conv && S.conv.id === c.id) newChat();
      loadList();
    } catch (e) { showError(e); }
  });
  li.append(open, ren, del);
  return li;
}

function markActive() {
  for (const li of $("conversations").children)
    li.classList.toggle("active", !!S.conv && li.dataset.id === S.conv.id);
}

async function openConversation(id) {
  if (S.streaming || S.arena.streaming) return;
  if (S.view !== "chat") { history.pushState(null, "", "/"); await showView("chat"); }
  showError(null);
  try {
    applyDetail(await api("GET", `/api/conversations/${id}`));
    history.replaceState(null, "", `#${id}`);
    $("app").classList.remove("side-open");
  } catch (e) { showError(e); }
}

function newChat() {
  if (S.streaming || S.arena.streaming) return;
  if (S.view !== "chat") { go("/"); }
  S.conv = null; S.turns = []; S.context = null;
  $("conv-title").textContent = "New chat";
  $("export-one").hidden = true;
  history.replaceState(null, "", "#");
  fillSettings(); renderMessages(); markActive();
  $("app").classList.remove("side-open");
  $("prompt").focus();
}

// ---------------------------------------------------------------- settings
const NUMBERS = ["temperature", "top_p", "top_k", "max_tokens", "seed"];

function fillSettings() {
  if (S.view !== "chat") return;
  const sel = $("set-model");
  sel.replaceChildren(...S.models.map((m) => { const o = el("option", null, m.id); o.value = m.id; return o; }));
  const c = S.conv;
  sel.value = (c && c.model) || S.defaultModel || "";
  $("set-system").value = (c && c.system_prompt) || "";
  const s = (c && c.sampling) || S.draftSampling || {};
  for (const k of NUMBERS) $("set-" + k).value = s[k] != null ? s[k] : "";
}

function readSettings() {
  const sampling = {};
  for (const k of NUMBERS) {
    const v = $("set-" + k).value.trim();
    if (v !== "") sampling[k] = (k === "top_k" || k === "max_tokens" || k === "seed") ? parseInt(v, 10) : parseFloat(v);
  }
  return { model: $("set-model").value || null, system_prompt: $("set-system").value || null, sampling };
}

async function saveSettings(ev) {
  ev.preventDefault();
  const s = readSettings();
  try {
    if (S.conv) applyDetail(await api("PATCH", `/api/conversations/${S.conv.id}`, s));
    else { S.draftSampling = s.sampling; S.draftModel = s.model; S.draftSystem = s.system_prompt; }
    $("settings-status").textContent = "Saved";
    setTimeout(() => { $("settings-status").textContent = ""; }, 1500);
  } catch (e) { showError(e); }
}

// ---------------------------------------------------------------- sending and streaming
async function send(ev) {
  if (ev) ev.preventDefault();
  if (S.streaming) return;
  const text = $("prompt").value.trim();
  if (!text) return;
  showError(null);
  try {
    if (!S.conv) {
      const s = readSettings();
      const d = await api("POST", "/api/conversations", s);
      S.conv = d.conversation;
    }
    const last = S.turns.length ? S.turns[S.turns.length - 1].message : null;
    if (last && last.role === "user") throw new Error("the last message has no reply yet: press “Get a reply” (or edit it)");
    const r = await api("POST", `/api/conversations/${S.conv.id}/messages`,
                        { content: text, parent_id: last ? last.id : null });
    $("prompt").value = "";
    applyDetail(r);
    history.replaceState(null, "", `#${S.conv.id}`);
    loadList();
    await generate(r.message.id);
  } catch (e) { showError(e); }
}

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

async function generate(parentId) {
  if (S.streaming || !S.conv) return;
  showError(null);
  const controller = new AbortController();
  S.streaming = { id: null, controller };
  setStreaming(true);
  renderMessages();
  let turn = null, body = null;
  try {
    const r = await fetch(`/api/conversations/${S.conv.id}/generate`, {
      method: "POST", credentials: "same-origin", signal: controller.signal,
      headers: { "Content-Type": "application/json", "X-CSRF-Token": S.csrf },
      body: JSON.stringify({ parent_id: parentId }),
    });
    if (!r.ok) {
      let msg = `HTTP ${r.status}`;
      try { const d = await r.json(); msg = d.error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        let event = "message", data = "";
        for (const line of chunk.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        const d = data ? JSON.parse(data) : {};
        if (event === "start") {
          S.streaming.id = d.message.id;
          const at = S.turns.findIndex((t) => t.message.id === parentId);
          S.turns = S.turns.slice(0, at + 1);
          turn = { message: d.message, sibling_ids: d.sibling_ids, index: d.sibling_ids.length - 1, rating: null };
          S.turns.push(turn);
          renderMessages();
          body = document.querySelector(`.msg[data-id="${d.message.id}"] .body`);
        } else if (event === "delta" && turn) {
          turn.message.content += d.text;
          fillBody(body, turn.message);
          const box = $("messages"); box.scrollTop = box.scrollHeight;
        } else if (event === "done" && turn) {
          turn.message = d.message; S.context = d.context;
        } else if (event === "error") {
          showError(new Error(d.error.message));
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e);
  } finally {
    S.streaming = null;
    setStreaming(false);
    if (S.conv) {
      try { applyDetail(await api("GET", `/api/conversations/${S.conv.id}`)); } catch (e) { showError(e); }
      loadList();
    }
  }
}

async function stop() {
  const s = S.streaming;
  if (!s) return;
  if (s.id) {
    try { await api("POST", `/api/replies/${s.id}/stop`); return; } catch (e) { /* abort below */ }
  }
  s.controller.abort();
}

// ---------------------------------------------------------------- import
async function importFile() {
  const f = $("import-file").files[0];
  if (!f) return;
  const status = $("import-status");
  status.textContent = "Importing…";
  try {
    const text = await f.text();
    const r = await api("POST", "/api/import", text, { "Content-Type": "application/x-ndjson", "X-Filename": f.name.replace(/[^\w.-]/g, "_") });
    status.textContent = `Imported ${r.imported} conversation${r.imported === 1 ? "" : "s"}`;
    loadList();
  } catch (e) { status.textContent = ""; showError(e); }
  $("import-file").value = "";
}

// ---------------------------------------------------------------- people
// One form, three uses: the first-run setup (with the console's setup token when the server
// asks for it), a login (--auth), or the server's API key (--api-key without --auth).
function showGate(mode, tokenRequired) {
  $("app").hidden = true; $("gate").hidden = false;
  const key = mode === "key";
  $("gate-title").textContent = mode === "setup" ? "Set up homellm" : key ? "API key" : "Log in";
  $("gate-hint").textContent = mode === "setup"
    ? "No account yet: this one becomes the admin." + (tokenRequired ? " The setup token is on the server's console." : "")
    : key ? "This server needs its API key (homellm serve --api-key)." : "";
  $("gate-submit").textContent = mode === "setup" ? "Create admin account" : key ? "Continue" : "Log in";
  $("gate-form").dataset.mode = mode;
  $("gate-user-row").hidden = key; $("gate-user").required = !key;
  $("gate-pass-label").textContent = key ? "Key" : "Password";
  $("gate-pass").autocomplete = key ? "off" : "current-password";
  $("gate-token-row").hidden = !(mode === "setup" && tokenRequired);
  $("gate-token").required = mode === "setup" && !!tokenRequired;
  (key ? $("gate-pass") : $("gate-user")).focus();
}

async function gateSubmit(ev) {
  ev.preventDefault();
  $("gate-error").textContent = "";
  const mode = $("gate-form").dataset.mode;
  try {
    if (mode === "key") await api("POST", "/api/key-login", { key: $("gate-pass").value });
    else {
      const body = { username: $("gate-user").value, password: $("gate-pass").value };
      if (mode === "setup" && !$("gate-token-row").hidden) body.setup_token = $("gate-token").value.trim();
      await api("POST", mode === "setup" ? "/api/setup" : "/api/login", body);
    }
    $("gate-pass").value = ""; $("gate-token").value = "";
    await start();
  } catch (e) { $("gate-error").textContent = e.message; }
}

function showAccount() {
  const me = S.me;
  const keyed = !me.auth && me.key_cookie;
  $("account").hidden = !me.auth && !keyed;
  if (!me.auth) {   // only the API key: a way to forget it on this browser
    $("whoami").textContent = "Signed in with the API key";
    for (const id of ["share-feedback", "export-shared", "add-user", "users"]) $(id).hidden = true;
    $("share-feedback").parentElement.hidden = true;
    return;
  }
  $("whoami").textContent = `Signed in as ${me.user.username}${me.user.is_admin ? " (admin)" : ""}`;
  $("share-feedback").checked = me.user.share_feedback;
  $("export-shared").hidden = !me.user.is_admin;
  $("add-user").hidden = !me.user.is_admin;
  $("users").hidden = !me.user.is_admin;
  if (me.user.is_admin) loadUsers();
}

// The admin's list of accounts; one whose logins are limited (too many wrong passwords
// from some address) gets an Unlock button.
async function loadUsers() {
  try {
    const r = await api("GET", "/api/users");
    $("users").replaceChildren(...r.users.map((u) => {
      const li = el("li"); li.dataset.username = u.username;
      li.appendChild(el("span", null, u.username + (u.is_admin ? " (admin)" : "")));
      if (u.locked_s > 0) {
        li.appendChild(el("span", "locked", `locked ${u.locked_s} s`));
        const b = el("button", "unlock", "Unlock"); b.type = "button";
        b.addEventListener("click", async () => {
          try { await api("POST", `/api/users/${encodeURIComponent(u.username)}/unlock`); loadUsers(); }
          catch (e) { showError(e); }
        });
        li.appendChild(b);
      }
      return li;
    }));
  } catch (e) { showError(e); }
}

// ---------------------------------------------------------------- views
// One page, four views, each at its own address (the server serves the page at each):
// / chat, /arena, /leaderboard, /evals. Switching views keeps the chat's state in memory
// but takes its model names out of the page (the arena's blindness: while a battle is
// unvoted, no model name is anywhere in the document).
const VIEWS = { "/": "chat", "/arena": "arena", "/leaderboard": "leaderboard", "/evals": "evals",
                "/contribute": "contribute", "/contributors": "contributors", "/moderate": "moderate" };
const viewOf = (path) => VIEWS[path] || "chat";

function go(path) {
  if (S.streaming || S.arena.streaming) return;
  if (location.pathname !== path) history.pushState(null, "", path);
  $("app").classList.remove("side-open");
  showView(viewOf(path)).catch(showError);
}

async function showView(view) {
  S.view = view;
  for (const v of Object.values(VIEWS)) $(v + "-view").hidden = v !== view;
  for (const a of $("views").querySelectorAll("a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (view !== "leaderboard") $("leaderboard-table").tBodies[0].replaceChildren();
  if (view === "chat") {
    if (!S.models.length) {
      const m = await api("GET", "/api/models");
      S.models = m.models; S.defaultModel = m.default;
    }
    fillSettings(); renderMessages();
    document.title = "homellm";
    return;
  }
  $("set-model").replaceChildren(); $("messages").replaceChildren(); $("context-use").textContent = "";
  document.title = `homellm · ${view[0].toUpperCase()}${view.slice(1)}`;
  if (view === "arena") await openArena();
  else if (view === "leaderboard") await loadLeaderboard();
  else if (view === "contribute") await openContribute();
  else if (view === "contributors") await loadContributors();
  else if (view === "moderate") await openModerate();
  else await loadEvals();
}

// ---------------------------------------------------------------- arena
// A battle: POST /api/arena/battles streams both replies as events labelled "a" / "b";
// the vote buttons appear when both have finished; the vote's answer names the models.
function arenaError(e) { $("arena-error").textContent = e ? (e.message || String(e)) : ""; }

async function openArena() {
  arenaError(null);
  try {
    const info = await api("GET", "/api/arena");
    $("arena-unavailable").hidden = info.ready;
    $("arena-unavailable").textContent = info.reason || "";
    $("arena-send").disabled = !info.ready; $("arena-prompt").disabled = !info.ready;
    $("arena-max-tokens").placeholder = String(info.defaults.max_tokens);
  } catch (e) { arenaError(e); }
  renderArena();
  if (!$("arena-prompt").disabled) $("arena-prompt").focus();
}

const VOTE_TEXT = { a: "A is better", b: "B is better", tie: "a tie", both_bad: "both are bad" };

function renderArena() {
  const A = S.arena, b = A.battle;
  $("arena-question").hidden = !b;
  $("arena-question").textContent = b ? b.prompt : "";
  for (const side of ["a", "b"]) {
    const box = $("arena-" + side);
    const name = "Model " + side.toUpperCase();
    box.querySelector(".side-name").textContent = b && b.models ? `${name}: ${b.models[side]}` : name;
    const body = box.querySelector(".body");
    body.replaceChildren(markdown(b ? A.texts[side] : ""));
    const running = !!A.streaming && !A.finish[side];
    body.classList.toggle("cursor", running);
    const meta = box.querySelector(".meta");
    meta.replaceChildren();
    const f = A.finish[side];
    if (f === "stopped") meta.appendChild(el("span", "badge stopped", "stopped"));
    else if (f === "error") meta.appendChild(el("span", "badge", "failed"));
    else if (f === "length") meta.appendChild(el("span", "badge", "max tokens"));
    box.classList.toggle("winner", !!b && (b.vote === side));
  }
  const votable = !!b && !b.vote && !A.streaming && !!A.finish.a && !!A.finish.b;
  $("arena-votes").hidden = !votable;
  $("arena-result").textContent = b && b.vote
    ? `You voted: ${VOTE_TEXT[b.vote]}. A was ${b.models.a}, B was ${b.models.b}.` : "";
  $("arena-send").hidden = !!A.streaming; $("arena-stop").hidden = !A.streaming;
}

// Server-Sent Events from a fetch response: onEvent(name, data) for each one.
async function readEvents(r, onEvent) {
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(event, data ? JSON.parse(data) : {});
    }
  }
}

async function battle(ev) {
  if (ev) ev.preventDefault();
  const A = S.arena;
  const prompt = $("arena-prompt").value.trim();
  if (A.streaming || !prompt || $("arena-send").disabled) return;
  arenaError(null);
  const body = { prompt };
  const max = $("arena-max-tokens").value.trim();
  if (max) body.max_tokens = parseInt(max, 10);
  const controller = new AbortController();
  A.streaming = { id: null, controller };
  A.battle = null; A.texts = { a: "", b: "" }; A.finish = {};
  renderArena();
  try {
    const r = await fetch("/api/arena/battles", {
      method: "POST", credentials: "same-origin", signal: controller.signal,
      headers: { "Content-Type": "application/json", "X-CSRF-Token": S.csrf },
      body: JSON.stringify(body),
    });
    if (!r.ok) {
      let msg = `HTTP ${r.status}`;
      try { const d = await r.json(); msg = d.error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    $("arena-prompt").value = "";
    await readEvents(r, (event, d) => {
      if (event === "start") { A.battle = d.battle; A.streaming.id = d.battle.id; }
      else if (event === "delta") A.texts[d.side] += d.text;
      else if (event === "side_done") A.finish[d.side] = d.finish_reason;
      else if (event === "error") { A.finish[d.side] = "error"; arenaError(new Error(`${d.side.toUpperCase()}: ${d.error.message}`)); }
      else if (event === "done") A.battle = d.battle;
      renderArena();
    });
  } catch (e) {
    if (e.name !== "AbortError") arenaError(e);
  } finally {
    const id = A.streaming && A.streaming.id;
    A.streaming = null;
    if (id) {  // what the server kept (also after a stop or a broken stream)
      try {
        A.battle = await api("GET", `/api/arena/battles/${id}`);
        for (const side of ["a", "b"]) {
          A.texts[side] = A.battle.replies[side].text;
          A.finish[side] = A.battle.replies[side].finish_reason;
        }
      } catch (e) { arenaError(e); }
    }
    renderArena();
  }
}

async function stopBattle() {
  const s = S.arena.streaming;
  if (!s) return;
  if (s.id) {
    try { await api("POST", `/api/arena/battles/${s.id}/stop`); return; } catch (e) { /* abort below */ }
  }
  s.controller.abort();
}

async function vote(choice) {
  const b = S.arena.battle;
  if (!b || b.vote) return;
  try {
    S.arena.battle = await api("POST", `/api/arena/battles/${b.id}/vote`, { vote: choice });
  } catch (e) { arenaError(e); }
  renderArena();
}

// ---------------------------------------------------------------- leaderboard and evals
const round = (x) => (x === null || x === undefined ? "–" : String(Math.round(x)));

async function loadLeaderboard() {
  $("leaderboard-error").textContent = "";
  try {
    const r = await api("GET", "/api/arena/leaderboard");
    if (S.view !== "leaderboard") return;
    $("leaderboard-table").tBodies[0].replaceChildren(...r.models.map((m) => {
      const tr = el("tr"); tr.dataset.model = m.model;
      for (const text of [String(m.rank), m.model, round(m.rating) + (m.unbounded ? ` (${m.unbounded} yet)` : ""),
                          `${round(m.ci[0])} – ${round(m.ci[1])}`, String(m.votes),
                          `${m.wins} / ${m.ties} / ${m.losses}`]) tr.appendChild(el("td", null, text));
      return tr;
    }));
    $("leaderboard-summary").textContent = r.battles
      ? `${r.battles} vote${r.battles === 1 ? "" : "s"} so far.` : "No votes yet: battle in the Arena.";
  } catch (e) { $("leaderboard-error").textContent = e.message; }
}

async function loadEvals() {
  $("evals-error").textContent = "";
  try {
    const r = await api("GET", "/api/evals");
    $("evals-table").tBodies[0].replaceChildren(...r.runs.map((x) => {
      const tr = el("tr"); tr.dataset.id = x.id;
      const details = Object.entries(x.details || {}).map(([k, v]) => `${k} ${typeof v === "number" ? +v.toPrecision(4) : v}`).join(", ");
      for (const text of [x.date, x.kind, x.model, (x.hash || "").slice(0, 12), x.task, x.metric_text, details])
        tr.appendChild(el("td", null, text));
      return tr;
    }));
    $("evals-summary").textContent = r.runs.length
      ? `${r.runs.length} kept run${r.runs.length === 1 ? "" : "s"} (homellm eval report prints the same).`
      : "No kept eval runs yet: homellm eval ppl, tasks and judge keep theirs under $HOMELLM_HOME/evals.";
  } catch (e) { $("evals-error").textContent = e.message; }
}

// ---------------------------------------------------------------- contribute (the collection)
// Open Assistant's tasks (/api/collect): ask for the next task of a kind (or any), work on
// it, submit or skip. The task's form is built here from what the server sent: a text box,
// OA's labels (yes/no, flags, a five-point scale), an order of replies, or an edit's vote.
function collectError(e) { $("collect-error").textContent = e ? (e.message || String(e)) : ""; }
const csv = (text) => text.split(",").map((x) => x.trim()).filter(Boolean);
const LIKERT = [0, 0.25, 0.5, 0.75, 1];

async function openContribute() {
  collectError(null);
  try {
    const info = await api("GET", "/api/collect");
    S.collect.info = info;
    const sel = $("collect-type"), chosen = sel.value;
    sel.replaceChildren(el("option", null, "Any task"));
    sel.firstChild.value = "random";
    for (const k of info.kinds) {
      const o = el("option", null, `${k.title} (${info.available[k.type] || 0})`);
      o.value = k.type; sel.appendChild(o);
    }
    sel.value = chosen || "random";
    if (!sel.value) sel.value = "random";
    $("collect-langs").value = info.prefs.langs.join(", ");
    $("collect-tags").value = info.prefs.tags.join(", ");
    $("moderate-link").hidden = info.role === "volunteer";
    if (info.banned) $("collect-status").textContent = "You are banned from contributing.";
  } catch (e) { collectError(e); }
  renderTask();
}

async function nextTask(ev) {
  if (ev) ev.preventDefault();
  collectError(null);
  const prefs = { langs: csv($("collect-langs").value), tags: csv($("collect-tags").value) };
  try {
    const old = S.collect.info ? S.collect.info.prefs : null;
    if (!old || old.langs.join() !== prefs.langs.join() || old.tags.join() !== prefs.tags.join().toLowerCase()) {
      const saved = await api("PUT", "/api/collect/prefs", prefs);
      if (S.collect.info) S.collect.info.prefs = saved;
    }
    const r = await api("POST", "/api/collect/tasks", { type: $("collect-type").value });
    S.collect.task = r.task;
    $("collect-status").textContent = r.task ? (r.resumed ? "Your task, as you left it." : "") : r.reason;
  } catch (e) { collectError(e); }
  renderTask();
}

function messageBox(m, extra) {
  const div = el("div", "cmsg " + m.role);
  div.dataset.id = m.message_id;
  div.appendChild(el("div", "hint", m.role === "prompter" ? "User" : "Assistant" +
    (m.synthetic ? ` (model: ${m.model_name})` : "")));
  const body = el("div", "body md"); body.appendChild(markdown(m.text)); div.appendChild(body);
  if (extra) div.appendChild(extra);
  return div;
}

// An inline "Report" (and, for one message, "Propose an edit"): no dialogs.
function messageTools(m, withEdit) {
  const row = el("div", "row tools");
  const box = el("div", "row"); box.hidden = true;
  const input = el(withEdit ? "textarea" : "input"); const send = el("button", null, "Send");
  send.type = "button"; box.append(input, send);
  const open = (mode) => {
    box.hidden = false; box.dataset.mode = mode;
    input.value = mode === "edit" ? m.text : ""; input.placeholder = mode === "edit" ? "" : "Why? (reason)";
    input.className = mode === "edit" ? "edit-text" : "report-reason"; input.focus();
  };
  const report = el("button", "report", "Report"); report.type = "button";
  report.addEventListener("click", () => open("report"));
  row.appendChild(report);
  if (withEdit) {
    const edit = el("button", "propose-edit", "Propose an edit"); edit.type = "button";
    edit.addEventListener("click", () => open("edit"));
    row.appendChild(edit);
  }
  send.addEventListener("click", async () => {
    try {
      if (box.dataset.mode === "edit") {
        await api("POST", `/api/collect/messages/${m.message_id}/edits`, { text: input.value });
        $("collect-status").textContent = "Edit proposed: other volunteers will review it.";
      } else {
        await api("POST", `/api/collect/messages/${m.message_id}/report`, { reason: input.value });
        $("collect-status").textContent = "Reported. Thank you.";
      }
      box.hidden = true;
    } catch (e) { collectError(e); }
  });
  const wrap = el("div"); wrap.append(row, box);
  return wrap;
}

function renderTask() {
  const t = S.collect.task;
  $("collect-task").hidden = !t;
  const form = $("collect-form"), conv = $("collect-conversation");
  form.replaceChildren(); conv.replaceChildren();
  if (!t) return;
  $("collect-title").textContent = t.title;
  $("collect-hint").textContent = TASK_HINTS[t.type] || "";
  const labelled = t.type.startsWith("label_") ? t.message_id : null;
  for (const m of t.conversation || []) conv.appendChild(messageBox(m, m.message_id === labelled ? messageTools(m, true) : null));
  if (["initial_prompt", "assistant_reply", "prompter_reply"].includes(t.type)) {
    const text = el("textarea"); text.id = "collect-text"; text.setAttribute("aria-label", "Your message");
    const lang = el("input"); lang.id = "collect-lang"; lang.size = 5;
    lang.value = t.lang || (S.collect.info && S.collect.info.prefs.langs[0]) || "en";
    const row = el("div", "row"); row.append(el("span", "hint", "Language"), lang);
    form.append(text, row);
    if (t.type === "initial_prompt") {
      const tags = el("input"); tags.id = "collect-task-tags"; tags.placeholder = "topics: cooking, maths";
      row.append(el("span", "hint", "Topics"), tags);
    }
  } else if (t.type.startsWith("label_")) {
    for (const l of t.labels) form.appendChild(labelRow(l, t.mandatory_labels.includes(l.name)));
  } else if (t.type.startsWith("rank_")) {
    const list = el("ol", "ranking"); list.id = "collect-ranking";
    (t.replies || t.prompts).forEach((m, i) => {
      const li = messageBox(m, null); const item = el("li"); item.dataset.index = String(i);
      item.dataset.id = m.message_id;
      const row = el("div", "row");
      const up = el("button", "up", "▲ up"), down = el("button", "down", "▼ down");
      up.type = down.type = "button";
      up.addEventListener("click", () => { if (item.previousSibling) list.insertBefore(item, item.previousSibling); });
      down.addEventListener("click", () => { if (item.nextSibling) list.insertBefore(item.nextSibling, item); });
      row.append(up, down);
      item.append(li, row, messageTools(m, false)); list.appendChild(item);
    });
    const bad = el("label", "check"); const box = el("input"); box.type = "checkbox"; box.id = "collect-all-bad";
    bad.append(box, document.createTextNode(" All replies are bad (flawed, wrong or unacceptable)"));
    form.append(list, bad);
  } else if (t.type === "review_edit") {
    const pair = el("div", "edit-pair");
    for (const [title, text] of [["Now", t.edit.original], ["Proposed", t.edit.proposed]]) {
      const d = el("div"); d.appendChild(el("div", "hint", title));
      const b = el("div", "body md"); b.appendChild(markdown(text)); d.appendChild(b); pair.appendChild(d);
    }
    form.appendChild(pair);
    form.appendChild(choice("approve", [["yes", "Approve"], ["no", "Reject"]]));
  }
}

const TASK_HINTS = {
  initial_prompt: "Ask the assistant something a person would: a question, a task, a request.",
  assistant_reply: "Reply as the assistant would: helpful, correct, kind.",
  prompter_reply: "Reply as the user: a natural follow-up.",
  rank_assistant_replies: "Put the best reply first (▲ / ▼).",
  rank_prompter_replies: "Put the best reply first (▲ / ▼).",
  rank_initial_prompts: "Put the best prompt first (▲ / ▼).",
  review_edit: "Is the proposed text better than the message as it is?",
};

function choice(name, options) {
  const row = el("div", "label-row"); row.dataset.label = name;
  for (const [value, text] of options) {
    const l = el("label"); const r = el("input"); r.type = "radio"; r.name = "collect-" + name; r.value = value;
    l.append(r, document.createTextNode(text)); row.appendChild(l);
  }
  return row;
}

function labelRow(l, mandatory) {
  const row = el("div", "label-row"); row.dataset.label = l.name;
  const name = el("span", "name", l.display_text + (mandatory ? " *" : ""));
  if (l.help_text) name.title = l.help_text;
  row.appendChild(name);
  const options = l.widget === "yes_no" ? [["1", "Yes"], ["0", "No"]]
    : l.widget === "flag" ? [["1", "Yes"]] : LIKERT.map((v) => [String(v), String(v * 4 + 1)]);
  for (const [value, text] of options) {
    const lab = el("label"); const r = el("input");
    r.type = l.widget === "flag" ? "checkbox" : "radio"; r.name = "label-" + l.name; r.value = value;
    lab.append(r, document.createTextNode(text)); row.appendChild(lab);
  }
  if (l.widget === "likert") row.appendChild(el("span", "hint", "(1 = none, 5 = very)"));
  return row;
}

function taskBody(t) {
  if (["initial_prompt", "assistant_reply", "prompter_reply"].includes(t.type)) {
    const body = { text: $("collect-text").value, lang: $("collect-lang").value.trim() };
    if (t.type === "initial_prompt") body.tags = csv($("collect-task-tags").value);
    return body;
  }
  if (t.type.startsWith("label_")) {
    const labels = {};
    for (const l of t.labels) {
      const checked = $("collect-form").querySelector(`input[name="label-${l.name}"]:checked`);
      if (l.widget === "flag") labels[l.name] = checked ? 1 : 0;
      else if (checked) labels[l.name] = parseFloat(checked.value);
    }
    return { labels };
  }
  if (t.type.startsWith("rank_")) {
    const ranking = [...$("collect-ranking").children].map((li) => parseInt(li.dataset.index, 10));
    return { ranking, not_rankable: $("collect-all-bad").checked };
  }
  const v = $("collect-form").querySelector('input[name="collect-approve"]:checked');
  return { approve: v ? v.value === "yes" : null };
}

async function submitTask() {
  const t = S.collect.task;
  if (!t) return;
  collectError(null);
  try {
    const r = await api("POST", `/api/collect/tasks/${t.id}/submit`, taskBody(t));
    S.collect.task = null;
    $("collect-status").textContent = `Saved. ${r.tree ? "The conversation is now: " + r.tree.state.replace(/_/g, " ") + "." : ""}`;
  } catch (e) { collectError(e); }
  renderTask();
}

async function skipTask() {
  const t = S.collect.task;
  if (!t) return;
  try { await api("POST", `/api/collect/tasks/${t.id}/skip`); S.collect.task = null; $("collect-status").textContent = "Skipped."; }
  catch (e) { collectError(e); }
  renderTask();
}

// ---------------------------------------------------------------- contributors and moderation
async function loadContributors() {
  $("contributors-error").textContent = "";
  const frame = $("contributors-frame").value;
  try {
    const r = await api("GET", `/api/collect/leaderboard?time_frame=${frame}`);
    $("contributors-table").tBodies[0].replaceChildren(...r.leaderboard.map((x) => {
      const tr = el("tr"); tr.dataset.username = x.username;
      if (S.me && S.me.user && x.user_id === S.me.user.id) tr.className = "me";
      for (const v of [x.rank, x.username, x.leader_score, x.level, x.prompts, x.replies_assistant + x.replies_prompter,
                       x.labels_full + x.labels_simple, x.rankings_total]) tr.appendChild(el("td", null, String(v)));
      return tr;
    }));
    const info = S.collect.info || await api("GET", "/api/collect");
    S.collect.info = info;
    $("trollboard").hidden = info.role === "volunteer";
    if (info.role !== "volunteer") {
      const t = await api("GET", `/api/collect/trollboard?time_frame=${frame}`);
      $("trollboard-table").tBodies[0].replaceChildren(...t.trollboard.map((x) => {
        const tr = el("tr"); tr.dataset.username = x.username;
        const flags = x.spam + x.lang_mismatch + x.not_appropriate + x.pii + x.hate_speech + x.sexual_content;
        for (const v of [x.rank, x.username, x.troll_score, x.red_flags, `${x.upvotes} / ${x.downvotes}`, x.spam_prompts, flags])
          tr.appendChild(el("td", null, String(v)));
        return tr;
      }));
    }
  } catch (e) { $("contributors-error").textContent = e.message; }
}

function moderateError(e) { $("moderate-error").textContent = e ? (e.message || String(e)) : ""; }

async function openModerate() {
  moderateError(null);
  const sel = $("moderate-state");
  if (sel.options.length === 1) {
    for (const s of ["initial_prompt_review", "growing", "ranking", "ready_for_export", "aborted_low_grade", "halted_by_moderator"]) {
      const o = el("option", null, s.replace(/_/g, " ")); o.value = s; sel.appendChild(o);
    }
  }
  await loadTrees();
  await loadReports();
}

async function loadTrees() {
  try {
    const state = $("moderate-state").value;
    const r = await api("GET", "/api/collect/trees" + (state ? `?state=${state}` : ""));
    $("moderate-summary").textContent = Object.entries(r.states).map(([k, v]) => `${k.replace(/_/g, " ")}: ${v}`).join(" · ") || "No trees yet.";
    $("moderate-trees").tBodies[0].replaceChildren(...r.trees.map((t) => {
      const tr = el("tr"); tr.dataset.id = t.id;
      for (const v of [t.state, (t.prompt || "").slice(0, 120), t.size, t.lang || "", t.tags.join(", ")]) tr.appendChild(el("td", null, String(v)));
      tr.addEventListener("click", () => openTree(t.id));
      return tr;
    }));
    if (S.collect.tree) await openTree(S.collect.tree);
  } catch (e) { moderateError(e); }
}

async function openTree(id) {
  try {
    const r = await api("GET", `/api/collect/trees/${id}`);
    S.collect.tree = id;
    $("moderate-tree").hidden = false;
    $("moderate-tree-state").textContent = `${r.tree.state.replace(/_/g, " ")} · ${r.messages.length} messages`;
    $("moderate-tree").dataset.state = r.tree.state;
    $("moderate-messages").replaceChildren(...r.messages.map((m) => {
      const li = el("li", m.deleted ? "deleted" : m.review_result === false ? "rejected" : "");
      li.dataset.id = m.id; li.style.marginLeft = `${m.depth * 18}px`;
      const who = m.synthetic ? `model ${m.model_name}` : (m.username || "imported");
      li.appendChild(el("div", "hint", `${m.role} · ${who} · reviews ${m.review_count}` +
        (m.review_result === null ? "" : m.review_result ? " · accepted" : " · rejected") +
        (m.rank === null ? "" : ` · rank ${m.rank}`) + (m.deleted ? " · deleted" : "")));
      li.appendChild(el("div", "text", m.text));
      const row = el("div", "row");
      if (!m.deleted) {
        const del = el("button", "delete", "Delete"); del.type = "button";
        del.addEventListener("click", async () => { try { await api("POST", `/api/collect/messages/${m.id}/delete`); await loadTrees(); } catch (e) { moderateError(e); } });
        row.appendChild(del);
        if (m.role === "prompter" && m.review_result && r.tree.state === "growing") {
          const gen = el("button", "synthetic", "Add a model's reply"); gen.type = "button";
          gen.addEventListener("click", async () => {
            gen.disabled = true;
            try { await api("POST", `/api/collect/messages/${m.id}/synthetic`, {}); await openTree(id); } catch (e) { moderateError(e); }
            gen.disabled = false;
          });
          row.appendChild(gen);
        }
      }
      li.appendChild(row);
      return li;
    }));
  } catch (e) { moderateError(e); }
}

async function haltTree(halt) {
  if (!S.collect.tree) return;
  try { await api("POST", `/api/collect/trees/${S.collect.tree}/halt`, { halt }); await loadTrees(); }
  catch (e) { moderateError(e); }
}

async function loadReports() {
  try {
    const r = await api("GET", "/api/collect/reports");
    $("moderate-reports").replaceChildren(...r.reports.map((x) => {
      const li = el("li"); li.dataset.id = x.message_id;
      li.append(el("span", null, `${x.username || "?"}: “${x.reason}” about: ${x.text.slice(0, 100)} `));
      const open = el("button", null, "Open tree"); open.type = "button";
      open.addEventListener("click", () => openTree(x.tree_id));
      li.appendChild(open);
      return li;
    }));
    if (!r.reports.length) $("moderate-reports").appendChild(el("li", "hint", "No open reports."));
  } catch (e) { moderateError(e); }
}

async function showHistory(ev) {
  if (ev) ev.preventDefault();
  moderateError(null);
  const name = $("moderate-user").value.trim();
  try {
    const h = await api("GET", `/api/collect/users/${encodeURIComponent(name)}`);
    $("moderate-history").hidden = false;
    $("moderate-history").dataset.username = name;
    $("moderate-history-summary").textContent = `${h.user.username} (${h.user.role}${h.user.banned ? ", banned" : ""}): ` +
      `${h.messages.length} messages, ${h.reviews.length} reviews, ${h.rankings.length} rankings, ${h.reports_about.length} reports about them, ${h.tasks.skipped} skips`;
    $("moderate-role-row").hidden = !(S.collect.info && S.collect.info.role === "admin");
    $("moderate-role").value = h.user.role;
    $("moderate-history-messages").replaceChildren(...h.messages.map((m) => el("li", m.deleted ? "deleted" : "", `${m.role}: ${m.text.slice(0, 160)}`)));
  } catch (e) { moderateError(e); }
}

async function userAction(method, path, body) {
  const name = $("moderate-history").dataset.username;
  try { await api(method, `/api/collect/users/${encodeURIComponent(name)}/${path}`, body); await showHistory(); }
  catch (e) { moderateError(e); }
}

function wireCollect() {
  $("collect-controls").addEventListener("submit", nextTask);
  $("collect-submit").addEventListener("click", submitTask);
  $("collect-skip").addEventListener("click", skipTask);
  $("contributors-frame").addEventListener("change", loadContributors);
  $("moderate-state").addEventListener("change", () => { S.collect.tree = null; $("moderate-tree").hidden = true; loadTrees(); });
  $("moderate-refresh").addEventListener("click", () => { loadTrees(); loadReports(); });
  $("moderate-halt").addEventListener("click", () => haltTree(true));
  $("moderate-resume").addEventListener("click", () => haltTree(false));
  $("moderate-user-form").addEventListener("submit", showHistory);
  $("moderate-ban").addEventListener("click", () => userAction("POST", "ban", { banned: true }));
  $("moderate-unban").addEventListener("click", () => userAction("POST", "ban", { banned: false }));
  $("moderate-role").addEventListener("change", () => userAction("PUT", "role", { role: $("moderate-role").value }));
}

// ---------------------------------------------------------------- theme
function applyTheme() {
  const t = localStorage.getItem("homellm-theme");
  if (t) document.documentElement.dataset.theme = t;
  else delete document.documentElement.dataset.theme;
}

function toggleTheme() {
  const dark = getComputedStyle(document.documentElement).getPropertyValue("--bg").trim() !== "#ffffff";
  localStorage.setItem("homellm-theme", dark ? "light" : "dark");
  applyTheme();
}

// ---------------------------------------------------------------- start
async function start() {
  S.me = await api("GET", "/api/me");
  S.csrf = S.me.csrf_token;
  if (S.me.key_required) { showGate("key"); return; }
  if (S.me.auth && !S.me.user) { showGate(S.me.needs_setup ? "setup" : "login", S.me.setup_token_required); return; }
  $("gate").hidden = true; $("app").hidden = false;
  showAccount();
  S.collect = { info: null, task: null, tree: null };   // another user may have logged in
  api("GET", "/api/collect?brief=true").then((i) => { $("moderate-link").hidden = i.role === "volunteer"; })
    .catch(() => { $("moderate-link").hidden = true; });
  await loadList();
  await showView(viewOf(location.pathname));
  if (S.view === "chat") {
    const id = location.hash.slice(1);
    if (id) await openConversation(id); else newChat();
  }
}

function wire() {
  applyTheme();
  $("gate-form").addEventListener("submit", gateSubmit);
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) send(ev);
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  let timer = null;
  $("search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(loadList, 200); });
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
  $("settings").addEventListener("submit", saveSettings);
  $("theme-toggle").addEventListener("click", toggleTheme);
  for (const b of document.querySelectorAll(".menu"))
    b.addEventListener("click", () => $("app").classList.toggle("side-open"));
  for (const a of $("views").querySelectorAll("a")) {
    a.addEventListener("click", (ev) => { ev.preventDefault(); go(a.getAttribute("href")); });
  }
  window.addEventListener("popstate", () => {
    if (S.me && (!S.me.auth || S.me.user)) showView(viewOf(location.pathname)).catch(showError);
  });
  $("arena-composer").addEventListener("submit", battle);
  $("arena-prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) battle(ev);
  });
  $("arena-stop").addEventListener("click", stopBattle);
  for (const b of $("arena-votes").querySelectorAll("button"))
    b.addEventListener("click", () => vote(b.dataset.vote));
  $("leaderboard-refresh").addEventListener("click", () => loadLeaderboard());
  $("evals-refresh").addEventListener("click", () => loadEvals());
  wireCollect();
  $("import-file").addEventListener("change", importFile);
  $("share-feedback").addEventListener("change", async () => {
    try { S.me.user = (await api("PATCH", "/api/me", { share_feedback: $("share-feedback").checked })).user; }
    catch (e) { showError(e); }
  });
  $("add-user").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const r = await api("POST", "/api/users", { username: $("new-username").value, password: $("new-password").value });
      $("add-user-status").textContent = `Added ${r.user.username}`;
      $("new-username").value = ""; $("new-password").value = "";
      loadUsers();
    } catch (e) { $("add-user-status").textContent = e.message; }
  });
  $("logout").addEventListener("click", async () => {
    try { await api("POST", "/api/logout"); } catch (e) { /* already out */ }
    S.conv = null; S.turns = [];
    await start();
  });
  window.addEventListener("hashchange", () => {   // a pasted link, the back button
    const id = location.hash.slice(1);
    if (S.me && (!S.me.auth || S.me.user) && S.view === "chat" && id && (!S.conv || S.conv.id !== id)) openConversation(id);
  });
  start().catch(showError);
}

document.addEventListener("DOMContentLoaded", wire);
