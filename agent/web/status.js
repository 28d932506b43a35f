// edge-agent status page: refreshes the server-rendered numbers in place from /v1/status.
// Every live value carries its JSON path (data-k) and format (data-f); values are set
// with textContent only (never HTML). A change of shape (a source or a part appears or
// goes) reloads the page, which the server renders anew. Formats match agent/statuspage.py.
"use strict";
(function () {
  var period = (Number(document.body.dataset.refresh) || 5) * 1000;
  var meta = document.querySelector('meta[http-equiv="refresh"]');
  if (meta) meta.remove(); // the script refreshes; the meta refresh is for no-JS browsers
  var previous = null;

  function get(data, path) {
    for (var i = 0; i < path.length; i++) {
      if (data === null || typeof data !== "object") return null;
      data = data[path[i]];
    }
    return data === undefined ? null : data;
  }
  function duration(seconds) {
    var rest = Math.max(0, Math.floor(seconds)), parts = [];
    var units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
    for (var i = 0; i < units.length && parts.length < 2; i++) {
      var u = units[i];
      if (rest >= u[1] || (u[0] === "s" && parts.length === 0)) {
        parts.push(Math.floor(rest / u[1]) + u[0]);
        rest %= u[1];
      }
    }
    return parts.join("");
  }
  function bytes(n) {
    var units = ["B", "KiB", "MiB", "GiB"], size = n;
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(size) < 1024 || units[i] === "GiB")
        return i === 0 ? size.toFixed(0) + " B" : size.toFixed(1) + " " + units[i];
      size /= 1024;
    }
  }
  function epoch(v) {
    if (typeof v === "number") return v;
    var t = Date.parse(v);
    return isNaN(t) ? null : t / 1000;
  }
  function fmt(v, f, now) {
    if (v === null || v === "") return "-";
    if (f === "int" && typeof v === "number") return Math.trunc(v).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    if (f === "bytes" && typeof v === "number") return bytes(Math.trunc(v));
    if (f === "dur" && typeof v === "number") return duration(v);
    if (f === "ago" || f === "in") {
      var at = epoch(v);
      if (at === null) return "-";
      return f === "ago" ? duration(now - at) + " ago" : "in " + duration(at - now);
    }
    return String(v);
  }
  function shape(s) {
    var names = Object.keys(s.sources || {}).sort(), out = [];
    names.forEach(function (n) {
      var st = s.sources[n], keys = {};
      ["parts", "devices", "entities", "subscriptions"].forEach(function (g) {
        if (st[g] && typeof st[g] === "object") Object.keys(st[g]).forEach(function (k) { keys[k] = 1; });
      });
      out.push(n + ":" + Object.keys(keys).sort().join(","));
    });
    return out.join(";");
  }
  function spark(el, values) {
    var top = Math.max.apply(null, [1].concat(values)), n = Math.max(1, values.length - 1);
    el.setAttribute("points", values.map(function (v, i) {
      return (i * 300 / n).toFixed(1) + "," + (40 - v * 38 / top).toFixed(1);
    }).join(" "));
  }
  function list(el, items, cls) {
    items.forEach(function (t) {
      var li = document.createElement("li");
      li.className = cls;
      li.textContent = t;
      el.appendChild(li);
    });
  }
  function apply(s) {
    if (shape(s) !== document.body.dataset.shape) { location.reload(); return; }
    var now = Date.now() / 1000;
    document.querySelectorAll("[data-k]").forEach(function (el) {
      el.textContent = fmt(get(s, JSON.parse(el.dataset.k)), el.dataset.f, now);
    });
    document.querySelectorAll("[data-s]").forEach(function (el) {
      var st = String(get(s, JSON.parse(el.dataset.s)) || "-");
      el.textContent = st;
      el.className = "badge st-" + st;
    });
    var flow = s.flow || {};
    document.querySelectorAll("[data-spark]").forEach(function (el) {
      spark(el, flow[el.dataset.spark] || []);
    });
    document.querySelectorAll("[data-spark-last]").forEach(function (el) {
      var v = flow[el.dataset.sparkLast] || [0];
      el.textContent = fmt(v[v.length - 1], "int", now);
    });
    document.querySelectorAll("[data-rate]").forEach(function (el) {
      var path = JSON.parse(el.dataset.rate), v = get(s, path);
      var was = previous && get(previous.s, path);
      if (typeof v === "number" && typeof was === "number" && now > previous.at)
        el.textContent = (((v - was) * 60) / (now - previous.at)).toFixed(1);
    });
    previous = { s: s, at: now };
    var r = s.readiness || {}, ready = document.getElementById("ready");
    ready.textContent = r.ready ? "READY" : "NOT READY";
    ready.className = "ready " + (r.ready ? "yes" : "no");
    var ul = document.getElementById("readiness");
    while (ul.firstChild) ul.removeChild(ul.firstChild);
    list(ul, r.reasons || [], "reason");
    list(ul, r.warnings || [], "warning");
    document.getElementById("refreshed").textContent = "refreshed " + new Date().toLocaleTimeString();
    document.body.dataset.refreshed = String(now);
  }
  function refresh() {
    fetch("/v1/status", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (r.status === 401 || r.status === 403) { location.reload(); throw new Error("signed out"); }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(apply)
      .catch(function (e) {
        document.getElementById("refreshed").textContent = "agent not answering (" + e.message + ")";
        document.body.dataset.stale = "1";
      })
      .finally(function () { setTimeout(refresh, period); });
  }
  refresh();
})();
