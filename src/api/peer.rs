//! Who is calling: every request carries the peer of its connection, read from `SO_PEERCRED`
//! at accept ([`PeerCredentials`]) with its supplementary groups (`SO_PEERGROUPS`, also at
//! accept, so a connection outlives the process that opened it; else from `/proc`). Only uid 0 and members of
//! `--group` are served; what needs uid 0 asks [`require_root`]. Mutating requests leave one
//! audit line each.
//!
//! Owns: reading and admitting the peer, the audit line. Does not own: checking the paths a
//! peer names (supervisor, client_fs).

use std::borrow::Cow;

use tonic::{Request, Status};

use crate::client_fs::Peer;
use crate::error::Error;
use crate::model::{ConnectionInfo, PeerCredentials};

/// Admits a request's peer (uid 0, or a member of the socket's group) and attaches it to the
/// request, for the services to read with [`peer`].
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    group: u32,
}

impl Gate {
    /// `group`: the gid owning the socket, whose members may use the API.
    pub fn new(group: u32) -> Self {
        Gate { group }
    }

    fn admit(&self, credentials: Option<&PeerCredentials>) -> Result<Peer, Error> {
        let Some(cred) = credentials.and_then(|credentials| credentials.0) else {
            return Err(Error::PermissionDenied(
                "the peer's credentials could not be read from the connection; connect over berthd's unix socket".into(),
            ));
        };
        let pid = cred.pid().max(0) as u32;
        let peer = match credentials.and_then(|credentials| credentials.1.as_ref()) {
            Some(groups) => Peer {
                pid,
                uid: cred.uid(),
                gid: cred.gid(),
                groups: groups.to_vec(),
            },
            None => Peer::from_credentials(pid, cred.uid(), cred.gid())?,
        };
        if peer.is_root() || peer.in_group(self.group) {
            return Ok(peer);
        }
        Err(Error::PermissionDenied(format!(
            "uid {} (pid {pid}) is neither root nor a member of berthd's group (gid {}); ask an administrator to add it",
            peer.uid, self.group
        )))
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let connection = request.extensions().get::<ConnectionInfo>();
        let peer = self.admit(connection.map(|c| &c.credentials))?;
        request.extensions_mut().insert(peer);
        Ok(request)
    }
}

/// The peer [`Gate`] attached to `request`.
pub fn peer<T>(request: &Request<T>) -> Result<Peer, Status> {
    request.extensions().get::<Peer>().cloned().ok_or_else(|| {
        Status::from(Error::Internal(
            "a request reached a service without passing the peer gate".into(),
        ))
    })
}

/// Refuses `rpc` to a peer other than uid 0.
pub fn require_root(peer: &Peer, rpc: &str) -> Result<(), Status> {
    if peer.is_root() {
        return Ok(());
    }
    Err(Status::from(Error::PermissionDenied(format!(
        "{rpc} replaces berthd's running image, which only uid 0 may ask; uid {} is a member of berthd's group, not root",
        peer.uid
    ))))
}

/// One line per mutating request: who asked what, of which container.
pub fn audit(peer: &Peer, rpc: &str, id: &str) {
    tracing::info!(
        target: "berth::audit",
        peer_uid = peer.uid,
        peer_gid = peer.gid,
        peer_pid = peer.pid,
        rpc,
        id = %logged(id),
        "request"
    );
}

/// A request's container id as the log records it, before anything has checked it: as given
/// when it is a valid id (which has nothing to escape), else quoted and cut to its first 200
/// characters, so a client can neither forge a line with a newline nor write megabytes.
pub fn logged(id: &str) -> Cow<'_, str> {
    if crate::supervisor::validate::plain_name(id, 64) {
        Cow::Borrowed(id)
    } else {
        Cow::Owned(crate::error::quote(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(pid: i32, uid: u32, groups: Option<&[u32]>) -> PeerCredentials {
        let ucred = libc::ucred { pid, uid, gid: uid };
        PeerCredentials(Some(ucred.into()), groups.map(Into::into))
    }

    /// The groups `SO_PEERGROUPS` recorded at connect time admit the peer even once the process
    /// that connected is gone (here a pid that does not exist): a connection handed to a child
    /// outlives its opener. Without them the groups come from `/proc`, which then fails.
    #[test]
    fn the_groups_taken_at_accept_admit_a_peer_whose_process_is_gone() {
        let gate = Gate::new(4242);
        let gone = i32::MAX - 1;
        let member = gate
            .admit(Some(&credentials(gone, 1000, Some(&[10, 4242]))))
            .unwrap();
        assert_eq!((member.uid, member.pid), (1000, gone as u32));
        assert!(matches!(
            gate.admit(Some(&credentials(gone, 1000, Some(&[10])))),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            gate.admit(Some(&credentials(gone, 1000, None))),
            Err(Error::Unavailable(_))
        ));
    }

    #[test]
    fn logged_ids_are_escaped_and_bounded_unless_valid() {
        assert_eq!(logged("web-1.prod_x"), "web-1.prod_x");
        assert_eq!(logged(""), "\"\"");
        let forged = "x\n2026-01-01T00:00:00Z  INFO berth::audit: request rpc=\"Forged\"";
        let shown = logged(forged);
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.starts_with("\"x\\n2026"), "{shown}");
        let huge = "y".repeat(4 << 20);
        assert!(logged(&huge).len() < 300);
    }
}
