// thinkgate console: forms as JSON calls (with the session's CSRF token), tables and charts from the
// console's JSON endpoints, and the playground's stream. Data goes into the page as text, never as HTML.
"use strict";

const T = JSON.parse(document.getElementById("i18n").textContent);
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const $ = (sel, root = document) => root.querySelector(sel);

// An error of a console call: the text in the page's language when its code has one, else the server's.
class CallError extends Error {
  constructor(e, status) {
    const text = (e.code && T[`err_${e.code}`]) || (e.message || status) + (e.param ? ` (${e.param})` : "");
    super(text);
    this.code = e.code || "";
  }
}

function showError(el, e) {
  el.textContent = e.message;
  el.dataset.code = e.code || "";
}

async function call(path, body, method = "POST") {
  const init = { method, headers: { "X-CSRF-Token": CSRF }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new CallError((data && data.error) || {}, r.statusText);
  return data;
}
const get = (path) => call(path, undefined, "GET");

function cell(tr, value) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "—" : String(value);
  tr.appendChild(td);
  return td;
}

function fillTable(table, rows, columns, extra) {
  const body = $("tbody", table);
  body.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const c of columns) cell(tr, typeof c === "function" ? c(row) : row[c]);
    if (extra) extra(tr, row);
    body.appendChild(tr);
  }
}

const shortTime = (iso) => (iso ? iso.replace("T", " ").slice(0, 19) : "—");

function formValues(form) {
  const out = {};
  for (const el of form.elements) {
    if (!el.name) continue;
    out[el.name] = el.value.trim();
  }
  return out;
}

// -- forms: each posts its fields as JSON and hands the answer to its page ---------------------------
const afterSubmit = {};

function bindForms() {
  for (const form of document.querySelectorAll("form.api-form")) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const err = $(".error", form);
      showError(err, { message: "", code: "" });
      const button = $("button[type=submit]", form);
      button.disabled = true;
      try {
        const values = formValues(form);
        for (const k of Object.keys(values)) if (values[k] === "") delete values[k];
        const data = await call(form.dataset.endpoint, values);
        if (data.redirect) { window.location.assign(data.redirect); return; }
        const then = afterSubmit[form.id];
        if (then) await then(data, form);
      } catch (e) {
        showError(err, e);
      } finally {
        button.disabled = false;
      }
    });
  }
}

// -- header: language and sign-out --------------------------------------------------------------------
function bindHeader() {
  const lang = $("#lang-switch");
  if (lang) lang.addEventListener("click", () => {
    document.cookie = `tg_lang=${lang.dataset.lang}; path=/; max-age=31536000; SameSite=Lax`;
    window.location.reload();
  });
  const out = $("#sign-out");
  if (out) out.addEventListener("click", async () => {
    const data = await call("/console/api/signout", {});
    window.location.assign(data.redirect || "/");
  });
}

// -- copy buttons and sample tabs ----------------------------------------------------------------------
function bindCopy() {
  for (const b of document.querySelectorAll("button.copy")) {
    b.addEventListener("click", async () => {
      const text = document.getElementById(b.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(text);
      } catch (e) { // no clipboard permission: select the text so the user can copy it
        const range = document.createRange();
        range.selectNodeContents(document.getElementById(b.dataset.copy));
        window.getSelection().removeAllRanges();
        window.getSelection().addRange(range);
      }
      b.textContent = T.copied;
      setTimeout(() => { b.textContent = T.copy_text; }, 1500);
    });
  }
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
      for (const s of document.querySelectorAll(".sample")) s.classList.toggle("hidden", s.dataset.sample !== tab.dataset.tab);
    });
  }
}

// -- the usage chart: cost per day, a stacked bar per model ----------------------------------------------
let chart = null;
function drawUsage(rows) {
  const canvas = $("#usage-chart");
  if (!canvas) return;
  $("#usage-empty").classList.toggle("hidden", rows.length > 0);
  const days = [...new Set(rows.map((r) => r.day))].sort();
  const models = [...new Set(rows.map((r) => r.model))].sort();
  const palette = ["#2563eb", "#16a34a", "#db2777", "#ea580c", "#7c3aed", "#0891b2", "#ca8a04"];
  const datasets = models.map((m, i) => ({
    label: m,
    backgroundColor: palette[i % palette.length],
    data: days.map((d) => {
      const r = rows.find((x) => x.day === d && x.model === m);
      return r ? Number(r.cost) : 0;
    }),
  }));
  canvas.dataset.days = JSON.stringify(days);
  canvas.dataset.models = JSON.stringify(models);
  if (typeof Chart === "undefined") return;
  if (chart) chart.destroy();
  chart = new Chart(canvas, {
    type: "bar",
    data: { labels: days, datasets },
    options: {
      responsive: true, maintainAspectRatio: false, animation: false,
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } },
      plugins: { legend: { position: "bottom" } },
    },
  });
}

const REQUEST_COLUMNS = [(r) => shortTime(r.created_at), "model", "key", "prompt_tokens", "completion_tokens",
  "reasoning_tokens", "cost", "finish_reason", "latency_ms"];

// A key row's Revoke button (active keys only): confirm, revoke through `prefix`, then redraw the view.
function revokeButton(prefix, reload) {
  return (tr, k) => {
    const td = cell(tr, "");
    if (k.status !== "active") return;
    const b = document.createElement("button");
    b.type = "button";
    b.className = "secondary revoke";
    b.textContent = T.revoke;
    b.addEventListener("click", async () => {
      if (!window.confirm(T.confirm_revoke)) return;
      await call(`${prefix}${encodeURIComponent(k.name)}/revoke`, {});
      await reload();
    });
    td.appendChild(b);
  };
}

// -- the customer's view ----------------------------------------------------------------------------------
async function loadCustomer() {
  const me = await get("/console/api/me");
  $("#balance").textContent = `¥ ${me.balance}`;
  $("#spent").textContent = `¥ ${me.spent}`;
  $("#request-count").textContent = me.requests;
  fillTable($("#keys-table"), me.keys, ["name", "prefix", "status", "spent", (k) => shortTime(k.created_at)],
    revokeButton("/console/api/keys/", loadCustomer));
  const usage = await get("/console/api/usage");
  drawUsage(usage.data);
  const recent = await get("/console/api/requests");
  fillTable($("#requests-table"), recent.data, REQUEST_COLUMNS);
}

afterSubmit["key-form"] = async (data, form) => {
  $("#new-secret-value").textContent = data.secret; // shown once: never stored, gone on reload
  $("#new-secret").classList.remove("hidden");
  form.reset();
  await loadCustomer();
};
afterSubmit["redeem-form"] = async (data, form) => {
  form.reset();
  await loadCustomer();
};

// -- the admin's view -----------------------------------------------------------------------------------
async function loadAdmin() {
  const [accounts, keys, usage, backends] = await Promise.all([
    get("/console/api/admin/accounts"), get("/console/api/admin/keys"), get("/console/api/admin/usage"),
    get("/console/api/admin/backends")]);
  fillTable($("#accounts-table"), accounts.data,
    ["name", "email", "balance", "spent", "requests", (a) => shortTime(a.created_at)]);
  fillTable($("#keys-table"), keys.data, ["name", "account", "prefix", "status", "spent", (k) => shortTime(k.created_at)],
    revokeButton("/console/api/admin/keys/", loadAdmin));
  drawUsage(usage.data);
  const cols = ["account", "requests", "prompt_tokens", "completion_tokens", "reasoning_tokens", "cost"];
  fillTable($("#usage-table"), usage.accounts, cols);
  const foot = $("#usage-table tfoot");
  foot.replaceChildren();
  const tr = document.createElement("tr");
  for (const c of cols) cell(tr, c === "account" ? T.total : usage.total[c]);
  foot.appendChild(tr);
  fillTable($("#requests-table"), usage.recent, REQUEST_COLUMNS);
  const rows = [];
  for (const m of backends.data) for (const b of m.backends) rows.push({ model: m.model, type: b.type, name: b.name, state: b.state, active: m.active_requests });
  fillTable($("#backends-table"), rows, ["model", "type", "name", "state", "active"]);
}

afterSubmit["codes-form"] = async (data) => {
  $("#new-codes-value").textContent = data.codes.join("\n");
  $("#new-codes").classList.remove("hidden");
};

// -- the playground: a streamed chat completion, reasoning apart from the answer -------------------------
// The conversation so far (earlier turns), in memory only: a reload or "New chat" starts again.
const history = [];

function showHistory() {
  const list = $("#pg-history");
  list.replaceChildren();
  for (const m of history) {
    const li = document.createElement("li");
    li.className = `turn ${m.role}`;
    const who = document.createElement("strong");
    who.textContent = m.role === "user" ? T.role_user : T.role_assistant;
    const text = document.createElement("span");
    text.textContent = m.shown;
    li.append(who, text);
    list.appendChild(li);
  }
}

function playgroundRequest(v) {
  const messages = [];
  if (v.system) messages.push({ role: "system", content: v.system });
  messages.push(...history.map(({ role, content }) => ({ role, content })));
  messages.push({ role: "user", content: v.user });
  const req = { model: v.model, messages };
  if (v.max_tokens) req.max_tokens = Number(v.max_tokens);
  if (v.temperature) req.temperature = Number(v.temperature);
  if (v.thinking_budget) req.reasoning = { max_tokens: Number(v.thinking_budget) };
  if (v.seed) req.seed = Number(v.seed);
  if (v.tools) {
    req.tools = JSON.parse(v.tools);
    req.tool_choice = v.tool_choice;
  }
  return req;
}

function bindPlayground() {
  const form = $("#playground-form");
  if (!form) return;
  let controller = null;
  const stop = $("#pg-stop");
  stop.addEventListener("click", () => controller && controller.abort());
  $("#pg-new").addEventListener("click", () => {
    history.length = 0;
    showHistory();
    for (const id of ["#pg-reasoning-text", "#pg-content", "#pg-tools", "#pg-usage"]) $(id).textContent = "";
    $("#pg-tools-box").classList.add("hidden");
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const err = $(".error", form);
    showError(err, { message: "", code: "" });
    const v = formValues(form);
    let body;
    try {
      body = { request: playgroundRequest(v) };
    } catch (e) {
      err.textContent = `${T.tools_json}: ${e.message}`;
      return;
    }
    if (v.key) body.key = v.key;
    showHistory(); // the turns before this one
    const reasoning = $("#pg-reasoning-text"), content = $("#pg-content"), tools = $("#pg-tools"), usage = $("#pg-usage");
    reasoning.textContent = ""; content.textContent = ""; tools.textContent = ""; usage.textContent = "";
    $("#pg-tools-box").classList.add("hidden");
    const calls = [];
    controller = new AbortController();
    $("#pg-send").disabled = true;
    stop.disabled = false;
    try {
      const r = await fetch("/console/api/playground", {
        method: "POST", credentials: "same-origin", signal: controller.signal,
        headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF }, body: JSON.stringify(body),
      });
      if (!r.ok) {
        const data = await r.json().catch(() => ({}));
        throw new CallError((data && data.error) || {}, r.statusText);
      }
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of frame.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const payload = line.slice(6);
            if (payload === "[DONE]") continue;
            const chunk = JSON.parse(payload);
            if (chunk.error) showError(err, new CallError(chunk.error, ""));
            for (const c of chunk.choices || []) {
              const d = c.delta || {};
              if (d.reasoning) reasoning.textContent += d.reasoning;
              if (d.content) content.textContent += d.content;
              for (const tc of d.tool_calls || []) {
                const cur = calls[tc.index] || (calls[tc.index] = { id: null, name: "", arguments: "" });
                if (tc.id) cur.id = tc.id;
                if (tc.function && tc.function.name) cur.name += tc.function.name;
                if (tc.function && tc.function.arguments) cur.arguments += tc.function.arguments;
                $("#pg-tools-box").classList.remove("hidden");
                tools.textContent = calls.map((x) => `${x.name}(${x.arguments})`).join("\n");
              }
            }
            if (chunk.usage) {
              const u = chunk.usage;
              const rt = (u.completion_tokens_details || {}).reasoning_tokens || 0;
              usage.textContent = `${T.usage}: ${T.prompt_tokens} ${u.prompt_tokens} · ${T.completion_tokens} ` +
                `${u.completion_tokens} (${T.reasoning_tokens} ${rt}) · ${T.cost} ¥ ${u.cost}`;
              usage.dataset.cost = u.cost;
            }
          }
        }
      }
      if (!err.textContent) { // a finished turn joins the conversation: shown above the next one
        const said = content.textContent;
        history.push({ role: "user", content: v.user, shown: v.user },
          { role: "assistant", content: said, shown: [said, tools.textContent].filter(Boolean).join("\n") });
        form.elements.user.value = "";
      }
    } catch (e) {
      if (e.name !== "AbortError") showError(err, e);
    } finally {
      controller = null;
      $("#pg-send").disabled = false;
      stop.disabled = true;
    }
  });
}

function start() {
  bindHeader();
  bindForms();
  bindCopy();
  bindPlayground();
  const page = document.body.dataset.page;
  const loader = { customer: loadCustomer, admin: loadAdmin }[page];
  if (loader) loader().catch((e) => { console.error(e); });
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
