//! The `rendezvous` binary: parse the command line, set up logging, run the
//! server (or print help, the version, or a dump of a data directory), and
//! turn failures into a clear message and a non-zero exit (2 for a bad
//! command line, 1 for anything else).

use rendezvous::{config, logging, runtime::server};
use std::process::ExitCode;

/// mimalloc: no per-block header and fine size classes, which keeps a stored
/// entry's heap overhead small (see the memory figures in the README), and
/// fast thread-local frees for the cross-core allocation pattern of writes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let parsed = match config::parse(std::env::args().skip(1)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rendezvous: {e}\nRun 'rendezvous -h' for the list of flags.");
            return ExitCode::from(2);
        }
    };
    let config = match parsed {
        config::Parsed::Help(text) | config::Parsed::Version(text) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        config::Parsed::Dump(dir) => {
            eprintln!("rendezvous: -dump {} is not available in this build", dir.display());
            return ExitCode::FAILURE;
        }
        config::Parsed::Run(c) => *c,
    };
    logging::init(config.log_format, config.log_level);
    for w in &config.warnings {
        log::warn!("{w}");
    }
    match server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
