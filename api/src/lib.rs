//! `api`: the typed requests and replies of `spoold`'s admin socket, shared by `spoold` (which
//! answers them) and `spoolctl` (which asks), so that a field renamed on one side cannot
//! silently vanish from the other.
//!
//! The wire format, one JSON value per line: the [`Request`]; for a recovery that asked for
//! them, `{"progress": Progress}` lines; then the answer, `{"ok": true, "data": …}` with the
//! request's reply type below, or `{"ok": false, "error": "…"}`.
//!
//! It is not: the socket, the daemon's behaviour, or the tool's output formatting.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One request, by how the daemon serves it. On the wire the classes do not show: every
/// request is one JSON object whose `cmd` names it (`{"cmd": "status"}`), and each class's
/// handler matches its own enum exhaustively, so a request cannot be served the wrong way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Request {
    /// Answered from this unit's own state, at once (on a blocking thread).
    Local(Local),
    /// Waits on other units (the partner, the cluster's members): served on the async threads.
    Cluster(Cluster),
    /// Long work that reports progress lines as it goes.
    Long(Long),
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Request, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(d)?;
        let cmd = value
            .get("cmd")
            .and_then(|c| c.as_str())
            .ok_or_else(|| D::Error::custom("no `cmd`"))?
            .to_string();
        // The class whose enum knows the command answers; its error (a missing or unknown
        // field) is the one reported.
        let unknown = |e: &serde_json::Error| e.to_string().starts_with("unknown variant");
        match serde_json::from_value::<Local>(value.clone()) {
            Ok(r) => return Ok(Request::Local(r)),
            Err(e) if !unknown(&e) => return Err(D::Error::custom(e)),
            Err(_) => {}
        }
        match serde_json::from_value::<Cluster>(value.clone()) {
            Ok(r) => return Ok(Request::Cluster(r)),
            Err(e) if !unknown(&e) => return Err(D::Error::custom(e)),
            Err(_) => {}
        }
        match serde_json::from_value::<Long>(value) {
            Ok(r) => Ok(Request::Long(r)),
            Err(e) if !unknown(&e) => Err(D::Error::custom(e)),
            Err(_) => Err(D::Error::custom(format!("unknown command `{cmd}`"))),
        }
    }
}

impl Long {
    /// Whether the asker wants progress lines.
    pub fn progress(&self) -> bool {
        match self {
            Long::Recover { progress, .. }
            | Long::ArchiveRetention { progress }
            | Long::ArchiveVerify { progress, .. }
            | Long::ArchiveReindex { progress }
            | Long::ArchiveRebuild { progress }
            | Long::ArchiveRekey { progress }
            | Long::ArchiveImport { progress, .. }
            | Long::ArchiveBulkExport { progress, .. } => *progress,
        }
    }
}

impl From<Local> for Request {
    fn from(r: Local) -> Request {
        Request::Local(r)
    }
}

impl From<Cluster> for Request {
    fn from(r: Cluster) -> Request {
        Request::Cluster(r)
    }
}

impl From<Long> for Request {
    fn from(r: Long) -> Request {
        Request::Long(r)
    }
}

/// [`Request::Local`]: answered from this unit's own state, at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Local {
    /// Role, partner link, lag, pending actions, queue depth by folder: [`Status`].
    Status,
    /// Set the role (`active` or `passive`; turning passive is a handover): [`RoleSet`].
    Role {
        /// `active` or `passive`.
        role: String,
    },
    /// Insert `input/` (the SIGUSR2 equivalent): [`Inserted`].
    Insert,
    /// List messages: a list of [`Listed`].
    List {
        /// One folder (default: spool, vscan, hold, quarantine).
        folder: Option<String>,
        /// Sender contains.
        sender: Option<String>,
        /// Some recipient contains.
        rcpt: Option<String>,
        /// Older than this many seconds.
        older_than_secs: Option<u64>,
    },
    /// One message: [`Shown`].
    Show {
        /// Its id.
        id: String,
    },
    /// Move to hold/ (not delivered until released): [`Each`].
    Hold {
        /// Ids.
        ids: Vec<String>,
    },
    /// Move from hold/ back to spool/ and schedule now: [`Each`].
    Release {
        /// Ids.
        ids: Vec<String>,
    },
    /// Retry now: [`Each`].
    Requeue {
        /// Ids.
        ids: Vec<String>,
    },
    /// Remove for good (logged for the partner first): [`Each`].
    Delete {
        /// Ids.
        ids: Vec<String>,
    },
    /// Retry every deferred message now: [`Flushed`].
    Flush,
    /// Clustered settings, per key: the file's value, each level's, the effective one here:
    /// [`ConfigShown`].
    ConfigShow {
        /// One key (default: every clusterable key).
        key: Option<String>,
    },
    /// The configuration in effect here, as a TOML file `spoold --check-config` accepts:
    /// [`ConfigExported`].
    ConfigExport,
    /// Search the archive: [`ArchiveFound`].
    ArchiveSearch {
        /// The query (from: to: subject: msgid: after: before: has:attachment size:> words).
        query: String,
        /// Items returned at most.
        limit: usize,
        /// Skip this many of the newest matches first (a later page).
        #[serde(default, skip_serializing_if = "is_zero")]
        offset: usize,
        /// Only items whose envelope sender or a recipient is one of these addresses (a
        /// console `user`'s own); absent: every item.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<Vec<String>>,
    },
    /// One archived item with its headers and parts: [`ArchiveShown`].
    ArchiveShow {
        /// Its number, or the spool id it had.
        id: String,
        /// As in [`Local::ArchiveSearch`]: an item outside it is refused as not found.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<Vec<String>>,
    },
    /// The exact accepted bytes of an item: [`ArchiveExported`].
    ArchiveExport {
        /// Its number, or the spool id it had.
        id: String,
        /// Read to be shown (audited as `archive view`) rather than exported.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        view: bool,
        /// As in [`Local::ArchiveSearch`]: an item outside it is refused as not found.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<Vec<String>>,
    },
    /// Put items on legal hold or release them: [`ArchiveHeld`].
    ArchiveHold {
        /// An item number, a spool id, or a query selecting every item it matches.
        target: String,
        /// Hold (true) or release (false).
        held: bool,
    },
    /// Items, bytes, segments, index and mirror backlogs: [`ArchiveStatus`].
    ArchiveStatus,
    /// Seal the open segment now, so that it goes to the object store: [`ArchiveSealed`].
    ArchiveSeal,
    /// The public key that signs the archive's checkpoints, and the data keys: [`ArchiveKey`].
    ArchiveKey,
    /// Add a data key that seals new records from now on: [`ArchiveKey`].
    ArchiveKeyRotate,
    /// The audit log's entries (who looked at what), oldest first:
    /// `Vec<evidence::audit::Entry>`.
    AuditList {
        /// Only entries numbered from this one.
        #[serde(default)]
        from: u64,
        /// At most this many (the newest when cut).
        #[serde(default)]
        limit: Option<usize>,
    },
    /// The console's users (names, roles, addresses; never hashes): a list of [`ListedUser`].
    UserList,
    /// Prove the audit log (chain, checkpoints): `evidence::audit::AuditProof`.
    AuditVerify {
        /// Compare with the checkpoints of the log every mirror peer keeps.
        #[serde(default)]
        against_peers: bool,
    },
}

/// [`Request::Cluster`]: waits on other units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Cluster {
    /// Follow messages through this unit and its partner: [`Tracked`].
    Track {
        /// `id:`, `msgid:`, `from:`, `to:`, a bare term (any of those), `after:`/`before:`
        /// (RFC 3339 or ms since the epoch); terms ANDed.
        query: String,
        /// Events returned at most.
        limit: usize,
    },
    /// Copy (or move) a clustered setting from one level to another: [`ConfigChanged`].
    ConfigCopy {
        /// The key.
        key: String,
        /// The level it is set at (`cluster`, `group:NAME`, `machine[:NODE]`).
        from: String,
        /// The level to set it at.
        to: String,
        /// Move: unset it at `from` afterwards.
        remove: bool,
    },
    /// This unit and the others it shares settings with (its cluster's members, or its
    /// partner): [`ClusterStatus`].
    ClusterStatus,
    /// Compare every key and level with every member; optionally resolve from one member:
    /// [`ClusterChecked`].
    ClusterCheck {
        /// Take this member's value of every differing entry (a node name).
        resolve_from: Option<String>,
    },
    /// Stop (true) or resume (false) exchanging settings, with every member or with one, e.g.
    /// around an upgrade; changes made meanwhile are exchanged on reconnect: [`ClusterStatus`].
    ClusterDisconnect {
        /// Disconnect (true) or reconnect (false).
        disconnected: bool,
        /// Only this member (default: all).
        #[serde(default)]
        node: Option<String>,
    },
    /// Make this unit the first member of a new cluster: [`ClusterList`].
    ClusterCreate {
        /// The cluster's name.
        name: String,
    },
    /// Join the cluster of the member at this cluster-link address; this unit's clustered
    /// settings are replaced by the cluster's (saved first): [`ClusterList`].
    ClusterJoin {
        /// `ip:port` of a member's cluster link.
        addr: String,
    },
    /// Leave the cluster, keeping the settings in effect here: [`ClusterList`].
    ClusterLeave,
    /// Remove a member that cannot leave by itself (dead, or gone for good): [`ClusterList`].
    ClusterRemove {
        /// Its node name.
        node: String,
    },
    /// The cluster, its groups and members: [`ClusterList`].
    ClusterList,
    /// Add a group: [`ClusterList`].
    GroupAdd {
        /// Its name.
        name: String,
    },
    /// Rename a group (its settings and machines follow): [`ClusterList`].
    GroupRename {
        /// The current name.
        from: String,
        /// The new one.
        to: String,
    },
    /// Delete an empty group and its settings: [`ClusterList`].
    GroupDelete {
        /// Its name.
        name: String,
    },
    /// Put a machine in a group (or in none): [`ClusterList`].
    MachineSetGroup {
        /// The machine's node name.
        node: String,
        /// The group; absent: none.
        group: Option<String>,
    },
    /// Add a console user (clustered: every unit knows them): [`UserChanged`].
    UserAdd {
        /// Their name.
        name: String,
        /// `admin`, `auditor` or `user`.
        role: String,
        /// The argon2id hash of their password (PHC string), made by the asker: the password
        /// itself never reaches the daemon.
        password_hash: String,
        /// For the `user` role: the addresses whose mail they read.
        #[serde(default)]
        addresses: Vec<String>,
    },
    /// Give a console user a new password: [`UserChanged`].
    UserPasswd {
        /// Their name.
        name: String,
        /// The argon2id hash of the new password.
        password_hash: String,
    },
    /// Remove a console user (their sessions end at their next request): [`UserChanged`].
    UserDel {
        /// Their name.
        name: String,
    },
    /// Quarantined messages on this unit and every other (its cluster's members, or its
    /// partner), for a console user's inbox: [`QuarantineFound`].
    QuarantineList {
        /// Only messages from or to these addresses (and only these among the recipients
        /// shown); absent: all.
        #[serde(default)]
        scope: Option<Vec<String>>,
    },
    /// Release or delete a quarantined message on the unit that holds it, if the quarantine
    /// policy lets a recipient do that: [`QuarantineActed`].
    QuarantineAct {
        /// The unit holding it (a node name).
        unit: String,
        /// Its spool id.
        id: String,
        /// `release` or `delete`.
        action: String,
        /// As in [`Cluster::QuarantineList`]: a message outside it is not found.
        #[serde(default)]
        scope: Option<Vec<String>>,
        /// Who asks (recorded in the holding unit's log).
        who: String,
    },
    /// Set (or, without a value, unset) a clustered setting at a level (`cluster` or
    /// `machine`), validated here, then sent to the partner: [`ConfigChanged`].
    ConfigSet {
        /// The key, e.g. `smtp.relay_domains`.
        key: String,
        /// A TOML value (`["a.example"]`, `[]`); absent: unset at that level.
        value: Option<String>,
        /// `cluster`, `group:NAME` or `machine[:NODE]`.
        level: String,
    },
}

/// [`Request::Long`]: long work with progress lines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Long {
    /// Takeover recovery: bring the partner's leftovers (or a copied-out spool folder) here:
    /// [`Recovered`].
    Recover {
        /// Only report the plan.
        dry_run: bool,
        /// Offline: a spool folder copied from a dead unit instead of the partner.
        from_dir: Option<String>,
        /// Send a [`Progress`] line as each step advances.
        #[serde(default)]
        progress: bool,
    },
    /// Run the retention pass now (then compaction): [`ArchiveExpired`].
    ArchiveRetention {
        /// Send [`Progress`] lines.
        #[serde(default)]
        progress: bool,
    },
    /// Prove the archive (its hash chain, checkpoints and bodies), read every item's body back
    /// against its hash and count index entries: [`ArchiveVerified`].
    ArchiveVerify {
        /// Send [`Progress`] lines.
        #[serde(default)]
        progress: bool,
        /// Take the entries the newest valid checkpoint covers as proved by it.
        #[serde(default)]
        from_checkpoint: bool,
        /// Take the entries the newest valid checkpoint signed at or before this time (ms since
        /// the epoch) covers as proved by it.
        #[serde(default)]
        since_ms: Option<u64>,
        /// Compare with the checkpoints every mirror peer keeps of this archive.
        #[serde(default)]
        against_peers: bool,
        /// Compare with the checkpoints uploaded to the object store.
        #[serde(default)]
        against_store: bool,
    },
    /// Rebuild the full-text index from the catalog: [`ArchiveReindexed`].
    ArchiveReindex {
        /// Send [`Progress`] lines.
        #[serde(default)]
        progress: bool,
    },
    /// Rebuild the catalog from the segments (or wait for the rebuild under way), then verify:
    /// [`ArchiveRebuilt`].
    ArchiveRebuild {
        /// Send [`Progress`] lines.
        #[serde(default)]
        progress: bool,
    },
    /// Seal every record with the current data key (segments holding records in clear or
    /// sealed with an older key are rewritten): [`ArchiveRekeyed`].
    ArchiveRekey {
        /// Send [`Progress`] lines.
        #[serde(default)]
        progress: bool,
    },
    /// Import messages from files the daemon reads (mbox, Maildir, directories of `.eml`, a
    /// message file): [`ArchiveImported`].
    ArchiveImport {
        /// Absolute paths.
        paths: Vec<String>,
        /// mbox files use mboxo quoting (default mboxrd).
        #[serde(default)]
        mboxo: bool,
        /// Write one line per message (verdict, source, place, item or reason) to this file.
        #[serde(default)]
        report: Option<String>,
        /// Import this IMAP mailbox (`imaps://user@host[:port]/mailbox`, or `imap://` with
        /// STARTTLS) instead of `paths`.
        #[serde(default)]
        imap: Option<String>,
        /// With `imap`: the file holding the password (the daemon reads it).
        #[serde(default)]
        password_file: Option<String>,
        /// With `imap`: PEM certificates to trust for the server (default: the system's).
        #[serde(default)]
        ca_file: Option<String>,
        /// With `imap`: only messages the server dates on or after this day (`YYYY-MM-DD`).
        #[serde(default)]
        since: Option<String>,
        /// Send [`Progress`] lines (bytes read).
        #[serde(default)]
        progress: bool,
    },
    /// Export every item a query selects to a path the daemon writes (an mboxrd file or a
    /// Maildir), with a signed manifest beside it: [`ArchiveBulkExported`].
    ArchiveBulkExport {
        /// A search query, an item number or a spool id.
        query: String,
        /// `mbox` or `maildir`.
        format: String,
        /// An absolute path that does not exist.
        out: String,
        /// Send [`Progress`] lines (items written).
        #[serde(default)]
        progress: bool,
    },
}

/// One archived item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveItem {
    /// Its number on this unit.
    pub seq: u64,
    /// The spool id it had where it was accepted.
    pub id: String,
    /// The node that accepted it.
    pub origin: String,
    /// Copied here from a mirror peer.
    pub mirrored: bool,
    /// On legal hold.
    pub held: bool,
    /// Accepted at, ms since the epoch.
    pub arrived_ms: u64,
    /// Envelope sender.
    pub sender: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// Scan verdict.
    pub verdict: String,
    /// Raw size in bytes.
    pub size: u64,
    /// SHA-256 of the raw bytes, hex.
    pub sha256: String,
    /// The Subject header, when shown from search results.
    #[serde(default)]
    pub subject: Option<String>,
    /// The Message-ID header (without angle brackets), when shown from search results.
    #[serde(default)]
    pub message_id: Option<String>,
    /// In search results: the fields the query matched this item in, as the search language
    /// names them (`subject`, `from`, `to`, `body`, `filename`, `msgid`, `id`, …).
    #[serde(default)]
    pub matched: Vec<String>,
}

/// [`Local::ArchiveSearch`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveFound {
    /// Items matching: all of them when `total_exact`, else at least this many (the search
    /// stopped among the newest items once it had enough).
    pub total: usize,
    /// Whether `total` counts every match.
    #[serde(default = "exact")]
    pub total_exact: bool,
    /// The newest of them, up to the limit.
    pub items: Vec<ArchiveItem>,
}

fn exact() -> bool {
    true
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// [`Local::ArchiveShow`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveShown {
    /// The item.
    pub item: ArchiveItem,
    /// The header section.
    pub headers: String,
    /// MIME parts: content type, file name, decoded size.
    pub parts: Vec<ArchivePart>,
}

/// One MIME part of [`ArchiveShown`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivePart {
    /// `type/subtype`.
    pub content_type: String,
    /// Attachment file name.
    pub name: Option<String>,
    /// Decoded bytes.
    pub size: u64,
}

/// [`Local::ArchiveExport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveExported {
    /// The item.
    pub item: ArchiveItem,
    /// The raw bytes, base64 (standard alphabet, padded).
    pub base64: String,
}

/// [`Local::ArchiveHold`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveHeld {
    /// Items the target selected.
    pub matched: u64,
    /// Of those, items whose hold changed.
    pub changed: u64,
}

/// [`Local::ArchiveKey`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveKey {
    /// The Ed25519 public key (64 hex digits) that signs this unit's checkpoints.
    pub public_key: String,
    /// The archive's id, once it has one.
    pub archive: Option<String>,
    /// The file of the private key (on the unit; readable by spoold only).
    pub key_file: String,
    /// Whether new records are sealed (encryption at rest).
    #[serde(default)]
    pub encryption: bool,
    /// Where the keyring is (a file, or the environment), when there is one.
    #[serde(default)]
    pub keyring: Option<String>,
    /// The data keys, oldest first (never the keys themselves).
    #[serde(default)]
    pub data_keys: Vec<DataKey>,
    /// The data key the archive's chain names now (what seals new records).
    #[serde(default)]
    pub chain_key: Option<String>,
    /// The checkpoints file.
    pub checkpoints: String,
}

/// A data key of the archive's keyring, as [`ArchiveKey`] shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKey {
    /// Its id (8 hex digits), as sealed records name it.
    pub id: String,
    /// When it was made, ms since the epoch.
    pub created_ms: u64,
    /// Whether it seals new records.
    pub current: bool,
}

/// [`Long::ArchiveRekey`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRekeyed {
    /// Segments rewritten.
    pub segments: u32,
    /// Records sealed anew with the current key.
    pub resealed: u64,
    /// The key every record is sealed with now.
    pub key: String,
}

/// [`Long::ArchiveBulkExport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveBulkExported {
    /// Items written.
    pub items: u64,
    /// Bytes of mail written.
    pub bytes: u64,
    /// Where.
    pub out: String,
    /// The manifest (item lines, then the signed closing line).
    pub manifest: String,
}

/// [`Long::ArchiveImport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveImported {
    /// Per path given.
    pub sources: Vec<ImportedSource>,
    /// Messages archived as new items.
    pub archived: u64,
    /// Messages the archive held already (a rerun, the same message in two sources).
    pub duplicates: u64,
    /// Messages or files refused.
    pub rejected: u64,
    /// The first refusals (the report file has them all).
    pub refusals: Vec<ImportRefusal>,
    /// The report file, when one was asked for.
    pub report: Option<String>,
}

/// An IMAP mailbox to import ([`Long::ArchiveImport`]'s `imap` and the fields that go with it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImapSource {
    /// `imaps://user@host[:port]/mailbox` or `imap://…`.
    pub url: String,
    /// The password's file.
    pub password_file: Option<String>,
    /// PEM certificates to trust.
    pub ca_file: Option<String>,
    /// `YYYY-MM-DD`.
    pub since: Option<String>,
}

/// One path of an import.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedSource {
    /// The path.
    pub path: String,
    /// `mbox`, `maildir`, `files`, `message` or `unreadable`.
    pub kind: String,
    /// Archived.
    pub archived: u64,
    /// Already held.
    pub duplicates: u64,
    /// Refused.
    pub rejected: u64,
    /// Bytes read.
    pub bytes: u64,
}

/// A message or file an import refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRefusal {
    /// The file.
    pub source: String,
    /// Where in it (`byte N` of an mbox, `file`).
    pub at: String,
    /// Why.
    pub reason: String,
}

/// [`Local::ArchiveSeal`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveSealed {
    /// The segment sealed; none when the open segment held nothing.
    pub segment: Option<u32>,
    /// Whether an object store takes sealed segments (the upload follows within seconds).
    pub object_store: bool,
}

/// [`Local::ArchiveStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveStatus {
    /// Items.
    pub items: u64,
    /// Raw bytes of all items.
    pub raw_bytes: u64,
    /// Bytes in segment files.
    pub stored_bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Items on legal hold.
    pub held: u64,
    /// Highest item number.
    pub last_seq: u64,
    /// Items searchable up to this number.
    pub indexed_through: u64,
    /// Why writes fail now, if they do.
    pub failing: Option<String>,
    /// Messages waiting in the spool for the archive.
    pub waiting: u64,
    /// Each mirror peer.
    pub mirrors: Vec<MirrorState>,
    /// The object store holding sealed segments, when there is one.
    #[serde(default)]
    pub object_store: Option<ObjectStoreState>,
    /// The catalog is being rebuilt from the segments: `(segments read, of)`.
    #[serde(default)]
    pub rebuilding: Option<(u64, u64)>,
}

/// One key of [`ConfigShown`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigKey {
    /// The key.
    pub key: String,
    /// Its value in this unit's configuration file (or the default).
    pub file: Option<serde_json::Value>,
    /// The levels that set it.
    pub levels: Vec<LevelValue>,
    /// What applies on this unit.
    pub effective: Option<serde_json::Value>,
}

/// A level's value of one key in [`ConfigKey`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelValue {
    /// `cluster`, `group:<name>` or `machine:<node>`.
    pub level: String,
    /// The value set there (`None`: unset there).
    pub value: Option<serde_json::Value>,
    /// The stamp of the change (`ms.counter@node`).
    pub stamp: String,
}

/// A change that lost to a newer one, in [`ConfigShown`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigConflict {
    /// The key.
    pub key: String,
    /// The level it was made at.
    pub level: String,
    /// The value that lost (`None`: an unset).
    pub value: Option<serde_json::Value>,
    /// Its stamp (`ms.counter@node`: when and where it was made).
    pub stamp: String,
    /// The stamp of the change that won.
    pub lost_to: String,
}

impl std::fmt::Display for ConfigConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = self
            .value
            .as_ref()
            .map_or("(unset)".to_string(), |v| v.to_string());
        write!(
            f,
            "{} {} {value} {}, lost to {}",
            self.key, self.level, self.stamp, self.lost_to
        )
    }
}

/// [`Local::ConfigShow`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigShown {
    /// The keys.
    pub keys: Vec<ConfigKey>,
    /// Changes that lost to a newer one.
    pub conflicts: Vec<ConfigConflict>,
    /// Keys that never leave their unit.
    pub machine_only: Vec<String>,
}

/// [`Cluster::ClusterStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This unit.
    pub node: String,
    /// The newest stamp of its settings (`ms.counter@node`), if any.
    pub version: Option<String>,
    /// Entries held (keys × levels).
    pub entries: usize,
    /// Changes that lost to newer ones.
    pub conflicts: usize,
    /// An operator disconnected this unit from the exchanges.
    #[serde(default)]
    pub disconnected: bool,
    /// The settings protocol spoken here.
    pub protocol: u32,
    /// The cluster this unit is a member of (none: it shares settings with its partner only).
    pub cluster: Option<String>,
    /// The others: every member of the cluster, or the partner once an exchange was tried.
    pub members: Vec<ClusterMember>,
}

/// Another unit in [`ClusterStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMember {
    /// Its node name.
    pub node: String,
    /// Its cluster-link address (none: the HA partner, reached over the peer link).
    pub addr: Option<String>,
    /// An operator disconnected this unit from it.
    pub paused: bool,
    /// The last exchange succeeded.
    pub connected: bool,
    /// Seconds since the last successful exchange.
    pub last_contact_secs: Option<u64>,
    /// How long that exchange took, ms.
    pub last_sync_ms: u64,
    /// How long the last exchange that brought it a change it lacked took, ms.
    #[serde(default)]
    pub last_change_ms: Option<u64>,
    /// The newest stamp it held then.
    pub version: Option<String>,
    /// Keys and levels that differed before that exchange (it then took ours, we took its).
    pub differing: Vec<String>,
    /// Why the last exchange failed.
    pub error: Option<String>,
}

/// [`Cluster::ClusterList`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterList {
    /// The cluster's name (none: this unit is in no cluster).
    pub cluster: Option<String>,
    /// This unit.
    pub node: String,
    /// Members.
    pub members: Vec<ListedMember>,
    /// Groups and the machines in each.
    pub groups: Vec<ListedGroup>,
    /// What happened (a join's backup, members told of a change or not).
    pub notes: Vec<String>,
}

/// A member in [`ClusterList`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedMember {
    /// Its node name.
    pub node: String,
    /// Its cluster-link address.
    pub addr: String,
    /// Its group, if any.
    pub group: Option<String>,
}

/// A group in [`ClusterList`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedGroup {
    /// Its name.
    pub name: String,
    /// The machines in it.
    pub machines: Vec<String>,
}

/// [`Cluster::ClusterCheck`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterChecked {
    /// `key level: here V, node W` for each entry that differs.
    pub differences: Vec<String>,
    /// Entries set again from the chosen member.
    pub resolved: usize,
    /// Members that could not be compared, and why.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One quarantined message in [`QuarantineFound`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// The unit holding it.
    pub unit: String,
    /// Its spool id.
    pub id: String,
    /// Arrival, ms since the epoch.
    pub arrived_ms: u64,
    /// Envelope sender.
    pub sender: String,
    /// Its recipients (within the asker's scope).
    pub recipients: Vec<String>,
    /// Body bytes.
    pub size: u64,
    /// Why it is held: `virus: NAME`, ….
    pub reason: String,
    /// Its Subject header.
    pub subject: Option<String>,
    /// Whether a recipient may release it (never an infected one).
    pub releasable: bool,
    /// Whether a recipient may delete it.
    pub deletable: bool,
}

/// [`Cluster::QuarantineList`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineFound {
    /// The messages, newest first.
    pub items: Vec<Quarantined>,
    /// Units that could not be asked, and why.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// [`Cluster::QuarantineAct`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineActed {
    /// The unit that holds (or held) it.
    pub unit: String,
    /// Its spool id.
    pub id: String,
    /// What was done: `released`, `deleted`.
    pub done: String,
}

/// A console user in the answer to [`Local::UserList`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedUser {
    /// Their name.
    pub name: String,
    /// Their role.
    pub role: String,
    /// The addresses whose mail a `user` reads.
    pub addresses: Vec<String>,
}

/// [`Cluster::UserAdd`], [`Cluster::UserPasswd`], [`Cluster::UserDel`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserChanged {
    /// The user.
    pub name: String,
    /// `added`, `password changed`, `removed`.
    pub change: String,
    /// What became of the other units' copies: `sent to NODE in N ms`, or why not.
    pub sent: Vec<String>,
}

/// [`Local::ConfigExport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigExported {
    /// The TOML text.
    pub toml: String,
}

/// [`Cluster::ConfigSet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigChanged {
    /// The key.
    pub key: String,
    /// The level changed.
    pub level: String,
    /// What applies here now.
    pub effective: Option<serde_json::Value>,
    /// What became of the others' copies: `sent to NODE in N ms`, or why not (it catches up).
    pub sent: Vec<String>,
}

/// One thing that happened to a message on a unit (a line of its tracking log).
pub use track::{Event as TrackEvent, EventKind};

/// [`Cluster::Track`]: the events of every reachable unit, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracked {
    /// The events.
    pub events: Vec<TrackEvent>,
    /// More events matched than the limit.
    pub capped: bool,
    /// Units that could not be asked, and why.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// The object store of [`ArchiveStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectStoreState {
    /// Sealed segments confirmed in the store.
    pub remote_segments: u64,
    /// Their bytes.
    pub remote_bytes: u64,
    /// Sealed segments waiting for upload.
    pub pending_segments: u64,
    /// Their bytes.
    pub pending_bytes: u64,
    /// Age of the oldest waiting segment, seconds.
    pub pending_oldest_age_secs: u64,
    /// Local bytes of confirmed segments (the read cache).
    pub cached_bytes: u64,
    /// Uploads confirmed since the start.
    pub uploads: u64,
    /// Uploads that failed since the start (retried).
    pub upload_failures: u64,
    /// Records read from the store since the start.
    pub fetches: u64,
    /// Of them, failed.
    pub fetch_failures: u64,
    /// The archive's id (its manifest's), once the prefix was found this archive's.
    #[serde(default)]
    pub archive: Option<String>,
}

/// One mirror peer of [`ArchiveStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorState {
    /// `host:port`.
    pub peer: String,
    /// A session is up.
    pub connected: bool,
    /// Local items not yet confirmed.
    pub backlog: u64,
    /// Age of the oldest of them, seconds.
    pub oldest_age_secs: u64,
    /// Items confirmed since the start.
    pub sent: u64,
    /// Sessions refused for a wrong shared secret.
    pub auth_failures: u64,
}

/// [`Long::ArchiveRetention`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveExpired {
    /// Items removed.
    pub removed: u64,
    /// Segments rewritten.
    pub segments_compacted: u32,
    /// Bytes freed by compaction.
    pub bytes_freed: u64,
}

/// [`Long::ArchiveVerify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveVerified {
    /// Items in the catalog.
    pub items: u64,
    /// Bodies read back whole.
    pub ok: u64,
    /// Items whose body failed, and why.
    pub failed: Vec<Failed>,
    /// Entries in the full-text index (equal to `items` when consistent).
    pub index_entries: u64,
    /// The proof of the archive's chain, checkpoints and bodies.
    #[serde(default)]
    pub proof: Option<evidence::proof::Proof>,
}

/// [`Long::ArchiveRebuild`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRebuilt {
    /// Segments read (a resumed rebuild counts those of its last run).
    pub segments: u32,
    /// Of them, read from the object store.
    pub from_store: u32,
    /// Items in the rebuilt catalog.
    pub items: u64,
    /// Of them, on legal hold.
    pub held: u64,
    /// Items found removed by retention.
    pub removed: u64,
    /// Segments whose reading stopped at a damaged frame.
    pub damaged: Vec<String>,
    /// Items whose body no segment holds.
    pub without_body: Vec<u64>,
    /// The verification that followed.
    pub verified: ArchiveVerified,
}

/// [`Long::ArchiveReindex`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveReindexed {
    /// Items indexed.
    pub items: u64,
}

/// How far a recovery got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// `list`, `copy`, `insert`, `partner-removal`.
    pub step: String,
    /// Done so far.
    pub done: usize,
    /// Out of.
    pub total: usize,
}

/// One answer line, as sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    /// A recovery's progress.
    Progress {
        /// How far.
        progress: Progress,
    },
    /// The answer.
    Answer {
        /// Whether the request succeeded.
        ok: bool,
        /// The reply, when it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<serde_json::Value>,
        /// Why not, when it did not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl Line {
    /// A successful answer carrying `reply`.
    pub fn reply<T: Serialize>(reply: &T) -> Line {
        match serde_json::to_value(reply) {
            Ok(data) => Line::Answer {
                ok: true,
                data: Some(data),
                error: None,
            },
            Err(e) => Line::refused(format!("encode the reply: {e}")),
        }
    }

    /// A failed answer.
    pub fn refused(error: impl Into<String>) -> Line {
        Line::Answer {
            ok: false,
            data: None,
            error: Some(error.into()),
        }
    }

    /// The line as sent, newline included.
    pub fn to_wire(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"ok":false,"error":"encode the answer"}"#.to_string());
        s.push('\n');
        s
    }
}

/// Reads an answer's data as the reply type `T`.
pub fn data_as<T: DeserializeOwned>(data: &serde_json::Value) -> Result<T, String> {
    T::deserialize(data).map_err(|e| format!("unexpected reply from spoold: {e}"))
}

/// [`Local::Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `active`, `passive` or `leaving`; a standalone unit is always `active`.
    pub role: String,
    /// The HA pair, when configured.
    pub ha: Option<HaStatus>,
    /// `.env` files per folder.
    pub queue: BTreeMap<String, u64>,
    /// Messages in the delivery schedule.
    pub scheduled: u64,
}

/// The replication part of [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaStatus {
    /// This unit's role.
    pub role: String,
    /// `up` or `down`: the sender's link to the partner.
    pub link: String,
    /// Both units active on a live link.
    pub split_brain: bool,
    /// Replication actions not yet acknowledged.
    pub pending_actions: u64,
    /// Age of the oldest of them.
    pub oldest_pending_age_ms: Option<u64>,
    /// Lag of the last acknowledged action.
    pub last_lag_ms: u64,
    /// The partner's node name, as last heard.
    pub partner: Option<String>,
    /// The partner's role, as last heard.
    pub partner_role: Option<String>,
}

/// [`Local::Role`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSet {
    /// The role now.
    pub role: String,
    /// Turning passive: how long the handover took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_ms: Option<u64>,
    /// Turning passive: whether the work in flight ended and every action reached the partner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete: Option<bool>,
    /// Turning passive: actions the partner did not acknowledge (then run `spoolctl recover`
    /// on the partner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unshipped_actions: Option<u64>,
}

/// [`Local::Insert`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inserted {
    /// Ids now in `spool/`.
    pub inserted: Vec<String>,
    /// Ids already spooled (the copy in `input/` was removed).
    pub duplicates: Vec<String>,
    /// Pairs moved to `corrupt/`.
    pub corrupt: Vec<Rejected>,
}

/// A pair refused at insertion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Its file name stem.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// One message of [`Local::List`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    /// Its id.
    pub id: String,
    /// Its folder.
    pub folder: String,
    /// Body bytes.
    pub size: u64,
    /// Envelope sender.
    pub sender: String,
    /// Recipients still pending.
    pub recipients: Vec<String>,
    /// Arrival, ms since the epoch.
    pub arrived_ms: u64,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Next attempt, ms since the epoch.
    pub next_attempt_ms: u64,
    /// The last attempt's error.
    pub last_error: Option<String>,
}

/// [`Local::Show`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shown {
    /// Its id.
    pub id: String,
    /// Its folder.
    pub folder: String,
    /// The `.env` as text.
    pub envelope: String,
    /// The header section (at most 64 KiB).
    pub headers: String,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Next attempt, ms since the epoch.
    pub next_attempt_ms: u64,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// Each recipient and its state.
    pub recipients: Vec<RecipientState>,
}

/// A recipient of [`Shown`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientState {
    /// The address.
    pub address: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
}

/// [`Local::Hold`], [`Local::Release`], [`Local::Requeue`], [`Local::Delete`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Each {
    /// Ids done.
    pub done: Vec<String>,
    /// Ids not done, and why.
    pub failed: Vec<Failed>,
}

/// One id that failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    /// The id (or file name stem).
    pub id: String,
    /// Why.
    pub error: String,
}

/// [`Local::Flush`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flushed {
    /// Messages made due now.
    pub requeued: usize,
}

/// [`Long::Recover`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    /// Only the plan was made.
    pub dry_run: bool,
    /// Each leftover and what recovery does with it.
    pub plan: Vec<Planned>,
    /// Ids moved here.
    #[serde(default)]
    pub moved: Vec<String>,
    /// Ids delivered here, removed there.
    #[serde(default)]
    pub duplicates: Vec<String>,
    /// Ids held here too: the partner's copies are replicas and stay.
    #[serde(default)]
    pub held_here_kept: Vec<String>,
    /// Pairs removed on the partner.
    #[serde(default)]
    pub removed_on_partner: usize,
    /// Ids the partner delivered, removed here.
    #[serde(default)]
    pub delivered_by_partner_removed_here: Vec<String>,
    /// Leftovers that could not be moved, and why.
    pub failed: Vec<Failed>,
}

/// One leftover of [`Recovered::plan`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    /// Its id.
    pub id: String,
    /// Where it is on the partner (or the folder's path).
    pub folder: String,
    /// Body bytes.
    pub size: u64,
    /// `move`, `held here (kept)` or `duplicate (delivered here)`.
    pub action: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_keep_their_wire_form() {
        let req: Request =
            serde_json::from_str(r#"{"cmd":"recover","dry_run":true,"from_dir":null}"#).unwrap();
        assert_eq!(
            req,
            Request::Long(Long::Recover {
                dry_run: true,
                from_dir: None,
                progress: false
            })
        );
        // Each class's commands on the wire as before, by their `cmd` alone.
        let classes: &[(&str, Request)] = &[
            (r#"{"cmd":"status"}"#, Local::Status.into()),
            (r#"{"cmd":"cluster_leave"}"#, Cluster::ClusterLeave.into()),
            (
                r#"{"cmd":"track","query":"id:x","limit":5}"#,
                Cluster::Track {
                    query: "id:x".into(),
                    limit: 5,
                }
                .into(),
            ),
            (
                r#"{"cmd":"archive_verify","progress":true}"#,
                Long::ArchiveVerify {
                    progress: true,
                    from_checkpoint: false,
                    since_ms: None,
                    against_peers: false,
                    against_store: false,
                }
                .into(),
            ),
        ];
        for (wire, request) in classes {
            assert_eq!(serde_json::from_str::<Request>(wire).unwrap(), *request);
            let back = serde_json::to_string(request).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&back).unwrap(), *request);
        }
        let unknown = serde_json::from_str::<Request>(r#"{"cmd":"frobnicate"}"#).unwrap_err();
        assert!(
            unknown.to_string().contains("unknown command `frobnicate`"),
            "{unknown}"
        );
        // A known command with a field too many is refused with that field named.
        let extra =
            serde_json::from_str::<Request>(r#"{"cmd":"role","role":"active","x":1}"#).unwrap_err();
        assert!(extra.to_string().contains("unknown field `x`"), "{extra}");
        let missing = serde_json::from_str::<Request>(r#"{"cmd":"cluster_join"}"#).unwrap_err();
        assert!(
            missing.to_string().contains("missing field `addr`"),
            "{missing}"
        );
        let line = Line::reply(&Flushed { requeued: 2 }).to_wire();
        assert_eq!(line, "{\"ok\":true,\"data\":{\"requeued\":2}}\n");
        let back: Line = serde_json::from_str(line.trim_end()).unwrap();
        let Line::Answer { data: Some(d), .. } = back else {
            panic!("{back:?}")
        };
        assert_eq!(data_as::<Flushed>(&d).unwrap(), Flushed { requeued: 2 });
        let progress: Line =
            serde_json::from_str(r#"{"progress":{"step":"copy","done":1,"total":3}}"#).unwrap();
        assert!(matches!(progress, Line::Progress { .. }));
        assert_eq!(
            Line::refused("no").to_wire(),
            "{\"ok\":false,\"error\":\"no\"}\n"
        );
    }
}
