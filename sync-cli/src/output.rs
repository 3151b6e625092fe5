//! Writing to stdout and stderr without panicking when the reader has gone (`| head`), and
//! values shown as text or JSON.

use std::io::Write;

use base64::Engine;

/// `text` and a newline on stdout.
pub fn line(text: &str) {
    bytes(format!("{text}\n").as_bytes());
}

/// Raw bytes on stdout.
pub fn bytes(data: &[u8]) {
    let mut out = std::io::stdout().lock();
    // A reader that went away is not syncctl's failure.
    let _ = out.write_all(data).and_then(|()| out.flush());
}

/// One JSON value on one line of stdout.
pub fn json(value: &serde_json::Value) {
    line(&value.to_string());
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
