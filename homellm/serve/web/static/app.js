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
const VIEWS = { "/": "chat", "/arena": "arena", "/leaderboard": "leaderboard", "/evals": "evals" };
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
