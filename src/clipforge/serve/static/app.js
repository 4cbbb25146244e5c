// clipforge search page: plain JS, no build step, nothing loaded from the network but this server.
// State that can be shared lives in the URL: ?q=text or ?id=row; a new search pushes a history entry.
"use strict";

const $ = (id) => document.getElementById(id);
const K = 24; // results per search, or the server's --max-k when lower
let k = K;
let apiKey = sessionStorage.getItem("clipforge-api-key") || "";
let hasIndex = false;
let lastFile = null;

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers["X-API-Key"] = apiKey;
  const res = await fetch(path, Object.assign({}, options, { headers }));
  const isJson = (res.headers.get("content-type") || "").includes("application/json");
  const body = isJson ? await res.json() : await res.blob();
  if (!res.ok) {
    if (res.status === 401) $("key-form").hidden = false;
    throw new Error(isJson && body.detail ? body.detail : `HTTP ${res.status}`);
  }
  return body;
}

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", isError);
}

async function thumbnailInto(img, url) {
  if (!apiKey) { img.src = url; return; } // an <img> cannot send the key header: fetch the bytes
  try { img.src = URL.createObjectURL(await api(url)); } catch (e) { img.alt = "thumbnail unavailable"; }
}

function render(results) {
  const grid = $("grid");
  grid.replaceChildren();
  results.forEach((r, rank) => {
    const tile = document.createElement("button");
    tile.type = "button";
    tile.className = "tile";
    tile.dataset.id = r.id;
    tile.dataset.key = r.key || "";
    tile.title = `search by this image (row ${r.id})`;
    const img = document.createElement("img");
    img.alt = r.caption || r.key || `row ${r.id}`;
    img.loading = "lazy";
    thumbnailInto(img, r.thumbnail);
    const meta = document.createElement("span");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${rank + 1}. ${r.score.toFixed(3)}`;
    const key = document.createElement("span");
    key.className = "key";
    key.textContent = r.caption || r.key || `row ${r.id}`;
    meta.append(score, key);
    tile.append(img, meta);
    tile.addEventListener("click", () => go({ id: r.id }));
    grid.append(tile);
  });
}

async function search(body, label) {
  if (!hasIndex) { say("this server has no index: start it with --index DIR"); return; }
  say(`searching ${label}…`);
  try {
    const out = await api("/v1/search", body);
    render(out.results);
    say(`${out.results.length} results for ${label} (${out.took_ms} ms)`);
  } catch (e) {
    $("grid").replaceChildren();
    say(e.message, true);
  }
}

function jsonBody(obj) {
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(obj) };
}

// run the search the URL describes
function fromUrl() {
  const p = new URLSearchParams(location.search);
  if (p.has("q") && p.get("q").trim()) {
    $("q").value = p.get("q");
    search(jsonBody({ text: p.get("q"), k }), `“${p.get("q")}”`);
  } else if (p.has("id") && /^\d+$/.test(p.get("id"))) {
    search(jsonBody({ id: Number(p.get("id")), k }), `row ${p.get("id")}`);
  }
}

function go(params) {
  const url = "?" + new URLSearchParams(params).toString();
  history.pushState(params, "", url);
  fromUrl();
}

function labelList() {
  return $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
}

async function classify(file) {
  const labels = labelList();
  const box = $("label-bars");
  box.replaceChildren();
  if (!labels.length) return;
  const form = new FormData();
  form.append("files", file);
  labels.forEach((l) => form.append("labels", l));
  form.append("top_k", String(labels.length));
  try {
    const out = await api("/v1/classify", { method: "POST", body: form });
    const r = out.results[0];
    r.labels.forEach((label, i) => {
      const row = document.createElement("div");
      row.className = "label-row";
      row.setAttribute("role", "meter");
      row.setAttribute("aria-label", label);
      row.setAttribute("aria-valuemin", "0");
      row.setAttribute("aria-valuemax", "1");
      row.setAttribute("aria-valuenow", String(r.scores[i]));
      const name = document.createElement("span");
      name.className = "label-name";
      name.textContent = label;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = `${(100 * r.scores[i]).toFixed(1)}%`;
      bar.append(fill);
      const score = document.createElement("span");
      score.className = "label-score";
      score.textContent = `${(100 * r.scores[i]).toFixed(1)}%`;
      row.append(name, bar, score);
      box.append(row);
    });
  } catch (e) {
    say(e.message, true);
  }
}

async function useFile(file) {
  if (!file) return;
  lastFile = file;
  $("query-preview").src = URL.createObjectURL(file);
  $("query-image").hidden = false;
  history.pushState({}, "", location.pathname); // an upload cannot live in the URL
  const form = new FormData();
  form.append("file", file);
  form.append("k", String(k));
  await Promise.all([hasIndex ? search({ method: "POST", body: form }, file.name) : null, classify(file)]);
}

async function start() {
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("q").value.trim();
    if (q) go({ q });
  });
  $("file").addEventListener("change", () => useFile($("file").files[0]));
  $("labels").addEventListener("change", () => lastFile && classify(lastFile));
  const drop = $("drop");
  drop.addEventListener("keydown", (e) => {
    if ((e.key === "Enter" || e.key === " ") && e.target === drop) { e.preventDefault(); $("file").click(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    apiKey = $("api-key").value.trim();
    sessionStorage.setItem("clipforge-api-key", apiKey);
    $("key-form").hidden = true;
    start_status();
  });
  window.addEventListener("popstate", fromUrl);
  await start_status();
}

async function start_status() {
  try {
    const h = await api("/v1/health");
    hasIndex = !!h.index;
    k = Math.min(K, h.max_k || K);
    $("status").textContent = hasIndex
      ? `${h.index.count} images · ${h.index.kind} index · ${h.model.runtime}`
      : `no index · ${h.model.runtime}`;
    fromUrl();
  } catch (e) {
    $("status").textContent = "server unreachable";
    say(e.message, true);
  }
}

start();
