//! Wiring: builds storage, queue, provider and service from a [`Config`], then serves the
//! HTTP API and/or runs the worker and sweeper until shutdown. Takes its listener as an
//! argument, so tests bind port 0 and run the real server.

use crate::config::{Config, ProviderKind};
use crate::http::{self, AppState, auth::JwtKeys, rate_limit::RateLimiter};
use crate::provider::PaymentProvider;
use crate::provider::sandbox::SandboxProvider;
use crate::provider::stripe::{StripeConfig, StripeProvider};
use crate::queue::JobQueue;
use crate::secret::Secret;
use crate::service::Payments;
use crate::shutdown::Shutdown;
use crate::storage::Storage;
use crate::storage::sqlite::SqliteStorage;
use crate::sweeper::Sweeper;
use crate::telemetry::analytics::SegmentRelay;
use crate::worker::{Worker, WorkerSettings};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Which parts of payretry this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeRole {
    /// HTTP API, worker and sweeper in one process.
    All,
    /// HTTP API only.
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
}

impl Tuning {
    pub fn from_config(config: &Config) -> Self {
        Self {
            worker: WorkerSettings {
                max_receives: config.max_receives,
                concurrency: config.worker_concurrency,
                ..WorkerSettings::default()
            },
            sweep_interval: Duration::from_secs(30),
            stripe: None,
            analytics_backoff: Duration::from_secs(1),
        }
    }
}

/// A built payretry, ready to serve.
pub struct App {
    pub state: AppState,
    /// Set when Segment analytics are on.
    pub segment: Option<SegmentRelay>,
    pub queue: Arc<dyn JobQueue>,
    pub tuning: Tuning,
}

fn random_secret(prefix: &str) -> String {
    format!(
        "{prefix}{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    )
}

/// Opens the database and applies migrations.
pub async fn open_storage(config: &Config) -> anyhow::Result<Arc<SqliteStorage>> {
    let storage = SqliteStorage::connect(&config.database_url)
        .await
        .with_context(|| format!("opening {}", config.database_url))?;
    storage.migrate().await.context("applying migrations")?;
    Ok(Arc::new(storage))
}

/// The HS256 key: configured, or generated once and kept in the database.
pub async fn jwt_secret(config: &Config, storage: &dyn Storage) -> anyhow::Result<Secret> {
    match &config.jwt_secret {
        Some(secret) => Ok(secret.clone()),
        None => Ok(Secret::new(
            storage
                .service_secret("jwt_hs256", &|| random_secret(""))
                .await?,
        )),
    }
}

impl App {
    pub async fn build(
        config: &Config,
        public_url: String,
        tuning: Tuning,
    ) -> anyhow::Result<Self> {
        let storage = open_storage(config).await?;
        let jwt = jwt_secret(config, storage.as_ref()).await?;
        let webhook_secrets = if config.webhook_secrets.is_empty() {
            let generated = storage
                .service_secret("webhook_signing", &|| random_secret("whsec_"))
                .await?;
            vec![Secret::new(generated)]
        } else {
            config.webhook_secrets.clone()
        };
        let provider: Arc<dyn PaymentProvider> = match config.provider {
            ProviderKind::Sandbox => {
                Arc::new(SandboxProvider::new(storage.clone(), public_url.clone()))
            }
            ProviderKind::Stripe => {
                let key = config
                    .stripe_secret_key
                    .clone()
                    .context("STRIPE_SECRET_KEY is required")?;
                Arc::new(StripeProvider::new(StripeConfig::new(
                    config.stripe_api_base.clone(),
                    key,
                ))?)
            }
        };
        let payments = Arc::new(Payments {
            storage: storage.clone(),
            provider,
            policy: config.policy.clone(),
            public_url,
            analytics: config.segment_write_key.is_some(),
        });
        let state = AppState {
            payments,
            jwt: Arc::new(JwtKeys::new(&jwt)),
            webhook_secrets: Arc::new(webhook_secrets),
            prometheus: crate::telemetry::metrics::install(config.dogstatsd_addr.as_deref())?,
            limiter: Arc::new(RateLimiter::new(config.rate_limit_per_minute)),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        let segment = config
            .segment_write_key
            .clone()
            .map(|write_key| SegmentRelay {
                storage: storage.clone(),
                endpoint: config.segment_endpoint.clone(),
                write_key,
                http: state.http.clone(),
                backoff: tuning.analytics_backoff,
            });
        Ok(Self {
            state,
            segment,
            queue: storage,
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
            background.spawn(worker.run(shutdown.clone()));
            let sweeper = Sweeper {
                payments: self.state.payments.clone(),
                interval: self.tuning.sweep_interval,
            };
            background.spawn(sweeper.run(shutdown.clone()));
        }
        if role != ServeRole::Worker
            && let Some(relay) = self.segment
        {
            background.spawn(relay.run(shutdown.clone()));
        }
        let router = match role {
            ServeRole::Worker => http::operations_router(self.state),
            _ => http::router(self.state),
        };
        let mut stop = shutdown.clone();
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.wait().await })
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
