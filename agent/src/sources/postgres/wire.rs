//! A client of PostgreSQL's streaming replication protocol for `BASE_BACKUP` (PostgreSQL 15 and
//! newer): the agent receives the base backup's tar from the server's walsender straight into
//! its spool, without a `pg_basebackup` process and the pipe between them (on the 1.1 GB
//! benchmark database that process spent about 0.9 s of CPU copying into its stdout pipe).
//!
//! Sources: the replication protocol (<https://www.postgresql.org/docs/15/protocol-replication.html>,
//! `BASE_BACKUP`) and the message flow (<https://www.postgresql.org/docs/15/protocol-flow.html>:
//! start-up, authentication, COPY OUT). Messages are framed and parsed by `postgres-protocol`
//! (the rust-postgres project), which also provides the MD5 and SCRAM-SHA-256 authentication.
//!
//! **The command** is what `pg_basebackup -Ft -D - -X fetch -c fast` sends (as logged by the
//! server with `log_replication_commands`), minus `PROGRESS` (which costs the server an extra
//! scan of the data directory):
//! `BASE_BACKUP ( LABEL 'lifeboat base backup', WAL, CHECKPOINT 'fast', WAIT 0, TABLESPACE_MAP,
//! MANIFEST 'yes', TARGET 'client' )`.
//!
//! **The output** is the tar `pg_basebackup` writes to stdout: the server's base archive (a
//! PostgreSQL 15 server terminates it with two zero blocks), whose terminator is held back so
//! that the backup manifest can be appended as the member `backup_manifest` before a new
//! terminator, as `pg_basebackup` does when it writes a tar to stdout. `pg_verifybackup` accepts
//! the extracted directory (tested in `databases_postgres_base_backup_and_pitr`).
//!
//! **Limits**, as `pg_basebackup -D -`: only the `pg_default` tablespace (a second archive is an
//! error). Connections are plaintext (TCP or a Unix socket directory as `host`), like the
//! agent's SQL connections. Cases this client cannot serve are reported as
//! [`WireError::Unsupported`] before anything was written, and the caller runs `pg_basebackup`
//! instead: a server older than 15, a password requested while `password_env` is not set (libpq
//! may find one in `~/.pgpass`), Kerberos/GSS/SSPI authentication, or a refused connection
//! (SQLSTATE 28000: for example `pg_hba.conf` accepts only `hostssl`).

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorFields, ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::postgres::PostgresSourceConfig;
use crate::snapshot::spool::SpoolFile;

/// The `BASE_BACKUP` command sent (see the module documentation).
pub const BASE_BACKUP_COMMAND: &str = "BASE_BACKUP ( LABEL 'lifeboat base backup', WAL, \
     CHECKPOINT 'fast', WAIT 0, TABLESPACE_MAP, MANIFEST 'yes', TARGET 'client' )";
/// Largest backend message accepted, in bytes (base backup `CopyData` messages are 32 KiB).
const MAX_MESSAGE: usize = 64 << 20;
/// Largest backup manifest accepted, in bytes (about 200 bytes per file of the data directory).
const MAX_MANIFEST: usize = 1 << 30;
/// Bytes reserved in the read buffer before each read.
const READ_CHUNK: usize = 256 << 10;
/// Connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A tar block, in bytes.
const TAR_BLOCK: usize = 512;
/// The end-of-archive marker of a tar: two zero blocks.
const TAR_TRAILER: usize = 2 * TAR_BLOCK;

/// Why a base backup over the replication protocol did not complete.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// This server or setup needs `pg_basebackup` (the reason); nothing was written.
    #[error("{0}")]
    Unsupported(String),
    /// The base backup failed (the server's error, an I/O error or a protocol violation); the
    /// spool holds a partial tar.
    #[error("{0}")]
    Failed(String),
}

fn failed(what: &str, e: impl std::fmt::Display) -> WireError {
    WireError::Failed(format!("{what}: {e}"))
}

/// What a completed base backup returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBackupSummary {
    /// The server's `server_version` (e.g. `15.18 (Debian 15.18-0+deb12u1)`).
    pub server_version: String,
    /// Bytes of the tar written to the spool (archive, manifest member and terminator).
    pub tar_bytes: u64,
    /// Bytes of the backup manifest appended (0 if the server sent none).
    pub manifest_bytes: u64,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One replication connection: the stream and its read and write buffers.
struct Conn {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    /// Connects to `host:port` over TCP, or to the Unix socket `host/.s.PGSQL.port` when `host`
    /// is an absolute directory (libpq's convention).
    async fn open(host: &str, port: u16) -> Result<Conn, WireError> {
        let connect = async {
            let io: Box<dyn Io> = if host.starts_with('/') {
                let path = Path::new(host).join(format!(".s.PGSQL.{port}"));
                Box::new(tokio::net::UnixStream::connect(path).await?)
            } else {
                let s = tokio::net::TcpStream::connect((host, port)).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            };
            Ok::<_, std::io::Error>(io)
        };
        let io = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| failed(&format!("cannot connect to {host}:{port}"), "timed out"))?
            .map_err(|e| failed(&format!("cannot connect to {host}:{port}"), e))?;
        Ok(Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK * 4),
            wbuf: BytesMut::new(),
        })
    }

    /// Sends what is in the write buffer.
    async fn flush(&mut self) -> Result<(), WireError> {
        self.io
            .write_all(&self.wbuf)
            .await
            .map_err(|e| failed("cannot send to the server", e))?;
        self.wbuf.clear();
        self.io
            .flush()
            .await
            .map_err(|e| failed("cannot send to the server", e))
    }

    /// The next backend message. Errors: the connection ended or failed, a message longer than
    /// [`MAX_MESSAGE`], or one `postgres-protocol` cannot parse.
    async fn recv(&mut self) -> Result<Message, WireError> {
        loop {
            if self.rbuf.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
                if len as usize > MAX_MESSAGE {
                    return Err(WireError::Failed(format!(
                        "the server sent a message of {len} bytes (type {:?}); at most {MAX_MESSAGE} are accepted",
                        char::from(self.rbuf[0])
                    )));
                }
            }
            if let Some(m) = Message::parse(&mut self.rbuf)
                .map_err(|e| failed("malformed message from the server", e))?
            {
                return Ok(m);
            }
            self.rbuf.reserve(READ_CHUNK);
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| failed("cannot read from the server", e))?;
            if n == 0 {
                return Err(WireError::Failed("the server closed the connection".into()));
            }
        }
    }
}

/// A server `ErrorResponse` as `SEVERITY SQLSTATE: message`, and its SQLSTATE.
fn server_error(body: &ErrorResponseBody) -> (String, String) {
    describe(body.fields())
}

/// The fields of an `ErrorResponse` or `NoticeResponse` as `SEVERITY SQLSTATE: message`, and
/// the SQLSTATE.
fn describe(mut fields: ErrorFields<'_>) -> (String, String) {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'S' => severity = v,
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    (format!("{severity} {code}: {message}"), code)
}

/// The major version from a `server_version` such as `15.18 (Debian 15.18-0+deb12u1)` or
/// `16beta1`.
fn major_version(v: &str) -> Option<u32> {
    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Opens a physical replication connection to `src` and authenticates (trust, password, MD5 or
/// SCRAM-SHA-256 without channel binding). Returns the connection, ready for a query, and the
/// server's `server_version`.
///
/// Errors: [`WireError::Unsupported`] for the cases listed in the module documentation,
/// [`WireError::Failed`] otherwise (connection refused, wrong password, ...).
async fn connect(src: &PostgresSourceConfig) -> Result<(Conn, String), WireError> {
    let mut conn = Conn::open(&src.host, src.port).await?;
    let password = src.password().map_err(WireError::Failed)?;
    let need_password = || {
        password.clone().ok_or_else(|| {
            WireError::Unsupported(
                "the server asks for a password and password_env is not set (pg_basebackup may find one in ~/.pgpass)"
                    .into(),
            )
        })
    };
    frontend::startup_message(
        [
            ("user", src.user.as_str()),
            ("replication", "true"),
            ("application_name", "lifeboat-agent"),
        ],
        &mut conn.wbuf,
    )
    .map_err(|e| failed("cannot encode the start-up message", e))?;
    conn.flush().await?;
    let mut scram: Option<ScramSha256> = None;
    loop {
        match conn.recv().await? {
            Message::AuthenticationOk => break,
            Message::AuthenticationCleartextPassword => {
                let pw = need_password()?;
                frontend::password_message(pw.as_bytes(), &mut conn.wbuf)
                    .map_err(|e| failed("cannot encode the password message", e))?;
                conn.flush().await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let pw = need_password()?;
                let hash = md5_hash(src.user.as_bytes(), pw.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut conn.wbuf)
                    .map_err(|e| failed("cannot encode the password message", e))?;
                conn.flush().await?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut scram_offered = false;
                while let Some(m) = mechanisms
                    .next()
                    .map_err(|e| failed("malformed SASL mechanism list", e))?
                {
                    scram_offered |= m == SCRAM_SHA_256;
                }
                if !scram_offered {
                    return Err(WireError::Unsupported(
                        "the server offers no SASL mechanism but SCRAM-SHA-256-PLUS (channel binding needs TLS)"
                            .into(),
                    ));
                }
                let pw = need_password()?;
                let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut conn.wbuf)
                    .map_err(|e| failed("cannot encode the SASL response", e))?;
                conn.flush().await?;
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram.as_mut().ok_or_else(|| {
                    WireError::Failed("SASL continue without a SASL exchange".into())
                })?;
                s.update(body.data())
                    .map_err(|e| failed("SCRAM-SHA-256 exchange failed", e))?;
                frontend::sasl_response(s.message(), &mut conn.wbuf)
                    .map_err(|e| failed("cannot encode the SASL response", e))?;
                conn.flush().await?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = scram.as_mut().ok_or_else(|| {
                    WireError::Failed("SASL final without a SASL exchange".into())
                })?;
                s.finish(body.data())
                    .map_err(|e| failed("the server's SCRAM-SHA-256 proof is wrong", e))?;
            }
            Message::AuthenticationGss
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationSspi
            | Message::AuthenticationScmCredential => {
                return Err(WireError::Unsupported(
                    "the server asks for Kerberos/GSS/SSPI/SCM authentication".into(),
                ));
            }
            Message::ErrorResponse(body) => {
                let (text, code) = server_error(&body);
                return Err(if code == "28000" {
                    WireError::Unsupported(format!(
                        "the server refused a plaintext replication connection ({text})"
                    ))
                } else {
                    WireError::Failed(format!("cannot log in: {text}"))
                });
            }
            Message::NoticeResponse(_) => {}
            _ => {
                return Err(WireError::Failed(
                    "unexpected message during authentication".into(),
                ))
            }
        }
    }
    let mut server_version = String::new();
    loop {
        match conn.recv().await? {
            Message::ReadyForQuery(_) => break,
            Message::ParameterStatus(p) => {
                if p.name().ok() == Some("server_version") {
                    server_version = p.value().unwrap_or_default().to_string();
                }
            }
            Message::ErrorResponse(body) => {
                return Err(WireError::Failed(format!(
                    "the server refused the connection: {}",
                    server_error(&body).0
                )))
            }
            Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
            _ => {
                return Err(WireError::Failed(
                    "unexpected message after authentication".into(),
                ))
            }
        }
    }
    match major_version(&server_version) {
        Some(v) if v >= 15 => Ok((conn, server_version)),
        _ => Err(WireError::Unsupported(format!(
            "server_version {server_version:?} is older than 15 (BASE_BACKUP's single-stream format)"
        ))),
    }
}

/// Tar assembly: the base archive with its terminator held back, then the manifest member and a
/// new terminator.
struct TarOut<'a> {
    out: &'a mut SpoolFile,
    /// The last bytes of the archive so far (at most [`TAR_TRAILER`]).
    held: Vec<u8>,
    archives: u32,
    /// `Some` once the manifest started.
    manifest: Option<Vec<u8>>,
    written: u64,
}

impl TarOut<'_> {
    async fn write(&mut self, data: &[u8]) -> Result<(), WireError> {
        self.out
            .write(data)
            .await
            .map_err(|e| failed("cannot write the spool", e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Archive bytes: written, except the last [`TAR_TRAILER`] seen so far.
    async fn archive(&mut self, d: &[u8]) -> Result<(), WireError> {
        if d.len() >= TAR_TRAILER {
            if !self.held.is_empty() {
                let held = std::mem::take(&mut self.held);
                self.write(&held).await?;
                self.held = held;
                self.held.clear();
            }
            let cut = d.len() - TAR_TRAILER;
            self.write(&d[..cut]).await?;
            self.held.extend_from_slice(&d[cut..]);
        } else {
            self.held.extend_from_slice(d);
            if self.held.len() > TAR_TRAILER {
                let extra = self.held.len() - TAR_TRAILER;
                let head: Vec<u8> = self.held.drain(..extra).collect();
                self.write(&head).await?;
            }
        }
        Ok(())
    }

    /// The archive ended: its held-back tail must be a tar terminator.
    fn end_archive(&self) -> Result<(), WireError> {
        if self.archives == 1
            && (self.held.len() != TAR_TRAILER || self.held.iter().any(|b| *b != 0))
        {
            return Err(WireError::Failed(
                "the server's base archive does not end with a tar terminator (two zero blocks)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Writes the manifest member (if any) and the terminator.
    async fn finish(&mut self) -> Result<u64, WireError> {
        let manifest = self.manifest.take().unwrap_or_default();
        if !manifest.is_empty() {
            let mut h = tar::Header::new_ustar();
            h.set_path("backup_manifest")
                .map_err(|e| failed("cannot build the manifest's tar header", e))?;
            h.set_size(manifest.len() as u64);
            h.set_mode(0o600);
            h.set_mtime(u64::try_from(lifeboat_common::now_ms() / 1000).unwrap_or(0));
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            self.write(h.as_bytes()).await?;
            self.write(&manifest).await?;
            let pad = (TAR_BLOCK - manifest.len() % TAR_BLOCK) % TAR_BLOCK;
            self.write(&[0u8; TAR_BLOCK][..pad]).await?;
        }
        self.write(&[0u8; TAR_TRAILER]).await?;
        Ok(manifest.len() as u64)
    }
}

/// Handles one `CopyData` payload of the `BASE_BACKUP` stream.
async fn copy_data(tar: &mut TarOut<'_>, d: &[u8]) -> Result<(), WireError> {
    let Some((&kind, rest)) = d.split_first() else {
        return Err(WireError::Failed("empty CopyData message".into()));
    };
    match kind {
        b'n' => {
            let name = rest.split(|b| *b == 0).next().unwrap_or_default();
            let name = String::from_utf8_lossy(name);
            if tar.archives > 0 {
                tar.end_archive()?;
                return Err(WireError::Failed(format!(
                    "the server sent a second archive ({name}): tablespaces besides pg_default are not supported in a one-tar base backup (as with pg_basebackup -D -)"
                )));
            }
            tar.archives = 1;
        }
        b'd' if tar.archives == 0 => {
            return Err(WireError::Failed(
                "archive data before the archive started".into(),
            ))
        }
        b'd' => match tar.manifest.as_mut() {
            Some(m) => {
                if m.len() + rest.len() > MAX_MANIFEST {
                    return Err(WireError::Failed(format!(
                        "the backup manifest exceeds {MAX_MANIFEST} bytes"
                    )));
                }
                m.extend_from_slice(rest);
            }
            None => tar.archive(rest).await?,
        },
        b'p' => {}
        b'm' => {
            tar.end_archive()?;
            tar.manifest = Some(Vec::new());
        }
        other => {
            return Err(WireError::Failed(format!(
                "unknown BASE_BACKUP message type {:?}",
                char::from(other)
            )))
        }
    }
    Ok(())
}

/// Takes a base backup of `src` over one replication connection and writes it to `out` as a
/// tar (see the module documentation for the command and the layout). Dropping the future
/// closes the connection, which makes the server abort the backup.
///
/// Errors: [`WireError::Unsupported`] before anything was written to `out` (the caller may run
/// `pg_basebackup` instead); [`WireError::Failed`] with the server's error or the I/O or protocol
/// failure, after which `out` holds a partial tar.
pub async fn base_backup(
    src: &PostgresSourceConfig,
    out: &mut SpoolFile,
) -> Result<BaseBackupSummary, WireError> {
    let (mut conn, server_version) = connect(src).await?;
    frontend::query(BASE_BACKUP_COMMAND, &mut conn.wbuf)
        .map_err(|e| failed("cannot encode BASE_BACKUP", e))?;
    conn.flush().await?;
    let mut tar = TarOut {
        out,
        held: Vec::with_capacity(TAR_TRAILER * 2),
        archives: 0,
        manifest: None,
        written: 0,
    };
    let (mut in_copy, mut copy_done) = (false, false);
    loop {
        match conn.recv().await? {
            Message::CopyOutResponse(_) if !copy_done => in_copy = true,
            Message::CopyData(body) if in_copy => copy_data(&mut tar, body.data()).await?,
            Message::CopyDone if in_copy => {
                if tar.archives == 0 {
                    return Err(WireError::Failed("the server sent no archive".into()));
                }
                if tar.manifest.is_none() {
                    tar.end_archive()?;
                }
                in_copy = false;
                copy_done = true;
            }
            Message::ErrorResponse(body) => {
                return Err(WireError::Failed(format!(
                    "BASE_BACKUP failed: {}",
                    server_error(&body).0
                )))
            }
            Message::ReadyForQuery(_) if copy_done => break,
            Message::ReadyForQuery(_) => {
                return Err(WireError::Failed(
                    "BASE_BACKUP ended without sending the backup".into(),
                ))
            }
            // The start and end WAL positions and the tablespace list (result sets).
            Message::RowDescription(_) | Message::DataRow(_) | Message::CommandComplete(_)
                if !in_copy => {}
            // Asynchronous messages may arrive at any time, COPY included.
            Message::NoticeResponse(body) => {
                let (notice, _) = describe(body.fields());
                tracing::warn!(%notice, "PostgreSQL notice during BASE_BACKUP");
            }
            Message::ParameterStatus(_) => {}
            _ => {
                return Err(WireError::Failed(
                    "unexpected message in the BASE_BACKUP response".into(),
                ))
            }
        }
    }
    let manifest_bytes = tar.finish().await?;
    let tar_bytes = tar.written;
    frontend::terminate(&mut conn.wbuf);
    let _ = conn.flush().await;
    Ok(BaseBackupSummary {
        server_version,
        tar_bytes,
        manifest_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A terminated tar of `files` (name, content), as a PostgreSQL 15 server sends it.
    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(body);
        m
    }

    /// Feeds `messages` (CopyData payloads) and finishes; the spool's bytes or the error.
    async fn assemble(messages: &[Vec<u8>]) -> Result<Vec<u8>, WireError> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.tar");
        let mut f = SpoolFile::create(&p, crate::snapshot::preupload::Preupload::disabled())
            .await
            .unwrap();
        let mut tar = TarOut {
            out: &mut f,
            held: Vec::new(),
            archives: 0,
            manifest: None,
            written: 0,
        };
        for m in messages {
            copy_data(&mut tar, m).await?;
        }
        if tar.manifest.is_none() {
            tar.end_archive()?;
        }
        tar.finish().await?;
        let written = tar.written;
        let (n, hash) = f.finish().await.unwrap();
        assert_eq!(n, written);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(blake3::hash(&bytes), hash);
        Ok(bytes)
    }

    /// (name, content) of every member of `tar`.
    fn members(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut v).unwrap();
                (name, v)
            })
            .collect()
    }

    #[tokio::test]
    async fn manifest_is_appended_before_a_new_terminator() {
        let files = vec![
            ("PG_VERSION", b"15\n".to_vec()),
            ("base/1/1259", (0..20_000u32).map(|i| i as u8).collect()),
            ("backup_label", b"START WAL LOCATION: 0/2000028\n".to_vec()),
        ];
        let archive = tar_of(&files);
        let manifest = br#"{ "PostgreSQL-Backup-Manifest-Version": 1 }"#.to_vec();
        // Chunk sizes around the terminator's length: the held-back tail crosses messages.
        for chunk in [1, 7, 511, 1023, 1024, 1025, 4096, 32768, archive.len()] {
            let mut msgs = vec![msg(b'n', b"base.tar\0\0")];
            for c in archive.chunks(chunk) {
                msgs.push(msg(b'd', c));
                msgs.push(msg(b'p', &[0; 8]));
            }
            msgs.push(msg(b'm', b""));
            for c in manifest.chunks(10) {
                msgs.push(msg(b'd', c));
            }
            let out = assemble(&msgs).await.unwrap();
            assert_eq!(out.len() % TAR_BLOCK, 0);
            assert!(out.ends_with(&[0u8; TAR_TRAILER]));
            let mut want: Vec<(String, Vec<u8>)> = files
                .iter()
                .map(|(n, d)| (n.to_string(), d.clone()))
                .collect();
            want.push(("backup_manifest".into(), manifest.clone()));
            assert_eq!(members(&out), want, "chunk {chunk}");
            // Without a manifest the server's archive comes out unchanged.
            let no_manifest: Vec<Vec<u8>> = archive.chunks(chunk).map(|c| msg(b'd', c)).fold(
                vec![msg(b'n', b"base.tar\0\0")],
                |mut v, m| {
                    v.push(m);
                    v
                },
            );
            assert_eq!(assemble(&no_manifest).await.unwrap(), archive);
        }
    }

    #[tokio::test]
    async fn malformed_streams_are_refused() {
        let archive = tar_of(&[("PG_VERSION", b"15\n".to_vec())]);
        let start = msg(b'n', b"base.tar\0\0");
        let err = |r: Result<Vec<u8>, WireError>| match r {
            Err(WireError::Failed(e)) => e,
            other => panic!("expected a failure, got {:?}", other.map(|v| v.len())),
        };
        // Unterminated archive (a pre-15 server's format).
        let cut = &archive[..archive.len() - TAR_TRAILER];
        let e = err(assemble(&[start.clone(), msg(b'd', cut), msg(b'm', b"")]).await);
        assert!(e.contains("terminator"), "{e}");
        // A non-zero "terminator".
        let mut bad = archive.clone();
        *bad.last_mut().unwrap() = 1;
        let e = err(assemble(&[start.clone(), msg(b'd', &bad)]).await);
        assert!(e.contains("terminator"), "{e}");
        // A second archive (another tablespace).
        let e = err(assemble(&[
            start.clone(),
            msg(b'd', &archive),
            msg(b'n', b"16384.tar\0/srv/ts\0"),
        ])
        .await);
        assert!(e.contains("second archive (16384.tar)"), "{e}");
        // Data before the archive, an unknown type, an empty message.
        let e = err(assemble(&[msg(b'd', &archive)]).await);
        assert!(e.contains("before the archive"), "{e}");
        let e = err(assemble(&[start.clone(), msg(b'x', b"")]).await);
        assert!(e.contains("unknown"), "{e}");
        let e = err(assemble(&[start, Vec::new()]).await);
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn major_versions() {
        assert_eq!(major_version("15.18 (Debian 15.18-0+deb12u1)"), Some(15));
        assert_eq!(major_version("16beta1"), Some(16));
        assert_eq!(major_version("9.6.24"), Some(9));
        assert_eq!(major_version(""), None);
        assert_eq!(major_version("x"), None);
    }

    #[test]
    fn command_matches_pg_basebackup_minus_progress() {
        for opt in [
            "WAL",
            "CHECKPOINT 'fast'",
            "WAIT 0",
            "TABLESPACE_MAP",
            "MANIFEST 'yes'",
            "TARGET 'client'",
        ] {
            assert!(BASE_BACKUP_COMMAND.contains(opt), "{opt}");
        }
        assert!(!BASE_BACKUP_COMMAND.contains("PROGRESS"));
    }
}
