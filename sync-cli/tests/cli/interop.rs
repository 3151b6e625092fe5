//! `syncctl lock` on the empty namespace against the backends' own lock tools, both ways:
//! `etcdctl lock NAME` (etcd's concurrency.Mutex on NAME/) and `consul lock PREFIX` (Consul's
//! api.Lock on PREFIX/.lock) exclude syncctl's `lock NAME` / `lock PREFIX`, and the reverse.

use std::{path::Path, time::Duration};

use tokio::time::Instant;

use crate::{
    harness::{Case, Live, TestResult},
    procs::{Proc, Scratch, line_in, output, syncctl},
    services::{self, unique},
};

/// How long the first holder may take to connect and acquire.
const STARTUP: Duration = Duration::from_secs(15);
/// How long the other side may take to get the lock once the holder let go.
const HANDOVER: Duration = Duration::from_secs(5);

pub fn cases(out: &mut Vec<Case>) {
    for tool in [Tool::Etcdctl, Tool::Consul] {
        let (live, program) = (tool.live(), tool.program());
        out.push(Case::live(
            format!("interop::{program}_lock_excludes_syncctl"),
            live,
            move |base| tool_excludes_syncctl(tool, base),
        ));
        out.push(Case::live(
            format!("interop::syncctl_excludes_{program}_lock"),
            live,
            move |base| syncctl_excludes_tool(tool, base),
        ));
    }
}

/// A backend's own lock tool.
#[derive(Clone, Copy)]
enum Tool {
    /// `etcdctl lock NAME`: prints the key it owns (`NAME/<lease hex>`) and holds until killed.
    Etcdctl,
    /// `consul lock PREFIX SCRIPT`: runs SCRIPT only while it holds, then lets go.
    Consul,
}

impl Tool {
    fn live(self) -> Live {
        match self {
            Tool::Etcdctl => Live::Etcd,
            Tool::Consul => Live::Consul,
        }
    }

    fn program(self) -> &'static str {
        match self {
            Tool::Etcdctl => "etcdctl",
            Tool::Consul => "consul",
        }
    }

    fn name(self) -> String {
        format!("{} lock", self.program())
    }

    /// Starts the tool on lock `name`. Consul's script touches `marker` once it holds, and
    /// with `keep` then holds for 30 s; etcdctl always holds until it is signalled.
    fn spawn(
        self,
        base: &str,
        scratch: &Scratch,
        name: &str,
        marker: &Path,
        keep: bool,
    ) -> Result<Proc, String> {
        let command = match self {
            Tool::Etcdctl => {
                let mut command = services::etcdctl(base);
                command.args(["lock", name]);
                command
            }
            Tool::Consul => {
                let keep = if keep { "; exec sleep 30" } else { "" };
                let script = format!("touch '{}'{keep}", marker.display());
                services::consul_lock(base, name, &script)?
            }
        };
        Proc::spawn(scratch, command)
    }

    /// Whether the tool holds `name`, as it shows it.
    fn holds(self, ctl: &Proc, name: &str, marker: &Path) -> Result<bool, String> {
        match self {
            Tool::Etcdctl => match ctl.stdout().lines().next() {
                None => Ok(false),
                Some(key) if key.starts_with(&format!("{name}/")) => Ok(true),
                Some(_) => Err(format!(
                    "etcdctl lock printed no key of {name}: {}",
                    ctl.said()
                )),
            },
            Tool::Consul => Ok(marker.exists()),
        }
    }

    /// Waits (up to `limit`) until the tool holds `name`.
    async fn held_within(
        self,
        ctl: &Proc,
        name: &str,
        marker: &Path,
        limit: Duration,
    ) -> TestResult {
        let deadline = Instant::now() + limit;
        while !self.holds(ctl, name, marker)? {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not get the lock within {limit:?}: {}",
                    self.name(),
                    ctl.said()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// While the tool holds NAME, `syncctl lock NAME --wait 1s` gives up (124) and one with a
/// longer wait goes on waiting; once the tool lets go (SIGTERM), that one gets the lock.
async fn tool_excludes_syncctl(tool: Tool, base: String) -> TestResult {
    let scratch = Scratch::new()?;
    let (name, marker) = (unique("interop"), scratch.path("marker"));
    let url = services::url(&base, "", "");
    let mut ctl = tool.spawn(&base, &scratch, &name, &marker, true)?;
    tool.held_within(&ctl, &name, &marker, STARTUP).await?;
    let bounded = syncctl(Some(&url), &["lock", &name, "--wait", "1s", "--", "true"]);
    output(bounded, Duration::from_secs(20))
        .await?
        .code(124)
        .map_err(|e| format!("while {} holds the lock: {e}", tool.name()))?;
    let wait = ["lock", &name, "--wait", "30s", "--", "true"];
    let mut waiter = Proc::spawn(&scratch, syncctl(Some(&url), &wait))?;
    waiter
        .keeps_running_for(Duration::from_millis(500))
        .await
        .map_err(|e| format!("while {} holds the lock: {e}", tool.name()))?;
    ctl.signal("TERM").await?;
    let let_go = Instant::now();
    waiter.exits_with(0, HANDOVER).await.map_err(|e| {
        format!(
            "after {} was sent SIGTERM: {e}; {}",
            tool.name(),
            ctl.said()
        )
    })?;
    println!(
        "measured: syncctl got the lock {:?} after {} was sent SIGTERM",
        let_go.elapsed(),
        tool.name()
    );
    ctl.exits_within(Duration::from_secs(10)).await?;
    Ok(())
}

/// While `syncctl lock NAME` runs its command, the tool does not get NAME (1.5 s); after
/// SIGTERM to syncctl (passed on to its command, which dies of it; then syncctl releases) it
/// gets NAME, and syncctl exits with its command's status, 143.
async fn syncctl_excludes_tool(tool: Tool, base: String) -> TestResult {
    let scratch = Scratch::new()?;
    let (name, marker, held) = (
        unique("interop"),
        scratch.path("marker"),
        scratch.path("held"),
    );
    let url = services::url(&base, "", "");
    let hold = r#"echo held > "$F"; exec sleep 30"#;
    let mut command = syncctl(Some(&url), &["lock", &name, "--", "sh", "-c", hold]);
    command.env("F", &held);
    let mut holder = Proc::spawn(&scratch, command)?;
    line_in(&held, &mut holder, STARTUP).await?;
    let mut ctl = tool.spawn(&base, &scratch, &name, &marker, false)?;
    ctl.keeps_running_for(Duration::from_millis(1500)).await?;
    if tool.holds(&ctl, &name, &marker)? {
        return Err(format!(
            "{} got the lock syncctl holds: {}",
            tool.name(),
            ctl.said()
        ));
    }
    holder.signal("TERM").await?;
    let let_go = Instant::now();
    tool.held_within(&ctl, &name, &marker, HANDOVER)
        .await
        .map_err(|e| format!("after syncctl was sent SIGTERM: {e}; {}", holder.said()))?;
    println!(
        "measured: {} got the lock {:?} after syncctl was sent SIGTERM",
        tool.name(),
        let_go.elapsed()
    );
    holder.exits_with(143, Duration::from_secs(10)).await?;
    match tool {
        Tool::Etcdctl => {
            ctl.signal("TERM").await?;
            ctl.exits_within(Duration::from_secs(10)).await?;
        }
        // Its script only touches the marker: it lets go and exits by itself.
        Tool::Consul => ctl.exits_with(0, Duration::from_secs(10)).await?,
    }
    Ok(())
}
