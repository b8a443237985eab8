//! TLS for replication connections: rustls with the *ring* provider, set up and checked as
//! libpq does it.
//!
//! - What is checked follows [`SslMode`] and the presence of root certificates: nothing but the
//!   handshake's own signatures when there are none (`allow`, `prefer`, `require`); the chain
//!   up to a root when there are (`verify-ca`, and the weaker modes, as in libpq); the chain and
//!   the host name or IP address (subjectAltName) for `verify-full`.
//! - Certificates, keys and CRLs are PEM files, read when a connection negotiates TLS, so that
//!   a Unix socket or `sslmode=disable` never touches them.
//! - SNI carries the host name (never an IP address) unless `sslsni=0`; ALPN offers
//!   `postgresql`, as libpq 17 does (older servers ignore it).
//!
//! Differences from libpq (OpenSSL): rustls speaks TLS 1.2 and 1.3 only; it never matches a
//! host name against the certificate's Common Name, only against its subjectAltName; and it
//! refuses a CA certificate (basicConstraints CA:TRUE) presented as the server's own, so a
//! self-signed server certificate made with `openssl req -x509` defaults cannot be verified (a
//! server certificate signed by a CA can).

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme, SupportedProtocolVersion,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::warn;

use crate::replication::conninfo::{RootCert, SslConfig, SslFile, SslMode, TlsVersion};

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verification {
    /// Only that the server holds the key of the certificate it shows (the handshake's
    /// signatures): anyone on the path can pose as the server.
    None,
    /// The chain up to a trusted root, not the name.
    Chain,
    /// The chain and the host name (or IP address).
    Full,
}

impl Verification {
    /// libpq's rule: `verify-full` checks everything, `verify-ca` the chain, and the weaker
    /// modes the chain when root certificates are there and nothing otherwise. (`verify-*`
    /// without roots is refused before this is asked.)
    pub(crate) fn for_mode(mode: SslMode, have_roots: bool) -> Verification {
        match (mode, have_roots) {
            (SslMode::VerifyFull, _) => Verification::Full,
            (SslMode::VerifyCa, _) | (_, true) => Verification::Chain,
            (_, false) => Verification::None,
        }
    }
}

/// A TLS client set up for one host: the rustls configuration, the name to check and send, and
/// what is needed to explain a failure.
pub(crate) struct TlsClient {
    connector: TlsConnector,
    name: ServerName<'static>,
    host: String,
    mode: SslMode,
    verification: Verification,
    /// The trusted roots in words (`root certificate file "/x/root.crt"`), if any.
    roots: Option<String>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("host", &self.host)
            .field("mode", &self.mode)
            .field("verification", &self.verification)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Reads the files `ssl` names and sets rustls up to connect to `host` under `mode`. The
    /// error names the file or setting that is wrong.
    pub(crate) fn new(ssl: &SslConfig, mode: SslMode, host: &str) -> Result<TlsClient, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = load_roots(&ssl.root_cert, mode)?;
        let verification = Verification::for_mode(mode, roots.is_some());

        let name = match ServerName::try_from(host.to_owned()) {
            Ok(name) => name,
            Err(_) if verification == Verification::Full => {
                return Err(format!(
                    "the host \"{host}\" is neither a valid DNS name nor an IP address, so \
                     sslmode=verify-full cannot check the server's certificate against it"
                ));
            }
            // Nothing checks the name: any placeholder will do (an address, so no SNI).
            Err(_) => ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into()),
        };

        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            None => Arc::new(AnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            }),
            Some((ref store, ref described)) => {
                let crls = load_crls(ssl)?;
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(store.clone()),
                    provider.clone(),
                )
                .with_crls(crls)
                .build()
                .map_err(|e| format!("cannot use {described}: {e}"))?;
                match verification {
                    Verification::Full => webpki,
                    _ => Arc::new(ChainOnly(webpki)),
                }
            }
        };

        let versions = protocol_versions(ssl)?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| format!("cannot set TLS up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client_certificate(ssl)? {
            Some(client) => builder
                .with_client_auth_cert(client.chain, client.key)
                .map_err(|e| {
                    format!(
                        "cannot use the client certificate \"{}\" with the private key \"{}\": \
                         {e}",
                        client.cert_path.display(),
                        client.key_path.display()
                    )
                })?,
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = ssl.sni;
        config.alpn_protocols = vec![b"postgresql".to_vec()];

        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            host: host.to_owned(),
            mode,
            verification,
            roots: roots.map(|(_, described)| described),
        })
    }

    /// How much of the server's certificate this client checks.
    pub(crate) fn verification(&self) -> Verification {
        self.verification
    }

    /// The TLS handshake over `tcp` (after the server accepted the SSLRequest).
    pub(crate) async fn handshake(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.name.clone(), tcp).await
    }

    /// Why a handshake failed, in words that name what to check: the root certificates, the
    /// host name, the client certificate.
    pub(crate) fn explain(&self, error: &rustls::Error) -> String {
        use rustls::Error as E;
        let roots = self.roots.as_deref().unwrap_or("no root certificates");
        let mode = self.mode;
        match error {
            E::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                "the server's certificate is not trusted: it is not signed by a CA of {roots} \
                 (sslmode={mode})"
            ),
            E::InvalidCertificate(
                e @ (CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. }),
            ) => format!(
                "the server's certificate does not match the host name \"{}\" \
                 (sslmode={mode}): {e}",
                self.host
            ),
            E::InvalidCertificate(CertificateError::Other(other))
                if other.to_string().contains("CaUsedAsEndEntity") =>
            {
                format!(
                    "the server's certificate is a CA certificate (basicConstraints CA:TRUE), \
                     which cannot be verified as a server's own (sslmode={mode}, {roots}): give \
                     the server a certificate signed by that CA"
                )
            }
            E::InvalidCertificate(e) => format!(
                "the server's certificate was rejected: {e} (sslmode={mode}, checked against \
                 {roots})"
            ),
            E::AlertReceived(alert) => describe_alert(*alert),
            other => format!("the TLS handshake failed: {other}"),
        }
    }
}

/// A TLS error after the handshake (under TLS 1.3, a server that rejects the client's
/// certificate says so after the client has finished its part), in words.
pub(crate) fn describe(error: &rustls::Error) -> String {
    match error {
        rustls::Error::AlertReceived(alert) => describe_alert(*alert),
        other => format!("TLS failed: {other}"),
    }
}

fn describe_alert(alert: AlertDescription) -> String {
    let hint = match alert {
        AlertDescription::CertificateRequired
        | AlertDescription::HandshakeFailure
        | AlertDescription::BadCertificate
        | AlertDescription::UnknownCA
        | AlertDescription::AccessDenied
        | AlertDescription::CertificateUnknown
        | AlertDescription::CertificateExpired
        | AlertDescription::CertificateRevoked => {
            ": does it require a client certificate (sslcert, sslkey) signed by a CA it trusts \
             (its ssl_ca_file)?"
        }
        AlertDescription::ProtocolVersion => {
            ": do its ssl_min_protocol_version and ssl_max_protocol_version allow TLS 1.2 or \
             1.3?"
        }
        _ => "",
    };
    format!("the server ended TLS with the alert {alert:?}{hint}")
}

/// The rustls error inside an I/O error of a TLS stream, when that is what it is.
pub(crate) fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The trusted roots and their description, or `None` when there are none and `mode` allows
/// that.
fn load_roots(root: &RootCert, mode: SslMode) -> Result<Option<(RootCertStore, String)>, String> {
    let missing = |what: String| {
        if mode.requires_verification() {
            Err(format!(
                "{what}, and sslmode={mode} needs root certificates to check the server's \
                 certificate: name a PEM file of CA certificates with sslrootcert (or \
                 PGSSLROOTCERT), use sslrootcert=system for the system's CAs, or use \
                 sslmode=require to skip the check"
            ))
        } else {
            Ok(None)
        }
    };
    match root {
        RootCert::Unset => missing(
            "no root certificate file (no sslrootcert, and no home directory for \
             ~/.postgresql/root.crt)"
                .to_owned(),
        ),
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _unusable) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "sslrootcert=system: no trusted CA certificates found on this system{}",
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", errors.join("; "))
                    }
                ));
            }
            Ok(Some((
                store,
                "the system's trusted CAs (sslrootcert=system)".to_owned(),
            )))
        }
        RootCert::File(file) => {
            let described = format!("root certificate file \"{}\"", file.path.display());
            match std::fs::metadata(&file.path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if file.given && !mode.requires_verification() {
                        warn!(
                            "{described} does not exist: the server's certificate is not \
                             checked (sslmode={mode})"
                        );
                    }
                    missing(format!("{described} does not exist"))
                }
                Err(e) => Err(format!("cannot read {described}: {e}")),
                Ok(_) => {
                    let certs = read_certificates(&file.path, "root certificate")?;
                    let mut store = RootCertStore::empty();
                    for (i, cert) in certs.into_iter().enumerate() {
                        store.add(cert).map_err(|e| {
                            format!(
                                "{described}: certificate {} is not a usable CA certificate: {e}",
                                i + 1
                            )
                        })?;
                    }
                    Ok(Some((store, described)))
                }
            }
        }
    }
}

/// The CRLs of `sslcrl` (a given file must exist; the default only if it does) and of every
/// file of `sslcrldir`.
fn load_crls(ssl: &SslConfig) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let mut crls = Vec::new();
    if let Some(file) = &ssl.crl
        && (file.given || file.path.exists())
    {
        crls.extend(read_crls(&file.path)?);
    }
    if let Some(dir) = &ssl.crl_dir {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            format!(
                "cannot read the CRL directory \"{}\" (sslcrldir): {e}",
                dir.display()
            )
        })?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| {
                format!(
                    "cannot read the CRL directory \"{}\" (sslcrldir): {e}",
                    dir.display()
                )
            })?;
            if entry.path().is_file() {
                paths.push(entry.path());
            }
        }
        paths.sort();
        for path in paths {
            crls.extend(read_crls(&path)?);
        }
    }
    Ok(crls)
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let bytes = read_file(path, "certificate revocation list")?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid_pem(path, "certificate revocation list", &e))?;
    if crls.is_empty() {
        return Err(format!(
            "certificate revocation list file \"{}\" holds no PEM CRL (-----BEGIN X509 \
             CRL-----)",
            path.display()
        ));
    }
    Ok(crls)
}

/// A client certificate chain and its key, with their files for messages.
struct ClientCert<'a> {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &'a Path,
    key_path: &'a Path,
}

/// The client certificate chain and key, when one is configured and present (libpq: a missing
/// certificate file means "no client certificate"; a certificate without its key is an error).
fn client_certificate(ssl: &SslConfig) -> Result<Option<ClientCert<'_>>, String> {
    if !ssl.send_client_cert {
        return Ok(None);
    }
    let Some(cert) = &ssl.cert else {
        return Ok(None);
    };
    match std::fs::metadata(&cert.path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if cert.given {
                warn!(
                    "client certificate file \"{}\" does not exist: connecting without one",
                    cert.path.display()
                );
            }
            return Ok(None);
        }
        Err(e) => {
            return Err(format!(
                "cannot read the client certificate file \"{}\": {e}",
                cert.path.display()
            ));
        }
        Ok(_) => {}
    }
    let chain = read_certificates(&cert.path, "client certificate")?;
    let Some(key) = &ssl.key else {
        return Err(format!(
            "client certificate \"{}\" is present, but no private key file is given (sslkey)",
            cert.path.display()
        ));
    };
    Ok(Some(ClientCert {
        chain,
        key: read_private_key(key, &cert.path)?,
        cert_path: &cert.path,
        key_path: &key.path,
    }))
}

/// Every certificate of a PEM file; an error naming the file when it cannot be read, is not
/// valid PEM, or holds no certificate.
fn read_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid_pem(path, what, &e))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} file \"{}\" holds no PEM certificate (-----BEGIN CERTIFICATE-----; DER \
             files are not read)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of `key` (for the certificate `cert`), after libpq's check of its mode.
fn read_private_key(key: &SslFile, cert: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let path = &key.path;
    let metadata = std::fs::metadata(path).map_err(|e| {
        format!(
            "client certificate \"{}\" is present, but its private key file \"{}\" cannot be \
             read: {e}",
            cert.display(),
            path.display()
        )
    })?;
    check_key_mode(path, &metadata)?;
    let bytes = read_file(path, "private key")?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(der) => Ok(der),
        Err(pem::Error::NoItemsFound) if contains(&bytes, b"ENCRYPTED") => Err(format!(
            "private key file \"{}\" is encrypted, which walcore does not support (sslpassword): \
             decrypt it, e.g. with openssl pkey -in KEY -out PLAIN, and keep the result mode \
             0600",
            path.display()
        )),
        Err(pem::Error::NoItemsFound) => Err(format!(
            "private key file \"{}\" holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or \
             EC PRIVATE KEY)",
            path.display()
        )),
        Err(e) => Err(invalid_pem(path, "private key", &e)),
    }
}

/// libpq's rule for private key files: no group or world access when owned by the current
/// user; at most group read when owned by root (so that a root-owned key can be shared with a
/// group).
fn check_key_mode(path: &Path, metadata: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mode = metadata.mode() & 0o777;
    let owner = metadata.uid();
    let too_open =
        (Some(owner) == effective_uid() && mode & 0o077 != 0) || (owner == 0 && mode & 0o037 != 0);
    if too_open {
        return Err(format!(
            "private key file \"{}\" has group or world access (mode {mode:04o}): it must be \
             u=rw (0600) or less if owned by the current user, or u=rw,g=r (0640) or less if \
             owned by root",
            path.display()
        ));
    }
    Ok(())
}

/// This process's effective user id (`/proc/self/status`; walcore has no `unsafe` for
/// `geteuid`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} file \"{}\": {e}", path.display()))
}

fn invalid_pem(path: &Path, what: &str, e: &pem::Error) -> String {
    format!("{what} file \"{}\" is not valid PEM: {e}", path.display())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The protocol versions rustls may use within `ssl_min_protocol_version` and
/// `ssl_max_protocol_version`.
fn protocol_versions(ssl: &SslConfig) -> Result<Vec<&'static SupportedProtocolVersion>, String> {
    let min = ssl.min_protocol.unwrap_or(TlsVersion::V1_0);
    let max = ssl.max_protocol.unwrap_or(TlsVersion::V1_3);
    let mut versions = Vec::new();
    if (min..=max).contains(&TlsVersion::V1_2) {
        versions.push(&rustls::version::TLS12);
    }
    if (min..=max).contains(&TlsVersion::V1_3) {
        versions.push(&rustls::version::TLS13);
    }
    if versions.is_empty() {
        return Err(format!(
            "ssl_min_protocol_version={min} and ssl_max_protocol_version={max} leave no TLS \
             version walcore speaks (1.2 and 1.3)"
        ));
    }
    Ok(versions)
}

/// Accepts any certificate, but still checks the handshake's signatures with its key (libpq
/// without root certificates under `allow`, `prefer`, `require`).
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Checks the chain (and revocation) but not the name: `verify-ca`.
///
/// rustls's verifier checks the chain first and the name last, so a name error means that the
/// chain passed (a test below holds rustls to that order).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    pub(crate) fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/tls")
            .join(name)
    }

    fn given(path: impl Into<PathBuf>) -> SslFile {
        SslFile {
            path: path.into(),
            given: true,
        }
    }

    /// Settings with nothing configured: no roots, no client certificate.
    fn bare() -> SslConfig {
        SslConfig {
            root_cert: RootCert::Unset,
            crl: None,
            crl_dir: None,
            cert: None,
            key: None,
            send_client_cert: true,
            sni: true,
            min_protocol: Some(TlsVersion::V1_2),
            max_protocol: None,
        }
    }

    /// A copy of a fixture key with mode `mode` (git does not keep modes).
    fn key_copy(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::copy(fixture(name), &path).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .unwrap();
        path
    }

    #[test]
    fn what_each_sslmode_checks() {
        use SslMode::*;
        for (mode, roots, expected) in [
            (Allow, false, Verification::None),
            (Prefer, false, Verification::None),
            (Require, false, Verification::None),
            // libpq: a root certificate file makes the weak modes check the chain.
            (Allow, true, Verification::Chain),
            (Prefer, true, Verification::Chain),
            (Require, true, Verification::Chain),
            (VerifyCa, true, Verification::Chain),
            (VerifyFull, true, Verification::Full),
        ] {
            assert_eq!(
                Verification::for_mode(mode, roots),
                expected,
                "{mode} {roots}"
            );
        }
    }

    #[test]
    fn root_certificates_missing() {
        let absent = RootCert::File(given("/nonexistent/root.crt"));
        // Without verification a missing file is no error (libpq), with it one that says what
        // to do.
        assert!(load_roots(&absent, SslMode::Require).unwrap().is_none());
        assert!(
            load_roots(&RootCert::Unset, SslMode::Prefer)
                .unwrap()
                .is_none()
        );
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let err = load_roots(&absent, mode).unwrap_err();
            assert!(
                err.starts_with("root certificate file \"/nonexistent/root.crt\" does not exist"),
                "{err}"
            );
            assert!(err.contains(&format!("sslmode={mode}")), "{err}");
            assert!(err.contains("sslrootcert=system"), "{err}");
            let err = load_roots(&RootCert::Unset, mode).unwrap_err();
            assert!(err.contains("~/.postgresql/root.crt"), "{err}");
        }
    }

    #[test]
    fn root_certificates_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8], &str); 4] = [
            ("empty.crt", b"", "holds no PEM certificate"),
            (
                "der.crt",
                &[0x30, 0x82, 0x01, 0x0a, 0x02],
                "holds no PEM certificate",
            ),
            (
                "cut.crt",
                b"-----BEGIN CERTIFICATE-----\nMIIB\n",
                "is not valid PEM",
            ),
            (
                "junk.crt",
                b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                "is not valid PEM",
            ),
        ];
        for (name, content, needle) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            let err = load_roots(&RootCert::File(given(&path)), SslMode::Require).unwrap_err();
            assert!(
                err.contains(&format!("root certificate file \"{}\"", path.display())),
                "{err}"
            );
            assert!(err.contains(needle), "{name}: {err}");
        }
        // A directory is not a file.
        let err = load_roots(&RootCert::File(given(dir.path())), SslMode::VerifyCa).unwrap_err();
        assert!(err.contains("cannot read root certificate file"), "{err}");

        let (store, described) =
            load_roots(&RootCert::File(given(fixture("ca.crt"))), SslMode::VerifyCa)
                .unwrap()
                .unwrap();
        assert_eq!(store.len(), 1);
        assert!(
            described.ends_with("tests/data/tls/ca.crt\""),
            "{described}"
        );
    }

    #[test]
    fn client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_copy(dir.path(), "client.key", 0o600);
        let mut ssl = bare();
        ssl.cert = Some(given(fixture("client.crt")));
        ssl.key = Some(given(&key));
        let client = client_certificate(&ssl).unwrap().unwrap();
        assert_eq!(client.chain.len(), 1);
        TlsClient::new(&ssl, SslMode::Require, "localhost").unwrap();

        // sslcertmode=disable, or no certificate file: none (libpq).
        ssl.send_client_cert = false;
        assert!(client_certificate(&ssl).unwrap().is_none());
        ssl.send_client_cert = true;
        ssl.cert = Some(given("/nonexistent/client.crt"));
        assert!(client_certificate(&ssl).unwrap().is_none());

        // A certificate without its key.
        ssl.cert = Some(given(fixture("client.crt")));
        ssl.key = Some(given("/nonexistent/client.key"));
        let err = client_certificate(&ssl).err().unwrap();
        assert!(err.contains("client.crt\" is present, but its private key file \"/nonexistent/client.key\" cannot be read"), "{err}");
        ssl.key = None;
        let err = client_certificate(&ssl).err().unwrap();
        assert!(
            err.contains("no private key file is given (sslkey)"),
            "{err}"
        );

        // A key others can read.
        ssl.key = Some(given(key_copy(dir.path(), "server.key", 0o644)));
        let err = client_certificate(&ssl).err().unwrap();
        assert!(
            err.contains("has group or world access (mode 0644)"),
            "{err}"
        );

        // An encrypted key.
        ssl.key = Some(given(key_copy(dir.path(), "client-encrypted.key", 0o600)));
        let err = client_certificate(&ssl).err().unwrap();
        assert!(err.contains("client-encrypted.key\" is encrypted"), "{err}");

        // A certificate given as the key, and a key that is not the certificate's.
        let copy = dir.path().join("cert-as-key");
        std::fs::copy(fixture("client.crt"), &copy).unwrap();
        std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        ssl.key = Some(given(&copy));
        let err = client_certificate(&ssl).err().unwrap();
        assert!(
            err.contains("cert-as-key\" holds no PEM private key"),
            "{err}"
        );
        ssl.key = Some(given(key_copy(dir.path(), "server.key", 0o600)));
        let err = TlsClient::new(&ssl, SslMode::Require, "localhost").unwrap_err();
        assert!(
            err.starts_with("cannot use the client certificate"),
            "{err}"
        );
        assert!(err.contains("server.key"), "{err}");
    }

    #[test]
    fn crl_files_must_be_readable_when_named() {
        let mut ssl = bare();
        ssl.root_cert = RootCert::File(given(fixture("ca.crt")));
        ssl.crl = Some(SslFile {
            path: "/nonexistent/root.crl".into(),
            given: false,
        });
        TlsClient::new(&ssl, SslMode::VerifyCa, "localhost").unwrap();
        ssl.crl = Some(given("/nonexistent/root.crl"));
        let err = TlsClient::new(&ssl, SslMode::VerifyCa, "localhost").unwrap_err();
        assert!(
            err.contains("cannot read certificate revocation list file \"/nonexistent/root.crl\""),
            "{err}"
        );
        ssl.crl = Some(given(fixture("ca.crt")));
        let err = TlsClient::new(&ssl, SslMode::VerifyCa, "localhost").unwrap_err();
        assert!(err.contains("holds no PEM CRL"), "{err}");
        ssl.crl = None;
        ssl.crl_dir = Some("/nonexistent/crls".into());
        let err = TlsClient::new(&ssl, SslMode::VerifyCa, "localhost").unwrap_err();
        assert!(err.contains("CRL directory \"/nonexistent/crls\""), "{err}");
        // Without verification, CRLs are not read (libpq).
        ssl.root_cert = RootCert::Unset;
        TlsClient::new(&ssl, SslMode::Require, "localhost").unwrap();
    }

    #[test]
    fn protocol_versions_and_host_names() {
        let mut ssl = bare();
        assert_eq!(protocol_versions(&ssl).unwrap().len(), 2);
        ssl.min_protocol = Some(TlsVersion::V1_3);
        assert_eq!(
            protocol_versions(&ssl).unwrap(),
            vec![&rustls::version::TLS13]
        );
        ssl.min_protocol = None;
        ssl.max_protocol = Some(TlsVersion::V1_2);
        assert_eq!(
            protocol_versions(&ssl).unwrap(),
            vec![&rustls::version::TLS12]
        );
        ssl.max_protocol = Some(TlsVersion::V1_1);
        assert!(
            protocol_versions(&ssl)
                .unwrap_err()
                .contains("no TLS version")
        );

        // verify-full needs a name or address to check; the weaker modes do not.
        let mut ssl = bare();
        ssl.root_cert = RootCert::File(given(fixture("ca.crt")));
        let err = TlsClient::new(&ssl, SslMode::VerifyFull, "bad_host!").unwrap_err();
        assert!(
            err.contains("\"bad_host!\" is neither a valid DNS name"),
            "{err}"
        );
        let client = TlsClient::new(&ssl, SslMode::VerifyCa, "bad_host!").unwrap();
        assert_eq!(client.verification(), Verification::Chain);
        let client = TlsClient::new(&ssl, SslMode::VerifyFull, "::1").unwrap();
        assert_eq!(client.verification(), Verification::Full);
    }
}
