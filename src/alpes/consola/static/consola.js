/* The console's few lines of JavaScript: progressive enhancement only, every page works without it.
   - copy buttons:  <button type="button" data-copy="ELEMENT_ID">Copy</button> copies that element's
                    value or text (macros.html copyable()); data-copy-text="literal text" copies the text;
   - charts:        <canvas data-chart="JSON_SCRIPT_ID" [data-refresh="URL"]> (templates/charts.html);
   - live stream:   <ol data-stream="URL" [data-stream-status="ELEMENT_ID"]> (live.py) puts each server-sent
                    `evento` (JSON: seq, topic, event_type, aggregate_id, correlation_id, occurred_at,
                    actor_role, schema_version) at the top as a list item, text only (never HTML from
                    the server); `fin` (the key was refused) closes the stream and says why.
   Nothing here evaluates server data as code. */
(function () {
  "use strict";

  var PALETTE = ["#0b5cad", "#c2410c", "#1d6b36", "#7e22ce", "#a4161a", "#0e7490", "#854d0e"];
  var REFRESH_MS = 4000;
  var MAX_STREAM_ITEMS = 200;

  function announce(button, text) {
    var original = button.getAttribute("data-label") || button.textContent;
    button.setAttribute("data-label", original);
    button.textContent = text;
    window.setTimeout(function () { button.textContent = original; }, 2000);
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    return new Promise(function (resolve, reject) {
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.style.position = "absolute";
      area.style.left = "-9999px";
      document.body.appendChild(area);
      area.select();
      var done = false;
      try { done = document.execCommand("copy"); } catch (e) { done = false; }
      document.body.removeChild(area);
      if (done) { resolve(); } else { reject(new Error("copy refused")); }
    });
  }

  function initCopyButtons(root) {
    root.querySelectorAll("[data-copy],[data-copy-text]").forEach(function (button) {
      if (button.dataset.copyReady) { return; }
      button.dataset.copyReady = "1";
      button.hidden = false;
      button.addEventListener("click", function () {
        var text = button.getAttribute("data-copy-text");
        if (text === null) {
          var target = document.getElementById(button.getAttribute("data-copy"));
          if (!target) { return; }
          text = typeof target.value === "string" ? target.value : target.textContent;
        }
        copyText(text.trim()).then(function () { announce(button, "Copied"); },
                                   function () { announce(button, "Press Ctrl+C to copy"); });
      });
    });
  }

  function toNumber(value) {
    if (value === null || value === undefined || value === "") { return null; }
    var n = Number(value);
    return isFinite(n) ? n : null;
  }

  function datasets(type, series) {
    return series.map(function (s, i) {
      var colour = PALETTE[i % PALETTE.length];
      return { label: s.label, data: s.data.map(toNumber), borderColor: colour,
               backgroundColor: type === "bar" ? colour : colour + "33", borderWidth: 2,
               pointRadius: 3, tension: 0.2, spanGaps: true };
    });
  }

  // Counts get whole-number ticks (no "0.2 clicks"); money and rates keep their decimals.
  function wholeNumbers(series) {
    return series.every(function (s) {
      return s.data.every(function (v) { return v === null || typeof v === "number" && Math.floor(v) === v; });
    });
  }

  function fillTable(canvas, labels, series) {
    var table = document.getElementById(canvas.id + "-table");
    if (!table || !table.tBodies.length) { return; }
    var body = table.tBodies[0];
    while (body.firstChild) { body.removeChild(body.firstChild); }
    if (!labels.length) {
      var empty = body.insertRow();
      var cell = empty.insertCell();
      cell.colSpan = series.length + 1;
      cell.textContent = "No figures for this period yet.";
      return;
    }
    labels.forEach(function (label, i) {
      var row = body.insertRow();
      var th = document.createElement("th");
      th.scope = "row";
      th.textContent = label;
      row.appendChild(th);
      series.forEach(function (s) {
        var td = row.insertCell();
        td.className = "num";
        var v = s.data[i];
        td.textContent = v === null || v === undefined ? "—" : String(v);
      });
    });
  }

  function drawChart(canvas) {
    if (canvas.dataset.chartReady || !window.Chart) { return; }
    var source = document.getElementById(canvas.getAttribute("data-chart"));
    if (!source) { return; }
    var spec = JSON.parse(source.textContent);
    canvas.dataset.chartReady = "1";
    var chart = new window.Chart(canvas, {
      type: spec.type === "bar" ? "bar" : "line",
      data: { labels: spec.labels, datasets: datasets(spec.type, spec.series) },
      options: { responsive: true, maintainAspectRatio: false, animation: false,
                 interaction: { mode: "index", intersect: false },
                 scales: { y: { beginAtZero: true, ticks: { precision: wholeNumbers(spec.series) ? 0 : undefined } } },
                 plugins: { legend: { position: "bottom" } } }
    });
    var url = canvas.getAttribute("data-refresh");
    if (url) { follow(canvas, chart, spec.type, url); }
  }

  function follow(canvas, chart, type, url) {
    var busy = false;
    window.setInterval(function () {
      if (busy || document.hidden) { return; }
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (answer) {
          var spec = answer && answer.charts && answer.charts[canvas.id];
          if (!spec) { return; }
          chart.data.labels = spec.labels;
          chart.data.datasets = datasets(type, spec.series);
          chart.update();
          fillTable(canvas, spec.labels, spec.series);
          canvas.dispatchEvent(new CustomEvent("consola:chart-updated", { bubbles: true }));
        })
        .catch(function () { /* offline for a moment: the next tick tries again */ })
        .then(function () { busy = false; });
    }, REFRESH_MS);
  }

  function initCharts(root) {
    root.querySelectorAll("canvas[data-chart]").forEach(drawChart);
  }

  function streamItem(event) {
    var item = document.createElement("li");
    var when = document.createElement("time");
    when.dateTime = event.occurred_at || "";
    when.textContent = (event.occurred_at || "").replace("T", " ").slice(0, 19);
    item.appendChild(when);
    var parts = [event.topic, event.event_type, event.aggregate_id && "id " + event.aggregate_id,
                 event.correlation_id && "correlation " + event.correlation_id,
                 event.actor_role && "by " + event.actor_role].filter(Boolean);
    var text = document.createElement("span");
    text.textContent = " " + parts.join(" · ");
    item.appendChild(text);
    item.dataset.eventType = event.event_type || "";
    item.dataset.topic = event.topic || "";
    return item;
  }

  function initStreams(root) {
    if (!window.EventSource) { return; }
    root.querySelectorAll("[data-stream]").forEach(function (list) {
      if (list.dataset.streamReady) { return; }
      list.dataset.streamReady = "1";
      var status = document.getElementById(list.getAttribute("data-stream-status"));
      var say = function (text) { if (status) { status.textContent = text; } };
      var source = new EventSource(list.getAttribute("data-stream"));
      source.onopen = function () { say("Connected: new events appear at the top."); };
      source.onerror = function () {
        if (source.readyState !== EventSource.CLOSED) { say("Connection lost; reconnecting…"); }
      };
      source.addEventListener("evento", function (message) {
        var event;
        try { event = JSON.parse(message.data); } catch (e) { return; }
        var empty = list.querySelector("[data-empty]");
        if (empty) { empty.remove(); }
        list.insertBefore(streamItem(event), list.firstChild);
        while (list.children.length > MAX_STREAM_ITEMS) { list.removeChild(list.lastChild); }
        list.dispatchEvent(new CustomEvent("consola:event", { bubbles: true, detail: event }));
      });
      source.addEventListener("fin", function (message) {
        source.close();
        var reason = "";
        try { reason = JSON.parse(message.data).reason || ""; } catch (e) { reason = ""; }
        say("Stream ended" + (reason ? ": " + reason : "") + ". Reload the page to start again.");
      });
      window.addEventListener("pagehide", function () { source.close(); });
    });
  }

  function init() {
    initCopyButtons(document);
    initCharts(document);
    initStreams(document);
  }

  // Deferred scripts (this one and chart.umd.min.js) all run before DOMContentLoaded; "load" catches
  // a chart library that arrived later. Each initialiser skips what it already did.
  if (document.readyState === "complete") {
    init();
  } else {
    document.addEventListener("DOMContentLoaded", init);
    window.addEventListener("load", function () { initCharts(document); });
  }
}());
