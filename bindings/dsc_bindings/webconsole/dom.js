"use strict";
// What the web console (console.js) and the read-only /status page (observe/statuspage.py)
// both draw with, once: every text is put in with textContent (scanner-controlled text stays
// text).  Loaded before each page's own script.

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}
// The body of the table `selector`: one row per array of cells (a node, or text put in a
// <td>), the array's `id` and `cls` the row's; `empty` in one muted cell when there are none.
function fill(selector, rows, empty) {
  const table = document.querySelector(selector);
  const body = table.querySelector("tbody");
  const cols = table.querySelectorAll("thead th").length;
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr"); const td = el("td", empty, "muted"); td.colSpan = cols;
    tr.append(td); body.append(tr); return;
  }
  for (const cells of rows) {
    const tr = el("tr", null, cells.cls);
    if (cells.id) tr.id = cells.id;
    for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
    body.append(tr);
  }
}
