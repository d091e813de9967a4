//! 413 and 431: bodies over 64 KiB (also chunked) and oversized headers are refused and write nothing.

use super::*;

const MAX_BODY: usize = 64 * 1024;

fn padded_checkout_body(total_len: usize) -> Vec<u8> {
    let mut body = br#"{"amount": 2500, "currency": "usd"}"#.to_vec();
    body.resize(total_len, b' ');
    body
}

#[tokio::test]
async fn headers_over_16_kib_are_431_and_write_nothing() {
    let app = TestApp::spawn().await;
    let baseline = writes(&app).await;

    let response = app
        .http
        .post(app.url("/payments/checkout"))
        .bearer_auth(app.buyer())
        .header("X-Padding", "p".repeat(20 * 1024))
        .json(&json!({"amount": 2500, "currency": "usd"}))
        .send()
        .await
        .unwrap();

    assert_problem(response, 431, "headers_too_large").await;
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn body_over_64_kib_is_413_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    let baseline = writes(&app).await;

    let checkout = post_raw(
        &app,
        "/payments/checkout",
        Some(&buyer),
        Some("big"),
        padded_checkout_body(MAX_BODY + 1),
    )
    .await;
    let retry = post_raw(
        &app,
        &format!("/payments/retry/{id}"),
        Some(&buyer),
        Some("big"),
        vec![b' '; 200 * 1024],
    )
    .await;

    assert_problem(checkout, 413, "payload_too_large").await;
    assert_problem(retry, 413, "payload_too_large").await;
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn body_of_exactly_64_kib_is_accepted() {
    let app = TestApp::spawn().await;

    let response = post_raw(
        &app,
        "/payments/checkout",
        Some(&app.buyer()),
        None,
        padded_checkout_body(MAX_BODY),
    )
    .await;

    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn chunked_body_over_64_kib_without_content_length_is_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    let baseline = writes(&app).await;
    let body = padded_checkout_body(MAX_BODY + 1024);
    let mut request = format!(
        "POST /payments/checkout HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        app.buyer()
    )
    .into_bytes();
    for chunk in body.chunks(8 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");

    let mut stream = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    // The server may answer and close before reading everything.
    let _ = stream.write_all(&request).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;

    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"code\":\"payload_too_large\""),
        "{answer}"
    );
    assert_eq!(writes(&app).await, baseline);
}
