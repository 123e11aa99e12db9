"""Console against a pty pair this test drives: the board side is the master end."""

import os
import re
import threading

import pytest

from jmp_testing.console import Console, ConsoleClosed, ConsoleTimeout


@pytest.fixture
def pair():
    master, slave = os.openpty()
    path = os.ttyname(slave)
    # Raw, no echo: bytes pass as written.
    import tty

    tty.setraw(slave)
    c = Console("console", path)
    yield c, master
    c.close()
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


def board(master, data: bytes):
    os.write(master, data)


def test_read_until_returns_through_the_match_and_consumes(pair):
    c, m = pair
    board(m, b"U-Boot\r\nboot complete\r\nlogin: ")
    got = c.read_until("boot complete", timeout=5)
    assert got == "U-Boot\r\nboot complete"
    # The next wait starts after the match: the same text does not match twice.
    assert c.read_until("login: ", timeout=5) == "\r\nlogin: "
    with pytest.raises(ConsoleTimeout):
        c.read_until("boot complete", timeout=0.3)


def test_a_match_split_across_writes_and_a_utf8_character_split(pair):
    c, m = pair
    done = {}

    def wait():
        done["got"] = c.read_until("Grüße", timeout=5)

    t = threading.Thread(target=wait)
    t.start()
    raw = "hello Grüße".encode()
    cut = raw.index(b"\xc3") + 1  # in the middle of ü
    board(m, raw[:cut])
    board(m, raw[cut:])
    t.join(10)
    assert done["got"] == "hello Grüße"


def test_regex_and_expect_set_before_and_after(pair):
    c, m = pair
    board(m, b"version: 1.2.3\r\n")
    out = c.read_until(r"version: \d+\.\d+\.\d+", regex=True, timeout=5)
    assert out.endswith("1.2.3")
    board(m, b"temp=41C ok\r\n")
    mt = c.expect(re.compile(r"temp=(\d+)C"), timeout=5)
    assert mt.group(1) == b"41"
    assert c.after == "temp=41C" and c.before.strip() == ""


def test_timeout_names_the_pattern_and_shows_the_last_lines(pair):
    c, m = pair
    board(m, b"".join(b"line %d\r\n" % i for i in range(50)) + b"Kernel panic - not syncing")
    with pytest.raises(ConsoleTimeout) as e:
        c.read_until("login:", timeout=0.5)
    msg = str(e.value)
    assert "'login:'" in msg and "0.5s" in msg
    assert "Kernel panic - not syncing" in msg and "line 49" in msg
    assert "line 10\n" not in msg  # only the last lines


def test_transcript_keeps_everything_and_marks_slice_it(pair):
    c, m = pair
    board(m, b"before\r\n")
    c.read_until("before\r\n", timeout=5)
    mark = c.mark()
    board(m, b"during\r\n")
    c.read_until("during", timeout=5)
    assert c.transcript() == "before\r\nduring\r\n"
    assert c.transcript(since=mark) == "during\r\n"


def test_discard_drops_unread_output(pair):
    c, m = pair
    board(m, b"old prompt login: ")
    c.read_until("old", timeout=5)
    c.discard()
    with pytest.raises(ConsoleTimeout):
        c.read_until("login: ", timeout=0.3)
    board(m, b"login: ")
    assert c.read_until("login: ", timeout=5) == "login: "


def test_write_and_sendline_reach_the_board(pair):
    c, m = pair
    c.write("ab")
    c.sendline("root")
    got = b""
    while len(got) < 7:
        got += os.read(m, 64)
    assert got == b"abroot\r"


def test_quiet_for(pair):
    c, m = pair
    assert c.quiet_for(0.2, timeout=5)
    stop = threading.Event()

    def chatter():
        while not stop.is_set():
            board(m, b".")
            stop.wait(0.02)

    t = threading.Thread(target=chatter)
    t.start()
    try:
        assert not c.quiet_for(0.3, timeout=1)
    finally:
        stop.set()
        t.join()


def test_a_vanished_pty_ends_a_wait_with_a_clear_error(pair):
    c, m = pair
    os.close(m)
    with pytest.raises(ConsoleClosed):
        c.read_until("login:", timeout=5)


def test_an_asciicast_recording_holds_what_came_after_the_mark_in_order(pair, tmp_path):
    import json
    import time

    from jmp_testing.console import save_recording

    c, m = pair
    board(m, b"before the test\r\n")
    c.read_until("before the test", timeout=5)
    since, started = c.mark(), time.time()
    board(m, b"U-Boot 2024\r\nboot complete\r\n")
    c.read_until("boot complete", timeout=5)
    c.sendline("echo hi")
    # A character split across two reads is whole in the recording.
    raw = "Grüße\r\n".encode()
    cut = raw.index(b"\xc3") + 1
    board(m, raw[:cut])
    c.read_until(b"Gr\xc3", timeout=5)
    board(m, raw[cut:])
    c.read_until("\r\n", timeout=5)
    path = save_recording(str(tmp_path / "rec"), "tests/x.py::test a", c, since, started, input=True)
    assert os.path.basename(path) == "tests_x.py_test_a.cast"
    assert os.stat(path).st_mode & 0o777 == 0o600
    # Never over an earlier one.
    again = save_recording(str(tmp_path / "rec"), "tests/x.py::test a", c, since, started, input=True)
    assert os.path.basename(again) == "tests_x.py_test_a-2.cast"
    lines = open(path, encoding="utf-8").read().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and header["width"] > 0 and header["height"] > 0
    assert header["timestamp"] == int(started)
    events = [json.loads(x) for x in lines[1:]]
    times = [e[0] for e in events]
    assert times == sorted(times) and times[0] >= 0
    out = "".join(e[2] for e in events if e[1] == "o")
    typed = "".join(e[2] for e in events if e[1] == "i")
    assert out == "U-Boot 2024\r\nboot complete\r\nGrüße\r\n"
    assert "before the test" not in out
    assert typed == "echo hi\r"
    assert {e[1] for e in events} == {"o", "i"}


def test_a_recording_leaves_typing_out_unless_asked_and_is_private(pair, tmp_path):
    import json
    import time

    from jmp_testing.console import save_recording

    c, m = pair
    os.umask(0o022)
    since, started = c.mark(), time.time()
    board(m, b"Password: ")
    c.read_until("Password: ", timeout=5)
    c.sendline("hunter2-secret")  # not echoed, as at a login prompt
    board(m, b"\r\n$ ")
    c.read_until("$ ", timeout=5)
    # A link planted at the name is not followed: the next free name is taken.
    target = tmp_path / "elsewhere"
    os.makedirs(tmp_path / "rec")
    os.symlink(target, tmp_path / "rec" / "t.cast")
    path = save_recording(str(tmp_path / "rec"), "t", c, since, started)
    assert os.path.basename(path) == "t-2.cast"
    assert not target.exists()
    assert os.stat(path).st_mode & 0o777 == 0o600
    text = open(path, encoding="utf-8").read()
    assert "hunter2" not in text
    events = [json.loads(x) for x in text.splitlines()[1:]]
    assert {e[1] for e in events} == {"o"}
    assert "".join(e[2] for e in events) == "Password: \r\n$ "
