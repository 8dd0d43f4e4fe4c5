//! What units ask each other about settings, membership and tracking, and its codec: one
//! typed [`Request`] and [`Reply`] for both links that carry them (the cluster link's
//! `ClusterConfig` channel, and for a pair in no cluster the HA partner's `PartnerRequests`
//! channel). The bytes are JSON in the peer link's `Request`/`Reply` frames.

use bytes::Bytes;
use peer::proto::{cluster_op, partner_op};
use serde::{Deserialize, Serialize};

use crate::entry::{Conflict, Entry};

/// The protocol version of [`Exchange`] and [`JoinRequest`].
pub const PROTOCOL: u32 = 1;

/// What units exchange: every entry one holds (the receiver keeps the newest of each).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    /// Protocol version; a unit refuses another version's entries and says so.
    pub version: u32,
    /// The entries.
    pub entries: Vec<Entry>,
    /// Only asking: the answerer sends its entries and merges nothing (`cluster check`).
    #[serde(default)]
    pub peek: bool,
    /// The sender's cluster (none: a pair outside any cluster); units of different clusters
    /// exchange nothing.
    #[serde(default)]
    pub cluster: Option<String>,
    /// The sender's node name.
    #[serde(default)]
    pub from: String,
    /// The conflicts the sender knows of: every unit reports every lost change, wherever the
    /// race was seen.
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
}

/// A unit asks to join the answerer's cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The newcomer's node name (the link's authenticated name must match).
    pub node: String,
    /// Its cluster-link address.
    pub addr: String,
    /// [`PROTOCOL`] there.
    pub protocol: u32,
}

/// `spoolctl track` asked of another unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackQuery {
    /// The query (`track::query`).
    pub query: String,
    /// Events answered at most.
    pub limit: usize,
}

/// The quarantine inbox asked of another unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ask", rename_all = "snake_case")]
pub enum QuarantineQuery {
    /// Its quarantined messages from or to these addresses (all: `None`).
    List {
        /// The asker's scope.
        scope: Option<Vec<String>>,
    },
    /// Release or delete one, if the policy lets a recipient.
    Act {
        /// Its spool id.
        id: String,
        /// `release` or `delete`.
        action: String,
        /// The asker's scope.
        scope: Option<Vec<String>>,
        /// Who asks.
        who: String,
    },
}

/// Which link carries a request: the operation codes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The cluster link (`[cluster]`), between members.
    ClusterLink,
    /// The HA partner's replication link, for a pair in no cluster.
    Partner,
}

/// A request to another unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Our entries (or a peek); answered [`Reply::Exchange`] with theirs.
    Settings(Exchange),
    /// Join the answerer's cluster; answered [`Reply::Exchange`] with the cluster's entries.
    Join(JoinRequest),
    /// Tracking events; answered [`Reply::Tracked`].
    Track(TrackQuery),
    /// The quarantine inbox; answered [`Reply::Quarantine`].
    Quarantine(QuarantineQuery),
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, arg: &[u8]) -> Result<T, String> {
    serde_json::from_slice(arg).map_err(|e| format!("{what}: {e}"))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| e.to_string())
}

impl Request {
    /// Its operation code on `via`; `None`: not carried there (joins take the cluster link).
    pub fn op(&self, via: Via) -> Option<u8> {
        match (via, self) {
            (Via::ClusterLink, Request::Settings(_)) => Some(cluster_op::SETTINGS),
            (Via::ClusterLink, Request::Join(_)) => Some(cluster_op::JOIN),
            (Via::ClusterLink, Request::Track(_)) => Some(cluster_op::TRACK),
            (Via::Partner, Request::Settings(_)) => Some(partner_op::SETTINGS),
            (Via::Partner, Request::Track(_)) => Some(partner_op::TRACK),
            (Via::Partner, Request::Join(_)) => None,
            (Via::ClusterLink, Request::Quarantine(_)) => Some(cluster_op::QUARANTINE),
            (Via::Partner, Request::Quarantine(_)) => Some(partner_op::QUARANTINE),
        }
    }

    /// Its argument bytes.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        match self {
            Request::Settings(x) => encode(x),
            Request::Join(j) => encode(j),
            Request::Track(q) => encode(q),
            Request::Quarantine(q) => encode(q),
        }
    }

    /// The request of operation `op` on `via`; `Ok(None)`: not one of ours (another
    /// operation of the channel).
    pub fn decode(via: Via, op: u8, arg: &[u8]) -> Result<Option<Request>, String> {
        let (settings, join, track, quarantine) = match via {
            Via::ClusterLink => (
                cluster_op::SETTINGS,
                Some(cluster_op::JOIN),
                cluster_op::TRACK,
                cluster_op::QUARANTINE,
            ),
            Via::Partner => (
                partner_op::SETTINGS,
                None,
                partner_op::TRACK,
                partner_op::QUARANTINE,
            ),
        };
        Ok(Some(if op == settings {
            Request::Settings(decode("settings exchange", arg)?)
        } else if Some(op) == join {
            Request::Join(decode("join request", arg)?)
        } else if op == track {
            Request::Track(decode("tracking query", arg)?)
        } else if op == quarantine {
            Request::Quarantine(decode("quarantine query", arg)?)
        } else {
            return Ok(None);
        }))
    }
}

/// An answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The answerer's entries (settings, join).
    Exchange(Exchange),
    /// The answerer's tracking events.
    Tracked(api::Tracked),
    /// The answerer's quarantine: a list, or what an action did (JSON of
    /// `Vec<api::Quarantined>` or `api::QuarantineActed`, by the query).
    Quarantine(serde_json::Value),
}

impl Reply {
    /// Its bytes.
    pub fn encode(&self) -> Result<Bytes, String> {
        match self {
            Reply::Exchange(x) => encode(x),
            Reply::Tracked(t) => encode(t),
            Reply::Quarantine(q) => encode(q),
        }
        .map(Bytes::from)
    }

    /// The answer to `request`, from its bytes.
    pub fn decode(request: &Request, data: &[u8]) -> Result<Reply, String> {
        match request {
            Request::Settings(_) | Request::Join(_) => {
                decode("unreadable answer", data).map(Reply::Exchange)
            }
            Request::Track(_) => decode("unreadable answer", data).map(Reply::Tracked),
            Request::Quarantine(_) => decode("unreadable answer", data).map(Reply::Quarantine),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_and_replies_survive_their_codec_on_both_links() {
        let requests = [
            Request::Settings(Exchange {
                version: PROTOCOL,
                from: "gw_a".into(),
                peek: true,
                ..Exchange::default()
            }),
            Request::Join(JoinRequest {
                node: "gw_c".into(),
                addr: "10.0.0.3:2527".into(),
                protocol: PROTOCOL,
            }),
            Request::Track(TrackQuery {
                query: "from:a@x".into(),
                limit: 10,
            }),
            Request::Quarantine(QuarantineQuery::List {
                scope: Some(vec!["bob@example.org".into()]),
            }),
            Request::Quarantine(QuarantineQuery::Act {
                id: "661fdabbb88f5000-gw_a".into(),
                action: "release".into(),
                scope: None,
                who: "console:bob".into(),
            }),
        ];
        for via in [Via::ClusterLink, Via::Partner] {
            for r in &requests {
                let Some(op) = r.op(via) else {
                    assert!(matches!((via, r), (Via::Partner, Request::Join(_))));
                    continue;
                };
                let back = Request::decode(via, op, &r.encode().unwrap()).unwrap();
                assert_eq!(back.as_ref(), Some(r));
            }
        }
        // Another operation of the channel is not ours; a bad argument says what it was.
        assert_eq!(
            Request::decode(Via::Partner, partner_op::LIST, b""),
            Ok(None)
        );
        let bad = Request::decode(Via::ClusterLink, cluster_op::JOIN, b"{").unwrap_err();
        assert!(bad.starts_with("join request: "), "{bad}");
        let tracked = Reply::Tracked(api::Tracked {
            events: Vec::new(),
            capped: true,
            notes: Vec::new(),
        });
        let bytes = tracked.encode().unwrap();
        assert_eq!(Reply::decode(&requests[2], &bytes).unwrap(), tracked);
        assert!(Reply::decode(&requests[0], &bytes).is_err());
    }
}
