//! Wiring: builds storage, queue, provider and service from a [`Config`], then serves the
//! HTTP API and/or runs the worker, sweeper and relays until shutdown. Takes its listener
//! as an argument, so tests bind port 0 and run the real server.

use crate::config::{Config, ProviderKind, QueueKind};
use crate::http::sandbox::SandboxPages;
use crate::http::{
    self, AppState, auth::JwtKeys, client_ip::TrustedProxies, rate_limit::RateLimiter,
};
use crate::merchant_events::relay::WebhookRelay;
use crate::provider::PaymentProvider;
use crate::provider::budget::{ScheduleStore, SharedBudget};
use crate::provider::sandbox::SandboxProvider;
use crate::provider::stripe::{StripeConfig, StripeProvider};
use crate::queue::relay::SqsRelay;
use crate::queue::sqs::{self, SqsQueue};
use crate::queue::{JobQueue, Outbox};
use crate::refund_runner::RefundRunner;
use crate::secret::Secret;
use crate::service::Payments;
use crate::shutdown::Shutdown;
use crate::storage::postgres::PostgresStorage;
use crate::storage::sqlite::SqliteStorage;
use crate::storage::{SecretStore, Storage};
use crate::sweeper::Sweeper;
use crate::telemetry::analytics::SegmentRelay;
use crate::worker::{Worker, WorkerSettings};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Merchant webhook tries in flight per process: a receiver that hangs until the timeout
/// still gets 1.6 tries a second from each.
const WEBHOOK_CONCURRENCY: usize = 16;

/// Which parts of payretry this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeRole {
    /// HTTP API, outbox relays, worker and sweeper in one process.
    All,
    /// HTTP API and the outbox relays (SQS, Segment, merchant webhooks).
    Api,
    /// Queue consumer and window sweeper (plus health and metrics routes).
    Worker,
}

/// Timings that are not part of the public configuration.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub worker: WorkerSettings,
    /// Longest the sweeper sleeps between sweeps.
    pub sweep_interval: Duration,
    /// Replaces the Stripe client settings derived from the configuration (timeouts,
    /// tries), e.g. to run against a local stand-in at test speed.
    pub stripe: Option<StripeConfig>,
    /// First delay after a failed Segment delivery.
    pub analytics_backoff: Duration,
    /// PostgreSQL pool size (throughput on 2 cores falls beyond ~16 connections).
    pub postgres_connections: u32,
    /// The HTTP server's header timeout, keep-alive idle time and connection cap.
    pub http: http::server::Limits,
}

impl Tuning {
    pub fn from_config(config: &Config) -> Self {
        Self {
            worker: WorkerSettings {
                max_receives: config.max_receives,
                concurrency: config.worker_concurrency,
                lease: config.job_lease,
                ..WorkerSettings::default()
            },
            sweep_interval: Duration::from_secs(30),
            stripe: None,
            analytics_backoff: Duration::from_secs(1),
            postgres_connections: 16,
            http: http::server::Limits::default(),
        }
    }
}

/// The database, seen through each of its roles.
#[derive(Clone)]
pub struct Backend {
    pub storage: Arc<dyn Storage>,
    /// The embedded queue (the outbox table itself).
    pub embedded_queue: Arc<dyn JobQueue>,
    pub outbox: Arc<dyn Outbox>,
    /// Where the provider budget of a deployment of several processes is kept (PostgreSQL);
    /// `None`: the process paces itself (SQLite, the embedded default: one process).
    pub shared_schedule: Option<Arc<dyn ScheduleStore>>,
}

/// Opens the database named by `PAYRETRY_DATABASE_URL` and applies migrations.
pub async fn open_backend(config: &Config, postgres_connections: u32) -> anyhow::Result<Backend> {
    let url = &config.database_url;
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let pg = PostgresStorage::connect(url, postgres_connections)
            .await
            .context("PAYRETRY_DATABASE_URL: cannot connect to PostgreSQL")?;
        pg.migrate().await.context("applying migrations")?;
        let pg = Arc::new(pg);
        Ok(Backend {
            storage: pg.clone(),
            embedded_queue: pg.clone(),
            outbox: pg.clone(),
            shared_schedule: Some(pg),
        })
    } else {
        let lite = SqliteStorage::connect(url)
            .await
            .with_context(|| format!("PAYRETRY_DATABASE_URL: cannot open {url}"))?;
        lite.migrate().await.context("applying migrations")?;
        let lite = Arc::new(lite);
        Ok(Backend {
            storage: lite.clone(),
            embedded_queue: lite.clone(),
            outbox: lite,
            shared_schedule: None,
        })
    }
}

/// Opens the database (for commands that need only storage).
pub async fn open_storage(config: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    Ok(open_backend(config, 4).await?.storage)
}

fn random_secret(prefix: &str) -> String {
    format!(
        "{prefix}{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    )
}

/// The HS256 key: configured, or generated once and kept in the database.
pub async fn jwt_secret(config: &Config, storage: &dyn SecretStore) -> anyhow::Result<Secret> {
    match &config.jwt_secret {
        Some(secret) => Ok(secret.clone()),
        None => Ok(Secret::new(
            storage
                .service_secret("jwt_hs256", &|| random_secret(""))
                .await?,
        )),
    }
}

/// A built payretry, ready to serve.
pub struct App {
    pub state: AppState,
    /// Set when Segment analytics are on.
    pub segment: Option<SegmentRelay>,
    /// Set when merchant events are on.
    pub merchant_webhooks: Option<WebhookRelay>,
    /// What the worker consumes: the embedded queue or SQS.
    pub queue: Arc<dyn JobQueue>,
    /// With SQS: the queue (for its dead-letter queue) and the outbox its relay drains.
    pub sqs: Option<(Arc<SqsQueue>, Arc<dyn Outbox>)>,
    pub tuning: Tuning,
}

impl App {
    pub async fn build(
        config: &Config,
        public_url: String,
        tuning: Tuning,
    ) -> anyhow::Result<Self> {
        let backend = open_backend(config, tuning.postgres_connections).await?;
        let storage = backend.storage.clone();
        let jwt = jwt_secret(config, storage.as_ref()).await?;
        let webhook_secrets = if config.webhook_secrets.is_empty() {
            let generated = storage
                .service_secret("webhook_signing", &|| random_secret("whsec_"))
                .await?;
            vec![Secret::new(generated)]
        } else {
            config.webhook_secrets.clone()
        };
        let http_client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut sandbox_pages = None;
        let provider: Arc<dyn PaymentProvider> = match config.provider {
            ProviderKind::Sandbox => {
                let id_key = storage
                    .service_secret(SandboxProvider::ID_KEY_NAME, &|| random_secret(""))
                    .await?;
                sandbox_pages = Some(Arc::new(SandboxPages {
                    checkouts: storage.clone(),
                    signing_secret: webhook_secrets[0].clone(),
                    public_url: public_url.clone(),
                    http: http_client.clone(),
                }));
                Arc::new(SandboxProvider::new(
                    storage.clone(),
                    public_url.clone(),
                    Secret::new(id_key),
                ))
            }
            ProviderKind::Stripe => {
                let mut stripe = match &tuning.stripe {
                    Some(stripe) => stripe.clone(),
                    None => {
                        let key = config
                            .stripe_secret_key
                            .clone()
                            .context("STRIPE_SECRET_KEY is required")?;
                        StripeConfig::new(config.stripe_api_base.clone(), key)
                    }
                };
                if let Some(max_rps) = config.provider_max_rps {
                    stripe.max_rps = max_rps;
                }
                let rate = f64::from(stripe.max_rps.max(1));
                let provider = StripeProvider::new(stripe)?;
                Arc::new(match &backend.shared_schedule {
                    Some(store) => provider.with_budget(Arc::new(SharedBudget::new(
                        store.clone(),
                        "stripe",
                        rate,
                    ))),
                    None => provider,
                })
            }
        };
        let (queue, sqs): (Arc<dyn JobQueue>, _) = match config.queue {
            QueueKind::Embedded => (backend.embedded_queue.clone(), None),
            QueueKind::Sqs => {
                let client = sqs::client(config.sqs_endpoint.as_deref()).await;
                let sqs = Arc::new(
                    SqsQueue::connect(client, &config.env)
                        .await
                        .context("PAYRETRY_QUEUE=sqs")?,
                );
                (
                    sqs.clone() as Arc<dyn JobQueue>,
                    Some((sqs, backend.outbox.clone())),
                )
            }
        };
        let payments = Arc::new(Payments {
            storage: storage.clone(),
            provider,
            policy: config.policy.clone(),
            public_url,
            analytics: config.segment_write_key.is_some(),
            merchant_events: config.merchant_webhook.is_some(),
            auto_refund_duplicates: config.auto_refund_duplicates,
            stripe_charge_limits: config.provider == ProviderKind::Stripe,
        });
        let state = AppState {
            payments,
            queue: queue.clone(),
            jwt: Arc::new(JwtKeys::new(&jwt)),
            webhook_secrets: Arc::new(webhook_secrets),
            sandbox: sandbox_pages,
            prometheus: crate::telemetry::metrics::install(config.dogstatsd_addr.as_deref())?,
            limiter: Arc::new(RateLimiter::new(config.rate_limit_per_minute)),
            trusted_proxies: Arc::new(TrustedProxies::new(config.trusted_proxies.clone())),
        };
        let segment = config
            .segment_write_key
            .clone()
            .map(|write_key| SegmentRelay {
                outbox: storage.clone(),
                endpoint: config.segment_endpoint.clone(),
                write_key,
                http: http_client,
                backoff: tuning.analytics_backoff,
            });
        let merchant_webhooks = match &config.merchant_webhook {
            Some(endpoint) => Some(WebhookRelay {
                outbox: storage.clone(),
                http: WebhookRelay::client(endpoint)?,
                endpoint: Arc::new(endpoint.clone()),
                concurrency: WEBHOOK_CONCURRENCY,
            }),
            None => None,
        };
        Ok(Self {
            state,
            segment,
            merchant_webhooks,
            queue,
            sqs,
            tuning,
        })
    }

    /// Serves until `shutdown`; in-flight requests and jobs are allowed to finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        role: ServeRole,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let mut background = tokio::task::JoinSet::new();
        if role != ServeRole::Api {
            let worker = Arc::new(Worker::new(
                self.state.payments.clone(),
                self.queue.clone(),
                self.tuning.worker.clone(),
            ));
            if let Some((sqs, _)) = &self.sqs {
                background.spawn(
                    worker
                        .clone()
                        .drain_sqs_dead_letters(sqs.clone(), shutdown.clone()),
                );
            }
            background.spawn(worker.run(shutdown.clone()));
            let sweeper = Sweeper {
                payments: self.state.payments.clone(),
                interval: self.tuning.sweep_interval,
            };
            background.spawn(sweeper.run(shutdown.clone()));
        }
        // Every role: the webhooks that owe refunds land on the API, and any process finds
        // the owed refunds a crashed one left (each call is claimed, so none is made twice).
        let refunds = RefundRunner {
            payments: self.state.payments.clone(),
            interval: self.tuning.sweep_interval,
        };
        background.spawn(refunds.run(shutdown.clone()));
        if role != ServeRole::Worker {
            if let Some(relay) = self.segment {
                background.spawn(relay.run(shutdown.clone()));
            }
            if let Some(relay) = self.merchant_webhooks {
                background.spawn(relay.run(shutdown.clone()));
            }
            if let Some((sqs, outbox)) = &self.sqs {
                let relay = SqsRelay {
                    outbox: outbox.clone(),
                    sqs: sqs.clone(),
                    lease: self.tuning.worker.lease,
                };
                background.spawn(relay.run(shutdown.clone()));
            }
        }
        let router = match role {
            ServeRole::Worker => http::operations_router(self.state),
            _ => http::router(self.state),
        };
        http::server::serve(listener, router, self.tuning.http.clone(), shutdown)
            .await
            .context("HTTP server")?;
        while background.join_next().await.is_some() {}
        Ok(())
    }
}

/// `PAYRETRY_PUBLIC_URL`, or `http://{the address actually bound}`.
pub fn public_url(config: &Config, listener: &TcpListener) -> anyhow::Result<String> {
    match &config.public_url {
        Some(url) => Ok(url.clone()),
        None => Ok(format!("http://{}", listener.local_addr()?)),
    }
}
