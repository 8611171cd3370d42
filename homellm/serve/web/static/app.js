// homellm web app, the chat: plain JS, no build step (what loads later: serve/web/assets.py).
// Safety: user and model text reach the page only as text nodes (never innerHTML): markdown-it's
// tokens become DOM nodes here, raw HTML stays text, links keep only http(s) and mailto. The
// server's Content-Security-Policy forbids inline script as a second wall.
"use strict";

const $ = (id) => document.getElementById(id);
const S = {
  me: null, csrf: "", models: [], defaultModel: null, samplingDefaults: {}, defaults: {},
  conv: null, turns: [], context: null, running: [], prefs: [], list: [], listDone: false,
  streaming: null,            // {conv, id, controller, parent}: the reply this page shows growing
  lost: false,                // the server stopped answering
  stick: true,                // follow a growing reply (the reader is at the bottom)
  view: "chat",               // the view shown: chat, arena, leaderboard, ... (by address)
  arena: { battle: null, streaming: null, texts: { a: "", b: "" }, finish: {} },
  collect: { info: null, task: null, tree: null },   // the Contribute and Moderate views
};
const PAGE = 100;             // conversations per page of the list

// ---------------------------------------------------------------- HTTP
// No answer: "lost connection" (never "Failed to fetch"); an ended session: the login form.
async function api(method, path, body, extraHeaders, again) {
  const opts = { method, headers: { "X-CSRF-Token": S.csrf, ...(extraHeaders || {}) },
                 credentials: "same-origin" };
  if (body !== undefined) {
    if (typeof body === "string") opts.body = body;
    else { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  }
  let r;
  try { r = await fetch(path, opts); } catch (e) { throw connectionLost(); }
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const code = data && data.error ? data.error.code : null;
    const msg = data && data.error ? data.error.message : `${method} ${path}: HTTP ${r.status}`;
    if (r.status === 401 && path !== "/api/key-login" && path !== "/api/login") {
      if (code === "invalid_api_key") setTimeout(() => start().catch(showError), 0);  // key forgotten (restart)
      if (code === "not_logged_in") later("showGate")("login", false, "Your session has ended: log in again.");
    }
    // a restarted server has a new token (without --auth it is the process's): read it, once more
    if (code === "csrf_failed" && !again && await freshToken()) return api(method, path, body, extraHeaders, true);
    const err = new Error(msg); err.status = r.status; err.code = code;
    err.handled = code === "not_logged_in";   // the login form says it
    throw err;
  }
  return data;
}

// The CSRF token again (GET /api/me): true when it changed.
async function freshToken() {
  const was = S.csrf;
  try { S.csrf = (await api("GET", "/api/me", undefined, undefined, true)).csrf_token; } catch (e) { return false; }
  return S.csrf !== was;
}

function showError(e) {
  if (e && (e.lost || e.handled)) return;    // the banner, or the login form, says it
  $("error").textContent = e ? (e.message || String(e)) : "";
}

function el(tag, cls, text) {
  const n = document.createElement(tag);
  if (cls) n.className = cls;
  if (text !== undefined && text !== null) n.textContent = text;
  return n;
}

function button(cls, text, onClick, label) {
  const b = el("button", cls, text);
  b.type = "button";
  if (label) b.setAttribute("aria-label", label);
  if (onClick) b.addEventListener("click", onClick);
  return b;
}

function announce(text) { $("announce").textContent = text; }   // read once by screen readers

// Files loaded when first needed; later(name) calls a function of more.js once it is there.
const loaded = {};
function load(src) {
  if (!loaded[src]) {
    loaded[src] = new Promise((resolve, reject) => {
      const css = src.endsWith(".css"), n = el(css ? "link" : "script");
      if (css) { n.rel = "stylesheet"; n.href = src; } else n.src = src;
      n.addEventListener("load", resolve);
      n.addEventListener("error", () => { delete loaded[src]; reject(connectionLost()); });
      document.head.appendChild(n);
    });
  }
  return loaded[src];
}
const later = (name) => (...args) => load("/static/more.js").then(() => window[name](...args));

// ---------------------------------------------------------------- lost connection
// A banner with Retry; /health every 2 s; then the conversation is read back (all shown is stored).
let healthTimer = null;

function connectionLost() {
  const err = new Error("Lost connection to the server"); err.lost = true;
  if (!S.lost) {
    S.lost = true;
    $("connection").hidden = false;
    if (S.streaming) { S.streaming.controller.abort(); S.streaming = null; setStreaming(false); }
    renderMessages();
    healthTimer = setInterval(checkHealth, 2000);
  }
  return err;
}

async function checkHealth() {
  try {
    const r = await fetch("/health", { credentials: "same-origin" });
    if (!r.ok && r.status !== 401) return;
  } catch (e) { return; }
  clearInterval(healthTimer); healthTimer = null;
  S.lost = false;
  $("connection").hidden = true;
  showError(null);
  announce("Connected to the server again.");
  try {
    await freshToken();                                  // a restart gave it a new CSRF token
    if (S.conv) await openConversation(S.conv.id, { keepView: true });
    loadList();
  } catch (e) { showError(e); }
}

// ---------------------------------------------------------------- code blocks
async function copyText(text, btn, label) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard API (plain http on another host): a hidden textarea
    const t = el("textarea"); t.value = text; document.body.appendChild(t); t.select();
    try { document.execCommand("copy"); } catch (e2) { /* nothing more to try */ }
    t.remove();
  }
  btn.textContent = "Copied";
  setTimeout(() => { btn.textContent = label || "Copy"; }, 1200);
}

function codeBlock(code, lang) {
  const wrap = el("div", "codeblock");
  const pre = el("pre"), c = el("code");
  pre.tabIndex = 0;          // a scrolling box the keyboard can reach
  if (lang) c.dataset.lang = lang;
  c.textContent = code;                      // coloured by more.js's highlight() once it is here
  if (window.highlight) { c.replaceChildren(window.highlight(code, lang)); c.classList.add("hl"); }
  else later("highlightAll")();
  pre.appendChild(c);
  const copy = button("copy", "Copy", () => copyText(code, copy), lang ? `Copy the ${lang} code` : "Copy the code");
  wrap.appendChild(pre);
  if (lang) wrap.appendChild(el("span", "lang", lang));
  wrap.appendChild(copy);
  return wrap;
}

// ---------------------------------------------------------------- markdown
// markdown-it's tokens (raw HTML off) as DOM nodes; headings renumbered from h2 (one h1).
let MD = null;

function parser() {
  if (MD) return MD;
  MD = window.markdownit({ html: false, linkify: true, breaks: true, typographer: false,
                           maxNesting: 40 });
  if (window.mathRules) window.mathRules(MD);
  return MD;
}

// math.js's rules join the parser the first time a text could hold math.
const MAYBE_MATH = /\$|\\[([]/;
let mathAsked = false;

function askMath(src) {
  if (mathAsked || window.mathRules || !MAYBE_MATH.test(src)) return;
  mathAsked = true;
  load("/static/math.js").then(() => { window.mathRules(parser()); renderMessages(); }).catch(() => { mathAsked = false; });
}

function markdown(src) {
  askMath(src);
  const root = document.createDocumentFragment();
  const tokens = parser().parse(src, {});
  const levels = [...new Set(tokens.filter((t) => t.type === "heading_open").map((t) => +t.tag[1]))].sort();
  const stack = [root];
  const top = () => stack[stack.length - 1];
  for (const t of tokens) {
    if (t.type === "inline") { inline(t.children, top()); continue; }
    if (t.nesting === -1) { if (!t.hidden) stack.pop(); continue; }
    if (t.hidden) continue;                     // a tight list's paragraph
    let n = null;
    if (t.type === "fence" || t.type === "code_block") {
      n = codeBlock(t.content.replace(/\n$/, ""), (t.info || "").trim().split(/\s+/)[0]);
    } else if (t.type === "math_block") n = window.math(t.content, true);
    else if (t.type === "heading_open") n = el("h" + Math.min(6, 2 + levels.indexOf(+t.tag[1])));
    else if (t.type === "table_open") {
      const wrap = el("div", "table-wrap"); top().appendChild(wrap);
      n = el("table"); wrap.appendChild(n); stack.push(n); continue;
    } else if (t.type === "hr") n = el("hr");
    else if (t.type === "html_block") n = el("p", null, t.content);
    else if (t.tag) {
      n = el(t.tag);
      const align = /text-align:(\w+)/.exec(t.attrGet("style") || "");
      if (align) n.className = "al-" + align[1];
      if (t.tag === "ol" && t.attrGet("start")) n.start = +t.attrGet("start");
    }
    if (!n) continue;
    top().appendChild(n);
    if (t.nesting === 1) stack.push(n);
  }
  return root;
}

const LINKABLE = /^(https?:\/\/|mailto:)/i;

function inline(children, parent) {
  const stack = [parent];
  const top = () => stack[stack.length - 1];
  children.forEach((t, i) => {
    if (t.nesting === -1) { stack.pop(); return; }
    let n = null;
    switch (t.type) {
      case "text": case "text_special": case "html_inline":
        if (i === 0 && top().tagName === "LI" && /^\[[ xX]\] /.test(t.content)) {   // a task
          const box = el("input"); box.type = "checkbox"; box.disabled = true;
          box.checked = t.content[1] !== " ";
          box.setAttribute("aria-label", box.checked ? "done" : "not done");
          top().classList.add("task"); top().append(box, t.content.slice(3));
          return;
        }
        top().appendChild(document.createTextNode(t.content)); return;
      case "softbreak": case "hardbreak": n = el("br"); break;
      case "code_inline": n = el("code", null, t.content); break;
      case "math_inline": n = window.math(t.content, t.markup === "display"); break;
      case "image": n = image(t); break;
      case "link_open": {
        const href = t.attrGet("href") || "";
        const next = children[i + 1];
        const plain = t.markup === "linkify" && !/^(https?:\/\/|www\.|mailto:)/i.test(next ? next.content : "");
        if (!LINKABLE.test(href) || plain) { stack.push(top()); return; }   // its text only
        n = el("a"); n.href = href; n.target = "_blank"; n.rel = "noopener noreferrer nofollow";
        if (t.attrGet("title")) n.title = t.attrGet("title");
        break;
      }
      default: n = t.tag ? el(t.tag) : null;   // strong, em, s
    }
    if (!n) return;
    top().appendChild(n);
    if (t.nesting === 1) stack.push(n);
  });
}

// Images from elsewhere load only when asked (else a reply could tell a site it was read).
function image(t) {
  const src = t.attrGet("src") || "", alt = t.content || "";
  const img = el("img"); img.alt = alt; img.loading = "lazy"; img.referrerPolicy = "no-referrer";
  if (t.attrGet("title")) img.title = t.attrGet("title");
  if (/^data:image\/(png|gif|jpeg|webp);/i.test(src) || /^\/(?!\/)/.test(src)) { img.src = src; return img; }
  if (!/^https?:\/\//i.test(src)) return document.createTextNode(alt);
  const wrap = el("span", "remote-image");
  const load = button("load-image", `Show image: ${alt || "no description"} (${new URL(src).host})`, () => {
    img.src = src; load.remove();
  });
  wrap.append(img, load);
  return wrap;
}

// ---------------------------------------------------------------- messages
// Drawn again after each change, keeping focus (by message and data-key) and the scroll
// (a growing reply is followed only while the reader is at the bottom).
function focusKey() {
  const a = document.activeElement;
  const msg = a && a.closest && a.closest(".msg");
  return msg && a.dataset.key ? [msg.dataset.id, a.dataset.key] : null;
}

function renderMessages() {
  if (S.view !== "chat") return;   // the chat's parts exist only in its view (showView)
  const box = $("messages"), keep = focusKey(), top = box.scrollTop;
  box.replaceChildren();
  const first = leftOutFrom();
  for (const turn of S.turns) {
    if (turn.message.id === first) box.appendChild(el("p", "left-out", `${S.context.left_out} earlier message${S.context.left_out === 1 ? " was" : "s were"} not sent to the model (they do not fit its context)`));
    box.appendChild(renderTurn(turn));
  }
  if (S.streaming && S.streaming.conv === (S.conv && S.conv.id) && !S.streaming.id) box.appendChild(pendingReply());
  if (!S.turns.length && !S.streaming) box.appendChild(welcome());
  if (keep) {
    const n = box.querySelector(`.msg[data-id="${keep[0]}"] [data-key="${keep[1]}"]`);
    if (n) n.focus({ preventScroll: true });
  }
  if (S.stick) box.scrollTop = box.scrollHeight; else box.scrollTop = top;
  renderContext();
}

function leftOutFrom() {   // the first message the last reply was sent with
  for (let i = S.turns.length - 1; i >= 0; i--) {
    const ctx = (S.turns[i].message.meta || {}).context;
    if (ctx && ctx.first_sent) return ctx.first_sent;
  }
  return null;
}

function welcome() {
  const w = el("div", "welcome");
  const m = S.models.find((x) => x.id === ($("set-model").value || S.defaultModel));
  w.append(el("p", null, m ? `${m.id}${m.ctx ? ` · context ${m.ctx} tokens` : ""}` : ""),
           el("p", "hint", "Your conversations stay on this server. Try: “Explain how bread rises.”"));
  return w;
}

function pendingReply() {
  const div = el("div", "msg assistant pending");
  const body = el("div", "body cursor");
  body.append(el("span", "loading", ""));
  div.appendChild(body);
  return div;
}

function tool(cls, text, key, onClick, label, disabled) {
  const b = button(cls, text, onClick, label);
  b.dataset.key = key;
  b.disabled = !!disabled;
  return b;
}

function renderTurn(turn) {
  const m = turn.message;
  const div = el("div", "msg " + m.role);
  div.dataset.id = m.id;
  div.dataset.role = m.role;
  if (S.editing && S.editing.id === m.id) { div.appendChild(editBox(turn)); return div; }
  const body = el("div", "body" + (m.role === "assistant" ? " md" : ""));
  fillBody(body, m);
  div.appendChild(body);
  const meta = el("div", "meta");
  const growing = !!S.streaming && S.streaming.id === m.id;
  const busy = !!S.streaming && S.streaming.conv === S.conv.id;
  const n = turn.sibling_ids.length, who = m.role === "user" ? "message" : "reply";
  if (n > 1) {
    meta.append(
      tool("prev", "‹", "prev", () => selectMessage(turn.sibling_ids[turn.index - 1]),
           turn.index > 0 ? `Previous ${who} (${turn.index} of ${n})` : `Previous ${who}`, turn.index === 0 || busy),
      el("span", "pos", `${turn.index + 1}/${n}`),
      tool("next", "›", "next", () => selectMessage(turn.sibling_ids[turn.index + 1]),
           turn.index < n - 1 ? `Next ${who} (${turn.index + 2} of ${n})` : `Next ${who}`, turn.index === n - 1 || busy));
  }
  const copy = tool("copy-message", "Copy", "copy", () => copyText(m.content, copy), `Copy this ${who}`);
  const more = el("span", "more");
  more.hidden = true;
  const moreButton = tool("more-toggle", "⋯", "more", () => {
    more.hidden = !more.hidden; moreButton.setAttribute("aria-expanded", String(!more.hidden));
  }, `More actions for this ${who}`);
  moreButton.setAttribute("aria-expanded", "false");
  const del = tool("delete-branch", "Delete", "delete", () => later("deleteBranch")(m, del), `Delete this ${who} and what follows it`, busy);
  if (m.role === "user") {
    meta.append(tool("edit", "Edit", "edit", () => later("startEdit")(turn), "Edit this message (a new branch)", busy), copy);
    const last = turn === S.turns[S.turns.length - 1];
    if (last && !busy) meta.appendChild(tool("answer primary-soft", "Get a reply", "answer", () => generate(m.id)));
    more.append(del);
    meta.append(moreButton, more);
  } else if (!growing) {
    const badge = m.finish_reason === "stopped" ? "stopped" : m.finish_reason === "error" ? "failed"
      : m.incomplete ? (S.running.includes(m.id) ? "" : "interrupted") : m.finish_reason === "length" ? "max tokens" : "";
    if (badge) meta.appendChild(el("span", "badge" + (badge === "stopped" ? " stopped" : ""), badge));
    meta.appendChild(tool("regenerate", "Regenerate", "regenerate", () => generate(m.parent_id), null, busy));
    if (m.finish_reason === "length" || (m.incomplete && !S.running.includes(m.id) && m.content))
      meta.appendChild(tool("continue", "Continue", "continue", () => generate(m.parent_id, m.id), "Continue this reply", busy));
    const rating = turn.rating ? turn.rating.value : 0;
    const up = tool("thumb up" + (rating === 1 ? " on" : ""), "▲ good", "up", () => rate(turn, rating === 1 ? 0 : 1), "Good reply");
    const down = tool("thumb down" + (rating === -1 ? " on" : ""), "▼ bad", "down", () => rate(turn, rating === -1 ? 0 : -1), "Bad reply");
    up.setAttribute("aria-pressed", String(rating === 1));
    down.setAttribute("aria-pressed", String(rating === -1));
    const commentOpen = !!rating || !!(turn.rating && turn.rating.comment) || turn.commenting;
    const note = tool("comment-toggle", "Comment", "comment", () => { turn.commenting = !commentOpen; renderMessages(); });
    note.setAttribute("aria-expanded", String(commentOpen));
    meta.append(copy, up, down, note);
    more.append(tool("edit-reply", "Edit", "edit-reply", () => later("startEdit")(turn), "Write your own version of this reply (a new branch)", busy),
                tool("write-reply", "Write a reply", "write", () => later("startEdit")(turn, true), "Write a reply yourself (a new branch)", busy), del);
    meta.append(moreButton, more);
    const info = [];
    if (m.model) info.push(m.model);
    else if ((m.meta || {}).synthetic === false) info.push("written by you");
    if (m.timings && m.timings.predicted_per_second) info.push(`${m.timings.predicted_per_second} tok/s`);
    if (info.length) meta.appendChild(el("span", "info", info.join(" · ")));
    div.appendChild(meta);
    if (n > 1) div.appendChild(part("compareRow", turn));
    if (commentOpen) div.appendChild(part("commentBox", turn, rating));
    return div;
  }
  div.appendChild(meta);
  return div;
}

// Parts drawn by more.js: a placeholder until it is there, then the messages again.
function part(name, ...args) {
  if (window[name]) return window[name](...args);
  load("/static/more.js").then(renderMessages);
  return el("span");
}

function fillBody(body, m) {
  body.replaceChildren();
  if (m.role === "user") body.textContent = m.content;
  else body.appendChild(markdown(m.content));
  body.classList.toggle("cursor", !!S.streaming && S.streaming.id === m.id);
}

function renderContext() {
  const c = S.context, out = $("context-use");
  out.classList.remove("near", "over");
  $("context-warning").hidden = true;
  if (!c || c.used == null) { out.textContent = ""; return; }
  const n = (x) => x.toLocaleString("en");
  out.textContent = `${c.estimate ? "≈ " : ""}${n(c.used)}${c.ctx ? " / " + n(c.ctx) : ""} tokens`;
  if (c.ctx && c.used >= 0.8 * c.ctx) {
    out.classList.add(c.used >= c.ctx ? "over" : "near");
    $("context-warning").hidden = false;
    $("context-warning").textContent = c.used >= c.ctx
      ? "This conversation is longer than the model's context: the oldest messages will not be sent with the next one."
      : "This conversation is near the model's context: soon the oldest messages will be left out of what it sees.";
  }
}

async function selectMessage(id) {
  const at = S.turns.findIndex((t) => t.sibling_ids.includes(id)), key = focusKey();
  try { applyDetail(await api("POST", `/api/messages/${id}/select`)); } catch (e) { showError(e); return; }
  // focus stays on the arrow, in the message that took the old one's place (or on the other
  // arrow once this one is disabled at the end)
  const msg = at >= 0 && key && (key[1] === "prev" || key[1] === "next") && $("messages").querySelectorAll(".msg")[at];
  if (msg) {
    const b = msg.querySelector(`[data-key="${key[1]}"]`), other = msg.querySelector(`[data-key="${key[1] === "prev" ? "next" : "prev"}"]`);
    (b && !b.disabled ? b : other || b).focus({ preventScroll: true });
  }
}

async function rate(turn, value, comment, quiet) {
  try {
    const keep = comment !== undefined ? comment : (turn.rating && turn.rating.comment) || null;
    const r = await api("PUT", `/api/messages/${turn.message.id}/rating`, { value, comment: keep || null });
    turn.rating = r.rating;
    if (!quiet || !document.querySelector(`.msg[data-id="${turn.message.id}"] .comment-box`)) renderMessages();
  } catch (e) { showError(e); }
}

// ---------------------------------------------------------------- conversations
function applyDetail(d) {
  S.conv = d.conversation; S.turns = d.turns; S.context = d.context;
  S.running = d.running || []; S.prefs = d.preferences || [];
  const title = S.conv.title || "New chat";
  $("conv-title").textContent = title;
  document.title = `${title} · homellm`;
  $("export-one").href = `/api/conversations/${S.conv.id}/export`;
  $("export-one").hidden = false;
  fillSettings();
  renderMessages();
  markActive();
  if (S.running.length && !S.streaming) attach(S.running[S.running.length - 1]);
}

const DAY = 86400000;
function groupOf(stamp) {
  const t = new Date(stamp), now = new Date();
  const today = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime();
  if (t >= today) return "Today";
  if (t >= today - DAY) return "Yesterday";
  if (t >= today - 7 * DAY) return "Previous 7 days";
  if (t >= today - 30 * DAY) return "Previous 30 days";
  return "Older";
}

async function loadList(more) {
  const q = $("search").value.trim();
  const ul = $("conversations");
  try {
    if (q) {
      const r = await api("GET", `/api/search?q=${encodeURIComponent(q)}`);
      ul.replaceChildren(...r.hits.map((h) => listItem({ id: h.conversation_id, title: h.title }, h)));
      if (!r.hits.length) ul.appendChild(el("li", "no-results", "No results"));
      ul.dataset.mode = "search";
      $("list-more").hidden = true;
    } else {
      const offset = more ? S.list.length : 0;
      const r = await api("GET", `/api/conversations?limit=${PAGE}&offset=${offset}`);
      S.list = more ? S.list.concat(r.conversations) : r.conversations;
      S.listDone = r.conversations.length < PAGE;
      const items = [];
      let group = null;
      for (const c of S.list) {
        const g = groupOf(c.updated_at);
        if (g !== group) { items.push(el("li", "group", g)); group = g; }
        items.push(listItem(c));
      }
      ul.replaceChildren(...items);
      ul.dataset.mode = "all";
      $("list-more").hidden = S.listDone;
    }
    markActive();
  } catch (e) { showError(e); }
}

function listItem(c, hit) {
  const li = el("li");
  li.dataset.id = c.id;
  const open = button("open", c.title || "Untitled", () => openConversation(c.id, hit ? { hit } : {}));
  open.title = c.title || "";
  if (hit && hit.snippet !== c.title) open.appendChild(el("span", "snippet", hit.snippet));
  const name = c.title || "Untitled";
  const ren = button("tool rename", "✎", null, `Rename “${name}”`), del = button("tool delete", "✕", null, `Delete “${name}”`);
  ren.addEventListener("click", () => later("renameConversation")(li, c));
  del.addEventListener("click", () => later("deleteConversation")(del, c));
  li.append(open, ren, del);
  return li;
}

function markActive() {
  for (const li of $("conversations").children) {
    const on = !!S.conv && li.dataset.id === S.conv.id;
    li.classList.toggle("active", on);
    const b = li.querySelector(".open");
    if (b) { if (on) b.setAttribute("aria-current", "true"); else b.removeAttribute("aria-current"); }
  }
}

// Leaving a growing reply: it goes on on the server; opening the chat watches it again.
function detach() {
  if (S.streaming) { S.streaming.controller.abort(); S.streaming = null; setStreaming(false); }
}

async function openConversation(id, opts) {
  opts = opts || {};
  if (S.arena.streaming) return;
  if (S.view !== "chat") { history.pushState(null, "", "/"); await showView("chat"); }
  if (!(S.streaming && S.streaming.conv === id)) detach();
  if (!S.conv || S.conv.id !== id) S.editing = null;
  showError(null);
  try {
    if (!opts.keepView) S.stick = true;
    const hit = opts.hit;
    applyDetail(await api(hit && hit.message_id ? "POST" : "GET",
                          hit && hit.message_id ? `/api/messages/${hit.message_id}/select` : `/api/conversations/${id}`));
    if (location.hash !== `#${id}`) history.replaceState(null, "", `#${id}`);
    closeSidebar();
    if (hit) later("showHit")(hit);
  } catch (e) { showError(e); }
}

function newChat() {
  if (S.arena.streaming) return;
  if (S.view !== "chat") { go("/"); }
  detach();
  S.conv = null; S.turns = []; S.context = null; S.running = []; S.prefs = []; S.stick = true; S.editing = null;
  $("conv-title").textContent = "New chat";
  document.title = "homellm";
  $("export-one").hidden = true;
  history.replaceState(null, "", location.pathname);
  fillSettings(); renderMessages(); markActive();
  closeSidebar();
  $("prompt").focus();
}

// ---------------------------------------------------------------- settings
// Settings apply as they change (a new chat's: its draft); "Use for new chats": my defaults.
const NUMBERS = ["temperature", "top_p", "top_k", "max_tokens", "seed"];

function fillSettings() {
  if (S.view !== "chat" || $("settings").contains(document.activeElement)) return;
  const sel = $("set-model");
  sel.replaceChildren(...S.models.map((m) => { const o = el("option", null, m.id); o.value = m.id; return o; }));
  const c = S.conv || S.draft || {};
  sel.value = c.model || S.defaultModel || "";
  $("set-system").value = c.system_prompt || "";
  const s = c.sampling || {};
  for (const k of NUMBERS) {
    $("set-" + k).value = s[k] != null ? s[k] : "";
    if (S.samplingDefaults[k] != null) $("set-" + k).placeholder = String(S.samplingDefaults[k]);
  }
}

function readSettings() {
  const sampling = {};
  for (const k of NUMBERS) {
    const v = $("set-" + k).value.trim();
    if (v !== "") sampling[k] = (k === "top_k" || k === "max_tokens" || k === "seed") ? parseInt(v, 10) : parseFloat(v);
  }
  return { model: $("set-model").value || null, system_prompt: $("set-system").value || null, sampling };
}

function newDraft() {   // a new chat starts from the user's defaults
  const d = S.defaults || {};
  return { model: d.model || S.defaultModel, system_prompt: d.system_prompt || null, sampling: { ...(d.sampling || {}) } };
}

let settingsTimer = null;
function settingsChanged() {
  if (!$("settings").checkValidity()) { $("settings").reportValidity(); return; }
  clearTimeout(settingsTimer);
  settingsTimer = setTimeout(applySettings, 300);
}

async function applySettings() {
  settingsTimer = null;
  const s = readSettings(), status = $("settings-status");
  try {
    if (S.conv) applyDetail(await api("PATCH", `/api/conversations/${S.conv.id}`, s));
    else { S.draft = s; renderMessages(); }
    status.textContent = S.conv ? "Saved" : "Used for this new chat";
    setTimeout(() => { status.textContent = ""; }, 1500);
  } catch (e) { showError(e); }
}

async function saveDefaults(ev) {
  ev.preventDefault();
  const s = readSettings();
  try {
    S.defaults = (await api("PUT", "/api/settings", s)).settings;
    $("settings-status").textContent = "Saved as your defaults for new chats";
    if (!S.conv) S.draft = newDraft();
  } catch (e) { showError(e); }
}

// ---------------------------------------------------------------- sending and streaming
async function send(ev) {
  if (ev) ev.preventDefault();
  if (S.streaming && S.conv && S.streaming.conv === S.conv.id) return;   // its reply still grows
  const text = $("prompt").value.trim();
  if (!text) return;
  showError(null);
  try {
    if (settingsTimer) { clearTimeout(settingsTimer); settingsTimer = null; await applySettings(); }
    if (!S.conv) {
      S.conv = (await api("POST", "/api/conversations", readSettings())).conversation;
      if (S.conv.model) S.defaultModel = S.conv.model;   // the last used, as the server's default
      S.draft = newDraft();
    }
    const last = S.turns.length ? S.turns[S.turns.length - 1].message : null;
    // an unanswered message never blocks: the text joins it as its new version (1/2 stays)
    const r = last && last.role === "user"
      ? await api("POST", `/api/messages/${last.id}/edit`, { content: `${last.content}\n\n${text}` })
      : await api("POST", `/api/conversations/${S.conv.id}/messages`, { content: text, parent_id: last ? last.id : null });
    $("prompt").value = ""; growComposer();
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

// Ask for a reply (to `parentId`; or more of reply `continueId`) and show it as it grows.
async function generate(parentId, continueId) {
  if (!S.conv || S.lost || (S.streaming && S.streaming.conv === S.conv.id)) return;
  detach();
  showError(null);
  const s = { conv: S.conv.id, id: continueId || null, controller: new AbortController() };
  S.streaming = s; S.stick = true;
  setStreaming(true);
  renderMessages();
  later("watchLoading")(s, S.conv.model || S.defaultModel);   // a cold model: "Loading model…"
  try {
    const ask = () => fetch(`/api/conversations/${s.conv}/generate`, {
      method: "POST", credentials: "same-origin", signal: s.controller.signal,
      headers: { "Content-Type": "application/json", "X-CSRF-Token": S.csrf },
      body: JSON.stringify(continueId ? { continue_id: continueId } : { parent_id: parentId }),
    });
    let r = await ask();
    if (r.status === 403 && await freshToken()) r = await ask();   // the server restarted
    s.answered = true;
    await follow(r, s);
  } catch (e) {
    s.answered = true;
    ended(s, e);
  }
}

// Watch a reply that runs on the server already (a reload, or back from another chat).
async function attach(id) {
  if (S.lost || !S.conv) return;
  const s = { conv: S.conv.id, id, controller: new AbortController() };
  S.streaming = s;
  setStreaming(true);
  renderMessages();
  try {
    const r = await fetch(`/api/replies/${id}/events`, { credentials: "same-origin", signal: s.controller.signal });
    await follow(r, s);
  } catch (e) { ended(s, e); }
}

async function follow(r, s) {
  if (!r.ok) {
    let msg = `HTTP ${r.status}`, code = null;
    try { const d = await r.json(); msg = d.error.message; code = d.error.code; } catch (e) { /* not JSON */ }
    if (r.status === 401 && code === "not_logged_in") later("showGate")("login", false, "Your session has ended: log in again.");
    const err = new Error(msg); err.status = r.status; err.code = code;
    err.handled = code === "not_logged_in";
    throw err;
  }
  let turn = null, body = null, failed = null, drawing = false;
  const draw = () => {   // one redraw a frame, however many tokens came (each redraw parses it all)
    drawing = false;
    if (S.streaming !== s || !turn) return;
    if (body && body.isConnected) fillBody(body, turn.message);
    follow_bottom();
  };
  await readEvents(r, (event, d) => {
    if (S.streaming !== s) return;
    if (event === "start") {
      s.id = d.message.id;
      if (s.stopWanted) stop();
      const at = S.turns.findIndex((t) => t.message.id === d.message.id);
      if (at >= 0) { turn = S.turns[at]; turn.message = d.message; }
      else {
        const p = S.turns.findIndex((t) => t.message.id === d.message.parent_id);
        S.turns = S.turns.slice(0, p + 1);
        turn = { message: d.message, sibling_ids: d.sibling_ids, index: d.sibling_ids.length - 1, rating: null };
        S.turns.push(turn);
      }
      if (d.context) S.context = { ...(S.context || {}), left_out: d.context.left_out };
      renderMessages();
      body = document.querySelector(`.msg[data-id="${d.message.id}"] .body`);
    } else if (event === "delta" && turn) {
      turn.message.content += d.text;
      if (!drawing) { drawing = true; requestAnimationFrame(draw); }
    } else if (event === "done" && turn) {
      turn.message = d.message; if (d.context) S.context = d.context;
    } else if (event === "error") failed = new Error(d.error.message);
  });
  if (S.streaming !== s) return;
  let d = null;
  try { d = await api("GET", `/api/conversations/${s.conv}`); } catch (e) { showError(e); }
  if (S.streaming !== s) return;
  S.streaming = null;
  setStreaming(false);
  if (d && S.conv && S.conv.id === s.conv) applyDetail(d); else renderMessages();
  if (failed) showError(failed);
  if (turn) announce(`Reply ${turn.message.finish_reason === "stopped" ? "stopped" : "done"}: ${turn.message.content.slice(0, 500)}`);
  loadList();
}

function ended(s, e) {
  if (S.streaming === s) { S.streaming = null; setStreaming(false); }
  if (e.name === "AbortError") return;                  // this page looked away; the reply goes on
  if (e instanceof TypeError) { connectionLost(); return; }   // the server went away mid-reply
  showError(e);
  renderMessages();
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

function atBottom() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 40;
}

function follow_bottom() {
  const box = $("messages");
  if (S.stick) box.scrollTop = box.scrollHeight;
  $("to-bottom").hidden = atBottom();
}

async function stop() {
  const s = S.streaming;
  if (!s) return;
  if (!s.id) { s.stopWanted = true; return; }      // stopped as soon as it has started
  try { await api("POST", `/api/replies/${s.id}/stop`); } catch (e) { showError(e); }
}

// ---------------------------------------------------------------- views
// One page, a view per address; other views take the chat's model names out of the page
// (the arena's blindness: no model name in the document while a battle is unvoted).
const VIEWS = { "/": "chat", "/arena": "arena", "/leaderboard": "leaderboard", "/evals": "evals",
                "/contribute": "contribute", "/contributors": "contributors", "/moderate": "moderate" };
const viewOf = (path) => VIEWS[path] || "chat";

// views.html (static markup from this origin, no user text), views.css and views.js.
async function loadViews() {
  if (!$("arena-view")) {
    const r = await fetch("/static/views.html").catch(() => { throw connectionLost(); });
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    if (!$("arena-view")) document.querySelector("main.main").append(...doc.body.children);
  }
  await Promise.all([load("/static/views.css"), load("/static/views.js")]);
}

function go(path) {
  if (S.arena.streaming) return;
  if (location.pathname !== path) history.pushState(null, "", path);
  closeSidebar();
  showView(viewOf(path)).catch(showError);
}

async function showView(view) {
  S.view = view;
  if (view !== "chat") await loadViews();
  for (const v of Object.values(VIEWS)) if ($(v + "-view")) $(v + "-view").hidden = v !== view;
  for (const a of $("views").querySelectorAll("a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (view !== "leaderboard" && $("leaderboard-table")) $("leaderboard-table").tBodies[0].replaceChildren();
  if (view === "chat") {
    if (!S.models.length) await loadModels();
    fillSettings(); renderMessages();
    document.title = S.conv && S.conv.title ? `${S.conv.title} · homellm` : "homellm";
    return;
  }
  detach();
  $("set-model").replaceChildren(); $("messages").replaceChildren(); $("context-use").textContent = "";
  document.title = `homellm · ${view[0].toUpperCase()}${view.slice(1)}`;
  if (view === "arena") await openArena();
  else if (view === "leaderboard") await loadLeaderboard();
  else if (view === "contribute") await openContribute();
  else if (view === "contributors") await loadContributors();
  else if (view === "moderate") await openModerate();
  else await loadEvals();
}

async function loadModels() {
  const [m, mine] = await Promise.all([api("GET", "/api/models"), api("GET", "/api/settings")]);
  S.models = m.models; S.defaultModel = m.default; S.samplingDefaults = m.sampling || {};
  S.defaults = mine.settings || {};
  if (!S.draft) S.draft = newDraft();
}

// ---------------------------------------------------------------- theme and phone
// Theme: system -> the other -> the system's own -> system.
function applyTheme() {
  const t = localStorage.getItem("homellm-theme");
  if (t === "light" || t === "dark") document.documentElement.dataset.theme = t;
  else delete document.documentElement.dataset.theme;
  const b = $("theme-toggle"), name = t === "light" || t === "dark" ? t : "system";
  b.setAttribute("aria-label", `Theme: ${name} (change)`); b.title = `Theme: ${name}`;
}

function toggleTheme() {
  const sys = matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  const other = sys === "dark" ? "light" : "dark";
  const now = localStorage.getItem("homellm-theme") || "system";
  const next = now === "system" ? other : now === other ? sys : "system";
  if (next === "system") localStorage.removeItem("homellm-theme"); else localStorage.setItem("homellm-theme", next);
  applyTheme();
}

// Phone: the list is an overlay (backdrop, Escape, ✕ close it; inert when closed).
const PHONE = matchMedia("(max-width: 700px)");

function openSidebar() {
  $("app").classList.add("side-open"); $("sidebar").inert = false; $("backdrop").hidden = false;
  $("side-close").focus();
}

function closeSidebar() {
  const was = $("app").classList.contains("side-open");
  $("app").classList.remove("side-open"); $("backdrop").hidden = true;
  $("sidebar").inert = PHONE.matches;
  if (was && PHONE.matches) { const m = document.querySelector(".view:not([hidden]) .menu"); if (m) m.focus(); }
}

function growComposer() {
  const t = $("prompt");
  t.style.height = "auto";
  t.style.height = Math.min(t.scrollHeight + 2, innerHeight * 0.4) + "px";
}

// ---------------------------------------------------------------- start
async function start() {
  S.me = await api("GET", "/api/me");
  S.csrf = S.me.csrf_token;
  if (S.me.key_required) { await later("showGate")("key"); return; }
  if (S.me.auth && !S.me.user) { await later("showGate")(S.me.needs_setup ? "setup" : "login", S.me.setup_token_required); return; }
  S.collect = { info: null, task: null, tree: null };   // another user may have logged in
  S.models = []; S.draft = null;
  await loadModels();                                    // the composer's settings need them
  $("gate").hidden = true; $("app").hidden = false;
  $("account").hidden = true;
  if (S.me.auth || S.me.key_cookie) later("showAccount")();
  api("GET", "/api/collect?brief=true").then((i) => { $("moderate-link").hidden = i.role === "volunteer"; })
    .catch(() => { $("moderate-link").hidden = true; });
  const list = loadList();
  await showView(viewOf(location.pathname));
  if (S.view === "chat") {
    const id = location.hash.slice(1);
    if (id && !(S.conv && S.conv.id === id)) await openConversation(id);
    else if (!id && !S.conv) newChat();
  }
  await list;
}

function wire() {
  applyTheme();
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (ev) => {   // a touch keyboard's Enter is a new line
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && !matchMedia("(pointer: coarse)").matches) send(ev);
  });
  $("prompt").addEventListener("input", growComposer);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("list-more").addEventListener("click", () => loadList(true));
  let timer = null;
  $("search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(loadList, 200); });
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
  $("settings").addEventListener("change", settingsChanged);
  $("settings").addEventListener("submit", saveDefaults);
  $("theme-toggle").addEventListener("click", toggleTheme);
  for (const b of document.querySelectorAll(".menu")) b.addEventListener("click", openSidebar);
  $("side-close").addEventListener("click", closeSidebar);
  $("backdrop").addEventListener("click", closeSidebar);
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && $("app").classList.contains("side-open")) closeSidebar(); });
  PHONE.addEventListener("change", closeSidebar);
  closeSidebar();
  $("messages").addEventListener("scroll", () => { S.stick = atBottom(); $("to-bottom").hidden = S.stick; }, { passive: true });
  $("to-bottom").addEventListener("click", () => { S.stick = true; follow_bottom(); $("prompt").focus(); });
  $("retry").addEventListener("click", checkHealth);
  for (const a of $("views").querySelectorAll("a")) {
    a.addEventListener("click", (ev) => { ev.preventDefault(); go(a.getAttribute("href")); });
  }
  window.addEventListener("popstate", () => {
    if (S.me && (!S.me.auth || S.me.user)) showView(viewOf(location.pathname)).catch(showError);
  });
  $("import-file").addEventListener("change", later("importFile"));
  $("gate-form").addEventListener("submit", (ev) => { ev.preventDefault(); later("gateSubmit")(ev); });
  window.addEventListener("hashchange", () => {   // a pasted link, the back button
    const id = location.hash.slice(1);
    if (S.me && (!S.me.auth || S.me.user) && S.view === "chat" && id && (!S.conv || S.conv.id !== id)) openConversation(id);
  });
  start().catch(showError);
}

document.addEventListener("DOMContentLoaded", wire);
