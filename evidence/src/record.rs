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
    /// `key id(4) nonce(24) ciphertext tag(16)`: another frame, whole, encrypted
    /// (`crate::seal`).
    Sealed = 5,
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
    /// Another frame, encrypted: open it with [`next_opened`] (or `crate::seal`).
    Sealed(&'a [u8]),
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

/// Frames `inner` (a whole frame) sealed with the keyring's current key.
pub fn frame_sealed(keys: &crate::seal::Keyring, inner: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEAD]);
    keys.seal_payload(inner, out);
    let payload_len = out.len() - start - FRAME_HEAD;
    let crc = crc32c::crc32c(&out[start + FRAME_HEAD..]);
    out[start..start + 4].copy_from_slice(&FRAME_MAGIC);
    out[start + 4..start + 8].copy_from_slice(&(payload_len as u32).to_be_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_be_bytes());
    out[start + 12..start + 16].copy_from_slice(&(Kind::Sealed as u32).to_be_bytes());
}

/// Seals the frames written to `out` from `start` on into one sealed frame, when there are
/// keys to seal with (else leaves them in clear).
pub fn seal_from(keys: Option<&crate::seal::Keyring>, out: &mut Vec<u8>, start: usize) {
    if let Some(keys) = keys {
        let inner = out.split_off(start);
        frame_sealed(keys, &inner, out);
    }
}

/// Parses the frame at the start of `b` as [`next`] does, opening a sealed frame with `keys`
/// into `opened` and parsing what it holds: the record, the whole (outer) frame's length and
/// the id of the key that sealed it (`None`: in clear). A sealed frame holds one frame, never
/// another sealed one.
pub fn next_opened<'a>(
    b: &'a [u8],
    keys: Option<&crate::seal::Keyring>,
    opened: &'a mut Vec<u8>,
) -> Result<(Record<'a>, usize, Option<u32>), String> {
    let (record, len) = next(b)?;
    let Record::Sealed(payload) = record else {
        return Ok((record, len, None));
    };
    let (inner, id) = crate::seal::open(keys, payload).map_err(|e| e.to_string())?;
    *opened = inner;
    match next(opened)? {
        (Record::Sealed(_), _) => Err("a sealed record inside a sealed record".into()),
        (_, inner_len) if inner_len != opened.len() => {
            Err("a sealed record holds more than one frame".into())
        }
        (record, _) => Ok((record, len, Some(id))),
    }
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

/// [`unframe`] for a body frame that may be sealed: `opened` keeps the opened bytes.
pub fn unframe_opened<'a>(
    b: &'a [u8],
    keys: Option<&crate::seal::Keyring>,
    opened: &'a mut Vec<u8>,
) -> Result<([u8; 32], &'a [u8]), String> {
    match next_opened(b, keys, opened)? {
        (Record::Body(hash, compressed), _, _) => Ok((hash, compressed)),
        _ => Err("not a body record".into()),
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
        k if k == Kind::Sealed as u32 => Record::Sealed(payload),
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

    #[test]
    fn a_sealed_frame_opens_to_the_record_it_holds_and_only_with_its_keys() {
        let keys = crate::seal::Keyring::generate(1);
        let id = keys.current_info().id;
        let mut b = Vec::new();
        frame(&[7; 32], b"compressed body", &mut b);
        seal_from(Some(&keys), &mut b, 0);
        assert_eq!(&b[12..16], &(Kind::Sealed as u32).to_be_bytes());
        assert!(!b.windows(10).any(|w| w == b"compressed"));
        let mut opened = Vec::new();
        let (hash, body) = unframe_opened(&b, Some(&keys), &mut opened).unwrap();
        assert_eq!((hash, body), ([7; 32], &b"compressed body"[..]));
        let mut opened = Vec::new();
        let (_, len, by) = next_opened(&b, Some(&keys), &mut opened).unwrap();
        assert_eq!((len, by), (b.len(), Some(id)));
        // Without the keys, or with others, it says which key it needs.
        let mut opened = Vec::new();
        let err = next_opened(&b, None, &mut opened).unwrap_err();
        assert!(
            err.contains(&format!("{id:08x}")) && err.contains("no keyring"),
            "{err}"
        );
        let other = crate::seal::Keyring::generate(1);
        let mut opened = Vec::new();
        let err = next_opened(&b, Some(&other), &mut opened).unwrap_err();
        assert!(err.contains("does not have"), "{err}");
        // A clear frame reads as it is, with or without keys.
        let mut clear = Vec::new();
        frame_removed(4, &mut clear);
        seal_from(None, &mut clear, 0);
        let mut opened = Vec::new();
        assert_eq!(
            next_opened(&clear, Some(&keys), &mut opened).unwrap(),
            (Record::Removed(4), clear.len(), None)
        );
    }
}
