// The lab dashboard of `jmp-controller --web`: polls `state` (what the signed-in client's
// own calls answer) and redraws; read-only.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  if (location.search.includes("token=")) history.replaceState(null, "", location.pathname);

  const time = (s) => (s ? new Date(s * 1000).toLocaleString() : "");
  const ago = (now, s) => {
    const d = Math.max(0, now - s);
    return d < 120 ? d + "s" : d < 7200 ? Math.round(d / 60) + "m" : Math.round(d / 3600) + "h";
  };
  function rows(id, list, cells) {
    const body = $(id).tBodies[0];
    body.textContent = "";
    for (const item of list) {
      const tr = document.createElement("tr");
      for (const c of cells(item)) {
        const td = document.createElement("td");
        if (c instanceof Node) td.appendChild(c);
        else td.textContent = c == null ? "" : String(c);
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }
  function bar(fraction) {
    const b = document.createElement("div");
    b.className = "bar";
    b.style.width = Math.round(100 * fraction) + "%";
    return b;
  }

  function draw(s) {
    $("me").textContent = s.me.name + (s.me.admin ? " (admin)" : "");
    const leases = (s.leases.leases || []);
    const byName = new Map(leases.map((l) => [l.name, l]));
    rows("exporters", s.exporters.exporters || [], (e) => {
      const l = e.lease && byName.get(e.lease);
      return [
        e.name,
        Object.entries(e.labels || {}).map(([k, v]) => k + "=" + v).join(", "),
        !e.enabled ? "disabled" : !e.online ? "offline" : (e.state || (e.lease ? "leased" : "available")),
        (e.devices || []).map((d) => d.name + " (" + d.kind + ")").join(", "),
        e.client || "",
        l ? time(l.end) : "",
      ];
    });
    const active = leases.filter((l) => l.status !== "waiting");
    rows("leases", active, (l) => [l.name, l.client, l.exporter, l.status, time(l.begin), time(l.end)]);
    const waiting = leases.filter((l) => l.status === "waiting").sort((a, b) => a.begin - b.begin);
    rows("queue", waiting, (l) => [waiting.indexOf(l) + 1, l.name, l.client, l.selector, ago(s.now, l.begin)]);
    const u = s.usage && s.usage.rows;
    $("usage-box").hidden = !u;
    if (u) {
      const most = Math.max(1, ...u.map((r) => r.ms));
      rows("usage", u, (r) => [r.key || "(no team)", r.leases, (r.ms / 3600000).toFixed(2), bar(r.ms / most)]);
    }
    const errs = [s.exporters.error, s.leases.error, s.usage && s.usage.error].filter(Boolean);
    $("state").textContent = errs.length ? errs.join("; ") : "live, " + new Date().toLocaleTimeString();
    $("state").className = "state " + (errs.length ? "down" : "up");
  }

  let every = 2000;
  async function poll() {
    try {
      const r = await fetch("state", { cache: "no-store" });
      if (r.status === 403) {
        $("state").textContent = "signed out: " + (await r.text());
        $("state").className = "state ended";
        return;
      }
      const s = await r.json();
      every = s.poll_ms || every;
      draw(s);
    } catch (e) {
      $("state").textContent = "the controller is not answering; retrying";
      $("state").className = "state down";
    }
    setTimeout(poll, every);
  }
  poll();
})();
