//! The command line: global options and one subcommand per primitive, each with an example.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

const EXIT_STATUSES: &str = "\
Exit statuses:
  0        success (lock, elect: CMD's own status is passed through)
  1        a negative answer: no such key, version mismatch, no leader, job failed
  2        usage error
  122      the lock or leadership was lost: CMD was terminated (or never started)
  124      --wait or --timeout expired
  125      syncctl failed: bad URL or config, backend unreachable, unsupported
  126, 127 CMD could not be run, CMD not found
  128+N    CMD was killed by signal N; 130, 143: syncctl was interrupted while waiting

Backend: --backend URL, else $SYNC_BACKEND, else --config FILE, else local://
(in-process only). URLs: etcd://h:2379/NS, redis://h:6379/NS, redis+cluster://h1:p1,h2:p2/NS,
consul://h:8500/NS, ntp://h:123, with query keys such as ?ttl=5s; a lone / is the empty
namespace (the layout of etcdctl lock and consul lock).";

/// syncctl: distributed locks, leader election, maps, tasks and time from the shell, on etcd,
/// Redis, Consul, NTP or in-process, chosen by a URL.
#[derive(Debug, Parser)]
#[command(name = "syncctl", version, after_help = EXIT_STATUSES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// The backend URL, e.g. etcd://127.0.0.1:2379/myapp.
    #[arg(
        long,
        global = true,
        env = "SYNC_BACKEND",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub backend: Option<String>,
    /// A TOML file with the backend's config (sync-any's: `backend = "etcd"`, its fields).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print JSON for scripts instead of human-readable text.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress messages on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command while holding a lock.
    #[command(
        after_help = "Example:\n  syncctl --backend etcd://127.0.0.1:2379/ops lock nightly-backup --wait 1m -- ./backup.sh\n\n\
        CMD gets SYNC_LOCK_ID and SYNC_FENCING_TOKEN in its environment. When the lock is lost,\n\
        CMD gets SIGTERM, SIGKILL after --grace, and syncctl exits 122."
    )]
    Lock(LockArgs),
    /// Run a command while leader of a group.
    #[command(
        after_help = "Example:\n  syncctl elect schedulers --id \"$(hostname)\" --value http://10.0.0.7:8080 -- ./scheduler\n\n\
        CMD gets SYNC_LEADER_GROUP, SYNC_CANDIDATE and SYNC_TERM. When leadership is lost,\n\
        CMD gets SIGTERM, SIGKILL after --grace, and syncctl exits 122."
    )]
    Elect(ElectArgs),
    /// Print a group's leader, and with --follow every change.
    #[command(after_help = "Example:\n  syncctl leader schedulers --follow --json")]
    Leader(LeaderArgs),
    /// Print the synchronized time (ntp:// backends).
    #[command(after_help = "Example:\n  syncctl --backend ntp://pool.ntp.org time --interval")]
    Time(TimeArgs),
    /// Read and write a shared versioned map.
    #[command(subcommand)]
    Map(MapCommand),
    /// Submit jobs, wait for them, and run workers.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  syncctl completions bash > /etc/bash_completion.d/syncctl")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// How long to wait, how long the lease lives, and how a lost hold ends CMD.
#[derive(Debug, Args)]
pub struct HoldArgs {
    /// Give up after this long (exit 124); default: wait as long as it takes.
    #[arg(long, value_parser = duration, value_name = "D")]
    pub wait: Option<Duration>,
    /// The lease TTL: a dead syncctl's hold frees after about this long (overrides ?ttl=).
    #[arg(long, value_parser = duration, value_name = "D")]
    pub ttl: Option<Duration>,
    /// Time between SIGTERM and SIGKILL to CMD when the hold is lost.
    #[arg(long, value_parser = duration, value_name = "D", default_value = "10s")]
    pub grace: Duration,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lock's id.
    pub id: String,
    #[command(flatten)]
    pub hold: HoldArgs,
}

#[derive(Debug, Args)]
pub struct ElectArgs {
    /// The election group.
    pub group: String,
    /// This candidate's id.
    #[arg(long = "id", value_name = "ME")]
    pub candidate: String,
    /// The value followers see while this candidate leads.
    #[arg(long, default_value = "")]
    pub value: String,
    #[command(flatten)]
    pub hold: HoldArgs,
}

#[derive(Debug, Args)]
pub struct LeaderArgs {
    /// The election group.
    pub group: String,
    /// Keep printing the leader whenever it changes.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct TimeArgs {
    /// Also print the earliest and latest the time can be.
    #[arg(long)]
    pub interval: bool,
}

#[derive(Debug, Subcommand)]
pub enum MapCommand {
    /// Print a key's value (its bytes, as stored).
    #[command(after_help = "Example:\n  syncctl map get config feature-x")]
    Get { map: String, key: String },
    /// Write a value (VALUE, or stdin without it); prints the new version.
    #[command(after_help = "Example:\n  syncctl map put config feature-x on")]
    Put {
        map: String,
        key: String,
        value: Option<String>,
    },
    /// Write a value only if the key is at a version (or absent); prints the new version.
    #[command(
        after_help = "Example:\n  v=$(syncctl map put config n 1); syncctl map cas config n --expect \"$v\" 2"
    )]
    Cas {
        map: String,
        key: String,
        /// The version the key must be at.
        #[arg(long, value_name = "VERSION", required_unless_present = "absent")]
        expect: Option<u64>,
        /// The key must be absent.
        #[arg(long, conflicts_with = "expect")]
        absent: bool,
        value: Option<String>,
    },
    /// Delete a key (only at a version, with --expect).
    #[command(after_help = "Example:\n  syncctl map del config feature-x")]
    Del {
        map: String,
        key: String,
        /// The version the key must be at.
        #[arg(long, value_name = "VERSION")]
        expect: Option<u64>,
    },
    /// List every entry: key, version, value.
    #[command(after_help = "Example:\n  syncctl map ls config --json")]
    Ls { map: String },
}

/// A job as the command line gives it.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job's name: workers of this name run it.
    pub name: String,
    /// The payload (stdin without it).
    pub payload: Option<String>,
    /// An idempotency key: submitting the same key again returns the same job.
    #[arg(long)]
    pub key: Option<String>,
    /// A label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label)]
    pub labels: Vec<(String, String)>,
    /// How many attempts before the job fails.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// The delay before the first retry (doubling after).
    #[arg(long, value_parser = duration, value_name = "D")]
    pub backoff: Option<Duration>,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Queue a job; prints its id.
    #[command(
        after_help = "Example:\n  syncctl task submit resize '{\"image\": 42}' --key image-42"
    )]
    Submit(JobArgs),
    /// Queue a job and wait for it; prints its output.
    #[command(after_help = "Example:\n  syncctl task run resize '{\"image\": 42}' --timeout 5m")]
    Run {
        #[command(flatten)]
        job: JobArgs,
        /// Give up waiting after this long (exit 124; the job stays queued).
        #[arg(long, value_parser = duration, value_name = "D")]
        timeout: Option<Duration>,
    },
    /// Print a job's status.
    #[command(after_help = "Example:\n  syncctl task status 01J9Z3… --wait 1m --json")]
    Status {
        /// The job id `submit` printed.
        id: String,
        /// Wait until the job succeeded or failed, at most this long.
        #[arg(long, value_parser = duration, value_name = "D")]
        wait: Option<Duration>,
    },
    /// Run CMD for every job of NAME: payload on stdin, its stdout is the output.
    #[command(
        after_help = "Example:\n  syncctl task worker resize --concurrency 4 -- ./resize.sh\n\n\
        CMD gets SYNC_JOB_ID, SYNC_JOB_NAME, SYNC_JOB_ATTEMPT and SYNC_FENCING_TOKEN. A non-zero exit\n\
        fails the attempt. Runs until SIGINT or SIGTERM, then finishes the running jobs."
    )]
    Worker {
        /// The jobs' name.
        name: String,
        /// How many jobs run at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Time between SIGTERM and SIGKILL to CMD when the job's claim is lost.
        #[arg(long, value_parser = duration, value_name = "D", default_value = "10s")]
        grace: Duration,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (a duration is like 500ms, 10s, 2m)"))
}

fn label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err("a label is KEY=VALUE".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_has_an_example() {
        fn walk(cmd: &clap::Command, path: &str) {
            let name = format!("{path} {}", cmd.get_name());
            if cmd.has_subcommands() {
                for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                    walk(sub, &name);
                }
            } else {
                let help = cmd
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                assert!(help.contains("Example:"), "{name} has no example");
            }
        }
        for sub in Cli::command().get_subcommands() {
            walk(sub, "syncctl");
        }
    }

    #[test]
    fn lock_takes_the_command_after_two_dashes() {
        let cli = Cli::try_parse_from(["syncctl", "lock", "x", "--wait", "2s", "--", "ls", "-l"])
            .unwrap();
        let Command::Lock(args) = cli.command else {
            panic!("not lock")
        };
        assert_eq!(args.hold.wait, Some(Duration::from_secs(2)));
        assert_eq!(args.hold.command, ["ls", "-l"]);
        assert!(Cli::try_parse_from(["syncctl", "lock", "x"]).is_err());
    }
}
