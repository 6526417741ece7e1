/* dsv3_ref book: a box that scrolls sideways (a wide code cell, an output line, a table) gets the class
   "dsv3-scrolls" while it has hidden content, and "dsv3-scrolled-end" once the reader has scrolled to its end.
   book.css draws the cue: a shadow on the side that hides more, and a scrollbar that stays visible. */
(function () {
  function mark(el) {
    const hidden = el.scrollWidth > el.clientWidth + 1;
    el.classList.toggle("dsv3-scrolls", hidden);
    el.classList.toggle("dsv3-scrolled-end", hidden && el.scrollLeft + el.clientWidth >= el.scrollWidth - 1);
    if (hidden) el.setAttribute("title", "scroll sideways for more");
  }
  function scan() {
    const root = document.querySelector("article") || document.body;
    for (const el of root.querySelectorAll("pre, .pst-scrollable-table-container, .table-wrapper, .output, div.highlight")) {
      const x = getComputedStyle(el).overflowX;
      if (x !== "auto" && x !== "scroll") continue;
      mark(el);
      if (!el.dataset.dsv3Cue) {
        el.dataset.dsv3Cue = "1";
        el.addEventListener("scroll", () => mark(el), {passive: true});
      }
    }
  }
  window.addEventListener("load", scan);
  window.addEventListener("resize", scan);
  document.addEventListener("DOMContentLoaded", scan);
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) MathJax.startup.promise.then(scan);
})();
