//! `[[checks]]`: the config of one health check (the checks run in the `checks` module).

use serde::{Deserialize, Serialize};

/// One `[[checks]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// Check name (reported to the coordinators), unique among checks.
    pub name: String,
    /// `tcp`, `http`, `exec`, `redis` or `postgres`.
    pub kind: String,
    /// `host:port` (tcp), URL (http), or source name (redis, postgres). Unused by exec.
    #[serde(default)]
    pub target: String,
    /// argv of an exec check.
    #[serde(default)]
    pub command: Vec<String>,
    /// Timeout, ms (default 1000).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_timeout() -> u64 {
    1000
}
