//! `payretry demo`: the story of DESIGN.md §1 end to end on the embedded default, with
//! compressed delays (1 s, 2 s, 3 s) and a 15-second window, narrated step by step. It runs
//! the real server on a free port with a throw-away database and talks to it over HTTP,
//! pressing the sandbox checkout's buttons the way a buyer would.

use crate::app::{App, ServeRole, Tuning};
use crate::config::Config;
use crate::shutdown;
use anyhow::{Context, bail};
use payretry_domain::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

struct Demo {
    http: reqwest::Client,
    base: String,
    buyer: String,
    admin: String,
    started: Instant,
}

impl Demo {
    fn say(&self, text: &str) {
        println!("[{:>5.1}s] {text}", self.started.elapsed().as_secs_f64());
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value, bool)> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body, replayed))
    }

    async fn status(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .call(
                reqwest::Method::GET,
                &format!("/payments/checkout/{id}/status"),
                &self.buyer,
                None,
                None,
            )
            .await?
            .1)
    }

    async fn create(&self) -> anyhow::Result<Value> {
        let body = json!({"amount": 2500, "currency": "usd", "description": "Order 123"});
        let (status, created, _) = self
            .call(
                reqwest::Method::POST,
                "/payments/checkout",
                &self.buyer,
                None,
                Some(body),
            )
            .await?;
        if status != StatusCode::CREATED {
            bail!("checkout creation answered {status}: {created}");
        }
        Ok(created)
    }

    /// Presses a button on the sandbox checkout page.
    async fn press(
        &self,
        status: &Value,
        button: &str,
        reason: Option<&str>,
    ) -> anyhow::Result<()> {
        let checkout = status["providerSessionId"]
            .as_str()
            .context("no checkout")?;
        let mut request = self.http.post(format!(
            "{}/sandbox/checkout/{checkout}/{button}",
            self.base
        ));
        if let Some(reason) = reason {
            request = request.form(&[("reason", reason)]);
        }
        request.send().await?;
        Ok(())
    }

    async fn retry(&self, id: &str, key: &str) -> anyhow::Result<(StatusCode, Value, bool)> {
        self.call(
            reqwest::Method::POST,
            &format!("/payments/retry/{id}"),
            &self.buyer,
            Some(key),
            None,
        )
        .await
    }

    async fn wait_for(&self, id: &str, wanted: &str) -> anyhow::Result<Value> {
        for _ in 0..200 {
            let status = self.status(id).await?;
            if status["status"] == wanted {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("session {id} never became {wanted}")
    }

    async fn fail_and_retry(&self, id: &str, reason: &str, n: u32) -> anyhow::Result<Value> {
        let status = self.status(id).await?;
        self.press(&status, "decline", Some(reason)).await?;
        let failed = self.wait_for(id, "failed").await?;
        self.say(&format!(
            "  declined: failureReason={}, retries left {}",
            failed["failureReason"], failed["retryAttemptsRemaining"]
        ));
        let (code, body, _) = self.retry(id, &format!("demo-{id}-{n}")).await?;
        if code != StatusCode::ACCEPTED {
            bail!("retry {n} answered {code}: {body}");
        }
        self.say(&format!(
            "  retry #{} accepted (202): the new checkout is due in {}s",
            body["attemptNumber"], body["delaySeconds"]
        ));
        let open = self.wait_for(id, "open").await?;
        self.say(&format!(
            "  worker created checkout {} (same session {id})",
            open["providerSessionId"].as_str().unwrap_or("?")
        ));
        Ok(open)
    }
}

pub async fn run() -> anyhow::Result<()> {
    crate::telemetry::logs::init(crate::config::LogFormat::Text, "warn");
    let dir = std::env::temp_dir().join(format!("payretry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("demo.db");
    let config = Config::from_lookup(|name| match name {
        "PAYRETRY_DATABASE_URL" => Some(format!("sqlite://{}", db.display())),
        "PAYRETRY_RETRY_DELAYS" => Some("1s,2s,3s".to_owned()),
        "PAYRETRY_PAYMENT_WINDOW" => Some("15s".to_owned()),
        _ => None,
    })?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let mut tuning = Tuning::from_config(&config);
    tuning.sweep_interval = Duration::from_millis(500);
    let app = App::build(&config, base.clone(), tuning).await?;
    let jwt = app.state.jwt.clone();
    let (trigger, shutdown) = shutdown::channel();
    let server = tokio::spawn(app.serve(listener, ServeRole::All, shutdown));
    let demo = Demo {
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
        base: base.clone(),
        buyer: jwt.issue("buyer-42", Role::Buyer, 600),
        admin: jwt.issue("ops-1", Role::Admin, 600),
        started: Instant::now(),
    };
    demo.say(&format!("payretry is running at {base} (SQLite at {}, sandbox provider, delays 1s/2s/3s, window 15s)", db.display()));

    demo.say("1. A buyer starts paying 25.00 USD: POST /payments/checkout");
    let a = demo.create().await?;
    let a_id = a["sessionId"].as_str().context("sessionId")?.to_owned();
    demo.say(&format!(
        "  201: session {a_id}, status {}, checkout {}",
        a["status"],
        a["checkoutUrl"].as_str().unwrap_or("")
    ));

    demo.say("2. The bank declines (insufficient funds); the buyer presses Retry.");
    demo.fail_and_retry(&a_id, "insufficient_funds", 1).await?;
    let (code, _, replayed) = demo.retry(&a_id, &format!("demo-{a_id}-1")).await?;
    demo.say(&format!("  the same Idempotency-Key sent again: {code}, Idempotent-Replayed: {replayed} (no second attempt spent)"));

    demo.say("3. Declined again (generic decline); a second retry.");
    let open = demo.fail_and_retry(&a_id, "card_declined", 2).await?;
    demo.say("4. This time the buyer pays on the new checkout.");
    demo.press(&open, "pay", None).await?;
    let paid = demo.wait_for(&a_id, "succeeded").await?;
    demo.say(&format!(
        "  status {}, retries used {}",
        paid["status"], paid["retryAttempts"]
    ));
    let (code, body, _) = demo.retry(&a_id, "demo-after-success").await?;
    demo.say(&format!(
        "  a retry now is refused: {code} {}",
        body["code"]
    ));

    demo.say("5. A second buyer's card keeps failing: three retries, then the limit.");
    let b = demo.create().await?;
    let b_id = b["sessionId"].as_str().context("sessionId")?.to_owned();
    for n in 1..=3 {
        demo.fail_and_retry(&b_id, "do_not_honor", n).await?;
    }
    let status = demo.status(&b_id).await?;
    demo.press(&status, "decline", Some("insufficient_funds"))
        .await?;
    let exhausted = demo.wait_for(&b_id, "failed").await?;
    demo.say(&format!(
        "  after the third retry fails: retryAvailable={}, retryUnavailableReason={}",
        exhausted["retryAvailable"], exhausted["retryUnavailableReason"]
    ));
    let (code, body, _) = demo.retry(&b_id, "demo-b-4").await?;
    demo.say(&format!("  a fourth retry: {code} {}", body["code"]));

    demo.say("6. A third buyer waits until the window is almost over.");
    let c = demo.create().await?;
    let c_id = c["sessionId"].as_str().context("sessionId")?.to_owned();
    demo.press(&c, "decline", Some("card_declined")).await?;
    demo.wait_for(&c_id, "failed").await?;
    let expires_at: chrono::DateTime<chrono::Utc> =
        c["expiresAt"].as_str().context("expiresAt")?.parse()?;
    let until_late = (expires_at - chrono::Utc::now() - chrono::TimeDelta::milliseconds(600))
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(until_late).await;
    let (code, body, _) = demo.retry(&c_id, "demo-c-1").await?;
    demo.say(&format!(
        "  0.6 s before the window ends, a retry (due in 1 s) is refused: {code} {}",
        body["code"]
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let expired = demo.status(&c_id).await?;
    demo.say(&format!("  after the window: status {}", expired["status"]));

    demo.say(&format!(
        "7. Support reads the first session's audit log: GET /payments/checkout/{a_id}/audit"
    ));
    let (_, audit, _) = demo
        .call(
            reqwest::Method::GET,
            &format!("/payments/checkout/{a_id}/audit"),
            &demo.admin,
            None,
            None,
        )
        .await?;
    for entry in audit["entries"].as_array().into_iter().flatten() {
        demo.say(&format!(
            "  {:<20} attempt {} by {}",
            entry["action"].as_str().unwrap_or(""),
            entry["attemptNumber"],
            entry["actor"].as_str().unwrap_or("")
        ));
    }
    trigger.trigger();
    server.await??;
    let _ = std::fs::remove_dir_all(&dir);
    demo.say("Done.");
    Ok(())
}
