//! The full-text index (tantivy): what is indexed of each item, the indexer thread, and search.
//! The index is derived: it follows the catalog in sequence order from the mark stored in its
//! last commit, so a crash costs only re-indexing what came after that mark, and an entry is
//! added only for an item whose body and catalog record are already durable. Search results
//! are checked against the catalog, so an entry of a removed item is never shown.

use crate::query::{self, Clause, TextField};
use crate::record::Item;
use crate::store::Store;
use crate::ArchiveError;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use mail_parser::{MessageParser, MimeHeaders, PartType};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tantivy::collector::{Count, TopDocs};
use tantivy::query::{BooleanQuery, Occur, PhraseQuery, Query, RangeQuery, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, FAST, INDEXED, STORED, STRING, TEXT};
use tantivy::{
    DocAddress, DocSet, Index, IndexReader, IndexWriter, Order, ReloadPolicy, TantivyDocument, Term,
};

/// Text indexed per message at most; the rest of a huge message is not searchable.
const TEXT_BYTES_MAX: usize = 1 << 20;
/// Commit at least this often while items arrive.
const COMMIT_EVERY: Duration = Duration::from_millis(1000);
const MIME_DEPTH_MAX: usize = 4;

/// The index's fields.
#[derive(Clone, Copy)]
pub struct Fields {
    seq: Field,
    id: Field,
    msgid: Field,
    origin: Field,
    from: Field,
    to: Field,
    subject: Field,
    body: Field,
    filename: Field,
    arrived: Field,
    size: Field,
    attachment: Field,
    /// The envelope sender and recipients, lowercased, exact: what a scope is checked on
    /// (header addresses can say anything).
    envelope: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let f = Fields {
        seq: b.add_u64_field("seq", INDEXED | FAST | STORED),
        id: b.add_text_field("id", STRING),
        msgid: b.add_text_field("msgid", STRING),
        origin: b.add_text_field("origin", STRING),
        from: b.add_text_field("from", TEXT),
        to: b.add_text_field("to", TEXT),
        subject: b.add_text_field("subject", TEXT),
        body: b.add_text_field("body", TEXT),
        filename: b.add_text_field("filename", TEXT),
        arrived: b.add_u64_field("arrived", INDEXED | FAST),
        size: b.add_u64_field("size", INDEXED | FAST),
        attachment: b.add_u64_field("attachment", INDEXED),
        envelope: b.add_text_field("envelope", STRING),
    };
    (b.build(), f)
}

fn ix(e: tantivy::TantivyError) -> ArchiveError {
    ArchiveError::Index(e.to_string())
}

/// Work for the indexer thread besides following the catalog.
pub enum IndexMsg {
    /// New items were stored.
    Wake,
    /// Items were removed.
    Delete(Vec<u64>),
    /// Commit now and answer.
    Flush(Sender<()>),
    /// Commit and end the thread.
    Stop,
    /// Drop every entry and index the catalog again from the start; answered once dropped.
    Rebuild(Sender<()>),
}

/// The searchable side.
pub struct SearchIndex {
    index: Index,
    reader: IndexReader,
    fields: Fields,
    /// Items indexed and committed, in sequence order, up to this one.
    pub indexed_through: Arc<AtomicU64>,
    /// Newest items searched in the first pass (see [`SearchIndex::search`]).
    pub first_window: u64,
}

/// The thread that keeps the index up with the catalog.
pub struct Indexer {
    store: Arc<Store>,
    writer: IndexWriter,
    reader: IndexReader,
    fields: Fields,
    indexed_through: Arc<AtomicU64>,
}

/// What the indexer thread needs to make its writer.
pub struct IndexerSetup {
    store: Arc<Store>,
    index: Index,
    heap_bytes: usize,
    reader: IndexReader,
    fields: Fields,
    indexed_through: Arc<AtomicU64>,
}

/// How much less CPU priority indexing gets (nice): the durable store is on the delivery path
/// and the index is not, so on a busy machine the index lags (the
/// `spoold_archive_index_lag_items` gauge) instead of slowing delivery, and catches up when
/// load drops.
const INDEXER_NICE: libc::c_int = 10;

impl IndexerSetup {
    /// Starts the indexer thread (its writer's threads, made there, inherit its lower
    /// priority); returns once the writer exists, or why it could not be made.
    pub fn start(
        self,
        rx: Receiver<IndexMsg>,
    ) -> Result<std::thread::JoinHandle<()>, ArchiveError> {
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("archive-index".into())
            .spawn(move || {
                // SAFETY: setpriority on this thread (tid from gettid); no memory is passed.
                unsafe {
                    let tid = libc::gettid() as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, INDEXER_NICE);
                }
                match self.index.writer_with_num_threads(1, self.heap_bytes) {
                    Ok(writer) => {
                        let _ = ready_tx.send(Ok(()));
                        Indexer {
                            store: self.store,
                            writer,
                            reader: self.reader,
                            fields: self.fields,
                            indexed_through: self.indexed_through,
                        }
                        .run(rx)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(ix(e)));
                    }
                }
            })
            .map_err(|e| ArchiveError::Io(e.to_string()))?;
        ready_rx.recv().map_err(|_| ArchiveError::Stopped)??;
        Ok(thread)
    }
}

/// Opens (creating) the index in `dir`.
pub fn open(
    dir: &Path,
    store: Arc<Store>,
    heap_bytes: usize,
) -> Result<(SearchIndex, IndexerSetup), ArchiveError> {
    std::fs::create_dir_all(dir).map_err(|e| ArchiveError::Io(e.to_string()))?;
    let (schema, fields) = schema();
    let directory = tantivy::directory::MmapDirectory::open(dir)
        .map_err(|e| ArchiveError::Index(e.to_string()))?;
    let index = match Index::open_or_create(directory, schema.clone()) {
        Ok(i) => i,
        // An index made by an older version with other fields: it is derived, so it is made
        // again from the catalog (the indexer starts from item 0).
        Err(tantivy::TantivyError::SchemaError(why)) => {
            tracing::warn!("archive index: {why}; indexing the archive again");
            std::fs::remove_dir_all(dir).map_err(|e| ArchiveError::Io(e.to_string()))?;
            std::fs::create_dir_all(dir).map_err(|e| ArchiveError::Io(e.to_string()))?;
            let directory = tantivy::directory::MmapDirectory::open(dir)
                .map_err(|e| ArchiveError::Index(e.to_string()))?;
            Index::create(directory, schema, tantivy::IndexSettings::default()).map_err(ix)?
        }
        Err(e) => return Err(ix(e)),
    };
    let mark: u64 = index
        .load_metas()
        .map_err(ix)?
        .payload
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let reader = index
        .reader_builder()
        .reload_policy(ReloadPolicy::Manual)
        .try_into()
        .map_err(ix)?;
    let indexed_through = Arc::new(AtomicU64::new(mark));
    Ok((
        SearchIndex {
            index: index.clone(),
            reader: reader.clone(),
            fields,
            indexed_through: indexed_through.clone(),
            first_window: FIRST_WINDOW,
        },
        IndexerSetup {
            store,
            index,
            heap_bytes,
            reader,
            fields,
            indexed_through,
        },
    ))
}

impl Indexer {
    /// Runs until every sender is gone.
    fn run(mut self, rx: Receiver<IndexMsg>) {
        let mut mark = self.indexed_through.load(Ordering::SeqCst);
        let mut dirty = false;
        let mut since_commit = Instant::now();
        // An item whose body is only in an object store that does not answer now: the index
        // waits for it (a second at a time) rather than index it without its content for good.
        let mut waiting_for_store = false;
        loop {
            // While the catalog is rebuilt it fills out of sequence order and its bodies may be
            // in segments not read yet: the index waits for the end (the writer wakes it).
            let batch = if self.rebuilding() {
                Vec::new()
            } else {
                self.store
                    .items_after(mark, 256, |_| true)
                    .unwrap_or_else(|e| {
                        tracing::error!("archive index: read the catalog: {e}");
                        Vec::new()
                    })
            };
            let mut stalled = false;
            for item in &batch {
                let doc = match self.document(item) {
                    Ok(doc) => doc,
                    Err(e) => {
                        if !std::mem::replace(&mut waiting_for_store, true) {
                            tracing::warn!(
                                seq = item.seq,
                                "archive index: waits for the object store to read a body: {e}"
                            );
                        }
                        stalled = true;
                        break;
                    }
                };
                if std::mem::take(&mut waiting_for_store) {
                    tracing::info!(
                        seq = item.seq,
                        "archive index: the object store answers again"
                    );
                }
                if let Err(e) = self.writer.add_document(doc) {
                    tracing::error!(seq = item.seq, "archive index: {e}");
                }
                mark = item.seq;
                dirty = true;
            }
            let idle = batch.is_empty() || stalled;
            if dirty && (idle || since_commit.elapsed() >= COMMIT_EVERY) {
                self.commit(mark);
                dirty = false;
                since_commit = Instant::now();
            }
            let msg = if idle {
                match rx.recv_timeout(COMMIT_EVERY) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                rx.try_recv().ok()
            };
            if let Some(m) = msg {
                for m in std::iter::once(m).chain(rx.try_iter()) {
                    match m {
                        IndexMsg::Wake => {}
                        IndexMsg::Stop => {
                            if dirty {
                                self.commit(mark);
                            }
                            return;
                        }
                        IndexMsg::Delete(seqs) => {
                            for s in seqs {
                                self.writer
                                    .delete_term(Term::from_field_u64(self.fields.seq, s));
                            }
                            dirty = true;
                        }
                        IndexMsg::Flush(done) => {
                            // Index what is there first, so a flush after a store sees it.
                            // A batch at a time: the index may be far behind.
                            // Not while the catalog is rebuilt (looked at now, not when this
                            // pass of the loop began).
                            while let Ok(batch) = if self.rebuilding() {
                                Ok(Vec::new())
                            } else {
                                self.store.items_after(mark, 1024, |_| true)
                            } {
                                if batch.is_empty() {
                                    break;
                                }
                                let mut stalled = false;
                                for item in &batch {
                                    match self.document(item) {
                                        Ok(doc) => {
                                            let _ = self.writer.add_document(doc);
                                            mark = item.seq;
                                        }
                                        Err(_) => {
                                            stalled = true;
                                            break;
                                        }
                                    }
                                }
                                if stalled {
                                    break;
                                }
                            }
                            self.commit(mark);
                            dirty = false;
                            let _ = done.send(());
                        }
                        IndexMsg::Rebuild(dropped) => {
                            let _ = self.writer.delete_all_documents();
                            mark = 0;
                            self.commit(0);
                            let _ = dropped.send(());
                        }
                    }
                }
            }
        }
    }

    /// Whether the catalog is being rebuilt now.
    fn rebuilding(&self) -> bool {
        self.store.rebuild_progress.pending.load(Ordering::SeqCst)
    }

    fn commit(&mut self, mark: u64) {
        let mut prepared = match self.writer.prepare_commit() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("archive index commit: {e}");
                return;
            }
        };
        prepared.set_payload(&mark.to_string());
        match prepared.commit() {
            Ok(_) => {
                let _ = self.reader.reload();
                self.indexed_through.store(mark, Ordering::SeqCst);
            }
            Err(e) => tracing::error!("archive index commit: {e}"),
        }
    }

    /// The item's document; an error only when its body is in an object store that does
    /// not answer now (any other unreadable body is indexed by its envelope, and said).
    fn document(&self, item: &Item) -> Result<TantivyDocument, ArchiveError> {
        let f = &self.fields;
        let mut doc = TantivyDocument::default();
        doc.add_u64(f.seq, item.seq);
        doc.add_text(f.id, &item.id);
        doc.add_text(f.origin, &item.origin);
        doc.add_u64(f.arrived, item.arrived_ms);
        doc.add_u64(f.size, item.raw_len);
        doc.add_text(f.from, &item.sender);
        for r in &item.recipients {
            doc.add_text(f.to, r);
        }
        for a in std::iter::once(&item.sender).chain(&item.recipients) {
            doc.add_text(f.envelope, a.to_ascii_lowercase());
        }
        let raw = match self.store.raw(&item.hash) {
            Ok(r) => r,
            Err(e @ ArchiveError::Remote(_)) => return Err(e),
            Err(e) => {
                tracing::error!(
                    seq = item.seq,
                    "archive index: body unreadable, envelope indexed only: {e}"
                );
                return Ok(doc);
            }
        };
        let Some(msg) = MessageParser::default().parse(&raw) else {
            return Ok(doc);
        };
        let mut text = Text::default();
        add_message(&mut doc, f, &msg, &mut text, 0);
        doc.add_u64(f.attachment, u64::from(text.attachments > 0));
        Ok(doc)
    }
}

#[derive(Default)]
struct Text {
    bytes: usize,
    attachments: usize,
}

fn add_message(
    doc: &mut TantivyDocument,
    f: &Fields,
    msg: &mail_parser::Message<'_>,
    text: &mut Text,
    depth: usize,
) {
    if depth == 0 {
        if let Some(id) = msg.message_id() {
            doc.add_text(f.msgid, id);
        }
    }
    for (field, addrs) in [(f.from, msg.from()), (f.to, msg.to()), (f.to, msg.cc())] {
        for a in addrs.into_iter().flat_map(|a| a.iter()) {
            for part in [a.name(), a.address()].into_iter().flatten() {
                doc.add_text(field, part);
            }
        }
    }
    if let Some(s) = msg.subject() {
        doc.add_text(f.subject, s);
    }
    for part in &msg.parts {
        if let Some(name) = part.attachment_name() {
            doc.add_text(f.filename, name);
            text.attachments += 1;
        } else if matches!(part.body, PartType::Binary(_) | PartType::InlineBinary(_)) {
            text.attachments += 1;
        }
        let mut add = |s: &str| {
            let room = TEXT_BYTES_MAX.saturating_sub(text.bytes);
            if room > 0 {
                let cut = floor_char_boundary(s, room);
                doc.add_text(f.body, &s[..cut]);
                text.bytes += cut;
            }
        };
        match &part.body {
            PartType::Text(t) => add(t),
            PartType::Html(h) => add(&mail_parser::decoders::html::html_to_text(h)),
            PartType::Message(inner) if depth < MIME_DEPTH_MAX => {
                add_message(doc, f, inner, text, depth + 1)
            }
            _ => {}
        }
    }
}

fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    (0..=at).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// One page of search results.
pub struct Found {
    /// Matching items in the index (before the catalog check): all of them when
    /// `total_exact`, else those among the newest items searched.
    pub total: usize,
    /// Whether `total` counts every match.
    pub total_exact: bool,
    /// Matching sequence numbers, newest first.
    pub seqs: Vec<u64>,
    /// For each of `seqs`, the query's fields it matched in (`subject`, `body`, `msgid`, …, as
    /// the search language names them), in the
    /// query's order: what lets a person see why an item is in the list.
    pub matched: Vec<Vec<&'static str>>,
}

/// The newest items searched first; each later pass searches this many times more.
const FIRST_WINDOW: u64 = 1 << 16;
const WINDOW_GROWTH: u64 = 8;

impl SearchIndex {
    /// Runs a query in the search language of [`crate::query`]: the newest `limit` matches.
    /// Matches are looked for among the newest items first (65,536, then 8 times more each
    /// pass) and the search stops at the first pass that finds `limit` of them, so a query
    /// matching most of a large archive costs what the newest items cost; `total` then counts
    /// the matches in that window only (`total_exact` false).
    ///
    /// With a `scope`, only items whose envelope sender or a recipient is one of its
    /// addresses (lowercase) match.
    pub fn search(
        &self,
        q: &str,
        limit: usize,
        scope: Option<&[String]>,
    ) -> Result<Found, ArchiveError> {
        let clauses = query::parse(q).map_err(ArchiveError::Query)?;
        let mut query = self.build(&clauses)?;
        if let Some(addresses) = scope {
            let any: Vec<(Occur, Box<dyn Query>)> = addresses
                .iter()
                .map(|a| {
                    let t = Term::from_field_text(self.fields.envelope, &a.to_ascii_lowercase());
                    let q: Box<dyn Query> = Box::new(TermQuery::new(t, IndexRecordOption::Basic));
                    (Occur::Should, q)
                })
                .collect();
            let within: Box<dyn Query> = if any.is_empty() {
                Box::new(tantivy::query::EmptyQuery)
            } else {
                Box::new(BooleanQuery::new(any))
            };
            query = Box::new(BooleanQuery::new(vec![
                (Occur::Must, query),
                (Occur::Must, within),
            ]));
        }
        let searcher = self.reader.searcher();
        let newest = self.indexed_through.load(Ordering::SeqCst);
        let mut window = self.first_window.max(1);
        loop {
            let from = newest.saturating_sub(window);
            let within: Box<dyn Query> = if from == 0 {
                query.box_clone()
            } else {
                Box::new(BooleanQuery::new(vec![
                    (Occur::Must, query.box_clone()),
                    (
                        Occur::Must,
                        range(self.fields.seq, Bound::Excluded(from), Bound::Unbounded),
                    ),
                ]))
            };
            let top = TopDocs::with_limit(limit.max(1)).order_by_u64_field("seq", Order::Desc);
            let (docs, total) = searcher.search(&within, &(top, Count)).map_err(ix)?;
            if from == 0 || total >= limit.max(1) {
                let docs: Vec<(u64, DocAddress)> = docs
                    .into_iter()
                    .filter_map(|(seq, addr)| Some((seq?, addr)))
                    .collect();
                let addrs: Vec<DocAddress> = docs.iter().map(|(_, a)| *a).collect();
                let matched = self.matched_fields(&searcher, &clauses, &addrs)?;
                return Ok(Found {
                    total,
                    total_exact: from == 0,
                    seqs: docs.into_iter().map(|(seq, _)| seq).collect(),
                    matched,
                });
            }
            window = window.saturating_mul(WINDOW_GROWTH);
        }
    }

    /// For each document, the names of the fields the clauses matched it in. Each clause is
    /// split into one query per field it can match (a bare word: seven), each run over the
    /// given documents only, a segment at a time in document order.
    fn matched_fields(
        &self,
        searcher: &tantivy::Searcher,
        clauses: &[Clause],
        docs: &[DocAddress],
    ) -> Result<Vec<Vec<&'static str>>, ArchiveError> {
        let mut matched = vec![Vec::new(); docs.len()];
        let mut order: Vec<usize> = (0..docs.len()).collect();
        order.sort_by_key(|&i| (docs[i].segment_ord, docs[i].doc_id));
        for (name, query) in self.per_field(clauses)? {
            let weight = query
                .weight(tantivy::query::EnableScoring::disabled_from_searcher(
                    searcher,
                ))
                .map_err(ix)?;
            let mut scorer: Option<(u32, Box<dyn tantivy::query::Scorer>)> = None;
            for &i in &order {
                let DocAddress {
                    segment_ord,
                    doc_id,
                } = docs[i];
                if scorer.as_ref().map(|(s, _)| *s) != Some(segment_ord) {
                    let reader = searcher.segment_reader(segment_ord);
                    scorer = Some((segment_ord, weight.scorer(reader, 1.0).map_err(ix)?));
                }
                let Some((_, s)) = scorer.as_mut() else {
                    continue;
                };
                // Documents come in ascending order within a segment, so seeking forward is
                // all a scorer has to do.
                let at = if s.doc() >= doc_id {
                    s.doc()
                } else {
                    s.seek(doc_id)
                };
                if at == doc_id && !matched[i].contains(&name) {
                    matched[i].push(name);
                }
            }
        }
        Ok(matched)
    }

    /// Each clause as one query per field it may match in, named as the search language
    /// names the field.
    fn per_field(&self, clauses: &[Clause]) -> Result<Vec<NamedQuery>, ArchiveError> {
        let f = &self.fields;
        let mut out: Vec<NamedQuery> = Vec::new();
        for c in clauses {
            match c {
                Clause::Text(field, value) => {
                    let (name, field) = text_field(f, *field);
                    out.push((name, self.text_query(field, value)?));
                }
                Clause::Anywhere(value) => {
                    for field in TEXT_FIELDS {
                        let (name, field) = text_field(f, field);
                        out.push((name, self.text_query(field, value)?));
                    }
                    out.push(("msgid", exact(f.msgid, value)));
                    out.push(("id", exact(f.id, value)));
                }
                other => {
                    let name = match other {
                        Clause::MessageId(_) => "msgid",
                        Clause::Id(_) => "id",
                        Clause::Origin(_) => "origin",
                        Clause::After(_) => "after",
                        Clause::Before(_) => "before",
                        Clause::SizeAbove(_) | Clause::SizeBelow(_) => "size",
                        Clause::HasAttachment => "has",
                        Clause::Text(..) | Clause::Anywhere(_) => continue,
                    };
                    out.push((name, self.build(std::slice::from_ref(other))?));
                }
            }
        }
        Ok(out)
    }

    /// Every match, in no particular order (for a legal hold by query).
    pub fn search_all(&self, q: &str) -> Result<Vec<u64>, ArchiveError> {
        let clauses = query::parse(q).map_err(ArchiveError::Query)?;
        let query = self.build(&clauses)?;
        let searcher = self.reader.searcher();
        let total = searcher.search(&query, &Count).map_err(ix)?;
        let top = TopDocs::with_limit(total.max(1)).order_by_u64_field("seq", Order::Desc);
        let docs = searcher.search(&query, &top).map_err(ix)?;
        Ok(docs.into_iter().filter_map(|(seq, _)| seq).collect())
    }

    /// Documents in the index.
    pub fn entries(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    fn build(&self, clauses: &[Clause]) -> Result<Box<dyn Query>, ArchiveError> {
        let f = &self.fields;
        let mut must: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for c in clauses {
            let q: Box<dyn Query> = match c {
                Clause::Text(field, value) => self.text_query(text_field(f, *field).1, value)?,
                Clause::Anywhere(value) => {
                    let mut any: Vec<(Occur, Box<dyn Query>)> = Vec::new();
                    for field in TEXT_FIELDS {
                        any.push((
                            Occur::Should,
                            self.text_query(text_field(f, field).1, value)?,
                        ));
                    }
                    any.push((Occur::Should, exact(f.msgid, value)));
                    any.push((Occur::Should, exact(f.id, value)));
                    Box::new(BooleanQuery::new(any))
                }
                Clause::MessageId(v) => exact(f.msgid, v),
                Clause::Id(v) => exact(f.id, v),
                Clause::Origin(v) => exact(f.origin, v),
                Clause::After(ms) => range(f.arrived, Bound::Included(*ms), Bound::Unbounded),
                Clause::Before(ms) => range(f.arrived, Bound::Unbounded, Bound::Excluded(*ms)),
                Clause::SizeAbove(n) => range(f.size, Bound::Excluded(*n), Bound::Unbounded),
                Clause::SizeBelow(n) => range(f.size, Bound::Unbounded, Bound::Excluded(*n)),
                Clause::HasAttachment => Box::new(TermQuery::new(
                    Term::from_field_u64(f.attachment, 1),
                    IndexRecordOption::Basic,
                )),
            };
            must.push((Occur::Must, q));
        }
        if must.is_empty() {
            return Ok(Box::new(tantivy::query::AllQuery));
        }
        Ok(Box::new(BooleanQuery::new(must)))
    }

    /// A word is a term query; several words (an address, a "phrase") a phrase query.
    fn text_query(&self, field: Field, value: &str) -> Result<Box<dyn Query>, ArchiveError> {
        let mut analyzer = self.index.tokenizer_for_field(field).map_err(ix)?;
        let mut stream = analyzer.token_stream(value);
        let mut terms = Vec::new();
        while stream.advance() {
            terms.push(Term::from_field_text(field, &stream.token().text));
        }
        Ok(match terms.len() {
            0 => Box::new(tantivy::query::EmptyQuery),
            1 => Box::new(TermQuery::new(terms.remove(0), IndexRecordOption::Basic)),
            _ => Box::new(PhraseQuery::new(terms)),
        })
    }
}

/// A query that matches in one field, with the field's name in the search language.
type NamedQuery = (&'static str, Box<dyn Query>);

/// The text fields a bare word is looked for in, in the order results name them.
const TEXT_FIELDS: [TextField; 5] = [
    TextField::Subject,
    TextField::From,
    TextField::To,
    TextField::Body,
    TextField::Filename,
];

/// A text field's name in the search language, and its index field.
fn text_field(f: &Fields, field: TextField) -> (&'static str, Field) {
    match field {
        TextField::From => ("from", f.from),
        TextField::To => ("to", f.to),
        TextField::Subject => ("subject", f.subject),
        TextField::Body => ("body", f.body),
        TextField::Filename => ("filename", f.filename),
    }
}

fn exact(field: Field, value: &str) -> Box<dyn Query> {
    let v = value.trim_start_matches('<').trim_end_matches('>');
    Box::new(TermQuery::new(
        Term::from_field_text(field, v),
        IndexRecordOption::Basic,
    ))
}

fn range(field: Field, lo: Bound<u64>, hi: Bound<u64>) -> Box<dyn Query> {
    let term = |b: Bound<u64>| match b {
        Bound::Included(v) => Bound::Included(Term::from_field_u64(field, v)),
        Bound::Excluded(v) => Bound::Excluded(Term::from_field_u64(field, v)),
        Bound::Unbounded => Bound::Unbounded,
    };
    Box::new(RangeQuery::new(term(lo), term(hi)))
}
