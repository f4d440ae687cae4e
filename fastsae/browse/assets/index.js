// The index: every feature with its density, maximum and mean activation and top tokens;
// sortable by clicking a column header, filtered by the search box (over the top tokens).
(function () {
  "use strict";
  var data = window.FASTSAE_INDEX;
  var cols = data.features;
  var n = cols.id.length;
  var PAGE = 200;
  var state = { key: "density", descending: true, query: "", hideDead: true, shown: PAGE };

  function fmtDensity(d) { return d === 0 ? "0" : (100 * d).toPrecision(3) + "%"; }
  function fmtValue(v) { return v === 0 ? "0" : v.toPrecision(3); }

  document.title = "fastsae features: " + data.meta.title;
  document.getElementById("title").textContent = "fastsae features: " + data.meta.title;
  document.getElementById("meta").textContent = data.meta.summary;

  // The SAE's `fastsae eval` metrics, when the site was built with them.
  (function showMetrics() {
    var m = data.meta.metrics || {}, table = document.getElementById("metrics");
    var names = Object.keys(m);
    if (!table || names.length === 0) return;
    var caption = document.createElement("caption");
    caption.textContent = "fastsae eval metrics" + (m.n_tokens ? " (" + m.n_tokens + " tokens)" : "");
    table.appendChild(caption);
    names.forEach(function (name) {
      var tr = document.createElement("tr"), th = document.createElement("th"), td = document.createElement("td");
      var v = m[name];
      th.textContent = name;
      td.textContent = Number.isInteger(v) ? String(v) : (v === null ? "n/a" : Number(v).toPrecision(4));
      tr.appendChild(th); tr.appendChild(td); table.appendChild(tr);
    });
    table.hidden = false;
  })();

  function order() {
    var q = state.query.trim().toLowerCase();
    var rows = [];
    for (var i = 0; i < n; i++) {
      if (state.hideDead && cols.density[i] === 0) continue;
      if (q) {
        var hit = false, toks = cols.tokens[i];
        for (var j = 0; j < toks.length && !hit; j++) hit = toks[j].toLowerCase().indexOf(q) >= 0;
        if (!hit) continue;
      }
      rows.push(i);
    }
    var key = cols[state.key], sign = state.descending ? -1 : 1;
    rows.sort(function (a, b) { return sign * (key[a] - key[b]) || cols.id[a] - cols.id[b]; });
    return rows;
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function render() {
    var rows = order();
    var body = document.querySelector("#features tbody");
    body.textContent = "";
    var frag = document.createDocumentFragment();
    rows.slice(0, state.shown).forEach(function (i) {
      var tr = document.createElement("tr");
      tr.className = "feature" + (cols.density[i] === 0 ? " dead" : "");
      tr.dataset.feature = cols.id[i];
      var td = document.createElement("td");
      if (cols.page[i]) {
        var a = document.createElement("a");
        a.href = "feature.html#" + cols.id[i];
        a.textContent = "#" + cols.id[i];
        td.appendChild(a);
      } else {
        td.textContent = "#" + cols.id[i];
      }
      tr.appendChild(td);
      cell(tr, fmtDensity(cols.density[i]), "num");
      cell(tr, fmtValue(cols.max[i]), "num");
      cell(tr, fmtValue(cols.mean[i]), "num");
      var toks = cell(tr, "", "tokens");
      cols.tokens[i].forEach(function (t) {
        var s = document.createElement("span");
        s.className = "tok";
        s.textContent = t;
        toks.appendChild(s);
      });
      frag.appendChild(tr);
    });
    body.appendChild(frag);
    document.getElementById("count").textContent =
      Math.min(state.shown, rows.length) + " of " + rows.length + " features shown (" + n + " in the SAE)";
    document.getElementById("more").hidden = rows.length <= state.shown;
    document.querySelectorAll("th.sortable").forEach(function (th) {
      if (th.dataset.key === state.key) th.setAttribute("aria-sort", state.descending ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
  }

  document.querySelectorAll("th.sortable").forEach(function (th) {
    th.addEventListener("click", function () {
      if (state.key === th.dataset.key) state.descending = !state.descending;
      else { state.key = th.dataset.key; state.descending = th.dataset.key !== "id"; }
      render();
    });
  });
  document.getElementById("search").addEventListener("input", function (e) {
    state.query = e.target.value; state.shown = PAGE; render();
  });
  document.getElementById("hide-dead").addEventListener("change", function (e) {
    state.hideDead = e.target.checked; render();
  });
  document.getElementById("more").addEventListener("click", function () { state.shown += 10 * PAGE; render(); });
  render();
})();
