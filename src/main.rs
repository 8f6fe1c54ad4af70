//! The `rendezvous` binary: parse the command line, set up logging, run the
//! server (or print help, the version, or a dump of a data directory), and
//! turn failures into a clear message and a non-zero exit (2 for a bad
//! command line, 1 for anything else).

use rendezvous::{config, logging, persist, runtime::server};
use std::process::ExitCode;

/// mimalloc: no per-block header and fine size classes, which keeps a stored
/// entry's heap overhead small (see the memory figures in the README), and
/// fast thread-local frees for the cross-core allocation pattern of writes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    ignore_file_size_signal();
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
            return match persist::dump::run(&dir, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rendezvous: {e}");
                    ExitCode::FAILURE
                }
            };
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

/// A file-size limit (RLIMIT_FSIZE, systemd's `LimitFSIZE=`) must not kill
/// the process at the next log append: with SIGXFSZ ignored the write fails
/// with EFBIG, and the log moves to a new segment.
fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN touches no memory of
    // ours and is done before any thread starts; `tests/persistence.rs`
    // runs the server under a small RLIMIT_FSIZE and checks it survives.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
