// One feature (feature.html#ID): its statistics, activation histogram, nearest features by
// decoder cosine and top-activating contexts, each token shaded by the feature's activation.
// The data sit in script files (data/features_NNNNN.js), which load from file:// where fetch() cannot.
(function () {
  "use strict";
  var index = window.FASTSAE_INDEX;
  var cols = index.features;
  var position = {};
  cols.id.forEach(function (id, i) { position[id] = i; });
  window.FASTSAE_SHARDS = window.FASTSAE_SHARDS || {};

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) { return v === 0 ? "0" : v.toPrecision(3); }

  function loadShard(shard, done) {
    if (window.FASTSAE_SHARDS[shard]) return done();
    var s = document.createElement("script");
    s.src = "data/features_" + String(shard).padStart(5, "0") + ".js";
    s.onload = done;
    s.onerror = function () { showError("could not load " + s.src); };
    document.head.appendChild(s);
  }

  function showError(text) {
    var main = document.getElementById("feature");
    main.textContent = "";
    main.appendChild(el("p", "empty", text));
  }

  function histogram(h, maxValue) {
    var NS = "http://www.w3.org/2000/svg";
    var W = 640, H = 150, pad = 26;
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 " + W + " " + (H + pad));
    svg.setAttribute("width", W);
    svg.setAttribute("class", "hist");
    var top = Math.max.apply(null, h.counts), bw = (W - 20) / h.counts.length;
    h.counts.forEach(function (c, i) {
      var r = document.createElementNS(NS, "rect");
      var height = c ? Math.max(1, (H - 10) * c / top) : 0;
      r.setAttribute("x", 10 + i * bw); r.setAttribute("width", Math.max(1, bw - 1));
      r.setAttribute("y", H - height); r.setAttribute("height", height);
      var t = document.createElementNS(NS, "title");
      t.textContent = fmt(i * h.width) + " to " + fmt((i + 1) * h.width) + ": " + c + " tokens";
      r.appendChild(t);
      svg.appendChild(r);
    });
    [[0, "0"], [W - 10, fmt(h.counts.length * h.width)]].forEach(function (p, j) {
      var t = document.createElementNS(NS, "text");
      t.setAttribute("x", p[0] + (j ? -4 : 10)); t.setAttribute("y", H + 16);
      t.setAttribute("text-anchor", j ? "end" : "start");
      t.textContent = p[1];
      svg.appendChild(t);
    });
    return svg;
  }

  function render(id) {
    var i = position[id];
    if (i === undefined) return showError("feature " + id + " is not in this SAE");
    if (!cols.page[i]) return showError("feature " + id + " has no page in this site (see --features)");
    loadShard(Math.floor(id / index.shard_size), function () {
      var shard = window.FASTSAE_SHARDS[Math.floor(id / index.shard_size)];
      var f = shard.features[id];
      var main = document.getElementById("feature");
      main.textContent = "";
      document.title = "feature " + id + " | " + index.meta.title;

      var nav = el("div", "nav");
      var back = el("a", "", "all features"); back.href = "index.html"; nav.appendChild(back);
      if (position[id - 1] !== undefined && cols.page[position[id - 1]]) {
        var prev = el("a", "", "< #" + (id - 1)); prev.href = "#" + (id - 1); nav.appendChild(prev);
      }
      if (position[id + 1] !== undefined && cols.page[position[id + 1]]) {
        var next = el("a", "", "#" + (id + 1) + " >"); next.href = "#" + (id + 1); nav.appendChild(next);
      }
      main.appendChild(nav);
      main.appendChild(el("h1", "", "Feature " + id));
      main.appendChild(el("p", "meta", index.meta.summary));

      var stats = el("div", "stats");
      [["density", cols.density[i] === 0 ? "0" : (100 * cols.density[i]).toPrecision(3) + "%"],
       ["fired on", f.count + " tokens"], ["max activation", fmt(cols.max[i])],
       ["mean activation", fmt(cols.mean[i])]].forEach(function (p) {
        var d = el("div"); d.appendChild(el("span", "", p[0])); d.appendChild(el("b", "", p[1])); stats.appendChild(d);
      });
      main.appendChild(stats);

      main.appendChild(el("h2", "", "Activation histogram (tokens where it fired)"));
      if (f.hist.counts.length) main.appendChild(histogram(f.hist, cols.max[i]));
      else main.appendChild(el("p", "empty", "never fired on the tokens scanned"));

      main.appendChild(el("h2", "", "Nearest features by decoder cosine"));
      var nb = el("div", "neighbours");
      f.neighbours.forEach(function (p) {
        var a = el("a", "", "#" + p[0] + " (" + p[1].toFixed(3) + ")");
        a.href = "#" + p[0];
        nb.appendChild(a);
      });
      main.appendChild(nb);

      main.appendChild(el("h2", "", "Top activating contexts"));
      main.appendChild(el("p", "legend", "shade: this feature's activation on each token (relative to its maximum); outlined: the token of the example; hover for values"));
      var list = el("ol", "contexts");
      var peak = cols.max[i] || 1;
      f.contexts.forEach(function (c) {
        var li = el("li", "context");
        li.appendChild(el("span", "value", fmt(c.v)));
        var text = el("span", "text");
        c.t.forEach(function (tok, j) {
          var a = c.a[j], word = shard.tokens[tok], lead = word.match(/^\s*/)[0];
          // The space before a word stays outside its shading.
          if (lead) text.appendChild(document.createTextNode(lead));
          var s = el("span", "t" + (j === c.h ? " max" : ""), word.slice(lead.length) || word);
          if (a !== null && a > 0) s.style.backgroundColor = "rgba(234, 88, 12, " + Math.min(1, 0.1 + 0.9 * a / peak).toFixed(3) + ")";
          s.title = "token " + JSON.stringify(word.trim()) + ": " + (a === null ? "?" : fmt(a));
          text.appendChild(s);
        });
        li.appendChild(text);
        list.appendChild(li);
      });
      if (!f.contexts.length) list.appendChild(el("li", "empty", "no contexts: the feature never fired"));
      main.appendChild(list);
    });
  }

  function route() {
    var id = parseInt(location.hash.slice(1), 10);
    if (isNaN(id)) return showError("no feature chosen: open feature.html#ID");
    render(id);
    window.scrollTo(0, 0);
  }
  window.addEventListener("hashchange", route);
  route();
})();
