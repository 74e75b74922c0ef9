// The code editor page: CodeMirror (editor.bundle.js, when built) over the
// form's text area, and the starter templates. The form itself is a plain
// multipart POST to /jobs, so it also works without this script.
(function () {
  "use strict";
  const textarea = document.getElementById("code");
  const editor = window.JobcloudEditor ? window.JobcloudEditor.mount(textarea) : null;
  const select = document.getElementById("template");
  const hint = document.getElementById("dataset-hint");

  function setCode(text) {
    if (editor) editor.setCode(text);
    else textarea.value = text;
  }

  function getCode() {
    return editor ? editor.getCode() : textarea.value;
  }

  // Code the user wrote is not thrown away without asking; an untouched template is.
  function edited() {
    const code = getCode();
    return code.trim() !== "" &&
      !Array.from(document.querySelectorAll("textarea[id^='template-']")).some((t) => t.value === code);
  }

  let chosen = select.value;
  select.addEventListener("change", () => {
    if (edited() && !window.confirm("Replace your code with this template?")) {
      select.value = chosen;
      return;
    }
    chosen = select.value;
    const option = select.selectedOptions[0];
    const source = document.getElementById("template-" + option.value);
    setCode(source ? source.value : "");
    if (option.dataset.image) document.getElementById("image").value = option.dataset.image;
    hint.hidden = !option.dataset.dataset;
    hint.textContent = option.dataset.dataset ? "This template needs a dataset: " + option.dataset.dataset + "." : "";
  });
  // A job's dataset is a zip; a CSV chosen here is wrapped into one (stored,
  // not compressed) so it arrives as $JOBCLOUD_DATA/<its name>.
  const datasetInput = document.getElementById("dataset");
  const run = document.getElementById("run");
  datasetInput.addEventListener("change", async () => {
    const file = datasetInput.files[0];
    if (!file || !/\.csv$/i.test(file.name)) return;
    run.disabled = true;  // until the zip replaces the CSV in the form
    try {
      const zipped = new File([zipOne(file.name, new Uint8Array(await file.arrayBuffer()))],
                              file.name.replace(/\.csv$/i, "") + ".zip", { type: "application/zip" });
      const transfer = new DataTransfer();
      transfer.items.add(zipped);
      datasetInput.files = transfer.files;
    } finally {
      run.disabled = false;
    }
  });

  // Run submits through the API (the session cookie plus the CSRF header), so a
  // refused job (too big, over a limit, a bad field) shows its reason here and
  // the code stays in the editor instead of being lost with the page.
  const form = document.getElementById("editor-form");
  const errorBox = document.getElementById("editor-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    textarea.value = getCode();
    const body = new FormData(form);
    const csrf = body.get("csrf_token");
    body.delete("csrf_token");
    errorBox.hidden = true;
    run.disabled = true;
    try {
      const answer = await fetch("/api/v1/jobs", {
        method: "POST", body, credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf, "Accept": "application/json" },
      });
      const job = await answer.json().catch(() => ({}));
      if (answer.status === 201 && job.id) {
        // A job array's answer (array or params) has counts: its page is the array's.
        window.location.assign((job.counts ? "/arrays/" : "/jobs/") + encodeURIComponent(job.id));
        return;
      }
      errorBox.textContent = job.detail || "The proxy refused the job (HTTP " + answer.status + ").";
    } catch (err) {
      errorBox.textContent = "Could not reach the proxy: " + err.message;
    }
    errorBox.hidden = false;
    run.disabled = false;
  });

  const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });

  function crc32(bytes) {
    let c = 0xffffffff;
    for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  // One file in a zip archive (PKWARE APPNOTE 4.3: local header, data,
  // central directory, end record); UTF-8 name, no compression.
  function zipOne(name, data) {
    const nameBytes = new TextEncoder().encode(name);
    const crc = crc32(data);
    const local = new DataView(new ArrayBuffer(30));
    const central = new DataView(new ArrayBuffer(46));
    const end = new DataView(new ArrayBuffer(22));
    local.setUint32(0, 0x04034b50, true);
    central.setUint32(0, 0x02014b50, true);
    central.setUint16(4, 20, true);
    for (const [view, at] of [[local, 4], [central, 6]]) {
      view.setUint16(at, 20, true);              // version needed: 2.0
      view.setUint16(at + 2, 0x0800, true);      // names are UTF-8
      view.setUint16(at + 4, 0, true);           // stored
      view.setUint16(at + 8, 0x21, true);        // 1980-01-01
      view.setUint32(at + 10, crc, true);
      view.setUint32(at + 14, data.length, true);
      view.setUint32(at + 18, data.length, true);
      view.setUint16(at + 22, nameBytes.length, true);
    }
    central.setUint32(42, 0, true);              // the local header is at offset 0
    const centralSize = 46 + nameBytes.length;
    const centralAt = 30 + nameBytes.length + data.length;
    end.setUint32(0, 0x06054b50, true);
    end.setUint16(8, 1, true);
    end.setUint16(10, 1, true);
    end.setUint32(12, centralSize, true);
    end.setUint32(16, centralAt, true);
    return new Blob([local, nameBytes, data, central, nameBytes, end]);
  }

  window.jobcloudEditor = { editor, setCode };
})();
