// The dashboard refreshes itself from /api/status every few seconds, without a reload.
"use strict";
(() => {
  const { el, rows, get, post } = scanrestore;
  const retryButton = (job) => {
    const button = el("button", { type: "button", text: "Retry" });
    button.addEventListener("click", async () => {
      await post(`/api/jobs/${job}/retry`, {});
      refresh();
    });
    return button;
  };
  function show(status) {
    for (const node of document.querySelectorAll("[data-count]")) {
      node.textContent = status.counts[node.dataset.count] || 0;
    }
    const stage = (p) => (p === null ? "starting" : `${p.stage} (stage ${p.stages_done + 1} of ${p.stages})`
      + (p.total ? `, tile ${p.done} of ${p.total}` : ""));
    rows("#running", status.running, (j) => [String(j.job), j.path, stage(j.progress), String(j.attempt), j.since || ""]);
    document.getElementById("done24").textContent = status.done_24h;
    const peak = Math.max(1, ...status.files_per_hour);
    document.getElementById("per-hour").replaceChildren(...status.files_per_hour.map((n, i) => {
      const bar = el("span", { class: "bar", title: `${23 - i} h ago: ${n}` });
      bar.style.height = `${(100 * n) / peak}%`;  // CSSOM, which the CSP allows
      return bar;
    }));
    rows("#speed", status.seconds_per_megapixel, (s) => [s.stage, s.model || "", String(s.runs), s.median.toFixed(2)]);
    const w = status.window;
    document.getElementById("window").textContent = w.always ? "always open"
      : `${w.active_hours}: ${w.open ? "open" : "closed"}, next opens ${w.next_open}`;
    rows("#failures", status.recent_failures, (f) => [f.path, f.state, String(f.attempts), f.error || "", retryButton(f.job)]);
    rows("#quarantined", status.quarantined, (q) => [q.path, q.reason || "", retryButton(q.job)]);
    const fix = status.fixity;
    document.getElementById("fixity").textContent = fix === null ? "no audit yet"
      : `${fix.checked} files checked at ${fix.finished_at}: ${fix.problems.length} problems`
        + fix.problems.map((p) => `; ${p.kind} ${p.path}`).join("");
    rows("#models", status.models, (m) => [m.model, el("code", { text: m.sha256 }), m.licence]);
    document.getElementById("reviews").textContent =
      Object.entries(status.reviews).map(([k, v]) => `${v} ${k}`).join(", ");
  }
  async function refresh() {
    try { show(await get("/api/status")); } catch (error) { /* the next poll tries again */ }
  }
  refresh();
  setInterval(refresh, 3000);
})();
