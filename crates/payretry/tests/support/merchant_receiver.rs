//! A local HTTP server standing in for the merchant's webhook endpoint: it records every
//! request byte for byte, answers as told (a status, or hanging), and has each delivery
//! checked by the reference implementation of the Standard Webhooks specification (the
//! `standardwebhooks` package from PyPI), not by payretry's own signer.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
    /// Holds the request open this long, then answers 204 (the relay gives up before).
    Hang(Duration),
    /// Answers 204 after this long, within the relay's timeout.
    Slow(Duration),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub content_type: String,
    pub body: Vec<u8>,
    pub answer: Answer,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn accepted(&self) -> bool {
        match self.answer {
            Answer::Status(s) => (200..300).contains(&s),
            Answer::Slow(_) => true,
            Answer::Hang(_) => false,
        }
    }
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    /// Answers for the next requests, then `default`.
    next: Mutex<VecDeque<Answer>>,
    default: Mutex<Option<Answer>>,
    /// Requests whose answer was sent (a hanging one counts once it ends).
    answered: Mutex<usize>,
}

pub struct MerchantReceiver {
    shared: Arc<Shared>,
    pub url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for MerchantReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let answer = shared
        .next
        .lock()
        .unwrap()
        .pop_front()
        .or(*shared.default.lock().unwrap())
        .unwrap_or(Answer::Status(204));
    shared.received.lock().unwrap().push(Received {
        id: header(&headers, "webhook-id"),
        timestamp: header(&headers, "webhook-timestamp"),
        signature: header(&headers, "webhook-signature"),
        content_type: header(&headers, "content-type"),
        body: body.to_vec(),
        answer,
        at: Instant::now(),
    });
    let status = match answer {
        Answer::Status(status) => status,
        Answer::Hang(wait) | Answer::Slow(wait) => {
            tokio::time::sleep(wait).await;
            204
        }
    };
    *shared.answered.lock().unwrap() += 1;
    StatusCode::from_u16(status).unwrap()
}

impl MerchantReceiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/payretry", listener.local_addr().unwrap());
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/hooks/payretry", post(receive))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            shared,
            url,
            server,
        }
    }

    /// The next requests get these answers, in order.
    pub fn answer_next(&self, answers: impl IntoIterator<Item = Answer>) {
        self.shared.next.lock().unwrap().extend(answers);
    }

    /// Every request after the queued answers gets `answer` (204 until set).
    pub fn answer_always(&self, answer: Answer) {
        *self.shared.default.lock().unwrap() = Some(answer);
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Requests the receiver has answered (hanging ones only once their wait ended).
    pub fn answered(&self) -> usize {
        *self.shared.answered.lock().unwrap()
    }

    /// Waits (bounded) until `done` holds for what was received, and returns it.
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; received {:?}",
                received
                    .iter()
                    .map(|r| (r.id.clone(), r.answer))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until requests with `n` distinct webhook ids were accepted.
    pub async fn wait_for_accepted(&self, n: usize, within: Duration) -> Vec<Received> {
        self.wait_until(&format!("{n} events accepted"), within, |received| {
            distinct_accepted(received) >= n
        })
        .await
    }
}

/// How many distinct webhook ids were accepted.
pub fn distinct_accepted(received: &[Received]) -> usize {
    let ids: std::collections::HashSet<&str> = received
        .iter()
        .filter(|r| r.accepted())
        .map(|r| r.id.as_str())
        .collect();
    ids.len()
}

const VERIFY: &str = r#"
import base64, json, sys
from standardwebhooks.webhooks import Webhook
job = json.load(sys.stdin)
out = []
for secret in job["secrets"]:
    hook = Webhook(secret)
    for d in job["deliveries"]:
        headers = {"webhook-id": d["id"], "webhook-timestamp": d["timestamp"],
                   "webhook-signature": d["signature"]}
        out.append(hook.verify(base64.b64decode(d["body"]), headers))
json.dump(out, sys.stdout)
"#;

/// Verifies every delivery in `received` against each of `secrets` with the reference
/// library (it checks the signature and that the timestamp is within five minutes of now);
/// panics naming the first that does not verify. Returns the bodies as the library parsed
/// them.
pub fn verify_with_reference_library(received: &[Received], secrets: &[&str]) -> Vec<Value> {
    use base64::Engine as _;
    use std::io::Write as _;
    let job = json!({
        "secrets": secrets,
        "deliveries": received.iter().map(|r| json!({
            "id": r.id, "timestamp": r.timestamp, "signature": r.signature,
            "body": base64::engine::general_purpose::STANDARD.encode(&r.body),
        })).collect::<Vec<_>>(),
    });
    let mut child = std::process::Command::new(super::python::python())
        .args(["-c", VERIFY])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the standardwebhooks verifier");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "standardwebhooks refused a delivery: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the verifier's output")
}
