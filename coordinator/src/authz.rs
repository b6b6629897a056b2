//! The gRPC edge's authorization: a tower layer that reads the caller's identity from its
//! client certificate and checks the one table in [`lifeboat_common::authz`] before any handler
//! runs. The identity is put into the request's extensions ([`caller`]) so handlers can bind an
//! agent id to it and record it as the actor of audited actions.
//!
//! A refusal answers `PERMISSION_DENIED` naming the role needed and the identity presented, and
//! is logged (`audit = "denied"`) with the certificate identity. With `[tls] insecure = true`
//! there are no certificates and nothing is checked (a debugging mode, warned about at start).

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use lifeboat_common::authz::{self, IdentityError, PeerIdentity};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

/// The identity of the caller of `req`, as checked by [`AuthzLayer`] (`None` only with
/// `insecure = true`).
pub fn caller<T>(req: &tonic::Request<T>) -> Option<&PeerIdentity> {
    req.extensions().get::<PeerIdentity>()
}

/// Checks that the caller of `req` is agent `agent_id` (its certificate's name); a no-op
/// without TLS.
///
/// Errors: `PERMISSION_DENIED` naming both ids.
pub fn ensure_agent<T>(req: &tonic::Request<T>, agent_id: &str) -> Result<(), Status> {
    match caller(req) {
        None => Ok(()),
        Some(id) if id.is_agent(agent_id) => Ok(()),
        Some(id) => {
            tracing::warn!(audit = "denied", caller = %id, agent_id, "agent id not bound to the certificate");
            Err(Status::permission_denied(format!(
                "agent id {agent_id:?} does not match the certificate presented ({id}): an agent acts only as itself"
            )))
        }
    }
}

/// Tower layer checking every call (see the module docs). `enabled = false` (insecure) lets
/// everything through.
#[derive(Clone)]
pub struct AuthzLayer {
    enabled: bool,
}

impl AuthzLayer {
    /// A layer that checks calls when `enabled` (TLS on).
    pub fn new(enabled: bool) -> Self {
        AuthzLayer { enabled }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            enabled: self.enabled,
        }
    }
}

/// The service built by [`AuthzLayer`].
#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    enabled: bool,
}

/// The identity in the leaf certificate of `certs`.
fn identity_of(
    certs: Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
) -> Result<PeerIdentity, IdentityError> {
    let certs = certs.ok_or(IdentityError::NoIdentity(0))?;
    let leaf = certs.first().ok_or(IdentityError::NoIdentity(0))?;
    PeerIdentity::from_der(leaf.as_ref())
}

/// Decides on one call: the caller's identity, or the refusal.
fn check(path: &str, ext: &http::Extensions) -> Result<PeerIdentity, Status> {
    let who = identity_of(
        ext.get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs()),
    );
    let Some(allowed) = authz::method_allowed(path) else {
        return Err(Status::unimplemented(format!("unknown method {path}")));
    };
    match &who {
        Ok(id) if allowed.admits(id.role) => Ok(id.clone()),
        _ => {
            let msg = authz::denied(path, allowed, who.as_ref());
            match &who {
                Ok(id) => tracing::warn!(audit = "denied", caller = %id, method = path, "{msg}"),
                Err(e) => tracing::warn!(audit = "denied", error = %e, method = path, "{msg}"),
            }
            Err(Status::permission_denied(msg))
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if self.enabled {
            match check(req.uri().path(), req.extensions()) {
                Ok(id) => {
                    req.extensions_mut().insert(id);
                }
                Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
            }
        }
        // The clone that was made ready is the one called (tower's documented pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req))
    }
}
