//! Wiring, start and graceful shutdown.
//!
//! [`Server::start`] opens the backends, binds the listeners of the roles
//! this process runs and spawns the background tasks. [`Server::stop`] stops
//! accepting, closes WebSockets with 1001, waits for in-flight work up to
//! `shutdown.grace_period`, then closes the mailbox, which finishes its
//! in-flight commits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState, OriginPolicy};
use crate::auth::Verifier;
use crate::bus::DeliveryBus;
use crate::bus::memory::MemoryBus;
use crate::bus::nats::NatsBus;
use crate::config::{BusKind, Config, PresenceKind, Role, StoreKind};
use crate::listener::LimitedListener;
use crate::mailbox::embedded::EmbeddedMailbox;
use crate::mailbox::postgres::{PostgresMailbox, PostgresPoolSettings};
use crate::mailbox::{Mailbox, MailboxSettings};
use crate::presence::memory::MemoryPresence;
use crate::presence::redis::RedisPresence;
use crate::presence::{InstanceId, Presence};
use crate::realtime::{self, Hub, RealtimeState};
use crate::router::Router;
use crate::telemetry;

/// How often rate-limit state of idle users is dropped.
const LIMITER_CLEANUP_INTERVAL: Duration = Duration::from_secs(60);
/// Connections the WebSocket port accepts beyond `websocket.max_connections`,
/// so requests over the limit get 503 instead of waiting unseen.
const UPGRADE_SLACK_CONNECTIONS: usize = 256;
/// The maximum pause between two TTL sweeps.
const MAX_EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

/// A running server.
pub struct Server {
    /// The HTTP API's bound address, when this process runs the `api` role.
    pub api_addr: Option<SocketAddr>,
    /// The WebSocket server's bound address, when it runs the `websocket` role.
    pub websocket_addr: Option<SocketAddr>,
    /// This process's instance id.
    pub instance_id: InstanceId,
    shutdown: CancellationToken,
    servers: JoinSet<std::io::Result<()>>,
    connections: TaskTracker,
    background: TaskTracker,
    mailbox: Arc<dyn Mailbox>,
    grace_period: Duration,
}

impl Server {
    /// Opens the backends, binds the listeners and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let instance_id: InstanceId = if config.instance_id.is_empty() {
            uuid::Uuid::now_v7().simple().to_string().into()
        } else {
            config.instance_id.as_str().into()
        };

        let Backends {
            mailbox,
            presence,
            bus,
        } = open_backends(&config).await?;
        let router = Arc::new(Router::new(
            mailbox.clone(),
            presence,
            bus.clone(),
            &config.limits,
        ));
        let verifier = Arc::new(Verifier::new(&config).await.context("auth configuration")?);
        let app = AppState {
            router: router.clone(),
            verifier,
            config: config.clone(),
            metrics: telemetry::metrics_handle(),
            origins: Arc::new(OriginPolicy::new(&config.cors.allowed_origins)),
            page_reads: Arc::new(tokio::sync::Semaphore::new(
                api::messages::CONCURRENT_PAGE_READS,
            )),
        };

        let shutdown = CancellationToken::new();
        let background = TaskTracker::new();
        let connections = TaskTracker::new();
        let mut servers = JoinSet::new();
        let mut api_addr = None;
        let mut websocket_addr = None;

        if config.roles.contains(&Role::Api) {
            let listener = bind(&config, config.api_port, "api").await?;
            api_addr = Some(listener.local_addr()?);
            let listener = LimitedListener::new(listener, config.limits.max_http_connections);
            let app = api::router(app.clone());
            servers.spawn(serve_http(listener, app, shutdown.clone()));
        }
        if config.roles.contains(&Role::Websocket) {
            let hub = Arc::new(Hub::new(
                config.websocket.max_connections,
                config.websocket.max_connections_per_user,
            ));
            let mut deliveries = bus.subscribe(&instance_id).await?;
            let dispatcher = hub.clone();
            let stop = shutdown.clone();
            background.spawn(async move {
                loop {
                    let event = tokio::select! {
                        () = stop.cancelled() => return,
                        event = deliveries.recv() => event,
                    };
                    match event {
                        Some(event) => dispatcher.dispatch(event),
                        None => return,
                    }
                }
            });
            // Connections check the token only when woken, so the hub wakes
            // them all once it is cancelled.
            let waker = hub.clone();
            let stop = shutdown.clone();
            background.spawn(async move {
                stop.cancelled().await;
                waker.wake_all();
            });
            let state = RealtimeState {
                app: app.clone(),
                hub,
                instance_id: instance_id.clone(),
                shutdown: shutdown.clone(),
                tasks: connections.clone(),
            };
            let listener = bind(&config, config.websocket_port, "websocket").await?;
            websocket_addr = Some(listener.local_addr()?);
            let listener = LimitedListener::new(
                listener,
                config.websocket.max_connections + UPGRADE_SLACK_CONNECTIONS,
            );
            servers.spawn(serve_http(
                listener,
                realtime::router(state),
                shutdown.clone(),
            ));
        }

        spawn_maintenance(&background, &router, &mailbox, &config, &shutdown);
        tracing::info!(
            instance_id = %instance_id,
            run_mode = ?config.run_mode,
            data_dir = %config.data_dir.display(),
            "routing-service started"
        );
        Ok(Self {
            api_addr,
            websocket_addr,
            instance_id,
            shutdown,
            servers,
            connections,
            background,
            mailbox,
            grace_period: config.shutdown.grace_period,
        })
    }

    /// A token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the shutdown token is cancelled, then shuts down gracefully.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        self.stop().await
    }

    /// Shuts down gracefully: stop accepting, close WebSockets with 1001,
    /// wait for in-flight work, then close the mailbox.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        tracing::info!("shutting down");
        self.shutdown.cancel();
        self.connections.close();
        self.background.close();

        let grace = self.grace_period;
        let drained = tokio::time::timeout(grace, async {
            while let Some(result) = self.servers.join_next().await {
                if let Ok(Err(err)) = result {
                    tracing::error!(error = %err, "server failed");
                }
            }
            self.connections.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace_period = ?grace, "in-flight work did not finish within the grace period");
            self.servers.abort_all();
        }

        self.mailbox.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.background.wait()).await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// The backends of this process, chosen by the `type` keys.
struct Backends {
    mailbox: Arc<dyn Mailbox>,
    presence: Arc<dyn Presence>,
    bus: Arc<dyn DeliveryBus>,
}

async fn open_backends(config: &Config) -> anyhow::Result<Backends> {
    let mailbox: Arc<dyn Mailbox> = match config.message_store.kind {
        StoreKind::Embedded => open_embedded_mailbox(config)?,
        StoreKind::Postgres => {
            let postgres = &config.message_store.postgres;
            let pool = PostgresPoolSettings {
                max_connections: postgres.max_connections,
                acquire_timeout: postgres.acquire_timeout,
            };
            let settings = MailboxSettings::from(&config.limits);
            let mailbox = PostgresMailbox::connect(&postgres.url, &postgres.schema, pool, settings)
                .await
                .context("cannot open the PostgreSQL mailbox (message_store.postgres)")?;
            Arc::new(mailbox)
        }
    };
    let presence: Arc<dyn Presence> = match config.presence_cache.kind {
        PresenceKind::Memory => Arc::new(MemoryPresence::new()),
        PresenceKind::Redis => {
            let redis = &config.presence_cache.redis;
            let presence = RedisPresence::connect(&redis.url, &redis.key_prefix, redis.lease_ttl)
                .await
                .context("cannot connect to Redis (presence_cache.redis)")?;
            Arc::new(presence)
        }
    };
    let bus: Arc<dyn DeliveryBus> = match config.delivery_bus.kind {
        BusKind::Memory => Arc::new(MemoryBus::new()),
        BusKind::Nats => {
            let nats = &config.delivery_bus.nats;
            let bus = NatsBus::connect(&nats.url, &nats.subject_prefix)
                .await
                .context("cannot connect to NATS (delivery_bus.nats)")?;
            Arc::new(bus)
        }
    };
    Ok(Backends {
        mailbox,
        presence,
        bus,
    })
}

fn open_embedded_mailbox(config: &Config) -> anyhow::Result<Arc<dyn Mailbox>> {
    let settings = MailboxSettings::from(&config.limits);
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create data_dir {}", dir.display()))?;
    let mailbox = EmbeddedMailbox::open(&dir, settings)
        .with_context(|| format!("cannot open the mailbox in data_dir {}", dir.display()))?;
    Ok(Arc::new(mailbox))
}

async fn bind(config: &Config, port: u16, role: &'static str) -> anyhow::Result<TcpListener> {
    let address = SocketAddr::new(config.bind_address, port);
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot bind the {role} server to {address}"))?;
    tracing::info!(role, address = %listener.local_addr()?, "listening");
    Ok(listener)
}

async fn serve_http<S>(
    listener: LimitedListener,
    app: S,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    S: tower::Service<
            axum::http::Request<axum::body::Body>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    crate::listener::serve(listener, app, shutdown).await
}

fn spawn_maintenance(
    tasks: &TaskTracker,
    router: &Arc<Router>,
    mailbox: &Arc<dyn Mailbox>,
    config: &Config,
    shutdown: &CancellationToken,
) {
    let every =
        (config.limits.message_ttl / 10).clamp(Duration::from_millis(100), MAX_EXPIRY_INTERVAL);
    let mailbox = mailbox.clone();
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match mailbox.expire(SystemTime::now()).await {
                Ok(0) => {}
                Ok(expired) => {
                    metrics::counter!(telemetry::MESSAGES_EXPIRED).increment(expired);
                    tracing::info!(expired, "expired messages deleted");
                }
                Err(err) => tracing::warn!(error = %err, "TTL sweep failed; retrying later"),
            }
        }
    });

    let router = router.clone();
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(LIMITER_CLEANUP_INTERVAL);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => router.forget_idle_senders(),
            }
        }
    });
}

/// Runs the servers that `roles` names until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // The handlers are installed before the servers start, so a signal that
    // arrives as soon as they listen stops them gracefully.
    let signals = ShutdownSignals::install()?;
    let server = Server::start(config).await?;
    let token = server.shutdown_token();
    tokio::spawn(async move {
        signals.wait().await;
        token.cancel();
    });
    server.wait().await
}

/// SIGINT and SIGTERM handlers, registered when created.
struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())
                    .context("cannot install the SIGINT handler")?,
                terminate: signal(SignalKind::terminate())
                    .context("cannot install the SIGTERM handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
