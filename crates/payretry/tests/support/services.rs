//! The real engines the scale-out tests need: a fresh PostgreSQL database per test, and
//! moto's SQS server. Both fail loudly when unavailable: these tests never skip.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database created for one test and dropped when this is dropped.
pub struct TempDatabase {
    pub url: String,
    name: String,
    server: String,
}

impl TempDatabase {
    pub async fn create() -> Self {
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
        let name = format!("payretry_t_{:016x}", rand::random::<u64>());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|error| panic!("CREATE DATABASE {name}: {error}"));
        let (base, _) = server
            .rsplit_once('/')
            .expect("a postgres URL with a database");
        Self {
            url: format!("{base}/{name}"),
            name,
            server,
        }
    }
}

impl TempDatabase {
    /// Drops the database now, connections and all, as an outage would take it away.
    pub fn drop_now(&self) {
        let status = Command::new("psql")
            .args([
                &self.server,
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .status()
            .expect("run psql");
        assert!(status.success(), "could not drop {}", self.name);
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        // Drop may run outside a runtime: use psql, which the PostgreSQL machines have.
        let _ = Command::new("psql")
            .args([
                &self.server,
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
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

/// moto's server through `scripts/moto_sqs.py`, which makes its message deletion
/// thread-safe (see that file: without it moto can lose an accepted message).
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
