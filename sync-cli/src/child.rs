//! CMD as a child of syncctl: spawned so that it cannot outlive syncctl, signalled as a group,
//! and ended (SIGTERM, then SIGKILL after a grace period) when what it ran under is lost.

use std::{
    future::Future,
    io::IsTerminal,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use rustix::process::{Pid, Signal};
use tokio::{
    process::{Child, Command},
    signal::unix::{SignalKind, signal},
};

use crate::exit::{self, Exit};

/// A running CMD.
pub struct Spawned {
    pub child: Child,
    pid: Pid,
    /// Whether CMD leads a process group of its own (signals then reach its children too).
    group: bool,
}

/// How CMD ended.
pub enum Ending {
    /// It exited on its own (or on a signal syncctl passed on).
    Exited(ExitStatus),
    /// What it ran under was lost, for this reason; it was terminated.
    Lost(String),
}

/// The stdio of CMD: inherited (lock, elect) or piped (a task's payload and output).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Io {
    Inherit,
    Piped,
}

/// Starts `argv` with `env` added to syncctl's environment.
///
/// Unless syncctl's stdin is a terminal, CMD leads a process group of its own, as with
/// `timeout(1)`: signals syncctl passes on then reach everything CMD started. On a terminal
/// it stays in syncctl's group, so that it can read the terminal and gets Ctrl-C from it.
pub fn spawn(argv: &[String], env: &[(&str, String)], io: Io) -> Result<Spawned, Exit> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| Exit::failed("no command given after --"))?;
    let mut command = Command::new(program);
    command.args(args).envs(env.iter().map(|(k, v)| (*k, v)));
    if io == Io::Piped {
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
    }
    // A job's command never needs the terminal, and must not get its Ctrl-C.
    let group = io == Io::Piped || !on_a_terminal();
    if group {
        command.process_group(0);
    }
    die_with_parent(&mut command);
    let child = command.spawn().map_err(|e| {
        let status = match e.kind() {
            std::io::ErrorKind::NotFound => exit::NOT_FOUND,
            _ => exit::CANNOT_RUN,
        };
        Exit::new(status, format!("{program}: {e}"))
    })?;
    let raw = child.id().and_then(|id| i32::try_from(id).ok());
    let pid = raw
        .and_then(Pid::from_raw)
        .ok_or_else(|| Exit::failed(format!("{program}: exited before it could be watched")))?;
    Ok(Spawned { child, pid, group })
}

/// Whether syncctl runs on a terminal (any of its stdio is one): CMD then stays in syncctl's
/// process group, so that it can use the terminal without being stopped (SIGTTIN, SIGTTOU)
/// and Ctrl-C and Ctrl-Z reach both.
fn on_a_terminal() -> bool {
    std::io::stdin().is_terminal()
        || std::io::stdout().is_terminal()
        || std::io::stderr().is_terminal()
}

/// CMD gets SIGKILL from the kernel when syncctl dies, even by SIGKILL: otherwise it would
/// run on without the lock once the lease expires. The signal follows the thread that
/// spawned CMD, which is why syncctl runs on a single-threaded runtime (see main.rs).
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the hook runs in the forked child before exec and makes two syscalls (prctl,
    // getppid); it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // syncctl died between fork and prctl: the kernel will not tell us.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::other("syncctl exited"));
            }
            Ok(())
        });
    }
}

impl Spawned {
    /// Sends `signal` to CMD (and its group); a CMD already gone is not an error.
    pub fn signal(&self, signal: Signal) {
        let _ = if self.group {
            rustix::process::kill_process_group(self.pid, signal)
        } else {
            rustix::process::kill_process(self.pid, signal)
        };
    }

    /// Waits for CMD to exit, passing on the signals syncctl gets (when given `signals`), and
    /// ends it if `lost` fires first.
    pub async fn supervise(
        &mut self,
        lost: impl Future<Output = String>,
        grace: Duration,
        mut signals: Option<&mut Signals>,
    ) -> Result<Ending, Exit> {
        tokio::pin!(lost);
        loop {
            tokio::select! {
                status = self.child.wait() => return Ok(Ending::Exited(status.map_err(Exit::failed)?)),
                reason = &mut lost => {
                    self.end(grace, signals.as_deref_mut()).await?;
                    return Ok(Ending::Lost(reason));
                }
                got = next(signals.as_deref_mut()) => self.pass_on(got),
            }
        }
    }

    /// SIGTERM, then SIGKILL if CMD is still there after `grace`.
    pub async fn end(
        &mut self,
        grace: Duration,
        mut signals: Option<&mut Signals>,
    ) -> Result<(), Exit> {
        self.signal(Signal::TERM);
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                status = self.child.wait() => {
                    status.map_err(Exit::failed)?;
                    // Whatever CMD left in its group goes too. (Without a group, CMD's pid is
                    // free again now: nothing may be sent to it.)
                    if self.group {
                        self.signal(Signal::KILL);
                    }
                    return Ok(());
                }
                () = &mut deadline => {
                    self.signal(Signal::KILL);
                    self.child.wait().await.map_err(Exit::failed)?;
                    return Ok(());
                }
                got = next(signals.as_deref_mut()) => self.pass_on(got),
            }
        }
    }

    /// Ends what CMD left running in its process group after it exited (a `&` job, say): it
    /// must not run on once the hold is let go of. SIGTERM, then SIGKILL after `grace`.
    pub async fn end_leftovers(&self, grace: Duration) {
        if !self.group || rustix::process::test_kill_process_group(self.pid).is_err() {
            return;
        }
        self.signal(Signal::TERM);
        let deadline = tokio::time::Instant::now() + grace;
        while rustix::process::test_kill_process_group(self.pid).is_ok() {
            if tokio::time::Instant::now() >= deadline {
                self.signal(Signal::KILL);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A signal syncctl got, for CMD. On a terminal, Ctrl-C already reached CMD, which shares
    /// syncctl's process group: passing it on would deliver it twice.
    fn pass_on(&self, got: Signal) {
        if self.group || got != Signal::INT {
            self.signal(got);
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught from the start so that none kills syncctl while it
/// holds something: while waiting they end the wait, while CMD runs they are passed on.
pub struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Catches those of the three that syncctl was not told to ignore: an ignored one (under
    /// `nohup`, or `&` in a script) stays ignored, for syncctl and for CMD, which inherits it.
    pub fn catch() -> Result<Signals, Exit> {
        let ignored = ignored_signals();
        let catch = |kind: SignalKind| {
            if ignored & (1 << (kind.as_raw_value() - 1)) != 0 {
                return Ok(None);
            }
            signal(kind)
                .map(Some)
                .map_err(|e| Exit::failed(format!("signals: {e}")))
        };
        Ok(Signals {
            int: catch(SignalKind::interrupt())?,
            term: catch(SignalKind::terminate())?,
            hup: catch(SignalKind::hangup())?,
        })
    }

    /// The next signal.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            () = one(self.int.as_mut()) => Signal::INT,
            () = one(self.term.as_mut()) => Signal::TERM,
            () = one(self.hup.as_mut()) => Signal::HUP,
        }
    }
}

/// The next delivery of a caught signal; never for one not caught.
async fn one(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// The set of signals this process ignores (bit N-1 for signal N), from `/proc/self/status`;
/// none where that cannot be read.
fn ignored_signals() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .unwrap_or(0)
}

/// The next signal, or never without `signals`.
async fn next(signals: Option<&mut Signals>) -> Signal {
    match signals {
        Some(signals) => signals.recv().await,
        None => std::future::pending().await,
    }
}

/// The status of syncctl ended by `signal` before CMD started: 128 + its number.
pub fn interrupted(signal: Signal) -> Exit {
    Exit::silent(u8::try_from(128 + signal.as_raw()).unwrap_or(exit::FAILED))
}
