// Shared by every page: JSON calls carrying the CSRF header, and safe DOM building.
"use strict";
const scanrestore = {
  csrf: document.querySelector('meta[name="csrf-token"]').content,
  async get(url) {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    return response.json();
  },
  async post(url, body) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": scanrestore.csrf },
      body: JSON.stringify(body || {}),
    });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.status);
    return data;
  },
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  },
  rows(table, items, cells) {
    const body = document.querySelector(`${table} tbody`);
    body.replaceChildren(...items.map((item) => {
      const row = scanrestore.el("tr");
      for (const cell of cells(item)) row.append(scanrestore.el("td", {}, cell));
      return row;
    }));
  },
};
