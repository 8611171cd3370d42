// homellm web app: the views besides the chat (arena, leaderboard, evals, contribute,
// contributors, moderate), loaded by app.js the first time one of them is opened. Plain JS,
// no build step; the same rules as app.js: text only through textContent, never innerHTML.
"use strict";

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


// The views' controls (their markup is in index.html); app.js calls this once, on load.
function wireViews() {
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
}
wireViews();
