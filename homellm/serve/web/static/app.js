// homellm web app: plain JS, no build step. The chat lives here; the other views are in
// views.js (loaded when one is opened); markdown is parsed by the vendored markdown-it and
// math drawn by the vendored KaTeX (loaded only when a message has math).
// Safety: every piece of user or model text reaches the page through textContent or
// createTextNode (never innerHTML): markdown-it's tokens are turned into DOM nodes here, raw
// HTML stays text, and links keep only http(s) and mailto addresses. The server's
// Content-Security-Policy forbids inline script as a second wall.
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
// A server that does not answer is "lost connection" (never "Failed to fetch"); a session that
// ended shows the login form again.
async function api(method, path, body, extraHeaders) {
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
      if (code === "not_logged_in") { showGate("login", false, "Your session has ended: log in again."); }
    }
    const err = new Error(msg); err.status = r.status; err.code = code; throw err;
  }
  return data;
}

function showError(e) {
  if (e && e.lost) return;    // the banner says it
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

// ---------------------------------------------------------------- lost connection
// The banner says so and offers Retry; /health is asked every 2 s, and when it answers the
// conversation is read back from the server (whatever the reply got to is stored there).
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
    if (S.conv) await openConversation(S.conv.id, { keepView: true });
    loadList();
  } catch (e) { showError(e); }
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
  c.appendChild(highlight(code, lang));
  pre.appendChild(c);
  const copy = button("copy", "Copy", () => copyText(code, copy), lang ? `Copy the ${lang} code` : "Copy the code");
  wrap.appendChild(pre);
  if (lang) wrap.appendChild(el("span", "lang", lang));
  wrap.appendChild(copy);
  return wrap;
}

// ---------------------------------------------------------------- markdown
// markdown-it (CommonMark + GFM tables, strikethrough, autolinks; raw HTML off) gives tokens;
// this turns them into DOM nodes. Added here: task list boxes, math ($…$, \(…\), $$…$$,
// \[…\]) and a code block's highlighter and Copy button. Headings are renumbered from h2 so
// the page's own h1 stays the only one and levels never skip.
let MD = null;

function parser() {
  if (MD) return MD;
  MD = window.markdownit({ html: false, linkify: true, breaks: true, typographer: false,
                           maxNesting: 40 });
  MD.inline.ruler.before("escape", "math_inline", mathInline);
  MD.block.ruler.before("fence", "math_block", mathBlock, { alt: ["paragraph", "reference", "blockquote", "list"] });
  return MD;
}

// Inline math: $x$ (no space inside either end, no digit after: "$5 and $10" stays text),
// $$x$$, \(x\) and \[x\]. The closer is looked up once per kind and reused while it lies
// ahead, so a text of openers without closers is still one pass.
const MATH_OPEN = [["$$", "$$", true], ["\\[", "\\]", true], ["\\(", "\\)", false], ["$", "$", false]];

function mathInline(state, silent) {
  const src = state.src, pos = state.pos;
  const c = src.charCodeAt(pos);
  if (c !== 0x24 && c !== 0x5c) return false;
  const seen = state.env.mathClose || (state.env.mathClose = {});
  for (const [open, close, display] of MATH_OPEN) {
    if (!src.startsWith(open, pos)) continue;
    const from = pos + open.length;
    const key = close + "|" + src.length;
    let at = seen[key];
    if (at === undefined || (at !== -1 && at < from)) seen[key] = at = src.indexOf(close, from);
    if (at < 0) return false;
    const tex = src.slice(from, at);
    if (!tex.trim() || tex.length > 10000) return false;
    if (open === "$" && (/^\s|\s$/.test(tex) || /\d/.test(src[at + 1] || ""))) return false;
    if (!silent) {
      const t = state.push("math_inline", "span", 0);
      t.content = tex; t.markup = display ? "display" : "";
    }
    state.pos = at + close.length;
    return true;
  }
  return false;
}

// Block math: a line that starts with $$ or \[ up to the line that ends with $$ or \].
function mathBlock(state, startLine, endLine, silent) {
  const start = state.bMarks[startLine] + state.tShift[startLine];
  const first = state.src.slice(start, state.eMarks[startLine]);
  const open = first.startsWith("$$") ? "$$" : first.startsWith("\\[") ? "\\[" : null;
  if (!open || state.sCount[startLine] - state.blkIndent >= 4) return false;
  const close = open === "$$" ? "$$" : "\\]";
  let line = startLine, body = first.slice(2);
  let end = body.trimEnd().endsWith(close) && body.trim().length > close.length ? body.trimEnd().length - close.length : -1;
  const parts = [];
  if (end >= 0) parts.push(body.slice(0, end));
  else {
    parts.push(body);
    for (line = startLine + 1; line < endLine; line++) {
      const text = state.src.slice(state.bMarks[line] + state.tShift[line], state.eMarks[line]);
      if (text.trimEnd().endsWith(close)) { parts.push(text.trimEnd().slice(0, -close.length)); end = 0; break; }
      parts.push(text);
    }
    if (end < 0) return false;   // not closed (yet: a reply still streaming)
  }
  if (silent) return true;
  const t = state.push("math_block", "div", 0);
  t.content = parts.join("\n").trim(); t.map = [startLine, line + 1];
  state.line = line + 1;
  return true;
}

function markdown(src) {
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
    } else if (t.type === "math_block") n = math(t.content, true);
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
      case "math_inline": n = math(t.content, t.markup === "display"); break;
      case "image": n = image(t); break;
      case "link_open": {
        const href = t.attrGet("href") || "";
        const next = children[i + 1];
        const plain = t.markup === "linkify" && !/^(https?:\/\/|www\.|mailto:)/i.test(next ? next.content : "");
        if (LINKABLE.test(href) && !plain) {
          n = el("a"); n.href = href; n.target = "_blank"; n.rel = "noopener noreferrer nofollow";
          if (t.attrGet("title")) n.title = t.attrGet("title");
        } else n = el("span");
        break;
      }
      default: n = t.tag ? el(t.tag) : null;   // strong, em, s
    }
    if (!n) return;
    top().appendChild(n);
    if (t.nesting === 1) stack.push(n);
  });
}

// An image from this server or a data: URL shows at once; one from elsewhere only when asked
// (a reply could otherwise tell another site that, and when, it was read).
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

// Math: KaTeX's files load the first time a message has math; until then (or when KaTeX
// refuses the TeX) the TeX shows as code. Drawn formulas are kept by their TeX.
const MATH_CACHE = new Map();
let katexLoading = null;

function math(tex, display) {
  const key = (display ? "D" : "I") + tex;
  if (MATH_CACHE.has(key)) return MATH_CACHE.get(key).cloneNode(true);
  const n = el(display ? "div" : "span", "math" + (display ? " display" : ""), tex);
  n.dataset.tex = tex;
  if (window.katex) drawMath(n, display);
  else loadKatex();
  return n;
}

function drawMath(n, display) {
  try {
    window.katex.render(n.dataset.tex, n, { displayMode: display, throwOnError: true, output: "htmlAndMathml" });
    n.classList.add("drawn");
    MATH_CACHE.set((display ? "D" : "I") + n.dataset.tex, n.cloneNode(true));
  } catch (e) { n.textContent = n.dataset.tex; n.classList.add("tex-error"); n.title = e.message; }
}

function loadKatex() {
  if (katexLoading) return katexLoading;
  const css = el("link"); css.rel = "stylesheet"; css.href = "/static/katex/katex.min.css";
  document.head.appendChild(css);
  katexLoading = new Promise((resolve) => {
    const s = el("script"); s.src = "/static/katex/katex.min.js";
    s.addEventListener("load", () => {
      for (const n of document.querySelectorAll(".math:not(.drawn):not(.tex-error)")) drawMath(n, n.classList.contains("display"));
      resolve();
    });
    document.head.appendChild(s);
  });
  return katexLoading;
}

// ---------------------------------------------------------------- messages
// The whole branch is drawn again after each change; the focused control is found again by
// its message and name (so a keyboard user stays where they were), and the view follows a
// growing reply only while the reader is at the bottom.
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
           `Previous ${who} (${turn.index} of ${n})`, turn.index === 0 || busy),
      el("span", "pos", `${turn.index + 1}/${n}`),
      tool("next", "›", "next", () => selectMessage(turn.sibling_ids[turn.index + 1]),
           `Next ${who} (${turn.index + 2} of ${n})`, turn.index === n - 1 || busy));
  }
  const copy = tool("copy-message", "Copy", "copy", () => copyText(m.content, copy), `Copy this ${who}`);
  const more = el("span", "more");
  more.hidden = true;
  const moreButton = tool("more-toggle", "⋯", "more", () => {
    more.hidden = !more.hidden; moreButton.setAttribute("aria-expanded", String(!more.hidden));
  }, `More actions for this ${who}`);
  moreButton.setAttribute("aria-expanded", "false");
  const del = tool("delete-branch", "Delete", "delete", () => deleteBranch(m, del), `Delete this ${who} and what follows it`, busy);
  if (m.role === "user") {
    meta.append(tool("edit", "Edit", "edit", () => startEdit(turn), "Edit this message (a new branch)", busy), copy);
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
    more.append(tool("edit-reply", "Edit", "edit-reply", () => startEdit(turn), "Write your own version of this reply (a new branch)", busy),
                tool("write-reply", "Write a reply", "write", () => startEdit(turn, true), "Write a reply yourself (a new branch)", busy), del);
    meta.append(moreButton, more);
    const info = [];
    if (m.model) info.push(m.model);
    else if ((m.meta || {}).synthetic === false) info.push("written by you");
    if (m.timings && m.timings.predicted_per_second) info.push(`${m.timings.predicted_per_second} tok/s`);
    if (info.length) meta.appendChild(el("span", "info", info.join(" · ")));
    div.appendChild(meta);
    if (n > 1) div.appendChild(compareRow(turn));
    if (commentOpen) div.appendChild(commentBox(turn, rating));
    return div;
  }
  div.appendChild(meta);
  return div;
}

// "Which is better?" between this reply and the one before it (after a regenerate): a
// preference pair for training, stored once per pair.
function compareRow(turn) {
  const m = turn.message, other = turn.sibling_ids[turn.index === 0 ? 1 : turn.index - 1];
  const o = turn.sibling_ids.indexOf(other) + 1, me = turn.index + 1;
  const row = el("div", "compare");
  const made = S.prefs.find((p) => (p[0] === m.id && p[1] === other) || (p[0] === other && p[1] === m.id));
  if (made) {
    row.append(el("span", "hint", made[0] === m.id ? `You prefer this reply (${me}) to ${o}.` : `You prefer reply ${o} to this one (${me}).`),
               tool("prefer-change", "Change", "prefer-change", () => prefer(made[1], made[0])));
  } else {
    row.append(el("span", null, `Which is better: this reply (${me}) or ${o}?`),
               tool("prefer-this", `This one (${me})`, "prefer-this", () => prefer(m.id, other)),
               tool("prefer-other", `Reply ${o}`, "prefer-other", () => prefer(other, m.id)));
  }
  return row;
}

function commentBox(turn, rating) {
  const box = el("div", "comment-box");
  const input = el("input", "comment");
  input.placeholder = "Optional comment (Enter saves)";
  input.setAttribute("aria-label", "Comment on this reply");
  input.value = (turn.rating && turn.rating.comment) || "";
  input.dataset.key = "comment-input";
  const status = el("span", "saved hint"); status.setAttribute("role", "status");
  const save = async () => {
    await rate(turn, rating, input.value, true);
    const s = document.querySelector(`.msg[data-id="${turn.message.id}"] .saved`);
    if (s) s.textContent = "Saved";
  };
  input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); save(); } });
  box.append(input, tool("save-comment", "Save comment", "save-comment", save), status);
  return box;
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

// Editing: a user message (a new branch), or a reply as the user would have it written (a
// new sibling; `blank`: write one from nothing). Ctrl+Enter saves, Escape cancels. The
// editor is part of the state (S.editing), so a re-render keeps it and what was typed.
function startEdit(turn, blank) {
  S.editing = { id: turn.message.id, text: blank ? "" : turn.message.content };
  renderMessages();
  const ta = document.querySelector(".edit-text");
  if (ta) ta.focus();
}

function editBox(turn) {
  const user = turn.message.role === "user";
  const box = el("div", "edit-box");
  const ta = el("textarea", "edit-text"); ta.value = S.editing.text; ta.rows = 4;
  ta.dataset.key = "edit-text";
  ta.setAttribute("aria-label", user ? "Edit the message" : "Your reply");
  ta.addEventListener("input", () => { S.editing.text = ta.value; });
  const row = el("div", "row");
  const done = () => { S.editing = null; renderMessages(); };
  const save = button("primary save-edit", user ? "Save & submit" : "Save reply", async () => {
    const text = ta.value.trim();
    if (!text) return;
    try {
      const r = await api("POST", `/api/messages/${turn.message.id}/edit`, { content: text });
      S.editing = null;
      applyDetail(r);
      if (user) await generate(r.message.id);
    } catch (e) { showError(e); }
  });
  save.dataset.key = "save-edit";
  const cancel = button("cancel-edit", "Cancel", done);
  ta.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") { ev.preventDefault(); done(); }
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); save.click(); }
  });
  row.append(save, cancel, el("span", "hint", "Ctrl+Enter saves, Escape cancels"));
  box.append(ta, row);
  return box;
}

async function selectMessage(id) {
  try { applyDetail(await api("POST", `/api/messages/${id}/select`)); } catch (e) { showError(e); }
}

async function rate(turn, value, comment, quiet) {
  try {
    const keep = comment !== undefined ? comment : (turn.rating && turn.rating.comment) || null;
    const r = await api("PUT", `/api/messages/${turn.message.id}/rating`, { value, comment: keep || null });
    turn.rating = r.rating;
    if (!quiet || !document.querySelector(`.msg[data-id="${turn.message.id}"] .comment-box`)) renderMessages();
  } catch (e) { showError(e); }
}

async function prefer(chosen, rejected) {
  try {
    const d = await api("POST", `/api/messages/${chosen}/prefer`, { over: rejected });
    applyDetail(d);
    announce("Preference saved.");
  } catch (e) { showError(e); }
}

async function deleteBranch(m, btn) {
  if (btn.dataset.armed !== "1") {   // two clicks: no modal dialog
    try {
      const r = await api("GET", `/api/messages/${m.id}`);
      btn.dataset.armed = "1";
      btn.textContent = `Delete ${r.branch_size} message${r.branch_size === 1 ? "" : "s"}?`;
      btn.classList.add("armed");
      setTimeout(() => { if (btn.isConnected) { btn.dataset.armed = ""; btn.textContent = "Delete"; btn.classList.remove("armed"); } }, 4000);
    } catch (e) { showError(e); }
    return;
  }
  try {
    const r = await api("DELETE", `/api/messages/${m.id}`);
    applyDetail(r);
    announce(`Deleted ${r.deleted} message${r.deleted === 1 ? "" : "s"}.`);
    loadList();
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
  ren.addEventListener("click", () => {
    const input = el("input", "rename-input"); input.value = c.title || "";
    input.setAttribute("aria-label", "New title");
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
      setTimeout(() => { del.dataset.armed = ""; del.textContent = "✕"; del.classList.remove("armed"); }, 3000);
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
  for (const li of $("conversations").children) {
    const on = !!S.conv && li.dataset.id === S.conv.id;
    li.classList.toggle("active", on);
    const b = li.querySelector(".open");
    if (b) { if (on) b.setAttribute("aria-current", "true"); else b.removeAttribute("aria-current"); }
  }
}

// Leaving a chat while its reply grows is fine: the reply goes on on the server, and this
// page watches it again when the chat is opened (or the page reloaded).
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
    if (hit) showHit(hit);
  } catch (e) { showError(e); }
}

// A search hit: its message in view, marked, and the words highlighted (CSS Custom Highlight
// API, where the browser has it: the text nodes stay as they are).
function showHit(hit) {
  const n = hit.message_id && document.querySelector(`.msg[data-id="${hit.message_id}"]`);
  if (!n) return;
  S.stick = false;
  n.classList.add("hit");
  n.scrollIntoView({ block: "center" });
  if (!window.CSS || !CSS.highlights || !window.Highlight) return;
  const words = $("search").value.toLowerCase().split(/\W+/).filter(Boolean);
  const ranges = [];
  const walk = document.createTreeWalker(n.querySelector(".body"), NodeFilter.SHOW_TEXT);
  for (let t = walk.nextNode(); t; t = walk.nextNode()) {
    const low = t.data.toLowerCase();
    for (const w of words) {
      for (let i = low.indexOf(w); i >= 0; i = low.indexOf(w, i + w.length)) {
        const r = new Range(); r.setStart(t, i); r.setEnd(t, i + w.length); ranges.push(r);
      }
    }
  }
  CSS.highlights.set("search-hit", new Highlight(...ranges));
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
// A chat's settings apply as they change (saved at once, "Saved" shown); a new chat's are
// its draft until the first message. "Use for new chats" keeps them as this user's defaults
// (on the server: every browser, every reload).
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
      S.draft = newDraft();
    }
    const last = S.turns.length ? S.turns[S.turns.length - 1].message : null;
    // a message whose reply failed never blocks the next: the new text joins it as a new
    // version of it (the first stays, as 1/2), and that gets the reply
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
  const unwatch = watchLoading(s, S.conv.model || S.defaultModel);
  try {
    const r = await fetch(`/api/conversations/${s.conv}/generate`, {
      method: "POST", credentials: "same-origin", signal: s.controller.signal,
      headers: { "Content-Type": "application/json", "X-CSRF-Token": S.csrf },
      body: JSON.stringify(continueId ? { continue_id: continueId } : { parent_id: parentId }),
    });
    unwatch();
    await follow(r, s);
  } catch (e) {
    unwatch();
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
    if (r.status === 401 && code === "not_logged_in") showGate("login", false, "Your session has ended: log in again.");
    const err = new Error(msg); err.status = r.status; err.code = code; throw err;
  }
  let turn = null, body = null, failed = null;
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
      if (body && body.isConnected) fillBody(body, turn.message);
      follow_bottom();
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

// A cold model: "Loading model…" in the reply's place, with its progress when an earlier load
// gives an estimate (asked of /api/models while the reply has not started).
function watchLoading(s, model) {
  let timer = null, done = false;
  const tick = async () => {
    if (done || S.streaming !== s || s.id) return;
    try {
      const m = (await api("GET", "/api/models")).models.find((x) => x.id === model);
      const slot = document.querySelector(".msg.pending .loading");
      if (!done && slot && m && m.loading_s != null) {
        const bar = el("progress");
        bar.setAttribute("aria-label", "Loading the model");
        if (m.estimate_s) { bar.max = m.estimate_s; bar.value = Math.min(m.loading_s, m.estimate_s); }
        slot.replaceChildren(`Loading model ${m.id}… ${m.loading_s.toFixed(1)} s `, bar);
      }
    } catch (e) { /* the reply's own request says what went wrong */ }
    if (!done) timer = setTimeout(tick, 400);
  };
  timer = setTimeout(tick, 250);
  return () => { done = true; clearTimeout(timer); };
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
// asks for it), a login (--auth; also when a session ends), or the server's API key.
function showGate(mode, tokenRequired, note) {
  $("app").hidden = true; $("gate").hidden = false;
  const key = mode === "key", min = (S.me && S.me.password_min) || 8;
  $("gate-title").textContent = mode === "setup" ? "Set up homellm" : key ? "API key" : "Log in";
  $("gate-hint").textContent = note || (mode === "setup"
    ? "No account yet: this one becomes the admin." + (tokenRequired ? " The setup token is on the server's console." : "")
    : key ? "This server needs its API key (homellm serve --api-key)." : "");
  $("gate-rule").textContent = mode === "setup" ? `The password needs at least ${min} characters.` : "";
  $("gate-submit").textContent = mode === "setup" ? "Create admin account" : key ? "Continue" : "Log in";
  $("gate-form").dataset.mode = mode;
  $("gate-user-row").hidden = key; $("gate-user").required = !key;
  $("gate-pass-label").textContent = key ? "Key" : "Password";
  $("gate-pass").autocomplete = key ? "off" : mode === "setup" ? "new-password" : "current-password";
  $("gate-pass").minLength = mode === "setup" ? min : 0;
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
    for (const id of ["share-feedback-row", "export-shared", "users-box", "password-box"]) $(id).hidden = true;
    return;
  }
  $("whoami").textContent = `Signed in as ${me.user.username}${me.user.is_admin ? " (admin)" : ""}`;
  $("share-feedback").checked = me.user.share_feedback;
  $("share-feedback-row").hidden = false; $("password-box").hidden = false;
  $("export-shared").hidden = !me.user.is_admin;
  $("users-box").hidden = !me.user.is_admin;
  for (const id of ["new-password", "my-new-password"]) {
    $(id).minLength = me.password_min || 8;
    $(id).placeholder = `at least ${me.password_min || 8} characters`;
  }
  if (me.user.is_admin) loadUsers();
}

// The admin's list of accounts: remove one (two clicks), set a new password, and lift the
// login limits of one that typed too many wrong passwords somewhere.
async function loadUsers() {
  try {
    const r = await api("GET", "/api/users");
    $("users").replaceChildren(...r.users.map((u) => {
      const li = el("li"); li.dataset.username = u.username;
      const name = el("span", "name", u.username + (u.is_admin ? " (admin)" : ""));
      const act = (path, method, body) => async () => {
        try { await api(method, `/api/users/${encodeURIComponent(u.username)}${path}`, body && body()); loadUsers(); }
        catch (e) { $("users-status").textContent = e.message; }
      };
      li.appendChild(name);
      if (u.locked_s > 0) {
        li.appendChild(el("span", "locked", `locked ${u.locked_s} s`));
        li.appendChild(button("unlock", "Unlock", act("/unlock", "POST"), `Unlock ${u.username}`));
      }
      const reset = button("reset", "New password", () => {
        const f = el("form", "reset-form"), input = el("input");
        input.type = "password"; input.autocomplete = "new-password"; input.required = true;
        input.minLength = S.me.password_min || 8; input.placeholder = `at least ${input.minLength} characters`;
        input.setAttribute("aria-label", `New password for ${u.username}`);
        f.append(input, el("button", null, "Set"));
        f.addEventListener("submit", async (ev) => {
          ev.preventDefault();
          try {
            await api("POST", `/api/users/${encodeURIComponent(u.username)}/password`, { password: input.value });
            $("users-status").textContent = `New password set for ${u.username}`;
            loadUsers();
          } catch (e) { $("users-status").textContent = e.message; }
        });
        reset.replaceWith(f); input.focus();
      }, `Set a new password for ${u.username}`);
      li.appendChild(reset);
      if (u.id !== S.me.user.id) {
        const rm = button("remove", "Remove", null, `Remove ${u.username} and their conversations`);
        rm.addEventListener("click", () => {
          if (rm.dataset.armed !== "1") { rm.dataset.armed = "1"; rm.textContent = "Remove? (their chats too)"; rm.classList.add("armed"); return; }
          act("", "DELETE")();
        });
        li.appendChild(rm);
      }
      return li;
    }));
  } catch (e) { $("users-status").textContent = e.message; }
}

// ---------------------------------------------------------------- views
// One page, several views, each at its own address (the server serves the page at each):
// / chat, /arena, /leaderboard, /evals, /contribute, /contributors, /moderate. Switching views
// keeps the chat's state in memory but takes its model names out of the page (the arena's
// blindness: while a battle is unvoted, no model name is anywhere in the document).
const VIEWS = { "/": "chat", "/arena": "arena", "/leaderboard": "leaderboard", "/evals": "evals",
                "/contribute": "contribute", "/contributors": "contributors", "/moderate": "moderate" };
const viewOf = (path) => VIEWS[path] || "chat";
let viewsLoading = null;

function loadViews() {   // views.js: the other views' code, the first time one opens
  if (!viewsLoading) {
    viewsLoading = new Promise((resolve, reject) => {
      const s = el("script"); s.src = "/static/views.js";
      s.addEventListener("load", resolve);
      s.addEventListener("error", () => { viewsLoading = null; reject(connectionLost()); });
      document.head.appendChild(s);
    });
  }
  return viewsLoading;
}

function go(path) {
  if (S.arena.streaming) return;
  if (location.pathname !== path) history.pushState(null, "", path);
  closeSidebar();
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
    if (!S.models.length) await loadModels();
    fillSettings(); renderMessages();
    document.title = S.conv && S.conv.title ? `${S.conv.title} · homellm` : "homellm";
    return;
  }
  detach();
  $("set-model").replaceChildren(); $("messages").replaceChildren(); $("context-use").textContent = "";
  document.title = `homellm · ${view[0].toUpperCase()}${view.slice(1)}`;
  await loadViews();
  if (S.view !== view) return;
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
// The theme follows the system until chosen; the button goes system -> the other one -> the
// system's own -> system again.
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

// At phone width the list is an overlay: ☰ opens it; the backdrop, Escape and its ✕ close it,
// and closed it is out of the tab order (inert).
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
  if (S.me.key_required) { showGate("key"); return; }
  if (S.me.auth && !S.me.user) { showGate(S.me.needs_setup ? "setup" : "login", S.me.setup_token_required); return; }
  $("gate").hidden = true; $("app").hidden = false;
  showAccount();
  S.collect = { info: null, task: null, tree: null };   // another user may have logged in
  S.models = []; S.draft = null;
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
  $("password-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const status = $("password-status");
    if ($("my-new-password").value !== $("my-new-password2").value) { status.textContent = "The new passwords differ"; return; }
    try {
      await api("POST", "/api/me/password", { current: $("my-password").value, password: $("my-new-password").value });
      status.textContent = "Password changed (other sessions logged out)";
      for (const id of ["my-password", "my-new-password", "my-new-password2"]) $(id).value = "";
    } catch (e) { status.textContent = e.message; }
  });
  $("logout").addEventListener("click", async () => {
    try { await api("POST", "/api/logout"); } catch (e) { /* already out */ }
    detach();
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
