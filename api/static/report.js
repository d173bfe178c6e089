// Enhancements of the report page's filter form. The form works without this
// file: it is an ordinary GET form with a submit button.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("filters");
  if (!form) {
    return;
  }

  // A selector or checkbox applies the filters as soon as it changes. A new
  // license resets the course, because the course list belongs to the license.
  form.addEventListener("change", (event) => {
    const control = event.target;
    if (!control.hasAttribute("data-auto-submit")) {
      return;
    }
    if (control.name === "license_id") {
      const course = form.elements.namedItem("course_id");
      if (course) {
        course.value = "";
      }
    }
    form.requestSubmit();
  });

  // Leave empty fields out of the address, so it stays short to share.
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const params = new URLSearchParams();
    for (const [name, value] of new FormData(form)) {
      if (value !== "") {
        params.append(name, value);
      }
    }
    const query = params.toString();
    window.location.assign(window.location.pathname + (query ? "?" + query : ""));
  });
});
