"use strict";
// The review page. Keyboard first; the mouse works too. Decisions are sent in short bursts and a tile
// shows "saved" only once the server answered, which it does after the decision is on disk.

const FLUSH_MS = 250; // keys pressed within this become one request (one file in OUT/reviews/)
const POLL_MS = 2000; // how often decisions made elsewhere (other browsers, other servers) show up
const SPECIAL = { not_a_character: "not a character", unreadable: "unreadable" };

const state = {
  info: null,
  tab: null,
  page: 0,
  data: null, // the page as the server sent it
  cursor: 0,
  labels: new Map(), // row id -> label shown (null: undecided)
  states: new Map(), // row id -> open | pending | saved | failed
  by: new Map(), // row id -> reviewer of the standing decision
  errors: new Map(), // row id -> why it was not saved
  pending: new Map(), // row id -> label not sent yet
  inflight: false,
  timer: null,
  generation: 0, // bumped by every save, so a poll answered from before it is ignored
  undo: [], // {id, prev}: the label each decision replaced
};

const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const json = (response.headers.get("content-type") || "").startsWith("application/json");
  const body = json ? await response.json() : await response.text();
  if (!response.ok) throw new Error((json ? body.error : body) || response.statusText);
  return body;
}

function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function labelText(label) {
  return label == null ? "" : SPECIAL[label] || label;
}

// -- loading and drawing -------------------------------------------------------------------------------

async function start() {
  state.info = await api("/api/info");
  $("out").textContent = state.info.out;
  $("who").textContent = `reviewer ${state.info.reviewer} · model ${state.info.model_id}`;
  drawPalette();
  const wanted = new URLSearchParams(location.hash.slice(1));
  const tabs = state.info.tabs.map((t) => t.name);
  state.tab = tabs.includes(wanted.get("tab")) ? wanted.get("tab") : firstTabWithWork();
  await load(wanted.has("page") ? Number(wanted.get("page")) : null);
  setInterval(() => poll().catch(() => say("the review server does not answer", true)), POLL_MS);
}

function firstTabWithWork() {
  const tabs = state.info.tabs;
  return (tabs.find((t) => t.left > 0) || tabs.find((t) => t.total > 0) || tabs[0]).name;
}

async function load(page) {
  const at = page == null ? "" : `&page=${page}`;
  let data = await api(`/api/queue?tab=${encodeURIComponent(state.tab)}${at}`);
  if (page == null && data.first_open_page != null && data.first_open_page !== data.page) {
    data = await api(`/api/queue?tab=${encodeURIComponent(state.tab)}&page=${data.first_open_page}`);
  }
  show(data);
  const open = data.tiles.findIndex((t) => state.labels.get(t.id) == null);
  state.cursor = open >= 0 ? open : 0;
  drawCursor();
}

function take(data) {
  // The server's view of each tile, except tiles this page is still saving or failed to save.
  for (const t of data.tiles) {
    if (state.pending.has(t.id) || state.states.get(t.id) === "pending" || state.states.get(t.id) === "failed") continue;
    state.labels.set(t.id, t.decision ? t.decision.label : null);
    state.states.set(t.id, t.decision ? "saved" : "open");
    state.by.set(t.id, t.decision ? t.decision.reviewer : null);
  }
}

function show(data) {
  state.data = data;
  state.page = data.page;
  state.info.tabs = data.tabs;
  take(data);
  history.replaceState(null, "", `#tab=${state.tab}&page=${state.page}`);
  drawTabs();
  drawAudit();
  drawPager();
  drawGroups();
  const main = $("tiles");
  main.replaceChildren(...data.tiles.map(tileElement));
}

// A <button type="button"> with these properties (title, textContent, className, ...) and data-* values.
function button(properties, data = {}) {
  const b = Object.assign(document.createElement("button"), { type: "button" }, properties);
  Object.assign(b.dataset, data);
  return b;
}

function drawPalette() {
  const buttons = state.info.classes.map((c) => {
    const b = button({ title: c.codepoint, textContent: c.char }, { label: c.char });
    if (c.key) b.append(Object.assign(document.createElement("kbd"), { textContent: c.key }));
    return b;
  });
  const extra = [["accept top-1", "Enter", "top"], ["not a character", "x", "not_a_character"],
    ["unreadable", "?", "unreadable"], ["accept page", "a", "page"], ["undo", "u", "undo"]].map(([text, key, action]) =>
    button({ innerHTML: `${text}<kbd>${key}</kbd>` }, { action }));
  $("palette").replaceChildren(...buttons, ...extra);
  $("palette").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    if (b.dataset.label) labelCursor(b.dataset.label);
    else if (b.dataset.action === "top") acceptTop();
    else if (b.dataset.action === "page") acceptPage();
    else if (b.dataset.action === "undo") undo();
    else labelCursor(b.dataset.action);
  });
}

function drawTabs() {
  $("tabs").replaceChildren(...state.info.tabs.map((t) => {
    const b = button({ className: t.name === state.tab ? "current" : "", title: t.title,
      textContent: `${t.name.replace("_", " ")} · ${t.left} left of ${t.total}` }, { tab: t.name });
    b.addEventListener("click", () => switchTo(t.name));
    return b;
  }));
}

function drawAudit() {
  const box = $("audit");
  box.hidden = state.tab !== "audit";
  const a = state.info.audit;
  if (!a) {
    box.textContent = "Audit: a seeded sample of auto-accepted rows. Each decision here checks one of them; " +
      "the measured error rate appears once there is one.";
    return;
  }
  box.textContent = `Audit: ${a.text}`;
}

function drawPager() {
  const d = state.data;
  const tab = state.info.tabs.find((t) => t.name === state.tab);
  $("where").textContent = `page ${d.page + 1} of ${d.pages} · ${tab ? tab.left : d.left} of ${d.total} left in this tab`;
  $("prev").disabled = d.page === 0;
  $("next").disabled = d.page >= d.pages - 1;
}

function drawGroups() {
  $("groups").replaceChildren(...state.data.groups.map((g) => {
    const b = button({ className: g.left ? "" : "done", textContent: `${g.name} ${g.left}/${g.total}`,
      title: "go to this group" });
    b.addEventListener("click", () => go(g.first_page));
    return b;
  }));
}

function tileElement(t, i) {
  const el = document.createElement("div");
  el.className = "tile";
  el.dataset.id = t.id;
  el.dataset.index = i;
  el.innerHTML = `<div class="group"></div><img alt="crop" src="/api/crop/${t.id}.png">` +
    `<div class="top"></div><div class="label"></div><div class="state"></div>` +
    `<div class="path"></div>${t.on_page ? '<button type="button" class="onpage">on its page (v)</button>' : ""}`;
  const top = t.top.map(([c, p]) => button({ title: `label ${c}`, textContent: `${c} ${p.toFixed(2)}` }, { label: c }));
  el.querySelector(".top").replaceChildren(...(top.length ? top
    : [t.reason === "error" ? `error: ${t.error_kind || ""}` : "no character found"]));
  el.querySelector(".group").textContent = t.group;
  el.querySelector(".path").textContent = t.rel_path;
  el.querySelector(".path").title = t.path;
  el.addEventListener("click", (e) => {
    state.cursor = i;
    drawCursor();
    const b = e.target.closest("button");
    if (b && b.dataset.label) labelCursor(b.dataset.label);
    else if (b && b.classList.contains("onpage")) showPage();
  });
  drawTile(el);
  return el;
}

function tileNode(id) {
  return $("tiles").querySelector(`.tile[data-id="${id}"]`);
}

function drawTile(el) {
  if (!el) return;
  const id = el.dataset.id;
  const label = state.labels.get(id);
  const st = state.states.get(id) || "open";
  el.dataset.state = st;
  el.dataset.label = label == null ? "" : label;
  el.querySelector(".label").textContent = labelText(label);
  el.querySelector(".label").classList.toggle("special", label in SPECIAL);
  const by = state.by.get(id);
  el.querySelector(".state").textContent = {
    open: "", pending: "saving…", failed: `not saved: ${state.errors.get(id) || ""}`,
    saved: label == null ? "" : "saved" + (by && by !== state.info.reviewer ? ` · by ${by}` : ""),
  }[st];
}

function drawCursor() {
  for (const el of $("tiles").children) el.classList.toggle("cursor", Number(el.dataset.index) === state.cursor);
  const el = $("tiles").children[state.cursor];
  if (el) el.scrollIntoView({ block: "nearest" });
}

// -- deciding --------------------------------------------------------------------------------------------

function current() {
  return state.data && state.data.tiles[state.cursor];
}

function set(id, label) {
  state.labels.set(id, label);
  state.states.set(id, "pending");
  state.by.set(id, state.info.reviewer);
  state.pending.set(id, label);
  drawTile(tileNode(id));
  if (!state.timer) state.timer = setTimeout(flush, FLUSH_MS);
}

function decide(id, label) {
  const prev = state.labels.has(id) ? state.labels.get(id) : null;
  if (prev === label && state.states.get(id) === "saved") return false;
  state.undo.push({ id, prev });
  set(id, label);
  return true;
}

function labelCursor(label) {
  const t = current();
  if (!t) return;
  decide(t.id, label);
  move(1);
}

function acceptTop() {
  const t = current();
  if (!t) return;
  if (!t.pred_char) {
    say("this tile has no prediction to accept: press a class key, x or ?", true);
    return;
  }
  labelCursor(t.pred_char);
}

function acceptPage() {
  let accepted = 0, skipped = 0;
  for (const t of state.data.tiles) {
    if (state.labels.get(t.id) != null || state.states.get(t.id) === "pending") continue;
    if (!t.pred_char) { skipped++; continue; }
    decide(t.id, t.pred_char);
    accepted++;
  }
  say(`accepted the top-1 of ${accepted} tiles` + (skipped ? `; ${skipped} without a prediction left open` : ""));
}

function clearCursor() {
  const t = current();
  if (t && state.labels.get(t.id) != null) decide(t.id, null);
}

function undo() {
  const last = state.undo.pop();
  if (!last) {
    say("nothing to undo");
    return;
  }
  set(last.id, last.prev);
  const i = state.data.tiles.findIndex((t) => t.id === last.id);
  if (i >= 0) {
    state.cursor = i;
    drawCursor();
  }
  say(last.prev == null ? "undone: the tile is open again" : `undone: back to ${labelText(last.prev)}`);
}

async function flush() {
  state.timer = null;
  if (state.inflight || !state.pending.size) return;
  const batch = [...state.pending].map(([id, label]) => ({ id, label }));
  state.pending.clear();
  state.inflight = true;
  state.generation++;
  try {
    await api("/api/decisions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ decisions: batch }),
    });
    for (const d of batch) {
      if (state.pending.has(d.id)) continue; // changed again meanwhile: its state comes with the next save
      state.states.set(d.id, d.label == null ? "open" : "saved");
      drawTile(tileNode(d.id));
    }
    say(`saved ${batch.length} decision${batch.length > 1 ? "s" : ""}`);
  } catch (e) {
    for (const d of batch) {
      if (state.pending.has(d.id)) continue;
      state.states.set(d.id, "failed");
      state.errors.set(d.id, e.message);
      drawTile(tileNode(d.id));
    }
    say(`not saved: ${e.message}`, true);
  } finally {
    state.inflight = false;
  }
  if (state.pending.size) flush();
  else refreshCounts().catch(() => say("saved, but the counts could not be refreshed", true));
}

async function refreshCounts() {
  const info = await api("/api/info");
  state.info.tabs = info.tabs;
  state.info.audit = info.audit;
  drawTabs();
  drawAudit();
  drawPager();
}

async function poll() {
  if (document.hidden || state.inflight || state.pending.size) return;
  const generation = state.generation;
  const data = await api(`/api/queue?tab=${encodeURIComponent(state.tab)}&page=${state.page}`);
  if (generation !== state.generation || state.inflight || state.pending.size) return;
  const same = data.tiles.length === state.data.tiles.length && data.tiles.every((t, i) => t.id === state.data.tiles[i].id);
  if (!same) {
    show(data); // the queue changed under this page (a running predict committed more rows)
    state.cursor = Math.min(state.cursor, Math.max(0, data.tiles.length - 1));
    drawCursor();
    return;
  }
  state.data = data;
  state.info.tabs = data.tabs;
  take(data);
  for (const el of $("tiles").children) drawTile(el);
  drawTabs();
  drawPager();
  drawGroups();
}

// -- moving ----------------------------------------------------------------------------------------------

function columns() {
  const tiles = [...$("tiles").children];
  if (!tiles.length) return 1;
  const n = tiles.findIndex((el) => el.offsetTop !== tiles[0].offsetTop);
  return n < 0 ? tiles.length : n;
}

function move(delta) {
  const n = state.data ? state.data.tiles.length : 0;
  if (!n) return;
  state.cursor = Math.max(0, Math.min(n - 1, state.cursor + delta));
  drawCursor();
}

async function go(page) {
  if (!state.data || page < 0 || page >= state.data.pages) return;
  await load(page);
}

async function switchTo(tab) {
  state.tab = tab;
  await load(null);
}

async function switchTab(delta) {
  const names = state.info.tabs.map((t) => t.name);
  await switchTo(names[(names.indexOf(state.tab) + delta + names.length) % names.length]);
}

function showPage() {
  const t = current();
  if (!t || !t.on_page) {
    say("this crop is a file, not a box on a page");
    return;
  }
  const view = $("pageview");
  view.querySelector("img").src = `/api/page/${t.id}.png`;
  view.hidden = false;
}

function askOther() {
  $("other").hidden = false;
  $("other-char").value = "";
  $("other-char").focus();
}

function closeOther() {
  $("other").hidden = true;
  $("other-char").blur();
}

$("other").addEventListener("submit", (e) => {
  e.preventDefault();
  const char = $("other-char").value.trim();
  closeOther();
  if (state.info.classes.some((c) => c.char === char) || char in SPECIAL) labelCursor(char);
  else say(`${char || "nothing"} is not one of the model's characters`, true);
});
$("other-char").addEventListener("keydown", (e) => { if (e.key === "Escape") closeOther(); });
$("pageview").addEventListener("click", () => { $("pageview").hidden = true; });
$("prev").addEventListener("click", () => go(state.page - 1));
$("next").addEventListener("click", () => go(state.page + 1));
$("first-open").addEventListener("click", () => goFirstOpen());

function goFirstOpen() {
  if (state.data && state.data.first_open_page != null) go(state.data.first_open_page);
  else say("every tile of this tab has a decision");
}

const KEYS = {
  ArrowLeft: () => move(-1), h: () => move(-1), ArrowRight: () => move(1), l: () => move(1),
  ArrowUp: () => move(-columns()), k: () => move(-columns()), ArrowDown: () => move(columns()), j: () => move(columns()),
  Enter: acceptTop, x: () => labelCursor("not_a_character"), "?": () => labelCursor("unreadable"),
  a: acceptPage, u: undo, Backspace: clearCursor, Delete: clearCursor, c: askOther, v: showPage,
  n: () => go(state.page + 1), PageDown: () => go(state.page + 1), p: () => go(state.page - 1),
  PageUp: () => go(state.page - 1), g: goFirstOpen, "[": () => switchTab(-1), "]": () => switchTab(1),
};

document.addEventListener("keydown", (e) => {
  if (e.target.closest("input") || e.ctrlKey || e.metaKey || e.altKey || !state.data) return;
  if (!$("pageview").hidden) {
    if (e.key === "Escape") $("pageview").hidden = true;
    e.preventDefault();
    return;
  }
  const cls = state.info.classes.find((c) => c.key === e.key);
  const action = cls ? () => labelCursor(cls.char) : KEYS[e.key];
  if (!action) return;
  e.preventDefault();
  action();
});

window.addEventListener("beforeunload", (e) => {
  if (state.pending.size || state.inflight) e.preventDefault(); // decisions not on disk yet
});

start().catch((e) => say(`cannot load the queue: ${e.message}`, true));
