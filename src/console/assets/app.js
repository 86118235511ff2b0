// Sagaflow console: the live parts of pages. An element with data-live="URL" follows the
// server-sent events at URL: each "html" event carries the part rendered again (escaped by the
// server) and replaces its content; "end" means nothing more will change. Focus, open
// <details> and the scroll position survive a swap. Everything else works without this script.
(function () {
  "use strict";
  var status = document.getElementById("live-status");
  var announcer = document.getElementById("announce");

  function say(text, state) {
    if (!status) return;
    status.textContent = text;
    status.setAttribute("data-state", state);
  }

  function keyOf(el) {
    if (!el) return null;
    return el.id ? "#" + el.id : el.getAttribute("href") ? "a" + el.getAttribute("href") : null;
  }

  function find(root, key) {
    if (!key) return null;
    if (key.charAt(0) === "#") return document.getElementById(key.slice(1));
    var links = root.querySelectorAll("a[href]");
    for (var i = 0; i < links.length; i++) {
      if ("a" + links[i].getAttribute("href") === key) return links[i];
    }
    return null;
  }

  function swap(root, html) {
    var active = document.activeElement;
    var key = active && root.contains(active) ? keyOf(active) : null;
    var open = [];
    root.querySelectorAll("details[id][open]").forEach(function (d) { open.push(d.id); });
    var x = window.scrollX, y = window.scrollY;
    root.innerHTML = html;
    open.forEach(function (id) {
      var d = document.getElementById(id);
      if (d) d.open = true;
    });
    var again = find(root, key);
    if (again) again.focus({ preventScroll: true });
    window.scrollTo(x, y);
    var said = root.querySelector("[data-announce]");
    if (said && announcer) {
      var text = said.getAttribute("data-announce");
      if (announcer.textContent !== text) announcer.textContent = text;
    }
  }

  function follow(root) {
    var url = root.getAttribute("data-live");
    if (!url || !window.EventSource) return;
    var source = new EventSource(url);
    source.onopen = function () { say("● live", "on"); };
    source.onerror = function () {
      say(source.readyState === 2 ? "offline" : "reconnecting…", "off");
    };
    source.addEventListener("html", function (e) {
      swap(root, e.data);
      root.setAttribute("data-updated", String(Date.now()));
      say("● live", "on");
    });
    source.addEventListener("end", function () {
      source.close();
      say("final", "done");
    });
  }

  document.querySelectorAll("[data-live]").forEach(follow);
})();
