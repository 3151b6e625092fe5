//! The processes a test starts (syncctl, etcdctl, consul, redis-cli): short ones run to their
//! end with their output, long ones run in the background with their output in files that can
//! be read while they run. Every one is killed when the test ends, whichever way it ends.

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    process::{Child, Command},
    time::Instant,
};

/// How often the waits below look again.
const POLL: Duration = Duration::from_millis(20);

/// A directory of the test's own files, removed when the test ends.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new() -> Result<Scratch, String> {
        let dir =
            std::env::temp_dir().join(format!("syncctl-clitest-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(Scratch { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `syncctl [--backend URL] ARGS`, without the caller's SYNC_BACKEND (only `backend` counts).
pub fn syncctl(backend: Option<&str>, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_syncctl"));
    command.env_remove("SYNC_BACKEND");
    if let Some(url) = backend {
        command.arg("--backend").arg(url);
    }
    command.args(args);
    command
}

/// The command as a person would type it, for messages: the program's file name and the args.
fn label(command: &Command) -> String {
    let std = command.as_std();
    let program = Path::new(std.get_program())
        .file_name()
        .map_or_else(|| std.get_program().into(), |n| n.to_os_string());
    std::iter::once(program.as_os_str())
        .chain(std.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains([' ', '"', '\'', '$', ';']) {
                format!("{a:?}")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A process's status as a shell reports it: its code, or 128 + the signal that ended it.
fn code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// What a finished command did.
pub struct Out {
    pub label: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Everything about it, for a failure message.
    pub fn said(&self) -> String {
        format!(
            "`{}` exited {}, stdout {:?}, stderr {:?}",
            self.label, self.code, self.stdout, self.stderr
        )
    }

    /// It exited with `want`.
    pub fn code(self, want: i32) -> Result<Out, String> {
        if self.code != want {
            return Err(format!("expected exit {want}: {}", self.said()));
        }
        Ok(self)
    }

    /// It succeeded.
    pub fn ok(self) -> Result<Out, String> {
        self.code(0)
    }

    /// It failed with `want` and said why as syncctl must: exactly one non-empty line on
    /// stderr starting "syncctl: ", and no panic or backtrace. The line.
    pub fn fails(&self, want: i32) -> Result<String, String> {
        let lines: Vec<&str> = self.stderr.lines().collect();
        let lower = self.stderr.to_lowercase();
        let problem = if self.code != want {
            format!("expected exit {want}")
        } else if lines.len() != 1 {
            format!("expected one line on stderr, got {}", lines.len())
        } else if lines[0].trim().len() <= "syncctl:".len() || !lines[0].starts_with("syncctl: ") {
            "the stderr line is not a message starting \"syncctl: \"".to_string()
        } else if lower.contains("panicked") || lower.contains("backtrace") {
            "stderr shows a panic or a backtrace".to_string()
        } else {
            return Ok(lines[0].to_string());
        };
        Err(format!("{problem}: {}", self.said()))
    }

    /// stdout as JSON.
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_str(&self.stdout)
            .map_err(|e| format!("stdout is not JSON ({e}): {}", self.said()))
    }
}

/// Runs `command` to its end, at most `limit` (then it is killed): what it did.
pub async fn output(mut command: Command, limit: Duration) -> Result<Out, String> {
    let label = label(&command);
    command.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(limit, command.output())
        .await
        .map_err(|_| format!("`{label}` did not exit within {limit:?}"))?
        .map_err(|e| format!("running `{label}`: {e}"))?;
    Ok(Out {
        label,
        code: code(out.status),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Names the output files of the background processes apart.
static SPAWNED: AtomicU64 = AtomicU64::new(0);

/// A command running in the background, in a process group of its own, its stdout and stderr
/// in files of the test's [`Scratch`]; killed with its group when dropped before it exited.
pub struct Proc {
    pub label: String,
    child: Child,
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
    exited: Option<i32>,
}

impl Proc {
    pub fn spawn(scratch: &Scratch, mut command: Command) -> Result<Proc, String> {
        let label = label(&command);
        let n = SPAWNED.fetch_add(1, Ordering::Relaxed);
        let (stdout, stderr) = (
            scratch.path(&format!("proc{n}.out")),
            scratch.path(&format!("proc{n}.err")),
        );
        let file = |path: &Path| {
            std::fs::File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(file(&stdout)?)
            .stderr(file(&stderr)?)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting `{label}`: {e}"))?;
        let pid = child.id().ok_or("a child without a pid")?;
        Ok(Proc {
            label,
            child,
            pid,
            stdout,
            stderr,
            exited: None,
        })
    }

    /// What it printed on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything about it, for a failure message.
    pub fn said(&self) -> String {
        let status = self
            .exited
            .map_or_else(|| "still running".to_string(), |c| format!("exited {c}"));
        format!(
            "`{}` {status}, stdout {:?}, stderr {:?}",
            self.label,
            self.stdout(),
            self.stderr()
        )
    }

    /// Its status once it exits, waiting at most `limit`.
    pub async fn exits_within(&mut self, limit: Duration) -> Result<i32, String> {
        if let Some(code) = self.exited {
            return Ok(code);
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = Some(code(status));
                Ok(code(status))
            }
            Ok(Err(e)) => Err(format!("waiting for `{}`: {e}", self.label)),
            Err(_) => Err(format!("did not exit within {limit:?}: {}", self.said())),
        }
    }

    /// It exits with `want` within `limit`.
    pub async fn exits_with(&mut self, want: i32, limit: Duration) -> Result<(), String> {
        let got = self.exits_within(limit).await?;
        if got != want {
            return Err(format!("expected exit {want}: {}", self.said()));
        }
        Ok(())
    }

    /// It has not exited.
    pub fn running(&mut self) -> Result<(), String> {
        if self.exited.is_none() {
            match self.child.try_wait() {
                Ok(None) => return Ok(()),
                Ok(Some(status)) => self.exited = Some(code(status)),
                Err(e) => return Err(format!("checking on `{}`: {e}", self.label)),
            }
        }
        Err(format!("exited too early: {}", self.said()))
    }

    /// It does not exit for `window` (it waits on something it must not get yet).
    pub async fn keeps_running_for(&mut self, window: Duration) -> Result<(), String> {
        self.running()?;
        match tokio::time::timeout(window, self.child.wait()).await {
            Err(_) => Ok(()),
            Ok(Ok(status)) => {
                self.exited = Some(code(status));
                Err(format!("exited within {window:?}: {}", self.said()))
            }
            Ok(Err(e)) => Err(format!("waiting for `{}`: {e}", self.label)),
        }
    }

    /// Sends SIGKILL (to it alone, not its group).
    pub fn kill(&mut self) -> Result<(), String> {
        self.running()?;
        self.child
            .start_kill()
            .map_err(|e| format!("killing `{}`: {e}", self.label))
    }

    /// Sends `signal` (a name such as TERM) to it alone, with the shell's own `kill`.
    pub async fn signal(&mut self, signal: &str) -> Result<(), String> {
        self.running()?;
        let kill = format!("kill -{signal} {}", self.pid);
        let mut command = Command::new("sh");
        command.args(["-c", &kill]);
        output(command, Duration::from_secs(5)).await?.ok()?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Not seen to exit, so still ours: its group goes too (consul lock's script, …).
        // kill_on_drop then kills it again, which is harmless.
        if self.exited.is_none() {
            let _ = std::process::Command::new("sh")
                .args(["-c", &format!("kill -KILL -{} 2>/dev/null", self.pid)])
                .status();
        }
    }
}

/// Polls `check` until it gives a value, for at most `limit`.
pub async fn poll<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The first line written to `path` (a whole one, newline included), within `limit`; `proc`,
/// which is to write it, must not exit meanwhile.
pub async fn line_in(path: &Path, proc: &mut Proc, limit: Duration) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some((line, _)) = text.split_once('\n') {
            return Ok(line.to_string());
        }
        proc.running()?;
        if Instant::now() >= deadline {
            return Err(format!(
                "nothing written to {} within {limit:?}: {}",
                path.display(),
                proc.said()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The process id that `proc`'s command writes to `path` (`echo $$ > path`), within `limit`.
pub async fn pid_in(path: &Path, proc: &mut Proc, limit: Duration) -> Result<u32, String> {
    let line = line_in(path, proc, limit).await?;
    line.trim()
        .parse()
        .map_err(|e| format!("{} holds {line:?}, not a pid: {e}", path.display()))
}

/// The state letter and process group of `pid`, from /proc.
fn stat(pid: &str) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp …"; comm may hold spaces and parentheses.
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// A zombie has ended; it only waits for a parent to reap it (which an orphan's may never do).
fn live_state(state: char) -> bool {
    !matches!(state, 'Z' | 'X' | 'x')
}

/// Whether `pid` is a running process.
pub fn alive(pid: u32) -> bool {
    stat(&pid.to_string()).is_some_and(|(state, _)| live_state(state))
}

/// A running process of the process group `pgid`, if any.
pub fn group_member(pgid: u32) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        let pid = name.parse().ok()?;
        let (state, pgrp) = stat(&name)?;
        (pgrp == pgid && live_state(state)).then_some(pid)
    })
}
