//! The daemon's side of the web console (`console` crate): its HTTPS listener and identity
//! (the configured certificate, or a self-signed one made once and kept in
//! `<state>/console/`), the first `admin` user on a unit that has none (its random password
//! written 0600 to `<state>/console/admin.password`, the path named in the log, never the
//! password), and the backend that answers the console's requests through the admin handler
//! in the console user's name, so they are authorised and audited as `console:NAME`.
//!
//! Not here: pages, sessions, roles (the `console` crate).

use crate::admin::Admin;
use crate::clustered::Settings;
use crate::config::Config;
use crate::metrics::Metrics;
use anyhow::{Context, Result};
use console::users::{self, User, Users};
use evidence::audit::Asker;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// The console's requests, answered by the admin handler.
pub struct DaemonBackend {
    admin: Arc<Admin>,
    users: watch::Receiver<Arc<Users>>,
    metrics: Arc<Metrics>,
    /// The daemon's own uid: the console's requests run with it.
    uid: u32,
    /// Where bulk exports for download are written.
    exports: PathBuf,
}

impl console::Backend for DaemonBackend {
    fn ask(
        &self,
        who: String,
        req: api::Request,
    ) -> impl Future<Output = Result<serde_json::Value, String>> + Send {
        let admin = self.admin.clone();
        let asker = Asker {
            uid: self.uid,
            user: who,
        };
        async move { admin.answer(req, asker).await }
    }

    fn users(&self) -> Arc<Users> {
        self.users.borrow().clone()
    }

    fn export_dir(&self) -> PathBuf {
        self.exports.clone()
    }

    fn counted(&self, event: &'static str) {
        self.metrics
            .console_events
            .with_label_values(&[event])
            .inc();
    }
}

fn console_dir(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("console")
}

/// Where the first admin's password is written.
pub fn admin_password_path(cfg: &Config) -> PathBuf {
    console_dir(cfg).join("admin.password")
}

/// Starts the console when `console.enabled`: binds, makes the first admin if there is no
/// user, serves.
pub async fn start(
    cfg: &Config,
    settings: &Arc<Settings>,
    admin: Arc<Admin>,
    users: watch::Receiver<Arc<Users>>,
    metrics: Arc<Metrics>,
) -> Result<()> {
    if !cfg.console.enabled {
        return Ok(());
    }
    let acceptor = acceptor(cfg)?;
    let listener = tokio::net::TcpListener::bind(cfg.console.listen)
        .await
        .with_context(|| format!("key `console.listen`: bind {}", cfg.console.listen))?;
    first_admin(cfg, settings)?;
    // Exports left by an earlier run had their download links in its memory: gone.
    let exports = console_dir(cfg).join("exports");
    let _ = std::fs::remove_dir_all(&exports);
    std::fs::create_dir_all(&exports)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            // They hold mail: the daemon's user only.
            std::fs::set_permissions(&exports, std::fs::Permissions::from_mode(0o700))
        })
        .with_context(|| format!("console: create {}", exports.display()))?;
    let backend = DaemonBackend {
        exports,
        admin,
        users,
        metrics,
        // SAFETY: getuid has no preconditions and cannot fail.
        uid: unsafe { libc::getuid() },
    };
    let console = Arc::new(console::Console::new(backend));
    tokio::spawn(async move {
        if let Err(e) = console::serve(listener, acceptor, console).await {
            tracing::error!("console: {e}");
        }
    });
    tracing::info!(listen = %cfg.console.listen, "console: serving HTTPS");
    Ok(())
}

/// With no user in the cluster's table: an `admin` with a random password, written to a file
/// only root and the daemon read. The file is written before the user exists, so a crash in
/// between leaves no user whose password nobody has (the next start makes them again).
fn first_admin(cfg: &Config, settings: &Arc<Settings>) -> Result<()> {
    if !settings
        .effective()
        .context("console: the clustered settings")?
        .console
        .users
        .is_empty()
    {
        return Ok(());
    }
    let password = users::random_password();
    let hash = users::hash_password(&password).map_err(anyhow::Error::msg)?;
    let path = admin_password_path(cfg);
    evidence::secret::write(
        &path,
        "console admin password",
        &format!("{password}\n"),
        false,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let table = Users::from([(
        "admin".to_string(),
        User {
            role: console::policy::Role::Admin,
            password: hash,
            addresses: Vec::new(),
        },
    )]);
    settings
        .set(
            "console.users",
            "cluster",
            Some(serde_json::to_value(&table).context("console users")?),
        )
        .context("console: add the first admin")?;
    tracing::warn!(
        path = %path.display(),
        "console: made user `admin` (role admin); its password is in this file (0600): \
         log in, then add your own users with spoolctl user add"
    );
    Ok(())
}

/// The TLS identity: the configured certificate, or a self-signed one kept in the state
/// directory (made once, so a browser's exception for it holds across restarts).
fn acceptor(cfg: &Config) -> Result<tokio_rustls::TlsAcceptor> {
    let (certs, key) = match (&cfg.console.tls_cert, &cfg.console.tls_key) {
        (Some(c), Some(k)) => crate::tls::pem_identity("console", c, k)?,
        _ => {
            let (c, k) = self_signed(&console_dir(cfg), &cfg.hostname)?;
            crate::tls::pem_identity("console", &c, &k)?
        }
    };
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("keys `console.tls_cert`/`console.tls_key`: certificate and key do not fit")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// `tls.crt` and `tls.key` in `dir`, made for `hostname`, `localhost` and 127.0.0.1 when absent.
fn self_signed(dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let names = vec![
        hostname.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    let made = rcgen::generate_simple_self_signed(names).context("console: make a certificate")?;
    evidence::secret::write(
        &key_path,
        "console TLS key",
        &made.key_pair.serialize_pem(),
        false,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(&cert_path, made.cert.pem())
        .with_context(|| format!("console: write {}", cert_path.display()))?;
    Ok((cert_path, key_path))
}
