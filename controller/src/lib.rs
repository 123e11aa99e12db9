//! jmp-controller: the lab's controller. Identities (clients, exporters, admins) with signed
//! credentials; exporters registering with their labels; leases on exporters chosen by label
//! selector, queued fairly and ended on time; lease tokens jmpd verifies offline; metrics.
//!
//! Owns: [`book`] (the lease logic, pure and driven by `now`), [`store`] (the `LeaseStore`
//! trait and its embedded redb default), the API server, token signing, `/metrics`.
//! Does not own: the data path (clients connect straight to exporters), the wire codec
//! (jmp-protocol), QUIC and token crypto (jmp-transport).

pub mod book;
pub mod store;

pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
