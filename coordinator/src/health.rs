//! Health of a coordinator for orchestrators: the gRPC health service (`grpc.health.v1.Health`,
//! tonic-health) and systemd readiness (`sd_notify`).
//!
//! Statuses served:
//! - `""` (the whole server): SERVING once the node's Raft groups run and its gRPC listener is
//!   bound (liveness), NOT_SERVING from the moment it starts shutting down.
//! - `lifeboat.v1.AdminService` ([`ADMIN_SERVICE`]): SERVING while the node knows a leader of its
//!   regional Raft group (of the global group for a witness), so that status, restore and
//!   intake can be answered or redirected; NOT_SERVING otherwise (readiness).
//!
//! The service is served on the main mutual-TLS listener (every authenticated role may call it,
//! `common::authz`) and, when `health_addr` is set, on a separate **plaintext** listener that
//! carries nothing else: a Kubernetes `grpc` probe cannot present a client certificate.
//! The plaintext listener tells only these two statuses; bind it to an address that only the
//! probing kubelet or local monitoring reaches.

use std::net::SocketAddr;

use anyhow::Context;
use lifeboat_proto::admin_service_server::AdminServiceServer;
use tonic::server::NamedService;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::raft::RaftHandle;

/// Health service name of the admin service, the readiness status (`lifeboat.v1.AdminService`).
pub const ADMIN_SERVICE: &str = <AdminServiceServer<crate::admin::Admin> as NamedService>::NAME;

/// The statuses of one coordinator, shared by every listener serving them.
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// New statuses: the server SERVING (call it once the Raft groups run), the admin service
    /// NOT_SERVING until [`Health::follow_leader`] sees a leader.
    pub async fn new() -> Self {
        let reporter = HealthReporter::new();
        reporter
            .set_service_status(ADMIN_SERVICE, ServingStatus::NotServing)
            .await;
        Health { reporter }
    }

    /// A `grpc.health.v1.Health` service answering from these statuses.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }

    /// Keeps the admin service's status in step with `raft`'s known leader: SERVING while one is
    /// known. Ends when the Raft instance shuts down.
    pub fn follow_leader(&self, raft: RaftHandle) -> tokio::task::JoinHandle<()> {
        let reporter = self.reporter.clone();
        tokio::spawn(async move {
            let mut metrics = raft.metrics();
            let mut last = None;
            loop {
                let leader = metrics.borrow_and_update().current_leader;
                if last != Some(leader) {
                    let status = if leader.is_some() {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    tracing::debug!(?leader, ?status, "health: admin service");
                    reporter.set_service_status(ADMIN_SERVICE, status).await;
                    let text = match leader {
                        Some(l) => format!("serving; leader {l}"),
                        None => "serving; no leader known".to_string(),
                    };
                    // Ignored: only informative, and a no-op outside systemd.
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&text)]);
                    last = Some(leader);
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// Marks every status NOT_SERVING and tells systemd the service is stopping.
    pub async fn shutting_down(&self) {
        for name in ["", ADMIN_SERVICE] {
            self.reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }

    /// Binds the plaintext health listener at `addr` (the `health_addr` option) and serves only
    /// the health service there until the returned task is aborted.
    ///
    /// Errors: a bad address or a failed bind.
    pub async fn serve_plaintext(&self, addr: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("health_addr {addr:?} is not host:port"))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind health_addr {addr}"))?;
        tracing::info!(%addr, "health service listening (plaintext, grpc.health.v1 only)");
        let router = tonic::transport::Server::builder().add_service(self.service());
        Ok(tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
            {
                tracing::error!(error = %e, "health listener stopped");
            }
        }))
    }
}

/// Tells systemd (`Type=notify`) that the coordinator serves: its listeners are bound. A cheap
/// no-op when `NOTIFY_SOCKET` is not set; a failure to notify is logged, not fatal.
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY=1 failed");
    }
}
