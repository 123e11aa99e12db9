// The board page of `jmp web`: one same-origin WebSocket (relative URL, so it works behind an
// IDE's port forwarding) carries the console, the attachment's status, power results, CAN
// frames and flash progress; everything else is the server's (jmp/src/web).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  // The token is the first segment of this page's path: every relative URL below (assets, the
  // WebSocket, the upload) carries it, and no cookie is needed.

  const term = new Terminal({ convertEol: false, scrollback: 5000, screenReaderMode: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open($("term"));
  fit.fit();
  // A serial line has no window size to tell the board: a resize refits the terminal to the page.
  window.addEventListener("resize", () => fit.fit());

  // The console's text in the DOM, for screen readers and tests: escape sequences removed,
  // the latest MIRROR characters kept.
  const MIRROR = 64 * 1024;
  const ansi = /\x1b(\[[0-9;?]*[ -\/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])/g;
  let mirrorText = "";
  function mirror(data) {
    mirrorText = (mirrorText + data.replace(ansi, "").replace(/\r\n?/g, "\n")).slice(-MIRROR);
    $("mirror").textContent = mirrorText;
  }

  let ws = null;
  let linkState = "connecting";
  let boardOff = false;
  function showState(text, cls) {
    const s = $("state");
    s.textContent = text;
    s.className = "state " + (cls || "");
  }
  function refreshState() {
    if (linkState === "page-lost") return showState("jmp web is not answering; reconnecting…", "down");
    if (linkState.startsWith("ended")) return showState(linkState, "ended");
    if (linkState === "reconnecting") return showState("link down: reconnecting…", "down");
    if (linkState === "stalled") return showState("link stalled: the exporter is not answering…", "down");
    if (boardOff) return showState("board is off", "off");
    if (linkState === "up") return showState("link up", "up");
    showState(linkState);
  }

  function cell(tr, text) {
    const td = document.createElement("td");
    td.textContent = text == null ? "" : String(text);
    tr.appendChild(td);
  }

  function showDevices(live) {
    const body = $("devices").tBodies[0];
    body.textContent = "";
    for (const d of live.devices || []) {
      const tr = document.createElement("tr");
      cell(tr, d.name);
      cell(tr, d.kind);
      cell(tr, d.state === "available" ? "available" : (d.state + (d.reason ? ": " + d.reason : "")));
      cell(tr, (d.endpoints || []).map((e) => e.at).join(" ") || d.local);
      cell(tr, [d.summary, d.notes].filter(Boolean).join("; "));
      body.appendChild(tr);
    }
  }

  const CAN_ROWS = 500;
  function canRow(f) {
    const filter = $("can-filter").value.trim().toUpperCase().replace(/^0X/, "");
    const tr = document.createElement("tr");
    tr.dataset.id = f.id;
    cell(tr, (f.time_us / 1e6).toFixed(6));
    cell(tr, f.id + (f.extended ? " (ext)" : ""));
    cell(tr, f.data);
    tr.hidden = filter !== "" && f.id !== filter;
    const body = $("can").tBodies[0];
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > CAN_ROWS) body.deleteRow(-1);
  }
  $("can-filter").addEventListener("input", () => {
    const filter = $("can-filter").value.trim().toUpperCase().replace(/^0X/, "");
    for (const tr of $("can").tBodies[0].rows) tr.hidden = filter !== "" && tr.dataset.id !== filter;
  });

  function onMessage(m) {
    switch (m.t) {
      case "hello":
        $("title").textContent = "jmp: " + m.exporter;
        document.title = "jmp: " + m.exporter;
        break;
      case "console":
        term.write(m.data);
        mirror(m.data);
        break;
      case "console-state":
        $("console-device").textContent = m.device || "";
        if (m.error) mirror("\n[jmp web: " + m.error + "]\n");
        break;
      case "status":
        if (m.live) {
          linkState = m.live.link;
          showDevices(m.live);
        } else {
          linkState = "ended: " + m.error;
        }
        refreshState();
        break;
      case "power":
        $("power-result").textContent = m.text;
        $("power-result").className = m.ok ? "" : "bad";
        if (m.state) boardOff = m.state === "off";
        refreshState();
        break;
      case "can":
        for (const f of m.frames) canRow(f);
        break;
      case "flash":
        $("flash-progress").value = m.total ? (100 * m.done) / m.total : 0;
        $("flash-result").textContent = "flashing: " + (m.total ? Math.floor((100 * m.done) / m.total) + "%" : (m.done >> 20) + " MiB");
        break;
    }
  }

  function send(m) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(m));
  }
  term.onData((data) => send({ t: "input", data }));
  for (const b of document.querySelectorAll("button[data-power]")) {
    b.addEventListener("click", () => {
      $("power-result").textContent = "power " + b.dataset.power + "…";
      $("power-result").className = "";
      send({ t: "power", action: b.dataset.power });
    });
  }

  function flashDone(status, body) {
    let r;
    try { r = JSON.parse(body); } catch (_) { r = { ok: false, text: status + " " + body }; }
    $("flash-result").textContent = (r.ok ? "flashed: " : "flash failed: ") + r.text;
    $("flash-result").className = r.ok ? "" : "bad";
    if (r.ok) $("flash-progress").value = 100;
  }

  // By a path on the machine jmp web runs on: jmp reads the file, the page sends its name.
  $("flash-path").addEventListener("click", async () => {
    const path = $("image-path").value.trim();
    if (!path) {
      $("flash-result").textContent = "give the path of an image file first";
      return;
    }
    $("flash-result").textContent = "flashing " + path + "…";
    $("flash-result").className = "";
    try {
      const r = await fetch("flash-path", { method: "POST", body: path });
      flashDone(r.status, await r.text());
    } catch (_) {
      $("flash-result").textContent = "flash failed: jmp web did not answer";
      $("flash-result").className = "bad";
    }
  });

  $("flash").addEventListener("click", () => {
    const file = $("image").files[0];
    if (!file) {
      $("flash-result").textContent = "choose an image file first";
      return;
    }
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", "flash?name=" + encodeURIComponent(file.name));
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) {
        $("flash-progress").value = (100 * e.loaded) / e.total;
        $("flash-result").textContent = "uploading: " + Math.floor((100 * e.loaded) / e.total) + "%";
      }
    };
    xhr.onload = () => flashDone(xhr.status, xhr.responseText);
    xhr.onerror = () => { $("flash-result").textContent = "flash failed: the upload did not reach jmp web"; };
    $("flash-result").textContent = "uploading…";
    xhr.send(file);
  });

  function connect() {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(url);
    ws.onopen = () => { term.reset(); mirrorText = ""; linkState = "connecting"; refreshState(); };
    ws.onmessage = (e) => onMessage(JSON.parse(e.data));
    ws.onclose = () => {
      linkState = "page-lost";
      refreshState();
      setTimeout(connect, 1000);
    };
  }
  connect();
  term.focus();
})();
