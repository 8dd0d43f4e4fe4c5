//! A sink that keeps messages in memory, shared by the session and client tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use bytes::Bytes;
use smtp::{BodySink, Sink, SinkError, Transaction};
use std::sync::{Arc, Mutex};

/// Sender, recipients, body.
pub type Stored = (String, Vec<String>, Vec<u8>);

#[derive(Default)]
pub struct MemorySink {
    pub stored: Mutex<Vec<Stored>>,
    pub aborted: Mutex<usize>,
    pub fail_commit: Option<bool>, // Some(true) = full, Some(false) = temporary
    /// A filter's refusal at DATA (`begin`) or at the end of the body (`commit`).
    pub refuse_at_begin: Option<(u16, String)>,
    pub refuse_at_commit: Option<(u16, String)>,
}

pub struct MemoryBody {
    sink: Arc<MemorySink>,
    sender: String,
    rcpts: Vec<String>,
    bytes: Vec<u8>,
}

impl Sink for MemorySink {
    type Body = MemoryBody;
    async fn begin(self: &Arc<Self>, tx: &Transaction<'_>) -> Result<MemoryBody, SinkError> {
        if let Some((code, text)) = self.refuse_at_begin.clone() {
            return Err(SinkError::Refused { code, text });
        }
        Ok(MemoryBody {
            sink: self.clone(),
            sender: tx.sender.to_string(),
            rcpts: tx.recipients.to_vec(),
            bytes: Vec::new(),
        })
    }
}

impl BodySink for MemoryBody {
    async fn push(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        self.bytes.extend_from_slice(&chunk);
        Ok(())
    }
    async fn commit(self) -> Result<String, SinkError> {
        match self.sink.fail_commit {
            Some(true) => return Err(SinkError::Full("disk full".into())),
            Some(false) => return Err(SinkError::Temporary("io error".into())),
            None => {}
        }
        if let Some((code, text)) = self.sink.refuse_at_commit.clone() {
            return Err(SinkError::Refused { code, text });
        }
        let mut stored = self.sink.stored.lock().unwrap();
        stored.push((self.sender, self.rcpts, self.bytes));
        Ok(format!("Q{}", stored.len()))
    }
    fn abort(self) {
        *self.sink.aborted.lock().unwrap() += 1;
    }
}
