//! The CLI's side of the admin API: one HTTP/1.1 request over the agent's Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

/// Errors talking to the local agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("cannot reach the agent at {0}: {1} (is `weft agent` running? pass --socket or -c)")]
    Connect(PathBuf, std::io::Error),
    /// The HTTP exchange failed.
    #[error("admin request {0} failed: {1}")]
    Http(String, hyper::Error),
    /// The agent answered with an error status.
    #[error("admin request {0} answered {1}")]
    Status(String, StatusCode),
    /// The answer was not the expected JSON.
    #[error("admin request {0} returned unexpected JSON: {1}")]
    Decode(String, serde_json::Error),
}

/// A client for one agent's admin socket.
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: &Path) -> AdminClient {
        AdminClient {
            socket: socket.to_path_buf(),
        }
    }

    /// GETs `path` and returns the status and body.
    pub async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), ClientError> {
        self.send(Method::GET, path, Bytes::new()).await
    }

    /// POSTs `body` to `path` and returns the status and body.
    pub async fn post(&self, path: &str, body: Bytes) -> Result<(StatusCode, Bytes), ClientError> {
        self.send(Method::POST, path, body).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| ClientError::Connect(self.socket.clone(), e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(path.into(), e))?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "weft-admin")
            .body(Full::new(body))
            .expect("admin paths are valid URIs");
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Http(path.into(), e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(path.into(), e))?
            .to_bytes();
        Ok((status, body))
    }

    /// GETs `path` and decodes the JSON answer.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.get(path).await?;
        if !status.is_success() {
            return Err(ClientError::Status(path.into(), status));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(path.into(), e))
    }
}
