// Live pages (body[data-refresh]) fetch themselves every few seconds and swap <main>,
// unless the reader is busy with it. The toggle is remembered in localStorage.
(function () {
  "use strict";
  var seconds = Number(document.body.dataset.refresh || 0);
  var toggle = document.getElementById("live-toggle");
  if (!seconds || !toggle) return;
  var key = "tasklet-dashboard-live";
  var live = localStorage.getItem(key) !== "off";

  function show() {
    toggle.setAttribute("aria-pressed", live ? "true" : "false");
    toggle.textContent = live ? "Live" : "Paused";
  }
  toggle.addEventListener("click", function () {
    live = !live;
    localStorage.setItem(key, live ? "on" : "off");
    show();
  });
  show();

  function busy(main) {
    return document.hidden || main.contains(document.activeElement) && document.activeElement !== document.body
      || main.querySelector("details[open]") !== null;
  }

  function refresh() {
    var main = document.getElementById("main");
    if (!live || busy(main)) return schedule();
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var next = new DOMParser().parseFromString(html, "text/html");
        var fresh = next.getElementById("main");
        if (fresh) main.replaceWith(document.importNode(fresh, true));
        if (!next.body.dataset.refresh) { seconds = 0; toggle.hidden = true; }
      })
      .catch(function () { /* the next tick tries again */ })
      .then(schedule);
  }

  function schedule() {
    if (seconds) setTimeout(refresh, seconds * 1000);
  }
  schedule();
})();
