//! Local health checks (tcp, http, exec) of the services this host runs.
//!
//! Each configured check runs in its own task and sends every result to the agent, which
//! publishes it in gossip and counts it. A probe never blocks longer than its timeout, and
//! exec checks run without a shell and are killed if they overrun.

use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::process::Stdio;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::debug;
use weft_discovery::{Health, ServiceKey};

use crate::config::{CheckConfig, CheckKind, ServiceConfig};

/// One probe result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The service probed.
    pub service: ServiceKey,
    /// What the probe found.
    pub health: Health,
    /// Why it failed, for logs.
    pub reason: Option<String>,
}

/// The running checks of the configured services. Dropping it stops them.
pub struct HealthChecks {
    tasks: JoinSet<()>,
}

impl HealthChecks {
    /// Starts one task per service that has a check; results go to `results`.
    pub fn start(services: &[ServiceConfig], results: mpsc::Sender<CheckResult>) -> HealthChecks {
        let mut tasks = JoinSet::new();
        for service in services {
            let Some(check) = service.check.clone() else {
                continue;
            };
            let key = service.key.clone();
            let address = service.address;
            let results = results.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(check.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let outcome = probe(&check, address).await;
                    let result = CheckResult {
                        service: key.clone(),
                        health: if outcome.is_ok() {
                            Health::Passing
                        } else {
                            Health::Failing
                        },
                        reason: outcome.err(),
                    };
                    if results.send(result).await.is_err() {
                        return;
                    }
                }
            });
        }
        HealthChecks { tasks }
    }

    /// Number of running checks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }
}

/// Runs one probe within the check's timeout. `Err` carries the reason it failed.
pub async fn probe(check: &CheckConfig, address: SocketAddr) -> Result<(), String> {
    let attempt = async {
        match &check.kind {
            CheckKind::Tcp => tokio::net::TcpStream::connect(address)
                .await
                .map(drop)
                .map_err(|e| format!("tcp connect to {address}: {e}")),
            CheckKind::Http { path } => http_probe(address, path).await,
            CheckKind::Exec { argv } => exec_probe(argv).await,
        }
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(check.timeout)
        )),
    }
}

async fn http_probe(address: SocketAddr, path: &str) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("http connect to {address}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake with {address}: {e}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%error, "health-check connection ended");
        }
    });
    let request = Request::get(path)
        .header(hyper::header::HOST, address.to_string())
        .header(
            hyper::header::USER_AGENT,
            concat!("weft-health/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("bad check path {path:?}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path} on {address}: {e}"))?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("GET {path} on {address} answered {status}"))
    }
}

async fn exec_probe(argv: &[String]) -> Result<(), String> {
    let status = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} exited with {status}", argv[0]))
    }
}

/// The health a service starts with: passing without a check, unknown until its first probe.
pub fn initial_health(service: &ServiceConfig) -> Health {
    if service.check.is_some() {
        Health::Unknown
    } else {
        Health::Passing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn check(kind: CheckKind) -> CheckConfig {
        CheckConfig {
            kind,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
        }
    }

    async fn http_server(status_line: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let reply = format!("{status_line}\r\ncontent-length: 0\r\n\r\n");
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_check_passes_on_2xx_and_fails_on_5xx() {
        let ok = http_server("HTTP/1.1 204 No Content").await;
        let bad = http_server("HTTP/1.1 503 Service Unavailable").await;
        let http = check(CheckKind::Http {
            path: "/healthz".into(),
        });
        assert_eq!(probe(&http, ok).await, Ok(()));
        let err = probe(&http, bad).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
    }

    #[tokio::test]
    async fn tcp_check_fails_when_nothing_listens() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(probe(&check(CheckKind::Tcp), addr).await, Ok(()));
        // A port that is bound but not listening: connects are refused, and no other socket
        // (another test's listener, or this probe's own source port) can take it meanwhile.
        let silent =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        silent
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
        assert!(probe(&check(CheckKind::Tcp), silent_addr).await.is_err());
    }

    #[tokio::test]
    async fn exec_check_follows_exit_status_and_times_out() {
        let any: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let ok = check(CheckKind::Exec {
            argv: vec!["true".into()],
        });
        let fail = check(CheckKind::Exec {
            argv: vec!["false".into()],
        });
        let slow = check(CheckKind::Exec {
            argv: vec!["sleep".into(), "5".into()],
        });
        assert_eq!(probe(&ok, any).await, Ok(()));
        assert!(probe(&fail, any).await.unwrap_err().contains("exited"));
        let started = std::time::Instant::now();
        assert!(
            probe(&slow, any)
                .await
                .unwrap_err()
                .contains("no answer within")
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        let missing = check(CheckKind::Exec {
            argv: vec!["/nonexistent/check".into()],
        });
        assert!(
            probe(&missing, any)
                .await
                .unwrap_err()
                .contains("cannot run")
        );
    }

    #[tokio::test]
    async fn silent_http_server_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let err = probe(&check(CheckKind::Http { path: "/".into() }), addr)
            .await
            .unwrap_err();
        assert!(err.contains("no answer within"), "{err}");
    }
}
