//! Which backend a command talks to: `--backend URL`, else `$SYNC_BACKEND` (clap reads both
//! into one option), else `--config FILE`, else `local://`.

use std::{path::Path, sync::Arc, time::Duration};

use sync_any::Config;
use sync_core::Backend;

use crate::{cli::Global, exit::Exit};

/// The in-process backend: the last resort, and useless for anything shared between processes.
const LOCAL: &str = "local://";

/// The chosen backend's config, with `ttl` in place of its own when given.
pub fn config(global: &Global, ttl: Option<Duration>) -> Result<Config, Exit> {
    // An empty SYNC_BACKEND (a script's unset variable) is no URL at all.
    let url = global.backend.as_deref().filter(|u| !u.trim().is_empty());
    let config = match (url, &global.config) {
        (Some(url), _) => {
            Config::from_url(url.trim()).map_err(|e| Exit::failed(url_error(url, e)))?
        }
        (None, Some(path)) => from_file(path)?,
        (None, None) => Config::from_url(LOCAL).map_err(Exit::from)?,
    };
    match ttl {
        Some(ttl) => with_ttl(config, ttl),
        None => Ok(config),
    }
}

/// Connects a client of `config`.
pub async fn connect(config: Config) -> Result<Arc<dyn Backend>, Exit> {
    config.connect().await.map_err(Exit::from)
}

/// How long a release or a close may take before syncctl gives up on it (the lease then
/// frees what is left within a TTL).
pub const LET_GO: Duration = Duration::from_secs(10);

/// Connects, runs `work` with the client, and closes it; nothing is held, so a close that
/// takes long is cut short.
pub async fn with_client(
    global: &Global,
    work: impl AsyncFnOnce(&dyn Backend) -> Result<u8, Exit>,
) -> Result<u8, Exit> {
    let client = connect(config(global, None)?).await?;
    let status = work(&*client).await;
    let _ = tokio::time::timeout(LET_GO, client.close()).await;
    status
}

/// Refuses the in-process backend for what must be shared between processes.
pub fn shared(config: &Config, what: &str) -> Result<(), Exit> {
    if config.backend() == "local" {
        return Err(Exit::failed(format!(
            "{what} on local:// holds only inside this one syncctl process, which excludes \
             nobody; name a shared backend with --backend URL, $SYNC_BACKEND or --config FILE"
        )));
    }
    Ok(())
}

fn url_error(url: &str, e: sync_core::Error) -> String {
    // The URL may carry a password: show its scheme only.
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if scheme.is_empty() {
        format!("backend {url:?}: {}", crate::exit::describe(&e))
    } else {
        format!("backend {scheme}://…: {}", crate::exit::describe(&e))
    }
}

fn from_file(path: &Path) -> Result<Config, Exit> {
    let shown = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| Exit::failed(format!("config {shown}: {e}")))?;
    toml::from_str(&text).map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|span| text[..span.start].lines().count().max(1))
            .map_or(String::new(), |n| format!(" (line {n})"));
        Exit::failed(format!("config {shown}{line}: {}", e.message()))
    })
}

/// `config` with its lease TTL set to `ttl`, through its serde form: every backend with a
/// lease calls the field `ttl`, and its own validation judges the value at connect.
fn with_ttl(config: Config, ttl: Duration) -> Result<Config, Exit> {
    let backend = config.backend();
    let mut value = serde_json::to_value(&config).map_err(Exit::failed)?;
    match value.get_mut("ttl") {
        Some(field) => *field = humantime::format_duration(ttl).to_string().into(),
        None => {
            return Err(Exit::failed(format!(
                "--ttl: the {backend} backend has no lease to set a TTL on"
            )));
        }
    }
    serde_json::from_value(value).map_err(|e| Exit::failed(format!("--ttl: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global(backend: Option<&str>, config: Option<&Path>) -> Global {
        Global {
            backend: backend.map(str::to_string),
            config: config.map(Path::to_path_buf),
            json: false,
            quiet: false,
        }
    }

    #[test]
    fn the_url_wins_over_the_file_and_local_is_last() {
        let file = std::env::temp_dir().join(format!("syncctl-{}.toml", std::process::id()));
        std::fs::write(&file, "backend = \"local\"\nnamespace = \"from-file\"\n").unwrap();
        let url = global(Some("local:///from-url"), Some(&file));
        assert_eq!(
            config(&url, None).unwrap(),
            Config::from_url("local:///from-url").unwrap()
        );
        let file_only = global(None, Some(&file));
        assert_eq!(
            config(&file_only, None).unwrap(),
            Config::from_url("local:///from-file").unwrap()
        );
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            config(&global(None, None), None).unwrap().backend(),
            "local"
        );
    }

    #[test]
    fn ttl_replaces_the_urls() {
        let got = config(
            &global(Some("etcd://h:2379/x?ttl=9s"), None),
            Some(Duration::from_secs(3)),
        );
        let want = Config::from_url("etcd://h:2379/x?ttl=3s").unwrap();
        assert_eq!(got.unwrap(), want);
        let ntp = config(&global(Some("ntp://h"), None), Some(Duration::from_secs(3)));
        assert!(ntp.unwrap_err().message.contains("no lease"));
    }

    #[test]
    fn a_bad_file_says_what_is_wrong_in_one_line() {
        let file = std::env::temp_dir().join(format!("syncctl-bad-{}.toml", std::process::id()));
        let bad = |text: &str| {
            std::fs::write(&file, text).unwrap();
            config(&global(None, Some(&file)), None)
                .unwrap_err()
                .message
        };
        let syntax = bad("backend = \"etcd\"\nttl = = 5\n");
        assert!(syntax.contains("(line 2)"), "{syntax}");
        let typed = bad("backend = \"etcd\"\nttl = 5\n");
        assert!(typed.contains("duration"), "{typed}");
        let unknown = bad("backend = \"zk\"\n");
        assert!(unknown.contains("zk"), "{unknown}");
        std::fs::remove_file(&file).unwrap();
        for message in [syntax, typed, unknown] {
            assert!(!message.contains('\n'), "{message}");
        }
    }

    #[test]
    fn a_url_error_hides_the_password() {
        let err = config(
            &global(Some("etcd://u:secret@h:2379/x?ttl=banana"), None),
            None,
        );
        let err = err.unwrap_err();
        assert!(!err.message.contains("secret"), "{}", err.message);
        assert_eq!(err.status, crate::exit::FAILED);
    }

    #[test]
    fn local_is_refused_for_shared_holds() {
        let local = Config::from_url("local://").unwrap();
        assert!(
            shared(&local, "lock")
                .unwrap_err()
                .message
                .contains("local://")
        );
    }
}
