//! The live backends: etcd, Consul (dev mode), Redis and chronyd as an NTP server, each on
//! 127.0.0.1 on a non-default port, with pid file, data and log under the workspace's
//! `target/services/<name>/` (also when CARGO_TARGET_DIR points elsewhere).

use std::{
    fmt, fs,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::process::CommandExt,
    path::PathBuf,
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
const CONSUL_HTTP_PORT: u16 = 18500;
const CONSUL_SERVER_PORT: u16 = 18300;
const CONSUL_SERF_LAN_PORT: u16 = 18301;
const CONSUL_SERF_WAN_PORT: u16 = 18302;
const REDIS_PORT: u16 = 13379;
const NTP_PORT: u16 = 11123;

/// Generous for a loaded 2-core CI machine; a healthy start takes a few seconds at most.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Service {
    Etcd,
    Consul,
    Redis,
    Ntp,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Service {
    pub(crate) const ALL: [Service; 4] = [Self::Etcd, Self::Consul, Self::Redis, Self::Ntp];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::Consul => "consul",
            Self::Redis => "redis",
            Self::Ntp => "ntp",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    pub(crate) fn env_var(self) -> &'static str {
        match self {
            Self::Etcd => "SYNC_TEST_ETCD",
            Self::Consul => "SYNC_TEST_CONSUL",
            Self::Redis => "SYNC_TEST_REDIS",
            Self::Ntp => "SYNC_TEST_NTP",
        }
    }

    /// The port clients use.
    fn port(self) -> u16 {
        match self {
            Self::Etcd => ETCD_PORT,
            Self::Consul => CONSUL_HTTP_PORT,
            Self::Redis => REDIS_PORT,
            Self::Ntp => NTP_PORT,
        }
    }

    fn addr(self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port()))
    }

    /// The value of the service's SYNC_TEST_* variable: a backend URL, as `sync-any` takes.
    pub(crate) fn endpoint(self) -> String {
        let scheme = match self {
            Self::Etcd => "etcd",
            Self::Consul => "consul",
            Self::Redis => "redis",
            Self::Ntp => "ntp",
        };
        format!("{scheme}://{HOST}:{}", self.port())
    }

    fn tcp_ports(self) -> &'static [u16] {
        match self {
            Self::Etcd => &[ETCD_PORT, ETCD_PEER_PORT],
            Self::Consul => &[
                CONSUL_HTTP_PORT,
                CONSUL_SERVER_PORT,
                CONSUL_SERF_LAN_PORT,
                CONSUL_SERF_WAN_PORT,
            ],
            Self::Redis => &[REDIS_PORT],
            Self::Ntp => &[],
        }
    }

    fn udp_ports(self) -> &'static [u16] {
        match self {
            Self::Consul => &[CONSUL_SERF_LAN_PORT, CONSUL_SERF_WAN_PORT],
            Self::Ntp => &[NTP_PORT],
            Self::Etcd | Self::Redis => &[],
        }
    }

    /// The process name (/proc/PID/comm) the pid file must point at; guards against a pid that
    /// was reused by an unrelated process since.
    fn comm(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::Consul => "consul",
            Self::Redis => "redis-server",
            Self::Ntp => "chronyd",
        }
    }

    fn dir(self) -> PathBuf {
        services_root().join(self.name())
    }

    fn pid_file(self) -> PathBuf {
        self.dir().join("pid")
    }

    fn log_file(self) -> PathBuf {
        self.dir().join(format!("{}.log", self.name()))
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
            bail!("unknown service `{name}` (known: etcd consul redis ntp)");
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

/// The pid of the service's process if it is running, per its pid file.
fn running_pid(service: Service) -> Option<u32> {
    let (pid, started) = parse_pid_file(&fs::read_to_string(service.pid_file()).ok()?)?;
    is_ours(pid, service.comm(), started).then_some(pid)
}

/// `PID [START_TIME]`: the start time (in clock ticks since boot, /proc/PID/stat field 22)
/// tells our process from a later one that was given the same pid — after a reboot, say, a
/// system redis-server or chronyd. (A pid file without it, from an older xtask, is checked by
/// name only.)
fn parse_pid_file(text: &str) -> Option<(u32, Option<u64>)> {
    let mut words = text.split_whitespace();
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
    let tcp = service.tcp_ports().iter().filter(|&&p| !tcp_free(p));
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
        match running_pid(service) {
            Some(pid) => {
                say!("{service}: already running (pid {pid})");
                running.push((service, pid, Instant::now()));
            }
            None => {
                let busy = busy_ports(service);
                if !busy.is_empty() {
                    bail!(
                        "{service}: port {} is in use by a process xtask did not start; stop \
                         it, or point the tests at your own server with {}",
                        busy.join(", "),
                        service.env_var()
                    );
                }
                to_start.push(service);
            }
        }
    }
    let tools: Vec<_> = to_start
        .iter()
        .flat_map(|&s| install::tools(s).iter().copied())
        .chain(extra_tools.iter().copied())
        .collect();
    install::ensure(&tools)?;
    if to_start.is_empty() {
        for (service, pid, since) in running {
            wait_ready(service, pid, since)?;
        }
        return Ok(Vec::new());
    }

    let consul = if to_start.contains(&Service::Consul) {
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
            let pid = spawn(service, consul.as_ref())?;
            started.push(service);
            running.push((service, pid, Instant::now()));
        }
        for &(service, pid, since) in &running {
            wait_ready(service, pid, since)?;
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

fn spawn(service: Service, consul: Option<&PathBuf>) -> Result<u32> {
    let dir = service.dir();
    fs::create_dir_all(&dir)?;
    let data = dir.join("data");
    // Each start is a fresh server: tests rely on random namespaces, never on old data.
    if data.exists() {
        fs::remove_dir_all(&data)?;
    }
    fs::create_dir_all(&data)?;
    let mut command = match service {
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
        Service::Consul => {
            let Some(consul) = consul else {
                bail!("consul: no binary");
            };
            let mut c = Command::new(consul);
            // Dev mode: one in-memory server that elects itself. DNS and gRPC are off; the
            // other ports are moved off their defaults.
            c.args(["agent", "-dev", "-node=sync-xtask", "-log-level=info"])
                .arg(format!("-bind={HOST}"))
                .arg(format!("-client={HOST}"))
                .arg(format!("-http-port={CONSUL_HTTP_PORT}"))
                .arg(format!("-server-port={CONSUL_SERVER_PORT}"))
                .arg(format!("-serf-lan-port={CONSUL_SERF_LAN_PORT}"))
                .arg(format!("-serf-wan-port={CONSUL_SERF_WAN_PORT}"))
                .args(["-dns-port=-1", "-grpc-port=-1"])
                .arg(format!("-data-dir={}", data.display()))
                // No update check against the vendor's servers: this network has none.
                .args(["-hcl", "disable_update_check = true"])
                .env("CHECKPOINT_DISABLE", "1");
            c
        }
        Service::Redis => {
            let mut c = Command::new(install::require("redis-server")?);
            // No config file: the machine's /etc/redis is not ours. No persistence.
            c.args(["--bind", HOST, "--port", &REDIS_PORT.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&data);
            c
        }
        Service::Ntp => {
            let conf = dir.join("chrony.conf");
            fs::write(&conf, chrony_conf(&data))?;
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
    };
    let log = fs::File::create(service.log_file())?;
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
    let started = start_time(pid).map_or(String::new(), |t| format!(" {t}"));
    if let Err(err) = fs::write(service.pid_file(), format!("{pid}{started}\n")) {
        // Without a pid file nothing could stop it later: stop it now.
        let _ = signal::kill(Pid::from_raw(i32::try_from(pid)?), signal::Signal::SIGKILL);
        wait_until(Duration::from_secs(5), || !alive(pid));
        bail!(
            "{service}: cannot write {}: {err}",
            service.pid_file().display()
        );
    }
    say!("{service}: started {program} (pid {pid})");
    Ok(pid)
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

fn wait_ready(service: Service, pid: u32, since: Instant) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if interrupted() {
            bail!("interrupted");
        }
        if !alive(pid) {
            bail!(
                "{service}: exited during start-up; the end of {}:\n{}",
                service.log_file().display(),
                log_tail(service)
            );
        }
        match health(service) {
            Ok(detail) => {
                say!(
                    "{service}: ready at {} ({detail}) after {}",
                    service.endpoint(),
                    fmt_duration(since.elapsed())
                );
                return Ok(());
            }
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
        Service::Consul => {
            let (code, body) = probe::http(
                service.addr(),
                "GET",
                "/v1/status/leader",
                b"",
                PROBE_TIMEOUT,
            )?;
            let leader = String::from_utf8_lossy(&body)
                .trim()
                .trim_matches('"')
                .to_string();
            if code != 200 || leader.is_empty() {
                bail!("no leader yet");
            }
            Ok(format!("leader {leader}"))
        }
        Service::Redis => {
            let mut redis = probe::Redis::connect(service.addr(), PROBE_TIMEOUT)?;
            match redis.cmd(&[b"PING"])? {
                probe::Resp::Simple(pong) if pong == "PONG" => Ok("PONG".into()),
                other => bail!("PING answered {other:?}"),
            }
        }
        Service::Ntp => {
            let reply = probe::ntp_query(service.addr(), PROBE_TIMEOUT)?;
            reply.check_synchronised()?;
            Ok(format!("stratum {}", reply.stratum))
        }
    }
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
    let Some(pid) = running_pid(service) else {
        let _ = fs::remove_file(service.pid_file());
        say!("{service}: not running");
        return Ok(());
    };
    let started = Instant::now();
    let target = Pid::from_raw(i32::try_from(pid)?);
    let _ = signal::kill(target, signal::Signal::SIGTERM);
    if !wait_until(Duration::from_secs(15), || !alive(pid)) {
        say!("{service}: pid {pid} ignored SIGTERM, killing it");
        let _ = signal::kill(target, signal::Signal::SIGKILL);
        if !wait_until(Duration::from_secs(5), || !alive(pid)) {
            bail!("{service}: pid {pid} would not die");
        }
    }
    let _ = fs::remove_file(service.pid_file());
    if !wait_until(Duration::from_secs(5), || busy_ports(service).is_empty()) {
        bail!(
            "{service}: stopped pid {pid}, but port {} is still in use",
            busy_ports(service).join(", ")
        );
    }
    say!(
        "{service}: stopped (pid {pid}) in {}",
        fmt_duration(started.elapsed())
    );
    Ok(())
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
    println!(
        "{:<8} {:<6} {:<8} {:<32} HEALTH",
        "SERVICE", "PORT", "PID", "ENDPOINT"
    );
    for &service in services {
        let (pid, health) = match running_pid(service) {
            Some(pid) => (
                pid.to_string(),
                health(service).unwrap_or_else(|e| format!("unhealthy: {e}")),
            ),
            None => {
                let busy = busy_ports(service);
                let state = if busy.is_empty() {
                    "stopped".to_string()
                } else {
                    format!("stopped; {} used by another process", busy.join(", "))
                };
                ("-".to_string(), state)
            }
        };
        println!(
            "{:<8} {:<6} {:<8} {:<32} {health}",
            service.name(),
            service.port(),
            pid,
            service.endpoint()
        );
    }
}

/// `export` lines for the running services, `eval`-able by a POSIX shell.
fn env(services: &[Service]) {
    for &service in services {
        if running_pid(service).is_some() {
            println!("export {}={}", service.env_var(), service.endpoint());
        } else {
            println!("# {service} is not running: cargo xtask services up {service}");
        }
    }
}

/// One real write and read through each service with a plain client.
pub(crate) fn smoke(services: &[Service]) -> Result<()> {
    let mut failures = Vec::new();
    for &service in services {
        let started = Instant::now();
        let result = if running_pid(service).is_none() {
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
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let value = format!("smoke-{}-{nanos}", std::process::id());
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
            let path = "/v1/kv/sync-xtask/smoke";
            let addr = service.addr();
            let (code, body) = probe::http(addr, "PUT", path, value.as_bytes(), PROBE_TIMEOUT)?;
            if code != 200 || body.trim_ascii() != b"true" {
                bail!("PUT {path}: {code} {}", String::from_utf8_lossy(&body));
            }
            let (code, body) =
                probe::http(addr, "GET", &format!("{path}?raw"), b"", PROBE_TIMEOUT)?;
            if code != 200 || body != value.as_bytes() {
                bail!("GET {path}?raw: {code} {}", String::from_utf8_lossy(&body));
            }
            probe::http(addr, "DELETE", path, b"", PROBE_TIMEOUT)?;
            Ok("KV PUT/GET/DELETE over HTTP".into())
        }
        Service::Redis => {
            let mut redis = probe::Redis::connect(service.addr(), PROBE_TIMEOUT)?;
            let key: &[u8] = b"sync-xtask:smoke";
            let set = redis.cmd(&[b"SET", key, value.as_bytes()])?;
            if set != probe::Resp::Simple("OK".into()) {
                bail!("SET answered {set:?}");
            }
            let got = redis.cmd(&[b"GET", key])?;
            if got != probe::Resp::Bulk(Some(value.clone().into_bytes())) {
                bail!("GET answered {got:?}");
            }
            redis.cmd(&[b"DEL", key])?;
            Ok("SET/GET/DEL over RESP".into())
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
        assert_eq!(parse_pid_file("123\n"), Some((123, None)));
        assert_eq!(parse_pid_file("123 4567\n"), Some((123, Some(4567))));
        assert_eq!(parse_pid_file(""), None);
        assert_eq!(parse_pid_file("x"), None);
        assert_eq!(parse_pid_file("123 x"), None);
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
