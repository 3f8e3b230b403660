// The output page: before/after viewer (slider, side by side, toggle) with synced zoom and pan,
// native-resolution crops past the overview's scale, the invented-pixel overlay, and decisions.
"use strict";
(() => {
  const { post } = scanrestore;
  const viewer = document.getElementById("viewer");
  const id = viewer.dataset.id;
  const W = Number(viewer.dataset.width), H = Number(viewer.dataset.height);
  const OVERVIEW = 2048;
  const overviewScale = Math.min(1, OVERVIEW / Math.max(W, H));
  const panes = [...viewer.querySelectorAll(".pane")];
  const divider = document.getElementById("divider");
  const beforeSelect = document.getElementById("before-layer");
  const maskBox = document.getElementById("mask-on");
  const maskOpacity = document.getElementById("mask-opacity");
  const view = { zoom: 1, x: 0, y: 0, split: 0.5 };
  let detailTimer = null;

  const layerOf = (img) => (img.closest("#pane-before") ? beforeSelect.value : img.dataset.layer);
  const src = (layer, query) => `/api/outputs/${id}/image/${layer}${query ? `?${query}` : ""}`;

  function loadOverviews() {
    for (const img of viewer.querySelectorAll(".stage img")) {
      const layer = layerOf(img);
      img.dataset.layer = layer;
      img.src = src(layer, "");
    }
    document.getElementById("before-tag").textContent =
      beforeSelect.value === "lanczos" ? "Lanczos resize" : "before";
    scheduleDetail();
  }
  function paneSize() {
    const pane = panes[0].getBoundingClientRect();
    return { w: pane.width, h: pane.height };
  }
  function fit() {
    const { w, h } = paneSize();
    view.zoom = Math.min(w / W, h / H);
    view.x = (w - W * view.zoom) / 2;
    view.y = (h - H * view.zoom) / 2;
    apply();
  }
  function zoomTo(zoom, cx, cy) {
    const { w, h } = paneSize();
    cx = cx ?? w / 2; cy = cy ?? h / 2;
    const px = (cx - view.x) / view.zoom, py = (cy - view.y) / view.zoom;
    view.zoom = Math.max(0.01, Math.min(16, zoom));
    view.x = cx - px * view.zoom;
    view.y = cy - py * view.zoom;
    apply();
  }
  function apply() {
    for (const stage of viewer.querySelectorAll(".stage")) {
      stage.style.width = `${W}px`;
      stage.style.height = `${H}px`;
      stage.style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.zoom})`;
    }
    document.getElementById("zoom-level").textContent = `${Math.round(view.zoom * 100)} %`;
    const before = document.getElementById("pane-before");
    if (viewer.classList.contains("mode-slider")) {
      before.style.clipPath = `inset(0 ${(1 - view.split) * 100}% 0 0)`;
      divider.style.left = `${view.split * 100}%`;
    } else {
      before.style.clipPath = "";
    }
    scheduleDetail();
  }
  function scheduleDetail() {
    clearTimeout(detailTimer);
    detailTimer = setTimeout(loadDetail, 250);
  }
  function loadDetail() {
    // Past the overview's resolution, show the visible region at native resolution.
    for (const old of viewer.querySelectorAll("img.detail")) old.remove();
    if (view.zoom <= overviewScale * 1.01) return;
    const { w, h } = paneSize();
    const x0 = Math.max(0, Math.floor(-view.x / view.zoom));
    const y0 = Math.max(0, Math.floor(-view.y / view.zoom));
    const x1 = Math.min(W, Math.ceil((w - view.x) / view.zoom));
    const y1 = Math.min(H, Math.ceil((h - view.y) / view.zoom));
    if (x1 <= x0 || y1 <= y0) return;
    const query = `x=${x0}&y=${y0}&w=${x1 - x0}&h=${y1 - y0}`;
    for (const base of viewer.querySelectorAll(".stage img")) {
      if (base.hidden) continue;
      const detail = document.createElement("img");
      detail.className = `detail ${base.classList.contains("overlay") ? "overlay" : ""}`;
      detail.alt = "";
      detail.dataset.layer = base.dataset.layer;
      detail.style.left = `${x0}px`; detail.style.top = `${y0}px`;
      detail.style.width = `${x1 - x0}px`; detail.style.height = `${y1 - y0}px`;
      if (base.classList.contains("overlay")) detail.style.opacity = base.style.opacity;
      detail.src = src(base.dataset.layer, query);
      base.after(detail);
    }
  }
  // Dragging: the divider moves the split; anywhere else pans both panes together.
  let drag = null;
  viewer.addEventListener("pointerdown", (event) => {
    drag = { divider: event.target === divider, x: event.clientX, y: event.clientY, vx: view.x, vy: view.y };
    viewer.setPointerCapture(event.pointerId);
  });
  viewer.addEventListener("pointermove", (event) => {
    if (!drag) return;
    if (drag.divider) {
      const box = viewer.getBoundingClientRect();
      view.split = Math.max(0, Math.min(1, (event.clientX - box.left) / box.width));
    } else {
      view.x = drag.vx + event.clientX - drag.x;
      view.y = drag.vy + event.clientY - drag.y;
    }
    apply();
  });
  viewer.addEventListener("pointerup", () => { drag = null; });
  viewer.addEventListener("wheel", (event) => {
    event.preventDefault();
    const box = event.target.closest(".pane")?.getBoundingClientRect() || viewer.getBoundingClientRect();
    zoomTo(view.zoom * (event.deltaY < 0 ? 1.25 : 0.8), event.clientX - box.left, event.clientY - box.top);
  }, { passive: false });
  document.getElementById("zoom-fit").addEventListener("click", fit);
  document.getElementById("zoom-100").addEventListener("click", () => zoomTo(1));
  document.getElementById("zoom-200").addEventListener("click", () => zoomTo(2));
  document.getElementById("mode").addEventListener("change", (event) => {
    viewer.className = `mode-${event.target.value}`;
    document.getElementById("pane-before").hidden = false;
    fit();
  });
  beforeSelect.addEventListener("change", loadOverviews);
  if (maskBox) {
    const mask = document.getElementById("mask");
    const update = () => {
      mask.hidden = !maskBox.checked;
      mask.style.opacity = maskOpacity.value / 100;
      scheduleDetail();
    };
    maskBox.addEventListener("change", update);
    maskOpacity.addEventListener("input", update);
    update();
  }
  // Decisions.
  const message = document.getElementById("message");
  const state = document.getElementById("state");
  async function decide(decision) {
    const note = document.getElementById("note").value;
    try {
      const review = await post(`/api/outputs/${id}/review`, { decision, note });
      state.textContent = state.dataset.state = review.decision;
      const item = document.createElement("li");
      item.textContent = `${review.decision} by ${review.reviewer} at ${review.decided_at}${review.note ? `: ${review.note}` : ""}`;
      document.getElementById("reviews").append(item);
      message.textContent = `Recorded: ${review.decision}`;
    } catch (error) { message.textContent = `Not recorded: ${error.message}`; }
  }
  document.getElementById("approve").addEventListener("click", () => decide("approved"));
  document.getElementById("reject").addEventListener("click", () => decide("rejected"));
  document.getElementById("reprocess").addEventListener("click", async () => {
    const preset = document.getElementById("preset").value;
    try {
      const job = await post(`/api/outputs/${id}/reprocess`, preset ? { preset } : {});
      message.textContent = `Queued as job ${job.job}`;
    } catch (error) { message.textContent = `Not queued: ${error.message}`; }
  });
  for (const button of document.querySelectorAll("button.retry")) {
    button.addEventListener("click", async () => {
      try {
        await post(`/api/jobs/${button.dataset.job}/retry`, {});
        message.textContent = "Queued again";
      } catch (error) { message.textContent = `Not queued: ${error.message}`; }
    });
  }
  document.addEventListener("keydown", (event) => {
    if (event.target.closest("input, select, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "a") decide("approved");
    else if (event.key === "r") decide("rejected");
    else if (event.key === "t" && viewer.classList.contains("mode-toggle")) {
      const before = document.getElementById("pane-before");
      before.hidden = !before.hidden;
    } else return;
    event.preventDefault();
  });
  window.addEventListener("resize", fit);
  loadOverviews();
  fit();
})();
