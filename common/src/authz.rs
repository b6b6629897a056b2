//! Who may call what: the identity carried by every certificate and the one authorization
//! table of every RPC.
//!
//! **Identity.** Every certificate issued by [`crate::tls::issue_cert`] carries a URI subject
//! alternative name `lifeboat://<region>/<role>/<name>` ([`PeerIdentity::uri`]); the CA signs
//! it, so a peer's role is whatever the CA gave it, never what the peer claims. `<region>` is
//! `any` for certificates not bound to a region. A certificate without such a SAN (or with
//! two) has no role and is refused on every RPC.
//!
//! **Roles.** `coordinator` and `witness` are the cluster's own processes ("peers": Raft,
//! replication between regions, blob copies, the internal `GlobalService` (renew, report,
//! observe), and forwarding of operators' `ControlService` calls to the global leader); `agent` is one node's agent
//! (its RPCs, bound to its agent id: [`PeerIdentity::name`] must equal the `agent_id` it
//! sends); `viewer` reads (status, versions, audit), `operator` also restores, verifies,
//! drills, resolves and switches over, `admin` also changes membership, topology and runs GC.
//! Each human role includes the rights of the ones before it.
//!
//! **Where it is enforced.** The coordinator's gRPC server checks [`method_allowed`] for every
//! call before any handler runs (a tower layer): one gRPC method, one rule. A refusal is
//! `PERMISSION_DENIED` naming the roles needed and the identity presented ([`denied`]).

use std::fmt;
use std::str::FromStr;

/// The role a certificate grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A coordinator of a region (regional and global Raft member).
    Coordinator,
    /// The witness: a global Raft voter with no region's data.
    Witness,
    /// A node's agent.
    Agent,
    /// Reads status, versions and the audit.
    Viewer,
    /// Viewer, plus restore, verify, drill, resolve, switchover and failback.
    Operator,
    /// Operator, plus membership, topology and garbage collection.
    Admin,
}

impl Role {
    /// Every role, in a stable order (for help texts).
    pub const ALL: [Role; 6] = [
        Role::Coordinator,
        Role::Witness,
        Role::Agent,
        Role::Viewer,
        Role::Operator,
        Role::Admin,
    ];

    /// The role's name as written in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Witness => "witness",
            Role::Agent => "agent",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The cluster's own processes (coordinators and the witness).
    pub fn is_peer(self) -> bool {
        matches!(self, Role::Coordinator | Role::Witness)
    }

    /// A human role at least as strong as `min` (`viewer` < `operator` < `admin`).
    fn at_least(self, min: Role) -> bool {
        let rank = |r: Role| match r {
            Role::Viewer => 1,
            Role::Operator => 2,
            Role::Admin => 3,
            _ => 0,
        };
        rank(self) > 0 && rank(self) >= rank(min)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of identity parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not a role name.
    #[error("unknown role {0:?} (one of coordinator, witness, agent, viewer, operator, admin)")]
    UnknownRole(String),
    /// A URI that is not `lifeboat://<region>/<role>/<name>` with valid parts.
    #[error("bad identity URI {0:?}: expected lifeboat://<region>/<role>/<name> (letters, digits, '-', '_', '.')")]
    BadUri(String),
    /// A name or region with characters outside `[A-Za-z0-9._-]`, empty or over 64 bytes.
    #[error("bad {what} {value:?}: 1..64 of letters, digits, '-', '_', '.'")]
    BadPart {
        /// `name` or `region`.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The certificate could not be parsed.
    #[error("unreadable client certificate: {0}")]
    BadCertificate(String),
    /// The certificate carries no `lifeboat://` URI (or more than one).
    #[error("the client certificate carries {0} lifeboat:// identities (exactly one needed); issue it with `lifeboat certs issue`")]
    NoIdentity(usize),
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Role, IdentityError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole(s.to_string()))
    }
}

/// The identity a certificate grants: role, region (`any` when unbound) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// Role.
    pub role: Role,
    /// Region, or `any`.
    pub region: String,
    /// Name: a coordinator's node name, an agent's `agent_id`, a person or tool.
    pub name: String,
}

/// URI scheme of identities.
pub const URI_SCHEME: &str = "lifeboat://";
/// Region of certificates not bound to a region.
pub const ANY_REGION: &str = "any";

fn check_part(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value != "."
        && value != "..";
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadPart {
            what,
            value: value.to_string(),
        })
    }
}

impl PeerIdentity {
    /// A checked identity.
    ///
    /// Errors: [`IdentityError::BadPart`] for a bad region or name.
    pub fn new(role: Role, region: &str, name: &str) -> Result<PeerIdentity, IdentityError> {
        check_part("region", region)?;
        check_part("name", name)?;
        Ok(PeerIdentity {
            role,
            region: region.to_string(),
            name: name.to_string(),
        })
    }

    /// `lifeboat://<region>/<role>/<name>`.
    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}/{}", self.region, self.role, self.name)
    }

    /// Parses [`PeerIdentity::uri`]'s format.
    ///
    /// Errors: [`IdentityError`].
    pub fn parse_uri(s: &str) -> Result<PeerIdentity, IdentityError> {
        let bad = || IdentityError::BadUri(s.to_string());
        let rest = s.strip_prefix(URI_SCHEME).ok_or_else(bad)?;
        let mut it = rest.split('/');
        let (Some(region), Some(role), Some(name), None) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad());
        };
        PeerIdentity::new(role.parse()?, region, name)
    }

    /// The identity in a DER certificate: its single `lifeboat://` URI SAN.
    ///
    /// Errors: [`IdentityError::BadCertificate`], [`IdentityError::NoIdentity`], or the URI's
    /// own error.
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let uris: Vec<&str> = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) if u.starts_with(URI_SCHEME) => Some(*u),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(IdentityError::BadCertificate(e.to_string())),
        };
        match uris.as_slice() {
            [one] => PeerIdentity::parse_uri(one),
            other => Err(IdentityError::NoIdentity(other.len())),
        }
    }

    /// Whether this identity may act as agent `agent_id` (an agent certificate of that name).
    pub fn is_agent(&self, agent_id: &str) -> bool {
        self.role == Role::Agent && self.name == agent_id
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// Who may call a method: any of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Coordinators and the witness.
    Peers,
    /// Coordinators only.
    Coordinators,
    /// Agents only (the handler also binds the agent id to the certificate).
    Agents,
    /// Coordinators and agents.
    CoordinatorsAndAgents,
    /// Coordinators, agents, and humans with at least this role.
    CoordinatorsAgentsAnd(Role),
    /// Every identity (peers, agents, viewers and up).
    Everyone,
    /// Humans with at least this role, and peers (which forward humans' calls).
    PeersAnd(Role),
    /// Humans with at least this role only.
    Humans(Role),
}

impl Allowed {
    /// Whether `role` is allowed.
    pub fn admits(self, role: Role) -> bool {
        match self {
            Allowed::Peers => role.is_peer(),
            Allowed::Coordinators => role == Role::Coordinator,
            Allowed::Agents => role == Role::Agent,
            Allowed::CoordinatorsAndAgents => matches!(role, Role::Coordinator | Role::Agent),
            Allowed::CoordinatorsAgentsAnd(min) => {
                matches!(role, Role::Coordinator | Role::Agent) || role.at_least(min)
            }
            Allowed::Everyone => true,
            Allowed::PeersAnd(min) => role.is_peer() || role.at_least(min),
            Allowed::Humans(min) => role.at_least(min),
        }
    }

    /// Who is allowed, in words (for refusals).
    pub fn describe(self) -> String {
        match self {
            Allowed::Peers => "coordinator or witness".into(),
            Allowed::Coordinators => "coordinator".into(),
            Allowed::Agents => "agent".into(),
            Allowed::CoordinatorsAndAgents => "coordinator or agent".into(),
            Allowed::CoordinatorsAgentsAnd(min) => format!("coordinator, agent or {min}+"),
            Allowed::Everyone => "any role".into(),
            Allowed::PeersAnd(min) => format!("{min}+ (or a coordinator forwarding)"),
            Allowed::Humans(min) => format!("{min}+"),
        }
    }
}

/// The authorization table of every gRPC method, by full path
/// (`/lifeboat.v1.AdminService/Status`). `None`: an unknown method (refused).
pub fn method_allowed(path: &str) -> Option<Allowed> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    use Allowed::*;
    Some(match (service, method) {
        ("lifeboat.v1.RaftService", "AppendEntries" | "InstallSnapshot" | "Vote") => Peers,
        ("lifeboat.v1.AgentService", "PushChanges" | "Heartbeat" | "PutParts") => Agents,
        ("lifeboat.v1.BlobService", "PutBlobs" | "BlobHealth") => Coordinators,
        // Replicas (agents), repair and replication (coordinators), restores (operators).
        ("lifeboat.v1.BlobService", "FetchBlobs") => CoordinatorsAgentsAnd(Role::Operator),
        ("lifeboat.v1.ReplicationService", "SubscribeCatalog") => CoordinatorsAndAgents,
        ("lifeboat.v1.ReplicationService", "ConfirmApplied") => Coordinators,
        ("lifeboat.v1.AdminService", "Status" | "ListVersions") => Everyone,
        ("lifeboat.v1.AdminService", "AddMember" | "RemoveMember" | "CollectGarbage") => {
            Humans(Role::Admin)
        }
        ("lifeboat.v1.AdminService", "TriggerSnapshot") => Humans(Role::Admin),
        ("lifeboat.v1.AdminService", "RotateDataKey" | "DataKeyStatus") => Humans(Role::Admin),
        // The global group's internal calls: lease renewal, reports that hand over pending
        // audit entries, relayed observations.
        ("lifeboat.v1.GlobalService", "Renew" | "Report" | "Observe") => Peers,
        (
            "lifeboat.v1.ControlService",
            "GlobalStatus" | "Audit" | "ShowTopology" | "PeekReport",
        ) => PeersAnd(Role::Viewer),
        ("lifeboat.v1.ControlService", "Switchover" | "Drill" | "ResolveConflict") => {
            PeersAnd(Role::Operator)
        }
        ("lifeboat.v1.ControlService", "ChangeTopology") => PeersAnd(Role::Admin),
        ("grpc.health.v1.Health", _) => Everyone,
        _ => return None,
    })
}

/// The refusal of `what` to `who` (`None`: no identity could be read), naming both sides.
pub fn denied(what: &str, allowed: Allowed, who: Result<&PeerIdentity, &IdentityError>) -> String {
    match who {
        Ok(id) => format!(
            "{what} needs role {}; the certificate presented is {id} (role {})",
            allowed.describe(),
            id.role
        ),
        Err(e) => format!("{what} needs role {}; {e}", allowed.describe()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips_and_rejects_bad_parts() {
        let id = PeerIdentity::new(Role::Agent, "eu", "a1").unwrap();
        assert_eq!(id.uri(), "lifeboat://eu/agent/a1");
        assert_eq!(PeerIdentity::parse_uri(&id.uri()).unwrap(), id);
        for bad in [
            "lifeboat://eu/agent",
            "lifeboat://eu/agent/a1/x",
            "lifeboat://eu/root/a1",
            "lifeboat://eu/agent/..",
            "lifeboat://e u/agent/a1",
            "https://eu/agent/a1",
            "lifeboat:///agent/a1",
        ] {
            assert!(PeerIdentity::parse_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn table_keeps_agents_out_of_admin_raft_and_internal_ops() {
        let m = |p: &str| method_allowed(p).unwrap();
        let agent = Role::Agent;
        assert!(!m("/lifeboat.v1.RaftService/AppendEntries").admits(agent));
        assert!(!m("/lifeboat.v1.RaftService/AppendEntries").admits(Role::Admin));
        assert!(m("/lifeboat.v1.RaftService/Vote").admits(Role::Witness));
        assert!(!m("/lifeboat.v1.AdminService/AddMember").admits(agent));
        assert!(!m("/lifeboat.v1.AdminService/AddMember").admits(Role::Operator));
        assert!(m("/lifeboat.v1.AdminService/AddMember").admits(Role::Admin));
        assert!(!m("/lifeboat.v1.AdminService/CollectGarbage").admits(Role::Coordinator));
        assert!(!m("/lifeboat.v1.BlobService/PutBlobs").admits(agent));
        assert!(!m("/lifeboat.v1.ReplicationService/ConfirmApplied").admits(agent));
        assert!(m("/lifeboat.v1.AgentService/Heartbeat").admits(agent));
        assert!(!m("/lifeboat.v1.AgentService/Heartbeat").admits(Role::Admin));
        assert!(m("/lifeboat.v1.BlobService/FetchBlobs").admits(Role::Operator));
        assert!(!m("/lifeboat.v1.BlobService/FetchBlobs").admits(Role::Viewer));
        assert_eq!(method_allowed("/lifeboat.v1.AdminService/Nope"), None);
        assert_eq!(method_allowed("garbage"), None);

        let c = |m: &str| method_allowed(&format!("/lifeboat.v1.ControlService/{m}")).unwrap();
        let g = |m: &str| method_allowed(&format!("/lifeboat.v1.GlobalService/{m}")).unwrap();
        assert!(!c("Switchover").admits(agent));
        assert!(!c("Switchover").admits(Role::Viewer));
        assert!(c("Switchover").admits(Role::Operator));
        assert!(c("Switchover").admits(Role::Coordinator));
        assert!(!g("Renew").admits(Role::Admin));
        assert!(g("Renew").admits(Role::Witness));
        assert!(
            !g("Report").admits(Role::Admin),
            "a draining report is internal"
        );
        assert!(c("PeekReport").admits(Role::Viewer));
        assert!(!c("PeekReport").admits(agent));
        assert!(c("Audit").admits(Role::Viewer));
        assert!(!c("ChangeTopology").admits(Role::Operator));
        assert!(c("ChangeTopology").admits(Role::Admin));
        assert!(c("ShowTopology").admits(Role::Viewer));
        assert_eq!(method_allowed("/lifeboat.v1.ControlService/Nope"), None);
    }

    #[test]
    fn issued_certificate_carries_the_identity() {
        let d = tempfile::tempdir().unwrap();
        crate::tls::init_dev_ca(d.path()).unwrap();
        let id = PeerIdentity::new(Role::Operator, ANY_REGION, "ops").unwrap();
        crate::tls::issue_cert(d.path(), &id, &[]).unwrap();
        let pem = std::fs::read(d.path().join("ops.pem")).unwrap();
        let der = rustls_pemfile_der(&pem);
        assert_eq!(PeerIdentity::from_der(&der).unwrap(), id);
        // The CA certificate has no identity.
        let ca = rustls_pemfile_der(&std::fs::read(d.path().join("ca.pem")).unwrap());
        assert_eq!(
            PeerIdentity::from_der(&ca),
            Err(IdentityError::NoIdentity(0))
        );
        assert!(PeerIdentity::from_der(b"not a certificate").is_err());
    }

    fn rustls_pemfile_der(pem: &[u8]) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem).unwrap();
        p.contents
    }
}
