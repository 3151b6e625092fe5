//! Installing what the live backends need: Debian packages through the machine's own apt, and
//! Consul, which bookworm does not package, from Debian bullseye's `consul` (1.8.7) fetched
//! through a private apt state directory and unpacked into a cache, never into the system.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use xshell::{Shell, cmd};

use crate::{Result, fmt_duration, is_root, services::Service};

/// A program and the Debian package that ships it.
pub(crate) type Tool = (&'static str, &'static str);

/// protoc is not a service, but etcd-client's build script needs it.
pub(crate) const PROTOC: Tool = ("protoc", "protobuf-compiler");

/// etcd-client's protos import `google/protobuf/descriptor.proto`, shipped apart from protoc.
/// (`which` joins a PATH entry with an absolute path as that path, so the check holds.)
pub(crate) const PROTO_INCLUDES: Tool = (
    "/usr/include/google/protobuf/descriptor.proto",
    "libprotobuf-dev",
);

pub(crate) fn tools(service: Service) -> &'static [Tool] {
    match service {
        Service::Etcd => &[
            ("etcd", "etcd-server"),
            ("etcdctl", "etcd-client"),
            PROTOC,
            PROTO_INCLUDES,
        ],
        Service::Redis => &[("redis-server", "redis-server")],
        // redis-cli forms the cluster.
        Service::RedisCluster => &[
            ("redis-server", "redis-server"),
            ("redis-cli", "redis-tools"),
        ],
        Service::Ntp => &[("chronyd", "chrony")],
        // Not from the machine's apt: see `consul`.
        Service::Consul | Service::ConsulAcl => &[],
    }
}

/// Finds a program on PATH, or in the sbin directories a non-root PATH may lack (chronyd).
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

pub(crate) fn require(program: &str) -> Result<PathBuf> {
    which(program).ok_or_else(|| format!("`{program}` is not installed").into())
}

/// Installs, with one apt-get run, the packages of whichever tools are not on the machine.
pub(crate) fn ensure(tools: &[Tool]) -> Result<()> {
    let mut packages: Vec<&str> = Vec::new();
    let mut missing: Vec<&str> = Vec::new();
    for &(program, package) in tools {
        if which(program).is_none() && !missing.contains(&program) {
            missing.push(program);
            if !packages.contains(&package) {
                packages.push(package);
            }
        }
    }
    if packages.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    say!(
        "installing {} with apt-get (missing: {})",
        packages.join(" "),
        missing.join(", ")
    );
    let sh = Shell::new()?;
    let (program, prefix) = apt_get_prefix()?;
    let (prefix, to_install) = (&prefix, &packages);
    // The lists may be absent or stale on a fresh machine, and the update takes seconds.
    cmd!(sh, "{program} {prefix...} -q update").run()?;
    cmd!(
        sh,
        "{program} {prefix...} -q install -y --no-install-recommends {to_install...}"
    )
    .run()?;
    for program in missing {
        require(program).map_err(|e| format!("{e} even after installing its package"))?;
    }
    say!(
        "installed {} in {}",
        packages.join(" "),
        fmt_duration(started.elapsed())
    );
    Ok(())
}

/// `apt-get` as root, through sudo otherwise; noninteractive so that no prompt can hang CI.
fn apt_get_prefix() -> Result<(&'static str, Vec<&'static str>)> {
    let command = ["DEBIAN_FRONTEND=noninteractive", "apt-get"];
    if is_root() {
        return Ok(("env", command.to_vec()));
    }
    if which("sudo").is_none() {
        bail!("installing packages needs root or sudo; install them yourself and retry");
    }
    Ok(("sudo", [&["env"][..], &command].concat()))
}

const CONSUL_SUITE: &str = "bullseye";
const CONSUL_VERSION: &str = "1.8.7";

/// The consul binary: one on PATH if there is one, else the cached bullseye build, fetching it
/// on first use.
pub(crate) fn consul() -> Result<PathBuf> {
    if let Some(path) = which("consul") {
        return Ok(path);
    }
    let dir = cache_dir().join(format!("consul-{CONSUL_VERSION}"));
    let binary = dir.join("root/usr/bin/consul");
    if binary.is_file() && consul_version(&binary).is_ok() {
        return Ok(binary);
    }
    let started = Instant::now();
    say!(
        "fetching consul {CONSUL_VERSION} from Debian {CONSUL_SUITE} into {}",
        dir.display()
    );
    fetch_consul(&cache_dir(), &dir)?;
    let version = consul_version(&binary)?;
    say!("fetched {version} in {}", fmt_duration(started.elapsed()));
    Ok(binary)
}

fn consul_version(binary: &Path) -> Result<String> {
    let output = Command::new(binary).arg("version").output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    match text.lines().next() {
        Some(first) if output.status.success() && first.starts_with("Consul v") => {
            Ok(first.to_string())
        }
        _ => bail!(
            "{} does not run: {}{}",
            binary.display(),
            text,
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Downloads are kept across clones and `cargo clean` (CI starts from a fresh clone), in the
/// user's cache directory.
fn cache_dir() -> PathBuf {
    let base = match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(dir), _) if !dir.is_empty() => PathBuf::from(dir),
        (_, Some(home)) if !home.is_empty() => PathBuf::from(home).join(".cache"),
        _ => crate::target_dir().join("services/cache"),
    };
    base.join("sync-xtask")
}

/// Fetches and unpacks bullseye's consul into `dir`, with the private apt state under `cache`.
fn fetch_consul(cache: &Path, dir: &Path) -> Result<()> {
    let apt_dir = cache.join(format!("apt-{CONSUL_SUITE}"));
    let state = apt_dir.join("state");
    let cache = apt_dir.join("cache");
    let download = apt_dir.join("download");
    for d in [
        state.join("lists/partial"),
        cache.join("archives/partial"),
        download.clone(),
    ] {
        fs::create_dir_all(d)?;
    }
    // An empty dpkg status: this apt knows nothing installed and installs nothing; it only
    // downloads.
    let status = state.join("status");
    fs::write(&status, "")?;
    let archive = host_archive()?;
    let sources = apt_dir.join("sources.list");
    let options = match &archive.signed_by {
        Some(keyring) => format!("[signed-by={keyring}] "),
        None => String::new(),
    };
    fs::write(
        &sources,
        format!("deb {options}{} {CONSUL_SUITE} main\n", archive.uri),
    )?;

    let mut opts: Vec<String> = Vec::new();
    let mut opt = |key: &str, value: &str| {
        opts.push("-o".into());
        opts.push(format!("{key}={value}"));
    };
    opt("Dir::State", &state.to_string_lossy());
    opt("Dir::State::status", &status.to_string_lossy());
    opt("Dir::Etc::SourceList", &sources.to_string_lossy());
    opt("Dir::Etc::SourceParts", "/dev/null");
    opt("Dir::Etc::PreferencesParts", "/dev/null");
    opt("Dir::Cache", &cache.to_string_lossy());
    // A snapshot mirror's Release files may have expired; signatures are still checked.
    opt("Acquire::Check-Valid-Until", "false");
    // Only the Packages index is needed: no translations, and no AppStream metadata (4 MB for
    // bullseye main) that the machine's apt.conf.d may ask for.
    opt("Acquire::Languages", "none");
    opt(
        "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled",
        "false",
    );
    opt(
        "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled",
        "false",
    );
    opt(
        "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled",
        "false",
    );
    opt(
        "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled",
        "false",
    );
    if is_root() {
        // The private directories are root's; apt's _apt sandbox user could not write them.
        opt("APT::Sandbox::User", "root");
    }

    let opts = &opts;
    let sh = Shell::new()?;
    cmd!(sh, "apt-get {opts...} -q update").run().map_err(|e| {
        format!(
            "{e}\n(the consul download uses the {CONSUL_SUITE} suite of {}; \
             a consul on PATH is used instead if there is one)",
            archive.uri
        )
    })?;
    for old in fs::read_dir(&download)? {
        fs::remove_file(old?.path())?;
    }
    sh.change_dir(&download);
    cmd!(sh, "apt-get {opts...} -q download consul").run()?;
    let deb = fs::read_dir(&download)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|ext| ext == "deb"))
        .ok_or("apt-get download left no .deb")?;

    // Unpack beside the final place and rename, so that a half-unpacked tree is never used.
    let unpacking = dir.with_file_name(format!("consul-{CONSUL_VERSION}.unpacking"));
    let _ = fs::remove_dir_all(&unpacking);
    fs::create_dir_all(&unpacking)?;
    cmd!(sh, "dpkg -x {deb} {unpacking}/root").run()?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&unpacking, dir)?;
    fs::remove_file(deb)?;
    Ok(())
}

/// The Debian archive the machine's own apt uses.
#[derive(Debug, PartialEq, Eq)]
struct Archive {
    uri: String,
    signed_by: Option<String>,
}

#[derive(Debug)]
struct SourceEntry {
    uri: String,
    suites: Vec<String>,
    components: Vec<String>,
    signed_by: Option<String>,
}

fn host_archive() -> Result<Archive> {
    let mut entries = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        entries.extend(parse_one_line(&text));
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for file in files {
            let Ok(text) = fs::read_to_string(&file) else {
                continue;
            };
            match file.extension().and_then(|e| e.to_str()) {
                Some("list") => entries.extend(parse_one_line(&text)),
                Some("sources") => entries.extend(parse_deb822(&text)),
                _ => {}
            }
        }
    }
    let codename = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    pick_archive(&entries, &codename).ok_or_else(|| {
        "found no Debian archive (a `main` component of the release suite) in \
         /etc/apt/sources.list or /etc/apt/sources.list.d; put a consul binary on PATH instead"
            .into()
    })
}

/// The entry for the release suite itself (not -security or -updates), with `main`. Third-party
/// repositories often name the release suite and `main` too (`https://apt.releases.example
/// bookworm main`), and may come first (sources.list, or a .list file sorting before
/// debian.sources): among the candidates, the one that looks most like Debian's own archive wins
/// — signed by Debian's archive keyring, or by the system keyrings with a `…/debian` path — and
/// the first such one on a tie.
fn pick_archive(entries: &[SourceEntry], codename: &str) -> Option<Archive> {
    let usable = |e: &&SourceEntry| {
        (e.uri.starts_with("http://") || e.uri.starts_with("https://"))
            && e.components.iter().any(|c| c == "main")
    };
    let debian_like = |e: &SourceEntry| -> u32 {
        let keyring = match e.signed_by.as_deref() {
            Some(k) if k.contains("debian-archive-keyring") => 4,
            // The system's trusted keyrings, as Debian's classic sources.list has it.
            None => 1,
            // A keyring of its own: a third-party repository.
            Some(_) => 0,
        };
        let path = e
            .uri
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default();
        let path = if path == "debian" { 2 } else { 0 };
        keyring + path
    };
    fn best(
        candidates: Vec<&SourceEntry>,
        score: impl Fn(&SourceEntry) -> u32,
    ) -> Option<&SourceEntry> {
        // max_by_key keeps the last of equals; the first listed should win a tie.
        candidates.into_iter().rev().max_by_key(|e| score(e))
    }
    let exact = best(
        entries
            .iter()
            .filter(usable)
            .filter(|e| !codename.is_empty() && e.suites.iter().any(|s| s == codename))
            .collect(),
        debian_like,
    );
    let plain = || {
        best(
            entries
                .iter()
                .filter(usable)
                .filter(|e| debian_like(e) > 0)
                .filter(|e| {
                    e.suites
                        .iter()
                        .any(|s| !s.contains('-') && !s.contains('/'))
                })
                .collect(),
            debian_like,
        )
    };
    exact.or_else(plain).map(|e| Archive {
        uri: e.uri.trim_end_matches('/').to_string(),
        signed_by: e.signed_by.clone(),
    })
}

/// `deb [opt=value ...] URI suite component...` lines.
fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    let mut entries = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(after) = rest.strip_prefix('[') {
            let Some(end) = after.find(']') else { continue };
            for option in after[..end].split_whitespace() {
                if let Some(keyring) = option.strip_prefix("signed-by=") {
                    signed_by = Some(keyring.to_string());
                }
            }
            rest = &after[end + 1..];
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        entries.push(SourceEntry {
            uri: uri.to_string(),
            suites: vec![suite.to_string()],
            components: words.map(String::from).collect(),
            signed_by,
        });
    }
    entries
}

/// deb822 `.sources` stanzas. A Signed-By that embeds a key block (not a path) is dropped: apt
/// then falls back to the machine's trusted keyrings.
fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut entries = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    let flush = |fields: &mut Vec<(String, String)>, entries: &mut Vec<SourceEntry>| {
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.as_str())
        };
        let words = |key: &str| -> Vec<String> {
            get(key)
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        let enabled = get("Enabled").is_none_or(|v| !v.trim().eq_ignore_ascii_case("no"));
        if enabled && words("Types").iter().any(|t| t == "deb") {
            let signed_by = get("Signed-By")
                .map(str::trim)
                .filter(|v| v.starts_with('/') && !v.contains('\n'))
                .map(String::from);
            for uri in words("URIs") {
                entries.push(SourceEntry {
                    uri,
                    suites: words("Suites"),
                    components: words("Components"),
                    signed_by: signed_by.clone(),
                });
            }
        }
        fields.clear();
    };
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut fields, &mut entries);
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            fields.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    flush(&mut fields, &mut entries);
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    // Example hosts only: the code itself never names one.
    #[test]
    fn deb822_release_suite_is_picked() {
        let text = "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n\
            Suites: bookworm bookworm-updates\nComponents: main\n\
            Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
            Types: deb\nURIs: http://mirror.example/debian-security\n\
            Suites: bookworm-security\nComponents: main\n\n\
            Types: deb\nEnabled: no\nURIs: http://other.example/debian\n\
            Suites: bookworm\nComponents: main\n";
        let entries = parse_deb822(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            pick_archive(&entries, "bookworm"),
            Some(Archive {
                uri: "http://mirror.example/debian".into(),
                signed_by: Some("/usr/share/keyrings/debian-archive-keyring.gpg".into()),
            })
        );
    }

    #[test]
    fn one_line_sources_parse() {
        let text = "# deb http://old.example/debian bookworm main\n\
            deb-src http://src.example/debian bookworm main\n\
            deb http://sec.example/debian-security bookworm-security main\n\
            deb [arch=amd64 signed-by=/k.gpg] https://mirror.example/debian bookworm main contrib\n";
        let entries = parse_one_line(text);
        assert_eq!(entries.len(), 2);
        let archive = pick_archive(&entries, "bookworm").unwrap();
        assert_eq!(archive.uri, "https://mirror.example/debian");
        assert_eq!(archive.signed_by.as_deref(), Some("/k.gpg"));
        // Without a codename, the first suite that is not a -security/-updates one.
        assert_eq!(
            pick_archive(&entries, "").unwrap().uri,
            "https://mirror.example/debian"
        );
    }

    #[test]
    fn a_third_party_repository_naming_the_release_suite_is_not_picked() {
        // sources.list is read first, and .list files may sort before debian.sources.
        let mut entries = parse_one_line(
            "deb [signed-by=/usr/share/keyrings/vendor.gpg] https://apt.vendor.example bookworm main\n\
             deb [arch=amd64] https://packages.other.example/repos/cli/ bookworm main\n",
        );
        entries.extend(parse_deb822(
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: https://deb.vendor.example/node_20.x\nSuites: nodistro\n\
             Components: main\nSigned-By: /usr/share/keyrings/nodesource.gpg\n",
        ));
        let debian = Some(Archive {
            uri: "http://mirror.example/debian".into(),
            signed_by: Some("/usr/share/keyrings/debian-archive-keyring.gpg".into()),
        });
        assert_eq!(pick_archive(&entries, "bookworm"), debian);
        assert_eq!(pick_archive(&entries, ""), debian);
        // A classic one-line Debian entry (system keyrings) beats a vendor's own keyring.
        let classic = parse_one_line(
            "deb [signed-by=/etc/apt/keyrings/vendor.asc] https://apt.vendor.example bookworm main\n\
             deb http://ftp.example/debian bookworm main\n",
        );
        assert_eq!(
            pick_archive(&classic, "bookworm").unwrap().uri,
            "http://ftp.example/debian"
        );
        // A vendor repository alone, with a suite that is not the release's: nothing.
        let vendor_only = parse_deb822(
            "Types: deb\nURIs: https://deb.vendor.example/node_20.x\nSuites: nodistro\n\
             Components: main\nSigned-By: /usr/share/keyrings/nodesource.gpg\n",
        );
        assert_eq!(pick_archive(&vendor_only, ""), None);
    }

    /// The whole consul download, against the machine's own Debian archive (network needed):
    /// `cargo test -p xtask -- --ignored consul`.
    #[test]
    #[ignore = "downloads from the machine's Debian archive"]
    fn consul_is_fetched_from_bullseye_through_a_private_apt_state() {
        let base = crate::target_dir().join(format!("xtask-consul-test-{}", std::process::id()));
        let dir = base.join(format!("consul-{CONSUL_VERSION}"));
        let result = fetch_consul(&base, &dir)
            .and_then(|()| consul_version(&dir.join("root/usr/bin/consul")));
        let _ = fs::remove_dir_all(&base);
        let version = result.unwrap();
        assert!(
            version.starts_with(&format!("Consul v{CONSUL_VERSION}")),
            "{version}"
        );
    }

    #[test]
    fn inline_key_is_not_used_as_a_path() {
        let text = "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm\n\
            Components: main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n";
        let entries = parse_deb822(text);
        assert_eq!(entries[0].signed_by, None);
    }
}
