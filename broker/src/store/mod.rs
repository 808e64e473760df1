//! The broker's durable store: live sessions, idempotency keys, the audit log and the
//! operators' cordons and drains.
//!
//! One [redb] file, `<data_dir>/broker.redb`: an embedded, crash-safe, copy-on-write B-tree
//! store. A committed write transaction survives a crash whole; one that did not commit leaves
//! no trace. The file holds these tables:
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `sessions` | the session id's 16 UUIDv7 bytes, so rows sort by creation time | [`StoredSession`] |
//! | `idempotency` | (tenant, key) | [`IdempotencyRecord`] |
//! | `idempotency_by_time` | (claimed at in Unix ms, tenant, key) | nothing: the expiry index |
//! | `audit` | (ended at in Unix ms, session id bytes), so a time range is a range scan | [`AuditRecord`] |
//! | `nodes` | the node id | [`StoredNode`]: a cordon, or a drain and its deadline |
//! | `meta` | `"schema_version"` | the layout version, refused when newer than this build's |
//!
//! Every value is CBOR written through one helper, so all tables share one encoding, and a
//! row that does not decode is a [`StoreError::Decode`] naming its table and key, never a panic.
//! See [`records`] for how records grow without breaking old rows.
//!
//! Ending a session removes its row and appends its audit record in one transaction
//! ([`Store::end_session`]): a crash loses neither the live session nor its bill, and a second
//! end of the same session finds nothing, so it is never billed twice.
//!
//! Every method is synchronous and may block on disk I/O (a commit waits for `fsync`, and only
//! one write transaction runs at a time). The async broker calls them through
//! `tokio::task::spawn_blocking`; [`Store`] is a cheap clone to move into the closure.

pub mod batch;
pub mod export;
pub mod records;

use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, DatabaseError, ReadableTable, TableDefinition, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use framecast_shared::ids::{NodeId, SessionId, TenantId};
use framecast_shared::state::EndReason;
use framecast_shared::time::Timestamp;

pub use batch::{Write, Written};
pub use export::{ExportFormat, UnknownExportFormat, export};
pub use records::{AuditRecord, IdempotencyRecord, StoredNode, StoredSession};

/// The store's file name inside the broker's data directory.
pub const FILE_NAME: &str = "broker.redb";

/// The table layout this build reads and writes. A file with a newer layout is refused rather
/// than misread; an older one is migrated on open (none exists yet).
///
/// A table added later does not change it: [`Store::open`] creates missing tables, so a file
/// from an older build opens with the new table empty, and an older build ignores a table it
/// does not know. Only a change an older build would misread (a key or value layout changed
/// in place) bumps it.
pub const SCHEMA_VERSION: u64 = 1;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// Another process holds the store file's lock: most likely another broker started with the
    /// same data directory.
    #[error(
        "the store {path} is locked by another process; is another broker running with this \
         data directory? Stop it, or give this broker a data directory of its own"
    )]
    Locked {
        /// The store file.
        path: PathBuf,
    },
    /// The store file could not be opened or initialised: unreadable, not a redb file, or
    /// corrupt beyond redb's automatic repair.
    #[error(
        "cannot open the store {path}: {source}; if the file is corrupt, move it aside and \
         restore a backup (a fresh broker.redb starts with no sessions and no audit history)"
    )]
    Open {
        /// The store file.
        path: PathBuf,
        /// What redb said.
        source: Box<redb::Error>,
    },
    /// The store file was written by a newer broker whose table layout this build does not
    /// know.
    #[error(
        "the store {path} has schema version {found}; this broker reads version {supported} \
         at most; run a newer broker"
    )]
    Schema {
        /// The store file.
        path: PathBuf,
        /// The version the file records.
        found: u64,
        /// The newest version this build reads.
        supported: u64,
    },
    /// A read or write failed in the storage engine (I/O, a full disk, corruption found while
    /// reading).
    #[error("store operation failed: {0}")]
    Storage(Box<redb::Error>),
    /// The broker's writer thread is gone (the broker is stopping).
    #[error("the store writer has stopped")]
    WriterStopped,
    /// A stored row could not be decoded into its record type.
    #[error("cannot decode the row {key} of table `{table}`: {detail}")]
    Decode {
        /// The table holding the row.
        table: &'static str,
        /// The row's key, printed.
        key: String,
        /// What the decoder said.
        detail: String,
    },
    /// A record could not be encoded (a serializer refused a value).
    #[error("cannot encode a row for table `{table}`: {detail}")]
    Encode {
        /// The table the row was for.
        table: &'static str,
        /// What the encoder said.
        detail: String,
    },
}

/// Every redb error type becomes [`StoreError::Storage`] through redb's own superset error.
macro_rules! storage_error_from {
    ($($t:ty),* $(,)?) => {
        $(
            impl From<$t> for StoreError {
                fn from(e: $t) -> Self {
                    Self::Storage(Box::new(e.into()))
                }
            }
        )*
    };
}

storage_error_from!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
);

/// What claiming an idempotency key found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The key was free; it is now claimed (and the session written, for
    /// [`Store::create_session`]).
    Inserted,
    /// The key was already claimed by this record; nothing was written. The caller compares
    /// `request_sha256`: the same body gets the same session back, a different one is a 409.
    Existing(IdempotencyRecord),
}

/// The broker's durable store. Cloning is cheap and every clone uses the same open database.
///
/// All methods are synchronous; see the [module documentation](self) for how the async broker
/// calls them.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: Arc<Path>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens `<data_dir>/broker.redb`, creating the directory and the file if needed.
    ///
    /// redb takes an exclusive lock on the file, so a second broker (or a second `open` in this
    /// process while the first [`Store`] lives) gets [`StoreError::Locked`]. A file left by a
    /// crash is repaired by redb on open; one that is not a redb file, or too damaged to
    /// repair, gives [`StoreError::Open`] naming the path.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: path.clone() },
            other => StoreError::Open {
                path: path.clone(),
                source: Box::new(other.into()),
            },
        })?;
        let version = init_tables(&db).map_err(|e| match e {
            StoreError::Storage(source) => StoreError::Open {
                path: path.clone(),
                source,
            },
            other => other,
        })?;
        match version {
            found if found > SCHEMA_VERSION => Err(StoreError::Schema {
                path,
                found,
                supported: SCHEMA_VERSION,
            }),
            _ => Ok(Store {
                db: Arc::new(db),
                path: path.into(),
            }),
        }
    }

    /// The store file's path, for log lines.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `session`, replacing the row with the same id if there is one.
    pub fn put_session(&self, session: &StoredSession) -> Result<(), StoreError> {
        let value = encode(SESSIONS_NAME, session)?;
        let txn = self.db.begin_write()?;
        {
            let mut sessions = txn.open_table(SESSIONS)?;
            sessions.insert(session_key(&session.session_id), value.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Rewrites `session` only if it is stored: a session that ended meanwhile is not brought
    /// back. Returns whether it was written.
    pub fn update_session(&self, session: &StoredSession) -> Result<bool, StoreError> {
        match self.write_one(Write::Update(session.clone()))? {
            Written::Updated(present) => Ok(present),
            other => Err(unexpected(other)),
        }
    }

    /// Removes a session that never held a slot (its request failed) without an audit record.
    /// Its idempotency claim, if any, is removed too, so a retry tries again.
    pub fn discard_session(
        &self,
        id: &SessionId,
        idempotency: Option<(&TenantId, &str)>,
    ) -> Result<(), StoreError> {
        self.write_one(Write::Discard {
            id: *id,
            idempotency: idempotency.map(|(t, k)| (t.clone(), k.to_owned())),
        })
        .map(|_| ())
    }

    /// Writes a new session and, when the request carried an `Idempotency-Key`, claims it, in
    /// one transaction: either both are written ([`Claim::Inserted`]) or the key was already
    /// claimed and nothing is written ([`Claim::Existing`] with the earlier claim).
    ///
    /// `idempotency.session_id` should be `session.session_id`.
    pub fn create_session(
        &self,
        session: &StoredSession,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<Claim, StoreError> {
        match self.write_one(Write::Create {
            session: session.clone(),
            idempotency: idempotency.cloned(),
        })? {
            Written::Created(claim) => Ok(claim),
            other => Err(unexpected(other)),
        }
    }

    /// The live session `id`, if it is stored.
    pub fn session(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        let txn = self.db.begin_read()?;
        let sessions = txn.open_table(SESSIONS)?;
        let key = session_key(id);
        match sessions.get(key)? {
            Some(row) => decode(SESSIONS_NAME, &SessionKey(key), row.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every live session, oldest first: what a restarted broker rebuilds its state from.
    pub fn sessions(&self) -> Result<Vec<StoredSession>, StoreError> {
        let txn = self.db.begin_read()?;
        let sessions = txn.open_table(SESSIONS)?;
        sessions
            .iter()?
            .map(|row| {
                let (key, value) = row?;
                decode(SESSIONS_NAME, &SessionKey(key.value()), value.value())
            })
            .collect()
    }

    /// Ends session `id` at `ended_at`: in one transaction, removes its row and appends its
    /// [`AuditRecord`], which is returned. `None` when the session is not stored (never
    /// created, or already ended), so ending twice never bills twice.
    ///
    /// A row that does not decode is an error and stays in place: it is not billed, and not
    /// silently dropped either.
    pub fn end_session(
        &self,
        id: &SessionId,
        ended_at: Timestamp,
        reason: EndReason,
    ) -> Result<Option<AuditRecord>, StoreError> {
        match self.write_one(Write::End {
            id: *id,
            at: ended_at,
            reason,
        })? {
            Written::Ended(audit) => Ok(audit),
            other => Err(unexpected(other)),
        }
    }

    /// Records an operator's cordon or drain of `node.node_id`, replacing the earlier one.
    pub fn put_node(&self, node: &StoredNode) -> Result<(), StoreError> {
        self.write_one(Write::PutNode(node.clone())).map(|_| ())
    }

    /// Forgets the cordon or drain of `node` (an uncordon). Returns whether one was stored.
    pub fn remove_node(&self, node: &NodeId) -> Result<bool, StoreError> {
        match self.write_one(Write::RemoveNode(node.clone()))? {
            Written::NodeRemoved(present) => Ok(present),
            other => Err(unexpected(other)),
        }
    }

    /// The stored cordon or drain of `node`, if there is one.
    pub fn node(&self, node: &NodeId) -> Result<Option<StoredNode>, StoreError> {
        let txn = self.db.begin_read()?;
        let nodes = txn.open_table(NODES)?;
        match nodes.get(node.as_str())? {
            Some(row) => decode(NODES_NAME, &node.as_str(), row.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every stored cordon and drain, by node id: what a restarted broker re-applies to each
    /// node when its agent says hello.
    pub fn nodes(&self) -> Result<Vec<StoredNode>, StoreError> {
        let txn = self.db.begin_read()?;
        let nodes = txn.open_table(NODES)?;
        nodes
            .iter()?
            .map(|row| {
                let (key, value) = row?;
                decode(NODES_NAME, &key.value(), value.value())
            })
            .collect()
    }

    /// The claim on `key` by `tenant`, if there is one (expired claims stay until
    /// [`Store::expire_idempotency`] removes them).
    pub fn idempotency_get(
        &self,
        tenant: &TenantId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IDEMPOTENCY)?;
        match table.get((tenant.as_str(), key))? {
            Some(row) => decode(
                IDEMPOTENCY_NAME,
                &IdempotencyKey(tenant.as_str(), key),
                row.value(),
            )
            .map(Some),
            None => Ok(None),
        }
    }

    /// Claims `record.key` for `record.tenant` unless it is already claimed, atomically: of two
    /// concurrent claims of one key, exactly one gets [`Claim::Inserted`].
    pub fn idempotency_claim(&self, record: &IdempotencyRecord) -> Result<Claim, StoreError> {
        let txn = self.db.begin_write()?;
        match claim_in(&txn, record)? {
            Some(existing) => {
                txn.abort()?;
                Ok(Claim::Existing(existing))
            }
            None => {
                txn.commit()?;
                Ok(Claim::Inserted)
            }
        }
    }

    /// Removes the idempotency claims older than `ttl` at `now` (claimed before `now - ttl`;
    /// one claimed exactly `ttl` ago stays) and returns how many went. The broker runs this
    /// periodically with a 24-hour TTL. Uses the expiry index: no claim is decoded.
    pub fn expire_idempotency(&self, now: Timestamp, ttl: Duration) -> Result<usize, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now.as_millis().saturating_sub(ttl_ms);
        let txn = self.db.begin_write()?;
        let mut removed = 0;
        {
            let mut by_time = txn.open_table(IDEMPOTENCY_BY_TIME)?;
            let mut claims = txn.open_table(IDEMPOTENCY)?;
            let expired = by_time
                .range(..(cutoff, "", ""))?
                .map(|row| {
                    let (key, _) = row?;
                    let (ms, tenant, key) = key.value();
                    Ok((ms, tenant.to_owned(), key.to_owned()))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            for (ms, tenant, key) in &expired {
                by_time.remove((*ms, tenant.as_str(), key.as_str()))?;
                if claims.remove((tenant.as_str(), key.as_str()))?.is_some() {
                    removed += 1;
                }
            }
        }
        txn.commit()?;
        Ok(removed)
    }

    /// The audit records of sessions that ended in `[from, to)`, ordered by end time (then
    /// session id). `None` leaves that side open. Half-open, so consecutive periods (a month,
    /// then the next) never count a session twice.
    pub fn audit(
        &self,
        from: Option<Timestamp>,
        to: Option<Timestamp>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        if let (Some(from), Some(to)) = (from, to)
            && from >= to
        {
            return Ok(Vec::new());
        }
        // The smallest session-id bytes, so (t, LOWEST) sorts before every record ending at t.
        const LOWEST: [u8; 16] = [0; 16];
        let lower = from.map_or(Bound::Unbounded, |t| {
            Bound::Included((t.as_millis(), LOWEST))
        });
        let upper = to.map_or(Bound::Unbounded, |t| {
            Bound::Excluded((t.as_millis(), LOWEST))
        });
        let txn = self.db.begin_read()?;
        let audit = txn.open_table(AUDIT)?;
        audit
            .range::<(u64, [u8; 16])>((lower, upper))?
            .map(|row| {
                let (key, value) = row?;
                let (ms, id) = key.value();
                decode(AUDIT_NAME, &AuditKey(ms, id), value.value())
            })
            .collect()
    }
}

const SESSIONS_NAME: &str = "sessions";
const IDEMPOTENCY_NAME: &str = "idempotency";
const IDEMPOTENCY_BY_TIME_NAME: &str = "idempotency_by_time";
const AUDIT_NAME: &str = "audit";
const META_NAME: &str = "meta";
const NODES_NAME: &str = "nodes";

const SESSIONS: TableDefinition<'_, [u8; 16], &[u8]> = TableDefinition::new(SESSIONS_NAME);
const IDEMPOTENCY: TableDefinition<'_, (&str, &str), &[u8]> =
    TableDefinition::new(IDEMPOTENCY_NAME);
const IDEMPOTENCY_BY_TIME: TableDefinition<'_, (u64, &str, &str), ()> =
    TableDefinition::new(IDEMPOTENCY_BY_TIME_NAME);
const AUDIT: TableDefinition<'_, (u64, [u8; 16]), &[u8]> = TableDefinition::new(AUDIT_NAME);
const META: TableDefinition<'_, &str, u64> = TableDefinition::new(META_NAME);
const NODES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new(NODES_NAME);

const SCHEMA_VERSION_KEY: &str = "schema_version";

/// Creates every table so that read transactions find them (a file from an older build gets
/// the tables added since, empty), records the schema version in a new file, and returns the
/// file's version.
fn init_tables(db: &Database) -> Result<u64, StoreError> {
    let txn = db.begin_write()?;
    txn.open_table(SESSIONS)?;
    txn.open_table(IDEMPOTENCY)?;
    txn.open_table(IDEMPOTENCY_BY_TIME)?;
    txn.open_table(AUDIT)?;
    txn.open_table(NODES)?;
    let version = {
        let mut meta = txn.open_table(META)?;
        let stored = meta.get(SCHEMA_VERSION_KEY)?.map(|v| v.value());
        match stored {
            Some(version) => version,
            None => {
                meta.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION)?;
                SCHEMA_VERSION
            }
        }
    };
    txn.commit()?;
    Ok(version)
}

/// Inserts `record` into the idempotency table and its expiry index inside `txn`, unless the
/// key is already claimed; then returns the existing claim and writes nothing.
fn claim_in(
    txn: &WriteTransaction,
    record: &IdempotencyRecord,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    let tenant = record.tenant.as_str();
    let key = record.key.as_str();
    let mut claims = txn.open_table(IDEMPOTENCY)?;
    if let Some(row) = claims.get((tenant, key))? {
        let existing = decode(IDEMPOTENCY_NAME, &IdempotencyKey(tenant, key), row.value())?;
        return Ok(Some(existing));
    }
    let value = encode(IDEMPOTENCY_NAME, record)?;
    claims.insert((tenant, key), value.as_slice())?;
    let mut by_time = txn.open_table(IDEMPOTENCY_BY_TIME)?;
    by_time.insert((record.created_at.as_millis(), tenant, key), ())?;
    Ok(None)
}

/// A single write answered with another kind of result: a bug in `batch::apply`.
fn unexpected(written: Written) -> StoreError {
    StoreError::Encode {
        table: SESSIONS_NAME,
        detail: format!("the store answered {written:?} to another kind of write"),
    }
}

/// The sessions table's key: the UUIDv7's bytes, whose first 48 bits are the creation time.
fn session_key(id: &SessionId) -> [u8; 16] {
    *id.as_uuid().as_bytes()
}

/// The one encoding every table's values use: CBOR.
fn encode<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes).map_err(|e| StoreError::Encode {
        table,
        detail: e.to_string(),
    })?;
    Ok(bytes)
}

/// Decodes a value written by [`encode`]; `key` is printed only when it fails.
fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &dyn fmt::Display,
    bytes: &[u8],
) -> Result<T, StoreError> {
    ciborium::from_reader(bytes).map_err(|e| StoreError::Decode {
        table,
        key: key.to_string(),
        detail: e.to_string(),
    })
}

/// Prints a sessions-table key as the session id it holds.
struct SessionKey([u8; 16]);

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Uuid::from_bytes(self.0).hyphenated().fmt(f)
    }
}

/// Prints an audit-table key as `<ended at ms>/<session id>`.
struct AuditKey(u64, [u8; 16]);

impl fmt::Display for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0, SessionKey(self.1))
    }
}

/// Prints an idempotency key as `<tenant>/<key>`, the client's key escaped so that it cannot
/// break a log line.
struct IdempotencyKey<'a>(&'a str, &'a str);

impl fmt::Display for IdempotencyKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:?}", self.0, self.1)
    }
}

#[cfg(test)]
mod tests {
    use framecast_shared::ids::TenantId;
    use framecast_shared::state::SessionState;

    use super::records::tests::session;
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn claim(tenant: &str, key: &str, body: u8, session: SessionId, at: u64) -> IdempotencyRecord {
        IdempotencyRecord {
            tenant: TenantId::new(tenant).unwrap(),
            key: key.to_owned(),
            request_sha256: [body; 32],
            session_id: session,
            created_at: Timestamp::from_millis(at),
        }
    }

    #[test]
    fn sessions_round_trip_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = session(T0, 1);
        let mut b = session(T0 + 5, 2);
        b.state = SessionState::Queued;
        b.node = None;
        b.gpu = None;
        b.slot = None;
        b.placed_at = None;
        b.active_at = None;
        b.expires_at = Some(Timestamp::from_millis(T0 + 60_000));
        b.idempotency_key = None;
        {
            let store = Store::open(dir.path()).unwrap();
            // Written newest first: the table's order must come from the keys.
            store.put_session(&b).unwrap();
            store.put_session(&a).unwrap();
            assert_eq!(store.session(&a.session_id).unwrap(), Some(a.clone()));
            assert_eq!(store.session(&b.session_id).unwrap(), Some(b.clone()));
            let absent = SessionId::new(Timestamp::from_millis(T0), 99);
            assert_eq!(store.session(&absent).unwrap(), None);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.path(), dir.path().join(FILE_NAME));
        assert_eq!(store.sessions().unwrap(), vec![a.clone(), b]);

        let mut moved = a.clone();
        moved.state = SessionState::Reconnecting;
        moved.expires_at = Some(Timestamp::from_millis(T0 + 30_000));
        store.put_session(&moved).unwrap();
        assert_eq!(store.session(&a.session_id).unwrap(), Some(moved));
        assert_eq!(store.sessions().unwrap().len(), 2);
    }

    #[test]
    fn ending_a_session_moves_it_to_the_audit_log_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = session(T0, 1);
        let other = session(T0 + 1, 2);
        store.put_session(&s).unwrap();
        store.put_session(&other).unwrap();

        let ended = Timestamp::from_millis(T0 + 61_000);
        let record = store
            .end_session(&s.session_id, ended, EndReason::Released)
            .unwrap()
            .unwrap();
        assert_eq!(
            record,
            AuditRecord::from_session(&s, ended, EndReason::Released)
        );
        assert_eq!(record.session_seconds, 60.0);
        assert_eq!(store.session(&s.session_id).unwrap(), None);
        assert_eq!(store.sessions().unwrap(), vec![other]);
        assert_eq!(store.audit(None, None).unwrap(), vec![record.clone()]);

        // A retried end (a duplicate message, a restart mid-way) finds nothing to bill.
        let again = Timestamp::from_millis(T0 + 62_000);
        assert_eq!(
            store
                .end_session(&s.session_id, again, EndReason::Error)
                .unwrap(),
            None
        );
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.audit(None, None).unwrap(), vec![record]);
    }

    #[test]
    fn the_first_claim_of_a_key_wins_and_later_ones_see_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = claim("acme", "order-1", 1, session(T0, 1).session_id, T0);
        let retry = claim("acme", "order-1", 2, session(T0 + 9, 2).session_id, T0 + 9);
        let tenant = TenantId::new("acme").unwrap();

        assert_eq!(store.idempotency_get(&tenant, "order-1").unwrap(), None);
        assert_eq!(store.idempotency_claim(&first).unwrap(), Claim::Inserted);
        assert_eq!(
            store.idempotency_claim(&retry).unwrap(),
            Claim::Existing(first.clone())
        );
        assert_eq!(
            store.idempotency_get(&tenant, "order-1").unwrap(),
            Some(first.clone())
        );
        // Keys belong to their tenant.
        let elsewhere = claim("globex", "order-1", 2, first.session_id, T0);
        assert_eq!(
            store.idempotency_claim(&elsewhere).unwrap(),
            Claim::Inserted
        );
        assert_eq!(
            store.idempotency_get(&tenant, "order-1").unwrap(),
            Some(first)
        );
    }

    #[test]
    fn create_session_writes_the_session_and_the_claim_together_or_neither() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = session(T0, 1);
        let key = claim("acme", "k", 1, s.session_id, T0);
        assert_eq!(
            store.create_session(&s, Some(&key)).unwrap(),
            Claim::Inserted
        );
        assert_eq!(store.session(&s.session_id).unwrap(), Some(s.clone()));

        // A retry made a new session id before asking; it must not be written.
        let retry = session(T0 + 3, 2);
        let retry_key = claim("acme", "k", 1, retry.session_id, T0 + 3);
        assert_eq!(
            store.create_session(&retry, Some(&retry_key)).unwrap(),
            Claim::Existing(key)
        );
        assert_eq!(store.session(&retry.session_id).unwrap(), None);

        // Without a key it is a plain insert.
        assert_eq!(store.create_session(&retry, None).unwrap(), Claim::Inserted);
        assert_eq!(store.sessions().unwrap(), vec![s, retry]);
    }

    #[test]
    fn expiry_removes_only_claims_older_than_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = session(T0, 1).session_id;
        let ttl = Duration::from_secs(24 * 3600);
        let ttl_ms = 24 * 3600 * 1000;
        let now = T0 + ttl_ms + 10_000;
        let old = claim("acme", "old", 1, id, T0);
        let edge = claim("acme", "edge", 1, id, now - ttl_ms);
        let fresh = claim("globex", "fresh", 1, id, now - 1);
        for c in [&old, &edge, &fresh] {
            assert_eq!(store.idempotency_claim(c).unwrap(), Claim::Inserted);
        }

        assert_eq!(
            store
                .expire_idempotency(Timestamp::from_millis(now), ttl)
                .unwrap(),
            1
        );
        let acme = TenantId::new("acme").unwrap();
        assert_eq!(store.idempotency_get(&acme, "old").unwrap(), None);
        assert_eq!(store.idempotency_get(&acme, "edge").unwrap(), Some(edge));
        let globex = TenantId::new("globex").unwrap();
        assert_eq!(
            store.idempotency_get(&globex, "fresh").unwrap(),
            Some(fresh)
        );
        // The expired key is free again, and a second sweep finds nothing more.
        assert_eq!(
            store
                .expire_idempotency(Timestamp::from_millis(now), ttl)
                .unwrap(),
            0
        );
        assert_eq!(store.idempotency_claim(&old).unwrap(), Claim::Inserted);
        // A clock earlier than the TTL removes nothing rather than wrapping around.
        assert_eq!(
            store
                .expire_idempotency(Timestamp::from_millis(5), ttl)
                .unwrap(),
            0
        );
    }

    #[test]
    fn audit_ranges_include_the_start_and_exclude_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Two sessions end in the same millisecond: both keys must survive.
        let ends = [T0 + 10_000, T0 + 20_000, T0 + 20_000, T0 + 30_000];
        let mut ids = Vec::new();
        for (i, end) in ends.iter().enumerate() {
            let s = session(T0, u128::try_from(i).unwrap());
            store.put_session(&s).unwrap();
            store
                .end_session(&s.session_id, Timestamp::from_millis(*end), EndReason::Idle)
                .unwrap()
                .unwrap();
            ids.push(s.session_id);
        }
        let ended = |from: Option<u64>, to: Option<u64>| -> Vec<u64> {
            store
                .audit(
                    from.map(Timestamp::from_millis),
                    to.map(Timestamp::from_millis),
                )
                .unwrap()
                .iter()
                .map(|r| r.ended_at.as_millis())
                .collect()
        };
        assert_eq!(ended(None, None), ends.to_vec());
        assert_eq!(
            ended(Some(T0 + 20_000), Some(T0 + 30_000)),
            [T0 + 20_000, T0 + 20_000]
        );
        assert_eq!(ended(Some(T0 + 20_001), Some(T0 + 30_001)), [T0 + 30_000]);
        assert_eq!(ended(None, Some(T0 + 20_000)), [T0 + 10_000]);
        assert_eq!(ended(Some(T0 + 30_000), None), [T0 + 30_000]);
        assert_eq!(
            ended(Some(T0 + 30_000), Some(T0 + 30_000)),
            Vec::<u64>::new()
        );
        assert_eq!(ended(Some(T0 + 40_000), Some(T0)), Vec::<u64>::new());
        let mut same_ms: Vec<SessionId> = store
            .audit(
                Some(Timestamp::from_millis(T0 + 20_000)),
                Some(Timestamp::from_millis(T0 + 20_001)),
            )
            .unwrap()
            .iter()
            .map(|r| r.session_id)
            .collect();
        same_ms.sort();
        assert_eq!(same_ms, ids[1..3].to_vec());
    }

    #[test]
    fn a_second_open_of_a_live_store_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::Locked { ref path } if path.as_path() == first.path()),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("broker.redb"), "{message}");
        assert!(message.contains("another broker"), "{message}");
        // A clone is the same store, not a second open.
        let clone = first.clone();
        drop(first);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked { .. })
        ));
        drop(clone);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_store_is_an_open_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), [0xA5_u8; 8192]).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }

    #[test]
    fn open_creates_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        Store::open(&nested).unwrap();
        assert!(nested.join(FILE_NAME).is_file());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::Schema { found, .. } if found == SCHEMA_VERSION + 1),
            "{err:?}"
        );
    }

    fn stored_node(name: &str, drain_deadline: Option<u64>) -> StoredNode {
        StoredNode {
            node_id: NodeId::new(name).unwrap(),
            drain_deadline: drain_deadline.map(Timestamp::from_millis),
            since: Timestamp::from_millis(T0),
        }
    }

    #[test]
    fn node_cordons_and_drains_round_trip_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cordoned = stored_node("gpu-a", None);
        let draining = stored_node("gpu-b", Some(T0 + 600_000));
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.nodes().unwrap(), vec![]);
            store.put_node(&draining).unwrap();
            store.put_node(&cordoned).unwrap();
            assert_eq!(
                store.node(&cordoned.node_id).unwrap(),
                Some(cordoned.clone())
            );
            assert_eq!(store.node(&NodeId::new("gpu-z").unwrap()).unwrap(), None);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.nodes().unwrap(),
            vec![cordoned.clone(), draining.clone()],
            "by node id"
        );
        // A later decision replaces the earlier one; an uncordon removes it, once.
        let finished = stored_node("gpu-b", Some(T0));
        store.put_node(&finished).unwrap();
        assert_eq!(store.node(&draining.node_id).unwrap(), Some(finished));
        assert!(store.remove_node(&cordoned.node_id).unwrap());
        assert!(!store.remove_node(&cordoned.node_id).unwrap());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.nodes().unwrap().len(), 1);
        assert_eq!(store.node(&cordoned.node_id).unwrap(), None);
    }

    #[test]
    fn a_file_from_before_the_nodes_table_opens_with_it_empty() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout of a store written before the table existed: the same schema
            // version, without `nodes`.
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(SESSIONS).unwrap();
            txn.open_table(IDEMPOTENCY).unwrap();
            txn.open_table(IDEMPOTENCY_BY_TIME).unwrap();
            txn.open_table(AUDIT).unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_VERSION_KEY, 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.nodes().unwrap(), vec![]);
        let node = stored_node("gpu-a", None);
        store.put_node(&node).unwrap();
        assert_eq!(store.nodes().unwrap(), vec![node]);
    }

    #[test]
    fn a_node_row_that_does_not_decode_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        write_raw(&store, NODES, "gpu-a", b"\xa1\x00");
        for err in [
            store.nodes().unwrap_err(),
            store.node(&NodeId::new("gpu-a").unwrap()).unwrap_err(),
        ] {
            assert!(
                matches!(err, StoreError::Decode { table: "nodes", ref key, .. } if key == "gpu-a"),
                "{err:?}"
            );
        }
    }

    /// Writes `bytes` as the value of `key` in `table`, behind the store's back.
    fn write_raw<K: redb::Key + 'static>(
        store: &Store,
        table: TableDefinition<'_, K, &[u8]>,
        key: K::SelfType<'_>,
        bytes: &[u8],
    ) {
        let txn = store.db.begin_write().unwrap();
        txn.open_table(table).unwrap().insert(key, bytes).unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn a_row_that_does_not_decode_is_an_error_naming_table_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = session(T0, 1);
        store.put_session(&good).unwrap();
        let bad = SessionId::new(Timestamp::from_millis(T0 + 1), 2);
        write_raw(&store, SESSIONS, session_key(&bad), b"\xff\x00garbage");

        let expect_decode = |err: StoreError| match err {
            StoreError::Decode { table, key, .. } => {
                assert_eq!(table, "sessions");
                assert_eq!(key, bad.to_string());
            }
            other => panic!("expected a decode error, got {other:?}"),
        };
        expect_decode(store.sessions().unwrap_err());
        expect_decode(store.session(&bad).unwrap_err());
        let err = store
            .end_session(&bad, Timestamp::from_millis(T0 + 9), EndReason::Error)
            .unwrap_err();
        assert!(err.to_string().contains("sessions"), "{err}");
        expect_decode(err);
        // The failed end changed nothing: the row is still there and nothing was billed.
        assert!(store.session(&bad).is_err());
        assert_eq!(store.audit(None, None).unwrap(), vec![]);
        assert_eq!(store.session(&good.session_id).unwrap(), Some(good));

        // The same holds for the other tables.
        write_raw(&store, AUDIT, (T0, session_key(&bad)), b"");
        assert!(matches!(
            store.audit(None, None).unwrap_err(),
            StoreError::Decode { table: "audit", .. }
        ));
        write_raw(&store, IDEMPOTENCY, ("acme", "k\n"), &[0x1f]);
        let err = store
            .idempotency_get(&TenantId::new("acme").unwrap(), "k\n")
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Decode { table: "idempotency", ref key, .. } if key == "acme/\"k\\n\""),
            "{err:?}"
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder() {
        let mut bytes = Vec::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..512 {
            bytes.clear();
            for _ in 0..len % 97 {
                // xorshift: deterministic noise without a dependency.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state.to_le_bytes()[0]);
            }
            let _ = decode::<StoredSession>(SESSIONS_NAME, &"k", &bytes);
            let _ = decode::<AuditRecord>(AUDIT_NAME, &"k", &bytes);
            let _ = decode::<IdempotencyRecord>(IDEMPOTENCY_NAME, &"k", &bytes);
            let _ = decode::<StoredNode>(NODES_NAME, &"k", &bytes);
        }
        // A valid encoding with a truncated tail is an error too.
        let full = encode(SESSIONS_NAME, &session(T0, 1)).unwrap();
        for cut in 0..full.len() {
            assert!(decode::<StoredSession>(SESSIONS_NAME, &"k", &full[..cut]).is_err());
        }
    }

    #[test]
    fn records_round_trip_through_the_encoding() {
        let s = session(T0, 1);
        let c = claim("acme", "k", 7, s.session_id, T0);
        let a =
            AuditRecord::from_session(&s, Timestamp::from_millis(T0 + 5_000), EndReason::NodeLost);
        let back: StoredSession =
            decode(SESSIONS_NAME, &"k", &encode(SESSIONS_NAME, &s).unwrap()).unwrap();
        assert_eq!(back, s);
        let back: IdempotencyRecord = decode(
            IDEMPOTENCY_NAME,
            &"k",
            &encode(IDEMPOTENCY_NAME, &c).unwrap(),
        )
        .unwrap();
        assert_eq!(back, c);
        let back: AuditRecord = decode(AUDIT_NAME, &"k", &encode(AUDIT_NAME, &a).unwrap()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn rows_missing_optional_fields_or_carrying_unknown_ones_still_decode() {
        use ciborium::Value;
        let mut s = session(T0, 1);
        s.expires_at = Some(Timestamp::from_millis(T0 + 60_000));
        let Value::Map(mut fields) =
            decode::<Value>(SESSIONS_NAME, &"k", &encode(SESSIONS_NAME, &s).unwrap()).unwrap()
        else {
            panic!("a record encodes as a map");
        };
        // An older broker's row lacks a field added since; a newer one's has a field this
        // build does not know.
        fields.retain(|(k, _)| k.as_text() != Some("expires_at"));
        fields.push((Value::from("added_later"), Value::from(42)));
        let row = encode(SESSIONS_NAME, &Value::Map(fields)).unwrap();
        let back: StoredSession = decode(SESSIONS_NAME, &"k", &row).unwrap();
        s.expires_at = None;
        assert_eq!(back, s);
    }
}
