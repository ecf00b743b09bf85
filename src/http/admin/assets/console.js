// Tally admin console: conveniences only; every page works without this file.
// Served from /admin/assets/console.js (the CSP allows scripts from this origin only).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Filters apply as soon as a select or checkbox changes.
  for (const el of document.querySelectorAll("[data-autosubmit]")) {
    el.addEventListener("change", () => el.form && el.form.requestSubmit());
  }
  // A form sends once: its button is disabled after the first submit (the server applies a
  // resubmitted action once anyway, by its idempotency key).
  for (const form of document.querySelectorAll("form[method=post]")) {
    form.addEventListener("submit", () => {
      for (const b of form.querySelectorAll("button[type=submit]")) {
        setTimeout(() => { b.disabled = true; }, 0);
      }
    });
  }
});
