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

/// mimalloc's `mi_option_allow_thp`: its place in mimalloc 3's option enum
/// (the crate names only older options). A test checks the number against
/// the library's own name for it.
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

fn main() -> ExitCode {
    keep_huge_pages();
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

/// Keeps the heap in transparent huge pages. mimalloc asks for them, but by
/// default gives freed memory back to the OS in 64 KiB pieces, which splits
/// them, so a store that has seen replacements ends up mostly in 4 KiB
/// pages (here 62-80 of about 210 MiB, 1M keys). Every lookup in a large store is a
/// few cache misses, each a page walk as well once the TLB cannot cover the
/// heap. With `allow_thp` 2 mimalloc gives memory back only in whole huge
/// pages (where the kernel offers them at all): 1M keys, public traffic, 5
/// alternated rounds: CPU per GET 0.94x (0.92-1.02), per set 0.96x
/// (0.95-1.00), for 4-12% more RSS (freed memory kept for reuse); a small
/// store is unchanged. An operator who would rather have the memory back
/// sets `MIMALLOC_ALLOW_THP=1`, which this leaves alone (mimalloc matches
/// its variables' names in any case, and so does this).
fn keep_huge_pages() {
    if thp_set_outside() {
        return;
    }
    // SAFETY: `mi_option_set` is mimalloc's call for changing an option
    // while running: a store into its option table, which it reads when it
    // next gives memory back (2: in whole huge pages, mimalloc 3's
    // `os.c`). The server calls it first thing in `main`, before any other
    // thread exists; the test calls it while the test harness's other
    // threads wait. The test checks that the number names `allow_thp`.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 2) }
}

/// Whether the environment sets mimalloc's `allow_thp` itself.
fn thp_set_outside() -> bool {
    std::env::vars_os().any(|(k, _)| k.eq_ignore_ascii_case("MIMALLOC_ALLOW_THP"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::{c_char, c_void, CStr};

    unsafe extern "C" {
        /// mimalloc prints every option as `option '<name>': <value>`.
        fn mi_options_print_out(out: libmimalloc_sys::mi_output_fun, arg: *mut c_void);
    }

    /// Appends one message of mimalloc's to the `String` behind `arg`.
    unsafe extern "C" fn collect(msg: *const c_char, arg: *mut c_void) {
        // SAFETY: `arg` is the `&mut String` passed below, alive for the
        // call; mimalloc passes a NUL-terminated message.
        let (text, msg) = unsafe { (&mut *arg.cast::<String>(), CStr::from_ptr(msg)) };
        text.push_str(&msg.to_string_lossy());
    }

    #[test]
    fn the_option_set_is_allow_thp() {
        keep_huge_pages();
        let mut text = String::new();
        // SAFETY: `collect` matches mimalloc's output callback and `text`
        // outlives the call.
        unsafe { mi_options_print_out(Some(collect), (&mut text as *mut String).cast()) };
        // mimalloc prints its options in their order: the one at our
        // number must be `allow_thp`.
        let options: Vec<&str> = text.lines().filter(|l| l.starts_with("option '")).collect();
        let ours = options.get(MI_OPTION_ALLOW_THP as usize).copied().unwrap_or_default();
        assert!(ours.starts_with("option 'allow_thp': "), "{text}");
        assert!(thp_set_outside() || ours.starts_with("option 'allow_thp': 2"), "{text}");
    }
}
