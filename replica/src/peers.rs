//! Replication from the primary to each peer: one task per peer per epoch. It sends one
//! Append (or InstallSnapshot) at a time, carrying every entry the peer lacks (batched up
//! to MAX_APPEND_ENTRIES), waits for the answer, and repeats; when there is nothing to send
//! it waits for new entries, a read that needs confirming, or the heartbeat interval.

use crate::node::{PeerMessage, Shared};
use crate::tls::Transport;
use lockstep_proto::peer_client::PeerClient;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

pub const HEARTBEAT: Duration = Duration::from_millis(100);
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

pub fn connect_lazy(transport: &Transport, endpoint: &str) -> Option<Channel> {
    transport.endpoint(endpoint).ok().map(|e| {
        e.connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .timeout(RPC_TIMEOUT)
            .connect_lazy()
    })
}

/// Start replication tasks for every peer of the current epoch (the primary calls this
/// whenever it adopts a configuration).
pub fn start(shared: &Arc<Shared>) {
    let (epoch, peers) = {
        let node = shared.lock();
        (
            node.epoch,
            node.peers
                .iter()
                .map(|(id, p)| (id.clone(), p.endpoint.clone()))
                .collect::<Vec<_>>(),
        )
    };
    for (id, endpoint) in peers {
        let shared = shared.clone();
        tokio::spawn(async move { replicate(shared, id, endpoint, epoch).await });
    }
}

async fn replicate(shared: Arc<Shared>, peer: String, endpoint: String, epoch: u64) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let Some(channel) = connect_lazy(&shared.transport, &endpoint) else {
        tracing::error!(peer, endpoint, "invalid peer endpoint");
        return;
    };
    let client = PeerClient::new(channel)
        .max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
    let mut changed = shared.changed.subscribe();
    let mut last_sent = tokio::time::Instant::now() - HEARTBEAT;
    let mut failures = 0u32;
    let mut in_flight = FuturesUnordered::new();
    loop {
        // Fill the window.
        loop {
            let msg = {
                let mut node = shared.lock();
                if node.epoch != epoch || !node.peers.contains_key(&peer) {
                    return;
                }
                let msg = node.next_message(&peer, last_sent.elapsed() >= HEARTBEAT);
                if let Some(PeerMessage::Append(req, _)) = &msg
                    && let (Some(first), Some(last)) = (req.entries.first(), req.entries.last())
                {
                    node.stages.sent(first.index, last.index, std::time::Instant::now());
                }
                msg
            };
            let Some(msg) = msg else { break };
            last_sent = tokio::time::Instant::now();
            let mut client = client.clone();
            in_flight.push(async move {
                match msg {
                    PeerMessage::Append(req, round) => (client.append(req).await, round),
                    PeerMessage::Snapshot(req) => {
                        tracing::info!(
                            peer = %req.primary_id,
                            index = req.snapshot.as_ref().map_or(0, |s| s.index),
                            "sending snapshot (state transfer)"
                        );
                        (client.install_snapshot(req).await, 0)
                    }
                }
            });
        }
        tokio::select! {
            Some((result, round)) = in_flight.next() => match result {
                Ok(resp) => {
                    failures = 0;
                    let resp = resp.into_inner();
                    {
                        let now = std::time::Instant::now();
                        let mut node = shared.lock();
                        node.on_peer_response(&peer, epoch, round, &resp);
                        if let Some(replicated) = node.replicated_index() {
                            node.stages.acked(replicated, now);
                        }
                        shared.apply_committed(&mut node, now);
                    }
                    shared.after_change();
                }
                Err(status) if crate::tls::refused_epoch(&status).is_some_and(|e| e > epoch) => {
                    // Refused as a non-member by a replica at a newer epoch: this replica
                    // was removed, so it is fenced (as an AppendResponse at that epoch says).
                    let their = crate::tls::refused_epoch(&status).unwrap_or(epoch);
                    let resp = lockstep_proto::AppendResponse { epoch: their, ..Default::default() };
                    shared.lock().on_peer_response(&peer, epoch, round, &resp);
                    shared.after_change();
                }
                Err(status) => {
                    failures += 1;
                    shared.lock().on_peer_unreachable(&peer);
                    if failures == 1 || failures.is_multiple_of(50) {
                        tracing::warn!(peer, endpoint, error = %status.message(), "peer unreachable");
                    }
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(failures.min(10)))).await;
                }
            },
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(last_sent + HEARTBEAT) => {}
        }
    }
}
