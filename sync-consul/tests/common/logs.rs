//! The warnings and errors the library logs, kept for tests to look for: what a worker says
//! when it cannot go on is only ever told through `tracing`.

use std::{
    fmt::Write as _,
    sync::{Mutex, Once},
};

use tracing::{
    Event, Level, Metadata, Subscriber,
    field::{Field, Visit},
    span::{Attributes, Id, Record},
};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Starts keeping every WARN and ERROR event of this process (once; later calls do nothing).
pub fn keep() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Keeper);
    });
}

/// Whether a kept line contains `text`.
pub fn seen(text: &str) -> bool {
    seen_all(&[text])
}

/// Whether one kept line contains every one of `texts`.
pub fn seen_all(texts: &[&str]) -> bool {
    LINES
        .lock()
        .unwrap()
        .iter()
        .any(|l| texts.iter().all(|t| l.contains(t)))
}

struct Keeper;

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl Subscriber for Keeper {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        *meta.level() <= Level::WARN
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line(event.metadata().level().to_string());
        event.record(&mut line);
        LINES.lock().unwrap().push(line.0);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}
