//! Configuration: an embedded default, an optional TOML file, and command-line overrides.
//! Every error names the file, the key and what is wrong.

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration, as read from TOML (every key optional).
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's name in message ids and envelopes: 1-32 of `[a-z0-9_]`.
    pub node_name: String,
    /// Host name used in the SMTP greeting and `Received:` headers.
    pub hostname: String,
    /// The state directory (its folders: ARCHITECTURE.md, "A node's state directory").
    pub state_dir: PathBuf,
    /// SMTP ingress.
    pub smtp: SmtpConfig,
    /// Metrics and health endpoints.
    pub http: HttpConfig,
    /// The durable spool.
    pub spool: SpoolConfig,
    /// Delivery to next hops.
    pub delivery: DeliveryConfig,
    /// The vscan stage.
    pub filter: FilterConfig,
    /// HA pair replication; absent: a standalone node (always active).
    pub ha: Option<HaConfig>,
    /// The message archive and its mirrors.
    pub archive: ArchiveConfig,
    /// The cluster link (membership beyond the pair); absent: clustered settings are shared
    /// with the HA partner only.
    pub cluster: Option<ClusterLinkConfig>,
    /// The web console.
    pub console: ConsoleConfig,
}

/// `[console]`: the web console (HTTPS), and its users (clustered: `console.users`).
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Serve the console.
    pub enabled: bool,
    /// Its HTTPS listen address (default loopback only: expose it on purpose).
    pub listen: SocketAddr,
    /// PEM certificate chain; without it a self-signed certificate is made once and kept in
    /// `<state>/console/`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The users, by name (set with `spoolctl user`; argon2id hashes, never passwords).
    pub users: console::users::Users,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9443)),
            tls_cert: None,
            tls_key: None,
            users: Default::default(),
        }
    }
}

/// `[cluster]`: where other cluster members reach this unit, and the secret they prove.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ClusterLinkConfig {
    /// The cluster link's listen address, `ip:port`.
    pub listen: SocketAddr,
    /// The address members are told to reach this unit at (default: `listen`; set it when
    /// `listen` is a wildcard address).
    pub advertise: Option<SocketAddr>,
    /// File holding the cluster's shared secret (preferred over `secret`).
    pub secret_file: Option<PathBuf>,
    /// The cluster's shared secret itself.
    pub secret: Option<String>,
}

impl ClusterLinkConfig {
    /// The cluster's shared secret.
    pub fn load_secret(&self) -> Result<Vec<u8>> {
        load_secret(
            "cluster",
            self.secret_file.as_deref(),
            self.secret.as_deref(),
        )
    }

    /// Where members reach this unit.
    pub fn advertised(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.listen)
    }
}

/// `[archive]`.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Archive every accepted message (default true).
    pub enabled: bool,
    /// Where (default: `archive/` in the state directory).
    pub dir: Option<PathBuf>,
    /// Remove items accepted more than this many days ago, unless on hold (0: keep for ever).
    pub retention_days: u64,
    /// Stop writing (and hold delivery back) with less free space than this.
    pub free_bytes_min: u64,
    /// Archive messages the scanner found infected.
    pub archive_quarantined: bool,
    /// Seal a segment file past this size.
    pub segment_bytes_max: u64,
    /// Accept mirrored items from peers here (peer link, TLS and the shared secret).
    pub listen: Option<SocketAddr>,
    /// File holding the shared secret of the listener (and of mirrors that set none).
    pub secret_file: Option<PathBuf>,
    /// The shared secret itself.
    pub secret: Option<String>,
    /// Peers every local item is copied to.
    pub mirror: Vec<MirrorConfig>,
    /// With an object store: local bytes of sealed segments kept as a read cache.
    pub cache_bytes: u64,
    /// With an object store: seal the open segment once it has held mail this long (0: only
    /// by size), so the store lags this unit by minutes.
    pub seal_secs: u64,
    /// Sealed segments go to this S3-compatible object store.
    pub object_store: Option<ObjectStoreToml>,
    /// The key that signs the archive's checkpoints (made at first start, 0600; default
    /// `keys/archive-signing.key` in the state directory, outside the archive's directory so a
    /// copy of the archive carries no secret).
    pub signing_key_file: Option<PathBuf>,
    /// Encrypt the archive's records at rest (default true): bodies and chain entries sealed
    /// with XChaCha20-Poly1305 under the keyring's current key. Off, a keyring found is still
    /// used to read what was sealed.
    pub encryption: bool,
    /// The archive's keyring (data keys and the dedup secret; made at first start, 0600;
    /// default `keys/archive.keyring` in the state directory). The environment variable
    /// `SPOOLD_ARCHIVE_KEYRING`, holding the keyring's text, takes its place. Without it the
    /// archive cannot be read: keep a copy apart from the unit.
    pub keyring_file: Option<PathBuf>,
    /// Journal addresses: mail to them (from trusted clients only) is archived and not
    /// delivered; an Exchange envelope journal report is archived as its original, with the
    /// report's recipients (Bcc included) as its envelope.
    pub journal_recipients: Vec<String>,
    /// Sign a checkpoint of the archive's hash chain once this many entries are unsigned ...
    pub checkpoint_entries: u64,
    /// ... or once an entry has waited this many seconds for one.
    pub checkpoint_secs: u64,
    /// Where the audit log (who searched, read, exported, held what) is kept (default: the
    /// archive's directory). A request it cannot record is refused.
    pub audit_dir: Option<PathBuf>,
}

/// `[archive.object_store]`. The secret key comes from a file or the environment, never from
/// this file, and is never logged.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreToml {
    /// `http(s)://host:port` of the S3 API, or a list of them (one per node of the store; a
    /// node that does not answer is skipped).
    pub endpoint: Endpoints,
    /// The bucket.
    pub bucket: String,
    /// The region (default `us-east-1`; Garage's default is `garage`).
    #[serde(default = "default_region")]
    pub region: String,
    /// Key prefix (two units may share a bucket with different prefixes).
    #[serde(default)]
    pub prefix: String,
    /// Access key id (default: `AWS_ACCESS_KEY_ID` from the environment).
    pub access_key_id: Option<String>,
    /// File holding the secret access key (default: `AWS_SECRET_ACCESS_KEY` from the
    /// environment).
    pub secret_access_key_file: Option<PathBuf>,
    /// The id of a lost unit's archive to take over (32 hex digits, from the manifest
    /// `<prefix>/archive.json`): a unit with an empty archive adopts the prefix and rebuilds
    /// its catalog from the store. Without it, a prefix of another archive refuses the start.
    #[serde(default)]
    pub adopt: Option<String>,
}

/// One endpoint, or several.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(untagged)]
pub enum Endpoints {
    /// `endpoint = "http://..."`.
    One(String),
    /// `endpoint = ["http://...", "http://..."]`.
    Many(Vec<String>),
}

impl Endpoints {
    /// Every endpoint, in the order given.
    pub fn list(&self) -> Vec<String> {
        match self {
            Endpoints::One(e) => vec![e.clone()],
            Endpoints::Many(v) => v.clone(),
        }
    }
}

fn default_region() -> String {
    "us-east-1".into()
}

impl ObjectStoreToml {
    /// The store's settings with the credentials read from their file or the environment.
    pub fn resolve(&self) -> Result<archive::ObjectStoreConfig> {
        let key = "archive.object_store";
        let access_key_id = match &self.access_key_id {
            Some(id) => id.clone(),
            None => std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| {
                anyhow::anyhow!(
                    "key `{key}.access_key_id`: not set, and AWS_ACCESS_KEY_ID is not in the environment"
                )
            })?,
        };
        let secret_access_key = match &self.secret_access_key_file {
            Some(path) => String::from_utf8(
                std::fs::read(path)
                    .with_context(|| {
                        format!("key `{key}.secret_access_key_file`: read {}", path.display())
                    })?
                    .trim_ascii()
                    .to_vec(),
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "key `{key}.secret_access_key_file`: {} is not UTF-8",
                    path.display()
                )
            })?,
            None => std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| {
                anyhow::anyhow!(
                    "key `{key}.secret_access_key_file`: not set, and AWS_SECRET_ACCESS_KEY is not in the environment"
                )
            })?,
        };
        if access_key_id.is_empty() || secret_access_key.is_empty() {
            bail!("key `{key}`: empty access key id or secret access key");
        }
        Ok(archive::ObjectStoreConfig {
            endpoints: self.endpoint.list(),
            bucket: self.bucket.clone(),
            region: self.region.clone(),
            prefix: self.prefix.clone(),
            access_key_id,
            secret_access_key,
        })
    }
}

/// `[[archive.mirror]]`.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// The peer's `archive.listen` address.
    pub peer: SocketAddr,
    /// File holding the secret that peer expects (default: `archive.secret_file`).
    pub secret_file: Option<PathBuf>,
    /// The secret itself.
    pub secret: Option<String>,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            enabled: true,
            dir: None,
            retention_days: 0,
            free_bytes_min: 256 * 1024 * 1024,
            archive_quarantined: true,
            segment_bytes_max: 256 * 1024 * 1024,
            listen: None,
            secret_file: None,
            secret: None,
            mirror: Vec::new(),
            cache_bytes: 1 << 30,
            seal_secs: 300,
            object_store: None,
            signing_key_file: None,
            encryption: true,
            keyring_file: None,
            journal_recipients: Vec::new(),
            checkpoint_entries: 1000,
            checkpoint_secs: 60,
            audit_dir: None,
        }
    }
}

impl ArchiveConfig {
    /// The archive's directory.
    pub fn dir(&self, state_dir: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| state_dir.join("archive"))
    }

    /// The file of the key that signs the archive's checkpoints.
    pub fn signing_key_file(&self, state_dir: &Path) -> PathBuf {
        self.signing_key_file
            .clone()
            .unwrap_or_else(|| state_dir.join("keys").join("archive-signing.key"))
    }

    /// The journal addresses, lower case (none when the archive is off: nothing could take them).
    pub fn journal(&self) -> Vec<String> {
        if !self.enabled {
            return Vec::new();
        }
        self.journal_recipients
            .iter()
            .map(|r| r.to_ascii_lowercase())
            .collect()
    }

    /// The file of the archive's keyring.
    pub fn keyring_file(&self, state_dir: &Path) -> PathBuf {
        self.keyring_file
            .clone()
            .unwrap_or_else(|| state_dir.join("keys").join("archive.keyring"))
    }

    /// The listener's shared secret.
    pub fn load_secret(&self) -> Result<Vec<u8>> {
        load_secret(
            "archive",
            self.secret_file.as_deref(),
            self.secret.as_deref(),
        )
    }
}

impl MirrorConfig {
    /// The secret this peer expects: its own, else the archive's.
    pub fn load_secret(&self, archive: &ArchiveConfig) -> Result<Vec<u8>> {
        if self.secret_file.is_some() || self.secret.is_some() {
            load_secret(
                "archive.mirror",
                self.secret_file.as_deref(),
                self.secret.as_deref(),
            )
        } else {
            archive.load_secret()
        }
    }
}

/// A shared secret from `<prefix>.secret_file` or `<prefix>.secret`, at least 16 bytes.
fn load_secret(prefix: &str, file: Option<&Path>, secret: Option<&str>) -> Result<Vec<u8>> {
    let s = match (file, secret) {
        (Some(path), None) => std::fs::read(path)
            .with_context(|| format!("key `{prefix}.secret_file`: read {}", path.display()))?
            .trim_ascii()
            .to_vec(),
        (None, Some(s)) => s.as_bytes().to_vec(),
        _ => bail!("keys `{prefix}.secret_file` and `{prefix}.secret`: set exactly one"),
    };
    if s.len() < 16 {
        bail!("key `{prefix}.secret`: the shared secret must be at least 16 bytes");
    }
    Ok(s)
}

/// `[ha]`.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// The partner's peer-link address, `ip:port`.
    pub partner: SocketAddr,
    /// Our peer-link listen address.
    pub listen: SocketAddr,
    /// File holding the shared secret (preferred over `secret`).
    pub secret_file: Option<PathBuf>,
    /// The shared secret itself.
    pub secret: Option<String>,
    /// Split-brain priority: with both units active, the lower one holds delivery.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Role on the very first start; afterwards the persisted role wins.
    #[serde(default = "default_role")]
    pub role: String,
    /// PEM certificate for the peer link (self-signed is fine; unset: one is made at start,
    /// since the shared secret is what authenticates).
    pub tls_cert: Option<PathBuf>,
    /// PEM key for the peer link.
    pub tls_key: Option<PathBuf>,
    /// Actions in flight without acknowledgement.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Pending actions beyond which new mail is refused (`451`), never dropped.
    #[serde(default = "default_pending_max")]
    pub pending_max: u64,
    /// Bytes of just-spooled messages held in memory for the sender (0: always read the files).
    #[serde(default = "default_outbox_bytes")]
    pub outbox_bytes: usize,
    /// How long delivered ids stay in the ledger, seconds.
    #[serde(default = "default_ledger_secs")]
    pub ledger_retention_secs: u64,
    /// `async`: 250 after the local commit; `sync`: 250 only once the partner acknowledged.
    #[serde(default = "default_replication")]
    pub replication: String,
    /// In sync mode, how long to wait for the partner's acknowledgement, ms.
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout_ms: u64,
    /// In sync mode, with the partner down or late: `accept` (fall back to async, counted) or
    /// `reject` (withdraw the message and answer 451).
    #[serde(default = "default_sync_partner_down")]
    pub sync_partner_down: String,
    /// Set by `spoold --role`: `role` wins over the persisted one.
    #[serde(skip)]
    pub role_forced: bool,
}

fn default_replication() -> String {
    "async".into()
}
fn default_sync_timeout() -> u64 {
    5000
}
fn default_sync_partner_down() -> String {
    "accept".into()
}

fn default_priority() -> u32 {
    100
}
fn default_role() -> String {
    "passive".into()
}
fn default_window() -> usize {
    256
}
fn default_pending_max() -> u64 {
    1_000_000
}
fn default_outbox_bytes() -> usize {
    hasync::outbox::OUTBOX_BYTES_DEFAULT
}
fn default_ledger_secs() -> u64 {
    7 * 24 * 3600
}

impl Config {
    /// Reads every shared secret the configuration names (HA, cluster, archive mirror), so a
    /// missing or short one fails the start (and `--check-config`) naming its key.
    pub fn check_secrets(&self) -> Result<()> {
        if let Some(ha) = &self.ha {
            ha.load_secret()?;
        }
        if let Some(c) = &self.cluster {
            c.load_secret()?;
        }
        let a = &self.archive;
        if a.enabled {
            if a.listen.is_some() {
                a.load_secret()?;
            }
            for m in &a.mirror {
                m.load_secret(a)?;
            }
        }
        Ok(())
    }
}

/// A configuration error found only once the daemon looks outside its file (an object store
/// that refuses the configured key): the start stops with exit 78 like any bad configuration.
#[derive(Debug)]
pub struct Misconfigured(pub String);

impl std::fmt::Display for Misconfigured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Misconfigured {}

impl HaConfig {
    /// The shared secret, from `secret_file` or `secret`.
    pub fn load_secret(&self) -> Result<Vec<u8>> {
        load_secret("ha", self.secret_file.as_deref(), self.secret.as_deref())
    }
}

/// STARTTLS toward a next hop (like Postfix's `smtp_tls_security_level`).
#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum TlsSetting {
    /// Never.
    None,
    /// When offered.
    May,
    /// Required; delivery waits if the next hop cannot do it.
    Encrypt,
}

/// One `[[delivery.routes]]` entry.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// `example.org` (exactly) or `*.example.org` (any subdomain).
    pub domain: String,
    /// `host:port`.
    pub next_hop: String,
    /// Overrides `delivery.tls` for this route.
    pub tls: Option<TlsSetting>,
}

/// `[delivery]`.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Deliver at all (false: mail stays queued).
    pub enabled: bool,
    /// Messages in delivery at once.
    pub concurrency_max: usize,
    /// Connections to one next hop at once.
    pub per_destination_max: usize,
    /// `host:port` for domains no route matches (a smarthost); unset: such mail waits.
    pub default_next_hop: Option<String>,
    /// Routes by recipient domain.
    pub routes: Vec<Route>,
    /// Delays between attempts, seconds; the last one repeats.
    pub retry_schedule_secs: Vec<u64>,
    /// Age after which undelivered mail is bounced, seconds.
    pub queue_lifetime_secs: u64,
    /// Connect and greeting timeout, seconds.
    pub connect_timeout_secs: u64,
    /// Per-command reply timeout, seconds.
    pub command_timeout_secs: u64,
    /// Body transfer and final reply timeout, seconds.
    pub data_timeout_secs: u64,
    /// STARTTLS policy.
    pub tls: TlsSetting,
    /// Verify next hops' certificates (against `tls_ca_file`, else the system's roots).
    pub tls_verify: bool,
    /// PEM CA bundle for verification.
    pub tls_ca_file: Option<PathBuf>,
}

/// `[filter]`.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// clamd address, `unix:/path` or `tcp:host:port`; unset: no scanning (mail is marked
    /// unscanned).
    pub clamd: Option<String>,
    /// Scan timeout, seconds.
    pub timeout_secs: u64,
    /// Deliver unscanned when the scanner gives no verdict (default: hold in vscan/ and retry).
    pub fail_open: bool,
    /// Delay before scanning again after a scanner failure, seconds.
    pub retry_secs: u64,
    /// Tell the sender (unless `<>`) that the message was quarantined.
    pub notify_sender: bool,
    /// The milter chain before the `250`, in this order (`[[filter.milter]]`).
    pub milter: Vec<MilterConfig>,
}

/// One `[[filter.milter]]`.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct MilterConfig {
    /// Its name in logs, metrics and tracking.
    pub name: String,
    /// `unix:/path` or `inet:host:port`.
    pub socket: String,
    /// Connecting and negotiating, seconds.
    #[serde(default = "milter_connect_secs")]
    pub connect_timeout_secs: u64,
    /// Each reply before the end of the message, seconds.
    #[serde(default = "milter_command_secs")]
    pub command_timeout_secs: u64,
    /// The reply to the end of the message, seconds.
    #[serde(default = "milter_end_secs")]
    pub end_timeout_secs: u64,
    /// `tempfail` (default), `accept` (fail-open) or `reject`: when it is down or late.
    #[serde(default = "milter_default_action")]
    pub default_action: String,
    /// `all` (default), `trusted` (signing outgoing mail) or `untrusted` (scoring).
    #[serde(default = "milter_clients")]
    pub clients: String,
    /// A command (program and arguments, no shell) run with the message on its standard
    /// input when a recipient releases mail this milter quarantined, to teach the scorer:
    /// `["rspamc", "learn_ham"]`. Empty: none.
    #[serde(default)]
    pub learn_on_release: Vec<String>,
}

fn milter_connect_secs() -> u64 {
    5
}
fn milter_command_secs() -> u64 {
    10
}
fn milter_end_secs() -> u64 {
    30
}
fn milter_default_action() -> String {
    "tempfail".into()
}
fn milter_clients() -> String {
    "all".into()
}

impl MilterConfig {
    /// The chain's view of it, or what is wrong (the key named).
    pub fn spec(&self) -> Result<filter::chain::MilterSpec> {
        use filter::chain::{Clients, OnFailure};
        let key = |k: &str| format!("key `filter.milter.{k}` (milter {:?})", self.name);
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!(
                "{}: letters, digits, '-', '_' and '.' only, not empty",
                key("name")
            );
        }
        let address = self
            .socket
            .parse()
            .map_err(|e: String| anyhow::anyhow!("{}: {e}", key("socket")))?;
        let on_failure = match self.default_action.as_str() {
            "tempfail" => OnFailure::Tempfail,
            "accept" => OnFailure::Accept,
            "reject" => OnFailure::Reject,
            other => bail!(
                "{}: {other:?} must be \"tempfail\", \"accept\" or \"reject\"",
                key("default_action")
            ),
        };
        let clients = match self.clients.as_str() {
            "all" => Clients::All,
            "trusted" => Clients::Trusted,
            "untrusted" => Clients::Untrusted,
            other => bail!(
                "{}: {other:?} must be \"all\", \"trusted\" or \"untrusted\"",
                key("clients")
            ),
        };
        for (k, v) in [
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("command_timeout_secs", self.command_timeout_secs),
            ("end_timeout_secs", self.end_timeout_secs),
        ] {
            if v == 0 {
                bail!("{}: must be greater than 0", key(k));
            }
        }
        Ok(filter::chain::MilterSpec {
            name: self.name.clone(),
            address,
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            command_timeout: Duration::from_secs(self.command_timeout_secs),
            end_timeout: Duration::from_secs(self.end_timeout_secs),
            on_failure,
            clients,
        })
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            enabled: true,
            concurrency_max: 20,
            per_destination_max: 5,
            default_next_hop: None,
            routes: Vec::new(),
            retry_schedule_secs: vec![60, 300, 900, 1800, 3600, 7200, 14400],
            queue_lifetime_secs: 5 * 24 * 3600,
            connect_timeout_secs: 30,
            command_timeout_secs: 300,
            data_timeout_secs: 600,
            tls: TlsSetting::May,
            tls_verify: false,
            tls_ca_file: None,
        }
    }
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            clamd: None,
            timeout_secs: 60,
            fail_open: false,
            retry_secs: 30,
            notify_sender: false,
            milter: Vec::new(),
        }
    }
}

/// `[smtp]`.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Largest message in bytes.
    pub message_bytes_max: u64,
    /// Recipients per message.
    pub recipients_max: usize,
    /// Longest command line, CRLF included.
    pub line_bytes_max: usize,
    /// Idle timeout per session, seconds.
    pub idle_timeout_secs: u64,
    /// Concurrent sessions; more are answered `421 4.7.0`.
    pub sessions_max: usize,
    /// Domains accepted from anyone (`.example.org` also matches subdomains).
    pub relay_domains: Vec<String>,
    /// Client networks allowed to relay to any domain.
    pub trusted_networks: Vec<IpNet>,
    /// Accept sender-specified routing (`user%other@relay`, `other!user@relay`,
    /// `"user@other"@relay`, source routes) to relay domains from untrusted clients.
    pub allow_untrusted_routing: bool,
    /// PEM certificate chain for STARTTLS (with `tls_key`); STARTTLS is off without it.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for STARTTLS.
    pub tls_key: Option<PathBuf>,
}

/// `[http]`.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address for `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
}

/// `[spool]`.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Use io_uring when the kernel allows it (false: always the portable writer).
    pub io_uring: bool,
    /// Largest number of messages per commit round.
    pub batch_max: usize,
    /// A body larger than this streams to `tmp/` while it arrives.
    pub spill_bytes: usize,
    /// Refuse new mail (`452 4.3.1`) while the file system has less free space than this.
    pub free_bytes_min: u64,
    /// How a commit round makes files durable: `fsync` each file (safe anywhere), one
    /// `syncfs` per round (fastest; for a file system dedicated to the spool), or `auto`
    /// (default): `syncfs` when the state directory is the root of its own file system.
    pub sync: SyncSetting,
    /// Write new files nameless (`O_TMPFILE`) and link them into `spool/` where the file
    /// system allows it (false: named files in `tmp/`, renamed).
    pub nameless_files: bool,
    /// Files of removed messages kept in `tmp/` for reuse (0: unlink them).
    pub recycle_files: usize,
}

/// `spool.sync`.
#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncSetting {
    /// `syncfs` on a file system mounted at the state directory, else `fsync`.
    Auto,
    /// fsync every file.
    Fsync,
    /// One syncfs(2) per round.
    Syncfs,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: "node1".into(),
            hostname: system_hostname().unwrap_or_else(|| "localhost".into()),
            state_dir: PathBuf::from("./var/spoold"),
            smtp: SmtpConfig::default(),
            http: HttpConfig::default(),
            spool: SpoolConfig::default(),
            delivery: DeliveryConfig::default(),
            filter: FilterConfig::default(),
            ha: None,
            archive: ArchiveConfig::default(),
            cluster: None,
            console: ConsoleConfig::default(),
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 2525)),
            message_bytes_max: 25 * 1024 * 1024,
            recipients_max: 100,
            line_bytes_max: 512,
            idle_timeout_secs: 300,
            sessions_max: 500,
            relay_domains: Vec::new(),
            trusted_networks: smtp::RelayPolicy::default().trusted_networks,
            allow_untrusted_routing: false,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9425)),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            io_uring: true,
            batch_max: spool::writer::BATCH_MAX_DEFAULT,
            spill_bytes: spool::body::SPILL_BYTES_DEFAULT,
            free_bytes_min: 100 * 1024 * 1024,
            sync: SyncSetting::Auto,
            nameless_files: true,
            recycle_files: 1024,
        }
    }
}

fn system_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl Config {
    /// Reads `path`, failing with the file, the key and the problem.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        let cfg: Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "config file {}: {}",
                path.display(),
                e.to_string().trim_end()
            )
        })?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Checks values that TOML types cannot; the message names the key.
    pub fn validate(&self) -> Result<()> {
        if spool::id::validate_node_name(&self.node_name).is_err() {
            bail!(
                "key `node_name`: {:?} must be 1 to 32 characters of a-z, 0-9 and _",
                self.node_name
            );
        }
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            bail!("key `hostname`: {:?} is not a host name", self.hostname);
        }
        let s = &self.smtp;
        if s.message_bytes_max == 0 {
            bail!("key `smtp.message_bytes_max`: must be greater than 0");
        }
        if !(1..=10_000).contains(&s.recipients_max) {
            bail!(
                "key `smtp.recipients_max`: {} is outside 1..=10000",
                s.recipients_max
            );
        }
        if !(512..=65_536).contains(&s.line_bytes_max) {
            bail!(
                "key `smtp.line_bytes_max`: {} is outside 512..=65536 (RFC 5321 needs 512)",
                s.line_bytes_max
            );
        }
        if s.idle_timeout_secs == 0 {
            bail!("key `smtp.idle_timeout_secs`: must be greater than 0");
        }
        if s.sessions_max == 0 {
            bail!("key `smtp.sessions_max`: must be greater than 0");
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            bail!("keys `smtp.tls_cert` and `smtp.tls_key`: set both or neither");
        }
        let c = &self.console;
        if c.tls_cert.is_some() != c.tls_key.is_some() {
            bail!("keys `console.tls_cert` and `console.tls_key`: set both or neither");
        }
        console::users::check(&c.users).map_err(|e| anyhow::anyhow!("key `console.users`: {e}"))?;
        for d in &s.relay_domains {
            let bare = d.strip_prefix('.').unwrap_or(d);
            if bare.is_empty() || bare.contains(['@', ' ', '/']) {
                bail!("key `smtp.relay_domains`: {d:?} is not a domain");
            }
        }
        if !(1..=1024).contains(&self.spool.batch_max) {
            bail!(
                "key `spool.batch_max`: {} is outside 1..=1024",
                self.spool.batch_max
            );
        }
        let d = &self.delivery;
        if d.concurrency_max == 0 || d.per_destination_max == 0 {
            bail!("keys `delivery.concurrency_max` and `delivery.per_destination_max`: must be greater than 0");
        }
        if d.retry_schedule_secs.is_empty() || d.retry_schedule_secs.contains(&0) {
            bail!("key `delivery.retry_schedule_secs`: needs at least one delay, none of them 0");
        }
        if d.queue_lifetime_secs == 0 {
            bail!("key `delivery.queue_lifetime_secs`: must be greater than 0");
        }
        if let Some(hop) = &d.default_next_hop {
            check_next_hop("delivery.default_next_hop", hop)?;
        }
        for r in &d.routes {
            let bare = r.domain.strip_prefix("*.").unwrap_or(&r.domain);
            if bare.is_empty() || bare.contains(['@', ' ', '/', '*']) {
                bail!(
                    "key `delivery.routes.domain`: {:?} is not a domain or *.domain",
                    r.domain
                );
            }
            check_next_hop("delivery.routes.next_hop", &r.next_hop)?;
        }
        if self.filter.retry_secs == 0 {
            bail!("key `filter.retry_secs`: must be greater than 0");
        }
        if let Some(c) = &self.filter.clamd {
            c.parse::<filter::ClamdAddress>()
                .map_err(|e| anyhow::anyhow!("key `filter.clamd`: {e}"))?;
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.filter.milter {
            m.spec()?;
            if !names.insert(m.name.as_str()) {
                bail!("key `filter.milter.name`: {:?} is used twice", m.name);
            }
        }
        if let Some(ha) = &self.ha {
            if ha.secret_file.is_some() == ha.secret.is_some() {
                bail!("keys `ha.secret_file` and `ha.secret`: set exactly one");
            }
            if ha.tls_cert.is_some() != ha.tls_key.is_some() {
                bail!("keys `ha.tls_cert` and `ha.tls_key`: set both or neither");
            }
            if hasync::proto::Role::parse(&ha.role).is_none() {
                bail!(
                    "key `ha.role`: {:?} must be \"active\" or \"passive\"",
                    ha.role
                );
            }
            if !matches!(ha.replication.as_str(), "async" | "sync") {
                bail!(
                    "key `ha.replication`: {:?} must be \"async\" or \"sync\"",
                    ha.replication
                );
            }
            if !matches!(ha.sync_partner_down.as_str(), "accept" | "reject") {
                bail!(
                    "key `ha.sync_partner_down`: {:?} must be \"accept\" or \"reject\"",
                    ha.sync_partner_down
                );
            }
            if !(1..=4096).contains(&ha.window) {
                bail!("key `ha.window`: {} is outside 1..=4096", ha.window);
            }
            if ha.outbox_bytes > 1 << 30 {
                bail!(
                    "key `ha.outbox_bytes`: {} is more than 1 GiB of memory",
                    ha.outbox_bytes
                );
            }
        }
        if let Some(c) = &self.cluster {
            if c.secret_file.is_some() == c.secret.is_some() {
                bail!("keys `cluster.secret_file` and `cluster.secret`: set exactly one (the cluster's shared secret)");
            }
            if c.advertised().ip().is_unspecified() {
                bail!(
                    "key `cluster.advertise`: members cannot reach {}; set the address they can",
                    c.advertised()
                );
            }
        }
        let a = &self.archive;
        if a.checkpoint_entries == 0 {
            bail!("key `archive.checkpoint_entries`: 0; a checkpoint needs at least one entry to sign");
        }
        if a.checkpoint_secs == 0 {
            bail!("key `archive.checkpoint_secs`: 0; give the seconds an entry may wait for its checkpoint");
        }
        if a.segment_bytes_max < 1 << 20 {
            bail!(
                "key `archive.segment_bytes_max`: {} is below 1 MiB",
                a.segment_bytes_max
            );
        }
        if (a.listen.is_some() || !a.mirror.is_empty()) && a.enabled {
            let needs_own = a.listen.is_some()
                || a.mirror
                    .iter()
                    .any(|m| m.secret_file.is_none() && m.secret.is_none());
            if needs_own && a.secret_file.is_some() == a.secret.is_some() {
                bail!("keys `archive.secret_file` and `archive.secret`: set exactly one (the archive mirror's shared secret)");
            }
            for m in &a.mirror {
                if m.secret_file.is_some() && m.secret.is_some() {
                    bail!("keys `archive.mirror.secret_file` and `archive.mirror.secret`: set at most one");
                }
            }
        }
        if let Some(o) = &a.object_store {
            let endpoints = o.endpoint.list();
            if endpoints.is_empty() {
                bail!("key `archive.object_store.endpoint`: an empty list");
            }
            for e in endpoints {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    bail!(
                        "key `archive.object_store.endpoint`: {e:?} is not an http:// or https:// address"
                    );
                }
            }
            if o.bucket.is_empty() {
                bail!("key `archive.object_store.bucket`: empty");
            }
            if let Some(id) = &o.adopt {
                if archive::ArchiveId::parse(id).is_none() {
                    bail!("key `archive.object_store.adopt`: {id:?} is not an archive id (32 hex digits)");
                }
            }
            if a.enabled {
                o.resolve()?;
            }
        }
        if self.spool.spill_bytes < 4096 {
            bail!(
                "key `spool.spill_bytes`: {} is below 4096",
                self.spool.spill_bytes
            );
        }
        Ok(())
    }

    /// Delivery client timeouts.
    pub fn delivery_timeouts(&self) -> (Duration, Duration, Duration) {
        let d = &self.delivery;
        (
            Duration::from_secs(d.connect_timeout_secs),
            Duration::from_secs(d.command_timeout_secs),
            Duration::from_secs(d.data_timeout_secs),
        )
    }

    /// The session idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.smtp.idle_timeout_secs)
    }
}

/// A next hop is `host:port` with a numeric port.
fn check_next_hop(key: &str, hop: &str) -> Result<()> {
    match hop.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => bail!("key `{key}`: {hop:?} is not host:port"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spoold.toml");
        std::fs::write(&path, text).unwrap();
        Config::from_file(&path)
    }

    #[test]
    fn defaults_are_safe() {
        let c = Config::default();
        c.validate().unwrap();
        assert!(c.smtp.relay_domains.is_empty());
        assert_eq!(c.smtp.listen.to_string(), "127.0.0.1:2525");
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:9425");
        assert_eq!(c.state_dir, PathBuf::from("./var/spoold"));
    }

    #[test]
    fn sample_config_parses() {
        let text = include_str!("../../systemd/spoold.toml");
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let e = load("node_name = \"Bad Name\"\n").unwrap_err().to_string();
        assert!(e.contains("spoold.toml") && e.contains("node_name"), "{e}");
        let e = load("[smtp]\nlisten = \"not an address\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("spoold.toml") && e.contains("listen"), "{e}");
        let e = load("[smtp]\nrecipents_max = 5\n").unwrap_err().to_string();
        assert!(
            e.contains("unknown field") && e.contains("recipents_max"),
            "{e}"
        );
        let e = load("[smtp]\ntrusted_networks = [\"10.0.0.0/33\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("trusted_networks"), "{e}");
        let e = load("[smtp]\ntls_cert = \"/x\"\n").unwrap_err().to_string();
        assert!(e.contains("tls_key"), "{e}");
        let e = load("[spool]\nsync = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sync") && e.contains("fsync"), "{e}");
        let e = load("[delivery]\ndefault_next_hop = \"mx.example\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("delivery.default_next_hop"), "{e}");
        let e = load(
            "[[delivery.routes]]\ndomain = \"a.example\"\nnext_hop = \"h:25\"\ntls = \"maybe\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls"), "{e}");
        let e = load("[filter]\nclamd = \"/run/clamd.sock\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("filter.clamd"), "{e}");
        let e = load("[spool]\nbatch_max = 0\n").unwrap_err().to_string();
        assert!(e.contains("spool.batch_max"), "{e}");
        let ha = "[ha]\npartner = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n\
                  secret = \"0123456789abcdef\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\n";
        load(ha).unwrap();
        let e = load(&format!("{ha}outbox_bytes = 2000000000\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ha.outbox_bytes") && e.contains("1 GiB"), "{e}");
        let cluster = "[cluster]\nlisten = \"127.0.0.1:3\"\n";
        let e = load(cluster).unwrap_err().to_string();
        assert!(e.contains("cluster.secret_file"), "{e}");
        load(&format!("{cluster}secret = \"0123456789abcdef\"\n")).unwrap();
        let e = load("[cluster]\nlisten = \"0.0.0.0:3\"\nsecret = \"0123456789abcdef\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.advertise"), "{e}");
        let e = load("[filter]\nretry_secs = 0\n").unwrap_err().to_string();
        assert!(e.contains("filter.retry_secs"), "{e}");
        for (milter, key) in [
            ("name = \"a\"\nsocket = \"udp:1:2\"", "filter.milter.socket"),
            (
                "name = \"a\"\nsocket = \"unix:/x\"\ndefault_action = \"maybe\"",
                "filter.milter.default_action",
            ),
            (
                "name = \"a\"\nsocket = \"unix:/x\"\nclients = \"friends\"",
                "filter.milter.clients",
            ),
            (
                "name = \"a\"\nsocket = \"unix:/x\"\nend_timeout_secs = 0",
                "filter.milter.end_timeout_secs",
            ),
            ("name = \"a b\"\nsocket = \"unix:/x\"", "filter.milter.name"),
        ] {
            let e = load(&format!("[[filter.milter]]\n{milter}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{milter}: {e}");
        }
        let twice = "[[filter.milter]]\nname = \"a\"\nsocket = \"unix:/x\"\n";
        let e = load(&format!("{twice}{twice}")).unwrap_err().to_string();
        assert!(e.contains("used twice"), "{e}");
        assert!(load(twice).is_ok());
    }
}
