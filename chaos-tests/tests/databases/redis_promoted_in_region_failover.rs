//! Issue 4 inside issue 3: Redis promotion as part of a region failover. Regions a and b (3
//! coordinators each) and a witness; a real redis-server per region, each agent with a
//! `[[redis_sources]]` entry naming both primaries. From the control record alone, b's Redis
//! becomes a replica of a's. Region a is lost (coordinators, agent and its Redis SIGKILLed):
//! the global group fails over to b, b's agent sees epoch 2 in its heartbeat and runs
//! `REPLICAOF NO ONE`: b's Redis accepts writes and holds every key written to a before the
//! loss. The test prints the time from "b active" to "b's Redis is primary".

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::redis_server::{get, set, start_redis, wait_value};
use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts};

async fn role(c: &mut redis::aio::MultiplexedConnection) -> String {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(c)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("role:"))
        .unwrap_or("")
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_in_the_new_region_is_promoted_by_the_failover() -> anyhow::Result<()> {
    run("t16", |dir| async move {
        let redis_a = start_redis(&dir.join("redis-a"), &[])?;
        let redis_b = start_redis(&dir.join("redis-b"), &[])?;
        let mut ca = redis_a.con().await?;
        let mut cb = redis_b.con().await?;
        let mut regions = Regions::start(&dir.join("regions"), &RegionsOpts::default())?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let source = format!(
            "[[redis_sources]]\nname = \"cache\"\naddr = \"{{addr}}\"\ninterval_s = 3600\nprimary_by_region = {{ a = \"{}\", b = \"{}\" }}\n",
            redis_a.addr(),
            redis_b.addr()
        );
        let mut children = Vec::new();
        for (region, r) in [("a", &redis_a), ("b", &redis_b)] {
            let (cfg, _) = regions.region(region).write_agent_config(
                &format!("agent-{region}"),
                &[],
                &source.replace("{addr}", &r.addr()),
            )?;
            children.push(regions.region(region).spawn_agent(&cfg, false)?);
        }
        // The control record alone makes b's Redis follow a's.
        let deadline = Instant::now() + Duration::from_secs(30);
        while role(&mut cb).await != "slave" {
            anyhow::ensure!(Instant::now() < deadline, "b's redis never followed a's");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for i in 0..200 {
            set(&mut ca, &format!("k{i}"), &format!("v{i}")).await?;
        }
        wait_value(&mut cb, "k199", "v199").await?;
        assert!(set(&mut cb, "x", "1").await.is_err(), "a replica refuses writes");

        // Lose region a: coordinators, agent and its Redis.
        regions.kill_region("a");
        let mut agent_a = children.remove(0);
        let _ = agent_a.kill();
        let _ = agent_a.wait();
        drop(ca);
        drop(redis_a);
        regions.wait_active("b", 2, Duration::from_secs(30)).await?;
        let active_at = Instant::now();
        let deadline = active_at + Duration::from_secs(20);
        while role(&mut cb).await != "master" {
            anyhow::ensure!(Instant::now() < deadline, "b's redis was not promoted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "redis promotion after b became active: {} ms",
            active_at.elapsed().as_millis()
        );
        set(&mut cb, "after-failover", "yes").await?;
        assert_eq!(get(&mut cb, "after-failover").await.as_deref(), Some("yes"));
        for i in [0, 99, 199] {
            assert_eq!(
                get(&mut cb, &format!("k{i}")).await,
                Some(format!("v{i}")),
                "key written to a before the loss"
            );
        }
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    })
    .await
}
