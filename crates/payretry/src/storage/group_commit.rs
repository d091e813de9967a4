//! SQLite's one writer, with group commit.
//!
//! A dedicated thread owns the write connection (rusqlite, synchronous: a whole transition
//! runs in one hand-off to the thread instead of one per statement through sqlx's worker).
//! Callers' work queues up while a commit is on disk; the thread then takes everything
//! waiting (up to [`MAX_BATCH`]) into one `BEGIN IMMEDIATE … COMMIT`, each caller's work
//! inside its own `SAVEPOINT`, so a lost compare-and-set or a taken idempotency key rolls
//! back only that caller's writes. Every caller is answered after the `COMMIT` that holds its
//! work returned — with WAL and `synchronous=FULL`, once it is durable — or with the error
//! if that commit failed. One fsync serves the whole batch.

use super::sql::{Arg, Columns, Write};
use super::{Committed, StorageError, StorageResult};
use rusqlite::Connection;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

/// The most callers one commit holds: enough to amortise the fsync over a burst, few enough
/// that the first caller of a batch never waits long for the last one's statements.
pub(crate) const MAX_BATCH: usize = 64;

/// How many callers may wait for the writer before a new one waits to be queued: the
/// back-pressure that keeps a burst from growing memory without bound.
const QUEUE: usize = 1024;

/// A caller's work on the write connection, run inside its savepoint.
trait Work: Send {
    /// Runs the work; `true` keeps its writes, `false` rolls its savepoint back.
    fn run(&mut self, conn: &Connection) -> bool;

    /// Answers the caller: `batch` is how the commit holding the work ended.
    fn answer(self: Box<Self>, batch: Result<(), &str>);
}

/// Work with a result for its caller.
struct Pending<T, F> {
    work: Option<F>,
    outcome: Option<(StorageResult<T>, bool)>,
    reply: oneshot::Sender<StorageResult<T>>,
}

impl<T, F> Work for Pending<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> StorageResult<(T, bool)> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let work = self.work.take().expect("work runs once");
        let outcome = match work(conn) {
            Ok((value, keep)) => (Ok(value), keep),
            Err(error) => (Err(error), false),
        };
        let keep = outcome.1;
        self.outcome = Some(outcome);
        keep
    }

    fn answer(self: Box<Self>, batch: Result<(), &str>) {
        let answer = match (self.outcome, batch) {
            // Kept writes count only once their commit is on disk.
            (Some((Ok(value), true)), Ok(())) => Ok(value),
            (Some((Ok(_), true)), Err(why)) | (None, Err(why)) => {
                Err(StorageError::Commit(why.to_owned()))
            }
            // Rolled back (or failed): its own outcome stands whatever became of the batch.
            (Some((outcome, _)), _) => outcome,
            (None, Ok(())) => Err(StorageError::Commit("the work was not run".into())),
        };
        // A caller that stopped waiting (its request was dropped) needs no answer.
        let _ = self.reply.send(answer);
    }
}

/// The handle callers submit work through; the thread stops when every handle is dropped.
pub(crate) struct GroupCommit {
    queue: mpsc::SyncSender<Box<dyn Work>>,
}

impl GroupCommit {
    /// Opens the write connection to the database file at `path` (WAL, `synchronous=FULL`,
    /// foreign keys on) and starts its thread.
    pub fn open(path: &Path) -> StorageResult<Self> {
        let conn = Connection::open(path).map_err(sqlite)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(sqlite)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(sqlite)?;
        conn.set_prepared_statement_cache_capacity(64);
        let (queue, waiting) = mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("payretry-sqlite-writer".into())
            .spawn(move || writer(&conn, &waiting))
            .map_err(|error| StorageError::Commit(format!("start the writer: {error}")))?;
        Ok(Self { queue })
    }

    /// Runs `work` in the next commit and answers once that commit is durable. `work`
    /// returns its result and whether to keep its writes (`false` rolls back its savepoint:
    /// a compare-and-set that lost writes nothing); an error rolls them back too.
    pub async fn run<T, F>(&self, work: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StorageResult<(T, bool)> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let pending = Box::new(Pending {
            work: Some(work),
            outcome: None,
            reply,
        });
        let stopped = || StorageError::Commit("the writer has stopped".into());
        match self.queue.try_send(pending) {
            Ok(()) => {}
            // A full queue: wait for room off the async threads.
            Err(mpsc::TrySendError::Full(pending)) => {
                let queue = self.queue.clone();
                tokio::task::spawn_blocking(move || queue.send(pending))
                    .await
                    .map_err(|error| StorageError::Commit(error.to_string()))?
                    .map_err(|_| stopped())?;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(stopped()),
        }
        answer
            .await
            .map_err(|_| StorageError::Commit("the writer dropped the work".into()))?
    }

    /// Runs `writes` as one caller's transition, in order (see [`apply`]).
    pub async fn write(&self, writes: Vec<Write>) -> StorageResult<Committed> {
        self.run(move |conn| {
            let committed = apply(conn, &writes)?;
            Ok((committed, committed == Committed::Applied))
        })
        .await
    }
}

/// The writer thread: takes what is waiting, commits it as one transaction, answers.
fn writer(conn: &Connection, waiting: &mpsc::Receiver<Box<dyn Work>>) {
    while let Ok(first) = waiting.recv() {
        // The crash tests pause here (`sleep(ms)`) so that the callers arriving meanwhile
        // surely share the next commit.
        fail::fail_point!("sqlite-group-commit-gather");
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match waiting.try_recv() {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
        let ended = commit(conn, &mut batch);
        if ended.is_err() {
            // Whatever the batch left open is undone; the connection is ready for the next.
            let _ = conn.execute_batch("ROLLBACK");
        }
        let ended = ended.as_ref().map(|_| ()).map_err(String::as_str);
        for work in batch {
            work.answer(ended);
        }
    }
}

/// Runs `batch` in one transaction, each work in its savepoint, and commits it.
fn commit(conn: &Connection, batch: &mut [Box<dyn Work>]) -> Result<(), String> {
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| e.to_string())?;
    for work in batch.iter_mut() {
        conn.execute_batch("SAVEPOINT work")
            .map_err(|e| e.to_string())?;
        // A work that panics is rolled back and answered with an error; the writer goes on.
        let keep = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.run(conn)))
            .unwrap_or(false);
        let end = if keep {
            "RELEASE work"
        } else {
            "ROLLBACK TO work; RELEASE work"
        };
        conn.execute_batch(end).map_err(|e| e.to_string())?;
    }
    // The crash tests kill the process inside a commit of several callers.
    if batch.len() > 1 {
        crate::crash_point!("sqlite-group-commit-before-commit");
    }
    conn.execute_batch("COMMIT").map_err(|e| e.to_string())?;
    if batch.len() > 1 {
        crate::crash_point!("sqlite-group-commit-after-commit");
    }
    Ok(())
}

/// Runs `writes` in order on `conn`; the first that touches no row and says
/// [`super::sql::IfNone::Stop`] or [`super::sql::IfNone::Fail`] ends them (the caller's savepoint is then rolled
/// back).
pub(crate) fn apply(conn: &Connection, writes: &[Write]) -> StorageResult<Committed> {
    for write in writes {
        if execute(conn, write)? == 0
            && let Some(outcome) = write.if_none.missed()?
        {
            return Ok(outcome);
        }
    }
    Ok(Committed::Applied)
}

/// Runs one `write` and answers how many rows it touched.
pub(crate) fn execute(conn: &Connection, write: &Write) -> StorageResult<usize> {
    let mut statement = conn.prepare_cached(write.sql).map_err(sqlite)?;
    bind(&mut statement, &write.args)?;
    statement.raw_execute().map_err(sqlite)
}

/// The rows a statement (a `RETURNING` write, or a read inside a caller's work) yields,
/// each through `decode`.
pub(crate) fn query<T>(
    conn: &Connection,
    sql: &'static str,
    args: &[Arg],
    decode: impl Fn(&WriterRow<'_, '_>) -> StorageResult<T>,
) -> StorageResult<Vec<T>> {
    let mut statement = conn.prepare_cached(sql).map_err(sqlite)?;
    bind(&mut statement, args)?;
    let mut rows = statement.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sqlite)? {
        out.push(decode(&WriterRow(row))?);
    }
    Ok(out)
}

/// A row read on the write connection, read by column name like the drivers' rows
/// ([`Columns`]), so [`super::rows`] decodes it too.
pub(crate) struct WriterRow<'s, 'r>(&'r rusqlite::Row<'s>);

impl Columns for WriterRow<'_, '_> {
    fn int(&self, column: &str) -> StorageResult<i64> {
        self.0.get(column).map_err(sqlite)
    }

    fn opt_int(&self, column: &str) -> StorageResult<Option<i64>> {
        self.0.get(column).map_err(sqlite)
    }

    fn text(&self, column: &str) -> StorageResult<String> {
        self.0.get(column).map_err(sqlite)
    }

    fn opt_text(&self, column: &str) -> StorageResult<Option<String>> {
        self.0.get(column).map_err(sqlite)
    }

    fn opt_bytes(&self, column: &str) -> StorageResult<Option<Vec<u8>>> {
        self.0.get(column).map_err(sqlite)
    }
}

/// Binds `args` to the statement's `$1`, `$2`, … by name, as PostgreSQL numbers them.
pub(crate) fn bind(statement: &mut rusqlite::Statement<'_>, args: &[Arg]) -> StorageResult<()> {
    for (n, arg) in args.iter().enumerate() {
        let name = format!("${}", n + 1);
        let bound = match arg {
            Arg::Int(value) => statement.raw_bind_parameter(name.as_str(), value),
            Arg::Text(value) => statement.raw_bind_parameter(name.as_str(), value),
            Arg::Bytes(value) => statement.raw_bind_parameter(name.as_str(), value),
        };
        bound.map_err(sqlite)?;
    }
    Ok(())
}

pub(crate) fn sqlite(error: rusqlite::Error) -> StorageError {
    StorageError::Sqlite(error.to_string())
}
