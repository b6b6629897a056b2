//! Snapshot retention classes: which acknowledged snapshots of a database or exec source stay in
//! the catalog.
//!
//! ```toml
//! [retention.standard]
//! keep_last = 3
//! keep_daily = 7
//! keep_weekly = 4
//! keep_monthly = 6
//!
//! [[redis_sources]]
//! name = "cache"
//! retention = "standard"          # or inline: retention = { keep_last = 3 }
//! ```
//!
//! The rules follow restic's `forget` policy
//! (<https://restic.readthedocs.io/en/stable/060_forget.html#removing-snapshots-according-to-a-policy>):
//! snapshots are walked newest first; `keep_last = n` keeps the n newest; `keep_hourly = n` keeps,
//! for the last n hours that have one or more snapshots, the newest snapshot of each hour (likewise
//! `keep_daily`, `keep_weekly` (ISO weeks), `keep_monthly`, `keep_yearly`); a snapshot is kept when
//! any rule keeps it. Times are the snapshot's UTC timestamp (from its id), so buckets are UTC
//! hours and days, where restic uses local time. The newest snapshot is always kept (every rule
//! keeps it).
//!
//! **What expiry does**: after a snapshot of a source is acknowledged, the agent applies the
//! source's class to the snapshots of that source it has acknowledged itself (its state database)
//! and sends tombstones for the dump and the sidecar of each expired one through the normal
//! pipeline, so `lifeboat ls`, `restore` and `verify` no longer see them. For PostgreSQL, WAL
//! segments older than the start segment of the oldest kept base backup are expired too (PITR
//! stays possible from every kept base backup). **What it does not do** itself: free space. The
//! expired snapshot stays reachable with `--at` a time before its tombstone until the
//! coordinators' garbage collection (`[gc]`, `lifeboat gc`, `coordinator::blobs::gc`) prunes versions
//! superseded longer ago than `keep_history` and then deletes the blobs no version references
//! any more (older than `grace`; a part shared with a kept snapshot stays). A source without
//! `retention` keeps every snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One retention class (`[retention.<class>]`) or an inline `retention = { ... }`. Every field is
/// optional; at least one must keep something (validated).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Keep the n newest snapshots.
    #[serde(default)]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last n UTC hours that have snapshots.
    #[serde(default)]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the last n UTC days that have snapshots.
    #[serde(default)]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last n ISO weeks that have snapshots.
    #[serde(default)]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last n months that have snapshots.
    #[serde(default)]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the last n years that have snapshots.
    #[serde(default)]
    pub keep_yearly: Option<u32>,
}

/// A source's `retention`: a class name (`retention = "daily"`) or an inline policy
/// (`retention = { keep_last = 3 }`, the form older configs used; it now also expires catalog
/// snapshots, not only local unacknowledged files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RetentionRef {
    /// Name of a `[retention.<class>]` table.
    Class(String),
    /// A policy written in place.
    Inline(RetentionPolicy),
}

impl<'de> Deserialize<'de> for RetentionRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Table(BTreeMap<String, i64>),
        }
        let usage = "retention must be a class name (retention = \"daily\", defined in [retention.daily]) or a table of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly";
        let raw = Raw::deserialize(d).map_err(|_| serde::de::Error::custom(usage))?;
        match raw {
            Raw::Name(n) => Ok(RetentionRef::Class(n)),
            Raw::Table(t) => {
                let mut p = RetentionPolicy::default();
                for (k, v) in t {
                    let v = u32::try_from(v).map_err(|_| {
                        serde::de::Error::custom(format!("retention.{k} = {v}: must be 0 or more"))
                    })?;
                    let slot = match k.as_str() {
                        "keep_last" => &mut p.keep_last,
                        "keep_hourly" => &mut p.keep_hourly,
                        "keep_daily" => &mut p.keep_daily,
                        "keep_weekly" => &mut p.keep_weekly,
                        "keep_monthly" => &mut p.keep_monthly,
                        "keep_yearly" => &mut p.keep_yearly,
                        _ => {
                            return Err(serde::de::Error::custom(format!(
                                "unknown retention key {k:?}: {usage}"
                            )))
                        }
                    };
                    *slot = Some(v);
                }
                Ok(RetentionRef::Inline(p))
            }
        }
    }
}

impl RetentionPolicy {
    /// True when some rule keeps at least one snapshot.
    pub fn keeps_something(&self) -> bool {
        self.rules().iter().any(|(n, _)| *n > 0)
    }

    fn rules(&self) -> [(u32, Bucket); 6] {
        [
            (self.keep_last.unwrap_or(0), Bucket::Last),
            (self.keep_hourly.unwrap_or(0), Bucket::Hour),
            (self.keep_daily.unwrap_or(0), Bucket::Day),
            (self.keep_weekly.unwrap_or(0), Bucket::Week),
            (self.keep_monthly.unwrap_or(0), Bucket::Month),
            (self.keep_yearly.unwrap_or(0), Bucket::Year),
        ]
    }

    /// Splits `snaps` (`(id, time in ms since the Unix epoch)`, any order) into the ids to keep
    /// and the ids to expire, both newest first. Ties in time are ordered by id.
    pub fn select<'a>(&self, snaps: &'a [(String, i64)]) -> (Vec<&'a str>, Vec<&'a str>) {
        let mut sorted: Vec<&(String, i64)> = snaps.iter().collect();
        sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        let mut rules: Vec<(u32, Bucket, Option<i64>)> = self
            .rules()
            .into_iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, b)| (n, b, None))
            .collect();
        let (mut keep, mut expire) = (Vec::new(), Vec::new());
        for (i, (id, ms)) in sorted.into_iter().enumerate() {
            let mut kept = false;
            for (left, bucket, last) in rules.iter_mut() {
                if *left == 0 {
                    continue;
                }
                let v = bucket.value(i, *ms);
                if *last != Some(v) {
                    *last = Some(v);
                    *left -= 1;
                    kept = true;
                }
            }
            if kept {
                keep.push(id.as_str());
            } else {
                expire.push(id.as_str());
            }
        }
        (keep, expire)
    }
}

#[derive(Debug, Clone, Copy)]
enum Bucket {
    Last,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Bucket {
    /// The bucket of the `i`-th newest snapshot taken at `ms`.
    fn value(self, i: usize, ms: i64) -> i64 {
        let z = jiff::Timestamp::from_millisecond(ms)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_zoned(jiff::tz::TimeZone::UTC);
        let (y, m, d, h) = (
            i64::from(z.year()),
            i64::from(z.month()),
            i64::from(z.day()),
            i64::from(z.hour()),
        );
        match self {
            Bucket::Last => i as i64,
            Bucket::Hour => ((y * 100 + m) * 100 + d) * 100 + h,
            Bucket::Day => (y * 100 + m) * 100 + d,
            Bucket::Week => {
                let w = z.date().iso_week_date();
                i64::from(w.year()) * 100 + i64::from(w.week())
            }
            Bucket::Month => y * 100 + m,
            Bucket::Year => y,
        }
    }
}

/// Checks a source's `retention`: a class must exist in `classes` (`[retention.<class>]`), an inline policy must
/// keep something.
///
/// Errors: the reason, for the caller's per-source error.
pub fn validate_ref(
    classes: &BTreeMap<String, RetentionPolicy>,
    r: &Option<RetentionRef>,
) -> Result<(), String> {
    match r {
        None => Ok(()),
        Some(RetentionRef::Class(c)) if classes.contains_key(c) => Ok(()),
        Some(RetentionRef::Class(c)) => Err(format!(
            "retention = {c:?}: no [retention.{c}] table (defined: {:?})",
            classes.keys().collect::<Vec<_>>()
        )),
        Some(RetentionRef::Inline(p)) if p.keeps_something() => Ok(()),
        Some(RetentionRef::Inline(_)) => Err(
            "retention must keep something: set keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly or keep_yearly to 1 or more".into(),
        ),
    }
}

/// The policy `r` names (None: keep every snapshot).
pub fn resolve(
    classes: &BTreeMap<String, RetentionPolicy>,
    r: &Option<RetentionRef>,
) -> Option<RetentionPolicy> {
    match r {
        None => None,
        Some(RetentionRef::Class(c)) => classes.get(c).cloned(),
        Some(RetentionRef::Inline(p)) => Some(p.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    fn snaps(times: &[&str]) -> Vec<(String, i64)> {
        times.iter().map(|t| (t.to_string(), at(t))).collect()
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let s = snaps(&[
            "2026-01-01T00:00:00Z",
            "2026-01-01T01:00:00Z",
            "2026-01-01T02:00:00Z",
            "2026-01-01T03:00:00Z",
        ]);
        let p = RetentionPolicy {
            keep_last: Some(2),
            ..Default::default()
        };
        let (keep, expire) = p.select(&s);
        assert_eq!(keep, ["2026-01-01T03:00:00Z", "2026-01-01T02:00:00Z"]);
        assert_eq!(expire, ["2026-01-01T01:00:00Z", "2026-01-01T00:00:00Z"]);
    }

    /// restic's documented example: daily snapshots with gaps; `keep_daily = 4` keeps the newest
    /// of each of the 4 latest days that have snapshots.
    #[test]
    fn daily_buckets_skip_empty_days_and_keep_the_newest_of_a_day() {
        let s = snaps(&[
            "2026-05-01T08:00:00Z",
            "2026-05-02T08:00:00Z",
            "2026-05-02T11:00:00Z",
            "2026-05-04T09:00:00Z",
            "2026-05-05T10:00:00Z",
        ]);
        let p = RetentionPolicy {
            keep_daily: Some(4),
            ..Default::default()
        };
        let (keep, expire) = p.select(&s);
        assert_eq!(
            keep,
            [
                "2026-05-05T10:00:00Z",
                "2026-05-04T09:00:00Z",
                "2026-05-02T11:00:00Z",
                "2026-05-01T08:00:00Z"
            ]
        );
        assert_eq!(expire, ["2026-05-02T08:00:00Z"]);
    }

    #[test]
    fn rules_combine_with_or_and_weeks_are_iso() {
        // Hourly snapshots over three days, plus one a month earlier.
        let mut times: Vec<String> = (0..72)
            .map(|h| format!("2026-03-{:02}T{:02}:30:00Z", 1 + h / 24, h % 24))
            .collect();
        times.push("2026-02-01T12:00:00Z".into());
        let s: Vec<(String, i64)> = times.iter().map(|t| (t.clone(), at(t))).collect();
        let p = RetentionPolicy {
            keep_last: Some(2),
            keep_daily: Some(2),
            keep_monthly: Some(2),
            ..Default::default()
        };
        let (keep, expire) = p.select(&s);
        assert_eq!(
            keep,
            [
                "2026-03-03T23:30:00Z", // last, daily, monthly
                "2026-03-03T22:30:00Z", // last
                "2026-03-02T23:30:00Z", // daily
                "2026-02-01T12:00:00Z", // monthly
            ]
        );
        assert_eq!(expire.len(), s.len() - 4);
        // 2026-03-01 is a Sunday: ISO week 9; 03-02 starts week 10.
        let w = RetentionPolicy {
            keep_weekly: Some(5),
            ..Default::default()
        };
        let (keep, _) = w.select(&s);
        assert_eq!(
            keep,
            [
                "2026-03-03T23:30:00Z",
                "2026-03-01T23:30:00Z",
                "2026-02-01T12:00:00Z"
            ]
        );
        assert!(!RetentionPolicy::default().keeps_something());
        assert!(p.keeps_something());
        let (keep, expire) = RetentionPolicy::default().select(&s);
        assert!(keep.is_empty() && expire.len() == s.len());
    }

    #[test]
    fn inline_and_class_forms_parse() {
        #[derive(Deserialize)]
        struct S {
            retention: RetentionRef,
        }
        let s: S = toml::from_str("retention = \"daily\"").unwrap();
        assert_eq!(s.retention, RetentionRef::Class("daily".into()));
        let s: S = toml::from_str("retention = { keep_last = 2, keep_daily = 7 }").unwrap();
        assert_eq!(
            s.retention,
            RetentionRef::Inline(RetentionPolicy {
                keep_last: Some(2),
                keep_daily: Some(7),
                ..Default::default()
            })
        );
        let e = toml::from_str::<S>("retention = { keep_forever = 1 }")
            .err()
            .unwrap();
        assert!(e.to_string().contains("keep_forever"), "{e}");
        let e = toml::from_str::<S>("retention = { keep_last = -1 }")
            .err()
            .unwrap();
        assert!(e.to_string().contains("0 or more"), "{e}");
        let e = toml::from_str::<S>("retention = 3").err().unwrap();
        assert!(e.to_string().contains("class name"), "{e}");
    }
}
