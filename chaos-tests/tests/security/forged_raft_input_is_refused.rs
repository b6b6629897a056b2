//! Raft input from an authorized peer is still checked (issue 17, item 3): an `AppendEntries`
//! whose entries do not follow its `prev_log_id` (the reported attack: an entry at index
//! last + 3, under a vote term 10 above the current one) is refused INVALID_ARGUMENT at the
//! gRPC edge, before openraft sees it. The follower keeps its term, its log stays loadable and
//! it goes on replicating: a later write reaches it.

use lifeboat_chaos_tests::*;
use lifeboat_coordinator::raft::TypeConfig;
use lifeboat_proto::raft_service_client::RaftServiceClient;
use lifeboat_proto::RaftMessage;
use openraft::raft::AppendEntriesRequest;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_entries_with_a_gap_is_refused_and_the_follower_keeps_replicating(
) -> anyhow::Result<()> {
    run("raft_input", |dir| async move {
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        let lead = settled_leader(&cluster).await?;
        let follower = (0..3).find(|&i| i != lead).unwrap();
        let st = cluster
            .status_of(follower)
            .await
            .expect("the follower answers");
        let lead_id = cluster.coords[lead].id;

        // Authorized for Raft: the leader's own coordinator certificate.
        let mut conn = cluster.conn();
        conn.cert = Some(cluster.certs.join(format!("coord{lead_id}.pem")));
        conn.key = Some(cluster.certs.join(format!("coord{lead_id}.key")));
        let mut raft = RaftServiceClient::new(conn.channel(&cluster.coords[follower].addr)?);
        let forged = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(st.term + 10, lead_id),
            prev_log_id: Some(LogId::new(
                CommittedLeaderId::new(st.term, lead_id),
                st.last_log_index,
            )),
            entries: vec![Entry {
                log_id: LogId::new(
                    CommittedLeaderId::new(st.term + 10, lead_id),
                    st.last_log_index + 3,
                ),
                payload: EntryPayload::Blank,
            }],
            leader_commit: None,
        };
        let err = raft
            .append_entries(RaftMessage {
                group: "region".into(),
                data: serde_json::to_vec(&forged)?,
            })
            .await
            .expect_err("an AppendEntries with a gap was accepted");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

        let after = cluster
            .status_of(follower)
            .await
            .expect("the follower still answers");
        assert_eq!(after.term, st.term, "the forged vote term was not adopted");

        // Replication goes on: a write reaches the follower's log.
        let src = dir.join("src");
        tree::generate(&src, 5, 1024, 31)?;
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
        cluster.start_agent(&cfg)?;
        settle(&data).await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let s = cluster.status_of(follower).await;
            if s.as_ref()
                .is_some_and(|s| s.last_applied > after.last_log_index)
            {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the follower stopped replicating: {s:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Ok(())
    })
    .await
}
