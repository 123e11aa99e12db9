//! The history of ended leases, kept for usage reports (chargeback) and pruned by retention.
//!
//! Each ended lease is one record in the store's `usage` table, written in the same commit as
//! the lease's removal, so the history never misses a lease the store no longer holds and a
//! failover loses none. The key orders records by when they ended (`<end ms, 13 digits>/<lease>`),
//! which is what retention prunes by and what a report over a window scans.

use crate::book::{EndReason, Lease, Millis};
use crate::store::{Op, Table};
use jmp_protocol::usage::{
    UsageBy, UsageQuery, UsageRecord, UsageReport, UsageRow, MAX_LEASE_ROWS,
};
use std::collections::{BTreeMap, HashMap};

/// Default retention: a little over a year, so a yearly report still finds last January.
pub const DEFAULT_RETENTION_MS: Millis = 400 * 24 * 3600 * 1000;

pub struct History {
    /// By (end, lease name).
    records: BTreeMap<(Millis, String), UsageRecord>,
    /// Lease name → its end, to find how a lease ended when its holder comes back for it.
    by_name: HashMap<String, Millis>,
    /// `0`: keep forever.
    retention: Millis,
}

pub fn key_of(end: Millis, lease: &str) -> String {
    format!("{end:013}/{lease}")
}

impl History {
    pub fn new(retention: Millis) -> History {
        History {
            records: BTreeMap::new(),
            by_name: HashMap::new(),
            retention,
        }
    }

    pub fn set_retention(&mut self, retention: Millis) {
        self.retention = retention;
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// A record read back from the store at start.
    pub fn restore(&mut self, rec: UsageRecord) {
        self.insert(rec);
    }

    fn insert(&mut self, rec: UsageRecord) {
        // Lease names are random: a name ended twice is not expected, and the later end wins.
        let latest = self.by_name.entry(rec.lease.clone()).or_insert(rec.end);
        *latest = (*latest).max(rec.end);
        self.records.insert((rec.end, rec.lease.clone()), rec);
    }

    /// How lease `name` ended, if the history still holds it.
    pub fn ended_lease(&self, name: &str) -> Option<&UsageRecord> {
        let end = *self.by_name.get(name)?;
        self.records.get(&(end, name.to_string()))
    }

    /// `lease` ended at `now` for `reason`, its client in `team`: keeps the record and returns
    /// the store write for it.
    pub fn ended(
        &mut self,
        now: Millis,
        lease: &Lease,
        reason: &EndReason,
        team: String,
    ) -> anyhow::Result<Op> {
        let rec = UsageRecord {
            lease: lease.name.clone(),
            client: lease.client.clone(),
            team,
            exporter: lease.exporter.clone(),
            begin: lease.begin,
            // Expired: at its end, idle: at its idle deadline (the tick may come a little
            // later). Released early: now.
            end: now
                .min(lease.end)
                .min(match reason {
                    EndReason::Idle => lease.idle_deadline().unwrap_or(now),
                    _ => now,
                })
                .max(lease.begin),
            reason: reason.as_str().to_string(),
            job: lease.job.clone(),
            idle_timeout: lease.idle_timeout,
        };
        let op = Op::Put {
            table: Table::Usage,
            key: key_of(rec.end, &rec.lease),
            value: serde_json::to_vec(&rec)?,
        };
        self.insert(rec);
        Ok(op)
    }

    /// Records older than the retention (ended before `now - retention`): dropped from memory,
    /// and the store deletes to write.
    pub fn prune(&mut self, now: Millis) -> Vec<Op> {
        if self.retention == 0 {
            return Vec::new();
        }
        let cut = now.saturating_sub(self.retention);
        let mut ops = Vec::new();
        while let Some(entry) = self.records.first_entry() {
            if entry.key().0 >= cut {
                break;
            }
            let ((end, lease), _) = entry.remove_entry();
            if self.by_name.get(&lease) == Some(&end) {
                self.by_name.remove(&lease);
            }
            ops.push(Op::Delete {
                table: Table::Usage,
                key: key_of(end, &lease),
            });
        }
        ops
    }

    /// The report for `q` at `now`: the history's leases that overlap the window, and the live
    /// leases (`live`, each with its client's team), counted up to `now`.
    pub fn report<'a>(
        &self,
        now: Millis,
        q: &UsageQuery,
        live: impl Iterator<Item = (&'a Lease, String)>,
    ) -> UsageReport {
        let since = q.since;
        let until = q.until.unwrap_or(now).max(since);
        // A record overlaps the window when it ended after `since` and began before `until`:
        // the scan starts at the first end after `since`.
        let ended = self
            .records
            .range((since.saturating_add(1), String::new())..)
            .map(|(_, r)| r.clone());
        let active = live
            .filter(|(l, _)| l.begin < now)
            .map(|(l, team)| UsageRecord {
                lease: l.name.clone(),
                client: l.client.clone(),
                team,
                exporter: l.exporter.clone(),
                begin: l.begin,
                end: now.min(l.end),
                reason: "active".into(),
                job: l.job.clone(),
                idle_timeout: l.idle_timeout,
            });
        let within = ended
            .chain(active)
            .filter(|r| r.begin < until && r.end > since);
        let mut truncated = false;
        let rows = match q.by {
            UsageBy::Lease => {
                let mut recs: Vec<UsageRecord> = within.collect();
                recs.sort_by(|a, b| (a.begin, &a.lease).cmp(&(b.begin, &b.lease)));
                if recs.len() > MAX_LEASE_ROWS {
                    recs.truncate(MAX_LEASE_ROWS);
                    truncated = true;
                }
                recs.into_iter()
                    .map(|r| UsageRow {
                        key: r.lease.clone(),
                        leases: 1,
                        ms: r.ms_within(since, until),
                        record: Some(r),
                    })
                    .collect()
            }
            by => {
                let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
                for r in within {
                    let key = match by {
                        UsageBy::Team => r.team.clone(),
                        UsageBy::Client => r.client.clone(),
                        _ => r.exporter.clone(),
                    };
                    let s = sums.entry(key).or_default();
                    s.0 += 1;
                    s.1 += r.ms_within(since, until);
                }
                sums.into_iter()
                    .map(|(key, (leases, ms))| UsageRow {
                        key,
                        leases,
                        ms,
                        record: None,
                    })
                    .collect()
            }
        };
        // Retention dropped what ended before the oldest record kept: say the report may be
        // short rather than let a zero pass for "nothing was leased".
        let history_from = match self.records.first_key_value() {
            Some(((oldest, _), _)) if self.retention != 0 && *oldest > since => {
                let cut = now.saturating_sub(self.retention);
                (cut > since).then_some(*oldest)
            }
            _ => None,
        };
        UsageReport {
            since,
            until,
            by: q.by,
            rows,
            history_from,
            truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    //! A simulated month: the lease book is driven by `now`, its end events feed the history
    //! the way the controller's core feeds it, and the report is rendered in the three
    //! formats `jmp admin usage` prints.
    use super::*;
    use crate::book::{Event, LeaseBook, NewRequest, Outcome};
    use jmp_protocol::selector::{Labels, Selector};

    const H: Millis = 3_600_000;
    const DAY: Millis = 24 * H;
    /// 2026-11-01T00:00:00Z.
    const NOV1: Millis = 1_793_491_200_000;
    const DEC1: Millis = NOV1 + 30 * DAY;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    struct Lab {
        book: LeaseBook,
        history: History,
        n: u32,
    }

    impl Lab {
        fn team(client: &str) -> String {
            match client {
                "alice" | "bob" => "platform".into(),
                "carol" => "modem".into(),
                _ => String::new(),
            }
        }

        fn feed(&mut self, now: Millis, events: Vec<Event>) {
            for e in events {
                if let Event::Ended { lease, reason } = e {
                    let team = Lab::team(&lease.client);
                    self.history.ended(now, &lease, &reason, team).unwrap();
                }
            }
        }

        /// `client` leases `exporter` at `now` for `dur`; returns the lease name.
        fn lease(&mut self, now: Millis, client: &str, exporter: &str, dur: Millis) -> String {
            let events = self.book.tick(now);
            self.feed(now, events);
            self.n += 1;
            let (out, events) = self.book.request(
                now,
                NewRequest {
                    request_id: format!("r{}", self.n),
                    lease_name: format!("l{:02}", self.n),
                    client: client.into(),
                    selector: Selector::parse("").unwrap(),
                    policy: Selector::parse("").unwrap(),
                    exporter: Some(exporter.into()),
                    duration: dur,
                    not_before: now,
                    wait_until: None,
                    job: None,
                    reserved: false,
                    idle_timeout: None,
                    max_duration: None,
                },
            );
            self.feed(now, events);
            match out {
                Outcome::Granted(l) => l.name,
                other => panic!("{client} on {exporter} at {now}: {other:?}"),
            }
        }

        fn release(&mut self, now: Millis, lease: &str) {
            let events = self.book.tick(now);
            self.feed(now, events);
            let events = self.book.release(now, lease);
            assert!(!events.is_empty(), "{lease} was live");
            self.feed(now, events);
        }

        fn advance(&mut self, now: Millis) {
            let events = self.book.tick(now);
            self.feed(now, events);
        }
    }

    fn month() -> Lab {
        let mut book = LeaseBook::new();
        for e in ["rpi4-01", "rpi4-02"] {
            book.upsert_exporter(NOV1 - 10 * DAY, e, labels(&[("board", "rpi4")]), true);
            book.set_online(NOV1 - 10 * DAY, e, true);
        }
        let mut lab = Lab {
            book,
            history: History::new(DEFAULT_RETENTION_MS),
            n: 0,
        };
        // October 31 22:00 for 4 h: 2 h in October, 2 h in November.
        lab.lease(NOV1 - 2 * H, "alice", "rpi4-01", 4 * H);
        // Nov 3: bob 8 h, expires.
        lab.lease(NOV1 + 2 * DAY + 9 * H, "bob", "rpi4-01", 8 * H);
        // Nov 3: carol 10 h asked, released after 90 minutes.
        let c = lab.lease(NOV1 + 2 * DAY + 9 * H, "carol", "rpi4-02", 10 * H);
        lab.release(NOV1 + 2 * DAY + 10 * H + 30 * 60_000, &c);
        // Every weekday-ish: carol 1 h on rpi4-02, 20 times.
        for d in 5..25 {
            lab.lease(NOV1 + d * DAY + 14 * H, "carol", "rpi4-02", H);
        }
        // A client without a team: 30 minutes.
        lab.lease(NOV1 + 12 * DAY, "dave", "rpi4-01", 30 * 60_000);
        // Nov 30 20:00 for 6 h: 4 h in November, still live at the report's time? No: the
        // report runs Dec 1 01:00, so 1 h of December has passed and the lease is active.
        lab.lease(DEC1 - 4 * H, "alice", "rpi4-01", 6 * H);
        lab.advance(DEC1 + H);
        lab
    }

    fn report(lab: &Lab, by: UsageBy) -> UsageReport {
        let now = DEC1 + H;
        let live: Vec<(&Lease, String)> = lab
            .book
            .leases()
            .map(|l| (l, Lab::team(&l.client)))
            .collect();
        lab.history.report(
            now,
            &UsageQuery {
                since: NOV1,
                until: Some(DEC1),
                by,
            },
            live.into_iter(),
        )
    }

    #[test]
    fn a_month_of_two_teams_reports_in_table_csv_and_json() {
        let lab = month();
        assert_eq!(lab.history.len(), 24, "every lease but the live one ended");
        let r = report(&lab, UsageBy::Team);
        // platform: alice 2 h (Oct 31 lease's November part) + bob 8 h + alice 4 h (live,
        // November part) = 14 h over 3 leases; modem: carol 1.5 h + 20 × 1 h = 21.5 h over 21;
        // no team: dave 0.5 h.
        assert_eq!(
            r.csv(),
            "team,leases,seconds,hours\r\n\
             ,1,1800,0.50\r\n\
             modem,21,77400,21.50\r\n\
             platform,3,50400,14.00\r\n"
        );
        let (header, rows) = r.table();
        assert_eq!(header, ["TEAM", "LEASES", "HOURS"]);
        assert_eq!(
            rows,
            [
                ["(none)", "1", "0.50"],
                ["modem", "21", "21.50"],
                ["platform", "3", "14.00"],
                ["TOTAL", "25", "36.00"],
            ]
        );
        let j = r.json();
        assert_eq!(j["since"], "2026-11-01T00:00:00Z");
        assert_eq!(j["until"], "2026-12-01T00:00:00Z");
        assert_eq!(j["by"], "team");
        assert_eq!(j["rows"][1]["team"], "modem");
        assert_eq!(j["rows"][1]["leases"], 21);
        assert_eq!(j["rows"][1]["seconds"], 77400);
        assert_eq!(j["rows"][1]["hours"], 21.5);
        assert_eq!(j["total"]["hours"], 36.0);
        assert!(j.get("history_from").is_none());

        let by_exporter = report(&lab, UsageBy::Exporter);
        assert_eq!(
            by_exporter.csv(),
            "exporter,leases,seconds,hours\r\n\
             rpi4-01,4,52200,14.50\r\n\
             rpi4-02,21,77400,21.50\r\n"
        );
        let by_client = report(&lab, UsageBy::Client);
        assert_eq!(
            by_client
                .rows
                .iter()
                .map(|r| (r.key.as_str(), r.leases, r.ms))
                .collect::<Vec<_>>(),
            [
                ("alice", 2, 6 * H),
                ("bob", 1, 8 * H),
                ("carol", 21, 21 * H + 30 * 60_000),
                ("dave", 1, 30 * 60_000),
            ]
        );
    }

    #[test]
    fn per_lease_rows_say_when_and_why_each_ended() {
        let lab = month();
        let r = report(&lab, UsageBy::Lease);
        assert_eq!(r.rows.len(), 25);
        let csv = r.csv();
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines[0],
            "lease,client,team,exporter,begin,end,reason,seconds,hours"
        );
        // The October lease: began before the window, counted from Nov 1.
        assert_eq!(
            lines[1],
            "l01,alice,platform,rpi4-01,2026-10-31T22:00:00Z,2026-11-01T02:00:00Z,expired,7200,2.00"
        );
        assert_eq!(
            lines[3],
            "l03,carol,modem,rpi4-02,2026-11-03T09:00:00Z,2026-11-03T10:30:00Z,released,5400,1.50"
        );
        // The live one: active, ends (for now) at the report's time, counted to Dec 1.
        assert_eq!(
            lines[25],
            "l25,alice,platform,rpi4-01,2026-11-30T20:00:00Z,2026-12-01T01:00:00Z,active,14400,4.00"
        );
        let (header, rows) = r.table();
        assert_eq!(header.len(), 8);
        assert_eq!(rows.last().unwrap()[0], "TOTAL");
        assert_eq!(rows.last().unwrap()[7], "36.00");
        assert_eq!(r.json()["rows"][2]["reason"], "released");
    }

    #[test]
    fn retention_drops_old_records_and_the_report_says_it_is_short() {
        let mut lab = month();
        lab.history.set_retention(20 * DAY);
        let ops = lab.history.prune(DEC1 + H);
        // Ended before Nov 11 01:00: the October lease, bob's, carol's first and Nov 6..10.
        assert_eq!(ops.len(), 3 + 5, "{ops:?}");
        assert!(ops.iter().all(|o| matches!(
            o,
            Op::Delete {
                table: Table::Usage,
                ..
            }
        )));
        let r = report(&lab, UsageBy::Team);
        let from = r
            .history_from
            .expect("the report says where the history starts");
        assert!(from > NOV1);
        assert!(r.json()["history_from"].is_string());
        // Nothing to prune twice.
        assert!(lab.history.prune(DEC1 + H).is_empty());
    }
}
