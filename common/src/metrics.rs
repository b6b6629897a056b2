//! Prometheus exposition shared by the coordinator and the agent: [`Emit`], a small writer of
//! gauges and counters for `prometheus_client` collectors that read a process's state at scrape
//! time; [`serve`], the `/metrics` HTTP listener (hyper 1, plain HTTP, OpenMetrics text); and
//! [`cert_not_after`], the expiry of a PEM certificate.
//!
//! Names follow the Prometheus conventions: prefix `lifeboat_`, base units (`_seconds`,
//! `_bytes`), and counters end in `_total` (the encoder appends it: pass names without it).

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

pub use prometheus_client;

/// Content type of the OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Errors of the metrics listener and certificate reading.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `metrics_addr` is not a socket address.
    #[error("metrics_addr {addr:?} is not host:port: {message}")]
    BadAddr {
        /// Configured value.
        addr: String,
        /// Parser message.
        message: String,
    },
    /// The listener could not bind.
    #[error("metrics listener: cannot bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The certificate file could not be read.
    #[error("cannot read certificate {path}: {source}")]
    ReadCert {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The certificate file holds no parsable PEM certificate.
    #[error("certificate {path}: {message}")]
    BadCert {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
}

/// Parses a `metrics_addr` config value (`host:port`, an IP address).
///
/// Errors: [`MetricsError::BadAddr`].
pub fn parse_addr(addr: &str) -> Result<SocketAddr, MetricsError> {
    addr.parse()
        .map_err(|e: std::net::AddrParseError| MetricsError::BadAddr {
            addr: addr.to_string(),
            message: e.to_string(),
        })
}

/// A sample's labels: (name, value) pairs.
pub type Labels = Vec<(String, String)>;

fn one_label(label: &str, value: String) -> Labels {
    match label {
        "" => Vec::new(),
        l => vec![(l.to_string(), value)],
    }
}

/// Writes metric families into a collector's [`DescriptorEncoder`]. Families without samples
/// are left out.
pub struct Emit<'a> {
    enc: DescriptorEncoder<'a>,
}

impl<'a> Emit<'a> {
    /// Wraps the encoder a `Collector::encode` receives.
    pub fn new(enc: DescriptorEncoder<'a>) -> Self {
        Emit { enc }
    }

    /// One unlabelled gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> fmt::Result {
        self.gauges(name, help, "", [(String::new(), value)])
    }

    /// One gauge family with a single label `label`: one sample per `(label value, value)`.
    /// An empty `label` writes unlabelled samples.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (String, f64)>,
    ) -> fmt::Result {
        let samples: Vec<(Labels, f64)> = samples
            .into_iter()
            .map(|(v, x)| (one_label(label, v), x))
            .collect();
        self.gauge_family(name, help, samples)
    }

    /// One gauge family, each sample with its own label set (all with the same label names).
    pub fn gauge_family(
        &mut self,
        name: &str,
        help: &str,
        samples: Vec<(Labels, f64)>,
    ) -> fmt::Result {
        self.family(
            name,
            help,
            samples.into_iter().map(|(l, x)| (l, ConstGauge::new(x))),
        )
    }

    /// One unlabelled counter; `name` without the `_total` suffix (the encoder appends it).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        self.counters(name, help, "", [(String::new(), value)])
    }

    /// One counter family with a single label (see [`Emit::gauges`]); `name` without `_total`.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (String, u64)>,
    ) -> fmt::Result {
        let samples = samples
            .into_iter()
            .map(|(v, x)| (one_label(label, v), ConstCounter::new(x)));
        self.family(name, help, samples)
    }

    /// Writes one family of constant metrics (nothing when there is no sample). A sample
    /// without labels is written alone, with the descriptor's own encoder.
    fn family<M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, M)>,
    ) -> fmt::Result {
        let mut samples = samples.into_iter().peekable();
        let Some(first) = samples.peek() else {
            return Ok(());
        };
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, first.1.metric_type())?;
        for (labels, x) in samples {
            if labels.is_empty() {
                return x.encode(m);
            }
            x.encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch as seconds (the unit of every `_timestamp_seconds` metric).
pub fn ms_to_s(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The `notAfter` of the first certificate in a PEM file, in seconds since the Unix epoch.
///
/// Errors: [`MetricsError::ReadCert`], [`MetricsError::BadCert`].
pub fn cert_not_after(path: &Path) -> Result<i64, MetricsError> {
    let pem = std::fs::read(path).map_err(|source| MetricsError::ReadCert {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |message: String| MetricsError::BadCert {
        path: path.to_path_buf(),
        message,
    };
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| bad(e.to_string()))?;
    let cert = p.parse_x509().map_err(|e| bad(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Binds `addr` and serves `GET /metrics` (the registry encoded at each request) until the
/// returned task is aborted; other paths answer 404. Returns the bound address (port 0 picks
/// one) and the task.
///
/// Errors: [`MetricsError::Bind`].
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    tracing::info!(addr = %local, "metrics listener: GET /metrics");
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let r = respond(&registry, &req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    });
    Ok((local, task))
}

fn respond<B>(registry: &Registry, req: &Request<B>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: try /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
        tracing::warn!(error = %e, "metrics encoding failed");
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
    }
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;

    #[derive(Debug)]
    struct Two;

    impl Collector for Two {
        fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
            let mut e = Emit::new(enc);
            e.gauge("lifeboat_epoch", "Epoch.", 2.0)?;
            e.gauges(
                "lifeboat_active_region",
                "Active region.",
                "region",
                [("a".to_string(), 0.0), ("b".to_string(), 1.0)],
            )?;
            e.counter("lifeboat_batches_acked", "Batches.", 7)?;
            e.gauges("lifeboat_empty", "Nothing.", "x", [])
        }
    }

    #[test]
    fn emits_gauges_and_counters_in_openmetrics_text() {
        let mut r = Registry::default();
        r.register_collector(Box::new(Two));
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &r).unwrap();
        assert!(s.contains("\nlifeboat_epoch 2.0\n"), "{s}");
        assert!(
            s.contains("lifeboat_active_region{region=\"b\"} 1.0"),
            "{s}"
        );
        assert!(s.contains("lifeboat_batches_acked_total 7"), "{s}");
        assert!(!s.contains("lifeboat_empty"), "{s}");
        assert!(s.ends_with("# EOF\n"), "{s}");
    }

    /// A raw HTTP/1.1 GET of `path` on `addr`: the whole response.
    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_404_elsewhere() {
        let mut r = Registry::default();
        r.register_collector(Box::new(Two));
        let (addr, task) = serve(parse_addr("127.0.0.1:0").unwrap(), Arc::new(r))
            .await
            .unwrap();
        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.contains("lifeboat_batches_acked_total 7"), "{ok}");
        let nf = get(addr, "/other").await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        task.abort();
        assert!(parse_addr("localhost:1").is_err());
    }

    #[test]
    fn reads_the_expiry_of_a_dev_certificate() {
        let d = tempfile::tempdir().unwrap();
        crate::tls::init_dev_ca(d.path()).unwrap();
        let id = crate::authz::PeerIdentity::new(crate::authz::Role::Agent, "a", "n1").unwrap();
        crate::tls::issue_cert(d.path(), &id, &[]).unwrap();
        let at = cert_not_after(&d.path().join("n1.pem")).unwrap();
        let days = (at - crate::now_ms() / 1000) / 86_400;
        assert!(
            (crate::tls::LEAF_DAYS - 2..=crate::tls::LEAF_DAYS).contains(&days),
            "{days}"
        );
        assert!(cert_not_after(&d.path().join("missing.pem")).is_err());
    }
}
