//! The milter chain around one message, before the `250`: each milter the configuration
//! lists (in its order, for the clients it applies to) is told the connection, HELO, sender
//! and recipients when DATA begins, is streamed the headers and body while the message is
//! spooled, and at the end gives its changes and verdict. [`settle`] and [`combine`] are the
//! pure decisions (table-tested): what one milter's end means, with its `default_action` when
//! it is down, late or broken, and what the chain's ends mean together.
//!
//! Not here: the packets ([`crate::milter`]), the socket ([`crate::milter_conn`]), applying the
//! outcome to the spool (the daemon), metrics (the caller turns [`Report`]s into them).

use crate::endpoint::Endpoint;
use crate::headers::{Edit, Field, HeaderReader};
use crate::milter::{step, Command, Reply, BODY_CHUNK_MAX};
use crate::milter_conn::{Conn, MilterError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the chain does when a milter gives no verdict (down, late, broken).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// `451 4.7.1`: the client tries again later (the safe default).
    Tempfail,
    /// Go on without this milter (fail-open), counted.
    Accept,
    /// `550 5.7.1`.
    Reject,
}

/// Which clients' mail a milter sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clients {
    /// Everyone's.
    All,
    /// Trusted networks' only (signing outgoing mail).
    Trusted,
    /// Everyone else's (scoring incoming mail).
    Untrusted,
}

impl Clients {
    /// Whether a client that is (or is not) trusted is included.
    pub fn includes(self, trusted: bool) -> bool {
        match self {
            Clients::All => true,
            Clients::Trusted => trusted,
            Clients::Untrusted => !trusted,
        }
    }
}

/// One `[[filter.milter]]` entry.
#[derive(Clone, Debug)]
pub struct MilterSpec {
    /// Its name in logs, metrics and tracking.
    pub name: String,
    /// Its socket.
    pub address: Endpoint,
    /// Connecting and negotiating.
    pub connect_timeout: Duration,
    /// Each reply before the end of the message.
    pub command_timeout: Duration,
    /// The reply to the end of the message (a scorer's work).
    pub end_timeout: Duration,
    /// When it gives no verdict.
    pub on_failure: OnFailure,
    /// Whose mail it sees.
    pub clients: Clients,
}

/// What milters are told about the message.
#[derive(Clone, Debug)]
pub struct Context<'a> {
    /// The queue id (macro `i`).
    pub queue_id: &'a str,
    /// Our host name (macro `j`).
    pub hostname: &'a str,
    /// The client.
    pub client: SocketAddr,
    /// Its HELO name.
    pub helo: &'a str,
    /// Whether it is in the trusted networks.
    pub trusted: bool,
    /// The envelope sender (empty for `<>`).
    pub sender: &'a str,
    /// The accepted recipients.
    pub recipients: &'a [String],
}

/// The chain's decision for the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Spool it (with the milters' changes).
    Accept,
    /// A `5xx` reply: code and text.
    Reject(u16, String),
    /// A `4xx` reply: code and text.
    Tempfail(u16, String),
    /// Answer `250` and drop it.
    Discard,
    /// Spool it into `quarantine/`, for this reason.
    Quarantine(String),
}

/// What one milter did with the message, for metrics, the log and tracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Accepted (or continued to the end).
    Accept,
    /// Rejected.
    Reject,
    /// Failed temporarily.
    Tempfail,
    /// Discarded.
    Discard,
    /// Quarantined.
    Quarantine,
    /// Gave no verdict; its `default_action` applied.
    Failed,
    /// Not asked for a verdict: an earlier milter decided.
    NotAsked,
}

impl Action {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Reject => "reject",
            Action::Tempfail => "tempfail",
            Action::Discard => "discard",
            Action::Quarantine => "quarantine",
            Action::Failed => "failed",
            Action::NotAsked => "not-asked",
        }
    }
}

/// One milter's part in the message.
#[derive(Clone, Debug)]
pub struct Report {
    /// Its name.
    pub milter: String,
    /// What it did.
    pub action: Action,
    /// Its reply text, reason, failure or changes, for the log and tracking.
    pub detail: String,
    /// Seconds from the first command to its verdict.
    pub seconds: f64,
}

/// The chain's end: the verdict, and (for an accepted or quarantined message) the changes.
#[derive(Debug)]
pub struct Outcome {
    /// The decision.
    pub verdict: Verdict,
    /// Header changes, in the order to apply them.
    pub edits: Vec<Edit>,
    /// A new envelope sender.
    pub sender: Option<String>,
    /// Recipients added.
    pub add_recipients: Vec<String>,
    /// Recipients removed.
    pub remove_recipients: Vec<String>,
    /// Per milter.
    pub reports: Vec<Report>,
}

/// How one milter's conversation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// It went on to the end (continue or accept), quarantining if it said so.
    Passed { quarantine: Option<String> },
    /// It decided: reject, tempfail or discard (as a verdict).
    Decided(Verdict),
    /// It gave no verdict: why.
    Failed(String),
}

const REJECT_DEFAULT: &str = "5.7.1 Command rejected";
const TEMPFAIL_DEFAULT: &str = "4.7.1 Service unavailable - try again later";

/// A milter's own reply text (`y`): `4xx`/`5xx`, an enhanced code added when it has none,
/// one line, bounded.
fn custom_reply(text: &str) -> Verdict {
    let code: u16 = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(451);
    let rest: String = text
        .get(3..)
        .unwrap_or("")
        .trim_start_matches(['-', ' '])
        .split(['\r', '\n'])
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(400)
        .collect();
    let enhanced = rest.split(' ').next().is_some_and(|w| {
        w.split('.').count() == 3 && w.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    });
    let class = if code >= 500 { "5.7.1" } else { "4.7.1" };
    let text = match (enhanced, rest.is_empty()) {
        (true, _) => rest,
        (false, true) => format!("{class} Command rejected"),
        (false, false) => format!("{class} {rest}"),
    };
    if code >= 500 {
        Verdict::Reject(code, text)
    } else {
        Verdict::Tempfail(code, text)
    }
}

/// What a decisive reply before or at the end of the message means; `None`: not decisive.
fn decisive(reply: &Reply) -> Option<Verdict> {
    match reply {
        Reply::Reject => Some(Verdict::Reject(550, REJECT_DEFAULT.into())),
        Reply::Tempfail => Some(Verdict::Tempfail(451, TEMPFAIL_DEFAULT.into())),
        Reply::ReplyCode(text) => Some(custom_reply(text)),
        Reply::Discard => Some(Verdict::Discard),
        _ => None,
    }
}

/// What one milter's end means for the message: `None` lets the chain go on (`quarantine`
/// aside, which [`combine`] keeps).
pub fn settle(end: &End, on_failure: OnFailure) -> Option<Verdict> {
    match (end, on_failure) {
        (End::Passed { quarantine: None }, _) => None,
        (
            End::Passed {
                quarantine: Some(r),
            },
            _,
        ) => Some(Verdict::Quarantine(r.clone())),
        (End::Decided(v), _) => Some(v.clone()),
        (End::Failed(_), OnFailure::Accept) => None,
        (End::Failed(_), OnFailure::Tempfail) => {
            Some(Verdict::Tempfail(451, TEMPFAIL_DEFAULT.into()))
        }
        (End::Failed(_), OnFailure::Reject) => Some(Verdict::Reject(550, REJECT_DEFAULT.into())),
    }
}

/// Whether a verdict ends the chain (no later milter is asked).
pub fn ends_chain(v: &Verdict) -> bool {
    matches!(
        v,
        Verdict::Reject(..) | Verdict::Tempfail(..) | Verdict::Discard
    )
}

/// The chain's verdict from its milters' settled ends, in order: the first reject, tempfail or
/// discard wins; else the first quarantine; else accept.
pub fn combine(settled: &[Option<Verdict>]) -> Verdict {
    if let Some(v) = settled.iter().flatten().find(|v| ends_chain(v)) {
        return v.clone();
    }
    settled
        .iter()
        .flatten()
        .find(|v| matches!(v, Verdict::Quarantine(_)))
        .cloned()
        .unwrap_or(Verdict::Accept)
}

enum State {
    /// Talking.
    Open(Box<Conn>),
    /// Done with this message: accepted early, decided, or failed.
    Closed,
}

struct Slot {
    spec: Arc<MilterSpec>,
    state: State,
    end: Option<End>,
    started: Instant,
    skip_body: bool,
    edits: Vec<Edit>,
    sender: Option<String>,
    add_recipients: Vec<String>,
    remove_recipients: Vec<String>,
    quarantine: Option<String>,
    refused_body: bool,
}

impl Slot {
    fn fail(&mut self, e: MilterError) {
        tracing::warn!(milter = %self.spec.name, "milter failed: {e}");
        self.state = State::Closed;
        self.end = Some(End::Failed(e.to_string()));
    }

    fn conn(&mut self) -> Option<&mut Conn> {
        match &mut self.state {
            State::Open(c) => Some(c),
            State::Closed => None,
        }
    }

    /// Sends `cmd` (after `macros`) unless the milter asked to leave it out (`no`), and
    /// reads its reply unless it asked not to be answered... (`nr`).
    async fn ask(&mut self, macros: Option<Command>, cmd: &Command, no: u32, nr: u32) {
        let timeout = self.spec.command_timeout;
        let Some(conn) = self.conn() else { return };
        if no != 0 && conn.wants(no) {
            return;
        }
        let stage = stage_name(cmd);
        let sent = async {
            if let Some(m) = &macros {
                conn.queue(m).await?;
            }
            conn.queue(cmd).await?;
            if nr != 0 && conn.wants(nr) {
                return Ok(None);
            }
            conn.reply(stage, timeout).await.map(Some)
        }
        .await;
        match sent {
            Err(e) => self.fail(e),
            Ok(None) | Ok(Some(Reply::Continue)) => {}
            Ok(Some(Reply::Skip)) => self.skip_body = true,
            Ok(Some(Reply::Accept)) => {
                self.close_quietly().await;
                self.end = Some(End::Passed { quarantine: None });
            }
            Ok(Some(r)) => match decisive(&r) {
                Some(v) => {
                    self.close_quietly().await;
                    self.end = Some(End::Decided(v));
                }
                None => self.fail(MilterError::Negotiation(format!(
                    "{r:?} is no answer to {stage}"
                ))),
            },
        }
    }

    async fn close_quietly(&mut self) {
        if let State::Open(mut c) = std::mem::replace(&mut self.state, State::Closed) {
            let _ = c.send(&Command::Quit).await;
        }
    }

    /// The end of the message: its changes, then its verdict.
    async fn end_of_message(&mut self, queue_id: &str) {
        let timeout = self.spec.end_timeout;
        let leading_space = self
            .conn()
            .is_some_and(|c| c.wants(step::HEADER_LEADING_SPACE));
        let Some(conn) = self.conn() else { return };
        let result = async {
            conn.queue(&macros(b'E', &[("i", queue_id)])).await?;
            conn.queue(&Command::EndOfMessage).await?;
            let mut changes = Vec::new();
            loop {
                let r = conn.reply("end of message", timeout).await?;
                match r {
                    Reply::Continue | Reply::Accept => return Ok((changes, None)),
                    other => match decisive(&other) {
                        Some(v) => return Ok((changes, Some(v))),
                        None => changes.push(other),
                    },
                }
            }
        }
        .await;
        match result {
            Err(e) => self.fail(e),
            Ok((changes, verdict)) => {
                for c in changes {
                    self.change(c, leading_space);
                }
                self.close_quietly().await;
                // The reason names the milter: a release from the console teaches it.
                let name = &self.spec.name;
                self.end = Some(match verdict {
                    Some(v) => End::Decided(v),
                    None => End::Passed {
                        quarantine: self.quarantine.as_ref().map(|r| format!("{name}: {r}")),
                    },
                });
            }
        }
    }

    /// One modification at the end of the message, kept for the outcome.
    fn change(&mut self, reply: Reply, leading_space: bool) {
        // A value as the header block will hold it after the colon.
        let value = |v: String| {
            if leading_space || v.is_empty() {
                v
            } else {
                format!(" {v}")
            }
        };
        match reply {
            Reply::AddHeader { name, value: v } => self.edits.push(Edit::Add {
                name,
                value: value(v),
            }),
            Reply::InsertHeader {
                index,
                name,
                value: v,
            } => self.edits.push(Edit::Insert {
                index,
                name,
                value: value(v),
            }),
            Reply::ChangeHeader {
                index,
                name,
                value: v,
            } => self.edits.push(Edit::Change {
                index,
                name,
                value: value(v),
            }),
            Reply::ChangeFrom { sender, .. } => self.sender = Some(unbracket(&sender)),
            Reply::AddRcpt { rcpt, .. } => self.add_recipients.push(unbracket(&rcpt)),
            Reply::DeleteRcpt(rcpt) => self.remove_recipients.push(unbracket(&rcpt)),
            Reply::Quarantine(reason) => self.quarantine = Some(reason),
            Reply::ReplaceBody(_) => {
                if !std::mem::replace(&mut self.refused_body, true) {
                    tracing::warn!(
                        milter = %self.spec.name,
                        "the milter replaced the body: not supported, the body is kept as received"
                    );
                }
            }
            other => {
                tracing::warn!(milter = %self.spec.name, "ignored reply at the end of the message: {other:?}")
            }
        }
    }
}

fn unbracket(a: &str) -> String {
    a.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

fn stage_name(cmd: &Command) -> &'static str {
    match cmd {
        Command::Connect { .. } => "connect",
        Command::Helo(_) => "helo",
        Command::Mail(_) => "mail",
        Command::Rcpt(_) => "rcpt",
        Command::Data => "data",
        Command::Header { .. } => "header",
        Command::EndOfHeaders => "end of headers",
        Command::Body(_) => "body",
        _ => "command",
    }
}

fn macros(stage: u8, pairs: &[(&str, &str)]) -> Command {
    Command::Macros {
        stage,
        pairs: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The chain's conversation about one message.
pub struct Screening {
    slots: Vec<Slot>,
    reader: HeaderReader,
    eoh_sent: bool,
    queue_id: String,
}

impl Screening {
    /// Opens the milters that apply to this client and tells them the message's envelope.
    /// [`Screening::refusal`] then says whether one refused it already.
    pub async fn begin(specs: &[Arc<MilterSpec>], ctx: &Context<'_>) -> Screening {
        let mut slots = Vec::new();
        for spec in specs.iter().filter(|s| s.clients.includes(ctx.trusted)) {
            let started = Instant::now();
            let opened = Conn::open(&spec.address, spec.connect_timeout, spec.command_timeout);
            let (state, end) = match opened.await {
                Ok(c) => (State::Open(Box::new(c)), None),
                Err(e) => {
                    tracing::warn!(milter = %spec.name, "milter unavailable: {e}");
                    (State::Closed, Some(End::Failed(e.to_string())))
                }
            };
            slots.push(Slot {
                spec: spec.clone(),
                state,
                end,
                started,
                skip_body: false,
                edits: Vec::new(),
                sender: None,
                add_recipients: Vec::new(),
                remove_recipients: Vec::new(),
                quarantine: None,
                refused_body: false,
            });
        }
        let ip = ctx.client.ip().to_string();
        let port = ctx.client.port().to_string();
        let underscore = format!("unknown [{ip}]");
        let sender = format!("<{}>", ctx.sender);
        for slot in &mut slots {
            slot.ask(
                Some(macros(
                    b'C',
                    &[
                        ("j", ctx.hostname),
                        ("{daemon_name}", "spoold"),
                        ("{client_addr}", &ip),
                        ("{client_port}", &port),
                        ("{client_name}", "unknown"),
                        ("{client_ptr}", "unknown"),
                        ("_", &underscore),
                    ],
                )),
                &Command::Connect {
                    hostname: "unknown".into(),
                    addr: Some(ctx.client),
                },
                step::NO_CONNECT,
                step::NR_CONNECT,
            )
            .await;
            slot.ask(
                None,
                &Command::Helo(ctx.helo.to_string()),
                step::NO_HELO,
                step::NR_HELO,
            )
            .await;
            slot.ask(
                Some(macros(
                    b'M',
                    &[("i", ctx.queue_id), ("{mail_addr}", ctx.sender)],
                )),
                &Command::Mail(vec![sender.clone()]),
                step::NO_MAIL,
                step::NR_MAIL,
            )
            .await;
            for r in ctx.recipients {
                slot.ask(
                    Some(macros(b'R', &[("{rcpt_addr}", r)])),
                    &Command::Rcpt(vec![format!("<{r}>")]),
                    step::NO_RCPT,
                    step::NR_RCPT,
                )
                .await;
            }
            slot.ask(
                Some(macros(b'T', &[("i", ctx.queue_id)])),
                &Command::Data,
                step::NO_DATA,
                step::NR_DATA,
            )
            .await;
        }
        Screening {
            slots,
            reader: HeaderReader::new(true),
            eoh_sent: false,
            queue_id: ctx.queue_id.to_string(),
        }
    }

    /// A reject or tempfail before the body (a milter's, or a failed milter's default),
    /// to answer the DATA command with.
    pub fn refusal(&self) -> Option<Verdict> {
        let settled: Vec<_> = self
            .slots
            .iter()
            .filter_map(|s| s.end.as_ref().map(|e| settle(e, s.spec.on_failure)))
            .collect();
        settled
            .into_iter()
            .flatten()
            .find(|v| matches!(v, Verdict::Reject(..) | Verdict::Tempfail(..)))
    }

    /// The header block's length in the message as spooled (its `Received:` included), once
    /// the blank line came; `None`: the message is all header.
    pub fn header_len(&self) -> Option<u64> {
        self.reader.header_len()
    }

    /// Whether any milter still listens.
    fn listening(&self) -> bool {
        self.slots.iter().any(|s| matches!(s.state, State::Open(_)))
    }

    async fn headers(&mut self, fields: Vec<Field>) {
        for f in fields {
            for slot in &mut self.slots {
                let leading = slot
                    .conn()
                    .is_some_and(|c| c.wants(step::HEADER_LEADING_SPACE));
                let value = if leading {
                    f.value.clone()
                } else {
                    f.value.trim_start_matches([' ', '\t']).to_string()
                };
                slot.ask(
                    None,
                    &Command::Header {
                        name: f.name.clone(),
                        value,
                    },
                    step::NO_HEADERS,
                    step::NR_HEADER,
                )
                .await;
            }
        }
    }

    async fn end_of_headers(&mut self) {
        if std::mem::replace(&mut self.eoh_sent, true) {
            return;
        }
        for slot in &mut self.slots {
            slot.ask(None, &Command::EndOfHeaders, step::NO_EOH, step::NR_EOH)
                .await;
        }
    }

    async fn body(&mut self, bytes: &[u8]) {
        for piece in bytes.chunks(BODY_CHUNK_MAX) {
            // One packet per piece, whatever the number of milters.
            let packet = Command::Body(piece.to_vec());
            for slot in &mut self.slots {
                if !slot.skip_body {
                    slot.ask(None, &packet, step::NO_BODY, step::NR_BODY).await;
                }
            }
        }
    }

    /// The next piece of the message as it is spooled (its `Received:` first).
    pub async fn push(&mut self, chunk: &[u8]) {
        if !self.listening() {
            return;
        }
        let split = self.reader.read(chunk);
        self.headers(split.fields).await;
        if split.ended {
            self.end_of_headers().await;
        }
        if let Some(from) = split.body_from {
            self.body(&chunk[from..]).await;
        }
        for slot in &mut self.slots {
            if let Some(c) = slot.conn() {
                if let Err(e) = c.flush().await {
                    slot.fail(e);
                }
            }
        }
    }

    /// The end of the message: each milter still listening is asked for its changes and
    /// verdict, in order, until one decides; the outcome combines them.
    pub async fn end(mut self) -> Outcome {
        if self.listening() {
            let rest = self.reader.finish();
            self.headers(rest).await;
            self.end_of_headers().await;
        }
        let mut settled = Vec::new();
        let mut reports = Vec::new();
        let mut decided = false;
        for slot in &mut self.slots {
            if decided {
                slot.close_quietly().await;
                reports.push(report(slot, Action::NotAsked, String::new()));
                continue;
            }
            if slot.end.is_none() {
                slot.end_of_message(&self.queue_id).await;
            }
            let end = slot.end.clone().unwrap_or(End::Failed("no end".into()));
            let verdict = settle(&end, slot.spec.on_failure);
            let (action, detail) = describe(&end, slot);
            reports.push(report(slot, action, detail));
            decided = verdict.as_ref().is_some_and(ends_chain);
            settled.push(verdict);
        }
        let verdict = combine(&settled);
        let keeps = matches!(verdict, Verdict::Accept | Verdict::Quarantine(_));
        let mut outcome = Outcome {
            verdict,
            edits: Vec::new(),
            sender: None,
            add_recipients: Vec::new(),
            remove_recipients: Vec::new(),
            reports,
        };
        if keeps {
            for slot in &mut self.slots {
                outcome.edits.append(&mut slot.edits);
                if let Some(s) = slot.sender.take() {
                    outcome.sender = Some(s);
                }
                outcome.add_recipients.append(&mut slot.add_recipients);
                outcome
                    .remove_recipients
                    .append(&mut slot.remove_recipients);
            }
        }
        outcome
    }

    /// The message will not be kept (refused at DATA, the client vanished): every milter is
    /// told to quit; the reports say what each had done.
    pub async fn abort(mut self) -> Vec<Report> {
        let mut reports = Vec::new();
        for slot in &mut self.slots {
            slot.close_quietly().await;
            let (action, detail) = match &slot.end {
                Some(end) => describe(end, slot),
                None => (Action::NotAsked, String::new()),
            };
            reports.push(report(slot, action, detail));
        }
        reports
    }
}

fn describe(end: &End, slot: &Slot) -> (Action, String) {
    match end {
        End::Passed {
            quarantine: Some(_),
        } => (
            Action::Quarantine,
            slot.quarantine.clone().unwrap_or_default(),
        ),
        End::Passed { quarantine: None } => {
            let changes = slot.edits.len()
                + slot.add_recipients.len()
                + slot.remove_recipients.len()
                + usize::from(slot.sender.is_some());
            let detail = if changes == 0 {
                String::new()
            } else {
                format!("{changes} changes")
            };
            (Action::Accept, detail)
        }
        End::Decided(Verdict::Reject(code, text)) => (Action::Reject, format!("{code} {text}")),
        End::Decided(Verdict::Tempfail(code, text)) => (Action::Tempfail, format!("{code} {text}")),
        End::Decided(Verdict::Discard) => (Action::Discard, String::new()),
        End::Decided(v) => (Action::Accept, format!("{v:?}")),
        End::Failed(why) => (Action::Failed, why.clone()),
    }
}

fn report(slot: &Slot, action: Action, detail: String) -> Report {
    Report {
        milter: slot.spec.name.clone(),
        action,
        detail,
        seconds: slot.started.elapsed().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn one_milters_end_settles_with_its_default_action() {
        let failed = End::Failed("connect: refused".into());
        let table: Vec<(End, OnFailure, Option<Verdict>)> = vec![
            (End::Passed { quarantine: None }, OnFailure::Tempfail, None),
            (
                End::Passed {
                    quarantine: Some("score 20".into()),
                },
                OnFailure::Tempfail,
                Some(Verdict::Quarantine("score 20".into())),
            ),
            (
                End::Decided(Verdict::Discard),
                OnFailure::Accept,
                Some(Verdict::Discard),
            ),
            (failed.clone(), OnFailure::Accept, None),
            (
                failed.clone(),
                OnFailure::Tempfail,
                Some(Verdict::Tempfail(451, TEMPFAIL_DEFAULT.into())),
            ),
            (
                failed,
                OnFailure::Reject,
                Some(Verdict::Reject(550, REJECT_DEFAULT.into())),
            ),
        ];
        for (end, on_failure, expected) in table {
            assert_eq!(settle(&end, on_failure), expected, "{end:?} {on_failure:?}");
        }
    }

    #[test]
    fn the_first_decisive_verdict_wins_then_quarantine_then_accept() {
        let q = || Some(Verdict::Quarantine("spam".into()));
        let r = || Some(Verdict::Reject(554, "5.7.1 Gtube".into()));
        let t = || Some(Verdict::Tempfail(451, "4.7.1 later".into()));
        let table: Vec<(Vec<Option<Verdict>>, Verdict)> = vec![
            (vec![], Verdict::Accept),
            (vec![None, None], Verdict::Accept),
            (vec![q(), None], q().unwrap()),
            (vec![q(), r()], r().unwrap()),
            (vec![t(), r()], t().unwrap()),
            (vec![None, Some(Verdict::Discard), r()], Verdict::Discard),
        ];
        for (settled, expected) in table {
            assert_eq!(combine(&settled), expected, "{settled:?}");
        }
    }

    #[test]
    fn a_milters_own_reply_is_one_bounded_line_with_an_enhanced_code() {
        let table = [
            (
                "554 5.7.1 Gtube pattern",
                Verdict::Reject(554, "5.7.1 Gtube pattern".into()),
            ),
            ("550 spam", Verdict::Reject(550, "5.7.1 spam".into())),
            (
                "421 4.7.0 try later",
                Verdict::Tempfail(421, "4.7.0 try later".into()),
            ),
            (
                "554-5.7.1 first\r\n554 5.7.1 second",
                Verdict::Reject(554, "5.7.1 first".into()),
            ),
            (
                "450",
                Verdict::Tempfail(450, "4.7.1 Command rejected".into()),
            ),
        ];
        for (text, expected) in table {
            assert_eq!(custom_reply(text), expected, "{text}");
        }
    }

    #[test]
    fn clients_select_trusted_or_not() {
        assert!(Clients::All.includes(true) && Clients::All.includes(false));
        assert!(Clients::Trusted.includes(true) && !Clients::Trusted.includes(false));
        assert!(!Clients::Untrusted.includes(true) && Clients::Untrusted.includes(false));
    }
}
