//! Who shares clustered settings with this unit, and the exchanges with them: the members of
//! its cluster over the cluster link (`[cluster]`: its own listener and shared secret, the
//! peer link's `ClusterConfig` channel), or, for a unit in no cluster, its HA partner over the
//! replication link's recovery channel. Here: `spoolctl cluster create|join|leave|list|status|
//! check|disconnect|reconnect`, `group add|rename|delete`, `machine setgroup`, the exchange
//! after every change and every [`SYNC_EVERY`], and `spoolctl track` asked of every member.
//!
//! A join is a request to any member: it records the newcomer (a `cluster.member` entry, which
//! then reaches the others like any change) and answers the cluster's settings, which replace
//! the newcomer's after a backup. Each member exchanges with every other: no primary, no
//! coordinator; a member that was away catches up at its first exchange.
//!
//! Not here: the settings themselves, their levels, stamps and merge (`cluster.rs`).

use crate::cluster::{Exchange, Settings, GROUP_KEY, GROUP_MARK_KEY, MEMBER_KEY, PROTOCOL};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use peer::link::{self, LinkConfig};
use peer::proto::{cluster_op, recovery_op, Channel, Frame};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use track::Tracker;

/// How often a unit exchanges its settings with each member, besides right after a change
/// here: a member that was away catches up within this of its return.
pub const SYNC_EVERY: Duration = Duration::from_secs(2);
/// A member that does not answer within this is reported unreachable.
const ASK_WITHIN: Duration = Duration::from_secs(5);

/// What this unit saw of another in its last exchange.
#[derive(Clone, Debug, Default)]
struct Seen {
    last_ok_ms: u64,
    last_latency_ms: u64,
    /// How long the last exchange that brought it something it lacked took.
    last_change_ms: Option<u64>,
    version: Option<String>,
    differing: Vec<String>,
    last_error: Option<String>,
}

/// Another unit to exchange with.
#[derive(Clone, Debug)]
enum Other {
    /// The HA partner, over the replication link (a unit in no cluster).
    Partner,
    /// A cluster member, over the cluster link.
    Member { node: String, addr: SocketAddr },
}

/// What a request is for, whichever link carries it.
#[derive(Clone, Copy)]
enum Ask {
    Settings,
    Track,
    Join,
}

#[derive(Serialize, Deserialize)]
struct JoinRequest {
    node: String,
    addr: String,
    protocol: u32,
}

/// Membership and exchanges of this unit.
pub struct Membership {
    settings: Arc<Settings>,
    tracker: Arc<Tracker>,
    replicator: Option<Arc<hasync::Replicator>>,
    /// The cluster link's identity and this unit's advertised address (`[cluster]`).
    link: Option<(LinkConfig, SocketAddr)>,
    seen: Mutex<BTreeMap<String, Seen>>,
    metrics: Arc<crate::metrics::Metrics>,
}

fn now_ms() -> u64 {
    crate::sink::now_ms()
}

fn stamp_text(s: &crate::cluster::Stamp) -> String {
    format!("{}.{}@{}", s.ms, s.counter, s.node)
}

impl Membership {
    /// `link`: the cluster link's identity and advertised address, when `[cluster]` is set.
    pub fn new(
        settings: Arc<Settings>,
        tracker: Arc<Tracker>,
        replicator: Option<Arc<hasync::Replicator>>,
        link: Option<(LinkConfig, SocketAddr)>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Membership {
        Membership {
            settings,
            tracker,
            replicator,
            link,
            seen: Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The units this one exchanges with now: the other members of its cluster, else its
    /// partner; without those an operator disconnected.
    fn others(&self) -> Vec<Other> {
        if self.settings.disconnected() {
            return Vec::new();
        }
        self.compared()
    }

    /// The units `cluster check` compares with (only looking: a disconnected unit too).
    fn compared(&self) -> Vec<Other> {
        let paused = self.settings.paused();
        if self.settings.cluster_name().is_some() {
            return self
                .settings
                .members()
                .into_iter()
                .filter(|(n, _)| n != self.settings.node() && !paused.contains(n))
                .filter_map(|(node, addr)| {
                    Some(Other::Member {
                        node,
                        addr: addr.parse().ok()?,
                    })
                })
                .collect();
        }
        match &self.replicator {
            Some(r) if !r.peer().is_some_and(|p| paused.contains(&p.node)) => vec![Other::Partner],
            _ => Vec::new(),
        }
    }

    fn name_of(&self, o: &Other) -> String {
        match o {
            Other::Member { node, .. } => node.clone(),
            Other::Partner => self
                .replicator
                .as_ref()
                .and_then(|r| r.peer())
                .map_or_else(|| "partner".to_string(), |p| p.node),
        }
    }

    async fn ask_addr(&self, addr: SocketAddr, ask: Ask, arg: &[u8]) -> Result<Bytes> {
        let (cfg, _) = self
            .link
            .as_ref()
            .ok_or_else(|| anyhow!("no [cluster] section: this unit has no cluster link"))?;
        let op = match ask {
            Ask::Settings => cluster_op::SETTINGS,
            Ask::Track => cluster_op::TRACK,
            Ask::Join => cluster_op::JOIN,
        };
        let asked = tokio::time::timeout(
            ASK_WITHIN,
            link::ask(addr, cfg, Channel::ClusterConfig, op, arg),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "cluster link to {addr}: no answer within {} s",
                ASK_WITHIN.as_secs()
            )
        })?;
        asked
            .map_err(|e| anyhow!("cluster link to {addr}: {e}"))?
            .map_err(|e| anyhow!("cluster link to {addr}: refused: {e}"))
    }

    async fn ask(&self, o: &Other, ask: Ask, arg: &[u8]) -> Result<Bytes> {
        match o {
            Other::Member { addr, .. } => self.ask_addr(*addr, ask, arg).await,
            Other::Partner => {
                let r = self
                    .replicator
                    .as_ref()
                    .ok_or_else(|| anyhow!("no partner"))?;
                let op = match ask {
                    Ask::Settings => recovery_op::SETTINGS,
                    Ask::Track => recovery_op::TRACK,
                    Ask::Join => bail!("joins go over the cluster link"),
                };
                tokio::time::timeout(ASK_WITHIN, r.ask_partner(op, arg))
                    .await
                    .map_err(|_| anyhow!("no answer within {} s", ASK_WITHIN.as_secs()))?
                    .map_err(|e| anyhow!("{e}"))
            }
        }
    }

    /// One exchange: ours go there, theirs come here, each side keeps the newest. Answers
    /// whether anything changed here.
    async fn sync_one(&self, o: &Other) -> Result<bool> {
        let started = Instant::now();
        let exchanged = async {
            let ours = serde_json::to_vec(&self.settings.exchange())?;
            let answer = self.ask(o, Ask::Settings, &ours).await?;
            let theirs: Exchange = serde_json::from_slice(&answer).context("unreadable answer")?;
            let changed = tokio::task::block_in_place(|| self.settings.merge(&theirs))?;
            Ok::<_, anyhow::Error>((theirs, changed))
        }
        .await;
        // The partner's name is known only once its link is up: kept under one key.
        let key = match o {
            Other::Partner => "partner".to_string(),
            Other::Member { node, .. } => node.clone(),
        };
        self.metrics
            .cluster_member_up
            .with_label_values(&[&key])
            .set(i64::from(exchanged.is_ok()));
        self.metrics
            .cluster_conflicts
            .set(self.settings.entries().1.len() as i64);
        let mut seen = self.seen();
        let s = seen.entry(key).or_default();
        match exchanged {
            Ok((theirs, changed)) => {
                let ours = self.settings.exchange();
                s.last_ok_ms = now_ms();
                s.last_latency_ms = started.elapsed().as_millis() as u64;
                s.version = theirs
                    .entries
                    .iter()
                    .map(|e| &e.stamp)
                    .max()
                    .map(stamp_text);
                // What it held before it took ours in: what differed.
                s.differing = ours
                    .entries
                    .iter()
                    .filter(|e| !theirs.entries.contains(e))
                    .map(|e| format!("{} {}", e.key, e.level))
                    .collect();
                if !s.differing.is_empty() {
                    s.last_change_ms = Some(s.last_latency_ms);
                }
                s.last_error = None;
                Ok(changed)
            }
            Err(e) => {
                s.last_error = Some(format!("{e:#}"));
                Err(e)
            }
        }
    }

    /// Exchanges with every other unit at once; answers a line per unit (`sent to NODE in N
    /// ms`, or why not).
    pub async fn sync_all(&self) -> Vec<String> {
        let others = self.others();
        let runs = others.iter().map(|o| async move {
            let started = Instant::now();
            let name = self.name_of(o);
            match self.sync_one(o).await {
                Ok(_) => format!("sent to {name} in {} ms", started.elapsed().as_millis()),
                Err(e) => format!(
                    "{name}: {e:#} (it gets the change at its next exchange, within {} s of its return)",
                    SYNC_EVERY.as_secs()
                ),
            }
        });
        let mut lines = futures_util::future::join_all(runs).await;
        if lines.is_empty() {
            lines.push(if self.settings.disconnected() {
                "disconnected by an operator: sent nowhere (spoolctl cluster reconnect)".into()
            } else {
                "no other unit shares settings with this one".into()
            });
        }
        lines
    }

    /// Exchanges with every other unit every [`SYNC_EVERY`], for ever (the first at once, so a
    /// unit that was away catches up as it starts).
    pub async fn keep_in_sync(self: Arc<Self>) {
        let mut failing: BTreeMap<String, bool> = BTreeMap::new();
        loop {
            let others = self.others();
            // All at once: one member that does not answer delays nobody else.
            let runs = others
                .iter()
                .map(|o| async { (self.name_of(o), self.sync_one(o).await) });
            for (name, r) in futures_util::future::join_all(runs).await {
                let was_failing = failing.insert(name.clone(), r.is_err()) == Some(true);
                if let Err(e) = r {
                    // Once per outage, not every round.
                    if !was_failing {
                        tracing::info!(member = %name, "clustered settings: not exchanged now: {e:#}");
                    }
                }
            }
            tokio::time::sleep(SYNC_EVERY).await;
        }
    }

    /// Serves the cluster link: members' exchanges, joins and tracking queries.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let Some((cfg, _)) = self.link.clone() else {
            return;
        };
        let metrics = self.metrics.clone();
        link::serve(
            listener,
            cfg,
            Channel::ClusterConfig,
            "cluster link",
            move || metrics.cluster_auth_failures.inc(),
            move |l| {
                let me = self.clone();
                async move { me.answer_session(l).await }
            },
        )
        .await
    }

    async fn answer_session(self: &Arc<Self>, l: link::Link) -> Result<(), link::LinkError> {
        use tokio::io::AsyncWriteExt;
        let node = l.peer.node.clone();
        let (r, mut w) = tokio::io::split(l.io);
        let mut frames = link::spawn_reader(r);
        while let Some(f) = frames.recv().await {
            let (op, arg) = match f {
                Ok(Frame::Request { op, arg }) => (op, arg),
                Ok(Frame::Heartbeat { .. }) => continue,
                Ok(other) => {
                    return Err(link::LinkError::Protocol(format!(
                        "cluster channel: unexpected {other:?}"
                    )))
                }
                Err(link::LinkError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Err(link::LinkError::Protocol(m)) if m == "link closed" => return Ok(()),
                Err(e) => return Err(e),
            };
            let me = self.clone();
            let from = node.clone();
            let answer = tokio::task::spawn_blocking(move || me.answer(op, &from, &arg))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            if op == cluster_op::JOIN && answer.is_ok() {
                // The others learn of the newcomer now, not at their next exchange.
                let me = self.clone();
                tokio::spawn(async move { me.sync_all().await });
            }
            let (ok, data) = match answer {
                Ok(d) => (true, d),
                Err(e) => (false, Bytes::from(e)),
            };
            link::write_frame(&mut w, &Frame::Reply { ok, data }, &[]).await?;
            w.flush().await?;
        }
        Ok(())
    }

    fn answer(&self, op: u8, from: &str, arg: &[u8]) -> Result<Bytes, String> {
        match op {
            cluster_op::SETTINGS => crate::cluster::answer_exchange(&self.settings, arg),
            cluster_op::TRACK => answer_track(&self.tracker, arg),
            cluster_op::JOIN => self.admit(from, arg).map_err(|e| format!("{e:#}")),
            other => Err(format!("cluster operation {other} is not answered here")),
        }
    }

    /// A unit asks to join: recorded as a member, answered the cluster's settings.
    fn admit(&self, from: &str, arg: &[u8]) -> Result<Bytes> {
        let asked: JoinRequest = serde_json::from_slice(arg).context("join request")?;
        let name = self.settings.cluster_name().ok_or_else(|| {
            anyhow!(
                "{} is in no cluster (spoolctl cluster create NAME there first)",
                self.settings.node()
            )
        })?;
        if asked.protocol != PROTOCOL {
            bail!(
                "clustered settings protocol {} here, {} there: not joined",
                PROTOCOL,
                asked.protocol
            );
        }
        if asked.node != from {
            bail!("the join names {} but the link {from}", asked.node);
        }
        if asked.node == self.settings.node() {
            bail!("{} is this unit's own node name", asked.node);
        }
        let addr: SocketAddr = asked.addr.parse().context("join: address")?;
        // A unit may join again (from a new address, after a reinstall), but not take the
        // name of a member that is up elsewhere.
        let elsewhere = self
            .settings
            .members()
            .into_iter()
            .find(|(n, a)| *n == asked.node && *a != addr.to_string());
        if let Some((_, at)) = elsewhere {
            let up = self
                .seen()
                .get(&asked.node)
                .is_some_and(|s| s.last_error.is_none() && s.last_ok_ms > 0);
            if up {
                bail!(
                    "a member named {} is up at {at}: node names are unique in a cluster",
                    asked.node
                );
            }
        }
        self.settings.put(
            MEMBER_KEY,
            &format!("machine:{}", asked.node),
            Some(addr.to_string().into()),
        )?;
        tracing::warn!(node = %asked.node, %addr, cluster = %name, "a unit joined the cluster");
        Ok(Bytes::from(serde_json::to_vec(&self.settings.exchange())?))
    }

    fn advertised(&self) -> Result<SocketAddr> {
        self.link.as_ref().map(|(_, a)| *a).ok_or_else(|| {
            anyhow!("no [cluster] section: set cluster.listen and cluster.secret_file first")
        })
    }

    /// `spoolctl cluster create NAME`.
    pub async fn create(&self, name: &str) -> Result<api::ClusterList> {
        let addr = self.advertised()?;
        tokio::task::block_in_place(|| self.settings.create(name, addr))?;
        tracing::warn!(cluster = name, "cluster created here");
        Ok(self.list(vec![format!(
            "cluster {name:?} created; other units join it with: spoolctl cluster join {addr}"
        )]))
    }

    /// `spoolctl cluster join ADDR`.
    pub async fn join(&self, addr: &str) -> Result<api::ClusterList> {
        let me = self.advertised()?;
        if let Some(c) = self.settings.cluster_name() {
            bail!("this unit is already a member of cluster {c:?} (spoolctl cluster leave)");
        }
        let target: SocketAddr = addr
            .parse()
            .map_err(|_| anyhow!("{addr:?} is not an ip:port address"))?;
        let asked = serde_json::to_vec(&JoinRequest {
            node: self.settings.node().to_string(),
            addr: me.to_string(),
            protocol: PROTOCOL,
        })?;
        let answer = self.ask_addr(target, Ask::Join, &asked).await?;
        let theirs: Exchange = serde_json::from_slice(&answer).context("unreadable answer")?;
        let backup = tokio::task::block_in_place(|| self.settings.adopt(&theirs))?;
        let name = theirs.cluster.clone().unwrap_or_default();
        tracing::warn!(
            cluster = %name,
            backup = %backup.display(),
            "joined a cluster: this unit's clustered settings were replaced by the cluster's (the previous ones are saved)"
        );
        let mut notes = vec![format!(
            "joined cluster {name:?} through {}: this unit's clustered settings were replaced by the cluster's; the previous ones are saved in {}",
            theirs.from,
            backup.display()
        )];
        notes.extend(self.sync_all().await);
        Ok(self.list(notes))
    }

    /// `spoolctl cluster leave`: the others are told (those away learn it from the others),
    /// then this unit is in no cluster, with the settings it used.
    pub async fn leave(&self) -> Result<api::ClusterList> {
        let name = self
            .settings
            .cluster_name()
            .ok_or_else(|| anyhow!("this unit is in no cluster"))?;
        tokio::task::block_in_place(|| self.settings.put(MEMBER_KEY, "machine", None))?;
        let mut notes = self.sync_all().await;
        tokio::task::block_in_place(|| self.settings.leave())?;
        self.seen().clear();
        tracing::warn!(cluster = %name, "left the cluster; the settings in effect here stay");
        notes.push(format!(
            "left cluster {name:?}; the settings in effect here stay as they were"
        ));
        Ok(self.list(notes))
    }

    /// `spoolctl cluster remove NODE`: a member that cannot leave by itself (dead, or gone for
    /// good) is removed here and the others are told; refused while it answers.
    pub async fn remove(&self, node: &str) -> Result<api::ClusterList> {
        if node == self.settings.node() {
            bail!("{node} is this unit: spoolctl cluster leave");
        }
        let (_, addr) = self
            .settings
            .members()
            .into_iter()
            .find(|(n, _)| n == node)
            .ok_or_else(|| anyhow!("{node} is not a member"))?;
        let addr: SocketAddr = addr.parse().context("its address")?;
        let peek = self.settings.peek_request()?;
        // A unit that left while nobody heard it still answers, from no cluster (or another).
        let still_member = match self.ask_addr(addr, Ask::Settings, &peek).await {
            Ok(answer) => serde_json::from_slice::<Exchange>(&answer)
                .is_ok_and(|theirs| theirs.cluster == self.settings.cluster_name()),
            Err(_) => false,
        };
        if still_member {
            bail!("{node} answers at {addr}: run `spoolctl cluster leave` on it instead");
        }
        tokio::task::block_in_place(|| {
            self.settings
                .put(MEMBER_KEY, &format!("machine:{node}"), None)
        })?;
        self.seen().remove(node);
        tracing::warn!(member = node, "member removed by an operator");
        let mut notes = vec![format!("{node} removed from the cluster")];
        notes.extend(self.sync_all().await);
        Ok(self.list(notes))
    }

    /// `spoolctl cluster list`.
    pub fn list(&self, notes: Vec<String>) -> api::ClusterList {
        let groups = self.settings.groups();
        let group_of = |n: &str| {
            groups
                .iter()
                .find(|(_, members)| members.iter().any(|m| m == n))
                .map(|(g, _)| g.clone())
        };
        api::ClusterList {
            cluster: self.settings.cluster_name(),
            node: self.settings.node().to_string(),
            members: self
                .settings
                .members()
                .into_iter()
                .map(|(node, addr)| api::ListedMember {
                    group: group_of(&node),
                    node,
                    addr,
                })
                .collect(),
            groups: groups
                .into_iter()
                .map(|(name, machines)| api::ListedGroup { name, machines })
                .collect(),
            notes,
        }
    }

    /// `spoolctl group add|rename|delete`, `machine setgroup`: changes made here like any
    /// setting, then sent to the others.
    pub async fn group(&self, change: GroupChange) -> Result<api::ClusterList> {
        let s = &self.settings;
        let exists = |g: &str| s.groups().iter().any(|(n, _)| n == g);
        tokio::task::block_in_place(|| -> Result<()> {
            match &change {
                GroupChange::Add(g) => {
                    if exists(g) {
                        bail!("group {g:?} exists");
                    }
                    s.put(GROUP_MARK_KEY, &format!("group:{g}"), Some(true.into()))?;
                }
                GroupChange::Rename(from, to) => {
                    if !exists(from) {
                        bail!("no group {from:?}");
                    }
                    if exists(to) {
                        bail!("group {to:?} exists");
                    }
                    let (old, new) = (format!("group:{from}"), format!("group:{to}"));
                    crate::cluster::level_name(&new, s.node())?;
                    let (entries, _) = s.entries();
                    for e in entries
                        .iter()
                        .filter(|e| e.level == old && e.value.is_some())
                    {
                        s.put(&e.key, &new, e.value.clone())?;
                        s.put(&e.key, &old, None)?;
                    }
                    s.put(GROUP_MARK_KEY, &new, Some(true.into()))?;
                    for e in entries.iter().filter(|e| {
                        e.key == GROUP_KEY
                            && e.value.as_ref().and_then(|v| v.as_str()) == Some(from)
                    }) {
                        s.put(GROUP_KEY, &e.level, Some(to.as_str().into()))?;
                    }
                }
                GroupChange::Delete(g) => {
                    let in_it = s
                        .groups()
                        .into_iter()
                        .find(|(n, _)| n == g)
                        .ok_or_else(|| anyhow!("no group {g:?}"))?
                        .1;
                    if !in_it.is_empty() {
                        bail!(
                            "group {g:?} still holds {}: move them first (spoolctl machine setgroup NODE GROUP)",
                            in_it.join(", ")
                        );
                    }
                    let level = format!("group:{g}");
                    let (entries, _) = s.entries();
                    for e in entries
                        .iter()
                        .filter(|e| e.level == level && e.value.is_some())
                    {
                        s.put(&e.key, &level, None)?;
                    }
                }
                GroupChange::SetGroup(node, group) => {
                    if let Some(g) = group {
                        if !exists(g) {
                            bail!("no group {g:?} (spoolctl group add {g})");
                        }
                    }
                    s.set(
                        GROUP_KEY,
                        &format!("machine:{node}"),
                        group.as_ref().map(|g| g.as_str().into()),
                    )?;
                }
            }
            Ok(())
        })?;
        let notes = self.sync_all().await;
        Ok(self.list(notes))
    }

    /// `spoolctl cluster status`: this unit and each other one as the last exchange saw it.
    pub fn status(&self) -> api::ClusterStatus {
        let s = &self.settings;
        let (entries, conflicts) = s.entries();
        let paused = s.paused();
        let seen = self.seen().clone();
        let member = |node: String, key: &str, addr: Option<String>| {
            let p = seen.get(key).cloned().unwrap_or_default();
            api::ClusterMember {
                paused: paused.contains(&node),
                node,
                addr,
                connected: p.last_error.is_none() && p.last_ok_ms > 0,
                last_contact_secs: (p.last_ok_ms > 0)
                    .then(|| now_ms().saturating_sub(p.last_ok_ms) / 1000),
                last_sync_ms: p.last_latency_ms,
                last_change_ms: p.last_change_ms,
                version: p.version.clone(),
                differing: p.differing.clone(),
                error: p.last_error.clone(),
            }
        };
        let members = if s.cluster_name().is_some() {
            s.members()
                .into_iter()
                .filter(|(n, _)| n != s.node())
                .map(|(n, a)| member(n.clone(), &n, Some(a)))
                .collect()
        } else {
            seen.keys()
                .map(|key| member(self.name_of(&Other::Partner), key, None))
                .collect()
        };
        api::ClusterStatus {
            node: s.node().to_string(),
            version: entries.iter().map(|e| &e.stamp).max().map(stamp_text),
            entries: entries.len(),
            conflicts: conflicts.len(),
            disconnected: s.disconnected(),
            protocol: PROTOCOL,
            cluster: s.cluster_name(),
            members,
        }
    }

    /// `spoolctl cluster disconnect|reconnect [NODE]`: stops or resumes the exchanges (with
    /// every member, or one); what changed meanwhile is exchanged on reconnect.
    pub async fn disconnect(&self, disconnected: bool, node: Option<&str>) -> Result<()> {
        tokio::task::block_in_place(|| match node {
            None => self.settings.set_disconnected(disconnected),
            Some(n) => self.settings.set_paused(n, disconnected),
        })?;
        tracing::warn!(
            disconnected,
            member = node.unwrap_or("all"),
            "clustered settings: {} by an operator",
            if disconnected {
                "disconnected"
            } else {
                "reconnected"
            }
        );
        if !disconnected {
            for line in self.sync_all().await {
                tracing::info!("clustered settings after reconnect: {line}");
            }
        }
        Ok(())
    }

    /// `spoolctl cluster check [--resolve-from NODE]`: every key and level whose entry
    /// differs between this unit and any other; with `resolve_from`, that unit's value of each
    /// is set again here (with a new stamp, so it wins everywhere at the next exchange).
    pub async fn check(&self, resolve_from: Option<&str>) -> Result<api::ClusterChecked> {
        let peek = self.settings.peek_request()?;
        let mut theirs: Vec<(String, Exchange)> = Vec::new();
        let mut notes = Vec::new();
        for o in self.compared() {
            let name = self.name_of(&o);
            let asked = async {
                let answer = self.ask(&o, Ask::Settings, &peek).await?;
                Ok::<Exchange, anyhow::Error>(serde_json::from_slice(&answer)?)
            };
            match asked.await {
                Ok(t) => theirs.push((self.name_of(&o), t)),
                Err(e) => notes.push(format!("{name}: not compared: {e:#}")),
            }
        }
        if theirs.is_empty() && notes.is_empty() {
            bail!("no other unit shares settings with this one");
        }
        let settings = self.settings.clone();
        let checked = tokio::task::block_in_place(|| {
            crate::cluster::check(&settings, &theirs, resolve_from)
        })?;
        if checked.resolved > 0 {
            notes.extend(self.sync_all().await);
        }
        Ok(api::ClusterChecked { notes, ..checked })
    }

    /// `spoolctl track`: this unit's events and every other unit's, merged by time; a unit
    /// that cannot be asked is named in the answer's notes.
    pub async fn track(&self, query: String, limit: usize) -> Result<api::Tracked, String> {
        let limit = limit.clamp(1, track::LIMIT_MAX);
        let track = self.tracker.clone();
        let q = query.clone();
        let (mut events, mut capped) = tokio::task::spawn_blocking(move || track.search(&q, limit))
            .await
            .map_err(|e| e.to_string())??;
        let mut notes = Vec::new();
        let request = serde_json::json!({ "query": query, "limit": limit }).to_string();
        let others = self.compared();
        let asks = others.iter().map(|o| async {
            let name = match o {
                Other::Partner => format!("partner {}", self.name_of(o)),
                Other::Member { node, .. } => node.clone(),
            };
            (name, self.ask(o, Ask::Track, request.as_bytes()).await)
        });
        for (name, asked) in futures_util::future::join_all(asks).await {
            match asked.and_then(|a| Ok(serde_json::from_slice::<api::Tracked>(&a)?)) {
                Ok(theirs) => {
                    events.extend(theirs.events);
                    capped |= theirs.capped;
                }
                Err(e) => notes.push(format!("{name} not asked: {e:#}")),
            }
        }
        // By time, then unit: the same order whichever unit answers (a unit's own events keep
        // their log order).
        events.sort_by(|x, y| (x.at_ms, &x.unit).cmp(&(y.at_ms, &y.unit)));
        if events.len() > limit {
            events.truncate(limit);
            capped = true;
        }
        Ok(api::Tracked {
            events,
            capped,
            notes,
        })
    }
}

/// Answers another unit's tracking query (`{"query": ..., "limit": N}`): this unit's events of
/// the messages it selects.
pub fn answer_track(tracker: &track::Tracker, request: &[u8]) -> Result<Bytes, String> {
    #[derive(serde::Deserialize)]
    struct Asked {
        query: String,
        limit: usize,
    }
    let asked: Asked = serde_json::from_slice(request).map_err(|e| e.to_string())?;
    let (events, capped) = tracker.search(&asked.query, asked.limit)?;
    let answer = api::Tracked {
        events,
        capped,
        notes: Vec::new(),
    };
    serde_json::to_vec(&answer)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// A change to the groups.
pub enum GroupChange {
    /// `group add NAME`.
    Add(String),
    /// `group rename FROM TO`.
    Rename(String, String),
    /// `group delete NAME`.
    Delete(String),
    /// `machine setgroup NODE [GROUP]`.
    SetGroup(String, Option<String>),
}
