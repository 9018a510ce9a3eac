/* nginx-meter portal: the sign-up form (index.html) and the usage page
 * (usage.html).  Plain DOM and SVG, no framework, nothing from a CDN.  The
 * API key lives in this page's memory only: never in storage or the URL. */
(function () {
  "use strict";

  document.documentElement.className =
    document.documentElement.className.replace("no-js", "js");

  function $(id) { return document.getElementById(id); }

  function text(el, s) { el.textContent = s; return el; }

  function el(tag, attrs, content) {
    var e = document.createElement(tag), k;
    for (k in attrs || {}) { e.setAttribute(k, attrs[k]); }
    if (content !== undefined) { e.textContent = content; }
    return e;
  }

  var SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs) {
    var e = document.createElementNS(SVG, tag), k;
    for (k in attrs) { e.setAttribute(k, attrs[k]); }
    return e;
  }

  /* a problem+json refusal (RFC 9457) or whatever else came back */
  function problem(resp) {
    return resp.text().then(function (body) {
      var p;
      try { p = JSON.parse(body); } catch (e) { p = null; }
      if (p && p.detail) { return p.detail; }
      if (resp.status === 429 || resp.status === 503) {
        return "Too many requests right now; try again in a minute.";
      }
      return "The server answered " + resp.status + ".";
    });
  }

  function showError(msg) {
    var e = $("error");
    text(e, msg);
    e.hidden = false;
  }

  function clearError() { $("error").hidden = true; }

  /* ------------------------------------------------------------ sign-up */

  function signup() {
    var form = $("signup");

    form.addEventListener("submit", function (ev) {
      var email = $("email"), body, headers, button = $("submit");

      ev.preventDefault();
      clearError();

      if (!email.value || email.value.indexOf("@") < 1) {
        showError("Enter your email address.");
        email.setAttribute("aria-invalid", "true");
        email.focus();
        return;
      }

      email.removeAttribute("aria-invalid");
      body = { email: email.value.trim() };
      if ($("first_name").value) { body.first_name = $("first_name").value; }
      if ($("last_name").value) { body.last_name = $("last_name").value; }
      headers = { "Content-Type": "application/json" };
      if ($("invite").value) { headers["X-Portal-Secret"] = $("invite").value; }

      button.disabled = true;

      fetch("/register", { method: "POST", headers: headers,
                           body: JSON.stringify(body), cache: "no-store" })
        .then(function (resp) {
          if (resp.status !== 201) {
            return problem(resp).then(showError);
          }
          return resp.json().then(function (r) {
            form.hidden = true;
            $("api-key").value = r.api_key;
            text($("customer"), r.customer);
            $("result").hidden = false;
            $("api-key").focus();
            $("api-key").select();
          });
        })
        .catch(function () {
          showError("The sign-up could not be sent; check your connection.");
        })
        .then(function () { button.disabled = false; });
    });

    $("copy").addEventListener("click", function () {
      var k = $("api-key");
      k.select();
      if (navigator.clipboard) {
        navigator.clipboard.writeText(k.value).then(function () {
          text($("copy"), "Copied");
        }, function () {});
      }
    });
  }

  /* -------------------------------------------------------------- usage */

  function row(tbody, cells) {
    var tr = el("tr"), i;
    for (i = 0; i < cells.length; i++) { tr.appendChild(el("td", {}, cells[i])); }
    tbody.appendChild(tr);
  }

  function num(n) { return Number(n).toLocaleString("en-US"); }

  function statusText(s) {
    if (s.state === "active") { return "Active."; }
    if (s.state === "grace") {
      return "Payment overdue (" + s.reason + "): still served until " +
             s.until + ".";
    }
    return "Delinquent (" + s.reason + "): calls are refused with 402 " +
           "until this is resolved.";
  }

  /* one bar per day of the period, drawn in plain SVG */
  function chart(meter, period, days) {
    var start = Date.parse(period.start), end = Date.parse(period.end),
        n = Math.round((end - start) / 86400000), values = [], max = 0,
        W = 620, H = 180, pad = 24, bw, i, d, v, box, s, bar, label, t, desc;

    for (i = 0; i < n; i++) { values.push(0); }

    days.forEach(function (r) {
      if (r.meter !== meter) { return; }
      i = Math.round((Date.parse(r.day + "T00:00:00Z") - start) / 86400000);
      if (i >= 0 && i < n) { values[i] += Number(r.metered); }
    });

    values.forEach(function (x) { if (x > max) { max = x; } });

    desc = values.map(function (x, j) { return x ? (j + 1) + ": " + x : ""; })
                 .filter(Boolean).join(", ");

    box = el("figure", { "class": "chart" });
    s = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img",
                     "aria-label": "Daily usage of " + meter + " this period" +
                                   (desc ? " (day: units) " + desc : ": none"),
                     "data-meter": meter });
    bw = (W - 2 * pad) / n;

    for (i = 0; i < n; i++) {
      v = values[i];
      d = max ? Math.max(v ? 1 : 0, (H - 2 * pad) * v / max) : 0;
      bar = svg("rect", { x: (pad + i * bw + 1).toFixed(1),
                          y: (H - pad - d).toFixed(1),
                          width: Math.max(1, bw - 2).toFixed(1),
                          height: d.toFixed(1), "data-value": v });
      t = svg("title", {});
      t.textContent = "day " + (i + 1) + ": " + v;
      bar.appendChild(t);
      s.appendChild(bar);

      if (i === 0 || (i + 1) % 5 === 0) {
        label = svg("text", { x: (pad + i * bw + bw / 2).toFixed(1),
                              y: H - 8, "text-anchor": "middle" });
        label.textContent = String(i + 1);
        s.appendChild(label);
      }
    }

    label = svg("text", { x: pad, y: 14 });
    label.textContent = "max " + max + " / day";
    s.appendChild(label);

    box.appendChild(s);
    box.appendChild(el("figcaption", {}, meter + ": units per day (UTC)"));

    return box;
  }

  function render(u) {
    var tb, credit = $("credit"), charts = $("charts"), st = $("status");

    text($("period"), "Billing period " + u.period.start.slice(0, 10) +
         " to " + u.period.end.slice(0, 10) + " (UTC), as of " + u.as_of +
         ", customer " + u.customer + ".");

    text(st, statusText(u.status));
    st.className = "state-" + u.status.state;

    credit.textContent = "";
    if (u.credit.length === 0) {
      credit.appendChild(el("p", {}, "No prepaid credit: usage is billed."));
    }
    u.credit.forEach(function (c) {
      credit.appendChild(el("p", { "data-meter": c.meter },
        c.meter + ": " + num(c.left) + " left of " + num(c.granted) +
        " (" + num(c.used) + " used)"));
    });

    tb = $("meters").tBodies[0];
    tb.textContent = "";
    charts.textContent = "";
    if (u.meters.length === 0) {
      row(tb, ["No usage yet this period.", "", "", ""]);
    }
    u.meters.forEach(function (m) {
      row(tb, [m.meter, num(m.metered), num(m.billed), num(m.pending)]);
      charts.appendChild(chart(m.meter, u.period, u.days));
    });

    tb = $("days").tBodies[0];
    tb.textContent = "";
    u.days.forEach(function (d) {
      row(tb, [d.day, d.meter, num(d.metered), num(d.billed), num(d.pending)]);
    });

    $("report").hidden = false;
  }

  function usage() {
    $("lookup").addEventListener("submit", function (ev) {
      var key = $("key").value.trim(), button = $("show");

      ev.preventDefault();
      clearError();

      if (!key) {
        showError("Paste your API key.");
        $("key").focus();
        return;
      }

      button.disabled = true;

      fetch("/usage", { headers: { "X-API-Key": key }, cache: "no-store" })
        .then(function (resp) {
          if (resp.status !== 200) {
            $("report").hidden = true;
            return problem(resp).then(showError);
          }
          return resp.json().then(render);
        })
        .catch(function () {
          showError("Usage could not be loaded; check your connection.");
        })
        .then(function () { button.disabled = false; });
    });
  }

  if ($("signup")) { signup(); }
  if ($("lookup")) { usage(); }
}());
