// genworker dashboard: keeps the "In flight" table current by polling /api/live.
// Plain DOM (textContent only: job data never becomes HTML); no build step.
(function () {
  "use strict";
  var root = document.querySelector("[data-live]");
  if (!root) return;
  var url = root.getAttribute("data-live");
  var every = parseInt(root.getAttribute("data-every"), 10) || 1500;
  var rows = root.querySelector("[data-live-rows]");
  var table = root.querySelector("[data-live-table]");
  var empty = root.querySelector("[data-live-empty]");
  var count = root.querySelector("[data-live-count]");
  var updated = root.querySelector("[data-live-updated]");
  var errorLine = root.querySelector("[data-live-error]");

  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.max(0, Number(s));
    if (s < 10) return s.toFixed(1) + " s";
    s = Math.floor(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + String(s % 60).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " m";
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    if (cls) td.className = cls;
    if (text !== null && text !== undefined) td.textContent = String(text);
    tr.appendChild(td);
    return td;
  }

  function link(href, text, cls) {
    var a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    if (cls) a.className = cls;
    return a;
  }

  function row(j) {
    var tr = document.createElement("tr");
    tr.id = "live-" + j.job_id;
    tr.setAttribute("data-progress", String(j.progress));
    if (j.stale) tr.className = "stale";
    var first = cell(tr, null);
    first.appendChild(link("/jobs/" + encodeURIComponent(j.job_id), j.job_id.slice(0, 8), "mono"));
    var type = document.createElement("span");
    type.className = "muted";
    type.textContent = " " + j.job_type;
    first.appendChild(type);
    cell(tr, j.chapter_id ? j.chapter_number + ". " + (j.title || "(untitled)") : "–");
    var bar = cell(tr, null, "bar");
    var p = document.createElement("progress");
    p.max = 100;
    p.value = j.progress;
    bar.appendChild(p);
    var pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = " " + j.progress + "%";
    bar.appendChild(pct);
    cell(tr, j.current_step || "", "step");
    cell(tr, j.worker_id || "", "mono small");
    cell(tr, j.attempt);
    cell(tr, duration(j.running_s));
    cell(tr, j.text_bytes === null ? "–" : j.text_bytes + " B");
    cell(tr, null).appendChild(link("/jobs/" + encodeURIComponent(j.job_id) + "/cancel", "cancel"));
    return tr;
  }

  function render(data) {
    var jobs = data.jobs || [];
    var fresh = document.createDocumentFragment();
    jobs.forEach(function (j) { fresh.appendChild(row(j)); });
    rows.replaceChildren(fresh);
    table.hidden = jobs.length === 0;
    empty.hidden = jobs.length !== 0;
    count.textContent = String(jobs.length);
    if (data.generated_at) {
      updated.textContent = "as of " + String(data.generated_at).replace("T", " ").slice(0, 19) + "Z";
    }
    errorLine.hidden = true;
    root.setAttribute("data-polls", String(Number(root.getAttribute("data-polls") || 0) + 1));
  }

  function tick() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(render)
      .catch(function (e) {
        errorLine.textContent = "live update failed (" + e.message + "); retrying";
        errorLine.hidden = false;
      })
      .then(function () { window.setTimeout(tick, every); });
  }
  window.setTimeout(tick, every);
})();
