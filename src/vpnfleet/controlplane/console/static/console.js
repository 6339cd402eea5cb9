// vpnfleet console: the only script the pages load (the CSP allows no other, and no inline
// script). Every page works without it; it adds confirmations before destructive actions.
"use strict";
document.addEventListener("submit", (event) => {
  const form = event.target;
  const button = event.submitter instanceof HTMLElement ? event.submitter : null;
  const question =
    (button && button.dataset.confirmButton) ||
    (form instanceof HTMLFormElement ? form.dataset.confirm : undefined);
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
document.addEventListener("click", (event) => {
  const link = event.target instanceof Element ? event.target.closest("a[data-back]") : null;
  if (link && window.history.length > 1) {
    event.preventDefault();
    window.history.back();
  }
});
