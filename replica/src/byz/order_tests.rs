//! The core driven by hand and by a small simulated network: every replica gets the same
//! decisions and runs the same log, whatever the arrival order within the delay bound,
//! including a client that signs two items for one sequence number.

use super::*;
use crate::byz::{chain_sig, keys, prepare, sign_item, verify_prepared};
use crate::machine::kv::Kv;
use ed25519_dalek::SigningKey;
use lockstep_proto::{Admit, ByzCommand, Tombstone};

const DELTA: u64 = 1_000; // δ = 1 ms

struct Sim {
    cores: Vec<Core>,
    rkeys: Vec<SigningKey>,
    master: SigningKey,
    clients: BTreeMap<String, SigningKey>,
    /// (time, tiebreak) -> (to, item, chain)
    queue: BTreeMap<(u64, u64), (usize, SignedItem, Vec<ChainSig>)>,
    n: u64,
    now: u64,
    logs: Vec<Vec<(u64, Vec<u8>)>>,
    /// When each replica executed each command (by payload).
    exec_at: Vec<HashMap<Vec<u8>, u64>>,
    ended: Vec<Vec<(SlotKey, String)>>,
    /// Delay of a relay from i to j.
    relay_delay: fn(usize, usize) -> u64,
}

fn key(b: u8) -> SigningKey {
    SigningKey::from_bytes(&[b; 32])
}

impl Sim {
    fn new(n: usize, stability: Stability) -> Sim {
        let rkeys: Vec<SigningKey> = (0..n).map(|i| key(10 + i as u8)).collect();
        let master = key(1);
        let clients: BTreeMap<String, SigningKey> = [("alice".to_string(), key(2)), ("bob".to_string(), key(3))]
            .into_iter()
            .collect();
        let directory: BTreeMap<_, _> = clients.iter().map(|(k, v)| (k.clone(), v.verifying_key())).collect();
        let timing = Timing {
            stability,
            t: (n - 1) / 2,
            delay_us: DELTA,
            skew_us: 500,
        };
        let members: Vec<_> = rkeys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("r{i}"), String::new(), k.verifying_key()))
            .collect();
        let cores = (0..n)
            .map(|i| {
                let mut c = Core::new(
                    format!("r{i}"),
                    Runtime::new(Box::new(Kv::default())),
                    master.verifying_key(),
                    directory.clone(),
                );
                c.start_era(
                    EraParams {
                        number: 1,
                        start_index: 0,
                        members: members.clone(),
                        master_session: 7,
                        timing,
                    },
                    None,
                );
                c
            })
            .collect();
        Sim {
            cores,
            rkeys,
            master,
            clients,
            queue: BTreeMap::new(),
            n: 0,
            now: 0,
            logs: vec![Vec::new(); n],
            exec_at: vec![HashMap::new(); n],
            ended: vec![Vec::new(); n],
            relay_delay: |_, _| DELTA / 2,
        }
    }

    fn send(&mut self, at: u64, to: usize, item: SignedItem) {
        self.n += 1;
        self.queue.insert((at, self.n), (to, item, Vec::new()));
    }

    fn send_all(&mut self, at: u64, item: SignedItem) {
        for i in 0..self.cores.len() {
            self.send(at, i, item.clone());
        }
    }

    fn deliver(&mut self, to: usize, signed: SignedItem, chain: Vec<ChainSig>) {
        let now = self.now;
        let prepared = prepare(&self.cores[to], &signed, now).expect("decodable");
        let valid = match verify_prepared(&prepared, &signed, &chain) {
            Ok(v) => v,
            Err(_) => return,
        };
        if !matches!(prepared.check, Precheck::Verify { .. }) {
            return;
        }
        if matches!(prepared.item.body, Some(ItemBody::Open(_))) {
            return;
        }
        if let Offer::Accepted { mut chain } = self.cores[to].offer(signed.clone(), prepared.item, valid, now) {
            chain.push(chain_sig(&format!("r{to}"), &self.rkeys[to], 1, &signed));
            for j in 0..self.cores.len() {
                if j != to {
                    let d = (self.relay_delay)(to, j);
                    self.n += 1;
                    self.queue.insert((now + d, self.n), (j, signed.clone(), chain.clone()));
                }
            }
        }
    }

    fn tick_all(&mut self) {
        for i in 0..self.cores.len() {
            for e in self.cores[i].tick(self.now) {
                match e {
                    Effect::Log(entry) => {
                        if let Some(lockstep_proto::log_entry::Body::Command(c)) = entry.body {
                            self.exec_at[i].insert(c.payload.clone(), self.now);
                            self.logs[i].push((entry.index, c.payload));
                        }
                    }
                    Effect::Reply { slot, body, .. } if !body.error.is_empty() => {
                        self.ended[i].push((slot, body.error))
                    }
                    _ => {}
                }
            }
        }
    }

    fn run_until(&mut self, end: u64) {
        loop {
            let next_msg = self.queue.keys().next().map(|k| k.0);
            let next_deadline = self.cores.iter().filter_map(|c| c.next_deadline()).min();
            let next = match (next_msg, next_deadline) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => break,
            };
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            while let Some((&(at, n), _)) = self.queue.first_key_value() {
                if at > self.now {
                    break;
                }
                let Some((to, item, chain)) = self.queue.remove(&(at, n)) else {
                    break;
                };
                self.deliver(to, item, chain);
            }
            self.tick_all();
        }
        self.now = end;
        self.tick_all();
    }

    fn item(&self, who: &str, session: u64, seq: u64, ts: u64, horizon: u64, body: ItemBody) -> SignedItem {
        let item = StreamItem {
            identity: who.to_string(),
            session,
            seq,
            ts,
            horizon,
            era: 1,
            body: Some(body),
        };
        let k = if who == MASTER_IDENTITY || matches!(item.body, Some(ItemBody::Tombstone(_))) {
            &self.master
        } else {
            &self.clients[who]
        };
        sign_item(k, &item)
    }

    fn put(&self, who: &str, seq: u64, ts: u64, value: &str) -> SignedItem {
        self.item(
            who,
            1,
            seq,
            ts,
            0,
            ItemBody::Command(ByzCommand {
                request_session: "s".into(),
                request_seq: seq,
                payload: format!(r#"{{"op":"put","key":"k","value":"{value}"}}"#).into_bytes(),
            }),
        )
    }

    fn admit(&self, seq: u64, ts: u64, who: &str, floor: u64) -> SignedItem {
        let open = self.item(who, 1, 0, ts, 0, ItemBody::Open(Noop {}));
        self.item(
            MASTER_IDENTITY,
            7,
            seq,
            ts,
            0,
            ItemBody::Admit(Admit {
                open: Some(open),
                public_key: self.clients[who].verifying_key().to_bytes().to_vec(),
                floor,
            }),
        )
    }

    fn master_tick(&self, seq: u64, ts: u64) -> SignedItem {
        self.item(MASTER_IDENTITY, 7, seq, ts, 0, ItemBody::Noop(Noop {}))
    }

    fn values(&self, i: usize) -> Vec<String> {
        self.logs[i]
            .iter()
            .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    fn assert_agree(&self) {
        for i in 1..self.cores.len() {
            assert_eq!(self.logs[0], self.logs[i], "replica {i} ran a different log");
            assert_eq!(self.cores[0].state_digest(), self.cores[i].state_digest());
        }
    }
}

/// Admit alice and bob (floors 100), then have the master tick far ahead.
fn admitted(stability: Stability) -> Sim {
    let mut s = Sim::new(3, stability);
    let a = s.admit(1, 10, "alice", 100);
    let b = s.admit(2, 11, "bob", 100);
    s.send_all(0, a);
    s.send_all(0, b);
    let t = s.master_tick(3, 1_000_000);
    s.send_all(0, t);
    s.run_until(20 * DELTA);
    s
}

#[test]
fn lamport_runs_stable_items_in_timestamp_order_everywhere() {
    let mut s = admitted(Stability::Lamport);
    // bob's item has the smaller timestamp but reaches replica 2 last.
    let a = s.put("alice", 1, 200, "a");
    let b = s.put("bob", 1, 150, "b");
    s.send_all(30 * DELTA, a);
    for i in 0..2 {
        s.send(30 * DELTA, i, b.clone());
    }
    s.send(31 * DELTA, 2, b);
    s.run_until(40 * DELTA);
    assert_eq!(
        s.values(0).len(),
        1,
        "bob's ts 150 is stable (alice is past it); alice's 200 waits for bob to move past it"
    );
    let a2 = s.item("alice", 1, 2, 300, 0, ItemBody::Noop(Noop {}));
    let b2 = s.item("bob", 1, 2, 301, 0, ItemBody::Noop(Noop {}));
    s.send_all(41 * DELTA, a2);
    s.send_all(41 * DELTA, b2);
    s.run_until(60 * DELTA);
    assert_eq!(s.logs[0].len(), 2, "{:?}", s.values(0));
    assert!(
        s.values(0)[0].contains(r#""value":"b""#),
        "bob (ts 150) runs first: {:?}",
        s.values(0)
    );
    s.assert_agree();
}

#[test]
fn a_horizon_promise_makes_an_item_stable_without_waiting_for_the_next_message() {
    let mut s = admitted(Stability::Lamport);
    let a = s.put("alice", 1, 200, "a");
    // bob promises nothing below 10_000 with a no-op.
    let b = s.item("bob", 1, 1, 150, 10_000, ItemBody::Noop(Noop {}));
    s.send_all(30 * DELTA, a);
    s.send_all(30 * DELTA, b);
    s.run_until(40 * DELTA);
    assert_eq!(s.values(0).len(), 1);
    s.assert_agree();
}

#[test]
fn a_client_signing_two_items_for_one_sequence_ends_its_stream_at_every_replica() {
    let mut s = admitted(Stability::Lamport);
    let x = s.put("alice", 1, 200, "x");
    let y = s.put("alice", 1, 201, "y");
    // x reaches replica 0 first, y the others a bit later (within the delay bound).
    s.send(30 * DELTA, 0, x);
    s.send(30 * DELTA + DELTA / 3, 1, y.clone());
    s.send(30 * DELTA + DELTA / 2, 2, y);
    let b = s.put("bob", 1, 300, "b");
    s.send_all(30 * DELTA, b);
    let b2 = s.item("bob", 1, 2, 400, 0, ItemBody::Noop(Noop {}));
    s.send_all(31 * DELTA, b2);
    s.run_until(60 * DELTA);
    s.assert_agree();
    assert_eq!(s.values(0).len(), 1, "only bob's put ran: {:?}", s.values(0));
    for i in 0..3 {
        assert!(
            s.ended[i]
                .iter()
                .any(|(k, why)| k.0 == "alice" && why.contains("different items")),
            "replica {i}: {:?}",
            s.ended[i]
        );
    }
}

#[test]
fn a_second_version_after_the_decision_is_ignored_everywhere() {
    let mut s = admitted(Stability::Lamport);
    let x = s.put("alice", 1, 200, "x");
    s.send_all(30 * DELTA, x);
    s.run_until(40 * DELTA);
    let y = s.put("alice", 1, 201, "y");
    s.send(50 * DELTA, 1, y);
    let (a2, b) = (
        s.item("alice", 1, 2, 300, 0, ItemBody::Noop(Noop {})),
        s.item("bob", 1, 1, 400, 0, ItemBody::Noop(Noop {})),
    );
    s.send_all(51 * DELTA, a2);
    s.send_all(51 * DELTA, b);
    s.run_until(70 * DELTA);
    assert_eq!(s.values(1), vec![r#"{"op":"put","key":"k","value":"x"}"#.to_string()]);
    s.assert_agree();
}

#[test]
fn a_tombstone_from_the_master_ends_a_silent_client_and_unblocks_the_others() {
    let mut s = admitted(Stability::Lamport);
    let b = s.put("bob", 1, 200, "b");
    s.send_all(30 * DELTA, b);
    s.run_until(40 * DELTA);
    assert!(s.logs[0].is_empty(), "alice never sent anything: bob's item waits");
    let tomb = s.item("alice", 1, 1, 0, 0, ItemBody::Tombstone(Tombstone {}));
    s.send_all(41 * DELTA, tomb);
    s.run_until(60 * DELTA);
    assert_eq!(s.values(0).len(), 1);
    s.assert_agree();
}

/// A new operator leader resumes the master stream at the sequence number t + 1 replicas
/// report, while the old leader's last item for it reached only one replica: two master items
/// for one slot. The stream ends there, and every replica stops at one barrier: what was
/// ordered before the stream's bound ran, nothing after it did.
#[test]
fn a_master_stream_that_ends_stops_every_replica_at_one_barrier() {
    let mut s = Sim::new(3, Stability::Lamport);
    let (a, b) = (s.admit(1, 10, "alice", 100), s.admit(2, 11, "bob", 100));
    s.send_all(0, a);
    s.send_all(0, b);
    let tick = s.master_tick(3, 1_000); // the master's bound: 1_001
    s.send_all(0, tick);
    s.run_until(20 * DELTA);
    for (who, seq, ts, v) in [
        ("alice", 1, 500, "a1"),
        ("bob", 1, 900, "b1"),
        ("alice", 2, 1_500, "a2"),
        ("bob", 2, 1_600, "b2"),
    ] {
        let put = s.put(who, seq, ts, v);
        s.send_all(21 * DELTA, put);
    }
    let (old, new) = (s.master_tick(4, 2_000), s.master_tick(4, 2_100));
    s.send(30 * DELTA, 0, old);
    s.send(30 * DELTA, 1, new.clone());
    s.send(30 * DELTA, 2, new);
    s.run_until(80 * DELTA);
    s.assert_agree();
    let ran: Vec<String> = s.values(0);
    assert_eq!(
        ran.len(),
        2,
        "only the puts stamped below the master's bound ran: {ran:?}"
    );
    assert!(ran[0].contains(r#""a1""#) && ran[1].contains(r#""b1""#), "{ran:?}");
    let barrier = s.cores[0].barrier.clone();
    assert!(barrier.is_some(), "replica 0 stopped at no barrier");
    for i in 0..3 {
        assert_eq!(s.cores[i].barrier, barrier, "replica {i} stopped elsewhere");
        assert!(
            s.ended[i]
                .iter()
                .any(|(k, why)| k.0 == MASTER_IDENTITY && why.contains("different items")),
            "replica {i}: {:?}",
            s.ended[i]
        );
    }
}

#[test]
fn physical_clock_orders_by_timestamp_at_ts_plus_delta() {
    let mut s = Sim::new(3, Stability::Physical);
    let a = s.admit(1, 10, "alice", 100);
    let b = s.admit(2, 11, "bob", 100);
    s.send_all(10, a);
    s.send_all(11, b);
    s.run_until(50 * DELTA);
    let x = s.put("alice", 1, 60 * DELTA + 5, "a");
    let y = s.put("bob", 1, 60 * DELTA, "b");
    s.send_all(60 * DELTA + 10, x);
    s.send(60 * DELTA + 20, 0, y.clone());
    s.send(60 * DELTA + 400, 1, y.clone());
    s.send(60 * DELTA + 900, 2, y);
    let delta = s.cores[0].era.as_ref().map(|e| e.timing.execute_at(0)).unwrap_or(0);
    s.run_until(60 * DELTA + delta - 10);
    assert!(s.logs[0].is_empty(), "nothing runs before ts + Δ");
    s.run_until(80 * DELTA + delta);
    assert_eq!(s.values(0).len(), 2);
    assert!(s.values(0)[0].contains(r#""value":"b""#));
    s.assert_agree();
}

/// `PhysicalClock`, alice admitted, and her first put stamped `ts` (not yet sent): the
/// simulation, the put, `ts` and the era's timing.
fn physical_put() -> (Sim, SignedItem, u64, Timing) {
    let mut s = Sim::new(3, Stability::Physical);
    let a = s.admit(1, 10, "alice", 100);
    s.send_all(10, a);
    s.run_until(50 * DELTA);
    let ts = 60 * DELTA;
    let x = s.put("alice", 1, ts, "a");
    let timing = s.cores[0].era.as_ref().expect("an era").timing;
    (s, x, ts, timing)
}

impl Sim {
    /// Offer `x` to replica `to` at `now` as the client sends it (no relay signatures).
    fn offer_direct(&mut self, to: usize, x: &SignedItem, now: u64) -> Offer {
        let prepared = prepare(&self.cores[to], x, now).expect("decodable");
        let valid = verify_prepared(&prepared, x, &[]).expect("validly signed");
        self.cores[to].offer(x.clone(), prepared.item, valid, now)
    }
}

#[test]
fn an_item_after_its_window_is_late_by_how_much_and_in_time_elsewhere() {
    let (mut s, x, ts, timing) = physical_put();
    let last = timing.window(0, ts, 0);
    assert!(
        matches!(s.offer_direct(0, &x, last + 250), Offer::Late(250)),
        "250 µs after the window"
    );
    assert!(
        matches!(s.offer_direct(1, &x, last), Offer::Accepted { .. }),
        "at the window's last moment"
    );
}

#[test]
fn forged_and_unknown_items_are_refused_before_the_core_sees_them() {
    let s = admitted(Stability::Lamport);
    let good = s.put("alice", 1, 200, "x");
    let mut forged = good.clone();
    forged.signature[0] ^= 1;
    let p = prepare(&s.cores[0], &forged, 0).expect("decodable");
    assert!(verify_prepared(&p, &forged, &[]).is_err());
    let stranger = {
        let item = StreamItem {
            identity: "mallory".into(),
            session: 1,
            seq: 1,
            era: 1,
            ts: 5,
            ..Default::default()
        };
        sign_item(&key(9), &item)
    };
    let p = prepare(&s.cores[0], &stranger, 0).expect("decodable");
    assert!(matches!(p.check, Precheck::Reject(ref why) if why.contains("unknown client")));
    let wrong_era = {
        let item = StreamItem {
            identity: "alice".into(),
            session: 1,
            seq: 1,
            era: 9,
            ts: 5,
            ..Default::default()
        };
        sign_item(&s.clients["alice"], &item)
    };
    let p = prepare(&s.cores[0], &wrong_era, 0).expect("decodable");
    assert!(matches!(p.check, Precheck::Reject(_)));
    let _ = keys::sha256(b"");
}

/// A command with a promise, its payload a put of `value`.
fn promised_put(s: &Sim, who: &str, seq: u64, ts: u64, horizon: u64, value: &str) -> SignedItem {
    s.item(
        who,
        1,
        seq,
        ts,
        horizon,
        ItemBody::Command(ByzCommand {
            request_session: who.into(),
            request_seq: seq,
            payload: format!(r#"{{"op":"put","key":"{who}","value":"{value}"}}"#).into_bytes(),
        }),
    )
}

/// Alice's command is in flight far longer than she expected (its answer comes late), while
/// bob keeps writing past her promise. With `renew`, alice renews her promise with a no-op
/// at `renew_at` (as the client does, `crate::byz::promise`); without, she sends nothing
/// until her next command. Returns when every replica ran each of bob's puts, after it was
/// sent, and checks that alice's stream survived (her items kept their promises).
fn bob_behind_a_slow_alice(renew: bool) -> Vec<(u64, u64)> {
    let mut s = admitted(Stability::Lamport);
    let timing = s.cores[0].era.as_ref().map(|e| e.timing).expect("era");
    let ahead = crate::byz::renew_ahead(&timing);
    let gap = 20 * DELTA; // alice's expected round trip
    let t0 = 30 * DELTA;
    let p = crate::byz::promise(t0, t0, gap, ahead);
    // Alice's items take the whole delay bound to arrive, bob's none.
    s.send_all(t0 + DELTA, promised_put(&s, "alice", 1, t0, p.horizon, "a1"));
    // Alice: renewals until her answer arrives at t0 + 5 gaps, then her next command.
    let answer_at = t0 + 5 * gap;
    let (mut seq, mut last_ts, mut horizon, mut renew_at) = (1u64, t0, p.horizon, p.renew_at);
    while renew && renew_at < answer_at {
        seq += 1;
        let now = renew_at;
        let ts = now.max(last_ts + 1).max(horizon);
        assert!(ts >= horizon, "a renewal keeps the promise it renews");
        let p = crate::byz::promise(now, ts, gap, ahead);
        assert!(p.horizon > horizon && p.renew_at > now);
        let noop = s.item("alice", 1, seq, ts, p.horizon, ItemBody::Noop(Noop {}));
        s.send_all(now + DELTA, noop);
        (last_ts, horizon, renew_at) = (ts, p.horizon, p.renew_at);
    }
    let ts = answer_at.max(last_ts + 1).max(horizon);
    let next = promised_put(&s, "alice", seq + 1, ts, ts + gap, "a2");
    s.send_all(answer_at + DELTA, next);
    // Bob: a write every 3 δ once alice's command is decided, each promising nothing beyond
    // its own timestamp.
    let mut bob = Vec::new();
    for i in 0..25u64 {
        let at = t0 + DELTA + 3 * DELTA * i;
        s.send_all(at, promised_put(&s, "bob", i + 1, at, at + 1, &format!("b{i}")));
        bob.push(at);
    }
    // And a no-op far ahead, so alice's items are not waiting for bob.
    s.send_all(
        t0 + 80 * DELTA,
        s.item("bob", 1, 26, t0 + 80 * DELTA, 1_000_000, ItemBody::Noop(Noop {})),
    );
    s.run_until(t0 + 200 * DELTA);
    s.assert_agree();
    for i in 0..3 {
        assert!(s.ended[i].is_empty(), "replica {i} ended a stream: {:?}", s.ended[i]);
    }
    assert_eq!(s.logs[0].len(), 27, "every put ran: {:?}", s.values(0));
    bob.iter()
        .enumerate()
        .map(|(i, &at)| {
            let payload = format!(r#"{{"op":"put","key":"bob","value":"b{i}"}}"#).into_bytes();
            let done = (0..3).map(|r| s.exec_at[r][&payload]).max().unwrap_or(u64::MAX);
            (at, done)
        })
        .collect()
}

#[test]
fn a_renewed_promise_keeps_other_streams_from_waiting_for_a_slow_command() {
    let timing = Timing {
        stability: Stability::Lamport,
        t: 1,
        delay_us: DELTA,
        skew_us: 0,
    };
    // Decided a relay's delay after the decision window at the latest (δ/2 in this network).
    let own_decision = timing.decide_at(0) + DELTA / 2;
    for (at, done) in bob_behind_a_slow_alice(true) {
        assert!(
            done <= at + own_decision,
            "bob's put sent at {at} ran at {done}: held back {} µs past its own decision",
            done - at - own_decision
        );
    }
    // The same without renewals: bob's puts past alice's first promise wait for her next
    // command (sent at t0 + 5 gaps = 130 δ) to be decided.
    let held: Vec<_> = bob_behind_a_slow_alice(false)
        .into_iter()
        .filter(|(at, done)| *done > at + own_decision)
        .collect();
    assert!(held.len() > 10, "without renewals bob waits for alice: {held:?}");
    assert!(held.iter().all(|(_, done)| *done >= 131 * DELTA + timing.decide_at(0)));
}

#[test]
fn a_promise_leaves_room_to_renew_it_before_it_runs_out() {
    for (stability, t, delay, gap) in [
        (Stability::Lamport, 1, 2_000, 50_000),
        (Stability::Lamport, 2, 10_000, 30_000),
        (Stability::Lamport, 1, 100_000, 50_000),
        (Stability::Physical, 1, 2_000, 50_000),
    ] {
        let timing = Timing {
            stability,
            t,
            delay_us: delay,
            skew_us: 0,
        };
        let ahead = crate::byz::renew_ahead(&timing);
        let now = 1_000_000;
        let p = crate::byz::promise(now, now + 5, gap, ahead);
        // Never due at once (a storm of no-ops), at most once per expected gap.
        assert_eq!(p.renew_at, now + gap, "{stability:?} t={t} δ={delay}");
        if stability == Stability::Lamport && ahead <= gap {
            // A renewal sent then arrives within δ and is decided before the horizon.
            assert!(timing.decide_at(p.renew_at + delay) < p.horizon, "t={t} δ={delay}");
        }
        assert!(p.horizon > now + 5);
    }
}

#[test]
fn a_batch_runs_its_commands_in_order_each_at_its_own_index_everywhere() {
    let mut s = admitted(Stability::Lamport);
    let command = |seq: u64, payload: &str| lockstep_proto::BatchEntry {
        kind: Some(batch_entry::Kind::Command(ByzCommand {
            request_session: "alice-app".into(),
            request_seq: seq,
            payload: payload.as_bytes().to_vec(),
        })),
    };
    let query = |payload: &str| lockstep_proto::BatchEntry {
        kind: Some(batch_entry::Kind::Query(ByzCommand {
            payload: payload.as_bytes().to_vec(),
            ..Default::default()
        })),
    };
    let batch = s.item(
        "alice",
        1,
        1,
        200,
        0,
        ItemBody::Batch(CommandBatch {
            entries: vec![
                command(1, r#"{"op":"put","key":"k","value":"one"}"#),
                command(2, "not a command"),
                query(r#"{"op":"get","key":"k"}"#),
                command(3, r#"{"op":"put","key":"k","value":"three"}"#),
            ],
        }),
    );
    s.send_all(30 * DELTA, batch);
    // Bob moves past the batch's timestamp: it is stable.
    let b = s.item("bob", 1, 1, 300, 0, ItemBody::Noop(Noop {}));
    s.send_all(30 * DELTA, b);
    s.run_until(40 * DELTA);
    s.assert_agree();
    let puts = [
        r#"{"op":"put","key":"k","value":"one"}"#,
        r#"{"op":"put","key":"k","value":"three"}"#,
    ];
    assert_eq!(s.values(0), puts, "the valid commands ran, in the batch's order");
    let slot: SlotKey = ("alice".into(), 1, 1);
    let replies: Vec<ReplyBody> = (0..3)
        .map(|i| s.cores[i].cached_reply(&slot).expect("the batch was answered"))
        .collect();
    for r in &replies[1..] {
        assert_eq!(
            (&r.output, &r.error, r.index),
            (&replies[0].output, &replies[0].error, replies[0].index),
            "every replica answers the batch alike"
        );
    }
    let outputs = BatchOutputs::decode(replies[0].output.as_slice())
        .expect("batch outputs")
        .outputs;
    assert_eq!(outputs.len(), 4, "one output per entry");
    let first = s.logs[0][0].0;
    assert_eq!((outputs[0].index, outputs[0].error.as_str()), (first, ""));
    assert_eq!(outputs[1].index, 0, "a refused command takes no index");
    assert!(outputs[1].error.starts_with("invalid command"), "{}", outputs[1].error);
    assert_eq!(
        (
            outputs[2].index,
            String::from_utf8_lossy(&outputs[2].output).contains(r#""one""#)
        ),
        (first, true),
        "the query reads what the batch wrote before it: {:?}",
        String::from_utf8_lossy(&outputs[2].output)
    );
    assert_eq!((outputs[3].index, outputs[3].error.as_str()), (first + 1, ""));
    assert_eq!(replies[0].index, first + 1, "the reply names the batch's last index");
}

#[test]
fn an_empty_batch_is_refused_alike_and_runs_nothing() {
    let mut s = admitted(Stability::Lamport);
    let batch = s.item("alice", 1, 1, 200, 0, ItemBody::Batch(CommandBatch { entries: vec![] }));
    s.send_all(30 * DELTA, batch);
    let b = s.item("bob", 1, 1, 300, 0, ItemBody::Noop(Noop {}));
    s.send_all(30 * DELTA, b);
    s.run_until(40 * DELTA);
    s.assert_agree();
    assert!(s.values(0).is_empty());
    for i in 0..3 {
        let r = s.cores[i].cached_reply(&("alice".into(), 1, 1)).expect("answered");
        assert!(r.error.starts_with("invalid command"), "{}", r.error);
    }
}

#[test]
fn an_item_that_missed_its_window_is_refused_where_no_version_is_held() {
    let (mut s, x, ts, timing) = physical_put();
    let slot: SlotKey = ("alice".into(), 1, 1);
    // Replica 0 hears it too late; replica 1 in time.
    let late = timing.window(0, ts, 0) + 1;
    assert!(matches!(s.offer_direct(0, &x, late), Offer::Late(_)));
    assert!(matches!(s.offer_direct(1, &x, ts), Offer::Accepted { .. }));
    let final_at = s.cores[0].physical_final_at(ts).expect("PhysicalClock");
    assert!(final_at > timing.execute_at(ts), "after the item would have run");
    let refusal = s.cores[0].late_refusal(&slot, ts).expect("no version held: refused");
    assert_eq!(refusal.error, LATE_REFUSAL);
    assert_eq!(
        s.cores[0].cached_reply(&slot).map(|r| r.error),
        Some(LATE_REFUSAL.to_string()),
        "the same item sent again gets the same answer"
    );
    assert!(
        s.cores[1].late_refusal(&slot, ts).is_none(),
        "a replica holding a version waits for it to run"
    );
    assert!(
        Sim::new(3, Stability::Lamport).cores[0].physical_final_at(ts).is_none(),
        "LamportClock refuses nothing this way"
    );
}
