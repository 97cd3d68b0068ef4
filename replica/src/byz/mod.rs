//! Byzantine mode (n = 2t + 1): Schneider's state machine approach with signed client
//! requests, relays with a delay bound (agreement), ordering by stability (Lamport or
//! physical clocks) and outputs voted by the clients. See `docs/byzantine.md`.
//!
//! - [`keys`]: key files and signatures;
//! - [`order`]: the sans-IO protocol core (agreement windows, stability, execution);
//! - [`service`]: the I/O shell (gRPC service, relays to peers, storage, eras);
//! - [`inject`]: test-only faults (cargo feature `fault-injection`).

pub mod inject;
pub mod keys;
pub mod order;
pub mod recovery;
pub mod service;

use ed25519_dalek::SigningKey;
use lockstep_proto::{ChainSig, SignedItem, StreamItem};
use prost::Message;
use std::sync::Arc;

/// Sign an item as its owner.
pub fn sign_item(key: &SigningKey, item: &StreamItem) -> SignedItem {
    let bytes = item.encode_to_vec();
    SignedItem {
        signature: keys::sign(key, &bytes),
        item: bytes,
    }
}

/// A replica's relay signature on an item of `era`.
pub fn chain_sig(replica: &str, key: &SigningKey, era: u64, signed: &SignedItem) -> ChainSig {
    ChainSig {
        replica: replica.to_string(),
        signature: keys::sign(key, &keys::relay_message(era, &keys::sha256(&signed.item))),
        path: Vec::new(),
        position: 0,
    }
}

/// A replica's relay signatures on a batch of items of `era`, appended to each item's chain:
/// one Ed25519 signature over the root of a Merkle tree of the items' digests, each item with
/// its path to the root (a single item: the per-item signature of [`chain_sig`]). What a
/// relay signature proves does not change: this replica vouched for exactly this item in this
/// era; anyone can check it from the item, the path and the signature.
pub fn sign_relays(replica: &str, key: &SigningKey, era: u64, items: &mut [lockstep_proto::Relayed]) {
    let digests: Vec<[u8; 32]> = items
        .iter()
        .map(|r| keys::sha256(r.item.as_ref().map_or(&[][..], |i| i.item.as_slice())))
        .collect();
    if let [single] = items {
        if let Some(item) = &single.item {
            single.chain.push(chain_sig(replica, key, era, item));
        }
        return;
    }
    if items.is_empty() {
        return;
    }
    let (root, paths) = keys::merkle_tree(&digests);
    let signature = keys::sign(key, &keys::relay_batch_message(era, &root));
    for (position, (r, path)) in items.iter_mut().zip(paths).enumerate() {
        r.chain.push(ChainSig {
            replica: replica.to_string(),
            signature: signature.clone(),
            path,
            position: position as u64,
        });
    }
}

/// The promise (`horizon`) a stream's owner attaches to an item it sends at local time `now`
/// with timestamp `ts`: nothing more from it below `now + promise_us` (and never below
/// `ts + 1`, which the stream's order implies anyway).
///
/// Counted from `now`, not from `ts`. An item's `ts` must keep the previous promise
/// (`ts >= horizon`), so with `ts + promise` a stream that sends more often than once per
/// `promise` (no-ops while a command waits, a burst of admissions) pushed each timestamp a full
/// promise further into the future: its items ran ahead of the wall clock without bound and
/// waited for every other stream to catch up (1 client: ~6 ops/s, p50 ~190 ms; 64 admissions
/// spread over ~13 s). From `now`, a timestamp is never more than one promise ahead.
pub fn next_horizon(now: u64, ts: u64, promise_us: u64) -> u64 {
    now.saturating_add(promise_us).max(ts.saturating_add(1))
}

/// How long before a stream's promise runs out its owner must send the next item (a no-op
/// when it has nothing else to send) so that every correct replica holds the renewed promise
/// before the old one lapses (`LamportClock`): δ for the item to arrive, `2(t + 1)δ` until
/// the slot is decided, and one δ more as margin for the sender's timer and the replica's
/// tick. A replica only moves a stream's bound when an item is *decided*, so an item sent when
/// the promise has already run out holds every other stream's later items back for that whole
/// window. `PhysicalClock` orders by `ts + Δ` and waits for no promise: 0.
pub fn renew_ahead(timing: &order::Timing) -> u64 {
    match timing.stability {
        order::Stability::Lamport => (2 * (timing.t as u64 + 1) + 2).saturating_mul(timing.delay_us),
        order::Stability::Physical => 0,
    }
}

/// What a stream's owner promises with an item it sends at `now` stamped `ts`, when it
/// expects to send its next item `gap_us` from now (a busy client: about its round trip; an
/// idle one: its no-op interval), and renewals must be sent `ahead_us` before a promise runs
/// out ([`renew_ahead`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promise {
    /// The item's `horizon`: `now + gap + lead` (never below `ts + 1`).
    pub horizon: u64,
    /// When to send a no-op if nothing else was sent by then: `horizon − lead`, so that it is
    /// decided everywhere before `horizon`.
    pub renew_at: u64,
}

/// The promise for an item (see [`Promise`]). The lead is `min(ahead_us, gap_us)`: the
/// expected next item comes at `now + gap` and, being `lead` before the horizon, is decided
/// everywhere before it, so the stream never holds anyone back; a renewal is sent only when
/// the next item is later than expected (a slow round trip), and at most once per `gap`
/// (the lead never exceeds the gap, so a renewal is never due at once). Every item still
/// keeps the previous promise: its `ts` is at least the previous horizon (`ts ≥ horizon` is
/// what replicas check; see [`next_horizon`]).
pub fn promise(now: u64, ts: u64, gap_us: u64, ahead_us: u64) -> Promise {
    let gap = gap_us.max(1);
    let lead = ahead_us.min(gap);
    let horizon = next_horizon(now, ts, gap.saturating_add(lead));
    Promise {
        horizon,
        renew_at: horizon.saturating_sub(lead).max(now.saturating_add(1)),
    }
}

/// Local wall-clock time in microseconds (the `now` every core call takes).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// An incoming item after the cheap checks done under the core's lock.
pub struct Prepared {
    pub item: StreamItem,
    pub check: order::Precheck,
    era: u64,
    self_id: String,
    members: Vec<(String, ed25519_dalek::VerifyingKey)>,
}

/// Decode `signed` and ask the core what verifying it takes (call with the lock held).
pub fn prepare(core: &order::Core, signed: &SignedItem, now: u64) -> Result<Prepared, String> {
    let item = StreamItem::decode(signed.item.as_slice()).map_err(|e| format!("undecodable item: {e}"))?;
    let d = keys::sha256(&signed.item);
    let check = core.precheck(&item, &d, now);
    let (era, members) = core.era.as_ref().map_or((0, Vec::new()), |e| {
        (e.number, e.members.iter().map(|(id, _, k)| (id.clone(), *k)).collect())
    });
    Ok(Prepared {
        item,
        check,
        era,
        self_id: core.id.clone(),
        members,
    })
}

/// Verify the item's signature and keep the valid relay signatures (distinct members other
/// than this replica). Run without the lock: this is where the CPU goes.
pub fn verify_prepared(p: &Prepared, signed: &SignedItem, chain: &[ChainSig]) -> Result<Vec<ChainSig>, String> {
    let order::Precheck::Verify { key, need_chain } = &p.check else {
        return Ok(Vec::new());
    };
    if !keys::verify(key, &signed.item, &signed.signature) {
        return Err(format!("bad signature on an item of '{}'", p.item.identity));
    }
    let mut valid: Vec<ChainSig> = Vec::new();
    if *need_chain {
        let d = keys::sha256(&signed.item);
        let single = keys::relay_message(p.era, &d);
        for c in chain {
            if c.replica == p.self_id || valid.iter().any(|v| v.replica == c.replica) {
                continue;
            }
            let Some((_, k)) = p.members.iter().find(|(id, _)| *id == c.replica) else {
                continue;
            };
            let msg = if c.path.is_empty() {
                single
            } else {
                match keys::merkle_root(&d, c.position, &c.path) {
                    Some(root) => keys::relay_batch_message(p.era, &root),
                    None => continue,
                }
            };
            if keys::verify(k, &msg, &c.signature) {
                valid.push(c.clone());
            }
        }
    } else {
        // Keep the chain as it came (it is only forwarded, never counted, unless verified).
        valid = Vec::new();
    }
    Ok(valid)
}

/// δ when `spec.ordering.maxDelayMillis` is not set: fits one machine or a quiet LAN.
pub const DEFAULT_MAX_DELAY_MILLIS: u64 = 10;

/// `lockstep-replica --failure-model Byzantine`.
pub async fn run(
    args: crate::ReplicaArgs,
    factory: crate::machine::MachineFactory,
    transport: crate::tls::Transport,
) -> anyhow::Result<()> {
    let cfg = config(&args.byzantine, &transport)?;
    let (shared, services) = service::build(&args, cfg, factory)?;
    let (grpc, http) = crate::listen(&args, "listening (Byzantine mode)").await?;
    serve_until_signal(shared, services, transport, grpc, http).await
}

/// The Byzantine flags checked and read.
fn config(b: &crate::ByzantineArgs, transport: &crate::tls::Transport) -> anyhow::Result<service::ByzConfig> {
    use anyhow::Context;
    let stability = order::Stability::parse(&b.stability).with_context(|| {
        format!(
            "--stability must be LamportClock or PhysicalClock, not '{}'",
            b.stability
        )
    })?;
    let master = b.master_public_key.as_deref().context(
        "Byzantine mode needs the configuration master's public key (--master-public-key / LOCKSTEP_MASTER_PUBLIC_KEY)",
    )?;
    let master_public_key = keys::public_key_arg(master).context("--master-public-key")?;
    Ok(service::ByzConfig {
        key_file: b.key_file.clone(),
        master_public_key,
        client_identities: b.client_identities.clone(),
        ordering: service::OrderingArgs {
            stability,
            delay_us: b.max_delay_millis.max(1) * 1000,
            skew_us: b.max_clock_skew_millis * 1000,
        },
        inject: injected(b.inject.as_deref())?,
        transport: transport.clone(),
    })
}

/// The fault `--inject` asks for (only in a build with fault injection), said loudly.
fn injected(inject: Option<&str>) -> anyhow::Result<Option<inject::Behaviour>> {
    let inject = match inject {
        None => None,
        Some("") => None,
        Some(s) if inject::AVAILABLE => Some(inject::Behaviour::parse(s).map_err(anyhow::Error::msg)?),
        Some(s) => anyhow::bail!(
            "--inject {s}: this build has no fault injection (it needs the cargo feature `fault-injection`, \
             which release builds never enable)"
        ),
    };
    if let Some(b) = inject {
        tracing::warn!(
            behaviour = b.name(),
            "FAULT INJECTION: this replica behaves faultily on purpose"
        );
    }
    Ok(inject)
}

/// Who may call as a replica: the members of the current era (a refusal says why, and the
/// era it is in).
fn membership(shared: &Arc<service::ByzShared>) -> crate::tls::Membership {
    let shared = Arc::downgrade(shared);
    Arc::new(move |id: &str| {
        let Some(shared) = shared.upgrade() else {
            return Err(("and this replica is shutting down".into(), 0));
        };
        let core = shared.lock();
        match &core.era {
            Some(e) if e.members.iter().any(|(m, _, _)| m == id) => Ok(()),
            Some(e) => Err((
                format!(
                    "not a member of era {} ({})",
                    e.number,
                    e.members
                        .iter()
                        .map(|(m, _, _)| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                e.number,
            )),
            None => Err(("and this replica is in no era yet".into(), 0)),
        }
    })
}

/// Serves gRPC (Byzantine and admin services) and HTTP until SIGINT or SIGTERM.
async fn serve_until_signal(
    shared: Arc<service::ByzShared>,
    services: service::ByzServices,
    transport: crate::tls::Transport,
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let max = lockstep_proto::MAX_MESSAGE_BYTES;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grpc_server = transport
        .server()
        .layer(crate::tls::AuthorizeLayer::new(&transport, membership(&shared)))
        .add_service(
            lockstep_proto::byzantine_server::ByzantineServer::new(services.clone()).max_decoding_message_size(max),
        )
        .add_service(lockstep_proto::admin_server::AdminServer::new(services.clone()).max_decoding_message_size(max))
        .serve_with_incoming_shutdown(
            // A framed connection (a fail-stop client's session) is told to use gRPC.
            crate::framed::beside_grpc(
                transport.incoming(grpc),
                crate::framed::Served::Nothing,
                membership(&shared),
            ),
            crate::wait_stop(stop_rx.clone()),
        );
    let http_server = axum::serve(http, service::http_router(shared.clone()))
        .with_graceful_shutdown(crate::wait_stop(stop_rx.clone()));
    let grpc_task = tokio::spawn(grpc_server);
    let http_task = tokio::spawn(async move { http_server.await });
    crate::stop_on_signal(stop_tx, grpc_task, http_task, &shared.writer).await;
    Ok(())
}

#[cfg(test)]
mod horizon_tests {
    use super::next_horizon;

    /// A stream that sends every 10 ms with a 50 ms promise: timestamps stay within one
    /// promise of the clock (they ran ~40 ms further ahead with every item before).
    #[test]
    fn frequent_items_do_not_run_ahead_of_the_clock() {
        let promise = 50_000;
        let (mut last_ts, mut horizon) = (0u64, 0u64);
        for i in 0..1000u64 {
            let now = 1_000_000 + i * 10_000;
            let ts = now.max(last_ts + 1).max(horizon);
            assert!(ts <= now + promise, "item {i}: ts {ts} runs {} us ahead", ts - now);
            last_ts = ts;
            horizon = next_horizon(now, ts, promise);
            assert!(horizon > ts);
        }
    }
}
