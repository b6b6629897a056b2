//! Standard output that a closed reader cannot crash: `lifeboat ls | head -1`.
//!
//! `println!` panics when stdout is a pipe whose reader has gone (the Rust runtime ignores
//! `SIGPIPE`, so the write fails with `EPIPE`). Every command prints through [`outln!`]
//! instead: on a broken pipe the process exits at once with status 0 (the reader asked for no
//! more; nothing is wrong), on any other write error with status 1 and a message on stderr.
//! `SIGPIPE` stays ignored, so a coordinator that dies mid-RPC is an error, never a signal.

use std::io::Write;

/// Writes one line to stdout (see the module docs for what happens when that fails).
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.write_all(b"\n")) {
        exit_on(e);
    }
}

/// Exits for a failed stdout write: status 0 on a broken pipe, else 1 with the error on stderr.
pub fn exit_on(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    let _ = writeln!(std::io::stderr(), "error: cannot write to stdout: {e}");
    std::process::exit(1);
}

/// `println!` for command output: a closed stdout (broken pipe) ends the process quietly with
/// status 0 instead of panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}
