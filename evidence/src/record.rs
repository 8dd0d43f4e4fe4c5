//! Byte layouts: the catalog's item and blob-location values, and the segment record frame.
//! `archive/FORMAT.md` describes them; every decoder answers `None` on bytes it does not
//! understand instead of panicking.

pub use crate::item::Item;
use crate::item::Reader;

/// Where a body's record is, and how many items share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLoc {
    /// Segment number.
    pub segment: u32,
    /// Offset of the record's frame in the segment.
    pub offset: u64,
    /// Frame length (header and payload).
    pub len: u32,
    /// Raw (uncompressed) length.
    pub raw_len: u64,
    /// Items referring to it.
    pub refs: u32,
}

impl BlobLoc {
    /// Catalog value bytes (28).
    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&self.segment.to_be_bytes());
        b[4..12].copy_from_slice(&self.offset.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b[16..24].copy_from_slice(&self.raw_len.to_be_bytes());
        b[24..28].copy_from_slice(&self.refs.to_be_bytes());
        b
    }

    /// Parses catalog value bytes.
    pub fn decode(b: &[u8]) -> Option<BlobLoc> {
        let mut r = Reader(b);
        Some(BlobLoc {
            segment: r.u32()?,
            offset: r.u64()?,
            len: r.u32()?,
            raw_len: r.u64()?,
            refs: r.u32()?,
        })
    }
}

/// Segment record frame: `magic(4) payload_len(4) crc32c(payload)(4) kind(4)`, then the
/// payload. The kind was a reserved zero before segments described their items, so every frame
/// of an archive written before is a body record and reads as one.
pub const FRAME_MAGIC: [u8; 4] = *b"SPAB";
/// Frame header length.
pub const FRAME_HEAD: usize = 16;

/// What a frame holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// `hash(32) zstd(raw)`: a body, stored once whatever the items that refer to it.
    Body = 0,
    /// `rev(8) item`: an item's catalog fields (the catalog value encoding), as of `rev`.
    Item = 1,
    /// `seq(8)`: the item was removed (retention); final, sequence numbers are never reused.
    Removed = 2,
    /// `n(8) prev(32) event`: an entry of the archive's hash chain (`crate::chain`). Written
    /// in the chain's order; item and removal records of archives from before the chain are
    /// kinds 1 and 2.
    Entry = 3,
    /// Entry frames, whole, that compaction carried out of a segment it rewrote: in the
    /// chain's order within the frame, wherever the frame sits.
    Copied = 4,
}

/// A frame's content, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// A body: its hash and its zstd bytes.
    Body([u8; 32], &'a [u8]),
    /// An item's state as of a revision (a higher revision of the same item supersedes it).
    Item(u64, Box<Item>),
    /// An item removed.
    Removed(u64),
    /// An entry of the hash chain.
    Entry(Box<crate::chain::Entry>),
    /// Entry frames carried by compaction (parse them with [`next`]).
    Copied(&'a [u8]),
}

fn frame_of(kind: Kind, parts: &[&[u8]], out: &mut Vec<u8>) {
    let payload_len: usize = parts.iter().map(|p| p.len()).sum();
    let crc = parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p));
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&(payload_len as u32).to_be_bytes());
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(&(kind as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Frames a compressed body.
pub fn frame(hash: &[u8; 32], compressed: &[u8], out: &mut Vec<u8>) {
    frame_of(Kind::Body, &[hash, compressed], out);
}

/// Frames an item's state as of revision `rev`.
pub fn frame_item(rev: u64, item: &Item, out: &mut Vec<u8>) {
    frame_of(Kind::Item, &[&rev.to_be_bytes(), &item.encode()], out);
}

/// Frames the removal of item `seq`.
pub fn frame_removed(seq: u64, out: &mut Vec<u8>) {
    frame_of(Kind::Removed, &[&seq.to_be_bytes()], out);
}

/// Frames a chain entry's payload ([`crate::chain::Head::append`]).
pub fn frame_entry(payload: &[u8], out: &mut Vec<u8>) {
    frame_of(Kind::Entry, &[payload], out);
}

/// Frames entry frames that compaction carries out of a segment.
pub fn frame_copied(entry_frames: &[u8], out: &mut Vec<u8>) {
    frame_of(Kind::Copied, &[entry_frames], out);
}

/// Checks the frame at the start of `b`: answers its kind (the raw number), its payload and its
/// whole length.
fn checked(b: &[u8]) -> Result<(u32, &[u8], usize), &'static str> {
    if b.len() < FRAME_HEAD || b[0..4] != FRAME_MAGIC {
        return Err("no record frame here");
    }
    let len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
    let crc = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
    let kind = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
    let payload = b
        .get(FRAME_HEAD..FRAME_HEAD + len)
        .ok_or("record cut short")?;
    if crc32c::crc32c(payload) != crc {
        return Err("record checksum mismatch");
    }
    Ok((kind, payload, FRAME_HEAD + len))
}

/// Checks a body frame read back from a segment and returns `(hash, compressed bytes)`.
pub fn unframe(b: &[u8]) -> Result<([u8; 32], &[u8]), &'static str> {
    match next(b)? {
        (Record::Body(hash, compressed), _) => Ok((hash, compressed)),
        _ => Err("not a body record"),
    }
}

/// Parses the frame at the start of `b`: the record and the frame's length. A frame of a kind
/// this version does not know is an error (a newer unit's segment: read it with that version).
pub fn next(b: &[u8]) -> Result<(Record<'_>, usize), &'static str> {
    let (kind, payload, len) = checked(b)?;
    let record = match kind {
        k if k == Kind::Body as u32 => {
            let hash = payload.get(..32).ok_or("body record cut short")?;
            let mut h = [0u8; 32];
            h.copy_from_slice(hash);
            Record::Body(h, &payload[32..])
        }
        k if k == Kind::Item as u32 => {
            let mut r = Reader(payload);
            let rev = r.u64().ok_or("item record cut short")?;
            Record::Item(
                rev,
                Box::new(Item::decode(r.0).ok_or("item record unreadable")?),
            )
        }
        k if k == Kind::Removed as u32 => {
            let seq = Reader(payload).u64().ok_or("removal record cut short")?;
            Record::Removed(seq)
        }
        k if k == Kind::Entry as u32 => {
            Record::Entry(Box::new(crate::chain::Entry::parse(payload)?))
        }
        k if k == Kind::Copied as u32 => Record::Copied(payload),
        _ => return Err("record of an unknown kind (written by a newer version)"),
    };
    Ok((record, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_detects_damage() {
        let mut f = Vec::new();
        frame(&[9; 32], b"compressed", &mut f);
        assert_eq!(
            unframe(&f).map(|(h, c)| (h, c.to_vec())),
            Ok(([9; 32], b"compressed".to_vec()))
        );
        let mut bad = f.clone();
        bad[FRAME_HEAD + 40] ^= 1;
        assert_eq!(unframe(&bad).err(), Some("record checksum mismatch"));
        assert!(unframe(&f[..f.len() - 1]).is_err());
    }

    #[test]
    fn every_kind_of_record_reads_back_and_a_frame_of_before_is_a_body() {
        let item = Item {
            seq: 3,
            id: "x".into(),
            recipients: vec!["r@y".into()],
            ..Item::default()
        };
        let mut b = Vec::new();
        frame(&[7; 32], b"zz", &mut b);
        frame_item(42, &item, &mut b);
        frame_removed(3, &mut b);
        let mut at = 0;
        let mut got = Vec::new();
        while at < b.len() {
            let (r, len) = next(&b[at..]).unwrap();
            got.push(format!("{r:?}"));
            at += len;
        }
        assert_eq!(
            got,
            [
                format!("{:?}", Record::Body([7; 32], b"zz")),
                format!("{:?}", Record::Item(42, Box::new(item))),
                format!("{:?}", Record::Removed(3)),
            ]
        );
        // The body frame's kind field is the zero that was reserved before kinds existed.
        assert_eq!(&b[12..16], &[0; 4]);
        // A kind from a newer version is refused, not taken for a body.
        let mut newer = Vec::new();
        frame_removed(3, &mut newer);
        newer[15] = 9;
        assert!(next(&newer).is_err());
        assert_eq!(unframe(&b[b.len() - 24..]).err(), Some("not a body record"));
    }
}
