//! The real engines the tests need: a temporary database per test (SQLite or PostgreSQL),
//! and moto's SQS server. Both fail loudly when unavailable: these tests never skip.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Which engine holds a test's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    /// A temporary SQLite file.
    Sqlite,
    /// A fresh PostgreSQL database, dropped afterwards.
    Postgres,
}

/// A database of one test's own, gone when this is dropped: a SQLite file in a temporary
/// directory, or a database `payretry_t_<random>` created on the PostgreSQL server of
/// `PAYRETRY_TEST_POSTGRES_URL`. Empty: whoever opens it first migrates it. The one way the
/// tests get a database, for the storage suites and the app harness alike.
pub struct TempDatabase {
    /// The URL payretry connects to (`PAYRETRY_DATABASE_URL`).
    pub url: String,
    place: Place,
}

enum Place {
    Sqlite(tempfile::TempDir),
    Postgres { name: String, server: String },
}

impl TempDatabase {
    pub async fn create(database: Database) -> Self {
        match database {
            Database::Sqlite => Self::sqlite(),
            Database::Postgres => Self::postgres().await,
        }
    }

    /// A SQLite file (not yet created) in a fresh temporary directory.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        Self {
            url: format!("sqlite://{}", dir.path().join("payretry.db").display()),
            place: Place::Sqlite(dir),
        }
    }

    /// A new database on the test PostgreSQL server; fails loudly when it is unreachable.
    pub async fn postgres() -> Self {
        use sqlx::Connection;
        let server = std::env::var("PAYRETRY_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
        let mut admin = sqlx::PgConnection::connect(&server)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "PostgreSQL is not reachable at {server}: {error}\n\
                 These tests need a running PostgreSQL and never skip. Start it, or set \
                 PAYRETRY_TEST_POSTGRES_URL to a server where this user may CREATE DATABASE."
                )
            });
        let name = format!("payretry_t_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|error| panic!("CREATE DATABASE {name} on {server}: {error}"));
        let _ = admin.close().await;
        let (base, _) = server
            .rsplit_once('/')
            .expect("a postgres URL with a database");
        Self {
            url: format!("{base}/{name}"),
            place: Place::Postgres { name, server },
        }
    }

    pub fn engine(&self) -> Database {
        match self.place {
            Place::Sqlite(_) => Database::Sqlite,
            Place::Postgres { .. } => Database::Postgres,
        }
    }

    /// payretry's SQLite storage on this database, migrated.
    pub async fn sqlite_storage(&self) -> payretry::storage::sqlite::SqliteStorage {
        use payretry::storage::Storage;
        assert_eq!(self.engine(), Database::Sqlite, "not a SQLite database");
        let storage = payretry::storage::sqlite::SqliteStorage::connect(&self.url)
            .await
            .expect("open SQLite");
        storage.migrate().await.expect("migrate SQLite");
        storage
    }

    /// payretry's PostgreSQL storage on this database with a pool of `pool_size`, migrated.
    pub async fn postgres_storage(
        &self,
        pool_size: u32,
    ) -> payretry::storage::postgres::PostgresStorage {
        use payretry::storage::Storage;
        assert_eq!(
            self.engine(),
            Database::Postgres,
            "not a PostgreSQL database"
        );
        let storage = payretry::storage::postgres::PostgresStorage::connect(&self.url, pool_size)
            .await
            .expect("connect to the test database");
        storage.migrate().await.expect("migrate PostgreSQL");
        storage
    }

    /// Reads one number straight from the database, on a connection of its own.
    pub async fn count(&self, sql: &'static str) -> i64 {
        use sqlx::Connection;
        match self.engine() {
            Database::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("open the test database");
                let n = sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&mut conn)
                    .await
                    .expect(sql);
                let _ = conn.close().await;
                n
            }
            Database::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect to the test database");
                let n = sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&mut conn)
                    .await
                    .expect(sql);
                let _ = conn.close().await;
                n
            }
        }
    }

    /// Runs one statement straight on the database, on a connection of its own.
    pub async fn execute(&self, sql: &str) {
        use sqlx::Connection;
        let sql_text = || sqlx::AssertSqlSafe(sql.to_owned());
        match self.engine() {
            Database::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("open the test database");
                sqlx::query(sql_text()).execute(&mut conn).await.expect(sql);
                let _ = conn.close().await;
            }
            Database::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect to the test database");
                sqlx::query(sql_text()).execute(&mut conn).await.expect(sql);
                let _ = conn.close().await;
            }
        }
    }

    /// Drops the PostgreSQL database now, connections and all, as an outage would take it
    /// away.
    pub fn drop_now(&self) {
        let Place::Postgres { name, server } = &self.place else {
            panic!("drop_now is for PostgreSQL databases");
        };
        let status = drop_database(server, name, Stdio::inherit());
        assert!(status.success(), "could not drop {name}");
    }
}

/// `DROP DATABASE … WITH (FORCE)` through psql, which works outside a runtime too (in
/// `Drop`); FORCE, since the test's pools may still be connected.
fn drop_database(server: &str, name: &str, stderr: Stdio) -> std::process::ExitStatus {
    Command::new("psql")
        .args([
            server,
            "-q",
            "-c",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        ])
        .stdout(Stdio::null())
        .stderr(stderr)
        .status()
        .expect("run psql")
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        // A SQLite file goes with its directory.
        if let Place::Postgres { name, server } = &self.place {
            let _ = drop_database(server, name, Stdio::null());
        }
    }
}

struct Moto {
    endpoint: String,
    _child: Option<Child>,
}

/// moto's SQS server: `PAYRETRY_TEST_SQS_ENDPOINT` if set (scripts/test.sh starts one),
/// else a `moto_server` started for this test binary (from PATH or the venv that
/// scripts/test.sh creates). Also points the AWS credential chain at fake credentials.
pub fn sqs_endpoint() -> String {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        for (key, value) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
        ] {
            if std::env::var_os(key).is_none() {
                // SAFETY: set once, before any SQS client reads the environment.
                unsafe { std::env::set_var(key, value) };
            }
        }
        if let Ok(endpoint) = std::env::var("PAYRETRY_TEST_SQS_ENDPOINT") {
            wait_until_listening(&endpoint);
            return Moto {
                endpoint,
                _child: None,
            };
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = moto_command(port).spawn().expect("start moto's SQS server");
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_until_listening(&endpoint);
        Moto {
            endpoint,
            _child: Some(child),
        }
    })
    .endpoint
    .clone()
}

/// The Python that has moto (the venv scripts/test.sh creates, else the one on PATH).
fn moto_python() -> String {
    let venv = format!(
        "{}/.cache/payretry-venv/bin/python",
        std::env::var("HOME").unwrap_or_default()
    );
    let python = [venv.as_str(), "python3"].into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import moto.server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    });
    python.map(str::to_owned).unwrap_or_else(|| {
        panic!(
            "moto's SQS server is not available: set PAYRETRY_TEST_SQS_ENDPOINT, or install it \
             (scripts/test.sh does: python3 -m venv ~/.cache/payretry-venv && \
             ~/.cache/payretry-venv/bin/pip install 'moto[server]'). These tests never skip."
        )
    })
}

/// moto's server through `scripts/moto_sqs.py`, which makes its message deletion and
/// receipt thread-safe (see that file: without it moto can lose an accepted message, or
/// hand one message to two concurrent receivers).
fn moto_command(port: u16) -> Command {
    static PYTHON: OnceLock<String> = OnceLock::new();
    let python = PYTHON.get_or_init(moto_python);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/moto_sqs.py");
    let mut command = Command::new(python);
    command
        .arg(script)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

fn wait_until_listening(endpoint: &str) {
    let address = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(address).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the SQS server at {endpoint} is not answering");
}

/// A queue-name suffix unique to one test, so tests sharing a moto server never share queues.
pub fn unique_env() -> String {
    format!("t{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// A moto SQS server of one test's own, on a fixed port, that the test may stop and start
/// again (to play an SQS outage). moto keeps everything in memory: a restart loses the
/// queues. Stopped when dropped.
pub struct MotoServer {
    pub endpoint: String,
    port: u16,
    child: Option<Child>,
}

impl MotoServer {
    pub fn start() -> Self {
        // Also sets the fake AWS credentials the SQS client needs.
        sqs_endpoint();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            child: None,
        };
        server.restart();
        server
    }

    /// Kills the server: requests fail until [`MotoServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let address = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&address).is_ok() {
            assert!(Instant::now() < deadline, "moto at {address} did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a fresh (empty) server on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let child = moto_command(self.port)
            .spawn()
            .expect("start moto's SQS server");
        self.child = Some(child);
        wait_until_listening(&self.endpoint);
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
