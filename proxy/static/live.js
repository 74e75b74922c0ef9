// Live pages: a job's page follows its state and output, a user's job list
// follows their jobs' states, both over Server-Sent Events (proxy/live.py).
//
// The server ends each stream after a while (it holds a server thread) and the
// browser reconnects by itself, sending the last event id it saw
// (Last-Event-ID); the server resumes after it, so nothing is appended twice.
// A first connection starts from the page's data-from: what it already shows.
// An answer other than a stream (a 503 while the store is down, a 502 or 504
// from a front proxy) makes the browser give up on an EventSource for good:
// then a new one is opened, 2 s later and twice as late each time up to 30 s.
//
// Times come as ISO strings in UTC (<time datetime>, the events' fields) and
// are all shown here in the browser's own time zone.
(function () {
  "use strict";

  const FINAL = new Set(["succeeded", "failed", "cancelled", "timed_out"]);
  const RETRY_FIRST_MS = 2000;
  const RETRY_MAX_MS = 30000;

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

  // Fills a <time> element (or makes one) from an ISO time; empty for none.
  function showTime(el, iso) {
    el.dateTime = iso || "";
    el.textContent = localTime(iso);
    return el;
  }

  function localTimes() {
    document.querySelectorAll("time[datetime]").forEach((el) => showTime(el, el.dateTime));
  }

  function setTime(id, iso) {
    const el = document.getElementById(id);
    if (el && el.dateTime !== (iso || "")) showTime(el, iso);
  }

  function showTruncated(truncated) {
    Object.keys(truncated || {}).forEach((stream) => {
      const el = document.getElementById(stream + "-truncated");
      if (el) el.hidden = !truncated[stream];
    });
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
    // accepted, the browser's own reconnections included; ended: an `end`
    // event came, nothing follows.
    const handle = { lastEventId: from, source: null, connections: 0, opens: 0, ended: false,
                     retryMs: RETRY_FIRST_MS, timer: null };
    handle.open = function () {
      handle.timer = null;
      const sep = url.indexOf("?") < 0 ? "?" : "&";
      const source = new EventSource(url + (handle.lastEventId ? sep + "from=" + encodeURIComponent(handle.lastEventId) : ""));
      handle.source = source;
      handle.connections += 1;
      source.addEventListener("open", () => {
        handle.opens += 1;
        handle.retryMs = RETRY_FIRST_MS;
        liveBadge("live");
      });
      source.addEventListener("end", () => { handle.ended = true; });
      source.addEventListener("error", () => {
        if (source.readyState !== EventSource.CLOSED) {
          liveBadge("reconnecting…");  // the browser retries by itself
        } else if (!handle.ended && source === handle.source) {
          liveBadge("reconnecting…");
          handle.timer = setTimeout(handle.open, handle.retryMs);
          handle.retryMs = Math.min(handle.retryMs * 2, RETRY_MAX_MS);
        }
      });
      Object.keys(handlers).forEach((name) => {
        source.addEventListener(name, (event) => {
          if (event.lastEventId) handle.lastEventId = event.lastEventId;
          handlers[name](JSON.parse(event.data), event);
        });
      });
    };
    handle.close = function () {
      clearTimeout(handle.timer);
      handle.timer = null;
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

    function showWarnings(warnings) {
      const list = document.getElementById("warnings");
      if (!list) return;
      list.replaceChildren(...warnings.map((text) => {
        const item = document.createElement("li");
        item.textContent = text;
        return item;
      }));
      list.hidden = warnings.length === 0;
    }

    // Why a queued job waits and its estimated start (proxy/waiting.py); empty once it runs.
    function showWaiting(waiting) {
      const box = document.getElementById("waiting");
      if (!box) return;
      box.dataset.reason = waiting ? waiting.reason : "";
      setText("waiting-detail", waiting ? waiting.detail : "");
      const estimate = waiting && waiting.estimate;
      document.getElementById("waiting-estimate").hidden = !estimate;
      setTime("waiting-earliest", estimate ? estimate.earliest : "");
      setTime("waiting-latest", estimate ? estimate.latest : "");
      setText("waiting-basis", estimate ? "(" + estimate.basis + ")" : "");
    }

    function showJob(job) {
      const badge = document.getElementById("state");
      badge.textContent = job.state;
      badge.className = "badge " + job.state;
      setText("attempt", String(job.attempt));
      setTime("started", job.started_at);
      setTime("finished", job.finished_at);
      setText("exit-code", job.exit_code == null ? "" : String(job.exit_code));
      setText("reason", job.failure_reason || "");
      showWaiting(job.waiting);
      setText("usage", usageText(job.usage));
      setText("cost", costText(job.cost));
      showTruncated(job.truncated);
      showWarnings(job.warnings || []);
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
      log: (chunk) => {
        append(chunk.stream, chunk.text);
        showTruncated({ [chunk.stream]: chunk.truncated });
      },
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
    tr.append(name, cell(), cell(textNode(job.image)),
              cell(showTime(document.createElement("time"), job.submitted_at)),
              cell(document.createElement("time")), cell(), cell());
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
    const finished = cells[4].querySelector("time");
    if (finished) showTime(finished, job.finished_at);
    cells[5].textContent = job.exit_code == null ? "" : String(job.exit_code);
    if (job.outputs && !cells[6].querySelector("a")) {
      const link = document.createElement("a");
      link.href = "/jobs/" + job.id + "/outputs";
      link.textContent = "outputs";
      cells[6].replaceChildren(link);
    }
  }

  // A row for a job submitted since the page was made, in id order (ids are
  // time-ordered): only on the first page, and only above its newest row. Any
  // other job the page does not show (an older active one, another page's)
  // gets no row.
  function addRow(table, job) {
    const rows = Array.from(table.querySelectorAll("tr[data-job]"));
    if (table.dataset.newest !== "true" || !job.new ||
        job.id < table.dataset.top) return null;
    const tr = rowFor(job);
    const below = rows.find((row) => row.dataset.job < job.id);
    if (below) below.before(tr);
    else table.querySelector("tr").after(tr);
    table.hidden = false;
    const none = document.getElementById("no-jobs");
    if (none) none.hidden = true;
    return tr;
  }

  function followJobs(table) {
    // The newest job the page was made with: older unknown ones never get a row.
    const first = table.querySelector("tr[data-job]");
    table.dataset.top = first ? first.dataset.job : "";
    return follow(table.dataset.events, table.dataset.from, {
      job: (job) => {
        const tr = table.querySelector('tr[data-job="' + job.id + '"]') || addRow(table, job);
        if (tr) updateRow(tr, job);
      },
    });
  }

  localTimes();
  const job = document.getElementById("job");
  const jobs = document.getElementById("jobs");
  if (job && job.dataset.events) window.jobcloudLive = followJob(job);
  else if (jobs && jobs.dataset.events) window.jobcloudLive = followJobs(jobs);
})();
