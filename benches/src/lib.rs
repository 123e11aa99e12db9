//! jmp benchmarks: every benchmark runs its baseline and its peers in the same run, interleaved
//! round by round, and reports medians and ratios. The driver is `src/main.rs`
//! (`cargo run --release -p jmp-bench -- [all|BENCHMARK...]
//! [--rounds N]`); the method and recorded figures are in `docs/benchmarks.md`.

pub mod boards;
pub mod can;
pub mod cluster;
pub mod console_flash;
pub mod controller;
pub mod flood;
pub mod growth;
pub mod jmp;
pub mod memory;
pub mod net;
pub mod proc;
pub mod pytest;
pub mod quic;
pub mod relay;
pub mod serial;
pub mod ssh;
pub mod stats;
pub mod storage;
pub mod storage_flood;
pub mod tcp;
pub mod usb;
pub mod via_relay;
