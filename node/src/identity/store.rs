//! This host's identities on disk, in `data_dir`: `node.key`/`node.pem` and
//! `services/NAMESPACE/NAME.key|.pem`. Keys are written 0600 in 0700 directories and replaced
//! atomically (write, then rename), so a crash never leaves half a key.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use weft_ca::bundle::pem_certificate;
use weft_discovery::ServiceKey;

/// Where one SVID and its key live.
#[derive(Debug, Clone)]
pub struct SvidFiles {
    /// Chain, PEM (leaf first).
    pub cert: PathBuf,
    /// Private key, PKCS#8 PEM.
    pub key: PathBuf,
}

impl SvidFiles {
    /// Files of the node SVID.
    pub fn node(data_dir: &Path) -> SvidFiles {
        SvidFiles {
            cert: data_dir.join("node.pem"),
            key: data_dir.join("node.key"),
        }
    }

    /// Files of a service SVID.
    pub fn service(data_dir: &Path, service: &ServiceKey) -> SvidFiles {
        let dir = data_dir.join("services").join(&service.namespace);
        SvidFiles {
            cert: dir.join(format!("{}.pem", service.name)),
            key: dir.join(format!("{}.key", service.name)),
        }
    }

    /// Reads the chain and key, if both exist and parse.
    pub fn load(&self) -> Option<(Vec<CertificateDer<'static>>, String)> {
        let pem = std::fs::read(&self.cert).ok()?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        let key = std::fs::read_to_string(&self.key).ok()?;
        (!chain.is_empty()).then_some((chain, key))
    }

    /// Writes the chain (0644) and key (0600), each atomically.
    pub fn save(&self, chain: &[CertificateDer<'_>], key_pem: &str) -> std::io::Result<()> {
        if let Some(dir) = self.cert.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let pem: String = chain.iter().map(pem_certificate).collect();
        write_atomic(&self.key, key_pem.as_bytes(), 0o600)?;
        write_atomic(&self.cert, pem.as_bytes(), 0o644)
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, with `mode` from the
/// first byte, so readers see the old or the new file, never half of one.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
