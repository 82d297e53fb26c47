//! nginx-light as a real, strict HTTP server for tests and benchmarks: one process in the
//! foreground, a 1 KB file at `/1k`, HTTP/1.1 on one port and h2c (HTTP/2 with prior
//! knowledge) on another. Killed by PID when dropped.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::agent::{free_port, wait_until};

/// A running nginx.
pub struct Nginx {
    child: Child,
    /// HTTP/1.1 listener on 127.0.0.1.
    pub http_port: u16,
    /// h2c listener on 127.0.0.1.
    pub h2_port: u16,
}

impl Nginx {
    /// Starts nginx with its configuration, files and logs under `dir`, and waits (up to
    /// 10 s) until both ports accept connections.
    pub fn start(dir: &Path) -> anyhow::Result<Nginx> {
        let (http_port, h2_port) = (free_port(), free_port());
        let www = dir.join("www");
        let tmp = dir.join("nginx-tmp");
        std::fs::create_dir_all(&www)?;
        std::fs::create_dir_all(&tmp)?;
        std::fs::write(www.join("1k"), vec![b'x'; 1024])?;
        let conf = format!(
            "master_process off;\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
             client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n\
             fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n\
             server {{ listen 127.0.0.1:{http_port}; listen 127.0.0.1:{h2_port} http2; root {w}; }}\n}}\n",
            d = dir.display(),
            t = tmp.display(),
            w = www.display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let log = std::fs::File::create(dir.join("nginx.log"))?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("nginx-error.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start nginx (Debian package nginx-light)")?;
        let nginx = Nginx {
            child,
            http_port,
            h2_port,
        };
        let listening = wait_until(Duration::from_secs(10), || {
            [http_port, h2_port]
                .iter()
                .all(|port| TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], *port))).is_ok())
        });
        if listening.is_none() {
            bail!(
                "nginx did not listen on {http_port} and {h2_port} within 10 s: {}",
                std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default()
            );
        }
        Ok(nginx)
    }

    /// The nginx process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
