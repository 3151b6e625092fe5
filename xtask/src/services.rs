//! The live backends: etcd, Consul (dev mode), a second Consul with ACLs on, Redis (with an ACL
//! user), a three-master Redis Cluster and chronyd as an NTP server, each on 127.0.0.1 on
//! non-default ports, with pid file, data and log under the workspace's
//! `target/services/<name>/` (also when CARGO_TARGET_DIR points elsewhere). A service runs one
//! process per client port: the cluster runs three.

use std::{
    fmt, fs,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::{sys::signal, unistd::Pid};

use crate::{Result, fmt_duration, install, interrupted, probe, project_root};

const HOST: &str = "127.0.0.1";

// Ports: away from each server's default (2379/2380, 8500/8300-8302, 6379, 123) so that a
// server already on the machine is left alone, and below Linux's ephemeral range (32768 and up)
// so that no outgoing connection ever holds one of them.
const ETCD_PORT: u16 = 12379;
const ETCD_PEER_PORT: u16 = 12380;
const CONSUL_PORTS: ConsulPorts = ConsulPorts {
    http: 18500,
    server: 18300,
    serf_lan: 18301,
    serf_wan: 18302,
};
/// The ACL agent's: the plain one's plus ten, so that the two never clash.
const CONSUL_ACL_PORTS: ConsulPorts = ConsulPorts {
    http: 18510,
    server: 18310,
    serf_lan: 18311,
    serf_wan: 18312,
};
const REDIS_PORT: u16 = 13379;
const REDIS_CLUSTER_PORTS: [u16; 3] = [13380, 13381, 13382];
/// Redis puts a cluster node's bus this far above its client port: 23380-23382 here.
const REDIS_BUS_OFFSET: u16 = 10000;
const NTP_PORT: u16 = 11123;

/// Generous for a loaded 2-core CI machine; a healthy start takes a few seconds at most.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The user, on the standalone Redis, that the ACL tests log in as: they check that its
/// password works and that a wrong one is refused.
const REDIS_ACL_USER: &str = "sync-acl";
const REDIS_ACL_PASSWORD: &str = "sync-acl-secret";
const REDIS_ACL_ENV: &str = "SYNC_TEST_REDIS_ACL";

/// The ACL agent's master token, fixed (the agent is a throwaway on loopback) and handed to the
/// tests in SYNC_TEST_CONSUL_ACL's `?token=`: with it they make their own policies and tokens.
/// The agent's own token is the same one, so that its anti-entropy syncs are never denied.
const CONSUL_ACL_MASTER_TOKEN: &str = "79f90db7-9593-4360-86d8-f85fb5c93104";

/// A Consul dev agent's ports. DNS and gRPC are off (see [`consul_agent`]).
struct ConsulPorts {
    http: u16,
    server: u16,
    serf_lan: u16,
    serf_wan: u16,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Service {
    Etcd,
    Consul,
    /// A second Consul dev agent, with ACLs on and every request denied without a token.
    ConsulAcl,
    Redis,
    RedisCluster,
    Ntp,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Service {
    pub(crate) const ALL: [Service; 6] = [
        Self::Etcd,
        Self::Consul,
        Self::ConsulAcl,
        Self::Redis,
        Self::RedisCluster,
        Self::Ntp,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::Consul => "consul",
            Self::ConsulAcl => "consul-acl",
            Self::Redis => "redis",
            Self::RedisCluster => "redis-cluster",
            Self::Ntp => "ntp",
        }
    }

    /// The backend (and `sync-<backend>` crate) whose tests need the service.
    pub(crate) fn backend(self) -> &'static str {
        match self {
            Self::ConsulAcl => "consul",
            Self::RedisCluster => "redis",
            _ => self.name(),
        }
    }

    pub(crate) fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    pub(crate) fn env_var(self) -> &'static str {
        match self {
            Self::Etcd => "SYNC_TEST_ETCD",
            Self::Consul => "SYNC_TEST_CONSUL",
            Self::ConsulAcl => "SYNC_TEST_CONSUL_ACL",
            Self::Redis => "SYNC_TEST_REDIS",
            Self::RedisCluster => "SYNC_TEST_REDIS_CLUSTER",
            Self::Ntp => "SYNC_TEST_NTP",
        }
    }

    /// What the tests get from the service: its SYNC_TEST_* endpoint and, for Redis, the URL
    /// of the ACL user.
    pub(crate) fn envs(self) -> Vec<(&'static str, String)> {
        let mut envs = vec![(self.env_var(), self.endpoint())];
        if self == Self::Redis {
            let url = format!("redis://{REDIS_ACL_USER}:{REDIS_ACL_PASSWORD}@{HOST}:{REDIS_PORT}");
            envs.push((REDIS_ACL_ENV, url));
        }
        envs
    }

    /// The ports clients use, one per process.
    fn client_ports(self) -> &'static [u16] {
        match self {
            Self::Etcd => &[ETCD_PORT],
            Self::Consul => &[CONSUL_PORTS.http],
            Self::ConsulAcl => &[CONSUL_ACL_PORTS.http],
            Self::Redis => &[REDIS_PORT],
            Self::RedisCluster => &REDIS_CLUSTER_PORTS,
            Self::Ntp => &[NTP_PORT],
        }
    }

    fn addrs(self) -> impl Iterator<Item = SocketAddr> {
        self.client_ports()
            .iter()
            .map(|&port| SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn addr(self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_ports()[0]))
    }

    /// The value of the service's SYNC_TEST_* variable: a backend URL, as `sync-any` takes.
    pub(crate) fn endpoint(self) -> String {
        let scheme = match self {
            Self::Etcd => "etcd",
            Self::Consul | Self::ConsulAcl => "consul",
            Self::Redis => "redis",
            Self::RedisCluster => "redis+cluster",
            Self::Ntp => "ntp",
        };
        let hosts: Vec<String> = self.addrs().map(|a| a.to_string()).collect();
        let url = format!("{scheme}://{}", hosts.join(","));
        match self.consul_token() {
            Some(token) => format!("{url}/?token={token}"),
            None => url,
        }
    }

    /// The token a client sends to the service: the ACL agent's master token.
    fn consul_token(self) -> Option<&'static str> {
        (self == Self::ConsulAcl).then_some(CONSUL_ACL_MASTER_TOKEN)
    }

    fn consul_ports(self) -> Option<&'static ConsulPorts> {
        match self {
            Self::Consul => Some(&CONSUL_PORTS),
            Self::ConsulAcl => Some(&CONSUL_ACL_PORTS),
            _ => None,
        }
    }

    fn tcp_ports(self) -> Vec<u16> {
        match self {
            Self::Etcd => vec![ETCD_PORT, ETCD_PEER_PORT],
            Self::Consul => CONSUL_PORTS.tcp().to_vec(),
            Self::ConsulAcl => CONSUL_ACL_PORTS.tcp().to_vec(),
            Self::Redis => vec![REDIS_PORT],
            Self::RedisCluster => REDIS_CLUSTER_PORTS
                .iter()
                .flat_map(|&p| [p, p + REDIS_BUS_OFFSET])
                .collect(),
            Self::Ntp => vec![],
        }
    }

    fn udp_ports(self) -> &'static [u16] {
        match self {
            Self::Consul => &[CONSUL_PORTS.serf_lan, CONSUL_PORTS.serf_wan],
            Self::ConsulAcl => &[CONSUL_ACL_PORTS.serf_lan, CONSUL_ACL_PORTS.serf_wan],
            Self::Ntp => &[NTP_PORT],
            Self::Etcd | Self::Redis | Self::RedisCluster => &[],
        }
    }

    /// The process name (/proc/PID/comm) the pid file must point at; guards against a pid that
    /// was reused by an unrelated process since.
    fn comm(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::Consul | Self::ConsulAcl => "consul",
            Self::Redis | Self::RedisCluster => "redis-server",
            Self::Ntp => "chronyd",
        }
    }

    fn dir(self) -> PathBuf {
        services_root().join(self.name())
    }

    /// A process's data, emptied at each start: `data/`, or a cluster node's own `<port>/`
    /// (its nodes.conf there).
    fn data_dir(self, port: u16) -> PathBuf {
        match self {
            Self::RedisCluster => self.dir().join(port.to_string()),
            _ => self.dir().join("data"),
        }
    }

    /// A line per process: see [`parse_pid_file`].
    fn pid_file(self) -> PathBuf {
        self.dir().join("pid")
    }

    fn log_file(self) -> PathBuf {
        self.dir().join(format!("{}.log", self.name()))
    }
}

impl ConsulPorts {
    const fn tcp(&self) -> [u16; 4] {
        [self.http, self.server, self.serf_lan, self.serf_wan]
    }
}

/// Where every service's pid file, data and log live: the workspace's own `target/services`,
/// whatever CARGO_TARGET_DIR says. The pid files are how one xtask finds the services another
/// one started, and CARGO_TARGET_DIR differs between shells, IDEs and CI steps: under it, an
/// xtask with another setting (or none) would find no pid file and call its own etcd "a
/// process xtask did not start".
fn services_root() -> PathBuf {
    project_root().join("target").join("services")
}

/// Services named on the command line, or all of them.
fn parse_names(names: &[String]) -> Result<Vec<Service>> {
    if names.is_empty() {
        return Ok(Service::ALL.to_vec());
    }
    let mut services = Vec::new();
    for name in names {
        let Some(service) = Service::parse(name) else {
            let known = Service::ALL.map(Service::name).join(" ");
            bail!("unknown service `{name}` (known: {known})");
        };
        if !services.contains(&service) {
            services.push(service);
        }
    }
    Ok(services)
}

pub(crate) fn cli(args: &[String]) -> Result<ExitCode> {
    let Some((verb, names)) = args.split_first() else {
        bail!("usage: cargo xtask services up|down|status|env|smoke [BACKEND...]");
    };
    let services = parse_names(names)?;
    match verb.as_str() {
        "up" => {
            up(&services, &[])?;
            say!("ready; to use them: eval \"$(cargo xtask services env)\"");
        }
        "down" => down(&services)?,
        "status" => status(&services),
        "env" => env(&services),
        "smoke" => smoke(&services)?,
        other => bail!("unknown services command `{other}` (up, down, status, env, smoke)"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Children started by this xtask process, kept so that they are reaped (a zombie would look
/// alive to a pid check).
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

fn alive(pid: u32) -> bool {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(child) = children.iter_mut().find(|c| c.id() == pid) {
        return matches!(child.try_wait(), Ok(None));
    }
    drop(children);
    // Not our child: alive unless gone or a zombie.
    stat_field(pid, 3).is_some_and(|state| state != "Z" && state != "X")
}

/// Field `n` (1-based, as proc(5) numbers them; 3 or later) of /proc/PID/stat.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields 1 and 2 are the pid and the parenthesised name, which may hold spaces and ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n - 3).map(String::from)
}

/// Those of the service's processes that are still running, per its pid file.
fn running_pids(service: Service) -> Vec<u32> {
    let text = fs::read_to_string(service.pid_file()).unwrap_or_default();
    let pids = parse_pid_file(&text).unwrap_or_default();
    pids.into_iter()
        .filter(|&(pid, started)| is_ours(pid, service.comm(), started))
        .map(|(pid, _)| pid)
        .collect()
}

/// The service's pids if every one of its processes is running.
fn all_running(service: Service) -> Option<Vec<u32>> {
    let pids = running_pids(service);
    (pids.len() == service.client_ports().len()).then_some(pids)
}

fn pid_list(pids: &[u32]) -> String {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    pids.join(",")
}

/// A `PID [START_TIME]` line per process: the start time (in clock ticks since boot,
/// /proc/PID/stat field 22) tells our process from a later one that was given the same pid —
/// after a reboot, say, a system redis-server or chronyd. (A pid file without it, from an
/// older xtask, is checked by name only.)
fn parse_pid_file(text: &str) -> Option<Vec<(u32, Option<u64>)>> {
    let lines: Option<Vec<_>> = text.lines().map(parse_pid_line).collect();
    lines.filter(|lines| !lines.is_empty())
}

fn parse_pid_line(line: &str) -> Option<(u32, Option<u64>)> {
    let mut words = line.split_whitespace();
    let pid = words.next()?.parse().ok()?;
    let started = match words.next() {
        Some(w) => Some(w.parse().ok()?),
        None => None,
    };
    Some((pid, started))
}

/// When `pid` started, in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    stat_field(pid, 22)?.parse().ok()
}

/// Whether `pid` is alive, named `comm`, and (if known) the process started at `started`.
fn is_ours(pid: u32, comm: &str, started: Option<u64>) -> bool {
    let Ok(name) = fs::read_to_string(format!("/proc/{pid}/comm")) else {
        return false;
    };
    name.trim() == comm && started.is_none_or(|t| start_time(pid) == Some(t)) && alive(pid)
}

fn tcp_free(port: u16) -> bool {
    TcpListener::bind((HOST, port)).is_ok()
}

fn udp_free(port: u16) -> bool {
    UdpSocket::bind((HOST, port)).is_ok()
}

fn busy_ports(service: Service) -> Vec<String> {
    let tcp = service.tcp_ports().into_iter().filter(|&p| !tcp_free(p));
    let udp = service.udp_ports().iter().filter(|&&p| !udp_free(p));
    tcp.map(|p| format!("{p}/tcp"))
        .chain(udp.map(|p| format!("{p}/udp")))
        .collect()
}

/// Installs what is missing — the tools of the services to start and `extra_tools`, in one
/// apt-get run (each begins with an `apt-get update`) — and starts every service that is not
/// already running; returns the ones it started. On failure, stops those again before returning
/// the error.
pub(crate) fn up(services: &[Service], extra_tools: &[install::Tool]) -> Result<Vec<Service>> {
    let mut to_start = Vec::new();
    let mut running = Vec::new();
    for &service in services {
        if let Some(pids) = all_running(service) {
            say!("{service}: already running (pid {})", pid_list(&pids));
            running.push((service, pids, Instant::now()));
            continue;
        }
        let left = running_pids(service);
        if !left.is_empty() {
            // Part of a cluster is no cluster: start it afresh.
            say!(
                "{service}: only {} of its {} processes running; restarting it",
                left.len(),
                service.client_ports().len()
            );
            stop(service)?;
        }
        let busy = busy_ports(service);
        if !busy.is_empty() {
            bail!(
                "{service}: port {} is in use by a process xtask did not start; stop it, or \
                 point the tests at your own server with {}",
                busy.join(", "),
                service.env_var()
            );
        }
        to_start.push(service);
    }
    let tools: Vec<_> = to_start
        .iter()
        .flat_map(|&s| install::tools(s).iter().copied())
        .chain(extra_tools.iter().copied())
        .collect();
    install::ensure(&tools)?;
    if to_start.is_empty() {
        for (service, pids, since) in running {
            wait_ready(service, &pids, since)?;
        }
        return Ok(Vec::new());
    }

    let consul = if to_start.iter().any(|s| s.consul_ports().is_some()) {
        Some(install::consul()?)
    } else {
        None
    };

    let mut started = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        // Start all, then wait for all: their start-ups overlap.
        for &service in &to_start {
            if interrupted() {
                bail!("interrupted");
            }
            // Listed first: `down` stops whatever part of it did start.
            started.push(service);
            let pids = spawn(service, consul.as_ref())?;
            running.push((service, pids, Instant::now()));
        }
        for (service, pids, since) in &running {
            wait_ready(*service, pids, *since)?;
        }
        Ok(())
    }))
    .unwrap_or_else(|_| Err("xtask panicked while starting the services".into()));
    if let Err(err) = result {
        // Interrupted or failed half-way: leave nothing of ours behind.
        let _ = down(&started);
        return Err(err);
    }
    Ok(started)
}

/// Starts the service's processes, one per client port, each on empty data. Each pid goes
/// into the pid file as soon as it runs, so that `down` finds it whatever fails next.
fn spawn(service: Service, consul: Option<&PathBuf>) -> Result<Vec<u32>> {
    fs::create_dir_all(service.dir())?;
    // Emptied once: every process appends to it (and redis-cli too).
    fs::write(service.log_file(), "")?;
    let mut pids = Vec::new();
    let mut pid_lines = String::new();
    let mut program = String::new();
    for &port in service.client_ports() {
        let data = service.data_dir(port);
        // Each start is a fresh server: tests rely on random namespaces, never on old data.
        if data.exists() {
            fs::remove_dir_all(&data)?;
        }
        fs::create_dir_all(&data)?;
        let command = command(service, port, &data, consul)?;
        program = command.get_program().to_string_lossy().into_owned();
        let pid = start_child(service, command)?;
        pids.push(pid);
        let started = start_time(pid).map_or(String::new(), |t| format!(" {t}"));
        pid_lines.push_str(&format!("{pid}{started}\n"));
        if let Err(err) = fs::write(service.pid_file(), &pid_lines) {
            // Without a pid file nothing could stop them later: stop them now.
            kill_now(&pids);
            bail!(
                "{service}: cannot write {}: {err}",
                service.pid_file().display()
            );
        }
    }
    say!("{service}: started {program} (pid {})", pid_list(&pids));
    Ok(pids)
}

/// The command line of the service's process serving `port`, keeping its data in `data`.
fn command(service: Service, port: u16, data: &Path, consul: Option<&PathBuf>) -> Result<Command> {
    Ok(match service {
        Service::Etcd => {
            let mut c = Command::new(install::require("etcd")?);
            let client = format!("http://{HOST}:{ETCD_PORT}");
            let peer = format!("http://{HOST}:{ETCD_PEER_PORT}");
            // The user's ETCD_* settings are for their own etcd, not this one.
            clear_env_prefix(&mut c, "ETCD");
            c.args(["--name=sync-xtask", "--logger=zap", "--log-outputs=stderr"])
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=sync-xtask={peer}"))
                .arg("--initial-cluster-state=new");
            if std::env::consts::ARCH == "aarch64" {
                // etcd 3.4 refuses to start on arm64 without this.
                c.env("ETCD_UNSUPPORTED_ARCH", "arm64");
            }
            c
        }
        Service::Consul | Service::ConsulAcl => {
            let Some(consul) = consul else {
                bail!("{service}: no binary");
            };
            let mut c = consul_agent(service, consul, data)?;
            if service == Service::ConsulAcl {
                let conf = service.dir().join("acl.hcl");
                fs::write(&conf, consul_acl_hcl())?;
                c.arg(format!("-config-file={}", conf.display()));
            }
            c
        }
        Service::Redis => redis_server(port, data)?,
        Service::RedisCluster => {
            let mut c = redis_server(port, data)?;
            // nodes.conf goes to the node's own --dir. A stopped node is marked failed after
            // 2 s rather than the default 15, so that tests of a lost node run quickly.
            c.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "2000"]);
            c
        }
        Service::Ntp => {
            let conf = service.dir().join("chrony.conf");
            fs::write(&conf, chrony_conf(data))?;
            let mut c = Command::new(install::require("chronyd")?);
            // -x: never touch the system clock; -d: stay in the foreground as our child.
            c.args(["-x", "-d", "-f"]).arg(&conf);
            if crate::is_root() {
                // Stay root rather than switching to _chrony, who cannot write under target/.
                c.args(["-u", "root"]);
            } else {
                // No root check: an unprivileged port and -x need no privilege.
                c.arg("-U");
            }
            c
        }
    })
}

/// A Consul dev agent: one in-memory server that elects itself. DNS and gRPC are off (1.8.7
/// takes -1 or 0 for that) so that two agents can run side by side; the other ports are moved
/// off their defaults.
fn consul_agent(service: Service, consul: &Path, data: &Path) -> Result<Command> {
    let Some(ports) = service.consul_ports() else {
        bail!("{service}: not a Consul agent");
    };
    let mut c = Command::new(consul);
    let node = match service {
        Service::ConsulAcl => "sync-xtask-acl",
        _ => "sync-xtask",
    };
    c.args(["agent", "-dev", "-log-level=info"])
        .arg(format!("-node={node}"))
        .arg(format!("-bind={HOST}"))
        .arg(format!("-client={HOST}"))
        .arg(format!("-http-port={}", ports.http))
        .arg(format!("-server-port={}", ports.server))
        .arg(format!("-serf-lan-port={}", ports.serf_lan))
        .arg(format!("-serf-wan-port={}", ports.serf_wan))
        .args(["-dns-port=-1", "-grpc-port=-1"])
        .arg(format!("-data-dir={}", data.display()))
        // No update check against the vendor's servers: this network has none.
        .args(["-hcl", "disable_update_check = true"])
        // Every test client keeps blocking queries open; the suite runs 64 cases at once
        // from one address, past Consul's default of 200 connections per client address.
        .args(["-hcl", "limits { http_max_conns_per_client = 4096 }"])
        .env("CHECKPOINT_DISABLE", "1");
    Ok(c)
}

/// ACLs on, everything denied without a token; the master token doubles as the agent's own.
/// (Consul 1.8 still calls it `master`; later versions `initial_management`.)
fn consul_acl_hcl() -> String {
    format!(
        "# written by cargo xtask\n\
         acl {{\n  \
           enabled = true\n  \
           default_policy = \"deny\"\n  \
           down_policy = \"extend-cache\"\n  \
           tokens {{\n    \
             master = \"{CONSUL_ACL_MASTER_TOKEN}\"\n    \
             agent = \"{CONSUL_ACL_MASTER_TOKEN}\"\n  \
           }}\n\
         }}\n"
    )
}

/// redis-server with no config file (the machine's /etc/redis is not ours), no persistence.
pub(crate) fn redis_server(port: u16, data: &Path) -> Result<Command> {
    let mut c = Command::new(install::require("redis-server")?);
    c.args(["--bind", HOST, "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(data);
    Ok(c)
}

/// Spawns one process of the service, logging to its log; returns the pid.
fn start_child(service: Service, mut command: Command) -> Result<u32> {
    let log = append_log(service)?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: a Ctrl-C meant for the tests must not kill the services before
        // the teardown does, and `services up` leaves them running after xtask exits.
        .process_group(0);
    let program = command.get_program().to_string_lossy().into_owned();
    let child = command
        .spawn()
        .map_err(|e| format!("{service}: cannot start {program}: {e}"))?;
    let pid = child.id();
    // Kept (and so reaped and stoppable) before anything else can fail.
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child);
    Ok(pid)
}

/// The service's log, opened for appending: several writers share it.
fn append_log(service: Service) -> Result<fs::File> {
    Ok(fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(service.log_file())?)
}

fn kill_now(pids: &[u32]) {
    signal_all(pids, signal::Signal::SIGKILL);
    wait_until(Duration::from_secs(5), || pids.iter().all(|&p| !alive(p)));
}

fn signal_all(pids: &[u32], sig: signal::Signal) {
    for &pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = signal::kill(Pid::from_raw(pid), sig);
        }
    }
}

/// chronyd as a plain NTP server on loopback: no upstream sources, serving its own clock at
/// stratum 8, no command port or socket, every file under target/.
fn chrony_conf(data: &std::path::Path) -> String {
    format!(
        "# written by cargo xtask\n\
         port {NTP_PORT}\n\
         bindaddress {HOST}\n\
         allow {HOST}\n\
         local stratum 8\n\
         cmdport 0\n\
         bindcmdaddress /\n\
         pidfile {data}/chronyd.pid\n\
         driftfile {data}/chrony.drift\n",
        data = data.display()
    )
}

fn clear_env_prefix(command: &mut Command, prefix: &str) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with(prefix) {
            command.env_remove(key);
        }
    }
}

/// Waits until the service answers, makes it what the tests expect, and waits until it is
/// healthy, all within [`READY_TIMEOUT`].
fn wait_ready(service: Service, pids: &[u32], since: Instant) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    poll(service, pids, deadline, || answers(service))?;
    prepare(service, deadline)?;
    let detail = poll(service, pids, deadline, || health(service))?;
    say!(
        "{service}: ready at {} ({detail}) after {}",
        service.endpoint(),
        fmt_duration(since.elapsed())
    );
    Ok(())
}

/// Runs `check` until it succeeds; fails when the deadline passes or a process exits.
fn poll<T>(
    service: Service,
    pids: &[u32],
    deadline: Instant,
    mut check: impl FnMut() -> Result<T>,
) -> Result<T> {
    loop {
        if interrupted() {
            bail!("interrupted");
        }
        if let Some(pid) = pids.iter().find(|&&pid| !alive(pid)) {
            bail!(
                "{service}: pid {pid} exited during start-up; the end of {}:\n{}",
                service.log_file().display(),
                log_tail(service)
            );
        }
        match check() {
            Ok(value) => return Ok(value),
            Err(err) if Instant::now() >= deadline => bail!(
                "{service}: not ready after {} ({err}); the end of {}:\n{}",
                fmt_duration(READY_TIMEOUT),
                service.log_file().display(),
                log_tail(service)
            ),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Whether every process takes commands, as [`prepare`] needs; the others' readiness is
/// their health.
fn answers(service: Service) -> Result<()> {
    match service {
        Service::Redis | Service::RedisCluster => {
            for addr in service.addrs() {
                redis_ping(addr)?;
            }
            Ok(())
        }
        Service::Etcd | Service::Consul | Service::ConsulAcl | Service::Ntp => Ok(()),
    }
}

/// Makes an answering service what the tests expect. Harmless when it already is: `up` runs it
/// on services it finds running too.
fn prepare(service: Service, deadline: Instant) -> Result<()> {
    match service {
        Service::Redis => add_acl_user(),
        Service::RedisCluster => create_cluster(deadline),
        Service::Etcd | Service::Consul | Service::ConsulAcl | Service::Ntp => Ok(()),
    }
}

/// `reset` first, so that the user has exactly these rules also on a Redis that had it.
fn add_acl_user() -> Result<()> {
    let mut redis = probe::Redis::connect(Service::Redis.addr(), PROBE_TIMEOUT)?;
    let password = format!(">{REDIS_ACL_PASSWORD}");
    let reply = redis.cmd(&[
        b"ACL",
        b"SETUSER",
        REDIS_ACL_USER.as_bytes(),
        b"reset",
        b"on",
        password.as_bytes(),
        b"~*",
        b"&*",
        b"+@all",
    ])?;
    if reply != probe::Resp::Simple("OK".into()) {
        bail!("redis: ACL SETUSER {REDIS_ACL_USER} answered {reply:?}");
    }
    Ok(())
}

/// `redis-cli --cluster create` over the nodes, if every one is still alone with no slots. A
/// cluster that is formed (or half-formed: then its health says what is wrong) is left as is.
fn create_cluster(deadline: Instant) -> Result<()> {
    let service = Service::RedisCluster;
    for addr in service.addrs() {
        let info = cluster_info(addr)?;
        let alone = info_field(&info, "cluster_known_nodes") == Some("1");
        if !alone || info_field(&info, "cluster_slots_assigned") != Some("0") {
            return Ok(());
        }
    }
    let mut cli = Command::new(install::require("redis-cli")?);
    // The user's REDISCLI_AUTH and the like are for their own Redis.
    clear_env_prefix(&mut cli, "REDISCLI");
    let log = append_log(service)?;
    cli.args(["--cluster", "create"])
        .args(service.addrs().map(|a| a.to_string()))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut child = cli.spawn()?;
    let timeout = deadline.saturating_duration_since(Instant::now());
    wait_until(timeout, || {
        interrupted() || !matches!(child.try_wait(), Ok(None))
    });
    let status = child.try_wait()?;
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        if interrupted() {
            bail!("interrupted");
        }
    }
    match status {
        Some(status) if status.success() => Ok(()),
        _ => bail!(
            "{service}: redis-cli --cluster create {}; the end of {}:\n{}",
            status.map_or("did not finish in time".into(), |s| format!("failed ({s})")),
            service.log_file().display(),
            log_tail(service)
        ),
    }
}

fn redis_ping(addr: SocketAddr) -> Result<probe::Redis> {
    let mut redis = probe::Redis::connect(addr, PROBE_TIMEOUT)?;
    match redis.cmd(&[b"PING"])? {
        probe::Resp::Simple(pong) if pong == "PONG" => Ok(redis),
        other => bail!("{addr}: PING answered {other:?}"),
    }
}

/// CLUSTER INFO's `name:value` lines.
fn cluster_info(addr: SocketAddr) -> Result<String> {
    let mut redis = probe::Redis::connect(addr, PROBE_TIMEOUT)?;
    match redis.cmd(&[b"CLUSTER", b"INFO"])? {
        probe::Resp::Bulk(Some(info)) => Ok(String::from_utf8_lossy(&info).into_owned()),
        other => bail!("{addr}: CLUSTER INFO answered {other:?}"),
    }
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Every node sees an ok cluster of all the nodes with every slot assigned, and serves a key.
fn cluster_health() -> Result<String> {
    let service = Service::RedisCluster;
    let nodes = service.client_ports().len().to_string();
    for addr in service.addrs() {
        let info = cluster_info(addr)?;
        let want = [
            ("cluster_state", "ok"),
            ("cluster_slots_assigned", "16384"),
            ("cluster_known_nodes", nodes.as_str()),
        ];
        for (name, value) in want {
            let got = info_field(&info, name);
            if got != Some(value) {
                bail!("{addr}: {name}:{}", got.unwrap_or("missing"));
            }
        }
    }
    for addr in service.addrs() {
        roundtrip_owned(addr)?;
    }
    Ok(format!(
        "cluster_state:ok, 16384 slots on {nodes} masters, SET/GET on each"
    ))
}

/// SET, GET and DEL through `addr` on a key in one of its own slots: keys are tried until the
/// node takes one rather than answering MOVED (a third of them, for three masters).
fn roundtrip_owned(addr: SocketAddr) -> Result<()> {
    let mut redis = probe::Redis::connect(addr, PROBE_TIMEOUT)?;
    let value = unique_value();
    for n in 0..100 {
        let key = format!("sync-xtask:smoke:{n}");
        match redis.try_cmd(&[b"SET", key.as_bytes(), value.as_bytes()])? {
            Ok(probe::Resp::Simple(ok)) if ok == "OK" => {
                return get_and_del(&mut redis, key.as_bytes(), &value);
            }
            Err(moved) if moved.starts_with("MOVED ") => {}
            other => bail!("{addr}: SET answered {other:?}"),
        }
    }
    bail!("{addr}: MOVED for each of 100 keys: the node owns no slot")
}

fn get_and_del(redis: &mut probe::Redis, key: &[u8], value: &str) -> Result<()> {
    let got = redis.cmd(&[b"GET", key])?;
    if got != probe::Resp::Bulk(Some(value.as_bytes().to_vec())) {
        bail!("GET answered {got:?}");
    }
    redis.cmd(&[b"DEL", key])?;
    Ok(())
}

fn consul_kv_roundtrip(service: Service, value: &str) -> Result<()> {
    let path = "/v1/kv/sync-xtask/smoke";
    let (code, body) = consul_http(service, "PUT", path, value.as_bytes())?;
    if code != 200 || body.trim_ascii() != b"true" {
        bail!("PUT {path}: {code} {}", String::from_utf8_lossy(&body));
    }
    let (code, body) = consul_http(service, "GET", &format!("{path}?raw"), b"")?;
    if code != 200 || body != value.as_bytes() {
        bail!("GET {path}?raw: {code} {}", String::from_utf8_lossy(&body));
    }
    let (code, body) = consul_http(service, "DELETE", path, b"")?;
    if code != 200 {
        bail!("DELETE {path}: {code} {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

fn unique_value() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("smoke-{}-{nanos}", std::process::id())
}

fn log_tail(service: Service) -> String {
    let text = fs::read_to_string(service.log_file()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Whether the service answers as a client needs it to; a short description if so.
fn health(service: Service) -> Result<String> {
    match service {
        Service::Etcd => {
            let (code, body) = probe::http(service.addr(), "GET", "/health", b"", PROBE_TIMEOUT)?;
            let body = String::from_utf8_lossy(&body);
            if code != 200 || !body.contains(r#""health":"true""#) {
                bail!("/health: {code} {body}");
            }
            Ok("healthy".into())
        }
        Service::Consul => Ok(format!("leader {}", consul_leader(service)?)),
        Service::ConsulAcl => {
            let leader = consul_leader(service)?;
            // The master token exists once the new leader has set up ACLs, a moment later.
            let (code, body) = consul_http(service, "GET", "/v1/acl/token/self", b"")?;
            if code != 200 {
                let body = String::from_utf8_lossy(&body);
                bail!("master token not accepted yet: {code} {}", body.trim());
            }
            Ok(format!("leader {leader}, master token accepted"))
        }
        Service::Redis => {
            let mut redis = redis_ping(service.addr())?;
            let auth = [
                b"AUTH".as_slice(),
                REDIS_ACL_USER.as_bytes(),
                REDIS_ACL_PASSWORD.as_bytes(),
            ];
            match redis.cmd(&auth) {
                Ok(probe::Resp::Simple(ok)) if ok == "OK" => {}
                other => bail!("AUTH as {REDIS_ACL_USER} answered {other:?}"),
            }
            Ok(format!("PONG, ACL user {REDIS_ACL_USER}"))
        }
        Service::RedisCluster => cluster_health(),
        Service::Ntp => {
            let reply = probe::ntp_query(service.addr(), PROBE_TIMEOUT)?;
            reply.check_synchronised()?;
            Ok(format!("stratum {}", reply.stratum))
        }
    }
}

fn consul_leader(service: Service) -> Result<String> {
    let (code, body) = consul_http(service, "GET", "/v1/status/leader", b"")?;
    let leader = String::from_utf8_lossy(&body)
        .trim()
        .trim_matches('"')
        .to_string();
    if code != 200 || leader.is_empty() {
        bail!("no leader yet");
    }
    Ok(leader)
}

/// A request to a Consul agent, with its token if it has one.
fn consul_http(service: Service, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
    let token = service.consul_token().map(|t| ("X-Consul-Token", t));
    let headers: Vec<_> = token.into_iter().collect();
    probe::http_with(service.addr(), method, path, &headers, body, PROBE_TIMEOUT)
}

/// Stops the named services' processes (by pid file) and waits until their ports are free.
pub(crate) fn down(services: &[Service]) -> Result<()> {
    let mut failures = Vec::new();
    for &service in services {
        if let Err(err) = stop(service) {
            failures.push(err.to_string());
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}

fn stop(service: Service) -> Result<()> {
    let pids = running_pids(service);
    if pids.is_empty() {
        let _ = fs::remove_file(service.pid_file());
        forget_cluster(service);
        say!("{service}: not running");
        return Ok(());
    }
    let started = Instant::now();
    let all_gone = |pids: &[u32]| pids.iter().all(|&pid| !alive(pid));
    signal_all(&pids, signal::Signal::SIGTERM);
    if !wait_until(Duration::from_secs(15), || all_gone(&pids)) {
        say!(
            "{service}: pid {} ignored SIGTERM, killing",
            pid_list(&pids)
        );
        signal_all(&pids, signal::Signal::SIGKILL);
        if !wait_until(Duration::from_secs(5), || all_gone(&pids)) {
            bail!("{service}: pid {} would not die", pid_list(&pids));
        }
    }
    let _ = fs::remove_file(service.pid_file());
    forget_cluster(service);
    if !wait_until(Duration::from_secs(5), || busy_ports(service).is_empty()) {
        bail!(
            "{service}: stopped pid {}, but port {} is still in use",
            pid_list(&pids),
            busy_ports(service).join(", ")
        );
    }
    say!(
        "{service}: stopped (pid {}) in {}",
        pid_list(&pids),
        fmt_duration(started.elapsed())
    );
    Ok(())
}

/// A node's nodes.conf is its cluster membership: without it no later start, ours or one by
/// hand in that dir, waits for the peers of an old cluster.
fn forget_cluster(service: Service) {
    if service == Service::RedisCluster {
        for &port in service.client_ports() {
            let _ = fs::remove_file(service.data_dir(port).join("nodes.conf"));
        }
    }
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    true
}

fn status(services: &[Service]) {
    let mut rows = vec![["SERVICE", "PORT", "PID", "ENDPOINT", "HEALTH"].map(String::from)];
    for &service in services {
        let pids = running_pids(service);
        let (pids, health) = if pids.is_empty() {
            let busy = busy_ports(service);
            let state = if busy.is_empty() {
                "stopped".to_string()
            } else {
                format!("stopped; {} used by another process", busy.join(", "))
            };
            ("-".to_string(), state)
        } else {
            let health = health(service).unwrap_or_else(|e| format!("unhealthy: {e}"));
            (pid_list(&pids), health)
        };
        let ports: Vec<String> = service.client_ports().iter().map(u16::to_string).collect();
        let name = service.name().to_string();
        rows.push([name, ports.join(","), pids, service.endpoint(), health]);
    }
    print_table(&rows);
}

/// Columns as wide as their widest cell; the last one unpadded.
fn print_table<const N: usize>(rows: &[[String; N]]) {
    let width = |i: usize| rows.iter().map(|row| row[i].len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..N).map(width).collect();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths).take(N - 1) {
            line.push_str(&format!("{cell:<width$} "));
        }
        line.push_str(&row[N - 1]);
        println!("{line}");
    }
}

/// `export` lines for the running services, `eval`-able by a POSIX shell.
fn env(services: &[Service]) {
    for &service in services {
        if all_running(service).is_some() {
            for (var, value) in service.envs() {
                println!("export {var}={}", shell_word(&value));
            }
        } else {
            println!("# {service} is not running: cargo xtask services up {service}");
        }
    }
}

/// `value` as one shell word: single-quoted if it holds anything but URL characters a shell
/// leaves alone (the `?` of SYNC_TEST_CONSUL_ACL's `?token=` is a glob).
fn shell_word(value: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || ":/.,@_-+=%".contains(c);
    if !value.is_empty() && value.chars().all(plain) {
        return value.to_string();
    }
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// One real write and read through each service with a plain client.
pub(crate) fn smoke(services: &[Service]) -> Result<()> {
    let mut failures = Vec::new();
    for &service in services {
        let started = Instant::now();
        let result = if all_running(service).is_none() {
            Err(format!("not running (cargo xtask services up {service})").into())
        } else {
            smoke_one(service)
        };
        match result {
            Ok(detail) => say!(
                "{service}: smoke ok, {detail} ({})",
                fmt_duration(started.elapsed())
            ),
            Err(err) => {
                say!("{service}: smoke FAILED: {err}");
                failures.push(service.name());
            }
        }
    }
    if !failures.is_empty() {
        bail!("smoke check failed for {}", failures.join(", "));
    }
    Ok(())
}

fn smoke_one(service: Service) -> Result<String> {
    let value = unique_value();
    match service {
        Service::Etcd => {
            let etcdctl = install::require("etcdctl")?;
            let run = |args: &[&str]| -> Result<String> {
                let mut etcdctl = Command::new(&etcdctl);
                clear_env_prefix(&mut etcdctl, "ETCDCTL");
                let output = etcdctl
                    .env("ETCDCTL_API", "3")
                    .arg(format!("--endpoints=http://{}", service.addr()))
                    .arg("--command-timeout=5s")
                    .args(args)
                    .output()?;
                if !output.status.success() {
                    bail!(
                        "etcdctl {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&output.stderr).trim()
                    );
                }
                Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
            };
            let key = "sync-xtask/smoke";
            run(&["put", key, &value])?;
            let got = run(&["get", "--print-value-only", key])?;
            run(&["del", key])?;
            if got != value {
                bail!("etcdctl get returned {got:?}, expected {value:?}");
            }
            Ok("etcdctl put/get/del".into())
        }
        Service::Consul => {
            consul_kv_roundtrip(service, &value)?;
            Ok("KV PUT/GET/DELETE over HTTP".into())
        }
        Service::ConsulAcl => {
            let path = "/v1/kv/sync-xtask/smoke";
            let put = probe::http(service.addr(), "PUT", path, b"x", PROBE_TIMEOUT)?;
            if put.0 != 403 {
                bail!("PUT {path} without a token: {} (want 403)", put.0);
            }
            consul_kv_roundtrip(service, &value)?;
            Ok(
                "KV PUT denied without a token; PUT/GET/DELETE over HTTP with the master token"
                    .into(),
            )
        }
        Service::Redis => {
            let mut redis = probe::Redis::connect(service.addr(), PROBE_TIMEOUT)?;
            let key: &[u8] = b"sync-xtask:smoke";
            let set = redis.cmd(&[b"SET", key, value.as_bytes()])?;
            if set != probe::Resp::Simple("OK".into()) {
                bail!("SET answered {set:?}");
            }
            get_and_del(&mut redis, key, &value)?;
            Ok("SET/GET/DEL over RESP".into())
        }
        Service::RedisCluster => {
            for addr in service.addrs() {
                roundtrip_owned(addr)?;
            }
            Ok("SET/GET/DEL on each master's own slots over RESP".into())
        }
        Service::Ntp => {
            let reply = probe::ntp_query(service.addr(), PROBE_TIMEOUT)?;
            reply.check_synchronised()?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            // The server serves this machine's own clock, so it must agree with ours closely.
            if (reply.transmit - now).abs() > 60.0 {
                bail!(
                    "transmit time is {:.1}s away from the local clock",
                    reply.transmit - now
                );
            }
            Ok(format!(
                "stratum {}, offset {:+.6}s, round trip {:.6}s",
                reply.stratum, reply.offset, reply.round_trip
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With CARGO_TARGET_DIR set (run this test with it set, as `cargo xtask test` may) the
    /// services' files stay where every other xtask looks for them.
    #[test]
    fn service_files_ignore_cargo_target_dir() {
        let root = project_root().join("target/services");
        for service in Service::ALL {
            assert_eq!(service.dir(), root.join(service.name()));
            assert_eq!(service.pid_file(), root.join(service.name()).join("pid"));
            assert!(service.log_file().starts_with(&root));
        }
        if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
            let elsewhere = crate::target_dir();
            if elsewhere != project_root().join("target") {
                assert!(
                    !Service::Etcd.dir().starts_with(&elsewhere),
                    "services follow CARGO_TARGET_DIR={dir:?}"
                );
            }
        }
    }

    #[test]
    fn pid_files() {
        assert_eq!(parse_pid_file("123\n"), Some(vec![(123, None)]));
        assert_eq!(parse_pid_file("123 4567\n"), Some(vec![(123, Some(4567))]));
        assert_eq!(
            parse_pid_file("123 4567\n124 4568\n"),
            Some(vec![(123, Some(4567)), (124, Some(4568))])
        );
        assert_eq!(parse_pid_file(""), None);
        assert_eq!(parse_pid_file("x"), None);
        assert_eq!(parse_pid_file("123 x"), None);
        assert_eq!(parse_pid_file("123\nx\n"), None);
    }

    #[test]
    fn redis_endpoints() {
        assert_eq!(
            Service::RedisCluster.endpoint(),
            "redis+cluster://127.0.0.1:13380,127.0.0.1:13381,127.0.0.1:13382"
        );
        assert_eq!(
            Service::Redis.envs(),
            vec![
                ("SYNC_TEST_REDIS", "redis://127.0.0.1:13379".to_string()),
                (
                    "SYNC_TEST_REDIS_ACL",
                    "redis://sync-acl:sync-acl-secret@127.0.0.1:13379".to_string()
                ),
            ]
        );
        assert_eq!(
            Service::RedisCluster.tcp_ports(),
            [13380, 23380, 13381, 23381, 13382, 23382]
        );
        // Below Linux's ephemeral range, like every other port.
        assert!(Service::RedisCluster.tcp_ports().iter().all(|&p| p < 32768));
    }

    #[test]
    fn consul_endpoints_and_ports() {
        assert_eq!(Service::Consul.endpoint(), "consul://127.0.0.1:18500");
        assert_eq!(
            Service::ConsulAcl.envs(),
            vec![(
                "SYNC_TEST_CONSUL_ACL",
                format!("consul://127.0.0.1:18510/?token={CONSUL_ACL_MASTER_TOKEN}")
            )]
        );
        assert_eq!(Service::ConsulAcl.backend(), "consul");
        assert_eq!(Service::ConsulAcl.tcp_ports(), [18510, 18310, 18311, 18312]);
        // The two agents can run side by side, and next to every other service.
        for (i, a) in Service::ALL.into_iter().enumerate() {
            for b in &Service::ALL[i + 1..] {
                let clash = a
                    .tcp_ports()
                    .into_iter()
                    .find(|p| b.tcp_ports().contains(p));
                assert_eq!(clash, None, "{a} and {b} share a TCP port");
                let clash = a.udp_ports().iter().find(|p| b.udp_ports().contains(p));
                assert_eq!(clash, None, "{a} and {b} share a UDP port");
            }
        }
    }

    /// Each agent on its own four ports, with DNS (8600) and gRPC (8502) off: two dev agents
    /// on their defaults would clash there.
    #[test]
    fn consul_agents_listen_on_their_own_ports_only() {
        for (service, node, [http, server, lan, wan]) in [
            (Service::Consul, "sync-xtask", CONSUL_PORTS.tcp()),
            (Service::ConsulAcl, "sync-xtask-acl", CONSUL_ACL_PORTS.tcp()),
        ] {
            let c = consul_agent(service, Path::new("consul"), Path::new("/d")).unwrap();
            let args: Vec<_> = c.get_args().map(|a| a.to_str().unwrap()).collect();
            for want in [
                format!("-node={node}"),
                format!("-http-port={http}"),
                format!("-server-port={server}"),
                format!("-serf-lan-port={lan}"),
                format!("-serf-wan-port={wan}"),
                "-dns-port=-1".into(),
                "-grpc-port=-1".into(),
            ] {
                assert!(
                    args.contains(&want.as_str()),
                    "{service}: no {want} in {args:?}"
                );
            }
        }
        assert!(consul_agent(Service::Redis, Path::new("consul"), Path::new("/d")).is_err());
    }

    #[test]
    fn consul_acl_config() {
        let hcl = consul_acl_hcl();
        for line in [
            "  enabled = true\n",
            "  default_policy = \"deny\"\n",
            "  down_policy = \"extend-cache\"\n",
            &format!("    master = \"{CONSUL_ACL_MASTER_TOKEN}\"\n"),
            &format!("    agent = \"{CONSUL_ACL_MASTER_TOKEN}\"\n"),
        ] {
            assert!(hcl.contains(line), "{line:?} not in\n{hcl}");
        }
        assert!(hcl.starts_with("# written by cargo xtask\nacl {\n") && hcl.ends_with("  }\n}\n"));
    }

    #[test]
    fn env_values_are_shell_words() {
        assert_eq!(
            shell_word("redis://u:p@127.0.0.1:13379"),
            "redis://u:p@127.0.0.1:13379"
        );
        assert_eq!(
            shell_word("consul://127.0.0.1:18510/?token=t"),
            "'consul://127.0.0.1:18510/?token=t'"
        );
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn cluster_info_fields() {
        let info = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_known_nodes:3\r\n";
        assert_eq!(info_field(info, "cluster_state"), Some("ok"));
        assert_eq!(info_field(info, "cluster_slots_assigned"), Some("16384"));
        assert_eq!(info_field(info, "cluster_slots"), None);
        assert_eq!(info_field(info, "cluster_size"), None);
    }

    #[test]
    fn a_reused_pid_is_not_ours() {
        let me = std::process::id();
        let comm = fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        let comm = comm.trim();
        let started = start_time(me).unwrap();
        assert!(is_ours(me, comm, Some(started)));
        assert!(is_ours(me, comm, None));
        // Same pid and name, another start time: a different process.
        assert!(!is_ours(me, comm, Some(started + 1)));
        assert!(!is_ours(me, "chronyd", Some(started)));
    }
}
