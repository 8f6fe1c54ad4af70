//! Rendezvous: a public, registration-free HTTP key-value rendezvous server.
//!
//! The data path, in module order: `server` (one SO_REUSEPORT listener and
//! monoio executor per core) -> `conn` (keep-alive loop, deadlines, limits)
//! -> `http` (head parse, bounded body, response encoding) -> `api` (route,
//! key/ttl/secret/client-IP decoding) -> `router` (owner core of the key and
//! of the client's rate-limit bucket; cross-core messages) -> `command`
//! (what the owner applies) -> `shard` / `ratelimit` (pure state machines).
//! `main` only parses the command line, sets up logging, and reports startup
//! failures with a clear message and a non-zero exit.

mod api;
mod clientip;
mod command;
mod config;
mod conn;
mod docs;
mod duration;
mod error;
mod http;
mod lifecycle;
mod metrics;
mod ratelimit;
mod router;
mod secret;
mod server;
mod shard;
mod snapshot;

use std::process::ExitCode;

fn main() -> ExitCode {
    let parsed = match config::parse(std::env::args().skip(1)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rendezvous: {e}\nRun 'rendezvous -h' for the list of flags.");
            return ExitCode::from(2);
        }
    };
    let config = match parsed {
        config::Parsed::Help(text) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        config::Parsed::Run(c) => *c,
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    match server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
