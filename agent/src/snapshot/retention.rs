//! Expiry of acknowledged snapshots: snapshot timestamps (`<ts>.<ext>` names), and
//! [`plan_expiry`], which applies a source's retention policy
//! ([`RetentionPolicy`], the rules in
//! [`crate::config::retention`]) to the snapshots it acknowledged and returns the files to
//! turn into tombstones.

use std::collections::BTreeMap;

use crate::config::retention::RetentionPolicy;

/// True for a WAL segment file name (24 upper-case hex digits).
pub fn is_segment(name: &str) -> bool {
    name.len() == 24
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// Formats `ms` (since the Unix epoch) as a snapshot timestamp: `YYYYMMDDTHHMMSS.mmmZ` (UTC).
pub fn format_ts(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_zoned(jiff::tz::TimeZone::UTC)
        .strftime("%Y%m%dT%H%M%S%.3fZ")
        .to_string()
}

/// Parses a snapshot timestamp, `YYYYMMDDTHHMMSS.mmmZ` or the older `YYYYMMDDTHHMMSSZ`, to ms since
/// the Unix epoch. None for anything else.
pub fn parse_ts(ts: &str) -> Option<i64> {
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let ok = match b.len() {
        16 => b[8] == b'T' && b[15] == b'Z' && digits(0..8) && digits(9..15),
        20 => {
            b[8] == b'T'
                && b[15] == b'.'
                && b[19] == b'Z'
                && digits(0..8)
                && digits(9..15)
                && digits(16..19)
        }
        _ => false,
    };
    if !ok {
        return None;
    }
    let n = |r: std::ops::Range<usize>| ts[r].parse::<i16>().ok();
    let dt = jiff::civil::DateTime::new(
        n(0..4)?,
        n(4..6)? as i8,
        n(6..8)? as i8,
        n(9..11)? as i8,
        n(11..13)? as i8,
        n(13..15)? as i8,
        0,
    )
    .ok()?;
    let ms = if b.len() == 20 {
        ts[16..19].parse::<i64>().ok()?
    } else {
        0
    };
    let base = dt
        .to_zoned(jiff::tz::TimeZone::UTC)
        .ok()?
        .timestamp()
        .as_millisecond();
    Some(base + ms)
}

/// A unique snapshot file stem in `dir`: [`format_ts`] of `ms`, moved forward by 1 ms while a
/// file starting with that stem and a `.` exists (two snapshots in the same millisecond, or a
/// clock step back). Returns (stem, the ms it encodes).
pub fn unique_ts(dir: &std::path::Path, mut ms: i64) -> (String, i64) {
    loop {
        let ts = format_ts(ms);
        let taken = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok()).any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{ts}."))
                })
            })
            .unwrap_or(false);
        if !taken {
            return (ts, ms);
        }
        ms += 1;
    }
}

/// What [`plan_expiry`] decided for one source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expiry {
    /// Ids (`<source>/<ts>` or `<source>/base/<ts>`) of the expired snapshots, newest first.
    pub snapshots: Vec<String>,
    /// Ids of the kept snapshots, newest first.
    pub kept: Vec<String>,
    /// WAL segments (file names) expired with them (PostgreSQL).
    pub wal: Vec<String>,
    /// Paths relative to the `_snapshots` root to delete: every file of an expired snapshot, and
    /// the expired WAL segments.
    pub files: Vec<String>,
}

/// The timestamp a snapshot file name starts with (`<ts>.<ext>`), in either form of
/// [`parse_ts`]: (ts, ms).
pub fn ts_of(name: &str) -> Option<(&str, i64)> {
    [20, 16].into_iter().find_map(|n| {
        let ts = name.get(..n)?;
        if !name[n..].starts_with('.') {
            return None;
        }
        parse_ts(ts).map(|ms| (ts, ms))
    })
}

/// Applies `policy` to the snapshots of `source` this agent has acknowledged (its state
/// database): Redis and exec snapshots directly under `_snapshots/<source>/`, PostgreSQL base
/// backups under `_snapshots/<source>/base/` (`postgres`). A snapshot is every acknowledged file
/// sharing a timestamp (dump and sidecar). For PostgreSQL, WAL segments under
/// `_snapshots/<source>/wal/` whose segment number is below the start segment of the oldest kept
/// base backup (read from its sidecar copy in `pg_meta_dir`) expire too; without that copy no
/// WAL is expired. History files never expire. Files whose names carry no timestamp are left
/// alone.
///
/// Errors: [`crate::files::state::StateError`].
pub fn plan_expiry(
    state: &crate::files::state::StateDb,
    source: &str,
    policy: &RetentionPolicy,
    postgres: bool,
    pg_meta_dir: &std::path::Path,
) -> Result<Expiry, crate::files::state::StateError> {
    use crate::config::SNAPSHOTS_ROOT;
    let reader = state.reader()?;
    let list = |prefix: &str| -> Result<Vec<String>, crate::files::state::StateError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = reader.paths_under(prefix, after.as_deref(), 1000)?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            out.extend(page.into_iter().map(|(p, _)| p));
        }
        Ok(out)
    };
    let sub = if postgres {
        format!("{source}/base")
    } else {
        source.to_string()
    };
    let prefix = format!("{SNAPSHOTS_ROOT}/{sub}/");
    let mut groups: BTreeMap<String, (i64, Vec<String>)> = BTreeMap::new();
    for wire in list(&prefix)? {
        let name = &wire[prefix.len()..];
        if name.contains('/') {
            continue;
        }
        let Some((ts, ms)) = ts_of(name) else {
            continue;
        };
        let rel = wire[SNAPSHOTS_ROOT.len() + 1..].to_string();
        groups
            .entry(ts.to_string())
            .or_insert((ms, Vec::new()))
            .1
            .push(rel);
    }
    let snaps: Vec<(String, i64)> = groups
        .iter()
        .map(|(ts, (ms, _))| (ts.clone(), *ms))
        .collect();
    let (keep, expire) = policy.select(&snaps);
    let mut out = Expiry {
        snapshots: expire.iter().map(|ts| format!("{sub}/{ts}")).collect(),
        kept: keep.iter().map(|ts| format!("{sub}/{ts}")).collect(),
        ..Default::default()
    };
    for ts in &expire {
        out.files.extend(groups[*ts].1.iter().cloned());
    }
    if postgres && !expire.is_empty() {
        let start = keep.last().and_then(|oldest| {
            let meta = std::fs::read(pg_meta_dir.join(format!("{oldest}.tar.meta.json"))).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&meta).ok()?;
            v["start_wal_file"].as_str().map(str::to_string)
        });
        match start.filter(|s| is_segment(s)) {
            Some(start) => {
                let wal_prefix = format!("{SNAPSHOTS_ROOT}/{source}/wal/");
                for wire in list(&wal_prefix)? {
                    let name = &wire[wal_prefix.len()..];
                    if is_segment(name) && name[8..] < start[8..] {
                        out.wal.push(name.to_string());
                        out.files.push(wire[SNAPSHOTS_ROOT.len() + 1..].to_string());
                    }
                }
            }
            None => tracing::warn!(
                source,
                oldest_kept = ?keep.last(),
                "retention: the oldest kept base backup's start WAL file is unknown here; no WAL expired"
            ),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_old_form_parses() {
        let ms = "2026-11-24T01:22:33.123Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_millisecond();
        assert_eq!(format_ts(ms), "20261124T012233.123Z");
        assert_eq!(parse_ts("20261124T012233.123Z"), Some(ms));
        assert_eq!(parse_ts("20261124T012233Z"), Some(ms - 123));
        for bad in [
            "",
            "20261124T012233",
            "2026112XT012233Z",
            "20261324T012233Z",
            "x.snap",
        ] {
            assert_eq!(parse_ts(bad), None, "{bad}");
        }
        let d = tempfile::tempdir().unwrap();
        let (a, ams) = unique_ts(d.path(), ms);
        assert_eq!((a.as_str(), ams), ("20261124T012233.123Z", ms));
        std::fs::write(d.path().join(format!("{a}.rdb")), b"x").unwrap();
        let (b, bms) = unique_ts(d.path(), ms);
        assert_eq!((b.as_str(), bms), ("20261124T012233.124Z", ms + 1));
    }
}
