//! The identity registry: the durable records of clients and exporters, and what the other
//! jobs ask of them (is this credential current, is this client an admin, which team, which
//! policy).

use super::Caller;
use jmp_protocol::api::{CtlError, CtlErrorCode, DeviceSummary};
use jmp_protocol::selector::{Labels, Selector, SelectorError};
use jmp_protocol::token::TokenKind;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// A client's `allow` policy: stored as its text, held parsed. A stored text that does not
/// parse (written by another version, or edited by hand) is kept with its error, and the
/// client is refused everything that needs its policy until an admin sets a valid one: a
/// policy that cannot be read never means "any exporter".
#[derive(Debug, Clone, PartialEq)]
pub struct Allow {
    text: String,
    parsed: Result<Selector, SelectorError>,
}

impl Allow {
    /// Any exporter (the empty selector).
    pub fn any() -> Allow {
        Allow {
            text: String::new(),
            parsed: Ok(Selector::default()),
        }
    }

    /// A new policy from an admin: it must parse.
    pub fn parse(text: &str) -> Result<Allow, SelectorError> {
        let parsed = Selector::parse(text)?;
        Ok(Allow {
            text: text.to_string(),
            parsed: Ok(parsed),
        })
    }

    /// As stored (what `jmp admin get clients` shows).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn selector(&self) -> Result<&Selector, &SelectorError> {
        self.parsed.as_ref()
    }
}

impl Default for Allow {
    fn default() -> Allow {
        Allow::any()
    }
}

impl Serialize for Allow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Allow {
    /// Never fails on a text that does not parse: the record loads, and its client is
    /// refused (see [`Allow`]).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Allow, D::Error> {
        let text = String::deserialize(d)?;
        let parsed = Selector::parse(&text);
        Ok(Allow { text, parsed })
    }
}

/// What a client may lease, from its record.
pub struct Policy<'a> {
    /// The exporters it may lease.
    pub allow: &'a Selector,
    /// As the admin wrote it (for messages).
    pub text: &'a str,
    /// Its longest lease, seconds.
    pub max_secs: u64,
    /// The longest idle timeout its leases may have, seconds (`None`: no limit, and a lease
    /// may have none).
    pub max_idle_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientRecord {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub allow: Allow,
    #[serde(default)]
    pub max_duration_secs: u64,
    /// The longest idle timeout its leases may have (0: no limit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_idle_timeout_secs: u64,
    #[serde(default)]
    pub admin: bool,
    /// The id of the one valid credential; anything else is revoked.
    pub jti: String,
    pub created: u64,
    /// When the newest credential issued to it expires (Unix seconds; 0: never).
    #[serde(default)]
    pub expires: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExporterRecord {
    pub name: String,
    /// Set by the admin; wins over `config_labels`.
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub config_labels: Labels,
    pub enabled: bool,
    pub jti: String,
    pub created: u64,
    #[serde(default)]
    pub address: String,
    /// Bound at the first registration; a registration with another one is refused until an
    /// admin rebinds the exporter (a leaked credential cannot redirect clients elsewhere).
    #[serde(default)]
    pub fingerprint: String,
    /// The last fingerprint a refused registration presented.
    #[serde(default)]
    pub rejected_fingerprint: Option<String>,
    #[serde(default)]
    pub devices: Vec<DeviceSummary>,
    /// It takes relayed sessions (`controller: {relay: true}` in its config).
    #[serde(default)]
    pub relay: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl ExporterRecord {
    pub fn effective_labels(&self) -> Labels {
        let mut l = self.config_labels.clone();
        l.extend(self.labels.clone());
        l
    }
}

/// Every client and exporter record, by name.
#[derive(Default)]
pub(super) struct Registry {
    pub clients: BTreeMap<String, ClientRecord>,
    pub exporters: BTreeMap<String, ExporterRecord>,
}

impl Registry {
    /// Whether `c`'s credential is its identity's current one (the API task checked the
    /// signature; revocation is checked here, against the records).
    pub fn authenticate(&self, c: &Caller) -> Result<(), CtlError> {
        let jti = match c.kind {
            TokenKind::Client => self.clients.get(&c.name).map(|r| &r.jti),
            TokenKind::Exporter => self.exporters.get(&c.name).map(|r| &r.jti),
            TokenKind::Lease => {
                return Err(CtlError::new(
                    CtlErrorCode::Unauthorized,
                    "a lease token is not a credential for the controller",
                ))
            }
        };
        match jti {
            None => Err(CtlError::new(
                CtlErrorCode::Unauthorized,
                format!("unknown {} {:?} (deleted?)", c.kind.as_str(), c.name),
            )),
            Some(j) if *j != c.jti => Err(CtlError::new(
                CtlErrorCode::Unauthorized,
                format!(
                    "this credential of {} {:?} was revoked (rotated or re-created); use the new one",
                    c.kind.as_str(),
                    c.name
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    pub fn is_admin(&self, c: &Caller) -> bool {
        c.kind == TokenKind::Client && self.clients.get(&c.name).is_some_and(|r| r.admin)
    }

    /// The client's `team` label ("" without one): how metrics and usage group clients.
    pub fn team(&self, client: &str) -> String {
        self.clients
            .get(client)
            .and_then(|c| c.labels.get("team").cloned())
            .unwrap_or_default()
    }

    /// The client's policy: which exporters it may lease, and its longest lease
    /// (`default_max` when its record sets none). Fails closed, naming the client: a client
    /// without a record, or whose stored policy does not parse, may lease nothing.
    pub fn client_policy(&self, client: &str, default_max: u64) -> Result<Policy<'_>, CtlError> {
        let Some(rec) = self.clients.get(client) else {
            return Err(CtlError::new(
                CtlErrorCode::Forbidden,
                format!("client {client:?} has no record on this controller (deleted?), so it has no policy and may lease nothing"),
            ));
        };
        let allow = rec.allow.selector().map_err(|e| {
            CtlError::new(
                CtlErrorCode::Forbidden,
                format!(
                    "the stored policy of client {client} ({:?}) does not parse ({e}), so it may lease nothing until an admin sets a valid one: jmp admin update client {client} --allow SELECTOR",
                    rec.allow.text()
                ),
            )
        })?;
        let max_secs = Some(rec.max_duration_secs)
            .filter(|m| *m > 0)
            .unwrap_or(default_max);
        Ok(Policy {
            allow,
            text: rec.allow.text(),
            max_secs,
            max_idle_secs: Some(rec.max_idle_timeout_secs).filter(|m| *m > 0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(allow: &str) -> ClientRecord {
        serde_json::from_value(serde_json::json!({
            "name": "c1", "allow": allow, "jti": "j", "created": 0
        }))
        .expect("a client record loads whatever its policy")
    }

    #[test]
    fn a_policy_that_does_not_parse_or_a_missing_record_allows_nothing() {
        let mut r = Registry::default();
        let e = r.client_policy("c1", 60).err().expect("no record: refused");
        assert_eq!(e.code, CtlErrorCode::Forbidden);
        assert!(e.message.contains("client \"c1\" has no record"), "{e}");
        r.clients.insert("c1".into(), record("board in (rpi4"));
        let e = r
            .client_policy("c1", 60)
            .err()
            .expect("bad policy: refused");
        assert_eq!(e.code, CtlErrorCode::Forbidden);
        assert!(
            e.message.contains("policy of client c1") && e.message.contains("board in (rpi4"),
            "{e}"
        );
        // Stored as it was: saving the record again does not lose or "repair" it.
        let again = serde_json::to_value(&r.clients["c1"]).unwrap();
        assert_eq!(again["allow"], "board in (rpi4");
        r.clients.insert("c1".into(), record("board=rpi4"));
        let p = r.client_policy("c1", 60).expect("a good policy");
        assert_eq!(p.text, "board=rpi4");
        assert_eq!(p.max_secs, 60);
        assert!(p
            .allow
            .matches(&[("board".to_string(), "rpi4".to_string())].into()));
        assert!(!p.allow.matches(&Labels::new()));
    }
}
