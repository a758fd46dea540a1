//! JSON access log, one object per line, written by a dedicated thread so the request path only
//! formats a line and hands it over (never blocks: when the writer falls behind, lines are
//! dropped and counted in `sluice_access_log_dropped_total`).

use std::io::{BufWriter, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use prometheus::IntCounter;

use crate::config::AccessLog;

enum Msg {
    Line(String),
    Flush(SyncSender<()>),
}

pub struct AccessLogger {
    tx: Option<SyncSender<Msg>>,
    dropped: IntCounter,
}

const QUEUE: usize = 64 * 1024;

impl AccessLogger {
    pub fn start(target: &AccessLog, dropped: IntCounter) -> Result<Self, String> {
        let out: Box<dyn Write + Send> = match target {
            AccessLog::Off => return Ok(AccessLogger { tx: None, dropped }),
            AccessLog::Stdout => Box::new(std::io::stdout()),
            AccessLog::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("cannot open access log {}: {e}", p.display()))?,
            ),
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, out))
            .map_err(|e| format!("cannot start access log thread: {e}"))?;
        Ok(AccessLogger {
            tx: Some(tx),
            dropped,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, line: String) {
        if let Some(tx) = &self.tx {
            match tx.try_send(Msg::Line(line)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped.inc()
                }
            }
        }
    }

    /// Waits (bounded) until every line handed over so far is written.
    pub fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (ack_tx, ack_rx) = mpsc::sync_channel(1);
            if tx.send(Msg::Flush(ack_tx)).is_ok() {
                let _ = ack_rx.recv_timeout(Duration::from_secs(2));
            }
        }
    }
}

fn writer(rx: Receiver<Msg>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    loop {
        // Write in batches; flush when the queue goes quiet.
        let msg = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                let _ = out.flush();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match msg {
            Msg::Line(l) => {
                let _ = out.write_all(l.as_bytes());
                let _ = out.write_all(b"\n");
            }
            Msg::Flush(ack) => {
                let _ = out.flush();
                let _ = ack.send(());
            }
        }
    }
    let _ = out.flush();
}
