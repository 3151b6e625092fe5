//! syncctl's exit statuses, and the one-line error that goes with the non-zero ones.

use std::{fmt, process::ExitStatus};

use sync_core::ErrorKind;

/// A negative answer: no such key, version mismatch, no leader, job failed.
pub const NEGATIVE: u8 = 1;
/// The lock or leadership was lost while CMD ran; CMD was terminated.
pub const LOST: u8 = 122;
/// `--wait` or `--timeout` expired.
pub const EXPIRED: u8 = 124;
/// syncctl itself failed: bad URL or config, backend unreachable, unsupported primitive.
pub const FAILED: u8 = 125;
/// CMD was found but could not be run.
pub const CANNOT_RUN: u8 = 126;
/// CMD was not found.
pub const NOT_FOUND: u8 = 127;
/// The reader of stdout went away (128 + SIGPIPE, as a shell reports it).
pub const BROKEN_PIPE: u8 = 141;

/// Why syncctl stops with a non-zero status: the status and a one-line message (empty when
/// the status says it all, as with a child's own status).
#[derive(Debug)]
pub struct Exit {
    pub status: u8,
    pub message: String,
}

impl Exit {
    pub fn new(status: u8, message: impl fmt::Display) -> Exit {
        Exit {
            status,
            message: one_line(&message.to_string()),
        }
    }

    /// syncctl's own failure (status 125).
    pub fn failed(message: impl fmt::Display) -> Exit {
        Exit::new(FAILED, message)
    }

    /// A status with nothing more to say.
    pub fn silent(status: u8) -> Exit {
        Exit {
            status,
            message: String::new(),
        }
    }
}

/// A backend error: a timeout is an expired wait, the rest is syncctl failing.
impl From<sync_core::Error> for Exit {
    fn from(e: sync_core::Error) -> Exit {
        let status = match e.kind() {
            ErrorKind::Timeout => EXPIRED,
            _ => FAILED,
        };
        Exit::new(status, describe(&e))
    }
}

/// Errors of these kinds are a "no" (exit 1), the rest syncctl's failure.
pub fn negative_on(e: sync_core::Error, kinds: &[ErrorKind]) -> Exit {
    let negative = kinds.contains(&e.kind());
    let mut exit = Exit::from(e);
    if negative {
        exit.status = NEGATIVE;
    }
    exit
}

/// The error and its root cause (unless the message already says it): the causes between
/// tend to repeat one another.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let text = e.to_string();
    let mut root = None;
    let mut cause = e.source();
    while let Some(c) = cause {
        root = Some(c);
        cause = c.source();
    }
    match root.map(|r| r.to_string()) {
        Some(r) if !r.is_empty() && !text.contains(&r) => format!("{text}: {r}"),
        _ => text,
    }
}

/// Newlines and runs of spaces folded: every message is one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A child's status as syncctl's: its exit code, or 128 + the signal that ended it, as shells
/// report it.
pub fn of_child(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(i32::from(FAILED));
    u8::try_from(code).unwrap_or(FAILED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_child_killed_by_a_signal_is_128_plus_it() {
        assert_eq!(of_child(ExitStatus::from_raw(0)), 0);
        assert_eq!(of_child(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(of_child(ExitStatus::from_raw(15)), 143);
    }

    #[test]
    fn messages_are_one_line() {
        assert_eq!(one_line("a\n  b\tc\n"), "a b c");
    }

    #[test]
    fn a_timeout_is_an_expired_wait() {
        let e = sync_core::Error::new(ErrorKind::Timeout, "waited 1s");
        assert_eq!(Exit::from(e).status, EXPIRED);
        let e = sync_core::Error::new(ErrorKind::Unavailable, "down");
        assert_eq!(Exit::from(e).status, FAILED);
    }
}
