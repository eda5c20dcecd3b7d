//! pcrd: the daemon on a PCR lab's instrument PC.
//!
//! It tracks tubes and plates in an embedded store, serves the lab's HTTP API and
//! command line, and (as later work lands) drives instruments and delivers results.
//! The map of the code is `ARCHITECTURE.md` in the shared design folder; the short
//! version: `store` (sled with a durability barrier), `lab` (state changes, one
//! transaction each, with the audit trail), `api` (axum, OpenAPI), `cli` (clap).

pub mod analysers;
pub mod api;
pub mod cli;
pub mod config;
pub mod cyclers;
#[cfg(feature = "demo")]
pub mod demo;
pub mod folders;
pub mod instruments;
pub mod kits;
pub mod lab;
pub mod metrics;
pub mod model;
pub mod outbox;
pub mod panel;
pub mod review;
pub mod runs;
pub mod sinks;
pub mod store;
pub mod telemetry;
