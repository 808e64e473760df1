//! The broker's one store writer: a thread that commits whatever writes are waiting in one
//! transaction (group commit, see `store::batch`), so allocations are not bound by one disk
//! sync each. It stops when the broker drops its last handle.

use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::store::{Store, StoreError, Write, Written};

/// Writes gathered into one transaction at most.
const MAX_BATCH: usize = 512;

type Job = (Write, oneshot::Sender<Result<Written, StoreError>>);

/// A handle to the writer thread.
#[derive(Debug, Clone)]
pub(crate) struct StoreWriter {
    jobs: mpsc::Sender<Job>,
}

impl StoreWriter {
    /// Starts the writer thread over `store`.
    pub(crate) fn start(store: Store) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                // Ends when every sender is gone, dropping its handle on the store.
                while let Ok(first) = rx.recv() {
                    let mut writes = vec![first.0];
                    let mut replies = vec![first.1];
                    while writes.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok((w, r)) => {
                                writes.push(w);
                                replies.push(r);
                            }
                            Err(_) => break,
                        }
                    }
                    let results = store.write_batch(&writes);
                    for (reply, result) in replies.into_iter().zip(results) {
                        // The caller may have given up (its request was cancelled).
                        let _ = reply.send(result);
                    }
                }
            })?;
        Ok(Self { jobs })
    }

    /// Applies `write` durably; returns when it is on disk.
    pub(crate) async fn write(&self, write: Write) -> Result<Written, StoreError> {
        self.submit(write)?.wait().await
    }

    /// Queues `write` at once, without waiting: writes submitted in some order are applied in
    /// that order, so a caller that submits while it holds the lock its change was made under
    /// keeps the store's order that of the changes. Await the answer with [`Pending::wait`].
    pub(crate) fn submit(&self, write: Write) -> Result<Pending, StoreError> {
        let (reply, done) = oneshot::channel();
        self.jobs
            .send((write, reply))
            .map_err(|_| StoreError::WriterStopped)?;
        Ok(Pending(done))
    }
}

/// A submitted write's answer, to come.
#[derive(Debug)]
pub(crate) struct Pending(oneshot::Receiver<Result<Written, StoreError>>);

impl Pending {
    /// Waits until the write is on disk (or failed).
    pub(crate) async fn wait(self) -> Result<Written, StoreError> {
        self.0.await.map_err(|_| StoreError::WriterStopped)?
    }
}
