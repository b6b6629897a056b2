//! S3 blob store: any S3-compatible server (AWS S3, SeaweedFS, MinIO, Ceph RGW...) through
//! aws-sdk-s3. Objects are stored under `<prefix>blobs/<2 hex>/<64 hex>` in one bucket, holding
//! the stored encoding of [`crate::blob`] unchanged.
//!
//! Durability point: a `put` returns once the server has confirmed the PutObject (HTTP 200), which
//! for S3 means the object is durably stored and visible to every reader of the bucket.
//! Credentials come from the configuration or, when it has none, from the usual AWS chain
//! (environment variables, shared profile files, web identity, ECS, IMDS); they never appear in
//! errors, logs or [`BlobStore::describe`].

use std::fmt;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use aws_sdk_s3::Client;

use super::{BlobStore, BlobStoreError, ListedBlob};
use crate::blob::BlobHash;

/// Attempts per S3 request (the first try plus retries of transient errors).
pub const S3_ATTEMPTS: u32 = 5;

fn default_region() -> String {
    "us-east-1".to_string()
}

fn default_true() -> bool {
    true
}

/// Configuration of the S3 backend (the `[blobstore.s3]`-style table of a config file).
///
/// Only `bucket` is required. Unknown fields are rejected so that a typo (`secret_key` for
/// `secret_access_key`) does not silently fall back to other credentials.
/// `Debug` prints the secret access key as `***`.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL of an S3-compatible server, scheme included, e.g. `"http://127.0.0.1:18335"`.
    /// `None` means AWS S3 itself (endpoint derived from `region`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region used for request signing (and, on AWS, to pick the endpoint). Default `"us-east-1"`,
    /// which S3-compatible servers generally accept.
    #[serde(default = "default_region")]
    pub region: String,
    /// Bucket that holds the blobs. Required, must not be empty.
    pub bucket: String,
    /// Prefix prepended verbatim to every object key, e.g. `"lifeboat/"` gives keys
    /// `lifeboat/blobs/ab/ab…`. Default `""` (keys start with `blobs/`). Include the trailing `/`.
    #[serde(default)]
    pub prefix: String,
    /// Path-style addressing (`http://host/bucket/key`) instead of virtual-hosted style
    /// (`http://bucket.host/key`). Default `true`, which S3-compatible servers need; AWS works with
    /// both.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Access key id. Must be given together with `secret_access_key`. When both are `None`,
    /// credentials come from the AWS environment/profile chain.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key. Must be given together with `access_key_id`. Never printed.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Create the bucket at open if it does not exist. Default `false`: a missing bucket is an
    /// error at open.
    #[serde(default)]
    pub create_bucket: bool,
}

impl S3Config {
    /// A configuration for `bucket` with every other field at its default (AWS endpoint,
    /// `us-east-1`, no prefix, path style, credentials from the environment, no bucket creation).
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Config {
            endpoint: None,
            region: default_region(),
            bucket: bucket.into(),
            prefix: String::new(),
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            create_bucket: false,
        }
    }

    /// Where the store is, without credentials: `s3://<bucket>/<prefix> at <endpoint>` (the
    /// endpoint is `AWS S3 (<region>)` when none is configured).
    pub fn describe(&self) -> String {
        let at = match &self.endpoint {
            Some(ep) => ep.clone(),
            None => format!("AWS S3 ({})", self.region),
        };
        format!("s3://{}/{} at {}", self.bucket, self.prefix, at)
    }

    /// Checks the fields that do not need the server.
    ///
    /// Errors: [`BlobStoreError::Config`] for an empty bucket or region, an endpoint without an
    /// `http://`/`https://` scheme, or only one of the two credential fields.
    pub fn validate(&self) -> Result<(), BlobStoreError> {
        if self.bucket.trim().is_empty() {
            return Err(BlobStoreError::Config(
                "s3: `bucket` must not be empty".into(),
            ));
        }
        if self.region.trim().is_empty() {
            return Err(BlobStoreError::Config(
                "s3: `region` must not be empty (use \"us-east-1\" for most S3-compatible servers)"
                    .into(),
            ));
        }
        if let Some(ep) = &self.endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(BlobStoreError::Config(format!(
                    "s3: `endpoint` {ep:?} must start with http:// or https://"
                )));
            }
        }
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(_), None) | (None, Some(_)) => Err(BlobStoreError::Config(
                "s3: `access_key_id` and `secret_access_key` must be given together (or both \
                 omitted to use the AWS environment/profile credentials)"
                    .into(),
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("create_bucket", &self.create_bucket)
            .finish()
    }
}

/// Blob store in an S3 bucket, shared by every coordinator that opens the same bucket and prefix.
///
/// Cheap to clone (the SDK client is reference-counted).
#[derive(Clone)]
pub struct S3BlobStore {
    client: Client,
    cfg: S3Config,
}

impl fmt::Debug for S3BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3BlobStore")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl S3BlobStore {
    /// Builds the S3 client from `cfg` and checks that the bucket is reachable with a HeadBucket
    /// (creating the bucket when it is missing and `cfg.create_bucket` is set).
    ///
    /// Errors: [`BlobStoreError::Config`] for an invalid `cfg` (see [`S3Config::validate`]);
    /// [`BlobStoreError::S3`] (op `HeadBucket` or `CreateBucket`, key = bucket) when the server
    /// cannot be reached, refuses the credentials, or the bucket is missing; its message says
    /// which of endpoint, bucket, region or credentials to check and never contains the secret.
    pub async fn open(cfg: S3Config) -> Result<Self, BlobStoreError> {
        cfg.validate()?;
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).region(Region::new(cfg.region.clone()));
        if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "lifeboat-config",
            ));
        }
        let sdk = loader.load().await;
        // Transient answers (5xx, throttling, timeouts: e.g. a server still starting) are retried
        // with jittered exponential backoff, 5 attempts in all (the SDK's default is 3).
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .region(Region::new(cfg.region.clone()))
            .force_path_style(cfg.path_style)
            .retry_config(
                aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(S3_ATTEMPTS),
            );
        if let Some(ep) = &cfg.endpoint {
            builder = builder.endpoint_url(ep.clone());
        }
        let store = S3BlobStore {
            client: Client::from_conf(builder.build()),
            cfg,
        };
        store.check_bucket().await?;
        tracing::info!(store = %store.describe(), "opened S3 blob store");
        Ok(store)
    }

    /// Object key of a blob: `<prefix>blobs/<2 hex>/<64 hex>`.
    pub fn key_of(&self, hash: &BlobHash) -> String {
        format!("{}{}", self.cfg.prefix, hash.key())
    }

    /// GetObject of `key` (only its first `range` bytes when given); `None` when absent.
    async fn get_object(
        &self,
        key: &str,
        range: Option<usize>,
    ) -> Result<Option<Vec<u8>>, BlobStoreError> {
        let mut req = self.client.get_object().bucket(&self.cfg.bucket).key(key);
        if let Some(n) = range {
            req = req.range(format!("bytes=0-{}", n.saturating_sub(1)));
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || http_status(&e) == Some(404) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(self.s3_err("GetObject", key.to_string(), &e)),
        };
        let body = resp.body.collect().await.map_err(|e| BlobStoreError::S3 {
            op: "GetObject",
            key: key.to_string(),
            message: format!(
                "reading the body failed: {} (bucket {:?} at {})",
                error_chain(&e),
                self.cfg.bucket,
                self.endpoint_text()
            ),
        })?;
        Ok(Some(body.into_bytes().to_vec()))
    }

    /// Every object whose key starts with `prefix`, page by page (ListObjectsV2, continuation
    /// tokens): the rest of its key after `prefix`, `LastModified` (ms since the Unix epoch, 0
    /// when missing) and its size in bytes.
    async fn list_under(&self, prefix: &str) -> Result<Vec<(String, i64, u64)>, BlobStoreError> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.cfg.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.s3_err("ListObjectsV2", prefix.to_string(), &e))?;
            for obj in page.contents() {
                let Some(rest) = obj.key().and_then(|k| k.strip_prefix(prefix)) else {
                    continue;
                };
                out.push((
                    rest.to_string(),
                    obj.last_modified()
                        .and_then(|t| t.to_millis().ok())
                        .unwrap_or(0),
                    obj.size().unwrap_or(0).max(0) as u64,
                ));
            }
        }
        Ok(out)
    }

    /// The configuration this store was opened with (its `Debug` hides the secret).
    pub fn config(&self) -> &S3Config {
        &self.cfg
    }

    fn endpoint_text(&self) -> String {
        match &self.cfg.endpoint {
            Some(ep) => ep.clone(),
            None => format!("AWS S3 ({})", self.cfg.region),
        }
    }

    async fn check_bucket(&self) -> Result<(), BlobStoreError> {
        let bucket = &self.cfg.bucket;
        let at = self.endpoint_text();
        let err = match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let status = http_status(&err);
        let not_found =
            status == Some(404) || err.as_service_error().is_some_and(|s| s.is_not_found());
        if not_found && self.cfg.create_bucket {
            return self.create_bucket().await;
        }
        let detail = sdk_error_text(&err);
        let hint = if not_found {
            format!(
                "bucket {bucket:?} does not exist at {at}: check `bucket`, or create it \
                 (`create_bucket = true` creates it at open)"
            )
        } else if matches!(status, Some(401) | Some(403)) {
            format!(
                "access to bucket {bucket:?} at {at} denied: check the credentials \
                 (`access_key_id`/`secret_access_key`, or the AWS environment/profile when \
                 they are not set) and that they may use this bucket"
            )
        } else if matches!(status, Some(301) | Some(307) | Some(400)) {
            format!(
                "bucket {bucket:?} at {at} answered HTTP {}: check `region` (now {:?}) and \
                 `path_style`",
                status.unwrap_or(0),
                self.cfg.region
            )
        } else if matches!(
            err,
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)
        ) {
            format!("cannot reach the S3 server at {at}: check `endpoint` and that the server runs")
        } else {
            format!(
                "cannot access bucket {bucket:?} at {at}: check `endpoint`, `bucket`, `region` \
                 and the credentials"
            )
        };
        Err(BlobStoreError::S3 {
            op: "HeadBucket",
            key: bucket.clone(),
            message: format!("{hint} ({detail})"),
        })
    }

    async fn create_bucket(&self) -> Result<(), BlobStoreError> {
        let bucket = &self.cfg.bucket;
        let mut req = self.client.create_bucket().bucket(bucket);
        // us-east-1 is the one region that must not be named as a location constraint.
        if self.cfg.region != "us-east-1" {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.cfg.region.as_str()))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => {
                tracing::info!(bucket = %bucket, at = %self.endpoint_text(), "created S3 bucket");
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_bucket_already_owned_by_you()) =>
            {
                Ok(())
            }
            Err(e) => Err(BlobStoreError::S3 {
                op: "CreateBucket",
                key: bucket.clone(),
                message: format!(
                    "cannot create bucket {bucket:?} at {}: check `bucket` (name rules), \
                     `region` and that the credentials may create buckets ({})",
                    self.endpoint_text(),
                    sdk_error_text(&e)
                ),
            }),
        }
    }

    fn s3_err<E>(&self, op: &'static str, key: String, err: &SdkError<E>) -> BlobStoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        BlobStoreError::S3 {
            op,
            key,
            message: format!(
                "{} (bucket {:?} at {})",
                sdk_error_text(err),
                self.cfg.bucket,
                self.endpoint_text()
            ),
        }
    }
}

/// HTTP status of the response behind an SDK error, when there was one.
fn http_status<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// One-line description of an SDK error: HTTP status, service code and message (or request id),
/// or the transport error chain. Contains no credentials (the SDK never puts them in errors) and
/// no raw response dump.
fn sdk_error_text<E>(err: &SdkError<E>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = http_status(err);
    if let Some(se) = err.as_service_error() {
        let mut s = match status {
            Some(st) => format!("HTTP {st}"),
            None => "service error".to_string(),
        };
        if let Some(code) = se.code() {
            s.push_str(&format!(" {code}"));
        }
        if let Some(msg) = se.message() {
            s.push_str(&format!(": {msg}"));
        }
        if se.code().is_none() && se.message().is_none() {
            s.push_str(" without error details");
        }
        if let Some(id) = se.meta().extra("aws_request_id") {
            s.push_str(&format!(" (request id {id})"));
        }
        return s;
    }
    let chain = error_chain(err);
    match status {
        Some(st) => format!("HTTP {st}: {chain}"),
        None => chain,
    }
}

/// `err: source: source...`, each error's `Display` only.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = e.source();
    }
    s
}

#[async_trait::async_trait]
impl BlobStore for S3BlobStore {
    /// PutObject of the stored bytes. Re-putting a blob rewrites identical content, so it is
    /// idempotent. Returns once the server confirmed the write.
    async fn put(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<(), BlobStoreError> {
        let key = self.key_of(hash);
        self.client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(&key)
            .content_type("application/octet-stream")
            .body(ByteStream::from(stored))
            .send()
            .await
            .map_err(|e| self.s3_err("PutObject", key, &e))?;
        Ok(())
    }

    async fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobStoreError> {
        match self.get_object(&self.key_of(hash), None).await? {
            Some(b) => Ok(b),
            None => Err(BlobStoreError::NotFound(*hash)),
        }
    }

    /// A ranged GetObject (`bytes=0-<len-1>`).
    async fn read_prefix(&self, hash: &BlobHash, len: usize) -> Result<Vec<u8>, BlobStoreError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let key = self.key_of(hash);
        match self.get_object(&key, Some(len)).await? {
            Some(b) => Ok(b),
            None => Err(BlobStoreError::NotFound(*hash)),
        }
    }

    /// PutObject of `<prefix><name>`.
    async fn put_aux(&self, name: &str, data: Vec<u8>) -> Result<(), BlobStoreError> {
        super::check_aux_name(name)?;
        let key = format!("{}{name}", self.cfg.prefix);
        self.client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(&key)
            .content_type("application/octet-stream")
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.s3_err("PutObject", key, &e))?;
        Ok(())
    }

    async fn get_aux(&self, name: &str) -> Result<Option<Vec<u8>>, BlobStoreError> {
        super::check_aux_name(name)?;
        self.get_object(&format!("{}{name}", self.cfg.prefix), None)
            .await
    }

    /// ListObjectsV2 under `<prefix><dir>/`, without descending into sub-folders.
    async fn list_aux(&self, dir: &str) -> Result<Vec<String>, BlobStoreError> {
        super::check_aux_name(dir)?;
        let listed = self
            .list_under(&format!("{}{dir}/", self.cfg.prefix))
            .await?;
        Ok(listed
            .into_iter()
            .filter(|(rest, ..)| !rest.is_empty() && !rest.contains('/') && !rest.starts_with('.'))
            .map(|(rest, ..)| format!("{dir}/{rest}"))
            .collect())
    }

    async fn contains(&self, hash: &BlobHash) -> Result<bool, BlobStoreError> {
        let key = self.key_of(hash);
        match self
            .client
            .head_object()
            .bucket(&self.cfg.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_not_found())
                    || http_status(&e) == Some(404) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.s3_err("HeadObject", key, &e)),
        }
    }

    /// ListObjectsV2 under `<prefix>blobs/`, page by page (continuation tokens); keys that are
    /// not `<2 hex>/<64 hex>` are skipped.
    async fn list(&self) -> Result<Vec<ListedBlob>, BlobStoreError> {
        let listed = self
            .list_under(&format!("{}blobs/", self.cfg.prefix))
            .await?;
        Ok(listed
            .into_iter()
            .filter_map(|(rest, modified_ms, stored_bytes)| {
                let (dir, name) = rest.split_once('/')?;
                let hash = BlobHash::from_hex(name).ok()?;
                (dir.len() == 2 && name.starts_with(dir)).then_some(ListedBlob {
                    hash,
                    modified_ms,
                    stored_bytes,
                })
            })
            .collect())
    }

    /// DeleteObject (S3 answers success for a missing key too).
    async fn delete(&self, hash: &BlobHash) -> Result<(), BlobStoreError> {
        let key = self.key_of(hash);
        match self
            .client
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if http_status(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.s3_err("DeleteObject", key, &e)),
        }
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        self.cfg.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_debug_hides_secret() {
        let cfg: S3Config = toml::from_str(
            r#"
            endpoint = "http://127.0.0.1:9000"
            bucket = "b"
            access_key_id = "AKID"
            secret_access_key = "very-secret-value"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.region, "us-east-1");
        assert_eq!(cfg.prefix, "");
        assert!(cfg.path_style);
        assert!(!cfg.create_bucket);
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("very-secret-value"), "{dbg}");
        assert!(dbg.contains("***"), "{dbg}");
        assert!(!cfg.describe().contains("very-secret-value"));
        assert!(!cfg.describe().contains("AKID"));
        assert_eq!(cfg.describe(), "s3://b/ at http://127.0.0.1:9000");
        cfg.validate().unwrap();
    }

    #[test]
    fn config_rejects_unknown_fields_and_half_credentials() {
        assert!(toml::from_str::<S3Config>("bucket = \"b\"\nsecret_key = \"x\"").is_err());
        let mut cfg = S3Config::new("b");
        cfg.access_key_id = Some("a".into());
        assert!(matches!(cfg.validate(), Err(BlobStoreError::Config(_))));
        let mut cfg = S3Config::new("");
        assert!(cfg.validate().is_err());
        cfg.bucket = "b".into();
        cfg.endpoint = Some("127.0.0.1:9000".into());
        assert!(cfg.validate().is_err());
    }
}
