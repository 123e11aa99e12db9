//! The usage report (`jmp admin usage`): leased time over a window, per team, client, exporter
//! or lease, as the controller computes it from its history of ended leases and the live ones.
//!
//! The controller aggregates (a month of a large lab is many thousands of leases; the answer is
//! a few rows); this module also renders the report as CSV and JSON and gives the table's
//! cells, so that what the controller's tests check is what `jmp` prints.
//!
//! Times are Unix milliseconds on the wire; leased time is counted in milliseconds and clipped
//! to the window, so a lease across the first of the month is split between the two months.

use serde::{Deserialize, Serialize};
use std::time::{Duration, UNIX_EPOCH};

/// What the rows are per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UsageBy {
    #[default]
    Team,
    Client,
    Exporter,
    /// One row per lease (the raw history, clipped to the window).
    Lease,
}

impl UsageBy {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageBy::Team => "team",
            UsageBy::Client => "client",
            UsageBy::Exporter => "exporter",
            UsageBy::Lease => "lease",
        }
    }
}

/// The `usage` call's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageQuery {
    /// Window start, Unix ms (inclusive).
    pub since: u64,
    /// Window end, Unix ms (exclusive); `None`: now.
    #[serde(default)]
    pub until: Option<u64>,
    #[serde(default)]
    pub by: UsageBy,
}

/// One lease as the history keeps it once it has ended (and as the report shows live ones,
/// with reason `active` and `end` the time of the report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub lease: String,
    pub client: String,
    /// The client's `team` label when the lease ended ("" without one).
    #[serde(default)]
    pub team: String,
    pub exporter: String,
    /// Unix ms.
    pub begin: u64,
    /// Unix ms: when it really ended (a release ends it early).
    pub end: u64,
    /// `expired`, `released`, `idle`, `exporter removed`, ... or `active`.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The lease's idle timeout, ms (so that its holder can be told why an idle lease ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u64>,
}

impl UsageRecord {
    /// Milliseconds of this lease inside `[since, until)`.
    pub fn ms_within(&self, since: u64, until: u64) -> u64 {
        self.end.min(until).saturating_sub(self.begin.max(since))
    }
}

/// One row: a team, client or exporter (`key`) and its total, or one lease (`record` set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    pub key: String,
    /// Leases that overlap the window.
    pub leases: u64,
    /// Leased milliseconds inside the window.
    pub ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<UsageRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    pub since: u64,
    pub until: u64,
    pub by: UsageBy,
    /// Sorted by key (by lease: by begin, then name).
    pub rows: Vec<UsageRow>,
    /// The history does not reach back to `since` (its retention dropped older leases): the
    /// oldest end it still holds, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_from: Option<u64>,
    /// By lease only: more leases matched than one answer carries; these are the first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Most rows of a per-lease report in one answer (a row is ~300 bytes of JSON; the control
/// frame's limit is 16 MiB).
pub const MAX_LEASE_ROWS: usize = 20_000;

/// Unix ms as RFC 3339 to the second (UTC).
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Whole seconds, rounded to nearest.
fn secs(ms: u64) -> u64 {
    ms.saturating_add(500) / 1000
}

/// Hours with two decimals, as text (what a chargeback sheet wants).
fn hours(ms: u64) -> String {
    let centi = (ms.saturating_add(18_000)) / 36_000;
    format!("{}.{:02}", centi / 100, centi % 100)
}

/// A CSV field: quoted when it holds a comma, quote or line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl UsageReport {
    pub fn total_ms(&self) -> u64 {
        self.rows.iter().map(|r| r.ms).sum()
    }

    pub fn total_leases(&self) -> u64 {
        self.rows.iter().map(|r| r.leases).sum()
    }

    /// The table's header and cells (`jmp` pads them); a last row holds the total.
    pub fn table(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        if self.by == UsageBy::Lease {
            let header = vec![
                "LEASE", "CLIENT", "TEAM", "EXPORTER", "BEGIN", "END", "REASON", "HOURS",
            ];
            let mut rows: Vec<Vec<String>> = self
                .rows
                .iter()
                .filter_map(|r| r.record.as_ref().map(|rec| (r, rec)))
                .map(|(r, rec)| {
                    vec![
                        rec.lease.clone(),
                        rec.client.clone(),
                        if rec.team.is_empty() {
                            "-".into()
                        } else {
                            rec.team.clone()
                        },
                        rec.exporter.clone(),
                        rfc3339(rec.begin),
                        rfc3339(rec.end),
                        rec.reason.clone(),
                        hours(r.ms),
                    ]
                })
                .collect();
            let mut total = vec![String::new(); header.len()];
            total[0] = "TOTAL".into();
            total[header.len() - 1] = hours(self.total_ms());
            rows.push(total);
            return (header, rows);
        }
        let first = match self.by {
            UsageBy::Team => "TEAM",
            UsageBy::Client => "CLIENT",
            _ => "EXPORTER",
        };
        let mut rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    if r.key.is_empty() {
                        "(none)".into()
                    } else {
                        r.key.clone()
                    },
                    r.leases.to_string(),
                    hours(r.ms),
                ]
            })
            .collect();
        rows.push(vec![
            "TOTAL".into(),
            self.total_leases().to_string(),
            hours(self.total_ms()),
        ]);
        (vec![first, "LEASES", "HOURS"], rows)
    }

    /// RFC 4180 CSV with a header line; no total row (a spreadsheet sums).
    pub fn csv(&self) -> String {
        let mut s = String::new();
        if self.by == UsageBy::Lease {
            s.push_str("lease,client,team,exporter,begin,end,reason,seconds,hours\r\n");
            for r in &self.rows {
                let Some(rec) = &r.record else { continue };
                let cells = [
                    csv_field(&rec.lease),
                    csv_field(&rec.client),
                    csv_field(&rec.team),
                    csv_field(&rec.exporter),
                    rfc3339(rec.begin),
                    rfc3339(rec.end),
                    csv_field(&rec.reason),
                    secs(r.ms).to_string(),
                    hours(r.ms),
                ];
                s.push_str(&cells.join(","));
                s.push_str("\r\n");
            }
            return s;
        }
        s.push_str(&format!("{},leases,seconds,hours\r\n", self.by.as_str()));
        for r in &self.rows {
            s.push_str(&format!(
                "{},{},{},{}\r\n",
                csv_field(&r.key),
                r.leases,
                secs(r.ms),
                hours(r.ms)
            ));
        }
        s
    }

    /// JSON for scripts: the window as RFC 3339, one object per row named by what it is per,
    /// and the total.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        let num = |ms: u64| json!(secs(ms));
        let hrs = |ms: u64| hours(ms).parse::<f64>().map_or(json!(null), |h| json!(h));
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| match &r.record {
                Some(rec) if self.by == UsageBy::Lease => json!({
                    "lease": rec.lease,
                    "client": rec.client,
                    "team": rec.team,
                    "exporter": rec.exporter,
                    "begin": rfc3339(rec.begin),
                    "end": rfc3339(rec.end),
                    "reason": rec.reason,
                    "job": rec.job,
                    "seconds": num(r.ms),
                    "hours": hrs(r.ms),
                }),
                _ => {
                    let mut o = serde_json::Map::new();
                    o.insert(self.by.as_str().into(), json!(r.key));
                    o.insert("leases".into(), json!(r.leases));
                    o.insert("seconds".into(), num(r.ms));
                    o.insert("hours".into(), hrs(r.ms));
                    serde_json::Value::Object(o)
                }
            })
            .collect();
        let mut v = json!({
            "since": rfc3339(self.since),
            "until": rfc3339(self.until),
            "by": self.by.as_str(),
            "rows": rows,
            "total": {
                "leases": self.total_leases(),
                "seconds": num(self.total_ms()),
                "hours": hrs(self.total_ms()),
            },
        });
        if let Some(h) = self.history_from {
            v["history_from"] = json!(rfc3339(h));
        }
        if self.truncated {
            v["truncated"] = json!(true);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_round_to_the_nearest_hundredth_and_csv_quotes_what_needs_it() {
        assert_eq!(hours(0), "0.00");
        assert_eq!(hours(3_600_000), "1.00");
        assert_eq!(hours(5_400_000), "1.50");
        assert_eq!(hours(17_999), "0.00");
        assert_eq!(hours(18_000), "0.01");
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn a_lease_is_clipped_to_the_window() {
        let r = UsageRecord {
            lease: "l".into(),
            client: "c".into(),
            team: "t".into(),
            exporter: "e".into(),
            begin: 1_000,
            end: 5_000,
            reason: "expired".into(),
            job: None,
            idle_timeout: None,
        };
        assert_eq!(r.ms_within(0, 10_000), 4_000);
        assert_eq!(r.ms_within(2_000, 10_000), 3_000);
        assert_eq!(r.ms_within(2_000, 3_000), 1_000);
        assert_eq!(r.ms_within(5_000, 9_000), 0);
        assert_eq!(r.ms_within(0, 1_000), 0);
    }
}
