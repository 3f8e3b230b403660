// The review queue: filters, and the keyboard (j/k or arrows to move, a approve, r reject).
"use strict";
(() => {
  const { el, get, post } = scanrestore;
  const form = document.getElementById("filters");
  let items = [];
  let current = 0;
  async function load() {
    const query = new URLSearchParams([...new FormData(form)].filter(([, v]) => v !== ""));
    items = (await get(`/api/outputs?${query}`)).outputs;
    current = Math.min(current, Math.max(0, items.length - 1));
    render();
  }
  function render() {
    const body = document.querySelector("#queue tbody");
    body.replaceChildren(...items.map((item, index) => {
      const thumb = el("img", { src: `/api/outputs/${item.id}/image/output?width=96`, alt: "", loading: "lazy" });
      const link = el("a", { href: `/outputs/${item.id}`, text: item.path });
      const invented = item.invented === null ? "–" : `${(item.invented * 100).toFixed(2)} %`;
      const row = el("tr", { "data-id": item.id, "data-state": item.state });
      for (const cell of [thumb, link, item.source.path, item.stages.join(" → "), invented, item.state]) {
        row.append(el("td", {}, cell));
      }
      if (index === current) row.classList.add("current");
      row.addEventListener("click", () => { current = index; render(); });
      return row;
    }));
    document.getElementById("empty").hidden = items.length > 0;
  }
  async function decide(decision) {
    // The cursor moves on at once, so keys pressed in quick succession judge successive items.
    const item = items[current];
    if (!item) return;
    current = Math.min(current + 1, items.length - 1);
    render();
    try {
      await post(`/api/outputs/${item.id}/review`, { decision });
      item.state = decision;
    } catch (error) {
      item.state = `not recorded: ${error.message}`;
    }
    render();
  }
  document.addEventListener("keydown", (event) => {
    if (event.target.closest("input, select, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
    const keys = {
      j: () => { current = Math.min(current + 1, items.length - 1); render(); },
      ArrowDown: () => { current = Math.min(current + 1, items.length - 1); render(); },
      k: () => { current = Math.max(current - 1, 0); render(); },
      ArrowUp: () => { current = Math.max(current - 1, 0); render(); },
      a: () => decide("approved"),
      r: () => decide("rejected"),
      Enter: () => { if (items[current]) location.href = `/outputs/${items[current].id}`; },
    };
    if (keys[event.key]) { event.preventDefault(); keys[event.key](); }
  });
  form.addEventListener("change", load);
  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  load();
})();
