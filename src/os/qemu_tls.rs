//! qemu's TLS for NBD (issue 19): the one place that lays a node's `--tls-dir` out as qemu's
//! `tls-creds-x509` reads it and writes the `--object` arguments, for qemu-storage-daemon's NBD
//! server (qcow2 replicas), the volume engines' NBD children and qemu-img reading another node's
//! replica. It decides nothing about when TLS is used: callers pass the node's `--tls-dir` or not.
//!
//! qemu reads fixed file names from one directory (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, `client-cert.pem`, `client-key.pem`, optionally `ca-crl.pem`), where a
//! `kubernetes.io/tls` Secret has `ca.crt`, `tls.crt`, `tls.key`. A directory of symbolic links
//! (mode 0700, absolute targets) bridges them without copying the key: the node's one
//! certificate serves as both the server's and the client's (it has both extended key usages).
//! The links resolve in whichever process opens them, so the engine host (`bicsi engine`)
//! must see the `--tls-dir` at the same path as the node agent (deploy/engine.yaml mounts it).
//!
//! Authorization: the server lets in only a client whose certificate, signed by the cluster CA,
//! has the subject `CN=bicsi-node` (`authz-simple`: qemu compares the peer's distinguished name
//! as gnutls prints it), the subject of every node certificate `bicsi certs` and the
//! cert-manager Certificates make. A controller's certificate (`CN=bicsi-controller`) is
//! refused. Clients check the server's certificate for the DNS name `bicsi-node`.

use std::path::{Path, PathBuf};

use super::{OsError, OsResult};
use crate::tls::{CA_FILE, CERT_FILE, CRL_FILE, KEY_FILE, Role};

/// The qemu object id of the TLS credentials, server or client.
pub(crate) const CREDS_ID: &str = "bicsi-nbd-tls";
/// The qemu object id of the server's authorization.
pub(crate) const AUTHZ_ID: &str = "bicsi-nbd-authz";
/// The credentials directory inside a daemon's run directory.
pub(crate) const DIR_NAME: &str = "tls";

/// Which side of the connection the credentials are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Server,
    Client,
}

/// The subject every node certificate has; the only identity qemu's server lets in.
pub(crate) fn node_identity() -> String {
    format!("CN={}", Role::Node.dns_name())
}

/// The name clients check the server's certificate for (`tls-hostname`).
pub(crate) fn server_name() -> &'static str {
    Role::Node.dns_name()
}

/// Makes `dir` (removed first if it exists; its parent must exist) as qemu's credentials
/// directory for the node's `tls_dir`: mode 0700, links under qemu's names.
pub(crate) fn link_dir(tls_dir: &Path, dir: &Path) -> OsResult<()> {
    use std::os::unix::fs::DirBuilderExt;
    let tls_dir = std::path::absolute(tls_dir)
        .map_err(|e| OsError::io(format!("resolving --tls-dir {}", tls_dir.display()), e))?;
    for needed in [CA_FILE, CERT_FILE, KEY_FILE] {
        if !tls_dir.join(needed).is_file() {
            return Err(OsError::NotFound(format!(
                "--tls-dir {} has no {needed}; qemu's NBD TLS needs ca.crt, tls.crt and tls.key \
                 (mount the node's Secret there)",
                tls_dir.display()
            )));
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(OsError::io(format!("removing {}", dir.display()), e)),
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| OsError::io(format!("making qemu's TLS directory {}", dir.display()), e))?;
    for (ours, qemus) in [
        (CA_FILE, "ca-cert.pem"),
        (CERT_FILE, "server-cert.pem"),
        (KEY_FILE, "server-key.pem"),
        (CERT_FILE, "client-cert.pem"),
        (KEY_FILE, "client-key.pem"),
        (CRL_FILE, "ca-crl.pem"),
    ] {
        let from = tls_dir.join(ours);
        if ours == CRL_FILE && !from.exists() {
            continue;
        }
        std::os::unix::fs::symlink(&from, dir.join(qemus))
            .map_err(|e| OsError::io(format!("linking {}", from.display()), e))?;
    }
    Ok(())
}

/// `--object` value of the credentials in `dir`. A server verifies its clients' certificates
/// (`verify-peer=on`); a client always verifies the server's.
pub(crate) fn creds_object(dir: &Path, endpoint: Endpoint) -> OsResult<String> {
    let dir = super::utf8_path(dir)?.replace(',', ",,");
    Ok(match endpoint {
        Endpoint::Server => {
            format!("tls-creds-x509,id={CREDS_ID},endpoint=server,verify-peer=on,dir={dir}")
        }
        Endpoint::Client => format!("tls-creds-x509,id={CREDS_ID},endpoint=client,dir={dir}"),
    })
}

/// `--object` value of the server's authorization: node certificates only.
pub(crate) fn authz_object() -> String {
    format!("authz-simple,id={AUTHZ_ID},identity={}", node_identity())
}

/// A directory removed when dropped.
pub(crate) struct PrivateDir(PathBuf);

impl PrivateDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A one-command client: a private credentials directory under the temp dir (removed when
/// dropped) and the `--object` argument naming it (qemu-img, qemu-nbd).
pub(crate) fn client_creds(tls_dir: &Path) -> OsResult<(PrivateDir, String)> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "bicsi-nbd-tls-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    link_dir(tls_dir, &path)?;
    let dir = PrivateDir(path);
    let object = creds_object(dir.path(), Endpoint::Client)?;
    Ok((dir, object))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_directory_links_qemus_names_to_the_secrets_files() {
        let t = tempfile::tempdir().unwrap();
        let tls = t.path().join("node");
        std::fs::create_dir(&tls).unwrap();
        for f in [CA_FILE, CERT_FILE, KEY_FILE] {
            std::fs::write(tls.join(f), f).unwrap();
        }
        let dir = t.path().join("run/tls");
        std::fs::create_dir(t.path().join("run")).unwrap();
        link_dir(&tls, &dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        for (name, content) in [
            ("ca-cert.pem", CA_FILE),
            ("server-cert.pem", CERT_FILE),
            ("client-cert.pem", CERT_FILE),
            ("server-key.pem", KEY_FILE),
            ("client-key.pem", KEY_FILE),
        ] {
            assert_eq!(std::fs::read_to_string(dir.join(name)).unwrap(), content);
            assert!(std::fs::read_link(dir.join(name)).unwrap().is_absolute());
        }
        assert!(!dir.join("ca-crl.pem").exists());
        // Made again (a restarted daemon): the CRL now there is linked too.
        std::fs::write(tls.join(CRL_FILE), "crl").unwrap();
        link_dir(&tls, &dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("ca-crl.pem")).unwrap(),
            "crl"
        );

        // A --tls-dir without the key: the error names the directory and the file.
        std::fs::remove_file(tls.join(KEY_FILE)).unwrap();
        let err = link_dir(&tls, &dir).unwrap_err().to_string();
        assert!(err.contains("tls.key") && err.contains("node"), "{err}");

        assert_eq!(
            creds_object(Path::new("/r/a,b/tls"), Endpoint::Server).unwrap(),
            "tls-creds-x509,id=bicsi-nbd-tls,endpoint=server,verify-peer=on,dir=/r/a,,b/tls"
        );
        assert_eq!(
            authz_object(),
            "authz-simple,id=bicsi-nbd-authz,identity=CN=bicsi-node"
        );
    }
}
