"""A coding agent's session with `jmp mcp`, driven by the official MCP Python SDK's stdio client
(PyPI `mcp`), as the e2e test of `jmp mcp` runs it.

  mcp_agent.py JMP local               the board `jmp local start` runs (attach without a lease)
  mcp_agent.py JMP lease SELECTOR      a board leased by selector from the client's controller
  mcp_agent.py JMP refused SELECTOR    a lease the client's policy forbids
  mcp_agent.py JMP abandon SELECTOR    a lease, then the agent leaves without releasing it

Prints one JSON object with what the session saw; fails (exit 1, the reason on stderr) as soon as
a step does not give what an agent relies on. The server's stderr goes to MCP_SERVER_LOG.
"""
import asyncio, json, os, sys, tempfile

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import Implementation

JMP, MODE = sys.argv[1], sys.argv[2]
SELECTOR = sys.argv[3] if len(sys.argv) > 3 else None
seen = {"mode": MODE}


class Failed(Exception):
    pass


def text(r):
    return "".join(c.text for c in r.content if getattr(c, "type", "") == "text")


async def call(s, name, args=None, ok=True, progress=None):
    r = await s.call_tool(name, args or {}, progress_callback=progress)
    if ok and r.is_error:
        raise Failed(f"{name} {args}: {text(r)}")
    if not ok and not r.is_error:
        raise Failed(f"{name} {args} succeeded: {text(r)}")
    return r


def note(into):
    """A progress callback keeping (progress, total, message)."""
    async def got(p, total, message):
        into.append([p, total, message])
    return got


async def login(s, what):
    """From wherever the console is: Enter until the login prompt, then root's shell."""
    await call(s, "console_write", {"data": "\r"})
    r = await call(s, "console_expect", {"pattern": "login: $", "timeout": 30})
    seen.setdefault("login_prompt", text(r)[-200:])
    await call(s, "console_write", {"data": "root\r"})
    await call(s, "console_expect", {"pattern": "Password: ", "timeout": 10})
    await call(s, "console_write", {"data": "secret\r"})
    await call(s, "console_expect", {"pattern": "# $", "timeout": 10})
    await call(s, "console_write", {"data": f"echo {what}-$((6*7))\r"})
    # The shell does not expand: the echo shows what was typed, once echoed and once printed.
    r = await call(s, "console_expect", {"pattern": f"\r\n{what}-\\$\\(\\(6\\*7\\)\\)\r\n", "timeout": 10})
    return text(r)


async def session():
    params = StdioServerParameters(command=JMP, args=["mcp"], env=dict(os.environ))
    log = open(os.environ.get("MCP_SERVER_LOG", os.devnull), "a")
    async with stdio_client(params, errlog=log) as (read, write):
        async with ClientSession(read, write, client_info=Implementation(name="e2e-agent", version="1.0")) as s:
            init = await s.initialize()
            seen["server"] = init.server_info.name
            tools = await s.list_tools()
            seen["tools"] = sorted(t.name for t in tools.tools)
            seen["schemas"] = {t.name: sorted((t.input_schema or {}).get("properties", {})) for t in tools.tools}

            # Before any board: a device tool says what to call first.
            r = await call(s, "power", {"action": "status"}, ok=False)
            seen["no_board"] = text(r)
            # A bad argument is refused naming it.
            r = await call(s, "power", {"action": "explode"}, ok=False)
            seen["bad_action"] = text(r)

            r = await call(s, "list_boards", {})
            seen["boards"] = r.structured_content.get("boards") if r.structured_content else None

            if MODE == "refused":
                r = await call(s, "lease", {"selector": SELECTOR, "wait": 0}, ok=False)
                seen["refused"] = text(r)
                seen["refused_data"] = r.structured_content
                return

            if MODE == "local":
                r = await call(s, "attach", {})
            else:  # lease, abandon
                queue = []
                r = await call(s, "lease", {"selector": SELECTOR, "duration": "10m", "wait": 60},
                               progress=note(queue))
                seen["lease"] = r.structured_content["lease"]
                seen["queue"] = queue
            seen["attach"] = text(r)
            if MODE == "abandon":
                # The agent goes away holding the board: closing stdin ends the session, which
                # gives back what it made.
                return
            r = await call(s, "devices")
            seen["devices"] = sorted((d["name"], d["kind"]) for d in r.structured_content["devices"])

            r = await call(s, "power", {"action": "on"})
            seen["power_on"] = r.structured_content
            seen["first_login"] = await login(s, "first")

            # A power cycle reboots the board: its boot log comes again, then the login prompt.
            r = await call(s, "power", {"action": "cycle", "delay": 0.2})
            seen["cycle"] = r.structured_content
            r = await call(s, "console_expect", {"pattern": "Startup finished: boot complete", "timeout": 30})
            seen["boot_log"] = text(r)
            r = await call(s, "console_expect", {"pattern": "login: $", "timeout": 30})
            seen["second_login"] = await login(s, "second")

            if any(k == "can" for _, k in seen["devices"]):
                # A UDS request to the simulated ECU (ISO-TP single frame on 0x7E0) and its
                # positive response on 0x7E8.
                r = await call(s, "can_send", {"id": "7E0", "data": "02 10 03 CC CC CC CC CC"})
                seen["can_send"] = r.structured_content
                r = await call(s, "can_recv", {"id": "7E8", "timeout": 10, "max_frames": 4})
                seen["can_recv"] = r.structured_content

            # A flood: far more output than one call may carry. Reads come in chunks of at most
            # max_bytes, the rest said to be pending; an expect over it returns at most 64 KiB.
            line = "F" * 4000
            for _ in range(40):
                await call(s, "console_write", {"data": f"echo {line}\r"})
            await call(s, "console_write", {"data": "echo FLOOD-$((1))-END\r"})
            r = await call(s, "console_expect", {"pattern": "\r\nFLOOD-\\$\\(\\(1\\)\\)-END\r\n", "timeout": 60})
            seen["flood_expect_len"] = len(text(r))
            seen["flood_expect_head"] = text(r)[:120]
            for _ in range(40):
                await call(s, "console_write", {"data": f"echo {line}\r"})
            await call(s, "console_write", {"data": "echo DONE-$((2))\r"})
            chunks, tail = [], ""
            while "\r\nDONE-$((2))\r\n" not in tail:
                r = await call(s, "console_read", {"max_bytes": 8192, "timeout": 5})
                d = r.structured_content
                chunks.append({"bytes": d["bytes"], "pending": d["pending"], "text_len": len(text(r))})
                tail = (tail + d["output"])[-100:]
                if len(chunks) > 200:
                    raise Failed(f"the flood never ended: {chunks[-3:]}")
            seen["flood_reads"] = chunks

            if MODE == "local":
                # A small image onto the simulated card, with the board off; progress comes as
                # notifications.
                await call(s, "power", {"action": "off"})
                img = tempfile.NamedTemporaryFile(suffix=".img", delete=False)
                img.write(os.urandom(3 << 20))
                img.close()
                progress = []
                r = await call(s, "flash", {"path": img.name},
                               progress=note(progress))
                os.unlink(img.name)
                seen["flash"] = text(r)
                seen["flash_progress"] = progress
                r = await call(s, "detach")
            else:
                before = seen["lease"]["end"]
                r = await call(s, "extend", {"duration": "5m"})
                seen["extended"] = [before, r.structured_content["end"]]
                # Usage reports are the administrators': this client is refused, as by the CLI.
                r = await call(s, "usage", {"since": "1d"}, ok=False)
                seen["usage_refused"] = r.structured_content
                r = await call(s, "release")
            seen["end"] = text(r)


try:
    asyncio.run(session())
except Failed as e:
    print(json.dumps(seen, indent=1))
    print(f"mcp_agent: {e}", file=sys.stderr)
    sys.exit(1)
print(json.dumps(seen))
