// Live pages: a job's page follows its state and output, a user's job list
// follows their jobs' states, both over Server-Sent Events (proxy/live.py).
//
// The server ends each stream after a while (it holds a server thread) and the
// browser reconnects by itself, sending the last event id it saw
// (Last-Event-ID); the server resumes after it, so nothing is appended twice.
// A first connection starts from the page's data-from: what it already shows.
(function () {
  "use strict";

  const FINAL = new Set(["succeeded", "failed", "cancelled", "timed_out"]);

  function humanSize(n) {
    const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    for (const unit of units) {
      if (n < 1024 || unit === "TiB") {
        return unit === "bytes" ? n + " bytes" : Number(n.toPrecision(4)) + " " + unit;
      }
      n /= 1024;
    }
    return String(n);
  }

  function localTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    const pad = (v) => String(v).padStart(2, "0");
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function setText(id, text) {
    const el = document.getElementById(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function usageText(usage) {
    if (!usage || usage.cpu_seconds == null) return "";
    return usage.cpu_seconds.toFixed(2) + " CPU s, peak " + humanSize(usage.peak_memory_bytes || 0) +
      ", wall " + (usage.wall_seconds || 0).toFixed(2) + " s";
  }

  function costText(cost) {
    if (!cost || cost.amount == null) return "";
    return cost.amount + " " + (cost.currency || "");
  }

  // Shows "live" / "reconnecting…" next to the title while a stream is open.
  function liveBadge(text) {
    const el = document.getElementById("live");
    if (!el) return;
    el.hidden = !text;
    el.textContent = text || "";
  }

  // Opens `url` from `from` and calls handlers[event name](data, event); returns
  // a handle whose reconnect() starts a fresh connection from the last id seen.
  function follow(url, from, handlers) {
    // connections: EventSources opened here; opens: connections the server
    // accepted, the browser's own reconnections included.
    const handle = { lastEventId: from, source: null, connections: 0, opens: 0 };
    handle.open = function () {
      const sep = url.indexOf("?") < 0 ? "?" : "&";
      const source = new EventSource(url + (handle.lastEventId ? sep + "from=" + encodeURIComponent(handle.lastEventId) : ""));
      handle.source = source;
      handle.connections += 1;
      source.addEventListener("open", () => {
        handle.opens += 1;
        liveBadge("live");
      });
      source.addEventListener("error", () => {
        liveBadge(source.readyState === EventSource.CLOSED ? "" : "reconnecting…");
      });
      Object.keys(handlers).forEach((name) => {
        source.addEventListener(name, (event) => {
          if (event.lastEventId) handle.lastEventId = event.lastEventId;
          handlers[name](JSON.parse(event.data), event);
        });
      });
    };
    handle.close = function () {
      if (handle.source) handle.source.close();
      liveBadge("");
    };
    handle.reconnect = function () {
      handle.close();
      handle.open();
    };
    handle.open();
    return handle;
  }

  // ---------------------------------------------------------------- a job

  function followJob(root) {
    const jobId = root.dataset.events.split("/")[2];

    function append(stream, text) {
      const pre = document.getElementById(stream);
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.appendChild(document.createTextNode(text));
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }

    function showJob(job) {
      const badge = document.getElementById("state");
      badge.textContent = job.state;
      badge.className = "badge " + job.state;
      setText("attempt", String(job.attempt));
      setText("started", localTime(job.started_at));
      setText("finished", localTime(job.finished_at));
      setText("exit-code", job.exit_code == null ? "" : String(job.exit_code));
      setText("reason", job.failure_reason || "");
      setText("usage", usageText(job.usage));
      setText("cost", costText(job.cost));
      const outputs = document.getElementById("outputs");
      if (job.outputs && !outputs.querySelector("a")) {
        const link = document.createElement("a");
        link.className = "button";
        link.href = "/jobs/" + jobId + "/outputs";
        link.textContent = "Download outputs (" + humanSize(job.outputs.size) + ")";
        outputs.appendChild(link);
      }
      const cancel = document.getElementById("cancel");
      if (cancel && (FINAL.has(job.state) || job.cancel_requested)) cancel.remove();
    }

    const handle = follow(root.dataset.events, root.dataset.from, {
      state: showJob,
      attempt: () => {
        // A new attempt (the job was requeued) prints its output from the start.
        ["stdout", "stderr"].forEach((s) => { document.getElementById(s).textContent = ""; });
      },
      log: (chunk) => append(chunk.stream, chunk.text),
      end: (job) => {
        showJob(job);
        handle.close();
      },
    });
    return handle;
  }

  // ------------------------------------------------------- a user's jobs

  function cell(content) {
    const td = document.createElement("td");
    if (content) td.appendChild(content);
    return td;
  }

  function textNode(text) {
    return document.createTextNode(text);
  }

  function rowFor(job) {
    const tr = document.createElement("tr");
    tr.dataset.job = job.id;
    const name = document.createElement("td");
    const link = document.createElement("a");
    link.href = "/jobs/" + job.id;
    link.textContent = job.name;
    const id = document.createElement("small");
    id.className = "muted";
    id.textContent = job.id;
    name.append(link, document.createElement("br"), id);
    tr.append(name, cell(), cell(textNode(job.image)), cell(textNode(localTime(job.submitted_at))),
              cell(), cell(), cell());
    return tr;
  }

  function updateRow(tr, job) {
    tr.className = "state-" + job.state;
    const cells = tr.children;
    const badge = document.createElement("span");
    badge.className = "badge " + job.state;
    badge.textContent = job.state;
    cells[1].replaceChildren(badge);
    if (job.cancel_requested && job.state === "running") cells[1].append(" (cancelling)");
    cells[4].textContent = localTime(job.finished_at);
    cells[5].textContent = job.exit_code == null ? "" : String(job.exit_code);
    if (job.outputs && !cells[6].querySelector("a")) {
      const link = document.createElement("a");
      link.href = "/jobs/" + job.id + "/outputs";
      link.textContent = "outputs";
      cells[6].replaceChildren(link);
    }
  }

  function followJobs(table) {
    const newest = table.dataset.newest === "true";
    return follow(table.dataset.events, table.dataset.from, {
      job: (job) => {
        let tr = table.querySelector('tr[data-job="' + job.id + '"]');
        if (!tr) {
          // Only the first page shows new jobs; older pages keep their rows.
          if (!newest) return;
          tr = rowFor(job);
          table.querySelector("tr").after(tr);
          table.hidden = false;
          const none = document.getElementById("no-jobs");
          if (none) none.hidden = true;
        }
        updateRow(tr, job);
      },
    });
  }

  const job = document.getElementById("job");
  const jobs = document.getElementById("jobs");
  if (job && job.dataset.events) window.jobcloudLive = followJob(job);
  else if (jobs && jobs.dataset.events) window.jobcloudLive = followJobs(jobs);
})();
