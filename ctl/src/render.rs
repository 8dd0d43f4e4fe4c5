//! How each reply of the admin socket reads for a person: one [`Render`] per reply type
//! (`--json` prints the replies as they came).

/// Writes a reply as text for a person.
pub trait Render {
    /// Appends the text to `out`.
    fn render(&self, out: &mut String);
}

/// The text of `reply`.
pub fn to_text(reply: &impl Render) -> String {
    let mut out = String::new();
    reply.render(&mut out);
    out
}

impl Render for Vec<api::ListedUser> {
    fn render(&self, out: &mut String) {
        for u in self {
            out.push_str(&format!(
                "{:<24} {:<8} {}\n",
                u.name,
                u.role,
                u.addresses.join(" ")
            ));
        }
    }
}

impl Render for api::UserChanged {
    fn render(&self, out: &mut String) {
        out.push_str(&format!("user {}: {}\n", self.name, self.change));
        for s in &self.sent {
            out.push_str(&format!("  {s}\n"));
        }
    }
}

impl Render for Vec<api::Listed> {
    fn render(&self, out: &mut String) {
        for m in self {
            out.push_str(&format!(
                "{:<28} {:<10} {:>9} {:<30} {}\n",
                m.id,
                m.folder,
                m.size,
                format!("<{}>", m.sender),
                m.recipients.join(" ")
            ));
            if let Some(e) = &m.last_error {
                out.push_str(&format!("    ({e})\n"));
            }
        }
        out.push_str(&format!("-- {} message(s)\n", self.len()));
    }
}

/// A time in ms since the epoch, as UTC to the second.
fn utc_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// One archived item on one line (search results).
fn item_line(i: &api::ArchiveItem) -> String {
    let when = chrono::DateTime::from_timestamp_millis(i.arrived_ms as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default();
    format!(
        "{:>8} {} {:<28} {:<10}{} {:>9}  <{}> {}{}\n",
        i.seq,
        when,
        i.id,
        i.origin,
        if i.mirrored { "(m)" } else { "   " },
        i.size,
        i.sender,
        i.subject.as_deref().unwrap_or(""),
        if i.held { "  [hold]" } else { "" }
    )
}

impl Render for api::Shown {
    fn render(&self, out: &mut String) {
        out.push_str(&self.envelope);
        out.push('\n');
        out.push_str(&self.headers.replace("\r\n", "\n"));
    }
}

impl Render for api::Inserted {
    fn render(&self, out: &mut String) {
        for id in &self.inserted {
            out.push_str(&format!("new mail inserted (id={id})\n"));
        }
        for id in &self.duplicates {
            out.push_str(&format!("duplicate removed from input/ (id={id})\n"));
        }
        for c in &self.corrupt {
            out.push_str(&format!("rejected {}: {}\n", c.name, c.reason));
        }
    }
}

impl Render for api::Recovered {
    fn render(&self, out: &mut String) {
        for p in &self.plan {
            out.push_str(&format!(
                "{:<28} {:<8} {:>9}  {}\n",
                p.id,
                p.folder.rsplit('/').next().unwrap_or(""),
                p.size,
                p.action
            ));
        }
        for f in &self.failed {
            out.push_str(&format!("FAILED {}: {}\n", f.id, f.error));
        }
        if self.dry_run {
            out.push_str("dry run: nothing changed\n");
        } else {
            out.push_str(&format!(
                "moved {} / duplicates removed {} / held here, kept {} / removed here (delivered by partner) {} / failed {}\n",
                self.moved.len(),
                self.duplicates.len(),
                self.held_here_kept.len(),
                self.delivered_by_partner_removed_here.len(),
                self.failed.len()
            ));
        }
    }
}

impl Render for api::Status {
    fn render(&self, out: &mut String) {
        out.push_str(&format!("role: {}\n", self.role));
        if let Some(ha) = &self.ha {
            let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "link: {}\nsplit_brain: {}\npending_actions: {}\noldest_pending_age_ms: {}\nlast_lag_ms: {}\npartner: {}\npartner_role: {}\n",
                ha.link,
                ha.split_brain,
                ha.pending_actions,
                ha.oldest_pending_age_ms.map_or("-".into(), |v| v.to_string()),
                ha.last_lag_ms,
                or_dash(&ha.partner),
                or_dash(&ha.partner_role),
            ));
        }
        for (k, v) in &self.queue {
            out.push_str(&format!("queue {k}: {v}\n"));
        }
    }
}

impl Render for api::RoleSet {
    fn render(&self, out: &mut String) {
        out.push_str(&format!("role: {}\n", self.role));
        if let (Some(ms), Some(complete)) = (self.handover_ms, self.complete) {
            out.push_str(&format!(
                "handover: {ms} ms, {}\n",
                if complete {
                    "everything handed over".to_string()
                } else {
                    format!(
                        "incomplete ({} actions not acknowledged by the partner: run `spoolctl recover` on it)",
                        self.unshipped_actions.unwrap_or(0)
                    )
                }
            ));
        }
    }
}

impl Render for api::ConfigShown {
    fn render(&self, out: &mut String) {
        let show = |v: &Option<serde_json::Value>| {
            v.as_ref().map_or("(unset)".to_string(), |v| v.to_string())
        };
        for k in &self.keys {
            out.push_str(&format!("{}\n  file:      {}\n", k.key, show(&k.file)));
            for l in &k.levels {
                out.push_str(&format!(
                    "  {}: {}  ({})\n",
                    l.level,
                    show(&l.value),
                    l.stamp
                ));
            }
            out.push_str(&format!("  effective: {}\n", show(&k.effective)));
        }
        for c in &self.conflicts {
            out.push_str(&format!("conflict: {c}\n"));
        }
    }
}

impl Render for api::ClusterChecked {
    fn render(&self, out: &mut String) {
        for d in &self.differences {
            out.push_str(&format!("differs: {d}\n"));
        }
        if self.differences.is_empty() {
            out.push_str(
                "in agreement: every key at every level is the same on every unit compared\n",
            );
        }
        if self.resolved > 0 {
            out.push_str(&format!("resolved {} entr(ies)\n", self.resolved));
        }
        for n in &self.notes {
            out.push_str(&format!("{n}\n"));
        }
    }
}

impl Render for api::ClusterStatus {
    fn render(&self, out: &mut String) {
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
        out.push_str(&format!(
            "{} (here): version {}, {} entries, {} conflicts, protocol {}{}\n",
            self.node,
            or_none(&self.version),
            self.entries,
            self.conflicts,
            self.protocol,
            if self.disconnected {
                ", DISCONNECTED by an operator (spoolctl cluster reconnect)"
            } else {
                ""
            }
        ));
        if let Some(c) = &self.cluster {
            out.push_str(&format!("cluster: {c}\n"));
        }
        if self.members.is_empty() {
            out.push_str("others: none, or not asked yet\n");
        }
        for p in &self.members {
            out.push_str(&format!(
                "{}{}: {}, last contact {} s ago, last exchange {} ms{}, version {}{}{}\n",
                p.node,
                p.addr.as_ref().map_or(String::new(), |a| format!(" ({a})")),
                if p.paused {
                    "DISCONNECTED by an operator"
                } else if p.connected {
                    "connected"
                } else {
                    "not connected"
                },
                p.last_contact_secs
                    .map_or("never".to_string(), |s| s.to_string()),
                p.last_sync_ms,
                p.last_change_ms.map_or(String::new(), |ms| format!(
                    " (last change reached it in {ms} ms)"
                )),
                or_none(&p.version),
                if p.differing.is_empty() {
                    String::new()
                } else {
                    format!(", differed: {}", p.differing.join("; "))
                },
                p.error
                    .as_ref()
                    .map_or(String::new(), |e| format!(", last error: {e}"))
            ));
        }
    }
}

impl Render for api::ClusterList {
    fn render(&self, out: &mut String) {
        for n in &self.notes {
            out.push_str(&format!("{n}\n"));
        }
        match &self.cluster {
            None => out.push_str(&format!("{}: in no cluster\n", self.node)),
            Some(c) => {
                out.push_str(&format!("cluster {c} ({} here)\n", self.node));
                for m in &self.members {
                    out.push_str(&format!(
                        "  member {:<16} {:<22} group {}\n",
                        m.node,
                        m.addr,
                        m.group.as_deref().unwrap_or("-")
                    ));
                }
            }
        }
        for g in &self.groups {
            out.push_str(&format!(
                "  group {}: {}\n",
                g.name,
                if g.machines.is_empty() {
                    "(empty)".to_string()
                } else {
                    g.machines.join(", ")
                }
            ));
        }
    }
}

impl Render for api::ConfigExported {
    fn render(&self, out: &mut String) {
        out.push_str(&self.toml);
    }
}

impl Render for api::ConfigChanged {
    fn render(&self, out: &mut String) {
        out.push_str(&format!(
            "{} at {}: effective here {}\n",
            self.key,
            self.level,
            self.effective
                .as_ref()
                .map_or("(unset)".to_string(), |v| v.to_string()),
        ));
        for line in &self.sent {
            out.push_str(&format!("  {line}\n"));
        }
    }
}

impl Render for api::Tracked {
    fn render(&self, out: &mut String) {
        for e in &self.events {
            let when = chrono::DateTime::from_timestamp_millis(e.at_ms as i64)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
                .unwrap_or_default();
            let mut line = format!("{when}  {:<12} {:<15} {}", e.unit, e.kind, e.spool_id);
            if let Some(from) = &e.sender {
                line.push_str(&format!("  <{from}> -> {}", e.recipients.join(", ")));
            }
            if let Some(m) = &e.message_id {
                line.push_str(&format!("  {m}"));
            }
            if !e.detail.is_empty() {
                line.push_str(&format!("  {}", e.detail));
            }
            out.push_str(&line);
            out.push('\n');
        }
        if self.events.is_empty() {
            out.push_str("no events\n");
        }
        if self.capped {
            out.push_str(&format!(
                "-- capped at {} events: narrow the query (id:, after:, before:) or raise --limit\n",
                // A capped answer holds exactly the limit asked.
                self.events.len()
            ));
        }
        for n in &self.notes {
            out.push_str(&format!("-- {n}\n"));
        }
    }
}

impl Render for api::Flushed {
    fn render(&self, out: &mut String) {
        out.push_str(&format!("requeued {}\n", self.requeued));
    }
}

impl Render for api::Each {
    fn render(&self, out: &mut String) {
        for id in &self.done {
            out.push_str(&format!("ok {id}\n"));
        }
        for f in &self.failed {
            out.push_str(&format!("failed {}\n", f.error));
        }
    }
}

impl Render for api::ArchiveFound {
    fn render(&self, out: &mut String) {
        for i in &self.items {
            out.push_str(&item_line(i));
            // The second line matches the item back to a message, and says why it is here.
            out.push_str(&format!(
                "{:>8} message-id <{}>  matched: {}\n",
                "",
                i.message_id.as_deref().unwrap_or(""),
                if i.matched.is_empty() {
                    "everything".to_string()
                } else {
                    i.matched.join(", ")
                }
            ));
        }
        let at_least = if self.total_exact { "" } else { "at least " };
        out.push_str(&format!(
            "-- {} shown of {at_least}{} matching\n",
            self.items.len(),
            self.total
        ));
    }
}

impl Render for api::ArchiveShown {
    fn render(&self, out: &mut String) {
        let i = &self.item;
        out.push_str(&format!(
            "item: {}\nid: {}\norigin: {}{}\nsender: <{}>\nrecipients: {}\nverdict: {}\nsize: {}\nsha256: {}\nhold: {}\n\n",
            i.seq, i.id, i.origin, if i.mirrored { " (mirrored)" } else { "" }, i.sender,
            i.recipients.join(" "), i.verdict, i.size, i.sha256, i.held
        ));
        out.push_str(&self.headers.replace("\r\n", "\n"));
        out.push_str("\nparts:\n");
        for p in &self.parts {
            out.push_str(&format!(
                "  {:<32} {:>9}  {}\n",
                p.content_type,
                p.size,
                p.name.as_deref().unwrap_or("")
            ));
        }
    }
}

impl Render for api::ArchiveHeld {
    fn render(&self, out: &mut String) {
        out.push_str(&format!(
            "matched {}, changed {}\n",
            self.matched, self.changed
        ));
    }
}

impl Render for api::ArchiveStatus {
    fn render(&self, out: &mut String) {
        let ratio = if self.raw_bytes > 0 {
            self.stored_bytes as f64 / self.raw_bytes as f64
        } else {
            0.0
        };
        out.push_str(&format!(
            "items: {}\nraw_bytes: {}\nstored_bytes: {} ({:.0}% of raw)\nsegments: {}\nheld: {}\nindexed: {} of {}\nwaiting_in_spool: {}\nfailing: {}\n",
            self.items, self.raw_bytes, self.stored_bytes, ratio * 100.0, self.segments, self.held,
            self.indexed_through, self.last_seq, self.waiting, self.failing.as_deref().unwrap_or("no")
        ));
        for m in &self.mirrors {
            out.push_str(&format!(
                "mirror {}: {} backlog {} oldest {} s sent {} auth_failures {}\n",
                m.peer,
                if m.connected { "up" } else { "down" },
                m.backlog,
                m.oldest_age_secs,
                m.sent,
                m.auth_failures
            ));
        }
        if let Some((done, of)) = self.rebuilding {
            out.push_str(&format!(
                "REBUILDING the catalog from the segments: {done} of {of} read (new items wait)\n"
            ));
        }
        if let Some(o) = &self.object_store {
            if let Some(id) = &o.archive {
                out.push_str(&format!("archive id: {id}\n"));
            }
            out.push_str(&format!(
                "object store: {} segment(s) ({} bytes) stored, {} waiting ({} bytes, oldest {} s), {} bytes cached here; uploads {} (failed {}), fetches {} (failed {})\n",
                o.remote_segments, o.remote_bytes, o.pending_segments, o.pending_bytes,
                o.pending_oldest_age_secs, o.cached_bytes, o.uploads, o.upload_failures,
                o.fetches, o.fetch_failures
            ));
        }
    }
}

impl Render for api::ArchiveExpired {
    fn render(&self, out: &mut String) {
        out.push_str(&format!(
            "removed {} item(s); compacted {} segment(s), {} bytes freed\n",
            self.removed, self.segments_compacted, self.bytes_freed
        ));
    }
}

impl Render for evidence::proof::Proof {
    fn render(&self, out: &mut String) {
        for b in &self.breaks {
            out.push_str(&format!("BROKEN {}: {}\n", b.at, b.what));
        }
        if self.break_count > self.breaks.len() as u64 {
            out.push_str(&format!(
                "BROKEN and {} more not listed\n",
                self.break_count - self.breaks.len() as u64
            ));
        }
        out.push_str(&format!(
            "archive {}: chain of {} entries{} (head {}), {} segment(s) read\n",
            self.archive.as_deref().unwrap_or("(no genesis found)"),
            self.entries,
            if self.from > 0 {
                format!(
                    ", linked from entry {} (a checkpoint proves those before)",
                    self.from
                )
            } else {
                String::new()
            },
            self.head,
            self.segments
        ));
        out.push_str(&format!(
            "items {} / bodies equal to their hash {} / removed with a tombstone {}{}\n",
            self.items,
            self.bodies,
            self.tombstones,
            if self.unchained > 0 {
                format!(" / records from before the chain {}", self.unchained)
            } else {
                String::new()
            }
        ));
        if !self.sealed.is_empty() || !self.keys.is_empty() {
            let by: Vec<String> = self
                .sealed
                .iter()
                .map(|(k, n)| format!("{n} with key {k}"))
                .collect();
            out.push_str(&format!(
                "records sealed: {}; in clear {}; data keys the chain names: {}\n",
                if by.is_empty() {
                    "none".into()
                } else {
                    by.join(", ")
                },
                self.clear,
                self.keys.join(", ")
            ));
        }
        if self.compared > 0 {
            out.push_str(&format!(
                "checkpoints kept elsewhere compared {}\n",
                self.compared
            ));
        }
        out.push_str(&format!(
            "checkpoints holding {}{}; signers {} ({})\n",
            self.checkpoints,
            self.last_checkpoint
                .map(|(n, t)| format!(", the newest of {n} entries at {}", utc_ms(t)))
                .unwrap_or_default(),
            self.signers.join(", "),
            if self.keys_given {
                "checked against the keys given"
            } else {
                "the keys the chain names: give --public-key to check them against a key you trust"
            }
        ));
        let signed = self.last_checkpoint.map_or(0, |(n, _)| n);
        if signed < self.entries {
            out.push_str(&format!(
                "entries {signed}..{} are proved but not yet signed (the next checkpoint comes within archive.checkpoint_secs)\n",
                self.entries - 1
            ));
        }
        out.push_str(if self.holds() {
            "PROVED: nothing altered, missing or out of order\n"
        } else {
            "NOT PROVED\n"
        });
    }
}

impl Render for Vec<evidence::audit::Entry> {
    fn render(&self, out: &mut String) {
        for e in self {
            let which = if e.which.is_empty() {
                String::new()
            } else if (e.which.len() as u64) < e.items {
                format!(" items {} (of {})", e.which.join(","), e.items)
            } else {
                format!(" items {}", e.which.join(","))
            };
            out.push_str(&format!(
                "{:>6} {} {} (uid {}) {} {:?}{}\n",
                e.n,
                utc_ms(e.time_ms),
                e.user,
                e.uid,
                e.action,
                e.detail,
                which
            ));
        }
    }
}

impl Render for evidence::audit::AuditProof {
    fn render(&self, out: &mut String) {
        for b in &self.breaks {
            out.push_str(&format!("BROKEN {}: {}\n", b.at, b.what));
        }
        out.push_str(&format!(
            "audit log: {} entries, {} checkpoints holding{}, signer {} ({})\n{}\n",
            self.entries,
            self.checkpoints,
            if self.compared > 0 {
                format!(", {} kept by mirror peers compared", self.compared)
            } else {
                String::new()
            },
            self.signer.as_deref().unwrap_or("unknown"),
            if self.keys_given {
                "checked against the keys given"
            } else {
                "the key the log names: give --public-key to check it against a key you trust"
            },
            if self.holds() { "PROVED" } else { "NOT PROVED" }
        ));
    }
}

impl Render for api::ArchiveKey {
    fn render(&self, out: &mut String) {
        out.push_str(&format!(
            "public key {}\narchive {}\nprivate key file {} (stays on this unit)\ncheckpoints {}\n",
            self.public_key,
            self.archive
                .as_deref()
                .unwrap_or("(none yet: made with the first item)"),
            self.key_file,
            self.checkpoints
        ));
        match (&self.keyring, self.encryption) {
            (None, _) => {
                out.push_str("encryption at rest: off (no keyring): records are written in clear\n")
            }
            (Some(from), sealing) => {
                out.push_str(&format!(
                    "encryption at rest: {}; keyring {from} (keep a copy apart from this unit: without it the archive cannot be read)\n",
                    if sealing {
                        "on, new records are sealed with the current key"
                    } else {
                        "off (archive.encryption = false): the keyring only reads what was sealed"
                    }
                ));
                for k in &self.data_keys {
                    out.push_str(&format!(
                        "data key {} made {}{}\n",
                        k.id,
                        utc_ms(k.created_ms),
                        if k.current { " (current)" } else { "" }
                    ));
                }
            }
        }
        if let Some(k) = &self.chain_key {
            out.push_str(&format!(
                "the chain names data key {k} as the current one\n"
            ));
        }
    }
}

impl Render for evidence::export::ExportProof {
    fn render(&self, out: &mut String) {
        for b in &self.breaks {
            out.push_str(&format!("BROKEN {}: {}\n", b.at, b.what));
        }
        out.push_str(&format!(
            "export of {:?}: {} item(s) listed, {} whole; signed by {} ({})\n{}\n",
            self.query,
            self.items,
            self.whole,
            self.key,
            if self.keys_given {
                "checked against the keys given"
            } else {
                "the key the manifest names: give --public-key to check it against a key you trust"
            },
            if self.holds() { "PROVED" } else { "NOT PROVED" }
        ));
    }
}

impl Render for api::ArchiveBulkExported {
    fn render(&self, out: &mut String) {
        out.push_str(&format!(
            "exported {} item(s), {} bytes, to {}\nmanifest {} (signed by this unit's key: spoolctl archive key)\n",
            self.items, self.bytes, self.out, self.manifest
        ));
    }
}

impl Render for api::ArchiveImported {
    fn render(&self, out: &mut String) {
        out.push_str(&format!(
            "{:<10} {:>9} {:>10} {:>9} {:>12}  source\n",
            "kind", "archived", "duplicate", "rejected", "bytes"
        ));
        for s in &self.sources {
            out.push_str(&format!(
                "{:<10} {:>9} {:>10} {:>9} {:>12}  {}\n",
                s.kind, s.archived, s.duplicates, s.rejected, s.bytes, s.path
            ));
        }
        out.push_str(&format!(
            "{:<10} {:>9} {:>10} {:>9}\n",
            "total", self.archived, self.duplicates, self.rejected
        ));
        for r in &self.refusals {
            out.push_str(&format!("REJECTED {} {}: {}\n", r.source, r.at, r.reason));
        }
        if self.rejected > self.refusals.len() as u64 {
            out.push_str(&format!(
                "REJECTED and {} more (see the report)\n",
                self.rejected - self.refusals.len() as u64
            ));
        }
        if let Some(r) = &self.report {
            out.push_str(&format!("report: {r}\n"));
        }
    }
}

impl Render for api::ArchiveRekeyed {
    fn render(&self, out: &mut String) {
        out.push_str(&format!(
            "every record is sealed with data key {}: {} record(s) sealed anew, {} segment(s) rewritten\n",
            self.key, self.resealed, self.segments
        ));
    }
}

impl Render for api::ArchiveVerified {
    fn render(&self, out: &mut String) {
        if let Some(p) = &self.proof {
            p.render(out);
        }
        for f in &self.failed {
            out.push_str(&format!("FAILED item {}: {}\n", f.id, f.error));
        }
        out.push_str(&format!(
            "items {} / bodies whole {} / failed {} / index entries {}\n",
            self.items,
            self.ok,
            self.failed.len(),
            self.index_entries
        ));
    }
}

impl Render for api::ArchiveRebuilt {
    fn render(&self, out: &mut String) {
        for d in &self.damaged {
            out.push_str(&format!(
                "DAMAGED {d}: the rest of that segment was not read\n"
            ));
        }
        for seq in &self.without_body {
            out.push_str(&format!("NO BODY for item {seq}\n"));
        }
        out.push_str(&format!(
            "rebuilt from {} segment(s) ({} from the object store): {} item(s), {} on hold, {} removed by retention\n",
            self.segments, self.from_store, self.items, self.held, self.removed
        ));
        self.verified.render(out);
    }
}

impl Render for api::ArchiveReindexed {
    fn render(&self, out: &mut String) {
        out.push_str(&format!("indexed {} item(s)\n", self.items));
    }
}

impl Render for api::ArchiveSealed {
    fn render(&self, out: &mut String) {
        match (self.segment, self.object_store) {
            (None, _) => out.push_str("the open segment holds nothing: nothing sealed\n"),
            (Some(n), true) => out.push_str(&format!(
                "segment {n} sealed; it goes to the object store at the upload thread's next pass\n"
            )),
            (Some(n), false) => out.push_str(&format!("segment {n} sealed\n")),
        }
    }
}
