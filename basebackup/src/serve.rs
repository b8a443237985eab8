//! `walcore metrics` (the exposition once, for node_exporter's textfile collector) and
//! `walcore serve` (`/metrics` and `/healthz` over HTTP, for Prometheus to scrape), which also
//! notices what no hook does: an unreadable repository, a backup too old, archiving stalled
//! (see [`walcore::alert::evaluate_status`]); with `--dbname`, files piling up for
//! `archive_command` and a disconnected stream ([`walcore::alert::evaluate_server`]).
//!
//! `serve` reads the repository's status every `--interval` (30 s by default) in a task of
//! its own, and answers scrapes from the last reading: a scrape never waits for the store,
//! and a hundred scrapes cost no more requests than one. Ages are computed at the scrape.
//! When a reading fails, `/metrics` says `walcore_status_up 0` beside the last good values,
//! and `/healthz` answers 503 with the error once no reading has succeeded for three
//! intervals.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use walcore::error::{Error, ErrorKind};
use walcore::lifecycle::{metrics, status};
use walcore::repo::Repository;
use walcore::watch::server::{ServerWatch, WatchOptions};

/// The flags that add the server's side (`--dbname`) to `status`, `metrics` and `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Also read the server's side: files waiting for archive_command, the archiver's failures,
    /// the stream's slot and lag (a connection string or URL, libpq style; the role needs
    /// REPLICATION and pg_monitor).
    #[arg(short = 'd', long)]
    pub dbname: Option<String>,
    /// The stream's replication slot.
    #[arg(long, default_value = walcore::watch::server::DEFAULT_SLOT)]
    pub slot: String,
}

/// How long reading the server's side may take.
const WATCH_TIMEOUT: Duration = Duration::from_secs(30);

impl ServerArgs {
    /// What to read from the server; `None` without `--dbname`.
    pub fn options(&self) -> Option<WatchOptions> {
        self.dbname.as_ref().map(|conninfo| WatchOptions {
            conninfo: conninfo.clone(),
            slot: self.slot.clone(),
            timeout: WATCH_TIMEOUT,
        })
    }
}

/// Reads the server's side into `report` (`server`, or `server_error`); the reading, for the
/// alert judge.
pub async fn add_server(
    report: Option<&mut status::StatusReport>,
    options: Option<&WatchOptions>,
) -> Option<Result<ServerWatch, Error>> {
    let options = options?;
    let watch = walcore::watch::server::observe(options).await;
    if let Some(report) = report {
        match &watch {
            Ok(w) => report.server = Some(w.clone()),
            Err(e) => report.server_error = Some(format!("{e:#}")),
        }
    }
    Some(watch)
}

/// The flags of `walcore serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Address to listen on for /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:9851")]
    pub listen: SocketAddr,
    /// How often the repository's status is read.
    #[arg(long, default_value = "30s", value_parser = walcore::config::parse_duration)]
    pub interval: Duration,
}

/// The exposition of the repository's status now, and whether it could be read.
pub async fn exposition_once(
    repo: &Repository,
    alerts: &walcore::alert::AlertSettings,
    server: Option<&WatchOptions>,
) -> (String, Result<(), Error>) {
    let started = Instant::now();
    match status::status(repo).await {
        Ok(mut report) => {
            add_server(Some(&mut report), server).await;
            walcore::alert::fill_host_state(&mut report, alerts);
            let took = started.elapsed().as_secs_f64();
            let mut out = metrics::up(true);
            out.push_str(&metrics::render(&report, SystemTime::now(), took));
            (out, Ok(()))
        }
        Err(e) => (metrics::up(false), Err(e)),
    }
}

/// What the collector read last.
#[derive(Default)]
struct Reading {
    /// The last good report and how long it took to read.
    report: Option<(status::StatusReport, f64)>,
    /// When a reading last succeeded.
    ok_at: Option<Instant>,
    /// The last reading's error, when it failed.
    error: Option<String>,
}

/// Serves `/metrics` and `/healthz` until SIGTERM or SIGINT.
pub async fn serve(
    repo: Repository,
    alerts: walcore::alert::AlertSettings,
    args: &ServeArgs,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Configuration,
                format!("listening on {}: {e}", args.listen),
            )
        })?;
    tracing::info!(
        "serving /metrics and /healthz on http://{}",
        listener.local_addr().unwrap_or(args.listen)
    );
    let reading = Arc::new(Mutex::new(Reading::default()));
    let interval = args.interval;
    let watch = args.server.options();
    let collector = {
        let reading = reading.clone();
        tokio::spawn(async move {
            loop {
                let started = Instant::now();
                let mut result = status::status(&repo.fresh()).await;
                let took = started.elapsed().as_secs_f64();
                let server = add_server(result.as_mut().ok(), watch.as_ref()).await;
                if alerts.enabled() {
                    let (judge, url) = (alerts.clone(), repo.store().describe());
                    // Delivery blocks (a command, a POST): beside the collector's runtime.
                    result = tokio::task::spawn_blocking(move || {
                        walcore::alert::evaluate_status(&judge, &url, result.as_ref());
                        if let Some(server) = &server {
                            walcore::alert::evaluate_server(&judge, &url, server.as_ref());
                        }
                        result
                    })
                    .await
                    .unwrap_or_else(|e| {
                        Err(Error::new(
                            ErrorKind::Internal,
                            format!("judging the status for alerts: {e}"),
                        ))
                    });
                }
                if let Ok(report) = &mut result {
                    walcore::alert::fill_host_state(report, &alerts);
                }
                {
                    let mut r = reading.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(report) => {
                            r.report = Some((report, took));
                            r.ok_at = Some(Instant::now());
                            r.error = None;
                        }
                        Err(e) => {
                            tracing::warn!("reading the repository's status: {e:#}");
                            r.error = Some(format!("{e:#}"));
                        }
                    }
                }
                tokio::time::sleep(interval).await;
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::new(ErrorKind::Internal, format!("SIGTERM handler: {e}")))?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let reading = reading.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let reading = reading.clone();
                async move { Ok::<_, Infallible>(answer(&req, &reading, interval)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("a scrape's connection: {e}");
            }
        });
    }
    collector.abort();
    Ok(())
}

fn answer(
    req: &Request<Incoming>,
    reading: &Mutex<Reading>,
    interval: Duration,
) -> Response<Full<Bytes>> {
    let r = reading.lock().unwrap_or_else(|p| p.into_inner());
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut body = metrics::up(r.error.is_none() && r.report.is_some());
            if let Some((report, took)) = &r.report {
                body.push_str(&metrics::render(report, SystemTime::now(), *took));
            }
            let mut resp = text(StatusCode::OK, body);
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => {
            let fresh = r.ok_at.is_some_and(|t| t.elapsed() <= interval * 3);
            if fresh {
                text(StatusCode::OK, "ok\n".into())
            } else {
                let why = r
                    .error
                    .clone()
                    .unwrap_or_else(|| "the repository's status has not been read yet".into());
                text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "walcore serves /metrics and /healthz\n".into(),
        ),
    }
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp
}
