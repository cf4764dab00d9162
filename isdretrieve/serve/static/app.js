// The search page. Every text from the service (file names, class names, paths) goes into the DOM as
// text (textContent, setAttribute), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { index: "", info: null };

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, String(value));
  }
  node.append(...children); // strings become text nodes
  return node;
}

function status(text) {
  $("status").textContent = text;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (response.status === 401) $("token-form").hidden = false;
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function indexPath(suffix) {
  return `/api/indices/${encodeURIComponent(page.index)}${suffix}`;
}

function k() {
  const value = Number.parseInt($("k").value, 10);
  return Number.isFinite(value) && value > 0 ? value : 10;
}

function tile(item, { score, kind = "", onClick } = {}) {
  const img = el("img", { src: item.thumb, alt: item.path, width: 96, height: 96 });
  img.addEventListener("error", () => img.classList.add("missing"), { once: true });
  const caption = el("div", { class: "caption" });
  if (score !== undefined) caption.append(el("span", { class: "score" }, score.toFixed(3)));
  if (item.class !== undefined) caption.append(el("span", { class: "cls" }, item.class));
  caption.append(el("span", { class: "where" }, item.row !== undefined ? `row ${item.row}` : item.path));
  const figure = el("figure", { class: `tile ${kind}`.trim(), title: item.path }, img, caption);
  if (item.other_class === true) figure.classList.add("other");
  if (onClick) {
    figure.dataset.row = String(item.row);
    figure.tabIndex = 0;
    figure.addEventListener("click", onClick);
    figure.addEventListener("keydown", (event) => {
      if (event.key === "Enter") onClick();
    });
  }
  return figure;
}

function showResults(results, queryTiles, seconds) {
  const box = $("results");
  box.replaceChildren();
  let other = 0;
  let known = 0;
  results.forEach((result, i) => {
    const hits = el("div", { class: "hits" });
    for (const hit of result.hits) {
      hits.append(tile(hit, { score: hit.score, onClick: () => searchRow(hit.row) }));
      if (hit.other_class !== null) known += 1;
      if (hit.other_class === true) other += 1;
    }
    box.append(el("div", { class: "result" }, queryTiles[i], hits));
  });
  const count = results.reduce((n, result) => n + result.hits.length, 0);
  const labels = known ? `, ${other} of ${known} labelled neighbours of another class` : "";
  box.prepend(el("p", { class: "summary" }, `${count} neighbours${labels} (${seconds.toFixed(3)} s)`));
}

async function run(what, work) {
  showError("");
  status(`${what}…`);
  try {
    await work();
    status("");
  } catch (error) {
    status("");
    showError(error.message);
  }
}

// the class chosen above the rows filters searches too ("" when all classes)
function classFilter() {
  const label = $("cls").value;
  return label === "" ? "" : `&label=${label}`;
}

function searchFiles(files) {
  if (!files.length) return;
  run("searching", async () => {
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    const start = performance.now();
    const body = await api(indexPath(`/search/images?k=${k()}${classFilter()}`), {
      method: "POST",
      body: form,
    });
    const queries = Array.from(files, (file) =>
      tile({ thumb: URL.createObjectURL(file), path: file.name }, { kind: "query" }),
    );
    showResults(body.results, queries, (performance.now() - start) / 1000);
  });
}

function searchRow(row) {
  run("searching", async () => {
    const start = performance.now();
    const body = await api(indexPath(`/rows/${row}/neighbours?k=${k()}${classFilter()}`));
    const queries = body.results.map((result) => tile(result.query, { kind: "query" }));
    showResults(body.results, queries, (performance.now() - start) / 1000);
    window.scrollTo({ top: 0 });
  });
}

function browse() {
  run("loading rows", async () => {
    const seed = Math.floor(Math.random() * 2 ** 31);
    const body = await api(indexPath(`/rows?n=24&seed=${seed}${classFilter()}`));
    const tiles = body.rows.map((row) => tile(row, { onClick: () => searchRow(row.row) }));
    $("rows").replaceChildren(...tiles);
    if (!tiles.length) $("rows").append(el("p", {}, "no rows of this class"));
  });
}

async function chooseIndex(name) {
  page.index = name;
  $("map-link").href = indexPath("/map");
  $("results").replaceChildren();
  await run("opening the index", async () => {
    page.info = await api(indexPath(""));
    const options = page.info.classes.map((cls, label) => el("option", { value: label }, cls));
    $("cls").replaceChildren(el("option", { value: "" }, "all classes"), ...options);
    $("drop").hidden = !page.info.image_search;
  });
  browse();
}

function useToken(token) {
  document.cookie = `isd_token=${encodeURIComponent(token)}; path=/; SameSite=Strict`;
}

async function start() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    useToken(fromHash);
    history.replaceState(null, "", location.pathname);
  }
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useToken($("token").value);
    location.reload();
  });
  $("file").addEventListener("change", () => searchFiles($("file").files));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchFiles(event.dataTransfer.files);
  });
  $("index").addEventListener("change", () => chooseIndex($("index").value));
  $("cls").addEventListener("change", browse);
  $("random").addEventListener("click", browse);
  await run("loading", async () => {
    const indices = (await api("/api/indices")).filter((one) => !one.damaged);
    $("index").replaceChildren(...indices.map((one) => el("option", { value: one.name }, one.name)));
    if (indices.length) await chooseIndex(indices[0].name);
  });
}

start();
