//! The Cron driver over the in-process backend (the multi-instance cases live in the
//! conformance suite).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sync_core::{Backend, ErrorKind, Job, JobContext, Map, Result, Worker, WorkerOptions};
use sync_cron::{Cron, Schedule};
use tokio::{sync::mpsc, time::timeout};

type Labels = BTreeMap<String, String>;

struct Setup {
    client: sync_local::Client,
    cron: Cron,
    map: Arc<dyn Map>,
    fired: mpsc::UnboundedReceiver<Labels>,
    _worker: Worker,
}

async fn setup(job: &str) -> Result<Setup> {
    let client = sync_local::Cluster::new().client(Default::default())?;
    let (tx, fired) = mpsc::unbounded_channel();
    let worker = client
        .task()?
        .work(
            job,
            Arc::new(move |ctx: JobContext| {
                let tx = tx.clone();
                async move {
                    tx.send(ctx.labels).ok();
                    Ok(Vec::new())
                }
            }),
            WorkerOptions::new(),
        )
        .await?;
    let map = client.map("cron")?;
    let cron = Cron::new(
        client.leader("cron")?,
        client.task()?,
        Arc::clone(&map),
        "node-1",
    );
    Ok(Setup {
        client,
        cron,
        map,
        fired,
        _worker: worker,
    })
}

/// True when nothing fires for `window` (a wait that is expected to run out).
async fn silent(fired: &mut mpsc::UnboundedReceiver<Labels>, window: Duration) -> bool {
    timeout(window, fired.recv()).await.is_err()
}

async fn next(fired: &mut mpsc::UnboundedReceiver<Labels>) -> Labels {
    timeout(Duration::from_secs(5), fired.recv())
        .await
        .expect("a firing within 5s")
        .expect("worker alive")
}

fn num(labels: &Labels, key: &str) -> u64 {
    labels[key].parse().expect("a number")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn record(map: &Arc<dyn Map>, name: &str) -> serde_json::Value {
    let entry = map.read(name).await.unwrap().expect("a record");
    serde_json::from_slice(&entry.value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_fires_once() -> Result<()> {
    let mut s = setup("once-job").await?;
    let at = SystemTime::now() + Duration::from_millis(200);
    let at_ms = at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    s.cron
        .schedule("nightly", Schedule::once(at), Job::new("once-job", "x"))
        .await?;

    let labels = next(&mut s.fired).await;
    assert!(now_ms() >= at_ms, "fired before its time");
    assert_eq!(labels["cron.schedule"], "nightly");
    assert_eq!(num(&labels, "cron.tick"), at_ms);
    let term = num(&labels, "cron.term");
    let leader = s.client.leader("cron")?.leader().await?.expect("a leader");
    assert_eq!((leader.candidate.as_str(), leader.term), ("node-1", term));
    assert_eq!(
        record(&s.map, "nightly").await,
        serde_json::json!({ "tick_ms": at_ms, "term": term })
    );

    assert!(
        silent(&mut s.fired, Duration::from_millis(500)).await,
        "a one-shot fires once"
    );

    // A second cron over the same map sees the record: the one-shot is over everywhere.
    s.cron.stop().await;
    let again = Cron::new(
        s.client.leader("cron")?,
        s.client.task()?,
        Arc::clone(&s.map),
        "node-2",
    );
    again
        .schedule("nightly", Schedule::once(at), Job::new("once-job", "x"))
        .await?;
    assert!(
        silent(&mut s.fired, Duration::from_millis(500)).await,
        "the record says it fired"
    );
    again.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_fires_with_increasing_ticks_and_labels() -> Result<()> {
    let mut s = setup("tick-job").await?;
    let interval = Duration::from_millis(100);
    let schedule = Schedule::every(interval);
    let Schedule::Every { start, .. } = schedule else {
        unreachable!()
    };
    let start_ms = start.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let registered_ms = now_ms();
    s.cron
        .schedule(
            "poll",
            schedule,
            Job::new("tick-job", "").with_label("owner", "tests"),
        )
        .await?;

    let mut ticks = Vec::new();
    for _ in 0..3 {
        let labels = next(&mut s.fired).await;
        assert_eq!(labels["cron.schedule"], "poll");
        assert_eq!(labels["owner"], "tests", "the job's own labels are kept");
        assert!(num(&labels, "cron.term") > 0);
        ticks.push(num(&labels, "cron.tick"));
    }
    assert!(
        ticks[0] > registered_ms,
        "nothing before registration fires"
    );
    assert!(ticks.windows(2).all(|w| w[0] < w[1]), "{ticks:?}");
    for t in &ticks {
        // start + k·interval, to the millisecond
        let k = (t - start_ms) as f64 / 100.0;
        assert!(
            (k - k.round()).abs() < 0.02,
            "tick {t} is off the grid from {start_ms}"
        );
    }

    assert!(s.cron.unschedule("poll").await?);
    assert!(!s.cron.unschedule("poll").await?);
    // At most one firing already in flight, then silence.
    let mut late = 0;
    while late < 3 && !silent(&mut s.fired, Duration::from_millis(400)).await {
        late += 1;
    }
    assert!(late <= 1, "unscheduled, yet {late} more firings");
    s.cron.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_coalesce_into_the_latest() -> Result<()> {
    let mut s = setup("catch-up").await?;
    let interval = Duration::from_millis(100);
    let start = SystemTime::now() - Duration::from_secs(10);
    let start_ms = start.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    // A previous leader fired the tick at start + 1 s, then nobody led for 9 s.
    let old_tick = start_ms + 1000;
    s.map
        .write(
            "sweep",
            &serde_json::to_vec(&serde_json::json!({ "tick_ms": old_tick, "term": 1 })).unwrap(),
        )
        .await?;

    let before_ms = now_ms();
    s.cron
        .schedule(
            "sweep",
            Schedule::every_from(start, interval),
            Job::new("catch-up", ""),
        )
        .await?;
    let first = num(&next(&mut s.fired).await, "cron.tick");
    assert!(
        first + 100 > before_ms && first <= now_ms(),
        "fires only the latest missed tick: {first} vs {before_ms}"
    );
    let second = num(&next(&mut s.fired).await, "cron.tick");
    assert_eq!(second, first + 100, "then continues on schedule");
    s.cron.stop().await;
    Ok(())
}

#[tokio::test]
async fn schedule_rejects_bad_input() -> Result<()> {
    let client = sync_local::Cluster::new().client(Default::default())?;
    let cron = Cron::new(
        client.leader("cron")?,
        client.task()?,
        client.map("cron")?,
        "node-1",
    );
    let later = Schedule::once(SystemTime::now() + Duration::from_secs(3600));
    let job = || Job::new("j", "");

    let err = cron
        .schedule("z", Schedule::every(Duration::ZERO), job())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = cron.schedule("", later.clone(), job()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = Schedule::cron("not a cron").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("not a cron"), "{err}");

    cron.schedule("a", later.clone(), job()).await?;
    let err = cron.schedule("a", later.clone(), job()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);

    cron.stop().await;
    let err = cron.schedule("b", later, job()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    // Stopping resigned: the group is free again.
    assert_eq!(client.leader("cron")?.leader().await?, None);
    Ok(())
}

/// A stored record whose tick is out of chrono's range (a corrupt or foreign value) must not
/// panic the driver: the other schedules keep firing. Being after the latest trusted time, the
/// record is not waited for either: its schedule resumes from now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_far_future_record_does_not_kill_the_driver() -> Result<()> {
    let mut s = setup("survivor").await?;
    s.map
        .write(
            "corrupt",
            &serde_json::to_vec(&serde_json::json!({ "tick_ms": 1u64 << 60, "term": 1 })).unwrap(),
        )
        .await?;
    s.cron
        .schedule(
            "corrupt",
            Schedule::cron("* * * * * *")?,
            Job::new("survivor", ""),
        )
        .await?;
    s.cron
        .schedule(
            "healthy",
            Schedule::every(Duration::from_millis(50)),
            Job::new("survivor", ""),
        )
        .await?;
    let mut fired: BTreeMap<String, usize> = BTreeMap::new();
    while fired.get("healthy").copied().unwrap_or(0) < 2 || !fired.contains_key("corrupt") {
        let labels = next(&mut s.fired).await;
        assert!(num(&labels, "cron.tick") <= now_ms(), "{labels:?}");
        *fired.entry(labels["cron.schedule"].clone()).or_default() += 1;
    }
    s.cron.stop().await;
    Ok(())
}

/// A leader backend that elects at once and revokes at once (an expired lease, say).
struct FlappingLeader {
    elections: std::sync::atomic::AtomicUsize,
}

struct Gone;

#[async_trait::async_trait]
impl sync_core::raw::Leadership for Gone {
    async fn proclaim(&self, _: &[u8]) -> Result<()> {
        Ok(())
    }
    async fn resign(&mut self) -> Result<()> {
        Ok(())
    }
    fn resign_in_background(self: Box<Self>) {}
    async fn reelect(&mut self) -> Result<(u64, sync_core::LossSignal)> {
        Err(sync_core::Error::new(ErrorKind::Unsupported, "test"))
    }
}

#[async_trait::async_trait]
impl sync_core::Leader for FlappingLeader {
    fn group(&self) -> &str {
        "flapping"
    }
    async fn elect(
        &self,
        candidate: &str,
        _: sync_core::ElectOptions,
    ) -> Result<sync_core::Elected> {
        let n = self
            .elections
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (trigger, signal) = sync_core::raw::loss_signal();
        trigger.fire("lease expired");
        Ok(sync_core::Elected::new(
            candidate,
            n as u64 + 1,
            signal,
            Box::new(Gone),
        ))
    }
    async fn leader(&self) -> Result<Option<sync_core::LeaderInfo>> {
        Ok(None)
    }
    async fn follow(&self) -> Result<sync_core::FollowStream> {
        Ok(Box::pin(futures::stream::empty()))
    }
}

/// Leaderships revoked as soon as they are granted are backed off, not campaigned for in a
/// busy loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_leadership_is_backed_off() -> Result<()> {
    let client = sync_local::Cluster::new().client(Default::default())?;
    let leader = Arc::new(FlappingLeader {
        elections: Default::default(),
    });
    let cron = Cron::new(
        leader.clone(),
        client.task()?,
        client.map("cron")?,
        "node-1",
    );
    cron.schedule(
        "s",
        Schedule::every(Duration::from_millis(10)),
        Job::new("j", ""),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cron.stop().await;
    let n = leader.elections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n <= 10, "{n} elections in 500 ms");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_leader_steps_down_instead_of_firing() -> Result<()> {
    let mut s = setup("stale").await?;
    let start = SystemTime::now();
    let stamped = |term: u64| {
        let ms = start.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        serde_json::to_vec(&serde_json::json!({ "tick_ms": ms, "term": term })).unwrap()
    };
    // A leader with a far higher term has fired: this one must have missed its revocation.
    s.map.write("beat", &stamped(u64::MAX / 2)).await?;
    s.cron
        .schedule(
            "beat",
            Schedule::every_from(start, Duration::from_millis(100)),
            Job::new("stale", ""),
        )
        .await?;
    assert!(
        silent(&mut s.fired, Duration::from_secs(1)).await,
        "a stale leader fired"
    );
    assert_eq!(record(&s.map, "beat").await["term"], u64::MAX / 2);

    // Once no newer term stands in the record, it leads and fires again.
    s.map.write("beat", &stamped(0)).await?;
    let labels = next(&mut s.fired).await;
    assert!(num(&labels, "cron.term") < u64::MAX / 2);
    s.cron.stop().await;
    Ok(())
}

#[test]
fn schedule_outside_a_runtime_is_unavailable() -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let (client, cron) = runtime.block_on(async {
        let client = sync_local::Cluster::new().client(Default::default())?;
        let cron = Cron::new(
            client.leader("cron")?,
            client.task()?,
            client.map("cron")?,
            "node-1",
        );
        Ok::<_, sync_core::Error>((client, cron))
    })?;
    let every = Schedule::every(Duration::from_secs(1));
    let err = futures::executor::block_on(cron.schedule("x", every, Job::new("j", "")))
        .expect_err("no runtime to run the driver on");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.to_string().contains("tokio runtime"), "{err}");
    drop((cron, client));
    Ok(())
}

/// Counts the reads that reach a map.
struct CountingMap {
    inner: Arc<dyn Map>,
    reads: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Map for CountingMap {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn read(&self, key: &str) -> Result<Option<sync_core::Entry>> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.read(key).await
    }
    async fn write(&self, key: &str, value: &[u8]) -> Result<sync_core::Version> {
        self.inner.write(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        self.inner.delete(key).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<sync_core::Version>,
        value: &[u8],
    ) -> Result<sync_core::Version> {
        self.inner.compare_and_swap(key, expected, value).await
    }
    async fn compare_and_delete(&self, key: &str, expected: sync_core::Version) -> Result<()> {
        self.inner.compare_and_delete(key, expected).await
    }
    async fn entries(&self) -> Result<Vec<sync_core::Entry>> {
        self.inner.entries().await
    }
}

/// While nobody else writes the record, a tick costs one map write and no read: the record
/// is read once when leadership is gained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_costs_one_write_and_no_read() -> Result<()> {
    let mut s = setup("counted").await?;
    let counting = Arc::new(CountingMap {
        inner: Arc::clone(&s.map),
        reads: Default::default(),
    });
    let cron = Cron::new(
        s.client.leader("counted")?,
        s.client.task()?,
        counting.clone(),
        "node-1",
    );
    cron.schedule(
        "beat",
        Schedule::every(Duration::from_millis(50)),
        Job::new("counted", ""),
    )
    .await?;
    for _ in 0..5 {
        next(&mut s.fired).await;
    }
    cron.stop().await;
    let reads = counting.reads.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(reads, 1, "{reads} reads for 5 ticks");
    Ok(())
}

/// A Task whose submits all reach the backend, but whose first answer of each tick is lost:
/// the fault Cron must ride out without firing a tick twice.
struct LostAnswers {
    inner: Arc<dyn sync_core::Task>,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

#[async_trait::async_trait]
impl sync_core::Task for LostAnswers {
    async fn submit(&self, job: Job) -> Result<sync_core::JobId> {
        let tick = job.labels.get("cron.tick").cloned().unwrap_or_default();
        let id = self.inner.submit(job).await?;
        if self.seen.lock().unwrap().insert(tick) {
            return Err(sync_core::Error::new(
                ErrorKind::Unavailable,
                "the submit committed but its answer was lost",
            ));
        }
        Ok(id)
    }
    async fn status(&self, id: &sync_core::JobId) -> Result<sync_core::JobStatus> {
        self.inner.status(id).await
    }
    async fn wait(
        &self,
        id: &sync_core::JobId,
        limit: Option<Duration>,
    ) -> Result<sync_core::JobStatus> {
        self.inner.wait(id, limit).await
    }
    async fn work(
        &self,
        name: &str,
        handler: Arc<dyn sync_core::Handler>,
        opts: WorkerOptions,
    ) -> Result<Worker> {
        self.inner.work(name, handler, opts).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_whose_answer_was_lost_is_still_one_job_per_tick() -> Result<()> {
    let mut s = setup("lossy").await?;
    let lossy = Arc::new(LostAnswers {
        inner: s.client.task()?,
        seen: Default::default(),
    });
    let cron = Cron::new(
        s.client.leader("lossy")?,
        lossy,
        Arc::clone(&s.map),
        "node-1",
    );
    cron.schedule(
        "beat",
        Schedule::every(Duration::from_millis(300)),
        Job::new("lossy", ""),
    )
    .await?;
    let mut ticks = Vec::new();
    for _ in 0..3 {
        ticks.push(num(&next(&mut s.fired).await, "cron.tick"));
    }
    cron.stop().await;
    // A window in which a duplicate of the last tick's job must NOT arrive.
    while let Ok(Some(labels)) = timeout(Duration::from_millis(300), s.fired.recv()).await {
        ticks.push(num(&labels, "cron.tick"));
    }
    let mut unique = ticks.clone();
    unique.dedup();
    assert_eq!(ticks, unique, "a tick ran as two jobs: {ticks:?}");
    Ok(())
}
