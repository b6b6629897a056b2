//! Assembles a coordinator: redb file, Raft, blob store, the gRPC server hosting the Raft, agent,
//! admin, blob, replication and health services (mutual TLS unless `insecure`; health also on
//! the optional plaintext `health_addr`), and, in a standby region, the replication supervisor
//! (copies the upstream region while this node leads). Tells systemd READY=1 once it listens;
//! SIGHUP reloads the TLS files for new connections.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use lifeboat_common::blobstore::encrypted::holds_data_keys;
use lifeboat_common::blobstore::{BlobStore, EncryptedStore, LocalBlobStore, S3BlobStore};
use lifeboat_proto::admin_service_server::AdminServiceServer;
use lifeboat_proto::agent_service_server::AgentServiceServer;
use lifeboat_proto::blob_service_server::BlobServiceServer;
use lifeboat_proto::control_service_server::ControlServiceServer;
use lifeboat_proto::global_service_server::GlobalServiceServer;
use lifeboat_proto::raft_service_server::RaftServiceServer;
use lifeboat_proto::replication_service_server::ReplicationServiceServer;
use openraft::{BasicNode, Config, SnapshotPolicy};

use crate::admin::Admin;
use crate::blobs::{BlobServer, Blobs};
use crate::config::{BlobBackend, CoordinatorConfig};
use crate::control::role::Role;
use crate::control::runtime::{ControlRuntime, Regional};
use crate::control::store::ControlStore;
use crate::intake::Intake;
use crate::intake::SyncAck;
use crate::leader::LeaderInfo;
use crate::raft::network::{Network, RaftServer};
use crate::raft::{LogStore, RaftHandle, RegionRaft, StateMachineStore};
use crate::xregion::replication::{ReplicationServer, ReplicationStatus, Replicator};

/// The warning shown (log and `lifeboat status`) by a coordinator whose store is not encrypted.
pub const PLAINTEXT_WARNING: &str = "blob store is NOT encrypted at rest: add [encryption] with a master key (`lifeboat keys init --out PATH`, then master_key_file = PATH) to encrypt new blobs; see docs/encryption.md";

/// Opens the configured blob store, wrapped in [`EncryptedStore`] when `[encryption]` is set
/// (the second value is then that same store, for key rotation and status).
///
/// Errors: backend failures (unreachable S3, bad directory); the master key cannot be read or
/// does not open the repository's data keys ("master key does not open data key K in
/// <store>: wrong key?"); a repository that holds data keys opened without `[encryption]`.
pub async fn open_blob_store(
    cfg: &CoordinatorConfig,
) -> anyhow::Result<(Arc<dyn BlobStore>, Option<Arc<EncryptedStore>>)> {
    let plain: Arc<dyn BlobStore> = match cfg.blobs.backend {
        BlobBackend::Local => {
            let p = cfg
                .blobs
                .path
                .clone()
                .unwrap_or_else(|| cfg.data_dir.join("blobs"));
            Arc::new(LocalBlobStore::open(p)?)
        }
        BlobBackend::S3 => {
            let s3 = cfg.blobs.s3.clone().context("blobs.s3 missing")?;
            Arc::new(S3BlobStore::open(s3).await?)
        }
    };
    let Some(enc) = &cfg.encryption else {
        if holds_data_keys(plain.as_ref()).await? {
            anyhow::bail!(
                "{} is encrypted (it holds data keys under keys/) but this config has no [encryption] section: set master_key_file, master_key_env or master_key_command",
                plain.describe()
            );
        }
        if !cfg.witness {
            tracing::warn!(store = %plain.describe(), "{PLAINTEXT_WARNING}");
        }
        return Ok((plain, None));
    };
    let master = enc.source()?.load()?;
    let host = format!("coordinator {} ({})", cfg.node_id, cfg.region);
    let store = Arc::new(EncryptedStore::open(plain, master, &host).await?);
    tracing::info!(store = %store.describe(), current_key = %store.current_key(), "blob store encrypted at rest");
    Ok((store.clone(), Some(store)))
}

/// openraft settings of one group from `[raft]`.
fn raft_config(cfg: &CoordinatorConfig, cluster_name: String) -> anyhow::Result<Config> {
    Config {
        cluster_name,
        heartbeat_interval: cfg.raft.heartbeat_ms,
        election_timeout_min: cfg.raft.election_timeout_min_ms,
        election_timeout_max: cfg.raft.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.raft.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: cfg.raft.max_logs_kept_after_snapshot,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    }
    .validate()
    .context("raft config")
}

/// Initializes a new group with its founding voters (id, address). Every founding member calls
/// this with the same membership; openraft accepts that, and an initialized group skips it.
///
/// An initialized group keeps the membership stored in its log: the configured members are read
/// only by a first start. When they differ from the stored voters (ids or addresses), returns
/// the warning (also logged at error level) saying what to do; `group` names the group and
/// `config_key` its config key in the message, `change_cmd` the command that changes it, and
/// `db_path` the file to delete to found the group again.
async fn initialize(
    raft: &RaftHandle,
    members: impl Iterator<Item = (u64, String)>,
    group: &str,
    config_key: &str,
    change_cmd: &str,
    db_path: &std::path::Path,
) -> anyhow::Result<Option<String>> {
    let members: BTreeMap<u64, BasicNode> =
        members.map(|(id, addr)| (id, BasicNode { addr })).collect();
    if !raft.is_initialized().await? {
        if let Err(e) = raft.initialize(members).await {
            tracing::info!(error = %e, "initialize skipped");
        }
        return Ok(None);
    }
    let stored = raft.metrics().borrow().membership_config.clone();
    let stored = stored.membership();
    let voters: BTreeMap<u64, String> = stored
        .voter_ids()
        .map(|id| {
            let addr = stored
                .get_node(&id)
                .map(|n| n.addr.clone())
                .unwrap_or_default();
            (id, addr)
        })
        .collect();
    let configured: BTreeMap<u64, String> =
        members.into_iter().map(|(id, n)| (id, n.addr)).collect();
    let warning = membership_drift(&voters, &configured).map(|diff| {
        format!(
            "{config_key} in the config differ from the {group} group's membership stored in {db} ({diff}); the stored membership is used: {config_key} is read only by a first start. To change the running group use `{change_cmd}`; if the group never held data (a failed first start), stop all its coordinators, delete {db} on each and start them again; otherwise set {config_key} to the stored voters",
            db = db_path.display()
        )
    });
    if let Some(w) = &warning {
        tracing::error!(group, "{w}");
    }
    Ok(warning)
}

/// Describes how configured voters (id → address) differ from the stored ones, or None when
/// they are the same.
fn membership_drift(
    stored: &BTreeMap<u64, String>,
    configured: &BTreeMap<u64, String>,
) -> Option<String> {
    if stored == configured {
        return None;
    }
    let show = |m: &BTreeMap<u64, String>| {
        m.iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Some(format!(
        "stored voters: {}; configured: {}",
        show(stored),
        show(configured)
    ))
}

/// Runs a coordinator until `shutdown` resolves.
///
/// Errors: start-up failures (config, storage, bind), each with context.
pub async fn run(
    cfg: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Everything that can be checked without state is checked before anything is written, so a
    // failed first start (a TLS typo) leaves no stored membership behind.
    let server_tls = if cfg.tls.insecure {
        None
    } else {
        Some(crate::tls_reload::ReloadableTls::load(&cfg.tls).context("[tls]")?)
    };
    cfg.tls.client()?;
    let addr: std::net::SocketAddr = cfg
        .listen
        .parse()
        .with_context(|| format!("listen address {:?}", cfg.listen))?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create data_dir {}", cfg.data_dir.display()))?;
    let db_path = cfg.data_dir.join("coordinator.redb");
    let db = Arc::new(redb::Database::create(&db_path).with_context(|| {
        format!(
            "open {} (is another coordinator using this data_dir?)",
            db_path.display()
        )
    })?);
    let (store, encrypted) = open_blob_store(&cfg).await?;
    let store: Arc<dyn BlobStore> = Arc::new(crate::metrics::MeteredStore(store));
    let log = LogStore::open(db.clone(), "region")?;
    let sm = StateMachineStore::open(db.clone())?.with_blob_store(store.clone());
    let catalog = sm.catalog();
    let gc_lock: crate::blobs::gc::GcLock = Default::default();

    let region_config = raft_config(&cfg, format!("lifeboat-{}", cfg.region))?;
    let network = Network {
        tls: cfg.tls.clone(),
        group: "region".into(),
    };
    let raft = RegionRaft(
        openraft::Raft::new(cfg.node_id, Arc::new(region_config), network, log, sm)
            .await
            .context("start raft")?,
    );

    let mut config_warnings = Vec::new();
    if !cfg.members.is_empty() {
        config_warnings.extend(
            initialize(
                &raft,
                cfg.members.iter().map(|m| (m.id, m.addr.clone())),
                "regional",
                "[[members]]",
                "lifeboat member add/remove",
                &db_path,
            )
            .await?,
        );
    }

    tracing::info!(node = cfg.node_id, region = %cfg.region, store = %store.describe(), "coordinator starting");
    let mut blobs = Blobs::new(store, cfg.tls.clone(), cfg.node_id);
    blobs.set_raft(raft.clone());
    blobs.set_catalog(catalog.clone());
    let repair = crate::blobs::repair::Repair::new(
        blobs.clone(),
        catalog.clone(),
        raft.clone(),
        cfg.node_id,
        crate::blobs::repair::RepairSettings {
            interval_ms: cfg.blobs.repair_interval_ms,
            max_bytes_per_s: cfg.blobs.repair_max_mib_per_s.saturating_mul(1 << 20),
        },
    );
    let repair_tasks = repair.spawn();
    let leader = LeaderInfo {
        raft: raft.clone(),
        node_id: cfg.node_id,
    };
    let agents: crate::intake::AgentTable = Default::default();
    let role = Arc::new(match &cfg.global {
        Some(_) if cfg.witness => Role::fixed(&cfg.region, 1, true),
        Some(_) => Role::global(&cfg.region),
        None => Role::fixed(&cfg.region, cfg.epoch, cfg.replication.is_standby()),
    });
    let confirmed = Arc::new(tokio::sync::watch::channel(BTreeMap::new()).0);
    let sync = cfg
        .global
        .as_ref()
        .filter(|g| g.synchronous && g.regions().len() > 1 && !cfg.witness)
        .map(|g| {
            SyncAck::new(
                confirmed.subscribe(),
                std::time::Duration::from_millis(g.sync_timeout_ms),
                g.synchronous_strict,
            )
        });
    let intake = Intake {
        raft: raft.clone(),
        blobs: blobs.clone(),
        leader: leader.clone(),
        region: cfg.region.clone(),
        role: role.clone(),
        agents: Arc::clone(&agents),
        sync: sync.clone(),
        region_addrs: Arc::new(
            cfg.global
                .as_ref()
                .map(|g| {
                    g.regions()
                        .into_iter()
                        .map(|r| {
                            let addrs = g.addrs_of(&r);
                            (r, addrs)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        part_cvs: Default::default(),
        catalog: catalog.clone(),
        gc_lock: gc_lock.clone(),
    };
    let replication = ReplicationStatus::new(cfg.replication.clone());
    let replicator_template = Replicator {
        raft: raft.clone(),
        node_id: cfg.node_id,
        region: cfg.region.clone(),
        catalog: catalog.clone(),
        blobs: blobs.clone(),
        tls: cfg.tls.clone(),
        cfg: cfg.replication.clone(),
        status: replication.clone(),
        upstream_region: None,
        gc_lock: gc_lock.clone(),
    };
    let replicator = (cfg.global.is_none() && cfg.replication.is_standby()).then(|| {
        tracing::info!(upstream = ?cfg.replication.upstream, "standby region: agent pushes are refused; the leader copies the upstream region");
        replicator_template.clone().spawn()
    });

    // The global group: a second openraft instance in this process, with its own tables.
    let mut control = None;
    let mut global_raft = None;
    let mut control_tasks = Vec::new();
    if let Some(g) = &cfg.global {
        let glog = LogStore::open(db.clone(), "global")?;
        let gsm = ControlStore::open(db.clone())?;
        let gconfig = raft_config(&cfg, "lifeboat-global".into())?;
        let gnet = Network {
            tls: cfg.tls.clone(),
            group: "global".into(),
        };
        let graft = crate::control::runtime::GlobalRaft(
            openraft::Raft::new(cfg.node_id, Arc::new(gconfig), gnet, glog, gsm.clone())
                .await
                .context("start global raft")?,
        );
        if g.join {
            tracing::info!("joining an existing global group: waiting for `lifeboat topology add`");
        } else {
            config_warnings.extend(
                initialize(
                    &graft,
                    g.members.iter().map(|m| (m.id, m.addr.clone())),
                    "global",
                    "[[global.members]]",
                    "lifeboat topology add/remove",
                    &db_path,
                )
                .await?,
            );
        }
        if let Err(e) = g.topology().check() {
            if g.policy.automatic {
                tracing::error!(reason = %e, "automatic failover is refused for this topology; manual `lifeboat switchover` still works");
            }
        }
        let regional = (!cfg.witness).then(|| Regional {
            raft: raft.clone(),
            catalog: catalog.clone(),
            replication: replication.clone(),
            agents: Arc::clone(&agents),
            replicator: replicator_template.clone(),
            sync: sync.clone(),
        });
        let rt = ControlRuntime::new(
            cfg.node_id,
            cfg.region.clone(),
            cfg.witness,
            graft.clone(),
            gsm,
            g.clone(),
            cfg.tls.clone(),
            role.clone(),
            regional,
        );
        control_tasks = rt.spawn();
        control = Some(rt);
        global_raft = Some(graft);
    }
    let repl_server = ReplicationServer {
        catalog: catalog.clone(),
        leader: leader.clone(),
        region: cfg.region.clone(),
        confirmed,
        tls: cfg.tls.clone(),
    };
    let gc = crate::blobs::gc::Gc {
        raft: raft.clone(),
        catalog: catalog.clone(),
        blobs: blobs.clone(),
        lock: gc_lock,
        cfg: cfg.gc.clone(),
        leader: leader.clone(),
        region: cfg.region.clone(),
    };
    let gc_timer = (!cfg.witness).then(|| gc.clone().spawn_timer()).flatten();
    let metrics_task = crate::metrics::start(
        &cfg,
        crate::metrics::Sources {
            region: cfg.region.clone(),
            witness: cfg.witness,
            raft: raft.0.clone(),
            global: global_raft.as_ref().map(|g| g.0.clone()),
            control: control.clone(),
            role: role.clone(),
            replication: replication.clone(),
            lag_budget_ms: cfg.replication.lag_degraded_ms,
            catalog: catalog.clone(),
            repair: repair.clone(),
            agents: Arc::clone(&agents),
            cert_not_after_s: None,
        },
    )
    .await
    .context("metrics")?;
    if encrypted.is_none() && !cfg.witness {
        config_warnings.push(PLAINTEXT_WARNING.to_string());
    }
    let admin = Arc::new(Admin {
        keys: encrypted,
        raft: raft.clone(),
        catalog,
        leader: leader.clone(),
        region: cfg.region.clone(),
        role,
        agents,
        replication,
        control,
        gc,
        config_warnings: Arc::new(config_warnings),
        repair: repair.clone(),
    });
    let global_server = crate::control::grpc::GlobalServer {
        control: admin.control.clone(),
    };
    let control_server = crate::control::grpc::ControlServer {
        admin: admin.clone(),
    };
    let health = crate::health::Health::new().await;
    let health_follow = health.follow_leader(match (&global_raft, cfg.witness) {
        (Some(g), true) => g.0.clone(),
        _ => raft.0.clone(),
    });
    let max = lifeboat_common::MAX_MESSAGE_BYTES;
    let builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024));
    let tls_on = server_tls.is_some();
    if !tls_on {
        tracing::warn!(
            "TLS disabled (insecure = true): gRPC is plaintext and no caller's role is checked"
        );
    }
    let router = builder
        .layer(crate::authz::AuthzLayer::new(tls_on))
        .add_service(
            RaftServiceServer::new(RaftServer {
                raft: raft.0.clone(),
                global: global_raft.as_ref().map(|g| g.0.clone()),
            })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            AgentServiceServer::new(intake)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            AdminServiceServer::from_arc(admin)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(ControlServiceServer::new(control_server))
        .add_service(GlobalServiceServer::new(global_server))
        .add_service(
            BlobServiceServer::new(BlobServer { blobs, repair })
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            ReplicationServiceServer::new(repl_server)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(health.service());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    tracing::info!(%addr, "listening");
    let health_listener = match &cfg.health_addr {
        Some(a) => Some(health.serve_plaintext(a).await?),
        None => None,
    };
    crate::health::notify_ready();
    let shutdown = {
        let health = health.clone();
        async move {
            shutdown.await;
            health.shutting_down().await;
        }
    };
    // SIGHUP reloads the TLS files for new connections (crate::tls_reload).
    let sighup = crate::tls_reload::spawn_sighup(server_tls.clone())?;
    match server_tls {
        Some(tls) => {
            let (incoming, accept) = tls.incoming(listener);
            let served = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
            accept.abort();
            served.context("gRPC server")?;
        }
        None => router
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                shutdown,
            )
            .await
            .context("gRPC server")?,
    }
    sighup.abort();
    health_follow.abort();
    if let Some(t) = health_listener {
        t.abort();
    }
    if let Some(r) = replicator {
        r.abort();
    }
    if let Some(t) = gc_timer {
        t.abort();
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    for t in repair_tasks.into_iter().chain(control_tasks) {
        t.abort();
    }
    if let Some(g) = global_raft {
        g.shutdown().await.ok();
    }
    raft.shutdown().await.ok();
    Ok(())
}

#[cfg(test)]
mod drift_tests {
    use super::membership_drift;
    use std::collections::BTreeMap;

    #[test]
    fn drift_names_both_sides_and_equal_is_none() {
        let a: BTreeMap<u64, String> = [(1, "h:1".to_string()), (2, "h:2".to_string())].into();
        assert_eq!(membership_drift(&a, &a.clone()), None);
        let mut b = a.clone();
        b.insert(2, "h:9".into());
        let d = membership_drift(&a, &b).unwrap();
        assert!(d.contains("2=h:2") && d.contains("2=h:9"), "{d}");
        let mut c = a.clone();
        c.remove(&2);
        assert!(membership_drift(&a, &c).is_some());
    }
}
