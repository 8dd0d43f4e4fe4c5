//! `spoolctl`: the operator's tool for a running `spoold`, like postqueue/postsuper or
//! `exim -bp`/`-M`: queue listing and surgery, `input/` insertion, roles and status. It talks to
//! the daemon's admin socket (`<state_dir>/spoold.sock`, mode 0600): one request, one answer,
//! both typed in the `api` crate that spoold uses too. It is not: a second writer of the spool;
//! every change goes through the daemon.
//!
//! Exit codes: 0 done; 1 the daemon refused or part of the request failed; 2 usage error;
//! 3 the daemon could not be reached.

mod render;

use api::{data_as, Cluster, Line, Local, Long, Request};
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "spoolctl",
    about = "Operate a running spoold",
    after_help = "Exit codes: 0 done; 1 refused or partly failed; 2 usage error; 3 spoold not reachable."
)]
struct Cli {
    /// spoold's state directory (its admin socket is spoold.sock in it).
    #[arg(
        long,
        env = "SPOOLD_STATE_DIR",
        default_value = "./var/spoold",
        global = true
    )]
    state_dir: PathBuf,
    /// Print the daemon's answer as JSON (stable, for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Role, partner link, lag, pending replication actions, queue depth by folder.
    Status,
    /// The record of who looked at archive content (every search, show, export, hold,
    /// retention, verify, rebuild, key request: who, when, what, which items).
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Set this unit's role.
    Role {
        /// active or passive
        role: String,
    },
    /// Insert the pairs in input/ (what SIGUSR2 does), reporting each id.
    Insert,
    /// Queue tools.
    Queue {
        #[command(subcommand)]
        cmd: QueueCmd,
    },
    /// Retry every deferred message now.
    Flush,
    /// The message archive: search, show, export, legal holds, status.
    Archive {
        #[command(subcommand)]
        cmd: ArchiveCmd,
    },
    /// Clustered settings, shared by the members of the cluster (or the units of the pair):
    /// show, set, unset, copy, move, export.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// The units sharing clustered settings: create, join or leave a cluster, list its
    /// members, their status (connected, last contact, the last exchange's duration, settings
    /// version, what differed), compare and resolve, disconnect for an upgrade.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// The web console's users (clustered: every unit of the cluster knows them). Passwords
    /// are hashed here (argon2id); only the hash reaches the daemon.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Groups of machines in the cluster (a group's settings override the cluster's).
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// A machine's place in the cluster.
    Machine {
        #[command(subcommand)]
        cmd: MachineCmd,
    },
    /// Follow messages through this unit and every other member of its cluster (its partner
    /// when it is in no cluster): every event of the messages QUERY
    /// selects (accepted, replicated, scanned, each delivery attempt, bounced, archived,
    /// removed, moved by takeover recovery), oldest first, naming the unit of each.
    /// QUERY: id:ID msgid:<...> from:ADDR to:ADDR or a bare term (any of them), narrowed by
    /// after:/before: (RFC 3339 or ms since the epoch); terms ANDed.
    Track {
        /// The query words.
        #[arg(required = true)]
        query: Vec<String>,
        /// Events shown at most (a clear message says when more matched).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Takeover recovery, run on the unit that is active after takeback: list the partner's
    /// leftovers in spool/ and vscan/ over the authenticated peer link, keep there the copies
    /// of messages held here (they are replicas), copy the rest that was not delivered here
    /// into input/ with checksums, insert and verify them, then remove on the partner what was
    /// moved and what was delivered here; finally remove here what the partner delivered while
    /// it was active, and replicate anew. Every step is idempotent: run it again after any
    /// crash.
    Recover {
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Offline: a spool folder copied out of a dead unit instead of the partner.
        #[arg(long, value_name = "PATH")]
        from_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Make this unit the first member of a new cluster (needs [cluster] in its file).
    Create {
        /// The cluster's name (a-z, 0-9, _ and -).
        name: String,
    },
    /// Join the cluster of the member whose cluster link is at ADDR (the shared secret of
    /// [cluster] authenticates). This unit's clustered settings are REPLACED by the cluster's;
    /// the previous ones are saved in the state directory first.
    Join {
        /// ip:port of a member's cluster link.
        addr: String,
    },
    /// Leave the cluster; the settings in effect here stay.
    Leave,
    /// Remove a member that cannot leave by itself (dead, or gone for good); refused while it
    /// answers (run `cluster leave` on it instead).
    Remove {
        /// Its node name.
        node: String,
    },
    /// The cluster, its groups and members.
    List,
    /// This unit and every other member as the last settings exchange saw them.
    Status,
    /// Compare every clustered setting with every member's, key by key and level by level.
    Check {
        /// Settle every difference with this member's value (its node name).
        #[arg(long, value_name = "NODE")]
        resolve_from: Option<String>,
    },
    /// Stop exchanging settings with every member, or with NODE (for an upgrade); changes
    /// made meanwhile stay on their side until `reconnect`.
    Disconnect {
        /// Only this member.
        node: Option<String>,
    },
    /// Resume exchanging settings: what changed meanwhile on either side is exchanged.
    Reconnect {
        /// Only this member.
        node: Option<String>,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Add a group.
    Add {
        /// Its name (a-z, 0-9, _ and -).
        name: String,
    },
    /// Rename a group; its settings and machines follow.
    Rename {
        /// The current name.
        from: String,
        /// The new one.
        to: String,
    },
    /// Delete a group that holds no machine, and its settings.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
enum MachineCmd {
    /// Put machine NODE in GROUP (without GROUP: in none).
    Setgroup {
        /// The machine's node name.
        node: String,
        /// The group.
        group: Option<String>,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user. Without --password-file a random password is made and printed once.
    Add {
        /// Their name (letters, digits, . _ @ -).
        name: String,
        /// admin (status, queue, settings; no mail), auditor (search, view, export, legal
        /// hold, audit log) or user (their own mail only).
        #[arg(long)]
        role: String,
        /// For the user role: an address whose mail they read (repeat for more).
        #[arg(long = "address", value_name = "ADDR")]
        addresses: Vec<String>,
        /// Read the password from this file's first line.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Give a user a new password (random and printed once without --password-file).
    Passwd {
        /// Their name.
        name: String,
        /// Read the password from this file's first line.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Remove a user.
    Del {
        /// Their name.
        name: String,
    },
    /// The users, their roles and addresses.
    List,
}

/// The password for `user add`/`passwd`: the file's first line, or a random one printed once
/// (to the terminal of the operator who asked, never to a log).
fn password_hash(file: &Option<PathBuf>, name: &str) -> Result<String, (u8, String)> {
    let password = match file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).map_err(|e| (1u8, format!("{}: {e}", f.display())))?;
            let line = text.lines().next().unwrap_or("").to_string();
            if line.len() < 12 {
                return Err((
                    1,
                    format!("{}: a password needs 12 characters or more", f.display()),
                ));
            }
            line
        }
        None => {
            let p = console::users::random_password();
            // Shown once the daemon has taken it (`main`), not for a refused request.
            let _ = MADE_PASSWORD.set((name.to_string(), p.clone()));
            p
        }
    };
    console::users::hash_password(&password).map_err(|e| (1, e))
}

/// A password `user add`/`passwd` made, with its user: printed after the daemon took it.
static MADE_PASSWORD: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

#[derive(Subcommand)]
enum ConfigCmd {
    /// Per key: the configuration file's value, each level that sets it (with the stamp of the
    /// change), and the value in effect here; then changes that lost to newer ones.
    Show {
        /// One key (default: every clusterable key).
        key: Option<String>,
    },
    /// Set KEY to a TOML VALUE (`'["a.example", ".b.example"]'`, `'[]'`) at a level, validated
    /// here first, applied live, sent to every member.
    Set {
        /// The key, e.g. smtp.relay_domains.
        key: String,
        /// The value, in TOML.
        value: String,
        /// cluster (every unit), group:NAME (units whose machine.group is NAME, overriding
        /// cluster), machine (this unit, overriding both) or machine:NODE.
        #[arg(long, default_value = "cluster")]
        level: String,
    },
    /// Print the configuration in effect here (file and clustered settings) as a TOML file
    /// that `spoold --check-config` accepts.
    Export,
    /// Copy KEY's value from one level to another.
    Copy {
        /// The key.
        key: String,
        /// cluster, group:NAME or machine[:NODE].
        #[arg(long)]
        from: String,
        /// cluster, group:NAME or machine[:NODE].
        #[arg(long)]
        to: String,
    },
    /// Move KEY's value from one level to another (unset at --from afterwards).
    Move {
        /// The key.
        key: String,
        /// cluster, group:NAME or machine[:NODE].
        #[arg(long)]
        from: String,
        /// cluster, group:NAME or machine[:NODE].
        #[arg(long)]
        to: String,
    },
    /// Unset KEY at a level (a lower level or the file applies again).
    Unset {
        /// The key.
        key: String,
        /// cluster, group:NAME, machine or machine:NODE.
        #[arg(long, default_value = "cluster")]
        level: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// The entries, oldest first.
    List {
        /// Only entries numbered from this one.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// At most this many (the newest).
        #[arg(long)]
        limit: Option<usize>,
        /// Read the log in this directory, here (no daemon).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Prove the log: every line in sequence and linked to the one before, every checkpoint
    /// signed and matching. Exits 1 naming each break.
    Verify {
        /// Prove the log in this directory, here (no daemon): a copy an auditor received.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// With --dir: the trusted public key (hex, or a file holding it); without one, the
        /// key the log's first line names.
        #[arg(long = "public-key")]
        public_keys: Vec<String>,
        /// On a unit: compare with the checkpoints of the log each mirror peer keeps.
        #[arg(long)]
        against_peers: bool,
    },
}

#[derive(Subcommand)]
enum ArchiveCmd {
    /// Search: from: to: subject: body: filename: msgid: id: origin: after:DATE before:DATE
    /// has:attachment size:>N size:<N, bare words and "phrases", all required. Newest first.
    Search {
        /// The query (quote it for the shell).
        query: String,
        /// Items listed at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Skip this many of the newest matches first (the next page).
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },
    /// Envelope, verdict, headers and MIME parts of one item (its number or spool id).
    Show { id: String },
    /// The exact accepted bytes of one item, on standard output (verified against its hash);
    /// or, with --query, every item a query selects written to --out (by the daemon) as an
    /// mboxrd file or a Maildir, with a signed manifest beside it (OUT.manifest.jsonl).
    Export {
        /// The item: its number or spool id.
        #[arg(required_unless_present = "query", conflicts_with = "query")]
        id: Option<String>,
        /// Every item this search query selects (or a number, or a spool id).
        #[arg(long, requires = "out")]
        query: Option<String>,
        /// With --query: `mbox` (mboxrd; `archive import` reads it back exactly), `maildir`, or
        /// `eml-zip` (a zip of `<item>.eml` files).
        #[arg(long, default_value = "mbox", value_parser = ["mbox", "maildir", "eml-zip"])]
        format: String,
        /// With --query: where (must not exist).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Put an item, or every item a query matches, on legal hold (never removed by retention).
    Hold { target: String },
    /// Release a legal hold.
    Unhold { target: String },
    /// Items, bytes stored against raw, segments, index and per-peer mirror backlog.
    Status,
    /// Seal the open segment now, so that it goes to the object store (it is sealed by age
    /// anyway: `archive.seal_secs`).
    Seal,
    /// Run the retention pass now, then compact sparse segments.
    Retention,
    /// Rebuild the full-text index from the catalog.
    Reindex,
    /// Prove the archive: every entry of its hash chain present and linked, every checkpoint's
    /// signature and hash, every item's body against its hash (and, on a unit, the catalog's
    /// items and the index's count). Exits 1 when anything does not hold, naming each break.
    /// With --dir it runs here, with no daemon, on an archive directory as copied out
    /// (`segments/` and `checkpoints`): an auditor's machine needs the public key alone.
    Verify {
        /// Take the entries the newest valid checkpoint covers as proved by it: a quick run that
        /// checks what changed since.
        #[arg(long)]
        from_checkpoint: bool,
        /// Start at the newest checkpoint signed at or before this time (RFC 3339, or ms since
        /// the epoch): what changed since is proved, what came before is taken as proved by it.
        #[arg(long, value_parser = parse_when)]
        since: Option<u64>,
        /// Prove the archive in this directory, here (no daemon).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// With --dir: a trusted public key (64 hex digits, or a file holding them), from
        /// `spoolctl archive key`; repeat for an archive that changed units. Without one the
        /// keys the chain names are used, and the report says so.
        #[arg(long = "public-key")]
        public_keys: Vec<String>,
        /// With --dir: a checkpoints file another holder kept (a mirror peer's, the object
        /// store's); each of its checkpoints must hold and be in the local file. Repeatable.
        #[arg(long = "peer-checkpoints")]
        peer_checkpoints: Vec<std::path::PathBuf>,
        /// With --dir: the archive's keyring file (0600), to open its sealed records; without
        /// it a sealed record is a break naming the key it needs.
        #[arg(long)]
        keyring: Option<std::path::PathBuf>,
        /// On a unit: compare with the checkpoints each mirror peer keeps of this archive (a
        /// rewrite of this unit's chain and checkpoints cannot rewrite theirs).
        #[arg(long)]
        against_peers: bool,
        /// On a unit: compare with the checkpoints uploaded to the object store (with every
        /// segment, and at least every 15 minutes).
        #[arg(long)]
        against_store: bool,
    },
    /// The public key that signs this unit's archive checkpoints (give it to auditors), and
    /// the data keys that seal its records (ids only).
    Key {
        #[command(subcommand)]
        cmd: Option<KeyCmd>,
    },
    /// Check a bulk export (an mbox file or a Maildir) against its manifest, here, with no
    /// daemon: the manifest's signature over its item lines, each message's hash and size,
    /// nothing missing and nothing added. Exits 1 naming each break.
    VerifyExport {
        /// The export (its manifest is PATH.manifest.jsonl).
        path: std::path::PathBuf,
        /// A trusted public key (64 hex digits, or a file holding them), from `spoolctl
        /// archive key`; without one the key the manifest names is used, and the report says so.
        #[arg(long = "public-key")]
        public_keys: Vec<String>,
    },
    /// Import mail from files the daemon reads: mbox files (mboxrd quoting, or --mboxo),
    /// Maildir folders, directories of .eml files, single message files. Every message is
    /// archived once (a rerun, or the same message in two sources, is a duplicate), with its
    /// original arrival time where the source has one; each refused one is named with why.
    Import {
        /// Files and directories.
        #[arg(required_unless_present = "imap")]
        paths: Vec<std::path::PathBuf>,
        /// Import an IMAP mailbox instead: `imaps://user@host[:port]/mailbox`, or `imap://…`
        /// (STARTTLS; never in clear). Read-only; a rerun goes on after the last UID imported.
        #[arg(long, conflicts_with = "paths", requires = "password_file")]
        imap: Option<String>,
        /// With --imap: the file holding the password.
        #[arg(long)]
        password_file: Option<std::path::PathBuf>,
        /// With --imap: PEM certificates to trust for the server (default: the system's).
        #[arg(long)]
        ca_file: Option<std::path::PathBuf>,
        /// With --imap: only messages the server dates on or after this day (YYYY-MM-DD).
        #[arg(long)]
        since: Option<String>,
        /// The mbox files use mboxo quoting (only `>From ` was quoted).
        #[arg(long)]
        mboxo: bool,
        /// Write one tab-separated line per message here: verdict (archived, duplicate,
        /// rejected), source, place, item number or reason.
        #[arg(long)]
        report: Option<std::path::PathBuf>,
    },
    /// Seal every record with the current data key: segments holding records in clear (from
    /// before encryption) or sealed with an older key are rewritten. After it, older keys can
    /// leave the keyring.
    Rekey,
    /// Rebuild the catalog from the segments (a lost catalog; or a new unit adopting a lost
    /// unit's archive with `archive.object_store.adopt`), or follow the rebuild under way;
    /// then verify.
    Rebuild,
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Add a data key to the keyring (the file is rewritten first, 0600); it seals every
    /// record from now on, and older keys stay to read what they sealed (`archive rekey`
    /// moves it). Copy the keyring to its backup afterwards.
    Rotate,
}

#[derive(Subcommand)]
enum QueueCmd {
    /// List messages (spool, vscan, hold, quarantine unless --folder).
    List {
        /// Only this folder.
        #[arg(long)]
        folder: Option<String>,
        /// Sender contains.
        #[arg(long)]
        sender: Option<String>,
        /// A recipient contains.
        #[arg(long)]
        rcpt: Option<String>,
        /// Older than this many seconds.
        #[arg(long)]
        older_than: Option<u64>,
    },
    /// Envelope, headers and delivery history of one message.
    Show { id: String },
    /// Keep messages from delivery (moves them to hold/).
    Hold(Ids),
    /// Release held messages and retry them now.
    Release(Ids),
    /// Retry messages now.
    Requeue(Ids),
    /// Remove messages for good.
    Delete(Ids),
}

#[derive(clap::Args)]
struct Ids {
    /// Message ids.
    ids: Vec<String>,
    /// Every message the filters select (as for `queue list`).
    #[arg(long)]
    all: bool,
    /// With --all: only this folder.
    #[arg(long)]
    folder: Option<String>,
    /// With --all: sender contains.
    #[arg(long)]
    sender: Option<String>,
    /// With --all: a recipient contains.
    #[arg(long)]
    rcpt: Option<String>,
}

fn call(state_dir: &std::path::Path, req: &Request) -> Result<Value, (u8, String)> {
    call_with_progress(state_dir, req, |_| {})
}

/// Sends one request and returns its answer's data; progress lines that come before the
/// answer go to `on_progress`.
fn call_with_progress(
    state_dir: &std::path::Path,
    req: &Request,
    mut on_progress: impl FnMut(&api::Progress),
) -> Result<Value, (u8, String)> {
    let path = state_dir.join("spoold.sock");
    let mut s = UnixStream::connect(&path)
        .map_err(|e| (3, format!("cannot reach spoold at {}: {e}", path.display())))?;
    let line = serde_json::to_string(req).map_err(|e| (2, format!("encode the request: {e}")))?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| (3, format!("send to spoold: {e}")))?;
    let mut answer = BufReader::new(s);
    loop {
        let mut reply = String::new();
        answer
            .read_line(&mut reply)
            .map_err(|e| (3, format!("read from spoold: {e}")))?;
        let line: Line = serde_json::from_str(&reply)
            .map_err(|e| (3, format!("bad answer from spoold: {e}")))?;
        match line {
            Line::Progress { progress } => on_progress(&progress),
            Line::Answer { ok: true, data, .. } => return Ok(data.unwrap_or(Value::Null)),
            Line::Answer { error, .. } => {
                return Err((1, error.unwrap_or_else(|| "refused".into())))
            }
        }
    }
}

fn ids_for(cli: &Cli, ids: &Ids) -> Result<Vec<String>, (u8, String)> {
    if !ids.all {
        if ids.ids.is_empty() {
            return Err((2, "give message ids or --all".into()));
        }
        return Ok(ids.ids.clone());
    }
    let list = call(
        &cli.state_dir,
        &Request::from(Local::List {
            folder: ids.folder.clone(),
            sender: ids.sender.clone(),
            rcpt: ids.rcpt.clone(),
            older_than_secs: None,
        }),
    )?;
    let list: Vec<api::Listed> = data_as(&list).map_err(|e| (3, e))?;
    Ok(list.into_iter().map(|m| m.id).collect())
}

/// The answer to `cmd` as a person reads it; `Err` when it is not the reply the request
/// expects.
fn human(cmd: &Cmd, data: &Value) -> Result<String, String> {
    Ok(match cmd {
        Cmd::Queue {
            cmd: QueueCmd::List { .. },
        } => text::<Vec<api::Listed>>(data)?,
        Cmd::Queue {
            cmd: QueueCmd::Show { .. },
        } => text::<api::Shown>(data)?,
        Cmd::Insert => text::<api::Inserted>(data)?,
        Cmd::Recover { .. } => text::<api::Recovered>(data)?,
        Cmd::Status => text::<api::Status>(data)?,
        Cmd::Role { .. } => text::<api::RoleSet>(data)?,
        Cmd::Archive { cmd } => archive_human(cmd, data)?,
        Cmd::Audit {
            cmd: AuditCmd::List { .. },
        } => text::<Vec<evidence::audit::Entry>>(data)?,
        Cmd::Audit {
            cmd: AuditCmd::Verify { .. },
        } => text::<evidence::audit::AuditProof>(data)?,
        Cmd::Config {
            cmd: ConfigCmd::Show { .. },
        } => text::<api::ConfigShown>(data)?,
        Cmd::Cluster {
            cmd: ClusterCmd::Check { .. },
        } => text::<api::ClusterChecked>(data)?,
        Cmd::Cluster {
            cmd: ClusterCmd::Status | ClusterCmd::Disconnect { .. } | ClusterCmd::Reconnect { .. },
        } => text::<api::ClusterStatus>(data)?,
        Cmd::Cluster {
            cmd:
                ClusterCmd::Create { .. }
                | ClusterCmd::Join { .. }
                | ClusterCmd::Leave
                | ClusterCmd::Remove { .. }
                | ClusterCmd::List,
        }
        | Cmd::Group { .. }
        | Cmd::Machine { .. } => text::<api::ClusterList>(data)?,
        Cmd::Config {
            cmd: ConfigCmd::Export,
        } => text::<api::ConfigExported>(data)?,
        Cmd::Config { .. } => text::<api::ConfigChanged>(data)?,
        Cmd::Track { .. } => text::<api::Tracked>(data)?,
        Cmd::Flush => text::<api::Flushed>(data)?,
        Cmd::User { cmd: UserCmd::List } => text::<Vec<api::ListedUser>>(data)?,
        Cmd::User { .. } => text::<api::UserChanged>(data)?,
        Cmd::Queue { .. } => text::<api::Each>(data)?,
    })
}

/// The reply as a person reads it.
fn text<T: render::Render + for<'de> serde::Deserialize<'de>>(
    data: &Value,
) -> Result<String, String> {
    Ok(render::to_text(&data_as::<T>(data)?))
}

fn archive_human(cmd: &ArchiveCmd, data: &Value) -> Result<String, String> {
    Ok(match cmd {
        ArchiveCmd::Search { .. } => text::<api::ArchiveFound>(data)?,
        ArchiveCmd::Show { .. } => text::<api::ArchiveShown>(data)?,
        ArchiveCmd::Export { query: None, .. } => String::new(), // written as bytes by main
        ArchiveCmd::Export { query: Some(_), .. } => text::<api::ArchiveBulkExported>(data)?,
        ArchiveCmd::Hold { .. } | ArchiveCmd::Unhold { .. } => text::<api::ArchiveHeld>(data)?,
        ArchiveCmd::Status => text::<api::ArchiveStatus>(data)?,
        ArchiveCmd::Seal => text::<api::ArchiveSealed>(data)?,
        ArchiveCmd::Retention => text::<api::ArchiveExpired>(data)?,
        ArchiveCmd::Verify { dir: Some(_), .. } => text::<evidence::proof::Proof>(data)?,
        ArchiveCmd::Verify { dir: None, .. } => text::<api::ArchiveVerified>(data)?,
        ArchiveCmd::Key { .. } => text::<api::ArchiveKey>(data)?,
        ArchiveCmd::Rekey => text::<api::ArchiveRekeyed>(data)?,
        ArchiveCmd::VerifyExport { .. } => text::<evidence::export::ExportProof>(data)?,
        ArchiveCmd::Import { .. } => text::<api::ArchiveImported>(data)?,
        ArchiveCmd::Reindex => text::<api::ArchiveReindexed>(data)?,
        ArchiveCmd::Rebuild => text::<api::ArchiveRebuilt>(data)?,
    })
}

fn archive_request(cmd: &ArchiveCmd) -> Request {
    match cmd {
        // Checked here, with no daemon: `run` answers it before asking the daemon anything.
        ArchiveCmd::VerifyExport { .. } => unreachable!("verify-export asks no daemon"),
        ArchiveCmd::Search {
            query,
            limit,
            offset,
        } => Request::from(Local::ArchiveSearch {
            query: query.clone(),
            limit: *limit,
            offset: *offset,
            scope: None,
        }),
        ArchiveCmd::Show { id } => Request::from(Local::ArchiveShow {
            id: id.clone(),
            scope: None,
        }),
        ArchiveCmd::Export {
            id, query: None, ..
        } => Request::from(Local::ArchiveExport {
            id: id.clone().unwrap_or_default(),
            view: false,
            scope: None,
        }),
        ArchiveCmd::Export {
            query: Some(query),
            format,
            out,
            ..
        } => Request::from(Long::ArchiveBulkExport {
            query: query.clone(),
            format: format.clone(),
            out: out.as_deref().map(from_root).unwrap_or_default(),
            progress: true,
        }),
        ArchiveCmd::Hold { target } => Request::from(Local::ArchiveHold {
            target: target.clone(),
            held: true,
        }),
        ArchiveCmd::Unhold { target } => Request::from(Local::ArchiveHold {
            target: target.clone(),
            held: false,
        }),
        ArchiveCmd::Status => Request::from(Local::ArchiveStatus),
        ArchiveCmd::Seal => Request::from(Local::ArchiveSeal),
        ArchiveCmd::Retention => Request::from(Long::ArchiveRetention { progress: true }),
        ArchiveCmd::Reindex => Request::from(Long::ArchiveReindex { progress: true }),
        ArchiveCmd::Rebuild => Request::from(Long::ArchiveRebuild { progress: true }),
        ArchiveCmd::Verify {
            from_checkpoint,
            since,
            against_peers,
            against_store,
            ..
        } => Request::from(Long::ArchiveVerify {
            progress: true,
            from_checkpoint: *from_checkpoint,
            since_ms: *since,
            against_peers: *against_peers,
            against_store: *against_store,
        }),
        ArchiveCmd::Key { cmd: None } => Request::from(Local::ArchiveKey),
        ArchiveCmd::Key {
            cmd: Some(KeyCmd::Rotate),
        } => Request::from(Local::ArchiveKeyRotate),
        ArchiveCmd::Rekey => Request::from(Long::ArchiveRekey { progress: true }),
        ArchiveCmd::Import {
            paths,
            mboxo,
            report,
            imap,
            password_file,
            ca_file,
            since,
        } => Request::from(Long::ArchiveImport {
            paths: paths.iter().map(|p| from_root(p)).collect(),
            mboxo: *mboxo,
            report: report.as_deref().map(from_root),
            imap: imap.clone(),
            password_file: password_file.as_deref().map(from_root),
            ca_file: ca_file.as_deref().map(from_root),
            since: since.clone(),
            progress: true,
        }),
    }
}

/// A path the daemon reads or writes, named from the root (the daemon's working directory is
/// not the caller's).
fn from_root(p: &std::path::Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// A time on the command line: RFC 3339, or ms since the epoch.
fn parse_when(v: &str) -> Result<u64, String> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis().max(0) as u64)
        .map_err(|e| {
            format!("{v:?}: neither RFC 3339 (2026-12-01T00:00:00Z) nor ms since the epoch: {e}")
        })
}

/// `archive verify --dir`: the proof here, over files, with no daemon.
fn prove_offline(
    dir: &std::path::Path,
    start: evidence::proof::Start,
    public_keys: &[String],
    peer_checkpoints: &[std::path::PathBuf],
    keyring: Option<&std::path::Path>,
) -> Result<Value, (u8, String)> {
    let usage = |msg: String| (2u8, msg);
    let trusted = trusted_keys(public_keys)?;
    let keys = match keyring {
        None => None,
        Some(path) => match evidence::seal::Keyring::load(path) {
            Ok(Some(k)) => Some(std::sync::Arc::new(k)),
            Ok(None) => return Err(usage(format!("--keyring {}: no such file", path.display()))),
            Err(e) => return Err(usage(format!("--keyring: {e}"))),
        },
    };
    let mut elsewhere = Vec::new();
    for file in peer_checkpoints {
        let text = std::fs::read_to_string(file)
            .map_err(|e| usage(format!("--peer-checkpoints {}: {e}", file.display())))?;
        let theirs = evidence::checkpoint::parse_all(&text)
            .map_err(|e| usage(format!("--peer-checkpoints {} {e}", file.display())))?;
        elsewhere.push((file.display().to_string(), theirs));
    }
    if !dir.join("segments").is_dir() {
        return Err(usage(format!(
            "--dir {}: no segments/ there (give the archive's directory)",
            dir.display()
        )));
    }
    let proof = evidence::proof::prove_dir(dir, trusted, start, &elsewhere, keys)
        .map_err(|e| (1u8, e.to_string()))?;
    serde_json::to_value(proof).map_err(|e| (3u8, e.to_string()))
}

/// `audit list|verify --dir`: over files, with no daemon.
fn audit_offline(cmd: &AuditCmd) -> Option<Result<Value, (u8, String)>> {
    let to_value = |v: Result<Value, serde_json::Error>| v.map_err(|e| (3u8, e.to_string()));
    match cmd {
        AuditCmd::List {
            dir: Some(dir),
            from,
            limit,
        } => Some(
            evidence::audit::list(dir)
                .map_err(|e| (1u8, e.to_string()))
                .and_then(|all| {
                    let mut entries: Vec<_> = all.into_iter().filter(|e| e.n >= *from).collect();
                    if let Some(limit) = limit {
                        let cut = entries.len().saturating_sub(*limit);
                        entries.drain(..cut);
                    }
                    to_value(serde_json::to_value(entries))
                }),
        ),
        AuditCmd::Verify {
            dir: Some(dir),
            public_keys,
            ..
        } => Some(trusted_keys(public_keys).and_then(|keys| {
            evidence::audit::prove(dir, &keys, &[])
                .map_err(|e| (1u8, e.to_string()))
                .and_then(|p| to_value(serde_json::to_value(p)))
        })),
        _ => None,
    }
}

/// `--public-key` values: 64 hex digits, or files holding them.
fn trusted_keys(public_keys: &[String]) -> Result<Vec<[u8; 32]>, (u8, String)> {
    public_keys
        .iter()
        .map(|k| {
            let text = std::fs::read_to_string(k).unwrap_or_else(|_| k.clone());
            evidence::unhex::<32>(text.trim()).ok_or_else(|| {
                (
                    2u8,
                    format!("--public-key {k:?}: neither 64 hex digits nor a file holding them"),
                )
            })
        })
        .collect()
}

fn run(cli: &Cli, on_progress: impl FnMut(&api::Progress)) -> Result<Value, (u8, String)> {
    let req = match &cli.cmd {
        Cmd::Archive {
            cmd: ArchiveCmd::VerifyExport { path, public_keys },
        } => {
            let trusted = trusted_keys(public_keys)?;
            let proof =
                evidence::export::verify(path, &trusted).map_err(|e| (1u8, e.to_string()))?;
            return serde_json::to_value(proof).map_err(|e| (3u8, e.to_string()));
        }
        Cmd::Archive {
            cmd:
                ArchiveCmd::Verify {
                    dir: Some(dir),
                    from_checkpoint,
                    since,
                    public_keys,
                    peer_checkpoints,
                    keyring,
                    ..
                },
        } => {
            let start = evidence::proof::Start::from_flags(*since, *from_checkpoint);
            return prove_offline(
                dir,
                start,
                public_keys,
                peer_checkpoints,
                keyring.as_deref(),
            );
        }
        Cmd::Archive { cmd } => {
            return call_with_progress(&cli.state_dir, &archive_request(cmd), on_progress)
        }
        Cmd::Audit { cmd } => {
            if let Some(done) = audit_offline(cmd) {
                return done;
            }
            match cmd {
                AuditCmd::List { from, limit, .. } => Request::from(Local::AuditList {
                    from: *from,
                    limit: *limit,
                }),
                AuditCmd::Verify { against_peers, .. } => Request::from(Local::AuditVerify {
                    against_peers: *against_peers,
                }),
            }
        }
        Cmd::Status => Request::from(Local::Status),
        Cmd::Role { role } => Request::from(Local::Role { role: role.clone() }),
        Cmd::Insert => Request::from(Local::Insert),
        Cmd::Flush => Request::from(Local::Flush),
        Cmd::Cluster { cmd } => match cmd {
            ClusterCmd::Status => Request::from(Cluster::ClusterStatus),
            ClusterCmd::Check { resolve_from } => Request::from(Cluster::ClusterCheck {
                resolve_from: resolve_from.clone(),
            }),
            ClusterCmd::Disconnect { node } => Request::from(Cluster::ClusterDisconnect {
                disconnected: true,
                node: node.clone(),
            }),
            ClusterCmd::Reconnect { node } => Request::from(Cluster::ClusterDisconnect {
                disconnected: false,
                node: node.clone(),
            }),
            ClusterCmd::Create { name } => {
                Request::from(Cluster::ClusterCreate { name: name.clone() })
            }
            ClusterCmd::Join { addr } => Request::from(Cluster::ClusterJoin { addr: addr.clone() }),
            ClusterCmd::Leave => Request::from(Cluster::ClusterLeave),
            ClusterCmd::Remove { node } => {
                Request::from(Cluster::ClusterRemove { node: node.clone() })
            }
            ClusterCmd::List => Request::from(Cluster::ClusterList),
        },
        Cmd::User { cmd } => match cmd {
            UserCmd::Add {
                name,
                role,
                addresses,
                password_file,
            } => {
                let parsed = role
                    .parse::<console::policy::Role>()
                    .map_err(|e| (1u8, e))?;
                console::users::check_name(name).map_err(|e| (1u8, e))?;
                if parsed == console::policy::Role::User && addresses.is_empty() {
                    return Err((1, "the user role needs --address (their own mail)".into()));
                }
                Request::from(Cluster::UserAdd {
                    name: name.clone(),
                    role: role.clone(),
                    password_hash: password_hash(password_file, name)?,
                    addresses: addresses.clone(),
                })
            }
            UserCmd::Passwd {
                name,
                password_file,
            } => Request::from(Cluster::UserPasswd {
                name: name.clone(),
                password_hash: password_hash(password_file, name)?,
            }),
            UserCmd::Del { name } => Request::from(Cluster::UserDel { name: name.clone() }),
            UserCmd::List => Request::from(Local::UserList),
        },
        Cmd::Group { cmd } => match cmd {
            GroupCmd::Add { name } => Request::from(Cluster::GroupAdd { name: name.clone() }),
            GroupCmd::Rename { from, to } => Request::from(Cluster::GroupRename {
                from: from.clone(),
                to: to.clone(),
            }),
            GroupCmd::Delete { name } => Request::from(Cluster::GroupDelete { name: name.clone() }),
        },
        Cmd::Machine {
            cmd: MachineCmd::Setgroup { node, group },
        } => Request::from(Cluster::MachineSetGroup {
            node: node.clone(),
            group: group.clone(),
        }),
        Cmd::Config { cmd } => match cmd {
            ConfigCmd::Show { key } => Request::from(Local::ConfigShow { key: key.clone() }),
            ConfigCmd::Export => Request::from(Local::ConfigExport),
            ConfigCmd::Copy { key, from, to } => Request::from(Cluster::ConfigCopy {
                key: key.clone(),
                from: from.clone(),
                to: to.clone(),
                remove: false,
            }),
            ConfigCmd::Move { key, from, to } => Request::from(Cluster::ConfigCopy {
                key: key.clone(),
                from: from.clone(),
                to: to.clone(),
                remove: true,
            }),
            ConfigCmd::Set { key, value, level } => Request::from(Cluster::ConfigSet {
                key: key.clone(),
                value: Some(value.clone()),
                level: level.clone(),
            }),
            ConfigCmd::Unset { key, level } => Request::from(Cluster::ConfigSet {
                key: key.clone(),
                value: None,
                level: level.clone(),
            }),
        },
        Cmd::Track { query, limit } => Request::from(Cluster::Track {
            query: query.join(" "),
            limit: *limit,
        }),
        Cmd::Recover { dry_run, from_dir } => {
            let req = Request::from(Long::Recover {
                dry_run: *dry_run,
                from_dir: from_dir.as_ref().map(|p| p.display().to_string()),
                progress: true,
            });
            return call_with_progress(&cli.state_dir, &req, on_progress);
        }
        Cmd::Queue { cmd } => match cmd {
            QueueCmd::List {
                folder,
                sender,
                rcpt,
                older_than,
            } => Request::from(Local::List {
                folder: folder.clone(),
                sender: sender.clone(),
                rcpt: rcpt.clone(),
                older_than_secs: *older_than,
            }),
            QueueCmd::Show { id } => Request::from(Local::Show { id: id.clone() }),
            QueueCmd::Hold(ids) => Request::from(Local::Hold {
                ids: ids_for(cli, ids)?,
            }),
            QueueCmd::Release(ids) => Request::from(Local::Release {
                ids: ids_for(cli, ids)?,
            }),
            QueueCmd::Requeue(ids) => Request::from(Local::Requeue {
                ids: ids_for(cli, ids)?,
            }),
            QueueCmd::Delete(ids) => Request::from(Local::Delete {
                ids: ids_for(cli, ids)?,
            }),
        },
    };
    call(&cli.state_dir, &req)
}

/// With `SPOOLPAIR_MAN_DIR` set, spoolctl writes its manual pages there and exits: `spoolctl.1`
/// and one `spoolctl-<command>[-<subcommand>].1` per command, from the same definitions that
/// parse its command line (so the two cannot drift). The Debian package is built with them.
fn write_manuals(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut top = Cli::command();
    top.build();
    write_manual(dir, &top, &[])
}

/// The page of `cmd` (reached by `path` of subcommand names) and those of its subcommands.
fn write_manual(dir: &std::path::Path, cmd: &clap::Command, path: &[&str]) -> std::io::Result<()> {
    let mut names = vec!["spoolctl"];
    names.extend_from_slice(path);
    let page_name = names.join("-");
    let page = cmd
        .clone()
        .name(page_name.clone())
        .bin_name(names.join(" "));
    let mut roff = Vec::new();
    clap_mangen::Man::new(page).render(&mut roff)?;
    std::fs::write(dir.join(format!("{page_name}.1")), roff)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut deeper = path.to_vec();
        deeper.push(sub.get_name());
        write_manual(dir, sub, &deeper)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    if let Some(dir) = std::env::var_os("SPOOLPAIR_MAN_DIR") {
        return match write_manuals(std::path::Path::new(&dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "spoolctl: write the manual pages to {}: {e}",
                    dir.to_string_lossy()
                );
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    // Recovery can take a while on a large spool: count its steps (on a terminal only).
    let long = matches!(
        cli.cmd,
        Cmd::Recover { .. }
            | Cmd::Archive {
                cmd: ArchiveCmd::Retention
                    | ArchiveCmd::Reindex
                    | ArchiveCmd::Verify { dir: None, .. }
                    | ArchiveCmd::Rebuild
                    | ArchiveCmd::Rekey
                    | ArchiveCmd::Import { .. }
                    | ArchiveCmd::Export { query: Some(_), .. }
            }
    );
    let bar = (long && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let pb = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:>16} [{bar:40}] {pos}/{len} {elapsed} {per_sec:>10} eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message("listing");
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb
    });
    let result = run(&cli, |p| {
        if let Some(pb) = &bar {
            pb.set_length(p.total as u64);
            pb.set_position(p.done as u64);
            pb.set_message(p.step.clone());
        }
    });
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    if let (Ok(_), Some((name, password))) = (&result, MADE_PASSWORD.get()) {
        println!("password for {name}: {password}");
    }
    match result {
        Ok(data)
            if !cli.json
                && matches!(
                    cli.cmd,
                    Cmd::Archive {
                        cmd: ArchiveCmd::Export { query: None, .. }
                    }
                ) =>
        {
            use base64::Engine;
            let exported: api::ArchiveExported = match data_as(&data) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("spoolctl: {e}");
                    return ExitCode::from(3);
                }
            };
            match base64::engine::general_purpose::STANDARD.decode(exported.base64) {
                Ok(raw) => {
                    let mut stdout = std::io::stdout().lock();
                    if let Err(e) = stdout.write_all(&raw).and_then(|()| stdout.flush()) {
                        eprintln!("spoolctl: write the message: {e}");
                        return ExitCode::from(1);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("spoolctl: bad export from spoold: {e}");
                    ExitCode::from(3)
                }
            }
        }
        Ok(data) => {
            let text = if cli.json {
                format!("{data}\n")
            } else {
                match human(&cli.cmd, &data) {
                    Ok(text) => text,
                    Err(e) => {
                        eprintln!("spoolctl: {e}");
                        return ExitCode::from(3);
                    }
                }
            };
            print!("{text}");
            let partly_failed = data["failed"].as_array().is_some_and(|f| !f.is_empty())
                || data["break_count"].as_u64().is_some_and(|n| n > 0)
                || data["breaks"].as_array().is_some_and(|b| !b.is_empty())
                || data["proof"]["break_count"].as_u64().is_some_and(|n| n > 0)
                || data["corrupt"].as_array().is_some_and(|c| !c.is_empty());
            let _ = std::io::stdout().flush();
            ExitCode::from(u8::from(partly_failed))
        }
        Err((code, msg)) => {
            eprintln!("spoolctl: {msg}");
            ExitCode::from(code)
        }
    }
}
