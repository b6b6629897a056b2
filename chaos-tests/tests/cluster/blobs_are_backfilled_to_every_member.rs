//! Blob durability of the local blob store across membership changes (issue 15, defects 3 and 4).
//!
//! The leader writes each blob to a majority; repair (`coordinator::blobs::repair`) backfills the rest.
//! These tests prove: a coordinator that was down while data was written ends up with every
//! committed blob; `status` shows the dead voter (unreachable, blobs unknown) and says "no
//! leader" plainly; a removal that would leave a blob on fewer than a majority is refused with
//! FAILED_PRECONDITION; a member added through `AddMember` holds every blob before it votes, so
//! that after add 4 / remove 3 / kill one the data still restores byte for byte.

use std::collections::BTreeSet;
use std::time::Duration;

use lifeboat_chaos_tests::*;
use lifeboat_common::blob::BlobHash;
use lifeboat_proto::{AddMemberRequest, RemoveMemberRequest};
use lifeboat_restore::files;

/// Repair every 500 ms instead of 5 s, so the tests wait less.
const FAST_REPAIR: &str = "[blobs]\nrepair_interval_ms = 500\n";

/// Every blob the catalog references (all versions, tombstones included).
async fn committed_blobs(cluster: &Cluster) -> anyhow::Result<BTreeSet<BlobHash>> {
    let (rows, _) = files::list(&cluster.conn(), "", None, true, true).await?;
    Ok(rows
        .iter()
        .flat_map(|v| v.v.parts.iter().map(|p| p.hash))
        .collect())
}

/// Blobs of `hashes` that coordinator `i` does not hold on its disk.
fn missing_on(cluster: &Cluster, i: usize, hashes: &BTreeSet<BlobHash>) -> usize {
    let dir = cluster.coords[i].data_dir.join("blobs");
    hashes
        .iter()
        .filter(|h| !dir.join(h.key()).exists())
        .count()
}

/// Polls coordinator `i`'s status every 200 ms until `pred` holds; returns that reply.
///
/// Errors: not within `timeout` (the message names `what` and shows the last reply).
async fn wait_status(
    cluster: &Cluster,
    i: usize,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&lifeboat_proto::StatusReply) -> bool,
) -> anyhow::Result<lifeboat_proto::StatusReply> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let st = cluster.status_of(i).await;
        if let Some(s) = st.as_ref().filter(|s| pred(s)) {
            return Ok(s.clone());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "not within {timeout:?}: {what}; last status {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_was_down_is_backfilled_and_status_shows_it() -> anyhow::Result<()> {
    run("blob_backfill_down", |dir| async move {
        let src = dir.join("src");
        tree::generate(&src, 60, 0, 21)?;
        let opts = ClusterOpts {
            extra_coordinator_toml: FAST_REPAIR.into(),
            ..ClusterOpts::default()
        };
        let mut cluster = Cluster::start(&dir.join("cluster"), &opts)?;
        let lead = settled_leader(&cluster).await?;
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
        agent_once(&cluster, &cfg, &data).await?;

        // A follower goes down; data written meanwhile lands on the other two only.
        let down = (0..3).find(|&i| i != lead).unwrap();
        let other = (0..3).find(|&i| i != lead && i != down).unwrap();
        let down_id = cluster.coords[down].id;
        cluster.kill_coordinator(down);
        tree::mutate(&src, 40, 22)?;
        tree::generate(&src.join("new"), 30, 0, 23)?;
        agent_once(&cluster, &cfg, &data).await?;
        let blobs = committed_blobs(&cluster).await?;
        assert!(
            missing_on(&cluster, down, &blobs) > 0,
            "the test needs blobs written while down"
        );

        // Status shows the dead voter and that not every blob is on every voter.
        let st = wait_status(
            &cluster,
            lead,
            Duration::from_secs(20),
            "voter seen unreachable",
            |s| {
                s.members
                    .iter()
                    .any(|m| m.id == down_id && !m.reachable && !m.blobs_known)
            },
        )
        .await?;
        assert!(st.has_leader, "{st:?}");
        assert!(st.blobs_under_replicated > 0, "{st:?}");
        assert!(!st.blob_health_complete, "{st:?}");
        let out = lifeboat(&cluster, &["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("UNREACHABLE"), "{text}");

        // Removing the other live follower would leave the new blobs on one of two voters.
        let (mut admin, _) = cluster.conn().admin().await?;
        let err = admin
            .remove_member(RemoveMemberRequest {
                id: cluster.coords[other].id,
            })
            .await
            .expect_err("a removal leaving blobs below a majority must be refused");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        let members = leader_status(&cluster).await?.members;
        assert_eq!(
            members.len(),
            3,
            "refused removal changed membership: {members:?}"
        );

        // Back up: repair fetches every missing blob, and status says so.
        cluster.start_coordinator(down)?;
        wait_until(
            Duration::from_secs(60),
            "the restarted node holds every blob",
            || missing_on(&cluster, down, &blobs) == 0,
        )
        .await?;
        for h in &blobs {
            assert_eq!(cluster.local_blob_copies(h), 3, "blob {h} not on all three");
        }
        wait_status(
            &cluster,
            lead,
            Duration::from_secs(30),
            "complete blobs",
            |s| {
                s.blob_health_complete
                    && s.blobs_under_replicated == 0
                    && s.members
                        .iter()
                        .all(|m| m.reachable && m.blobs_known && m.blobs_missing == 0)
            },
        )
        .await?;
        let repaired = cluster
            .status_of(down)
            .await
            .and_then(|s| s.members.into_iter().find(|m| m.id == down_id))
            .map(|m| m.blobs_repaired)
            .unwrap_or(0);
        assert!(repaired > 0, "the restarted node reports no repaired blobs");

        // Two of three down: the survivor says plainly that there is no leader.
        let survivor = (0..3).find(|&i| i != down && i != other).unwrap();
        cluster.kill_coordinator(down);
        cluster.kill_coordinator(other);
        wait_status(
            &cluster,
            survivor,
            Duration::from_secs(30),
            "no leader",
            |s| !s.has_leader,
        )
        .await?;
        let out = lifeboat(&cluster, &["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("no leader"), "{text}");
        assert!(!text.contains("leader 0 at"), "{text}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_member_holds_every_blob_before_the_old_ones_go() -> anyhow::Result<()> {
    run("blob_backfill_add", |dir| async move {
        let src = dir.join("src");
        tree::generate(&src, 80, 0, 31)?;
        let opts = ClusterOpts {
            extra_coordinator_toml: FAST_REPAIR.into(),
            ..ClusterOpts::default()
        };
        let mut cluster = Cluster::start(&dir.join("cluster"), &opts)?;
        settled_leader(&cluster).await?;
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
        agent_once(&cluster, &cfg, &data).await?;
        let blobs = committed_blobs(&cluster).await?;

        // coord4 joins: AddMember returns once it holds every committed blob and votes.
        let new = cluster.add_coordinator()?;
        let new_id = cluster.coords[new].id;
        let (mut admin, _) = cluster.conn().admin().await?;
        let reply = admin
            .add_member(AddMemberRequest {
                id: new_id,
                addr: cluster.coords[new].addr.clone(),
                voter: true,
            })
            .await?
            .into_inner();
        assert!(
            reply.members.iter().any(|m| m.id == new_id && m.voter),
            "{reply:?}"
        );
        assert_eq!(
            missing_on(&cluster, new, &blobs),
            0,
            "new voter lacks blobs"
        );

        // Remove an original follower, then SIGKILL the leader: the two left (one of them the new
        // node) elect a leader and restore every byte.
        let lead = settled_leader(&cluster).await?;
        let victim = (0..3).find(|&i| i != lead).unwrap();
        let (mut admin, _) = cluster.conn().admin().await?;
        admin
            .remove_member(RemoveMemberRequest {
                id: cluster.coords[victim].id,
            })
            .await?;
        cluster.kill_coordinator(victim);
        cluster.kill_coordinator(lead);
        let lead_id = cluster.coords[lead].id;
        cluster
            .wait_leader(Duration::from_secs(30), Some(lead_id))
            .await?;
        let out = dir.join("restored");
        restore_latest(&cluster, "data", &out).await?;
        invariants::restore_equals(&src, &out.join("data"))?;
        Ok(())
    })
    .await
}
