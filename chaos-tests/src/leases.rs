//! Watching the write leases of every region while a test runs: a background task asks each
//! region's own regional leader (`ControlService.PeekReport`) every 100 ms whether it holds a
//! lease and until when, and [`crate::invariants::one_lease_holder`] proves that no two regions'
//! lease windows ever overlapped. All processes share the host's clock (namespaces do not virtualize time), so the
//! windows `[at_ms, lease_until_ms)` of different regions are comparable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lifeboat_client::conn::ConnArgs;
use lifeboat_lab::regions::{leader_report, Regions};
use lifeboat_proto::RegionReport;

/// One answer of a regional leader.
#[derive(Debug, Clone)]
pub struct LeaseSample {
    /// Region.
    pub region: String,
    /// Answering node.
    pub node_id: u64,
    /// Epoch its role follows.
    pub epoch: u64,
    /// It holds a valid lease at `at_ms`.
    pub leased: bool,
    /// Its clock when answering (ms since the Unix epoch).
    pub at_ms: u64,
    /// Local expiry of its lease (ms since the Unix epoch; 0 if none).
    pub lease_until_ms: u64,
}

impl LeaseSample {
    fn from_report(r: &RegionReport) -> Self {
        LeaseSample {
            region: r.region.clone(),
            node_id: r.node_id,
            epoch: r.epoch,
            leased: r.leased,
            at_ms: r.at_ms,
            lease_until_ms: r.lease_until_ms,
        }
    }
}

/// Samples every region's regional leader in the background until [`LeaseSampler::finish`].
pub struct LeaseSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<LeaseSample>>,
}

impl LeaseSampler {
    /// Starts sampling every region of `regions` (from the test's own network namespace, which
    /// reaches every site even during partitions).
    pub fn start(regions: &Regions) -> Self {
        let conn: ConnArgs = regions.conn();
        let addrs: BTreeMap<String, Vec<String>> = regions
            .regions
            .iter()
            .map(|(r, c)| (r.clone(), c.addrs()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let asks = addrs.values().map(|a| leader_report(&conn, a));
                for r in futures::future::join_all(asks).await.into_iter().flatten() {
                    out.push(LeaseSample::from_report(&r));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        });
        LeaseSampler { stop, task }
    }

    /// Stops sampling and returns every sample.
    ///
    /// Errors: the sampling task panicked.
    pub async fn finish(self) -> anyhow::Result<Vec<LeaseSample>> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// Leased samples of `region`.
pub fn leased_samples<'a>(samples: &'a [LeaseSample], region: &str) -> Vec<&'a LeaseSample> {
    samples
        .iter()
        .filter(|s| s.region == region && s.leased)
        .collect()
}
