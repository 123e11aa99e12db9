//! A simulated board's serial console: a sans-IO model of a boot log, a getty
//! and a tiny shell, so the quick start and tests have something realistic to
//! talk to without hardware. Pure and synchronous: bytes in, bytes out.

use std::fmt::Write as _;

/// Longest line kept while typing; further characters are dropped (and not
/// echoed) so a runaway sender can't grow memory without bound.
const MAX_LINE: usize = 4096;

const MOTD: &str = "Welcome to the jmp simulated board.";

/// Where the console is in the getty → login → shell lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Session {
    Login,
    Password { user: String },
    Shell { user: String },
}

/// Progress through a terminal escape sequence (arrow keys and the like),
/// which a line editor must swallow rather than echo as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Esc,
    Csi,
    Ss3,
}

/// A simulated board console: bytes typed in, bytes printed out.
#[derive(Debug, Clone)]
pub struct SimConsole {
    hostname: String,
    session: Session,
    line: String,
    /// A '\r' just ended a line, so an immediately following '\n' is part of
    /// the same line end rather than a second, empty line.
    after_cr: bool,
    escape: Escape,
    /// A partially received multi-byte UTF-8 character; it can be split
    /// across `input` calls.
    utf8: [u8; 4],
    utf8_len: usize,
    utf8_need: usize,
}

impl SimConsole {
    /// `hostname` appears in the banner and prompts (e.g. "jmp-sim").
    pub fn new(hostname: &str) -> Self {
        // Control characters in the name would corrupt every prompt.
        let hostname: String = hostname.chars().filter(|c| !c.is_control()).collect();
        let hostname = if hostname.trim().is_empty() {
            "jmp-sim".to_string()
        } else {
            hostname.trim().to_string()
        };
        Self {
            hostname,
            session: Session::Login,
            line: String::new(),
            after_cr: false,
            escape: Escape::None,
            utf8: [0; 4],
            utf8_len: 0,
            utf8_need: 0,
        }
    }

    /// What the board prints at power-on: a short boot log, then
    /// "\r\n<hostname> login: ". Also resets the console to the login state,
    /// as a real power cycle would.
    pub fn boot(&mut self) -> Vec<u8> {
        self.session = Session::Login;
        self.reset_line();
        let host = &self.hostname;
        let lines = [
            "",
            "U-Boot SPL 2024.01-jmp (Jan 01 2024 - 00:00:00 +0000)",
            "Trying to boot from MMC1",
            "",
            "",
            "U-Boot 2024.01-jmp (Jan 01 2024 - 00:00:00 +0000)",
            "",
            "Model: jmp simulated board",
            "DRAM:  1 GiB",
            "Core:  42 devices, 12 uclasses, devicetree: separate",
            "MMC:   mmc@fe2c0000: 0",
            "Loading Environment from MMC... OK",
            "In:    serial@fe660000",
            "Out:   serial@fe660000",
            "Err:   serial@fe660000",
            "Hit any key to stop autoboot:  0 ",
            "Booting using the fdt blob at 0x8300000",
            "Starting kernel ...",
            "",
            "[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x410fd083]",
            "[    0.000000] Linux version 6.6.0-jmp-sim (builder@jmp) (gcc 13.2.0) #1 SMP PREEMPT",
            "[    0.000000] Machine model: jmp simulated board",
            "[    0.000000] Memory: 1012345K/1048576K available",
            "[    0.412345] Serial: 8250/16550 driver, 4 ports, IRQ sharing enabled",
            "[    0.413456] fe660000.serial: ttyS2 at MMIO 0xfe660000 (irq = 23) is a 16550A",
            "[    1.234567] EXT4-fs (mmcblk0p2): mounted filesystem with ordered data mode",
            "[    1.345678] Run /sbin/init as init process",
            "[    2.345678] random: crng init done",
            "[    2.456789] systemd[1]: Startup finished: boot complete",
            "",
        ];
        let mut out = String::new();
        for line in lines {
            out.push_str(line);
            out.push_str("\r\n");
        }
        let _ = write!(out, "jmp simulated board 1.0 {host} ttyS2\r\n");
        out.push_str("\r\n");
        out.push_str(&self.prompt());
        out.into_bytes()
    }

    /// Feed bytes the user typed; returns what the board prints in response
    /// (echo of typed characters, as a real tty with echo does, and command
    /// output).
    pub fn input(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in data {
            self.byte(b, &mut out);
        }
        out
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) {
        let after_cr = std::mem::replace(&mut self.after_cr, b == b'\r');
        if after_cr && b == b'\n' {
            return;
        }
        if self.escape_swallows(b) {
            return;
        }
        if b >= 0x80 {
            self.utf8_byte(b, out);
            return;
        }
        // An ASCII byte can never continue a multi-byte character.
        self.utf8_len = 0;
        self.utf8_need = 0;
        match b {
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                let line = std::mem::take(&mut self.line);
                self.run_line(&line, out);
            }
            0x7f | 0x08 => self.erase(out),
            0x03 => {
                out.extend_from_slice(b"^C\r\n");
                self.line.clear();
                // Interrupting login aborts it, as login(1) does.
                if matches!(self.session, Session::Password { .. }) {
                    self.session = Session::Login;
                }
                out.extend_from_slice(self.prompt().as_bytes());
            }
            0x04 if self.line.is_empty() && matches!(self.session, Session::Shell { .. }) => {
                self.logout(out);
            }
            0x1b => self.escape = Escape::Esc,
            0x20..=0x7e => self.push_char(char::from(b), out),
            _ => {}
        }
    }

    /// Returns true if `b` belonged to an escape sequence. A byte that can't
    /// belong to one ends the sequence and is processed normally, so Enter or
    /// Ctrl-C still work after a garbled sequence.
    fn escape_swallows(&mut self, b: u8) -> bool {
        match self.escape {
            Escape::None => false,
            Escape::Esc => {
                self.escape = match b {
                    b'[' => Escape::Csi,
                    b'O' => Escape::Ss3,
                    _ => Escape::None,
                };
                (0x20..=0x7e).contains(&b)
            }
            Escape::Csi => match b {
                0x20..=0x3f => true,
                0x40..=0x7e => {
                    self.escape = Escape::None;
                    true
                }
                _ => {
                    self.escape = Escape::None;
                    false
                }
            },
            Escape::Ss3 => {
                self.escape = Escape::None;
                (0x40..=0x7e).contains(&b)
            }
        }
    }

    fn utf8_byte(&mut self, b: u8, out: &mut Vec<u8>) {
        if self.utf8_need == 0 || !(0x80..=0xbf).contains(&b) {
            // Start of a new character (any unfinished one is dropped).
            self.utf8_len = 0;
            self.utf8_need = match b {
                0xc2..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf4 => 4,
                _ => 0,
            };
            if self.utf8_need == 0 {
                return;
            }
        }
        self.utf8[self.utf8_len] = b;
        self.utf8_len += 1;
        if self.utf8_len < self.utf8_need {
            return;
        }
        let bytes = self.utf8;
        let len = self.utf8_len;
        self.utf8_len = 0;
        self.utf8_need = 0;
        // Rejects overlongs and surrogates that the lead-byte check let through.
        if let Some(c) = std::str::from_utf8(&bytes[..len])
            .ok()
            .and_then(|s| s.chars().next())
        {
            if !c.is_control() {
                self.push_char(c, out);
            }
        }
    }

    fn push_char(&mut self, c: char, out: &mut Vec<u8>) {
        if self.line.len() + c.len_utf8() > MAX_LINE {
            return;
        }
        self.line.push(c);
        if self.echoes() {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }

    fn erase(&mut self, out: &mut Vec<u8>) {
        if self.line.pop().is_some() && self.echoes() {
            out.extend_from_slice(b"\x08 \x08");
        }
    }

    fn echoes(&self) -> bool {
        !matches!(self.session, Session::Password { .. })
    }

    fn reset_line(&mut self) {
        self.line.clear();
        self.after_cr = false;
        self.escape = Escape::None;
        self.utf8_len = 0;
        self.utf8_need = 0;
    }

    fn prompt(&self) -> String {
        match &self.session {
            Session::Login => format!("{} login: ", self.hostname),
            Session::Password { .. } => "Password: ".to_string(),
            Session::Shell { user } => {
                let sigil = if user == "root" { '#' } else { '$' };
                format!("{user}@{}:~{sigil} ", self.hostname)
            }
        }
    }

    fn logout(&mut self, out: &mut Vec<u8>) {
        self.session = Session::Login;
        self.line.clear();
        out.extend_from_slice(b"logout\r\n\r\n");
        out.extend_from_slice(self.prompt().as_bytes());
    }

    fn run_line(&mut self, line: &str, out: &mut Vec<u8>) {
        match &self.session {
            Session::Login => {
                let user = line.trim();
                if !user.is_empty() {
                    self.session = Session::Password {
                        user: user.to_string(),
                    };
                }
            }
            Session::Password { user } => {
                self.session = Session::Shell { user: user.clone() };
                out.extend_from_slice(MOTD.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Session::Shell { .. } => {
                if !self.run_command(line, out) {
                    return;
                }
            }
        }
        out.extend_from_slice(self.prompt().as_bytes());
    }

    /// Returns false if the command already printed whatever comes next
    /// (a logout or reboot), so no shell prompt should follow.
    fn run_command(&mut self, line: &str, out: &mut Vec<u8>) -> bool {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&cmd, args)) = words.split_first() else {
            return true;
        };
        let user = match &self.session {
            Session::Shell { user } => user.clone(),
            _ => String::new(),
        };
        let host = self.hostname.clone();
        let mut text = String::new();
        let mut say = |s: &str| {
            text.push_str(s);
            text.push_str("\r\n");
        };
        match (cmd, args) {
            ("help", _) => {
                say("Available commands:");
                for c in [
                    "help",
                    "echo ARGS",
                    "uname [-a]",
                    "hostname",
                    "whoami",
                    "uptime",
                    "cat /proc/cpuinfo",
                    "reboot",
                    "exit, logout",
                ] {
                    say(&format!("  {c}"));
                }
            }
            ("echo", _) => say(&args.join(" ")),
            ("uname", []) | ("uname", ["-s"]) => say("Linux"),
            ("uname", ["-a"]) => say(&format!(
                "Linux {host} 6.6.0-jmp-sim #1 SMP PREEMPT aarch64 GNU/Linux"
            )),
            ("uname", ["-n"]) => say(&host),
            ("uname", ["-r"]) => say("6.6.0-jmp-sim"),
            ("uname", ["-m"]) => say("aarch64"),
            ("uname", _) => say("uname: unsupported option"),
            ("hostname", _) => say(&host),
            ("whoami", _) => say(&user),
            ("uptime", _) => say(" 00:01:23 up 1 min,  1 user,  load average: 0.00, 0.00, 0.00"),
            ("cat", ["/proc/cpuinfo"]) => {
                for cpu in 0..4 {
                    say(&format!("processor\t: {cpu}"));
                    say("BogoMIPS\t: 48.00");
                    say("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics");
                    say("CPU implementer\t: 0x41");
                    say("CPU part\t: 0xd08");
                    say("");
                }
            }
            ("cat", []) => {}
            ("cat", files) => {
                for f in files {
                    say(&format!("cat: {f}: No such file or directory"));
                }
            }
            ("reboot", _) => {
                out.extend_from_slice(b"reboot: Restarting system\r\n");
                let log = self.boot();
                out.extend_from_slice(&log);
                return false;
            }
            ("exit" | "logout", _) => {
                self.session = Session::Login;
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(self.prompt().as_bytes());
                return false;
            }
            _ => say(&format!("-sh: {cmd}: command not found")),
        }
        out.extend_from_slice(text.as_bytes());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "jmp-sim";
    const ROOT_PROMPT: &str = "root@jmp-sim:~# ";

    fn s(b: &[u8]) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    fn logged_in(user: &str) -> SimConsole {
        let mut c = SimConsole::new(HOST);
        c.boot();
        c.input(format!("{user}\r").as_bytes());
        c.input(b"pw\r");
        c
    }

    /// Tiny deterministic PRNG so the fuzz-ish tests need no crates.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn boot_ends_with_login_prompt() {
        let mut c = SimConsole::new(HOST);
        let out = s(&c.boot());
        assert!(out.ends_with("\r\njmp-sim login: "), "{out:?}");
        assert!(out.contains("U-Boot"));
        assert!(out.contains("[    0.000000] Booting Linux"));
        assert!(out.contains(HOST));
        // Every newline is preceded by a carriage return (ONLCR).
        assert!(!out.replace("\r\n", "").contains('\n'));
    }

    #[test]
    fn full_login_and_echo() {
        let mut c = SimConsole::new(HOST);
        c.boot();
        assert_eq!(s(&c.input(b"root\r")), "root\r\nPassword: ");
        let out = s(&c.input(b"secret\r"));
        assert_eq!(
            out,
            format!("\r\nWelcome to the jmp simulated board.\r\n{ROOT_PROMPT}")
        );
        let out = s(&c.input(b"echo hello   world\r"));
        assert_eq!(
            out,
            format!("echo hello   world\r\nhello world\r\n{ROOT_PROMPT}")
        );
    }

    #[test]
    fn password_not_echoed() {
        let mut c = SimConsole::new(HOST);
        c.boot();
        c.input(b"alice\r");
        let out = s(&c.input(b"hunter2\x7f\x7f\r"));
        assert!(!out.contains("hunter"), "{out:?}");
        assert!(!out.contains('\x08'));
        assert!(out.ends_with("alice@jmp-sim:~$ "), "{out:?}");
    }

    #[test]
    fn empty_user_reprompts() {
        let mut c = SimConsole::new(HOST);
        c.boot();
        assert_eq!(s(&c.input(b"  \r")), "  \r\njmp-sim login: ");
    }

    #[test]
    fn backspace_editing() {
        let mut c = logged_in("root");
        assert_eq!(s(&c.input(b"\x7f")), "", "nothing to erase");
        let out = s(&c.input(b"echp\x7fo hi\x08\x08hey\r"));
        assert_eq!(
            out,
            format!("echp\x08 \x08o hi\x08 \x08\x08 \x08hey\r\nhey\r\n{ROOT_PROMPT}")
        );
        // A multi-byte character is erased as one.
        let out = s(&c.input("echo é\x7fe\r".as_bytes()));
        assert!(out.ends_with(&format!("\r\ne\r\n{ROOT_PROMPT}")), "{out:?}");
    }

    #[test]
    fn ctrl_c_discards_line() {
        let mut c = logged_in("root");
        let out = s(&c.input(b"echo foo\x03"));
        assert_eq!(out, format!("echo foo^C\r\n{ROOT_PROMPT}"));
        assert_eq!(s(&c.input(b"\r")), format!("\r\n{ROOT_PROMPT}"));
        // At the password prompt it aborts the login.
        let mut c = SimConsole::new(HOST);
        c.boot();
        c.input(b"root\r");
        assert_eq!(s(&c.input(b"\x03")), "^C\r\njmp-sim login: ");
    }

    #[test]
    fn ctrl_d_logs_out_only_on_empty_line() {
        let mut c = logged_in("root");
        assert_eq!(s(&c.input(b"x\x04")), "x");
        c.input(b"\x03");
        let out = s(&c.input(b"\x04"));
        assert!(out.ends_with("\r\njmp-sim login: "), "{out:?}");
        assert_eq!(s(&c.input(b"\x04")), "", "no effect at login");
    }

    #[test]
    fn exit_and_logout_return_to_login() {
        for cmd in ["exit", "logout"] {
            let mut c = logged_in("root");
            let out = s(&c.input(format!("{cmd}\r").as_bytes()));
            assert!(out.ends_with("\r\njmp-sim login: "), "{out:?}");
            assert_eq!(s(&c.input(b"bob\r")), "bob\r\nPassword: ");
        }
    }

    #[test]
    fn commands() {
        let mut c = logged_in("bob");
        let p = "bob@jmp-sim:~$ ";
        let run = |c: &mut SimConsole, cmd: &str| {
            let out = s(&c.input(format!("{cmd}\r").as_bytes()));
            let body = out
                .strip_prefix(&format!("{cmd}\r\n"))
                .unwrap()
                .strip_suffix(p)
                .unwrap()
                .to_string();
            body
        };
        assert_eq!(run(&mut c, ""), "");
        assert_eq!(run(&mut c, "uname"), "Linux\r\n");
        assert_eq!(
            run(&mut c, "uname -a"),
            "Linux jmp-sim 6.6.0-jmp-sim #1 SMP PREEMPT aarch64 GNU/Linux\r\n"
        );
        assert_eq!(run(&mut c, "hostname"), "jmp-sim\r\n");
        assert_eq!(run(&mut c, "whoami"), "bob\r\n");
        assert_eq!(run(&mut c, "echo"), "\r\n");
        assert!(run(&mut c, "uptime").contains("up"));
        assert!(run(&mut c, "cat /proc/cpuinfo").contains("processor\t: 0"));
        assert!(run(&mut c, "help").contains("uname"));
        assert_eq!(
            run(&mut c, "frobnicate now"),
            "-sh: frobnicate: command not found\r\n"
        );
    }

    #[test]
    fn crlf_is_one_line_end() {
        let mut c = logged_in("root");
        let out = s(&c.input(b"whoami\r\n"));
        assert_eq!(out, format!("whoami\r\nroot\r\n{ROOT_PROMPT}"));
        let out = s(&c.input(b"whoami\n"));
        assert_eq!(out, format!("whoami\r\nroot\r\n{ROOT_PROMPT}"));
        let out = s(&c.input(b"\r\r"));
        assert_eq!(out, format!("\r\n{ROOT_PROMPT}\r\n{ROOT_PROMPT}"));
        c.input(b"\x03");
        let out = s(&c.input(b"\n\n"));
        assert_eq!(out, format!("\r\n{ROOT_PROMPT}\r\n{ROOT_PROMPT}"));
    }

    #[test]
    fn escape_sequences_and_bad_bytes_ignored() {
        let mut c = logged_in("root");
        let out = s(&c.input(b"\x1b[A\x1b[1;5Cec\x1bOHho\t \xff\xc3x\x80\x01y\r"));
        assert_eq!(out, format!("echo xy\r\nxy\r\n{ROOT_PROMPT}"));
        let out = s(&c.input("echo héllo ✓\r".as_bytes()));
        assert!(out.contains("\r\nhéllo ✓\r\n"), "{out:?}");
        // Overlong encoding and a surrogate are rejected.
        let out = c.input(b"echo \xc0\xaf\xed\xa0\x80z\r");
        assert_eq!(s(&out), format!("echo z\r\nz\r\n{ROOT_PROMPT}"));
    }

    #[test]
    fn reboot_prints_boot_log_again() {
        let mut c = logged_in("root");
        let out = s(&c.input(b"reboot\r"));
        let boot = s(&SimConsole::new(HOST).boot());
        assert_eq!(
            out,
            format!("reboot\r\nreboot: Restarting system\r\n{boot}")
        );
        assert_eq!(s(&c.input(b"root\r")), "root\r\nPassword: ");
    }

    #[test]
    fn line_is_bounded() {
        let mut c = logged_in("root");
        let out = c.input(&[b'a'; MAX_LINE + 1000]);
        assert_eq!(out.len(), MAX_LINE);
        assert_eq!(c.line.len(), MAX_LINE);
        // Multi-byte characters don't overshoot the bound.
        let mut c = logged_in("root");
        c.input("é".repeat(MAX_LINE).as_bytes());
        assert!(c.line.len() <= MAX_LINE);
    }

    #[test]
    fn every_byte_in_every_state_never_panics() {
        for state in 0..3 {
            for b in 0..=255u8 {
                let mut c = SimConsole::new(HOST);
                c.boot();
                if state >= 1 {
                    c.input(b"root\r");
                }
                if state >= 2 {
                    c.input(b"pw\r");
                }
                let out = c.input(&[b]);
                assert!(String::from_utf8(out).is_ok());
                c.input(&[b, b, b'x', b, b'\r']);
                assert!(c.line.len() <= MAX_LINE);
            }
        }
        let all: Vec<u8> = (0..=255u8).collect();
        let mut c = logged_in("root");
        for _ in 0..100 {
            c.input(&all);
            assert!(c.line.len() <= MAX_LINE);
        }
    }

    #[test]
    fn random_input_never_panics_and_stays_bounded() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..20 {
            let mut c = SimConsole::new(HOST);
            c.boot();
            for _ in 0..50 {
                let len = (rng.next() % 2000) as usize;
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        let r = rng.next();
                        // Some rounds mostly printable, so lines get long and
                        // commands actually run.
                        if round % 2 == 0 && !r.is_multiple_of(8) {
                            b"abc echo reboot exit\x7f"[(r >> 8) as usize % 21]
                        } else {
                            (r >> 16) as u8
                        }
                    })
                    .collect();
                let out = c.input(&data);
                assert!(String::from_utf8(out).is_ok());
                assert!(c.line.len() <= MAX_LINE);
            }
        }
    }

    #[test]
    fn split_input_gives_same_output() {
        let script: &[u8] = b"root\r\nsecret\recho hello wx\x7forld\r\n\
            \x1b[Aunk\x03whoami\necho h\xc3\xa9 \xe2\x9c\x93\r\xff\xc3(\x04\x04\
            uname -a\rreboot\ralice\rpw\r\rexit\r";
        let whole = {
            let mut c = SimConsole::new(HOST);
            c.boot();
            c.input(script)
        };
        assert!(s(&whole).contains("hello world\r\n"));
        for i in 0..=script.len() {
            let mut c = SimConsole::new(HOST);
            c.boot();
            let mut out = c.input(&script[..i]);
            out.extend(c.input(&script[i..]));
            assert_eq!(out, whole, "split at {i}");
        }
        let mut c = SimConsole::new(HOST);
        c.boot();
        let bytewise: Vec<u8> = script.iter().flat_map(|&b| c.input(&[b])).collect();
        assert_eq!(bytewise, whole);
    }
}
