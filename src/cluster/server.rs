//! Layer: cluster (imports core, store, net, node).
//!
//! What the IPC port does with a request that passed the transport's checks (`net::ipc`): a
//! join is the only thing a client without a certificate may ask; everything else needs a
//! certificate from the cluster CA naming a current member. Heartbeats are answered whatever the
//! sender's major version (that is how INCOMPATIBLE is seen); replication is refused across major
//! versions. Digest requests are answered by the core's responder from the committed digest,
//! without the driver; requests for documents go to the driver.

use super::state::ClusterState;
use super::{join, monitor};
use crate::core::proto::{self, Refusal, Request, Response};
use crate::core::repl;
use crate::net::ipc::{short, Handler, IpcRequest};
use std::sync::Arc;

pub struct IpcHandler {
    state: Arc<ClusterState>,
}

impl IpcHandler {
    pub fn new(state: Arc<ClusterState>) -> IpcHandler {
        IpcHandler { state }
    }

    async fn answer(&self, req: IpcRequest) -> Response {
        let node = &self.state.node;
        let cfg = node.config();
        let IpcRequest {
            peer,
            peer_key,
            remote,
            env,
        } = req;
        if let Request::Join(j) = env.body {
            return match join::admit(&self.state, &env.version, j).await {
                Ok(resp) => Response::Joined(Box::new(resp)),
                Err(r) => {
                    tracing::warn!(peer = %remote, message = %r.message, "join refused");
                    Response::Refused {
                        reason: r.reason,
                        message: r.message,
                    }
                }
            };
        }
        let refuse = |reason: Refusal, message: String| {
            tracing::warn!(peer = %remote, node = ?peer, %message, "IPC request refused");
            Response::Refused { reason, message }
        };
        let Some(peer) = peer.clone() else {
            return refuse(
                Refusal::NotMember,
                "a client certificate of the cluster is required".into(),
            );
        };
        if env.cluster_id != cfg.cluster_id || env.from != peer {
            return refuse(
                Refusal::Cluster,
                "the envelope does not match the certificate".into(),
            );
        }
        let key = peer_key.unwrap_or_default();
        let members = node.members();
        match members.iter().find(|m| m.id == peer) {
            Some(m) if m.removed => {
                return refuse(
                    Refusal::NotMember,
                    format!("node {peer} was removed from this cluster"),
                )
            }
            // The key must be the one pinned at the member's admission: a certificate minted
            // with the cluster CA's key for this member's ID holds another.
            Some(m) if !m.key.is_empty() && m.key != key => {
                tracing::warn!(
                    peer = %remote,
                    node = %peer,
                    key = %short(&key),
                    pinned = %short(&m.key),
                    "refused a certificate whose key is not the one pinned for its node (minted with the cluster CA's key?)"
                );
                return Response::Refused {
                    reason: Refusal::NotMember,
                    message: format!("the certificate's key is not the one pinned for node {peer}"),
                };
            }
            Some(_) => {}
            // Certified by the cluster CA, yet not in this node's member list: either this
            // node's list is behind (a lost log, a restored backup), or the certificate was
            // minted with the CA's key. Its heartbeat tells where to fetch its member list; the
            // list is taken only if its admission chains, signature by signature, to a member
            // this node knows (`core::members::verify_chain`). Until then, nothing is served.
            None => {
                if let Request::Heartbeat(hb) = &env.body {
                    self.state.learn_members_from(&peer, &hb.addr, &key);
                }
                return refuse(
                    Refusal::NotMember,
                    format!("node {peer} is not in this node's member list"),
                );
            }
        }
        if let Request::Heartbeat(hb) = &env.body {
            let received = node.clock().wall_ms();
            let mut ack = monitor::heard(&self.state, &peer, &env.version, hb);
            ack.received_wall_ms = received;
            ack.sent_wall_ms = node.clock().wall_ms();
            return Response::HeartbeatAck(ack);
        }
        let ours = crate::net::ipc::version();
        if !proto::compatible(&env.version, &ours) {
            return refuse(
                Refusal::Version,
                format!(
                    "version mismatch: node {peer} runs {}, this node runs {ours}; nodes must share the major version",
                    env.version
                ),
            );
        }
        let catching_up = self.state.claims().busy();
        if let Some(resp) =
            repl::answer_digest(&env.body, &mut node.published().digest(), catching_up)
        {
            return resp;
        }
        match node.serve(&peer, env.body).await {
            Ok(r) => r,
            Err(e) => Response::Refused {
                reason: Refusal::Internal,
                message: e.to_string(),
            },
        }
    }
}

impl Handler for IpcHandler {
    fn handle(&self, req: IpcRequest) -> impl std::future::Future<Output = Response> + Send {
        self.answer(req)
    }
}
