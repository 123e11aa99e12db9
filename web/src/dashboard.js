// The lab dashboard of `jmp-controller --web`: polls `state` (what the signed-in client's
// own calls answer) and redraws. Its one action: releasing the viewer's own lease.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";

  // The session's second secret, told once in the fragment of the sign-in redirect: kept in
  // this tab's sessionStorage (this origin's, port included) and sent with each release; the
  // cookie alone, which other servers of this host can collect, releases nothing. The fragment
  // leaves the address bar and the history.
  const CSRF = "jmp-csrf";
  const told = /^#csrf=([0-9a-f]{32})$/.exec(location.hash);
  if (told) {
    sessionStorage.setItem(CSRF, told[1]);
    history.replaceState(null, "", location.pathname + location.search);
  }

  const time = (s) => (s ? new Date(s * 1000).toLocaleString() : "");
  const ago = (now, s) => {
    const d = Math.max(0, now - s);
    return d < 120 ? d + "s" : d < 7200 ? Math.round(d / 60) + "m" : Math.round(d / 3600) + "h";
  };
  // A table's rows, replaced only when they changed: a button under the pointer stays the
  // same element from one poll to the next.
  function rows(id, list, cells) {
    const body = $(id).tBodies[0];
    const next = document.createElement("tbody");
    for (const item of list) {
      const tr = document.createElement("tr");
      for (const c of cells(item)) {
        const td = document.createElement("td");
        if (c instanceof Node) td.appendChild(c);
        else td.textContent = c == null ? "" : String(c);
        tr.appendChild(td);
      }
      next.appendChild(tr);
    }
    if (next.innerHTML !== body.innerHTML) body.replaceWith(next);
  }
  function badge(text, cls) {
    const b = document.createElement("span");
    b.className = "badge " + cls;
    b.textContent = text;
    return b;
  }

  // The month whose usage is shown (UTC), this month until another is picked.
  const now0 = new Date();
  $("month").value = now0.getUTCFullYear() + "-" + String(now0.getUTCMonth() + 1).padStart(2, "0");
  function windowQuery() {
    const m = /^(\d{4})-(\d{2})$/.exec($("month").value);
    if (!m) return "";
    const y = +m[1], mo = +m[2] - 1;
    return "?since=" + Date.UTC(y, mo, 1) + "&until=" + Date.UTC(y, mo + 1, 1);
  }
  $("month").addEventListener("change", () => poll(true));

  // Hours per team as horizontal bars, drawn here (no chart library).
  function chart(u) {
    const svg = $("chart");
    svg.textContent = "";
    const rowH = 22, labelW = 140, barW = 360, width = labelW + barW + 80;
    svg.setAttribute("viewBox", "0 0 " + width + " " + Math.max(rowH, u.length * rowH));
    svg.setAttribute("width", width);
    svg.setAttribute("height", Math.max(rowH, u.length * rowH));
    const most = Math.max(1, ...u.map((r) => r.ms));
    u.forEach((r, i) => {
      const y = i * rowH;
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("x", 0);
      label.setAttribute("y", y + 15);
      label.textContent = r.key || "(no team)";
      const bar = document.createElementNS(SVG, "rect");
      bar.setAttribute("x", labelW);
      bar.setAttribute("y", y + 3);
      bar.setAttribute("height", rowH - 6);
      bar.setAttribute("width", Math.max(1, Math.round((barW * r.ms) / most)));
      bar.setAttribute("class", "bar");
      const hours = document.createElementNS(SVG, "text");
      hours.setAttribute("x", labelW + Math.round((barW * r.ms) / most) + 6);
      hours.setAttribute("y", y + 15);
      hours.textContent = (r.ms / 3600000).toFixed(1) + " h";
      svg.append(label, bar, hours);
    });
  }

  function releaseButton(l) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "release";
    b.dataset.lease = l.name;
    b.textContent = l.status === "active" ? "release" : "withdraw";
    b.addEventListener("click", async () => {
      b.disabled = true;
      $("release-result").textContent = "releasing " + l.name + "…";
      try {
        const r = await fetch("release?lease=" + encodeURIComponent(l.name), {
          method: "POST",
          headers: { "X-Jmp-Csrf": sessionStorage.getItem(CSRF) || "" },
        });
        let a;
        try { a = await r.json(); } catch (_) { a = { ok: false, text: r.status + " " + (await r.text()) }; }
        $("release-result").textContent = a.text;
        $("release-result").className = a.ok ? "" : "bad";
      } catch (e) {
        $("release-result").textContent = "the controller is not answering";
        $("release-result").className = "bad";
      }
      poll(true);
    });
    return b;
  }

  function draw(s) {
    $("me").textContent = s.me.name + (s.me.admin ? " (admin)" : "");
    const leases = s.leases.leases || [];
    const byName = new Map(leases.map((l) => [l.name, l]));
    rows("exporters", s.exporters.exporters || [], (e) => {
      const l = e.lease && byName.get(e.lease);
      const st = !e.enabled ? badge("disabled", "off")
        : !e.online ? badge("offline", "off")
        : e.state === "cleaning" ? badge("cleaning: its afterLease hook runs", "cleaning")
        : e.state ? badge(e.state, "")
        : e.lease ? badge("leased", "leased") : badge("available", "up");
      return [
        e.name,
        Object.entries(e.labels || {}).map(([k, v]) => k + "=" + v).join(", "),
        st,
        (e.devices || []).map((d) => d.name + " (" + d.kind + ")").join(", "),
        e.client || "",
        l ? time(l.end) : "",
      ];
    });
    // Only the viewer's own leases have a button: the page releases nobody else's.
    const mine = (l) => l.client === s.me.name;
    const active = leases.filter((l) => l.status === "active");
    rows("leases", active, (l) => [l.name, l.client, l.exporter, l.status, time(l.begin), time(l.end), mine(l) ? releaseButton(l) : ""]);
    const queued = leases.filter((l) => l.status !== "active")
      .sort((a, b) => (a.position || 1e9) - (b.position || 1e9) || a.begin - b.begin);
    rows("queue", queued, (l) => [
      l.status === "reserved" ? "reserved from " + time(l.begin) : l.position,
      l.name,
      l.client,
      l.exporter || l.selector,
      l.status === "reserved" ? "" : ago(s.now, l.begin),
      time(l.end),
    ]);
    const u = s.usage && s.usage.rows;
    $("usage-box").hidden = !u;
    if (u) {
      chart(u);
      rows("usage", u, (r) => [r.key || "(no team)", r.leases, (r.ms / 3600000).toFixed(2)]);
    }
    const errs = [s.exporters.error, s.leases.error, s.usage && s.usage.error].filter(Boolean);
    $("state").textContent = errs.length ? errs.join("; ") : "live, " + new Date().toLocaleTimeString();
    $("state").className = "state " + (errs.length ? "down" : "up");
  }

  let every = 2000, timer = null, seq = 0;
  async function poll(now) {
    if (now && timer) clearTimeout(timer);
    const mine = ++seq;
    try {
      const r = await fetch("state" + windowQuery(), { cache: "no-store" });
      if (r.status === 403) {
        $("state").textContent = "signed out: " + (await r.text());
        $("state").className = "state ended";
        return;
      }
      if (r.status === 429) throw new Error("slow down");
      const s = await r.json();
      every = s.poll_ms || every;
      // An answer overtaken by a newer poll (another month picked) is not drawn.
      if (mine === seq) draw(s);
    } catch (e) {
      $("state").textContent = "the controller is not answering; retrying";
      $("state").className = "state down";
    }
    if (mine === seq) timer = setTimeout(poll, every);
  }
  poll();
})();
