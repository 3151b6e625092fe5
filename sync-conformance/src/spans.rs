//! What a `tracing` subscriber sees of an operation (DESIGN §2): exactly one span, named
//! `sync`, with its backend, primitive, operation and id (and a map's name), and no second
//! span of the library's own nested in it.

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use tracing::{
    Dispatch, Level, Metadata, Subscriber,
    field::{Field, Visit},
    instrument::WithSubscriber,
    span,
    subscriber::Interest,
};

/// One span a library crate (`sync_*`) opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) name: String,
    pub(crate) operation: String,
    pub(crate) id: String,
    pub(crate) map: Option<String>,
}

impl Seen {
    /// A `sync` span of `operation` on `id`.
    pub(crate) fn op(operation: &str, id: &str) -> Seen {
        Seen {
            name: "sync".into(),
            operation: operation.into(),
            id: id.into(),
            map: None,
        }
    }

    /// The same, in map `map`.
    pub(crate) fn in_map(mut self, map: &str) -> Seen {
        self.map = Some(map.into());
        self
    }
}

impl Visit for Seen {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "operation" => self.operation = value.into(),
            "id" => self.id = value.into(),
            "map" => self.map = Some(value.into()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

/// Notes every span up to DEBUG that a `sync_*` crate opens.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Seen>>>);

impl Spans {
    fn ours(metadata: &Metadata<'_>) -> bool {
        metadata.is_span()
            && metadata.target().starts_with("sync_")
            && *metadata.level() <= Level::DEBUG
    }
}

impl Subscriber for Spans {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        match Self::ours(metadata) {
            true => Interest::sometimes(),
            false => Interest::never(),
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        Self::ours(metadata)
    }

    fn new_span(&self, span: &span::Attributes<'_>) -> span::Id {
        let mut seen = Seen {
            name: span.metadata().name().into(),
            operation: String::new(),
            id: String::new(),
            map: None,
        };
        span.record(&mut seen);
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.push(seen);
        span::Id::from_u64(all.len() as u64)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// Runs `fut` with a subscriber listening (to it alone, on whichever thread polls it; tasks it
/// spawns are not heard) and returns what it gave and the spans it opened, in order.
pub(crate) async fn spans_of<F: Future>(fut: F) -> (F::Output, Vec<Seen>) {
    let spans = Spans::default();
    let out = fut.with_subscriber(Dispatch::new(spans.clone())).await;
    let seen = std::mem::take(&mut *spans.0.lock().unwrap_or_else(|p| p.into_inner()));
    (out, seen)
}
