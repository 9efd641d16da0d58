//! `bicsi certs`: the cluster CA and the certificates of the controller and the node agents, for
//! clusters without cert-manager, and the revocation list (CRL) of that CA.
//!
//! `make(OUT)` writes `OUT/ca/{ca.crt,ca.key}` (made once, reused after: renewing the leaf
//! certificates keeps the CA every process trusts), and one `--tls-dir` per role,
//! `OUT/controller/` and `OUT/node/`, each with `ca.crt`, `tls.crt`, `tls.key` (and `ca.crl`
//! once something was revoked): the keys of a `kubernetes.io/tls` Secret with `ca.crt`, as
//! cert-manager writes them. `revoke(OUT, CERTS)` adds certificates' serial numbers to
//! `OUT/ca/revoked` and writes the CRL into the CA's and both roles' directories. Both write
//! `OUT/tls-secrets.yaml`, the two Secrets `deploy/tls.yaml` holds (`bicsi-controller-tls`,
//! `bicsi-node-tls`) with the roles' files. Keys are written 0600 and every file atomically;
//! the CA key never goes into a role's directory nor into a Secret.
//! This module only writes files: [`crate::tls`] reads them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};

use crate::error::{Error, Result};
use crate::tls::{CA_FILE, CERT_FILE, CRL_FILE, KEY_FILE, Role};

/// How long a CA made here is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Certificates start a little in the past: clocks of a cluster's machines differ.
const SKEW: Duration = Duration::from_secs(300);
/// The CA's key file (in `OUT/ca/` only).
pub const CA_KEY_FILE: &str = "ca.key";
/// The revoked serial numbers (hex, one a line), from which the CRL is rebuilt.
const REVOKED_FILE: &str = "revoked";
/// The Secrets of `deploy/tls.yaml`, made from the roles' directories.
pub const SECRETS_FILE: &str = "tls-secrets.yaml";
/// The namespace of `deploy/`.
const NAMESPACE: &str = "longhorn-system";

/// The Secrets `deploy/tls.yaml` holds, with the files of `OUT/controller` and `OUT/node`
/// (ca.crl too when there is one), as YAML.
fn secrets_yaml(out: &Path) -> Result<String> {
    use k8s_openapi::api::core::v1::Secret;
    let mut docs = Vec::new();
    for (name, dir) in [
        ("bicsi-controller-tls", "controller"),
        ("bicsi-node-tls", "node"),
    ] {
        let mut data = std::collections::BTreeMap::new();
        for file in [CA_FILE, CERT_FILE, KEY_FILE, CRL_FILE] {
            let path = out.join(dir).join(file);
            if file == CRL_FILE && !path.exists() {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
            data.insert(file.to_string(), k8s_openapi::ByteString(bytes));
        }
        let secret = Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(NAMESPACE.into()),
                labels: Some(
                    [("app.kubernetes.io/part-of".to_string(), "bicsi".to_string())].into(),
                ),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        };
        let mut value = serde_json::to_value(&secret)?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "Secret".into();
        docs.push(serde_yaml::to_string(&value).map_err(|e| Error::Internal(e.to_string()))?);
    }
    Ok(format!(
        "# Made by `bicsi certs --out {}`: copy to deploy/tls.yaml. Holds private keys.\n{}",
        out.display(),
        docs.join("---\n")
    ))
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{}: {e}", path.display()))
}

fn cert_err(what: &str, e: rcgen::Error) -> Error {
    Error::Internal(format!("making {what}: {e}"))
}

/// Writes `bytes` atomically; `secret`: readable by the owner only, from the first byte.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// The CA's parameters, derived from its key alone, so an [`Issuer`] rebuilt from them and the
/// key signs as the CA certificate says (issuer name and key identifier). The name carries a
/// digest of the public key: two clusters' CAs never share a name, so a certificate of the other
/// is refused as of an unknown issuer.
fn ca_params(key: &KeyPair) -> CertificateParams {
    use sha2::Digest;
    let id = hex::encode(&sha2::Sha256::digest(key.public_key_raw())[..6]);
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, format!("bicsi cluster CA {id}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

fn random_serial() -> SerialNumber {
    let mut b = *uuid::Uuid::new_v4().as_bytes();
    // Positive and without a leading zero byte: 16 bytes as DER writes them.
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

/// The CA in `ca_dir`, made now when it has none.
fn ca(ca_dir: &Path) -> Result<(Issuer<'static, KeyPair>, bool)> {
    let key_path = ca_dir.join(CA_KEY_FILE);
    if key_path.exists() {
        let pem = std::fs::read_to_string(&key_path).map_err(|e| io_err(&key_path, e))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| {
            Error::InvalidArgument(format!(
                "{}: {e}; it is not a CA key `bicsi certs` made",
                key_path.display()
            ))
        })?;
        if !ca_dir.join(CA_FILE).exists() {
            return Err(Error::InvalidArgument(format!(
                "{} has a CA key but no {CA_FILE}; restore it or remove the directory",
                ca_dir.display()
            )));
        }
        return Ok((Issuer::new(ca_params(&key), key), false));
    }
    let key = KeyPair::generate().map_err(|e| cert_err("the CA key", e))?;
    let mut params = ca_params(&key);
    let now = SystemTime::now();
    params.not_before = (now - SKEW).into();
    params.not_after = (now + CA_VALIDITY).into();
    params.serial_number = Some(random_serial());
    let cert = params
        .self_signed(&key)
        .map_err(|e| cert_err("the CA", e))?;
    write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_file(&ca_dir.join(CA_FILE), cert.pem().as_bytes(), false)?;
    Ok((Issuer::new(ca_params(&key), key), true))
}

/// A certificate of `role` (and any `extra_names`) signed by the CA in `ca_dir`, valid from
/// `not_before` to `not_after`: (certificate PEM, key PEM).
pub fn issue(
    ca_dir: &Path,
    role: Role,
    extra_names: &[String],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(String, String)> {
    let (issuer, _) = ca(ca_dir)?;
    let mut names = vec![role.dns_name().to_string()];
    names.extend(extra_names.iter().cloned());
    let mut params = CertificateParams::new(names).map_err(|e| {
        Error::InvalidArgument(format!("{e}: a name of the certificate is not a DNS name"))
    })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, role.dns_name());
    params.is_ca = IsCa::ExplicitNoCa;
    // Key encipherment too: qemu's NBD TLS (gnutls, `tls-creds-x509`) refuses a certificate
    // whose critical key usage lacks it, whatever the key's algorithm.
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Every process is a server to some and a client of others.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let key = KeyPair::generate().map_err(|e| cert_err("a key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| cert_err("a certificate", e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What [`make`] wrote.
#[derive(Debug)]
pub struct Made {
    pub ca_created: bool,
    pub ca_dir: PathBuf,
    pub controller_dir: PathBuf,
    pub node_dir: PathBuf,
}

/// The CA (made once) and fresh controller and node certificates valid for `days`, under `out`.
/// `controller_names`: more DNS names for the controller's certificate (its Service's names).
pub fn make(out: &Path, days: u64, controller_names: &[String]) -> Result<Made> {
    if days == 0 {
        return Err(Error::InvalidArgument(
            "--days 0: a certificate must be valid for at least a day".into(),
        ));
    }
    let ca_dir = out.join("ca");
    let (_, ca_created) = ca(&ca_dir)?;
    let ca_pem = std::fs::read(ca_dir.join(CA_FILE)).map_err(|e| io_err(&ca_dir, e))?;
    let now = SystemTime::now();
    let until = now + Duration::from_secs(days.saturating_mul(86400));
    let mut dirs = Vec::new();
    for (role, extra) in [(Role::Controller, controller_names), (Role::Node, &[][..])] {
        let dir = out.join(match role {
            Role::Controller => "controller",
            Role::Node => "node",
        });
        let (cert, key) = issue(&ca_dir, role, extra, now - SKEW, until)?;
        write_file(&dir.join(CA_FILE), &ca_pem, false)?;
        write_file(&dir.join(KEY_FILE), key.as_bytes(), true)?;
        write_file(&dir.join(CERT_FILE), cert.as_bytes(), false)?;
        let crl = ca_dir.join(CRL_FILE);
        if crl.exists() {
            let bytes = std::fs::read(&crl).map_err(|e| io_err(&crl, e))?;
            write_file(&dir.join(CRL_FILE), &bytes, false)?;
        }
        dirs.push(dir);
    }
    let node_dir = dirs.pop().expect("two roles");
    let controller_dir = dirs.pop().expect("two roles");
    write_file(&out.join(SECRETS_FILE), secrets_yaml(out)?.as_bytes(), true)?;
    Ok(Made {
        ca_created,
        ca_dir,
        controller_dir,
        node_dir,
    })
}

/// Adds the certificates in `certs` (PEM files) to the CA's revocation list under `out` and
/// writes the list (`ca.crl`) to `out/ca`, `out/controller` and `out/node`. Returns the serial
/// numbers revoked (hex).
pub fn revoke(out: &Path, certs: &[PathBuf]) -> Result<Vec<String>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ca_dir = out.join("ca");
    if !ca_dir.join(CA_KEY_FILE).exists() {
        return Err(Error::NotFound(format!(
            "no CA in {}; revoke with the --out directory the certificates were made in",
            ca_dir.display()
        )));
    }
    let (issuer, _) = ca(&ca_dir)?;
    let list = ca_dir.join(REVOKED_FILE);
    let mut serials: Vec<String> = std::fs::read_to_string(&list)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let mut added = Vec::new();
    for path in certs {
        let der = CertificateDer::from_pem_file(path).map_err(|e| {
            Error::InvalidArgument(format!("{}: {e}; give a PEM certificate", path.display()))
        })?;
        let serial = hex::encode(serial_of(&der).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: not an X.509 certificate", path.display()))
        })?);
        if !serials.contains(&serial) {
            serials.push(serial.clone());
        }
        added.push(serial);
    }
    let now = SystemTime::now();
    let params = CertificateRevocationListParams {
        this_update: (now - SKEW).into(),
        // Nothing fetches a newer list: the file is the list until it is replaced.
        next_update: (now + CA_VALIDITY).into(),
        crl_number: SerialNumber::from_slice(
            &now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
                .to_be_bytes(),
        ),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .filter_map(|s| hex::decode(s).ok())
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&s),
                revocation_time: (now - SKEW).into(),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&issuer)
        .map_err(|e| cert_err("the revocation list", e))?
        .pem()
        .map_err(|e| cert_err("the revocation list", e))?;
    write_file(&list, (serials.join("\n") + "\n").as_bytes(), false)?;
    for dir in ["ca", "controller", "node"] {
        let d = out.join(dir);
        if d.is_dir() {
            write_file(&d.join(CRL_FILE), crl.as_bytes(), false)?;
        }
    }
    if out.join("controller").is_dir() && out.join("node").is_dir() {
        write_file(&out.join(SECRETS_FILE), secrets_yaml(out)?.as_bytes(), true)?;
    }
    Ok(added)
}

/// One DER element: (tag, content, the rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The serial number of a DER certificate: `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE
/// { [0] version OPTIONAL, serialNumber INTEGER, … } … }` (RFC 5280 §4.1).
pub fn serial_of(der: &[u8]) -> Option<Vec<u8>> {
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(cert)? else {
        return None;
    };
    let (tag, content, rest) = tlv(tbs)?;
    let (tag, content) = if tag == 0xa0 {
        let (t, c, _) = tlv(rest)?;
        (t, c)
    } else {
        (tag, content)
    };
    (tag == 0x02).then(|| content.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use serde::Deserialize;

    #[test]
    fn make_reuses_the_ca_and_issues_both_roles() {
        let dir = tempfile::tempdir().unwrap();
        let first = make(dir.path(), 30, &["bicsi-controller.ns.svc".into()]).unwrap();
        assert!(first.ca_created);
        let ca1 = std::fs::read(first.ca_dir.join(CA_FILE)).unwrap();
        let second = make(dir.path(), 30, &[]).unwrap();
        assert!(!second.ca_created, "the CA is made once");
        assert_eq!(std::fs::read(second.ca_dir.join(CA_FILE)).unwrap(), ca1);
        for d in [&second.controller_dir, &second.node_dir] {
            assert_eq!(std::fs::read(d.join(CA_FILE)).unwrap(), ca1);
            let mode = std::fs::metadata(d.join(KEY_FILE)).unwrap();
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode.permissions().mode() & 0o777, 0o600);
            assert!(!d.join(CA_KEY_FILE).exists());
            // Loads as a --tls-dir: the key fits and the chain verifies against the CA.
            crate::tls::ClusterTls::load(d).unwrap();
        }
        assert!(make(dir.path(), 0, &[]).is_err());
        // The Secrets for deploy/tls.yaml: both roles, every file, base64 as Kubernetes wants.
        let yaml = std::fs::read_to_string(dir.path().join(SECRETS_FILE)).unwrap();
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
            .collect();
        assert_eq!(docs.len(), 2, "{yaml}");
        for (doc, dir) in docs.iter().zip([&second.controller_dir, &second.node_dir]) {
            assert_eq!(doc["kind"], "Secret");
            assert_eq!(doc["type"], "kubernetes.io/tls");
            assert_eq!(doc["metadata"]["namespace"], "longhorn-system");
            let key: k8s_openapi::ByteString =
                serde_json::from_value(doc["data"]["tls.key"].clone()).unwrap();
            assert_eq!(key.0, std::fs::read(dir.join(KEY_FILE)).unwrap());
            assert!(doc["data"].get("ca.key").is_none());
        }
        assert!(
            yaml.contains("name: bicsi-controller-tls") && yaml.contains("name: bicsi-node-tls")
        );
    }

    #[test]
    fn serial_is_read_back_and_revoked_into_a_crl() {
        let dir = tempfile::tempdir().unwrap();
        let made = make(dir.path(), 30, &[]).unwrap();
        let der = CertificateDer::from_pem_file(made.node_dir.join(CERT_FILE)).unwrap();
        let serial = serial_of(&der).unwrap();
        assert_eq!(serial.len(), 16);
        assert!(serial_of(b"\x30\x03\x02\x01").is_none());
        assert!(serial_of(b"").is_none());
        let revoked = revoke(dir.path(), &[made.node_dir.join(CERT_FILE)]).unwrap();
        assert_eq!(revoked, vec![hex::encode(&serial)]);
        for d in ["ca", "controller", "node"] {
            assert!(dir.path().join(d).join(CRL_FILE).exists(), "{d}");
        }
        let yaml = std::fs::read_to_string(dir.path().join(SECRETS_FILE)).unwrap();
        assert_eq!(yaml.matches("ca.crl:").count(), 2, "{yaml}");
        // Revoking again keeps one entry; the CRL still loads in a --tls-dir.
        revoke(dir.path(), &[made.node_dir.join(CERT_FILE)]).unwrap();
        let list = std::fs::read_to_string(dir.path().join("ca").join(REVOKED_FILE)).unwrap();
        assert_eq!(list.lines().count(), 1);
        crate::tls::ClusterTls::load(&made.controller_dir).unwrap();
        assert!(revoke(&dir.path().join("nothing"), &[]).is_err());
    }
}
