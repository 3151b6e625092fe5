//! The report: rows of measurements, rendered as a Markdown table, JSON and an SVG chart of
//! the ratios.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats::median;

/// Which way is good for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Latency, memory, requests: less is better; a ratio above 1 means sync is slower.
    Lower,
    /// Throughput: more is better; a ratio below 1 means sync is slower.
    Higher,
}

/// One round of one implementation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The row's metric (p50, ops/s, MB…).
    pub value: f64,
    /// The 99th percentile, for latency rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    /// etcd requests (unary calls) per operation, from etcd's `/metrics`; for Redis, the
    /// commands the client sent per operation, from `INFO commandstats`; for Consul, the HTTP
    /// requests sent per operation, counted by a proxy in front of the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_op: Option<f64>,
    /// etcd watch streams opened per operation, from etcd's `/metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams_per_op: Option<f64>,
    /// etcd CPU microseconds per operation, from etcd's `/metrics`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server_cpu_us_per_op: Option<f64>,
    /// This (client) process's CPU microseconds per operation.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_cpu_us_per_op: Option<f64>,
    /// Anything else worth keeping (fairness, keep-alives…), shown in the note column.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub detail: String,
}

impl Sample {
    /// A sample of just a value.
    pub fn value(value: f64) -> Sample {
        Sample {
            value,
            ..Sample::default()
        }
    }
}

/// One implementation's rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// What ran: `sync`, `raw txn put-if-absent + delete`, `etcd Lock RPC`…
    pub label: String,
    /// One sample per round, in round order.
    pub rounds: Vec<Sample>,
}

impl Variant {
    /// An implementation with no rounds yet.
    pub fn new(label: impl Into<String>) -> Variant {
        Variant {
            label: label.into(),
            rounds: Vec::new(),
        }
    }

    /// The median of the rounds' values.
    pub fn median(&self) -> Option<f64> {
        median(&self.rounds.iter().map(|s| s.value).collect::<Vec<_>>())
    }

    fn median_of(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.rounds.iter().filter_map(f).collect();
        median(&values)
    }
}

/// One measured scenario metric: sync beside its baselines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// `etcd`, `local`, `ntp`.
    pub backend: String,
    /// What was done, e.g. `uncontended acquire+release`.
    pub scenario: String,
    /// What the values are, e.g. `p50 µs`, `ops/s`, `MB`.
    pub metric: String,
    /// Which way is good.
    pub better: Better,
    /// The library.
    pub sync: Variant,
    /// The backend's own client doing the minimal requests, if the scenario has one.
    pub raw: Option<Variant>,
    /// What a user would otherwise pick, if there is one.
    pub peer: Option<Variant>,
    /// sync/raw per round (the round's sync value over the same round's raw value).
    pub ratio_raw: Vec<f64>,
    /// sync/peer per round.
    pub ratio_peer: Vec<f64>,
    /// How the scenario was run (sizes, what the baselines do).
    pub note: String,
}

impl Row {
    /// A row for `scenario` with the library's variant labelled `sync`.
    pub fn new(backend: &str, scenario: impl Into<String>, metric: &str, better: Better) -> Row {
        Row {
            backend: backend.into(),
            scenario: scenario.into(),
            metric: metric.into(),
            better,
            sync: Variant::new("sync"),
            raw: None,
            peer: None,
            ratio_raw: Vec::new(),
            ratio_peer: Vec::new(),
            note: String::new(),
        }
    }

    /// With a raw baseline labelled `label`.
    pub fn with_raw(mut self, label: impl Into<String>) -> Row {
        self.raw = Some(Variant::new(label));
        self
    }

    /// With a peer labelled `label`.
    pub fn with_peer(mut self, label: impl Into<String>) -> Row {
        self.peer = Some(Variant::new(label));
        self
    }

    /// With a note.
    pub fn with_note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    /// Fills in the per-round ratios from the rounds recorded.
    pub fn finish(mut self) -> Row {
        let ratios = |base: &Option<Variant>| -> Vec<f64> {
            let Some(base) = base else {
                return Vec::new();
            };
            self.sync
                .rounds
                .iter()
                .zip(&base.rounds)
                .filter(|(_, b)| b.value != 0.0)
                .map(|(s, b)| s.value / b.value)
                .collect()
        };
        self.ratio_raw = ratios(&self.raw);
        self.ratio_peer = ratios(&self.peer);
        self
    }

    /// The ratio the chart shows: sync over raw if there is a raw baseline, else over the peer.
    pub fn headline_ratio(&self) -> Option<(f64, &'static str)> {
        median(&self.ratio_raw)
            .map(|r| (r, "raw"))
            .or_else(|| median(&self.ratio_peer).map(|r| (r, "peer")))
    }
}

/// A scenario that did not run, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// The backend.
    pub backend: String,
    /// The scenario, or `*` for all of the backend's.
    pub scenario: String,
    /// Why: no backend crate yet, no service, or the error it failed with.
    pub reason: String,
    /// Whether it failed (an error while running) rather than being left out on purpose.
    pub failed: bool,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `--quick`: a few seconds per scenario, small sizes; for keeping the harness alive, not
    /// for numbers.
    pub quick: bool,
    /// The cargo profile the bench was built with (`release`, or `debug` for `--quick`).
    pub profile: String,
    /// Rounds per scenario (sync, raw and peer interleaved in each).
    pub rounds: usize,
    /// When the run started, seconds since the Unix epoch.
    pub started_unix: u64,
    /// The measurements.
    pub rows: Vec<Row>,
    /// What did not run.
    pub skipped: Vec<Skipped>,
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_variant(v: &Option<Variant>) -> String {
    let Some(v) = v else {
        return "—".into();
    };
    let Some(m) = v.median() else {
        return "—".into();
    };
    let mut s = fmt_num(m);
    if let Some(p99) = v.median_of(|s| s.p99) {
        let _ = write!(s, " (p99 {})", fmt_num(p99));
    }
    s
}

fn fmt_ratio(ratios: &[f64]) -> String {
    let (Some(lo), Some(hi)) = (
        ratios.iter().copied().reduce(f64::min),
        ratios.iter().copied().reduce(f64::max),
    ) else {
        return "—".into();
    };
    if ratios.len() == 1 || fmt_num(lo) == fmt_num(hi) {
        fmt_num(lo)
    } else {
        format!("{}–{}", fmt_num(lo), fmt_num(hi))
    }
}

fn fmt_cost(row: &Row, f: impl Fn(&Sample) -> Option<f64>) -> String {
    let parts: Vec<String> = [Some(&row.sync), row.raw.as_ref(), row.peer.as_ref()]
        .into_iter()
        .flatten()
        .map(|v| v.median_of(&f).map_or("—".into(), fmt_num))
        .collect();
    if parts.iter().all(|p| p == "—") {
        "—".into()
    } else {
        parts.join(" / ")
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

impl Report {
    /// The Markdown table (plus the skipped list), as printed on stdout.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} run, {} build, {} round(s) per scenario, sync/raw/peer interleaved; values are \
             medians of the rounds, ratios sync/baseline per round (min–max); ↓ lower is \
             better, ↑ higher is better. Requests, streams and etcd CPU per op are counted by \
             etcd (/metrics; for Redis, req/op is the top-level commands of INFO \
             commandstats; for Consul, the HTTP requests through a counting proxy), client CPU from this process's threads, in the order sync / raw / \
             peer.\n",
            if self.quick { "Quick" } else { "Full" },
            self.profile,
            self.rounds
        );
        out.push_str(
            "| backend | scenario | metric | sync | raw | peer | sync/raw | sync/peer | req/op | streams/op | etcd CPU µs/op | client CPU µs/op | baselines, notes |\n",
        );
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for row in &self.rows {
            let arrow = match row.better {
                Better::Lower => "↓",
                Better::Higher => "↑",
            };
            let mut notes = Vec::new();
            if let Some(raw) = &row.raw {
                notes.push(format!("raw: {}", raw.label));
            }
            if let Some(peer) = &row.peer {
                notes.push(format!("peer: {}", peer.label));
            }
            if !row.note.is_empty() {
                notes.push(row.note.clone());
            }
            let details: Vec<String> = [Some(&row.sync), row.raw.as_ref(), row.peer.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|v| {
                    let d = v
                        .rounds
                        .last()
                        .map(|s| s.detail.clone())
                        .unwrap_or_default();
                    (!d.is_empty()).then(|| format!("{} {d}", v.label))
                })
                .collect();
            if !details.is_empty() {
                notes.push(format!("last round: {}", details.join("; ")));
            }
            let _ = writeln!(
                out,
                "| {} | {} | {} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(&row.backend),
                cell(&row.scenario),
                cell(&row.metric),
                arrow,
                fmt_variant(&Some(row.sync.clone())),
                fmt_variant(&row.raw),
                fmt_variant(&row.peer),
                fmt_ratio(&row.ratio_raw),
                fmt_ratio(&row.ratio_peer),
                fmt_cost(row, |s| s.requests_per_op),
                fmt_cost(row, |s| s.streams_per_op),
                fmt_cost(row, |s| s.server_cpu_us_per_op),
                fmt_cost(row, |s| s.client_cpu_us_per_op),
                cell(&notes.join("; ")),
            );
        }
        if !self.skipped.is_empty() {
            out.push_str("\nNot run:\n\n");
            for s in &self.skipped {
                let _ = writeln!(
                    out,
                    "- {} {}: {}{}",
                    s.backend,
                    s.scenario,
                    if s.failed { "FAILED: " } else { "" },
                    s.reason
                );
            }
        }
        out
    }

    /// The report as pretty JSON.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A horizontal bar chart of each row's headline ratio (sync over raw, else over the
    /// peer), on a log scale centred on 1, written by hand (a few dozen lines of SVG need no
    /// plotting library). Green: sync at least as good as the baseline; red: worse.
    pub fn svg(&self) -> String {
        let rows: Vec<(&Row, f64, &str)> = self
            .rows
            .iter()
            .filter_map(|r| r.headline_ratio().map(|(v, base)| (r, v, base)))
            .filter(|(_, v, _)| v.is_finite() && *v > 0.0)
            .collect();
        let (label_w, bar_w, row_h, top) = (430.0, 420.0, 22.0, 50.0);
        let width = label_w + bar_w + 90.0;
        let height = top + row_h * rows.len() as f64 + 40.0;
        // log10 scale from 1/100 to 100, 1 in the middle.
        let span = 2.0_f64;
        let x = |ratio: f64| {
            let l = ratio.log10().clamp(-span, span);
            label_w + (l + span) / (2.0 * span) * bar_w
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14">sync / baseline ({} run, {} build; median of {} rounds; log scale)</text>"#,
            if self.quick { "quick" } else { "full" },
            esc(&self.profile),
            self.rounds
        );
        for tick in [0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 100.0] {
            let tx = x(tick);
            let _ = writeln!(
                s,
                r##"<line x1="{tx:.1}" y1="{y1}" x2="{tx:.1}" y2="{y2}" stroke="{c}"/><text x="{tx:.1}" y="{ty}" text-anchor="middle" fill="#555">{tick}×</text>"##,
                y1 = top - 8.0,
                y2 = height - 30.0,
                c = if tick == 1.0 { "#000" } else { "#ddd" },
                ty = top - 12.0,
            );
        }
        for (i, (row, ratio, base)) in rows.iter().enumerate() {
            let y = top + i as f64 * row_h;
            let worse = match row.better {
                Better::Lower => *ratio > 1.0,
                Better::Higher => *ratio < 1.0,
            };
            let (x0, x1) = (x(1.0), x(*ratio));
            let (left, w) = if x1 < x0 {
                (x1, x0 - x1)
            } else {
                (x0, x1 - x0)
            };
            let _ = writeln!(
                s,
                r#"<text x="{lx}" y="{ty:.1}" text-anchor="end">{label}</text><rect x="{left:.1}" y="{ry:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}"/><text x="{vx:.1}" y="{ty:.1}">{value}</text>"#,
                lx = label_w - 8.0,
                ty = y + row_h * 0.7,
                label = esc(&format!(
                    "{} {} · {} vs {base}",
                    row.backend, row.scenario, row.metric
                )),
                ry = y + 3.0,
                h = row_h - 6.0,
                fill = if worse { "#d9534f" } else { "#5cb85c" },
                vx = label_w + bar_w + 6.0,
                value = fmt_num(*ratio),
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="10" y="{}" fill="#555">green: sync at least as good as the baseline; red: worse (for throughput, a ratio under 1 is worse)</text>"##,
            height - 10.0
        );
        s.push_str("</svg>\n");
        s
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> Report {
        let mut row = Row::new(
            "etcd",
            "uncontended acquire+release",
            "p50 µs",
            Better::Lower,
        )
        .with_raw("txn + delete")
        .with_peer("Lock RPC");
        for (s, r) in [(1500.0, 1400.0), (1600.0, 1450.0)] {
            row.sync.rounds.push(Sample {
                value: s,
                p99: Some(s * 2.0),
                requests_per_op: Some(2.0),
                streams_per_op: Some(0.25),
                server_cpu_us_per_op: Some(310.0),
                client_cpu_us_per_op: Some(120.0),
                detail: String::new(),
            });
            row.raw.as_mut().unwrap().rounds.push(Sample::value(r));
            row.peer
                .as_mut()
                .unwrap()
                .rounds
                .push(Sample::value(r * 2.0));
        }
        let mut tput = Row::new("local", "8 tasks on one id", "ops/s", Better::Higher)
            .with_peer("tokio Mutex");
        tput.sync.rounds.push(Sample::value(200_000.0));
        tput.peer
            .as_mut()
            .unwrap()
            .rounds
            .push(Sample::value(1_000_000.0));
        Report {
            quick: true,
            profile: "debug".into(),
            rounds: 2,
            started_unix: 0,
            rows: vec![row.finish(), tput.finish()],
            skipped: vec![Skipped {
                backend: "redis".into(),
                scenario: "*".into(),
                reason: "no sync-redis crate yet".into(),
                failed: false,
            }],
        }
    }

    #[test]
    fn ratios_are_per_round() {
        let report = sample_report();
        let row = &report.rows[0];
        assert_eq!(row.ratio_raw.len(), 2);
        assert!((row.ratio_raw[0] - 1500.0 / 1400.0).abs() < 1e-9);
        assert_eq!(row.headline_ratio().unwrap().1, "raw");
        assert_eq!(report.rows[1].headline_ratio(), Some((0.2, "peer")));
    }

    #[test]
    fn markdown_has_one_line_per_row_and_the_skipped() {
        let md = sample_report().markdown();
        let table: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(table.len(), 3, "{md}");
        assert!(table[1].contains("1.07–1.10"), "{md}");
        assert!(table[1].contains("2.00 / — / —"), "{md}");
        assert!(md.contains("- redis *: no sync-redis crate yet"), "{md}");
    }

    #[test]
    fn json_round_trips() {
        let report = sample_report();
        let back: Report = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn svg_has_a_bar_per_ratio() {
        let svg = sample_report().svg();
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<rect x=").count(), 2, "{svg}");
        assert!(svg.contains("#d9534f"), "both rows are worse than baseline");
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
