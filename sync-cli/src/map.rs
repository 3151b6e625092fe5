//! `syncctl map get|put|cas|del|ls`.

use std::io::Read;

use sync_core::{Entry, ErrorKind, Map};

use crate::{
    cli::{Global, MapCommand},
    exit::{self, Exit},
    output,
};

/// Runs the command on a connected client.
pub async fn run(
    client: &dyn sync_core::Backend,
    global: &Global,
    command: MapCommand,
) -> Result<u8, Exit> {
    match command {
        MapCommand::Get { map, key } => get(&*client.map(&map)?, global, &key).await,
        MapCommand::Put { map, key, value } => {
            let value = value_or_stdin(value)?;
            let version = client.map(&map)?.write(&key, &value).await?;
            print_version(global, &key, version);
            Ok(0)
        }
        MapCommand::Cas {
            map,
            key,
            expect,
            absent: _,
            value,
        } => {
            let value = value_or_stdin(value)?;
            let swapped = client
                .map(&map)?
                .compare_and_swap(&key, expect, &value)
                .await;
            let version = swapped.map_err(|e| exit::negative_on(e, &[ErrorKind::Conflict]))?;
            print_version(global, &key, version);
            Ok(0)
        }
        MapCommand::Del { map, key, expect } => del(&*client.map(&map)?, &key, expect).await,
        MapCommand::Ls { map } => {
            let entries = client.map(&map)?.entries().await?;
            list(global, &entries);
            Ok(0)
        }
    }
}

async fn get(map: &dyn Map, global: &Global, key: &str) -> Result<u8, Exit> {
    let Some(entry) = map.read(key).await? else {
        return Err(Exit::new(
            exit::NEGATIVE,
            format!("map {}: no key {key:?}", map.name()),
        ));
    };
    if global.json {
        output::json(&entry_json(&entry));
    } else {
        output::bytes(&entry.value);
    }
    Ok(0)
}

async fn del(map: &dyn Map, key: &str, expect: Option<u64>) -> Result<u8, Exit> {
    match expect {
        Some(version) => {
            let deleted = map.compare_and_delete(key, version).await;
            deleted
                .map_err(|e| exit::negative_on(e, &[ErrorKind::Conflict, ErrorKind::NotFound]))?;
        }
        None if !map.delete(key).await? => {
            return Err(Exit::new(
                exit::NEGATIVE,
                format!("map {}: no key {key:?}", map.name()),
            ));
        }
        None => {}
    }
    Ok(0)
}

fn list(global: &Global, entries: &[Entry]) {
    if global.json {
        let all: Vec<_> = entries.iter().map(entry_json).collect();
        output::json(&serde_json::Value::Array(all));
        return;
    }
    for e in entries {
        output::line(&format!(
            "{}\t{}\t{}",
            e.key,
            e.version,
            output::shown(&e.value)
        ));
    }
}

fn entry_json(entry: &Entry) -> serde_json::Value {
    let mut value = serde_json::json!({"key": entry.key, "version": entry.version});
    output::put_bytes(&mut value, "value", &entry.value);
    value
}

fn print_version(global: &Global, key: &str, version: u64) {
    if global.json {
        output::json(&serde_json::json!({"key": key, "version": version}));
    } else {
        output::line(&version.to_string());
    }
}

/// The value given, or all of stdin.
pub fn value_or_stdin(value: Option<String>) -> Result<Vec<u8>, Exit> {
    match value {
        Some(v) => Ok(v.into_bytes()),
        None => {
            let mut data = Vec::new();
            std::io::stdin()
                .read_to_end(&mut data)
                .map_err(|e| Exit::failed(format!("reading stdin: {e}")))?;
            Ok(data)
        }
    }
}
