//! Identities and their credentials: the signing key, issuing (create, rotate, renew) and
//! revoking (re-create, rotate, delete) client and exporter credentials, and the admin's.

use super::records::{Allow, ClientRecord, ExporterRecord};
use super::{err, now_ms, random_hex, Caller, Core};
use crate::book::Millis;
use crate::store::{LeaseStore, Table};
use jmp_protocol::api::{
    ClientConfig, ClientInfo, ClientSpec, ClientUpdate, Credential, CtlErrorCode, ExporterSpec,
    IdentityKind, Reply,
};
use jmp_protocol::selector::{parse_label, Labels};
use jmp_protocol::token::{Claims, ControllerRef, TokenKind};
use jmp_transport::token::Signer;
use tracing::{debug, info};

/// Default of `--credential-ttl`: 90 days; `jmp` and `jmpd` renew when 30 are left.
pub const DEFAULT_CREDENTIAL_TTL_SECS: u64 = 90 * 86_400;

pub const ISSUER: &str = "jmp-controller";

/// The key pair and the controller reference put into credentials.
pub struct Authority {
    pub signer: Signer,
    pub ctl: ControllerRef,
    /// With several controllers: every live one's address, comma-separated, for the credentials
    /// issued from now on (kept current by [`crate::cluster`]); `None`: `ctl.endpoint`.
    pub cluster_endpoints: std::sync::RwLock<Option<String>>,
}

impl Authority {
    pub fn new(signer: Signer, ctl: ControllerRef) -> Authority {
        Authority {
            signer,
            ctl,
            cluster_endpoints: std::sync::RwLock::new(None),
        }
    }

    /// The controller reference credentials carry: how to reach (any of) the controllers.
    pub fn ctl_ref(&self) -> ControllerRef {
        let mut c = self.ctl.clone();
        if let Some(e) = self
            .cluster_endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            c.endpoint = e;
        }
        c
    }

    pub fn set_endpoints(&self, endpoints: String) {
        *self
            .cluster_endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(endpoints);
    }
}

/// Names of clients and exporters: what a label value may be (they appear in labels, file
/// names and metrics).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    parse_label(&format!("name={name}"))
        .map(|_| ())
        .map_err(|e| format!("invalid {what} name {name:?}: {}", e.message))?;
    if name.is_empty() {
        return Err(format!("{what} name must not be empty"));
    }
    Ok(())
}

impl<S: LeaseStore> Core<S> {
    /// The admin credential file at `path` is missing, not this controller's current admin
    /// credential, or due for renewal: writes a good one there. A due one is renewed (same
    /// id: copies elsewhere keep working); a missing or foreign one is re-issued, revoking
    /// the old. `reissue: false` (a cluster member whose store already has an admin issued by
    /// another controller) renews only a file that holds the current credential.
    pub fn ensure_admin_file(
        &mut self,
        path: &std::path::Path,
        reissue: bool,
    ) -> anyhow::Result<()> {
        let now = now_ms() / 1000;
        let current = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_norway::from_str::<ClientConfig>(&t).ok())
            .and_then(|c| {
                self.verifier
                    .verify_any_within(&c.token, now, u64::MAX)
                    .ok()
            })
            .filter(|c| {
                c.sub == "admin"
                    && self
                        .registry
                        .clients
                        .get("admin")
                        .is_some_and(|r| r.jti == c.jti && r.admin)
            });
        let cred = match current {
            Some(c) if c.renew_at(None).is_none_or(|at| now < at) => return Ok(()),
            Some(c) => {
                info!(
                    "the admin credential is due for renewal: renewing {}",
                    path.display()
                );
                let cred = self.credential(IdentityKind::Client, "admin", &c.jti, true)?;
                self.issued_to_client(&cred);
                self.persist()?;
                cred
            }
            None if reissue || !self.has_client("admin") => {
                let _ = std::fs::remove_file(path);
                self.issue_admin("admin")?
            }
            None => {
                if !path.exists() {
                    info!(
                        "the cluster's admin credential was issued by another controller; copy its admin.yaml to {} to use jmp admin here",
                        path.display()
                    );
                }
                return Ok(());
            }
        };
        let yaml = serde_norway::to_string(&ClientConfig::new(&cred))?;
        jmp_transport::write_secret_file(path, yaml.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        info!("admin credential written to {}", path.display());
        Ok(())
    }

    /// Issues (or re-issues) the admin credential, revoking any earlier one.
    pub fn issue_admin(&mut self, name: &str) -> anyhow::Result<Credential> {
        let rec = ClientRecord {
            name: name.into(),
            labels: Labels::new(),
            allow: Allow::any(),
            max_duration_secs: 0,
            max_idle_timeout_secs: 0,
            admin: true,
            jti: random_hex(12),
            created: now_ms() / 1000,
            expires: 0,
        };
        let cred = self.credential(IdentityKind::Client, name, &rec.jti, true)?;
        self.registry.clients.insert(name.into(), rec);
        self.issued_to_client(&cred);
        self.persist.dirty.insert((Table::Clients, name.into()));
        self.persist()?;
        Ok(cred)
    }

    fn credential(
        &self,
        kind: IdentityKind,
        name: &str,
        jti: &str,
        admin: bool,
    ) -> Result<Credential, jmp_transport::token::TokenError> {
        let ctl = self.auth.ctl_ref();
        let endpoint = ctl.endpoint.clone();
        let claims = Claims {
            iss: super::ISSUER.into(),
            sub: name.into(),
            kind: match kind {
                IdentityKind::Client => TokenKind::Client,
                IdentityKind::Exporter => TokenKind::Exporter,
            },
            jti: jti.into(),
            iat: now_ms() / 1000,
            exp: (self.credential_ttl > 0).then(|| now_ms() / 1000 + self.credential_ttl),
            client: None,
            exporter: None,
            ctl: Some(ctl),
            admin,
            share: None,
        };
        Ok(Credential {
            kind,
            name: name.into(),
            token: self.auth.signer.sign(&claims)?,
            endpoint,
            fingerprint: self.auth.ctl.fingerprint.clone(),
        })
    }

    pub(super) fn create_client(&mut self, spec: ClientSpec) -> Reply {
        if let Err(e) = check_name("client", &spec.name) {
            return err(CtlErrorCode::Invalid, e);
        }
        // Re-running a create must not silently reset a client's policy and limits (and
        // revoke the credential in use): the admin says which of those was meant.
        if self.registry.clients.contains_key(&spec.name) {
            let n = &spec.name;
            return err(
                CtlErrorCode::Invalid,
                format!(
                    "client {n} already exists. To give it a new credential (revoking the old one, keeping its policy): jmp admin create client {n} --replace. To change its policy: jmp admin update client {n} --allow SELECTOR --max-duration DURATION. To start over: jmp admin delete client {n}, then create it"
                ),
            );
        }
        let allow = match Allow::parse(&spec.allow) {
            Ok(a) => a,
            Err(e) => return err(CtlErrorCode::Invalid, format!("--allow: {e}")),
        };
        let rec = ClientRecord {
            name: spec.name.clone(),
            labels: spec.labels,
            allow,
            max_duration_secs: spec.max_duration_secs,
            max_idle_timeout_secs: spec.max_idle_timeout_secs,
            admin: spec.admin,
            jti: random_hex(12),
            created: now_ms() / 1000,
            expires: 0,
        };
        match self.credential(IdentityKind::Client, &rec.name, &rec.jti, rec.admin) {
            Ok(c) => {
                info!(client = %rec.name, "client created (any earlier credential revoked)");
                self.persist
                    .dirty
                    .insert((Table::Clients, rec.name.clone()));
                self.registry.clients.insert(rec.name.clone(), rec);
                self.issued_to_client(&c);
                Reply::Credential(c)
            }
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        }
    }

    /// An admin changes a client: its policy (which reaches its queued requests, reservations
    /// and leases at once), labels, admin rights, and with `reissue` its credential.
    pub(super) fn update_client(&mut self, now: Millis, u: ClientUpdate) -> Reply {
        let Some(rec) = self.registry.clients.get(&u.name) else {
            return err(
                CtlErrorCode::NotFound,
                format!(
                    "no client {:?} (create it with jmp admin create client NAME)",
                    u.name
                ),
            );
        };
        let allow = match u.allow.as_deref().map(Allow::parse).transpose() {
            Ok(a) => a,
            Err(e) => return err(CtlErrorCode::Invalid, format!("--allow: {e}")),
        };
        let mut next = rec.clone();
        if let Some(a) = allow {
            next.allow = a;
        }
        if let Some(m) = u.max_duration_secs {
            next.max_duration_secs = m;
        }
        if let Some(m) = u.max_idle_timeout_secs {
            next.max_idle_timeout_secs = m;
        }
        if let Some(l) = u.labels {
            next.labels = l;
        }
        if let Some(a) = u.admin {
            next.admin = a;
        }
        if u.reissue {
            next.jti = random_hex(12);
        }
        let policy_changed = next.allow != rec.allow
            || next.max_duration_secs != rec.max_duration_secs
            || next.max_idle_timeout_secs != rec.max_idle_timeout_secs;
        // (Admin rights are the record's: a credential issued before a change follows it.)
        let cred = if u.reissue {
            match self.credential(IdentityKind::Client, &next.name, &next.jti, next.admin) {
                Ok(c) => Some(c),
                Err(e) => return err(CtlErrorCode::Internal, e.to_string()),
            }
        } else {
            None
        };
        let name = next.name.clone();
        info!(
            client = %name,
            allow = %next.allow.text(),
            max_duration_secs = next.max_duration_secs,
            max_idle_timeout_secs = next.max_idle_timeout_secs,
            reissued = cred.is_some(),
            "client updated"
        );
        self.registry.clients.insert(name.clone(), next);
        self.persist.dirty.insert((Table::Clients, name.clone()));
        if policy_changed {
            self.policy_changed(now, &name);
        }
        match cred {
            Some(c) => {
                self.issued_to_client(&c);
                Reply::Credential(c)
            }
            None => self.get_clients(Some(name)),
        }
    }

    pub(super) fn get_clients(&self, name: Option<String>) -> Reply {
        let clients: Vec<ClientInfo> = self
            .registry
            .clients
            .values()
            .filter(|c| name.as_ref().is_none_or(|n| *n == c.name))
            .map(|c| ClientInfo {
                name: c.name.clone(),
                labels: c.labels.clone(),
                allow: c.allow.text().to_string(),
                max_duration_secs: c.max_duration_secs,
                max_idle_timeout_secs: c.max_idle_timeout_secs,
                admin: c.admin,
                credential_expires: (c.expires > 0).then_some(c.expires),
            })
            .collect();
        if clients.is_empty() && name.is_some() {
            err(
                CtlErrorCode::NotFound,
                format!("no client {:?}", name.unwrap_or_default()),
            )
        } else {
            Reply::Clients { clients }
        }
    }

    pub(super) fn create_exporter(&mut self, now: Millis, spec: ExporterSpec) -> Reply {
        if let Err(e) = check_name("exporter", &spec.name) {
            return err(CtlErrorCode::Invalid, e);
        }
        let jti = random_hex(12);
        let rec = match self.registry.exporters.remove(&spec.name) {
            Some(mut r) => {
                r.labels = spec.labels;
                r.jti = jti;
                r
            }
            None => ExporterRecord {
                name: spec.name.clone(),
                labels: spec.labels,
                config_labels: Labels::new(),
                enabled: true,
                jti,
                created: now / 1000,
                address: String::new(),
                fingerprint: String::new(),
                rejected_fingerprint: None,
                devices: Vec::new(),
                relay: false,
            },
        };
        let cred = self.credential(IdentityKind::Exporter, &rec.name, &rec.jti, false);
        let ev = self
            .book
            .upsert_exporter(now, &rec.name, rec.effective_labels(), rec.enabled);
        self.persist
            .dirty
            .insert((Table::Exporters, rec.name.clone()));
        // A re-issued credential revokes the old one: drop the old registration.
        if let Some(l) = self.links.links.remove(&rec.name) {
            let _ = l.tx.send(err(
                CtlErrorCode::Unauthorized,
                "this exporter's credential was re-issued",
            ));
            let ev = self.book.set_online(now, &rec.name, false);
            self.on_events(now, ev);
        }
        if !self.links.links.contains_key(&rec.name) {
            self.metrics
                .exporter_up
                .with_label_values(&[&rec.name])
                .set(0);
        }
        self.registry.exporters.insert(rec.name.clone(), rec);
        self.on_events(now, ev);
        match cred {
            Ok(c) => Reply::Credential(c),
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        }
    }

    pub(super) fn delete_client(&mut self, now: Millis, name: &str) -> Reply {
        if self.registry.clients.remove(name).is_none() {
            return err(CtlErrorCode::NotFound, format!("no client {name:?}"));
        }
        self.persist.dirty.insert((Table::Clients, name.into()));
        let waiting: Vec<String> = self
            .book
            .waiting()
            .filter(|w| w.client == name)
            .map(|w| w.request_id.clone())
            .collect();
        for id in waiting {
            let r = err(
                CtlErrorCode::Unauthorized,
                format!("client {name} was deleted"),
            );
            self.waiters.answer(&id, r, &mut self.out);
        }
        let ev = self.book.remove_client(now, name);
        self.on_events(now, ev);
        // Its shares of others' leases end with it: a client made later under the same name
        // must not inherit them, and its tokens' sessions end when the exporters hear.
        self.end_shares_of(name, |_| true, "the client was deleted");
        self.waiters.positions_dirty = true;
        info!(client = %name, "client deleted");
        Reply::Deleted {
            names: vec![name.into()],
        }
    }

    pub(super) fn delete_exporter(&mut self, now: Millis, name: &str) -> Reply {
        if self.registry.exporters.remove(name).is_none() {
            return err(CtlErrorCode::NotFound, format!("no exporter {name:?}"));
        }
        self.persist.dirty.insert((Table::Exporters, name.into()));
        let ev = self.book.remove_exporter(now, name);
        self.on_events(now, ev);
        // Its lease's end and then the refusal reach jmpd after the commit, like everything.
        self.links.push.remove(name);
        if let Some(l) = self.links.links.remove(name) {
            let ended = self.links.ended.remove(name).unwrap_or_default();
            self.out.push((
                l.tx.clone(),
                Reply::ExporterState {
                    lease: None,
                    ended,
                    enabled: false,
                    at: now / 1000,
                    cleaning: None,
                },
            ));
            self.out.push((
                l.tx,
                err(
                    CtlErrorCode::Unauthorized,
                    format!("exporter {name} was deleted"),
                ),
            ));
        }
        info!(exporter = %name, "exporter deleted");
        let _ = self.metrics.exporter_up.remove_label_values(&[name]);
        Reply::Deleted {
            names: vec![name.into()],
        }
    }

    pub(super) fn rotate(&mut self, caller: &Caller) -> Reply {
        let jti = random_hex(12);
        let (kind, admin) = match caller.kind {
            TokenKind::Exporter => match self.registry.exporters.get_mut(&caller.name) {
                Some(r) => {
                    r.jti = jti.clone();
                    self.persist
                        .dirty
                        .insert((Table::Exporters, caller.name.clone()));
                    (IdentityKind::Exporter, false)
                }
                None => return err(CtlErrorCode::NotFound, "exporter gone"),
            },
            _ => match self.registry.clients.get_mut(&caller.name) {
                Some(r) => {
                    r.jti = jti.clone();
                    self.persist
                        .dirty
                        .insert((Table::Clients, caller.name.clone()));
                    (IdentityKind::Client, r.admin)
                }
                None => return err(CtlErrorCode::NotFound, "client gone"),
            },
        };
        info!(name = %caller.name, "credential rotated; the old one is revoked");
        match self.credential(kind, &caller.name, &jti, admin) {
            Ok(c) => {
                if matches!(c.kind, IdentityKind::Client) {
                    self.issued_to_client(&c);
                }
                Reply::Credential(c)
            }
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        }
    }

    /// Records when the credential just issued to client `name` expires (shown by `jmp admin
    /// get clients`, so an admin sees a client that stopped renewing).
    fn issued_to_client(&mut self, cred: &Credential) {
        let exp = jmp_transport::token::peek(&cred.token)
            .ok()
            .and_then(|c| c.exp)
            .unwrap_or(0);
        if let Some(r) = self.registry.clients.get_mut(&cred.name) {
            if r.expires != exp {
                r.expires = exp;
                self.persist
                    .dirty
                    .insert((Table::Clients, cred.name.clone()));
            }
        }
    }

    /// The caller's credential again with a fresh expiry: the same id, so nothing is revoked
    /// (a credential shared by many CI runners keeps working on all of them; `rotate` is the
    /// one that revokes).
    pub(super) fn renew(&mut self, caller: &Caller) -> Reply {
        let (kind, admin) = match caller.kind {
            TokenKind::Exporter => (IdentityKind::Exporter, false),
            _ => (IdentityKind::Client, self.registry.is_admin(caller)),
        };
        debug!(name = %caller.name, "credential renewed");
        match self.credential(kind, &caller.name, &caller.jti, admin) {
            Ok(c) => {
                if matches!(c.kind, IdentityKind::Client) {
                    self.issued_to_client(&c);
                }
                Reply::Credential(c)
            }
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        }
    }
}
