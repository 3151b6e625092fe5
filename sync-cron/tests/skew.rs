//! Cron on clocks that are wrong (issue 10, item 3), over the real backends: the in-process one
//! always, etcd when `SYNC_TEST_ETCD` names one (required under `SYNC_REQUIRE_LIVE=1`).
//!
//! Only the clocks are test doubles. True time is a manual clock that the test moves one tick
//! at a time, and only after the previous tick was seen, so "fired early" (a job handled
//! before true time reached its tick) and "lost" (a tick that never runs) are exact, however
//! slow the machine is: a leaderless gap during a failover cannot coalesce ticks, because true
//! time stands still while the backend fails over. True time starts a little before the
//! machine's clock, so a cron that fires on the machine's clock instead of its time source
//! fires early here too.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use futures::StreamExt;
use sync_core::{
    Backend, Error, ErrorKind, Job, JobContext, Result, Time, TimeInterval, Worker, WorkerOptions,
};
use sync_cron::{Cron, Firing, Schedule};
use tokio::{sync::mpsc, time::timeout};

/// The schedule's interval, in true (manual) time.
const INTERVAL: Duration = Duration::from_millis(200);
/// The election group and map of every case (each case has a namespace of its own).
const GROUP: &str = "skew";
/// The schedule's name and its job's name.
const BEAT: &str = "beat";
/// How long a tick may take to show up: a failover on etcd waits out a 2 s lease.
const PATIENCE: Duration = Duration::from_secs(20);

/// True time: set by the test, read by every clock double.
struct Truth(Mutex<SystemTime>);

impl Truth {
    /// Starts on a whole second at least 10 s before the machine's clock.
    fn new() -> Arc<Truth> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 10;
        Arc::new(Truth(Mutex::new(UNIX_EPOCH + Duration::from_secs(secs))))
    }

    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }

    fn set(&self, t: SystemTime) {
        *self.0.lock().unwrap() = t;
    }
}

/// A time source reading true time plus `ahead`, stating `uncertainty` around it; an error
/// while `failing`.
struct Clock {
    truth: Arc<Truth>,
    ahead: Duration,
    uncertainty: Duration,
    failing: AtomicBool,
}

impl Clock {
    fn new(truth: &Arc<Truth>, ahead: Duration, uncertainty: Duration) -> Arc<Clock> {
        Arc::new(Clock {
            truth: Arc::clone(truth),
            ahead,
            uncertainty,
            failing: AtomicBool::new(false),
        })
    }
}

#[async_trait]
impl Time for Clock {
    async fn now_interval(&self) -> Result<TimeInterval> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "the test clock has no answer",
            ));
        }
        Ok(TimeInterval::around(
            self.truth.now() + self.ahead,
            self.uncertainty,
        ))
    }
}

/// One job as the worker ran it: Cron's firing, and true time when it ran.
#[derive(Debug, Clone)]
struct Seen {
    firing: Firing,
    ran_at: SystemTime,
}

impl Seen {
    fn early(&self) -> bool {
        self.firing.tick > self.ran_at
    }
}

/// A worker for `beat` jobs that reports each one with the true time it ran at.
async fn worker(
    client: &Arc<dyn Backend>,
    truth: &Arc<Truth>,
) -> Result<(
    Worker,
    mpsc::UnboundedReceiver<std::result::Result<Seen, String>>,
)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let truth = Arc::clone(truth);
    let worker = client
        .task()?
        .work(
            BEAT,
            Arc::new(move |job: JobContext| {
                let ran_at = truth.now();
                let seen = Firing::from_labels(&job.labels)
                    .map(|firing| Seen { firing, ran_at })
                    .map_err(|e| e.to_string());
                let tx = tx.clone();
                async move {
                    tx.send(seen).ok();
                    Ok(Vec::new())
                }
            }),
            WorkerOptions::new(),
        )
        .await?;
    Ok((worker, rx))
}

/// Where a case runs: a backend URL without a namespace, and the query to add.
struct Site {
    base: String,
    query: &'static str,
}

impl Site {
    fn local() -> Site {
        Site {
            base: format!("local://cronskew{:x}", rand::random::<u64>()),
            query: "?ttl=1s",
        }
    }

    /// etcd from `SYNC_TEST_ETCD`; `None` (after saying so) when it is not set.
    fn etcd() -> Option<Site> {
        let Some(url) = std::env::var("SYNC_TEST_ETCD")
            .ok()
            .filter(|v| !v.trim().is_empty())
        else {
            let required = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "SYNC_REQUIRE_LIVE=1 but SYNC_TEST_ETCD is not set"
            );
            eprintln!("SYNC_TEST_ETCD is not set: the etcd case does not run");
            return None;
        };
        Some(Site {
            base: url.trim().trim_end_matches('/').to_string(),
            query: "?ttl=2s",
        })
    }

    /// A new namespace on this site, for one case.
    fn namespace(&self) -> String {
        format!("{}/cronskew{:x}", self.base, rand::random::<u64>())
    }
}

async fn connect(namespaced: &str, query: &str) -> Arc<dyn Backend> {
    sync_any::connect(&format!("{namespaced}{query}"))
        .await
        .unwrap_or_else(|e| panic!("connect {namespaced}: {e}"))
}

/// Everything the worker reported, in order.
struct Log {
    rx: mpsc::UnboundedReceiver<std::result::Result<Seen, String>>,
    seen: Vec<Seen>,
    /// The term of a leader whose clock lies: its early firings are expected.
    liar: Option<u64>,
}

impl Log {
    fn has(&self, tick: SystemTime) -> bool {
        self.seen.iter().any(|s| s.firing.tick == tick)
    }

    /// Waits (bounded) until tick `tick` has run, logging whatever runs meanwhile.
    async fn expect(&mut self, tick: SystemTime, what: &str) -> Seen {
        loop {
            if let Some(s) = self.seen.iter().find(|s| s.firing.tick == tick) {
                return s.clone();
            }
            match timeout(PATIENCE, self.rx.recv()).await {
                Ok(Some(Ok(seen))) => {
                    assert!(
                        !seen.early() || Some(seen.firing.term) == self.liar,
                        "{what}: a tick ran before true time reached it: {seen:?}"
                    );
                    self.seen.push(seen);
                }
                Ok(Some(Err(e))) => panic!("{what}: a fired job's labels are malformed: {e}"),
                Ok(None) => panic!("{what}: the worker went away"),
                Err(_) => panic!(
                    "{what}: tick {} never ran within {PATIENCE:?} (lost); ran: {:#?}",
                    ms(tick),
                    self.seen
                ),
            }
        }
    }

    /// Takes in what still arrives within a short window (a duplicate, say) once nothing
    /// fires any more.
    async fn drain(&mut self) {
        while let Ok(Some(seen)) = timeout(Duration::from_millis(500), self.rx.recv()).await {
            self.seen.push(seen.expect("well-formed labels"));
        }
    }

    /// Every tick ran once at most.
    fn assert_once_each(&self) {
        let mut runs: BTreeMap<u64, usize> = BTreeMap::new();
        for s in &self.seen {
            *runs.entry(ms(s.firing.tick)).or_default() += 1;
        }
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "ticks that ran more than once (tick → runs): {twice:?}; ran: {:#?}",
            self.seen
        );
    }
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The two schedulers of a case: `skewed` runs on `skewed_clock` and is made the leader
/// first; `correct` runs on true time and waits as a follower.
struct Pair {
    worker_client: Arc<dyn Backend>,
    worker: Worker,
    log: Log,
    skewed_client: Arc<dyn Backend>,
    skewed: Cron,
    correct_client: Arc<dyn Backend>,
    correct: Cron,
    /// The skewed leader's term.
    skewed_term: u64,
}

/// `start + k·INTERVAL`.
fn tick(start: SystemTime, k: u32) -> SystemTime {
    start + INTERVAL * k
}

async fn pair(site: &Site, truth: &Arc<Truth>, skewed_clock: Arc<Clock>) -> Pair {
    let ns = site.namespace();
    let worker_client = connect(&ns, site.query).await;
    let (worker, rx) = worker(&worker_client, truth).await.expect("a worker");
    let cron = |client: &Arc<dyn Backend>, candidate: &str, time: Arc<dyn Time>| {
        Cron::builder(
            client.leader(GROUP).unwrap(),
            client.task().unwrap(),
            client.map(GROUP).unwrap(),
            candidate,
        )
        .with_time(time)
        .build()
    };
    let schedule = Schedule::every_from(truth.now(), INTERVAL);

    let mut follow = worker_client
        .leader(GROUP)
        .unwrap()
        .follow()
        .await
        .expect("follow the group");
    let skewed_client = connect(&ns, site.query).await;
    let skewed = cron(&skewed_client, "skewed", skewed_clock);
    skewed
        .schedule(BEAT, schedule.clone(), Job::new(BEAT, ""))
        .await
        .expect("schedule on the skewed cron");
    let skewed_term = timeout(PATIENCE, async {
        while let Some(change) = follow.next().await {
            if let Some(info) = change.expect("a leader change") {
                if info.candidate == "skewed" {
                    return info.term;
                }
            }
        }
        panic!("the follow stream ended");
    })
    .await
    .expect("the skewed cron is elected");

    let correct_client = connect(&ns, site.query).await;
    let correct = cron(
        &correct_client,
        "correct",
        Clock::new(truth, Duration::ZERO, Duration::ZERO),
    );
    correct
        .schedule(BEAT, schedule, Job::new(BEAT, ""))
        .await
        .expect("schedule on the correct cron");
    Pair {
        worker_client,
        worker,
        log: Log {
            rx,
            seen: Vec::new(),
            liar: None,
        },
        skewed_client,
        skewed,
        correct_client,
        correct,
        skewed_term,
    }
}

impl Pair {
    /// The skewed leader's process dies: its lease runs out and the correct cron takes over.
    async fn kill_skewed(&self) {
        self.skewed_client
            .faults()
            .expect("the backend has fault hooks")
            .kill()
            .await
            .expect("kill the skewed leader's client");
    }

    async fn finish(mut self) -> Log {
        self.correct.stop().await;
        // The killed client's driver still runs here; its resignation has no session left.
        let _ = timeout(Duration::from_secs(5), self.skewed.stop()).await;
        self.log.drain().await;
        self.worker.stop().await;
        for client in [&self.correct_client, &self.worker_client] {
            client.close().await.ok();
        }
        self.log
    }
}

/// A leader whose time source reads Δ = 30 s ahead, but honestly (its interval, ±30 s,
/// contains true time), fires no tick before true time reaches it; when it dies, the correct
/// cron takes over and fires every next tick: none lost, none twice.
async fn clock_ahead_fires_no_tick_early_and_failover_loses_none(site: &Site) {
    let truth = Truth::new();
    let start = truth.now();
    let ahead = Duration::from_secs(30);
    let mut p = pair(site, &truth, Clock::new(&truth, ahead, ahead)).await;

    for k in 1..=3 {
        truth.set(tick(start, k));
        let seen = p.log.expect(tick(start, k), "skewed leader").await;
        assert_eq!(seen.firing.term, p.skewed_term, "{seen:?}");
    }
    p.kill_skewed().await;
    for k in 4..=8 {
        truth.set(tick(start, k));
        let seen = p.log.expect(tick(start, k), "after the failover").await;
        assert!(seen.firing.term > p.skewed_term, "{seen:?}");
    }
    let skewed_term = p.skewed_term;
    let log = p.finish().await;

    log.assert_once_each();
    let early: Vec<&Seen> = log.seen.iter().filter(|s| s.early()).collect();
    assert!(early.is_empty(), "ticks ran before their time: {early:#?}");
    for s in &log.seen {
        assert!(
            s.firing.interval.earliest() >= s.firing.tick,
            "fired before the interval's earliest time reached the tick: {s:?}"
        );
    }
    let ticks: Vec<u64> = log.seen.iter().map(|s| ms(s.firing.tick)).collect();
    let expected: Vec<u64> = (1..=8).map(|k| ms(tick(start, k))).collect();
    assert_eq!(ticks, expected, "every tick once, in order");
    assert!(
        log.seen[..3].iter().all(|s| s.firing.term == skewed_term)
            && log.seen[3..].iter().all(|s| s.firing.term > skewed_term),
        "{:#?}",
        log.seen
    );
}

/// A leader whose clock lies (1 s ahead, stating no uncertainty) fires early, and nothing can
/// tell; but the tick it records is after the latest time the correct cron trusts. After
/// the failover the correct cron does not wait for that tick: it fires every tick from then
/// on, and the one the liar already ran stays one job (same idempotency key).
async fn clock_that_lied_leaves_no_hole_after_failover(site: &Site) {
    let truth = Truth::new();
    let start = truth.now();
    let lie = Duration::from_secs(1);
    let mut p = pair(site, &truth, Clock::new(&truth, lie, Duration::ZERO)).await;
    p.log.liar = Some(p.skewed_term);

    // The liar registered 1 s ahead, and at true tick 1 believes it is past tick 6.
    truth.set(tick(start, 1));
    let early = p
        .log
        .expect(tick(start, 6), "the lying leader's firing")
        .await;
    assert_eq!(early.firing.term, p.skewed_term);
    assert!(early.early(), "the liar fired on its own clock: {early:?}");
    p.kill_skewed().await;

    // True time stands at tick 1 until the correct cron fires it.
    for k in 1..=9 {
        truth.set(tick(start, k));
        if p.log.has(tick(start, k)) {
            continue; // ran already, early, as the liar's job
        }
        let seen = p.log.expect(tick(start, k), "after the failover").await;
        assert!(seen.firing.term > p.skewed_term, "{seen:?}");
    }
    let skewed_term = p.skewed_term;
    let log = p.finish().await;

    log.assert_once_each();
    let early: Vec<&Seen> = log
        .seen
        .iter()
        .filter(|s| s.firing.term > skewed_term && s.early())
        .collect();
    assert!(
        early.is_empty(),
        "the correct leader fired early: {early:#?}"
    );
    let mut ticks: Vec<u64> = log.seen.iter().map(|s| ms(s.firing.tick)).collect();
    ticks.sort_unstable();
    let expected: Vec<u64> = (1..=9).map(|k| ms(tick(start, k))).collect();
    assert_eq!(ticks, expected, "every tick once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_clock_ahead_fires_no_tick_early_and_failover_loses_none() {
    clock_ahead_fires_no_tick_early_and_failover_loses_none(&Site::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_clock_ahead_fires_no_tick_early_and_failover_loses_none() {
    if let Some(site) = Site::etcd() {
        clock_ahead_fires_no_tick_early_and_failover_loses_none(&site).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_clock_that_lied_leaves_no_hole_after_failover() {
    clock_that_lied_leaves_no_hole_after_failover(&Site::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_clock_that_lied_leaves_no_hole_after_failover() {
    if let Some(site) = Site::etcd() {
        clock_that_lied_leaves_no_hole_after_failover(&site).await;
    }
}

/// While the time source fails, nothing fires (the machine's clock, well past the tick, is not
/// used instead) and registration fails naming the source's error; once it answers again the
/// tick fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_time_source_fires_nothing_until_it_answers() {
    let truth = Truth::new();
    let start = truth.now();
    let site = Site::local();
    let ns = site.namespace();
    let client = connect(&ns, site.query).await;
    let (worker, rx) = worker(&client, &truth).await.unwrap();
    let mut log = Log {
        rx,
        seen: Vec::new(),
        liar: None,
    };
    let clock = Clock::new(&truth, Duration::ZERO, Duration::ZERO);
    let map = client.map(GROUP).unwrap();
    let cron = Cron::builder(
        client.leader(GROUP).unwrap(),
        client.task().unwrap(),
        Arc::clone(&map),
        "node-1",
    )
    .with_time(clock.clone())
    .build();
    let schedule = Schedule::every_from(start, INTERVAL);

    clock.failing.store(true, Ordering::SeqCst);
    let err = cron
        .schedule(BEAT, schedule.clone(), Job::new(BEAT, ""))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("test clock"), "{err}");
    assert!(
        map.read(BEAT).await.unwrap().is_none(),
        "nothing registered"
    );

    clock.failing.store(false, Ordering::SeqCst);
    cron.schedule(BEAT, schedule, Job::new(BEAT, ""))
        .await
        .unwrap();
    truth.set(tick(start, 1));
    log.expect(tick(start, 1), "with the clock answering").await;

    clock.failing.store(true, Ordering::SeqCst);
    truth.set(tick(start, 2));
    assert!(
        timeout(Duration::from_secs(1), log.rx.recv())
            .await
            .is_err(),
        "fired while the time source was failing"
    );
    clock.failing.store(false, Ordering::SeqCst);
    log.expect(tick(start, 2), "once the clock answers again")
        .await;

    cron.stop().await;
    log.drain().await;
    worker.stop().await;
    log.assert_once_each();
    assert!(log.seen.iter().all(|s| !s.early()), "{:#?}", log.seen);
}
