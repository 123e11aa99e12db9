//! `jmp serial`: what a pty cannot carry (break, parity and data bits, modem lines), as device
//! requests sent where the board is; `jmp console`: a terminal on the console itself.

use crate::kind::{KindVerb, Target, VerbError, VerbHost};
use crate::registry::{run_request, DeviceRequest};
use crate::BoxFuture;
use clap::{Subcommand, ValueEnum};
use jmp_protocol::kinds::serial::{FlowControl, LineChange, Parity, Request};

#[derive(Subcommand, Debug)]
pub enum SerialVerb {
    /// What a pty cannot carry: break, parity and data bits, modem lines.
    Serial {
        #[command(subcommand)]
        cmd: SerialCmd,
    },
    /// A terminal on the board's console: escape commands (`~.` quit, `~p` power cycle, `~b`
    /// break, `~?` help) at the start of a line, paced typing for slow bootloaders
    /// (`--char-delay`, `--line-delay`, `--send FILE`), an asciicast recording (`--record`).
    Console(super::console::ConsoleArgs),
}

#[derive(Subcommand, Debug)]
pub enum SerialCmd {
    /// Send a break on the real port.
    Break {
        /// The serial device (default: the only one).
        device: Option<String>,
        /// How long, in milliseconds (at most 10000).
        #[arg(long, default_value_t = 250)]
        ms: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Set line settings on the real port, including those a pty cannot carry (parity, 5-7
    /// data bits). Unspecified settings stay as they are.
    Set {
        /// The serial device (default: the only one).
        device: Option<String>,
        /// Speed in bits per second (any number the port takes, e.g. 250000).
        #[arg(long)]
        baud: Option<u32>,
        /// Data bits, 5 to 8.
        #[arg(long, value_parser = clap::value_parser!(u8).range(5..=8))]
        data_bits: Option<u8>,
        /// Parity.
        #[arg(long, value_enum)]
        parity: Option<ParityArg>,
        /// Stop bits, 1 or 2.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        stop_bits: Option<u8>,
        /// Flow control.
        #[arg(long, value_enum)]
        flow: Option<FlowArg>,
        #[command(flatten)]
        target: Target,
    },
    /// Set the modem control lines DTR and RTS on the real port.
    Modem {
        /// The serial device (default: the only one).
        device: Option<String>,
        /// Data Terminal Ready (often wired to a board's reset).
        #[arg(long, value_enum)]
        dtr: Option<OnOff>,
        /// Request To Send (often wired to a boot-mode pin).
        #[arg(long, value_enum)]
        rts: Option<OnOff>,
        #[command(flatten)]
        target: Target,
    },
    /// Show the real port's line settings.
    Get {
        /// The serial device (default: the only one).
        device: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum ParityArg {
    None,
    Odd,
    Even,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum FlowArg {
    None,
    Xonxoff,
    Rtscts,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl SerialCmd {
    /// The device, the target and the request this command asks for.
    fn request(self) -> (Option<String>, Target, Request) {
        match self {
            SerialCmd::Break { device, ms, target } => {
                (device, target, Request::Break { millis: ms })
            }
            SerialCmd::Set {
                device,
                baud,
                data_bits,
                parity,
                stop_bits,
                flow,
                target,
            } => (
                device,
                target,
                Request::Set(LineChange {
                    baud,
                    data_bits,
                    parity: parity.map(|p| match p {
                        ParityArg::None => Parity::None,
                        ParityArg::Odd => Parity::Odd,
                        ParityArg::Even => Parity::Even,
                    }),
                    stop_bits,
                    flow: flow.map(|f| match f {
                        FlowArg::None => FlowControl::None,
                        FlowArg::Xonxoff => FlowControl::Software,
                        FlowArg::Rtscts => FlowControl::Hardware,
                    }),
                }),
            ),
            SerialCmd::Modem {
                device,
                dtr,
                rts,
                target,
            } => {
                let on = |v: Option<OnOff>| v.map(|v| matches!(v, OnOff::On));
                (
                    device,
                    target,
                    Request::Modem {
                        dtr: on(dtr),
                        rts: on(rts),
                    },
                )
            }
            SerialCmd::Get { device, target } => (device, target, Request::Get),
        }
    }
}

impl KindVerb for SerialVerb {
    fn run(self, host: &dyn VerbHost) -> BoxFuture<'_, Result<(), VerbError>> {
        let cmd = match self {
            SerialVerb::Serial { cmd } => cmd,
            SerialVerb::Console(args) => return super::console::run(host, args),
        };
        let (device, target, req) = cmd.request();
        Box::pin(async move { run_request(host, &target, device, DeviceRequest::Serial(req)).await })
    }
}
