// The peg-rag page: search an index as you type, or chat with it. Plain JS, no build step.
// Everything from the server is inserted as text (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "peg-rag-api-key";
const DEBOUNCE_MS = 300;
let indexes = {};
let history = [];

// ---------------------------------------------------------------- API calls

async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new Error("API key needed (this server was started with --api-key)");
  }
  if (!response.ok) {
    const detail = await response.json().catch(() => ({}));
    throw new Error(detail.error ? detail.error.message : `HTTP ${response.status}`);
  }
  return response;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadIndexes() {
  const models = await (await api("/v1/models")).json();
  const select = $("index");
  select.replaceChildren();
  indexes = {};
  for (const model of models.data.filter((m) => m.type === "index")) {
    indexes[model.id] = model;
    select.append(new Option(`${model.id} (${model.chunks} chunks)`, model.id));
  }
  $("llm-note").textContent = models.llm
    ? `LLM: ${models.llm}`
    : "No LLM configured: answers are extractive (the top passages, cited). " +
      "未配置大模型：回答为检索到的原文摘录。";
  if (!select.options.length) status("This server serves no index (start it with --index NAME=DIR).");
  updateRerank();
}

function updateRerank() {
  const index = indexes[$("index").value];
  $("rerank").disabled = !index || !index.reranker;
  $("rerank").checked = Boolean(index && index.reranks_by_default);
}

// ---------------------------------------------------------------- search

// Stretches of the query found in a text: for Chinese, every run of 2+ characters of the
// query that the text contains; for other words, the whole word. Case-insensitive.
function highlighted(text, query) {
  const lower = text.toLowerCase();
  const marked = new Array(text.length).fill(false);
  const markAll = (term) => {
    for (let at = lower.indexOf(term); at >= 0; at = lower.indexOf(term, at + 1)) {
      marked.fill(true, at, at + term.length);
    }
  };
  for (const part of query.toLowerCase().split(/[\s\p{P}\p{S}]+/u)) {
    if (/\p{Script=Han}/u.test(part)) {
      for (let size = part.length; size >= 2; size--) {
        for (let start = 0; start + size <= part.length; start++) markAll(part.slice(start, start + size));
      }
    } else if (part.length >= 2) {
      markAll(part);
    }
  }
  const out = document.createDocumentFragment();
  let start = 0;
  for (let i = 1; i <= text.length; i++) {
    if (i === text.length || marked[i] !== marked[start]) {
      const piece = text.slice(start, i);
      if (marked[start]) {
        const mark = document.createElement("mark");
        mark.textContent = piece;
        out.append(mark);
      } else {
        out.append(piece);
      }
      start = i;
    }
  }
  return out;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function stageText(result) {
  return ["dense", "bm25", "rerank"]
    .filter((stage) => result.ranks[stage] !== null && result.ranks[stage] !== undefined)
    .map((stage) => `${stage} #${result.ranks[stage]} ${result.scores[stage].toFixed(4)}`);
}

function renderResults(results, query) {
  const list = $("results");
  list.replaceChildren();
  for (const r of results) {
    const item = element("li", "result");
    item.dataset.id = r.id;
    const head = element("div", "head");
    head.append(
      element("span", "score", r.score.toFixed(4)),
      element("span", "source", String(r.metadata.source ?? r.doc_id)),
    );
    if (r.metadata.title) head.append(element("span", "title", String(r.metadata.title)));
    head.append(element("span", "id", r.id));
    const meta = element("div", "meta");
    for (const [key, value] of Object.entries(r.metadata)) {
      // The title and source are in the head already.
      if (key !== "title" && key !== "source") meta.append(element("span", "", `${key}: ${value}`));
    }
    const stages = element("div", "stages");
    for (const text of stageText(r)) stages.append(element("span", "", text));
    const body = element("p");
    body.append(highlighted(r.text, query));
    item.append(head, meta, stages, body);
    list.append(item);
  }
}

let searchTimer;
let searchSeq = 0;
let composing = false;

async function search() {
  clearTimeout(searchTimer);
  const query = $("query").value.trim();
  if (!query || !$("index").value) {
    $("results").replaceChildren();
    return;
  }
  const seq = ++searchSeq;
  status("Searching 检索中…");
  try {
    const body = {
      index: $("index").value,
      query,
      k: Number($("k").value) || 5,
      method: $("method").value,
      rerank: $("rerank").disabled ? null : $("rerank").checked,
    };
    const found = await (await api("/v1/retrieve", body)).json();
    if (seq !== searchSeq) return; // a newer search was started meanwhile
    renderResults(found.results, query);
    status(`${found.results.length} results for “${query}”`);
  } catch (error) {
    if (seq === searchSeq) status(error.message, true);
  }
}

function searchSoon() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(search, DEBOUNCE_MS);
}

// While an input method composes (pinyin, wubi...), the field holds unfinished text:
// nothing is searched until the composition ends.
const query = $("query");
query.addEventListener("compositionstart", () => {
  composing = true;
  clearTimeout(searchTimer);
});
query.addEventListener("compositionend", () => {
  composing = false;
  searchSoon();
});
query.addEventListener("input", (event) => {
  if (!composing && !event.isComposing) searchSoon();
});
$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (!composing) search();
});
for (const id of ["k", "method", "rerank"]) $(id).addEventListener("change", () => search());

// ---------------------------------------------------------------- chat

// The answer with each [n] made a link to source n.
function citedAnswer(text, turnId) {
  const out = document.createDocumentFragment();
  let last = 0;
  for (const match of text.matchAll(/\[(\d+)\]/g)) {
    out.append(text.slice(last, match.index));
    const link = element("a", "cite", match[0]);
    link.href = `#${turnId}-source-${match[1]}`;
    out.append(link);
    last = match.index + match[0].length;
  }
  out.append(text.slice(last));
  return out;
}

function renderSources(list, sources, turnId) {
  list.replaceChildren();
  for (const s of sources) {
    const item = element("li", "", `${s.metadata.title ?? s.doc_id}: ${s.text}`);
    item.id = `${turnId}-source-${s.n}`;
    list.append(item);
  }
}

async function ask(question) {
  const turnId = `turn${history.length}`;
  const turn = element("div", "turn");
  const answer = element("div", "answer");
  const sources = element("ol", "sources");
  turn.append(element("div", "turn user", question), answer, sources);
  $("conversation").append(turn);
  history.push({ role: "user", content: question });
  let text = "";
  status("Answering 回答中…");
  try {
    const response = await api("/v1/chat/completions", {
      model: $("index").value,
      messages: history,
      stream: true,
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.peg_rag) renderSources(sources, chunk.peg_rag.sources, turnId);
          for (const choice of chunk.choices) text += choice.delta.content ?? "";
          answer.replaceChildren(citedAnswer(text, turnId));
        }
      }
    }
    history.push({ role: "assistant", content: text });
    status("");
  } catch (error) {
    history.pop();
    status(error.message, true);
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (event) => {
  // Enter asks, Shift+Enter is a new line; Enter that confirms an IME candidate does neither.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

// ---------------------------------------------------------------- tabs, key, start

function showTab(name) {
  for (const tab of ["search", "chat"]) {
    $(`${tab}-panel`).hidden = tab !== name;
    $(`tab-${tab}`).classList.toggle("active", tab === name);
  }
}
$("tab-search").addEventListener("click", () => showTab("search"));
$("tab-chat").addEventListener("click", () => showTab("chat"));
$("index").addEventListener("change", () => {
  updateRerank();
  history = [];
  $("conversation").replaceChildren();
  search();
});
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key-form").hidden = true;
  start();
});

async function start() {
  try {
    await loadIndexes();
    status("");
  } catch (error) {
    status(error.message, true);
  }
}
start();
