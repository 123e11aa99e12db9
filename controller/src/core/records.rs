//! The identity registry: the durable records of clients and exporters, and what the other
//! jobs ask of them (is this credential current, is this client an admin, which team, which
//! policy).

use super::Caller;
use jmp_protocol::ctl::{CtlError, CtlErrorCode, DeviceSummary};
use jmp_protocol::selector::{Labels, Selector};
use jmp_protocol::token::TokenKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientRecord {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub allow: String,
    #[serde(default)]
    pub max_duration_secs: u64,
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

    /// The client's policy: which exporters it may lease (and the text of it), and its
    /// longest lease (`default_max` when its record sets none).
    pub fn client_policy(&self, client: &str, default_max: u64) -> (Selector, String, u64) {
        let rec = self.clients.get(client);
        let allow = rec.map(|c| c.allow.clone()).unwrap_or_default();
        let max = rec
            .map(|c| c.max_duration_secs)
            .filter(|m| *m > 0)
            .unwrap_or(default_max);
        (Selector::parse(&allow).unwrap_or_default(), allow, max)
    }
}
