//! Relay admission: a client's `relay` call is served only for its own active lease, with a
//! valid lease token naming that lease's exporter, on an exporter that takes relayed sessions
//! and is connected (the exporter is told to punch through on its registration stream).

use super::{Caller, Core};
use crate::store::LeaseStore;
use jmp_protocol::api::{CtlError, CtlErrorCode, Reply};
use jmp_protocol::token::TokenKind;
use tokio::sync::mpsc;
use tracing::info;

impl<S: LeaseStore> Core<S> {
    /// A client's `relay` call: checks its lease token and opens a relay session to the
    /// lease's exporter. The answer comes from the session once the exporter punched through.
    pub(super) fn relay(&mut self, caller: &Caller, token: &str, tx: mpsc::UnboundedSender<Reply>) {
        if let Err(e) = self.open_relay(caller, token, &tx) {
            info!(client = %caller.name, "relay refused: {}", e.message);
            self.reply(&tx, Reply::Error(e));
        }
    }

    fn open_relay(
        &mut self,
        caller: &Caller,
        token: &str,
        tx: &mpsc::UnboundedSender<Reply>,
    ) -> Result<(), CtlError> {
        fn e(code: CtlErrorCode, m: impl Into<String>) -> CtlError {
            CtlError::new(code, m)
        }
        if self.relays.is_none() {
            return Err(e(
                CtlErrorCode::Forbidden,
                "this controller runs no relay (start it with --relay-bind ADDR)",
            ));
        }
        let claims = self
            .verifier
            .verify(token, TokenKind::Lease, jmp_transport::unix_now())
            .map_err(|x| {
                e(
                    CtlErrorCode::Unauthorized,
                    format!("lease token refused: {x}"),
                )
            })?;
        let lease = self.book.lease(&claims.sub).cloned().ok_or_else(|| {
            e(
                CtlErrorCode::NotFound,
                format!("lease {} is not active (it ended)", claims.sub),
            )
        })?;
        if lease.client != caller.name || claims.client.as_deref() != Some(caller.name.as_str()) {
            return Err(e(
                CtlErrorCode::Forbidden,
                format!("lease {} belongs to {}", lease.name, lease.client),
            ));
        }
        if claims.exporter.as_deref() != Some(lease.exporter.as_str()) {
            return Err(e(
                CtlErrorCode::Unauthorized,
                "the lease token names another exporter than its lease",
            ));
        }
        let relay_ok = self
            .registry
            .exporters
            .get(&lease.exporter)
            .is_some_and(|r| r.relay);
        if !relay_ok {
            return Err(e(
                CtlErrorCode::Forbidden,
                format!(
                    "exporter {} takes no relayed sessions (its config has no controller: {{relay: true}})",
                    lease.exporter
                ),
            ));
        }
        let Some(link) = self.links.links.get(&lease.exporter) else {
            return Err(e(
                CtlErrorCode::AllOffline,
                format!(
                    "exporter {} is not connected to the controller, so the relay cannot reach it",
                    lease.exporter
                ),
            ));
        };
        let link_tx = link.tx.clone();
        let Some(relays) = self.relays.as_mut() else {
            return Ok(());
        };
        let grant = relays
            .open(&lease.name, &lease.client, &lease.exporter, tx.clone())
            .map_err(|x| match x {
                crate::relay::OpenError::Busy(m) => e(CtlErrorCode::AllBusy, m),
                crate::relay::OpenError::Failed(m) => e(CtlErrorCode::Internal, m),
            })?;
        let _ = link_tx.send(Reply::RelayOpen(grant));
        Ok(())
    }
}
