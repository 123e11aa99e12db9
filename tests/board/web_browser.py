"""Drives jmp's two web pages in headless Chromium (Debian's chromium and chromium-driver) with
Selenium, as a person would, and prints what it saw as one JSON object; tests/tests/web.rs
asserts on it.

    web_browser.py board URL SHOTS_DIR           the board page of `jmp web` (the local board)
    web_browser.py dashboard URL SHOTS_DIR ...   the controller's lab dashboard

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


def page_weight(d):
    return d.execute_script("""
        const nav = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource').filter(r => !r.name.includes('/ws'));
        return {
          transfer: nav.transferSize + res.reduce((a, r) => a + r.transferSize, 0),
          decoded: nav.decodedBodySize + res.reduce((a, r) => a + r.decodedBodySize, 0),
          files: 1 + res.length,
        };""")


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

        # Keystroke to echo, measured in the page: from the key event to the mirror growing.
        d.execute_script("""
            window.__rt = [];
            const m = document.getElementById('mirror');
            let t = null, len = 0;
            document.addEventListener('keydown', () => { t = performance.now(); len = m.textContent.length; }, true);
            new MutationObserver(() => {
              if (t !== null && m.textContent.length > len) { window.__rt.push(performance.now() - t); t = null; }
            }).observe(m, { childList: true, characterData: true, subtree: true });""")
        for i, c in enumerate("abcdefghijklmnopqrst"):
            keys.send_keys(c)
            WebDriverWait(d, WAIT, poll_frequency=0.01).until(
                lambda d: len(d.execute_script("return window.__rt")) > i)
        seen["roundtrip_ms"] = d.execute_script("return window.__rt")
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
        wait_for(d, "the flash's result", lambda d: text(d, "flash-result").startswith("flash"), timeout=120)
        os.unlink(img.name)
        seen["flash"] = text(d, "flash-result")
        seen["flash_progress"] = d.execute_script("return window.__progress")
        d.save_screenshot(os.path.join(shots, "board-page-flashed.png"))
    finally:
        d.quit()
    return seen


def dashboard(url, shots, jmp, client_url, lease_args):
    base = url.split("?")[0]
    seen = {"no_token": status_of(base), "bad_token": status_of(base + "?token=not-a-credential"),
            "state_no_token": status_of(base + "state")}
    d = browser()
    try:
        d.get(url)
        wait_for(d, "the exporters", lambda d: "mcp-01" in text(d, "exporters"))
        seen["weight"] = page_weight(d)
        # The browser keeps a session id, never the credential it signed in with.
        token = url.split("token=")[1]
        seen["cookie_is_credential"] = any(token in c["value"] for c in d.get_cookies())
        seen["cookies"] = len(d.get_cookies())
        seen["exporters"] = text(d, "exporters")
        # A lease made from the CLI appears without a reload.
        out = subprocess.run([jmp, *lease_args], check=True, capture_output=True, text=True, timeout=60)
        seen["lease_out"] = out.stdout
        wait_for(d, "the lease", lambda d: "agent" in text(d, "leases"))
        seen["leases"] = text(d, "leases")
        seen["held"] = text(d, "exporters")
        wait_for(d, "the usage", lambda d: d.find_element(By.ID, "usage-box").is_displayed())
        seen["usage"] = text(d, "usage")
        d.save_screenshot(os.path.join(shots, "dashboard.png"))
        # Another client's view: only what its policy allows, no usage.
        d.delete_all_cookies()
        d.get(client_url)
        wait_for(d, "the limited client's view", lambda d: "live" in text(d, "state"))
        seen["limited_me"] = text(d, "me")
        seen["limited_exporters"] = text(d, "exporters")
        seen["limited_leases"] = text(d, "leases")
        seen["limited_usage_shown"] = d.find_element(By.ID, "usage-box").is_displayed()
    finally:
        d.quit()
    return seen


if __name__ == "__main__":
    mode, url, shots = sys.argv[1:4]
    if mode == "board":
        r = board(url, shots)
    else:
        r = dashboard(url, shots, sys.argv[4], sys.argv[5], sys.argv[6:])
    print(json.dumps(r))
