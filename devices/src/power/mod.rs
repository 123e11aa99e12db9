//! Power: a board's power switch as `jmp power on|off|cycle|status`. No channels: every
//! operation is a device request, answered with the state afterwards, and changes are pushed
//! to the attached client as status. Backends: external commands (a relay board's CLI, a PDU's
//! `snmpset`, `uhubctl`) and the simulated board.

pub mod bridge;
pub mod command;
pub mod driver;
pub mod ops;
pub mod spec;

pub use bridge::PowerBridge;
pub use driver::PowerDriver;
pub use spec::{PowerSimSpec, PowerSpec};
