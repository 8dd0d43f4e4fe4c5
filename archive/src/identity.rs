//! Who owns a prefix of the object store. Each archive gets an id when it first meets its
//! store, written in the catalog and in a manifest object under the prefix
//! (`<prefix>/archive.json`, created with `If-None-Match: *`, so two units racing on one empty
//! prefix cannot both win where the store honours it). A unit whose catalog does not name the
//! manifest's archive writes nothing there: numbering its segments from 1 again would
//! overwrite another archive's objects.
//!
//! The decision is pure ([`decide`], table-tested); the store's requests are in `remote.rs` and
//! the catalog's keys in `store.rs`.

use serde::{Deserialize, Serialize};

pub use evidence::ArchiveId;

/// The manifest object: which archive the prefix belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Its format (1).
    pub format: u32,
    /// The archive's id (hex).
    pub archive: String,
    /// The unit that created it (its node name).
    pub node: String,
    /// When, ms since the epoch.
    pub created_ms: u64,
    /// The catalog that writes the archive now (a random id each catalog makes when it creates
    /// or adopts the archive): a unit that was replaced, come back, is not it and writes
    /// nothing more. Absent in manifests written before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// When the writer adopted the archive (ms since the epoch), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_ms: Option<u64>,
}

/// The manifest's format.
pub const MANIFEST_FORMAT: u32 = 1;

/// What this unit finds under its prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The manifest, if there is one.
    pub manifest: Option<Manifest>,
    /// Whether segment objects are there (it matters only without a manifest).
    pub segments: bool,
}

/// What to do about the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The manifest names this archive: go on.
    Ours,
    /// Create the manifest for this id (new, or this archive's own, written before manifests
    /// existed); record the id in the catalog once the store holds it.
    Create(ArchiveId),
    /// Another archive's prefix, or one this unit cannot tell is its own: write nothing.
    Refuse(String),
}

/// Decides from this archive's id (`None`: the catalog has none yet), whether its catalog
/// has uploaded segments, and what the prefix holds.
pub fn decide(ours: Option<ArchiveId>, uploaded_here: bool, found: &Found) -> Claim {
    match (&found.manifest, ours) {
        (Some(m), Some(id)) if ArchiveId::parse(&m.archive) == Some(id) => Claim::Ours,
        (Some(m), ours) => Claim::Refuse(format!(
            "it belongs to archive {} of unit {:?} (created at {} ms); this unit's archive is {}",
            m.archive,
            m.node,
            m.created_ms,
            ours.map_or("new (an empty catalog)".to_string(), |id| id.to_string())
        )),
        // Segments without a manifest: an archive written before manifests existed. Only the
        // unit whose catalog uploaded segments can be the one that wrote them.
        (None, _) if found.segments && !uploaded_here => Claim::Refuse(
            "it holds segments of an archive without a manifest, which this unit's catalog did not upload".into(),
        ),
        (None, ours) => Claim::Create(ours.unwrap_or_else(ArchiveId::random)),
    }
}

/// Whether this catalog (its writer id, `None` for one from before writer ids) still writes the
/// archive whose manifest says `m`: not once another unit adopted it.
pub fn still_writer(ours: Option<ArchiveId>, m: &Manifest) -> Result<(), String> {
    match (&m.writer, ours) {
        (None, _) => Ok(()),
        (Some(w), Some(id)) if ArchiveId::parse(w) == Some(id) => Ok(()),
        (Some(_), _) => Err(format!(
            "unit {:?} adopted this archive{}: this unit was replaced and writes nothing there any more (give it a new prefix, or retire it)",
            m.node,
            m.adopted_ms.map(|t| format!(" at {t} ms")).unwrap_or_default()
        )),
    }
}

/// What `--check-config` can tell before a start: the prefix's manifest against what the
/// catalog says (its archive id, its writer id, whether it holds items) and the `adopt`
/// setting. `Err` says why the start would refuse. Without a manifest the start decides (from
/// the segments there), so this says nothing.
pub fn check_before_start(
    ours: Option<ArchiveId>,
    writer: Option<ArchiveId>,
    holds_items: bool,
    adopt: Option<ArchiveId>,
    manifest: Option<&Manifest>,
) -> Result<(), String> {
    let Some(m) = manifest else {
        return Ok(());
    };
    if ours.is_some() && ArchiveId::parse(&m.archive) == ours {
        return still_writer(writer, m);
    }
    let found = Found {
        manifest: Some(m.clone()),
        segments: false,
    };
    let why = match decide(ours, false, &found) {
        Claim::Refuse(why) => why,
        Claim::Ours | Claim::Create(_) => return Ok(()),
    };
    match adopt {
        Some(id) => adoptable(id, ours, !holds_items, &found)
            .map_err(|no| format!("{why}; it cannot be adopted: {no}")),
        None => Err(why),
    }
}

/// Whether this unit may adopt the prefix (`archive.object_store.adopt = "<id>"`): a new unit
/// taking over a lost unit's archive, to rebuild its catalog from the store. Only an empty
/// catalog (or one whose rebuild is under way) adopts, and only the archive it was told to.
pub fn adoptable(
    adopt: ArchiveId,
    ours: Option<ArchiveId>,
    catalog_empty: bool,
    found: &Found,
) -> Result<(), String> {
    let Some(m) = &found.manifest else {
        return Err("there is no manifest to adopt under the prefix".into());
    };
    if ArchiveId::parse(&m.archive) != Some(adopt) {
        return Err(format!(
            "adopt names archive {adopt}, but the prefix belongs to archive {} of unit {:?}",
            m.archive, m.node
        ));
    }
    match ours {
        Some(id) if id != adopt => Err(format!("this unit's catalog belongs to archive {id}")),
        _ if !catalog_empty => Err(
            "the catalog holds items: only a new unit (an empty catalog) adopts an archive, and rebuilds it"
                .into(),
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The manifest of archive `id` made by unit `gw_a`, written by `writer`.
    fn manifest_of(id: ArchiveId, writer: Option<ArchiveId>) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            archive: id.to_string(),
            node: "gw_a".into(),
            created_ms: 5,
            writer: writer.map(|w| w.to_string()),
            adopted_ms: None,
        }
    }

    #[test]
    fn an_archive_writes_only_under_a_prefix_it_owns() {
        let a = ArchiveId([1; 16]);
        let b = ArchiveId([2; 16]);
        let manifest = |id: ArchiveId| manifest_of(id, None);
        let found = |m: Option<Manifest>, segments: bool| Found {
            manifest: m,
            segments,
        };
        // (case, ours, uploaded here, found, expected: Ours / Create(which) / Refuse)
        type Row = (&'static str, Option<ArchiveId>, bool, Found, &'static str);
        let table: Vec<Row> = vec![
            (
                "ours",
                Some(a),
                true,
                found(Some(manifest(a)), true),
                "ours",
            ),
            (
                "another archive's",
                Some(a),
                true,
                found(Some(manifest(b)), true),
                "refuse",
            ),
            (
                "a fresh unit on a used prefix",
                None,
                false,
                found(Some(manifest(b)), true),
                "refuse",
            ),
            (
                "a fresh unit, an empty manifest-only prefix",
                None,
                false,
                found(Some(manifest(b)), false),
                "refuse",
            ),
            (
                "a fresh unit on an empty prefix",
                None,
                false,
                found(None, false),
                "create new",
            ),
            (
                "an older archive of ours",
                None,
                true,
                found(None, true),
                "create new",
            ),
            (
                "an older archive not ours",
                None,
                false,
                found(None, true),
                "refuse",
            ),
            (
                "our id, the manifest gone, nothing there",
                Some(a),
                false,
                found(None, false),
                "create ours",
            ),
            (
                "our id, the manifest gone, our segments",
                Some(a),
                true,
                found(None, true),
                "create ours",
            ),
            (
                "our id, someone's segments, no manifest",
                Some(a),
                false,
                found(None, true),
                "refuse",
            ),
        ];
        for (case, ours, uploaded, found, want) in table {
            let got = decide(ours, uploaded, &found);
            let is = match (&got, want) {
                (Claim::Ours, "ours") | (Claim::Refuse(_), "refuse") => true,
                (Claim::Create(id), "create ours") => Some(*id) == ours,
                (Claim::Create(id), "create new") => ours.is_none() && *id != a && *id != b,
                _ => false,
            };
            assert!(is, "{case}: {got:?}");
        }
        let Claim::Refuse(why) = decide(None, false, &found(Some(manifest(b)), true)) else {
            panic!()
        };
        assert!(
            why.contains(&b.to_string()) && why.contains("gw_a"),
            "{why}"
        );
    }

    #[test]
    fn ids_survive_their_text_and_halves() {
        let id = ArchiveId::random();
        assert_eq!(ArchiveId::parse(&id.to_string()), Some(id));
        let (hi, lo) = id.halves();
        assert_eq!(ArchiveId::from_halves(hi, lo), id);
        assert_eq!(ArchiveId::parse("xyz"), None);
        assert_ne!(ArchiveId::random(), id);
    }

    #[test]
    fn only_an_empty_catalog_adopts_and_only_the_archive_it_was_told_to() {
        let a = ArchiveId([1; 16]);
        let b = ArchiveId([2; 16]);
        let of = |id: ArchiveId| Found {
            manifest: Some(manifest_of(id, None)),
            segments: false,
        };
        let none = Found {
            manifest: None,
            segments: true,
        };
        // (case, adopt, ours, catalog empty, found, adopts)
        let table = [
            ("a new unit adopts a's archive", a, None, true, of(a), true),
            ("a rebuild under way resumes", a, Some(a), true, of(a), true),
            ("told another archive", b, None, true, of(a), false),
            ("a catalog with items", a, None, false, of(a), false),
            (
                "a catalog of another archive",
                a,
                Some(b),
                true,
                of(a),
                false,
            ),
            ("no manifest", a, None, true, none, false),
        ];
        for (case, adopt, ours, empty, found, expected) in table {
            assert_eq!(
                adoptable(adopt, ours, empty, &found).is_ok(),
                expected,
                "{case}: {:?}",
                adoptable(adopt, ours, empty, &found)
            );
        }
    }

    #[test]
    fn a_replaced_unit_no_longer_writes() {
        let w1 = ArchiveId([7; 16]);
        let w2 = ArchiveId([8; 16]);
        let with = |writer: Option<ArchiveId>| Manifest {
            node: "gw_new".into(),
            adopted_ms: Some(9),
            ..manifest_of(ArchiveId([1; 16]), writer)
        };
        // (case, this catalog's writer id, the manifest's, writes)
        let table = [
            ("the writer", Some(w1), Some(w1), true),
            ("a manifest from before writer ids", Some(w1), None, true),
            (
                "a catalog from before, a manifest from before",
                None,
                None,
                true,
            ),
            ("adopted by another", Some(w1), Some(w2), false),
            (
                "a catalog from before, adopted since",
                None,
                Some(w2),
                false,
            ),
        ];
        for (case, ours, theirs, writes) in table {
            assert_eq!(still_writer(ours, &with(theirs)).is_ok(), writes, "{case}");
        }
    }

    #[test]
    fn the_check_before_a_start_says_what_the_start_would() {
        let a = ArchiveId([1; 16]);
        let b = ArchiveId([2; 16]);
        let w = ArchiveId([7; 16]);
        let m = manifest_of;
        // (case, ours, writer, holds items, adopt, manifest, start goes on)
        type Row = (
            &'static str,
            Option<ArchiveId>,
            Option<ArchiveId>,
            bool,
            Option<ArchiveId>,
            Option<Manifest>,
            bool,
        );
        let table: Vec<Row> = vec![
            (
                "no manifest: the start decides",
                None,
                None,
                false,
                None,
                None,
                true,
            ),
            (
                "ours, our writer",
                Some(a),
                Some(w),
                true,
                None,
                Some(m(a, Some(w))),
                true,
            ),
            (
                "ours, adopted away",
                Some(a),
                Some(w),
                true,
                None,
                Some(m(a, Some(b))),
                false,
            ),
            (
                "another archive",
                Some(a),
                Some(w),
                true,
                None,
                Some(m(b, None)),
                false,
            ),
            (
                "a new unit",
                None,
                None,
                false,
                None,
                Some(m(a, None)),
                false,
            ),
            (
                "a new unit adopting it",
                None,
                None,
                false,
                Some(a),
                Some(m(a, None)),
                true,
            ),
            (
                "adopting another",
                None,
                None,
                false,
                Some(b),
                Some(m(a, None)),
                false,
            ),
            (
                "adopting with items",
                None,
                None,
                true,
                Some(a),
                Some(m(a, None)),
                false,
            ),
        ];
        for (case, ours, writer, items, adopt, manifest, goes_on) in table {
            let got = check_before_start(ours, writer, items, adopt, manifest.as_ref());
            assert_eq!(got.is_ok(), goes_on, "{case}: {got:?}");
        }
    }
}
