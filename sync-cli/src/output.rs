//! Writing to stdout and stderr without panicking when the reader has gone (`| head`), and
//! values shown as text or JSON.

use std::io::Write;

use base64::Engine;

/// `text` and a newline on stdout; false when the reader has gone (see [`bytes`]).
pub fn line(text: &str) -> bool {
    bytes(format!("{text}\n").as_bytes())
}

/// Raw bytes on stdout; false when they could not be written. A reader that went away is not
/// syncctl's failure: a one-shot command ignores it, a command that goes on printing stops.
pub fn bytes(data: &[u8]) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_all(data).and_then(|()| out.flush()).is_ok()
}

/// Whether the reader of stdout has gone (a pipe whose other end is closed), found without
/// writing: a command that waits long between lines must not outlive `| head -1` by that long.
pub fn stdout_gone() -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let stdout = std::io::stdout();
    let mut fds = [PollFd::new(&stdout, PollFlags::empty())];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)).is_ok()
        && fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP)
}

/// One JSON value on one line of stdout; false when the reader has gone.
pub fn json(value: &serde_json::Value) -> bool {
    line(&value.to_string())
}

/// `text` as a line on stderr, prefixed `syncctl: `.
pub fn err(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "syncctl: {text}");
}

/// Sets `key` to the bytes as a string when they are UTF-8, else `<key>_base64`.
pub fn put_bytes(object: &mut serde_json::Value, key: &str, data: &[u8]) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    match std::str::from_utf8(data) {
        Ok(text) => map.insert(key.to_string(), text.into()),
        Err(_) => map.insert(
            format!("{key}_base64"),
            base64::engine::general_purpose::STANDARD
                .encode(data)
                .into(),
        ),
    };
}

/// The bytes as one line of text: UTF-8 with control characters escaped.
pub fn shown(data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_that_are_not_utf8_go_as_base64() {
        let mut v = serde_json::json!({});
        put_bytes(&mut v, "value", b"ok");
        put_bytes(&mut v, "other", &[0xff, 0x00]);
        assert_eq!(
            v,
            serde_json::json!({"value": "ok", "other_base64": "/wA="})
        );
    }

    #[test]
    fn shown_values_stay_on_one_line() {
        assert_eq!(shown(b"a\nb\tc"), "a\\nb\\tc");
    }
}
