//! The checking layer's metrics on a Prometheus endpoint: a few lock, map and task operations
//! on the in-process backend, then `/metrics` served on 127.0.0.1.
//!
//! `cargo run -p sync-kit --example metrics` serves until Ctrl-C (try
//! `curl http://127.0.0.1:9898/metrics`); with `-- --print` it prints the page and exits.

use std::{sync::Arc, time::Duration};

use metrics_exporter_prometheus::PrometheusBuilder;
use sync_core::{Backend, Job, JobContext, LockOptions, WorkerOptions};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let backend: Arc<dyn Backend> =
        Arc::new(sync_local::Client::connect(sync_local::Config::default())?);
    let lock = backend.lock()?;
    for _ in 0..3 {
        let guard = lock.acquire("orders", LockOptions::new()).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        guard.release().await?;
    }
    let _refused = lock.acquire("", LockOptions::new()).await;
    let map = backend.map("config")?;
    let v = map.write("mode", b"blue").await?;
    let _conflict = map.compare_and_swap("mode", Some(v + 100), b"red").await;
    let task = backend.task()?;
    let worker = task
        .work(
            "echo",
            Arc::new(|job: JobContext| async move { Ok(job.payload) }),
            WorkerOptions::new(),
        )
        .await?;
    task.run(Job::new("echo", "hi")).await?;
    worker.stop().await;

    if std::env::args().any(|a| a == "--print") {
        print!("{}", prometheus.render());
        return Ok(());
    }
    let listener = TcpListener::bind("127.0.0.1:9898").await?;
    println!(
        "serving http://{}/metrics (Ctrl-C stops)",
        listener.local_addr()?
    );
    loop {
        let (mut conn, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let mut request = [0u8; 1024];
        let _ = conn.read(&mut request).await?;
        let body = prometheus.render();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(body.as_bytes()).await?;
    }
}
