//! TLS settings of the daemon: the STARTTLS server side (certificate and key from config) and
//! the delivery client side (verification by config, like Postfix's `smtp_tls_security_level`).

use crate::config::Config;
use anyhow::{Context, Result};
use std::sync::Arc;

/// A certificate chain and its key from the PEM files of `<section>.tls_cert` and
/// `<section>.tls_key`; errors name the key and the file.
pub fn pem_identity(
    section: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    let open = |name: &str, p: &std::path::Path| {
        std::fs::File::open(p)
            .map(std::io::BufReader::new)
            .with_context(|| format!("key `{section}.{name}`: open {}", p.display()))
    };
    let certs = rustls_pemfile::certs(&mut open("tls_cert", cert)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("key `{section}.tls_cert`: parse {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "key `{section}.tls_cert`: no certificate in {}",
            cert.display()
        );
    }
    let key = rustls_pemfile::private_key(&mut open("tls_key", key)?)
        .with_context(|| format!("key `{section}.tls_key`: parse {}", key.display()))?
        .with_context(|| {
            format!(
                "key `{section}.tls_key`: no private key in {}",
                key.display()
            )
        })?;
    Ok((certs, key))
}

/// The STARTTLS acceptor, when `smtp.tls_cert` and `smtp.tls_key` are set.
pub fn server(cfg: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>> {
    let (Some(cert_path), Some(key_path)) = (&cfg.smtp.tls_cert, &cfg.smtp.tls_key) else {
        return Ok(None);
    };
    let (certs, key) = pem_identity("smtp", cert_path, key_path)?;
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("keys `smtp.tls_cert`/`smtp.tls_key`: certificate and key do not fit")?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))))
}

/// The delivery client's TLS configuration.
pub fn client(cfg: &Config) -> Result<Arc<rustls::ClientConfig>> {
    let d = &cfg.delivery;
    let builder = rustls::ClientConfig::builder();
    // Without verification (Postfix's `may`/`encrypt` levels) TLS still encrypts against passive
    // listeners and checks the handshake's signatures; it trusts any certificate.
    let config = if !d.tls_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(hasync::link::AnyCertificate(provider())))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &d.tls_ca_file {
            Some(path) => {
                let mut r =
                    std::io::BufReader::new(std::fs::File::open(path).with_context(|| {
                        format!("key `delivery.tls_ca_file`: open {}", path.display())
                    })?);
                for c in rustls_pemfile::certs(&mut r) {
                    roots
                        .add(c.with_context(|| {
                            format!("key `delivery.tls_ca_file`: parse {}", path.display())
                        })?)
                        .with_context(|| {
                            format!("key `delivery.tls_ca_file`: {}", path.display())
                        })?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}
