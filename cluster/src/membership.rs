//! Who shares clustered settings with this unit, and the exchanges with them: the members of
//! its cluster over the cluster link (`[cluster]`: its own listener and shared secret, the
//! peer link's `ClusterConfig` channel), or, for a unit in no cluster, its HA partner (a
//! [`Partner`], which the daemon implements over the replication link). Here: `spoolctl
//! cluster create|join|leave|list|status|check|disconnect|reconnect`, `group
//! add|rename|delete`, `machine setgroup`, the exchange after every change and every
//! [`SYNC_EVERY`], and `spoolctl track` asked of every member.
//!
//! A join is a request to any member: it records the newcomer (a `cluster.member` entry, which
//! then reaches the others like any change) and answers the cluster's settings, which replace
//! the newcomer's after a backup. Each member exchanges with every other: no primary, no
//! coordinator; a member that was away catches up at its first exchange.
//!
//! Not here: the settings themselves (`settings.rs`), their merge (`merge.rs`), the wire
//! (`proto.rs`).

use crate::entry::{GROUP_KEY, GROUP_MARK_KEY, MEMBER_KEY};
use crate::level::{name_ok, Level};
use crate::proto::{
    Exchange, JoinRequest, QuarantineQuery, Reply, Request, TrackQuery, Via, PROTOCOL,
};
use crate::schema::Schema;
use crate::settings::Settings;
use crate::stamp::now_ms;
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use peer::link::{self, LinkConfig};
use peer::proto::{Channel, Frame};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use track::Tracker;

/// The HA partner, for a unit in no cluster: asked over the replication link's
/// `PartnerRequests` channel.
pub trait Partner: Send + Sync {
    /// The partner's node name, once its link has been up.
    fn name(&self) -> Option<String>;
    /// Sends operation `op` with `arg` and waits for the answer (`Err`: the partner's refusal
    /// or the link's failure, as text).
    fn ask(&self, op: u8, arg: Vec<u8>) -> BoxFuture<'_, Result<Bytes, String>>;
}

/// The metrics membership keeps.
pub struct Gauges {
    /// `spoold_cluster_member_up{member}`: the last exchange with it worked.
    pub member_up: prometheus::IntGaugeVec,
    /// `spoold_cluster_conflicts`: the conflicts this unit knows of.
    pub conflicts: prometheus::IntGauge,
    /// `spoold_cluster_auth_failures_total`: cluster-link peers that failed authentication.
    pub auth_failures: prometheus::IntCounter,
}

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

/// Membership and exchanges of this unit.
/// This unit's quarantine as the console's inbox asks for it, here or from another unit (the
/// daemon implements it over its `quarantine/` folder and decides what a recipient may do).
pub trait Quarantine: Send + Sync {
    /// The messages held here from or to `scope`'s addresses (all: `None`).
    fn list(&self, scope: Option<&[String]>) -> Result<Vec<api::Quarantined>, String>;
    /// Releases or deletes one, if it is within `scope` and the policy lets a recipient.
    fn act(
        &self,
        id: &str,
        action: &str,
        scope: Option<&[String]>,
        who: &str,
    ) -> Result<api::QuarantineActed, String>;
}

pub struct Membership<S: Schema> {
    settings: Arc<Settings<S>>,
    tracker: Arc<Tracker>,
    quarantine: Arc<dyn Quarantine>,
    partner: Option<Arc<dyn Partner>>,
    /// The cluster link's identity and this unit's advertised address (`[cluster]`).
    link: Option<(LinkConfig, SocketAddr)>,
    seen: Mutex<BTreeMap<String, Seen>>,
    gauges: Gauges,
}

impl<S: Schema> Membership<S> {
    /// `link`: the cluster link's identity and advertised address, when `[cluster]` is set.
    pub fn new(
        settings: Arc<Settings<S>>,
        tracker: Arc<Tracker>,
        quarantine: Arc<dyn Quarantine>,
        partner: Option<Arc<dyn Partner>>,
        link: Option<(LinkConfig, SocketAddr)>,
        gauges: Gauges,
    ) -> Membership<S> {
        Membership {
            settings,
            tracker,
            quarantine,
            partner,
            link,
            seen: Mutex::new(BTreeMap::new()),
            gauges,
        }
    }

    /// The settings store.
    pub fn settings(&self) -> &Arc<Settings<S>> {
        &self.settings
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
        match &self.partner {
            Some(p) if !p.name().is_some_and(|n| paused.contains(&n)) => vec![Other::Partner],
            _ => Vec::new(),
        }
    }

    fn name_of(&self, o: &Other) -> String {
        match o {
            Other::Member { node, .. } => node.clone(),
            Other::Partner => self
                .partner
                .as_ref()
                .and_then(|p| p.name())
                .unwrap_or_else(|| "partner".to_string()),
        }
    }

    async fn ask_addr(&self, addr: SocketAddr, request: &Request) -> Result<Reply> {
        let (cfg, _) = self
            .link
            .as_ref()
            .ok_or_else(|| anyhow!("no [cluster] section: this unit has no cluster link"))?;
        let op = request
            .op(Via::ClusterLink)
            .ok_or_else(|| anyhow!("not a cluster-link request"))?;
        let arg = request.encode().map_err(|e| anyhow!(e))?;
        let asked = tokio::time::timeout(
            ASK_WITHIN,
            link::ask(addr, cfg, Channel::ClusterConfig, op, &arg),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "cluster link to {addr}: no answer within {} s",
                ASK_WITHIN.as_secs()
            )
        })?;
        let answer = asked
            .map_err(|e| anyhow!("cluster link to {addr}: {e}"))?
            .map_err(|e| anyhow!("cluster link to {addr}: refused: {e}"))?;
        Reply::decode(request, &answer).map_err(|e| anyhow!("cluster link to {addr}: {e}"))
    }

    async fn ask(&self, o: &Other, request: &Request) -> Result<Reply> {
        match o {
            Other::Member { addr, .. } => self.ask_addr(*addr, request).await,
            Other::Partner => {
                let p = self.partner.as_ref().ok_or_else(|| anyhow!("no partner"))?;
                let op = request
                    .op(Via::Partner)
                    .ok_or_else(|| anyhow!("joins go over the cluster link"))?;
                let arg = request.encode().map_err(|e| anyhow!(e))?;
                let answer = tokio::time::timeout(ASK_WITHIN, p.ask(op, arg))
                    .await
                    .map_err(|_| anyhow!("no answer within {} s", ASK_WITHIN.as_secs()))?
                    .map_err(|e| anyhow!("{e}"))?;
                Reply::decode(request, &answer).map_err(|e| anyhow!(e))
            }
        }
    }

    /// Asks `o` for its entries (ours go with the request unless `peek`).
    async fn ask_settings(&self, o: &Other, ours: Exchange) -> Result<Exchange> {
        match self.ask(o, &Request::Settings(ours)).await? {
            Reply::Exchange(x) => Ok(x),
            Reply::Tracked(_) | Reply::Quarantine(_) => {
                bail!("answered something else to a settings exchange")
            }
        }
    }

    /// One exchange: ours go there, theirs come here, each side keeps the newest. Answers
    /// whether anything changed here.
    async fn sync_one(&self, o: &Other) -> Result<bool> {
        let started = Instant::now();
        let exchanged = async {
            let theirs = self.ask_settings(o, self.settings.exchange()).await?;
            let changed = tokio::task::block_in_place(|| self.settings.merge(&theirs))?;
            Ok::<_, anyhow::Error>((theirs, changed))
        }
        .await;
        // The partner's name is known only once its link is up: kept under one key.
        let key = match o {
            Other::Partner => "partner".to_string(),
            Other::Member { node, .. } => node.clone(),
        };
        self.gauges
            .member_up
            .with_label_values(&[&key])
            .set(i64::from(exchanged.is_ok()));
        self.gauges
            .conflicts
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
                    .map(|s| s.to_string());
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
        let auth_failures = self.gauges.auth_failures.clone();
        link::serve(
            listener,
            cfg,
            Channel::ClusterConfig,
            "cluster link",
            move || auth_failures.inc(),
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
                Err(link::LinkError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            };
            let me = self.clone();
            let from = node.clone();
            let request = Request::decode(Via::ClusterLink, op, &arg);
            let joined = matches!(request, Ok(Some(Request::Join(_))));
            let answer = tokio::task::spawn_blocking(move || match request? {
                Some(r) => me.answer(&from, &r)?.encode(),
                None => Err(format!("cluster operation {op} is not answered here")),
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            if joined && answer.is_ok() {
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

    /// Answers a request that came over the cluster link from member `from`.
    fn answer(&self, from: &str, request: &Request) -> Result<Reply, String> {
        match request {
            Request::Join(asked) => self
                .admit(from, asked)
                .map(Reply::Exchange)
                .map_err(|e| format!("{e:#}")),
            shared => answer(&self.settings, &self.tracker, &*self.quarantine, shared),
        }
    }

    /// A unit asks to join: recorded as a member, answered the cluster's settings.
    fn admit(&self, from: &str, asked: &JoinRequest) -> Result<Exchange> {
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
            &Level::machine(&asked.node),
            Some(addr.to_string().into()),
        )?;
        tracing::warn!(node = %asked.node, %addr, cluster = %name, "a unit joined the cluster");
        Ok(self.settings.exchange())
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
        let asked = Request::Join(JoinRequest {
            node: self.settings.node().to_string(),
            addr: me.to_string(),
            protocol: PROTOCOL,
        });
        let Reply::Exchange(theirs) = self.ask_addr(target, &asked).await? else {
            bail!("{target} answered the join with something else than the cluster's settings");
        };
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
        tokio::task::block_in_place(|| {
            self.settings
                .put(MEMBER_KEY, &Level::machine(self.settings.node()), None)
        })?;
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
        let peek = Request::Settings(self.settings.peek_request());
        // A unit that left while nobody heard it still answers, from no cluster (or another).
        let still_member = match self.ask_addr(addr, &peek).await {
            Ok(Reply::Exchange(theirs)) => theirs.cluster == self.settings.cluster_name(),
            Ok(Reply::Tracked(_) | Reply::Quarantine(_)) | Err(_) => false,
        };
        if still_member {
            bail!("{node} answers at {addr}: run `spoolctl cluster leave` on it instead");
        }
        tokio::task::block_in_place(|| self.settings.put(MEMBER_KEY, &Level::machine(node), None))?;
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
                    s.put(GROUP_MARK_KEY, &group_level(g)?, Some(true.into()))?;
                }
                GroupChange::Rename(from, to) => {
                    if !exists(from) {
                        bail!("no group {from:?}");
                    }
                    if exists(to) {
                        bail!("group {to:?} exists");
                    }
                    let (old, new) = (Level::group(from), group_level(to)?);
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
                    let level = Level::group(g);
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
                        &Level::machine(node).to_string(),
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
            version: entries
                .iter()
                .map(|e| &e.stamp)
                .max()
                .map(|s| s.to_string()),
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
        let mut theirs: Vec<(String, Exchange)> = Vec::new();
        let mut notes = Vec::new();
        for o in self.compared() {
            let name = self.name_of(&o);
            match self.ask_settings(&o, self.settings.peek_request()).await {
                Ok(t) => theirs.push((self.name_of(&o), t)),
                Err(e) => notes.push(format!("{name}: not compared: {e:#}")),
            }
        }
        if theirs.is_empty() && notes.is_empty() {
            bail!("no other unit shares settings with this one");
        }
        let settings = self.settings.clone();
        let checked = tokio::task::block_in_place(|| settings.check(&theirs, resolve_from))?;
        if checked.resolved > 0 {
            notes.extend(self.sync_all().await);
        }
        Ok(api::ClusterChecked { notes, ..checked })
    }

    /// The quarantine inbox: the messages held here and on every other unit (its cluster's
    /// members, or its partner) from or to `scope`'s addresses, newest first; a unit that
    /// cannot be asked is named in the notes.
    pub async fn quarantine_list(
        &self,
        scope: Option<Vec<String>>,
    ) -> Result<api::QuarantineFound, String> {
        let q = self.quarantine.clone();
        let local_scope = scope.clone();
        let mut items = tokio::task::spawn_blocking(move || q.list(local_scope.as_deref()))
            .await
            .map_err(|e| e.to_string())??;
        let mut notes = Vec::new();
        let request = Request::Quarantine(QuarantineQuery::List { scope });
        let others = self.compared();
        let asks = others
            .iter()
            .map(|o| async { (self.name_of(o), self.ask(o, &request).await) });
        for (name, asked) in futures_util::future::join_all(asks).await {
            match asked {
                Ok(Reply::Quarantine(v)) => {
                    match serde_json::from_value::<Vec<api::Quarantined>>(v) {
                        Ok(theirs) => items.extend(theirs),
                        Err(e) => notes.push(format!("{name}: unreadable answer: {e}")),
                    }
                }
                Ok(_) => notes.push(format!("{name}: answered something else")),
                Err(e) => notes.push(format!("{name} not asked: {e:#}")),
            }
        }
        items.sort_by(|x, y| (y.arrived_ms, &y.unit, &y.id).cmp(&(x.arrived_ms, &x.unit, &x.id)));
        Ok(api::QuarantineFound { items, notes })
    }

    /// Releases or deletes a quarantined message on the unit `unit` that holds it (this one or
    /// another), as that unit's policy allows.
    pub async fn quarantine_act(
        &self,
        unit: String,
        id: String,
        action: String,
        scope: Option<Vec<String>>,
        who: String,
    ) -> Result<api::QuarantineActed, String> {
        if unit == self.settings.node() {
            let q = self.quarantine.clone();
            return tokio::task::spawn_blocking(move || {
                q.act(&id, &action, scope.as_deref(), &who)
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        let other = self
            .compared()
            .into_iter()
            .find(|o| self.name_of(o) == unit)
            .ok_or_else(|| format!("no unit {unit} shares settings with this one"))?;
        let request = Request::Quarantine(QuarantineQuery::Act {
            id,
            action,
            scope,
            who,
        });
        match self
            .ask(&other, &request)
            .await
            .map_err(|e| format!("{unit}: {e:#}"))?
        {
            Reply::Quarantine(v) => serde_json::from_value(v).map_err(|e| e.to_string()),
            _ => Err(format!("{unit} answered something else")),
        }
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
        let request = Request::Track(TrackQuery { query, limit });
        let others = self.compared();
        let asks = others.iter().map(|o| async {
            let name = match o {
                Other::Partner => format!("partner {}", self.name_of(o)),
                Other::Member { node, .. } => node.clone(),
            };
            (name, self.ask(o, &request).await)
        });
        for (name, asked) in futures_util::future::join_all(asks).await {
            match asked {
                Ok(Reply::Tracked(theirs)) => {
                    events.extend(theirs.events);
                    capped |= theirs.capped;
                }
                Ok(Reply::Exchange(_) | Reply::Quarantine(_)) => {
                    notes.push(format!("{name} not asked: it answered something else"))
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

/// The level of group `name`, refused unless the name is one.
fn group_level(name: &str) -> Result<Level> {
    if !name_ok(name) {
        bail!(crate::level::BadLevel(format!("group:{name}")));
    }
    Ok(Level::group(name))
}

/// Answers the requests both links carry: a settings exchange, a tracking query, the
/// quarantine inbox.
pub fn answer<S: Schema>(
    settings: &Settings<S>,
    tracker: &Tracker,
    quarantine: &dyn Quarantine,
    request: &Request,
) -> Result<Reply, String> {
    match request {
        Request::Settings(theirs) => settings
            .answer(theirs)
            .map(Reply::Exchange)
            .map_err(|e| format!("{e:#}")),
        Request::Track(q) => {
            let (events, capped) = tracker.search(&q.query, q.limit)?;
            Ok(Reply::Tracked(api::Tracked {
                events,
                capped,
                notes: Vec::new(),
            }))
        }
        Request::Quarantine(QuarantineQuery::List { scope }) => {
            let listed = quarantine.list(scope.as_deref())?;
            serde_json::to_value(listed)
                .map(Reply::Quarantine)
                .map_err(|e| e.to_string())
        }
        Request::Quarantine(QuarantineQuery::Act {
            id,
            action,
            scope,
            who,
        }) => {
            let acted = quarantine.act(id, action, scope.as_deref(), who)?;
            serde_json::to_value(acted)
                .map(Reply::Quarantine)
                .map_err(|e| e.to_string())
        }
        Request::Join(_) => Err("joins go over the cluster link".into()),
    }
}

/// Answers operation `op` of the HA partner's `PartnerRequests` channel if it is one of
/// ours (settings, tracking); `None`: another of the channel's operations.
pub fn answer_partner<S: Schema>(
    settings: &Settings<S>,
    tracker: &Tracker,
    quarantine: &dyn Quarantine,
    op: u8,
    arg: &[u8],
) -> Option<Result<Bytes, String>> {
    match Request::decode(Via::Partner, op, arg) {
        Ok(None) => None,
        Ok(Some(request)) => {
            Some(answer(settings, tracker, quarantine, &request).and_then(|r| r.encode()))
        }
        Err(e) => Some(Err(e)),
    }
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
