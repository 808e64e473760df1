//! Group commit: many writes in one transaction and one disk sync.
//!
//! Every redb write transaction ends with a sync to disk, and only one runs at a time, so a
//! broker that committed each write alone would be bound by the disk's sync latency. The
//! service's writer thread collects the writes that arrive while one commit runs and hands
//! them to [`Store::write_batch`]; each caller still learns its own result, and none is told
//! its write is done before it is durable.

use redb::{ReadableTable, WriteTransaction};

use framecast_shared::ids::{NodeId, SessionId, TenantId};
use framecast_shared::state::EndReason;
use framecast_shared::time::Timestamp;

use super::records::{AuditRecord, IdempotencyRecord, StoredNode, StoredSession};
use super::{
    AUDIT, AUDIT_NAME, Claim, IDEMPOTENCY, IDEMPOTENCY_BY_TIME, IDEMPOTENCY_NAME, IdempotencyKey,
    NODES, NODES_NAME, SESSIONS, SESSIONS_NAME, SessionKey, Store, StoreError, claim_in, decode,
    encode, session_key,
};

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// [`Store::create_session`].
    Create {
        /// The session.
        session: StoredSession,
        /// Its idempotency claim.
        idempotency: Option<IdempotencyRecord>,
    },
    /// [`Store::update_session`].
    Update(StoredSession),
    /// [`Store::end_session`].
    End {
        /// The session.
        id: SessionId,
        /// When it ended.
        at: Timestamp,
        /// Why.
        reason: EndReason,
    },
    /// [`Store::discard_session`].
    Discard {
        /// The session.
        id: SessionId,
        /// Its idempotency claim, to remove too.
        idempotency: Option<(TenantId, String)>,
    },
    /// [`Store::put_node`].
    PutNode(StoredNode),
    /// [`Store::remove_node`].
    RemoveNode(NodeId),
}

/// What one write did.
#[derive(Debug, Clone)]
pub enum Written {
    /// The session and its claim were written, or the claim existed.
    Created(Claim),
    /// Whether the session was still stored and so rewritten.
    Updated(bool),
    /// The audit record, if the session was stored.
    Ended(Option<AuditRecord>),
    /// Gone.
    Discarded,
    /// The node's cordon or drain is recorded.
    NodeRecorded,
    /// Whether the node had a cordon or drain recorded, now removed.
    NodeRemoved(bool),
}

impl Store {
    /// Applies `writes` in order in one transaction with one disk sync, and returns each one's
    /// result. Should the batch fail as a whole (one row that does not decode, say), each
    /// write is applied again in a transaction of its own, so one bad write does not fail
    /// the others.
    pub fn write_batch(&self, writes: &[Write]) -> Vec<Result<Written, StoreError>> {
        match self.try_batch(writes) {
            Ok(done) => done.into_iter().map(Ok).collect(),
            Err(_) if writes.len() > 1 => {
                writes.iter().map(|w| self.write_one(w.clone())).collect()
            }
            Err(e) => vec![Err(e)],
        }
    }

    /// Applies one write in a transaction of its own.
    pub(super) fn write_one(&self, write: Write) -> Result<Written, StoreError> {
        self.try_batch(std::slice::from_ref(&write)).map(first)
    }

    fn try_batch(&self, writes: &[Write]) -> Result<Vec<Written>, StoreError> {
        let txn = self.db.begin_write()?;
        let mut done = Vec::with_capacity(writes.len());
        for w in writes {
            done.push(apply(&txn, w)?);
        }
        txn.commit()?;
        Ok(done)
    }
}

fn first(mut done: Vec<Written>) -> Written {
    done.pop().unwrap_or(Written::Discarded)
}

fn apply(txn: &WriteTransaction, w: &Write) -> Result<Written, StoreError> {
    match w {
        Write::Create {
            session,
            idempotency,
        } => {
            if let Some(record) = idempotency
                && let Some(existing) = claim_in(txn, record)?
            {
                return Ok(Written::Created(Claim::Existing(existing)));
            }
            let value = encode(SESSIONS_NAME, session)?;
            txn.open_table(SESSIONS)?
                .insert(session_key(&session.session_id), value.as_slice())?;
            Ok(Written::Created(Claim::Inserted))
        }
        Write::Update(session) => {
            let value = encode(SESSIONS_NAME, session)?;
            let key = session_key(&session.session_id);
            let mut sessions = txn.open_table(SESSIONS)?;
            let present = sessions.get(key)?.is_some();
            if present {
                sessions.insert(key, value.as_slice())?;
            }
            Ok(Written::Updated(present))
        }
        Write::End { id, at, reason } => {
            let key = session_key(id);
            let removed: Option<StoredSession> = {
                let mut sessions = txn.open_table(SESSIONS)?;
                let row = sessions.remove(key)?;
                row.map(|row| decode(SESSIONS_NAME, &SessionKey(key), row.value()))
                    .transpose()?
            };
            let Some(session) = removed else {
                return Ok(Written::Ended(None));
            };
            let record = AuditRecord::from_session(&session, *at, *reason);
            let value = encode(AUDIT_NAME, &record)?;
            txn.open_table(AUDIT)?
                .insert((at.as_millis(), key), value.as_slice())?;
            Ok(Written::Ended(Some(record)))
        }
        Write::Discard { id, idempotency } => {
            txn.open_table(SESSIONS)?.remove(session_key(id))?;
            if let Some((tenant, key)) = idempotency {
                let mut claims = txn.open_table(IDEMPOTENCY)?;
                let removed = claims.remove((tenant.as_str(), key.as_str()))?;
                let claim = removed
                    .map(|row| {
                        decode::<IdempotencyRecord>(
                            IDEMPOTENCY_NAME,
                            &IdempotencyKey(tenant.as_str(), key),
                            row.value(),
                        )
                    })
                    .transpose()?;
                if let Some(claim) = claim {
                    txn.open_table(IDEMPOTENCY_BY_TIME)?.remove((
                        claim.created_at.as_millis(),
                        tenant.as_str(),
                        key.as_str(),
                    ))?;
                }
            }
            Ok(Written::Discarded)
        }
        Write::PutNode(node) => {
            let value = encode(NODES_NAME, node)?;
            txn.open_table(NODES)?
                .insert(node.node_id.as_str(), value.as_slice())?;
            Ok(Written::NodeRecorded)
        }
        Write::RemoveNode(node) => {
            let removed = txn.open_table(NODES)?.remove(node.as_str())?.is_some();
            Ok(Written::NodeRemoved(removed))
        }
    }
}

#[cfg(test)]
mod tests {
    use framecast_shared::ids::{GameId, GenreName, TierName};
    use framecast_shared::state::SessionState;

    use super::*;

    fn session(n: u128) -> StoredSession {
        StoredSession {
            session_id: SessionId::new(Timestamp::from_millis(1_000), n),
            tenant: TenantId::new("acme").unwrap(),
            game: GameId::new("g").unwrap(),
            tier: TierName::new("720p").unwrap(),
            genre: GenreName::new("fps").unwrap(),
            player_id: "p".into(),
            priority: "normal".into(),
            regions: Vec::new(),
            state: SessionState::Queued,
            node: None,
            gpu: None,
            slot: None,
            created_at: Timestamp::from_millis(1_000),
            placed_at: Some(Timestamp::from_millis(2_000)),
            active_at: None,
            expires_at: None,
            idempotency_key: None,
            framebuffer_mb: 2048,
            compute_sixteenths: 8,
        }
    }

    #[test]
    fn a_batch_applies_in_order_and_reports_each_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (session(1), session(2));
        let claim = |s: &StoredSession| IdempotencyRecord {
            tenant: s.tenant.clone(),
            key: "k".into(),
            request_sha256: [1; 32],
            session_id: s.session_id,
            created_at: s.created_at,
        };
        let done = store.write_batch(&[
            Write::Create {
                session: a.clone(),
                idempotency: Some(claim(&a)),
            },
            // The same key again in the same batch: the first claim wins.
            Write::Create {
                session: b.clone(),
                idempotency: Some(claim(&b)),
            },
            Write::Update(b.clone()),
            Write::End {
                id: a.session_id,
                at: Timestamp::from_millis(12_000),
                reason: EndReason::Released,
            },
            Write::End {
                id: a.session_id,
                at: Timestamp::from_millis(13_000),
                reason: EndReason::Released,
            },
        ]);
        assert!(matches!(done[0], Ok(Written::Created(Claim::Inserted))));
        assert!(matches!(done[1], Ok(Written::Created(Claim::Existing(_)))));
        assert!(
            matches!(done[2], Ok(Written::Updated(false))),
            "b was never stored"
        );
        match &done[3] {
            Ok(Written::Ended(Some(audit))) => {
                assert_eq!(audit.session_seconds, 10.0);
                assert_eq!(audit.gpu_seconds, 5.0);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(done[4], Ok(Written::Ended(None))), "billed once");
        assert!(store.sessions().unwrap().is_empty());
        assert_eq!(store.audit(None, None).unwrap().len(), 1);
    }

    #[test]
    fn node_decisions_apply_in_order_within_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let node = |deadline: Option<u64>| StoredNode {
            node_id: NodeId::new("gpu-a").unwrap(),
            drain_deadline: deadline.map(Timestamp::from_millis),
            since: Timestamp::from_millis(1_000),
        };
        let id = NodeId::new("gpu-a").unwrap();
        // Cordon, drain, uncordon, cordon: the last one stands.
        let done = store.write_batch(&[
            Write::PutNode(node(None)),
            Write::PutNode(node(Some(9_000))),
            Write::RemoveNode(id.clone()),
            Write::RemoveNode(id.clone()),
            Write::PutNode(node(None)),
        ]);
        assert!(matches!(done[0], Ok(Written::NodeRecorded)));
        assert!(matches!(done[2], Ok(Written::NodeRemoved(true))));
        assert!(matches!(done[3], Ok(Written::NodeRemoved(false))));
        assert_eq!(store.nodes().unwrap(), vec![node(None)]);
    }

    #[test]
    fn one_bad_write_does_not_fail_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (good, bad) = (session(1), session(2));
        store.put_session(&good).unwrap();
        store.put_session(&bad).unwrap();
        // Corrupt the second row behind the store's back.
        {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(SESSIONS)
                .unwrap()
                .insert(session_key(&bad.session_id), &b"\xff\xff"[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let at = Timestamp::from_millis(5_000);
        let done = store.write_batch(&[
            Write::End {
                id: good.session_id,
                at,
                reason: EndReason::Released,
            },
            Write::End {
                id: bad.session_id,
                at,
                reason: EndReason::Released,
            },
        ]);
        assert!(matches!(done[0], Ok(Written::Ended(Some(_)))));
        assert!(matches!(done[1], Err(StoreError::Decode { .. })));
    }
}
