// homellm web app: math in messages. app.js loads this file the first time a text could hold
// math; its rules join markdown-it's, and KaTeX (vendored in katex/) loads only when a message
// really has math. KaTeX builds its formulas with DOM calls and the CSSOM (no inline style
// attributes, which the page's CSP would refuse); a TeX it refuses stays as text.
"use strict";

function mathRules(md) {
  if (md.hasMath) return;
  md.hasMath = true;
  md.inline.ruler.before("escape", "math_inline", mathInline);
  md.block.ruler.before("fence", "math_block", mathBlock, { alt: ["paragraph", "reference", "blockquote", "list"] });
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

// Math: KaTeX's files load the first time a message has math; until then (or when KaTeX
// refuses the TeX) the TeX shows as code. Drawn formulas are kept by their TeX.
const MATH_CACHE = new Map();

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
  load("/static/katex/katex.min.css");
  return load("/static/katex/katex.min.js").then(() => {
    for (const n of document.querySelectorAll(".math:not(.drawn):not(.tex-error)")) drawMath(n, n.classList.contains("display"));
  });
}

