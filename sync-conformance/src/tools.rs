//! The servers' own command-line tools that interop tests drive, found as `cargo xtask` finds
//! them.

use std::path::PathBuf;

/// The `consul` binary: on PATH, else the build `cargo xtask services up consul` fetched into
/// its cache (`$XDG_CACHE_HOME` or `~/.cache`, then `sync-xtask/consul-1.8.7`).
pub fn consul_binary() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(found) = std::env::split_paths(&path)
        .map(|dir| dir.join("consul"))
        .find(|p| p.is_file())
    {
        return Ok(found);
    }
    let cached = xtask_cache().join("sync-xtask/consul-1.8.7/root/usr/bin/consul");
    if cached.is_file() {
        return Ok(cached);
    }
    Err(format!(
        "the `consul` binary is missing: it is not on PATH nor at {} (where \
         `cargo xtask services up consul` fetches it); put a consul on PATH",
        cached.display()
    ))
}

/// xtask's cache directory (see its `install::cache_dir`).
fn xtask_cache() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir);
    }
    if let Some(home) = var("HOME") {
        return PathBuf::from(home).join(".cache");
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = var("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d));
    target.join("services/cache")
}
