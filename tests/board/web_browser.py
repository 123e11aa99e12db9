"""Drives jmp's two web pages in headless Chromium (Debian's chromium and chromium-driver) with
Selenium, as a person would, and prints what it saw as one JSON object; tests/tests/web.rs
asserts on it.

    web_browser.py board URL SHOTS_DIR           the board page of `jmp web` (the local board)
    web_browser.py link URL SHOTS_DIR            the board page while jmpd is killed and
                                                 restarted (steps told on stdout, answered on
                                                 stdin)
    web_browser.py dashboard JSON                the controller's lab dashboard (JSON: its
                                                 address, the jmp binary, the admin's config...)

Measurements (page weight, time to a console, keystroke-to-echo) are taken in the browser.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import websocket
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

WAIT = 60


def browser():
    o = webdriver.ChromeOptions()
    o.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1000", "--no-proxy-server"]:
        o.add_argument(a)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)


def status_of(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def mirror(d):
    return d.find_element(By.ID, "mirror").get_attribute("textContent")


def wait_for(d, what, pred, timeout=WAIT):
    try:
        return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda d: pred(d))
    except Exception:
        raise SystemExit("timed out waiting for %s; the console's last text:\n%s" % (what, mirror(d)[-2000:]))


def text(d, id_):
    return d.find_element(By.ID, id_).get_attribute("textContent")


def flash_done(d):
    # Not "flashing: N%" (the progress): the result, either way.
    return text(d, "flash-result").startswith(("flashed: ", "flash failed: "))


def page_weight(d):
    return d.execute_script("""
        const nav = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource').filter(r => !r.name.includes('/ws'));
        return {
          transfer: nav.transferSize + res.reduce((a, r) => a + r.transferSize, 0),
          decoded: nav.decodedBodySize + res.reduce((a, r) => a + r.decodedBodySize, 0),
          files: 1 + res.length,
        };""")


def ws_roundtrips(url, keys):
    """Keystroke to echo through jmp web's WebSocket without a browser (as the page sends a
    key, a client of its own): what jmp web, the attachment, the link and the board take."""
    host = url.split("/")[2]
    ws = websocket.create_connection(url.replace("http://", "ws://", 1) + "ws",
                                     origin="http://" + host, timeout=WAIT)
    try:
        rts = []
        for c in keys:
            t = time.perf_counter()
            ws.send(json.dumps({"t": "input", "data": c}))
            # The echo, not the history a new client is sent first (kilobytes by now).
            while True:
                m = json.loads(ws.recv())
                if m.get("t") == "console" and len(m["data"]) < 16 and c in m["data"]:
                    break
            rts.append((time.perf_counter() - t) * 1000)
        return rts
    finally:
        ws.close()


def board(url, shots):
    # http://HOST:PORT/TOKEN/: the token is the path's first segment.
    root = url.rstrip("/").rsplit("/", 1)[0] + "/"
    seen = {}
    # Refused without the token, with a wrong one, and (the WebSocket) from another origin.
    seen["no_token"] = status_of(root)
    seen["bad_token"] = status_of(root + "0000/")
    seen["asset_no_token"] = status_of(root + "assets/xterm.js")
    ws_headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    seen["ws_no_token"] = status_of(root + "ws", dict(ws_headers, Origin=root.rstrip("/")))
    seen["ws_other_origin"] = status_of(url + "ws", dict(ws_headers, Origin="http://evil.example"))
    d = browser()
    try:
        t0 = time.monotonic()
        d.get(url)
        wait_for(d, "console output", lambda d: len(mirror(d)) > 0)
        seen["first_byte_s"] = time.monotonic() - t0
        seen["weight"] = page_weight(d)
        seen["cookies"] = len(d.get_cookies())
        # The board may be off: switch it on from the page and wait for the login prompt.
        d.find_element(By.CSS_SELECTOR, "button[data-power=on]").click()
        wait_for(d, "the power result", lambda d: "on" in text(d, "power-result") and "…" not in text(d, "power-result"))
        seen["power_on"] = text(d, "power-result")
        d.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea").send_keys(Keys.ENTER)
        wait_for(d, "the login prompt", lambda d: mirror(d).rstrip().endswith("login:"))
        seen["login_prompt_s"] = time.monotonic() - t0
        keys = d.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea")
        keys.send_keys("root" + Keys.ENTER)
        wait_for(d, "the password prompt", lambda d: mirror(d).rstrip().endswith("Password:"))
        keys.send_keys("x" + Keys.ENTER)
        wait_for(d, "the shell prompt", lambda d: mirror(d).rstrip().endswith("#"))
        keys.send_keys("echo web-ok" + Keys.ENTER)
        wait_for(d, "echo's answer", lambda d: "\nweb-ok\n" in mirror(d))
        seen["echo_s"] = time.monotonic() - t0
        seen["state"] = text(d, "state")

        # Keystroke to echo, measured in the page: from the key event to the mirror growing;
        # and its two hops: the key event to the page's WebSocket send (the browser's key
        # events, which the driver sends one CDP call at a time), the send to the echo.
        d.execute_script("""
            window.__rt = []; window.__hops = [];
            const m = document.getElementById('mirror');
            let t = null, sent = null, len = 0;
            document.addEventListener('keydown', () => { t = performance.now(); sent = null; len = m.textContent.length; }, true);
            const send = WebSocket.prototype.send;
            WebSocket.prototype.send = function (data) {
              if (t !== null && sent === null) sent = performance.now();
              return send.call(this, data);
            };
            new MutationObserver(() => {
              if (t !== null && m.textContent.length > len) {
                const now = performance.now();
                window.__rt.push(now - t);
                window.__hops.push(sent === null ? [null, null] : [sent - t, now - sent]);
                t = null;
              }
            }).observe(m, { childList: true, characterData: true, subtree: true });""")
        for i, c in enumerate("abcdefghijklmnopqrst"):
            keys.send_keys(c)
            WebDriverWait(d, WAIT, poll_frequency=0.01).until(
                lambda d: len(d.execute_script("return window.__rt")) > i)
        seen["roundtrip_ms"] = d.execute_script("return window.__rt")
        seen["roundtrip_hops_ms"] = d.execute_script("return window.__hops")
        seen["ws_roundtrip_ms"] = ws_roundtrips(url, "uvwxyzuvwxyzuvwxyzuv")
        keys.send_keys(Keys.ENTER)

        # A second tab shares the console: it gets the history, and sees what the first types.
        first = d.current_window_handle
        d.switch_to.new_window("tab")
        d.get(url)
        wait_for(d, "the history in a second tab", lambda d: "\nweb-ok\n" in mirror(d))
        second = d.current_window_handle
        d.switch_to.window(first)
        keys = d.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea")
        keys.send_keys("echo two-tabs" + Keys.ENTER)
        d.switch_to.window(second)
        wait_for(d, "the first tab's typing in the second", lambda d: "\ntwo-tabs\n" in mirror(d))
        seen["second_tab"] = True
        d.close()
        d.switch_to.window(first)

        # Power cycle from the button: the boot log comes again.
        boots = mirror(d).count("U-Boot")
        d.find_element(By.CSS_SELECTOR, "button[data-power=cycle]").click()
        wait_for(d, "the cycle's result", lambda d: "cycled" in text(d, "power-result"))
        seen["cycle"] = text(d, "power-result")
        wait_for(d, "the boot log again", lambda d: mirror(d).count("U-Boot") > boots)
        seen["boot_again"] = True

        # CAN: a request from python-can (through the attachment's local endpoint, given by the
        # test) and the simulated ECU's answer both show in the live view.
        if len(sys.argv) > 4:
            subprocess.run([sys.executable, sys.argv[4], *sys.argv[5:]], check=True, timeout=60)
            wait_for(d, "the ECU's answer in the CAN view",
                     lambda d: "7E8" in text(d, "can"))
            seen["can"] = text(d, "can")
            d.find_element(By.ID, "can-filter").send_keys("7E8")
            seen["can_filtered"] = [r.get_attribute("textContent") for r in d.find_elements(By.CSS_SELECTOR, "#can tbody tr") if r.is_displayed()]

        d.save_screenshot(os.path.join(shots, "board-page.png"))

        # Flash by upload (the board off: its card is shared with it), watching the progress.
        d.find_element(By.CSS_SELECTOR, "button[data-power=off]").click()
        wait_for(d, "power off", lambda d: "off" in text(d, "power-result") and "…" not in text(d, "power-result"))
        seen["state_off"] = text(d, "state")
        img = tempfile.NamedTemporaryFile(suffix=".img", delete=False)
        # An MBR with one partition (type 0x83, from sector 2048, 4 MiB) and 3 MiB of data.
        mbr = bytearray(512)
        mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (8192).to_bytes(4, "little")
        mbr[510:512] = b"\x55\xaa"
        img.write(bytes(mbr) + os.urandom((3 << 20) - 512))
        img.close()
        d.execute_script("""
            window.__progress = [];
            const r = document.getElementById('flash-result');
            new MutationObserver(() => window.__progress.push(r.textContent))
              .observe(r, { childList: true, characterData: true, subtree: true });""")
        d.find_element(By.ID, "image").send_keys(img.name)
        d.find_element(By.ID, "flash").click()
        wait_for(d, "the flash's result", flash_done, timeout=120)
        os.unlink(img.name)
        seen["flash"] = text(d, "flash-result")
        seen["flash_progress"] = d.execute_script("return window.__progress")
        d.save_screenshot(os.path.join(shots, "board-page-flashed.png"))

        # By a path on the machine jmp web runs on, under jmp web's --image-dir only: any
        # other file (the environment, a device, a link out of the directory) is refused; an
        # image file there (one 6 MiB partition, 2 MiB of data) is flashed.
        def flash_path(p):
            f = d.find_element(By.ID, "image-path")
            f.clear()
            f.send_keys(p)
            d.execute_script("document.getElementById('flash-result').textContent = ''")
            d.find_element(By.ID, "flash-path").click()
            wait_for(d, "the flash's result", flash_done, timeout=120)
            return text(d, "flash-result")
        images = os.environ["JMP_WEB_IMAGES"]
        seen["flash_path_environ"] = flash_path("/proc/self/environ")
        seen["flash_path_device"] = flash_path("/dev/null")
        os.symlink("/proc/self/environ", os.path.join(images, "out.img"))
        seen["flash_path_link_out"] = flash_path(os.path.join(images, "out.img"))
        mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (12288).to_bytes(4, "little")
        img = tempfile.NamedTemporaryFile(suffix=".img", delete=False, dir=images)
        img.write(bytes(mbr) + os.urandom((2 << 20) - 512))
        img.close()
        seen["flash_path"] = flash_path(img.name)
        os.unlink(img.name)
    finally:
        d.quit()
    return seen


def step(name):
    """Tells the test a step is reached (a line of its own), and returns its answer."""
    print(name, flush=True)
    return sys.stdin.readline().strip()


def link(url):
    """The board page while jmpd is killed and started again (the test does both when told)."""
    seen = {}
    d = browser()
    try:
        d.get(url)
        wait_for(d, "the link up", lambda d: text(d, "state") == "link up")
        keys = d.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea")
        keys.send_keys(Keys.ENTER)
        wait_for(d, "the login prompt", lambda d: mirror(d).rstrip().endswith("login:"))
        keys.send_keys("root" + Keys.ENTER)
        wait_for(d, "the password prompt", lambda d: mirror(d).rstrip().endswith("Password:"))
        keys.send_keys("x" + Keys.ENTER)
        wait_for(d, "the shell prompt", lambda d: mirror(d).rstrip().endswith("#"))
        keys.send_keys("echo before-the-drop" + Keys.ENTER)
        wait_for(d, "echo's answer", lambda d: "\nbefore-the-drop\n" in mirror(d))
        seen["before"] = text(d, "state")
        assert step("up") == "killed"
        wait_for(d, "reconnecting", lambda d: "reconnecting" in text(d, "state"))
        seen["down"] = text(d, "state")
        d.save_screenshot(os.path.join(sys.argv[3], "board-page-reconnecting.png"))
        assert step("reconnecting") == "restarted"
        wait_for(d, "the link up again", lambda d: text(d, "state") == "link up")
        seen["again"] = text(d, "state")
        # Keystrokes typed while the link was down were discarded (by design): press Enter
        # until the restarted board's login prompt answers.
        prompts = mirror(d).count("login:")
        deadline = time.monotonic() + WAIT
        while mirror(d).count("login:") == prompts:
            if time.monotonic() > deadline:
                raise SystemExit("no login prompt after the restart:\n" + mirror(d)[-2000:])
            keys.send_keys(Keys.ENTER)
            try:
                WebDriverWait(d, 2, poll_frequency=0.05).until(lambda d: mirror(d).count("login:") > prompts)
            except Exception:
                pass
        keys.send_keys("root" + Keys.ENTER)
        wait_for(d, "the password prompt", lambda d: mirror(d).rstrip().endswith("Password:"))
        keys.send_keys("x" + Keys.ENTER)
        wait_for(d, "the shell prompt", lambda d: mirror(d).rstrip().endswith("#"))
        keys.send_keys("echo after-the-restart" + Keys.ENTER)
        wait_for(d, "echo's answer", lambda d: "\nafter-the-restart\n" in mirror(d))
        seen["echo_after"] = True
    finally:
        d.quit()
    return seen


def sign_in_link(cfg, who):
    """`jmp web --lab` as client `who` (a name, or "admin": the admin's config file): the link."""
    env = dict(os.environ)
    env.pop("JMP_CLIENT", None)
    env.pop("JMP_CLIENT_CONFIG", None)
    if who == "admin":
        env["JMP_CLIENT_CONFIG"] = cfg["admin_config"]
    else:
        env["JMP_CLIENT"] = who
    out = subprocess.run([cfg["jmp"], "web", "--lab"], env=env, check=True, capture_output=True,
                         text=True, timeout=60)
    return out.stdout.splitlines()[0]


def jmp_as(cfg, who, *args, wait=True):
    env = dict(os.environ, JMP_CLIENT=who)
    env.pop("JMP_CLIENT_CONFIG", None)
    if wait:
        return subprocess.run([cfg["jmp"], *args], env=env, check=True, capture_output=True,
                              text=True, timeout=60)
    return subprocess.Popen([cfg["jmp"], *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def post_status(url, headers):
    req = urllib.request.Request(url, data=b"", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


def head_of(url, headers):
    """A GET's status and headers, its redirect not followed."""
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


def body_of(url, headers):
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        return e.read().decode()


def lease_json(out):
    """The lease of `jmp create lease -o json`'s output (its JSON line)."""
    return json.loads(next(l for l in out.splitlines() if l.lstrip().startswith("{")))


def queue_rows(d):
    # Read in one script: the page redraws the table between two of Selenium's calls.
    return d.execute_script(
        "return [...document.querySelectorAll('#queue tbody tr')]"
        ".map(r => [...r.cells].map(c => c.textContent))")


def position_of(d, lease):
    for r in queue_rows(d):
        if len(r) > 1 and r[1] == lease:
            return r[0]
    return None


def dashboard(cfg):
    base, shots = cfg["base"], cfg["shots"]
    origin = base.rstrip("/")
    seen = {"no_session": status_of(base), "state_no_session": status_of(base + "state"),
            "bad_link": status_of(base + "signin/" + "0" * 32),
            "release_no_session": post_status(base + "release?lease=x", {"Origin": origin})[0]}
    waiters = []
    # A sign-in link opened from another site's page (login CSRF), or from another server of
    # the same host (the same site), is refused and stays unused; opened directly it signs in.
    link = sign_in_link(cfg, "admin")
    seen["cross_site_link"] = head_of(link, {"Sec-Fetch-Site": "cross-site"})[0]
    seen["same_site_link"] = head_of(link, {"Sec-Fetch-Site": "same-site"})[0]
    st, h = head_of(link, {"Sec-Fetch-Site": "none"})
    seen["direct_link"] = {"status": st, "cookie": "jmp-lab=" in h.get("set-cookie", ""),
                           "fragment": h.get("location", "").startswith("../#csrf=")}
    d = browser()
    try:
        # The admin signs in with a link from `jmp web --lab`; the link works once.
        link = sign_in_link(cfg, "admin")
        seen["link_has_credential"] = cfg["admin_token"] in link
        d.get(link)
        wait_for(d, "the exporters", lambda d: "mcp-01" in text(d, "exporters"))
        seen["url_after_sign_in"] = d.current_url
        seen["link_again"] = status_of(link)
        seen["weight"] = page_weight(d)
        # The browser keeps a session id, neither the link nor the credential.
        cookies = d.get_cookies()
        seen["cookies"] = len(cookies)
        seen["cookie_is_secret"] = any(cfg["admin_token"] in c["value"] or c["value"] in link
                                       for c in cookies)
        session = "; ".join(c["name"] + "=" + c["value"] for c in cookies)
        # The second secret is in the tab's sessionStorage, and no answer the cookie alone
        # gets (what another server of this host could collect and replay) contains it.
        secret = d.execute_script("return sessionStorage.getItem('jmp-csrf')") or ""
        seen["secret_len"] = len(secret)
        seen["secret_in_cookie"] = any(secret in c["value"] for c in cookies) if secret else None
        seen["secret_leaks"] = [p for p in ["", "state", "dashboard.js", "style.css"]
                                if secret and secret in body_of(base + p, {"Cookie": session})]
        seen["exporters"] = text(d, "exporters")
        # A lease made from the CLI appears without a reload.
        out = jmp_as(cfg, "agent", "create", "lease", "-l", "vendor=acme", "--duration", "10m",
                     "-o", "json")
        lease = lease_json(out.stdout)["name"]
        seen["lease"] = lease
        wait_for(d, "the lease", lambda d: lease in text(d, "leases"))
        seen["leases"] = text(d, "leases")
        seen["held"] = text(d, "exporters")
        # The admin's page has no button for another client's lease.
        seen["admin_buttons"] = len(d.find_elements(By.CSS_SELECTOR, "button.release"))
        wait_for(d, "the usage", lambda d: d.find_element(By.ID, "usage-box").is_displayed()
                 and "platform" in text(d, "usage"))
        seen["usage"] = text(d, "usage")
        seen["chart_bars"] = len(d.find_elements(By.CSS_SELECTOR, "#chart rect"))
        # Another month: no leases then.
        d.execute_script("const m = document.getElementById('month'); m.value = '2020-01';"
                         "m.dispatchEvent(new Event('change'));")
        wait_for(d, "the usage of 2020-01", lambda d: "platform" not in text(d, "usage"))
        seen["usage_2020"] = text(d, "usage")
        d.execute_script("const m = document.getElementById('month'); const n = new Date();"
                         "m.value = n.getUTCFullYear() + '-' + String(n.getUTCMonth() + 1).padStart(2, '0');"
                         "m.dispatchEvent(new Event('change'));")
        wait_for(d, "this month's usage again", lambda d: "platform" in text(d, "usage"))

        # Two waiters queue for the held board: positions 1 and 2, with their wait so far.
        for w in ["w1", "w2"]:
            waiters.append(jmp_as(cfg, w, "create", "lease", "-l", "vendor=acme", "--duration",
                                  "5m", "--wait", "300", "-o", "json", wait=False))
            wait_for(d, "waiter " + w + " in the queue",
                     lambda d, w=w: any(len(r) > 2 and r[2] == w for r in queue_rows(d)))
        q = {r[2]: r for r in queue_rows(d)}
        seen["queue"] = {w: q[w][0] for w in ["w1", "w2"]}
        seen["queue_wait"] = q["w2"][4]
        w1_lease, w2_lease = q["w1"][1], q["w2"][1]
        d.save_screenshot(os.path.join(shots, "dashboard.png"))

        # A forged release: from another origin with the admin's session, and from the admin's
        # own page for a lease the admin does not hold: both refused, the lease stays.
        seen["forged_origin"] = post_status(base + "release?lease=" + lease,
                                            {"Origin": "http://evil.example", "Cookie": session})[0]
        seen["forged_holder"] = d.execute_script(
            "return fetch('release?lease=' + arguments[0], {method: 'POST', headers: "
            "{'X-Jmp-Csrf': sessionStorage.getItem('jmp-csrf')}})"
            ".then(async r => [r.status, await r.text()])", lease)
        seen["lease_after_forgery"] = lease in text(d, "leases")

        # The holder signs in and releases it from its page.
        d.delete_all_cookies()
        d.get(sign_in_link(cfg, "agent"))
        wait_for(d, "the agent's release button",
                 lambda d: d.find_elements(By.CSS_SELECTOR, "button.release[data-lease='%s']" % lease))
        # The agent's cookie stolen and replayed with curl and a correct Origin: without the
        # tab's second secret, with a wrong one, or with another session's (the admin's), the
        # release is refused and the lease stays.
        agent = "; ".join(c["name"] + "=" + c["value"] for c in d.get_cookies())
        rel = base + "release?lease=" + lease
        seen["stolen_no_secret"] = post_status(rel, {"Origin": origin, "Cookie": agent})
        seen["stolen_bad_secret"] = post_status(rel, {"Origin": origin, "Cookie": agent,
                                                      "X-Jmp-Csrf": "0" * 32})[0]
        seen["stolen_other_secret"] = post_status(rel, {"Origin": origin, "Cookie": agent,
                                                        "X-Jmp-Csrf": secret})[0]
        seen["lease_after_stolen"] = lease in text(d, "leases")
        d.execute_script("document.querySelector(arguments[0]).click()",
                         "button.release[data-lease='%s']" % lease)
        wait_for(d, "the release", lambda d: text(d, "release-result").startswith("released"))
        seen["released"] = text(d, "release-result")
        # Its afterLease hook runs: the exporter shows cleaning and the queue waits.
        wait_for(d, "cleaning", lambda d: "cleaning" in text(d, "exporters"))
        seen["cleaning"] = text(d, "exporters")
        seen["queue_cleaning"] = {"w1": position_of(d, w1_lease), "w2": position_of(d, w2_lease)}
        open(cfg["hook_release"], "w").close()
        # Cleaned: the first waiter gets the board, the second moves up.
        wait_for(d, "the second waiter at the head",
                 lambda d: position_of(d, w1_lease) is None and position_of(d, w2_lease) == "1")
        seen["queue_after"] = {"w1": position_of(d, w1_lease), "w2": position_of(d, w2_lease)}
        seen["w1_granted"] = lease_json(waiters[0].communicate(timeout=60)[0])["name"]

        # Another client's view: only what its policy allows, no usage.
        d.delete_all_cookies()
        d.get(sign_in_link(cfg, "limited"))
        wait_for(d, "the limited client's view", lambda d: "live" in text(d, "state"))
        seen["limited_me"] = text(d, "me")
        seen["limited_exporters"] = text(d, "exporters")
        seen["limited_leases"] = text(d, "leases") + text(d, "queue")
        seen["limited_usage_shown"] = d.find_element(By.ID, "usage-box").is_displayed()
    finally:
        for w in waiters:
            if w.poll() is None:
                w.terminate()
                w.wait(timeout=30)
        d.quit()
    return seen


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "board":
        r = board(sys.argv[2], sys.argv[3])
    elif mode == "link":
        r = link(sys.argv[2])
    else:
        r = dashboard(json.loads(sys.argv[2]))
    print(json.dumps(r))
