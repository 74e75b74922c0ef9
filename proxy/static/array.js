// A job array's page (templates/array.html): while any of its jobs is queued
// or running, poll the array's JSON every few seconds and update the counts
// per state and each listed job's state. Polling, not a stream: one small
// GET per open page every POLL_MS, and it stops once the array is done.
(function () {
  "use strict";

  const POLL_MS = 2000;
  const section = document.getElementById("array");
  if (!section) return;

  function update(array) {
    for (const [state, n] of Object.entries(array.counts)) {
      const cell = section.querySelector('[data-count="' + state + '"]');
      if (cell) cell.textContent = String(n);
    }
    for (const job of array.jobs) {
      const row = section.querySelector('tr[data-index="' + job.index + '"]');
      if (!row) continue;
      const badge = row.querySelector("[data-state]");
      badge.textContent = job.state;
      badge.className = "badge " + job.state;
      row.querySelector("[data-exit]").textContent = job.exit_code === null ? "" : String(job.exit_code);
    }
    const badge = document.getElementById("array-state");
    badge.textContent = array.done ? "done" : "active";
    badge.className = "badge " + (array.done ? "succeeded" : "running");
    const cancel = document.getElementById("cancel-all");
    if (cancel && array.done) cancel.hidden = true;
  }

  function poll() {
    fetch(section.dataset.src, {credentials: "same-origin", headers: {Accept: "application/json"}})
      .then((r) => (r.ok ? r.json() : null))
      .then((array) => {
        if (array) update(array);
        if (!array || !array.done) setTimeout(poll, POLL_MS);
      })
      .catch(() => setTimeout(poll, POLL_MS * 2));
  }

  if (section.dataset.done !== "true") setTimeout(poll, POLL_MS);
})();
