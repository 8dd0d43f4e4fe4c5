//! `bench archive`: the archive against the spool it must keep up with.
//!
//! A generated corpus (fixed seed): plain text, text + HTML alternatives, and multipart mail
//! with base64 or text attachments; sizes drawn from a lognormal distribution (median 6 KiB,
//! σ 1.2, clamped to 600 B – 4 MiB), the shape mail-size studies report; words drawn with a
//! Zipf law from a generated 20,000-word vocabulary. Then, in one invocation:
//! 1. spoold's SMTP ingest rate (50 sessions, 4 KiB, no delivery): the rate to keep up with;
//! 2. archive ingest of the corpus from 8 threads (durable: group commit, `fdatasync`), and how
//!    long the index takes to make it all searchable; bytes stored against raw;
//! 3. search latency per query kind at `--search-items` items (p50/p99 of 200 queries each);
//! 4. mirror catch-up: a backlog of `--backlog` items copied to a second archive over the
//!    authenticated peer link on loopback;
//! 5. with `--parts object-store`: upload throughput of sealed segments to a three-node Garage
//!    cluster on loopback, and retrieval latency from a cold local cache beside local reads;
//!    with `--parts rebuild`: a lost unit's catalog rebuilt from that store (`--rebuild-items`),
//!    against the same rebuild from local segments in the same run;
//!    with `--parts prove`: the proof of an archive (`--rebuild-items`: chain, checkpoints, every
//!    body hashed) on the unit, offline over its files, from a checkpoint, and from the store,
//!    against reading every item's body back through the catalog in the same run; and the hash
//!    chain's CPU per item against the archive's per-item cost;
//! 6. the process's peak RSS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::ingest::{load, spoold_binary, Load, Spoold};
use anyhow::Result;
use archive::{Archive, Incoming, Options};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Messages archived in the ingest run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Items in the archive that search latency is measured on.
    #[arg(long, default_value_t = 1_000_000)]
    search_items: usize,
    /// Items of the mirror backlog (10 minutes of mail at 100 msgs/s by default).
    #[arg(long, default_value_t = 60_000)]
    backlog: usize,
    /// Runs of the ingest measurements; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Corpus seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Items of the archive rebuilt in the rebuild part.
    #[arg(long, default_value_t = 100_000)]
    rebuild_items: usize,
    /// Parts to run, comma-separated: ingest, search, mirror, object-store, rebuild, prove (the
    /// last three need `garage`) and import.
    #[arg(long, default_value = "ingest,search,mirror", value_delimiter = ',')]
    parts: Vec<String>,
    /// Threads archiving at once (the daemon archives from up to `delivery.concurrency_max`
    /// deliveries at once, 20 by default).
    #[arg(long, default_value_t = 20)]
    threads: usize,
}

/// The corpus generator.
struct Corpus {
    rng: StdRng,
    vocab: Vec<String>,
    /// Cumulative Zipf weights over `vocab`.
    zipf: Vec<f64>,
    users: Vec<String>,
    n: usize,
    /// Every message plain text of exactly this size (the spool benchmark's shape).
    fixed: Option<usize>,
    /// Sizes above this are cut to it (the search corpus: the index, not the body store, is
    /// what search latency depends on).
    size_max: usize,
}

const SYLLABLES: [&str; 40] = [
    "ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "den", "pra", "gul", "ost", "ber", "fin",
    "qua", "zel", "dor", "min", "tes", "ral", "bo", "ci", "ex", "ly", "mon", "nor", "pe", "ques",
    "sa", "tri", "un", "ver", "wa", "xo", "yu", "za", "ark", "bel", "cor", "dul",
];

impl Corpus {
    fn new(seed: u64) -> Corpus {
        let mut rng = StdRng::seed_from_u64(seed);
        let vocab: Vec<String> = (0..20_000)
            .map(|_| {
                let n = rng.gen_range(1..=4);
                (0..n)
                    .map(|_| SYLLABLES[rng.gen_range(0..SYLLABLES.len())])
                    .collect()
            })
            .collect();
        let mut acc = 0.0;
        let zipf = (1..=vocab.len())
            .map(|r| {
                acc += 1.0 / r as f64;
                acc
            })
            .collect();
        let users = (0..2_000)
            .map(|i| format!("user{i}@domain{}.example", i % 50))
            .collect();
        Corpus {
            rng,
            vocab,
            zipf,
            users,
            n: 0,
            fixed: None,
            size_max: 4 << 20,
        }
    }

    fn word(&mut self) -> &str {
        let total = *self.zipf.last().unwrap();
        let x = self.rng.gen_range(0.0..total);
        let i = self
            .zipf
            .partition_point(|&c| c < x)
            .min(self.vocab.len() - 1);
        &self.vocab[i]
    }

    fn text(&mut self, bytes: usize) -> String {
        let mut s = String::with_capacity(bytes + 80);
        let mut line = 0;
        while s.len() < bytes {
            let w = self.word().to_string();
            s.push_str(&w);
            line += w.len() + 1;
            if line > 70 {
                s.push_str("\r\n");
                line = 0;
            } else {
                s.push(' ');
            }
        }
        s.push_str("\r\n");
        s
    }

    fn size(&mut self) -> usize {
        // Box-Muller: a standard normal, then lognormal with median 6 KiB, sigma 1.2.
        let (u1, u2): (f64, f64) = (self.rng.gen_range(1e-12..1.0), self.rng.gen());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        ((6144.0 * (1.2 * z).exp()) as usize).clamp(600, self.size_max)
    }

    /// The next message, its sender and recipients.
    fn next(&mut self) -> (Vec<u8>, String, Vec<String>) {
        self.n += 1;
        let size = self.size();
        let from = self.users[self.rng.gen_range(0..self.users.len())].clone();
        let to: Vec<String> = (0..self.rng.gen_range(1..=3))
            .map(|_| self.users[self.rng.gen_range(0..self.users.len())].clone())
            .collect();
        let subject: Vec<String> = (0..self.rng.gen_range(3..8))
            .map(|_| self.word().to_string())
            .collect();
        let mut m = format!(
            "From: {from}\r\nTo: {}\r\nSubject: {}\r\nMessage-ID: <{}@bench.example>\r\nDate: Mon, 30 Nov 2026 06:00:00 +0000\r\nMIME-Version: 1.0\r\n",
            to.join(", "),
            subject.join(" "),
            self.n,
        );
        let kind = self.rng.gen_range(0..100);
        if let Some(size) = self.fixed {
            m.push_str("Content-Type: text/plain; charset=utf-8\r\n\r\n");
            let t = self.text(size.saturating_sub(m.len() + 80));
            m.push_str(&t);
            m.truncate(size - 2);
            while !m.is_char_boundary(m.len()) {
                m.pop();
            }
            m.push_str("\r\n");
        } else if kind < 55 {
            m.push_str("Content-Type: text/plain; charset=utf-8\r\n\r\n");
            let t = self.text(size.saturating_sub(m.len()));
            m.push_str(&t);
        } else if kind < 80 {
            let t = self.text(size.saturating_sub(m.len()) / 2);
            let html = format!(
                "<html><body><p>{}</p></body></html>\r\n",
                t.replace("\r\n", "<br>\r\n")
            );
            m.push_str(&format!(
                "Content-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n--alt\r\nContent-Type: text/plain\r\n\r\n{t}--alt\r\nContent-Type: text/html\r\n\r\n{html}--alt--\r\n"
            ));
        } else {
            let t = self.text(400);
            let att_len = size.saturating_sub(m.len() + 600);
            let (name, ctype, body) = if self.rng.gen_range(0..10) < 7 {
                let raw: Vec<u8> = (0..att_len * 3 / 4).map(|_| self.rng.gen()).collect();
                (
                    format!("{}.pdf", self.word()),
                    "application/pdf",
                    base64_lines(&raw),
                )
            } else {
                (
                    format!("{}.txt", self.word()),
                    "text/plain",
                    self.text(att_len),
                )
            };
            let enc = if ctype == "text/plain" {
                "8bit"
            } else {
                "base64"
            };
            m.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=\"mix\"\r\n\r\n--mix\r\nContent-Type: text/plain\r\n\r\n{t}--mix\r\nContent-Type: {ctype}; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: {enc}\r\n\r\n{body}--mix--\r\n"
            ));
        }
        (m.into_bytes(), from, to)
    }
}

fn base64_lines(raw: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(raw.len() * 4 / 3 + raw.len() / 38);
    for (i, c) in raw.chunks(3).enumerate() {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            out.push(if k <= c.len() {
                A[(n >> (18 - 6 * k) & 63) as usize] as char
            } else {
                '='
            });
        }
        if i % 19 == 18 {
            out.push_str("\r\n");
        }
    }
    out.push_str("\r\n");
    out
}

/// Archive time base: a year of mail, so date ranges select slices.
const YEAR_START_MS: u64 = 1_764_547_200_000; // 2025-12-01
const YEAR_MS: u64 = 365 * 86_400_000;

fn incoming(n: usize, of: usize, raw: &[u8], from: String, to: Vec<String>) -> Incoming {
    Incoming {
        id: format!("{:016x}-bench", n),
        origin: "bench".into(),
        arrived_ms: YEAR_START_MS + (n as u64 * YEAR_MS) / of.max(1) as u64,
        client: "192.0.2.1".into(),
        sender: from,
        recipients: to,
        verdict: "clean".into(),
        hash: Sha256::digest(raw).into(),
    }
}

fn open(dir: &std::path::Path) -> Result<Archive> {
    open_as(dir, false)
}

/// An archive in `dir`; `sealed`: with encryption at rest ([`bench_keyring`]).
fn open_as(dir: &std::path::Path, sealed: bool) -> Result<Archive> {
    let mut o = Options::new(dir.to_path_buf());
    o.free_bytes_min = 1 << 30;
    if sealed {
        o.encryption = Some(encryption());
    }
    Ok(Archive::open(&o)?)
}

/// The keyring of this run's sealed archives (in memory).
fn bench_keyring() -> &'static archive::seal::Keyring {
    static KEYRING: std::sync::OnceLock<archive::seal::Keyring> = std::sync::OnceLock::new();
    KEYRING.get_or_init(|| archive::seal::Keyring::generate(0))
}

fn encryption() -> archive::Encryption {
    archive::Encryption {
        keyring: bench_keyring().clone(),
        file: None,
        seal: true,
    }
}

/// Archives `n` corpus messages from `threads` threads; returns (msgs/s stored, msgs/s
/// searchable, raw bytes, stored bytes).
/// Message sizes of a run.
#[derive(Clone, Copy)]
enum Sizes {
    /// The corpus mix, sizes cut at this.
    Mix(usize),
    /// Plain text of exactly this size.
    Fixed(usize),
}

fn ingest(
    dir: &std::path::Path,
    seed: u64,
    n: usize,
    sizes: Sizes,
    threads: usize,
    sealed: bool,
) -> Result<(f64, f64, u64, u64)> {
    let mut corpus = Corpus::new(seed);
    match sizes {
        Sizes::Mix(max) => corpus.size_max = max,
        Sizes::Fixed(size) => corpus.fixed = Some(size),
    }
    // Generated ahead when it fits in memory (the timed part then only archives); streamed
    // from the generator under a lock for the million-item corpus.
    let ahead = n <= 50_000;
    let pregenerated: Vec<_> = if ahead {
        (0..n).map(|_| corpus.next()).collect()
    } else {
        Vec::new()
    };
    let pregenerated = pregenerated.into_iter();
    let source = Arc::new(std::sync::Mutex::new((0..n, corpus, pregenerated)));
    let a = Arc::new(open_as(dir, sealed)?);
    let t = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (a, source) = (a.clone(), source.clone());
            std::thread::spawn(move || loop {
                let next = {
                    let mut s = source.lock().unwrap();
                    let Some(i) = s.0.next() else { return };
                    let ready = s.2.next();
                    let m = match ready {
                        Some(m) => m,
                        None => s.1.next(),
                    };
                    (i, m)
                };
                let (i, (raw, from, to)) = next;
                a.archive(incoming(i, n, &raw, from, to), &raw).unwrap();
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let stored = t.elapsed().as_secs_f64();
    a.flush_index()?;
    let searchable = t.elapsed().as_secs_f64();
    let st = a.status()?;
    Ok((
        n as f64 / stored,
        n as f64 / searchable,
        st.totals.raw_bytes,
        st.totals.stored_bytes,
    ))
}

/// Makes one query of a kind.
type QueryMaker = dyn FnMut(&mut StdRng, &mut Corpus) -> String;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// A `/proc/self/status` field in MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    crate::status_field_mib(&status, field)
}

pub fn run(a: Args) -> Result<()> {
    let base = crate::scratch_base();
    println!("file system: {}", crate::describe_fs(&base));
    crate::settle_after_deletions();
    let mut keep = Vec::new();
    let part = |p: &str| a.parts.iter().any(|x| x == p);
    if part("ingest") {
        run_ingest(&a, &mut keep)?;
    }
    if part("search") {
        run_search(&a, &mut keep)?;
    }
    if part("mirror") {
        run_mirror(&a, &mut keep)?;
    }
    if part("object-store") {
        run_object_store(&a, &mut keep)?;
    }
    if part("rebuild") {
        run_rebuild(&a, &mut keep)?;
    }
    if part("prove") {
        run_prove(&a, &mut keep)?;
    }
    if part("import") {
        run_import(&a, &mut keep)?;
    }
    println!(
        "\nbench process: peak RSS {:.0} MiB; now {:.0} MiB anonymous, {:.0} MiB file-backed (mapped catalog and index pages, reclaimable)",
        status_mib("VmHWM:"),
        status_mib("RssAnon:"),
        status_mib("RssFile:")
    );
    crate::remove_scratch(keep);
    Ok(())
}

/// Spool ingest, then archive ingest of the corpus and of 4 KiB messages, per run.
fn run_ingest(a: &Args, keep: &mut Vec<tempfile::TempDir>) -> Result<()> {
    let bin = spoold_binary()?;
    let (mut spool_rates, mut stored_rates, mut searchable_rates, mut ratio) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut fixed_stored, mut fixed_searchable) = (Vec::new(), Vec::new());
    // The same runs with encryption at rest (each record sealed, XChaCha20-Poly1305).
    let (mut sealed_stored, mut sealed_searchable) = (Vec::new(), Vec::new());
    let (mut sealed_fixed_stored, mut sealed_fixed_searchable) = (Vec::new(), Vec::new());
    for run in 0..a.runs {
        let dir = crate::scratch_dir(None)?;
        let state = dir.path().join("spoold");
        let d = Spoold::start_config(&bin, &state, "[spool]\nsync = \"fsync\"\n", false)?;
        let r = load(
            d.smtp,
            Load {
                rate: None,
                sessions: 50,
                messages: 20_000,
                size: 4096,
            },
        )?;
        drop(d);
        spool_rates.push(r.msgs_per_s);
        // The corpus mix and 4 KiB plain text, each in clear and sealed, in one run.
        let shape = |name: &str, sizes: Sizes, sealed: bool| {
            ingest(
                &dir.path().join(name),
                a.seed + run as u64,
                a.messages,
                sizes,
                a.threads,
                sealed,
            )
        };
        let (stored, searchable, raw, on_disk) = shape("archive", Sizes::Mix(4 << 20), false)?;
        let (f_stored, f_searchable, _, _) = shape("archive-4k", Sizes::Fixed(4096), false)?;
        let (s_stored, s_searchable, _, _) = shape("archive-sealed", Sizes::Mix(4 << 20), true)?;
        let (sf_stored, sf_searchable, _, _) =
            shape("archive-4k-sealed", Sizes::Fixed(4096), true)?;
        sealed_stored.push(s_stored);
        sealed_searchable.push(s_searchable);
        sealed_fixed_stored.push(sf_stored);
        sealed_fixed_searchable.push(sf_searchable);
        fixed_stored.push(f_stored);
        fixed_searchable.push(f_searchable);
        stored_rates.push(stored);
        searchable_rates.push(searchable);
        ratio.push(on_disk as f64 / raw as f64);
        eprintln!(
            "run {run}: spool {:.0} msgs/s; archive {stored:.0} msgs/s stored, {searchable:.0} searchable; {:.1} KiB raw/msg, stored {:.0} %",
            r.msgs_per_s,
            raw as f64 / a.messages as f64 / 1024.0,
            100.0 * on_disk as f64 / raw as f64
        );
        keep.push(dir);
    }
    let spool = crate::median(spool_rates);
    let stored = crate::median(stored_rates);
    let searchable = crate::median(searchable_rates);
    println!("\n| path | msgs/s | × spool ingest |\n|---|---|---|");
    println!("| spoold SMTP ingest, 4 KiB, fsync | {spool:.0} | 1.00 |");
    let (fs, fq) = (crate::median(fixed_stored), crate::median(fixed_searchable));
    println!(
        "| archive, 4 KiB plain text: stored durably ({} threads) | {fs:.0} | {:.2} |",
        a.threads,
        fs / spool
    );
    println!(
        "| archive, 4 KiB plain text: stored and searchable | {fq:.0} | {:.2} |",
        fq / spool
    );
    println!(
        "| archive, corpus mix: stored durably ({} threads) | {stored:.0} | {:.2} |",
        a.threads,
        stored / spool
    );
    println!(
        "| archive, corpus mix: stored and searchable | {searchable:.0} | {:.2} |",
        searchable / spool
    );
    let sealed = [
        (
            "4 KiB plain text: stored durably",
            fs,
            crate::median(sealed_fixed_stored),
        ),
        (
            "4 KiB plain text: stored and searchable",
            fq,
            crate::median(sealed_fixed_searchable),
        ),
        (
            "corpus mix: stored durably",
            stored,
            crate::median(sealed_stored),
        ),
        (
            "corpus mix: stored and searchable",
            searchable,
            crate::median(sealed_searchable),
        ),
    ];
    println!("\n| encryption at rest | clear msgs/s | sealed msgs/s | sealed × clear |\n|---|---|---|---|");
    for (what, clear, with) in sealed {
        println!("| {what} | {clear:.0} | {with:.0} | {:.2} |", with / clear);
    }
    println!(
        "\nbytes stored per byte of raw mail: {:.2} (median of {} runs; corpus of {} messages)",
        crate::median(ratio),
        a.runs,
        a.messages
    );

    Ok(())
}

/// Search latency per query kind on a large archive.
fn run_search(a: &Args, keep: &mut Vec<tempfile::TempDir>) -> Result<()> {
    let dir = crate::scratch_dir(None)?;
    let t = Instant::now();
    let (rate, _, raw, on_disk) = ingest(
        &dir.path().join("archive"),
        a.seed,
        a.search_items,
        Sizes::Mix(2048),
        a.threads,
        false,
    )?;
    println!(
        "\nsearch corpus (sizes capped at 2 KiB): {} items archived in {:.0} s ({rate:.0} msgs/s stored), {:.1} GiB raw, {:.1} GiB stored",
        a.search_items,
        t.elapsed().as_secs_f64(),
        raw as f64 / (1u64 << 30) as f64,
        on_disk as f64 / (1u64 << 30) as f64
    );
    let arch = open(&dir.path().join("archive"))?;
    let mut rng = StdRng::seed_from_u64(a.seed ^ 0x5eed);
    let mut corpus = Corpus::new(a.seed);
    let kinds: Vec<(&str, Box<QueryMaker>)> = vec![
        (
            "from:address",
            Box::new(|r, _| {
                let u = r.gen_range(0..2000);
                format!("from:user{u}@domain{}.example", u % 50)
            }),
        ),
        (
            "to:domain",
            Box::new(|r, _| format!("to:domain{}.example", r.gen_range(0..50))),
        ),
        (
            "subject:word",
            Box::new(|_, c| format!("subject:{}", c.word())),
        ),
        ("bare word", Box::new(|_, c| c.word().to_string())),
        (
            "\"two-word phrase\"",
            Box::new(|_, c| {
                let first = c.word().to_string();
                format!("\"{first} {}\"", c.word())
            }),
        ),
        (
            "msgid:",
            Box::new(|r, _| format!("msgid:<{}@bench.example>", r.gen_range(1..1000))),
        ),
        (
            "after: before: (a week)",
            Box::new(|r, _| {
                let d = r.gen_range(0..358);
                let day = |n: u64| {
                    chrono::DateTime::from_timestamp_millis((YEAR_START_MS + n * 86_400_000) as i64)
                        .unwrap()
                        .format("%Y-%m-%d")
                        .to_string()
                };
                format!("after:{} before:{}", day(d), day(d + 7))
            }),
        ),
        (
            "has:attachment size:>1500",
            Box::new(|_, _| "has:attachment size:>1500".to_string()),
        ),
        (
            "from: + word + after:",
            Box::new(|r, c| {
                format!(
                    "from:domain{}.example {} after:2026-06-01",
                    r.gen_range(0..50),
                    c.word()
                )
            }),
        ),
    ];
    // Background merges of the index just built compete for the CPU: let them finish, and
    // warm the page cache with a pass that is not counted.
    std::thread::sleep(Duration::from_secs(20));
    let mut kinds = kinds;
    for (_, make) in kinds.iter_mut() {
        for _ in 0..50 {
            arch.search(&make(&mut rng, &mut corpus), 50)?;
        }
    }
    println!("\n| query kind ({} items, newest 50 returned) | p50 ms | p99 ms | median hits |\n|---|---|---|---|", a.search_items);
    for (name, mut make) in kinds {
        let mut lat = Vec::new();
        let mut hits = Vec::new();
        for _ in 0..200 {
            let q = make(&mut rng, &mut corpus);
            let t = Instant::now();
            let r = arch.search(&q, 50)?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            hits.push(r.total as f64);
        }
        println!(
            "| {name} | {:.2} | {:.2} | {:.0} |",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            pct(&mut hits, 0.5)
        );
    }
    drop(arch);
    keep.push(dir);
    Ok(())
}

/// Copying a backlog to a mirror peer over the peer link on loopback.
fn run_mirror(a: &Args, keep: &mut Vec<tempfile::TempDir>) -> Result<()> {
    let (src, dst) = (crate::scratch_dir(None)?, crate::scratch_dir(None)?);
    let (rate_in, _, _, _) = ingest(
        src.path(),
        a.seed + 7,
        a.backlog,
        Sizes::Mix(4 << 20),
        a.threads,
        false,
    )?;
    let from = Arc::new(open(src.path())?);
    let to = Arc::new(open(dst.path())?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let secs = rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cfg = |node: &str| {
            peer::link::LinkConfig::self_signed(node, b"bench mirror secret 0123", 0).unwrap()
        };
        let received = Arc::new(archive::mirror::ReceiverStats::default());
        tokio::spawn(archive::mirror::receive(
            to.clone(),
            listener,
            cfg("dst"),
            received.clone(),
        ));
        let stats = Arc::new(archive::mirror::PeerStats::default());
        let t = Instant::now();
        tokio::spawn(archive::mirror::copy_to(
            from.clone(),
            addr,
            cfg("src"),
            stats.clone(),
            Arc::default(),
            Vec::new(),
        ));
        while received.stored.load(std::sync::atomic::Ordering::Relaxed) < a.backlog as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(t.elapsed().as_secs_f64())
    })?;
    println!(
        "\nmirror catch-up: {} items (filled at {rate_in:.0} msgs/s) copied in {secs:.1} s: {:.0} msgs/s over the peer link on loopback",
        a.backlog,
        a.backlog as f64 / secs
    );
    drop(rt);
    keep.push(src);
    keep.push(dst);
    Ok(())
}

/// Sealed segments uploaded to a local Garage cluster (three nodes, replication factor 3):
/// the corpus is archived locally (16 MiB segments), then the archive is reopened with the
/// object store and timed until every sealed segment is confirmed; then 500 random items are
/// read back from the local segments and again after the local cache is emptied (each read a
/// ranged GET, checked and decompressed).
fn run_object_store(a: &Args, keep: &mut Vec<tempfile::TempDir>) -> Result<()> {
    let garage = tests::garage::Garage::start(3);
    let (mut mbps, mut segps, mut local, mut remote) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut segments = 0;
    for run in 0..a.runs {
        let dir = crate::scratch_dir(None)?;
        let adir = dir.path().join("archive");
        let mut o = Options::new(adir.clone());
        o.free_bytes_min = 1 << 30;
        o.segment_bytes_max = 16 << 20;
        o.cache_bytes = u64::MAX;
        {
            std::fs::create_dir_all(&adir)?;
            let mut corpus = Corpus::new(a.seed + run as u64);
            let archive = Archive::open(&o)?;
            for i in 0..a.messages {
                let (raw, from, to) = corpus.next();
                archive.archive(incoming(i, a.messages, &raw, from, to), &raw)?;
            }
        }
        o.object_store = Some(archive::ObjectStoreConfig {
            endpoints: vec![garage.endpoint(0)],
            bucket: garage.bucket.clone(),
            region: "garage".into(),
            prefix: format!("bench/run{run}"),
            access_key_id: garage.key_id.clone(),
            secret_access_key: garage.secret.clone(),
        });
        let t = Instant::now();
        let archive = Archive::open(&o)?;
        let waiting = archive.status()?.totals;
        while archive.status()?.totals.pending_segments > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = t.elapsed().as_secs_f64();
        segments = waiting.pending_segments;
        mbps.push(waiting.pending_bytes as f64 / 1e6 / took);
        segps.push(waiting.pending_segments as f64 / took);
        let mut rng = StdRng::seed_from_u64(a.seed);
        let picks: Vec<u64> = (0..500)
            .map(|_| rng.gen_range(1..=a.messages as u64))
            .collect();
        let time_reads = || -> Result<Vec<f64>> {
            picks
                .iter()
                .map(|&seq| {
                    let t = Instant::now();
                    archive.raw(seq)?;
                    Ok(t.elapsed().as_secs_f64() * 1000.0)
                })
                .collect()
        };
        local.push(time_reads()?);
        archive.drop_cache()?;
        remote.push(time_reads()?);
        let fetched = archive.status()?.remote.map(|r| r.fetches).unwrap_or(0);
        eprintln!(
            "run {run}: {} segments, {:.1} MB uploaded in {took:.2} s; {fetched} records fetched",
            waiting.pending_segments,
            waiting.pending_bytes as f64 / 1e6
        );
        keep.push(dir);
    }
    let p = |runs: &mut Vec<Vec<f64>>, q: f64| {
        crate::median(runs.iter_mut().map(|v| pct(v, q)).collect())
    };
    println!(
        "\nobject store: a three-node Garage cluster on loopback (replication factor 3), {segments} sealed segments of 16 MiB per run"
    );
    println!("\n| path | figure |\n|---|---|");
    println!(
        "| upload of sealed segments, confirmed (size and MD5 ETag) | {:.1} MB/s, {:.2} segments/s |",
        crate::median(mbps),
        crate::median(segps)
    );
    println!(
        "| read an item, segment on local disk: p50 / p99 | {:.2} / {:.2} ms |",
        p(&mut local, 0.5),
        p(&mut local, 0.99)
    );
    println!(
        "| read an item, cold cache (ranged GET from the store): p50 / p99 | {:.2} / {:.2} ms |",
        p(&mut remote, 0.5),
        p(&mut remote, 0.99)
    );
    Ok(())
}

/// Waits for the rebuild an archive started at open (a lost catalog) to end.
fn wait_rebuilt(archive: &Archive) {
    use std::sync::atomic::Ordering::SeqCst;
    let p = &archive.store().rebuild_progress;
    while p.pending.load(SeqCst) || p.running.load(SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The settings of a prefix of the benchmark's Garage bucket.
fn garage_store(garage: &tests::garage::Garage, prefix: String) -> archive::ObjectStoreConfig {
    archive::ObjectStoreConfig {
        endpoints: vec![garage.endpoint(0)],
        bucket: garage.bucket.clone(),
        region: "garage".into(),
        prefix,
        access_key_id: garage.key_id.clone(),
        secret_access_key: garage.secret.clone(),
    }
}

/// The proof of an archive of `--rebuild-items` (corpus mix cut at 16 KiB): on the unit
/// (`Archive::prove`: every segment, chain, checkpoints, every body decompressed and hashed),
/// offline over its files (`prove_dir`, what an auditor runs), incremental from a checkpoint
/// after 1 % more items, and with every segment read back from a three-node Garage; the
/// reference is reading every item's body back through the catalog (`Archive::verify`) in the
/// same run. Then the chain's own CPU per item (framing an item's entry and hashing it, what
/// the writer adds per item) against the ingest's wall time per item.
fn run_prove(a: &Args, keep: &mut Vec<tempfile::TempDir>) -> Result<()> {
    let garage = tests::garage::Garage::start(3);
    let n = a.rebuild_items;
    let mut rates: [Vec<f64>; 5] = Default::default();
    let mut per_item_us = Vec::new();
    for run in 0..a.runs {
        let dir = crate::scratch_dir(None)?;
        let adir = dir.path().join("archive");
        std::fs::create_dir_all(&adir)?;
        let (stored, _, _, _) = ingest(
            &adir,
            a.seed + run as u64,
            n,
            Sizes::Mix(16 << 10),
            a.threads,
            true,
        )?;
        per_item_us.push(1e6 / stored);
        let store_config = garage_store(&garage, format!("bench/prove{run}"));
        let mut o = Options::new(adir.clone());
        o.free_bytes_min = 1 << 30;
        o.cache_bytes = u64::MAX;
        o.object_store = Some(store_config);
        o.encryption = Some(encryption());
        let archive = Archive::open(&o)?;
        // The sealed segments uploaded first: the upload thread's reads and MD5s must not share
        // the two cores with what is measured.
        archive.sync_remote()?;
        let t = Instant::now();
        let v = archive.verify(|_, _| {})?;
        anyhow::ensure!(v.ok == n as u64, "verify: {} of {n}", v.ok);
        rates[0].push(n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let p = archive.prove(vec![], archive::proof::Start::Genesis, &[], |_, _| {})?;
        anyhow::ensure!(p.holds() && p.bodies == n as u64, "prove: {p:?}");
        rates[1].push(n as f64 / t.elapsed().as_secs_f64());
        archive.checkpoint_now()?;
        let t = Instant::now();
        let p = archive::proof::prove_dir(
            &adir,
            vec![],
            archive::proof::Start::Genesis,
            &[],
            Some(Arc::new(bench_keyring().clone())),
        )?;
        anyhow::ensure!(p.holds(), "prove_dir: {:?}", p.breaks.first());
        rates[2].push(n as f64 / t.elapsed().as_secs_f64());
        let more = n / 100;
        let mut corpus = Corpus::new(a.seed + 1000 + run as u64);
        corpus.size_max = 16 << 10;
        for i in 0..more {
            let (raw, from, to) = corpus.next();
            archive.archive(incoming(n + i, n + more, &raw, from, to), &raw)?;
        }
        let t = Instant::now();
        let p = archive.prove(
            vec![],
            archive::proof::Start::NewestCheckpoint,
            &[],
            |_, _| {},
        )?;
        // Checkpoints come every 1,000 entries: the newest covers all but the last few items.
        anyhow::ensure!(
            p.holds() && p.bodies <= more as u64 && p.from > n as u64,
            "incremental: {p:?}"
        );
        // Per item of the archive, as the full runs: what a nightly check costs.
        rates[3].push((n + more) as f64 / t.elapsed().as_secs_f64());
        archive.seal()?;
        archive.sync_remote()?;
        archive.drop_cache()?;
        let t = Instant::now();
        let p = archive.prove(vec![], archive::proof::Start::Genesis, &[], |_, _| {})?;
        anyhow::ensure!(p.holds(), "from the store: {:?}", p.breaks.first());
        rates[4].push((n + more) as f64 / t.elapsed().as_secs_f64());
        eprintln!(
            "run {run}: {n} items, {} entries, {} segments: verify {:.0}/s, prove {:.0}/s, offline {:.0}/s, incremental {:.0}/s, from the store {:.0}/s",
            p.entries,
            p.segments,
            rates[0][run],
            rates[1][run],
            rates[2][run],
            rates[3][run],
            rates[4][run]
        );
        drop(archive);
        keep.push(dir);
    }
    let [verify, prove, offline, incremental, store] = rates.map(crate::median);
    // The chain's own work per item: an item's entry encoded, framed and linked.
    let item = archive::Item {
        id: "1733490000000.0000000001.a".into(),
        origin: "a".into(),
        client: "192.0.2.1".into(),
        sender: "someone@example.com".into(),
        recipients: vec!["one@example.net".into(), "two@example.net".into()],
        verdict: "clean".into(),
        ..archive::Item::default()
    };
    let mut head = archive::chain::Head::default();
    let mut frames = Vec::with_capacity(1 << 20);
    let t = Instant::now();
    let reps = 200_000;
    for rev in 0..reps {
        frames.clear();
        let event = archive::chain::item_event(archive::chain::Why::Stored, rev, &item);
        archive::record::frame_entry(&head.append_encoded(&event), &mut frames);
    }
    let chain_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    // Encryption's own work per item: its entry and a 4 KiB body frame sealed (a random
    // nonce, XChaCha20-Poly1305).
    let body: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut entry = Vec::new();
    archive::record::frame_entry(
        &head.append_encoded(&archive::chain::item_event(
            archive::chain::Why::Stored,
            0,
            &item,
        )),
        &mut entry,
    );
    let t = Instant::now();
    let reps = 100_000;
    for _ in 0..reps {
        frames.clear();
        archive::record::frame_sealed(bench_keyring(), &body, &mut frames);
        archive::record::frame_sealed(bench_keyring(), &entry, &mut frames);
    }
    let seal_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let ingest_us = crate::median(per_item_us);
    println!(
        "
proof of an archive: {n} items (corpus mix, sizes cut at 16 KiB), default segments, checkpoints every 1,000 entries"
    );
    println!(
        "
| check | items/s | against reading every body back |
|---|---|---|"
    );
    println!("| every item's body read back through the catalog (`verify` before the chain; the reference) | {verify:.0} | 1.00 |");
    println!(
        "| the proof on the unit: chain, checkpoints, every body hashed | {prove:.0} | {:.2} |",
        prove / verify
    );
    println!(
        "| the proof offline over the archive's files (`verify --dir`) | {offline:.0} | {:.2} |",
        offline / verify
    );
    println!(
        "| the proof from the newest checkpoint after 1 % more items (`--from-checkpoint`) | {incremental:.0} | {:.2} |",
        incremental / verify
    );
    println!(
        "| the proof with every segment read from the store (three-node Garage, loopback) | {store:.0} | {:.2} |",
        store / verify
    );
    println!(
        "
the chain's CPU per item (entry encoded, framed, linked: one SHA-256 of the event, one of the link): {chain_us:.2} µs, against {ingest_us:.1} µs of archive ingest wall time per item ({:.1} %)",
        100.0 * chain_us / ingest_us
    );
    println!(
        "encryption's CPU per item (its entry and a 4 KiB body sealed): {seal_us:.2} µs, {:.1} % of the same wall time per item (the archive's ingest and proofs above are of sealed archives, the default)",
        100.0 * seal_us / ingest_us
    );
    Ok(())
}

/// A lost unit rebuilt: `--rebuild-items` of the corpus mix (sizes cut at 16 KiB) archived with
/// the default 256 MiB segments and uploaded to a three-node Garage; then (the reference) the
/// catalog and index deleted and rebuilt from the local segments, and a new, empty unit that
/// adopts the archive rebuilding its catalog from the store alone. Per run; medians.
/// Import and bulk export: `--messages` of the corpus mix written as an mboxrd file, imported
/// into a sealed archive (`archive::importer`, what `spoolctl archive import` runs), then all
/// of it exported as an mbox (`archive::exporter`); against archiving the same corpus from
/// `--threads` threads in the same run.
fn run_import(a: &Args, keep: &mut Vec<tempfile::TempDir>) -> Result<()> {
    let mut rates: [Vec<f64>; 7] = Default::default();
    let mut mib = 0.0;
    for run in 0..a.runs {
        let dir = crate::scratch_dir(None)?;
        let mut corpus = Corpus::new(a.seed + run as u64);
        corpus.size_max = 4 << 20;
        let file = dir.path().join("source.mbox");
        let mut bytes = Vec::new();
        for _ in 0..a.messages {
            let (raw, from, _) = corpus.next();
            bytes.extend_from_slice(archive::import::separator(&from, 0).as_bytes());
            archive::import::quote(&raw, &mut bytes);
            bytes.push(b'\n');
        }
        std::fs::write(&file, &bytes)?;
        mib = bytes.len() as f64 / (1 << 20) as f64;
        let (stored, _, _, _) = ingest(
            &dir.path().join("reference"),
            a.seed + run as u64,
            a.messages,
            Sizes::Mix(4 << 20),
            a.threads,
            true,
        )?;
        rates[0].push(stored);
        let archive = open_as(&dir.path().join("imported"), true)?;
        let opts = archive::importer::ImportOptions {
            quoting: archive::import::Quoting::Rd,
            size_max: 64 << 20,
            origin: "bench".into(),
            report: Some(dir.path().join("report.tsv")),
        };
        let t = Instant::now();
        let done =
            archive::importer::import(&archive, std::slice::from_ref(&file), &opts, |_, _| {})?;
        let took = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            done.totals().0 == a.messages as u64,
            "import: {:?}",
            done.totals()
        );
        rates[1].push(a.messages as f64 / took);
        rates[2].push(mib / took);
        // The same messages from a Dovecot on loopback (IMAPS), into another fresh archive.
        let dovecot = tests::dovecot::Dovecot::start();
        let mut corpus = Corpus::new(a.seed + run as u64);
        corpus.size_max = 4 << 20;
        let mails: Vec<Vec<u8>> = (0..a.messages).map(|_| corpus.next().0).collect();
        dovecot.deliver_all(0, &mails);
        drop(mails);
        let from_imap = open_as(&dir.path().join("from-imap"), true)?;
        let source = archive::importer::ImapImport {
            url: format!("imaps://arch@localhost:{}/INBOX", dovecot.imaps),
            password: std::fs::read_to_string(&dovecot.password_file)?
                .trim()
                .to_string(),
            ca_file: Some(dovecot.cert.clone()),
            since: None,
            state_dir: dir.path().join("imap-state"),
        };
        let t = Instant::now();
        let done = archive::importer::import_imap(&from_imap, &source, &opts, |_, _| {})?;
        let took = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            done.totals().0 == a.messages as u64,
            "imap: {:?}",
            done.totals()
        );
        rates[5].push(a.messages as f64 / took);
        rates[6].push(done.sources[0].bytes as f64 / (1 << 20) as f64 / took);
        drop((from_imap, dovecot));
        let seqs: Vec<u64> = (1..=a.messages as u64).collect();
        let t = Instant::now();
        archive::exporter::export(
            &archive,
            &seqs,
            "bench",
            archive::exporter::Format::Mbox,
            &dir.path().join("export.mbox"),
            |_, _| {},
        )?;
        let took = t.elapsed().as_secs_f64();
        rates[3].push(a.messages as f64 / took);
        rates[4].push(mib / took);
        eprintln!(
            "run {run}: archive {:.0} msgs/s; import {:.0} msgs/s ({:.1} MiB/s); from IMAP {:.0} msgs/s ({:.1} MiB/s); export {:.0} msgs/s ({:.1} MiB/s)",
            rates[0][run], rates[1][run], rates[2][run], rates[5][run], rates[6][run], rates[3][run], rates[4][run]
        );
        drop(archive);
        keep.push(dir);
    }
    let [reference, import_rate, import_mib, export_rate, export_mib, imap_rate, imap_mib] =
        rates.map(crate::median);
    println!(
        "\nimport and export: {} messages of the corpus mix ({mib:.0} MiB of mbox), sealed archive",
        a.messages
    );
    println!(
        "\n| path | msgs/s | MiB/s | × archiving from {} threads |\n|---|---|---|---|",
        a.threads
    );
    println!(
        "| archiving the corpus ({} threads; the reference) | {reference:.0} | | 1.00 |",
        a.threads
    );
    println!(
        "| `archive import` of an mboxrd file | {import_rate:.0} | {import_mib:.1} | {:.2} |",
        import_rate / reference
    );
    println!(
        "| `archive import --imap` from Dovecot on loopback (IMAPS, 32 messages a UID FETCH) | {imap_rate:.0} | {imap_mib:.1} | {:.2} |",
        imap_rate / reference
    );
    println!(
        "| `archive export --format mbox` of every item | {export_rate:.0} | {export_mib:.1} | {:.2} |",
        export_rate / reference
    );
    Ok(())
}

fn run_rebuild(a: &Args, keep: &mut Vec<tempfile::TempDir>) -> Result<()> {
    let garage = tests::garage::Garage::start(3);
    let n = a.rebuild_items;
    let (mut local, mut remote, mut searchable) = (Vec::new(), Vec::new(), Vec::new());
    let mut segments = 0;
    for run in 0..a.runs {
        let dir = crate::scratch_dir(None)?;
        let adir = dir.path().join("archive");
        std::fs::create_dir_all(&adir)?;
        ingest(
            &adir,
            a.seed + run as u64,
            n,
            Sizes::Mix(16 << 10),
            a.threads,
            false,
        )?;
        let store_config = garage_store(&garage, format!("bench/rebuild{run}"));
        let mut o = Options::new(adir.clone());
        o.free_bytes_min = 1 << 30;
        o.cache_bytes = u64::MAX;
        o.object_store = Some(store_config.clone());
        let id = {
            let archive = Archive::open(&o)?;
            archive.seal()?;
            while archive.status()?.totals.pending_segments > 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
            segments = archive.status()?.totals.remote_segments;
            archive
                .store()
                .archive_id()?
                .ok_or_else(|| anyhow::anyhow!("no archive id after the upload"))?
        };

        // The reference: the same segments, on local disk.
        std::fs::remove_dir_all(adir.join("catalog"))?;
        std::fs::remove_dir_all(adir.join("index"))?;
        let mut lo = Options::new(adir.clone());
        lo.free_bytes_min = 1 << 30;
        let t = Instant::now();
        let rebuilt = Archive::open(&lo)?;
        wait_rebuilt(&rebuilt);
        let took = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            rebuilt.status()?.totals.items == n as u64,
            "local rebuild lost items"
        );
        local.push(n as f64 / took);
        drop(rebuilt);

        // A new unit with nothing on disk adopts the archive and rebuilds it from the store.
        let fresh = crate::scratch_dir(None)?;
        let mut ro = Options::new(fresh.path().join("archive"));
        ro.free_bytes_min = 1 << 30;
        ro.object_store = Some(store_config);
        ro.adopt = Some(id);
        let t = Instant::now();
        let adopted = Archive::open(&ro)?;
        adopted.store().claim()?;
        let report = adopted.rebuild(|_| {})?;
        let took_remote = t.elapsed().as_secs_f64();
        anyhow::ensure!(report.items == n as u64, "store rebuild: {report:?}");
        remote.push(n as f64 / took_remote);
        adopted.flush_index()?;
        searchable.push(n as f64 / t.elapsed().as_secs_f64());
        eprintln!(
            "run {run}: {n} items in {segments} segments: rebuilt from local segments in {took:.2} s, from the store in {took_remote:.2} s ({} segments fetched)",
            report.from_store
        );
        drop(adopted);
        keep.push(dir);
        keep.push(fresh);
    }
    let (local, remote, searchable) = (
        crate::median(local),
        crate::median(remote),
        crate::median(searchable),
    );
    println!(
        "\nrebuild of a lost unit's catalog: {n} items (corpus mix, sizes cut at 16 KiB), {segments} segments of up to 256 MiB, a three-node Garage on loopback"
    );
    println!("\n| rebuild from | items/s | against local |\n|---|---|---|");
    println!("| local segments (a lost catalog; the reference) | {local:.0} | 1.00 |");
    println!(
        "| the object store alone (a new unit adopting the archive) | {remote:.0} | {:.2} |",
        remote / local
    );
    println!(
        "| the object store alone, until all is searchable (the index caught up) | {searchable:.0} | {:.2} |",
        searchable / local
    );
    Ok(())
}
