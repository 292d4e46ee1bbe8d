// The page's chat and compare views, on /v1/chat/completions (so the model's own chat template applies).
// Conversations live in this browser's localStorage; nothing is sent anywhere but to this server.
//
// chatStream(body, config): the streamed chunks' deltas of one chat completion, as an async generator.
// Chat view: send, stop, regenerate the last reply, edit a user turn (the turns after it are dropped and the
// reply generated again), conversations kept and listed. Compare view: the same user turns answered at once
// under two adapter settings, each reply streaming in its own column.

import { sseEvents } from "./completion.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const STORE = "llamalora.conversations";
const CURRENT = "llamalora.current";
const COMPARE = "llamalora.compare";
const SETTINGS = "llamalora.settings";
const SETTING_IDS = ["s-system", "s-temperature", "s-top_k", "s-top_p", "s-min_p", "s-max_tokens", "s-seed"];

export async function* chatStream(body, config = {}) {
  const headers = { "Content-Type": "application/json", "Accept": "text/event-stream" };
  if (config.apiKey) headers["Authorization"] = `Bearer ${config.apiKey}`;
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers, signal: config.signal, body: JSON.stringify({ ...body, stream: true }),
  });
  for await (const data of sseEvents(response)) {
    if (data.choices && data.choices.length) yield data.choices[0];
  }
}

// settings shared by the chat and compare views

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch (e) { return fallback; }
}

function save(key, value) {
  localStorage.setItem(key, JSON.stringify(value));
}

function sampling() {
  const number = (id) => Number($(id).value);
  const body = {
    temperature: number("s-temperature"), top_k: number("s-top_k"), top_p: number("s-top_p"),
    min_p: number("s-min_p"), max_tokens: number("s-max_tokens"), cache_prompt: true,
  };
  if (number("s-seed") >= 0) body.seed = number("s-seed");
  return body;
}

function withSystem(messages) {
  const system = $("s-system").value.trim();
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

// An adapter setting: "" (the server's own scales), "base" (none) or "<id>" at a scale.
export function adapterFields(select, scale) {
  if (select.value === "") return {};
  if (select.value === "base") return { lora: [] };
  return { lora: [{ id: Number(select.value), scale: Number(scale.value) }] };
}

export function adapterLabel(select, scale) {
  if (select.value === "") return "server default";
  if (select.value === "base") return "base model";
  return `${select.selectedOptions[0].textContent} × ${scale.value}`;
}

export function fillAdapterSelect(select, adapters, fallback) {
  const previous = select.value;
  select.innerHTML = "";
  const options = [["", "server default"], ["base", "base model (no adapter)"],
    ...adapters.map((a) => [String(a.id), a.name || a.path.split("/").filter(Boolean).pop()])];
  for (const [value, text] of options) select.add(new Option(text, value));
  const values = options.map((o) => o[0]);
  select.value = values.includes(previous) && previous !== "" ? previous : (values.includes(fallback) ? fallback : "");
}

// a message on screen

function messageElement(message, actions = {}) {
  const element = document.createElement("div");
  element.className = `message ${message.role}`;
  const body = document.createElement("div");
  body.className = "body";
  element.append(body);
  setContent(element, message.content || "");
  if (message.stopped) element.classList.add("stopped");
  const bar = document.createElement("div");
  bar.className = "actions";
  for (const [name, handler] of Object.entries(actions)) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = name;
    button.textContent = name;
    button.addEventListener("click", handler);
    bar.append(button);
  }
  element.append(bar);
  return element;
}

function setContent(element, text) {
  element.dataset.raw = text;
  const body = element.querySelector(".body");
  if (element.classList.contains("user")) body.textContent = text;
  else body.innerHTML = renderMarkdown(text);
}

// One streamed reply into `element`; returns { content, stopped }.
async function streamReply(body, element, signal, apiKey, onStats) {
  let content = "";
  const started = performance.now();
  let n = 0;
  element.classList.add("streaming");
  try {
    for await (const choice of chatStream(body, { signal, apiKey })) {
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        content += piece;
        n += 1;
        // Only the conversation's own box follows the reply: scrolling the page would move the Stop button
        // away from under the pointer at every token. A user who scrolled up to read stays where they are.
        const box = element.closest(".messages");
        const following = box && box.scrollHeight - box.scrollTop - box.clientHeight < 40;
        setContent(element, content);
        if (following) box.scrollTop = box.scrollHeight;
      }
      if (choice.finish_reason) {
        onStats && onStats(`${choice.finish_reason} · ${n} chunks · ${((performance.now() - started) / 1000).toFixed(1)} s`);
      }
    }
    return { content, stopped: false };
  } catch (e) {
    if (e.name === "AbortError") {
      element.classList.add("stopped");
      return { content, stopped: true };
    }
    throw e;
  } finally {
    element.classList.remove("streaming");
  }
}

// the chat view

class ChatView {
  constructor(apiKey) {
    this.apiKey = apiKey;
    this.conversations = load(STORE, []);
    this.current = load(CURRENT, null);
    this.controller = null;
    $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    $("chat-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); this.send(); }
    });
    $("chat-stop").addEventListener("click", () => this.controller && this.controller.abort());
    $("chat-regenerate").addEventListener("click", () => this.regenerate());
    $("chat-new").addEventListener("click", () => this.open(this.create().id));
    if (!this.conversation()) this.current = (this.conversations[0] || this.create()).id;
    this.open(this.current);
  }

  conversation() {
    return this.conversations.find((c) => c.id === this.current);
  }

  create() {
    const c = { id: `c${Date.now()}${Math.floor(Math.random() * 1000)}`, title: "New conversation", messages: [] };
    this.conversations.unshift(c);
    this.store();
    return c;
  }

  store() {
    save(STORE, this.conversations);
    save(CURRENT, this.current);
  }

  open(id) {
    this.current = id;
    this.store();
    this.renderList();
    this.renderMessages();
  }

  renderList() {
    const list = $("chat-list");
    list.innerHTML = "";
    for (const c of this.conversations) {
      const item = document.createElement("li");
      item.className = c.id === this.current ? "conversation current" : "conversation";
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = c.title;
      title.addEventListener("click", () => !this.controller && this.open(c.id));
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "delete";
      remove.textContent = "×";
      remove.title = "delete this conversation";
      remove.addEventListener("click", () => this.remove(c.id));
      item.append(title, remove);
      list.append(item);
    }
  }

  remove(id) {
    if (this.controller) return;
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (!this.conversations.length) this.create();
    this.open(id === this.current ? this.conversations[0].id : this.current);
  }

  renderMessages() {
    const box = $("chat-messages");
    box.innerHTML = "";
    const c = this.conversation();
    c.messages.forEach((m, i) => {
      const actions = m.role === "user" ? { edit: () => this.edit(i) } : {};
      box.append(messageElement(m, actions));
    });
    const last = c.messages[c.messages.length - 1];
    $("chat-regenerate").disabled = !!this.controller || !last || last.role !== "assistant";
  }

  setRunning(running) {
    $("chat-send").disabled = running;
    $("chat-stop").disabled = !running;
    $("chat-regenerate").disabled = running;
    document.body.classList.toggle("chat-running", running);
  }

  async send() {
    const text = $("chat-input").value;
    if (!text.trim() || this.controller) return;
    $("chat-input").value = "";
    const c = this.conversation();
    if (!c.messages.length) c.title = text.trim().slice(0, 40);
    c.messages.push({ role: "user", content: text });
    this.store();
    this.renderList();
    await this.reply();
  }

  async regenerate() {
    const c = this.conversation();
    if (this.controller || !c.messages.length || c.messages[c.messages.length - 1].role !== "assistant") return;
    c.messages.pop();
    await this.reply();
  }

  edit(index) {
    if (this.controller) return;
    const box = $("chat-messages");
    const element = box.children[index];
    const c = this.conversation();
    const area = document.createElement("textarea");
    area.className = "edit-text";
    area.value = c.messages[index].content;
    const saveButton = document.createElement("button");
    saveButton.type = "button";
    saveButton.className = "save";
    saveButton.textContent = "save & send";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.textContent = "cancel";
    element.querySelector(".body").replaceChildren(area);
    element.querySelector(".actions").replaceChildren(saveButton, cancel);
    cancel.addEventListener("click", () => this.renderMessages());
    saveButton.addEventListener("click", async () => {
      c.messages = c.messages.slice(0, index);
      c.messages.push({ role: "user", content: area.value });
      this.store();
      await this.reply();
    });
    area.focus();
  }

  async reply() {
    const c = this.conversation();
    const messages = c.messages.map(({ role, content }) => ({ role, content }));
    const message = { role: "assistant", content: "" };
    c.messages.push(message);
    this.renderMessages();
    const element = $("chat-messages").lastElementChild;
    $("chat-status").textContent = "generating…";
    $("chat-error").textContent = "";
    this.controller = new AbortController();
    this.setRunning(true);
    const body = { messages: withSystem(messages), ...sampling(), ...adapterFields($("chat-adapter"), $("chat-scale")) };
    try {
      const out = await streamReply(body, element, this.controller.signal, this.apiKey(),
        (stats) => { $("chat-status").textContent = stats; });
      message.content = out.content;
      message.stopped = out.stopped;
      if (out.stopped) $("chat-status").textContent = "stopped";
    } catch (e) {
      message.content = element.dataset.raw;
      $("chat-error").textContent = e.message;
      $("chat-status").textContent = "error";
    } finally {
      this.controller = null;
      this.setRunning(false);
      this.store();
      this.renderMessages();
    }
  }
}

// the compare view: one list of user turns, two columns of replies

class CompareView {
  constructor(apiKey) {
    this.apiKey = apiKey;
    this.state = load(COMPARE, { turns: [] });
    this.controller = null;
    $("compare-form").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    $("compare-stop").addEventListener("click", () => this.controller && this.controller.abort());
    $("compare-clear").addEventListener("click", () => {
      if (this.controller) return;
      this.state = { turns: [] };
      save(COMPARE, this.state);
      this.render();
    });
    this.render();
  }

  columns() {
    return ["a", "b"].map((side) => ({
      side, select: $(`compare-${side}-adapter`), scale: $(`compare-${side}-scale`),
      box: $(`compare-${side}-messages`), stats: $(`compare-${side}-stats`),
    }));
  }

  render() {
    for (const col of this.columns()) {
      col.box.innerHTML = "";
      for (const turn of this.state.turns) {
        col.box.append(messageElement({ role: "user", content: turn.user }));
        if (turn[col.side] !== undefined) {
          col.box.append(messageElement({ role: "assistant", content: turn[col.side], stopped: turn[`${col.side}Stopped`] }));
        }
      }
      $(`compare-${col.side}-label`).textContent = adapterLabel(col.select, col.scale);
    }
  }

  setRunning(running) {
    $("compare-send").disabled = running;
    $("compare-stop").disabled = !running;
  }

  async send() {
    const text = $("compare-input").value;
    if (!text.trim() || this.controller) return;
    $("compare-input").value = "";
    const turns = this.state.turns;
    turns.push({ user: text });
    this.render();
    this.controller = new AbortController();
    this.setRunning(true);
    $("compare-status").textContent = "generating…";
    $("compare-error").textContent = "";
    const turn = turns[turns.length - 1];
    const runs = this.columns().map(async (col) => {
      const messages = [];
      for (const t of turns.slice(0, -1)) messages.push({ role: "user", content: t.user }, { role: "assistant", content: t[col.side] || "" });
      messages.push({ role: "user", content: text });
      const element = messageElement({ role: "assistant", content: "" });
      col.box.append(element);
      col.stats.textContent = "";
      const body = { messages: withSystem(messages), ...sampling(), ...adapterFields(col.select, col.scale) };
      const out = await streamReply(body, element, this.controller.signal, this.apiKey(),
        (stats) => { col.stats.textContent = stats; });
      turn[col.side] = out.content;
      turn[`${col.side}Stopped`] = out.stopped;
      return out;
    });
    try {
      const results = await Promise.allSettled(runs);
      const failed = results.find((r) => r.status === "rejected");
      if (failed) throw failed.reason;
      $("compare-status").textContent = results.some((r) => r.value.stopped) ? "stopped" : "done";
    } catch (e) {
      $("compare-error").textContent = e.message;
      $("compare-status").textContent = "error";
    } finally {
      this.controller = null;
      this.setRunning(false);
      save(COMPARE, this.state);
      this.render();
    }
  }
}

export function initChatViews(apiKey) {
  const settings = load(SETTINGS, {});
  for (const id of SETTING_IDS) {
    if (settings[id] !== undefined) $(id).value = settings[id];
    $(id).addEventListener("change", () => {
      settings[id] = $(id).value;
      save(SETTINGS, settings);
    });
  }
  const chat = new ChatView(apiKey);
  const compare = new CompareView(apiKey);
  for (const id of ["compare-a-adapter", "compare-a-scale", "compare-b-adapter", "compare-b-scale"]) {
    $(id).addEventListener("change", () => compare.render());
  }
  return { chat, compare };
}
