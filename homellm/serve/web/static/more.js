// homellm web app: what the chat needs only once the user does it (app.js loads this file on
// first use): editing and writing messages, deleting, "which is better?", search hits,
// renaming and deleting conversations, import, and accounts (log in, users, passwords).
// The same rules as app.js: text only through textContent, never innerHTML.
"use strict";

// ---------------------------------------------------------------- code highlighting
// app.js shows a code block as plain text until this file is here; then it is coloured.
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

function highlightAll() {
  for (const c of document.querySelectorAll(".codeblock code:not(.hl)")) {
    c.replaceChildren(highlight(c.textContent, c.dataset.lang));
    c.classList.add("hl");
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


// "Which is better?" between this reply and the one before it: a preference pair.
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
    S.csrf = (await api("GET", "/api/me")).csrf_token;   // the logged-out token (a session may have ended)
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

// A cold model: "Loading model…" in the reply's place, with its progress when an earlier load
// gives an estimate (asked of /api/models until the reply's request is answered).
function watchLoading(s, model) {
  const tick = async () => {
    if (s.answered || S.streaming !== s || s.id) return;
    try {
      const m = (await api("GET", "/api/models")).models.find((x) => x.id === model);
      const slot = document.querySelector(".msg.pending .loading");
      if (!s.answered && slot && m && m.loading_s != null) {
        const bar = el("progress");
        bar.setAttribute("aria-label", "Loading the model");
        if (m.estimate_s) { bar.max = m.estimate_s; bar.value = Math.min(m.loading_s, m.estimate_s); }
        slot.replaceChildren(`Loading model ${m.id}… ${m.loading_s.toFixed(1)} s `, bar);
      }
    } catch (e) { /* the reply's own request says what went wrong */ }
    setTimeout(tick, 400);
  };
  setTimeout(tick, 250);
}

// ---------------------------------------------------------------- the list's tools
function renameConversation(li, c) {
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
}

async function deleteConversation(del, c) {
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
}

// the account panel's forms, wired once, when this file arrives
function wireMore() {
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
}
wireMore();
