//! A small configurable HTTP test server and an HTTP load client, for the L7 proxy tests.
//!
//! [`Backend`] serves HTTP/1.1 and h2c (prior knowledge) on 127.0.0.1 from its own tokio
//! runtime: every answer's body is the backend's name (and an `x-backend` header names it
//! too); it can fail a given fraction of requests with 503 (spread evenly, not at random:
//! with one half, every other request fails, so a run of failures never happens by chance),
//! and it can delay every answer. Both knobs can be changed while it runs. It counts requests
//! by method, and the 503s it gave.
//!
//! [`Client`] sends requests over pooled HTTP/1.1 keep-alive connections and [`Client::load`]
//! drives many at once, recording status, `weft-error` header, answering backend and latency
//! of each.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What a backend counted.
#[derive(Debug, Default)]
pub struct Counts {
    by_method: Mutex<HashMap<String, u64>>,
    failed: AtomicU64,
    total: AtomicU64,
}

impl Counts {
    /// Requests received with `method`.
    pub fn method(&self, method: &str) -> u64 {
        self.by_method
            .lock()
            .expect("counts lock")
            .get(method)
            .copied()
            .unwrap_or(0)
    }

    /// Requests received.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }

    /// Requests answered 503 on purpose.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Requests answered well (total less failed).
    pub fn served(&self) -> u64 {
        self.total() - self.failed()
    }
}

struct State {
    name: String,
    /// Share of requests answered 503, in thousandths.
    fail_permille: AtomicU32,
    /// Delay before each answer, in microseconds.
    delay_us: AtomicU64,
    counts: Counts,
}

impl State {
    /// Whether the `n`th request (from 0) fails: spread evenly at the configured rate.
    fn fails(&self, n: u64) -> bool {
        let permille = u64::from(self.fail_permille.load(Ordering::SeqCst));
        (n + 1) * permille / 1000 != n * permille / 1000
    }
}

/// An HTTP/1.1 + h2c test server on 127.0.0.1, stopped when dropped.
pub struct Backend {
    /// Its port on 127.0.0.1.
    pub port: u16,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Backend {
    /// Starts a backend answering its `name`, failing no request, with no delay.
    pub fn start(name: &str) -> Backend {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("backend-{name}"))
            .enable_all()
            .build()
            .expect("backend runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind backend");
        let port = listener.local_addr().expect("backend address").port();
        let state = Arc::new(State {
            name: name.to_string(),
            fail_permille: AtomicU32::new(0),
            delay_us: AtomicU64::new(0),
            counts: Counts::default(),
        });
        let shared = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, request).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Backend {
            port,
            state,
            runtime: Some(runtime),
        }
    }

    /// Fails `fraction` (0 to 1) of the requests from now on with 503.
    pub fn set_failing(&self, fraction: f64) -> &Backend {
        let permille = (fraction.clamp(0.0, 1.0) * 1000.0).round() as u32;
        self.state.fail_permille.store(permille, Ordering::SeqCst);
        self
    }

    /// Delays every answer by `delay` from now on.
    pub fn set_delay(&self, delay: Duration) -> &Backend {
        self.state
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
        self
    }

    /// What it counted.
    pub fn counts(&self) -> &Counts {
        &self.state.counts
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn answer(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().as_str().to_string();
    let n = state.counts.total.fetch_add(1, Ordering::SeqCst);
    *state
        .counts
        .by_method
        .lock()
        .expect("counts lock")
        .entry(method)
        .or_default() += 1;
    // Read the whole request body before answering.
    let _ = request.into_body().collect().await;
    let delay = state.delay_us.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_micros(delay)).await;
    }
    let status = if state.fails(n) {
        state.counts.failed.fetch_add(1, Ordering::SeqCst);
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    Response::builder()
        .status(status)
        .header("x-backend", state.name.as_str())
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(state.name.clone())))
        .expect("valid response")
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status; 0 when the exchange itself failed (no answer).
    pub status: u16,
    /// The body: the answering backend's name, or the mesh's error text.
    pub body: String,
    /// The `weft-error` header, when the mesh answered.
    pub weft_error: Option<String>,
    /// Time to the whole answer.
    pub latency: Duration,
    /// When it was sent, from the start of the load.
    pub sent_at: Duration,
}

impl Answer {
    /// A 2xx answer.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// An HTTP/1.1 client with keep-alive connections.
#[derive(Clone)]
pub struct Client {
    inner: LegacyClient<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl Default for Client {
    fn default() -> Client {
        Client::new(Duration::from_secs(10))
    }
}

impl Client {
    /// A client whose every request is bounded by `timeout`.
    pub fn new(timeout: Duration) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let inner = LegacyClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Client { inner, timeout }
    }

    /// One request: `method` `url`, with a small body for methods that carry one.
    pub async fn request(&self, method: &Method, url: &str) -> Answer {
        let started = Instant::now();
        let body = if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            Bytes::from_static(b"payload")
        } else {
            Bytes::new()
        };
        let request = Request::builder()
            .method(method.clone())
            .uri(url)
            .body(Full::new(body))
            .expect("valid request");
        let exchange = async {
            let response = self
                .inner
                .request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let status = response.status().as_u16();
            let weft_error = response
                .headers()
                .get("weft-error")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((
                status,
                weft_error,
                String::from_utf8_lossy(&body).into_owned(),
            ))
        };
        let (status, weft_error, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => (0, None, e),
            Err(_) => (0, None, format!("no answer within {:?}", self.timeout)),
        };
        Answer {
            status,
            body,
            weft_error,
            latency: started.elapsed(),
            sent_at: Duration::ZERO,
        }
    }

    /// Sends `total` requests `method` `url`, `concurrency` at a time; answers in the order
    /// they were sent.
    pub async fn load(
        &self,
        method: &Method,
        url: &str,
        total: usize,
        concurrency: usize,
    ) -> Vec<Answer> {
        self.load_until(method, url, Some(total), concurrency, None)
            .await
    }

    /// Sends requests `concurrency` at a time until `total` were sent (when given) or `stop`
    /// turns true (when given); answers in the order they were sent.
    pub async fn load_until(
        &self,
        method: &Method,
        url: &str,
        total: Option<usize>,
        concurrency: usize,
        stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> Vec<Answer> {
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let client = self.clone();
            let (method, url) = (method.clone(), url.to_string());
            let (next, stop) = (next.clone(), stop.clone());
            workers.spawn(async move {
                let mut answers = Vec::new();
                loop {
                    if stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if total.is_some_and(|t| i >= t as u64) {
                        break;
                    }
                    let sent_at = started.elapsed();
                    let mut answer = client.request(&method, &url).await;
                    answer.sent_at = sent_at;
                    answers.push((i, answer));
                }
                answers
            });
        }
        let mut all = Vec::new();
        while let Some(answers) = workers.join_next().await {
            all.extend(answers.expect("load worker"));
        }
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, a)| a).collect()
    }
}

/// Counts of answers by body (backend name), 2xx answers only.
pub fn by_backend(answers: &[Answer]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for answer in answers.iter().filter(|a| a.ok()) {
        *counts.entry(answer.body.clone()).or_default() += 1;
    }
    counts
}
