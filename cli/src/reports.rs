//! Printing the restore engine's database reports (`restore redis`, `verify snapshot`), as text
//! or JSON.

use std::io::Write;

use lifeboat_restore::snapshots::{RedisRestoreReport, VerifyReport};

use crate::outln;

/// Prints a restore report (text or JSON).
pub fn print_restore(r: &RedisRestoreReport, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(r)?);
    } else if r.target == "file" {
        outln!(
            "wrote snapshot {} to {} ({} bytes, blake3 {} verified) in {} ms",
            r.snapshot,
            r.to,
            r.bytes,
            r.blake3,
            r.duration_ms
        );
    } else {
        outln!(
            "restored snapshot {} into redis {}: {} keys copied ({} bytes RDB, blake3 verified) in {} ms",
            r.snapshot, r.to, r.keys_copied, r.bytes, r.duration_ms
        );
    }
    Ok(())
}

/// Prints a verify report (text or JSON).
pub fn print_verify(r: &VerifyReport, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let ms = |v: Option<u64>| v.map(|m| format!("{m} ms")).unwrap_or_else(|| "-".into());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "snapshot {} ({}): {}  keys {}  bytes {}  blake3 {}  restore {}  start {}  total {} ms",
        r.snapshot,
        if r.kind.is_empty() { "?" } else { &r.kind },
        if r.ok { "ok" } else { "FAILED" },
        r.keys.map(|k| k.to_string()).unwrap_or_else(|| "-".into()),
        r.bytes,
        if r.blake3_ok { "ok" } else { "not verified" },
        ms(r.restore_ms),
        ms(r.start_ms),
        r.duration_ms
    )?;
    for c in &r.checks {
        writeln!(
            out,
            "  [{}] {}: {}",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.detail
        )?;
    }
    if let Some(t) = &r.tables {
        for (name, rows) in t {
            writeln!(out, "    {name}: {rows} rows")?;
        }
    }
    if let Some(e) = &r.error {
        writeln!(out, "  error: {e}")?;
    }
    writeln!(out, "verdict: {}", r.verdict)?;
    Ok(())
}
