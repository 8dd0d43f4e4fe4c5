// The console's only script (served from this file: the Content-Security-Policy allows no
// inline script). Pages work without it; it adds conveniences only.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // The queue's "select all" box.
  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      for (const box of document.querySelectorAll("form.queue input[name=id]")) {
        box.checked = all.checked;
      }
    });
  }
  // "/" focuses the search box, as in mail clients.
  const q = document.getElementById("q");
  if (q) {
    document.addEventListener("keydown", (e) => {
      if (e.key === "/" && document.activeElement !== q) {
        e.preventDefault();
        q.focus();
      }
    });
  }
  // Deleting from the queue is for good: ask first.
  for (const b of document.querySelectorAll("button.danger")) {
    b.addEventListener("click", (e) => {
      if (!window.confirm("Delete the selected messages for good?")) e.preventDefault();
    });
  }
});
