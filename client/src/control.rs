//! The one helper behind every global-group command: `AdminService.Control` with a JSON body on
//! the first coordinator that answers (it forwards to the global leader; documents are described
//! in `lifeboat_coordinator::control::api`).

use anyhow::{anyhow, bail};
use lifeboat_proto::ControlRequest;
use serde_json::Value;

use crate::conn::{admin_client, ConnArgs};

/// Calls `op` with `body` on the first coordinator that answers.
///
/// Errors: the server's message (e.g. a refused switchover and why), or no coordinator
/// reachable.
pub async fn call(conn: &ConnArgs, op: &str, body: Value) -> anyhow::Result<Value> {
    let mut errors = Vec::new();
    for addr in &conn.coordinators {
        let mut c = admin_client(conn.channel(addr)?);
        let req = ControlRequest {
            op: op.into(),
            body: serde_json::to_vec(&body)?,
        };
        match c.control(req).await {
            Ok(r) => return Ok(serde_json::from_slice(&r.into_inner().body)?),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                ) =>
            {
                match lifeboat_common::wire_error::WireError::code_of(&s) {
                    Some(code) => bail!("{op}: {} [{code}]", s.message()),
                    None => bail!("{op}: {}", s.message()),
                }
            }
            Err(s) => errors.push(format!("{addr}: {}", s.message())),
        }
    }
    Err(anyhow!(
        "{op}: no coordinator answered ({})",
        errors.join("; ")
    ))
}
