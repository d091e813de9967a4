//! Connections an outsider holds or malforms: a head trickled a byte a second is answered
//! 408 and closed, an idle keep-alive connection is closed, idle connections beyond the cap
//! do not keep `/healthz` from answering, the parser's refusals are problem+json, and a
//! JSON route refuses a body that is not JSON with 415.

use crate::support::app::{Options, TestApp, WEBHOOK_SECRET, assert_problem};
use payretry::http::server::Limits;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any single step here may take before the test fails instead of hanging.
const BOUND: Duration = Duration::from_secs(30);

fn shortened(header_read_timeout: Duration, keep_alive_idle: Duration) -> Options {
    Options {
        http: Limits {
            header_read_timeout,
            keep_alive_idle,
            max_connections: None,
        },
        ..Options::default()
    }
}

async fn connect(app: &TestApp) -> TcpStream {
    let address = app.base.trim_start_matches("http://");
    TcpStream::connect(address).await.expect("connect")
}

/// One response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a problem+json answer with `status` and `code`.
    fn assert_problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let body: Value = serde_json::from_slice(&self.body).expect("problem body");
        assert_eq!(body["code"], code, "{body}");
        assert_eq!(body["status"], status, "{body}");
        assert!(body["title"].is_string() && body["detail"].is_string());
        body
    }
}

/// Reads one response (head and `Content-Length` body); `None` if the server closed the
/// connection without one. Bytes past it (a pipelined answer) stay in `pending`.
async fn read_pipelined(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Option<RawResponse> {
    let head_end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            assert!(pending.is_empty(), "connection closed mid-response");
            return None;
        }
        pending.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(pending[..head_end].to_vec()).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while pending.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "connection closed mid-body");
        pending.extend_from_slice(&chunk[..n]);
    }
    let body = pending[head_end..head_end + length].to_vec();
    pending.drain(..head_end + length);
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

/// [`read_pipelined`] when only one answer is expected before the next request.
async fn read_response(stream: &mut TcpStream) -> Option<RawResponse> {
    let mut pending = Vec::new();
    let response = read_pipelined(stream, &mut pending).await;
    assert!(pending.is_empty(), "unexpected bytes after the response");
    response
}

/// Waits (within [`BOUND`]) for the server to close `stream`; true if it did, having
/// sent nothing more.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 1024];
    match tokio::time::timeout(BOUND, stream.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// Sends `head` whole and reads the one answer.
async fn exchange(app: &TestApp, head: &[u8]) -> RawResponse {
    let mut stream = connect(app).await;
    stream.write_all(head).await.expect("write");
    tokio::time::timeout(BOUND, read_response(&mut stream))
        .await
        .expect("an answer in time")
        .expect("an answer, not a bare close")
}

#[tokio::test]
async fn a_head_sent_a_byte_a_second_is_answered_408_and_closed_after_ten_seconds() {
    let app = TestApp::spawn().await;
    let mut stream = connect(&app).await;
    let started = Instant::now();
    let (mut reader, mut writer) = stream.split();
    let trickle = async {
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let answer = async {
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return received,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let received = tokio::time::timeout(BOUND, async {
        tokio::select! {
            received = answer => received,
            () = trickle => panic!("the trickle never ended"),
        }
    })
    .await
    .expect("the server closes a trickled head");
    let elapsed = started.elapsed();
    // 10 s header timeout; generous bounds for a busy machine.
    assert!(
        elapsed >= Duration::from_secs(9) && elapsed < Duration::from_secs(25),
        "closed after {elapsed:?}"
    );
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(
        text.contains("content-type: application/problem+json"),
        "{text}"
    );
    assert!(text.contains(r#""code":"request_timeout""#), "{text}");
}

#[tokio::test]
async fn the_header_timeout_applies_to_each_request_on_a_keep_alive_connection() {
    let app = TestApp::spawn_with(shortened(Duration::from_secs(1), Duration::from_secs(60))).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut stream).await.expect("first answer");
    assert_eq!(first.status, 200);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Never-Fin")
        .await
        .unwrap();
    let second = tokio::time::timeout(BOUND, read_response(&mut stream))
        .await
        .expect("answered in time")
        .expect("a 408, not a bare close");
    second.assert_problem(408, "request_timeout");
    assert_eq!(second.header("connection"), Some("close"));
    assert!(closed_by_server(&mut stream).await);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let app = TestApp::spawn_with(shortened(Duration::from_secs(10), Duration::from_secs(1))).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut stream).await.expect("answer");
    assert_eq!(first.status, 200);
    assert_ne!(first.header("connection"), Some("close"));
    let started = Instant::now();
    assert!(
        closed_by_server(&mut stream).await,
        "an idle connection stays open"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let app = TestApp::spawn_with(shortened(Duration::from_secs(1), Duration::from_secs(60))).await;
    let mut stream = connect(&app).await;
    assert!(closed_by_server(&mut stream).await);
}

#[tokio::test]
async fn healthz_answers_while_more_idle_connections_than_the_cap_are_open() {
    const CAP: usize = 8;
    let app = TestApp::spawn_with(Options {
        http: Limits {
            max_connections: Some(CAP),
            ..Limits::default()
        },
        ..Options::default()
    })
    .await;
    let mut idle = Vec::new();
    for i in 0..(5 * CAP) {
        let mut stream = connect(&app).await;
        if i % 2 == 0 {
            // A slowloris mid-head; the others send nothing at all.
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHo")
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let response = client
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(response.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    // Most of the idle connections were closed to make room (a mid-head one with 503).
    let mut closed = 0;
    for stream in &mut idle {
        let mut chunk = [0u8; 1024];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut chunk)).await
        {
            let answer = String::from_utf8_lossy(&chunk[..n]);
            assert!(n == 0 || answer.starts_with("HTTP/1.1 503 "), "{answer}");
            closed += 1;
        }
    }
    assert!(
        closed >= 4 * CAP - 1,
        "only {closed} idle connections closed"
    );
}

#[tokio::test]
async fn the_parsers_refusals_are_problem_json() {
    let app = TestApp::spawn().await;

    let control = exchange(
        &app,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
    )
    .await;
    control.assert_problem(400, "invalid_request");

    let name = exchange(
        &app,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX Bad: v\r\n\r\n",
    )
    .await;
    name.assert_problem(400, "invalid_request");

    let duplicate = exchange(
        &app,
        b"POST /payments/checkout HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    duplicate.assert_problem(400, "invalid_request");

    let smuggled = exchange(
        &app,
        b"POST /payments/checkout HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    smuggled.assert_problem(400, "invalid_request");

    let mut many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..101 {
        many.extend_from_slice(format!("X-Header-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    exchange(&app, &many)
        .await
        .assert_problem(431, "headers_too_large");

    let mut huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    huge.extend_from_slice(format!("X-Huge: {}\r\n\r\n", "v".repeat(40 * 1024)).as_bytes());
    exchange(&app, &huge)
        .await
        .assert_problem(431, "headers_too_large");

    let binary = exchange(
        &app,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    )
    .await;
    binary.assert_problem(400, "invalid_request");

    // Well-formed requests still pass, also several on one connection.
    let mut stream = connect(&app).await;
    stream
        .write_all(
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd\
              GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
    let mut pending = Vec::new();
    let first = read_pipelined(&mut stream, &mut pending)
        .await
        .expect("first");
    first.assert_problem(405, "method_not_allowed");
    let second = read_pipelined(&mut stream, &mut pending)
        .await
        .expect("second");
    assert_eq!(second.status, 200);
}

async fn sessions(app: &TestApp) -> i64 {
    app.count("SELECT COUNT(*) FROM payment_sessions").await
}

#[tokio::test]
async fn a_checkout_body_that_is_not_json_is_refused_415_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let body = json!({"amount": 2500, "currency": "usd"}).to_string();
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut request = app
            .http
            .post(app.url("/payments/checkout"))
            .bearer_auth(app.buyer())
            .body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_problem(response, 415, "unsupported_media_type").await;
    }
    assert_eq!(sessions(&app).await, 0);

    for content_type in ["application/json; charset=utf-8", "Application/JSON"] {
        let response = app
            .http
            .post(app.url("/payments/checkout"))
            .bearer_auth(app.buyer())
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{content_type}");
    }
    assert_eq!(sessions(&app).await, 2);
}

#[tokio::test]
async fn the_webhook_takes_json_with_a_charset_and_refuses_other_bodies_415() {
    let app = TestApp::spawn().await;
    let event = json!({"id": "evt_charset", "object": "event", "type": "customer.created",
        "data": {"object": {}}});
    let body = serde_json::to_vec(&event).unwrap();
    let post = |content_type: &'static str| {
        let signature = payretry::provider::signature::sign(
            &body,
            WEBHOOK_SECRET,
            chrono::Utc::now().timestamp(),
        );
        app.http
            .post(app.url("/webhooks/stripe"))
            .header("Stripe-Signature", signature)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
    };
    let stripe = post("application/json; charset=utf-8").await.unwrap();
    assert_eq!(stripe.status(), 200);
    let plain = post("text/plain").await.unwrap();
    assert_problem(plain, 415, "unsupported_media_type").await;
}

#[tokio::test]
async fn the_sandbox_decline_form_refuses_another_media_type_as_problem_json() {
    let app = TestApp::spawn().await;
    let session = app.create_checkout(&app.buyer()).await;
    let checkout = session["providerSessionId"].as_str().expect("checkout id");
    let response = app
        .http
        .post(app.url(&format!("/sandbox/checkout/{checkout}/decline")))
        .header("content-type", "text/plain")
        .body("reason=insufficient_funds")
        .send()
        .await
        .unwrap();
    assert_problem(response, 415, "unsupported_media_type").await;
    let status = app
        .status(&app.admin(), session["sessionId"].as_str().unwrap())
        .await;
    assert_eq!(status["status"], session["status"]);
}

#[tokio::test]
async fn a_newcomer_is_answered_503_when_every_connection_is_inside_a_request() {
    const CAP: usize = 4;
    let app = TestApp::spawn_with(Options {
        http: Limits {
            max_connections: Some(CAP),
            ..Limits::default()
        },
        ..Options::default()
    })
    .await;
    let mut busy = Vec::new();
    for _ in 0..CAP {
        let mut stream = connect(&app).await;
        // `Expect: 100-continue` makes the server say when the handler starts reading.
        stream
            .write_all(
                b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                  Expect: 100-continue\r\nContent-Length: 100\r\n\r\n",
            )
            .await
            .unwrap();
        let mut pending = Vec::new();
        let go_on = tokio::time::timeout(BOUND, read_pipelined(&mut stream, &mut pending))
            .await
            .expect("100 Continue in time")
            .expect("100 Continue");
        assert_eq!(go_on.status, 100);
        busy.push(stream);
    }
    let newcomer = exchange(&app, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    newcomer.assert_problem(503, "unavailable");
    assert_eq!(newcomer.header("retry-after"), Some("1"));

    // Once a request ends, its connection is idle and room is made again.
    drop(busy);
    let mut answered = false;
    for _ in 0..100 {
        let response = exchange(&app, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if response.status == 200 {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        answered,
        "/healthz never answered after the busy connections closed"
    );
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_408_and_creates_nothing() {
    // Arrange: a complete head that promises 100 bytes of body, then only 10 of them.
    let app = TestApp::spawn().await;
    let token = app.buyer();
    let head = format!(
        "POST /payments/checkout HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"amount\":"
    );
    let mut stream = connect(&app).await;
    let started = Instant::now();
    stream.write_all(head.as_bytes()).await.expect("write");

    // Act: wait for the server's answer while sending nothing more.
    let response = tokio::time::timeout(BOUND, read_response(&mut stream))
        .await
        .expect("an answer in time")
        .expect("an answer, not a bare close");

    // Assert
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(9) && elapsed < Duration::from_secs(25),
        "answered after {elapsed:?}"
    );
    response.assert_problem(408, "request_timeout");
    assert_eq!(sessions(&app).await, 0);
}
