//! Admin membership changes: a new coordinator joins through `AddMember`, catches up and votes;
//! `RemoveMember` takes a node out and the group keeps committing.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;
use lifeboat_proto::{AddMemberRequest, RemoveMemberRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_members_through_the_admin_api() -> anyhow::Result<()> {
    let s = Scratch::new("t08");
    let src = s.dir.join("src");
    tree::generate(&src, 80, 0, 11)?;
    let mut cluster = Cluster::start(&s.dir.join("cluster"), &ClusterOpts::default())?;
    cluster.wait_leader(Duration::from_secs(30), None).await?;
    let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
    agent_once(&cluster, &cfg, &data).await?;

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

    // The new node caught up with the catalog.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lead = cluster.wait_leader(Duration::from_secs(10), None).await?;
        let ls = cluster
            .status_of(cluster.index_of(lead).unwrap())
            .await
            .unwrap();
        if let Some(ns) = cluster.status_of(new).await {
            if ns.versions == ls.versions && ns.versions > 0 && ns.members.len() == 4 {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "new member did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Remove an original follower; the group (now 3 voters) keeps committing.
    let lead = cluster.wait_leader(Duration::from_secs(10), None).await?;
    let victim = cluster
        .coords
        .iter()
        .find(|c| c.id != lead && c.id != new_id)
        .unwrap()
        .id;
    let (mut admin, _) = cluster.conn().admin().await?;
    let reply = admin
        .remove_member(RemoveMemberRequest { id: victim })
        .await?
        .into_inner();
    assert!(reply.members.iter().all(|m| m.id != victim), "{reply:?}");
    let vi = cluster.index_of(victim).unwrap();
    cluster.kill_coordinator(vi);
    tree::mutate(&src, 30, 12)?;
    agent_once(&cluster, &cfg, &data).await?;
    let out = s.dir.join("restored");
    restore_latest(&cluster, "data", &out).await?;
    invariants::restore_equals(&src, &out.join("data"))?;
    Ok(())
}
