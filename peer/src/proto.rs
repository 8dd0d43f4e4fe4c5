//! The peer link's frames: `u32` big-endian length of what follows, one type byte, a payload.
//! Pure encoding and decoding; the link does the I/O.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol version carried in `Hello`; a peer with another version is refused.
pub const VERSION: u16 = 3;
/// Largest frame accepted (a message body plus its envelope fits well below).
pub const FRAME_BYTES_MAX: usize = 64 << 20;

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Accepts SMTP, delivers, replicates to its partner.
    Active,
    /// Holds replicas; delivers nothing.
    Passive,
    /// Handing over on its way to passive: accepts no mail, starts no delivery, and ships its
    /// last actions to the partner, which waits for it to be passive before delivering.
    Leaving,
}

impl Role {
    /// `active` / `passive`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Passive => "passive",
            Role::Leaving => "leaving",
        }
    }

    /// Parses `active` / `passive` (the roles an operator sets; `leaving` is transient).
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "active" => Some(Role::Active),
            "passive" => Some(Role::Passive),
            _ => None,
        }
    }
}

/// What a connection is for, declared in its `Hello`; a listener serves the channels it knows
/// and refuses the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// HA replication: `ADD`/`DELETE` from the active unit, acknowledgements back.
    Replication,
    /// Requests and replies between HA partners: takeover recovery, the sender's rebuild of
    /// its `ADD`s, and (for a pair in no cluster) clustered settings and message tracking.
    PartnerRequests,
    /// Archive mirroring.
    ArchiveMirror,
    /// Cluster membership, clustered settings and message tracking between cluster members.
    ClusterConfig,
}

impl Channel {
    fn byte(self) -> u8 {
        match self {
            Channel::Replication => 0,
            Channel::PartnerRequests => 1,
            Channel::ArchiveMirror => 2,
            Channel::ClusterConfig => 3,
        }
    }

    fn of(b: u8) -> Result<Channel, FrameError> {
        Ok(match b {
            0 => Channel::Replication,
            1 => Channel::PartnerRequests,
            2 => Channel::ArchiveMirror,
            3 => Channel::ClusterConfig,
            _ => return Err(FrameError("channel")),
        })
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame of each side.
    Hello {
        /// Protocol version.
        version: u16,
        /// Sender's role.
        role: Role,
        /// Sender's priority (split brain: the lower one stands down).
        priority: u32,
        /// What the connection is for.
        channel: Channel,
        /// Sender's node name.
        node: String,
    },
    /// HMAC proof of the shared secret over the TLS exporter.
    Proof([u8; 32]),
    /// Receiver to sender: resume after this sequence.
    Resume(u64),
    /// Replicate a message (or move its replica to where it is now).
    Add {
        /// Sequence.
        seq: u64,
        /// Message id.
        id: String,
        /// On hold (`spoolctl queue hold`): the partner keeps the replica in `hold/`, not
        /// `spool/`, so it stays held after a takeover.
        held: bool,
        /// The `.env` bytes.
        env: Bytes,
        /// The `.body` bytes.
        body: Bytes,
    },
    /// Remove a replica.
    Delete {
        /// Sequence.
        seq: u64,
        /// Message id.
        id: String,
    },
    /// Receiver to sender: everything up to this sequence is durable here.
    Ack(u64),
    /// Every second, both ways.
    Heartbeat {
        /// Sender's role.
        role: Role,
        /// Sender's priority.
        priority: u32,
    },
    /// Takeover recovery: a request to the partner (see [`partner_op`]).
    Request {
        /// Operation code.
        op: u8,
        /// Argument.
        arg: Bytes,
    },
    /// The partner's answer to a `Request`.
    Reply {
        /// Whether it succeeded; otherwise `data` is the error text.
        ok: bool,
        /// Result.
        data: Bytes,
    },
}

/// Operations of the [`Channel::PartnerRequests`] channel: takeover recovery, the sender's
/// rebuild, and the settings and tracking of a pair in no cluster.
pub mod partner_op {
    /// List leftovers in `spool/` and `vscan/`: lines `id folder size sha256hex`.
    pub const LIST: u8 = 1;
    /// Fetch one pair: `u32` envelope length, envelope, body.
    pub const FETCH: u8 = 2;
    /// Remove ids (newline-separated); answers the count removed.
    pub const REMOVE: u8 = 3;
    /// Ids in the delivered ledger, newline-separated.
    pub const LEDGER: u8 = 4;
    /// Of the ids asked (lines `id`, or `id hold` for a message on hold), those of which no
    /// pair is held in that place (`hold/`; else `spool/`, `vscan/` or `quarantine/`) and that
    /// were not delivered there (its ledger), newline-separated: the sender's rebuild of its
    /// `ADD`s after a start (not takeover recovery, but the same request/reply frames).
    pub const MISSING: u8 = 5;
    /// Message tracking: the events of this unit's tracking log that a query selects (the
    /// argument and the answer are the daemon's, opaque here).
    pub const TRACK: u8 = 6;
    /// Clustered settings: the asker's entries; the answer is the answerer's (each side keeps
    /// the newest of every key and level; opaque here).
    pub const SETTINGS: u8 = 7;
    /// The quarantine inbox: the answerer's quarantined messages for some addresses, or an
    /// action on one of them (opaque here).
    pub const QUARANTINE: u8 = 8;
}

/// Operations of the archive mirror channel (`Request` from the copying side, `Reply` from
/// the receiving side, one reply per request, in order).
pub mod mirror_op {
    /// One archived item: `u32` length of the catalog item bytes, the item, the zstd body.
    /// Replied `ok` with the receiver's sequence number (8 bytes) once durable there.
    pub const ITEM: u8 = 1;
    /// One signed checkpoint of the sender's archive (a line of its checkpoints file), kept by
    /// the receiver so that a rewrite of the sender's chain cannot rewrite this copy. Replied
    /// `ok` once durable there.
    pub const CHECKPOINT: u8 = 2;
    /// The checkpoints kept of an archive: the archive id (16 bytes) and the first `entries`
    /// wanted (u64); replied with the lines (at most 8 MiB, oldest first).
    pub const CHECKPOINTS: u8 = 3;
}

/// Operations of the cluster channel (`Request` from the asking member, one `Reply` each; the
/// arguments and answers are the daemon's, opaque here).
pub mod cluster_op {
    /// Clustered settings: the asker's entries; the answer is the answerer's.
    pub const SETTINGS: u8 = 1;
    /// A unit asks to join the answerer's cluster; the answer is the cluster's settings.
    pub const JOIN: u8 = 2;
    /// Message tracking: the answerer's events of the messages a query selects.
    pub const TRACK: u8 = 3;
    /// The quarantine inbox: the answerer's quarantined messages, or an action on one.
    pub const QUARANTINE: u8 = 4;
}

/// A frame that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad frame: {0}")]
pub struct FrameError(pub &'static str);

fn role_byte(r: Role) -> u8 {
    match r {
        Role::Active => 1,
        Role::Passive => 0,
        Role::Leaving => 2,
    }
}

fn role_of(b: u8) -> Result<Role, FrameError> {
    match b {
        1 => Ok(Role::Active),
        0 => Ok(Role::Passive),
        2 => Ok(Role::Leaving),
        _ => Err(FrameError("role")),
    }
}

impl Frame {
    /// The frame's header and payload; for `Add` the body is returned apart so that it can be
    /// written straight from its buffer (the memory-mapped `.body`).
    pub fn encode_head(&self, body_len: usize) -> BytesMut {
        let mut p = BytesMut::new();
        match self {
            Frame::Hello {
                version,
                role,
                priority,
                channel,
                node,
            } => {
                p.put_u8(1);
                p.put_u16(*version);
                p.put_u8(role_byte(*role));
                p.put_u32(*priority);
                p.put_u8(channel.byte());
                p.put_slice(node.as_bytes());
            }
            Frame::Proof(mac) => {
                p.put_u8(2);
                p.put_slice(mac);
            }
            Frame::Resume(seq) => {
                p.put_u8(3);
                p.put_u64(*seq);
            }
            Frame::Add {
                seq, id, held, env, ..
            } => {
                p.put_u8(4);
                p.put_u64(*seq);
                p.put_u8(u8::from(*held));
                p.put_u16(id.len() as u16);
                p.put_slice(id.as_bytes());
                p.put_u32(env.len() as u32);
                p.put_slice(env);
            }
            Frame::Delete { seq, id } => {
                p.put_u8(5);
                p.put_u64(*seq);
                p.put_slice(id.as_bytes());
            }
            Frame::Ack(seq) => {
                p.put_u8(6);
                p.put_u64(*seq);
            }
            Frame::Heartbeat { role, priority } => {
                p.put_u8(7);
                p.put_u8(role_byte(*role));
                p.put_u32(*priority);
            }
            Frame::Request { op, arg } => {
                p.put_u8(8);
                p.put_u8(*op);
                p.put_slice(arg);
            }
            Frame::Reply { ok, data } => {
                p.put_u8(9);
                p.put_u8(u8::from(*ok));
                p.put_slice(data);
            }
        }
        let mut out = BytesMut::with_capacity(4 + p.len());
        out.put_u32((p.len() + body_len) as u32);
        out.extend_from_slice(&p);
        out
    }

    /// Encodes a whole frame (body included) into one buffer: for tests and small frames.
    pub fn encode(&self) -> BytesMut {
        match self {
            Frame::Add { body, .. } => {
                let mut b = self.encode_head(body.len());
                b.extend_from_slice(body);
                b
            }
            _ => self.encode_head(0),
        }
    }

    /// Decodes one frame's content (after its length prefix).
    pub fn decode(mut p: Bytes) -> Result<Frame, FrameError> {
        let need = |p: &Bytes, n: usize| {
            if p.remaining() < n {
                Err(FrameError("short"))
            } else {
                Ok(())
            }
        };
        need(&p, 1)?;
        let t = p.get_u8();
        let text = |b: Bytes| String::from_utf8(b.to_vec()).map_err(|_| FrameError("utf-8"));
        Ok(match t {
            1 => {
                need(&p, 7)?;
                let version = p.get_u16();
                let role = role_of(p.get_u8())?;
                let priority = p.get_u32();
                // Before version 3 there was no channel: decoded as replication, so that the
                // version check, not a decoding error, tells the operator what is wrong.
                let channel = if version >= 3 {
                    need(&p, 1)?;
                    Channel::of(p.get_u8())?
                } else {
                    Channel::Replication
                };
                Frame::Hello {
                    version,
                    role,
                    priority,
                    channel,
                    node: text(p)?,
                }
            }
            2 => {
                need(&p, 32)?;
                let mut mac = [0u8; 32];
                p.copy_to_slice(&mut mac);
                Frame::Proof(mac)
            }
            3 => {
                need(&p, 8)?;
                Frame::Resume(p.get_u64())
            }
            4 => {
                need(&p, 11)?;
                let seq = p.get_u64();
                let held = match p.get_u8() {
                    0 => false,
                    1 => true,
                    _ => return Err(FrameError("held")),
                };
                let n = p.get_u16() as usize;
                need(&p, n + 4)?;
                let id = text(p.split_to(n))?;
                let e = p.get_u32() as usize;
                need(&p, e)?;
                let env = p.split_to(e);
                Frame::Add {
                    seq,
                    id,
                    held,
                    env,
                    body: p,
                }
            }
            5 => {
                need(&p, 8)?;
                let seq = p.get_u64();
                Frame::Delete { seq, id: text(p)? }
            }
            6 => {
                need(&p, 8)?;
                Frame::Ack(p.get_u64())
            }
            7 => {
                need(&p, 5)?;
                let role = role_of(p.get_u8())?;
                Frame::Heartbeat {
                    role,
                    priority: p.get_u32(),
                }
            }
            8 => {
                need(&p, 1)?;
                let op = p.get_u8();
                Frame::Request { op, arg: p }
            }
            9 => {
                need(&p, 1)?;
                let ok = p.get_u8() == 1;
                Frame::Reply { ok, data: p }
            }
            _ => return Err(FrameError("type")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips() {
        let frames = [
            Frame::Hello {
                version: VERSION,
                role: Role::Active,
                priority: 7,
                channel: Channel::PartnerRequests,
                node: "gw_a".into(),
            },
            Frame::Proof([9; 32]),
            Frame::Resume(u64::MAX - 1),
            Frame::Add {
                seq: 3,
                id: "0011223344556677-gw_a".into(),
                held: false,
                env: Bytes::from_static(b"env\n"),
                body: Bytes::from_static(b"body\r\n"),
            },
            Frame::Add {
                seq: 4,
                id: "x".into(),
                held: true,
                env: Bytes::new(),
                body: Bytes::new(),
            },
            Frame::Delete {
                seq: 5,
                id: "0011223344556677-gw_a".into(),
            },
            Frame::Ack(6),
            Frame::Heartbeat {
                role: Role::Passive,
                priority: 1,
            },
            Frame::Request {
                op: 2,
                arg: Bytes::from_static(b"0011223344556677-gw_a"),
            },
            Frame::Reply {
                ok: true,
                data: Bytes::from_static(b"x"),
            },
        ];
        for f in frames {
            let mut b = f.encode().freeze();
            let len = b.get_u32() as usize;
            assert_eq!(len, b.len());
            assert_eq!(Frame::decode(b).unwrap(), f);
        }
    }

    #[test]
    fn truncated_and_unknown_frames_are_errors_not_panics() {
        let full = Frame::Add {
            seq: 3,
            id: "abc".into(),
            held: false,
            env: Bytes::from_static(b"e"),
            body: Bytes::from_static(b"b"),
        }
        .encode()
        .freeze();
        // Every cut before the body (the frame's last, open-ended field) is an error.
        let body_at = full.len() - 1;
        for cut in 4..body_at {
            assert!(
                Frame::decode(full.slice(4..cut)).is_err(),
                "Add cut to {} bytes decoded",
                cut - 4
            );
        }
        for fixed in [
            Frame::Ack(7),
            Frame::Resume(7),
            Frame::Heartbeat {
                role: Role::Active,
                priority: 1,
            },
        ] {
            let whole = fixed.encode().freeze();
            for cut in 4..whole.len() {
                assert!(
                    Frame::decode(whole.slice(4..cut)).is_err(),
                    "{fixed:?} cut to {} bytes decoded",
                    cut - 4
                );
            }
        }
        assert!(Frame::decode(Bytes::from_static(&[99])).is_err());
        assert!(Frame::decode(Bytes::new()).is_err());
        assert!(
            Frame::decode(Bytes::from_static(&[7, 5, 0, 0, 0, 1])).is_err(),
            "bad role byte"
        );
    }
}
