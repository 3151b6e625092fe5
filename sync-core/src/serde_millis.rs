//! Serde glue for backend configs: a [`Duration`] as whole milliseconds.
//!
//! ```
//! use std::time::Duration;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Config {
//!     #[serde(with = "sync_core::serde_millis")]
//!     ttl: Duration,
//! }
//!
//! let c: Config = serde_json::from_str(r#"{"ttl": 1500}"#).unwrap();
//! assert_eq!(c.ttl, Duration::from_millis(1500));
//! ```

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Writes whole milliseconds (saturating at `u64::MAX`).
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX))
}

/// Reads whole milliseconds.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}
